//! The agent's firewall against real nftables: each test applies the agent's table inside
//! a "db" network namespace with two interfaces and connects from a "client" namespace.
//! Open ports must connect; every other listening port must be dropped (the probe times
//! out, it is not refused). Each test also proves the host's own ruleset did not change.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_agent::firewall::{
    ApplyOutcome, DbEngine, Firewall, FirewallConfig, FirewallError, FirewallRole,
};
use dbvm_e2e::netns::{HostRuleset, NetnsPair, Reach, Side};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Inside a veth pair a handshake takes well under a millisecond.
const PROBE: Duration = Duration::from_millis(700);

const PG: FirewallRole = FirewallRole {
    engine: Some(DbEngine::Postgres),
    mysql_group_replication: false,
    mysql_router: false,
};
const MYSQL: FirewallRole = FirewallRole {
    engine: Some(DbEngine::Mysql),
    mysql_group_replication: false,
    mysql_router: false,
};

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
    let report = fw.apply(&PG).await.expect("apply");
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
    let s = fw.status(&PG).await.expect("status");
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
    let s = fw.status(&PG).await.expect("status");
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

#[tokio::test]
async fn mysql_roles_open_their_ports_on_configured_interfaces() {
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

    let cases: [(&str, FirewallRole, &[u16]); 4] = [
        ("mysql", MYSQL, &[22, 3306, 33060]),
        (
            "mysql + group replication",
            FirewallRole {
                mysql_group_replication: true,
                ..MYSQL
            },
            &[22, 3306, 33060, 33061],
        ),
        (
            "mysql + router",
            FirewallRole {
                mysql_router: true,
                ..MYSQL
            },
            &[22, 3306, 6446, 6447, 6448, 6449, 33060],
        ),
        (
            "mysql + group replication + router",
            FirewallRole {
                mysql_group_replication: true,
                mysql_router: true,
                ..MYSQL
            },
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
    let report = fw.apply(&MYSQL).await.unwrap();
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

    assert_eq!(fw.apply(&PG).await.unwrap().outcome, ApplyOutcome::Applied);
    let before = pair.exec_ok(Side::Db, &["nft", "-a", "list", "table", "inet", "dbvm"]);
    let again = fw.apply(&PG).await.unwrap();
    eprintln!("apply when already matching: {} ms", again.elapsed_ms);
    assert_eq!(again.outcome, ApplyOutcome::Unchanged);
    assert!(!again.changed() && again.corrected.is_empty());
    // Not even re-created: the rule handles are the same.
    let after = pair.exec_ok(Side::Db, &["nft", "-a", "list", "table", "inet", "dbvm"]);
    assert_eq!(before, after);
    assert_matches(&fw, &PG).await;

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
    let s = fw.status(&PG).await.unwrap();
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
    let s = fw.status(&PG).await.unwrap();
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
    let fixed = fw.apply(&PG).await.unwrap();
    assert_eq!(fixed.outcome, ApplyOutcome::Applied);
    assert_eq!(fixed.corrected.len(), 4, "{:?}", fixed.corrected);
    assert_matches(&fw, &PG).await;
    assert_only_open(&pair, &targets(a, &[5432, 9999]), &[(a, 5432)]);
    assert_eq!(
        fw.apply(&PG).await.unwrap().outcome,
        ApplyOutcome::Unchanged
    );

    // A role change is a change.
    assert!(fw.apply(&MYSQL).await.unwrap().changed());
    assert!(!fw.status(&PG).await.unwrap().matches);
    assert_matches(&fw, &MYSQL).await;

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
    fw.apply(&PG).await.unwrap();
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
        ok.apply(&PG).await.unwrap().outcome,
        ApplyOutcome::Unchanged
    );
    assert!(log.exists());

    // Missing nft, missing namespace: clear errors, nothing changes.
    let err = Firewall::new(FirewallConfig {
        nft: "/nonexistent/dbvm/nft".into(),
        ..config(&pair)
    })
    .unwrap()
    .apply(&MYSQL)
    .await
    .unwrap_err();
    assert!(matches!(err, FirewallError::NftMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("install nftables"), "{err}");
    let err = Firewall::new(FirewallConfig {
        netns: Some(format!("{}-gone", pair.db)),
        ..config(&pair)
    })
    .unwrap()
    .apply(&MYSQL)
    .await
    .unwrap_err();
    assert!(matches!(err, FirewallError::NetnsMissing { .. }), "{err:?}");

    assert_eq!(pair.ruleset(Side::Db), live);
    assert_matches(&fw, &PG).await;
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
    fw.apply(&PG).await.unwrap();
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
    .apply(&MYSQL)
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
    assert_matches(&fw, &PG).await;
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
    .apply(&MYSQL)
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
    assert_matches(&fw, &PG).await;

    drop(pair);
    host.assert_unchanged();
}
