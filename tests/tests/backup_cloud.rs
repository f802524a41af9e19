//! The cloud bucket end to end: a second S3 server (its own CA and keys) as the copy for
//! disaster recovery; backups and logs reach it from the local bucket, a restore from it
//! alone works, and a cloud outage holds up neither archiving nor local backups (health
//! check 10 says how far behind the cloud is, and it catches up by itself).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::backup::{archive_now, maria, ms, pg_now, pg_super, Rig, Vm};
use dbvm_e2e::s3::S3Server;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// The cloud server's location for `bucket`.
fn cloud_location(s3: &S3Server, bucket: &str, prefix: Option<&str>) -> Value {
    let mut l = json!({
        "endpoint": s3.endpoint_url(),
        "bucket": bucket,
        "region": s3.region,
        "ca_pem": std::fs::read_to_string(&s3.ca_pem_path).unwrap(),
    });
    if let Some(p) = prefix {
        l["prefix"] = json!(p);
    }
    l
}

/// `backup.configure` arguments: the rig's bucket `local`, the cloud's `dr` (with
/// `cloud_secret` as its secret key), a cloud backup after every local one.
async fn configure_args(
    rig: &Rig,
    vm: &Vm,
    local: &str,
    cloud: &S3Server,
    cloud_secret: &str,
) -> Value {
    let (ak, sk) = rig.keys(vm, &rig.s3.secret_key).await;
    json!({
        "storage": rig.location(local, None),
        "access_key_id": ak, "secret_access_key": sk,
        "retention_days": 7,
        "cloud": {
            "storage": cloud_location(cloud, "drc", None),
            "access_key_id": rig.seal_to(vm, &cloud.access_key).await,
            "secret_access_key": rig.seal_to(vm, cloud_secret).await,
            "retention_days": 30,
            "backup_every_hours": 0,
        },
    })
}

/// Check 10 of a fresh report: status, message, figures.
async fn check10(rig: &Rig, vm: &Vm) -> (String, String, Value) {
    let out = rig.ok(vm, "health", json!({})).await;
    let c = out["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == "binlog_cloud_sync"))
        .unwrap_or_else(|| panic!("no check 10: {out}"))
        .clone();
    (
        c["status"].as_str().unwrap_or("").to_string(),
        c["message"].as_str().unwrap_or("").to_string(),
        c["figures"].clone(),
    )
}

async fn pg(port: u16, password: &str) -> tokio_postgres::Client {
    dbvm_e2e::dbtest::pg_dbaas(port, password, "app")
        .await
        .expect("dbaas connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cloud_copy_has_its_own_backups_and_wal_and_restores_without_the_local_bucket() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("loc");
    let cloud = S3Server::start(&rig.fleet.path("s3cloud"));
    cloud.create_bucket("drc");
    let src = rig.vm("pc1").await;
    let out = rig
        .ok(
            &src,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": src.port}),
        )
        .await;
    let password = rig.password(&out);
    let c = pg(src.port, &password).await;
    c.batch_execute(
        "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await
    .unwrap();

    // A wrong cloud secret is refused before anything changes: backups stay unconfigured.
    let bad = configure_args(&rig, &src, "loc", &cloud, "not-the-cloud-secret").await;
    let e = rig.refused_message(&src, "backup.configure", bad).await;
    assert!(e.contains("cloud"), "the refusal names the cloud: {e}");
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(!e.contains(&cloud.secret_key), "{e}");
    let e = rig.refused_message(&src, "backup.run", json!({})).await;
    assert!(e.contains("not configured"), "nothing was configured: {e}");

    let args = configure_args(&rig, &src, "loc", &cloud, &cloud.secret_key).await;
    let out = rig.ok(&src, "backup.configure", args).await;
    assert_eq!(out["cloud"]["retention_days"], 30, "{out}");
    assert!(!out.to_string().contains(&cloud.secret_key), "{out}");

    // Archiving on restarted the server.
    let c = pg(src.port, &password).await;
    // The database's own user cannot reach the keys pgBackRest's configs hold: it cannot
    // make itself a reader of the server's files (PostgreSQL 15's CREATEROLE could).
    for attack in [
        "GRANT pg_read_server_files TO dbaas",
        "GRANT pg_execute_server_program TO dbaas",
        "CREATE ROLE helper",
    ] {
        let e = c.batch_execute(attack).await.expect_err(attack);
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{attack}: {e:?}"
        );
    }
    let e = c
        .query_one("SELECT pg_read_file('postgresql.conf')", &[])
        .await
        .expect_err("pg_read_file refused");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    let full = rig.ok(&src, "backup.run", json!({})).await;
    eprintln!("backup: {full}");
    assert_eq!(full["type"], "full", "{full}");
    assert_eq!(
        full["cloud"]["type"], "full",
        "the cloud has its own chain: {full}"
    );
    assert!(full["cloud"]["label"].as_str().is_some(), "{full}");

    c.batch_execute("INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = pg_now(&c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.batch_execute("INSERT INTO t SELECT generate_series(201, 300)")
        .await
        .unwrap();
    archive_now(&pg_super(&rig.data_root(&src), src.port).await).await;

    // The WAL reaches the cloud by itself (the copier), up to what the local bucket has.
    let list = dbvm_e2e::eventually(
        Duration::from_secs(60),
        "the cloud's archive reaches the local one",
        || async {
            let l = rig.ok(&src, "backup.list", json!({})).await;
            let (local, cloud) = (&l["archive"]["max"], &l["cloud"]["archive"]["max"]);
            (local.is_string() && local == cloud && l["cloud"]["copy"]["pending"] == 0).then_some(l)
        },
    )
    .await;
    eprintln!("list: {list}");
    assert_eq!(
        list["cloud"]["chains"].as_array().unwrap().len(),
        1,
        "{list}"
    );
    assert_eq!(list["cloud"]["retention_days"], 30, "{list}");
    let (status, message, figures) = check10(&rig, &src).await;
    assert_eq!(figures["cloud_pending"], 0.0, "{figures}");
    assert_ne!(status, "critical", "{message}");

    // The local bucket is lost: the cloud alone restores the database to the target.
    std::fs::remove_dir_all(rig.s3.root.join("loc")).unwrap();
    let dst = rig.vm("pd1").await;
    let restore = json!({
        "spec": {"engine": "postgres", "database": "app", "port": dst.port},
        "source": cloud_location(&cloud, "drc", Some("pc1")),
        "access_key_id": rig.seal_to(&dst, &cloud.access_key).await,
        "secret_access_key": rig.seal_to(&dst, &cloud.secret_key).await,
        "target": target,
    });
    let out = rig.ok(&dst, "db.restore", restore).await;
    eprintln!("restore: {}", out["restored"]);
    let d = pg(dst.port, &rig.password(&out)).await;
    let n: i64 = d
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 200,
        "rows before the target present, rows after it absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_outage_holds_up_neither_archiving_nor_local_backups_and_the_copy_catches_up() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("loc");
    let cloud = S3Server::start(&rig.fleet.path("s3cloud"));
    cloud.create_bucket("drc");
    let src = rig.vm("po1").await;
    let out = rig
        .ok(
            &src,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": src.port}),
        )
        .await;
    let password = rig.password(&out);
    let args = configure_args(&rig, &src, "loc", &cloud, &cloud.secret_key).await;
    rig.ok(&src, "backup.configure", args).await;
    rig.ok(&src, "backup.run", json!({})).await;

    cloud.stop_s3();
    let c = pg(src.port, &password).await;
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let sup = pg_super(&rig.data_root(&src), src.port).await;
    archive_now(&sup).await;
    // The local archive keeps up: PostgreSQL's archiver reports no failure.
    let failed: i64 = sup
        .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "archiving to the local bucket never failed");

    // A local backup still works; the cloud's part says why it failed.
    let out = rig.ok(&src, "backup.run", json!({})).await;
    eprintln!("backup with the cloud down: {out}");
    assert_eq!(out["type"], "incr", "{out}");
    let e = out["cloud"]["error"]
        .as_str()
        .expect("the cloud part failed");
    assert!(
        e.contains("could not be reached") || e.contains("cloud"),
        "{e}"
    );

    // Check 10 warns within a copy round, naming the cloud.
    let (status, message) = dbvm_e2e::eventually(
        Duration::from_secs(60),
        "check 10 warns of the cloud",
        || async {
            let (s, m, _) = check10(&rig, &src).await;
            (s != "ok" && m.contains("cloud copy")).then_some((s, m))
        },
    )
    .await;
    eprintln!("check 10 with the cloud down: {status}: {message}");

    // The cloud returns: the copy catches up by itself, and the warning clears.
    cloud.start_s3();
    dbvm_e2e::eventually(
        Duration::from_secs(90),
        "the cloud copy caught up",
        || async {
            let (s, m, f) = check10(&rig, &src).await;
            (f["cloud_pending"] == 0.0 && f["cloud_failures"] == 0.0 && !m.contains("cloud copy"))
                .then_some(s)
        },
    )
    .await;
    let list = rig.ok(&src, "backup.list", json!({})).await;
    assert_eq!(
        list["archive"]["max"], list["cloud"]["archive"]["max"],
        "{list}"
    );
}

// ----- MariaDB ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_cloud_copy_is_checked_object_by_object_and_restores_without_the_local_bucket() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mloc");
    let cloud = S3Server::start(&rig.fleet.path("s3cloud"));
    cloud.create_bucket("drc");
    let src = rig.vm("mc1").await;
    let out = rig
        .ok(
            &src,
            "db.create",
            json!({"engine": "mariadb", "database": "app", "port": src.port}),
        )
        .await;
    let password = rig.password(&out);
    let mut c = maria::connect(src.port, &password).await;
    c.query_drop(
        "CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t SELECT seq FROM seq_1_to_1000",
    )
    .await
    .unwrap();
    let args = configure_args(&rig, &src, "mloc", &cloud, &cloud.secret_key).await;
    let out = rig.ok(&src, "backup.configure", args).await;
    assert_eq!(out["cloud"]["retention_days"], 30, "{out}");
    rig.ok(&src, "backup.run", json!({})).await;
    c.query_drop("INSERT INTO t SELECT seq FROM seq_1001_to_2000")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = maria::now(&mut c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.query_drop("INSERT INTO t SELECT seq FROM seq_2001_to_3000")
        .await
        .unwrap();

    // The binlogs past the target reach the local bucket, then the cloud.
    let list = dbvm_e2e::eventually(
        Duration::from_secs(90),
        "the cloud's window passes the target",
        || async {
            let l = rig.ok(&src, "backup.list", json!({})).await;
            (l["cloud"]["recoverable"]["to_ms"].as_i64()? > ms(&target) + 1000).then_some(l)
        },
    )
    .await;
    eprintln!("list: {list}");
    assert_eq!(
        list["cloud"]["chains"].as_array().unwrap().len(),
        1,
        "{list}"
    );

    // Every object the cloud's manifest names is there, byte for byte as recorded.
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            std::fs::read_dir(cloud.root.join("drc/mc1/chains"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
                .join("manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for o in manifest["backups"]
        .as_array()
        .unwrap()
        .iter()
        .chain(manifest["binlogs"].as_array().unwrap())
    {
        let bytes =
            std::fs::read(cloud.root.join("drc/mc1").join(o["key"].as_str().unwrap())).unwrap();
        use sha2::Digest;
        let sha = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(sha, o["sha256"].as_str().unwrap(), "{o}");
    }

    std::fs::remove_dir_all(rig.s3.root.join("mloc")).unwrap();
    let dst = rig.vm("md1").await;
    let restore = json!({
        "spec": {"engine": "mariadb", "database": "app", "port": dst.port},
        "source": cloud_location(&cloud, "drc", Some("mc1")),
        "access_key_id": rig.seal_to(&dst, &cloud.access_key).await,
        "secret_access_key": rig.seal_to(&dst, &cloud.secret_key).await,
        "target": target,
    });
    let out = rig.ok(&dst, "db.restore", restore).await;
    eprintln!("restore: {}", out["restored"]);
    let mut d = maria::connect(dst.port, &rig.password(&out)).await;
    let n: i64 = d
        .query_first("SELECT COUNT(*) FROM t")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        n, 2000,
        "rows before the target present, rows after it absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_keeps_its_chains_by_its_own_retention_when_the_local_purger_removes_them() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("loc");
    let cloud = S3Server::start(&rig.fleet.path("s3cloud"));
    cloud.create_bucket("drc");
    // Days cannot pass in a test: the debug agent takes a 15 s retention day.
    let vm = rig
        .vm_env("pp1", &[(dbvm_agent::backup::TEST_DAY_S, "15")])
        .await;
    rig.ok(
        &vm,
        "db.create",
        json!({"engine": "postgres", "database": "app", "port": vm.port}),
    )
    .await;
    let mut args = configure_args(&rig, &vm, "loc", &cloud, &cloud.secret_key).await;
    args["retention_days"] = json!(1);
    args["schedule_hours"] = json!(0);
    args["cloud"]["retention_days"] = json!(3);
    rig.ok(&vm, "backup.configure", args).await;
    let b1 = rig.ok(&vm, "backup.run", json!({})).await;
    let expiry = b1["chain"]["expires_ms"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(
        (expiry - dbvm_protocol::now_ms()).max(0) as u64 + 500,
    ))
    .await;
    // The local chain's day is over: a new local chain; the cloud's chain (3 days) goes on.
    let b2 = rig.ok(&vm, "backup.run", json!({})).await;
    eprintln!("second backup: {b2}");
    assert_eq!(b2["type"], "full", "{b2}");
    assert_eq!(b2["cloud"]["type"], "incr", "{b2}");

    let p = rig.ok(&vm, "backup.purge", json!({})).await;
    eprintln!("purge: {p}");
    assert_eq!(
        p["purged"],
        json!([b1["label"]]),
        "the local chain went: {p}"
    );
    assert_eq!(p["cloud"]["purged"], json!([]), "the cloud's stays: {p}");
    assert_eq!(p["cloud"]["retention_days"], 3, "{p}");
    let list = rig.ok(&vm, "backup.list", json!({})).await;
    assert_eq!(list["chains"].as_array().unwrap().len(), 1, "{list}");
    let cloud_chains = list["cloud"]["chains"].as_array().unwrap();
    assert_eq!(cloud_chains.len(), 1, "{list}");
    assert_eq!(cloud_chains[0]["full"], b1["cloud"]["label"], "{list}");
    assert_eq!(
        cloud_chains[0]["backups"].as_array().unwrap().len(),
        2,
        "{list}"
    );
}
