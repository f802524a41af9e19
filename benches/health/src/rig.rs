//! The system under test: a fresh fleet, the release broker and the release agent (the
//! given executables, not the harness's debug builds) with a `[database]` section like
//! the e2e tests' and a `[health]` section (checks every `interval_s`, metrics on a free
//! port), linked, and a PostgreSQL database made by a signed `db.create`. Everything
//! lives in one directory under `target/health-bench/`; the processes are
//! `dbvm_e2e::proc::Proc`s (killed when dropped) and the containers are removed on drop.

use anyhow::{bail, Context, Result};
use dbvm_e2e::docker::Engine;
use dbvm_e2e::proc::{parse_listening, AgentProc, BrokerProc, Proc};
use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const AGENT_ID: &str = "bench-health";

pub struct Bins {
    pub agent: PathBuf,
    pub broker: PathBuf,
}

fn toml_str(path: &Path) -> String {
    // Paths here are under the workspace's target/: no quotes or backslashes in them.
    format!("\"{}\"", path.display())
}

/// Starts `bin --config <config>` with stderr in `log`; for the broker, reads its first
/// stdout line ("listening agent=… api=…").
fn spawn(
    name: &str,
    bin: &Path,
    config: &Path,
    log: PathBuf,
    level: &str,
) -> Result<(Proc, String)> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .env("DBVM_LOG", level)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        if name == "broker" {
            let _ = reader.read_line(&mut line);
        }
        std::thread::spawn(move || for _ in reader.lines() {});
    }
    Ok((
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        },
        line,
    ))
}

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

/// The broker, the agent and the database; tears down in `Drop`.
pub struct Rig {
    pub agent: AgentProc,
    pub broker: BrokerProc,
    pub client: dbvmctl::Client,
    pub engine: Engine,
    pub container: String,
    pub fleet: Fleet,
    /// The agent's metrics endpoint.
    pub metrics_addr: String,
    /// The database's client port and its unix-socket directory.
    pub db_port: u16,
    pub db_socket_dir: PathBuf,
    keep_dir: bool,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Containers outlive the agent: stop the agent first so it cannot restart them.
        self.agent.proc.kill();
        self.broker.proc.kill();
        self.engine.remove_container(&self.container);
        self.engine
            .remove_container(&format!("{}-init", self.container));
        if self.keep_dir {
            if let Ok(empty) = tempfile::tempdir() {
                let dir = std::mem::replace(&mut self.fleet.dir, empty);
                eprintln!("kept {}", dir.keep().display());
            }
        }
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
    let d = fleet.dir.path().to_path_buf();
    eprintln!("   working directory {}", d.display());
    let broker_config = fleet.path("broker.toml");
    std::fs::write(
        &broker_config,
        format!(
            r#"agent_listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
data_dir = {data}
[tls]
ca_cert = {ca}
ca_key = {ca_key}
server_cert = {cert}
server_key = {key}
"#,
            data = toml_str(&fleet.path("broker-data")),
            ca = toml_str(&d.join("ca.crt")),
            ca_key = toml_str(&d.join("ca.key")),
            cert = toml_str(&d.join("broker.crt")),
            key = toml_str(&d.join("broker.key")),
        ),
    )
    .context("cannot write the broker config")?;
    let (proc, line) = spawn(
        "broker",
        &bins.broker,
        &broker_config,
        fleet.path("broker.log"),
        &args.log,
    )?;
    let Some((agent_addr, api_addr)) = parse_listening(&line) else {
        bail!(
            "the broker did not report its addresses (got {line:?}):\n{}",
            proc.log_tail()
        );
    };
    let broker = BrokerProc {
        proc,
        agent_addr,
        api_addr,
    };
    let client = fleet.client(&broker);
    let token = client
        .enrollment_token(AGENT_ID, None)
        .await
        .context("cannot get an enrollment token")?
        .token;

    // What `Fleet::start_agent` writes, the e2e tests' [database] section
    // (tests/tests/database.rs) and a [health] section.
    let state_dir = fleet.path("agent-state");
    let token_file = fleet.path("agent.token");
    std::fs::write(&token_file, &token).context("cannot write the token file")?;
    let container = dbvm_e2e::docker::unique_name("healthbench");
    let data_root = fleet.path("db");
    let metrics_addr = format!("127.0.0.1:{}", dbvm_e2e::docker::free_port());
    let key = dbvm_protocol::command::PublicKeyFile::from_key(&fleet.signer.verifying_key());
    let config = format!(
        r#"agent_id = "{AGENT_ID}"
state_dir = {state}
[broker]
address = "localhost:{port}"
ca_cert = {ca}
enrollment_token_file = {token}
[[trusted_keys]]
key_id = "{kid}"
public_key = "{pk}"
[link]
initial_backoff_ms = 100
max_backoff_ms = 1000
[database]
runtime = "docker"
docker_socket = {sock}
data_root = {root}
container_name = "{container}"
start_timeout_s = 60
engine_wait_s = 5
reconcile_interval_s = {reconcile}
[database.images]
postgres = "{pg}"
mariadb = "{maria}"
[health]
interval_s = {interval}
check_timeout_ms = {timeout}
metrics_listen = "{metrics_addr}"
"#,
        state = toml_str(&state_dir),
        port = agent_addr.port(),
        ca = toml_str(&d.join("ca.crt")),
        token = toml_str(&token_file),
        kid = key.key_id,
        pk = key.public_key,
        sock = toml_str(&engine.socket),
        root = toml_str(&data_root),
        reconcile = args.reconcile_secs,
        pg = engine.postgres_image,
        maria = engine.mariadb_image,
        interval = args.interval_secs,
        timeout = args.check_timeout_ms,
    );
    let config_path = fleet.path("agent.toml");
    std::fs::write(&config_path, config).context("cannot write the agent config")?;
    let (proc, _) = spawn(
        "agent",
        &bins.agent,
        &config_path,
        fleet.path("agent.log"),
        &args.log,
    )?;
    let mut rig = Rig {
        agent: AgentProc {
            proc,
            id: AGENT_ID.to_string(),
            config: config_path,
            state_dir,
        },
        broker,
        client,
        engine: engine.clone(),
        container,
        fleet,
        metrics_addr,
        db_port: dbvm_e2e::docker::free_port(),
        db_socket_dir: data_root.join("run"),
        keep_dir: args.keep_dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = rig.client.agents().await.unwrap_or_default();
        if agents.iter().any(|a| a.id == AGENT_ID && a.connected) {
            break;
        }
        if !rig.agent.proc.is_running() || Instant::now() > deadline {
            bail!(
                "the agent did not connect within 30 s:\n{}",
                rig.agent.proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

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
