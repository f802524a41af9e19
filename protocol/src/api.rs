//! JSON bodies of the broker's HTTPS API (see `broker/openapi.json`), shared by the broker
//! and by control-plane clients such as `dbvmctl`.

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
            "create" | "preconfigure" | "configure" | "restore" | "pitr" | "clone"
            | "add_replica" => Self::Deployment,
            "backup" => Self::Backup,
            "log_upload" | "archive_push" => Self::LogUpload,
            "ping" | "facts" | "health" | "status" | "export_template" | "firewall.status" => {
                Self::Query
            }
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
}

impl CommandState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Rejected | Self::Interrupted | Self::Expired
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

/// One item of `GET /v1/events` (server-sent events; the SSE `event:` is `kind`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: i64,
    /// `agent.connected`, `agent.disconnected`, `command.state`, `agent.event`.
    pub kind: String,
    pub agent_id: String,
    pub command_id: Option<Uuid>,
    pub data: serde_json::Value,
}

/// Every error response: `{"code": "...", "error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `busy`, `internal`.
    pub code: String,
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::OperationClass;

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
    }
}
