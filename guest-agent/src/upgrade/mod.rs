//! `agent.upgrade`: the agent replaces its own binary with one the control plane signed
//! for, and comes back by itself when the new one does not prove itself.
//!
//! The command names the new binary's URL (the broker's artifact store), its SHA-256 and
//! its version, all covered by the command's signature. The old agent:
//! 1. downloads it beside its own executable (`<exe>.new`) over HTTPS with its agent
//!    certificate, trusting only the fleet CA, and checks the SHA-256 and that the binary
//!    runs and says that version (`--version`); any failure removes it: nothing changed;
//! 2. records the upgrade (`state_dir/upgrade/state.json`, phase `trial`), holds its own
//!    link down and runs the new binary on trial (`--upgrade-trial`): it must read the
//!    config, the state directory and the journal, connect to the broker with the
//!    agent's identity and have a heartbeat answered within `deadline_s`; if it does not,
//!    it is stopped and removed and the old agent reconnects: the result says why and
//!    that the old version runs;
//! 3. records phase `swapped`, renames the new binary over `<exe>` (atomic), journals the result (the executor does,
//!    when the operation returns), drains like on SIGTERM and `main` re-executes `<exe>`
//!    in the same process (under systemd the unit's main process stays the same).
//!
//! A restart anywhere in between is settled at the next start ([`settle_at_start`]): the
//! running binary's SHA-256 says whether the swap happened, the command gets the result
//! that says which version runs, and leftovers are removed. The journal and the state
//! files are only read by the trial run, never written, so a rollback finds them as the
//! old agent left them.

mod download;

use crate::capability::Capability;
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use crate::journal::Journal;
use crate::lifecycle::Lifecycle;
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use dbvm_protocol::messages::{CommandResult, Outcome};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The flag that runs a binary on trial (see the module documentation).
pub const TRIAL_FLAG: &str = "--upgrade-trial";
/// Bounds of `deadline_s`, the time the new binary has to connect.
const DEADLINE_S: std::ops::RangeInclusive<u64> = 10..=600;
const DEFAULT_DEADLINE_S: u64 = 60;
/// How long `<new> --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old agent waits for its own session to close before the trial.
const HOLD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    url: String,
    sha256: String,
    version: String,
    #[serde(default = "default_deadline")]
    deadline_s: u64,
}

fn default_deadline() -> u64 {
    DEFAULT_DEADLINE_S
}

impl Args {
    fn check(&self) -> Result<hyper::Uri, String> {
        let url: hyper::Uri = self
            .url
            .parse()
            .map_err(|e| format!("url {:?}: {e}", self.url))?;
        if url.scheme_str() != Some("https") || url.host().is_none_or(str::is_empty) {
            return Err(format!(
                "url {:?}: must be https://host[:port]/... (the broker's /v1/artifacts/<sha256>)",
                self.url
            ));
        }
        if url.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(
                "url: must not carry credentials (the agent's certificate is its credential)"
                    .into(),
            );
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "sha256 {:?}: must be 64 lowercase hexadecimal digits",
                self.sha256
            ));
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || !self
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-+_".contains(&b))
        {
            return Err(format!(
                "version {:?}: 1 to 64 letters, digits and . - + _",
                self.version
            ));
        }
        if !DEADLINE_S.contains(&self.deadline_s) {
            return Err(format!(
                "deadline_s {}: must be between {} and {}",
                self.deadline_s,
                DEADLINE_S.start(),
                DEADLINE_S.end()
            ));
        }
        Ok(url)
    }
}

/// A version of the agent binary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub version: String,
    pub sha256: String,
}

/// Where an upgrade stands on disk (`state_dir/upgrade/state.json`).
#[derive(Debug, Serialize, Deserialize)]
struct UpgradeState {
    command_id: Uuid,
    exe: PathBuf,
    from: Build,
    to: Build,
    /// `trial` (the old binary is in place) or `swapped` (the rename may have happened).
    phase: String,
    started_at_ms: i64,
}

fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade").join("state.json")
}

fn write_state(state_dir: &Path, s: &UpgradeState) -> Result<(), String> {
    let path = state_path(state_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let bytes = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
    dbvm_host::fs::write_atomic(&path, &bytes, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn remove_state(state_dir: &Path) {
    let path = state_path(state_dir);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the upgrade state");
        }
    }
}

/// The SHA-256 of a file, in lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running executable, as a path a rename can replace.
fn own_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot tell where the agent's executable is: {e}"))?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(format!(
            "the agent's executable {} was removed or replaced while it runs; restart the agent first",
            exe.display()
        ));
    }
    Ok(exe)
}

fn sibling(exe: &Path, suffix: &str) -> PathBuf {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    exe.with_file_name(name)
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a file the upgrade left");
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// Settles an upgrade the agent was restarted in the middle of (called once at start,
/// before the journal marks unfinished commands interrupted): the running binary's
/// SHA-256 says whether the swap happened; the upgrade command gets the result that says
/// which version runs (unless it has one), and the staged binary and the state file are
/// removed. Never fails the start: what it cannot do, it logs.
pub fn settle_at_start(state_dir: &Path, journal: &mut Journal) {
    let path = state_path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the upgrade state");
            return;
        }
    };
    let state: UpgradeState = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "the upgrade state is damaged; removing it");
            remove_state(state_dir);
            return;
        }
    };
    let own = own_exe()
        .ok()
        .and_then(|exe| sha256_file(&exe).ok())
        .unwrap_or_default();
    let now = dbvm_protocol::now_ms();
    let outcome = if own == state.to.sha256 {
        tracing::info!(from = %state.from.version, to = %state.to.version, "upgrade completed: the new agent runs");
        Outcome::Succeeded {
            output_json: serde_json::json!({
                "from": state.from,
                "to": state.to,
                "settled_at_start": true,
                "total_ms": (now - state.started_at_ms).max(0),
            })
            .to_string(),
        }
    } else {
        tracing::warn!(from = %state.from.version, to = %state.to.version, phase = %state.phase, "the agent restarted in the middle of an upgrade; the old version runs");
        Outcome::Failed {
            message: format!(
                "the agent was restarted while upgrading to {} ({}); the swap did not happen: running {} ({}). Send the upgrade again",
                state.to.version, state.phase, state.from.version, state.from.sha256
            ),
        }
    };
    let result = CommandResult {
        id: state.command_id,
        outcome,
        started_at_ms: state.started_at_ms,
        finished_at_ms: now,
    };
    if let Err(e) = journal.finish(&result) {
        tracing::error!(error = %e, "cannot journal the upgrade's result");
    }
    remove_quietly(&sibling(&state.exe, ".new"));
    remove_state(state_dir);
}

/// The upgrade capability: `agent.upgrade`.
pub struct Upgrade {
    state_dir: PathBuf,
    ca_cert: PathBuf,
    lifecycle: Lifecycle,
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl Upgrade {
    pub fn new(state_dir: PathBuf, ca_cert: PathBuf, lifecycle: Lifecycle) -> Self {
        Self {
            state_dir,
            ca_cert,
            lifecycle,
            busy: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

impl Capability for Upgrade {
    fn name(&self) -> &'static str {
        "upgrade"
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        vec![Arc::new(UpgradeOp {
            state_dir: self.state_dir.clone(),
            ca_cert: self.ca_cert.clone(),
            lifecycle: self.lifecycle.clone(),
            busy: self.busy.clone(),
        })]
    }
}

struct UpgradeOp {
    state_dir: PathBuf,
    ca_cert: PathBuf,
    lifecycle: Lifecycle,
    busy: Arc<tokio::sync::Mutex<()>>,
}

fn failed(m: impl Into<String>) -> OpError {
    OpError::Failed(m.into())
}

#[async_trait]
impl Operation for UpgradeOp {
    fn name(&self) -> &'static str {
        "agent.upgrade"
    }

    fn class(&self) -> OperationClass {
        OperationClass::Management
    }

    async fn run(
        &self,
        ctx: OpContext,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, OpError> {
        let args: Args = parse_args(args)?;
        let url = args.check().map_err(OpError::BadArguments)?;
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(failed("another agent.upgrade is running on this agent"));
        };
        let started = Instant::now();
        let started_ms = dbvm_protocol::now_ms();
        let exe = own_exe().map_err(failed)?;
        let from = {
            let exe = exe.clone();
            let sha = tokio::task::spawn_blocking(move || sha256_file(&exe))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| failed(format!("cannot read the agent's own executable: {e}")))?;
            Build {
                version: dbvm_host::VERSION.to_string(),
                sha256: sha,
            }
        };
        let to = Build {
            version: args.version.clone(),
            sha256: args.sha256.clone(),
        };
        if from.sha256 == to.sha256 {
            return Ok(serde_json::json!({
                "from": from, "to": to, "unchanged": true,
                "total_ms": started.elapsed().as_millis() as u64,
            }));
        }
        let staged = sibling(&exe, ".new");

        // 1. Download and check; nothing changes unless all of it holds.
        ctx.progress(1, format!("downloading {} ({})", to.version, args.url));
        let download_started = Instant::now();
        let ca_pem = std::fs::read_to_string(&self.ca_cert).map_err(|e| {
            failed(format!(
                "cannot read the fleet CA {}: {e}",
                self.ca_cert.display()
            ))
        })?;
        let identity = crate::identity::StateDir::open(&self.state_dir)
            .and_then(|s| s.identity())
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed("the agent has no certificate to download with"))?;
        let fetched = download::fetch(&url, &ca_pem, &identity, &staged, &ctx).await;
        let got = match fetched {
            Ok(sha) => sha,
            Err(e) => {
                remove_quietly(&staged);
                return Err(failed(format!(
                    "{e}; nothing changed, running {}",
                    from.version
                )));
            }
        };
        if got != to.sha256 {
            remove_quietly(&staged);
            return Err(failed(format!(
                "the downloaded binary's sha256 is {got}, the command says {}; nothing changed, running {}",
                to.sha256, from.version
            )));
        }
        let download_ms = download_started.elapsed().as_millis() as u64;
        if let Err(e) = check_version(&staged, &to.version).await {
            remove_quietly(&staged);
            return Err(failed(format!(
                "{e}; nothing changed, running {}",
                from.version
            )));
        }

        // 2. On trial, with the old agent's link held down.
        let mut state = UpgradeState {
            command_id: ctx.command.id,
            exe: exe.clone(),
            from: from.clone(),
            to: to.clone(),
            phase: "trial".into(),
            started_at_ms: started_ms,
        };
        if let Err(e) = write_state(&self.state_dir, &state) {
            remove_quietly(&staged);
            return Err(failed(format!(
                "{e}; nothing changed, running {}",
                from.version
            )));
        }
        let rollback = |why: String| {
            remove_quietly(&staged);
            remove_state(&self.state_dir);
            failed(format!(
                "rolled back: {why}; running {} ({}) again",
                from.version, from.sha256
            ))
        };
        ctx.progress(
            60,
            format!(
                "{} on trial: it must connect within {} s",
                to.version, args.deadline_s
            ),
        );
        let hold = match self.lifecycle.hold_link(HOLD_TIMEOUT).await {
            Ok(h) => h,
            Err(e) => return Err(rollback(e)),
        };
        let trial_started = Instant::now();
        let trial = run_trial(&staged, Duration::from_secs(args.deadline_s)).await;
        let trial_ms = trial_started.elapsed().as_millis() as u64;
        let report = match trial {
            Ok(r) => r,
            Err(why) => {
                drop(hold);
                tracing::warn!(to = %to.version, %why, "the new agent failed its trial; the old one goes on");
                return Err(rollback(format!("the new agent ({}) {why}", to.version)));
            }
        };

        // 3. The swap: rename the new binary over the old one, restart into it.
        state.phase = "swapped".into();
        if let Err(e) = write_state(&self.state_dir, &state) {
            drop(hold);
            return Err(rollback(e));
        }
        if let Err(e) = std::fs::rename(&staged, &exe) {
            drop(hold);
            return Err(rollback(format!("cannot put the new binary in place: {e}")));
        }
        if let Some(dir) = exe.parent() {
            if let Err(e) = fsync_dir(dir) {
                tracing::warn!(error = %e, "the swap may not survive a power loss");
            }
        }
        tracing::info!(from = %from.version, to = %to.version, "upgrade swapped in; restarting into the new agent");
        dbvm_host::notify::status(&format!("restarting into {} (upgrade)", to.version));
        hold.keep();
        self.lifecycle.restart_into(exe);
        Ok(serde_json::json!({
            "from": from,
            "to": to,
            "download_ms": download_ms,
            "trial_ms": trial_ms,
            "trial": report,
            "total_ms": started.elapsed().as_millis() as u64,
        }))
    }
}

/// Runs `<bin> --version` and checks it names `version`.
async fn check_version(bin: &Path, version: &str) -> Result<(), String> {
    let out = tokio::time::timeout(
        VERSION_TIMEOUT,
        tokio::process::Command::new(bin)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        format!(
            "the new binary did not answer --version within {} s",
            VERSION_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("the new binary does not run: {e}"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    let said = said.trim();
    if !out.status.success() {
        return Err(format!(
            "the new binary does not run: --version exited with {}: {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    match said.strip_prefix("dbvm-agent ") {
        Some(v) if v == version => Ok(()),
        Some(v) => Err(format!(
            "the new binary is version {v}, the command says {version}"
        )),
        None => Err(format!(
            "the new binary is not a dbvm-agent (--version said {said:?})"
        )),
    }
}

/// The last line or so of a process's output, for an error message.
fn tail(text: &str) -> String {
    let t = text.trim();
    let lines: Vec<&str> = t.lines().rev().take(3).collect();
    let s: String = lines.into_iter().rev().collect::<Vec<_>>().join(" | ");
    let chars: Vec<char> = s.chars().filter(|c| !c.is_control()).collect();
    let s: String = chars[chars.len().saturating_sub(600)..].iter().collect();
    if chars.len() > 600 {
        format!("…{s}")
    } else if s.is_empty() {
        "(no output)".into()
    } else {
        s
    }
}

/// Runs the staged binary on trial (same arguments and environment as this agent, plus
/// [`TRIAL_FLAG`]) and waits up to `deadline` for it to report a connection.
async fn run_trial(bin: &Path, deadline: Duration) -> Result<serde_json::Value, String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(std::env::args_os().skip(1))
        .arg(TRIAL_FLAG)
        .arg(deadline.as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("did not start: {e}"))?;
    match tokio::time::timeout(deadline, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "did not connect to the broker within the deadline of {} s",
            deadline.as_secs()
        )),
        Ok(Err(e)) => Err(format!("could not be waited for: {e}")),
        Ok(Ok(out)) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str(text.trim())
                .map_err(|e| format!("exited 0 without a trial report ({e}): {}", tail(&text)))
        }
        Ok(Ok(out)) => Err(format!(
            "failed its trial ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr))
        )),
    }
}

/// The trial run itself (`dbvm-agent --upgrade-trial <deadline_s>`): reads the config,
/// the state directory and the journal (read-only), then connects as the agent until
/// `deadline`; prints its report as one JSON line on stdout. Writes nothing.
pub async fn trial_main(v: crate::config::Validated, deadline: Duration) -> Result<String, String> {
    let state = crate::identity::StateDir::open(&v.config.state_dir).map_err(|e| e.to_string())?;
    let readable = Journal::check_readable(&state.journal_path())
        .map_err(|e| format!("the journal is not readable by this version: {e}"))?;
    let public = state.sealing_key_public().map_err(|e| e.to_string())?;
    let endpoint = crate::link::Endpoint {
        agent_id: v.agent_id.clone(),
        server_name: v.server_name.clone(),
        broker_address: v.config.broker.address.clone(),
        ca_pem: v.ca_pem.clone(),
        token_file: None,
        backoff: (Duration::from_millis(200), Duration::from_secs(2)),
    };
    let until = Instant::now() + deadline;
    let mut delay = Duration::from_millis(200);
    loop {
        match crate::link::trial(&endpoint, &state, public).await {
            Ok(report) => {
                let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
                v["journal_entries"] = readable.into();
                v["version"] = dbvm_host::VERSION.into();
                return Ok(v.to_string());
            }
            Err(e)
                if Instant::now() + delay < until
                    && !matches!(e, crate::link::LinkError::Refused { .. }) =>
            {
                eprintln!("dbvm-agent: upgrade trial: {e}; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, sha: &str, version: &str, deadline_s: u64) -> Args {
        Args {
            url: url.into(),
            sha256: sha.into(),
            version: version.into(),
            deadline_s,
        }
    }

    #[test]
    fn arguments_are_checked_before_anything_is_fetched() {
        let sha = "ab".repeat(32);
        let good = args("https://broker:8443/v1/artifacts/x", &sha, "0.1.1", 60);
        assert!(good.check().is_ok());
        for (bad, says) in [
            (args("http://broker/x", &sha, "1", 60), "https"),
            (args("https:///x", &sha, "1", 60), "https"),
            (args("https://u:p@broker/x", &sha, "1", 60), "credentials"),
            (
                args("https://broker/x", &"AB".repeat(32), "1", 60),
                "sha256",
            ),
            (args("https://broker/x", "abc", "1", 60), "sha256"),
            (args("https://broker/x", &sha, "", 60), "version"),
            (args("https://broker/x", &sha, "1;rm", 60), "version"),
            (args("https://broker/x", &sha, "1", 9), "deadline_s"),
            (args("https://broker/x", &sha, "1", 601), "deadline_s"),
        ] {
            let e = bad.check().unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn error_tails_are_short_and_printable() {
        assert_eq!(tail(""), "(no output)");
        assert_eq!(tail("a\nb\nc\nd\n"), "b | c | d");
        assert_eq!(tail("x\u{1b}[31my"), "x[31my");
        assert!(tail(&"z".repeat(2000)).chars().count() <= 601);
        // Cut by characters, never inside one.
        assert_eq!(tail(&"é".repeat(700)).chars().count(), 601);
    }
}
