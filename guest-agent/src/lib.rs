//! `dbvm-agent`: the daemon inside each database VM. It dials the broker, verifies every
//! command it is given against the control plane's keys, runs it at most once, and
//! reports the outcome. This crate is a library so tests drive it in-process; `main.rs`
//! is a thin wrapper.

pub mod config;
pub mod db;
pub mod dispatch;
pub mod firewall;
pub mod health;
pub mod identity;
pub mod journal;
pub mod link;
pub mod ops;
pub mod runtime;
pub mod uplink;

use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    State(#[from] identity::StateError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Database(#[from] db::DbError),
}

/// What the agent runs besides the link: the operations, the database manager (its
/// reconciler must be started) and the health monitor (its schedule and metrics
/// endpoint must be started).
pub struct Parts {
    pub dispatcher: dispatch::Dispatcher,
    pub db: Option<Arc<db::DbManager>>,
    pub health: Option<Arc<health::Monitor>>,
    pub uplink: Arc<uplink::Uplink>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("operations", &self.dispatcher)
            .finish_non_exhaustive()
    }
}

/// The operations this agent offers: `ping` and `facts` always; the `db.*` operations
/// when the config has a `[database]` section; `firewall.*` with `[firewall]`; `health`
/// unless `health.enabled` is false.
pub fn operations(v: &config::Validated) -> Result<Parts, AgentError> {
    let mut d = dispatch::Dispatcher::standard();
    let uplink = uplink::Uplink::new();
    let firewall = match &v.config.firewall {
        Some(cfg) => Some(Arc::new(firewall::Firewall::new(cfg.clone()).map_err(
            |e| {
                AgentError::Config(config::ConfigError::Invalid {
                    key: "firewall".into(),
                    problem: e.to_string(),
                })
            },
        )?)),
        None => None,
    };
    let hook = firewall.as_ref().map(|f| {
        Arc::new(ops::firewall::AgentFirewall(f.clone())) as Arc<dyn db::manager::FirewallHook>
    });
    let manager = match &v.config.database {
        Some(settings) => {
            let m = db::DbManager::open(settings.clone(), &v.config.state_dir, hook)?;
            ops::database::register(&mut d, &m);
            Some(m)
        }
        None => None,
    };
    if let Some(f) = &firewall {
        ops::firewall::register(&mut d, f, manager.as_ref());
    }
    let health = v.config.health.enabled.then(|| {
        health::Monitor::new(
            v.agent_id.to_string(),
            v.config.health.clone(),
            manager.clone(),
            uplink.clone(),
            v.config.state_dir.clone(),
        )
    });
    if let Some(h) = &health {
        d.register(ops::health::Health(h.clone()));
    }
    Ok(Parts {
        dispatcher: d,
        db: manager,
        health,
        uplink,
    })
}

/// Builds an agent from validated configuration: opens its state, marks interrupted
/// commands, and returns the link ready to run.
pub fn build(
    v: config::Validated,
    dispatcher: dispatch::Dispatcher,
    uplink: Arc<uplink::Uplink>,
) -> Result<Arc<link::Agent>, AgentError> {
    let state = identity::StateDir::open(&v.config.state_dir)?;
    let sealing_key = state.sealing_key()?;
    let mut journal = journal::Journal::open(&state.journal_path())?;
    let interrupted = journal.interrupt_unfinished()?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "commands were running when the agent last stopped; they are reported interrupted"
        );
    }
    let pruned = journal.prune(dbvm_protocol::now_ms())?;
    tracing::debug!(pruned, "journal pruned");
    let mut verifier =
        dbvm_protocol::Verifier::new(v.agent_id.as_str()).with_skew_ms(v.config.link.clock_skew_ms);
    for (id, key) in &v.keys {
        verifier = verifier.trust(id.clone(), *key);
    }
    Ok(link::Agent::new(
        v.agent_id.clone(),
        v.server_name.clone(),
        v.config.broker.address.clone(),
        v.ca_pem.clone(),
        v.config.broker.enrollment_token_file.clone(),
        state,
        verifier,
        dispatcher,
        sealing_key,
        journal,
        (
            Duration::from_millis(v.config.link.initial_backoff_ms),
            Duration::from_millis(v.config.link.max_backoff_ms),
        ),
        uplink,
    ))
}
