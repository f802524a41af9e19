//! Two signature checks, neither trusting the other: the broker refuses what the control
//! plane did not sign before a command id is taken, the agent checks again, both apply
//! one time rule, and the release agent has no way to turn its check off. Also the API's
//! answer to an HTTP/2 client without a certificate.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::proc::{cargo_command, workspace_manifest};
use dbvm_e2e::Fleet;
use dbvm_protocol::api::{CommandState, SubmitCommand};
use dbvm_protocol::command::{CommandSigner, DEFAULT_CLOCK_SKEW_MS};
use dbvm_protocol::SignedCommand;
use serde_json::json;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

const MUSL: &str = "x86_64-unknown-linux-musl";

/// A holder of the control-plane certificate without the signing key submits garbage
/// under the id of a real command in every shape it could: none of it is stored, the id
/// stays free, and the real command then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_cannot_be_squatted_without_the_signing_key() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let _agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    let real_body = fleet.body("db1", "ping", json!({"echo": "the real one"}));
    let real = fleet.signer.sign(&real_body);
    let mut garbage_body = real_body.clone();
    garbage_body.operation = "db.drop".into();
    garbage_body.args_json = json!({"database": "app"}).to_string();
    let stranger = CommandSigner::generate();

    let unsigned = SignedCommand {
        signature: Vec::new(),
        ..fleet.signer.sign(&garbage_body)
    };
    let zero_signature = SignedCommand {
        signature: vec![0; 64],
        ..fleet.signer.sign(&garbage_body)
    };
    // The real command's signature over other bytes under the same id.
    let swapped_body = SignedCommand {
        body: fleet.signer.sign(&garbage_body).body,
        ..real.clone()
    };
    // Signed by another key that claims the control plane's key id.
    let claimed_key_id = SignedCommand {
        key_id: fleet.signer.key_id().to_string(),
        ..stranger.sign(&garbage_body)
    };
    let unknown_key = stranger.sign(&garbage_body);
    let forgeries = [
        ("zero signature", zero_signature, "bad_signature"),
        (
            "real signature over other bytes",
            swapped_body,
            "bad_signature",
        ),
        (
            "stranger's key under the real key id",
            claimed_key_id,
            "bad_signature",
        ),
        ("stranger's key", unknown_key, "unknown_key"),
        ("unsigned", unsigned, "bad_signature"),
    ];
    for (what, forged, code) in &forgeries {
        let e = client
            .submit(forged)
            .await
            .expect_err(&format!("{what}: accepted"));
        assert_eq!(
            (e.status().map(|s| s.as_u16()), e.api_code()),
            (Some(403), Some(*code)),
            "{what}: {e}"
        );
        let e = client
            .command(real_body.id)
            .await
            .expect_err(&format!("{what}: the id was taken"));
        assert_eq!(e.status().map(|s| s.as_u16()), Some(404), "{what}: {e}");
    }
    let metrics = client.get_text("/metrics").await.expect("metrics");
    assert!(
        metrics.contains(&format!(
            "submissions_refused_total{{reason=\"signature\"}} {}",
            forgeries.len()
        )),
        "{metrics}"
    );

    let v = client.submit(&real).await.expect("the real command");
    assert_eq!(v.id, real_body.id);
    let v = client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    assert_eq!(v.output.expect("output")["echo"], "the real one");
}

/// The broker and the agent apply one time rule: a command past its `not_after` but
/// within the clock skew the agent allows is stored, delivered and run; one beyond the
/// skew is refused by the broker already, and both are judged the same at the edges
/// (see the unit tests in `protocol` and `broker/src/api.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_does_not_refuse_what_the_agent_accepts_within_the_clock_skew() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let _agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let now = dbvm_protocol::now_ms();

    // Expired by the control plane's clock a third of the skew ago: the agent still
    // runs it (its clock may be that far behind), so the broker must take it.
    let mut late = fleet.body("db1", "ping", json!({"echo": "late"}));
    late.issued_at_ms = now - 120_000;
    late.not_after_ms = now - DEFAULT_CLOCK_SKEW_MS / 3;
    let v = client
        .submit(&fleet.signer.sign(&late))
        .await
        .expect("a command within the skew is accepted");
    let v = client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    assert_eq!(v.output.expect("output")["echo"], "late");

    // Issued within the skew in the future: the same.
    let mut early = fleet.body("db1", "ping", json!({"echo": "early"}));
    early.issued_at_ms = now + DEFAULT_CLOCK_SKEW_MS / 3;
    let v = client
        .submit(&fleet.signer.sign(&early))
        .await
        .expect("a command issued within the skew is accepted");
    let v = client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");

    // Beyond the skew, both refuse: the broker says so at once.
    let mut expired = fleet.body("db1", "ping", json!({}));
    expired.issued_at_ms = now - 120_000;
    expired.not_after_ms = now - 2 * DEFAULT_CLOCK_SKEW_MS;
    let e = client
        .submit(&fleet.signer.sign(&expired))
        .await
        .expect_err("expired beyond the skew");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(400), "{e}");
    assert!(e.to_string().contains("clock skew"), "{e}");
}

/// An HTTP/2 client without a certificate gets the same 401 and JSON body as an
/// HTTP/1.1 client, for a request with a body as well as without. The large body is
/// bigger than the HTTP/2 stream window hyper grants (1 MiB), so the client is still
/// sending it when the broker answers: the case where curl reported "Stream error in
/// the HTTP/2 framing layer" (hyper's client tolerated it; curl is the one that showed
/// it, so it is asked too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_without_a_certificate_get_401_with_the_json_error() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let url = broker.api_url();
    let submission = serde_json::to_vec(&SubmitCommand {
        signed_command: fleet.sign("db1", "ping", json!({})).to_base64(),
    })
    .expect("json");
    let large = vec![b' '; 1536 * 1024];
    let is_unauthorized = |what: &str, text: &str| {
        let error: serde_json::Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{what}: the answer is not JSON ({e}): {text:?}"));
        assert_eq!(error["code"], "unauthorized", "{what}: {error}");
        assert!(
            error["error"]
                .as_str()
                .unwrap_or_default()
                .contains("client certificate"),
            "{what}: {error}"
        );
    };
    for (alpn, version) in [
        (b"h2".as_slice(), reqwest::Version::HTTP_2),
        (b"http/1.1".as_slice(), reqwest::Version::HTTP_11),
    ] {
        let mut tls = dbvm_protocol::tls::client_config(fleet.ca.cert_pem(), None).expect("TLS");
        tls.alpn_protocols = vec![alpn.to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .expect("client");
        let json = |path: &str, body: &[u8]| {
            http.post(format!("{url}{path}"))
                .header("content-type", "application/json")
                .body(body.to_vec())
        };
        let requests = [
            ("GET /v1/agents", http.get(format!("{url}/v1/agents"))),
            ("a submission", json("/v1/commands", &submission)),
            ("1.5 MiB", json("/v1/enrollment-tokens", &large)),
        ];
        for (what, req) in requests {
            let what = format!("{version:?} {what}");
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{what}: no answer: {e:?}"));
            assert_eq!(resp.version(), version, "{what}");
            assert_eq!(resp.status().as_u16(), 401, "{what}");
            let text = resp
                .text()
                .await
                .unwrap_or_else(|e| panic!("{what}: body: {e:?}"));
            is_unauthorized(&what, &text);
        }
    }

    let version = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .expect("curl is needed: apt-get install curl (scripts/setup.sh installs it)");
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("HTTP2"),
        "this curl has no HTTP/2 support: {}",
        String::from_utf8_lossy(&version.stdout)
    );
    let body_file = fleet.path("large-body");
    std::fs::write(&body_file, &large).expect("body file");
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--http2", "--cacert"])
        .arg(fleet.path("ca.crt"))
        .args([
            "--header",
            "content-type: application/json",
            "--data-binary",
        ])
        .arg(format!("@{}", body_file.display()))
        .args(["--write-out", "\n%{http_version} %{http_code}"])
        .arg(format!("{url}/v1/commands"))
        .output()
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl --http2: {stderr}{stdout}");
    let (text, status) = stdout.rsplit_once('\n').expect("curl's --write-out line");
    assert_eq!(status, "2 401", "curl --http2: {stdout}");
    is_unauthorized("curl --http2", text);
}

fn cargo(args: &[&str]) -> Output {
    let out = cargo_command()
        .args(args)
        .arg("--manifest-path")
        .arg(workspace_manifest())
        .output()
        .expect("cargo must be runnable");
    assert!(
        out.status.success(),
        "cargo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `target/` of this workspace (this test runs from target/debug/deps).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors().nth(3).expect("target dir").to_path_buf()
}

/// The release agent, built as `scripts/build-rpms.sh`, the demo and image builders build
/// it (`-p dbvm-agent -p dbvm-broker` for musl), has no switch that turns signature
/// checks off:
///
/// - the old config key is refused by `--check` and at start, naming the key;
/// - the feature that compiles the benchmarks' non-checking verifier into
///   `dbvm-protocol` is not enabled for that build (nor for the broker and dbvmctl as
///   the demo builds them), while benches/relay does enable it, which shows the check
///   can see it. Cargo's feature resolution is what decides what is compiled in, so this
///   asks cargo rather than searching the binary for strings an optimiser may drop.
#[test]
fn the_release_agent_cannot_skip_signature_checks() {
    let feature = "dbvm-protocol feature \"insecure-bench\"";
    let tree = |args: &[&str]| {
        let mut all = vec!["tree", "--locked", "-e", "features", "--prefix", "none"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&cargo(&all).stdout).into_owned()
    };
    let agent = tree(&["-p", "dbvm-agent", "--target", MUSL]);
    assert!(agent.contains("dbvm-protocol feature"), "{agent}");
    assert!(!agent.contains(feature), "the release agent has {feature}");
    let shipped = tree(&["-p", "dbvm-agent", "-p", "dbvm-broker", "--target", MUSL]);
    assert!(
        !shipped.contains(feature),
        "the agent and broker as the RPMs build them have {feature}"
    );
    let demo = tree(&["-p", "dbvm-broker", "-p", "dbvmctl"]);
    assert!(demo.contains("dbvm-protocol feature"), "{demo}");
    assert!(
        !demo.contains(feature),
        "the broker or dbvmctl has {feature}"
    );
    let bench = tree(&["-p", "dbvm-bench-relay"]);
    assert!(
        bench.contains(feature),
        "benches/relay lost {feature}: {bench}"
    );

    // Exactly as scripts/build-rpms.sh builds it (.ci/run builds that first), so nothing
    // is compiled again: `-p dbvm-agent` alone unifies features differently and rebuilt
    // every dependency (minutes of CI).
    cargo(&[
        "build",
        "--quiet",
        "--locked",
        "--release",
        "--target",
        MUSL,
        "-p",
        "dbvm-agent",
        "-p",
        "dbvm-broker",
    ]);
    let bin = target_dir().join(MUSL).join("release").join("dbvm-agent");
    let fleet = Fleet::new();
    let good = fleet.agent_config("db1", 7443, &fleet.path("state"), &fleet.path("token"), "");
    let run = |name: &str, text: String, check: bool| {
        let path = fleet.path(name);
        std::fs::write(&path, text).expect("config");
        let mut cmd = std::process::Command::new(&bin);
        if check {
            cmd.arg("--check");
        }
        cmd.arg("--config").arg(&path);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
    };
    let out = run("good.toml", good.clone(), true);
    assert!(
        out.status.success(),
        "the control config is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for value in ["true", "false"] {
        let text = good.replace(
            "[link]\n",
            &format!("[link]\ninsecure_skip_signature_check = {value}\n"),
        );
        assert_ne!(text, good);
        for check in [true, false] {
            let out = run("insecure.toml", text.clone(), check);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "check={check}: accepted: {stderr}");
            assert!(
                stderr.contains("config key link.insecure_skip_signature_check: no longer exists"),
                "check={check}: {stderr}"
            );
        }
    }
    assert!(
        !fleet.path("state").exists(),
        "a refused config touched the state dir"
    );
}
