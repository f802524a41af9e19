//! Upgrading agents in waves, as `dbvmctl upgrade` does, for any control plane: hash the
//! new agent binary, upload it to the broker's artifact store (unless it is there), then
//! send each agent a signed `agent.upgrade` naming it, a wave of agents at a time. The
//! first failure stops the rollout: the rest of its wave finishes, later waves are not
//! started.
//!
//! The agent downloads the artifact from the broker with its own client certificate,
//! checks the SHA-256, runs the new binary on trial, swaps and re-executes; the result
//! comes from the new agent once it reconnected, or a failure saying which version runs
//! (it rolled back).
//!
//! ```no_run
//! # async fn demo(client: &dbvmctl::Client, home: &dbvmctl::Home) -> Result<(), Box<dyn std::error::Error>> {
//! use dbvmctl::upgrade::{self, Plan};
//! let plan = Plan::new("target/dbvm-agent".into(), "0.1.1", vec![dbvm_protocol::AgentId::new("db1")?]);
//! let signer = home.signer()?;
//! let sender = dbvmctl::Sender::new(client, &signer, home.sealing_public_key()?);
//! let summary = upgrade::upgrade(client, &sender, &plan, |_| {}).await?;
//! assert!(summary.all_upgraded());
//! # Ok(()) }
//! ```

use crate::client::{Client, ClientError};
use crate::send::{Request, Sender};
use dbvm_protocol::api::{CommandState, CommandView};
use dbvm_protocol::AgentId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// The operation the agent runs.
pub const OPERATION: &str = "agent.upgrade";
/// How long the new agent may take to connect before the old one rolls back
/// (`deadline_s`): the agent's contract allows 10 to 600 seconds.
pub const DEADLINE_RANGE: std::ops::RangeInclusive<u32> = 10..=600;
pub const DEFAULT_DEADLINE_S: u32 = 60;
/// How long an agent gets beyond its deadline to download, try and answer.
pub const WAIT_MARGIN: Duration = Duration::from_secs(240);
/// Longest version accepted.
const MAX_VERSION_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("version {0:?} is not one an agent prints: give what the new binary's --version says, such as 0.1.1 (a digit first, then at most 63 of 0-9 a-z A-Z . + - _)")]
    BadVersion(String),
    #[error("wave size must be at least 1")]
    BadWaveSize,
    #[error("deadline of {0} s is out of range: give {min} to {max} seconds", min = DEADLINE_RANGE.start(), max = DEADLINE_RANGE.end())]
    BadDeadline(u32),
    #[error("{0:?} is not a SHA-256: give 64 lowercase hex digits")]
    BadSha256(String),
    #[error("name at least one agent to upgrade")]
    NoAgents,
    #[error("agent {0} is named twice")]
    DuplicateAgent(String),
    #[error("artifact URL {url:?} is not usable: {reason}")]
    BadArtifactUrl { url: String, reason: String },
    #[error("cannot read the new agent binary {}: {error}", .path.display())]
    Binary {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is empty: that is not an agent binary", .0.display())]
    EmptyBinary(PathBuf),
    #[error("{} hashes to {actual}, not to the expected {expected}: it is not the binary you meant; nothing was uploaded or sent", .path.display())]
    BinaryMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("uploading the new agent binary to the broker: {0}")]
    Upload(ClientError),
    #[error("the broker describes the upload as {got_sha256} ({got_size} bytes), not {sha256} ({size} bytes)")]
    UploadMismatch {
        sha256: String,
        size: u64,
        got_sha256: String,
        got_size: u64,
    },
}

impl UpgradeError {
    /// Whether the fault is on this side (arguments, the binary) rather than the broker's.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Upload(e) => e.is_local(),
            Self::UploadMismatch { .. } => false,
            _ => true,
        }
    }
}

/// Checks a SHA-256 as artifacts are named: 64 lowercase hex digits.
pub fn check_sha256(text: &str) -> Result<(), UpgradeError> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(UpgradeError::BadSha256(text.chars().take(80).collect()))
    }
}

/// Checks a version as an agent's `--version` prints it (`0.1.1`, `0.2.0-rc.1+abc`).
pub fn check_version(version: &str) -> Result<(), UpgradeError> {
    let ok = version.len() <= MAX_VERSION_LEN
        && version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(UpgradeError::BadVersion(version.chars().take(80).collect()))
    }
}

/// Checks an artifact URL given instead of the default: HTTPS, and (once the hash is
/// known) the broker's path of exactly this artifact (`.../v1/artifacts/<sha256>`), so
/// that a URL for another file or another route is caught here, not by each agent.
pub fn check_artifact_url(url: &str, sha256: Option<&str>) -> Result<(), UpgradeError> {
    let bad = |reason: String| UpgradeError::BadArtifactUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() != "https" {
        return Err(bad(
            "agents download over HTTPS only (with their client certificate)".into(),
        ));
    }
    if parsed.host().is_none() {
        return Err(bad("no host".into()));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a query or fragment does not belong in it".into()));
    }
    let Some(sha256) = sha256 else {
        return Ok(());
    };
    let want = format!("/v1/artifacts/{sha256}");
    if !parsed.path().ends_with(&want) {
        return Err(bad(format!(
            "its path must end with {want} (the broker's path of this binary)"
        )));
    }
    Ok(())
}

/// The arguments of one `agent.upgrade`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeArgs {
    pub url: String,
    pub sha256: String,
    pub version: String,
    pub deadline_s: u32,
}

impl UpgradeArgs {
    pub fn new(
        url: &str,
        sha256: &str,
        version: &str,
        deadline_s: u32,
    ) -> Result<Self, UpgradeError> {
        check_sha256(sha256)?;
        check_version(version)?;
        if !DEADLINE_RANGE.contains(&deadline_s) {
            return Err(UpgradeError::BadDeadline(deadline_s));
        }
        check_artifact_url(url, Some(sha256))?;
        Ok(Self {
            url: url.to_string(),
            sha256: sha256.to_string(),
            version: version.to_string(),
            deadline_s,
        })
    }

    /// The command's arguments, as the agent reads them.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut args = Map::new();
        args.insert("url".into(), json!(self.url));
        args.insert("sha256".into(), json!(self.sha256));
        args.insert("version".into(), json!(self.version));
        args.insert("deadline_s".into(), json!(self.deadline_s));
        args
    }

    /// How long to wait for one agent's result: its deadline plus [`WAIT_MARGIN`].
    pub fn wait_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.deadline_s)) + WAIT_MARGIN
    }
}

/// What to upgrade, and how.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The new agent binary.
    pub binary: PathBuf,
    /// What the new binary's `--version` prints.
    pub version: String,
    /// The SHA-256 the binary must have (a release's published hash), if known.
    pub expected_sha256: Option<String>,
    pub deadline_s: u32,
    /// Agents upgraded at once; the next wave starts when all of one succeeded.
    pub wave_size: usize,
    /// Where agents download from (default: this client's broker address +
    /// `/v1/artifacts/<sha256>`): give it when agents reach the broker by another name.
    pub artifact_url: Option<String>,
    pub agents: Vec<AgentId>,
}

impl Plan {
    /// `agents` to `version` from `binary`, one at a time, with the default deadline.
    pub fn new(binary: PathBuf, version: &str, agents: Vec<AgentId>) -> Self {
        Self {
            binary,
            version: version.to_string(),
            expected_sha256: None,
            deadline_s: DEFAULT_DEADLINE_S,
            wave_size: 1,
            artifact_url: None,
            agents,
        }
    }

    /// Everything that can be checked without reading the binary.
    pub fn validate(&self) -> Result<(), UpgradeError> {
        check_version(&self.version)?;
        if self.wave_size == 0 {
            return Err(UpgradeError::BadWaveSize);
        }
        if !DEADLINE_RANGE.contains(&self.deadline_s) {
            return Err(UpgradeError::BadDeadline(self.deadline_s));
        }
        if let Some(sha) = &self.expected_sha256 {
            check_sha256(sha)?;
        }
        if self.agents.is_empty() {
            return Err(UpgradeError::NoAgents);
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &self.agents {
            if !seen.insert(a.as_str()) {
                return Err(UpgradeError::DuplicateAgent(a.to_string()));
            }
        }
        if let Some(url) = &self.artifact_url {
            // Its path is checked against the hash once the binary is read.
            check_artifact_url(url, None)?;
        }
        Ok(())
    }
}

/// SHA-256 (lowercase hex) and size of a file, read in chunks on the blocking pool.
pub async fn hash_file(path: &Path) -> Result<(String, u64), UpgradeError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        use sha2::Digest;
        use std::io::Read;
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok((format!("{:x}", hasher.finalize()), size))
    })
    .await
    .map_err(|e| UpgradeError::Binary {
        path: path.to_path_buf(),
        error: e.into(),
    })?;
    hashed.map_err(|error| UpgradeError::Binary {
        path: path.to_path_buf(),
        error,
    })
}

/// The binary as the broker stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub sha256: String,
    pub size: u64,
    /// Whether this run uploaded it (`false`: the broker had it already).
    pub uploaded: bool,
    /// Where agents download it.
    pub url: String,
}

/// Hashes the plan's binary and checks it, then uploads it unless the broker has it.
/// Nothing is uploaded when a check fails.
pub async fn upload(client: &Client, plan: &Plan) -> Result<Artifact, UpgradeError> {
    plan.validate()?;
    let (sha256, size) = hash_file(&plan.binary).await?;
    if size == 0 {
        return Err(UpgradeError::EmptyBinary(plan.binary.clone()));
    }
    if let Some(expected) = &plan.expected_sha256 {
        if *expected != sha256 {
            return Err(UpgradeError::BinaryMismatch {
                path: plan.binary.clone(),
                expected: expected.clone(),
                actual: sha256,
            });
        }
    }
    let url = match &plan.artifact_url {
        Some(url) => {
            check_artifact_url(url, Some(&sha256))?;
            url.clone()
        }
        None => client.artifact_url(&sha256).to_string(),
    };
    let stored = client
        .artifacts()
        .await
        .map_err(UpgradeError::Upload)?
        .into_iter()
        .any(|a| a.sha256 == sha256 && a.size == size);
    if !stored {
        let (info, _) = client
            .upload_artifact(&plan.binary, &sha256)
            .await
            .map_err(UpgradeError::Upload)?;
        if info.sha256 != sha256 || info.size != size {
            return Err(UpgradeError::UploadMismatch {
                sha256,
                size,
                got_sha256: info.sha256,
                got_size: info.size,
            });
        }
    }
    Ok(Artifact {
        sha256,
        size,
        uploaded: !stored,
        url,
    })
}

/// One side of an upgrade, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub sha256: String,
}

/// The output of a successful `agent.upgrade`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeOutput {
    pub from: VersionInfo,
    pub to: VersionInfo,
    /// Absent when the agent already ran that binary (`unchanged`) or when a restart in
    /// the middle of the upgrade was settled by the new agent at its start.
    #[serde(default)]
    pub download_ms: Option<u64>,
    #[serde(default)]
    pub trial_ms: Option<u64>,
    pub total_ms: u64,
    /// The agent already ran this binary: nothing was done.
    #[serde(default)]
    pub unchanged: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Upgraded,
    Failed,
    /// An earlier wave failed, so this agent's was not started.
    NotAttempted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upgraded => "upgraded",
            Self::Failed => "failed",
            Self::NotAttempted => "not attempted",
        }
    }
}

/// What happened to one agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentResult {
    pub agent: String,
    pub outcome: Outcome,
    /// 1-based.
    pub wave: usize,
    pub command_id: Option<Uuid>,
    /// The agent's figures when it upgraded.
    pub upgrade: Option<UpgradeOutput>,
    /// Why it failed (the agent's message says which version runs now).
    pub error: Option<String>,
}

impl AgentResult {
    fn failed(agent: &AgentId, wave: usize, command_id: Option<Uuid>, error: String) -> Self {
        Self {
            agent: agent.to_string(),
            outcome: Outcome::Failed,
            wave,
            command_id,
            upgrade: None,
            error: Some(error),
        }
    }
}

/// The result of one agent's `agent.upgrade` command as the broker reports it (`view`,
/// the last state seen after waiting `waited`). Upgraded only when it succeeded and the
/// agent now runs exactly the version and binary asked for.
pub fn result_of(
    agent: &AgentId,
    wave: usize,
    args: &UpgradeArgs,
    view: &CommandView,
    waited: Duration,
) -> AgentResult {
    let id = Some(view.id);
    let failed = |error: String| AgentResult::failed(agent, wave, id, error);
    match view.state {
        CommandState::Succeeded => {
            let output = view.output.clone().unwrap_or(Value::Null);
            let upgrade: UpgradeOutput = match serde_json::from_value(output) {
                Ok(o) => o,
                Err(e) => {
                    return failed(format!(
                        "the agent succeeded but its answer does not describe an upgrade ({e}): is it a dbvm-agent with agent.upgrade?"
                    ))
                }
            };
            if upgrade.to.version != args.version || upgrade.to.sha256 != args.sha256 {
                return failed(format!(
                    "the agent reports it now runs {} ({}), not {} ({})",
                    upgrade.to.version, upgrade.to.sha256, args.version, args.sha256
                ));
            }
            AgentResult {
                agent: agent.to_string(),
                outcome: Outcome::Upgraded,
                wave,
                command_id: id,
                upgrade: Some(upgrade),
                error: None,
            }
        }
        state if state.is_terminal() => failed(match &view.error {
            Some(e) => format!("{}: {}: {}", state.as_str(), e.code, e.message),
            None => state.as_str().to_string(),
        }),
        state => failed(format!(
            "no result within {} s (command {} is {}; it goes on: see `dbvmctl status {}`)",
            waited.as_secs(),
            view.id,
            state.as_str(),
            view.id
        )),
    }
}

/// What [`upgrade`] and [`run_waves`] report as they go.
#[derive(Debug)]
pub enum WaveEvent<'a> {
    /// The binary is on the broker (uploaded now or before).
    Artifact(&'a Artifact),
    Started {
        wave: usize,
        of: usize,
        agents: &'a [AgentId],
    },
    Finished(&'a AgentResult),
}

/// Splits `agents` into waves of `wave_size` (the last may be smaller).
pub fn waves(agents: &[AgentId], wave_size: usize) -> Vec<&[AgentId]> {
    agents.chunks(wave_size.max(1)).collect()
}

/// Runs `upgrade_one(agent, wave)` for every agent of a wave at once and waits for all
/// of them; after a wave with a failure, the agents of later waves are reported as not
/// attempted. One result per agent, in the order given.
pub async fn run_waves<F, Fut>(
    agents: &[AgentId],
    wave_size: usize,
    mut on_event: impl FnMut(WaveEvent<'_>),
    upgrade_one: F,
) -> Vec<AgentResult>
where
    F: Fn(AgentId, usize) -> Fut,
    Fut: Future<Output = AgentResult>,
{
    let waves = waves(agents, wave_size);
    let of = waves.len();
    let mut results = Vec::with_capacity(agents.len());
    let mut stopped = false;
    for (i, wave) in waves.into_iter().enumerate() {
        let number = i + 1;
        if stopped {
            results.extend(wave.iter().map(|a| AgentResult {
                agent: a.to_string(),
                outcome: Outcome::NotAttempted,
                wave: number,
                command_id: None,
                upgrade: None,
                error: None,
            }));
            continue;
        }
        on_event(WaveEvent::Started {
            wave: number,
            of,
            agents: wave,
        });
        let done =
            futures::future::join_all(wave.iter().map(|a| upgrade_one(a.clone(), number))).await;
        for r in &done {
            on_event(WaveEvent::Finished(r));
        }
        stopped = done.iter().any(|r| r.outcome != Outcome::Upgraded);
        results.extend(done);
    }
    results
}

/// Signs, sends and waits for one agent's `agent.upgrade`; every failure (the broker's
/// too) becomes a failed result.
pub async fn upgrade_agent(
    client: &Client,
    sender: &Sender<'_>,
    args: &UpgradeArgs,
    agent: AgentId,
    wave: usize,
) -> AgentResult {
    let request = Request {
        args: args.to_json(),
        ..Request::new(agent.clone(), OPERATION)
    };
    let view = match sender.submit(request).await {
        Ok(v) => v,
        Err(e) => {
            return AgentResult::failed(&agent, wave, None, format!("not sent: {e}"));
        }
    };
    let id = view.id;
    let timeout = args.wait_timeout();
    match crate::send::wait(client, view, timeout, crate::client::MAX_POLL, |_| {}).await {
        Ok(done) => result_of(&agent, wave, args, &done, timeout),
        Err(e) => AgentResult::failed(
            &agent,
            wave,
            Some(id),
            format!("lost track of command {id}: {e}; see `dbvmctl status {id}`"),
        ),
    }
}

/// A whole upgrade: the artifact and each agent's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub version: String,
    pub artifact: Artifact,
    pub wave_size: usize,
    pub agents: Vec<AgentResult>,
}

impl Summary {
    pub fn all_upgraded(&self) -> bool {
        self.agents.iter().all(|a| a.outcome == Outcome::Upgraded)
    }

    /// The agents of waves that were not started.
    pub fn not_attempted(&self) -> Vec<&str> {
        self.agents
            .iter()
            .filter(|a| a.outcome == Outcome::NotAttempted)
            .map(|a| a.agent.as_str())
            .collect()
    }
}

/// [`upload`], then [`run_waves`] with [`upgrade_agent`]. An error means nothing was
/// sent to any agent; agents' failures are in the summary.
pub async fn upgrade(
    client: &Client,
    sender: &Sender<'_>,
    plan: &Plan,
    mut on_event: impl FnMut(WaveEvent<'_>),
) -> Result<Summary, UpgradeError> {
    let artifact = upload(client, plan).await?;
    on_event(WaveEvent::Artifact(&artifact));
    let args = UpgradeArgs::new(
        &artifact.url,
        &artifact.sha256,
        &plan.version,
        plan.deadline_s,
    )?;
    let agents = run_waves(&plan.agents, plan.wave_size, on_event, |agent, wave| {
        upgrade_agent(client, sender, &args, agent, wave)
    })
    .await;
    Ok(Summary {
        version: plan.version.clone(),
        artifact,
        wave_size: plan.wave_size,
        agents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::api::{CommandError, OperationClass};
    use std::sync::Mutex;

    fn ids(names: &[&str]) -> Vec<AgentId> {
        names.iter().map(|n| AgentId::new(*n).unwrap()).collect()
    }

    fn sha() -> String {
        "ab".repeat(32)
    }

    fn args() -> UpgradeArgs {
        UpgradeArgs::new(
            &format!("https://localhost:8443/v1/artifacts/{}", sha()),
            &sha(),
            "0.1.1",
            60,
        )
        .unwrap()
    }

    fn ok(agent: &AgentId, wave: usize) -> AgentResult {
        AgentResult {
            agent: agent.to_string(),
            outcome: Outcome::Upgraded,
            wave,
            command_id: None,
            upgrade: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn waves_run_in_order_and_the_first_failure_stops_later_waves() {
        let agents = ids(&["db1", "db2", "db3", "db4", "db5"]);
        let started = Mutex::new(Vec::new());
        let mut events = Vec::new();
        let results = run_waves(
            &agents,
            2,
            |e| {
                events.push(match e {
                    WaveEvent::Started { wave, of, agents } => {
                        format!("wave {wave}/{of}: {}", agents.len())
                    }
                    WaveEvent::Finished(r) => format!("{} {}", r.agent, r.outcome.as_str()),
                    WaveEvent::Artifact(a) => a.sha256.clone(),
                })
            },
            |agent, wave| {
                started.lock().unwrap().push(agent.to_string());
                async move {
                    if agent.as_str() == "db3" {
                        AgentResult::failed(&agent, wave, None, "rolled back; running 0.1.0".into())
                    } else {
                        ok(&agent, wave)
                    }
                }
            },
        )
        .await;
        // The failing wave finishes whole (db4 too); wave 3 is never started.
        assert_eq!(*started.lock().unwrap(), ["db1", "db2", "db3", "db4"]);
        let outcomes: Vec<(&str, Outcome, usize)> = results
            .iter()
            .map(|r| (r.agent.as_str(), r.outcome, r.wave))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("db1", Outcome::Upgraded, 1),
                ("db2", Outcome::Upgraded, 1),
                ("db3", Outcome::Failed, 2),
                ("db4", Outcome::Upgraded, 2),
                ("db5", Outcome::NotAttempted, 3),
            ]
        );
        assert_eq!(
            events,
            [
                "wave 1/3: 2",
                "db1 upgraded",
                "db2 upgraded",
                "wave 2/3: 2",
                "db3 failed",
                "db4 upgraded",
            ]
        );

        // All good: every agent, one at a time with the default wave size.
        let results = run_waves(&agents, 1, |_| {}, |a, w| async move { ok(&a, w) }).await;
        assert!(results.iter().all(|r| r.outcome == Outcome::Upgraded));
        assert_eq!(results.last().map(|r| r.wave), Some(5));
        // A wave larger than the fleet is one wave.
        assert_eq!(waves(&agents, 10).len(), 1);
        // The first agent failing stops everything after it.
        let results = run_waves(
            &agents,
            1,
            |_| {},
            |a, w| async move { AgentResult::failed(&a, w, None, "no".into()) },
        )
        .await;
        assert_eq!(results[0].outcome, Outcome::Failed);
        assert!(results[1..]
            .iter()
            .all(|r| r.outcome == Outcome::NotAttempted));
    }

    fn view(
        state: CommandState,
        output: Option<Value>,
        error: Option<(&str, &str)>,
    ) -> CommandView {
        CommandView {
            id: Uuid::nil(),
            agent_id: "db1".into(),
            operation: OPERATION.into(),
            class: OperationClass::Management,
            state,
            submitted_at_ms: 0,
            not_after_ms: 1,
            delivered_at_ms: None,
            finished_at_ms: None,
            progress: None,
            output,
            error: error.map(|(code, message)| CommandError {
                code: code.into(),
                message: message.into(),
            }),
        }
    }

    #[test]
    fn results_are_upgraded_only_when_the_agent_runs_what_was_asked() {
        let agent = AgentId::new("db1").unwrap();
        let a = args();
        let output = |version: &str, sha: &str| {
            json!({
                "from": {"version": "0.1.0", "sha256": "cd".repeat(32)},
                "to": {"version": version, "sha256": sha},
                "download_ms": 120, "trial_ms": 300, "total_ms": 2400,
            })
        };
        let wait = Duration::from_secs(300);
        let r = result_of(
            &agent,
            1,
            &a,
            &view(CommandState::Succeeded, Some(output("0.1.1", &sha())), None),
            wait,
        );
        assert_eq!(r.outcome, Outcome::Upgraded, "{r:?}");
        let u = r.upgrade.unwrap();
        assert_eq!((u.from.version.as_str(), u.total_ms), ("0.1.0", 2400));
        assert_eq!(
            (u.download_ms, u.trial_ms, u.unchanged),
            (Some(120), Some(300), false)
        );

        let r = result_of(
            &agent,
            1,
            &a,
            &view(CommandState::Succeeded, Some(output("0.1.0", &sha())), None),
            wait,
        );
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.error.unwrap().contains("now runs 0.1.0"));
        let r = result_of(
            &agent,
            1,
            &a,
            &view(CommandState::Succeeded, Some(json!({"pong": true})), None),
            wait,
        );
        assert_eq!(r.outcome, Outcome::Failed);

        let r = result_of(
            &agent,
            1,
            &a,
            &view(
                CommandState::Failed,
                None,
                Some((
                    "failed",
                    "rolled back: new agent did not connect; running 0.1.0",
                )),
            ),
            wait,
        );
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.error.unwrap().contains("running 0.1.0"));
        let r = result_of(
            &agent,
            1,
            &a,
            &view(CommandState::Running, None, None),
            wait,
        );
        let e = r.error.unwrap();
        assert!(
            e.contains("no result within 300 s") && e.contains("dbvmctl status"),
            "{e}"
        );
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_is_read_or_sent() {
        let agents = ids(&["db1", "db2"]);
        let plan = Plan::new("/nonexistent/agent".into(), "0.1.1", agents.clone());
        plan.validate().unwrap();
        let refused = |change: &dyn Fn(&mut Plan)| {
            let mut p = plan.clone();
            change(&mut p);
            p.validate().unwrap_err()
        };
        for bad in ["", "v0.1.1", "0.1 .1", "0.1.1;rm", &"1".repeat(65)] {
            let e = refused(&|p| p.version = bad.to_string());
            assert!(matches!(e, UpgradeError::BadVersion(_)), "{bad:?}: {e}");
        }
        assert!(matches!(
            refused(&|p| p.wave_size = 0),
            UpgradeError::BadWaveSize
        ));
        for d in [0, 9, 601] {
            assert!(matches!(
                refused(&|p| p.deadline_s = d),
                UpgradeError::BadDeadline(_)
            ));
        }
        for bad in [sha().to_uppercase(), sha()[1..].to_string(), "xyz".into()] {
            let e = refused(&|p| p.expected_sha256 = Some(bad.clone()));
            assert!(matches!(e, UpgradeError::BadSha256(_)), "{e}");
        }
        assert!(matches!(
            refused(&|p| p.agents.clear()),
            UpgradeError::NoAgents
        ));
        assert!(matches!(
            refused(&|p| p.agents.push(agents[0].clone())),
            UpgradeError::DuplicateAgent(_)
        ));
        for bad in [
            "http://broker/v1/artifacts/x",
            "broker:8443",
            "https://b/x?y=1",
        ] {
            let e = refused(&|p| p.artifact_url = Some(bad.into()));
            assert!(
                matches!(e, UpgradeError::BadArtifactUrl { .. }),
                "{bad}: {e}"
            );
        }
        // The path is checked against the hash once it is known.
        let mut p = plan.clone();
        p.artifact_url = Some("https://broker.internal:8443/v1/artifacts/abc".into());
        p.validate().unwrap();
        let e = check_artifact_url("https://b:1/v1/artifacts/abc", Some(&sha())).unwrap_err();
        assert!(e.to_string().contains(&sha()), "{e}");
        check_artifact_url(&format!("https://b:1/v1/artifacts/{}", sha()), Some(&sha())).unwrap();

        assert!(UpgradeArgs::new("https://b/v1/artifacts/x", "x", "0.1.1", 60).is_err());
        assert_eq!(
            Value::Object(args().to_json()),
            json!({
                "url": format!("https://localhost:8443/v1/artifacts/{}", sha()),
                "sha256": sha(),
                "version": "0.1.1",
                "deadline_s": 60,
            })
        );
        assert_eq!(args().wait_timeout(), Duration::from_secs(300));
    }

    #[tokio::test]
    async fn the_binary_is_checked_before_the_broker_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("dbvm-agent");
        std::fs::write(&binary, b"binary").unwrap();
        assert_eq!(
            hash_file(&binary).await.unwrap(),
            (
                "9a3a45d01531a20e89ac6ae10b0b0beb0492acd7216a368aa062d1a5fecaf9cd".into(),
                6
            )
        );
        // A client for a broker that does not exist: any request would fail with a
        // connection error, so a local error proves nothing was sent.
        let ca = dbvm_protocol::pki::FleetCa::generate("t", Duration::from_secs(600)).unwrap();
        let tls = dbvm_protocol::tls::client_config(ca.cert_pem(), None).unwrap();
        let client = Client::new("https://127.0.0.1:9", tls).unwrap();
        let mut plan = Plan::new(binary.clone(), "0.1.1", ids(&["db1"]));
        plan.expected_sha256 = Some(sha());
        let e = upload(&client, &plan).await.unwrap_err();
        assert!(matches!(e, UpgradeError::BinaryMismatch { .. }), "{e}");
        assert!(e.is_local());
        std::fs::write(&binary, b"").unwrap();
        plan.expected_sha256 = None;
        let e = upload(&client, &plan).await.unwrap_err();
        assert!(matches!(e, UpgradeError::EmptyBinary(_)), "{e}");
        plan.binary = dir.path().join("missing");
        let e = upload(&client, &plan).await.unwrap_err();
        assert!(matches!(e, UpgradeError::Binary { .. }), "{e}");
        std::fs::write(&binary, b"binary").unwrap();
        plan.binary = binary;
        plan.artifact_url = Some("https://b:1/v1/artifacts/abc".into());
        let e = upload(&client, &plan).await.unwrap_err();
        assert!(matches!(e, UpgradeError::BadArtifactUrl { .. }), "{e}");
        // And with everything right, the broker is asked (and is not there).
        plan.artifact_url = None;
        let e = upload(&client, &plan).await.unwrap_err();
        assert!(matches!(e, UpgradeError::Upload(_)), "{e}");
        assert!(!e.is_local());
    }
}
