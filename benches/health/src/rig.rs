//! The system under test: a fresh fleet, the release broker and the release agent (the
//! given executables, not the harness's debug builds) with a `[database]` section like
//! the e2e tests' and a `[health]` section (checks every `interval_s`, metrics on a free
//! port), linked, and a PostgreSQL database made by a signed `db.create`. Everything
//! lives in one directory under `target/health-bench/`; the processes are
//! `dbvm_e2e::proc::Proc`s (killed when dropped) and the containers are removed on drop.

use anyhow::{bail, Context, Result};
use dbvm_e2e::docker::Engine;
use dbvm_e2e::proc::Proc;
use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const AGENT_ID: &str = "bench-health";

pub use dbvm_e2e::release::Bins;

/// Starts another program (an exporter) with stdout and stderr in `log`.
pub fn spawn_other(
    name: &str,
    bin: &str,
    args: &[String],
    env: &[(&str, String)],
    log: PathBuf,
) -> Result<Proc> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let logf2 = logf
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
    Ok(Proc {
        name: name.to_string(),
        child: Some(child),
        log,
    })
}

/// The broker, the agent and the database (torn down when `base` drops), and where the
/// agent's metrics and the database listen.
pub struct Rig {
    pub base: dbvm_e2e::release::Rig,
    /// The agent's metrics endpoint.
    pub metrics_addr: String,
    /// The database's client port and its unix-socket directory.
    pub db_port: u16,
    pub db_socket_dir: PathBuf,
}

impl std::ops::Deref for Rig {
    type Target = dbvm_e2e::release::Rig;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.base
    }
}

/// Moves the fleet's files (written by `Fleet::new` to a temp dir under /tmp) into a
/// fresh directory under `target/health-bench/`, so the run owns its data there.
fn relocate(fleet: &mut Fleet) -> Result<()> {
    let base = dbvm_e2e::docker::workspace_root()
        .join("target")
        .join("health-bench");
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))?;
    for name in ["ca.crt", "ca.key", "broker.crt", "broker.key"] {
        std::fs::copy(fleet.path(name), dir.path().join(name))
            .with_context(|| format!("cannot copy {name}"))?;
    }
    fleet.dir = dir; // the old temp dir is removed as it drops
    Ok(())
}

/// A fresh fleet, broker and agent (linked), then a signed `db.create` of PostgreSQL,
/// waited for until it succeeded.
pub async fn setup(bins: &Bins, args: &crate::Args, engine: &Engine) -> Result<Rig> {
    let mut fleet = Fleet::new();
    relocate(&mut fleet)?;
    eprintln!("   working directory {}", fleet.dir.path().display());
    // The e2e tests' [database] section (tests/tests/database.rs) and a [health] section.
    let container = dbvm_e2e::docker::unique_name("healthbench");
    let data_root = fleet.path("db");
    let metrics_addr = format!("127.0.0.1:{}", dbvm_e2e::docker::free_port());
    let sections = format!(
        r#"{db}[health]
interval_s = {interval}
check_timeout_ms = {timeout}
metrics_listen = "{metrics_addr}"
"#,
        db = engine.database_section(&data_root, &container, args.reconcile_secs, ""),
        interval = args.interval_secs,
        timeout = args.check_timeout_ms,
    );
    let spec = dbvm_e2e::release::Spec {
        agent_id: AGENT_ID,
        sections,
        container,
        log_level: &args.log,
        keep_dir: args.keep_dir,
    };
    let rig = Rig {
        base: dbvm_e2e::release::start(fleet, bins, engine, spec).await?,
        metrics_addr,
        db_port: dbvm_e2e::docker::free_port(),
        db_socket_dir: data_root.join("run"),
    };

    eprintln!("   db.create postgres on port {}", rig.db_port);
    let t0 = Instant::now();
    let cmd = rig.fleet.sign(
        AGENT_ID,
        "db.create",
        json!({"engine": "postgres", "database": "app", "port": rig.db_port}),
    );
    let submitted = rig.client.submit(&cmd).await.context("submit db.create")?;
    let view = rig
        .client
        .wait(submitted.id, Duration::from_secs(240))
        .await
        .context("wait for db.create")?;
    if view.state != CommandState::Succeeded {
        bail!(
            "db.create did not succeed ({:?}): {:?}\nagent log:\n{}",
            view.state,
            view.error,
            rig.agent.proc.log_tail()
        );
    }
    eprintln!("   database created in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(rig)
}

/// Sends a signed `health` command (the agent runs all twelve checks now) and returns
/// (round trip in µs, the agent's own `duration_ms` of that run).
pub async fn health_command(rig: &Rig) -> Result<(u64, u64)> {
    let cmd = rig.fleet.sign(AGENT_ID, "health", json!({}));
    let t0 = Instant::now();
    let submitted = rig.client.submit(&cmd).await.context("submit health")?;
    let view = rig
        .client
        .wait(submitted.id, Duration::from_secs(60))
        .await
        .context("wait for health")?;
    let took = t0.elapsed();
    if view.state != CommandState::Succeeded {
        bail!(
            "health did not succeed ({:?}): {:?}",
            view.state,
            view.error
        );
    }
    let duration_ms = view
        .output
        .as_ref()
        .and_then(|o| o["duration_ms"].as_u64())
        .context("the health result has no duration_ms")?;
    Ok((
        u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        duration_ms,
    ))
}
