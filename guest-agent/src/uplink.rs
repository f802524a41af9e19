//! What the agent tells the broker on its own (not as a command result): events and the
//! latest health report. Producers (the health monitor) put messages here whether or not
//! the link is up; the link sends them when it is. Events wait (up to [`MAX_QUEUED`],
//! oldest dropped first) while the link is down; the latest health report is re-sent on
//! every connect, so the broker always has the current picture after a cut or a restart.
//!
//! It also holds what the link knows of itself ([`LinkStatus`]: up or down, since when,
//! the agent certificate and its renewal), which capabilities read through
//! [`crate::capability::Outbox`].

use dbvm_protocol::health::HealthReport;
use dbvm_protocol::messages::AgentEvent;
use dbvm_protocol::AgentMessage;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// Events kept while the link is down.
pub const MAX_QUEUED: usize = 1000;

/// The agent certificate as the link knows it, for the connectivity check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateStatus {
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    /// When the agent asks for a new certificate (two thirds into its life).
    pub renew_at_ms: i64,
    /// Renewals the broker refused (or that could not be stored) since the last success.
    pub renewal_failures: u32,
    /// The last such failure, in words.
    pub last_renewal_error: Option<String>,
    /// When the fleet CA certificate the agent trusts runs out.
    pub ca_not_after_ms: Option<i64>,
}

/// The link to the broker as of now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub connected: bool,
    /// When `connected` last changed (ms since the epoch; 0: never since the agent started).
    pub since_ms: i64,
    /// Known once the agent has a certificate.
    pub certificate: Option<CertificateStatus>,
    /// Why the last connection attempt or session failed (cleared when a session starts).
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
pub struct Uplink {
    queue: Mutex<VecDeque<AgentMessage>>,
    notify: Notify,
    latest_health: Mutex<Option<HealthReport>>,
    connected: AtomicBool,
    /// When `connected` last changed (ms since the epoch; 0: never).
    changed_at_ms: AtomicI64,
    /// Protocol minor of the broker on the current link.
    broker_minor: AtomicU16,
    dropped: AtomicI64,
    certificate: Mutex<Option<CertificateStatus>>,
    last_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Uplink {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::default())
    }

    /// Queues an event for the broker.
    pub fn push_event(&self, event: AgentEvent) {
        let mut q = lock(&self.queue);
        if q.len() >= MAX_QUEUED {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(AgentMessage::Event(event));
        drop(q);
        self.notify.notify_one();
    }

    /// Records the latest health report; `send_now` also queues it for the broker
    /// (replacing an older report still waiting).
    pub fn set_health(&self, report: HealthReport, send_now: bool) {
        if send_now {
            let mut q = lock(&self.queue);
            q.retain(|m| !matches!(m, AgentMessage::Health(_)));
            q.push_back(AgentMessage::Health(report.clone()));
            drop(q);
            self.notify.notify_one();
        }
        *lock(&self.latest_health) = Some(report);
    }

    /// Whether the link to the broker is up, and since when (ms since the epoch; 0 when
    /// it never changed since the agent started).
    pub fn connected(&self) -> (bool, i64) {
        (
            self.connected.load(Ordering::Acquire),
            self.changed_at_ms.load(Ordering::Acquire),
        )
    }

    /// The link as of now.
    pub fn status(&self) -> LinkStatus {
        let (connected, since_ms) = self.connected();
        LinkStatus {
            connected,
            since_ms,
            certificate: lock(&self.certificate).clone(),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// Updates what is known of the agent certificate.
    pub(crate) fn update_certificate(&self, f: impl FnOnce(&mut CertificateStatus)) {
        let mut c = lock(&self.certificate);
        f(c.get_or_insert_with(CertificateStatus::default));
    }

    /// Events dropped because the queue was full while the link was down.
    pub fn dropped(&self) -> i64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Why the link is down, for the connectivity check.
    pub(crate) fn link_failed(&self, why: String) {
        *lock(&self.last_error) = Some(why);
    }

    pub(crate) fn link_up(&self, broker_minor: u16) {
        *lock(&self.last_error) = None;
        self.broker_minor.store(broker_minor, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        self.changed_at_ms
            .store(dbvm_protocol::now_ms(), Ordering::Release);
    }

    pub(crate) fn link_down(&self) {
        if self.connected.swap(false, Ordering::AcqRel) {
            self.changed_at_ms
                .store(dbvm_protocol::now_ms(), Ordering::Release);
        }
    }

    /// What a new session sends first: the latest health report (brokers before minor 1
    /// cannot decode it).
    pub(crate) fn on_connect(&self) -> Option<AgentMessage> {
        if self.broker_minor.load(Ordering::Acquire) < 1 {
            return None;
        }
        let report = lock(&self.latest_health).clone()?;
        // The queued copy (if any) is older or the same: drop it.
        lock(&self.queue).retain(|m| !matches!(m, AgentMessage::Health(_)));
        Some(AgentMessage::Health(report))
    }

    /// Everything waiting, in order.
    pub(crate) fn drain(&self) -> Vec<AgentMessage> {
        let minor = self.broker_minor.load(Ordering::Acquire);
        lock(&self.queue)
            .drain(..)
            .filter(|m| minor >= 1 || !matches!(m, AgentMessage::Health(_)))
            .collect()
    }

    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> AgentEvent {
        AgentEvent {
            kind: "t".into(),
            at_ms: n,
            payload_json: "{}".into(),
        }
    }

    #[test]
    fn events_wait_for_the_link_and_the_oldest_go_first_when_full() {
        let u = Uplink::default();
        for n in 0..(MAX_QUEUED as i64 + 5) {
            u.push_event(event(n));
        }
        assert_eq!(u.dropped(), 5);
        let all = u.drain();
        assert_eq!(all.len(), MAX_QUEUED);
        assert!(matches!(&all[0], AgentMessage::Event(e) if e.at_ms == 5));
        assert!(u.drain().is_empty());
    }

    #[test]
    fn health_reports_go_only_to_brokers_that_understand_them() {
        let u = Uplink::default();
        let report = HealthReport {
            agent_id: "a".into(),
            at_ms: 1,
            interval_ms: 10_000,
            duration_ms: 1,
            checks: vec![],
        };
        u.set_health(report.clone(), true);
        u.set_health(report, true);
        u.link_up(0);
        assert!(u.on_connect().is_none());
        assert!(u.drain().is_empty());
        u.link_up(1);
        assert!(u.on_connect().is_some());
        assert!(u.connected().0);
        u.link_down();
        assert!(!u.connected().0);
    }
}
