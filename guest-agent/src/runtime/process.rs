//! [`ProcessRuntime`]: "containers" that are plain host processes, for development machines
//! and tests where no container engine runs. It runs `spec.command` directly on the host.
//!
//! What it does:
//! - each container is a detached child in its own process group (so stop and kill reach
//!   everything it started), run as `spec.user` (numeric uid:gid, supplementary groups
//!   dropped), with exactly `spec.env` plus a default `PATH`, working directory `/`, stdin
//!   closed, stdout and stderr appended to `STATE_DIR/<name>.log`;
//! - its state (spec, pid, the pid's start time, a stable id) is kept in
//!   `STATE_DIR/<name>.json`, so a restarted agent finds its containers again; a pid counts
//!   as "the container" only while `/proc/<pid>/stat` shows the recorded start time (pid
//!   reuse) and the process is not a zombie;
//! - stop sends the stop signal ([`super::STOP_SIGNAL_LABEL`] label, default SIGTERM) to the
//!   process group, waits `timeout`, then SIGKILLs the group;
//! - exec and run_to_completion run argv on the host (as the given user) with a timeout,
//!   killing the process group when it passes.
//!
//! Its limits, on purpose:
//! - no isolation at all: same filesystem, network, pid namespace and privileges as the host;
//! - `image` is not used: there are no images ([`ContainerRuntime::image_present`] is always
//!   true); a missing *program* (`command[0]`) is reported as [`RuntimeError::ImageMissing`];
//!   `command` must not be empty (there is no image default to fall back to);
//! - `mounts` are ignored (callers mount at `target == source`, so paths already agree);
//! - `memory_bytes` and `cpus` are not enforced;
//! - `restart` is not supervised: a process that dies stays dead until the next
//!   `ensure_running` (the agent's reconcile loop) starts it again;
//! - the log file is not rotated.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{
    parse_user, validate_name, ContainerRuntime, ContainerSpec, ContainerStatus, OutputTail,
    Reconciled, RunOutput, RuntimeError, State,
};

/// PATH for processes whose spec does not set one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Plain host processes standing in for containers.
#[derive(Debug)]
pub struct ProcessRuntime {
    state_dir: PathBuf,
    /// Children this agent spawned, kept to reap them (and learn their exit code). A
    /// restarted agent has none; it finds its processes through the state files.
    children: Mutex<HashMap<String, Child>>,
    /// Serialises converging calls so two reconciles never spawn the same container twice.
    converge: tokio::sync::Mutex<()>,
}

/// `STATE_DIR/<name>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    spec: ContainerSpec,
    fingerprint: String,
    pid: Option<u32>,
    /// Field 22 of /proc/<pid>/stat (clock ticks after boot): tells our process from a
    /// later one that reused the pid.
    pid_start_ticks: Option<u64>,
    started_at_ms: Option<i64>,
    exit_code: Option<i64>,
}

impl Record {
    /// A new, never-started record for `spec` (fresh id).
    fn fresh(spec: &ContainerSpec, fingerprint: String) -> Self {
        Self {
            id: new_id(),
            spec: spec.clone(),
            fingerprint,
            pid: None,
            pid_start_ticks: None,
            started_at_ms: None,
            exit_code: None,
        }
    }
}

impl ProcessRuntime {
    /// A runtime keeping its state (and the processes' logs) in `state_dir`, created on first
    /// use.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            children: Mutex::new(HashMap::new()),
            converge: tokio::sync::Mutex::new(()),
        }
    }

    /// Where the process `name` writes its stdout and stderr.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.log"))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.json"))
    }

    fn io_err(&self, what: &str, path: &Path, e: std::io::Error) -> RuntimeError {
        RuntimeError::Failed(format!("{what} {}: {e}", path.display()))
    }

    fn load(&self, name: &str) -> Result<Option<Record>, RuntimeError> {
        let path = self.record_path(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                RuntimeError::Failed(format!(
                    "process runtime state {} is not valid ({e}); remove it to forget the container",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("reading", &path, e)),
        }
    }

    /// Writes the record atomically and durably.
    fn save(&self, rec: &Record) -> Result<(), RuntimeError> {
        fs::create_dir_all(&self.state_dir)
            .map_err(|e| self.io_err("creating", &self.state_dir, e))?;
        let path = self.record_path(&rec.spec.name);
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|e| RuntimeError::Failed(format!("encoding process state: {e}")))?;
        dbvm_host::fs::write_atomic(&path, &bytes, 0o600)
            .map_err(|e| self.io_err("writing", &path, e))
    }

    /// Reaps our child `name` if it exited; its exit code (signal deaths as 128 + signal,
    /// as a shell and Docker report them).
    fn reap(&self, name: &str) -> Option<i64> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let child = children.get_mut(name)?;
        match child.try_wait() {
            Ok(Some(status)) => {
                children.remove(name);
                Some(exit_code_of(status))
            }
            _ => None,
        }
    }

    /// Whether the record's process is alive; updates the record's exit code when it died.
    fn refresh(&self, rec: &mut Record) -> bool {
        let reaped = self.reap(&rec.spec.name);
        let alive = match (rec.pid, rec.pid_start_ticks) {
            (Some(pid), Some(ticks)) => proc_stat(pid)
                .is_some_and(|(state, start)| start == ticks && state != 'Z' && state != 'X'),
            _ => false,
        };
        if !alive && rec.pid.is_some() {
            if reaped.is_some() {
                rec.exit_code = reaped;
            }
            rec.pid = None;
            rec.pid_start_ticks = None;
            let _ = self.save(rec);
        }
        alive
    }

    fn status(&self, rec: &Record, alive: bool) -> ContainerStatus {
        ContainerStatus {
            name: rec.spec.name.clone(),
            id: rec.id.clone(),
            image: rec.spec.image.clone(),
            state: if alive {
                State::Running
            } else {
                State::Stopped {
                    exit_code: rec.exit_code,
                }
            },
            started_at_ms: rec.started_at_ms,
            fingerprint: Some(rec.fingerprint.clone()),
            pid: if alive { rec.pid } else { None },
        }
    }

    /// A `Command` for `argv` as `user` with `env` (plus a default PATH), in its own process
    /// group.
    fn command(
        argv: &[String],
        env: &[(String, String)],
        user: Option<&str>,
    ) -> Result<Command, RuntimeError> {
        let program = argv.first().ok_or_else(|| {
            RuntimeError::Failed(
                "the process runtime needs a command: there is no image default to run".into(),
            )
        })?;
        let path_env = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(DEFAULT_PATH);
        if find_program(program, path_env).is_none() {
            return Err(RuntimeError::ImageMissing(format!(
                "program {program} is not on this host (PATH={path_env}); the process runtime runs host programs: install the Debian package that provides it (bash scripts/setup.sh)"
            )));
        }
        let mut cmd = Command::new(program);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", path_env)
            .envs(env.iter().filter(|(k, _)| k != "PATH").cloned())
            .current_dir("/")
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(user) = user {
            let (uid, gid) = parse_user(user)?;
            // std drops supplementary groups (setgroups(0)) when root changes uid.
            cmd.uid(uid).gid(gid);
        }
        Ok(cmd)
    }

    fn spawn(&self, rec: &mut Record) -> Result<(), RuntimeError> {
        fs::create_dir_all(&self.state_dir)
            .map_err(|e| self.io_err("creating", &self.state_dir, e))?;
        let log_path = self.log_path(&rec.spec.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| self.io_err("opening", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| self.io_err("opening", &log_path, e))?;
        let mut cmd = Self::command(&rec.spec.command, &rec.spec.env, rec.spec.user.as_deref())?;
        cmd.stdout(log).stderr(log2);
        let child = cmd.spawn().map_err(|e| {
            RuntimeError::Failed(format!(
                "starting {:?} for {}: {e}",
                rec.spec.command, rec.spec.name
            ))
        })?;
        let pid = child.id();
        rec.pid = Some(pid);
        rec.pid_start_ticks = proc_stat(pid).map(|(_, t)| t);
        rec.started_at_ms = Some(now_ms());
        rec.exit_code = None;
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.spec.name.clone(), child);
        self.save(rec)
    }

    /// Signals the record's process group and waits up to `timeout` for the leader to go;
    /// then SIGKILLs the group.
    async fn stop_record(&self, rec: &mut Record, timeout: Duration) -> Result<(), RuntimeError> {
        if !self.refresh(rec) {
            return Ok(());
        }
        let Some(pid) = rec.pid else { return Ok(()) };
        let sig = rec
            .spec
            .stop_signal()
            .map(parse_signal)
            .transpose()?
            .unwrap_or(Signal::SIGTERM);
        let _ = killpg(Pid::from_raw(pid as i32), sig);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if !self.refresh(rec) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(container = %rec.spec.name, pid, ?timeout, "did not stop in time; killing its process group");
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if !self.refresh(rec) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(RuntimeError::Timeout(format!(
            "process {pid} of {} survived SIGKILL for 5 s",
            rec.spec.name
        )))
    }

    /// Runs `argv` to the end with a timeout; kills its process group when it passes.
    async fn run_host(
        argv: &[String],
        env: &[(String, String)],
        user: Option<&str>,
        timeout: Duration,
        what: &str,
    ) -> Result<RunOutput, RuntimeError> {
        let mut cmd = tokio::process::Command::from(Self::command(argv, env, user)?);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Failed(format!("starting {argv:?} for {what}: {e}")))?;
        let pid = child.id();
        let out_task = tokio::spawn(read_tail(child.stdout.take()));
        let err_task = tokio::spawn(read_tail(child.stderr.take()));
        let waited = tokio::time::timeout(timeout, child.wait()).await;
        let status = match waited {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(RuntimeError::Failed(format!("waiting for {what}: {e}"))),
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                let _ = child.wait().await;
                let stderr = err_task.await.unwrap_or_default();
                return Err(RuntimeError::Timeout(format!(
                    "{what} did not finish within {timeout:?} and was killed; stderr: {}",
                    stderr
                        .lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .join(" | ")
                )));
            }
        };
        // Descendants that kept the pipes open would block the readers: kill the group.
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        Ok(RunOutput {
            exit_code: exit_code_of(status),
            stdout: out_task.await.unwrap_or_default(),
            stderr: err_task.await.unwrap_or_default(),
        })
    }
}

/// Reads a pipe to its end, keeping the tail.
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let mut tail = OutputTail::default();
    if let Some(mut p) = pipe {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = p.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.push(&buf[..n]);
        }
    }
    tail.into_string()
}

fn exit_code_of(status: std::process::ExitStatus) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => i64::from(c),
        (None, Some(s)) => 128 + i64::from(s),
        (None, None) => -1,
    }
}

/// (state, start time in clock ticks) from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: parse after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Fields 3.. are at index 0..; starttime is field 22.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn find_program(program: &str, path_env: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    path_env
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| is_exec(p))
}

/// "SIGKILL", "KILL", "kill" or "9".
fn parse_signal(s: &str) -> Result<Signal, RuntimeError> {
    let bad = || RuntimeError::Failed(format!("unknown signal {s:?}"));
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| bad())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[async_trait::async_trait]
impl ContainerRuntime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok(format!(
            "process runtime (host processes, state in {})",
            self.state_dir.display()
        ))
    }

    async fn image_present(&self, _image: &str) -> Result<bool, RuntimeError> {
        Ok(true)
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerStatus>, RuntimeError> {
        validate_name(name)?;
        let Some(mut rec) = self.load(name)? else {
            return Ok(None);
        };
        let alive = self.refresh(&mut rec);
        Ok(Some(self.status(&rec, alive)))
    }

    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<Reconciled, RuntimeError> {
        validate_name(&spec.name)?;
        let _guard = self.converge.lock().await;
        let want = spec.fingerprint();
        match self.load(&spec.name)? {
            None => {
                let mut rec = Record::fresh(spec, want);
                self.spawn(&mut rec)?;
                Ok(Reconciled::Created)
            }
            Some(mut rec) if rec.fingerprint != want => {
                // Check the new program before stopping the old one.
                Self::command(&spec.command, &spec.env, spec.user.as_deref())?;
                let timeout = Duration::from_secs(u64::from(rec.spec.stop_timeout_s));
                self.stop_record(&mut rec, timeout).await?;
                let mut rec = Record::fresh(spec, want);
                self.spawn(&mut rec)?;
                Ok(Reconciled::Recreated)
            }
            Some(mut rec) => {
                if self.refresh(&mut rec) {
                    Ok(Reconciled::AlreadyRunning)
                } else {
                    self.spawn(&mut rec)?;
                    Ok(Reconciled::Started)
                }
            }
        }
    }

    async fn stop(&self, name: &str, timeout: Duration) -> Result<bool, RuntimeError> {
        validate_name(name)?;
        let Some(mut rec) = self.load(name)? else {
            return Ok(false);
        };
        self.stop_record(&mut rec, timeout).await?;
        Ok(true)
    }

    async fn remove(&self, name: &str) -> Result<bool, RuntimeError> {
        validate_name(name)?;
        let _guard = self.converge.lock().await;
        let Some(mut rec) = self.load(name)? else {
            return Ok(false);
        };
        // Like `docker rm -f`: no grace period.
        if self.refresh(&mut rec) {
            if let Some(pid) = rec.pid {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            self.stop_record(&mut rec, Duration::ZERO).await?;
        }
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        for path in [self.record_path(name), self.log_path(name)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err("removing", &path, e)),
            }
        }
        Ok(true)
    }

    async fn run_to_completion(
        &self,
        spec: &ContainerSpec,
        timeout: Duration,
    ) -> Result<RunOutput, RuntimeError> {
        validate_name(&spec.name)?;
        Self::run_host(
            &spec.command,
            &spec.env,
            spec.user.as_deref(),
            timeout,
            &format!("one-shot {}", spec.name),
        )
        .await
    }

    async fn exec(
        &self,
        name: &str,
        argv: &[String],
        user: Option<&str>,
        timeout: Duration,
    ) -> Result<RunOutput, RuntimeError> {
        validate_name(name)?;
        let Some(mut rec) = self.load(name)? else {
            return Err(RuntimeError::NotFound(format!("no container {name}")));
        };
        if !self.refresh(&mut rec) {
            return Err(RuntimeError::Failed(format!(
                "container {name} is not running"
            )));
        }
        let user = user.or(rec.spec.user.as_deref());
        Self::run_host(
            argv,
            &rec.spec.env,
            user,
            timeout,
            &format!("exec in {name}"),
        )
        .await
    }

    async fn kill(&self, name: &str, signal: &str) -> Result<(), RuntimeError> {
        validate_name(name)?;
        let sig = parse_signal(signal)?;
        let Some(mut rec) = self.load(name)? else {
            return Err(RuntimeError::NotFound(format!("no container {name}")));
        };
        match (self.refresh(&mut rec), rec.pid) {
            (true, Some(pid)) => killpg(Pid::from_raw(pid as i32), sig).map_err(|e| {
                RuntimeError::Failed(format!("sending {signal} to {name} (pid {pid}): {e}"))
            }),
            _ => Err(RuntimeError::Failed(format!(
                "container {name} is not running"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse() {
        assert_eq!(parse_signal("SIGKILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("kill").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("INT").unwrap(), Signal::SIGINT);
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn own_stat_parses() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
    }

    #[test]
    fn programs_are_found() {
        assert!(find_program("sh", DEFAULT_PATH).is_some());
        assert!(find_program("/bin/sh", "").is_some());
        assert!(find_program("dbvm-no-such-program", DEFAULT_PATH).is_none());
    }
}
