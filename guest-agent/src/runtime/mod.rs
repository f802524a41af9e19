//! Container runtimes: the agent's one way to run a database server and its one-shot helpers
//! (initdb, mariadb-install-db). Two implementations of [`ContainerRuntime`]:
//! [`docker::DockerRuntime`] (the Docker Engine API over a unix socket, what database VMs
//! use) and [`process::ProcessRuntime`] (plain host processes, for development and machines
//! without an engine).
//!
//! The contract both keep:
//! - a container is identified by its `name`; its desired state is a [`ContainerSpec`] whose
//!   [`ContainerSpec::fingerprint`] is recorded with it (Docker label [`SPEC_LABEL`]), so
//!   [`ContainerRuntime::ensure_running`] can tell "running the spec I want" from "running
//!   something older" (an image upgrade, a changed limit) and recreate only then;
//! - images are never pulled: a missing image is [`RuntimeError::ImageMissing`] with the
//!   command that builds it (`packaging/images/build-image.sh`);
//! - containers share the host's network; callers bind-mount directories at the same path
//!   inside (`target == source`), so the process runtime can run the very same argv;
//! - every call to an engine has a timeout.

pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use docker::DockerRuntime;
pub use process::ProcessRuntime;

/// Label holding the spec's fingerprint on a Docker container.
pub const SPEC_LABEL: &str = "dbvm.spec";
/// Label marking containers the agent manages.
pub const MANAGED_LABEL: &str = "dbvm.managed";
/// Image (or spec) label naming the signal that stops the server gracefully, e.g. `SIGINT`
/// for PostgreSQL's fast shutdown. `docker import` cannot set an image's STOPSIGNAL, so the
/// images built by `packaging/images/build-image.sh` carry this label; a spec label of the
/// same name wins over the image's.
pub const STOP_SIGNAL_LABEL: &str = "dbvm.stop-signal";
/// Output kept from a one-shot run or an exec, per stream: the last 64 KiB.
pub const OUTPUT_CAP_BYTES: usize = 64 * 1024;

/// A directory of the host made visible inside the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// What the engine does when the container's main process exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    No,
    UnlessStopped,
    OnFailure,
}

/// The desired state of one container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// argv; empty = the image's default.
    pub command: Vec<String>,
    /// Never secrets (callers put secrets in files).
    pub env: Vec<(String, String)>,
    /// Callers use `target == source`, so the process runtime can run the same argv.
    pub mounts: Vec<Mount>,
    /// `"uid:gid"`.
    pub user: Option<String>,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub restart: RestartPolicy,
    pub stop_timeout_s: u32,
    pub labels: BTreeMap<String, String>,
}

impl ContainerSpec {
    /// SHA-256 (hex) of the spec's canonical JSON: struct fields in declaration order,
    /// labels sorted (a `BTreeMap`), the [`SPEC_LABEL`] itself left out. Stored with the
    /// container in the label `dbvm.spec`.
    pub fn fingerprint(&self) -> String {
        let mut canonical = self.clone();
        canonical.labels.remove(SPEC_LABEL);
        // Serializing plain data (strings, numbers, maps with string keys) cannot fail.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        hex(&Sha256::digest(&bytes))
    }

    /// A spec with the usual defaults: no command override, no limits, no restart, 10 s
    /// stop timeout.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            command: Vec::new(),
            env: Vec::new(),
            mounts: Vec::new(),
            user: None,
            memory_bytes: None,
            cpus: None,
            restart: RestartPolicy::No,
            stop_timeout_s: 10,
            labels: BTreeMap::new(),
        }
    }

    /// The stop signal asked for by the spec's [`STOP_SIGNAL_LABEL`], if any.
    pub fn stop_signal(&self) -> Option<&str> {
        self.labels.get(STOP_SIGNAL_LABEL).map(String::as_str)
    }
}

/// Where a container is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum State {
    Running,
    Restarting,
    Stopped { exit_code: Option<i64> },
    Other(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct ContainerStatus {
    pub name: String,
    pub id: String,
    pub image: String,
    pub state: State,
    pub started_at_ms: Option<i64>,
    /// The [`ContainerSpec::fingerprint`] it was created from (None: not created by dbvm).
    pub fingerprint: Option<String>,
    pub pid: Option<u32>,
}

/// What [`ContainerRuntime::ensure_running`] had to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Reconciled {
    /// Running with the same spec: left alone.
    AlreadyRunning,
    /// Existed with the same spec but was not running: started again (same id).
    Started,
    /// Did not exist: created and started.
    Created,
    /// Existed with another spec: removed, created and started (new id).
    Recreated,
}

/// Result of a one-shot run or an exec. Each stream keeps its last [`OUTPUT_CAP_BYTES`].
#[derive(Clone, Debug, Serialize)]
pub struct RunOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine's socket is down or unreachable; the message names the socket and how to
    /// start the engine.
    #[error("container engine unavailable: {0}")]
    EngineUnavailable(String),
    /// The image is not loaded (images are never pulled); the message says how to build it.
    #[error("image missing: {0}")]
    ImageMissing(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Failed(String),
}

#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + std::fmt::Debug {
    /// `"docker"` or `"process"`.
    fn kind(&self) -> &'static str;
    /// Engine version and the API version in use.
    async fn version(&self) -> Result<String, RuntimeError>;
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError>;
    async fn inspect(&self, name: &str) -> Result<Option<ContainerStatus>, RuntimeError>;
    /// Converge: create if missing; recreate if the fingerprint differs (e.g. new image for
    /// an upgrade); start if stopped; leave a running, matching container alone.
    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<Reconciled, RuntimeError>;
    /// Stops the container (stop signal, then SIGKILL after `timeout`). `false`: no such
    /// container.
    async fn stop(&self, name: &str, timeout: Duration) -> Result<bool, RuntimeError>;
    /// Removes the container, killing it if it runs. `false`: no such container.
    async fn remove(&self, name: &str) -> Result<bool, RuntimeError>;
    /// One-shot: create, start, wait (with timeout, then kill), collect output, remove. For
    /// initdb and similar.
    async fn run_to_completion(
        &self,
        spec: &ContainerSpec,
        timeout: Duration,
    ) -> Result<RunOutput, RuntimeError>;
    /// Runs `argv` inside the running container `name`.
    async fn exec(
        &self,
        name: &str,
        argv: &[String],
        user: Option<&str>,
        timeout: Duration,
    ) -> Result<RunOutput, RuntimeError>;
    /// Sends `signal` (`"SIGKILL"`, `"KILL"` or `"9"`) to the container's main process.
    /// Tests use this to kill behind the agent's back.
    async fn kill(&self, name: &str, signal: &str) -> Result<(), RuntimeError>;
}

/// Container names: what Docker accepts (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), which also keeps
/// the process runtime's state file names inside its directory.
pub fn validate_name(name: &str) -> Result<(), RuntimeError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok && name.len() <= 128 {
        Ok(())
    } else {
        Err(RuntimeError::Failed(format!(
            "invalid container name {name:?}: use letters, digits, '_', '.', '-' (first a letter or digit, at most 128)"
        )))
    }
}

/// Parses `"uid:gid"` (or `"uid"`, gid = uid) into numbers.
pub fn parse_user(user: &str) -> Result<(u32, u32), RuntimeError> {
    let bad = || {
        RuntimeError::Failed(format!(
            "invalid user {user:?}: expected numeric \"uid:gid\" such as \"999:999\""
        ))
    };
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// Keeps the tail of a stream's output: at most [`OUTPUT_CAP_BYTES`], cut at a character
/// boundary, with a marker when something was dropped.
#[derive(Debug, Default)]
pub(crate) struct OutputTail {
    buf: Vec<u8>,
    dropped: usize,
}

impl OutputTail {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > 2 * OUTPUT_CAP_BYTES {
            let cut = self.buf.len() - OUTPUT_CAP_BYTES;
            self.buf.drain(..cut);
            self.dropped += cut;
        }
    }

    pub(crate) fn into_string(mut self) -> String {
        if self.buf.len() > OUTPUT_CAP_BYTES {
            let cut = self.buf.len() - OUTPUT_CAP_BYTES;
            self.buf.drain(..cut);
            self.dropped += cut;
        }
        let text = String::from_utf8_lossy(&self.buf);
        // A cut in the middle of a UTF-8 sequence shows as U+FFFD at the start: drop it.
        let text = text.trim_start_matches('\u{FFFD}');
        if self.dropped > 0 {
            format!("[… {} earlier bytes dropped]\n{text}", self.dropped)
        } else {
            text.to_string()
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        let mut s = ContainerSpec::new("db", "dbvm/postgres:15");
        s.command = vec!["postgres".into(), "-D".into(), "/data".into()];
        s.env = vec![("LANG".into(), "C.UTF-8".into())];
        s.labels.insert("a".into(), "1".into());
        s
    }

    #[test]
    fn fingerprint_is_stable_and_ignores_its_own_label() {
        let a = spec();
        let mut b = spec();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        b.labels.insert(SPEC_LABEL.into(), "whatever".into());
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_changes_with_image_label_and_limits() {
        let base = spec().fingerprint();
        let mut s = spec();
        s.image = "dbvm/postgres:16".into();
        assert_ne!(base, s.fingerprint());
        let mut s = spec();
        s.labels.insert("b".into(), "2".into());
        assert_ne!(base, s.fingerprint());
        let mut s = spec();
        s.memory_bytes = Some(1 << 30);
        assert_ne!(base, s.fingerprint());
        let mut s = spec();
        s.cpus = Some(1.5);
        assert_ne!(base, s.fingerprint());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("dbvm-postgres_1.a").is_ok());
        for bad in ["", "-x", "../x", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn users_parse() {
        assert_eq!(parse_user("999:998").unwrap(), (999, 998));
        assert_eq!(parse_user("999").unwrap(), (999, 999));
        assert!(parse_user("postgres").is_err());
        assert!(parse_user("1:x").is_err());
    }

    #[test]
    fn output_keeps_the_tail() {
        let mut t = OutputTail::default();
        for _ in 0..300 {
            t.push(&[b'a'; 1000]);
        }
        t.push(b"END");
        let s = t.into_string();
        assert!(s.starts_with("[… "));
        assert!(s.ends_with("END"));
        assert!(s.len() < OUTPUT_CAP_BYTES + 100);
        let mut t = OutputTail::default();
        t.push("héllo".as_bytes());
        assert_eq!(t.into_string(), "héllo");
    }
}
