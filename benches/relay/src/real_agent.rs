//! One real `dbvm-agent` process against the broker under test: enrolled with a one-time
//! token from the API, trusting the run's signer, sent a few pings, left idle, and then
//! measured (VmRSS, Pss, peak RSS, threads) — the footprint a database VM pays.

use anyhow::{bail, Context, Result};
use dbvm_protocol::command::PublicKeyFile;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use tokio::time::Instant;

use crate::broker::{log_tail, stop_child};
use crate::fleet::{ping_body, submit_body, toml_str, Fleet};
use crate::load::{histogram, ApiClient, Outcome};
use crate::procfs;
use crate::report::Latency;

pub const AGENT_ID: &str = "real-1";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Serialize)]
pub struct RealAgentReport {
    pub binary: String,
    pub binary_kib: u64,
    pub pings: usize,
    pub pings_ok: usize,
    pub ping_errors: Vec<String>,
    /// Round trips through the API, one at a time (the agent journals every command).
    pub ping_latency: Latency,
    pub idle_secs: u64,
    pub memory: procfs::Memory,
    pub status: procfs::Status,
    /// CPU of all its threads over the idle period (ms).
    pub idle_cpu_ms: f64,
    pub exit: String,
}

pub async fn run(
    bin: &Path,
    fleet: &Fleet,
    api: &ApiClient,
    agent_addr: SocketAddr,
    pings: usize,
    idle: Duration,
    wait_ms: u64,
) -> Result<RealAgentReport> {
    let binary_kib = std::fs::metadata(bin)
        .with_context(|| format!("real agent binary {}", bin.display()))?
        .len()
        / 1024;
    let token = api
        .enrollment_token(AGENT_ID)
        .await
        .context("cannot get an enrollment token")?;
    let token_file = fleet.path("real-1.token");
    std::fs::write(&token_file, &token)
        .with_context(|| format!("cannot write {}", token_file.display()))?;
    let key = PublicKeyFile::from_key(&fleet.signer.verifying_key());
    let state_dir = fleet.path("real-1-state");
    let config = format!(
        "agent_id = {id}\nstate_dir = {state}\n\n[broker]\naddress = {addr}\nserver_name = \"localhost\"\n\
         ca_cert = {ca}\nenrollment_token_file = {token}\n\n[[trusted_keys]]\nkey_id = {kid}\npublic_key = {pk}\n",
        id = toml_str(AGENT_ID),
        state = toml_str(&state_dir.display().to_string()),
        addr = toml_str(&agent_addr.to_string()),
        ca = toml_str(&fleet.ca_cert_path.display().to_string()),
        token = toml_str(&token_file.display().to_string()),
        kid = toml_str(&key.key_id),
        pk = toml_str(&key.public_key),
    );
    let config_path = fleet.path("real-1.toml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let log = fleet.path("real-1.log");
    let logf =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("the real agent exited at once")?;

    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("cannot check the real agent")? {
            bail!(
                "the real agent exited ({status}); its log:\n{}",
                log_tail(&log, 20)
            );
        }
        if api.agent_connected(AGENT_ID).await? {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the real agent did not connect within 30 s; its log:\n{}",
                log_tail(&log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut hist = histogram();
    let mut ok = 0;
    let mut errors = Vec::new();
    for _ in 0..pings {
        let body = submit_body(&fleet.signer, &ping_body(AGENT_ID, 600_000))?;
        let sent = Instant::now();
        match api.submit(body, wait_ms).await {
            Outcome::Succeeded => {
                ok += 1;
                hist.saturating_record(
                    u64::try_from(sent.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
            }
            Outcome::Failed(e) => {
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }

    let cpu_before = procfs::threads(pid)?;
    tokio::time::sleep(idle).await;
    let memory = procfs::memory(pid)?;
    let status = procfs::status(pid)?;
    let idle_cpu_ms = procfs::cpu_delta(&cpu_before, &procfs::threads(pid)?).run_ms;
    let exit = stop_child(&mut child, pid, Duration::from_secs(10)).await?;
    Ok(RealAgentReport {
        binary: bin.display().to_string(),
        binary_kib,
        pings,
        pings_ok: ok,
        ping_errors: errors,
        ping_latency: Latency::from_histogram(&hist),
        idle_secs: idle.as_secs(),
        memory,
        status,
        idle_cpu_ms,
        exit,
    })
}
