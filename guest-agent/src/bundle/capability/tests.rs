//! Tests of the bundle capability: a real bundle built from planted configs, logs,
//! command output, a process's argv and environment, and the health history, each with
//! distinct secrets; the archive is decompressed, every file checked against the
//! manifest, and no planted secret may appear anywhere in it.

use super::*;

use crate::health::{Check, Finding, Run};

/// Every planted secret, each distinct, so a leak names its source.
const SECRETS: &[&str] = &[
    "PlantCfgToml1",
    "PlantCfgComment2",
    "PlantLogPw3",
    "PlantLogUrl4",
    "PlantLogPem5",
    "dbvm-enroll-PlantLogToken6Abcdefghijklmnopqrstuvwxyz0123",
    "sealed:v1:PlantLogSealed7Abcdefghijklmnop",
    "AKIAPLANTLOGAWS8XYZQ",
    "PlantLogAwsSecret9wJalrXUtnFEMIK7MDENGbP",
    "PlantLogBearer10",
    "PlantJsonCfg11",
    "PlantPgbr12",
    "PlantPgbrSecret13",
    "PlantPgConf14",
    "PlantConninfo15",
    "PlantCmdOut16",
    "PlantArgv17",
    "PlantEnv18",
    "PlantHealth19",
    "PlantHealthUrl20",
    "PlantSqlPw21",
    // Under keys no pattern knows: only the allow-lists keep them out.
    "PlantCfgOpaque22",
    "PlantJsonOpaque23",
    "PlantPgOpaque24",
    "PlantPgbrOpaque25",
];

/// The safe text each file must keep.
const KEPT: &[(&str, &str)] = &[
    ("agent/config.toml", "broker.example:7443"),
    ("planted/app.log", "checkpoint complete"),
    ("planted/app.log", "after the key"),
    ("planted/state.json", "\"phase\": \"running\""),
    ("planted/pgbackrest.conf", "repo1-s3-bucket=backups"),
    ("planted/postgresql.conf", "shared_buffers = 128MB"),
    ("planted/command.txt", "command output line"),
    ("health/latest.json", "bundle_test_probe"),
];

struct PlantedCheck;

#[async_trait]
impl Check for PlantedCheck {
    fn id(&self) -> &'static str {
        "bundle_test_probe"
    }
    async fn run(&self, _run: &Run) -> Finding {
        Finding::ok(
            "probe: login with password=PlantHealth19 to postgres://mon:PlantHealthUrl20@db/x",
        )
    }
}

/// A capability whose parts are the planted files, in every redaction kind.
struct Planted(PathBuf);

impl Capability for Planted {
    fn name(&self) -> &'static str {
        "planted"
    }
    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        Vec::new()
    }
    fn bundle_parts(&self, _request: &Request) -> Vec<Part> {
        let d = &self.0;
        vec![
            Part::log_file("planted/app.log", d.join("app.log")),
            Part::config(
                "planted/state.json",
                "state",
                Producer::File(d.join("state.json")),
                ConfigFormat::Json,
                &["phase", "port"],
            ),
            Part::config(
                "planted/pgbackrest.conf",
                "pgbackrest",
                Producer::File(d.join("pgbackrest.conf")),
                ConfigFormat::KeyValue,
                crate::backup::bundle::PGBACKREST_SAFE_KEYS,
            ),
            Part::config(
                "planted/postgresql.conf",
                "postgresql.conf",
                Producer::File(d.join("postgresql.conf")),
                ConfigFormat::KeyValue,
                crate::db::bundle::safe_keys(crate::db::params::Flavour::Postgres),
            ),
            Part::command(
                "planted/command.txt",
                &["cat", d.join("command-output").to_str().unwrap()],
                Duration::from_secs(10),
            ),
        ]
    }
}

fn plant(dir: &Path) -> PathBuf {
    let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    let ca = dir.join("ca.crt");
    w(
        "agent.toml",
        &format!(
            "# rotated: password=PlantCfgComment2\n\
             agent_id = \"db1\"\n\
             state_dir = \"{}/state\"\n\
             [broker]\naddress = \"broker.example:7443\"\nca_cert = \"{}\"\n\
             [link]\ninitial_backoff_ms = 500\n\
             [future_section]\napi_secret = \"PlantCfgToml1\"\nopaque = \"PlantCfgOpaque22\"\n",
            dir.display(),
            ca.display()
        ),
    );
    w(
        "app.log",
        "2026-12-04 LOG: checkpoint complete\n\
         login failed for password=PlantLogPw3\n\
         dialing postgres://app:PlantLogUrl4@db:5432/app\n\
         -----BEGIN OPENSSH PRIVATE KEY-----\nPlantLogPem5\n-----END OPENSSH PRIVATE KEY-----\n\
         after the key\n\
         enrolling with dbvm-enroll-PlantLogToken6Abcdefghijklmnopqrstuvwxyz0123\n\
         secret sealed:v1:PlantLogSealed7Abcdefghijklmnop received\n\
         key AKIAPLANTLOGAWS8XYZQ and PlantLogAwsSecret9wJalrXUtnFEMIK7MDENGbP\n\
         GET / Authorization: Bearer PlantLogBearer10\n\
         statement: ALTER ROLE app PASSWORD 'PlantSqlPw21'\n",
    );
    w(
        "state.json",
        r#"{"phase":"running","port":5432,"admin":{"token":"PlantJsonCfg11","note":"PlantJsonOpaque23"}}"#,
    );
    w(
        "pgbackrest.conf",
        "[global]\nrepo1-s3-bucket=backups\nrepo1-s3-key=PlantPgbr12\n\
         repo1-s3-key-secret=PlantPgbrSecret13\nrepo1-host-user=PlantPgbrOpaque25\n",
    );
    w(
        "postgresql.conf",
        "shared_buffers = 128MB\nssl_passphrase_command = 'echo PlantPgConf14'\n\
         primary_conninfo = 'host=p user=r password=PlantConninfo15'\n\
         custom.opaque = 'PlantPgOpaque24'\n",
    );
    w(
        "command-output",
        "command output line\nexport DB_PASSWORD=PlantCmdOut16\n",
    );
    dir.join("agent.toml")
}

fn request() -> Request {
    Request {
        since_ms: dbvm_protocol::now_ms() - 3_600_000,
        until_ms: dbvm_protocol::now_ms(),
        include_db_logs: true,
        include_db_views: true,
    }
}

#[tokio::test]
async fn a_real_bundle_has_every_file_of_its_manifest_and_no_planted_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config_file = plant(dir.path());
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let ctx = Context::standalone("db1", state_dir.clone());

    // The health history: a run whose contributed check quotes secrets.
    let monitor = crate::health::Monitor::new(
        &ctx,
        crate::health::HealthSettings::default(),
        None,
        vec![Arc::new(PlantedCheck)],
    );
    monitor.run_once().await;
    // A process whose argv and environment carry secrets (the process list reads the
    // argv, never the environment).
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 60", "sh", "--password=PlantArgv17"])
        .env("PGPASSWORD", "PlantEnv18")
        .spawn()
        .unwrap();

    let others: Vec<Arc<dyn Capability>> = vec![
        Arc::new(crate::system::System),
        Arc::new(Planted(dir.path().to_path_buf())),
        Arc::new(crate::health::capability::Health(monitor)),
    ];
    let bundles = Bundles::new(&ctx, BundleSettings::default(), Some(config_file), others);
    let summary = bundles.collect("b1", request(), 64 * MIB).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let summary = summary.unwrap();

    let path = state_dir.join("bundle").join("b1.tar.zst");
    assert_eq!(summary["path"], path.display().to_string());
    let archive = std::fs::read(&path).unwrap();
    assert_eq!(summary["bytes"], archive.len() as u64);
    let files = crate::bundle::verify::unpack(archive.as_slice()).unwrap();
    let manifest = crate::bundle::verify::verify(archive.as_slice()).unwrap();

    // No planted secret anywhere: not in a file, a path, the manifest, nor the summary.
    let mut everything = Vec::new();
    zstd::stream::copy_decode(archive.as_slice(), &mut everything).unwrap();
    let everything = String::from_utf8_lossy(&everything);
    let summary_text = summary.to_string();
    for secret in SECRETS {
        assert!(!everything.contains(secret), "{secret} is in the archive");
        assert!(!summary_text.contains(secret), "{secret} is in the summary");
    }
    // The safe text stays.
    for (file, text) in KEPT {
        let content = String::from_utf8_lossy(&files[*file]);
        assert!(
            content.contains(text),
            "{text:?} lost from {file}:\n{content}"
        );
    }
    let processes = String::from_utf8_lossy(&files["system/processes.txt"]);
    assert!(
        processes.contains("sleep 60 sh --password=<redacted>"),
        "{processes}"
    );
    let history = String::from_utf8_lossy(&files["health/history.jsonl"]);
    assert_eq!(history.lines().count(), 1);
    // Redactions are counted per file.
    let count = |p: &str| {
        manifest
            .files
            .iter()
            .find(|f| f.path == p)
            .unwrap()
            .redactions
    };
    assert!(
        count("planted/app.log") >= 9,
        "{}",
        count("planted/app.log")
    );
    assert_eq!(count("planted/state.json"), 2);
    assert_eq!(count("planted/pgbackrest.conf"), 3);
    assert_eq!(count("planted/postgresql.conf"), 3);
    // TOML and JSON are re-serialised from what was parsed: comments do not come out.
    assert_eq!(count("agent/config.toml"), 2);
    assert!(manifest.redactions >= 20);
    // The agent's own parts.
    assert!(String::from_utf8_lossy(&files["agent/version.txt"]).starts_with("dbvm-agent "));
    assert!(String::from_utf8_lossy(&files["agent/config-check.txt"]).contains("NOT valid"));
    let skipped_or_file = |p: &str| {
        files.contains_key(p)
            || manifest.skipped.iter().any(|s| s.path == p)
            || manifest.failed.iter().any(|s| s.path == p)
    };
    for p in [
        "agent/journal.log",
        "system/os-release",
        "system/meminfo",
        "system/network.json",
        "system/dmesg.txt",
        "system/facts.json",
    ] {
        assert!(
            skipped_or_file(p),
            "{p} is neither in the archive nor in the manifest"
        );
    }
    assert_eq!(summary["files"], manifest.files.len());
    assert_eq!(summary["redactions"], manifest.redactions);
}

#[tokio::test]
async fn a_second_bundle_while_one_runs_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::standalone("db1", dir.path().to_path_buf());
    let bundles = Bundles::new(&ctx, BundleSettings::default(), None, Vec::new());
    let running = bundles.inner.busy.lock().await;
    let e = bundles.collect("b2", request(), MIB).await.unwrap_err();
    assert!(e.to_string().contains("already being collected"), "{e}");
    drop(running);
    bundles.collect("b2", request(), MIB).await.unwrap();
}

#[tokio::test]
async fn what_an_interrupted_bundle_left_is_removed_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let bundle_dir = dir.path().join("bundle");
    std::fs::create_dir_all(bundle_dir.join(".old.tar.zst.spool")).unwrap();
    std::fs::write(bundle_dir.join(".old.tar.zst.spool").join("1.part"), "x").unwrap();
    std::fs::write(bundle_dir.join(".old.tar.zst.tmp"), "half").unwrap();
    let ctx = Context::standalone("db1", dir.path().to_path_buf());
    let bundles = Bundles::new(&ctx, BundleSettings::default(), None, Vec::new());
    bundles.collect("new", request(), MIB).await.unwrap();
    let names: Vec<String> = std::fs::read_dir(&bundle_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["new.tar.zst"]);
}

#[tokio::test]
async fn old_bundles_are_pruned_to_keep() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::standalone("db1", dir.path().to_path_buf());
    let settings = BundleSettings {
        keep: 2,
        ..BundleSettings::default()
    };
    let bundles = Bundles::new(&ctx, settings, None, Vec::new());
    for name in ["a", "b", "c"] {
        bundles.collect(name, request(), MIB).await.unwrap();
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("bundle"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["b.tar.zst", "c.tar.zst"]);
}

#[test]
fn arguments_are_checked_before_anything_runs() {
    let now = 10_000_000_000;
    let check = |v: serde_json::Value| {
        serde_json::from_value::<Args>(v)
            .map_err(|e| e.to_string())
            .and_then(|a| a.check(now, 512 * MIB))
    };
    let (r, max) = check(serde_json::json!({})).unwrap();
    assert_eq!(
        (r.since_ms, r.until_ms, max),
        (now - 24 * 3_600_000, now, 512 * MIB)
    );
    assert!(r.include_db_logs && !r.include_db_views);
    let (r, _) = check(serde_json::json!({"hours": 2})).unwrap();
    assert_eq!(r.since_ms, now - 2 * 3_600_000);
    for bad in [
        serde_json::json!({"hours": 0}),
        serde_json::json!({"hours": 721}),
        serde_json::json!({"hours": 1, "since_ms": 5}),
        serde_json::json!({"since_ms": 10, "until_ms": 5}),
        serde_json::json!({"since_ms": -1}),
        serde_json::json!({"since_ms": 0, "until_ms": now}),
        serde_json::json!({"max_bytes": 10}),
        serde_json::json!({"max_bytes": 1u64 << 40}),
        serde_json::json!({"surprise": true}),
    ] {
        assert!(check(bad.clone()).is_err(), "{bad} was accepted");
    }
}

#[test]
fn settings_are_checked() {
    assert!(BundleSettings::default().validate().is_ok());
    let bad = BundleSettings {
        keep: 0,
        ..BundleSettings::default()
    };
    assert_eq!(bad.validate().unwrap_err().0, "bundle.keep");
}
