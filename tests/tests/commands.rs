//! Signed commands end to end through real broker and agent processes: enrollment,
//! ping and facts, sealed secrets, and every way a command can be refused.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::rogue::RogueBroker;
use dbvm_e2e::Fleet;
use dbvm_protocol::api::{CommandState, CommandView};
use dbvm_protocol::command::CommandSigner;
use dbvm_protocol::messages::{Outcome, RejectCode};
use dbvm_protocol::seal::Sealed;
use dbvm_protocol::SignedCommand;
use serde_json::json;
use std::time::Duration;

async fn run(client: &dbvmctl::Client, cmd: &SignedCommand) -> CommandView {
    let v = client.submit(cmd).await.expect("submit");
    client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_agent_answers_signed_ping_and_facts_and_secrets_stay_sealed() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let _agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    let v = run(&client, &fleet.sign("db1", "ping", json!({"echo": "hi"}))).await;
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    let out = v.output.clone().expect("output");
    assert_eq!(out["pong"], true);
    assert_eq!(out["echo"], "hi");
    // A fast command's delivery is never written on its own; its time comes with the result.
    let delivered = v
        .delivered_at_ms
        .expect("delivered_at_ms of a finished command");
    assert!(v.submitted_at_ms <= delivered, "{v:?}");
    assert!(
        delivered <= v.finished_at_ms.expect("finished_at_ms"),
        "{v:?}"
    );

    let v = run(&client, &fleet.sign("db1", "facts", json!({}))).await;
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    let facts = v.output.expect("facts");
    assert!(facts["cpu_count"].as_u64().unwrap_or(0) >= 1, "{facts}");
    assert!(
        facts["memory_total_bytes"].as_u64().unwrap_or(0) > 0,
        "{facts}"
    );
    assert!(
        !facts["kernel"].as_str().unwrap_or("").is_empty(),
        "{facts}"
    );
    assert!(facts["disks"].as_array().is_some(), "{facts}");

    // A secret sealed to the agent comes back sealed to the control plane.
    let agent = client
        .agents()
        .await
        .expect("agents")
        .into_iter()
        .find(|a| a.id == "db1")
        .expect("db1");
    let agent_key = dbvm_protocol::seal::parse_public_key(&agent.sealing_key.expect("sealing key"))
        .expect("key");
    let secret = "correct-horse-battery-staple";
    let sealed = Sealed::seal(&agent_key, secret).expect("seal");
    let v = run(
        &client,
        &fleet.sign("db1", "ping", json!({ "secret": sealed })),
    )
    .await;
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    let back: Sealed =
        serde_json::from_value(v.output.expect("output")["secret"].clone()).expect("sealed reply");
    assert_eq!(fleet.reply_key.open(&back).expect("open").expose(), secret);
    // The broker's store and logs hold only ciphertext.
    // Every file under the data directory, its subdirectories (artifacts/) included.
    let mut dirs = vec![fleet.path("broker-data")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("data dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).expect("read");
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret found in clear in the broker's store ({})",
                path.display()
            );
        }
    }
    assert!(!broker.proc.log_text().contains(secret));
    assert!(!_agent.proc.log_text().contains(secret));

    // Versions and liveness are visible to the control plane.
    assert_eq!(
        agent.protocol,
        Some(format!(
            "{}.{}",
            dbvm_protocol::PROTOCOL_MAJOR,
            dbvm_protocol::PROTOCOL_MINOR
        ))
    );
    assert!(agent.operations.contains(&"facts".to_string()));
    assert!(agent.cert_not_after_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unknown_key_are_refused_by_the_broker_unsupported_and_bad_args_by_the_agent() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    // Forged (one byte of the body changed after signing) and signed by a key the
    // control plane does not use: the broker refuses both before storing anything (the
    // agent's own refusal of them, without a broker's help, is the rogue-broker test).
    let mut forged = fleet.sign("db1", "ping", json!({"echo": "a"}));
    let n = forged.body.len();
    forged.body[n - 3] ^= 0x01;
    let e = client.submit(&forged).await.expect_err("forged");
    assert_eq!(e.api_code(), Some("bad_signature"), "{e}");
    let stranger = CommandSigner::generate();
    let e = client
        .submit(&stranger.sign(&fleet.body("db1", "ping", json!({}))))
        .await
        .expect_err("unknown key");
    assert_eq!(e.api_code(), Some("unknown_key"), "{e}");

    // An operation this agent does not have.
    let v = run(&client, &fleet.sign("db1", "format_disk", json!({}))).await;
    assert_eq!(v.state, CommandState::Rejected);
    assert_eq!(
        v.error.as_ref().expect("error").code,
        "unsupported_operation",
        "{v:?}"
    );

    // Arguments the operation does not accept.
    let v = run(
        &client,
        &fleet.sign("db1", "ping", json!({"delay": "soon"})),
    )
    .await;
    assert_eq!(v.state, CommandState::Rejected);
    assert_eq!(
        v.error.as_ref().expect("error").code,
        "bad_arguments",
        "{v:?}"
    );

    // Only the two that passed verification reached the journal (and were refused there);
    // the forged and the unknown-key commands left no trace.
    let conn = rusqlite::Connection::open(agent.journal()).expect("journal");
    let ops: Vec<String> = conn
        .prepare("SELECT operation FROM commands ORDER BY rowid")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("ops");
    assert_eq!(
        ops,
        vec!["format_disk".to_string(), "ping".to_string()],
        "{ops:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_expired_future_replayed_and_malformed_submissions() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let now = dbvm_protocol::now_ms();

    let mut b = fleet.body("db1", "ping", json!({}));
    b.issued_at_ms = now - 600_000;
    // beyond the clock skew the agent allows (within it, the broker takes the command)
    b.not_after_ms = now - 60_000;
    let e = client
        .submit(&fleet.signer.sign(&b))
        .await
        .expect_err("expired");
    assert!(e.to_string().contains("expired"), "{e}");

    let mut b = fleet.body("db1", "ping", json!({}));
    b.issued_at_ms = now + 3_600_000;
    b.not_after_ms = now + 3_700_000;
    let e = client
        .submit(&fleet.signer.sign(&b))
        .await
        .expect_err("future");
    assert!(e.to_string().contains("future"), "{e}");

    let cmd = fleet.sign("db1", "ping", json!({}));
    client.submit(&cmd).await.expect("first submission");
    let e = client.submit(&cmd).await.expect_err("replay");
    assert!(e.to_string().contains("already submitted"), "{e}");

    let mut bad_target = fleet.body("db1", "ping", json!({}));
    bad_target.agent_id = "DB/1".into();
    let e = client
        .submit(&fleet.signer.sign(&bad_target))
        .await
        .expect_err("target");
    assert!(e.to_string().contains("agent id"), "{e}");

    let garbage = fleet.signer.sign_bytes(vec![9, 9, 9]);
    let e = client.submit(&garbage).await.expect_err("garbage body");
    assert!(e.to_string().contains("decode"), "{e}");
}

/// What a real broker would never relay, delivered straight to a real agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_alone_refuses_wrong_target_expired_future_and_replays_even_after_restart() {
    let fleet = Fleet::new();
    let rogue = RogueBroker::bind(&fleet).await;
    fleet.provision_identity("db1");
    let agent = fleet.start_agent("db1", rogue.addr, None, "");
    let mut s = rogue.accept().await;
    assert_eq!(s.hello.agent_id, "db1");

    let rejected = |r: &dbvm_protocol::messages::CommandResult| match &r.outcome {
        Outcome::Rejected { code, message } => Some((*code, message.clone())),
        _ => None,
    };

    s.deliver(&fleet.sign("db2", "ping", json!({}))).await;
    let r = s.next_result().await;
    assert_eq!(
        rejected(&r).map(|x| x.0),
        Some(RejectCode::WrongTarget),
        "{r:?}"
    );

    let now = dbvm_protocol::now_ms();
    let mut b = fleet.body("db1", "ping", json!({}));
    b.issued_at_ms = now - 600_000;
    b.not_after_ms = now - 120_000;
    s.deliver(&fleet.signer.sign(&b)).await;
    let r = s.next_result().await;
    assert_eq!(
        rejected(&r).map(|x| x.0),
        Some(RejectCode::Expired),
        "{r:?}"
    );

    let mut b = fleet.body("db1", "ping", json!({}));
    b.issued_at_ms = now + 600_000;
    b.not_after_ms = now + 700_000;
    s.deliver(&fleet.signer.sign(&b)).await;
    let r = s.next_result().await;
    assert_eq!(
        rejected(&r).map(|x| x.0),
        Some(RejectCode::NotYetValid),
        "{r:?}"
    );

    let mut forged = fleet.sign("db1", "ping", json!({}));
    forged.signature[0] ^= 0xff;
    s.deliver(&forged).await;
    let r = s.next_result().await;
    assert_eq!(
        rejected(&r).map(|x| x.0),
        Some(RejectCode::BadSignature),
        "{r:?}"
    );

    let stranger = CommandSigner::generate();
    s.deliver(&stranger.sign(&fleet.body("db1", "ping", json!({}))))
        .await;
    let r = s.next_result().await;
    assert_eq!(
        rejected(&r).map(|x| x.0),
        Some(RejectCode::UnknownKey),
        "{r:?}"
    );

    let good = fleet.sign("db1", "ping", json!({}));
    s.deliver(&good).await;
    let r = s.next_result().await;
    assert!(matches!(r.outcome, Outcome::Succeeded { .. }), "{r:?}");
    s.deliver(&good).await;
    let r = s.next_result().await;
    let (code, message) = rejected(&r).expect("replay refused");
    assert_eq!(code, RejectCode::Replayed);
    assert!(message.contains("already received"), "{message}");

    // After a crash and restart the journal still remembers.
    let mut agent = agent;
    agent.proc.kill();
    drop(s);
    let agent2 = fleet.restart_agent(&agent);
    let mut s = rogue.accept().await;
    s.deliver(&good).await;
    let r = s.next_result().await;
    assert_eq!(
        rejected(&r).map(|x| x.0),
        Some(RejectCode::Replayed),
        "{r:?}"
    );
    // It ran exactly once (both runs of the agent append to the same log file).
    assert_eq!(agent.proc.log, agent2.proc.log);
    let log = agent2.proc.log_text();
    let runs = log
        .matches(&format!(
            "running command id={}",
            good.peek_body().expect("body").id
        ))
        .count();
    assert_eq!(runs, 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_shows_connections_and_every_state_of_a_command() {
    use futures::StreamExt;
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut events = client
        .events(Some("db1"), None)
        .await
        .expect("event stream");
    let token = client
        .enrollment_token("db1", None)
        .await
        .expect("token")
        .token;
    let _agent = fleet.start_agent("db1", broker.agent_addr, Some(&token), "");
    let v = client
        .submit(&fleet.sign("db1", "ping", json!({"delay_ms": 400})))
        .await
        .expect("submit");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.contains(&"succeeded".to_string()) {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("events within 30 s")
            .expect("stream open")
            .expect("event");
        assert_eq!(ev.agent_id, "db1");
        match ev.kind.as_str() {
            "agent.connected" => seen.push("connected".into()),
            "command.state" if ev.command_id == Some(v.id) => {
                seen.push(ev.data["state"].as_str().unwrap_or("").to_string())
            }
            "command.progress" if ev.command_id == Some(v.id) => seen.push("progress".into()),
            _ => {}
        }
    }
    for want in ["queued", "connected", "running", "progress", "succeeded"] {
        assert!(
            seen.iter().any(|s| s == want),
            "no {want} event in {seen:?}"
        );
    }
}
