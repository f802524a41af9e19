//! Log bundles through real processes: a signed `bundle.collect` from the control plane,
//! via a real broker, to a real agent process, which writes a complete, private bundle
//! whose files match its manifest and which carries none of the secrets planted in the
//! agent's argv-free environment or its config. These bundles are kept on the agent
//! (no `broker_url`), so the test reads the file; the way through the broker is
//! `bundle_transport.rs`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;

/// The archive's files by path.
fn unpack(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(archive).unwrap());
    let mut files = BTreeMap::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        files.insert(path, bytes);
    }
    files
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_bundle_collect_writes_a_complete_private_bundle_without_secrets() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let token = client
        .enrollment_token("db1", None)
        .await
        .expect("enrollment token")
        .token;
    // Secrets in the agent's environment (never read: the process list reads argv only)
    // and in an allowed config value (it still passes the log patterns).
    let agent = fleet.start_agent_env(
        "db1",
        broker.agent_addr,
        Some(&token),
        "[bundle]\njournal_unit = \"dbvm-agent\"\n",
        &[
            ("PGPASSWORD", "PlantE2eEnv1"),
            ("DBVM_TEST_NOTE", "password=PlantE2eEnv2"),
        ],
    );
    dbvm_e2e::connected(&client, "db1").await;

    let out = fleet
        .send_ok(
            &client,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "max_bytes": 8 << 20}),
        )
        .await;
    let path = std::path::PathBuf::from(out["path"].as_str().expect("path"));
    assert!(path.starts_with(agent.state_dir.join("bundle")), "{out}");
    let archive = std::fs::read(&path).expect("the bundle file");
    assert_eq!(out["bytes"], archive.len() as u64);
    assert_eq!(out["sha256"], hex(&Sha256::digest(&archive)));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let files = unpack(&archive);
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let listed = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), listed.len() + 1);
    for f in listed {
        let bytes = &files[f["path"].as_str().unwrap()];
        assert_eq!(f["size"], bytes.len() as u64, "{f}");
        assert_eq!(f["sha256"], hex(&Sha256::digest(bytes)), "{f}");
    }
    // The agent's own parts, from its real config file.
    let config = String::from_utf8_lossy(&files["agent/config.toml"]);
    assert!(config.contains("agent_id = \"db1\""), "{config}");
    assert!(
        String::from_utf8_lossy(&files["agent/config-check.txt"]).contains("is valid"),
        "{:?}",
        files.get("agent/config-check.txt")
    );
    assert!(files.contains_key("system/processes.txt"));
    // No secret of the environment, nor the enrollment token, anywhere.
    let mut everything = Vec::new();
    zstd::stream::copy_decode(archive.as_slice(), &mut everything).unwrap();
    let everything = String::from_utf8_lossy(&everything);
    for secret in ["PlantE2eEnv1", "PlantE2eEnv2", token.as_str()] {
        assert!(!everything.contains(secret), "{secret} is in the bundle");
    }

    // Arguments the operation refuses change nothing.
    let v = fleet
        .send(&client, &agent, "bundle.collect", json!({"hours": 0}))
        .await;
    assert_eq!(v.state, CommandState::Rejected, "{v:?}");
    assert_eq!(v.error.as_ref().expect("error").code, "bad_arguments");
    let bundles = std::fs::read_dir(agent.state_dir.join("bundle"))
        .unwrap()
        .count();
    assert_eq!(bundles, 1);
}

/// Stops the PostgreSQL server a test started (by the pid in its `postmaster.pid`) if
/// the test ends before `db.stop`.
struct StopServer(std::path::PathBuf);

impl Drop for StopServer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.0.join("data").join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_of_a_real_postgres_has_its_logs_configs_and_views_without_secrets() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let token = client
        .enrollment_token("pg1", None)
        .await
        .expect("enrollment token")
        .token;
    // The server runs as postgres, who must reach its data directory: not under the
    // fleet's directory (0700, root's). The host's PostgreSQL binaries (process runtime).
    let data = tempfile::Builder::new()
        .prefix("dbvm-bundle-data-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = data.path().join("db");
    let (uid, gid) = dbvm_e2e::dbtest::system_user("postgres");
    let sections = format!(
        "[health]\nmetrics_listen = \"\"\nshadow_file = \"/nonexistent/shadow\"\n\
         [database]\nruntime = \"process\"\ndata_root = {root}\ncontainer_name = \"pg1-db\"\n\
         uid = {uid}\ngid = {gid}\nengine_wait_s = 5\n",
        root = dbvm_e2e::fleet::toml_path(&root),
    );
    let agent = fleet.start_agent("pg1", broker.agent_addr, Some(&token), &sections);
    dbvm_e2e::connected(&client, "pg1").await;
    let _stop = StopServer(root.clone());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = fleet
        .send_ok(
            &client,
            &agent,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": port,
                   "parameters": {"max_connections": 40}}),
        )
        .await;
    let sealed: dbvm_protocol::seal::Sealed =
        serde_json::from_value(out["password"].clone()).expect("sealed password");
    let password = fleet
        .reply_key
        .open(&sealed)
        .expect("open")
        .expose()
        .to_string();

    // Secrets the server writes to its log (a failed statement is logged with its text)
    // and one a session's last query shows in pg_stat_activity.
    let c = dbvm_e2e::dbtest::pg_dbaas(port, &password, "app")
        .await
        .expect("dbaas connects");
    let e = c
        .simple_query("SELECT 'password=PlantPgLog1'::int")
        .await
        .expect_err("not a number");
    assert!(format!("{e:?}").contains("invalid input"), "{e:?}");
    let c2 = dbvm_e2e::dbtest::pg_dbaas(port, &password, "app")
        .await
        .expect("dbaas connects");
    // Fails (dbaas may not create roles) but stays the session's last query.
    let _ = c2
        .simple_query("CREATE ROLE planted LOGIN PASSWORD 'PlantPgSession2'")
        .await;

    let out = fleet
        .send_ok(
            &client,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "include_db_views": true}),
        )
        .await;
    let archive = std::fs::read(out["path"].as_str().expect("path")).expect("bundle");
    let files = unpack(&archive);
    let text = |p: &str| {
        String::from_utf8_lossy(files.get(p).unwrap_or_else(|| {
            panic!(
                "{p} is not in the bundle: {:?}",
                files.keys().collect::<Vec<_>>()
            )
        }))
        .into_owned()
    };
    let views = text("db/views.txt");
    assert!(views.contains("max_connections = '40'"), "{views}");
    assert!(views.contains("== sessions"), "{views}");
    assert!(views.contains("PASSWORD <redacted>"), "{views}");
    assert!(text("db/conf/postgresql.conf").contains(&format!("port = {port}")));
    assert!(text("db/conf/params.conf").contains("max_connections"));
    assert!(text("db/status.json").contains("\"phase\""));
    let logs: Vec<&String> = files.keys().filter(|p| p.starts_with("db/log/")).collect();
    assert!(!logs.is_empty(), "{:?}", files.keys().collect::<Vec<_>>());
    let server_log: String = logs.iter().map(|p| text(p)).collect();
    assert!(server_log.contains("invalid input syntax"), "{server_log}");

    let mut everything = Vec::new();
    zstd::stream::copy_decode(archive.as_slice(), &mut everything).unwrap();
    let everything = String::from_utf8_lossy(&everything);
    for secret in ["PlantPgLog1", "PlantPgSession2", password.as_str()] {
        assert!(!everything.contains(secret), "{secret} is in the bundle");
    }

    // Memory stays flat whatever the size: a 256 MiB log through the same path, with a
    // secret every 1,000 lines.
    let big = root.join("log").join("generated.log");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut written = 0usize;
        let mut i = 0u64;
        while written < 256 << 20 {
            let line = if i.is_multiple_of(1000) {
                format!("2026-12-04 03:00:00.{i:06} UTC [42] LOG:  connection with password=PlantBig3{i}\n")
            } else {
                format!("2026-12-04 03:00:00.{i:06} UTC [42] LOG:  duration: 0.{i} ms  statement: SELECT {i}\n")
            };
            f.write_all(line.as_bytes()).unwrap();
            written += line.len();
            i += 1;
        }
    }
    let hwm = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.proc.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    let before = hwm();
    let started = std::time::Instant::now();
    let out = fleet
        .send_ok(
            &client,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "max_bytes": 1u64 << 30}),
        )
        .await;
    let took = started.elapsed();
    let after = hwm();
    eprintln!(
        "a 256 MiB log: bundle of {} bytes in {took:?}; agent peak RSS {} MiB before, {} MiB after",
        out["bytes"],
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (32 << 20),
        "the agent's peak RSS grew from {before} to {after} bytes"
    );
    let archive = std::fs::read(out["path"].as_str().expect("path")).expect("bundle");
    let mut decoded = Vec::new();
    zstd::stream::copy_decode(archive.as_slice(), &mut decoded).unwrap();
    let decoded = String::from_utf8_lossy(&decoded);
    assert!(decoded.contains("statement: SELECT 1234567"));
    assert!(
        !decoded.contains("PlantBig3"),
        "a planted secret of the big log is in the bundle"
    );

    drop((c, c2));
    fleet.send_ok(&client, &agent, "db.stop", json!({})).await;
}
