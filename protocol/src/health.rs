//! Health reports: what the agent's twelve checks found. Carried on the agent link as
//! [`crate::AgentMessage::Health`] (protocol minor 1) and served as JSON by the broker
//! (`GET /v1/agents/{id}/health`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The status of one check. Ordered by how much a person should worry:
/// `ok < unknown < warning < critical`, so the worst of a report is its maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    /// The check could not decide (it timed out, or what it measures is not configured).
    Unknown,
    Warning,
    Critical,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unknown => "unknown",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ok" => Self::Ok,
            "unknown" => Self::Unknown,
            "warning" => Self::Warning,
            "critical" => Self::Critical,
            _ => return None,
        })
    }

    pub const ALL: [Self; 4] = [Self::Ok, Self::Unknown, Self::Warning, Self::Critical];
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The twelve checks, in the order DSM lists them: `(id, title)`.
pub const CHECKS: [(&str, &str); 12] = [
    ("connectivity", "Connectivity"),
    ("data_disk", "Data disk health"),
    ("system_disk", "System disk health"),
    ("cpu", "CPU health"),
    ("max_connections", "Max connections"),
    ("metrics", "Metrics"),
    ("ntp_sync", "NTP sync"),
    ("telegraf", "Telegraf service"),
    ("binlog", "Database bin log"),
    ("binlog_cloud_sync", "Database bin log cloud sync"),
    ("db_service", "Database service"),
    ("password_expiry", "VM password expiry"),
];

/// The title of a check id (`None` for an id this version does not know).
pub fn title(check: &str) -> Option<&'static str> {
    CHECKS.iter().find(|(id, _)| *id == check).map(|(_, t)| *t)
}

/// One check's finding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Stable id (`data_disk`); see [`CHECKS`].
    pub check: String,
    pub status: HealthStatus,
    /// What a person should know and do, with numbers ("data disk 91% full: …").
    pub message: String,
    /// Measured values, unit in the name (`used_bytes`, `used_pct`, `time_to_full_s`).
    /// Always finite.
    pub figures: BTreeMap<String, f64>,
    /// How long the check took.
    pub duration_ms: u32,
    /// When the check entered its current status.
    pub since_ms: i64,
}

/// All checks of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub agent_id: String,
    /// When the run started.
    pub at_ms: i64,
    /// How often the agent runs its checks.
    pub interval_ms: u32,
    /// How long the whole run took.
    pub duration_ms: u32,
    pub checks: Vec<CheckReport>,
}

impl HealthReport {
    /// The worst status of any check (`ok` for an empty report).
    pub fn worst(&self) -> HealthStatus {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Ok)
    }

    pub fn check(&self, id: &str) -> Option<&CheckReport> {
        self.checks.iter().find(|c| c.check == id)
    }
}

/// Payload of the `health.changed` agent event (JSON in `AgentEvent::payload_json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthChange {
    pub check: String,
    pub title: String,
    /// `None` on the first run after the agent started.
    pub from: Option<HealthStatus>,
    pub to: HealthStatus,
    pub message: String,
    pub figures: BTreeMap<String, f64>,
}

/// Kind of the [`HealthChange`] event.
pub const HEALTH_CHANGED: &str = "health.changed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_orders_critical_above_warning_above_unknown() {
        let mk = |s| CheckReport {
            check: "x".into(),
            status: s,
            message: String::new(),
            figures: BTreeMap::from([("used_pct".into(), 91.5)]),
            duration_ms: 1,
            since_ms: 0,
        };
        let mut r = HealthReport {
            agent_id: "a".into(),
            at_ms: 0,
            interval_ms: 10_000,
            duration_ms: 3,
            checks: vec![mk(HealthStatus::Ok), mk(HealthStatus::Unknown)],
        };
        assert_eq!(r.worst(), HealthStatus::Unknown);
        r.checks.push(mk(HealthStatus::Warning));
        assert_eq!(r.worst(), HealthStatus::Warning);
        r.checks.push(mk(HealthStatus::Critical));
        assert_eq!(r.worst(), HealthStatus::Critical);
        // Round trip through the wire encoding.
        let bytes = postcard::to_allocvec(&r).unwrap();
        let back: HealthReport = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(title("ntp_sync"), Some("NTP sync"));
        assert_eq!(CHECKS.len(), 12);
    }
}
