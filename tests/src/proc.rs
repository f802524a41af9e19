//! Real processes under test: builds the binaries once, starts them with their own
//! config, captures their logs, kills them on drop and prints logs if the test failed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

static BUILD: Once = Once::new();

/// The workspace's `Cargo.toml`.
pub fn workspace_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml")
}

/// `cargo` as a shell would run it, for building or inspecting the workspace from a test.
pub fn cargo_command() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Without the variables cargo sets for a running test (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, …): ring's build script is rerun when one of them changes, so
    // building with them (as a test process has them) and then without (`cargo
    // test`, `cargo build` from a shell) rebuilt ring and everything above it each
    // time: ~90 s for the first test binary of every run.
    let mut cmd = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name.as_ref(),
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// Directory of the workspace's built binaries (target/debug), building them once.
pub fn bin_dir() -> PathBuf {
    BUILD.call_once(|| {
        let manifest = workspace_manifest();
        let status = cargo_command()
            .args([
                "build",
                "--quiet",
                "--bin",
                "dbvm-broker",
                "--bin",
                "dbvm-agent",
                "--bin",
                "dbvmctl",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("cargo must be runnable to build the binaries under test");
        assert!(
            status.success(),
            "building dbvm-broker, dbvm-agent and dbvmctl failed"
        );
    });
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A running process with its log file.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        bin: &str,
        args: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> (Self, Option<String>) {
        let path = bin_dir().join(bin);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(logf)
            .env("DBVM_LOG", "info,dbvm_broker=debug,dbvm_agent=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        // The broker prints one "listening ..." line on stdout once bound.
        let first_line = if bin == "dbvm-broker" {
            let stdout = child.stdout.take().expect("stdout");
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            std::thread::spawn(move || for _ in reader.lines() {});
            Some(line)
        } else {
            None
        };
        (
            Self {
                name: name.to_string(),
                child: Some(child),
                log,
            },
            first_line,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: a crash, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit (up to 10 s), returning the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the process is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "===== log of {} ({}) =====\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

pub struct BrokerProc {
    pub proc: Proc,
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
}

impl BrokerProc {
    pub fn api_url(&self) -> String {
        format!("https://localhost:{}", self.api_addr.port())
    }
}

pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut agent = None;
    let mut api = None;
    for part in line.split_whitespace() {
        if let Some(a) = part.strip_prefix("agent=") {
            agent = a.parse().ok();
        }
        if let Some(a) = part.strip_prefix("api=") {
            api = a.parse().ok();
        }
    }
    Some((agent?, api?))
}

pub struct AgentProc {
    pub proc: Proc,
    pub id: String,
    pub config: PathBuf,
    pub state_dir: PathBuf,
}

impl AgentProc {
    /// Path of the agent's command journal (tests read it to count executions).
    pub fn journal(&self) -> PathBuf {
        self.state_dir.join("journal.sqlite3")
    }
}
