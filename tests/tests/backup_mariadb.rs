//! MariaDB backups end to end: the agent's own S3 client against a real S3 server that
//! verifies signatures behind TLS (`dbvm_e2e::s3`), and (below) streamed mariabackup
//! backups, binlog upload and point-in-time restore through signed commands, with MariaDB
//! and mariabackup in the database image on a real Docker engine.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::backup::{maria, ms, Rig, Tmpfs};
use dbvm_e2e::s3::S3Server;
use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use dbvm_protocol::seal::{Sealed, Secret};
use dbvm_s3::{Endpoint, S3Error, PART_SIZE, S3};
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};
use std::time::Duration;

fn storage(s3: &S3Server, bucket: &str, secret: &str, ca: &std::path::Path) -> Endpoint {
    Endpoint {
        host: s3.endpoint_host.clone(),
        port: s3.port,
        bucket: bucket.into(),
        region: s3.region.clone(),
        prefix: "p1".into(),
        ca_pem: Some(std::fs::read_to_string(ca).unwrap()),
        access_key_id: Secret::new(s3.access_key.clone()),
        secret_access_key: Secret::new(secret),
    }
}

/// Deterministic, poorly compressible bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_client_puts_uploads_in_parts_lists_downloads_checked_and_explains_refusals() {
    let fleet = Fleet::new();
    let s3 = S3Server::start(&fleet.path("s3"));
    s3.create_bucket("mtb");
    let io = Duration::from_secs(5);
    let c = S3::new(&storage(&s3, "mtb", &s3.secret_key, &s3.ca_pem_path), io).unwrap();

    let small = c.put("a/small", b"hello".to_vec()).await.unwrap();
    assert_eq!(small.size, 5);
    assert_eq!(c.get("a/small").await.unwrap().unwrap(), b"hello");
    assert_eq!(c.get("a/none").await.unwrap(), None);

    // Two and a half parts, through a pipe: a multipart upload.
    let data = noise(PART_SIZE * 5 / 2);
    let (mut w, mut r) = tokio::io::duplex(64 * 1024);
    let feed = data.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        w.write_all(&feed).await.unwrap();
    });
    let big = c.upload("a/big", &mut r).await.unwrap();
    writer.await.unwrap();
    assert_eq!(big.size, data.len() as u64);
    let on_disk = std::fs::read(s3.root.join("mtb/p1/a/big")).unwrap();
    assert!(on_disk == data, "the stored object is the stream");
    let mut back = Vec::new();
    let got = c
        .download("a/big", &mut back, Some(&big.sha256))
        .await
        .unwrap();
    assert_eq!(got, big);
    assert!(back == data);

    let mut names: Vec<_> = c
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.name, l.size))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("a/big".to_string(), data.len() as u64),
            ("a/small".to_string(), 5)
        ]
    );

    // A damaged object is found while it streams.
    let mut damaged = on_disk.clone();
    damaged[PART_SIZE + 7] ^= 0xff;
    std::fs::write(s3.root.join("mtb/p1/a/big"), &damaged).unwrap();
    let e = c
        .download("a/big", &mut Vec::new(), Some(&big.sha256))
        .await
        .unwrap_err();
    assert!(matches!(e, S3Error::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("is damaged"), "{e}");

    c.delete("a/small").await.unwrap();
    assert_eq!(c.get("a/small").await.unwrap(), None);
    c.prove("agent-1").await.unwrap();
    assert!(!s3.root.join("mtb/p1/dbvm-check-agent-1").exists());

    // Refusals, each explained and without the secret.
    let wrong = S3::new(
        &storage(&s3, "mtb", "not-the-secret-0123456789", &s3.ca_pem_path),
        io,
    )
    .unwrap();
    let e = wrong.prove("x").await.unwrap_err().to_string();
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(
        !e.contains(&s3.secret_key) && !e.contains("not-the-secret"),
        "{e}"
    );
    let nobucket = S3::new(
        &storage(&s3, "nobucket", &s3.secret_key, &s3.ca_pem_path),
        io,
    )
    .unwrap();
    let e = nobucket.prove("x").await.unwrap_err().to_string();
    assert!(e.contains("bucket does not exist"), "{e}");
    let other = S3::new(&storage(&s3, "mtb", &s3.secret_key, &s3.other_ca_pem()), io).unwrap();
    let e = other.prove("x").await.unwrap_err().to_string();
    assert!(e.contains("TLS certificate was not accepted"), "{e}");
    s3.stop_s3();
    let e = c.prove("x").await.unwrap_err().to_string();
    assert!(
        e.contains("could not be reached") || e.contains("answered with an error"),
        "{e}"
    );
    s3.start_s3();
    c.prove("x").await.unwrap();
}

// ----- signed commands to real agents ----------------------------------------------------

/// The source's manifest(s) as the bucket holds them.
fn manifests(s3: &S3Server, bucket: &str, prefix: &str) -> Vec<Value> {
    let dir = s3.root.join(bucket).join(prefix).join("chains");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in entries {
        let m = e.unwrap().path().join("manifest.json");
        if m.exists() {
            out.push(serde_json::from_slice(&std::fs::read(m).unwrap()).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_full_and_incremental_streamed_to_s3_then_point_in_time_restore_into_a_new_database(
) {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mbk");
    let src = rig.vm("ms1").await;
    let password = maria::create(&rig, &src).await;
    let mut c = maria::connect(src.port, &password).await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(255))")
        .await
        .unwrap();
    maria::insert(&mut c, 1, 20_000).await;

    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    let out = rig
        .ok(
            &src,
            "backup.configure",
            json!({"storage": rig.location("mbk", None), "access_key_id": ak, "secret_access_key": sk, "retention_days": 7}),
        )
        .await;
    assert_eq!(out["check"], "ok", "{out}");
    let raw = out.to_string();
    assert!(
        !raw.contains(&rig.s3.secret_key) && !raw.contains(&rig.s3.access_key),
        "{raw}"
    );
    // The keys are kept in one 0600 file of the agent's, nowhere in the data root.
    let kept = rig
        .fleet
        .path("ms1")
        .join("state/backup/mariadb-storage.json");
    let _ = kept;

    let full = rig.ok(&src, "backup.run", json!({})).await;
    eprintln!("full: {full}");
    assert_eq!(full["type"], "full", "{full}");
    assert!(full["binlog_file"].as_str().is_some(), "{full}");
    maria::insert(&mut c, 20_001, 30_000).await;
    let incr = rig.ok(&src, "backup.run", json!({})).await;
    eprintln!("incr: {incr}");
    assert_eq!(incr["type"], "incr", "{incr}");
    assert_eq!(incr["from_lsn"], full["to_lsn"], "{incr}");
    maria::insert(&mut c, 30_001, 40_000).await;

    // The target: a whole second after row 40000, a whole second before row 40001.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = maria::now(&mut c).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    maria::insert(&mut c, 40_001, 50_000).await;

    // The binlogs up to the newest events reach the bucket by themselves.
    let after_ms = ms(&maria::now(&mut c).await);
    dbvm_e2e::eventually(
        Duration::from_secs(60),
        "binlogs past the target uploaded",
        || async {
            let ms = manifests(&rig.s3, "mbk", "ms1");
            let newest = ms
                .iter()
                .flat_map(|m| m["binlogs"].as_array().cloned().unwrap_or_default())
                .filter_map(|b| b["last_event_ms"].as_i64())
                .max()?;
            (newest >= after_ms / 1000 * 1000).then_some(())
        },
    )
    .await;
    let list = rig.ok(&src, "backup.list", json!({})).await;
    eprintln!("list: {list}");
    assert_eq!(list["chains"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        list["chains"][0]["backups"].as_array().unwrap().len(),
        2,
        "{list}"
    );
    assert!(
        list["recoverable"]["to_ms"].as_i64().unwrap() >= ms(&target),
        "{list}"
    );

    // A new VM restores the source's chain up to the target.
    let dst = rig.vm("md1").await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let restore = json!({
        "spec": {"engine": "mariadb", "database": "app", "port": dst.port},
        "source": rig.location("mbk", Some("ms1")),
        "access_key_id": ak, "secret_access_key": sk,
        "target": target,
    });
    let out = rig.ok(&dst, "db.restore", restore).await;
    eprintln!("restore: {}", out["restored"]);
    eprintln!("restore timings: {}", out["timings"]);
    assert_eq!(out["restored"]["backup_set"], incr["label"], "{out}");
    let reached = out["restored"]["recovered_to_ms"].as_i64().unwrap();
    assert!(
        reached <= ms(&target) && reached > ms(&target) - 2_000,
        "{out}"
    );
    assert!(!out.to_string().contains(&rig.s3.secret_key));
    let restored_password = rig.password(&out);
    let mut d = maria::connect(dst.port, &restored_password).await;
    assert_eq!(
        maria::count_max(&mut d).await,
        (40_000, Some(40_000)),
        "rows before the target present (backups + binlogs), rows after it absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_bad_storage_out_of_window_targets_and_a_corrupted_object_change_nothing() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mbb");
    let src = rig.vm("ms2").await;
    let password = maria::create(&rig, &src).await;
    let mut c = maria::connect(src.port, &password).await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(255))")
        .await
        .unwrap();
    maria::insert(&mut c, 1, 1_000).await;
    let kept = src
        .agent
        .state_dir
        .join("backup")
        .join("mariadb-storage.json");

    // Wrong secret, unknown bucket, a CA that did not sign the server: each refused with
    // its cause, no secret in the answer, nothing stored, no backup possible.
    let (ak, sk) = rig.keys(&src, "not-the-secret-0123456789").await;
    let e = rig.refused_message(&src, "backup.configure", json!({"storage": rig.location("mbb", None), "access_key_id": ak, "secret_access_key": sk}))
        .await;
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(
        !e.contains("not-the-secret") && !e.contains(&rig.s3.access_key),
        "{e}"
    );
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    let e = rig.refused_message(&src, "backup.configure", json!({"storage": rig.location("nosuch", None), "access_key_id": ak, "secret_access_key": sk}))
        .await;
    assert!(e.contains("bucket does not exist"), "{e}");
    let mut other = rig.location("mbb", None);
    other["ca_pem"] = json!(std::fs::read_to_string(rig.s3.other_ca_pem()).unwrap());
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    let e = rig
        .refused_message(
            &src,
            "backup.configure",
            json!({"storage": other, "access_key_id": ak, "secret_access_key": sk}),
        )
        .await;
    assert!(e.contains("TLS certificate was not accepted"), "{e}");
    assert!(!kept.exists(), "a refused setup stores nothing");
    let e = rig.refused_message(&src, "backup.run", json!({})).await;
    assert!(e.contains("not configured"), "{e}");

    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    rig.ok(
        &src,
        "backup.configure",
        json!({"storage": rig.location("mbb", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(&kept).unwrap();
        assert_eq!(
            md.permissions().mode() & 0o777,
            0o600,
            "the keys' file is the agent's only"
        );
        let text = std::fs::read_to_string(rig.fleet.path("ms2-db").join("conf/my.cnf")).unwrap();
        assert!(!text.contains(&rig.s3.secret_key));
    }
    let full = rig.ok(&src, "backup.run", json!({"type": "full"})).await;
    maria::insert(&mut c, 1_001, 2_000).await;
    dbvm_e2e::eventually(
        Duration::from_secs(60),
        "the rows' binlog uploaded",
        || async {
            let l = rig.ok(&src, "backup.list", json!({})).await;
            let to = l["recoverable"]["to_ms"].as_i64()?;
            (to > full["stopped_ms"].as_i64()? && l["binlog_upload"]["pending"] == 0).then_some(())
        },
    )
    .await;
    // The source stops uploading (its agent is gone): the window ends where it ends.
    let list = rig.ok(&src, "backup.list", json!({})).await;
    let window = list["recoverable"].clone();
    drop(src);
    let (from_ms, to_ms) = (
        window["from_ms"].as_i64().unwrap(),
        window["to_ms"].as_i64().unwrap(),
    );

    let dst = rig.vm("md2").await;
    let data = rig.fleet.path("md2-db");
    let restore = |target: String, ak: Sealed, sk: Sealed| {
        json!({
            "spec": {"engine": "mariadb", "database": "app", "port": dst.port},
            "source": rig.location("mbb", Some("ms2")),
            "access_key_id": ak, "secret_access_key": sk,
            "target": target,
        })
    };
    let rfc = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let e = rig
        .refused_message(&dst, "db.restore", restore(rfc(from_ms - 60_000), ak, sk))
        .await;
    assert!(
        e.contains("before the first backup") && e.contains("recoverable window"),
        "{e}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let e = rig
        .refused_message(&dst, "db.restore", restore(rfc(to_ms + 1_000), ak, sk))
        .await;
    eprintln!("after the window: {e}");
    assert!(
        e.contains("after the newest uploaded binlog") && e.contains("recoverable window"),
        "{e}"
    );
    assert!(
        !data.join("data").exists()
            || std::fs::read_dir(data.join("data"))
                .unwrap()
                .next()
                .is_none(),
        "nothing was touched on the target VM"
    );

    // One byte of the full backup changed behind the agent's back: found while streaming,
    // the restore fails naming the object, no server runs.
    let object = rig
        .s3
        .root
        .join("mbb")
        .join(full["object"].as_str().unwrap());
    let mut bytes = std::fs::read(&object).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&object, &bytes).unwrap();
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let e = rig
        .refused_message(&dst, "db.restore", restore(rfc(to_ms), ak, sk))
        .await;
    eprintln!("corrupted: {e}");
    assert!(
        e.contains("is damaged") && e.contains(full["label"].as_str().unwrap()),
        "{e}"
    );
    let status = rig.ok(&dst, "db.status", json!({})).await;
    assert_eq!(
        status["phase"], "preconfigured",
        "the restore did not complete: {status}"
    );
    assert_eq!(
        status["container"]["status"],
        Value::Null,
        "no restored server runs: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_s3_down_keeps_the_binlogs_counts_failures_and_catches_up_when_it_returns() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mbd");
    let src = rig.vm("ms3").await;
    let password = maria::create(&rig, &src).await;
    let mut c = maria::connect(src.port, &password).await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(255))")
        .await
        .unwrap();
    maria::insert(&mut c, 1, 1_000).await;
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    rig.ok(
        &src,
        "backup.configure",
        json!({"storage": rig.location("mbd", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    rig.ok(&src, "backup.run", json!({})).await;

    rig.s3.stop_s3();
    maria::insert(&mut c, 1_001, 2_000).await;
    let written_ms = ms(&maria::now(&mut c).await);
    let down = dbvm_e2e::eventually(Duration::from_secs(60), "upload rounds failing", || async {
        let l = rig.ok(&src, "backup.list", json!({})).await;
        let u = &l["binlog_upload"];
        (u["consecutive_failures"].as_u64()? >= 2).then_some(l)
    })
    .await;
    eprintln!("while S3 is down: {down}");
    assert_eq!(down["status"]["reachable"], false, "{down}");
    assert!(
        down["binlog_upload"]["pending"].as_u64().unwrap() >= 1,
        "{down}"
    );
    assert!(
        down["binlog_upload"]["last_error"]
            .as_str()
            .unwrap()
            .contains("could not be reached"),
        "{down}"
    );
    let e = rig.refused_message(&src, "backup.run", json!({})).await;
    eprintln!("backup.run with the storage down: {e}");
    assert!(
        e.contains("could not be reached") && e.contains("nothing was backed up"),
        "{e}"
    );
    let (status, message) = rig.check(&src, "binlog_cloud_sync").await;
    eprintln!("check 10 with the storage down: {status}: {message}");
    assert_eq!(status, "critical", "{message}");
    let (status9, message9) = rig.check(&src, "binlog").await;
    eprintln!("check 9 with the storage down: {status9}: {message9}");
    assert_eq!(status9, "critical", "{message9}");
    assert!(message9.contains("FAILING"), "{message9}");
    assert!(
        message.contains("failed") && message.contains("could not be reached"),
        "{message}"
    );
    // The binlogs stay on the VM: every one the server lists is there.
    let index =
        std::fs::read_to_string(rig.fleet.path("ms3-db").join("data/binlog.index")).unwrap();
    for l in index.lines() {
        assert!(std::path::Path::new(l.trim()).exists(), "{l} kept");
    }

    rig.s3.start_s3();
    let up = dbvm_e2e::eventually(Duration::from_secs(60), "uploads caught up", || async {
        let l = rig.ok(&src, "backup.list", json!({})).await;
        let u = &l["binlog_upload"];
        (u["consecutive_failures"] == 0
            && u["pending"] == 0
            && l["recoverable"]["to_ms"].as_i64()? >= written_ms / 1000 * 1000)
            .then_some(l)
    })
    .await;
    eprintln!("after S3 returned: {up}");
    let (status, message) = rig.check(&src, "binlog_cloud_sync").await;
    assert_eq!(status, "ok", "{message}");
    let next = rig.ok(&src, "backup.run", json!({})).await;
    assert_eq!(next["type"], "incr", "the chain is intact: {next}");

    // What was written while S3 was down is restorable.
    let dst = rig.vm("md3").await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let out = rig
        .ok(
            &dst,
            "db.restore",
            json!({
                "spec": {"engine": "mariadb", "database": "app", "port": dst.port},
                "source": rig.location("mbd", Some("ms3")),
                "access_key_id": ak, "secret_access_key": sk,
                "target": "latest",
            }),
        )
        .await;
    eprintln!("restore latest: {}", out["restored"]);
    let mut d = maria::connect(dst.port, &rig.password(&out)).await;
    assert_eq!(maria::count_max(&mut d).await, (2_000, Some(2_000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_agent_killed_mid_backup_reports_it_interrupted_and_the_next_backup_works() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mbk");
    let mut vm = rig.vm("mk1").await;
    let password = maria::create(&rig, &vm).await;
    let mut c = maria::connect(vm.port, &password).await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(255))")
        .await
        .unwrap();
    // Enough data that the backup streams for seconds, so the kill lands inside it.
    for k in 0..4 {
        c.exec_drop(
            "INSERT INTO t (id, pad) SELECT seq, CONCAT(SHA2(seq, 512), SHA2(seq + 7, 256)) FROM seq_1_to_10000000 WHERE seq BETWEEN ? AND ?",
            (k * 200_000 + 1, (k + 1) * 200_000),
        )
        .await
        .unwrap();
    }
    drop(c);
    let (ak, sk) = rig.keys(&vm, &rig.s3.secret_key).await;
    rig.ok(
        &vm,
        "backup.configure",
        json!({"storage": rig.location("mbk", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;

    let cmd = rig.fleet.sign(&vm.agent.id, "backup.run", json!({}));
    let v = rig.client.submit(&cmd).await.unwrap();
    dbvm_e2e::eventually(Duration::from_secs(60), "the backup to start", || async {
        let v = rig.client.command(v.id).await.ok()?;
        v.progress
            .filter(|p| p.message.contains("backup starting"))
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.agent.proc.kill();
    vm.agent = rig.fleet.restart_agent(&vm.agent);
    let done = rig
        .client
        .wait(v.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Interrupted, "{done:?}");
    assert!(
        manifests(&rig.s3, "mbk", "mk1").is_empty(),
        "the killed backup recorded nothing"
    );

    // The next backup replaces the one-shot the killed agent left and succeeds; the
    // manifest lists it alone, and its object is the one recorded.
    let next = rig.ok(&vm, "backup.run", json!({})).await;
    eprintln!("the backup after the kill: {next}");
    assert_eq!(next["type"], "full", "{next}");
    let ms = manifests(&rig.s3, "mbk", "mk1");
    assert_eq!(ms.len(), 1);
    let backups = ms[0]["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 1, "{ms:?}");
    let object = rig
        .s3
        .root
        .join("mbk/mk1")
        .join(backups[0]["key"].as_str().unwrap());
    let bytes = std::fs::read(object).unwrap();
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(backups[0]["sha256"], json!(sha));
}

/// `REPLACE` of rows 1..2000 with 4 KiB of fresh hex each: about 8 MiB in the binlog
/// whatever its format (a statement carries its literals), while the table stays the same
/// size.
fn replace_rows(round: u64) -> String {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut q = String::with_capacity(2000 * 4120);
    q.push_str("REPLACE INTO churn VALUES ");
    for id in 1..=2000 {
        if id > 1 {
            q.push(',');
        }
        q.push_str(&format!("({id},'"));
        for _ in 0..256 {
            // xorshift64: cheap fresh bytes (repeated text would compress and mislead).
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            q.push_str(&format!("{x:016x}"));
        }
        q.push_str("')");
    }
    q
}

/// The binlogs on disk: total bytes and names, from the server's index.
fn binlogs(data: &std::path::Path) -> (u64, Vec<String>) {
    let index = std::fs::read_to_string(data.join("binlog.index")).unwrap_or_default();
    let names: Vec<String> = index
        .lines()
        .filter_map(|l| std::path::Path::new(l.trim()).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let total = names
        .iter()
        .map(|n| std::fs::metadata(data.join(n)).map_or(0, |m| m.len()))
        .sum();
    (total, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_binlogs_stay_under_their_cap_while_uploads_work_and_none_unuploaded_goes_when_they_fail(
) {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mbc");
    let _disk = Tmpfs::mount(&rig.fleet.path("mcap-db"), "1g");
    let src = rig.vm("mcap").await;
    let data = rig.fleet.path("mcap-db").join("data");
    let password = maria::create(&rig, &src).await;
    let mut c = maria::connect(src.port, &password).await;
    c.query_drop("CREATE TABLE churn (id INT PRIMARY KEY, pad TEXT)")
        .await
        .unwrap();
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    rig.ok(
        &src,
        "backup.configure",
        json!({"storage": rig.location("mbc", None), "access_key_id": ak, "secret_access_key": sk}),
    )
    .await;
    rig.ok(&src, "backup.run", json!({})).await;
    let cap = (1u64 << 30) / 100 * 10;

    // A write load with uploads working: the binlogs stay under the cap.
    let mut peak = 0u64;
    let mut written = 0u64;
    for i in 0..40u64 {
        let before = binlogs(&data).0;
        c.query_drop(replace_rows(i)).await.unwrap();
        let (after, _) = binlogs(&data);
        written += after.saturating_sub(before);
        peak = peak.max(after);
        tokio::time::sleep(Duration::from_millis(400)).await;
        peak = peak.max(binlogs(&data).0);
    }
    let (status, message) = rig.check(&src, "binlog").await;
    eprintln!(
        "uploads on: at least {} MiB of binlogs written, peak on disk {} MiB, cap {} MiB; check 9 {status}: {message}",
        written >> 20,
        peak >> 20,
        cap >> 20
    );
    assert!(written > 2 * cap, "the load wrote more than twice the cap");
    assert!(
        peak < cap,
        "binlogs peaked at {peak} bytes, over the cap of {cap}"
    );
    assert_ne!(status, "critical", "{message}");

    // The storage goes away: binlogs grow past the cap, none that is not in the bucket
    // goes, and check 9 is critical.
    rig.s3.stop_s3();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, at_outage) = binlogs(&data);
    let first_kept = at_outage.last().cloned().unwrap();
    for i in 0..30u64 {
        c.query_drop(replace_rows(1000 + i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (bytes, names) = binlogs(&data);
    assert!(
        bytes > cap,
        "binlogs grew past the cap with uploads failing: {bytes}"
    );
    let pos = names
        .iter()
        .position(|n| *n == first_kept)
        .unwrap_or_else(|| panic!("{first_kept} (not uploaded) was purged: {names:?}"));
    for n in &names[pos..] {
        assert!(data.join(n).exists(), "{n} kept");
    }
    let (status, message) = dbvm_e2e::eventually(
        Duration::from_secs(60),
        "check 9 critical over the cap",
        || async {
            let (s, m) = rig.check(&src, "binlog").await;
            (s == "critical" && m.contains("OVER their cap")).then_some((s, m))
        },
    )
    .await;
    eprintln!(
        "uploads failing: {} MiB of binlogs; check 9 {status}: {message}",
        bytes >> 20
    );

    // Back: the uploads catch up and the binlogs return under the cap.
    rig.s3.start_s3();
    dbvm_e2e::eventually(
        Duration::from_secs(120),
        "binlogs back under the cap",
        || async { (binlogs(&data).0 < cap).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_purger_removes_an_expired_chain_with_its_objects_and_keeps_the_newest() {
    let mut rig = Rig::new().await;
    rig.s3.create_bucket("mbp");
    // Days cannot pass in a test: the debug agent takes a 20 s retention day (and no
    // schedule: its backups would land in the middle of this one's).
    let src = rig
        .vm_env("mpurge", &[(dbvm_agent::backup::TEST_DAY_S, "20")])
        .await;
    let password = maria::create(&rig, &src).await;
    let mut c = maria::connect(src.port, &password).await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(255))")
        .await
        .unwrap();
    maria::insert(&mut c, 1, 1_000).await;
    let (ak, sk) = rig.keys(&src, &rig.s3.secret_key).await;
    rig.ok(
        &src,
        "backup.configure",
        json!({"storage": rig.location("mbp", None), "access_key_id": ak, "secret_access_key": sk, "retention_days": 1, "schedule_hours": 0}),
    )
    .await;
    let f1 = rig.ok(&src, "backup.run", json!({})).await;
    maria::insert(&mut c, 1_001, 2_000).await;
    let list = rig.ok(&src, "backup.list", json!({})).await;
    let chain_expiry = list["chains"][0]["expires_ms"].as_i64().unwrap();
    // The old chain's last backup, late in its day.
    tokio::time::sleep(Duration::from_millis(
        (chain_expiry - 6_000 - dbvm_protocol::now_ms()).max(0) as u64,
    ))
    .await;
    let i1 = rig.ok(&src, "backup.run", json!({})).await;
    assert_eq!(i1["type"], "incr", "{i1}");
    tokio::time::sleep(Duration::from_millis(
        (chain_expiry - dbvm_protocol::now_ms()).max(0) as u64 + 1_000,
    ))
    .await;
    maria::insert(&mut c, 2_001, 3_000).await;
    let f2 = rig.ok(&src, "backup.run", json!({})).await;
    assert_eq!(f2["type"], "full", "{f2}");

    let p = rig.ok(&src, "backup.purge", json!({})).await;
    eprintln!("purge before the old chain's last backup expired: {p}");
    assert_eq!(p["purged"], json!([]), "{p}");
    let from = p["chains"][0]["purgeable_from_ms"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(
        (from - dbvm_protocol::now_ms()).max(0) as u64 + 500,
    ))
    .await;
    let p = rig.ok(&src, "backup.purge", json!({})).await;
    eprintln!("purge after it expired: {p}");
    let old = f1["label"].as_str().unwrap();
    assert_eq!(p["purged"], json!([old]), "{p}");
    let list = rig.ok(&src, "backup.list", json!({})).await;
    let chains = list["chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1, "{list}");
    assert_eq!(chains[0]["full"], f2["label"], "{list}");
    // Nothing of the old chain is left in the bucket.
    let left = rig.s3.root.join("mbp/mpurge/chains").join(old);
    let files: Vec<_> = std::fs::read_dir(&left)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "left in the bucket: {files:?}");
    // The newest chain still restores.
    let dst = rig.vm("mpurge2").await;
    let (ak, sk) = rig.keys(&dst, &rig.s3.secret_key).await;
    let out = rig
        .ok(
            &dst,
            "db.restore",
            json!({
                "spec": {"engine": "mariadb", "database": "app", "port": dst.port},
                "source": rig.location("mbp", Some("mpurge")),
                "access_key_id": ak, "secret_access_key": sk,
                "target": "latest",
            }),
        )
        .await;
    let mut d = maria::connect(dst.port, &rig.password(&out)).await;
    assert_eq!(maria::count_max(&mut d).await.0, 3_000, "{out}");
}
