//! The broker under test as a child process of this one: started (optionally under
//! `taskset -c <core>`), ready once it prints its `listening agent=… api=…` line,
//! stopped with SIGTERM (SIGKILL after a grace period, or on drop).

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct BrokerProcess {
    child: Child,
    pub pid: u32,
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub log: PathBuf,
}

impl std::fmt::Debug for BrokerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// Parses `listening agent=IP:PORT api=IP:PORT`.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("listening ")?;
    let mut agent = None;
    let mut api = None;
    for word in rest.split_whitespace() {
        if let Some(a) = word.strip_prefix("agent=") {
            agent = a.parse().ok();
        } else if let Some(a) = word.strip_prefix("api=") {
            api = a.parse().ok();
        }
    }
    Some((agent?, api?))
}

/// Last `n` lines of a log file (for error messages).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends a signal to one process we started (by its pid), with the system `kill`.
pub async fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await
        .with_context(|| format!("cannot run kill -{sig} {pid}"))?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed ({status})");
    }
    Ok(())
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`. Returns its exit status text.
pub async fn stop_child(child: &mut Child, pid: u32, grace: Duration) -> Result<String> {
    if let Some(status) = child.try_wait().context("cannot check a child process")? {
        return Ok(format!("had already exited ({status})"));
    }
    signal(pid, "TERM").await?;
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => Ok(status
            .context("cannot wait for a child process")?
            .to_string()),
        Err(_) => {
            child
                .start_kill()
                .context("cannot SIGKILL a child process")?;
            let status = child
                .wait()
                .await
                .context("cannot wait for a child process")?;
            Ok(format!(
                "killed after {} s without exiting on SIGTERM ({status})",
                grace.as_secs()
            ))
        }
    }
}

impl BrokerProcess {
    /// Starts `bin --config config`, stderr into `log`, pinned to `core` when given.
    pub async fn start(bin: &Path, config: &Path, log: PathBuf, core: Option<u32>) -> Result<Self> {
        if !bin.is_file() {
            bail!(
                "broker binary {} not found: build it with `cargo build --release -p dbvm-broker` or pass --broker-bin",
                bin.display()
            );
        }
        let logf = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = match core {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("the broker exited at once")?;
        let stdout = child
            .stdout
            .take()
            .context("the broker's stdout is not captured")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                bail!(
                    "the broker exited before it was ready ({status:?}); its log ({}):\n{}",
                    log.display(),
                    log_tail(&log, 20)
                );
            }
            Err(_) => bail!(
                "the broker printed no `listening` line within {} s; its log:\n{}",
                READY_TIMEOUT.as_secs(),
                log_tail(&log, 20)
            ),
        };
        let (agent_addr, api_addr) = parse_listening(&line)
            .with_context(|| format!("cannot parse the broker's first line {line:?}"))?;
        // Keep reading stdout so the broker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            agent_addr,
            api_addr,
            log,
        })
    }

    /// Fails, with the end of the broker's log, when the broker is no longer running.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .context("cannot check the broker process")?
        {
            bail!(
                "the broker exited ({status}); its log:\n{}",
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    pub async fn stop(mut self) -> Result<String> {
        stop_child(&mut self.child, self.pid, STOP_GRACE).await
    }
}

/// Pins every thread of this process to `core` with `taskset -a -p` (threads created
/// later inherit the affinity of the thread that creates them).
pub async fn pin_self(core: u32) -> Result<()> {
    let pid = std::process::id();
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c"])
        .arg(core.to_string())
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .await
        .context("cannot run taskset (util-linux) to pin the load generator")?;
    if !status.success() {
        bail!("taskset -a -p -c {core} {pid} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_parses() {
        let (a, b) = parse_listening("listening agent=127.0.0.1:4000 api=127.0.0.1:4001\n")
            .unwrap_or_else(|| {
                panic!("did not parse");
            });
        assert_eq!(a.port(), 4000);
        assert_eq!(b.port(), 4001);
        assert!(parse_listening("starting").is_none());
    }
}
