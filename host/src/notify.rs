//! systemd readiness notification (`Type=notify`) through the `sd-notify` crate. Outside
//! systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Start-up is done: the configuration is loaded and the listeners or the link are up.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// Shutdown has begun (a drain follows); systemd waits up to its stop timeout.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// A one-line status shown by `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Sends `WATCHDOG=1` at half the interval systemd asks for (`WatchdogSec=` in the unit,
/// `WATCHDOG_USEC` in the environment) until `stop` resolves; returns at once when the
/// unit has no watchdog. It runs on the program's own runtime, so a runtime whose workers
/// are all stuck stops feeding it and systemd restarts the service.
pub async fn watchdog(stop: impl std::future::Future<Output = ()>) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = std::time::Duration::from_micros(usec / 2);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}
