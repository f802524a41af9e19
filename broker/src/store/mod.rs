//! The broker's durable state behind one narrow trait: commands and their results,
//! agents, enrollment tokens.
//!
//! Everything outside this module sees only [`Store`]; nothing else may assume a local
//! file, so a clustered backend (NATS JetStream is the planned one) can replace
//! [`SqliteStore`] without touching the link or the API.

mod sqlite;

pub use sqlite::SqliteStore;

use async_trait::async_trait;
use dbvm_protocol::api::{CommandError, CommandState, CommandView, OperationClass, Progress};
use std::path::PathBuf;
use uuid::Uuid;

/// A backend's own error.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("command {0} already exists")]
    Conflict(Uuid),
    #[error("could not open the store at {path}: {source}")]
    Open { path: PathBuf, source: BackendError },
    /// The backend failed (SQLite, or the clustered engine): its own error, boxed so
    /// this enum names no backend's type.
    #[error("store query failed: {0}")]
    Backend(BackendError),
    #[error("store is shutting down")]
    Closed,
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
}

/// A command as stored.
#[derive(Clone, Debug)]
pub struct CommandRecord {
    pub id: Uuid,
    pub agent_id: String,
    pub operation: String,
    pub class: OperationClass,
    pub state: CommandState,
    /// The signed command exactly as the control plane submitted it.
    pub signed: Vec<u8>,
    pub submitted_at_ms: i64,
    pub not_after_ms: i64,
    pub delivered_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub progress: Option<Progress>,
    pub output_json: Option<String>,
    pub error: Option<CommandError>,
}

impl CommandRecord {
    pub fn view(&self) -> CommandView {
        CommandView {
            id: self.id,
            agent_id: self.agent_id.clone(),
            operation: self.operation.clone(),
            class: self.class,
            state: self.state,
            submitted_at_ms: self.submitted_at_ms,
            not_after_ms: self.not_after_ms,
            delivered_at_ms: self.delivered_at_ms,
            finished_at_ms: self.finished_at_ms,
            progress: self.progress.clone(),
            output: self.output_json.as_deref().map(|s| {
                serde_json::from_str(s).unwrap_or(serde_json::Value::String(s.to_string()))
            }),
            error: self.error.clone(),
        }
    }
}

/// What `GET /v1/commands` asks for: every filter optional, newest first.
#[derive(Clone, Debug, Default)]
pub struct CommandFilter {
    pub agent_id: Option<String>,
    /// Any of these states (all when empty).
    pub states: Vec<CommandState>,
    pub operation: Option<String>,
    /// Submitted at or after (ms, Unix time).
    pub since_ms: Option<i64>,
    /// Submitted before.
    pub until_ms: Option<i64>,
    /// Strictly older than this position (the previous page's last), from a cursor.
    pub before: Option<CommandPosition>,
}

/// Where a command sits in the newest-first order: its submission time, then the store's
/// own insertion order for commands submitted in the same millisecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandPosition {
    pub submitted_at_ms: i64,
    pub seq: i64,
}

/// A stored event (`GET /v1/events`): its id orders the log.
pub type StoredEvent = dbvm_protocol::api::Event;

/// A page of the event log and the log's bounds, read together (one snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// The oldest id the log held (`None` when empty).
    pub oldest: Option<u64>,
    /// The last id ever given, even if pruned since.
    pub last_given: u64,
}

/// How a command ended, as recorded.
#[derive(Clone, Debug)]
pub struct Finish {
    pub state: CommandState,
    pub finished_at_ms: i64,
    /// When the command was handed to the agent, if that is not stored yet (a fast
    /// command's `delivered` is never written on its own); a stored time is kept.
    pub delivered_at_ms: Option<i64>,
    pub output_json: Option<String>,
    pub error: Option<CommandError>,
}

/// What the broker remembers of an agent between connections.
#[derive(Clone, Debug, Default)]
pub struct AgentRecord {
    pub id: String,
    pub last_seen_ms: Option<i64>,
    pub agent_version: Option<String>,
    pub protocol: Option<String>,
    pub operations: Vec<String>,
    pub capabilities: Vec<String>,
    pub sealing_key: Option<String>,
    pub db_kind: Option<String>,
    pub cert_not_after_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("enrollment token is not known to this broker")]
    Unknown,
    #[error("enrollment token was already used")]
    Used,
    #[error("enrollment token expired")]
    Expired,
    #[error("enrollment token was issued for agent {0:?}, not this one")]
    OtherAgent(String),
}

/// A certificate the broker issued to an agent (at enrollment or renewal), recorded so
/// it can be revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// SHA-256 of the certificate's DER: what a handshake checks (no parsing needed).
    pub fingerprint: [u8; 32],
    pub agent_id: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

impl IssuedCertificate {
    pub fn view(&self) -> dbvm_protocol::api::CertificateView {
        dbvm_protocol::api::CertificateView {
            fingerprint_sha256: hex(&self.fingerprint),
            issued_at_ms: self.issued_at_ms,
            not_after_ms: self.not_after_ms,
            revoked_at_ms: self.revoked_at_ms,
        }
    }
}

/// Lowercase hex of a fingerprint (hand-written: eight lines do not need a crate).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The latest revocation of an agent: `dbvmctl agents revoke`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRevocation {
    pub revoked_at_ms: i64,
    pub reason: Option<String>,
}

/// What the broker refuses at handshake and renewal, as loaded at start.
#[derive(Clone, Debug, Default)]
pub struct RevocationList {
    /// Revoked certificates not expired yet, with their `not_after_ms`.
    pub certificates: Vec<([u8; 32], i64)>,
    /// Agents revoked at least once. Certificates of such an agent that the broker has
    /// no record of (issued by a broker from before certificates were recorded) are
    /// refused when they were issued before the revocation.
    pub agents: Vec<(String, AgentRevocation)>,
}

/// A renewal refused because the certificate it renews was revoked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the certificate of this link was revoked at {0} ms (Unix time)")]
pub struct RenewalRevoked(pub i64);

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new command durably. Fails with `Conflict` when the id exists.
    async fn insert_command(&self, rec: CommandRecord) -> Result<(), StoreError>;
    async fn command(&self, id: Uuid) -> Result<Option<CommandRecord>, StoreError>;
    /// Commands not yet finished for an agent, oldest first.
    async fn unfinished_for_agent(&self, agent: &str) -> Result<Vec<CommandRecord>, StoreError>;
    /// All unfinished commands (to rebuild admission counts at start).
    async fn unfinished(&self) -> Result<Vec<(Uuid, OperationClass)>, StoreError>;
    /// Moves a command to `state` if it is currently in one of `from`, recording when it
    /// was delivered unless that is stored already. Returns whether it moved.
    async fn transition(
        &self,
        id: Uuid,
        from: &[CommandState],
        state: CommandState,
        delivered_at_ms: Option<i64>,
    ) -> Result<bool, StoreError>;
    async fn progress(&self, id: Uuid, progress: Progress) -> Result<(), StoreError>;
    /// Records the outcome durably, unless the command already finished. Returns the
    /// finished record when this call finished it (so nobody has to read it back).
    async fn finish(&self, id: Uuid, finish: Finish) -> Result<Option<CommandRecord>, StoreError>;
    /// One page of commands matching `filter`, newest first, each with its position
    /// (for the next page's cursor).
    async fn commands(
        &self,
        filter: CommandFilter,
        limit: usize,
    ) -> Result<Vec<(CommandPosition, CommandRecord)>, StoreError>;
    /// Finishes a command as `cancelled` if it is still `queued` in the store; returns
    /// the finished record, or `None` when it was not queued (the caller reads why).
    async fn cancel(
        &self,
        id: Uuid,
        at_ms: i64,
        error: CommandError,
    ) -> Result<Option<CommandRecord>, StoreError>;
    /// Expires queued commands whose time ran out; returns them.
    async fn expire_due(&self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError>;

    async fn upsert_agent(&self, rec: AgentRecord) -> Result<(), StoreError>;
    async fn touch_agent(&self, id: &str, last_seen_ms: i64) -> Result<(), StoreError>;
    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    async fn queued_counts(&self) -> Result<Vec<(String, u64)>, StoreError>;

    async fn insert_token(
        &self,
        hash: [u8; 32],
        agent: &str,
        expires_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// Uses a token once and records the certificate it bought, atomically.
    async fn consume_token(
        &self,
        hash: [u8; 32],
        agent: &str,
        now_ms: i64,
        cert: IssuedCertificate,
    ) -> Result<Result<(), TokenRefusal>, StoreError>;

    /// Records a certificate issued by renewal, unless the certificate it renews (the
    /// link's: its fingerprint and `not_before_ms`) was revoked: in one transaction with
    /// respect to [`Store::revoke_agent`], so a renewal racing a revocation either is
    /// refused or is revoked with the rest.
    async fn record_renewal(
        &self,
        cert: IssuedCertificate,
        renews: ([u8; 32], i64),
    ) -> Result<Result<(), RenewalRevoked>, StoreError>;
    /// Revokes every certificate issued to `agent` so far and records the revocation;
    /// returns those of the revoked certificates not expired at `at_ms`.
    async fn revoke_agent(
        &self,
        agent: &str,
        at_ms: i64,
        reason: Option<String>,
    ) -> Result<Vec<IssuedCertificate>, StoreError>;
    /// The revocation list as of `now_ms` (expired certificates left out).
    async fn revocations(&self, now_ms: i64) -> Result<RevocationList, StoreError>;
    async fn certificate(
        &self,
        fingerprint: [u8; 32],
    ) -> Result<Option<IssuedCertificate>, StoreError>;
    /// The certificates issued to `agent`, oldest first.
    async fn certificates(&self, agent: &str) -> Result<Vec<IssuedCertificate>, StoreError>;
    /// Forgets certificates that expired before `before_ms` (TLS refuses them anyway);
    /// returns how many.
    async fn prune_certificates(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// Records a log bundle, or its new state (by id; its agent and creation time stay).
    async fn put_bundle(&self, bundle: dbvm_protocol::api::BundleInfo) -> Result<(), StoreError>;
    async fn bundle(&self, id: Uuid) -> Result<Option<dbvm_protocol::api::BundleInfo>, StoreError>;
    /// Every bundle recorded, newest first.
    async fn bundles(&self) -> Result<Vec<dbvm_protocol::api::BundleInfo>, StoreError>;
    /// Records where a bundle's S3 copy stands, only if the bundle is still recorded
    /// (a copy finishing after a delete never brings its record back); whether it was.
    async fn put_bundle_copy(
        &self,
        id: Uuid,
        copy: dbvm_protocol::api::BundleCopy,
    ) -> Result<bool, StoreError>;
    /// Forgets a bundle; whether it was recorded.
    async fn delete_bundle(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Appends events to the durable log in order; returns them with their ids (`seq`),
    /// which rise and are never reused, even after every event was pruned.
    async fn append_events(&self, events: Vec<StoredEvent>)
        -> Result<Vec<StoredEvent>, StoreError>;
    /// Events with an id above `after`, oldest first, at most `limit` (of `agent` only,
    /// when given), with the log's bounds as they were when the page was read.
    async fn events_after(
        &self,
        after: u64,
        agent: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError>;
    /// Drops events beyond the newest `keep` and those older than `before_ms`, at most
    /// `max_rows` of the oldest in one write (so pruning never holds the writer long);
    /// how many went. Fewer than `max_rows` means nothing more is due.
    async fn prune_events(
        &self,
        keep: u64,
        before_ms: i64,
        max_rows: u64,
    ) -> Result<u64, StoreError>;

    /// What the store holds, in counts (for the broker's own support bundle).
    async fn stats(&self) -> Result<serde_json::Value, StoreError>;
}
