//! The release broker and one release agent, started from given executables (not the
//! harness's debug builds) with errors instead of panics: the system under test of the
//! benchmarks that drive a real database (benches/db-create, benches/health). The
//! processes are [`Proc`]s (killed when dropped) and the containers are removed when the
//! [`Rig`] drops.

use crate::docker::Engine;
use crate::proc::{parse_listening, AgentProc, BrokerProc, Proc};
use crate::Fleet;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The executables to run.
pub struct Bins {
    pub agent: PathBuf,
    pub broker: PathBuf,
}

/// Starts `bin --config <config>` with `DBVM_LOG=level` and stderr in `log`; for the
/// broker, reads its first stdout line ("listening agent=… api=…") as `Proc::spawn` does.
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

/// What to start: the agent's id, its config sections beyond the link (`[database]`,
/// `[health]`, …), the container its database runs in.
pub struct Spec<'a> {
    pub agent_id: &'a str,
    pub sections: String,
    pub container: String,
    /// `DBVM_LOG` for both processes.
    pub log_level: &'a str,
    /// Keep the fleet's directory (configs, logs, data) when the rig drops.
    pub keep_dir: bool,
}

/// A broker and one agent; tears down in `Drop` (agent first, so it cannot restart the
/// containers, then broker, then the containers).
pub struct Rig {
    pub agent: AgentProc,
    pub broker: BrokerProc,
    pub client: dbvmctl::Client,
    pub engine: Engine,
    pub container: String,
    pub fleet: Fleet,
    keep_dir: bool,
}

impl Drop for Rig {
    fn drop(&mut self) {
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

impl Rig {
    /// Another agent of the same fleet (a new VM): enrolled with its own token and
    /// config sections, connected (30 s at most). The caller stops it.
    pub async fn add_agent(
        &self,
        bins: &Bins,
        id: &str,
        sections: &str,
        log_level: &str,
    ) -> Result<AgentProc> {
        let token = self
            .client
            .enrollment_token(id, None)
            .await
            .context("cannot get an enrollment token")?
            .token;
        let mut agent = spawn_agent(
            &self.fleet,
            bins,
            self.broker.agent_addr,
            id,
            &token,
            sections,
            log_level,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let agents = self.client.agents().await.unwrap_or_default();
            if agents.iter().any(|a| a.id == id && a.connected) {
                return Ok(agent);
            }
            if !agent.proc.is_running() || Instant::now() > deadline {
                bail!(
                    "agent {id} did not connect within 30 s:\n{}",
                    agent.proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Writes an agent's token file and config in the fleet's directory and starts it.
fn spawn_agent(
    fleet: &Fleet,
    bins: &Bins,
    broker: SocketAddr,
    id: &str,
    token: &str,
    sections: &str,
    log_level: &str,
) -> Result<AgentProc> {
    let state_dir = fleet.path(&format!("agent-{id}"));
    let token_file = fleet.path(&format!("agent-{id}.token"));
    std::fs::write(&token_file, token).context("cannot write the token file")?;
    let config = fleet.agent_config(id, broker.port(), &state_dir, &token_file, sections);
    let config_path = fleet.path(&format!("agent-{id}.toml"));
    std::fs::write(&config_path, config).context("cannot write the agent config")?;
    let (proc, _) = spawn(
        "agent",
        &bins.agent,
        &config_path,
        fleet.path(&format!("agent-{id}.log")),
        log_level,
    )?;
    Ok(AgentProc {
        proc,
        id: id.to_string(),
        config: config_path,
        state_dir,
    })
}

/// A broker and one agent from `bins` on `fleet`, the agent enrolled and connected (30 s
/// at most), no database engine: for benchmarks that need none (the processes stop when
/// dropped).
pub async fn start_processes(
    fleet: &Fleet,
    bins: &Bins,
    spec: &Spec<'_>,
) -> Result<(BrokerProc, AgentProc, dbvmctl::Client)> {
    let any: SocketAddr = "127.0.0.1:0".parse().context("address")?;
    let broker_config = fleet.path("broker.toml");
    std::fs::write(&broker_config, fleet.broker_config("broker", any, any, ""))
        .context("cannot write the broker config")?;
    let (proc, line) = spawn(
        "broker",
        &bins.broker,
        &broker_config,
        fleet.path("broker.log"),
        spec.log_level,
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
        .enrollment_token(spec.agent_id, None)
        .await
        .context("cannot get an enrollment token")?
        .token;
    let id = spec.agent_id;
    let mut agent = spawn_agent(
        fleet,
        bins,
        agent_addr,
        id,
        &token,
        &spec.sections,
        spec.log_level,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = client.agents().await.unwrap_or_default();
        if agents.iter().any(|a| a.id == id && a.connected) {
            return Ok((broker, agent, client));
        }
        if !agent.proc.is_running() || Instant::now() > deadline {
            bail!(
                "the agent did not connect within 30 s:\n{}",
                agent.proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the broker on `fleet` (its embedded store in the fleet's directory), enrolls
/// the agent with a one-time token and waits until it is connected (30 s at most).
pub async fn start(fleet: Fleet, bins: &Bins, engine: &Engine, spec: Spec<'_>) -> Result<Rig> {
    let (broker, agent, client) = start_processes(&fleet, bins, &spec).await?;
    Ok(Rig {
        agent,
        broker,
        client,
        engine: engine.clone(),
        container: spec.container,
        fleet,
        keep_dir: spec.keep_dir,
    })
}
