//! Shutdown signals: SIGTERM (systemd's stop) and SIGINT (a person's Ctrl-C).

/// Resolves at the first SIGTERM or SIGINT. If the handlers cannot be installed (which
/// only happens when the process is out of file descriptors) it falls back to Ctrl-C.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        }
    }
}
