//! One run: a fresh fleet, broker and agent (the given executables, not the harness's
//! debug builds: `dbvm_e2e::release`), one signed `db.create`, then a connect loop as
//! `dbaas` until the database accepts.

use crate::procfs::{self, Memory};
use crate::DbEngine;
use anyhow::{bail, Context, Result};
use dbvm_e2e::docker::Engine;
use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use dbvm_protocol::seal::Sealed;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const AGENT_ID: &str = "bench-db";
const CONNECT_GIVE_UP: Duration = Duration::from_secs(60);

/// What one create measured.
#[derive(Clone, Debug, Serialize)]
pub struct CreateRun {
    pub engine: DbEngine,
    pub run: usize,
    pub port: u16,
    /// Submit → the database accepted a connection as dbaas (and answered `SELECT 1`).
    pub total_ms: f64,
    /// Submit → the broker's answer that the command succeeded (client side).
    pub command_ms: f64,
    /// That answer → the first accepted connection.
    pub accept_ms: f64,
    pub connect_attempts: u32,
    /// Broker timestamps: submitted → delivered to the agent (ms, wall clock).
    pub relay_ms: Option<i64>,
    /// Broker timestamps: delivered → finished.
    pub agent_ms: Option<i64>,
    /// The agent's `timings` object, as it reported it (ms).
    pub timings: BTreeMap<String, f64>,
    /// total − the sum of the agent's phases: relay, journal, the reply, the connect.
    pub outside_phases_ms: f64,
    /// The agent right after the create.
    pub memory_after_create: Memory,
    /// Only for each engine's last run.
    pub idle: Option<Idle>,
    pub container: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub idle_secs: u64,
    pub memory: Memory,
    /// The agent's user + system CPU over the idle period (ms, 10 ms resolution).
    pub cpu_ms: f64,
    /// The database still accepted a connection after the idle period.
    pub database_still_up: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub use dbvm_e2e::release::{Bins, Rig};

/// A fresh fleet (CA, keys), broker, enrollment token and agent with the e2e tests'
/// `[database]` section, connected.
pub async fn setup(bins: &Bins, args: &crate::Args, engine: &Engine) -> Result<Rig> {
    let fleet = Fleet::new();
    let container = dbvm_e2e::docker::unique_name("bench");
    let sections = engine.database_section(
        &fleet.path(&format!("{AGENT_ID}-db")),
        &container,
        args.reconcile_secs,
        "",
    );
    let spec = dbvm_e2e::release::Spec {
        agent_id: AGENT_ID,
        sections,
        container,
        log_level: &args.log,
        keep_dir: args.keep_dir,
    };
    dbvm_e2e::release::start(fleet, bins, engine, spec).await
}

/// One connection as dbaas over TCP to `app`, with a `SELECT 1`.
async fn connect(engine: DbEngine, port: u16, password: &str) -> Result<(), String> {
    match engine {
        DbEngine::Postgres => {
            let (client, conn) = tokio_postgres::Config::new()
                .host("127.0.0.1")
                .port(port)
                .user("dbaas")
                .password(password)
                .dbname("app")
                .connect_timeout(Duration::from_secs(5))
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let r = client.simple_query("SELECT 1").await.map(|_| ());
            drop(client);
            let _ = task.await;
            r.map_err(|e| e.to_string())
        }
        DbEngine::Mariadb => {
            use mysql_async::prelude::Queryable;
            let opts = mysql_async::OptsBuilder::default()
                .ip_or_hostname("127.0.0.1")
                .tcp_port(port)
                .user(Some("dbaas"))
                .pass(Some(password))
                .db_name(Some("app"))
                .prefer_socket(false);
            let mut conn = mysql_async::Conn::new(opts)
                .await
                .map_err(|e| e.to_string())?;
            let r = conn.query_drop("SELECT 1").await.map_err(|e| e.to_string());
            let _ = conn.disconnect().await;
            r
        }
    }
}

/// Sends the signed create and measures until the database accepts a connection.
pub async fn create(
    rig: &mut Rig,
    engine: DbEngine,
    run: usize,
    idle_secs: Option<u64>,
) -> Result<CreateRun> {
    let port = dbvm_e2e::docker::free_port();
    let cmd = rig.fleet.sign(
        AGENT_ID,
        "db.create",
        json!({"engine": engine.name(), "database": "app", "port": port}),
    );
    let t0 = Instant::now();
    let submitted = rig.client.submit(&cmd).await.context("submit")?;
    let view = rig
        .client
        .wait(submitted.id, Duration::from_secs(240))
        .await
        .context("wait for the create")?;
    let command_done = t0.elapsed();
    if view.state != CommandState::Succeeded {
        bail!(
            "{} create did not succeed ({:?}): {:?}\nagent log:\n{}",
            engine.name(),
            view.state,
            view.error,
            rig.agent.proc.log_tail()
        );
    }
    let out = view.output.clone().context("the create has no output")?;
    let sealed: Sealed = serde_json::from_value(out["password"].clone())
        .with_context(|| format!("no sealed password in the output: {out}"))?;
    let password = rig
        .fleet
        .reply_key
        .open(&sealed)
        .map_err(|e| anyhow::anyhow!("cannot open the sealed password: {e}"))?
        .expose()
        .to_string();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match connect(engine, port, &password).await {
            Ok(()) => break,
            Err(e) if t0.elapsed() > command_done + CONNECT_GIVE_UP => {
                bail!("{} never accepted dbaas on port {port}: {e}", engine.name())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let total = t0.elapsed();
    let memory_after_create = procfs::memory(rig.agent.proc.pid())?;

    let timings: BTreeMap<String, f64> = out["timings"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    let phases: f64 = timings.values().sum();
    let relay_ms = view.delivered_at_ms.map(|d| d - view.submitted_at_ms);
    let agent_ms = match (view.delivered_at_ms, view.finished_at_ms) {
        (Some(d), Some(f)) => Some(f - d),
        _ => None,
    };

    let idle = match idle_secs {
        Some(secs) => Some(idle(rig, engine, port, &password, secs).await?),
        None => None,
    };
    Ok(CreateRun {
        engine,
        run,
        port,
        total_ms: ms(total),
        command_ms: ms(command_done),
        accept_ms: ms(total - command_done),
        connect_attempts: attempts,
        relay_ms,
        agent_ms,
        outside_phases_ms: ms(total) - phases,
        timings,
        memory_after_create,
        idle,
        container: rig.container.clone(),
    })
}

/// Leaves the agent alone for `secs` with the database running, then reads its memory.
async fn idle(
    rig: &mut Rig,
    engine: DbEngine,
    port: u16,
    password: &str,
    secs: u64,
) -> Result<Idle> {
    let pid = rig.agent.proc.pid();
    let cpu0 = procfs::cpu_ms(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    if !rig.agent.proc.is_running() {
        bail!(
            "the agent exited while idle:\n{}",
            rig.agent.proc.log_tail()
        );
    }
    let cpu1 = procfs::cpu_ms(pid);
    let memory = procfs::memory(pid)?;
    let database_still_up = connect(engine, port, password).await.is_ok();
    Ok(Idle {
        idle_secs: secs,
        memory,
        cpu_ms: (cpu1 - cpu0).max(0.0),
        database_still_up,
    })
}
