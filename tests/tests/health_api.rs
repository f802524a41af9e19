//! Health reports through a real broker: a hand-driven agent (a raw mTLS link) sends
//! `Health` and `health.changed` frames; the broker keeps the latest report, serves it
//! (`GET /v1/agents/{id}/health`, `GET /v1/health`, the fleet gauges), refuses one that
//! claims another agent, relays the change as an SSE `agent.event`; `dbvmctl health`,
//! `fleet` and `events` render what it serves, and `health --fresh` runs the checks
//! through a signed `health` command.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::raw::{connect, read_reply};
use dbvm_e2e::{connected, Fleet};
use dbvm_protocol::api::{CommandState, Event};
use dbvm_protocol::frame::{encode, write_frame, MAX_FRAME_LEN};
use dbvm_protocol::health::{CheckReport, HealthChange, HealthReport, HealthStatus};
use dbvm_protocol::messages::{
    AgentEvent, AgentMessage, BrokerMessage, CommandResult, Hello, Outcome,
};
use dbvm_protocol::pki::Identity;
use dbvm_protocol::AgentId;
use dbvmctl::output::{self, Style};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type Link = TlsStream<TcpStream>;

/// Connects as agent `id` speaking protocol 1.1 with the given operations; returns the
/// link once the broker has welcomed it.
async fn agent_link(fleet: &Fleet, broker: &dbvm_e2e::BrokerProc, id: &str, ops: &[&str]) -> Link {
    let cert = fleet.client_cert(Identity::Agent(AgentId::new(id).expect("id")));
    let mut s = connect(
        broker.agent_addr,
        fleet.ca.cert_pem(),
        Some((&cert.cert_pem, &cert.key_pem)),
    )
    .await
    .expect("connect");
    let hello = AgentMessage::Hello(Hello {
        protocol_major: 1,
        protocol_minor: 1,
        agent_id: id.into(),
        agent_version: "health-test".into(),
        operations: ops.iter().map(|o| o.to_string()).collect(),
        capabilities: vec![],
        sealing_key: [0; 32],
        db_kind: None,
    });
    s.write_all(&encode(&hello, MAX_FRAME_LEN).expect("hello"))
        .await
        .expect("send hello");
    let welcome = read_reply(&mut s).await;
    assert!(
        matches!(welcome, Ok(Some(BrokerMessage::Welcome(_)))),
        "{welcome:?}"
    );
    s
}

async fn send(s: &mut Link, m: &AgentMessage) {
    write_frame(s, m, MAX_FRAME_LEN).await.expect("send frame");
}

/// Sends a heartbeat and waits for its ack: every frame sent before has been handled
/// (the broker handles a link's frames in order).
async fn sync(s: &mut Link, seq: u64) {
    send(s, &AgentMessage::Heartbeat { seq }).await;
    match read_reply(s).await {
        Ok(Some(BrokerMessage::HeartbeatAck { seq: got })) if got == seq => {}
        other => panic!("expected HeartbeatAck {seq}, got {other:?}"),
    }
}

fn check(id: &str, status: HealthStatus, message: &str) -> CheckReport {
    CheckReport {
        check: id.into(),
        status,
        message: message.into(),
        figures: BTreeMap::from([("used_pct".to_string(), 42.0)]),
        duration_ms: 3,
        since_ms: dbvm_protocol::now_ms() - 5_000,
    }
}

fn report(agent: &str, checks: Vec<CheckReport>) -> HealthReport {
    HealthReport {
        agent_id: agent.into(),
        at_ms: dbvm_protocol::now_ms(),
        interval_ms: 60_000,
        duration_ms: 120,
        checks,
    }
}

/// Waits (10 s at most) for the next event of `kind` on the stream.
async fn next_event(stream: &mut dbvmctl::EventStream, kind: &str) -> Event {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = stream
                .next()
                .await
                .expect("event stream ended")
                .expect("event");
            if ev.kind == kind {
                return ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} event within 10 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_served_summarised_and_relayed_and_a_foreign_one_is_refused() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut events = client.events(Some("db1"), None).await.expect("events");

    let mut db1 = agent_link(&fleet, &broker, "db1", &[]).await;
    let _db3 = agent_link(&fleet, &broker, "db3", &[]).await;
    connected(&client, "db1").await;
    connected(&client, "db3").await;

    // Known but silent, and unknown: two different 404s.
    let e = client.health("db1").await.expect_err("no report yet");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(404));
    assert_eq!(e.api_code(), Some("not_found"));
    assert!(
        e.to_string()
            .contains("agent db1 has not reported health yet"),
        "{e}"
    );
    let e = client.health("db9").await.expect_err("unknown agent");
    assert!(e.to_string().contains("agent db9 is not known"), "{e}");
    let e = client.health("Not An Id").await.expect_err("bad id");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(400), "{e}");

    // The agent reports: connectivity went critical.
    let sent = report(
        "db1",
        vec![
            check(
                "connectivity",
                HealthStatus::Critical,
                "database refused connections on /run/db.sock",
            ),
            check("data_disk", HealthStatus::Warning, "data disk 91% full"),
            check("cpu", HealthStatus::Ok, "load 0.2"),
        ],
    );
    send(&mut db1, &AgentMessage::Health(sent.clone())).await;
    let change = HealthChange {
        check: "connectivity".into(),
        title: "Connectivity".into(),
        from: Some(HealthStatus::Ok),
        to: HealthStatus::Critical,
        message: "database refused connections on /run/db.sock".into(),
        figures: BTreeMap::new(),
    };
    send(
        &mut db1,
        &AgentMessage::Event(AgentEvent {
            kind: dbvm_protocol::health::HEALTH_CHANGED.into(),
            at_ms: dbvm_protocol::now_ms(),
            payload_json: serde_json::to_string(&change).expect("json"),
        }),
    )
    .await;
    // A report on db1's link that claims to be db2's is refused, and changes nothing.
    let foreign = report("db2", vec![check("cpu", HealthStatus::Ok, "fine")]);
    send(&mut db1, &AgentMessage::Health(foreign)).await;
    sync(&mut db1, 1).await;

    let health = client.health("db1").await.expect("db1 health");
    assert_eq!(health.report, sent);
    assert_eq!(health.worst, HealthStatus::Critical);
    assert!(health.connected);
    assert!(health.received_at_ms >= sent.at_ms, "{health:?}");
    let e = client
        .health("db2")
        .await
        .expect_err("foreign report stored");
    assert!(e.to_string().contains("agent db2 is not known"), "{e}");

    // The change reaches an events subscriber as agent.event, and reads as a sentence.
    let ev = next_event(&mut events, "agent.event").await;
    assert_eq!(ev.agent_id, "db1");
    assert_eq!(ev.data["kind"], "health.changed");
    assert_eq!(ev.data["payload"]["to"], "critical");
    let line = output::event_line(&ev, Style::PLAIN);
    assert!(
        line.contains("health.changed")
            && line.contains("db1")
            && line.contains("connectivity  ok → critical  database refused"),
        "{line}"
    );

    // The fleet: every known agent, db3 has not reported.
    let fleet_health = client.fleet_health().await.expect("fleet");
    let ids: Vec<&str> = fleet_health
        .agents
        .iter()
        .map(|a| a.agent_id.as_str())
        .collect();
    assert_eq!(ids, ["db1", "db3"]);
    let a1 = &fleet_health.agents[0];
    assert_eq!(a1.worst, Some(HealthStatus::Critical));
    assert_eq!(
        (a1.counts.critical, a1.counts.warning, a1.counts.ok),
        (1, 1, 1)
    );
    let problems: Vec<(&str, HealthStatus)> = a1
        .problems
        .iter()
        .map(|p| (p.check.as_str(), p.status))
        .collect();
    assert_eq!(
        problems,
        [
            ("connectivity", HealthStatus::Critical),
            ("data_disk", HealthStatus::Warning)
        ]
    );
    assert_eq!(fleet_health.agents[1].worst, None);
    assert_eq!(fleet_health.not_reported, 1);

    // The metrics: the gauges and the refusal.
    let metrics = client.get_text("/metrics").await.expect("metrics");
    for want in [
        "dbvm_broker_agents_by_health{status=\"critical\"} 1",
        "dbvm_broker_agents_by_health{status=\"ok\"} 0",
        "dbvm_broker_health_checks{check=\"data_disk\",status=\"warning\"} 1",
        "dbvm_broker_health_reports_total{result=\"stored\"} 1",
        "dbvm_broker_health_reports_total{result=\"wrong_agent\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing from\n{metrics}");
    }

    // What `dbvmctl health` and `dbvmctl fleet` print, from the library.
    let now = dbvm_protocol::now_ms();
    let table = output::health_table(&health, now, Style::PLAIN, false);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("db1  critical  checked "), "{table}");
    assert!(lines[1].starts_with("CHECK"), "{table}");
    assert!(
        lines[2].starts_with("Connectivity") && lines[2].contains("critical  database refused"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("Data disk health") && lines[3].contains("warning"),
        "{table}"
    );
    assert_eq!(lines.len(), 14, "{table}");
    let text = output::fleet_table(&fleet_health, now, Style::PLAIN);
    assert!(
        text.contains("connectivity critical; data_disk warning"),
        "{text}"
    );

    // The same from the dbvmctl binary: no colour when stdout is not a terminal.
    let home = fleet.path("ctl-home");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::copy(fleet.path("ca.crt"), home.join("ca.crt")).expect("ca");
    std::fs::write(home.join("controlplane.crt"), &fleet.control_plane.cert_pem).expect("cert");
    std::fs::write(home.join("controlplane.key"), &fleet.control_plane.key_pem).expect("key");
    let ctl = |args: &[&str]| {
        std::process::Command::new(dbvm_e2e::proc::bin_dir().join("dbvmctl"))
            .args([
                "--dir",
                home.to_str().unwrap(),
                "--broker",
                &broker.api_url(),
            ])
            .args(args)
            .env_remove("NO_COLOR")
            .output()
            .expect("run dbvmctl")
    };
    let out = ctl(&["health", "db1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Connectivity") && stdout.contains("critical"),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\x1b'),
        "colour off a terminal: {stdout:?}"
    );
    let out = ctl(&["fleet"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("db3  yes"));
    let out = ctl(&["health", "db9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("cannot read the health of agent db9") && stderr.contains("not known"),
        "{stderr}"
    );

    // A newer report replaces the old one: db1 recovers.
    let healed = report(
        "db1",
        vec![check(
            "connectivity",
            HealthStatus::Ok,
            "accepting connections",
        )],
    );
    send(&mut db1, &AgentMessage::Health(healed.clone())).await;
    sync(&mut db1, 2).await;
    assert_eq!(client.health("db1").await.expect("health").report, healed);
    let metrics = client.get_text("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("dbvm_broker_agents_by_health{status=\"critical\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dbvm_broker_agents_by_health{status=\"ok\"} 1"),
        "{metrics}"
    );

    // Disconnected, its last report stays, marked as such.
    drop(db1);
    dbvm_e2e::eventually(Duration::from_secs(10), "db1 to disconnect", || async {
        let h = client.health("db1").await.ok()?;
        (!h.connected).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_goes_through_a_signed_health_command() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut db1 = agent_link(&fleet, &broker, "db1", &["ping", "health"]).await;
    let _old = agent_link(&fleet, &broker, "db2", &["ping"]).await;
    connected(&client, "db1").await;
    connected(&client, "db2").await;
    let db1_id = AgentId::new("db1").expect("id");

    let fresh = report(
        "db1",
        vec![check("ntp_sync", HealthStatus::Warning, "clock 300 ms off")],
    );
    // The hand-driven agent checks what it was asked and answers.
    let agent_side = async {
        let cmd = match read_reply(&mut db1).await {
            Ok(Some(BrokerMessage::Deliver(cmd))) => cmd,
            other => panic!("expected a delivery, got {other:?}"),
        };
        let body = cmd.peek_body().expect("body");
        assert_eq!(
            (body.operation.as_str(), body.args_json.as_str()),
            ("health", "{}")
        );
        assert_eq!(body.agent_id, "db1");
        send(&mut db1, &AgentMessage::Ack { id: body.id }).await;
        let now = dbvm_protocol::now_ms();
        send(
            &mut db1,
            &AgentMessage::Result(CommandResult {
                id: body.id,
                outcome: Outcome::Succeeded {
                    output_json: serde_json::to_string(&fresh).expect("json"),
                },
                started_at_ms: now,
                finished_at_ms: now,
            }),
        )
        .await;
        body.id
    };
    let (health, id) = tokio::join!(
        dbvmctl::health::fresh(&client, &fleet.signer, &db1_id, Duration::from_secs(20)),
        agent_side
    );
    let health = health.expect("fresh report");
    assert_eq!(health.report, fresh);
    assert_eq!(health.worst, HealthStatus::Warning);
    let view = client.command(id).await.expect("command");
    assert_eq!(view.state, CommandState::Succeeded);
    let table = output::health_table(&health, dbvm_protocol::now_ms(), Style::PLAIN, true);
    assert!(
        table.contains("NTP sync") && table.contains("clock 300 ms off"),
        "{table}"
    );

    // An agent without the operation, and one that is not connected, are refused
    // before anything is signed.
    let e = dbvmctl::health::fresh(
        &client,
        &fleet.signer,
        &AgentId::new("db2").unwrap(),
        Duration::from_secs(5),
    )
    .await
    .expect_err("no health operation");
    assert!(e.to_string().contains("has no `health` operation"), "{e}");
    let e = dbvmctl::health::fresh(
        &client,
        &fleet.signer,
        &AgentId::new("db9").unwrap(),
        Duration::from_secs(5),
    )
    .await
    .expect_err("unknown agent");
    assert!(e.to_string().contains("404"), "{e}");
}
