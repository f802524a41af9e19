//! Log bundles through real processes: a signed `bundle.collect` from the control plane,
//! via a real broker, to a real agent process, which writes a complete, private bundle
//! whose files match its manifest and which carries none of the secrets planted in the
//! agent's argv-free environment or its config. (The transport of the bundle to the
//! broker is not built yet: the test reads the file the agent wrote.)

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
