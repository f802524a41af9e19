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
