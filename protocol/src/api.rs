//! JSON bodies of the broker's HTTPS API (see `broker/openapi.json`), shared by the broker
//! and by control-plane clients such as `dbvmctl`.

use crate::health::{CheckReport, HealthReport, HealthStatus, CHECKS};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Admission class of an operation (limits from the DSM seed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationClass {
    /// create, restore, pitr, clone, add_replica: 8 running, 2 waiting, then refused.
    Deployment,
    /// power on/off, promote, parameters, log bundle, ...: 8 running, unbounded waiting.
    Management,
    /// 5 running, unbounded waiting.
    Backup,
    /// transaction-log uploads: 5 running, unbounded waiting.
    LogUpload,
    /// read-only queries (ping, facts, health, status): not limited.
    Query,
}

impl OperationClass {
    /// The class of an operation name. Unknown names are management operations: limited,
    /// never refused here (the agent says whether it knows them).
    pub fn of(operation: &str) -> Self {
        // The agent's database operations are namespaced (`db.create`); the class goes
        // by the bare name.
        let bare = operation.strip_prefix("db.").unwrap_or(operation);
        match bare {
            "create" | "preconfigure" | "configure" | "restore" | "recover" | "pitr" | "clone"
            | "add_replica" => Self::Deployment,
            "backup" | "backup.run" | "backup.purge" | "backup.verify" => Self::Backup,
            "log_upload" | "archive_push" => Self::LogUpload,
            "ping" | "facts" | "health" | "status" | "export_template" | "firewall.status"
            | "backup.list" => Self::Query,
            _ => Self::Management,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::Management => "management",
            Self::Backup => "backup",
            Self::LogUpload => "log_upload",
            Self::Query => "query",
        }
    }

    pub const ALL: [Self; 5] = [
        Self::Deployment,
        Self::Management,
        Self::Backup,
        Self::LogUpload,
        Self::Query,
    ];
}

/// `POST /v1/commands`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitCommand {
    /// base64 of the postcard-encoded `SignedCommand`.
    pub signed_command: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Accepted and stored; waiting for the agent or for an admission slot.
    Queued,
    /// Sent to the agent; not yet acknowledged.
    Delivered,
    /// The agent journaled it and runs it.
    Running,
    Succeeded,
    Failed,
    /// The agent refused it before running it (signature, target, time, replay, ...).
    Rejected,
    /// The agent restarted while it ran; it was not run again.
    Interrupted,
    /// It expired before it could be delivered.
    Expired,
    /// The control plane took it back before it was delivered
    /// (`POST /v1/commands/{id}/cancel`); it never reached the agent.
    Cancelled,
}

impl CommandState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::Rejected
                | Self::Interrupted
                | Self::Expired
                | Self::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Interrupted => "interrupted",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "delivered" => Self::Delivered,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "rejected" => Self::Rejected,
            "interrupted" => Self::Interrupted,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub percent: u8,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    /// `failed`, `interrupted`, `expired`, or the agent's reject code (`bad_signature`, ...).
    pub code: String,
    pub message: String,
}

/// A command as the broker knows it: `GET /v1/commands/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandView {
    pub id: Uuid,
    pub agent_id: String,
    pub operation: String,
    pub class: OperationClass,
    pub state: CommandState,
    pub submitted_at_ms: i64,
    pub not_after_ms: i64,
    pub delivered_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub progress: Option<Progress>,
    /// The operation's output (JSON) when it succeeded.
    pub output: Option<serde_json::Value>,
    pub error: Option<CommandError>,
}

/// One page of `GET /v1/commands`: newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandPage {
    pub commands: Vec<CommandView>,
    /// Pass as `cursor` for the next page (with the same filters); absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One page of `GET /v1/agents`: by id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentPage {
    pub agents: Vec<AgentView>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// An agent as the broker knows it: `GET /v1/agents`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub connected: bool,
    pub last_seen_ms: Option<i64>,
    pub agent_version: Option<String>,
    /// `major.minor` of the link protocol it spoke last.
    pub protocol: Option<String>,
    pub operations: Vec<String>,
    pub capabilities: Vec<String>,
    /// base64 X25519 key that secrets in commands are sealed to.
    pub sealing_key: Option<String>,
    pub db_kind: Option<String>,
    pub cert_not_after_ms: Option<i64>,
    /// Commands waiting for this agent.
    pub queued_commands: u64,
}

/// `POST /v1/enrollment-tokens`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollmentTokenRequest {
    pub agent_id: String,
    /// Lifetime of the token; default 900 s, at most 86400 s.
    pub ttl_seconds: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub agent_id: String,
    pub token: String,
    pub expires_at_ms: i64,
}

/// `POST /v1/agents/{id}/revoke`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Why, for the record (at most 256 characters, no control characters).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to `POST /v1/agents/{id}/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub agent_id: String,
    pub revoked_at_ms: i64,
    pub reason: Option<String>,
    /// The agent's certificates this revocation refused (those not expired yet).
    pub certificates: Vec<CertificateView>,
    /// Whether a live session of the agent was closed.
    pub session_closed: bool,
}

/// A certificate the broker issued to an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateView {
    /// SHA-256 of the certificate's DER, lowercase hex (`openssl x509 -noout -fingerprint
    /// -sha256` prints the same bytes in uppercase with colons).
    pub fingerprint_sha256: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// An artifact the broker stores (`PUT` and `GET /v1/artifacts/{sha256}`): a file named
/// by the SHA-256 of its bytes, such as a new agent binary for `agent.upgrade`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// SHA-256 of the bytes, 64 lowercase hex digits.
    pub sha256: String,
    pub size: u64,
    /// The API path it is downloaded from: `/v1/artifacts/<sha256>`.
    pub path: String,
}

/// One item of `GET /v1/artifacts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    pub sha256: String,
    pub size: u64,
    /// When the broker stored it (the file's modification time).
    pub stored_at_ms: i64,
}

/// Where a log bundle is on the broker (`GET /v1/bundles`, `GET /v1/bundles/{id}/info`).
/// A bundle's id is the id of the `bundle.collect` command that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleInfo {
    pub id: Uuid,
    pub agent_id: String,
    /// `uploading` (the agent is still sending it; it cannot be fetched yet) or
    /// `complete` (every byte stored and its SHA-256 checked).
    pub state: BundleState,
    /// Bytes stored so far; the whole size once complete.
    pub size: u64,
    /// SHA-256 of the archive, once complete.
    pub sha256: Option<String>,
    pub created_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    /// Its copy in the broker's S3 bucket, when the broker is configured with one
    /// (`[bundles.s3]`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<BundleCopy>,
}

/// A complete bundle's copy in the broker's S3 bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleCopy {
    /// `pending` (not copied yet), `copied` (stored whole, its SHA-256 checked) or
    /// `failed` (the last attempt failed; it is tried again at `next_attempt_ms`).
    pub state: CopyState,
    /// `s3://bucket/key`.
    pub url: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed (never a key or a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_at_ms: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    Pending,
    Copied,
    Failed,
}

impl CopyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Copied => "copied",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleState {
    Uploading,
    Complete,
}

impl BundleState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uploading => "uploading",
            Self::Complete => "complete",
        }
    }
}

/// `GET /v1/bundles`: every bundle the broker holds, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleList {
    pub bundles: Vec<BundleInfo>,
    /// Bytes of every bundle stored (what `bundles.max_total_bytes` caps).
    pub total_bytes: u64,
}

/// The broker's answer to an agent's upload of a bundle's bytes: how many it holds,
/// on disk (the next upload starts there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleStored {
    pub stored: u64,
}

/// `POST /v1/bundles/{id}/complete`: the agent's word that the bundle is `size` bytes
/// hashing to `sha256`; the broker checks both against what it stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleComplete {
    pub size: u64,
    pub sha256: String,
}

/// One item of `GET /v1/events` (server-sent events; the SSE `event:` is `kind`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: i64,
    /// `agent.connected`, `agent.disconnected`, `agent.replaced`, `agent.flapping`,
    /// `agent.revoked`, `command.state`, `command.progress`, `agent.event`.
    pub kind: String,
    pub agent_id: String,
    pub command_id: Option<Uuid>,
    pub data: serde_json::Value,
}

/// `GET /v1/agents/{id}/health`: the agent's latest [`HealthReport`] (its fields at the
/// top level) and what the broker knows beside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentHealth {
    #[serde(flatten)]
    pub report: HealthReport,
    /// The worst status of the report's checks.
    pub worst: HealthStatus,
    /// When the broker received the report (broker clock; `at_ms` is the agent's).
    pub received_at_ms: i64,
    /// Whether the agent is connected now. A disconnected agent's report is its last one.
    pub connected: bool,
}

impl AgentHealth {
    pub fn new(report: HealthReport, received_at_ms: i64, connected: bool) -> Self {
        Self {
            worst: report.worst(),
            report,
            received_at_ms,
            connected,
        }
    }
}

/// How many checks (or agents) are in each status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub ok: u32,
    pub unknown: u32,
    pub warning: u32,
    pub critical: u32,
}

impl StatusCounts {
    pub fn add(&mut self, status: HealthStatus) {
        let n = match status {
            HealthStatus::Ok => &mut self.ok,
            HealthStatus::Unknown => &mut self.unknown,
            HealthStatus::Warning => &mut self.warning,
            HealthStatus::Critical => &mut self.critical,
        };
        *n = n.saturating_add(1);
    }

    pub fn get(&self, status: HealthStatus) -> u32 {
        match status {
            HealthStatus::Ok => self.ok,
            HealthStatus::Unknown => self.unknown,
            HealthStatus::Warning => self.warning,
            HealthStatus::Critical => self.critical,
        }
    }

    /// The statuses of a report's checks.
    pub fn of(report: &HealthReport) -> Self {
        let mut counts = Self::default();
        for c in &report.checks {
            counts.add(c.status);
        }
        counts
    }
}

/// A check that is not `ok`, as the fleet summary lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthProblem {
    pub check: String,
    pub status: HealthStatus,
    pub message: String,
}

/// One agent in `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentHealthSummary {
    pub agent_id: String,
    pub connected: bool,
    pub last_seen_ms: Option<i64>,
    /// `at_ms` of the latest report (agent clock); `None` when it never reported.
    pub reported_at_ms: Option<i64>,
    /// When the broker received that report (broker clock).
    pub received_at_ms: Option<i64>,
    /// `None` when the agent never reported health (to this broker since it started).
    pub worst: Option<HealthStatus>,
    /// Checks per status in the latest report (all zero when it never reported).
    pub counts: StatusCounts,
    /// The checks that are not `ok`, worst first, then in [`CHECKS`] order.
    pub problems: Vec<HealthProblem>,
}

impl AgentHealthSummary {
    /// The summary of an agent and its latest report with the time it was received.
    pub fn new(
        agent_id: &str,
        connected: bool,
        last_seen_ms: Option<i64>,
        latest: Option<(&HealthReport, i64)>,
    ) -> Self {
        let mut summary = Self {
            agent_id: agent_id.to_string(),
            connected,
            last_seen_ms,
            reported_at_ms: None,
            received_at_ms: None,
            worst: None,
            counts: StatusCounts::default(),
            problems: Vec::new(),
        };
        if let Some((report, received_at_ms)) = latest {
            summary.reported_at_ms = Some(report.at_ms);
            summary.received_at_ms = Some(received_at_ms);
            summary.worst = Some(report.worst());
            summary.counts = StatusCounts::of(report);
            let order = |id: &str| {
                CHECKS
                    .iter()
                    .position(|(c, _)| *c == id)
                    .unwrap_or(CHECKS.len())
            };
            let mut problems: Vec<&CheckReport> = report
                .checks
                .iter()
                .filter(|c| c.status != HealthStatus::Ok)
                .collect();
            problems.sort_by(|a, b| {
                b.status
                    .cmp(&a.status)
                    .then_with(|| order(&a.check).cmp(&order(&b.check)))
                    .then_with(|| a.check.cmp(&b.check))
            });
            summary.problems = problems
                .into_iter()
                .map(|c| HealthProblem {
                    check: c.check.clone(),
                    status: c.status,
                    message: c.message.clone(),
                })
                .collect();
        }
        summary
    }
}

/// `GET /v1/health`: every agent the broker knows, connected or not, sorted by id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetHealth {
    /// When the broker built this answer.
    pub at_ms: i64,
    /// Agents by the worst status of their latest report.
    pub agents_by_worst: StatusCounts,
    /// Agents that have not reported health.
    pub not_reported: u32,
    pub agents: Vec<AgentHealthSummary>,
}

impl FleetHealth {
    pub fn new(at_ms: i64, mut agents: Vec<AgentHealthSummary>) -> Self {
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        let mut agents_by_worst = StatusCounts::default();
        let mut not_reported = 0u32;
        for a in &agents {
            match a.worst {
                Some(w) => agents_by_worst.add(w),
                None => not_reported = not_reported.saturating_add(1),
            }
        }
        Self {
            at_ms,
            agents_by_worst,
            not_reported,
            agents,
        }
    }
}

/// Every error response: `{"code": "...", "error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `busy`, `internal`.
    pub code: String,
    pub error: String,
    /// The command's state now, when a cancellation came too late (`not_cancellable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<CommandState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn check(id: &str, status: HealthStatus) -> CheckReport {
        CheckReport {
            check: id.into(),
            status,
            message: format!("{id} is {status}"),
            figures: BTreeMap::new(),
            duration_ms: 1,
            since_ms: 0,
        }
    }

    #[test]
    fn summaries_count_statuses_and_list_problems_worst_first() {
        let report = HealthReport {
            agent_id: "db1".into(),
            at_ms: 1_000,
            interval_ms: 60_000,
            duration_ms: 5,
            checks: vec![
                check("connectivity", HealthStatus::Ok),
                check("telegraf", HealthStatus::Warning),
                check("data_disk", HealthStatus::Unknown),
                check("ntp_sync", HealthStatus::Critical),
                check("cpu", HealthStatus::Warning),
            ],
        };
        let s = AgentHealthSummary::new("db1", true, Some(2_000), Some((&report, 1_500)));
        assert_eq!(s.worst, Some(HealthStatus::Critical));
        assert_eq!(
            (s.reported_at_ms, s.received_at_ms),
            (Some(1_000), Some(1_500))
        );
        assert_eq!(
            s.counts,
            StatusCounts {
                ok: 1,
                unknown: 1,
                warning: 2,
                critical: 1
            }
        );
        let order: Vec<&str> = s.problems.iter().map(|p| p.check.as_str()).collect();
        assert_eq!(order, ["ntp_sync", "cpu", "telegraf", "data_disk"]);

        let never = AgentHealthSummary::new("db0", false, None, None);
        assert_eq!(never.worst, None);
        assert!(never.problems.is_empty());
        let fleet = FleetHealth::new(3_000, vec![s, never]);
        assert_eq!(fleet.agents[0].agent_id, "db0");
        assert_eq!(fleet.not_reported, 1);
        assert_eq!(fleet.agents_by_worst.critical, 1);

        // The report's fields sit at the top level of the agent's answer.
        let json = serde_json::to_value(AgentHealth::new(report.clone(), 1_500, true)).unwrap();
        assert_eq!(json["agent_id"], "db1");
        assert_eq!(json["worst"], "critical");
        assert_eq!(json["checks"][3]["status"], "critical");
        let back: AgentHealth = serde_json::from_value(json).unwrap();
        assert_eq!(back.report, report);
    }

    #[test]
    fn operations_are_classed_by_their_bare_name() {
        assert_eq!(OperationClass::of("create"), OperationClass::Deployment);
        assert_eq!(OperationClass::of("db.create"), OperationClass::Deployment);
        assert_eq!(
            OperationClass::of("db.configure"),
            OperationClass::Deployment
        );
        assert_eq!(OperationClass::of("db.status"), OperationClass::Query);
        assert_eq!(OperationClass::of("firewall.status"), OperationClass::Query);
        assert_eq!(OperationClass::of("db.restart"), OperationClass::Management);
        assert_eq!(OperationClass::of("backup"), OperationClass::Backup);
        // Recover rebuilds the database in place; the restore drill is a backup's load.
        assert_eq!(OperationClass::of("db.recover"), OperationClass::Deployment);
        assert_eq!(OperationClass::of("backup.verify"), OperationClass::Backup);
    }
}
