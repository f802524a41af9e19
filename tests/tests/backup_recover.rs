//! In-place recover and restore drills end to end: a real broker, real agents,
//! PostgreSQL and pgBackRest in the database image on a real Docker engine, an S3 server
//! that verifies signatures behind TLS (`dbvm_e2e::s3`). Every step is a signed command;
//! the S3 keys travel sealed. Damage to the repository is done for real, on the S3
//! server's files behind the agent's back.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::backup::{archive_now, ms, pg_now, pg_super, Rig, Vm};
use dbvm_protocol::api::CommandState;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

async fn pg(port: u16, password: &str) -> tokio_postgres::Client {
    dbvm_e2e::dbtest::pg_dbaas(port, password, "app")
        .await
        .expect("dbaas connects")
}

async fn insert(c: &tokio_postgres::Client, from: i32, to: i32) {
    c.execute(
        "INSERT INTO t SELECT g, now(), repeat(md5(g::text), 4) FROM generate_series($1::int, $2::int) g",
        &[&from, &to],
    )
    .await
    .unwrap();
}

async fn count(c: &tokio_postgres::Client) -> (i64, i32) {
    let r = c
        .query_one("SELECT count(*), coalesce(max(id), 0) FROM t", &[])
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The largest file of a backup's data (what holds table `t`'s rows).
fn largest_file(dir: &Path) -> PathBuf {
    fn walk(d: &Path, best: &mut Option<(u64, PathBuf)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walk(&p, best);
            } else if best.as_ref().is_none_or(|(n, _)| m.len() > *n) {
                *best = Some((m.len(), p));
            }
        }
    }
    let mut best = None;
    walk(&dir.join("pg_data"), &mut best);
    best.expect("a file in the backup").1
}

/// A PostgreSQL database with table `t` holding rows 1..=100, backups configured into
/// bucket `bkp` (prefix: the agent's id). Returns the dbaas password.
async fn database_with_backups(rig: &Rig, vm: &Vm) -> String {
    let out = rig
        .ok(
            vm,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": vm.port}),
        )
        .await;
    let password = rig.password(&out);
    let c = pg(vm.port, &password).await;
    c.batch_execute("CREATE TABLE t (id int primary key, at timestamptz, pad text)")
        .await
        .unwrap();
    insert(&c, 1, 100).await;
    let (ak, sk) = rig.keys(vm, &rig.s3.secret_key).await;
    rig.ok(
        vm,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    password
}

/// The directory of one backup in the S3 server's files.
fn backup_dir(rig: &Rig, vm: &Vm, label: &str) -> PathBuf {
    rig.s3
        .root
        .join("bkp")
        .join(&vm.agent.id)
        .join("backup")
        .join("db")
        .join(label)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_in_place_to_a_time_keeps_rows_before_it_drops_rows_after_and_backups_go_on() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let vm = rig.vm("rec1").await;
    let password = database_with_backups(&rig, &vm).await;
    let full = rig.ok(&vm, "backup.run", json!({})).await;
    let c = pg(vm.port, &password).await;
    insert(&c, 101, 200).await;
    // The target: after row 200 committed, before row 201 (a second apart each side,
    // beyond the one-second resolution of a backup's stop time).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = pg_now(&c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    insert(&c, 201, 300).await;
    assert_eq!(count(&c).await, (300, 300));
    let before = rig.ok(&vm, "db.status", json!({})).await;

    let out = rig.ok(&vm, "db.recover", json!({ "target": target })).await;
    eprintln!("db.recover: {out}");
    let reached = out["recovered_to_ms"].as_i64().expect("recovered_to_ms");
    let target_ms = ms(&target);
    assert!(
        reached <= target_ms && reached > target_ms - 5_000,
        "reported {reached}, target {target_ms}: {out}"
    );
    assert_eq!(out["backup_set"], full["label"], "{out}");
    assert!(out["took_ms"].as_u64().is_some(), "{out}");

    // Same VM, same container and password: rows before the target are there, rows after
    // it are not, and it takes writes.
    let c = pg(vm.port, &password).await;
    assert_eq!(
        count(&c).await,
        (200, 200),
        "rows before the target are there, rows after it are not"
    );
    c.execute("INSERT INTO t VALUES (1000, now(), 'after')", &[])
        .await
        .unwrap();
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");
    assert_eq!(status["server"]["role"], "primary", "{status}");
    assert_eq!(
        status["container"]["status"]["name"], before["container"]["status"]["name"],
        "{status}"
    );

    // PostgreSQL goes on on a new timeline; archiving and backups go on too.
    let su = pg_super(&rig.data_root(&vm), vm.port).await;
    let timeline: i32 = su
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        timeline >= 2,
        "a new timeline after the recover: {timeline}"
    );
    archive_now(&su).await;
    let next = rig.ok(&vm, "backup.run", json!({})).await;
    eprintln!("backup after the recover: {next}");
    assert!(next["label"].as_str().is_some(), "{next}");

    // The drill on this good chain passes: the copy is checked and matches the quiet
    // source row for row; the result is kept for health; the copy is gone.
    let drill = rig.ok(&vm, "backup.verify", json!({})).await;
    eprintln!("backup.verify: {drill}");
    assert_eq!(drill["ok"], true, "{drill}");
    assert_eq!(drill["backup_set"], next["label"], "{drill}");
    assert_eq!(drill["amcheck"]["exit_code"], 0, "{drill}");
    let tables = drill["tables"].as_array().unwrap();
    let t = tables
        .iter()
        .find(|t| t["table"] == "public.t")
        .unwrap_or_else(|| panic!("table t compared: {drill}"));
    assert_eq!(t["source_rows"], 201, "{drill}");
    assert_eq!(t["restored_rows"], 201, "{drill}");
    assert_eq!(drill["warnings"], json!([]), "{drill}");
    assert!(
        !rig.data_root(&vm).join("verify").exists(),
        "the copy is removed"
    );
    let state: Value = serde_json::from_slice(
        &std::fs::read(vm.agent.state_dir.join("backup").join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["last_verify"]["ok"], true, "{state}");
    assert_eq!(state["last_verify"]["backup_set"], next["label"], "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_outside_the_window_or_with_the_storage_down_is_refused_and_the_database_runs_untouched(
) {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let vm = rig.vm("rec2").await;
    // Before any backup is configured: refused, saying what is missing.
    let out = rig
        .ok(
            &vm,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": vm.port}),
        )
        .await;
    assert_eq!(out["configure"], "done");
    let (state, e) = rig
        .refused(&vm, "db.recover", json!({"target": "latest"}))
        .await;
    assert_eq!(state, CommandState::Rejected, "{e}");
    assert!(e.contains("not configured"), "{e}");
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    rig.ok(
        &vm,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    // Configured, but no backup yet.
    let (_, e) = rig
        .refused(&vm, "db.recover", json!({"target": "latest"}))
        .await;
    assert!(e.contains("no backup"), "{e}");
    let full = rig.ok(&vm, "backup.run", json!({})).await;

    let su = pg_super(&rig.data_root(&vm), vm.port).await;
    let started: String = su
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    for target in ["2001-01-01T00:00:00Z", "2999-01-01T00:00:00Z"] {
        let (state, e) = rig
            .refused(&vm, "db.recover", json!({ "target": target }))
            .await;
        eprintln!("db.recover to {target}: {e}");
        assert_eq!(state, CommandState::Rejected, "{e}");
        assert!(e.contains("outside the recoverable window"), "{e}");
        assert!(e.contains("nothing was changed"), "{e}");
        // The window starts at the end of the first backup.
        let from = full["stopped_ms"].as_i64().unwrap() + 1000;
        let from =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(from) * 1_000_000).unwrap();
        let day = format!(
            "{:04}-{:02}-{:02}",
            from.year(),
            u8::from(from.month()),
            from.day()
        );
        assert!(e.contains(&day), "the window is named: {e}");
    }
    // The storage away: a failure outside the data, said to have changed nothing.
    rig.s3.stop_s3();
    let (_, e) = rig
        .refused(&vm, "db.recover", json!({"target": "latest"}))
        .await;
    eprintln!("db.recover with the storage down: {e}");
    assert!(e.contains("could not be reached"), "{e}");
    assert!(e.contains("nothing was changed"), "{e}");
    rig.s3.start_s3();
    let (state, e) = rig
        .refused(&vm, "db.recover", json!({"target": "yesterday"}))
        .await;
    assert_eq!(state, CommandState::Rejected, "{e}");
    assert!(e.contains("RFC 3339"), "{e}");

    // Untouched: the same server process runs, nothing marked.
    let still: String = su
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .expect("the server was never stopped")
        .get(0);
    assert_eq!(started, still);
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");
    assert_eq!(status["want_running"], true, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_or_deleted_backup_object_is_caught_by_the_drill_by_restore_and_by_recover() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let vm = rig.vm("ver1").await;
    let password = database_with_backups(&rig, &vm).await;
    rig.ok(&vm, "backup.run", json!({})).await;
    let c = pg(vm.port, &password).await;
    insert(&c, 101, 20_000).await;
    let incr = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(incr["type"], "incr", "{incr}");
    let label = incr["label"].as_str().unwrap().to_string();

    // Good before the damage.
    let drill = rig.ok(&vm, "backup.verify", json!({})).await;
    assert_eq!(drill["ok"], true, "{drill}");
    assert_eq!(drill["backup_set"], label, "{drill}");

    // A file of the newest backup corrupted behind the agent's back (bytes in its middle
    // flipped), in the S3 server's own files.
    let victim = largest_file(&backup_dir(&rig, &vm, &label));
    let original = std::fs::read(&victim).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..(mid + 64).min(original.len())] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, &bad).unwrap();
    assert_ne!(
        std::fs::read(&victim).unwrap(),
        original,
        "the damage is real"
    );
    eprintln!("corrupted {}", victim.display());

    let (state, e) = rig.refused(&vm, "backup.verify", json!({})).await;
    eprintln!("backup.verify on a corrupted chain: {e}");
    assert_eq!(state, CommandState::Failed, "{e}");
    assert!(e.contains("FAILED"), "{e}");
    assert!(e.contains(&label), "the backup is named: {e}");
    assert!(e.contains("damaged"), "{e}");
    assert!(
        !rig.data_root(&vm).join("verify").exists(),
        "the copy is removed"
    );
    let state_file: Value = serde_json::from_slice(
        &std::fs::read(vm.agent.state_dir.join("backup").join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state_file["last_verify"]["ok"], false, "{state_file}");
    assert!(
        state_file["last_verify"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&label)),
        "{state_file}"
    );
    // Health says so too: check 10 carries the drill's result.
    let report = rig.ok(&vm, "health", json!({})).await;
    let c10 = report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == "binlog_cloud_sync"))
        .cloned()
        .unwrap_or_default();
    eprintln!("check 10 after the failed drill: {c10}");
    assert_eq!(c10["figures"]["drill_ok"], 0.0, "{c10}");
    assert!(
        c10["message"]
            .as_str()
            .unwrap_or("")
            .contains("restore drill FAILED"),
        "{c10}"
    );

    // A restore from that chain into a new database fails clearly, never silently wrong.
    let dst = rig.vm("ver2").await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(
            &dst,
            "db.restore",
            json!({
                "spec": {"engine": "postgres", "database": "app", "port": dst.port},
                "source": rig.location("bkp", Some("ver1")),
                "access_key_id": ak, "secret_access_key": sk,
                "target": "latest",
            }),
        )
        .await;
    eprintln!("db.restore from a corrupted chain: {e}");
    assert!(e.contains("restore failed"), "{e}");
    assert!(e.contains("damaged"), "{e}");
    assert!(e.contains(&label), "the backup is named: {e}");
    let status = rig.ok(&dst, "db.status", json!({})).await;
    assert_ne!(status["phase"], "configured", "{status}");
    assert_ne!(
        status["container"]["status"]["state"], "Running",
        "no restored server is left serving: {status}"
    );

    // The file put back and then deleted: caught too.
    std::fs::write(&victim, &original).unwrap();
    std::fs::remove_file(&victim).unwrap();
    assert!(!victim.exists(), "the damage is real");
    let (state, e) = rig.refused(&vm, "backup.verify", json!({})).await;
    eprintln!("backup.verify on a chain missing an object: {e}");
    assert_eq!(state, CommandState::Failed, "{e}");
    assert!(e.contains(&label) && e.contains("missing"), "{e}");

    // The source database itself was never touched by the drills.
    let c = pg(vm.port, &password).await;
    assert_eq!(count(&c).await, (20_000, 20_000));

    // An in-place recover from the damaged chain fails once pgBackRest reaches the
    // missing object (rows written since the backup make the delta restore fetch it), and
    // leaves the database stopped and marked: never half-recovered and running.
    insert(&c, 20_001, 21_000).await;
    drop(c);
    let (state, e) = rig
        .refused(&vm, "db.recover", json!({"target": "latest"}))
        .await;
    eprintln!("db.recover from a chain missing an object: {e}");
    assert_eq!(state, CommandState::Failed, "{e}");
    assert!(e.contains("after the data directory was rewritten"), "{e}");
    assert!(
        !e.contains("could not be reached"),
        "the storage answered: {e}"
    );
    assert!(e.contains(&label) && e.contains("missing"), "{e}");
    assert!(e.contains("db.restore"), "what to do is said: {e}");
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status["recovering"].is_object(), "{status}");
    assert_ne!(
        status["container"]["status"]["state"], "Running",
        "not left running half-recovered: {status}"
    );

    // The object back, the recover sent again finishes with every row.
    std::fs::write(&victim, &original).unwrap();
    let out = rig.ok(&vm, "db.recover", json!({"target": "latest"})).await;
    eprintln!("db.recover once the object is back: {out}");
    let c = pg(vm.port, &password).await;
    assert_eq!(count(&c).await, (21_000, 21_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_recover_leaves_the_database_stopped_and_marked_and_recover_again_finishes_it(
) {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let mut vm = rig.vm("rec3").await;
    let password = database_with_backups(&rig, &vm).await;
    rig.ok(&vm, "backup.run", json!({})).await;
    let c = pg(vm.port, &password).await;
    insert(&c, 101, 200).await;
    drop(c);

    // The agent dies right after the data directory was rewritten, before the server
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
            "the agent to exit after the data directory was rewritten",
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

    // The restarted agent does not start the half-recovered directory; status says so
    // and what to do; a plain start is refused. (The reconciler runs every second: the
    // status is watched over several of its passes.)
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
    let (_, e) = rig
        .refused(
            &vm,
            "db.set_parameters",
            json!({"parameters": {"max_connections": 120}, "allow_restart": true}),
        )
        .await;
    assert!(e.contains("recover did not finish"), "{e}");
    // A recover refused now (the storage away) does not pretend all is well.
    rig.s3.stop_s3();
    let (_, e) = rig
        .refused(&vm, "db.recover", json!({"target": "latest"}))
        .await;
    eprintln!("db.recover on a half-restored directory with the storage down: {e}");
    assert!(e.contains("still half-restored"), "{e}");
    rig.s3.start_s3();

    // Sent again, the recover finishes: every row is back, the mark is gone.
    let out = rig.ok(&vm, "db.recover", json!({"target": "latest"})).await;
    eprintln!("db.recover after the interrupted one: {out}");
    let c = pg(vm.port, &password).await;
    assert_eq!(count(&c).await, (200, 200));
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert!(status.get("recovering").is_none(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_drill_leaves_no_copy_behind_and_the_next_drill_passes() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let mut vm = rig.vm("ver3").await;
    let password = database_with_backups(&rig, &vm).await;
    let c = pg(vm.port, &password).await;
    insert(&c, 101, 20_000).await;
    drop(c);
    rig.ok(&vm, "backup.run", json!({})).await;
    let copy = rig.data_root(&vm).join("verify");

    let cmd = rig.fleet.sign(&vm.agent.id, "backup.verify", json!({}));
    let v = rig.client.submit(&cmd).await.unwrap();
    dbvm_e2e::eventually(
        Duration::from_secs(120),
        "the drill to restore into its copy",
        || async {
            let v = rig.client.command(v.id).await.ok()?;
            let restoring = v
                .progress
                .is_some_and(|p| p.message.contains("into a throwaway directory"));
            (restoring && copy.join("data").exists()).then_some(())
        },
    )
    .await;
    vm.agent.proc.kill();
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
    assert_eq!(drill["ok"], true, "{drill}");
    assert!(!copy.exists(), "the copy is removed");
}
