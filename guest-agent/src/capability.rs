//! The one shape every agent capability has.
//!
//! The agent is a small core (link, journal, verification, dispatch, drain) and
//! capabilities (database, firewall, health, …) that know nothing of the link. A
//! capability is one module behind [`Capability`]: its signed operations, its background
//! tasks, its health contributions, and what the agent's `Hello` says about it. It reaches
//! the broker only through what the core hands it in a [`Context`]: an [`Outbox`] for
//! events and health reports, a read-only view of the link, and, while an operation runs,
//! its [`crate::dispatch::OpContext`] for progress. Its configuration is a section of
//! [`crate::config::Config`], validated with the rest before anything starts.
//!
//! The capabilities of an agent are made in one place, [`crate::capabilities::build`];
//! a new capability is a module, a line there, and its config section.

use crate::dispatch::Operation;
use crate::health::Check;
use crate::uplink::Uplink;
use dbvm_protocol::health::HealthReport;
use dbvm_protocol::messages::AgentEvent;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use crate::uplink::{CertificateStatus, LinkStatus};

/// One capability of the agent.
pub trait Capability: Send + Sync + 'static {
    /// A short name for logs and the code map (`database`, `firewall`, …).
    fn name(&self) -> &'static str;

    /// The signed operations it answers. Each declares its admission class, which must be
    /// the one the broker gives its name ([`dbvm_protocol::api::OperationClass::of`]).
    fn operations(&self) -> Vec<Arc<dyn Operation>>;

    /// Starts its background tasks on `tasks`; each ends when `tasks.token()` is
    /// cancelled (the agent then waits for them, with a deadline, before it exits).
    fn start(&self, _tasks: &Tasks) {}

    /// Health checks it contributes. A check whose id is one of DSM's twelve replaces the
    /// health capability's own check of that id (so a backup capability can make the
    /// "bin log cloud sync" check real); other ids are added after the twelve.
    fn checks(&self) -> Vec<Arc<dyn Check>> {
        Vec::new()
    }

    /// The database kind the agent's `Hello` names (`postgres`, `mariadb`, `mysql8`):
    /// only the database capability knows it.
    fn db_kind(&self) -> Option<String> {
        None
    }

    /// What it adds to a log bundle for `request`: its own files, logs and command
    /// outputs, each with where it came from and how it is redacted (config-style
    /// allow-list or log-style patterns). Named when a bundle starts; read as the bundle
    /// gets to each (see [`crate::bundle`]).
    fn bundle_parts(&self, _request: &crate::bundle::Request) -> Vec<crate::bundle::Part> {
        Vec::new()
    }
}

/// What the core hands every capability when it is made.
#[derive(Clone, Debug)]
pub struct Context {
    /// This agent's id.
    pub agent_id: String,
    /// The agent's state directory; a capability keeps its files in a directory of its
    /// own under it (`db/`, …).
    pub state_dir: PathBuf,
    /// Events and reports for the broker, and the link's state.
    pub outbox: Outbox,
    /// The agent's own life: holding the link, restarting into another executable (the
    /// upgrade capability's; see [`crate::lifecycle`]).
    pub lifecycle: crate::lifecycle::Lifecycle,
}

impl Context {
    /// A context whose outbox no link ever sends (for driving a capability in-process:
    /// benchmarks, tests); what it is given can still be read back.
    pub fn standalone(agent_id: impl Into<String>, state_dir: PathBuf) -> Self {
        Self {
            agent_id: agent_id.into(),
            state_dir,
            outbox: Outbox::new(Uplink::new()),
            lifecycle: crate::lifecycle::Lifecycle::new(),
        }
    }
}

/// What a capability may say to the broker, and what it may know of the link. Messages
/// wait while the link is down (see [`crate::uplink`]).
#[derive(Clone, Debug)]
pub struct Outbox(Arc<Uplink>);

impl Outbox {
    pub(crate) fn new(uplink: Arc<Uplink>) -> Self {
        Self(uplink)
    }

    /// Queues an event: `kind` names it, `at_ms` is when it happened, `payload_json` is
    /// its JSON body.
    pub fn event(&self, kind: &str, at_ms: i64, payload_json: String) {
        self.0.push_event(AgentEvent {
            kind: kind.to_string(),
            at_ms,
            payload_json,
        });
    }

    /// Records the latest health report; `send_now` also sends it (else it goes on the
    /// next connect).
    pub fn health_report(&self, report: HealthReport, send_now: bool) {
        self.0.set_health(report, send_now);
    }

    /// The link to the broker as of now.
    pub fn link(&self) -> LinkStatus {
        self.0.status()
    }

    /// Events dropped because the queue was full while the link was down.
    pub fn dropped_events(&self) -> i64 {
        self.0.dropped()
    }
}

/// The agent's background tasks: one tracker, one cancellation token.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the agent stops: every task ends when it is.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns a task inside a span named after it.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker
            .spawn(task.instrument(tracing::info_span!("task", name)));
    }

    /// Cancels every task and waits up to `deadline` for them to end; says which did not.
    pub async fn stop(&self, deadline: std::time::Duration) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                deadline_ms = deadline.as_millis() as u64,
                "background tasks did not stop in time; exiting anyway"
            );
        }
    }
}
