//! The broker's artifact store end to end, over its real TLS listener: a control plane
//! uploads a new agent binary (streamed, hashed, capped, stored once), an agent
//! certificate downloads it and may do nothing else, and `dbvmctl::upgrade::upload`
//! skips what the broker has. Parts an interrupted upload left are gone after a restart.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::fleet::client_as;
use dbvm_e2e::Fleet;
use dbvm_protocol::pki::Identity;
use dbvm_protocol::AgentId;
use reqwest::StatusCode;
use sha2::Digest;

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_upload_and_agents_download_artifacts_over_mtls() {
    let fleet = Fleet::new();
    // A small cap so that "too large" is cheap to reach.
    let mut broker = fleet.start_broker("[artifacts]\nmax_bytes = 65536\n");
    let cp = fleet.client(&broker);
    let agent_cert = fleet.client_cert(Identity::Agent(AgentId::new("db1").unwrap()));
    let agent = client_as(
        &broker.api_url(),
        fleet.ca.cert_pem(),
        Some((&agent_cert.cert_pem, &agent_cert.key_pem)),
    );
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("dbvm-agent");
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&binary, &data).unwrap();
    let name = sha(&data);

    // Unknown: 404 for both audiences.
    let e = agent
        .download_artifact(&name, &dir.path().join("none"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::NOT_FOUND), "{e}");
    assert_eq!(e.api_code(), Some("not_found"));
    assert!(!dir.path().join("none").exists());

    // An agent certificate cannot upload, list or delete.
    let e = agent.upload_artifact(&binary, &name).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let e = agent.artifacts().await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let e = agent.delete_artifact(&name).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    // Nor can a client without a certificate download.
    let anonymous = client_as(&broker.api_url(), fleet.ca.cert_pem(), None);
    let e = anonymous
        .download_artifact(&name, &dir.path().join("anon"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");

    // Bytes that are not what the path names: 400, nothing stored.
    let e = cp
        .upload_artifact(&binary, &sha(b"other"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.api_code()),
        (Some(StatusCode::BAD_REQUEST), Some("sha256_mismatch")),
        "{e}"
    );
    assert!(e.to_string().contains(&name), "{e}");
    // Over the cap: 413, nothing stored.
    let big = dir.path().join("big");
    let big_data = vec![1u8; 70_000];
    std::fs::write(&big, &big_data).unwrap();
    let e = cp.upload_artifact(&big, &sha(&big_data)).await.unwrap_err();
    assert_eq!(
        (e.status(), e.api_code()),
        (Some(StatusCode::PAYLOAD_TOO_LARGE), Some("too_large")),
        "{e}"
    );
    assert!(cp.artifacts().await.unwrap().is_empty());

    // Round trip: 201, then the same again is 200 with the same answer.
    let (info, created) = cp.upload_artifact(&binary, &name).await.unwrap();
    assert!(created);
    assert_eq!(
        (info.sha256.as_str(), info.size, info.path.clone()),
        (name.as_str(), 50_000, format!("/v1/artifacts/{name}"))
    );
    let (again, created) = cp.upload_artifact(&binary, &name).await.unwrap();
    assert_eq!((again, created), (info, false));
    let listed = cp.artifacts().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].sha256.as_str(), listed[0].size),
        (name.as_str(), 50_000)
    );

    // The agent downloads it, as its upgrade will: with its own certificate, trusting
    // the fleet CA only, by the name in the broker's certificate (localhost).
    let got = dir.path().join("got");
    assert_eq!(agent.download_artifact(&name, &got).await.unwrap(), 50_000);
    assert_eq!(std::fs::read(&got).unwrap(), data);
    let tls = dbvm_protocol::tls::client_config(
        fleet.ca.cert_pem(),
        Some((&agent_cert.cert_pem, &agent_cert.key_pem)),
    )
    .unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let resp = http
        .get(format!("{}/v1/artifacts/{name}", broker.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.content_length(), Some(50_000));
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/octet-stream"
    );
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &data[..]);

    // dbvmctl's upload step finds it there and does not send it again.
    let plan =
        dbvmctl::upgrade::Plan::new(binary.clone(), "0.1.1", vec![AgentId::new("db1").unwrap()]);
    let artifact = dbvmctl::upgrade::upload(&cp, &plan).await.unwrap();
    assert!(!artifact.uploaded);
    assert_eq!(
        artifact.url,
        format!("{}/v1/artifacts/{name}", broker.api_url())
    );

    // A part file a crash left behind is removed when the broker starts again; the
    // stored artifact stays.
    broker.proc.kill();
    let artifacts = fleet.path("broker-data").join("artifacts");
    let part = artifacts.join(format!("{}.0123.part", sha(b"half")));
    std::fs::write(&part, b"ha").unwrap();
    let broker = fleet.restart_broker(&broker, "[artifacts]\nmax_bytes = 65536\n");
    assert!(!part.exists(), "the leftover part is still there");
    let cp = fleet.client(&broker);
    assert_eq!(cp.artifacts().await.unwrap().len(), 1);

    // Deleted: gone for everyone; a second delete is 404.
    cp.delete_artifact(&name).await.unwrap();
    let e = cp.delete_artifact(&name).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::NOT_FOUND), "{e}");
    let e = agent
        .download_artifact(&name, &dir.path().join("gone"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::NOT_FOUND), "{e}");
    assert!(cp.artifacts().await.unwrap().is_empty());
    let names: Vec<_> = std::fs::read_dir(&artifacts).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
}

/// An upload without Content-Length (chunked, as a streaming client sends it) that runs
/// over the cap is refused part way with 413, and the client sees that answer, not a
/// broken stream: the broker lets it finish sending first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_over_the_cap_gets_413_and_leaves_nothing() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("[artifacts]\nmax_bytes = 65536\n");
    let tls = dbvm_protocol::tls::client_config(
        fleet.ca.cert_pem(),
        Some((&fleet.control_plane.cert_pem, &fleet.control_plane.key_pem)),
    )
    .unwrap();
    let data = vec![3u8; 200_000];
    let name = sha(&data);
    for http1 in [false, true] {
        let mut builder = reqwest::Client::builder().use_preconfigured_tls(tls.clone());
        if http1 {
            builder = builder.http1_only();
        }
        let http = builder.build().unwrap();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            data.chunks(8192).map(|c| Ok(c.to_vec())).collect();
        let resp = http
            .put(format!("{}/v1/artifacts/{name}", broker.api_url()))
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("http1 only: {http1}: {e:?}"));
        assert_eq!(
            resp.status(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "http1 only: {http1}"
        );
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "too_large", "{body}");
    }
    let artifacts = fleet.path("broker-data").join("artifacts");
    let names: Vec<_> = std::fs::read_dir(&artifacts).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
}

/// A disk that fills during an upload (a real one: the broker's data dir on a small
/// tmpfs): 507 with a JSON error, no part left, and the broker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_and_leaves_nothing() {
    let fleet = Fleet::new();
    let _disk = dbvm_e2e::backup::Tmpfs::mount(&fleet.path("broker-data"), "2m");
    let broker = fleet.start_broker("[artifacts]\nmax_bytes = 16777216\n");
    let cp = fleet.client(&broker);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let e = cp.upload_artifact(&big, &sha(&data)).await.unwrap_err();
    assert_eq!(
        (e.status(), e.api_code()),
        (
            Some(StatusCode::INSUFFICIENT_STORAGE),
            Some("insufficient_storage")
        ),
        "{e}"
    );
    let artifacts = fleet.path("broker-data").join("artifacts");
    let names: Vec<_> = std::fs::read_dir(&artifacts).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
    // The space is back: a small artifact goes in.
    let small = dir.path().join("small");
    std::fs::write(&small, b"small").unwrap();
    let (_, created) = cp.upload_artifact(&small, &sha(b"small")).await.unwrap();
    assert!(created);
}

/// `dbvmctl upgrade` (the binary) against a real broker and real agents: the artifact is
/// uploaded once, db1 is sent a signed `agent.upgrade` of a file that is no agent (it
/// fails, whether the agent knows the operation or not), and the rollout stops there:
/// db2, in the next wave, is not attempted. Exit code 1, and a second run finds the
/// artifact on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbvmctl_upgrade_uploads_once_and_stops_at_the_first_failed_wave() {
    let fleet = Fleet::new();
    let home = fleet.path("ctl-home");
    let bin = dbvm_e2e::proc::bin_dir().join("dbvmctl");
    let keygen = std::process::Command::new(&bin)
        .args(["--dir", home.to_str().unwrap(), "keygen"])
        .output()
        .expect("run dbvmctl keygen");
    assert!(keygen.status.success(), "{keygen:?}");
    // The [[trusted_keys]] entry of this home's key, for the broker and the agents.
    let entry = String::from_utf8(keygen.stdout).unwrap();
    assert!(entry.contains("[[trusted_keys]]"), "{entry}");
    std::fs::copy(fleet.path("ca.crt"), home.join("ca.crt")).expect("ca");
    std::fs::write(home.join("controlplane.crt"), &fleet.control_plane.cert_pem).expect("cert");
    std::fs::write(home.join("controlplane.key"), &fleet.control_plane.key_pem).expect("key");

    let broker = fleet.start_broker(&entry);
    let client = fleet.client(&broker);
    let _db1 = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", &entry)
        .await;
    let _db2 = fleet
        .enroll_agent(&client, broker.agent_addr, "db2", &entry)
        .await;
    let not_an_agent = fleet.path("not-an-agent");
    std::fs::write(&not_an_agent, b"#!/bin/false\n").unwrap();

    let upgrade = || {
        let out = std::process::Command::new(&bin)
            .args([
                "--dir",
                home.to_str().unwrap(),
                "--broker",
                &broker.api_url(),
            ])
            .args(["upgrade", "--binary", not_an_agent.to_str().unwrap()])
            .args([
                "--version",
                "0.1.1",
                "--deadline-s",
                "10",
                "--json",
                "db1",
                "db2",
            ])
            .output()
            .expect("run dbvmctl upgrade");
        let summary: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (
            out.status.code(),
            summary,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, summary, stderr) = upgrade();
    assert_eq!(code, Some(1), "{summary:#}\n{stderr}");
    assert_eq!(summary["artifact"]["uploaded"], true, "{summary:#}");
    assert_eq!(summary["artifact"]["sha256"], sha(b"#!/bin/false\n"));
    let agents = summary["agents"].as_array().unwrap();
    assert_eq!(
        (agents[0]["agent"].as_str(), agents[0]["outcome"].as_str()),
        (Some("db1"), Some("failed")),
        "{summary:#}"
    );
    assert!(agents[0]["command_id"].is_string(), "{summary:#}");
    assert!(
        !agents[0]["error"].as_str().unwrap_or_default().is_empty(),
        "{summary:#}"
    );
    assert_eq!(
        (agents[1]["agent"].as_str(), agents[1]["outcome"].as_str()),
        (Some("db2"), Some("not_attempted")),
        "{summary:#}"
    );
    assert!(agents[1]["command_id"].is_null(), "{summary:#}");
    assert!(stderr.contains("not attempted: db2"), "{stderr}");
    // The command db1 got is the signed agent.upgrade of the contract.
    let id: uuid::Uuid = agents[0]["command_id"].as_str().unwrap().parse().unwrap();
    let view = client.command(id).await.unwrap();
    assert_eq!(view.operation, "agent.upgrade");

    let (code, summary, _) = upgrade();
    assert_eq!(code, Some(1));
    assert_eq!(summary["artifact"]["uploaded"], false, "{summary:#}");
    assert_eq!(client.artifacts().await.unwrap().len(), 1);

    // The table, for people.
    let out = std::process::Command::new(&bin)
        .args([
            "--dir",
            home.to_str().unwrap(),
            "--broker",
            &broker.api_url(),
        ])
        .args(["upgrade", "--binary", not_an_agent.to_str().unwrap()])
        .args(["--version", "0.1.1", "db1", "db2"])
        .output()
        .expect("run dbvmctl upgrade");
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1));
    assert!(table.contains("already on the broker"), "{table}");
    assert!(table.contains("\ndb1    failed"), "{table}");
    assert!(table.contains("\ndb2    not attempted  -"), "{table}");
}
