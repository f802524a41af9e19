//! Backups end to end: a real broker, real agents, PostgreSQL and pgBackRest in the
//! database image on a real Docker engine, an S3 server that verifies signatures behind
//! TLS (`dbvm_e2e::s3`). Every step is a signed command; the S3 keys travel sealed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::backup::{archive_now, pg_super, Rig, Tmpfs, Vm};
use dbvm_protocol::api::CommandState;
use dbvm_protocol::seal::Sealed;
use serde_json::{json, Value};
use std::time::Duration;

/// A PostgreSQL database `app` on the VM; its dbaas password.
async fn create_postgres(rig: &Rig, vm: &Vm) -> String {
    let out = rig
        .ok(
            vm,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": vm.port}),
        )
        .await;
    rig.password(&out)
}

async fn pg(port: u16, password: &str) -> tokio_postgres::Client {
    dbvm_e2e::dbtest::pg_dbaas(port, password, "app")
        .await
        .expect("dbaas connects")
}

async fn insert(c: &tokio_postgres::Client, from: i32, to: i32) {
    c.execute(
        "INSERT INTO t SELECT g, now() FROM generate_series($1::int, $2::int) g",
        &[&from, &to],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backup_then_point_in_time_restore_into_a_new_database() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let src = rig.vm("src1").await;
    let password = create_postgres(&rig, &src).await;
    let c = pg(src.port, &password).await;
    c.batch_execute("CREATE TABLE t (id int primary key, at timestamptz)")
        .await
        .unwrap();
    insert(&c, 1, 100).await;

    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    let out = rig
        .ok(
            &src,
            "backup.configure",
            json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk, "retention_days": 7}),
        )
        .await;
    assert_eq!(out["check"], "ok", "{out}");
    assert_eq!(out["parameters"]["archive_mode"], "on", "{out}");
    assert_eq!(out["parameters"]["restarted"], true, "{out}");
    let raw = out.to_string();
    assert!(
        !raw.contains(&rig.s3.secret_key) && !raw.contains(&rig.s3.access_key),
        "keys never come back: {raw}"
    );

    // A bad reconfiguration (a CA that did not sign the server) is refused and leaves the
    // working setup alone: the backups below use it.
    let mut other_ca = rig.location("bkp", None);
    other_ca["ca_pem"] = json!(std::fs::read_to_string(rig.s3.other_ca_pem()).unwrap());
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(
            &src,
            "backup.configure",
            json!({"storage": other_ca, "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    assert!(e.contains("TLS certificate"), "{e}");

    let c = pg(src.port, &password).await;
    let full = rig.ok(&src, "backup.run", json!({})).await;
    assert_eq!(full["type"], "full", "{full}");
    insert(&c, 101, 200).await;
    let incr = rig.ok(&src, "backup.run", json!({})).await;
    assert_eq!(incr["type"], "incr", "{incr}");
    assert_eq!(incr["chain"]["full"], full["label"], "{incr}");
    insert(&c, 201, 300).await;

    // The target: after row 300 committed, before row 301.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target: String = c
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    insert(&c, 301, 400).await;
    archive_now(&pg_super(&rig.fleet.path("src1-db"), src.port).await).await;

    let list = rig.ok(&src, "backup.list", json!({})).await;
    assert_eq!(list["chains"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        list["chains"][0]["backups"].as_array().unwrap().len(),
        2,
        "{list}"
    );
    assert!(list["recoverable"]["from_ms"].as_i64().is_some(), "{list}");

    // A new VM restores the source's chain up to the target.
    let dst = rig.vm("dst1").await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let restore = json!({
        "spec": {"engine": "postgres", "database": "app", "port": dst.port},
        "source": rig.location("bkp", Some("src1")),
        "access_key_id": ak, "secret_access_key": sk,
        "target": target,
    });
    let out = rig.ok(&dst, "db.restore", restore.clone()).await;
    eprintln!("restore: {}", out["restored"]);
    eprintln!("restore timings: {}", out["timings"]);
    let target_ms =
        time::OffsetDateTime::parse(&target, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos()
            / 1_000_000;
    let reached = out["restored"]["recovered_to_ms"]
        .as_i64()
        .expect("the point reached is reported");
    assert!(
        i128::from(reached) <= target_ms && i128::from(reached) > target_ms - 5_000,
        "reported {reached}, target {target_ms}: {out}"
    );
    assert!(
        out["restored"]["backup_set"]
            .as_str()
            .is_some_and(|s| s == incr["label"]),
        "the newest backup before the target was used: {out}"
    );
    assert!(
        !out.to_string().contains(&rig.s3.secret_key),
        "keys never come back"
    );
    let restored_password = rig.password(&out);
    let d = pg(dst.port, &restored_password).await;
    let (n, max): (i64, i32) = {
        let r = d
            .query_one("SELECT count(*), max(id) FROM t", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (n, max),
        (300, 300),
        "rows before the target are there, rows after it are not"
    );
    // It takes writes, and the source's keys are gone from the new VM.
    d.execute("INSERT INTO t VALUES (1000, now())", &[])
        .await
        .unwrap();
    let leftover = rig
        .fleet
        .path("dst1-db")
        .join("conf")
        .join("pgbackrest-restore.conf");
    assert!(!leftover.exists(), "{} left behind", leftover.display());
    // The same restore again is a no-op; a create on that VM is refused.
    let again = rig.ok(&dst, "db.restore", restore).await;
    assert_eq!(again["configure"], "already done", "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_storage_is_refused_and_changes_nothing() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let vm = rig.vm("bad1").await;
    let password = create_postgres(&rig, &vm).await;

    // Refused before anything runs.
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    let mut plain = rig.location("bkp", None);
    plain["endpoint"] = json!(format!("http://localhost:{}", rig.s3.http_port));
    let (state, e) = rig
        .refused(
            &vm,
            "backup.configure",
            json!({"storage": plain, "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    assert_eq!(state, CommandState::Rejected, "{e}");
    assert!(e.contains("plain HTTP"), "{e}");
    let (state, e) = rig.refused(&vm, "backup.run", json!({})).await;
    assert_eq!(state, CommandState::Rejected, "{e}");
    assert!(e.contains("not configured"), "{e}");

    // Refused by the storage: wrong secret, unknown bucket, a certificate from another CA.
    let wrong = "wrong-secret-0123456789abcdef";
    let (ak, sk) = rig.keys(&vm, wrong).await;
    let (_, e) = rig
        .refused(
            &vm,
            "backup.configure",
            json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(
        !e.contains(wrong) && !e.contains(&rig.s3.access_key),
        "the keys are never echoed: {e}"
    );
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(
            &vm,
            "backup.configure",
            json!({"storage": rig.location("nobucket", None), "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    assert!(e.contains("bucket does not exist"), "{e}");
    let mut other_ca = rig.location("bkp", None);
    other_ca["ca_pem"] = json!(std::fs::read_to_string(rig.s3.other_ca_pem()).unwrap());
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(
            &vm,
            "backup.configure",
            json!({"storage": other_ca, "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    assert!(e.contains("TLS certificate"), "{e}");

    // Nothing changed: archiving is off, no pgBackRest config, the database serves.
    let status = rig.ok(&vm, "db.status", json!({})).await;
    assert_eq!(status["restart_pending"], json!([]), "{status}");
    let conf = rig.fleet.path("bad1-db").join("conf");
    assert!(!conf.join("pgbackrest.conf").exists());
    for f in ["pgbackrest.conf.new", "backup-ca.pem", "backup-ca.pem.new"] {
        assert!(!conf.join(f).exists(), "{f} left behind");
    }
    let c = pg(vm.port, &password).await;
    let mode: String = c.query_one("SHOW archive_mode", &[]).await.unwrap().get(0);
    assert_eq!(mode, "off");

    // A restore to before the first backup of an empty repository names the problem.
    let dst = rig.vm("bad2").await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(
            &dst,
            "db.restore",
            json!({
                "spec": {"engine": "postgres", "database": "app", "port": dst.port},
                "source": rig.location("bkp", Some("nothing-here")),
                "access_key_id": ak, "secret_access_key": sk,
                "target": "latest",
            }),
        )
        .await;
    assert!(e.contains("no complete backup in bkp/nothing-here"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_keeps_the_wal_goes_critical_and_catches_up_when_it_returns() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let vm = rig.vm("down1").await;
    let password = create_postgres(&rig, &vm).await;
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    rig.ok(
        &vm,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    rig.ok(&vm, "backup.run", json!({})).await;
    let c = pg(vm.port, &password).await;
    c.batch_execute("CREATE TABLE t (id int primary key, at timestamptz)")
        .await
        .unwrap();
    let root = rig.fleet.path("down1-db");
    let su = pg_super(&root, vm.port).await;

    // The storage goes away: a backup fails clearly, archiving fails, the segment stays.
    rig.s3.stop_s3();
    insert(&c, 1, 100).await;
    let seg: String = su
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    let (_, e) = rig.refused(&vm, "backup.run", json!({})).await;
    eprintln!("backup.run with the storage down: {e}");
    assert!(
        e.contains("backup repository") || e.contains("pgbackrest"),
        "{e}"
    );
    let (status, message) = dbvm_e2e::eventually(
        Duration::from_secs(60),
        "check 9 to go critical",
        || async {
            let (s, m) = rig.check(&vm, "binlog").await;
            (s == "critical").then_some((s, m))
        },
    )
    .await;
    eprintln!("check 9 with the storage down: {message}");
    assert!(message.contains("FAILING"), "{status}: {message}");
    let (status, message) = rig.check(&vm, "binlog_cloud_sync").await;
    eprintln!("check 10 with the storage down: {status}: {message}");
    assert_eq!(status, "critical", "{message}");
    let kept: bool = su
        .query_one(
            "SELECT count(*) = 1 FROM pg_ls_waldir() WHERE name = $1",
            &[&seg],
        )
        .await
        .unwrap()
        .get(0);
    assert!(kept, "the unarchived segment {seg} is kept");

    // It comes back: archiving catches up by itself, the check recovers, backups work.
    rig.s3.start_s3();
    archive_now(&su).await;
    dbvm_e2e::eventually(Duration::from_secs(90), "check 9 to recover", || async {
        let (s, _) = rig.check(&vm, "binlog").await;
        (s == "ok").then_some(())
    })
    .await;
    let next = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(next["type"], "incr", "the chain is intact: {next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_backup_reports_it_interrupted_and_the_next_backup_works() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let mut vm = rig.vm("kill1").await;
    let password = create_postgres(&rig, &vm).await;
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    rig.ok(
        &vm,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    // Enough data that the full backup takes seconds, so the kill lands inside it.
    pg(vm.port, &password)
        .await
        .batch_execute(
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad FROM generate_series(1, 2000000) g",
        )
        .await
        .unwrap();

    let cmd = rig.fleet.sign(&vm.agent.id, "backup.run", json!({}));
    let v = rig.client.submit(&cmd).await.unwrap();
    dbvm_e2e::eventually(Duration::from_secs(60), "the backup to start", || async {
        let v = rig.client.command(v.id).await.ok()?;
        v.progress
            .filter(|p| p.message.contains("backup starting"))
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    vm.agent.proc.kill();
    vm.agent = rig.fleet.restart_agent(&vm.agent);
    let done = rig
        .client
        .wait(v.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Interrupted, "{done:?}");

    // The next backup replaces what the killed agent left running and succeeds; the
    // repository lists only complete backups.
    let next = rig.ok(&vm, "backup.run", json!({})).await;
    eprintln!("the backup after the kill: {next}");
    let list = rig.ok(&vm, "backup.list", json!({})).await;
    let sets: Vec<&Value> = list["chains"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["backups"].as_array().unwrap())
        .collect();
    assert!(!sets.is_empty(), "{list}");
    assert!(sets.iter().all(|b| b["error"] == false), "{list}");
    assert!(sets.iter().any(|b| b["label"] == next["label"]), "{list}");
}

/// The database's clock now, as an RFC 3339 target.
async fn db_now(c: &tokio_postgres::Client) -> String {
    c.query_one(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn count(port: u16, out: &Value, rig: &Rig) -> i64 {
    pg(port, &rig.password(out))
        .await
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_outside_the_recoverable_window_names_it_and_a_corrected_target_works() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let src = rig.vm("win1").await;
    let password = create_postgres(&rig, &src).await;
    let c = pg(src.port, &password).await;
    c.batch_execute("CREATE TABLE t (id int primary key, at timestamptz)")
        .await
        .unwrap();
    insert(&c, 1, 100).await;
    let before_backups = db_now(&c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    rig.ok(
        &src,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    let full = rig.ok(&src, "backup.run", json!({})).await;
    // backup.configure restarted the server (archive_mode): a new session.
    let c = pg(src.port, &password).await;
    insert(&c, 101, 200).await;
    archive_now(&pg_super(&rig.fleet.path("win1-db"), src.port).await).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Nothing is committed after this: the archive ends before it.
    let after_logs = db_now(&c).await;

    let dst = rig.vm("win2").await;
    let restore = |target: &str, ak: Sealed, sk: Sealed| {
        json!({
            "spec": {"engine": "postgres", "database": "app", "port": dst.port},
            "source": rig.location("bkp", Some("win1")),
            "access_key_id": ak, "secret_access_key": sk,
            "target": target,
        })
    };
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(&dst, "db.restore", restore(&before_backups, ak, sk))
        .await;
    eprintln!("target before the first backup: {e}");
    assert!(
        e.contains("before the recoverable window")
            && e.contains(full["label"].as_str().unwrap())
            && e.contains("nothing was restored"),
        "{e}"
    );
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(&dst, "db.restore", restore(&after_logs, ak, sk))
        .await;
    eprintln!("target after the last archived transaction: {e}");
    assert!(
        e.contains("after the last archived transaction") && e.contains("recoverable window"),
        "{e}"
    );
    // The same VM takes the restore again with a target inside the window.
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let out = rig.ok(&dst, "db.restore", restore("latest", ak, sk)).await;
    assert_eq!(count(dst.port, &out, &rig).await, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_the_restore_target_fails_clearly_and_a_retry_with_room_works() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let src = rig.vm("fill1").await;
    let password = create_postgres(&rig, &src).await;
    let c = pg(src.port, &password).await;
    // About 150 MB of table: more than the target's disk holds at first.
    c.batch_execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad FROM generate_series(1, 1000000) g",
    )
    .await
    .unwrap();
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    rig.ok(
        &src,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    rig.ok(&src, "backup.run", json!({})).await;

    // The target VM's data disk is 64 MiB.
    let disk = Tmpfs::mount(&rig.fleet.path("fill2-db"), "64m");
    let dst = rig.vm("fill2").await;
    let restore = |ak: Sealed, sk: Sealed| {
        json!({
            "spec": {"engine": "postgres", "database": "app", "port": dst.port},
            "source": rig.location("bkp", Some("fill1")),
            "access_key_id": ak, "secret_access_key": sk,
            "target": "latest",
        })
    };
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let (_, e) = rig.refused(&dst, "db.restore", restore(ak, sk)).await;
    eprintln!("restore onto a full disk: {e}");
    assert!(e.contains("data disk of this VM is too small"), "{e}");
    let status = rig.ok(&dst, "db.status", json!({})).await;
    assert_ne!(status["phase"], "configured", "{status}");

    // Given room, the same command succeeds and everything is there.
    disk.resize("1g");
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let out = rig.ok(&dst, "db.restore", restore(ak, sk)).await;
    assert_eq!(count(dst.port, &out, &rig).await, 1_000_000, "{out}");
    // The agents first: one still running brings back the container the rig removes,
    // and that database outlives the test (its archiver hung on the stopped S3 server).
    // Then the containers, then the disk under one of them.
    drop(dst);
    drop(src);
    drop(rig);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_during_a_backup_fails_it_with_the_reason_and_the_chain_stays_valid() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let vm = rig.vm("mid1").await;
    let password = create_postgres(&rig, &vm).await;
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    rig.ok(
        &vm,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    let first = rig.ok(&vm, "backup.run", json!({})).await;
    // Enough changed data that the next backup takes seconds.
    pg(vm.port, &password)
        .await
        .batch_execute(
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad FROM generate_series(1, 2000000) g",
        )
        .await
        .unwrap();

    let sets = rig
        .s3
        .root
        .join("bkp")
        .join("mid1")
        .join("backup")
        .join("db");
    let first_label = first["label"].as_str().unwrap().to_string();
    let cmd = rig.fleet.sign(&vm.agent.id, "backup.run", json!({}));
    let v = rig.client.submit(&cmd).await.unwrap();
    // The storage goes away once the new backup's first files are in the bucket.
    let new_label = dbvm_e2e::eventually(
        Duration::from_secs(120),
        "the new backup's files to reach the bucket",
        || async {
            std::fs::read_dir(&sets)
                .ok()?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .find(|n| n.starts_with(&first_label[..8]) && *n != first_label && n.contains('_'))
                .filter(|n| sets.join(n).join("pg_data").exists())
        },
    )
    .await;
    rig.s3.stop_s3();
    let done = rig
        .client
        .wait(v.id, Duration::from_secs(300))
        .await
        .unwrap();
    let e = done
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    eprintln!("backup {new_label} with the storage gone midway: {e}");
    assert_eq!(done.state, CommandState::Failed, "{done:?}");
    assert!(e.contains("could not be reached"), "{e}");

    // Back: the repository lists only the complete backup, and the chain goes on.
    rig.s3.start_s3();
    let list = rig.ok(&vm, "backup.list", json!({})).await;
    let labels: Vec<&str> = list["chains"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["backups"].as_array().unwrap())
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, vec![first_label.as_str()], "{list}");
    let next = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(next["type"], "incr", "{next}");
    assert_eq!(next["chain"]["full"], first["label"], "{next}");
}

/// WAL on disk: bytes and segment names, oldest first.
async fn wal(su: &tokio_postgres::Client) -> (i64, Vec<String>) {
    let rows = su
        .query(
            "SELECT name, size FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$' ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    (
        rows.iter().map(|r| r.get::<_, i64>(1)).sum(),
        rows.iter().map(|r| r.get(0)).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_under_its_cap_while_archiving_works_and_nothing_unarchived_goes_when_it_breaks()
{
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    let _disk = Tmpfs::mount(&rig.fleet.path("cap1-db"), "1g");
    let vm = rig.vm("cap1").await;
    let password = create_postgres(&rig, &vm).await;
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    let out = rig
        .ok(
            &vm,
            "backup.configure",
            json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    let cap = out["parameters"]["wal_cap_bytes"]
        .as_i64()
        .expect("the cap is reported");
    assert_eq!(cap, (1i64 << 30) / 100 * 15, "15% of the data disk: {out}");
    let su = pg_super(&rig.fleet.path("cap1-db"), vm.port).await;
    let max_wal: String = su.query_one("SHOW max_wal_size", &[]).await.unwrap().get(0);
    assert_eq!(max_wal, format!("{}MB", (cap / 2) >> 20));
    let c = pg(vm.port, &password).await;
    c.batch_execute(
        "CREATE TABLE churn AS SELECT g AS id, md5(g::text) AS pad FROM generate_series(1, 50000) g",
    )
    .await
    .unwrap();

    // A write load with archiving working: WAL stays under the cap.
    let mut peak = 0i64;
    let start = su_lsn(&su).await;
    for _ in 0..40 {
        c.batch_execute("UPDATE churn SET pad = md5(pad)")
            .await
            .unwrap();
        peak = peak.max(wal(&su).await.0);
    }
    let written = su_lsn(&su).await - start;
    let (status, message) = rig.check(&vm, "binlog").await;
    eprintln!(
        "archiving on: {} MiB of WAL written, peak on disk {} MiB, cap {} MiB; check 9 {status}: {message}",
        written >> 20,
        peak >> 20,
        cap >> 20
    );
    assert!(written > 2 * cap, "the load wrote more than twice the cap");
    assert!(
        peak < cap,
        "WAL peaked at {peak} bytes, over the cap of {cap}"
    );
    assert_ne!(status, "critical", "{message}");

    // The storage goes away: WAL grows past the cap, every unarchived segment stays, and
    // check 9 is critical.
    rig.s3.stop_s3();
    let first_unarchived: String = su
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..40 {
        c.batch_execute("UPDATE churn SET pad = md5(pad)")
            .await
            .unwrap();
    }
    su.batch_execute("CHECKPOINT").await.unwrap();
    let (bytes, names) = wal(&su).await;
    let kept: Vec<u64> = names
        .iter()
        .filter(|n| n.as_str() >= first_unarchived.as_str())
        .map(|n| u64::from_str_radix(&n[8..], 16).unwrap())
        .collect();
    let segments_per_log = 0x1_0000_0000u64 / (16 << 20);
    let seq = |v: u64| (v >> 32) * segments_per_log + (v & 0xffff_ffff);
    assert!(
        kept.windows(2).all(|w| seq(w[1]) == seq(w[0]) + 1) && kept.len() > 10,
        "every segment since archiving broke is still there: {names:?}"
    );
    assert!(
        bytes > cap,
        "WAL grew past the cap with archiving broken: {bytes}"
    );
    let (status, message) = dbvm_e2e::eventually(
        Duration::from_secs(60),
        "check 9 critical over the cap",
        || async {
            let (s, m) = rig.check(&vm, "binlog").await;
            (s == "critical" && m.contains("OVER its cap")).then_some((s, m))
        },
    )
    .await;
    eprintln!(
        "archiving broken: {} MiB of WAL; check 9 {status}: {message}",
        bytes >> 20
    );

    // Back: the archive catches up and WAL returns under the cap.
    rig.s3.start_s3();
    archive_now(&su).await;
    su.batch_execute("CHECKPOINT").await.unwrap();
    dbvm_e2e::eventually(
        Duration::from_secs(120),
        "WAL back under the cap",
        || async {
            su.batch_execute("CHECKPOINT").await.ok()?;
            (wal(&su).await.0 < cap).then_some(())
        },
    )
    .await;
}

async fn su_lsn(su: &tokio_postgres::Client) -> i64 {
    su.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purger_removes_a_chain_only_after_its_last_backup_expired_and_keeps_the_newest() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    // Days cannot pass in a test: the debug agent takes a 20 s retention day (and no
    // schedule: its backups would land in the middle of this one's).
    let vm = rig
        .vm_env("purge1", &[(dbvm_agent::backup::TEST_DAY_S, "20")])
        .await;
    let password = create_postgres(&rig, &vm).await;
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    rig.ok(
        &vm,
        "backup.configure",
        json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk, "retention_days": 1, "schedule_hours": 0}),
    )
    .await;
    let f1 = rig.ok(&vm, "backup.run", json!({})).await;
    let chain_expiry = f1["chain"]["expires_ms"].as_i64().unwrap();
    let c = pg(vm.port, &password).await;
    c.batch_execute("CREATE TABLE t (id int primary key, at timestamptz)")
        .await
        .unwrap();
    insert(&c, 1, 100).await;
    // The chain's last incremental, late in its day: it keeps the chain a day longer.
    tokio::time::sleep(Duration::from_millis(
        (chain_expiry - 6_000 - dbvm_protocol::now_ms()).max(0) as u64,
    ))
    .await;
    let i1 = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(i1["type"], "incr", "{i1}");
    // The chain's day is over: the next backup starts a new chain.
    tokio::time::sleep(Duration::from_millis(
        (chain_expiry - dbvm_protocol::now_ms()).max(0) as u64 + 500,
    ))
    .await;
    let f2 = rig.ok(&vm, "backup.run", json!({})).await;
    assert_eq!(f2["type"], "full", "{f2}");

    // The old chain's incremental is younger than a day: the chain stays.
    let p = rig.ok(&vm, "backup.purge", json!({})).await;
    eprintln!("purge before the old chain's last backup expired: {p}");
    assert_eq!(p["purged"], json!([]), "{p}");
    assert_eq!(p["chains"][0]["purge"], false, "{p}");
    let from = p["chains"][0]["purgeable_from_ms"].as_i64().unwrap();
    assert!(
        from >= i1["started_ms"].as_i64().unwrap() + 20_000,
        "kept a day after its LAST backup: {p}"
    );
    tokio::time::sleep(Duration::from_millis(
        (from - dbvm_protocol::now_ms()).max(0) as u64 + 500,
    ))
    .await;
    let p = rig.ok(&vm, "backup.purge", json!({})).await;
    eprintln!("purge after it expired: {p}");
    assert_eq!(p["purged"], json!([f1["label"]]), "{p}");
    assert!(
        p["chains"][1]["why"].as_str().unwrap().contains("newest"),
        "{p}"
    );
    let list = rig.ok(&vm, "backup.list", json!({})).await;
    let chains = list["chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1, "{list}");
    assert_eq!(chains[0]["full"], f2["label"], "{list}");
    // What the purger removed is gone from the bucket too.
    let set_dir = rig
        .s3
        .root
        .join("bkp/purge1/backup/db")
        .join(f1["label"].as_str().unwrap());
    let files = walk(&set_dir);
    assert!(files.is_empty(), "still in the bucket: {files:?}");
    // So is the WAL only the purged chain needed.
    assert!(
        p["archive"]["min"].as_str() >= f2["wal_start"].as_str(),
        "the archive starts at the oldest chain left: {p} {f2}"
    );
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_run_by_themselves_full_then_incremental() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("bkp");
    // A 48 s retention day: an hour is 2 s, so a 3-hour schedule runs every 6 s.
    let vm = rig
        .vm_env("sched1", &[(dbvm_agent::backup::TEST_DAY_S, "48")])
        .await;
    create_postgres(&rig, &vm).await;
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    let (_, e) = rig
        .refused(
            &vm,
            "backup.configure",
            json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk, "schedule_hours": 10000}),
        )
        .await;
    assert!(e.contains("schedule_hours"), "{e}");
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    let out = rig
        .ok(
            &vm,
            "backup.configure",
            json!({"storage": rig.location("bkp", None), "access_key_id": ak, "secret_access_key": sk, "schedule_hours": 3}),
        )
        .await;
    assert_eq!(out["schedule"]["every_hours"], 3, "{out}");
    // No backup.run is sent: the agent's schedule makes the chain.
    let list = dbvm_e2e::eventually(
        Duration::from_secs(120),
        "two scheduled backups",
        || async {
            let list = rig.ok(&vm, "backup.list", json!({})).await;
            let n = list["chains"]
                .as_array()?
                .iter()
                .map(|c| c["backups"].as_array().map_or(0, Vec::len))
                .sum::<usize>();
            (n >= 2).then_some(list)
        },
    )
    .await;
    let backups = list["chains"][0]["backups"].as_array().unwrap();
    assert_eq!(backups[0]["kind"], "full", "{list}");
    assert_eq!(backups[1]["kind"], "incr", "{list}");

    // Listings while a backup runs leave it alone (each has its own one-shot container).
    let cmd = rig
        .fleet
        .sign(&vm.agent.id, "backup.run", json!({"type": "full"}));
    let v = rig.client.submit(&cmd).await.unwrap();
    for _ in 0..3 {
        rig.ok(&vm, "backup.list", json!({})).await;
    }
    let done = rig
        .client
        .wait(v.id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
}
