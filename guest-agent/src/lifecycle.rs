//! The agent's own life, as far as a capability may change it: **hold the link** (the
//! session to the broker closes and no new one is dialled until the hold is released) and
//! **restart into another executable** (the agent drains like on SIGTERM, then `main`
//! replaces the process image with it). Only the upgrade capability uses it: the new
//! agent proves itself on the link while the old one holds its own, and the old one
//! restarts into it once it has.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update; the data (an optional path or
    // token) stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The handle every capability's [`crate::capability::Context`] carries.
#[derive(Clone, Debug)]
pub struct Lifecycle(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// `true` while the link must stay down.
    hold: watch::Sender<bool>,
    /// `true` while a session with the broker is up (the link says so).
    connected: watch::Sender<bool>,
    restart: Mutex<Option<PathBuf>>,
    shutdown: Mutex<Option<CancellationToken>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            hold: watch::channel(false).0,
            connected: watch::channel(false).0,
            restart: Mutex::new(None),
            shutdown: Mutex::new(None),
        }))
    }

    /// Closes the session with the broker and keeps the link from dialling again until the
    /// returned hold is dropped. Resolves once no session is up, or fails after `timeout`
    /// (the hold is then released).
    pub async fn hold_link(&self, timeout: Duration) -> Result<LinkHold, String> {
        self.0.hold.send_replace(true);
        let hold = LinkHold(Some(self.clone()));
        let mut connected = self.0.connected.subscribe();
        let closed = async {
            // An error means the link is gone, which is down too.
            let _ = connected.wait_for(|up| !*up).await;
        };
        match tokio::time::timeout(timeout, closed).await {
            Ok(()) => Ok(hold),
            Err(_) => Err(format!(
                "the session with the broker did not close within {} ms",
                timeout.as_millis()
            )),
        }
    }

    /// Starts the agent's drain (as SIGTERM would) and has `main` replace the process with
    /// `exe` (same arguments and environment) once it is done.
    pub fn restart_into(&self, exe: PathBuf) {
        *lock(&self.0.restart) = Some(exe);
        if let Some(t) = lock(&self.0.shutdown).as_ref() {
            t.cancel();
        }
    }

    /// The executable [`Self::restart_into`] asked for, if any.
    pub fn restart_target(&self) -> Option<PathBuf> {
        lock(&self.0.restart).clone()
    }

    /// The token whose cancellation drains the agent (set by `Agent::start`).
    pub(crate) fn set_shutdown(&self, token: CancellationToken) {
        *lock(&self.0.shutdown) = Some(token);
    }

    pub(crate) fn hold_changes(&self) -> watch::Receiver<bool> {
        self.0.hold.subscribe()
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.0.connected.send_replace(up);
    }
}

/// The link stays down while this lives (see [`Lifecycle::hold_link`]).
#[derive(Debug)]
pub struct LinkHold(Option<Lifecycle>);

impl LinkHold {
    /// Keeps the link down for the rest of this process's life (it is about to restart
    /// into another executable, whose link says everything that is left to say).
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for LinkHold {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            l.0.hold.send_replace(false);
        }
    }
}
