//! The agent link and enrollment under bad input: garbage, truncated and oversized
//! frames, foreign protocol versions, missing or foreign certificates, lying Hellos, and
//! enrollment tokens that are reused, expired or for someone else. Each gets a clear
//! refusal and changes nothing; the broker keeps serving well-behaved agents.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::raw::{connect, hello, send_raw};
use dbvm_e2e::{eventually, Fleet};
use dbvm_protocol::api::CommandState;
use dbvm_protocol::frame::{encode, MAX_FRAME_LEN};
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, EnrollRequest, RefuseCode};
use dbvm_protocol::pki::{FleetCa, Identity};
use dbvm_protocol::AgentId;
use serde_json::json;
use std::time::Duration;

fn refused(reply: std::io::Result<Option<BrokerMessage>>) -> (RefuseCode, String) {
    match reply {
        Ok(Some(BrokerMessage::Refused { code, message })) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_versions_and_identities_are_refused_and_change_nothing() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let ca = fleet.ca.cert_pem();
    let db1 = fleet.client_cert(Identity::Agent(AgentId::new("db1").expect("id")));
    let id = Some((db1.cert_pem.as_str(), db1.key_pem.as_str()));

    // Garbage that is a well-formed frame but not a message.
    let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
    let (code, msg) = refused(send_raw(&mut s, &[0, 0, 0, 3, 0xff, 0xff, 0xff], false).await);
    assert_eq!(code, RefuseCode::ProtocolViolation);
    assert!(msg.contains("undecodable"), "{msg}");

    // Oversized: refused from the length alone.
    let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
    let (code, msg) = refused(send_raw(&mut s, &[0x7f, 0xff, 0xff, 0xff], false).await);
    assert_eq!(code, RefuseCode::ProtocolViolation);
    assert!(msg.contains("exceeds the maximum"), "{msg}");

    // Truncated: the peer stops in the middle of a frame.
    let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
    let (code, msg) = refused(send_raw(&mut s, &[0, 0, 0, 100, 1, 2, 3], true).await);
    assert_eq!(code, RefuseCode::ProtocolViolation);
    assert!(msg.contains("middle of a frame"), "{msg}");

    // Another protocol major version.
    let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
    let bytes = encode(&hello("db1", 2), MAX_FRAME_LEN).expect("encode");
    let (code, msg) = refused(send_raw(&mut s, &bytes, false).await);
    assert_eq!(code, RefuseCode::UnsupportedVersion);
    assert!(msg.contains("protocol 2.0"), "{msg}");

    // A Hello claiming another agent than the certificate.
    let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
    let bytes = encode(&hello("db2", 1), MAX_FRAME_LEN).expect("encode");
    let (code, msg) = refused(send_raw(&mut s, &bytes, false).await);
    assert_eq!(code, RefuseCode::IdentityMismatch);
    assert!(msg.contains("\"db2\"") && msg.contains("\"db1\""), "{msg}");

    // No client certificate at all.
    let mut s = connect(broker.agent_addr, ca, None).await.expect("connect");
    let bytes = encode(&hello("db1", 1), MAX_FRAME_LEN).expect("encode");
    let (code, msg) = refused(send_raw(&mut s, &bytes, false).await);
    assert_eq!(code, RefuseCode::CertificateRequired);
    assert!(msg.contains("enroll"), "{msg}");

    // A control-plane certificate is not an agent.
    let cp = (
        fleet.control_plane.cert_pem.as_str(),
        fleet.control_plane.key_pem.as_str(),
    );
    let mut s = connect(broker.agent_addr, ca, Some(cp))
        .await
        .expect("connect");
    let (code, _) = refused(send_raw(&mut s, &bytes, false).await);
    assert_eq!(code, RefuseCode::IdentityMismatch);

    // A certificate from another CA fails the TLS handshake itself.
    let other = FleetCa::generate("another CA", Duration::from_secs(600)).expect("ca");
    let foreign = other
        .issue_client(
            &Identity::Agent(AgentId::new("db1").expect("id")),
            Duration::from_secs(600),
        )
        .expect("cert");
    let res = match connect(
        broker.agent_addr,
        ca,
        Some((&foreign.cert_pem, &foreign.key_pem)),
    )
    .await
    {
        Err(e) => Err(e),
        Ok(mut s) => send_raw(&mut s, &bytes, false).await,
    };
    assert!(
        res.is_err() || matches!(res, Ok(None)),
        "foreign certificate accepted: {res:?}"
    );

    // Garbage after a good start ends that session only.
    let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
    let bytes = encode(&hello("db1", 1), MAX_FRAME_LEN).expect("encode");
    let welcome = send_raw(&mut s, &bytes, false).await.expect("welcome");
    assert!(
        matches!(welcome, Some(BrokerMessage::Welcome(_))),
        "{welcome:?}"
    );
    let (code, msg) = refused(send_raw(&mut s, &[0, 0, 0, 2, 0xee, 0xee], false).await);
    assert_eq!(code, RefuseCode::ProtocolViolation);
    assert!(msg.contains("undecodable"), "{msg}");

    // The API refuses clients without a certificate, and agent certificates.
    let url = format!("{}/v1/agents", broker.api_url());
    let anon = dbvm_e2e::fleet::client_as(&broker.api_url(), ca, None);
    let e = anon.agents().await.expect_err("no certificate");
    assert!(
        e.to_string().contains("401") || e.to_string().contains("client certificate"),
        "{url}: {e}"
    );
    let as_agent =
        dbvm_e2e::fleet::client_as(&broker.api_url(), ca, Some((&db1.cert_pem, &db1.key_pem)));
    let e = as_agent.agents().await.expect_err("agent certificate");
    assert!(
        e.to_string().contains("403") || e.to_string().contains("may not use"),
        "{e}"
    );

    // Nothing was recorded for the refused connections, and the broker still works.
    let client = fleet.client(&broker);
    let token = client
        .enrollment_token("db3", None)
        .await
        .expect("token")
        .token;
    let _agent = fleet.start_agent("db3", broker.agent_addr, Some(&token), "");
    let v = client
        .submit(&fleet.sign("db3", "ping", json!({})))
        .await
        .expect("submit");
    let v = client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    let metrics = reqwest_metrics(&broker.api_url(), ca).await;
    assert!(
        metrics.contains("dbvm_broker_link_errors_total{reason=\"protocolviolation\"}"),
        "{metrics}"
    );
}

/// docs/wire-format.md: an oversized, empty, undecodable or truncated frame is answered
/// with `Refused { ProtocolViolation }` before the broker closes, also after a good
/// Hello; so is a second Hello. Each is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_after_a_good_hello_are_refused_with_protocol_violation_and_counted() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let ca = fleet.ca.cert_pem();
    let db1 = fleet.client_cert(Identity::Agent(AgentId::new("db1").expect("id")));
    let id = Some((db1.cert_pem.as_str(), db1.key_pem.as_str()));
    let hello_bytes = encode(&hello("db1", 1), MAX_FRAME_LEN).expect("encode");
    let series = "dbvm_broker_link_errors_total{reason=\"protocolviolation\"}";
    let before = dbvm_e2e::metrics::count(&dbvm_e2e::metrics::scrape(&broker, ca).await, series);
    let cases: [(&str, Vec<u8>, bool, &str); 5] = [
        (
            "undecodable",
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
            false,
            "undecodable",
        ),
        (
            "oversized",
            vec![0x7f, 0xff, 0xff, 0xff],
            false,
            "exceeds the maximum",
        ),
        ("empty", vec![0, 0, 0, 0], false, "empty frame"),
        (
            "truncated",
            vec![0, 0, 0, 100, 1, 2, 3],
            true,
            "middle of a frame",
        ),
        (
            "second Hello",
            hello_bytes.clone(),
            false,
            "Hello after the session started",
        ),
    ];
    for (what, bytes, close, expect) in &cases {
        let mut s = connect(broker.agent_addr, ca, id).await.expect("connect");
        let welcome = send_raw(&mut s, &hello_bytes, false)
            .await
            .expect("welcome");
        assert!(
            matches!(welcome, Some(BrokerMessage::Welcome(_))),
            "{what}: {welcome:?}"
        );
        let reply = send_raw(&mut s, bytes, *close).await;
        let (code, msg) = match reply {
            Ok(Some(BrokerMessage::Refused { code, message })) => (code, message),
            other => panic!("{what} after Hello: expected a refusal, got {other:?}"),
        };
        assert_eq!(code, RefuseCode::ProtocolViolation, "{what}");
        assert!(msg.contains(expect), "{what}: {msg}");
        // Nothing follows the refusal: the broker closed the link.
        let next = dbvm_e2e::raw::read_reply(&mut s).await;
        assert!(matches!(next, Ok(None) | Err(_)), "{what}: {next:?}");
    }
    let m = eventually(Duration::from_secs(10), "every refusal counted", || async {
        let m = dbvm_e2e::metrics::scrape(&broker, ca).await;
        (dbvm_e2e::metrics::count(&m, series) - before == cases.len() as f64).then_some(m)
    })
    .await;
    assert!(m.contains(series), "{m}");
}

async fn reqwest_metrics(url: &str, ca: &str) -> String {
    dbvm_e2e::fleet::client_as(url, ca, None)
        .get_text("/metrics")
        .await
        .expect("metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_single_use_short_lived_and_bound_to_one_agent() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let ca = fleet.ca.cert_pem();

    let enroll = |agent: &'static str, token: String| async move {
        let id = AgentId::new(agent).expect("id");
        let (csr_pem, _key) = dbvm_protocol::pki::make_csr(&id).expect("csr");
        let mut s = connect(broker.agent_addr, ca, None).await.expect("connect");
        let req = AgentMessage::Enroll(EnrollRequest {
            protocol_major: 1,
            protocol_minor: 0,
            agent_id: agent.into(),
            token,
            csr_pem,
        });
        let bytes = encode(&req, MAX_FRAME_LEN).expect("encode");
        send_raw(&mut s, &bytes, false).await
    };

    let token = client
        .enrollment_token("db1", None)
        .await
        .expect("token")
        .token;
    // For another id: refused, and the token stays good for its own agent.
    let (code, msg) = refused(enroll("db2", token.clone()).await);
    assert_eq!(code, RefuseCode::EnrollmentRefused);
    assert!(msg.contains("issued for agent \"db1\""), "{msg}");
    // Used once: works.
    match enroll("db1", token.clone()).await {
        Ok(Some(BrokerMessage::Enrolled { cert_pem, .. })) => {
            let der = dbvm_protocol::pki::first_cert_der(&cert_pem).expect("der");
            assert_eq!(
                dbvm_protocol::pki::identity_of(&der).expect("identity"),
                Identity::Agent(AgentId::new("db1").expect("id"))
            );
        }
        other => panic!("enrollment failed: {other:?}"),
    }
    // Reused: refused.
    let (code, msg) = refused(enroll("db1", token).await);
    assert_eq!(code, RefuseCode::EnrollmentRefused);
    assert!(msg.contains("already used"), "{msg}");
    // Expired: refused.
    let short = client
        .enrollment_token("db4", Some(Duration::from_secs(1)))
        .await
        .expect("token");
    // Expired once the clock passes its expiry (the broker refuses at now > expires_at).
    eventually(
        Duration::from_secs(10),
        "the one-second token to expire",
        || async { (dbvm_protocol::now_ms() > short.expires_at_ms).then_some(()) },
    )
    .await;
    let (code, msg) = refused(enroll("db4", short.token).await);
    assert_eq!(code, RefuseCode::EnrollmentRefused);
    assert!(msg.contains("expired"), "{msg}");
    // Unknown.
    let (_, msg) = refused(enroll("db1", "dbvm-enroll-nonsense".into()).await);
    assert!(msg.contains("not known"), "{msg}");

    // A real agent with a used token does not get in, and says why in its log.
    let used = client
        .enrollment_token("db5", None)
        .await
        .expect("token")
        .token;
    let _ = enroll("db5", used.clone()).await;
    let agent = fleet.start_agent("db5", broker.agent_addr, Some(&used), "");
    eventually(
        Duration::from_secs(20),
        "the agent to log the refusal",
        || async { agent.proc.log_text().contains("already used").then_some(()) },
    )
    .await;
    let agents = client.agents().await.expect("agents");
    assert!(!agents.iter().any(|a| a.id == "db5" && a.connected));
}
