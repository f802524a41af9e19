//! The agent's firewall against real nftables: each test applies the agent's table inside
//! a "db" network namespace with two interfaces and connects from a "client" namespace.
//! Open ports must connect; every other listening port must be dropped (the probe times
//! out, it is not refused). Each test also proves the host's own ruleset did not change.
//!
//! The last tests run a whole agent inside the db namespace, as on a database VM: a real
//! database created by a signed `db.create` on a port of its own must be reachable there
//! from the client namespace, and on nothing else.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_agent::db::DatabaseSpec;
use dbvm_agent::firewall::{ApplyOutcome, Firewall, FirewallConfig, FirewallError, FirewallRole};
use dbvm_e2e::fleet::toml_path;
use dbvm_e2e::netns::{HostRuleset, NetnsPair, Reach, Side};
use dbvm_e2e::proc::{bin_dir, Proc};
use dbvm_e2e::{connected, eventually, AgentProc, BrokerProc, Fleet};
use dbvm_protocol::seal::Sealed;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Inside a veth pair a handshake takes well under a millisecond.
const PROBE: Duration = Duration::from_millis(700);

/// The role of a database with this spec, as the agent derives it.
fn role(spec: Value) -> FirewallRole {
    let spec: DatabaseSpec = serde_json::from_value(spec).unwrap();
    spec.validate().unwrap();
    FirewallRole::of_database(Some(&spec))
}

/// PostgreSQL on its default port, 5432.
fn pg() -> FirewallRole {
    role(json!({"engine": "postgres", "database": "app"}))
}

/// MySQL 8 on its default port, 3306 (and its X protocol on 33060).
fn mysql() -> FirewallRole {
    role(json!({"engine": "mysql8", "database": "app"}))
}

fn config(pair: &NetnsPair) -> FirewallConfig {
    FirewallConfig {
        netns: Some(pair.db.clone()),
        management_interface: pair.management_interface.clone(),
        application_interface: pair.application_interface.clone(),
        ..Default::default()
    }
}

fn targets(addr: Ipv4Addr, ports: &[u16]) -> Vec<(Ipv4Addr, u16)> {
    ports.iter().map(|&p| (addr, p)).collect()
}

/// Every target in `listening` connects if it is in `open` and times out otherwise.
fn assert_only_open(pair: &NetnsPair, listening: &[(Ipv4Addr, u16)], open: &[(Ipv4Addr, u16)]) {
    let got = pair.reach_all(Side::Client, listening, PROBE);
    let mut wrong = Vec::new();
    for (t, r) in listening.iter().zip(&got) {
        let want = if open.contains(t) {
            Reach::Open
        } else {
            Reach::TimedOut
        };
        if *r != want {
            wrong.push(format!("{}:{} is {r:?}, wanted {want:?}", t.0, t.1));
        }
    }
    assert!(
        wrong.is_empty(),
        "reachability differs:\n{}\nlive ruleset:\n{}",
        wrong.join("\n"),
        pair.ruleset(Side::Db)
    );
}

async fn assert_matches(fw: &Firewall, role: &FirewallRole) {
    let s = fw.status(role).await.expect("status");
    assert!(
        s.matches && s.present && s.reason.is_none(),
        "status does not match: {s:#?}"
    );
    assert!(s.missing.is_empty() && s.unexpected.is_empty(), "{s:#?}");
}

#[tokio::test]
async fn postgres_role_opens_ssh_https_and_5432_only_where_wanted() {
    let host = HostRuleset::snapshot();
    let mut pair = NetnsPair::new("eth0", "eth1");
    let ports = [22, 443, 5432, 3306, 8080];
    pair.listen(pair.db_management, &ports);
    pair.listen(pair.db_application, &ports);
    let mut listening = targets(pair.db_management, &ports);
    listening.extend(targets(pair.db_application, &ports));

    // Without a firewall everything connects: the harness works.
    assert_only_open(&pair, &listening, &listening);

    let fw = Firewall::new(config(&pair)).unwrap();
    let started = Instant::now();
    let report = fw.apply(&pg()).await.expect("apply");
    eprintln!(
        "first apply: {} ms (report {} ms)",
        started.elapsed().as_millis(),
        report.elapsed_ms
    );
    assert_eq!(report.outcome, ApplyOutcome::Applied);
    assert_eq!(report.corrected, ["table inet dbvm was absent"]);
    assert!(report.unverified.is_empty(), "{:?}", report.unverified);

    let (m, a) = (pair.db_management, pair.db_application);
    assert_only_open(&pair, &listening, &[(m, 22), (a, 22), (m, 443), (a, 5432)]);
    // Nothing is refused from the outside: a closed port looks the same as a filtered one.
    assert_eq!(
        pair.reach(Side::Client, a, 9, PROBE),
        Reach::TimedOut,
        "a port without a listener must be dropped too"
    );
    // Loopback and the VM's own outgoing connections are not filtered.
    assert!(pair.probe(Side::Db, a, 3306, PROBE));
    assert!(pair.probe(Side::Db, m, 8080, PROBE));
    let s = fw.status(&pg()).await.expect("status");
    eprintln!("status: {} ms", s.elapsed_ms);
    assert!(s.matches, "{s:#?}");
    assert!(
        s.live_ruleset.contains("table inet dbvm {"),
        "{}",
        s.live_ruleset
    );
    assert!(s.live_ruleset.contains("tcp dport 5432 accept"));

    // The ruleset is readable: named chains with comments.
    let text = pair.ruleset(Side::Db);
    for needle in [
        "chain management {",
        "chain application {",
        "comment \"PostgreSQL\"",
        "iifname \"eth1\" jump application",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }

    assert!(fw.remove().await.expect("remove"));
    let s = fw.status(&pg()).await.expect("status");
    assert!(!s.present && !s.matches);
    assert!(
        s.reason
            .as_deref()
            .unwrap_or_default()
            .contains("does not exist"),
        "{s:#?}"
    );
    assert!(!fw.remove().await.expect("second remove"), "already gone");
    assert_only_open(&pair, &listening, &listening);
    assert_eq!(
        pair.ruleset(Side::Db).trim(),
        "",
        "only the agent's table existed"
    );

    drop(pair);
    host.assert_unchanged();
}

/// `management_tcp_ports` (the package opens Telegraf's 9274 with it) is reachable on the
/// management interface and dropped on the application one.
#[tokio::test]
async fn management_ports_are_open_on_the_management_interface_only() {
    let host = HostRuleset::snapshot();
    let mut pair = NetnsPair::new("eth0", "eth1");
    let ports = [22, 443, 5432, 9274];
    pair.listen(pair.db_management, &ports);
    pair.listen(pair.db_application, &ports);
    let mut listening = targets(pair.db_management, &ports);
    listening.extend(targets(pair.db_application, &ports));
    let fw = Firewall::new(FirewallConfig {
        management_tcp_ports: vec![9274],
        ..config(&pair)
    })
    .unwrap();
    let report = fw.apply(&pg()).await.expect("apply");
    assert_eq!(report.outcome, ApplyOutcome::Applied);
    let (m, a) = (pair.db_management, pair.db_application);
    assert_only_open(
        &pair,
        &listening,
        &[(m, 22), (m, 443), (m, 9274), (a, 22), (a, 5432)],
    );
    assert_matches(&fw, &pg()).await;
    assert!(fw.remove().await.expect("remove"));
    drop(pair);
    host.assert_unchanged();
}

#[tokio::test]
async fn mysql_and_mariadb_roles_open_their_ports_on_configured_interfaces() {
    let host = HostRuleset::snapshot();
    // Interface and table names are configuration.
    let mut pair = NetnsPair::new("ens192", "ens224");
    let fw = Firewall::new(FirewallConfig {
        table: "agent_fw".into(),
        ..config(&pair)
    })
    .unwrap();
    let (m, a) = (pair.db_management, pair.db_application);
    let app_ports = [
        22, 443, 3306, 5432, 6446, 6447, 6448, 6449, 8080, 33060, 33061,
    ];
    pair.listen(m, &[22, 443, 3306, 33060]);
    pair.listen(a, &app_ports);
    let mut listening = targets(m, &[22, 443, 3306, 33060]);
    listening.extend(targets(a, &app_ports));

    let mysql8 = |extra: Value| {
        let mut spec = json!({"engine": "mysql8", "database": "app"});
        spec["mysql"] = extra;
        role(spec)
    };
    let cases: [(&str, FirewallRole, &[u16]); 5] = [
        // MariaDB has no X plugin.
        (
            "mariadb",
            role(json!({"engine": "mariadb", "database": "app"})),
            &[22, 3306],
        ),
        ("mysql", mysql(), &[22, 3306, 33060]),
        (
            "mysql + group replication",
            mysql8(json!({"group_replication": true})),
            &[22, 3306, 33060, 33061],
        ),
        (
            "mysql + router",
            mysql8(json!({"router": true})),
            &[22, 3306, 6446, 6447, 6448, 6449, 33060],
        ),
        (
            "mysql + group replication + router",
            mysql8(json!({"group_replication": true, "router": true})),
            &[22, 3306, 6446, 6447, 6448, 6449, 33060, 33061],
        ),
    ];
    for (name, role, app_open) in &cases {
        let report = fw.apply(role).await.expect(name);
        eprintln!("{name}: apply {} ms", report.elapsed_ms);
        assert_eq!(report.outcome, ApplyOutcome::Applied, "{name}");
        let mut open = targets(m, &[22, 443]);
        open.extend(targets(a, app_open));
        assert_only_open(&pair, &listening, &open);
        assert_matches(&fw, role).await;
    }

    // Back to plain MySQL: the report says what it took away.
    let report = fw.apply(&mysql()).await.unwrap();
    assert_eq!(
        report.corrected,
        [
            "unexpected: application: tcp dport 6446-6449 accept",
            "unexpected: application: tcp dport 33061 accept"
        ]
    );
    assert!(pair.ruleset(Side::Db).contains("table inet agent_fw {"));
    drop(pair);
    host.assert_unchanged();
}

/// The handle nft gave the rule in `chain` whose text contains `needle`.
fn handle_of(pair: &NetnsPair, table: &str, chain: &str, needle: &str) -> String {
    let listing = pair.exec_ok(
        Side::Db,
        &["nft", "-a", "list", "chain", "inet", table, chain],
    );
    listing
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.rsplit_once("# handle "))
        .map(|(_, h)| h.trim().to_string())
        .unwrap_or_else(|| panic!("no rule with {needle:?} in\n{listing}"))
}

#[tokio::test]
async fn apply_is_idempotent_and_status_finds_changes_made_behind_its_back() {
    let host = HostRuleset::snapshot();
    let mut pair = NetnsPair::new("eth0", "eth1");
    let a = pair.db_application;
    pair.listen(a, &[5432, 9999]);
    let fw = Firewall::new(config(&pair)).unwrap();

    assert_eq!(
        fw.apply(&pg()).await.unwrap().outcome,
        ApplyOutcome::Applied
    );
    let before = pair.exec_ok(Side::Db, &["nft", "-a", "list", "table", "inet", "dbvm"]);
    let again = fw.apply(&pg()).await.unwrap();
    eprintln!("apply when already matching: {} ms", again.elapsed_ms);
    assert_eq!(again.outcome, ApplyOutcome::Unchanged);
    assert!(!again.changed() && again.corrected.is_empty());
    // Not even re-created: the rule handles are the same.
    let after = pair.exec_ok(Side::Db, &["nft", "-a", "list", "table", "inet", "dbvm"]);
    assert_eq!(before, after);
    assert_matches(&fw, &pg()).await;

    // Someone opens a port by hand.
    pair.exec_ok(
        Side::Db,
        &[
            "nft", "add", "rule", "inet", "dbvm", "input", "tcp", "dport", "9999", "accept",
        ],
    );
    assert!(
        pair.probe(Side::Client, a, 9999, PROBE),
        "the added rule works"
    );
    let s = fw.status(&pg()).await.unwrap();
    assert!(!s.matches && s.present, "{s:#?}");
    assert!(s.missing.is_empty(), "{s:#?}");
    assert_eq!(s.unexpected, ["input: tcp dport 9999 accept"]);
    assert!(s.reason.unwrap().contains("1 unexpected"));
    assert!(s.live_ruleset.contains("tcp dport 9999 accept"));

    // ... removes the PostgreSQL rule and opens the input policy.
    let h = handle_of(&pair, "dbvm", "application", "dport 5432");
    pair.exec_ok(
        Side::Db,
        &[
            "nft",
            "delete",
            "rule",
            "inet",
            "dbvm",
            "application",
            "handle",
            &h,
        ],
    );
    pair.exec_ok(
        Side::Db,
        &[
            "nft",
            "chain",
            "inet",
            "dbvm",
            "input",
            "{ policy accept; }",
        ],
    );
    let s = fw.status(&pg()).await.unwrap();
    assert_eq!(
        s.missing,
        [
            "chain input (type filter hook input priority 0 policy drop)",
            "application: tcp dport 5432 accept"
        ],
        "{s:#?}"
    );
    assert_eq!(
        s.unexpected,
        [
            "chain input (type filter hook input priority 0 policy accept)",
            "input: tcp dport 9999 accept"
        ]
    );

    // Apply puts it right.
    let fixed = fw.apply(&pg()).await.unwrap();
    assert_eq!(fixed.outcome, ApplyOutcome::Applied);
    assert_eq!(fixed.corrected.len(), 4, "{:?}", fixed.corrected);
    assert_matches(&fw, &pg()).await;
    assert_only_open(&pair, &targets(a, &[5432, 9999]), &[(a, 5432)]);
    assert_eq!(
        fw.apply(&pg()).await.unwrap().outcome,
        ApplyOutcome::Unchanged
    );

    // A role change is a change.
    assert!(fw.apply(&mysql()).await.unwrap().changed());
    assert!(!fw.status(&pg()).await.unwrap().matches);
    assert_matches(&fw, &mysql()).await;

    drop(pair);
    host.assert_unchanged();
}

fn write_script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn bad_config_is_refused_before_nft_runs_and_changes_nothing() {
    let host = HostRuleset::snapshot();
    let pair = NetnsPair::new("eth0", "eth1");
    let fw = Firewall::new(config(&pair)).unwrap();
    fw.apply(&pg()).await.unwrap();
    let live = pair.ruleset(Side::Db);

    // An nft that records being run: a refused config never gets that far.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let recording = write_script(
        dir.path(),
        "nft",
        &format!("echo \"$*\" >> {}\nexec nft \"$@\"\n", log.display()),
    );
    let bad = [
        (
            FirewallConfig {
                application_interface: "eth 1".into(),
                nft: recording.clone(),
                ..config(&pair)
            },
            "firewall.application_interface",
        ),
        (
            FirewallConfig {
                management_interface: "eth0\";flush ruleset;\"".into(),
                nft: recording.clone(),
                ..config(&pair)
            },
            "firewall.management_interface",
        ),
        (
            FirewallConfig {
                table: "Bad-Table".into(),
                nft: recording.clone(),
                ..config(&pair)
            },
            "firewall.table",
        ),
    ];
    for (c, key) in bad {
        match Firewall::new(c) {
            Err(e @ FirewallError::Config { .. }) => {
                assert!(
                    e.to_string().starts_with(&format!("config key {key}:")),
                    "{e}"
                )
            }
            other => panic!("{key}: expected a config error, got {other:?}"),
        }
    }
    assert!(!log.exists(), "nft ran for a refused config");
    // The recording nft itself works, so the check above means something.
    let ok = Firewall::new(FirewallConfig {
        nft: recording,
        ..config(&pair)
    })
    .unwrap();
    assert_eq!(
        ok.apply(&pg()).await.unwrap().outcome,
        ApplyOutcome::Unchanged
    );
    assert!(log.exists());

    // Missing nft, missing namespace: clear errors, nothing changes.
    let err = Firewall::new(FirewallConfig {
        nft: "/nonexistent/dbvm/nft".into(),
        ..config(&pair)
    })
    .unwrap()
    .apply(&mysql())
    .await
    .unwrap_err();
    assert!(matches!(err, FirewallError::NftMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("install nftables"), "{err}");
    let err = Firewall::new(FirewallConfig {
        netns: Some(format!("{}-gone", pair.db)),
        ..config(&pair)
    })
    .unwrap()
    .apply(&mysql())
    .await
    .unwrap_err();
    assert!(matches!(err, FirewallError::NetnsMissing { .. }), "{err:?}");

    assert_eq!(pair.ruleset(Side::Db), live);
    assert_matches(&fw, &pg()).await;
    drop(pair);
    host.assert_unchanged();
}

#[tokio::test]
async fn a_batch_the_kernel_rejects_leaves_the_previous_ruleset() {
    let host = HostRuleset::snapshot();
    let mut pair = NetnsPair::new("eth0", "eth1");
    let a = pair.db_application;
    pair.listen(a, &[3306, 5432]);
    let fw = Firewall::new(config(&pair)).unwrap();
    fw.apply(&pg()).await.unwrap();
    let live = pair.ruleset(Side::Db);

    // An nft that appends a line the kernel refuses to every batch it applies: the dry
    // run passes, the real batch fails as a whole.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let poison = "delete table inet dbvm_test_does_not_exist";
    let apply_fails = write_script(
        dir.path(),
        "nft-apply-fails",
        &format!(
            "echo \"$*\" >> {log}\n\
             if [ \"$1\" = \"-f\" ]; then {{ cat; echo '{poison}'; }} | nft \"$@\"; exit $?; fi\n\
             exec nft \"$@\"\n",
            log = log.display()
        ),
    );
    let err = Firewall::new(FirewallConfig {
        nft: apply_fails,
        ..config(&pair)
    })
    .unwrap()
    .apply(&mysql())
    .await
    .unwrap_err();
    let FirewallError::Rejected { stderr, .. } = &err else {
        panic!("expected Rejected, got {err:?}");
    };
    assert!(stderr.contains("dbvm_test_does_not_exist"), "{stderr}");
    assert!(err
        .to_string()
        .contains("previous ruleset is still in place"));
    let ran = std::fs::read_to_string(&log).unwrap();
    assert!(ran.lines().any(|l| l == "-c -f -"), "dry run first: {ran}");
    assert!(ran.lines().any(|l| l == "-f -"), "{ran}");
    assert_eq!(
        pair.ruleset(Side::Db),
        live,
        "the rejected batch changed nothing"
    );
    assert_matches(&fw, &pg()).await;
    assert_only_open(&pair, &targets(a, &[3306, 5432]), &[(a, 5432)]);

    // One that poisons the dry run too: the real batch is never sent.
    std::fs::remove_file(&log).unwrap();
    let always_fails = write_script(
        dir.path(),
        "nft-always-fails",
        &format!(
            "echo \"$*\" >> {log}\n\
             case \"$*\" in *'-f -'*) {{ cat; echo '{poison}'; }} | nft \"$@\"; exit $?;; esac\n\
             exec nft \"$@\"\n",
            log = log.display()
        ),
    );
    let err = Firewall::new(FirewallConfig {
        nft: always_fails,
        ..config(&pair)
    })
    .unwrap()
    .apply(&mysql())
    .await
    .unwrap_err();
    assert!(
        matches!(err, FirewallError::DryRunRejected { .. }),
        "{err:?}"
    );
    let ran = std::fs::read_to_string(&log).unwrap();
    assert!(
        !ran.lines().any(|l| l == "-f -"),
        "applied after a failed dry run: {ran}"
    );
    assert_eq!(pair.ruleset(Side::Db), live);
    assert_matches(&fw, &pg()).await;

    drop(pair);
    host.assert_unchanged();
}

// ---------------------------------------------------------------------------------------
// A whole agent in the db namespace.

/// A database VM in miniature. A real broker runs on the host; a real agent runs *inside*
/// the db namespace, so its firewall guards the namespace it lives in (no
/// `firewall.netns`, as in production) and the database server it starts (process
/// runtime: the host's PostgreSQL and MariaDB binaries) listens in that namespace too.
/// The agent reaches the broker over a loopback forwarder; the namespace gets no route to
/// the host.
struct DbVm {
    fleet: Fleet,
    _broker: BrokerProc,
    client: dbvmctl::Client,
    agent: AgentProc,
    /// The database's files, removed after the agent has gone.
    _data: tempfile::TempDir,
}

impl DbVm {
    async fn start(pair: &mut NetnsPair, id: &str, db_user: &str) -> Self {
        let fleet = Fleet::new();
        let broker = fleet.start_broker("");
        let client = fleet.client(&broker);
        let broker_port = pair.forward_to_host(Side::Db, broker.agent_addr);
        let (uid, gid) = dbvm_e2e::dbtest::system_user(db_user);
        // The server runs as `db_user`, who must be able to reach its data directory:
        // not under the fleet's directory (0700, root's).
        let data = tempfile::Builder::new()
            .prefix("dbvm-fw-data-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let token = client
            .enrollment_token(id, None)
            .await
            .expect("enrollment token")
            .token;
        let token_file = fleet.path(&format!("agent-{id}.token"));
        std::fs::write(&token_file, token).unwrap();
        let state_dir = fleet.path(&format!("agent-{id}"));
        let sections = format!(
            r#"[health]
metrics_listen = ""
shadow_file = "/nonexistent/shadow"
[database]
runtime = "process"
data_root = {root}
container_name = "{id}-db"
uid = {uid}
gid = {gid}
engine_wait_s = 5
[firewall]
management_interface = "{management}"
application_interface = "{application}"
"#,
            root = toml_path(&data.path().join("db")),
            management = pair.management_interface,
            application = pair.application_interface,
        );
        let config = fleet.path(&format!("agent-{id}.toml"));
        std::fs::write(
            &config,
            fleet.agent_config(id, broker_port, &state_dir, &token_file, &sections),
        )
        .unwrap();
        let agent = Self::spawn_agent(pair, &fleet, id, config, state_dir);
        connected(&client, id).await;
        Self {
            fleet,
            _broker: broker,
            client,
            agent,
            _data: data,
        }
    }

    /// Starts the agent inside the db namespace (its log appends to one file per id).
    fn spawn_agent(
        pair: &NetnsPair,
        fleet: &Fleet,
        id: &str,
        config: std::path::PathBuf,
        state_dir: std::path::PathBuf,
    ) -> AgentProc {
        let log = fleet.path(&format!("agent-{id}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = pair
            .command(Side::Db, bin_dir().join("dbvm-agent"))
            .arg("--config")
            .arg(&config)
            .env("DBVM_LOG", "info,dbvm_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start dbvm-agent inside the db namespace");
        AgentProc {
            proc: Proc {
                name: format!("agent {id} (in namespace {})", pair.db),
                child: Some(child),
                log,
            },
            id: id.to_string(),
            config,
            state_dir,
        }
    }

    /// Stops the agent (SIGTERM, a drain) and starts it again on the same config and state.
    async fn restart_agent(&mut self, pair: &NetnsPair) {
        let exit = self.agent.proc.terminate();
        assert!(exit.is_some_and(|e| e.success()), "agent exit: {exit:?}");
        let client = &self.client;
        let id = self.agent.id.clone();
        eventually(
            Duration::from_secs(20),
            "the agent to disconnect",
            || async {
                let agents = client.agents().await.ok()?;
                (!agents.iter().any(|a| a.id == id && a.connected)).then_some(())
            },
        )
        .await;
        self.agent = Self::spawn_agent(
            pair,
            &self.fleet,
            &self.agent.id,
            self.agent.config.clone(),
            self.agent.state_dir.clone(),
        );
        connected(&self.client, &self.agent.id).await;
    }

    async fn ok(&self, operation: &str, args: Value) -> Value {
        self.fleet
            .send_ok(&self.client, &self.agent, operation, args)
            .await
    }

    fn password(&self, create: &Value) -> String {
        let sealed: Sealed =
            serde_json::from_value(create["password"].clone()).expect("sealed password");
        self.fleet
            .reply_key
            .open(&sealed)
            .expect("open the password")
            .expose()
            .to_string()
    }
}

/// The TCP ports a firewall report (`wanted`) opens on the application network for the
/// database, that is everything but ssh.
fn wanted_database_ports(report: &Value) -> BTreeSet<u16> {
    report["wanted"]["rules"]
        .as_array()
        .expect("wanted.rules")
        .iter()
        .filter(|r| r["network"] == "application" && r["why"] != "ssh")
        .flat_map(|r| {
            let (first, last) = (r["ports"]["first"].as_u64(), r["ports"]["last"].as_u64());
            first.unwrap()..=last.unwrap()
        })
        .map(|p| u16::try_from(p).unwrap())
        .collect()
}

/// The ports `process` listens on inside the db namespace, loopback left out.
fn server_ports(pair: &NetnsPair, process: &str) -> BTreeSet<u16> {
    pair.tcp_listeners(Side::Db)
        .into_iter()
        .filter(|(addr, name)| {
            name == process && !addr.starts_with("127.") && !addr.starts_with("[::1]")
        })
        .map(|(addr, _)| addr.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect()
}

/// What a client on the application network meets: the engine's real port and nothing it
/// does not use. `decoys` are the engine's default ports (and MySQL's X port), where
/// listeners stand in for a server that is not there: the firewall must drop them.
async fn database_on_its_own_port(
    id: &str,
    db_user: &str,
    server_process: &str,
    spec: Value,
    decoys: &[u16],
    client_argv: &dyn Fn(&NetnsPair, u16) -> Vec<String>,
) {
    let host = HostRuleset::snapshot();
    let mut pair = NetnsPair::new("eth0", "eth1");
    let (m, a) = (pair.db_management, pair.db_application);
    let port = u16::try_from(spec["port"].as_u64().unwrap()).unwrap();
    let mut stand_ins = vec![22];
    stand_ins.extend_from_slice(decoys);
    pair.listen(a, &stand_ins);
    stand_ins.push(443);
    pair.listen(m, &stand_ins);
    let vm = DbVm::start(&mut pair, id, db_user).await;

    let create = vm.ok("db.create", spec.clone()).await;
    assert_eq!(create["port"], port, "{create}");
    assert_eq!(create["firewall"]["outcome"], "applied", "{create}");
    // The server listens on its spec's port (and only there).
    let listening = server_ports(&pair, server_process);
    assert_eq!(
        listening,
        BTreeSet::from([port]),
        "{server_process} should listen on its spec's port only"
    );

    // The scan: everything that listens, from the client namespace.
    let mut probed: Vec<(Ipv4Addr, u16)> = Vec::new();
    let mut open = vec![(m, 22), (m, 443), (a, 22), (a, port)];
    for addr in [m, a] {
        for p in stand_ins.iter().chain([&port]) {
            if !(addr == a && *p == 443) {
                probed.push((addr, *p));
            }
        }
    }
    probed.sort_unstable();
    open.sort_unstable();
    assert_only_open(&pair, &probed, &open);

    // What the firewall opens for the database is what the server listens on.
    assert_eq!(
        wanted_database_ports(&create["firewall"]),
        listening,
        "{create}"
    );

    // It is the real server, with the credentials that came back sealed.
    let password = vm.password(&create);
    let argv = client_argv(&pair, port);
    let out = pair
        .command(Side::Client, &argv[0])
        .args(&argv[1..])
        .env("PGPASSWORD", &password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("MYSQL_PWD", &password)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{} from the client namespace: {}",
        argv[0],
        String::from_utf8_lossy(&out.stderr)
    );

    // db.status says the firewall matches, and it does.
    let status = vm.ok("db.status", json!({})).await;
    assert_eq!(status["firewall"]["matches"], true, "{status}");
    assert_eq!(wanted_database_ports(&status["firewall"]), listening);

    // The database's rule removed behind the agent's back: status says so...
    let h = handle_of(&pair, "dbvm", "application", &format!("dport {port} "));
    pair.exec_ok(
        Side::Db,
        &[
            "nft",
            "delete",
            "rule",
            "inet",
            "dbvm",
            "application",
            "handle",
            &h,
        ],
    );
    assert_eq!(pair.reach(Side::Client, a, port, PROBE), Reach::TimedOut);
    let status = vm.ok("db.status", json!({})).await;
    let fw = &status["firewall"];
    assert_eq!(fw["matches"], false, "{status}");
    assert_eq!(
        fw["missing"],
        json!([format!("application: tcp dport {port} accept")]),
        "{status}"
    );
    // ... and firewall.apply, from the database's spec alone, puts it back.
    let fixed = vm.ok("firewall.apply", json!({})).await;
    assert_eq!(fixed["outcome"], "applied", "{fixed}");
    assert_eq!(
        fixed["corrected"],
        json!([format!("missing: application: tcp dport {port} accept")])
    );
    assert_only_open(&pair, &probed, &open);
    let again = vm.ok("firewall.apply", json!({})).await;
    assert_eq!(again["outcome"], "unchanged", "{again}");
    let status = vm.ok("firewall.status", json!({})).await;
    assert_eq!(status["matches"], true, "{status}");

    // Removed again, then the agent restarts: it applies its table at start, unasked.
    let h = handle_of(&pair, "dbvm", "application", &format!("dport {port} "));
    pair.exec_ok(
        Side::Db,
        &[
            "nft",
            "delete",
            "rule",
            "inet",
            "dbvm",
            "application",
            "handle",
            &h,
        ],
    );
    assert_eq!(pair.reach(Side::Client, a, port, PROBE), Reach::TimedOut);
    let mut vm = vm;
    vm.restart_agent(&pair).await;
    // Both starts log it (the log file is appended to).
    eventually(
        Duration::from_secs(20),
        "the firewall applied at start",
        || async {
            (vm.agent
                .proc
                .log_text()
                .matches("firewall applied at start")
                .count()
                >= 2)
                .then_some(())
        },
    )
    .await;
    assert_only_open(&pair, &probed, &open);
    let status = vm.ok("firewall.status", json!({})).await;
    assert_eq!(status["matches"], true, "{status}");

    // A clean stop before the namespace (and everything in it) goes.
    vm.ok("db.stop", json!({})).await;
    drop(vm);
    drop(pair);
    host.assert_unchanged();
}

/// Issue 11: `db.create … port=25432` opened 5432, not 25432.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_created_on_its_own_port_is_reachable_there_and_not_on_5432() {
    database_on_its_own_port(
        "fw-pg",
        "postgres",
        "postgres",
        json!({"engine": "postgres", "database": "app", "port": 25432}),
        &[5432],
        &|pair, port| {
            [
                "psql",
                "-h",
                &pair.db_application.to_string(),
                "-p",
                &port.to_string(),
                "-U",
                "dbaas",
                "-d",
                "app",
                "-Atc",
                "SELECT 40 + 2",
            ]
            .map(String::from)
            .to_vec()
        },
    )
    .await;
}

/// MariaDB has no X plugin: neither 3306 nor 33060 is opened for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_created_on_its_own_port_opens_neither_3306_nor_an_x_port() {
    database_on_its_own_port(
        "fw-maria",
        "mysql",
        "mariadbd",
        json!({"engine": "mariadb", "database": "app", "port": 23306}),
        &[3306, 33060],
        &|pair, port| {
            [
                "mariadb",
                "--no-defaults",
                "--connect-timeout=10",
                "-h",
                &pair.db_application.to_string(),
                "-P",
                &port.to_string(),
                "-u",
                "dbaas",
                "-D",
                "app",
                "-Nse",
                "SELECT 40 + 2",
            ]
            .map(String::from)
            .to_vec()
        },
    )
    .await;
}
