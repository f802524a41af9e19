//! MariaDB's restore drill (`backup.verify`) and in-place recover (`db.recover`) end to
//! end: signed commands to a real agent, MariaDB and mariabackup in the database image on
//! a real Docker engine, the backups in a real S3 server (s3s-fs behind stunnel) whose
//! files the tests damage behind the agent's back.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::backup::{maria, ms, Rig, Vm};
use dbvm_protocol::api::CommandState;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};
use sha2::Digest;
use std::time::Duration;

/// A MariaDB database `app` with a table `t` of `rows` rows on the VM, backups configured
/// into `bucket`; its dbaas password.
async fn database_with_backups(rig: &Rig, vm: &Vm, bucket: &str, rows: i32) -> String {
    let out = rig
        .ok(
            vm,
            "db.create",
            json!({"engine": "mariadb", "database": "app", "port": vm.port}),
        )
        .await;
    let password = rig.password(&out);
    let mut c = maria::connect(vm.port, &password).await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(255))")
        .await
        .unwrap();
    maria::insert(&mut c, 1, rows).await;
    let (ak, sk) = rig.keys(vm, &rig.s3.secret_key).await;
    rig.ok(
        vm,
        "backup.configure",
        json!({"storage": rig.location(bucket, None), "access_key_id": ak, "secret_access_key": sk, "schedule_hours": 0}),
    )
    .await;
    password
}

/// The chains' manifests as the bucket holds them, oldest chain first.
fn manifests(rig: &Rig, bucket: &str, prefix: &str) -> Vec<Value> {
    let dir = rig.s3.root.join(bucket).join(prefix).join("chains");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|d| d.join("manifest.json"))
        .filter(|m| m.exists())
        .map(|m| serde_json::from_slice(&std::fs::read(m).unwrap()).unwrap())
        .collect()
}

/// The number of a binlog (`binlog.000007` is 7).
fn seq(name: &str) -> u64 {
    name.rsplit_once('.').unwrap().1.parse().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Check 10 of a fresh health report.
async fn check10(rig: &Rig, vm: &Vm) -> Value {
    let report = rig.ok(vm, "health", json!({})).await;
    report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == "binlog_cloud_sync"))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_drill_passes_on_a_good_chain_and_names_an_object_corrupted_behind_the_agents_back()
{
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mdr");
    let vm = rig.vm("mdr1").await;
    let password = database_with_backups(&rig, &vm, "mdr", 5_000).await;
    let full = rig.ok(&vm, "backup.run", json!({})).await;
    let mut c = maria::connect(vm.port, &password).await;
    maria::insert(&mut c, 5_001, 8_000).await;
    let incr = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(incr["type"], "incr", "{incr}");

    // A good chain: every object checked, the copy prepared, started and checked, the
    // counts equal to the source's (not written since the backup: a difference would
    // fail the drill), the copy gone afterwards.
    let drill = rig.ok(&vm, "backup.verify", json!({})).await;
    eprintln!("drill on a good chain: {drill}");
    assert_eq!(drill["ok"], true, "{drill}");
    assert_eq!(drill["backup_set"], incr["label"], "{drill}");
    assert_eq!(drill["source_changed_since_backup"], false, "{drill}");
    assert!(drill["objects_checked"].as_u64().unwrap() >= 2, "{drill}");
    let tables = drill["tables"].as_array().unwrap();
    assert_eq!(tables[0]["table"], "`app`.`t`", "{drill}");
    assert_eq!(tables[0]["restored_rows"], 8_000, "{drill}");
    assert_eq!(tables[0]["source_rows"], 8_000, "{drill}");
    assert!(
        drill["table_check"]["tables_checked"].as_u64().unwrap() >= 1,
        "{drill}"
    );
    assert!(
        !rig.data_root(&vm).join("verify").exists(),
        "the copy is removed"
    );
    let c10 = check10(&rig, &vm).await;
    eprintln!("check 10 after the drill: {c10}");
    assert_eq!(c10["figures"]["drill_ok"], 1.0, "{c10}");
    assert!(c10["figures"]["drill_age_s"].as_f64().is_some(), "{c10}");

    // An older backup by its label, with the source moved on: differences are
    // information, not a failure.
    let older = rig
        .ok(&vm, "backup.verify", json!({"backup_set": full["label"]}))
        .await;
    eprintln!("drill of the full backup: {older}");
    assert_eq!(older["ok"], true, "{older}");
    assert_eq!(older["tables"][0]["restored_rows"], 5_000, "{older}");
    assert_eq!(older["source_changed_since_backup"], true, "{older}");
    assert!(
        older["warnings"].to_string().contains("information"),
        "{older}"
    );
    let e = rig
        .refused_message(
            &vm,
            "backup.verify",
            json!({"backup_set": "20000101T000000Z"}),
        )
        .await;
    assert!(e.contains("not in the bucket"), "{e}");

    // The full backup's object corrupted behind the agent's back: bytes in its middle
    // flipped in the S3 server's own file.
    let m = &manifests(&rig, "mdr", "mdr1")[0];
    let key = m["backups"][0]["key"].as_str().unwrap().to_string();
    let object = rig.s3.root.join("mdr/mdr1").join(&key);
    let original = std::fs::read(&object).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..(mid + 64).min(original.len())] {
        *b ^= 0x5a;
    }
    std::fs::write(&object, &bad).unwrap();
    assert_ne!(
        sha256_hex(&std::fs::read(&object).unwrap()),
        m["backups"][0]["sha256"].as_str().unwrap(),
        "the damage is real: the object no longer matches its manifest"
    );

    let (state, e) = rig.refused(&vm, "backup.verify", json!({})).await;
    eprintln!("drill on a corrupted chain: {e}");
    assert_eq!(state, CommandState::Failed, "{e}");
    assert!(e.contains("FAILED"), "{e}");
    assert!(e.contains(&key), "the object is named: {e}");
    assert!(e.contains("damaged"), "{e}");
    assert!(
        !rig.data_root(&vm).join("verify").exists(),
        "the copy is removed"
    );
    let c10 = check10(&rig, &vm).await;
    eprintln!("check 10 after the failed drill: {c10}");
    assert_eq!(c10["figures"]["drill_ok"], 0.0, "{c10}");
    assert!(
        c10["message"]
            .as_str()
            .unwrap_or("")
            .contains("restore drill FAILED"),
        "{c10}"
    );

    // A binlog of the chain deleted behind the agent's back: named too.
    std::fs::write(&object, &original).unwrap();
    let log = dbvm_e2e::eventually(Duration::from_secs(60), "a binlog uploaded", || async {
        let m = manifests(&rig, "mdr", "mdr1").pop()?;
        m["binlogs"][0]["key"].as_str().map(str::to_string)
    })
    .await;
    let log_file = rig.s3.root.join("mdr/mdr1").join(&log);
    std::fs::remove_file(&log_file).unwrap();
    assert!(!log_file.exists(), "the binlog is gone");
    let e = rig.refused_message(&vm, "backup.verify", json!({})).await;
    eprintln!("drill with a binlog missing: {e}");
    assert!(e.contains(&log), "the binlog is named: {e}");
    assert!(e.contains("does not exist"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_recover_in_place_to_a_time_drops_later_rows_keeps_earlier_ones_and_refuses_a_target_before_the_first_backup(
) {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mrc");
    let vm = rig.vm("mrc1").await;
    let password = database_with_backups(&rig, &vm, "mrc", 1_000).await;
    let mut c = maria::connect(vm.port, &password).await;
    let before_backups = maria::now(&mut c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let full = rig.ok(&vm, "backup.run", json!({})).await;
    maria::insert(&mut c, 1_001, 2_000).await;
    let incr = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(incr["type"], "incr", "{incr}");
    maria::insert(&mut c, 2_001, 3_000).await;
    // The target: a whole second after row 3000, a whole second before row 3001.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = maria::now(&mut c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    maria::insert(&mut c, 3_001, 4_000).await;
    assert_eq!(maria::count_max(&mut c).await, (4_000, Some(4_000)));

    // A target before the first backup: refused with the window, nothing changed (the
    // same server process answers, no marker, the rows all there).
    let conn_id: Option<u64> = c.query_first("SELECT CONNECTION_ID()").await.unwrap();
    let (state, e) = rig
        .refused(&vm, "db.recover", json!({"target": before_backups}))
        .await;
    eprintln!("recover to before the first backup: {e}");
    assert_eq!(state, CommandState::Rejected, "{e}");
    assert!(e.contains("before the first backup"), "{e}");
    assert!(e.contains("recoverable window"), "{e}");
    assert!(e.contains("nothing was changed"), "{e}");
    let still: Option<u64> = c
        .query_first("SELECT CONNECTION_ID()")
        .await
        .expect("the same connection answers: the server was never stopped");
    assert_eq!(still, conn_id);
    assert_eq!(maria::count_max(&mut c).await, (4_000, Some(4_000)));
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");

    // The storage unreachable: refused before anything is touched.
    rig.s3.stop_s3();
    let e = rig
        .refused_message(&vm, "db.recover", json!({"target": "latest"}))
        .await;
    eprintln!("recover with the storage down: {e}");
    assert!(e.contains("could not be reached"), "{e}");
    assert!(e.contains("nothing was changed"), "{e}");
    rig.s3.start_s3();
    let still: Option<u64> = c
        .query_first("SELECT CONNECTION_ID()")
        .await
        .expect("the same connection answers: the server was never stopped");
    assert_eq!(still, conn_id);
    drop(c);

    // The incremental's object damaged behind the agent's back: the recover stops the
    // server and moves the data aside, finds the damage while it streams, puts the old
    // data directory back and starts the database again as it was.
    let m = &manifests(&rig, "mrc", "mrc1")[0];
    let key = m["backups"][1]["key"].as_str().unwrap().to_string();
    let object = rig.s3.root.join("mrc/mrc1").join(&key);
    let original = std::fs::read(&object).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..(mid + 64).min(original.len())] {
        *b ^= 0x5a;
    }
    std::fs::write(&object, &bad).unwrap();
    assert_ne!(
        sha256_hex(&std::fs::read(&object).unwrap()),
        m["backups"][1]["sha256"].as_str().unwrap(),
        "the damage is real"
    );
    let e = rig
        .refused_message(&vm, "db.recover", json!({"target": target}))
        .await;
    eprintln!("recover from a damaged object: {e}");
    assert!(e.contains(&key) && e.contains("damaged"), "{e}");
    assert!(
        e.contains("put back") && e.contains("runs as before"),
        "{e}"
    );
    let mut c = maria::connect(vm.port, &password).await;
    assert_eq!(maria::count_max(&mut c).await, (4_000, Some(4_000)));
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");
    drop(c);
    std::fs::write(&object, &original).unwrap();
    let used_before = manifests(&rig, "mrc", "mrc1")
        .iter()
        .flat_map(|m| m["binlogs"].as_array().cloned().unwrap_or_default())
        .map(|b| seq(b["name"].as_str().unwrap()))
        .max()
        .unwrap_or(0);

    // In place to the target.
    let out = rig.ok(&vm, "db.recover", json!({"target": target})).await;
    eprintln!("recover: {out}");
    assert_eq!(out["backup_set"], incr["label"], "{out}");
    let reached = out["recovered_to_ms"].as_i64().unwrap();
    assert!(
        reached <= ms(&target) && reached > ms(&target) - 2_000,
        "{out}"
    );
    assert!(out["binlogs_replayed"].as_u64().unwrap() >= 1, "{out}");
    assert!(out["new_chain"]["full"].as_str().is_some(), "{out}");
    let mut c = maria::connect(vm.port, &password).await;
    assert_eq!(
        maria::count_max(&mut c).await,
        (3_000, Some(3_000)),
        "rows before the target present, rows after it absent"
    );
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");
    assert!(
        !rig.data_root(&vm).join("recover-old").exists(),
        "the old data directory is removed once the recovered one runs"
    );

    // The recovered database goes on: it takes writes, its new chain is a full backup of
    // its own, and its binlogs continue past every number the old chain used.
    maria::insert(&mut c, 5_001, 5_500).await;
    let ms_all = manifests(&rig, "mrc", "mrc1");
    assert_eq!(ms_all.len(), 2, "a new chain: {ms_all:?}");
    assert_eq!(ms_all[1]["backups"][0]["kind"], "full", "{ms_all:?}");
    assert_eq!(ms_all[0]["chain"], full["label"], "{ms_all:?}");
    let continues = seq(out["binlogs_continue_at"].as_str().unwrap());
    assert!(
        continues >= used_before + 2,
        "a gap after the old timeline: {out}"
    );
    let new_first = seq(ms_all[1]["backups"][0]["binlog_file"].as_str().unwrap());
    assert!(new_first >= continues, "{ms_all:?}");
    let next = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(next["type"], "incr", "{next}");
    assert_eq!(next["chain"]["full"], out["new_chain"]["full"], "{next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_agent_killed_mid_recover_leaves_the_database_stopped_and_marked_and_recover_again_finishes_it(
) {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mrk");
    let mut vm = rig.vm("mrk1").await;
    let password = database_with_backups(&rig, &vm, "mrk", 1_000).await;
    rig.ok(&vm, "backup.run", json!({})).await;
    let mut c = maria::connect(vm.port, &password).await;
    maria::insert(&mut c, 1_001, 2_000).await;
    drop(c);
    let old = rig.data_root(&vm).join("recover-old");

    // The agent dies right after the new data directory was filled, before the server
    // starts on it (fault injection: the process exits at exactly that point, as a kill
    // would; a kill from outside cannot land there reliably).
    vm.agent.proc.kill();
    vm.agent = rig.fleet.start_agent_env(
        &vm.agent.id,
        rig.broker.agent_addr,
        None,
        &vm.section,
        &[(
            dbvm_agent::db::manager::FAULT_EXIT_AFTER_PHASE,
            "recover-restored",
        )],
    );
    dbvm_e2e::connected(&rig.client, &vm.agent.id).await;
    let cmd = rig
        .fleet
        .sign(&vm.agent.id, "db.recover", json!({"target": "latest"}));
    let v = rig.client.submit(&cmd).await.unwrap();
    {
        let agent = std::sync::Mutex::new(&mut vm.agent);
        dbvm_e2e::eventually(
            Duration::from_secs(120),
            "the agent to exit after the data directory was filled",
            || async { (!agent.lock().unwrap().proc.is_running()).then_some(()) },
        )
        .await;
    }
    vm.agent = rig.fleet.restart_agent(&vm.agent);
    let done = rig
        .client
        .wait(v.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Interrupted, "{done:?}");
    assert!(
        old.join("binlog.index").exists(),
        "the old data directory waits beside the half-restored one"
    );

    // Never started on the half-restored directory; status says what to do.
    for _ in 0..5 {
        let status = rig.ok(&vm, "db.status", json!({})).await;
        assert!(
            status["recovering"]["what_to_do"]
                .as_str()
                .is_some_and(|s| s.contains("db.recover again")),
            "{status}"
        );
        assert_ne!(
            status["container"]["status"]["state"], "Running",
            "never started on a half-restored data directory: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, e) = rig.refused(&vm, "db.start", json!({})).await;
    assert!(e.contains("recover did not finish"), "{e}");

    // Sent again, the recover finishes: every row is back (the binlog uploaded before the
    // first attempt replayed), the mark and the old directory gone.
    let out = rig.ok(&vm, "db.recover", json!({"target": "latest"})).await;
    eprintln!("db.recover after the interrupted one: {out}");
    let mut c = maria::connect(vm.port, &password).await;
    assert_eq!(maria::count_max(&mut c).await, (2_000, Some(2_000)));
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");
    assert!(!old.exists(), "the old data directory is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_agent_killed_mid_drill_leaves_no_copy_behind_and_the_next_drill_passes() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mdk");
    let mut vm = rig.vm("mdk1").await;
    let password = database_with_backups(&rig, &vm, "mdk", 1_000).await;
    let mut c = maria::connect(vm.port, &password).await;
    // Enough data that the drill unpacks, prepares and checks for seconds, so the kill
    // lands inside it.
    for k in 0..2 {
        c.exec_drop(
            "INSERT INTO t (id, pad) SELECT seq, CONCAT(SHA2(seq, 512), SHA2(seq + 7, 256)) FROM seq_1_to_10000000 WHERE seq BETWEEN ? AND ?",
            (1_000 + k * 200_000 + 1, 1_000 + (k + 1) * 200_000),
        )
        .await
        .unwrap();
    }
    drop(c);
    rig.ok(&vm, "backup.run", json!({})).await;
    let copy = rig.data_root(&vm).join("verify");

    let cmd = rig.fleet.sign(&vm.agent.id, "backup.verify", json!({}));
    let v = rig.client.submit(&cmd).await.unwrap();
    dbvm_e2e::eventually(
        Duration::from_secs(120),
        "the drill to unpack into its copy",
        || async {
            let v = rig.client.command(v.id).await.ok()?;
            (v.state == CommandState::Running && copy.join("b0").exists()).then_some(())
        },
    )
    .await;
    vm.agent.proc.kill();
    assert!(copy.exists(), "the kill left the copy behind");
    vm.agent = rig.fleet.restart_agent(&vm.agent);
    let done = rig
        .client
        .wait(v.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Interrupted, "{done:?}");
    dbvm_e2e::eventually(
        Duration::from_secs(60),
        "the restarted agent to remove the drill's copy",
        || async { (!copy.exists()).then_some(()) },
    )
    .await;

    let drill = rig.ok(&vm, "backup.verify", json!({})).await;
    eprintln!("the drill after the kill: {drill}");
    assert_eq!(drill["ok"], true, "{drill}");
    assert_eq!(drill["tables"][0]["restored_rows"], 401_000, "{drill}");
    assert!(!copy.exists(), "the copy is removed");
}
