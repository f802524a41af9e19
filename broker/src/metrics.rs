//! Prometheus metrics of the broker, served at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub link_errors: Family<Labels, Counter>,
    pub commands_submitted: Family<Labels, Counter>,
    pub commands_finished: Family<Labels, Counter>,
    pub submissions_refused: Family<Labels, Counter>,
    pub enrollments: Family<Labels, Counter>,
    pub renewals: Family<Labels, Counter>,
    /// Agents by the worst status of their latest health report (see `health`).
    pub agents_by_health: Family<Labels, Gauge>,
    /// Agents per check and status in their latest health report.
    pub health_checks: Family<Labels, Gauge>,
    /// Health reports received, by result (`stored`, or why they were refused).
    pub health_reports: Family<Labels, Counter>,
    /// Failed TLS handshakes, by listener (`agent`, `api`) and reason (see `listener`).
    pub handshake_failures: Family<Labels, Counter>,
    /// Open connections, handshakes in progress and connections waiting for a handshake
    /// slot, by listener.
    pub listener_connections: Family<Labels, Gauge>,
    pub listener_handshakes: Family<Labels, Gauge>,
    pub listener_waiting: Family<Labels, Gauge>,
    /// Times a listener was at a cap (`limit`: `connections` or `handshakes`).
    pub listener_saturated: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dbvm_broker");
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents connected now",
            agents_connected.clone(),
        );
        let link_errors = Family::<Labels, Counter>::default();
        registry.register(
            "link_errors",
            "Agent connections closed for an error, by reason",
            link_errors.clone(),
        );
        let commands_submitted = Family::<Labels, Counter>::default();
        registry.register(
            "commands_submitted",
            "Commands accepted, by class",
            commands_submitted.clone(),
        );
        let commands_finished = Family::<Labels, Counter>::default();
        registry.register(
            "commands_finished",
            "Commands finished, by state",
            commands_finished.clone(),
        );
        let submissions_refused = Family::<Labels, Counter>::default();
        registry.register(
            "submissions_refused",
            "Command submissions refused, by reason",
            submissions_refused.clone(),
        );
        let enrollments = Family::<Labels, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollment attempts, by result",
            enrollments.clone(),
        );
        let renewals = Family::<Labels, Counter>::default();
        registry.register(
            "renewals",
            "Certificate renewals, by result",
            renewals.clone(),
        );
        let agents_by_health = Family::<Labels, Gauge>::default();
        registry.register(
            "agents_by_health",
            "Agents by the worst status of their latest health report (kept until the broker restarts, also while disconnected)",
            agents_by_health.clone(),
        );
        // Present from the start, so an alert on status="critical" sees 0, not nothing.
        for status in dbvm_protocol::health::HealthStatus::ALL {
            agents_by_health
                .get_or_create(&vec![("status", status.as_str().to_string())])
                .set(0);
        }
        let health_checks = Family::<Labels, Gauge>::default();
        registry.register(
            "health_checks",
            "Agents per health check and status in their latest report (unknown check ids as check=\"other\")",
            health_checks.clone(),
        );
        let health_reports = Family::<Labels, Counter>::default();
        registry.register(
            "health_reports",
            "Health reports received from agents, by result (stored, or the reason they were refused)",
            health_reports.clone(),
        );
        let handshake_failures = Family::<Labels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by listener (agent, api) and reason (timeout, eof, certificate, alert_received, incompatible, protocol, io)",
            handshake_failures.clone(),
        );
        let listener_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "listener_connections",
            "Connections open now, by listener (at most listeners.<name>.max_connections)",
            listener_connections.clone(),
        );
        let listener_handshakes = Family::<Labels, Gauge>::default();
        registry.register(
            "listener_handshakes",
            "TLS handshakes in progress now, by listener (at most listeners.<name>.max_handshakes)",
            listener_handshakes.clone(),
        );
        let listener_waiting = Family::<Labels, Gauge>::default();
        registry.register(
            "listener_handshakes_waiting",
            "Accepted connections waiting for a handshake slot now, by listener",
            listener_waiting.clone(),
        );
        let listener_saturated = Family::<Labels, Counter>::default();
        registry.register(
            "listener_saturated",
            "Times a listener was at a cap and a connection had to wait, by listener and limit (connections, handshakes)",
            listener_saturated.clone(),
        );
        Self {
            registry,
            agents_connected,
            link_errors,
            commands_submitted,
            commands_finished,
            submissions_refused,
            enrollments,
            renewals,
            agents_by_health,
            health_checks,
            health_reports,
            handshake_failures,
            listener_connections,
            listener_handshakes,
            listener_waiting,
            listener_saturated,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn count(family: &Family<Labels, Counter>, key: &'static str, value: &str) {
        family.get_or_create(&vec![(key, value.to_string())]).inc();
    }
}
