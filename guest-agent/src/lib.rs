//! `dbvm-agent`: the daemon inside each database VM. It dials the broker, verifies every
//! command it is given against the control plane's keys, runs it at most once, and
//! reports the outcome. This crate is a library so tests drive it in-process; `main.rs`
//! only reads flags and the config, sets up logging, and waits for a signal.
//!
//! The core — [`link`] (with its executor), [`journal`], [`dispatch`], [`uplink`],
//! [`identity`] — knows no capability; capabilities ([`system`], [`firewall`], [`db`],
//! [`health`]) know no link: each is one module behind [`capability::Capability`], made
//! in [`capabilities::build`].

pub mod backup;
pub mod bundle;
pub mod capabilities;
pub mod capability;
pub mod config;
pub mod db;
pub mod dispatch;
pub mod firewall;
pub mod firstboot;
pub mod health;
pub mod https;
pub mod identity;
pub mod journal;
pub mod lifecycle;
pub mod link;
pub mod runtime;
pub mod system;
pub mod upgrade;
pub mod uplink;

use capability::{Capability, Context, Outbox, Tasks};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long background tasks get to stop after the drain.
const TASKS_STOP_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    State(#[from] identity::StateError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Capability(#[from] capabilities::BuildError),
    #[error("{0}")]
    Operations(String),
}

/// An agent made from validated configuration: state open, interrupted commands marked,
/// capabilities made; nothing runs until [`Agent::start`].
pub struct Agent {
    link: Arc<link::Link>,
    lifecycle: lifecycle::Lifecycle,
    capabilities: Vec<Arc<dyn Capability>>,
    drain: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.capabilities.iter().map(|c| c.name()).collect();
        f.debug_struct("Agent")
            .field("capabilities", &names)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the state directory and the journal (commands that were running when the
    /// agent last stopped are reported interrupted, never run again), makes the
    /// capabilities and the link.
    pub fn build(v: config::Validated) -> Result<Self, AgentError> {
        let state = identity::StateDir::open(&v.config.state_dir)?;
        let sealing_key = state.sealing_key()?;
        let mut journal = journal::Journal::open(&state.journal_path())?;
        // An upgrade the agent was restarted in the middle of gets its own result (which
        // binary runs now says how it ended) before the generic "interrupted" below.
        upgrade::settle_at_start(&v.config.state_dir, &mut journal);
        let interrupted = journal.interrupt_unfinished()?;
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                "commands were running when the agent last stopped; they are reported interrupted"
            );
        }
        let pruned = journal.prune(dbvm_protocol::now_ms())?;
        tracing::debug!(pruned, "journal pruned");

        let uplink = uplink::Uplink::new();
        let lifecycle = lifecycle::Lifecycle::new();
        let ctx = Context {
            agent_id: v.agent_id.to_string(),
            state_dir: v.config.state_dir.clone(),
            outbox: Outbox::new(uplink.clone()),
            lifecycle: lifecycle.clone(),
        };
        let capabilities = capabilities::build(&v.config, &ctx)?;
        let dispatcher = dispatcher(&capabilities)?;
        let db_kind: link::DbKind = {
            let caps = capabilities.clone();
            Arc::new(move || caps.iter().find_map(|c| c.db_kind()))
        };

        // The protocol's time window (30 s of clock skew), the same the broker applies.
        let verifier = dbvm_protocol::Verifier::new(v.agent_id.as_str()).with_keys(v.keys.clone());
        let endpoint = link::Endpoint {
            agent_id: v.agent_id.clone(),
            server_name: v.server_name.clone(),
            broker_address: v.config.broker.address.clone(),
            ca_pem: v.ca_pem.clone(),
            token_file: v.config.broker.enrollment_token_file.clone(),
            backoff: (
                Duration::from_millis(v.config.link.initial_backoff_ms),
                Duration::from_millis(v.config.link.max_backoff_ms),
            ),
        };
        let link = link::Link::new(
            endpoint,
            state,
            verifier,
            dispatcher,
            sealing_key,
            journal,
            uplink,
            db_kind,
            lifecycle.clone(),
        );
        Ok(Self {
            link,
            lifecycle,
            capabilities,
            drain: Duration::from_secs(v.config.link.drain_timeout_s),
        })
    }

    /// The capabilities, in the order they were made.
    pub fn capabilities(&self) -> &[Arc<dyn Capability>] {
        &self.capabilities
    }

    /// Starts the capabilities' background tasks and the link. The agent runs until
    /// `shutdown` is cancelled, then drains (see [`Running::wait`]).
    pub fn start(self, shutdown: CancellationToken) -> Running {
        self.lifecycle.set_shutdown(shutdown.clone());
        let tasks = Tasks::new();
        for c in &self.capabilities {
            c.start(&tasks);
        }
        let link = tokio::spawn(self.link.clone().run(shutdown, self.drain));
        Running {
            link,
            tasks,
            lifecycle: self.lifecycle,
        }
    }
}

/// A started agent.
#[derive(Debug)]
pub struct Running {
    link: tokio::task::JoinHandle<()>,
    tasks: Tasks,
    lifecycle: lifecycle::Lifecycle,
}

impl Running {
    /// Waits until the agent has stopped: after `shutdown`, no new command is taken, the
    /// running ones get the drain deadline (`link.drain_timeout_s`) and the rest are journaled
    /// and reported interrupted, waiting events go out, the connection closes, and then
    /// the background tasks are stopped. Returns the executable the agent must restart
    /// into (an upgrade asked for it), if any.
    pub async fn wait(self) -> Option<std::path::PathBuf> {
        if let Err(e) = self.link.await {
            tracing::error!(error = %e, "the link task failed");
        }
        self.tasks.stop(TASKS_STOP_DEADLINE).await;
        self.lifecycle.restart_target()
    }
}

/// One dispatcher over every capability's operations (a name offered twice is refused).
fn dispatcher(capabilities: &[Arc<dyn Capability>]) -> Result<dispatch::Dispatcher, AgentError> {
    let mut d = dispatch::Dispatcher::default();
    for c in capabilities {
        for op in c.operations() {
            d.register(op).map_err(AgentError::Operations)?;
        }
    }
    Ok(d)
}
