//! A stolen agent certificate, as an attacker holding it would use it: it takes over the
//! agent's session (each Hello replaces the previous one), so the real agent and the thief
//! take turns, which the broker reports as an event and a metric; it renews itself a
//! fresh certificate in band. `dbvmctl agents revoke` ends all of it: every certificate
//! issued to the agent so far is refused at Hello and at renewal and the live session is
//! closed, while the real VM gets back in with a new enrollment token.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::metrics::{count, scrape, value};
use dbvm_e2e::raw::{connect, hello, read_reply, send_raw};
use dbvm_e2e::{connected, eventually, AgentProc, Fleet};
use dbvm_protocol::api::Event;
use dbvm_protocol::frame::{encode, MAX_FRAME_LEN};
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, RefuseCode};
use dbvm_protocol::AgentId;
use futures::StreamExt;
use serde_json::json;
use std::process::Command;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(30);

/// The agent's identity file (certificate and key in one PEM), as a thief copies it.
fn steal(agent: &AgentProc) -> String {
    std::fs::read_to_string(agent.state_dir.join("identity.pem")).expect("identity.pem")
}

/// Connects with `identity` (certificate and key PEM) and says Hello as `id`.
async fn hello_with(
    broker: &dbvm_e2e::BrokerProc,
    ca: &str,
    identity: &str,
    id: &str,
) -> (TlsStream<TcpStream>, Option<BrokerMessage>) {
    let mut s = connect(broker.agent_addr, ca, Some((identity, identity)))
        .await
        .expect("TLS with the stolen certificate");
    let bytes = encode(&hello(id, 1), MAX_FRAME_LEN).expect("encode");
    let reply = send_raw(&mut s, &bytes, false)
        .await
        .expect("answer to Hello");
    (s, reply)
}

fn refused(reply: Option<BrokerMessage>) -> (RefuseCode, String) {
    match reply {
        Some(BrokerMessage::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Reads events until one of `kind` arrives.
async fn next_event(stream: &mut dbvmctl::client::EventStream, kind: &str) -> Event {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = stream
                .next()
                .await
                .expect("event stream ended")
                .expect("event");
            if e.kind == kind {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} event within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_certificate_taking_turns_with_the_real_agent_is_an_event_and_a_metric() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let ca = fleet.ca.cert_pem();
    let client = fleet.client(&broker);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let stolen = steal(&agent);
    let mut events = client.events(Some("db1"), None).await.expect("events");

    // Three Hellos with the stolen certificate: each takes the session over (from the
    // real agent, which reconnects, or from the thief's previous connection). The
    // thief's connections stay open, so each Hello replaces a registered session.
    let mut thief = Vec::new();
    for _ in 0..3 {
        let (s, reply) = hello_with(&broker, ca, &stolen, "db1").await;
        assert!(
            matches!(reply, Some(BrokerMessage::Welcome(_))),
            "{reply:?}"
        );
        thief.push(s);
    }
    let replaced = next_event(&mut events, "agent.replaced").await;
    assert!(
        replaced.data["previous_peer"].is_string() && replaced.data["peer"].is_string(),
        "{replaced:?}"
    );
    let flapping = next_event(&mut events, "agent.flapping").await;
    assert!(
        flapping.data["replacements_in_window"].as_u64() >= Some(3),
        "{flapping:?}"
    );
    assert_eq!(flapping.data["window_s"], json!(300), "{flapping:?}");

    let m = scrape(&broker, ca).await;
    assert!(
        count(&m, "dbvm_broker_agent_session_replacements_total") >= 3.0,
        "{m}"
    );
    assert_eq!(value(&m, "dbvm_broker_agents_flapping"), Some(1.0), "{m}");
    assert_eq!(
        value(&m, "dbvm_broker_agent_flapping_episodes_total"),
        Some(1.0),
        "announced once per window:\n{m}"
    );
    let log = broker.proc.log_text();
    assert!(log.contains("dbvmctl agents revoke db1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_at_hello_and_renewal_and_a_new_enrollment_gets_back_in() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let ca = fleet.ca.cert_pem();
    let client = fleet.client(&broker);
    let mut agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let stolen = steal(&agent);
    // The real agent is down; the thief holds its session and renews in band, getting a
    // certificate of its own for a key the real agent never had.
    agent.proc.kill();
    let (mut thief, reply) = hello_with(&broker, ca, &stolen, "db1").await;
    assert!(
        matches!(reply, Some(BrokerMessage::Welcome(_))),
        "{reply:?}"
    );
    let (csr_pem, thief_key) =
        dbvm_protocol::pki::make_csr(&AgentId::new("db1").expect("id")).expect("csr");
    let renew = encode(&AgentMessage::Renew { csr_pem }, MAX_FRAME_LEN).expect("encode");
    let renewed = match send_raw(&mut thief, &renew, false).await.expect("renewal") {
        Some(BrokerMessage::Renewed { cert_pem }) => format!("{}\n{thief_key}", cert_pem.trim()),
        other => panic!("renewal before the revocation: {other:?}"),
    };

    let mut events = client.events(Some("db1"), None).await.expect("events");
    let revocation = client
        .revoke("db1", Some("identity.pem copied off the VM"))
        .await
        .expect("revoke");
    assert_eq!(revocation.agent_id, "db1");
    assert_eq!(
        revocation.certificates.len(),
        2,
        "the enrolled certificate and the one renewed from it: {revocation:?}"
    );
    assert!(revocation.session_closed, "{revocation:?}");
    let event = next_event(&mut events, "agent.revoked").await;
    assert_eq!(event.data["certificates"], json!(2), "{event:?}");

    // The live session is refused and closed.
    let (code, message) = refused(read_reply(&mut thief).await.expect("refusal"));
    assert_eq!(code, RefuseCode::CertificateRevoked);
    assert!(
        message.contains("identity.pem copied off the VM") && message.contains("enrollment token"),
        "{message}"
    );
    // Both certificates are refused at Hello, and a renewal cannot mint a third.
    for identity in [&stolen, &renewed] {
        let (_, reply) = hello_with(&broker, ca, identity, "db1").await;
        let (code, message) = refused(reply);
        assert_eq!(code, RefuseCode::CertificateRevoked, "{message}");
    }
    let m = scrape(&broker, ca).await;
    assert_eq!(
        value(&m, "dbvm_broker_agent_certificates_revoked_total"),
        Some(2.0),
        "{m}"
    );
    assert!(
        count(
            &m,
            "dbvm_broker_link_errors_total{reason=\"certificaterevoked\"}"
        ) >= 3.0,
        "{m}"
    );

    // The real agent with its revoked certificate stays out, says why, and sets the
    // certificate aside: it waits for a new token (its old one was spent).
    let agent = fleet.restart_agent(&agent);
    eventually(
        WAIT,
        "the agent to set its revoked certificate aside",
        || async {
            let log = agent.proc.log_text();
            (log.contains("revoked this agent's certificate")
                && fleet
                    .path("agent-db1")
                    .join("identity.pem.revoked")
                    .exists())
            .then_some(())
        },
    )
    .await;
    let agents = client.agents().await.expect("agents");
    assert!(!agents.iter().any(|a| a.id == "db1" && a.connected));

    // A new enrollment token brings the same VM back with a fresh certificate, without a
    // restart: the running agent enrolls as soon as the token is there.
    let token = client
        .enrollment_token("db1", None)
        .await
        .expect("token")
        .token;
    std::fs::write(fleet.path("agent-db1.token"), token).expect("token file");
    connected(&client, "db1").await;
    fleet.send_ok(&client, &agent, "ping", json!({})).await;
    assert_ne!(steal(&agent), stolen, "a fresh certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbvmctl_agents_revoke_says_what_it_revoked_and_how_the_vm_gets_back() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let _agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    // A dbvmctl home with the fleet's CA and the control plane's certificate.
    let home = fleet.path("ctl-home");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::copy(fleet.path("ca.crt"), home.join("ca.crt")).expect("ca");
    std::fs::write(home.join("controlplane.crt"), &fleet.control_plane.cert_pem).expect("cert");
    std::fs::write(home.join("controlplane.key"), &fleet.control_plane.key_pem).expect("key");
    let run = |args: &[&str]| {
        let out = Command::new(dbvm_e2e::proc::bin_dir().join("dbvmctl"))
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
    let (code, stdout, stderr) = run(&["agents", "revoke", "db1", "--reason", "test"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("revoked 1 certificate of agent db1")
            && stdout.contains("(test)")
            && stdout.contains("its session was closed")
            && stdout.contains("dbvmctl enroll-token db1"),
        "{stdout}"
    );
    // An agent the broker never heard of: exit code 3 (the broker refused), and why.
    let (code, _, stderr) = run(&["agents", "revoke", "db9"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("not known to this broker"), "{stderr}");
}
