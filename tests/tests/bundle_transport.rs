//! Log bundles through the broker, against real processes: a signed `bundle.collect`
//! whose agent uploads the bundle to the broker while writing it, over its own HTTPS
//! connection (through a TCP proxy the test can cut, pause and slow), resumable after a
//! cut and a broker restart; who may upload and fetch; a broker disk that fills; two
//! bundles at once on one agent; nine agents at once (admission runs eight).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::proxy::Proxy;
use dbvm_e2e::{eventually, Fleet};
use dbvm_protocol::api::{BundleState, CommandState};
use reqwest::StatusCode;
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// `mib` MiB of log lines that compress about 2:1 (random hex), with a planted secret
/// every 500 lines.
fn write_logs(dir: &Path, mib: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("agent.log")).unwrap());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut written = 0;
    let mut i = 0u64;
    while written < mib << 20 {
        let mut hex = String::with_capacity(64);
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            hex.push_str(&format!("{state:016x}"));
        }
        let line = if i.is_multiple_of(500) {
            format!(
                "2026-12-04T07:00:00Z INFO dbvm_agent: login password=PlantUpload{i} id={hex}\n"
            )
        } else {
            format!("2026-12-04T07:00:00Z INFO dbvm_agent: line {i} id={hex}\n")
        };
        f.write_all(line.as_bytes()).unwrap();
        written += line.len();
        i += 1;
    }
    f.flush().unwrap();
}

/// The bundle the broker lists for `id`, when it lists it.
async fn listed(
    client: &dbvmctl::Client,
    id: uuid::Uuid,
) -> Option<dbvm_protocol::api::BundleInfo> {
    client
        .bundles()
        .await
        .expect("list bundles")
        .bundles
        .into_iter()
        .find(|b| b.id == id)
}

/// An agent config with its log files in `logs` (journald does not run here).
fn log_dir_section(logs: &Path) -> String {
    format!(
        "[health]\nenabled = false\n[bundle]\nlog_dir = {}\n",
        dbvm_e2e::fleet::toml_path(logs)
    )
}

fn broker_url(proxy: &Proxy) -> String {
    format!("https://localhost:{}", proxy.addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_streams_to_the_broker_resumes_after_a_cut_and_a_broker_restart_and_checks() {
    let fleet = Fleet::new();
    let mut broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let logs = fleet.path("db1-logs");
    write_logs(&logs, 24);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", &log_dir_section(&logs))
        .await;
    let proxy = Proxy::start(broker.api_addr).await;
    // ~12 MiB at 1 MiB/s: long enough to cut it twice.
    proxy.throttle(1 << 20);

    let cmd = fleet.sign(
        "db1",
        "bundle.collect",
        json!({"hours": 1, "broker_url": broker_url(&proxy)}),
    );
    let id = client.submit(&cmd).await.expect("submit").id;
    let first = eventually(WAIT, "some of the bundle on the broker", || async {
        listed(&client, id)
            .await
            .filter(|b| b.size > 0)
            .map(|b| b.size)
    })
    .await;
    proxy.cut();
    let resumed_past = eventually(WAIT, "the upload resumed after the cut", || async {
        listed(&client, id)
            .await
            .filter(|b| b.size > first + (1 << 20))
            .map(|b| b.size)
    })
    .await;

    // kill -9 and start again on the same ports and data: the agent resumes from what
    // the broker had synced.
    broker.proc.kill();
    broker = fleet.restart_broker(&broker, "");
    let client = fleet.client(&broker);
    proxy.throttle(0);
    let done = client.wait(id, WAIT).await.expect("wait");
    assert_eq!(
        done.state,
        CommandState::Succeeded,
        "{:?}\n{}",
        done.error,
        agent.proc.log_tail()
    );
    let out = done.output.expect("output");
    assert!(out["uploaded"]["resumed"].as_u64().unwrap() >= 2, "{out}");
    let info = listed(&client, id).await.expect("listed");
    assert_eq!(info.state, BundleState::Complete);
    assert!(info.size > resumed_past, "{info:?}");
    assert_eq!(Some(info.size), out["bytes"].as_u64());
    assert_eq!(info.sha256.as_deref(), out["sha256"].as_str());

    // dbvmctl fetches it and checks it against the agent's and the broker's SHA-256.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("b.tar.zst");
    let got = dbvmctl::bundle::fetch(&client, id, &dest, out["sha256"].as_str(), |_, _| {})
        .await
        .expect("fetch");
    assert_eq!(got.bytes, info.size);
    let manifest = dbvmctl::bundle::manifest(&dest).expect("manifest");
    let files = manifest["files"].as_array().unwrap();
    let log = files
        .iter()
        .find(|f| f["path"] == "agent/logs/agent.log")
        .unwrap_or_else(|| panic!("no agent log in {manifest}"));
    assert!(log["size"].as_u64().unwrap() > 20 << 20, "{log}");
    assert!(log["redactions"].as_u64().unwrap() > 0, "{log}");
    let mut everything = Vec::new();
    zstd::stream::copy_decode(std::fs::File::open(&dest).unwrap(), &mut everything).unwrap();
    let everything = String::from_utf8_lossy(&everything);
    assert!(everything.contains("line 4999 id="));
    assert!(
        !everything.contains("PlantUpload"),
        "a planted secret is in the bundle"
    );
    // A fetch never overwrites; a wrong expected hash removes what arrived.
    assert!(matches!(
        dbvmctl::bundle::fetch(&client, id, &dest, None, |_, _| {}).await,
        Err(dbvmctl::bundle::BundleError::Exists(_))
    ));
    let other = dir.path().join("other.tar.zst");
    let e = dbvmctl::bundle::fetch(&client, id, &other, Some(&"0".repeat(64)), |_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("the agent says"), "{e}");
    assert!(!other.exists() && !dir.path().join("other.tar.zst.part").exists());
    // The agent keeps no copy once the broker has it.
    let kept: Vec<_> = std::fs::read_dir(agent.state_dir.join("bundle"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(kept.is_empty(), "{kept:?}");

    // Deleted, it is gone for good.
    client.delete_bundle(id).await.expect("delete");
    assert!(listed(&client, id).await.is_none());
    let e = client
        .download_bundle(id, &dir.path().join("gone"), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::NOT_FOUND), "{e}");
}

/// What one stolen credential can do: an agent's certificate uploads only its own
/// command's bundle, never reads bundles; a control plane's never uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_agent_a_bundle_is_for_uploads_it_and_only_control_planes_read_bundles() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let logs = fleet.path("db1-logs");
    write_logs(&logs, 8);
    let db1 = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", &log_dir_section(&logs))
        .await;
    let db2 = fleet
        .enroll_agent(
            &client,
            broker.agent_addr,
            "db2",
            "[health]\nenabled = false\n",
        )
        .await;
    let proxy = Proxy::start(broker.api_addr).await;
    // db1's bundle held on its way once it has begun, so its command stays unfinished.
    proxy.throttle(256 << 10);
    let cmd = fleet.sign(
        "db1",
        "bundle.collect",
        json!({"hours": 1, "broker_url": broker_url(&proxy)}),
    );
    let id = client.submit(&cmd).await.expect("submit").id;
    eventually(WAIT, "db1's bundle uploading", || async {
        listed(&client, id).await.filter(|b| b.size > 0).map(drop)
    })
    .await;
    proxy.pause(true);

    let http_as = |dir: &Path| {
        let id = dbvm_agent::identity::StateDir::open(dir)
            .unwrap()
            .identity()
            .unwrap()
            .expect("enrolled");
        let tls = dbvm_protocol::tls::client_config(
            fleet.ca.cert_pem(),
            Some((&id.cert_pem, &id.key_pem)),
        )
        .unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap()
    };
    let db2_http = http_as(&db2.state_dir);
    let api = broker.api_url();
    let put = |http: &reqwest::Client, id: uuid::Uuid| {
        http.put(format!("{api}/v1/bundles/{id}/content?offset=0"))
            .body(vec![0u8; 1000])
            .send()
    };
    let code = |resp: reqwest::Response| async move {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap();
        (status, body["code"].as_str().unwrap().to_string(), body)
    };
    // db2 may not upload db1's bundle.
    let (status, c, body) = code(put(&db2_http, id).await.unwrap()).await;
    assert_eq!(
        (status, c.as_str()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("not for db2"),
        "{body}"
    );
    // Nor upload anything for a command that is no bundle (its own ping).
    let ping = client
        .submit(&fleet.sign("db2", "ping", json!({})))
        .await
        .unwrap();
    client.wait(ping.id, WAIT).await.unwrap();
    let (status, c, body) = code(put(&db2_http, ping.id).await.unwrap()).await;
    assert_eq!(
        (status, c.as_str()),
        (StatusCode::CONFLICT, "not_a_bundle"),
        "{body}"
    );
    // Nor list or read bundles.
    let resp = db2_http
        .get(format!("{api}/v1/bundles"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = db2_http
        .get(format!("{api}/v1/bundles/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A control plane may not upload.
    let tls = dbvm_protocol::tls::client_config(
        fleet.ca.cert_pem(),
        Some((&fleet.control_plane.cert_pem, &fleet.control_plane.key_pem)),
    )
    .unwrap();
    let cp_http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let (status, c, body) = code(put(&cp_http, id).await.unwrap()).await;
    assert_eq!(
        (status, c.as_str()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{body}"
    );
    // A bundle still uploading is listed but not served.
    let e = client
        .download_bundle(id, &fleet.path("early"), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(e.api_code(), Some("not_complete"), "{e}");

    // A second bundle on the same agent while one runs is refused, clearly.
    let second = client
        .submit(&fleet.sign(
            "db1",
            "bundle.collect",
            json!({"hours": 1, "broker_url": broker_url(&proxy)}),
        ))
        .await
        .unwrap();
    let second = client.wait(second.id, WAIT).await.unwrap();
    assert_eq!(second.state, CommandState::Failed, "{second:?}");
    let msg = second.error.unwrap().message;
    assert!(msg.contains("already being collected"), "{msg}");

    proxy.throttle(0);
    proxy.pause(false);
    let done = client.wait(id, WAIT).await.unwrap();
    assert_eq!(
        done.state,
        CommandState::Succeeded,
        "{:?}\n{}",
        done.error,
        db1.proc.log_tail()
    );
    // Finished: nothing more may be uploaded for it, even by db1.
    let db1_http = http_as(&db1.state_dir);
    let (status, c, body) = code(put(&db1_http, id).await.unwrap()).await;
    assert_eq!(
        (status, c.as_str()),
        (StatusCode::CONFLICT, "already_complete"),
        "{body}"
    );
}

/// The broker's disk fills while it stores a bundle: the agent's command fails saying
/// so, nothing of the bundle is kept or served, and with space back a bundle goes in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_broker_disk_fails_the_bundle_clearly_and_keeps_nothing() {
    let fleet = Fleet::new();
    let disk = dbvm_e2e::backup::Tmpfs::mount(&fleet.path("broker-data"), "3m");
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let logs = fleet.path("db1-logs");
    write_logs(&logs, 16);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", &log_dir_section(&logs))
        .await;
    let url = broker.api_url();
    let v = fleet
        .send(
            &client,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "broker_url": url}),
        )
        .await;
    assert_eq!(v.state, CommandState::Failed, "{v:?}");
    let msg = v.error.unwrap().message;
    assert!(msg.contains("disk is full"), "{msg}");
    assert!(client.bundles().await.unwrap().bundles.is_empty());
    let files: Vec<_> = std::fs::read_dir(fleet.path("broker-data").join("bundles"))
        .unwrap()
        .collect();
    assert!(files.is_empty(), "{files:?}");

    disk.resize("64m");
    let out = fleet
        .send_ok(
            &client,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "broker_url": url}),
        )
        .await;
    let id: uuid::Uuid = out["bundle_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        listed(&client, id).await.map(|b| b.state),
        Some(BundleState::Complete)
    );
}

/// Nine agents asked for a bundle at once: the broker's admission runs eight (the
/// management class), the ninth waits in the queue and runs when one finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_bundles_on_nine_agents_run_eight_at_once_and_the_ninth_waits() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let proxy = Proxy::start(broker.api_addr).await;
    proxy.pause(true);
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for n in 1..=9 {
        let name = format!("db{n}");
        let logs = fleet.path(&format!("{name}-logs"));
        write_logs(&logs, 1);
        agents.push(
            fleet
                .enroll_agent(&client, broker.agent_addr, &name, &log_dir_section(&logs))
                .await,
        );
    }
    for n in 1..=9 {
        let cmd = fleet.sign(
            &format!("db{n}"),
            "bundle.collect",
            json!({"hours": 1, "broker_url": broker_url(&proxy)}),
        );
        ids.push(client.submit(&cmd).await.expect("submit").id);
    }
    let states = || async {
        let mut s = Vec::new();
        for id in &ids {
            s.push(client.command(*id).await.unwrap().state);
        }
        s
    };
    eventually(WAIT, "eight bundles running and one queued", || async {
        let s = states().await;
        let running = s.iter().filter(|s| **s == CommandState::Running).count();
        let queued = s.iter().filter(|s| **s == CommandState::Queued).count();
        (running == 8 && queued == 1).then_some(())
    })
    .await;
    // Held there: the ninth does not start while the eight run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = states().await;
    assert_eq!(
        s.iter().filter(|s| **s == CommandState::Queued).count(),
        1,
        "{s:?}"
    );
    proxy.pause(false);
    for id in &ids {
        let v = client.wait(*id, WAIT).await.unwrap();
        assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    }
    assert_eq!(client.bundles().await.unwrap().bundles.len(), 9);
}

/// `dbvmctl bundle` as a support engineer runs it: collect, wait, download, check, and
/// the manifest's summary; then `bundle list` and `bundle fetch`, with --json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbvmctl_bundle_collects_fetches_checks_and_summarises() {
    let fleet = Fleet::new();
    let home = fleet.path("ctl-home");
    let bin = dbvm_e2e::proc::bin_dir().join("dbvmctl");
    let keygen = std::process::Command::new(&bin)
        .args(["--dir", home.to_str().unwrap(), "keygen"])
        .output()
        .expect("run dbvmctl keygen");
    assert!(keygen.status.success(), "{keygen:?}");
    let entry = String::from_utf8(keygen.stdout).unwrap();
    std::fs::copy(fleet.path("ca.crt"), home.join("ca.crt")).expect("ca");
    std::fs::write(home.join("controlplane.crt"), &fleet.control_plane.cert_pem).expect("cert");
    std::fs::write(home.join("controlplane.key"), &fleet.control_plane.key_pem).expect("key");
    let broker = fleet.start_broker(&entry);
    let client = fleet.client(&broker);
    let logs = fleet.path("db1-logs");
    write_logs(&logs, 2);
    let _db1 = fleet
        .enroll_agent(
            &client,
            broker.agent_addr,
            "db1",
            &format!("{}{entry}", log_dir_section(&logs)),
        )
        .await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .env("DBVM_HOME", &home)
            .env("DBVM_BROKER", broker.api_url())
            .output()
            .expect("dbvmctl runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("db1.tar.zst");
    let (code, stdout, stderr) = run(&[
        "bundle",
        "db1",
        "--hours",
        "2",
        "-o",
        first.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("checked") && stdout.contains("bundle of agent db1"),
        "{stdout}"
    );
    assert!(stdout.contains("redactions"), "{stdout}");
    assert!(first.exists());
    // The same file again is refused before the agent works for nothing.
    let (code, _, stderr) = run(&["bundle", "db1", "-o", first.to_str().unwrap()]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("exists already"), "{stderr}");

    let (code, stdout, stderr) = run(&["bundle", "list", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let bundles = list["bundles"].as_array().unwrap();
    assert_eq!(bundles.len(), 1, "{list}");
    assert_eq!(bundles[0]["state"], "complete");
    let id = bundles[0]["id"].as_str().unwrap().to_string();
    let (code, stdout, _) = run(&["bundle", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains(&id) && stdout.contains("complete"),
        "{stdout}"
    );

    let second = dir.path().join("again.tar.zst");
    let (code, stdout, stderr) = run(&[
        "bundle",
        "fetch",
        &id,
        "-o",
        second.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let fetched: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(fetched["sha256"], bundles[0]["sha256"], "{fetched}");
    assert!(
        fetched["manifest"]["files"].as_u64().unwrap() > 5,
        "{fetched}"
    );
    assert_eq!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap()
    );
    // The broker's own bundle: made now, listed like the agents', checked the same way.
    let own = dir.path().join("broker.tar.zst");
    let (code, stdout, stderr) = run(&[
        "bundle",
        "broker",
        "--hours",
        "1",
        "-o",
        own.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("bundle of agent (broker)"), "{stdout}");
    let files = dbvm_bundle::verify::unpack(std::fs::File::open(&own).unwrap()).unwrap();
    for f in [
        "broker/version.txt",
        "broker/config.toml",
        "broker/config-check.txt",
        "broker/store.json",
        "broker/agents.json",
        "broker/metrics.txt",
        "system/meminfo",
    ] {
        assert!(files.contains_key(f), "{f} missing: {:?}", files.keys());
    }
    let store: serde_json::Value = serde_json::from_slice(&files["broker/store.json"]).unwrap();
    assert_eq!(store["bundles"], 1, "{store}");
    assert!(String::from_utf8_lossy(&files["broker/config-check.txt"]).contains("is valid"));
    assert!(String::from_utf8_lossy(&files["broker/agents.json"]).contains("\"db1\""));

    // An id the broker does not hold: a clear refusal.
    let (code, _, stderr) = run(&["bundle", "fetch", &uuid::Uuid::new_v4().to_string()]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("no bundle"), "{stderr}");
}

/// The copy of `id` the broker lists once `done` holds for it.
async fn copy_when(
    client: &dbvmctl::Client,
    id: uuid::Uuid,
    done: impl Fn(&dbvm_protocol::api::BundleCopy) -> bool,
) -> dbvm_protocol::api::BundleCopy {
    let mut last = None;
    for _ in 0..(WAIT.as_millis() / 250) {
        last = listed(client, id).await.and_then(|b| b.s3);
        if let Some(c) = &last {
            if done(c) {
                return c.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("bundle {id}: its S3 copy never got there; last {last:?}");
}

/// A broker with a bucket (`[bundles.s3]`, a real S3 server that checks signatures,
/// behind TLS) copies each complete bundle there: while S3 is down the copy is recorded
/// failed with why and tried again, and copied once S3 is back, whole (its SHA-256 is the
/// bundle's); the broker's own bundle is copied too; deleting a bundle deletes its copy.
/// A secret key file others can read stops the broker before it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_bucket_copies_bundles_there_retries_while_s3_is_down_and_deletes_copies() {
    use std::os::unix::fs::PermissionsExt;
    let fleet = Fleet::new();
    let s3 = dbvm_e2e::s3::S3Server::start(&fleet.path("s3"));
    s3.create_bucket("support");
    let key_id = fleet.path("s3-access-key-id");
    let secret = fleet.path("s3-secret-access-key");
    std::fs::write(&key_id, format!("{}\n", s3.access_key)).unwrap();
    std::fs::write(&secret, format!("{}\n", s3.secret_key)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let section = format!(
        "[bundles.s3]\nendpoint = \"{}\"\nbucket = \"support\"\nprefix = \"fleet-1/bundles\"\n\
         ca_file = {}\naccess_key_id_file = {}\nsecret_access_key_file = {}\n",
        s3.endpoint_url(),
        dbvm_e2e::fleet::toml_path(&s3.ca_pem_path),
        dbvm_e2e::fleet::toml_path(&key_id),
        dbvm_e2e::fleet::toml_path(&secret),
    );
    // Readable by others: refused before anything starts, saying how to fix it.
    let config = fleet.path("refused.toml");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    std::fs::write(&config, fleet.broker_config("refused", any, any, &section)).unwrap();
    let out = std::process::Command::new(dbvm_e2e::proc::bin_dir().join("dbvm-broker"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("secret_access_key_file") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(&s3.secret_key), "{err}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let broker = fleet.start_broker(&section);
    let client = fleet.client(&broker);
    let logs = fleet.path("db1-logs");
    write_logs(&logs, 2);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", &log_dir_section(&logs))
        .await;
    let url = broker.api_url();

    // S3 down: the bundle is complete on the broker, its copy failed and owed.
    s3.stop_s3();
    let out = fleet
        .send_ok(
            &client,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "broker_url": url}),
        )
        .await;
    let id: uuid::Uuid = out["bundle_id"].as_str().unwrap().parse().unwrap();
    let failed = copy_when(&client, id, |c| c.attempts >= 1).await;
    assert_eq!(
        failed.state,
        dbvm_protocol::api::CopyState::Failed,
        "{failed:?}"
    );
    assert_eq!(
        failed.url,
        format!("s3://support/fleet-1/bundles/db1/{id}.tar.zst")
    );
    let why = failed.error.clone().unwrap();
    assert!(why.contains("storage"), "{why}");
    assert!(failed.next_attempt_ms.is_some(), "{failed:?}");
    let b = listed(&client, id).await.unwrap();
    assert_eq!(b.state, BundleState::Complete);

    // S3 back: the retry copies it, whole.
    s3.start_s3();
    let copied = copy_when(&client, id, |c| {
        c.state == dbvm_protocol::api::CopyState::Copied
    })
    .await;
    assert!(copied.attempts >= 2 && copied.error.is_none(), "{copied:?}");
    let reader = dbvm_s3::S3::new(
        &dbvm_s3::Endpoint {
            host: s3.endpoint_host.clone(),
            port: s3.port,
            bucket: "support".into(),
            region: s3.region.clone(),
            prefix: "fleet-1/bundles".into(),
            ca_pem: Some(std::fs::read_to_string(&s3.ca_pem_path).unwrap()),
            access_key_id: dbvm_protocol::seal::Secret::new(s3.access_key.clone()),
            secret_access_key: dbvm_protocol::seal::Secret::new(s3.secret_key.clone()),
        },
        Duration::from_secs(10),
    )
    .unwrap();
    let name = format!("db1/{id}.tar.zst");
    let mut bytes = Vec::new();
    let stored = reader
        .download(&name, &mut bytes, b.sha256.as_deref())
        .await
        .expect("the copy is the bundle");
    assert_eq!(stored.size, b.size);

    // The broker's own bundle goes to the bucket too, under broker/.
    let own = client.broker_bundle(1).await.unwrap();
    let copied = copy_when(&client, own.id, |c| {
        c.state == dbvm_protocol::api::CopyState::Copied
    })
    .await;
    assert!(
        copied.url.ends_with(&format!("/broker/{}.tar.zst", own.id)),
        "{copied:?}"
    );

    // Deleting a bundle deletes its copy.
    client.delete_bundle(id).await.unwrap();
    let gone = reader.download(&name, &mut Vec::new(), None).await;
    assert!(
        matches!(gone, Err(dbvm_s3::S3Error::NotFound { .. })),
        "{gone:?}"
    );
    let log = broker.proc.log_text();
    assert!(!log.contains(&s3.secret_key) && !log.contains(&s3.access_key));
}

/// The status and message of a refused call.
fn refusal<T: std::fmt::Debug>(r: Result<T, dbvmctl::ClientError>) -> (StatusCode, String) {
    match r {
        Err(dbvmctl::ClientError::Http(status, e)) => (
            StatusCode::from_u16(status.as_u16()).unwrap(),
            format!("{}: {}", e.code, e.error),
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Roles, over real mTLS against a real broker and agent, one certificate per role (as
/// `dbvmctl ca issue` makes them): a reader reads and is refused commands and bundles;
/// an operator submits and enrolls and is refused bundles; support reads and handles
/// bundles and is refused commands. Each refusal is 403 naming the role needed and the
/// ones the certificate has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_what_it_may_and_is_refused_the_rest_naming_the_role() {
    use dbvm_protocol::pki::Role;
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let admin = fleet.client(&broker);
    let logs = fleet.path("db1-logs");
    write_logs(&logs, 1);
    let agent = fleet
        .enroll_agent(&admin, broker.agent_addr, "db1", &log_dir_section(&logs))
        .await;
    let url = broker.api_url();
    let out = fleet
        .send_ok(
            &admin,
            &agent,
            "bundle.collect",
            json!({"hours": 1, "broker_url": url}),
        )
        .await;
    let bundle: uuid::Uuid = out["bundle_id"].as_str().unwrap().parse().unwrap();
    let as_role = |name: &str, role: Role| {
        let cert = fleet
            .ca
            .issue_control_plane(name, &[role], Duration::from_secs(3600))
            .unwrap();
        dbvm_e2e::fleet::client_as(
            &url,
            fleet.ca.cert_pem(),
            Some((&cert.cert_pem, &cert.key_pem)),
        )
    };
    let reader = as_role("dash", Role::Reader);
    let operator = as_role("orchestrator", Role::Operator);
    let support = as_role("helpdesk", Role::Support);
    let refused_for = |r: (StatusCode, String), needed: &str, has: &str| {
        assert_eq!(r.0, StatusCode::FORBIDDEN, "{}", r.1);
        assert!(
            r.1.contains(&format!("needs the {needed} role"))
                && r.1.contains(&format!("has: {has}")),
            "{}",
            r.1
        );
    };

    // Reader: lists and health and events; no commands, no bundles.
    assert_eq!(reader.agents().await.unwrap().len(), 1);
    drop(
        reader
            .events(None, None)
            .await
            .expect("a reader may follow events"),
    );
    refused_for(
        refusal(reader.submit(&fleet.sign("db1", "ping", json!({}))).await),
        "operator",
        "reader",
    );
    refused_for(refusal(reader.bundles().await), "support", "reader");
    refused_for(
        refusal(
            reader
                .download_bundle(bundle, &fleet.path("r.tar.zst"), |_, _| {})
                .await,
        ),
        "support",
        "reader",
    );
    refused_for(
        refusal(reader.enrollment_token("db9", None).await),
        "operator",
        "reader",
    );

    // Operator: submits and enrolls; no bundles.
    let v = operator
        .submit(&fleet.sign("db1", "ping", json!({})))
        .await
        .unwrap();
    let done = operator.wait(v.id, WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    operator.enrollment_token("db9", None).await.unwrap();
    refused_for(refusal(operator.bundles().await), "support", "operator");
    refused_for(
        refusal(operator.delete_bundle(bundle).await),
        "support",
        "operator",
    );
    refused_for(
        refusal(operator.broker_bundle(1).await),
        "support",
        "operator",
    );

    // Support: reads, lists and fetches bundles, makes the broker's; no commands.
    assert_eq!(support.agents().await.unwrap().len(), 1);
    assert!(support
        .bundles()
        .await
        .unwrap()
        .bundles
        .iter()
        .any(|b| b.id == bundle));
    support
        .download_bundle(bundle, &fleet.path("s.tar.zst"), |_, _| {})
        .await
        .expect("support fetches bundles");
    support
        .broker_bundle(1)
        .await
        .expect("support makes the broker's bundle");
    refused_for(
        refusal(support.submit(&fleet.sign("db1", "ping", json!({}))).await),
        "operator",
        "support",
    );
    refused_for(
        refusal(support.revoke("db1", None).await),
        "operator",
        "support",
    );
    // Nothing a refusal touched changed: the bundle is still there, db1 not revoked.
    assert!(admin
        .bundles()
        .await
        .unwrap()
        .bundles
        .iter()
        .any(|b| b.id == bundle));
    assert!(admin.agents().await.unwrap().iter().all(|a| a.connected));
}
