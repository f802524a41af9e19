//! Signed agent upgrades against the real broker and agent processes: the new binary
//! (the static release build of the agent, a different build than the debug agent that
//! runs) is stored in the broker's artifact store, a signed `agent.upgrade` names it, and
//! the agent swaps it in and re-executes itself in the same process. What must not swap
//! in does not, and the old agent comes back by itself with a result that says why: a
//! wrong SHA-256, a binary that does not run, one that runs but fails its trial, one that
//! never connects. An agent killed on trial, and one killed between the swap and its
//! re-execution, each end on a working agent, and the result says which version runs.
//!
//! The agents run from a copy of the agent binary in the test's directory (an upgrade
//! replaces its executable). The broken binaries are shell scripts: real executables that
//! say they are a dbvm-agent and then fail the way a broken build would.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::{eventually, AgentProc, BrokerProc, Fleet};
use dbvm_protocol::api::CommandState;
use dbvm_protocol::pki::Identity;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn file_sha(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap())
}

/// The static release agent (what `scripts/build-rpms.sh` packages), built if needed:
/// the "new version" the debug agent upgrades to.
fn release_agent() -> PathBuf {
    let status = dbvm_e2e::proc::cargo_command()
        .args([
            "build",
            "--quiet",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "dbvm-agent",
            // With the broker, as scripts/build-rpms.sh builds them (.ci/run builds them
            // first): the same features, so nothing is built again.
            "-p",
            "dbvm-broker",
            "--manifest-path",
        ])
        .arg(dbvm_e2e::proc::workspace_manifest())
        .status()
        .expect("cargo");
    assert!(status.success(), "building the static release agent failed");
    let path = dbvm_e2e::proc::bin_dir()
        .parent()
        .unwrap()
        .join("x86_64-unknown-linux-musl/release/dbvm-agent");
    assert!(path.exists(), "{}", path.display());
    path
}

/// What `<binary> --version` prints, without the program name.
fn version_of(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("dbvm-agent ")
        .unwrap()
        .to_string()
}

/// A shell script that says it is dbvm-agent `version` and then runs `body`.
fn script(dir: &Path, name: &str, version: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --version ] && {{ echo 'dbvm-agent {version}'; exit 0; }}; done\n{body}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Stores `bytes` in the broker's artifact store; returns the URL an agent fetches.
async fn upload(fleet: &Fleet, broker: &BrokerProc, bytes: Vec<u8>) -> (String, String) {
    let sha = sha256(&bytes);
    let cp = fleet.client_cert(Identity::ControlPlane("upgrade-test".into()));
    let tls = dbvm_protocol::tls::client_config(
        fleet.ca.cert_pem(),
        Some((cp.cert_pem.as_str(), cp.key_pem.as_str())),
    )
    .unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let url = format!("{}/v1/artifacts/{sha}", broker.api_url());
    let resp = http.put(&url).body(bytes).send().await.unwrap();
    assert!(
        resp.status().is_success(),
        "upload: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    (url, sha)
}

/// Enrolls agent `id` and starts it from its own copy of the agent binary (an upgrade
/// replaces it); `drain_s` sets its drain deadline. Returns it and its executable.
async fn start_copy(
    fleet: &Fleet,
    broker: &BrokerProc,
    client: &dbvmctl::Client,
    id: &str,
    drain_s: u64,
) -> (AgentProc, PathBuf) {
    let bin = fleet.path(&format!("bin-{id}"));
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("dbvm-agent");
    std::fs::copy(dbvm_e2e::proc::bin_dir().join("dbvm-agent"), &exe).unwrap();
    let token = client.enrollment_token(id, None).await.unwrap().token;
    let state_dir = fleet.path(&format!("agent-{id}"));
    let token_file = fleet.path(&format!("agent-{id}.token"));
    std::fs::write(&token_file, token).unwrap();
    let config = fleet
        .agent_config(
            id,
            broker.agent_addr.port(),
            &state_dir,
            &token_file,
            "[health]\nmetrics_listen = \"\"\nshadow_file = \"/nonexistent/shadow\"\n",
        )
        .replace(
            "[link]\n",
            &format!("[link]\ndrain_timeout_s = {drain_s}\n"),
        );
    let config_path = fleet.path(&format!("agent-{id}.toml"));
    std::fs::write(&config_path, config).unwrap();
    let agent = fleet.run_agent_exe(&exe, id, config_path, state_dir, &[]);
    dbvm_e2e::connected(client, id).await;
    (agent, exe)
}

struct Rig {
    fleet: Fleet,
    broker: BrokerProc,
    client: dbvmctl::Client,
    agent: AgentProc,
    /// The executable the agent runs from (a copy an upgrade replaces).
    exe: PathBuf,
}

impl Rig {
    /// A broker and agent db1, enrolled, running from a copy of the agent binary;
    /// `drain_s` sets its drain deadline.
    async fn new(drain_s: u64) -> Self {
        let fleet = Fleet::new();
        let broker = fleet.start_broker("");
        let client = fleet.client(&broker);
        let (agent, exe) = start_copy(&fleet, &broker, &client, "db1", drain_s).await;
        Self {
            fleet,
            broker,
            client,
            agent,
            exe,
        }
    }

    async fn upgrade(&self, args: serde_json::Value) -> dbvm_protocol::api::CommandView {
        self.fleet
            .send(&self.client, &self.agent, "agent.upgrade", args)
            .await
    }

    /// The agent answers a signed ping; returns the version it reports.
    async fn ping(&self) -> String {
        let out = self
            .fleet
            .send_ok(&self.client, &self.agent, "ping", json!({}))
            .await;
        out["agent_version"].as_str().unwrap().to_string()
    }

    /// Starts db1 again from its executable (after it was killed).
    fn restart(&mut self) {
        self.agent = self.fleet.run_agent_exe(
            &self.exe,
            "db1",
            self.agent.config.clone(),
            self.agent.state_dir.clone(),
            &[],
        );
    }

    /// SHA-256 of the executable the agent process runs now.
    fn running_sha(&self) -> String {
        file_sha(Path::new(&format!("/proc/{}/exe", self.agent.proc.pid())))
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(self.exe.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n != "dbvm-agent")
            .collect();
        if self.agent.state_dir.join("upgrade/state.json").exists() {
            left.push("upgrade/state.json".into());
        }
        left.sort();
        left
    }
}

fn error_of(v: &dbvm_protocol::api::CommandView) -> String {
    v.error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_swaps_in_the_new_binary_in_the_same_process() {
    let rig = Rig::new(30).await;
    let new = release_agent();
    let new_version = version_of(&new);
    let old_sha = file_sha(&rig.exe);
    let pid = rig.agent.proc.pid();
    let (url, sha) = upload(&rig.fleet, &rig.broker, std::fs::read(&new).unwrap()).await;
    assert_ne!(
        sha, old_sha,
        "the release build differs from the debug build"
    );

    let started = Instant::now();
    let v = rig
        .upgrade(json!({"url": url, "sha256": sha, "version": new_version}))
        .await;
    assert_eq!(
        v.state,
        CommandState::Succeeded,
        "{:?}\n{}",
        v.error,
        rig.agent.proc.log_tail()
    );
    let out = v.output.unwrap();
    assert_eq!(out["from"]["sha256"], old_sha.as_str(), "{out}");
    assert_eq!(out["to"]["sha256"], sha.as_str(), "{out}");
    // The result came from the new agent, which answers signed commands.
    assert_eq!(rig.ping().await, new_version);
    let took = started.elapsed();
    assert_eq!(rig.agent.proc.pid(), pid, "re-executed in the same process");
    assert_eq!(rig.running_sha(), sha, "the process runs the new binary");
    assert_eq!(file_sha(&rig.exe), sha);
    assert_eq!(rig.leftovers(), Vec::<String>::new());
    let agent = rig.client.agent("db1").await.unwrap();
    assert!(
        agent.operations.contains(&"agent.upgrade".to_string()),
        "{agent:?}"
    );
    eprintln!(
        "figure: upgrade from command to the new version answering a ping: {} ms (download {} ms, trial {} ms)",
        took.as_millis(),
        out["download_ms"],
        out["trial_ms"]
    );

    // The same binary again changes nothing.
    let v = rig
        .upgrade(json!({"url": url, "sha256": sha, "version": new_version}))
        .await;
    assert_eq!(v.state, CommandState::Succeeded, "{:?}", v.error);
    assert_eq!(v.output.unwrap()["unchanged"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_swap_in_does_not_and_the_old_agent_answers() {
    let rig = Rig::new(30).await;
    let old_sha = file_sha(&rig.exe);
    let old_version = rig.ping().await;
    let dir = rig.fleet.path("builds");
    std::fs::create_dir_all(&dir).unwrap();

    // Bad arguments: refused before anything is fetched.
    for (args, says) in [
        (
            json!({"url": "http://localhost/x", "sha256": "0".repeat(64), "version": "1"}),
            "https",
        ),
        (
            json!({"url": "https://localhost/x", "sha256": "ABC", "version": "1"}),
            "sha256",
        ),
        (
            json!({"url": "https://localhost/x", "sha256": "0".repeat(64), "version": "1 2"}),
            "version",
        ),
        (
            json!({"url": "https://localhost/x", "sha256": "0".repeat(64), "version": "1", "deadline_s": 1}),
            "deadline_s",
        ),
    ] {
        let v = rig.upgrade(args).await;
        assert_eq!(v.state, CommandState::Rejected, "{v:?}");
        assert!(error_of(&v).contains(says), "{}", error_of(&v));
    }

    // A SHA-256 that is not the artifact's: downloaded, refused, removed.
    let good = script(&dir, "good", "9.9.9", "exit 0");
    let (url, _) = upload(&rig.fleet, &rig.broker, std::fs::read(&good).unwrap()).await;
    let v = rig
        .upgrade(json!({"url": url, "sha256": "ab".repeat(32), "version": "9.9.9"}))
        .await;
    assert_eq!(v.state, CommandState::Failed);
    assert!(error_of(&v).contains("nothing changed"), "{}", error_of(&v));

    // Not an executable at all.
    let (url, sha) = upload(&rig.fleet, &rig.broker, b"\x7fELF but not really".to_vec()).await;
    let v = rig
        .upgrade(json!({"url": url, "sha256": sha, "version": "9.9.9"}))
        .await;
    assert_eq!(v.state, CommandState::Failed);
    assert!(error_of(&v).contains("does not run"), "{}", error_of(&v));

    // Another version than the command says.
    let (url, sha) = upload(&rig.fleet, &rig.broker, std::fs::read(&good).unwrap()).await;
    let v = rig
        .upgrade(json!({"url": url, "sha256": sha, "version": "9.9.8"}))
        .await;
    assert_eq!(v.state, CommandState::Failed);
    assert!(
        error_of(&v).contains("is version 9.9.9"),
        "{}",
        error_of(&v)
    );

    // It starts, then fails its trial (a build that cannot read the config, say).
    let broken = script(
        &dir,
        "broken",
        "9.9.9",
        "echo 'cannot load the config: boom' >&2; exit 3",
    );
    let (url, sha) = upload(&rig.fleet, &rig.broker, std::fs::read(&broken).unwrap()).await;
    let started = Instant::now();
    let v = rig
        .upgrade(json!({"url": url, "sha256": sha, "version": "9.9.9"}))
        .await;
    assert_eq!(v.state, CommandState::Failed);
    let e = error_of(&v);
    assert!(
        e.contains("rolled back") && e.contains("boom") && e.contains(&old_version),
        "{e}"
    );
    eprintln!(
        "figure: rollback of a binary that fails at once: {} ms",
        started.elapsed().as_millis()
    );

    // It starts and never connects: stopped at the deadline.
    let silent = script(&dir, "silent", "9.9.9", "exec sleep 600");
    let (url, sha) = upload(&rig.fleet, &rig.broker, std::fs::read(&silent).unwrap()).await;
    let started = Instant::now();
    let v = rig
        .upgrade(json!({"url": url, "sha256": sha, "version": "9.9.9", "deadline_s": 10}))
        .await;
    assert_eq!(v.state, CommandState::Failed);
    let e = error_of(&v);
    assert!(
        e.contains("rolled back") && e.contains("within the deadline of 10 s"),
        "{e}"
    );
    eprintln!(
        "figure: rollback of a binary that never connects (deadline 10 s): {} ms",
        started.elapsed().as_millis()
    );

    // After all of it: the old binary, in place, answering.
    assert_eq!(rig.ping().await, old_version);
    assert_eq!(file_sha(&rig.exe), old_sha);
    assert_eq!(rig.running_sha(), old_sha);
    assert_eq!(rig.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_on_trial_comes_back_as_the_old_version() {
    let mut rig = Rig::new(30).await;
    let old_sha = file_sha(&rig.exe);
    let dir = rig.fleet.path("builds");
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("trial.pid");
    let silent = script(
        &dir,
        "silent",
        "9.9.9",
        &format!("echo $$ > {}\nexec sleep 600", pidfile.display()),
    );
    let (url, sha) = upload(&rig.fleet, &rig.broker, std::fs::read(&silent).unwrap()).await;
    let cmd = rig.fleet.sign(
        "db1",
        "agent.upgrade",
        json!({"url": url, "sha256": sha, "version": "9.9.9", "deadline_s": 120}),
    );
    let id = rig.client.submit(&cmd).await.unwrap().id;
    eventually(Duration::from_secs(60), "the trial to start", || async {
        pidfile.exists().then_some(())
    })
    .await;
    rig.agent.proc.kill();
    // The trial run outlives the killed agent; a real one would end at its deadline.
    let trial_pid = std::fs::read_to_string(&pidfile).unwrap();
    let _ = std::process::Command::new("kill")
        .arg(trial_pid.trim())
        .status();

    rig.restart();
    let v = rig.client.wait(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.state, CommandState::Failed, "{v:?}");
    let e = error_of(&v);
    assert!(
        e.contains("restarted while upgrading to 9.9.9") && e.contains(&old_sha),
        "{e}"
    );
    rig.ping().await;
    assert_eq!(rig.running_sha(), old_sha);
    assert_eq!(rig.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_between_the_swap_and_its_restart_comes_back_as_the_new_version() {
    // A long drain keeps the old process alive after the swap: it waits for a running
    // command before it re-executes, and is killed in that window.
    let mut rig = Rig::new(120).await;
    let new = release_agent();
    let new_version = version_of(&new);
    let (url, sha) = upload(&rig.fleet, &rig.broker, std::fs::read(&new).unwrap()).await;
    let slow = rig.fleet.sign("db1", "ping", json!({"delay_ms": 120_000}));
    let slow_id = rig.client.submit(&slow).await.unwrap().id;
    eventually(Duration::from_secs(30), "the slow ping to run", || async {
        let v = rig.client.command(slow_id).await.ok()?;
        (v.state == CommandState::Running).then_some(())
    })
    .await;
    let cmd = rig.fleet.sign(
        "db1",
        "agent.upgrade",
        json!({"url": url, "sha256": sha, "version": new_version}),
    );
    let id = rig.client.submit(&cmd).await.unwrap().id;
    let exe = rig.exe.clone();
    eventually(Duration::from_secs(120), "the swap", || async {
        (file_sha(&exe) == sha).then_some(())
    })
    .await;
    assert!(rig.agent.proc.is_running());
    rig.agent.proc.kill();

    rig.restart();
    let v = rig.client.wait(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    assert_eq!(v.output.unwrap()["to"]["sha256"], sha.as_str());
    let slow = rig
        .client
        .wait(slow_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(slow.state, CommandState::Interrupted, "{slow:?}");
    assert_eq!(rig.ping().await, new_version);
    assert_eq!(rig.running_sha(), sha);
    assert_eq!(rig.leftovers(), Vec::<String>::new());
}

/// `dbvmctl upgrade` as a control plane calls it (the library): the binary uploaded once,
/// two agents upgraded one wave at a time, each answering as the new build afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbvmctl_upgrades_agents_in_waves() {
    let rig = Rig::new(30).await;
    let (db2, exe2) = start_copy(&rig.fleet, &rig.broker, &rig.client, "db2", 30).await;
    let new = release_agent();
    let new_version = version_of(&new);
    let sha = file_sha(&new);
    let sender = dbvmctl::Sender::new(
        &rig.client,
        &rig.fleet.signer,
        rig.fleet.reply_key.public_key(),
    );
    let mut plan = dbvmctl::upgrade::Plan::new(
        new.clone(),
        &new_version,
        vec![
            dbvm_protocol::AgentId::new("db1").unwrap(),
            dbvm_protocol::AgentId::new("db2").unwrap(),
        ],
    );
    plan.wave_size = 1;
    let summary = dbvmctl::upgrade::upgrade(&rig.client, &sender, &plan, |_| {})
        .await
        .unwrap();
    for a in &summary.agents {
        assert_eq!(
            a.outcome,
            dbvmctl::upgrade::Outcome::Upgraded,
            "{summary:?}"
        );
    }
    assert_eq!(
        summary.agents.iter().map(|a| a.wave).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(rig.running_sha(), sha);
    assert_eq!(file_sha(&exe2), sha);
    assert_eq!(
        file_sha(Path::new(&format!("/proc/{}/exe", db2.proc.pid()))),
        sha
    );
    let out = rig
        .fleet
        .send_ok(&rig.client, &db2, "ping", json!({}))
        .await;
    assert_eq!(out["agent_version"], new_version.as_str());
}
