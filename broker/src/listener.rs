//! The accept loop both TLS listeners share: a cap on open connections and on handshakes
//! in progress (a semaphore each), one handshake timeout, and failed handshakes counted
//! by listener and reason and logged at a bounded rate.
//!
//! At the connection cap the loop stops accepting, so new connections wait in the
//! kernel's backlog and cost the broker nothing; at the handshake cap an accepted
//! connection waits for a slot before its handshake starts (and its timeout with it).
//! Half-open connections can then hold at most `max_handshakes` slots, each for at most
//! the handshake timeout, and a real agent gets in as soon as one frees.

use crate::config::ListenerLimits;
use crate::metrics::Metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// A bound TCP listener with its limits, ready to serve TLS.
pub struct Listener {
    tcp: TcpListener,
    /// `agent` or `api`: the `listener` label of its metrics and the name in its logs.
    name: &'static str,
    limits: ListenerLimits,
    metrics: ListenerMetrics,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("addr", &self.tcp.local_addr().ok())
            .field("limits", &self.limits)
            .finish()
    }
}

/// This listener's series of the broker's metrics (labelled once, here).
#[derive(Clone)]
struct ListenerMetrics {
    connections: Gauge,
    handshakes: Gauge,
    waiting: Gauge,
    connections_full: Counter,
    handshakes_full: Counter,
    failures: prometheus_client::metrics::family::Family<Vec<(&'static str, String)>, Counter>,
}

impl ListenerMetrics {
    fn new(name: &'static str, m: &Metrics) -> Self {
        let l = || vec![("listener", name.to_string())];
        let full = |limit: &str| {
            m.listener_saturated
                .get_or_create(&vec![
                    ("listener", name.to_string()),
                    ("limit", limit.to_string()),
                ])
                .clone()
        };
        Self {
            connections: m.listener_connections.get_or_create(&l()).clone(),
            handshakes: m.listener_handshakes.get_or_create(&l()).clone(),
            waiting: m.listener_waiting.get_or_create(&l()).clone(),
            connections_full: full("connections"),
            handshakes_full: full("handshakes"),
            failures: m.handshake_failures.clone(),
        }
    }
}

/// Decrements a gauge when dropped, so a cancelled or panicking task leaves it right.
struct Held(Gauge);

impl Held {
    fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Listener {
    pub fn new(tcp: TcpListener, name: &'static str, limits: ListenerLimits, m: &Metrics) -> Self {
        Self {
            tcp,
            name,
            limits,
            metrics: ListenerMetrics::new(name, m),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn limits(&self) -> ListenerLimits {
        self.limits
    }

    /// Accepts connections until `shutdown` and hands each one that finished its TLS
    /// handshake to `handle` (in a task of `tracker`, holding its connection slot until
    /// `handle` returns). Per-connection errors stay per connection.
    pub async fn serve<H, Fut>(
        self,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        handle: H,
    ) where
        H: Fn(TlsStream<TcpStream>, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let connections = Arc::new(Semaphore::new(self.limits.max_connections as usize));
        let shared = Arc::new(Shared {
            name: self.name,
            limits: self.limits,
            acceptor,
            handshakes: Arc::new(Semaphore::new(self.limits.max_handshakes as usize)),
            log: LogLimit::new(self.name),
            metrics: self.metrics,
            handle,
        });
        loop {
            // A connection slot before accepting: at the cap, connections wait in the
            // kernel's backlog instead of in the broker's memory.
            let slot = match connections.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    shared.metrics.connections_full.inc();
                    shared.log.full("connections", self.limits.max_connections);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        slot = connections.clone().acquire_owned() => match slot {
                            Ok(slot) => slot,
                            Err(_) => break, // never closed
                        },
                    }
                }
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.tcp.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = self.name, error = %e, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let conn = Held::new(&shared.metrics.connections);
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            // The handshake runs in a function of its own, so its state and the
            // connection's never take room in the task at the same time (a connection
            // lives for days: every byte of its task counts 10,000 times).
            tracker.spawn(
                async move {
                    let _slot = slot;
                    let _conn = conn;
                    // `let else`, not `if let`: the handshake's result must not stay alive
                    // (1.3 KB of it) while the connection runs.
                    let Some(tls) = shared.handshake(tcp, peer, &shutdown).await else {
                        return;
                    };
                    (shared.handle)(tls, peer).await;
                }
                .instrument(tracing::debug_span!("conn", listener = self.name, %peer)),
            );
        }
    }
}

/// What every connection of one listener shares.
struct Shared<H> {
    name: &'static str,
    limits: ListenerLimits,
    acceptor: TlsAcceptor,
    handshakes: Arc<Semaphore>,
    log: LogLimit,
    metrics: ListenerMetrics,
    handle: H,
}

impl<H> Shared<H> {
    /// Waits for a handshake slot, then runs the TLS handshake within the timeout;
    /// `None` when it failed (counted and logged) or the broker is shutting down.
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) -> Option<TlsStream<TcpStream>> {
        let m = &self.metrics;
        let _turn = match self.handshakes.clone().try_acquire_owned() {
            Ok(turn) => turn,
            Err(_) => {
                m.handshakes_full.inc();
                self.log.full("handshakes", self.limits.max_handshakes);
                let _waiting = Held::new(&m.waiting);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    turn = self.handshakes.clone().acquire_owned() => turn.ok()?, // never closed
                }
            }
        };
        let _in_progress = Held::new(&m.handshakes);
        let timeout = self.limits.handshake_timeout;
        let (reason, error) = match tokio::time::timeout(timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(e)) => (failure_reason(&e), e.to_string()),
            Err(_) => (
                "timeout",
                format!("no complete handshake within {} ms", timeout.as_millis()),
            ),
        };
        m.failures
            .get_or_create(&vec![
                ("listener", self.name.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
        self.log.failed(peer, reason, &error);
        None
    }
}

/// The `reason` label of a failed handshake: a few fixed values, never the error's text
/// (which a peer controls in part).
fn failure_reason(e: &std::io::Error) -> &'static str {
    use tokio_rustls::rustls::Error as T;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<T>()) {
        Some(T::InvalidCertificate(_) | T::NoCertificatesPresented | T::UnsupportedNameType) => {
            "certificate"
        }
        // The peer gave up on us: most often a client that does not trust this broker's
        // certificate.
        Some(T::AlertReceived(_)) => "alert_received",
        Some(T::PeerIncompatible(_)) => "incompatible",
        Some(_) => "protocol",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}

/// At most [`LogLimit::PER_MINUTE`] lines a minute per listener: failed handshakes (and
/// refused first frames, see `agent_link`) come from peers, and a flood of them must not
/// flood the journal. What was left out is counted and said in the next line that is
/// written (the metrics count everything).
pub(crate) struct LogLimit {
    name: &'static str,
    state: Mutex<LogWindow>,
}

struct LogWindow {
    started: Instant,
    written: u32,
    skipped: u64,
}

impl LogLimit {
    const PER_MINUTE: u32 = 10;

    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            name,
            state: Mutex::new(LogWindow {
                started: Instant::now(),
                written: 0,
                skipped: 0,
            }),
        }
    }

    /// Whether a line may be written now, and how many were left out before it.
    pub(crate) fn admit(&self) -> Option<u64> {
        // A poisoned lock only means another thread panicked while counting.
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.started.elapsed() >= Duration::from_secs(60) {
            w.started = Instant::now();
            w.written = 0;
        }
        if w.written >= Self::PER_MINUTE {
            w.skipped += 1;
            return None;
        }
        w.written += 1;
        Some(std::mem::take(&mut w.skipped))
    }

    fn failed(&self, peer: SocketAddr, reason: &str, error: &str) {
        if let Some(skipped) = self.admit() {
            tracing::warn!(
                listener = self.name,
                %peer,
                reason,
                error,
                not_logged_before = skipped,
                "TLS handshake failed (see dbvm_broker_tls_handshake_failures_total)"
            );
        }
    }

    fn full(&self, limit: &str, max: u32) {
        if let Some(skipped) = self.admit() {
            tracing::warn!(
                listener = self.name,
                limit,
                max,
                not_logged_before = skipped,
                "listener at its cap: new connections wait (raise listeners.{}.max_{limit} if this is the normal load)",
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_have_a_few_fixed_reasons() {
        use tokio_rustls::rustls;
        let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            failure_reason(&tls(rustls::Error::NoCertificatesPresented)),
            "certificate"
        );
        assert_eq!(
            failure_reason(&tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))),
            "alert_received"
        );
        assert_eq!(
            failure_reason(&tls(rustls::Error::General("x".into()))),
            "protocol"
        );
        assert_eq!(
            failure_reason(&std::io::ErrorKind::UnexpectedEof.into()),
            "eof"
        );
        assert_eq!(
            failure_reason(&std::io::ErrorKind::ConnectionReset.into()),
            "io"
        );
    }

    #[test]
    fn log_lines_are_limited_per_minute_and_say_what_was_left_out() {
        let log = LogLimit::new("agent");
        for _ in 0..LogLimit::PER_MINUTE {
            assert_eq!(log.admit(), Some(0));
        }
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        // A new window: the next line says two were left out.
        log.state.lock().unwrap().started -= Duration::from_secs(61);
        assert_eq!(log.admit(), Some(2));
        assert_eq!(log.admit(), Some(0));
    }
}
