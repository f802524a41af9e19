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
    /// Sessions replaced by a newer connection of the same agent.
    pub session_replacements: Counter,
    /// Connected agents replaced `hub::FLAP_THRESHOLD` times or more within the window
    /// (set at each scrape), and how often an agent started flapping.
    pub agents_flapping: Gauge,
    pub agents_flapped: Counter,
    /// Agent certificates revoked.
    pub certificates_revoked: Counter,
    /// The earliest `not_after` of a connected agent's certificate (Unix seconds; no
    /// series while no agent is connected), set at each scrape.
    pub agent_cert_earliest_expiry: OptionalGauge,
    /// The fleet CA certificate's `not_after` (Unix seconds).
    pub ca_cert_expiry: Gauge,
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
        let session_replacements = Counter::default();
        registry.register(
            "agent_session_replacements",
            "Agent sessions replaced by a newer connection of the same agent",
            session_replacements.clone(),
        );
        let agents_flapping = Gauge::default();
        registry.register(
            "agents_flapping",
            "Connected agents whose session was replaced 3 times or more in the last 5 minutes (two holders of one identity taking turns: revoke the stolen certificate)",
            agents_flapping.clone(),
        );
        let agents_flapped = Counter::default();
        registry.register(
            "agent_flapping_episodes",
            "Times an agent started flapping (3 session replacements within 5 minutes; at most one per agent per 5 minutes)",
            agents_flapped.clone(),
        );
        let certificates_revoked = Counter::default();
        registry.register(
            "agent_certificates_revoked",
            "Agent certificates revoked (dbvmctl agents revoke)",
            certificates_revoked.clone(),
        );
        let agent_cert_earliest_expiry = OptionalGauge::new(
            "agent_cert_earliest_expiry_timestamp_seconds",
            "Earliest not_after of a connected agent's certificate, Unix seconds (absent while no agent is connected); agents renew at 2/3 of the lifetime, so a value under a third of it away means renewal is failing",
        );
        registry.register_collector(Box::new(agent_cert_earliest_expiry.clone()));
        let ca_cert_expiry = Gauge::default();
        registry.register(
            "ca_cert_expiry_timestamp_seconds",
            "not_after of the fleet CA certificate, Unix seconds",
            ca_cert_expiry.clone(),
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
            session_replacements,
            agents_flapping,
            agents_flapped,
            certificates_revoked,
            agent_cert_earliest_expiry,
            ca_cert_expiry,
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

/// A gauge that is left out of the scrape while it has no value (a 0 would read as a
/// time in 1970 to an alert on a timestamp).
#[derive(Clone, Debug)]
pub struct OptionalGauge {
    name: &'static str,
    help: &'static str,
    value: std::sync::Arc<std::sync::Mutex<Option<i64>>>,
}

impl OptionalGauge {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            value: Default::default(),
        }
    }

    pub fn set(&self, value: Option<i64>) {
        // A poisoned lock only means a thread panicked while storing a number.
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = value;
    }
}

impl prometheus_client::collector::Collector for OptionalGauge {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let value = *self.value.lock().unwrap_or_else(|p| p.into_inner());
        let Some(value) = value else {
            return Ok(());
        };
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(value);
        let metric = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}
