//! Faults with real processes: the broker killed with commands queued and in flight, the
//! agent killed mid-command, the network path black-holed and cut, commands that expire
//! in the queue, admission limits, and certificate renewal on a live link.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::proxy::Proxy;
use dbvm_e2e::{eventually, AgentProc, Fleet};
use dbvm_protocol::api::{CommandState, CommandView};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

async fn connected(client: &dbvmctl::Client, id: &str, want: bool) {
    eventually(
        Duration::from_secs(30),
        &format!("agent {id} connected={want}"),
        || async {
            let agents = client.agents().await.ok()?;
            (agents.iter().any(|a| a.id == id && a.connected) == want).then_some(())
        },
    )
    .await;
}

async fn all_finished(client: &dbvmctl::Client, ids: &[Uuid]) -> Vec<CommandView> {
    let mut out = Vec::new();
    for id in ids {
        out.push(
            client
                .wait(*id, Duration::from_secs(60))
                .await
                .expect("wait"),
        );
    }
    out
}

/// How many times each command appears as run in the agents' logs (a restarted agent
/// appends to the same log file, so each file is read once).
fn executions(agents: &[&AgentProc], ids: &[Uuid]) -> Vec<usize> {
    let files: std::collections::BTreeSet<_> = agents.iter().map(|a| a.proc.log.clone()).collect();
    let log: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    ids.iter()
        .map(|id| log.matches(&format!("running command id={id}")).count())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_with_commands_queued_and_in_flight_delivers_each_exactly_once() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    // Queued while the agent is away.
    agent.proc.terminate();
    connected(&client, "db1", false).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let v = client
            .submit(&fleet.sign("db1", "ping", json!({"echo": i.to_string()})))
            .await
            .expect("submit");
        assert_eq!(v.state, CommandState::Queued);
        ids.push(v.id);
    }
    let mut broker = broker;
    broker.proc.kill();
    let broker = fleet.restart_broker(&broker, "");
    let client = fleet.client(&broker);
    let agent2 = fleet.restart_agent(&agent);
    let done = all_finished(&client, &ids).await;
    assert!(
        done.iter().all(|v| v.state == CommandState::Succeeded),
        "{done:?}"
    );

    // In flight: commands delivered and running when the broker dies.
    let mut flying = Vec::new();
    for _ in 0..10 {
        let v = client
            .submit(&fleet.sign("db1", "ping", json!({"delay_ms": 1500})))
            .await
            .expect("submit");
        flying.push(v.id);
    }
    eventually(
        Duration::from_secs(20),
        "commands to be running",
        || async {
            let v = client.command(*flying.last()?).await.ok()?;
            (v.state == CommandState::Running).then_some(())
        },
    )
    .await;
    let ended = |agent: &AgentProc| {
        agent
            .proc
            .log_text()
            .matches("session with the broker ended")
            .count()
    };
    let sessions_ended = ended(&agent2);
    let mut broker = broker;
    broker.proc.kill();
    // The broker comes back only once the agent has seen it go, so the commands in flight
    // really cross an outage (their results wait in the journal for the next session).
    eventually(
        Duration::from_secs(20),
        "the agent to notice the broker died",
        || async { (ended(&agent2) > sessions_ended).then_some(()) },
    )
    .await;
    let broker = fleet.restart_broker(&broker, "");
    let client = fleet.client(&broker);
    let done = all_finished(&client, &flying).await;
    assert!(
        done.iter().all(|v| v.state == CommandState::Succeeded),
        "{done:?}"
    );

    let all: Vec<Uuid> = ids.iter().chain(flying.iter()).copied().collect();
    let runs = executions(&[&agent, &agent2], &all);
    assert!(
        runs.iter().all(|n| *n == 1),
        "each command must run exactly once: {runs:?}"
    );
    let conn = rusqlite::Connection::open(agent2.journal()).expect("journal");
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM commands", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n as usize, all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_command_reports_it_interrupted_and_never_reruns_it() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    let v = client
        .submit(&fleet.sign("db1", "ping", json!({"delay_ms": 20000})))
        .await
        .expect("submit");
    eventually(Duration::from_secs(20), "the command to run", || async {
        let v = client.command(v.id).await.ok()?;
        (v.state == CommandState::Running).then_some(())
    })
    .await;
    agent.proc.kill();
    let agent2 = fleet.restart_agent(&agent);
    let done = client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(done.state, CommandState::Interrupted, "{done:?}");
    let err = done.error.expect("error");
    assert!(err.message.contains("not run again"), "{}", err.message);
    // The broker redelivers unfinished commands after reconnecting; the journal absorbs it.
    let after = client
        .submit(&fleet.sign("db1", "ping", json!({})))
        .await
        .expect("submit");
    let after = client
        .wait(after.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(after.state, CommandState::Succeeded);
    assert_eq!(executions(&[&agent, &agent2], &[v.id]), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_network_path_is_detected_and_the_queue_drains_after_reconnect() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("[agents]\nheartbeat_interval_ms = 300\n");
    let client = fleet.client(&broker);
    let proxy = Proxy::start(broker.agent_addr).await;
    let token = client
        .enrollment_token("db1", None)
        .await
        .expect("token")
        .token;
    let agent = fleet.start_agent("db1", proxy.addr, Some(&token), "");
    connected(&client, "db1", true).await;

    // Black hole: no reset, no FIN; both sides must notice from missing heartbeats.
    proxy.blackhole(true);
    connected(&client, "db1", false).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            client
                .submit(&fleet.sign("db1", "ping", json!({})))
                .await
                .expect("submit")
                .id,
        );
    }
    proxy.blackhole(false);
    let done = all_finished(&client, &ids).await;
    assert!(
        done.iter().all(|v| v.state == CommandState::Succeeded),
        "{done:?}"
    );

    // A hard cut (connections reset) also heals.
    proxy.cut();
    let v = client
        .submit(&fleet.sign("db1", "ping", json!({})))
        .await
        .expect("submit");
    let v = client
        .wait(v.id, Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Succeeded);
    assert!(agent.proc.log_text().contains("reconnecting"));
    assert_eq!(executions(&[&agent], &ids), vec![1; 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_expire_and_deployments_beyond_the_waiting_room_get_429() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);

    // A command for an agent that never comes expires in the queue, once its
    // not_after plus the clock skew agents allow has passed: here a second from now.
    let mut b = fleet.body("ghost", "ping", json!({}));
    b.issued_at_ms = dbvm_protocol::now_ms() - 60_000;
    b.not_after_ms = dbvm_protocol::now_ms() - dbvm_protocol::command::DEFAULT_CLOCK_SKEW_MS + 1000;
    let v = client.submit(&fleet.signer.sign(&b)).await.expect("submit");
    let v = client
        .wait(v.id, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Expired, "{v:?}");

    // 8 running + 2 waiting deployments are admitted; the 11th is refused, clearly.
    for i in 0..10 {
        client
            .submit(&fleet.sign(&format!("db{i}"), "create", json!({})))
            .await
            .unwrap_or_else(|e| panic!("deployment {i} refused: {e}"));
    }
    let e = client
        .submit(&fleet.sign("db10", "create", json!({})))
        .await
        .expect_err("11th deployment");
    let text = e.to_string();
    assert!(text.contains("429") || text.contains("busy"), "{text}");
    assert!(text.contains("8 running + 2 waiting"), "{text}");
    // Other classes are not affected.
    client
        .submit(&fleet.sign("db1", "backup", json!({})))
        .await
        .expect("backup admitted");
    client
        .submit(&fleet.sign("db1", "ping", json!({})))
        .await
        .expect("query admitted");
}

/// The id of the next command the broker delivers, or None if none comes within 1.5 s.
///
/// `None` is a negative result with a fixed window: nothing the broker sends proves that
/// it withheld a delivery (its session loop does not order a submission with the frames
/// it answers, so no later reply is a barrier), so a wrongly admitted command gets 1.5 s
/// to arrive, far longer than a delivery takes on this machine.
async fn next_delivery(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Option<Uuid> {
    use dbvm_protocol::messages::BrokerMessage;
    match tokio::time::timeout(Duration::from_millis(1500), dbvm_e2e::raw::read_reply(s)).await {
        Ok(Ok(Some(BrokerMessage::Deliver(cmd)))) => Some(cmd.peek_body().expect("body").id),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_operations_hold_admission_slots_until_their_result_arrives() {
    use dbvm_e2e::raw::{connect, hello, send_raw};
    use dbvm_protocol::frame::{encode, MAX_FRAME_LEN};
    use dbvm_protocol::messages::{AgentMessage, BrokerMessage, CommandResult, Outcome};
    use dbvm_protocol::pki::Identity;

    let fleet = Fleet::new();
    let broker = fleet.start_broker("[limits]\nmanagement_running = 2\n");
    let client = fleet.client(&broker);
    // A hand-driven agent that takes deliveries and answers only when told.
    let cert = fleet.client_cert(Identity::Agent(
        dbvm_protocol::AgentId::new("db1").expect("id"),
    ));
    let mut s = connect(
        broker.agent_addr,
        fleet.ca.cert_pem(),
        Some((&cert.cert_pem, &cert.key_pem)),
    )
    .await
    .expect("connect");
    let welcome = send_raw(
        &mut s,
        &encode(&hello("db1", 1), MAX_FRAME_LEN).expect("hello"),
        false,
    )
    .await;
    assert!(
        matches!(welcome, Ok(Some(BrokerMessage::Welcome(_)))),
        "{welcome:?}"
    );
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            client
                .submit(&fleet.sign("db1", "restart_db", json!({})))
                .await
                .expect("submit")
                .id,
        );
    }
    let first = next_delivery(&mut s).await.expect("first delivery");
    let second = next_delivery(&mut s).await.expect("second delivery");
    assert_eq!(
        next_delivery(&mut s).await,
        None,
        "a third management command ran beside two"
    );
    assert_eq!(vec![first, second], ids[..2].to_vec());
    // One finishes: exactly one more is delivered.
    let now = dbvm_protocol::now_ms();
    let done = AgentMessage::Result(CommandResult {
        id: first,
        outcome: Outcome::Succeeded {
            output_json: "{}".into(),
        },
        started_at_ms: now,
        finished_at_ms: now,
    });
    let ack = send_raw(
        &mut s,
        &encode(&done, MAX_FRAME_LEN).expect("result"),
        false,
    )
    .await;
    assert!(
        matches!(ack, Ok(Some(BrokerMessage::ResultAck { id })) if id == first),
        "{ack:?}"
    );
    assert_eq!(next_delivery(&mut s).await, Some(ids[2]));
    assert_eq!(next_delivery(&mut s).await, None);
    let v = client.command(first).await.expect("command");
    assert_eq!(v.state, CommandState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_on_the_live_link_without_dropping_commands() {
    let fleet = Fleet::new();
    let broker =
        fleet.start_broker("[agents]\ncert_lifetime_seconds = 6\nheartbeat_interval_ms = 1000\n");
    let client = fleet.client(&broker);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let first = std::fs::read_to_string(agent.state_dir.join("identity.pem")).expect("identity");
    let first_not_after = client
        .agent("db1")
        .await
        .expect("agent")
        .cert_not_after_ms
        .expect("not after");

    // Keep commands flowing until the certificate was renewed and the first one has
    // expired (renewal comes at two thirds of its 6 s life), 30 s at most.
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Logged once the new certificate is stored.
        let renewed = agent.proc.log_text().contains("agent certificate renewed");
        if renewed && dbvm_protocol::now_ms() > first_not_after {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "within 30 s: renewed {renewed}, first certificate expired {}:\n{}",
            dbvm_protocol::now_ms() > first_not_after,
            agent.proc.log_tail()
        );
        let v = client
            .submit(&fleet.sign("db1", "ping", json!({})))
            .await
            .expect("submit");
        let v = client
            .wait(v.id, Duration::from_secs(10))
            .await
            .expect("wait");
        assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
        seen.insert(v.id);
        // Paces the traffic, it waits for nothing: commands must keep arriving while the
        // renewal happens (the loop's exit is the condition), a few per second suffice.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = std::fs::read_to_string(agent.state_dir.join("identity.pem")).expect("identity");
    assert_ne!(first, now, "the certificate was not renewed");
    assert!(agent.proc.log_text().contains("agent certificate renewed"));
    let renewed_not_after = client
        .agent("db1")
        .await
        .expect("agent")
        .cert_not_after_ms
        .expect("not after");
    assert!(
        renewed_not_after > first_not_after,
        "the API still shows the first certificate expiry: {first_not_after} {renewed_not_after}"
    );
    // One connection throughout: renewal happened in band.
    assert_eq!(
        broker.proc.log_text().matches("agent connected").count(),
        1,
        "{}",
        broker.proc.log_text()
    );

    // After the first certificate expired, a restarted agent connects with the renewed one.
    let mut agent = agent;
    agent.proc.kill();
    connected(&client, "db1", false).await;
    let _agent2 = fleet.restart_agent(&agent);
    connected(&client, "db1", true).await;
    let v = client
        .submit(&fleet.sign("db1", "ping", json!({})))
        .await
        .expect("submit");
    let v = client
        .wait(v.id, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(v.state, CommandState::Succeeded);
}
