//! The broker's TLS listeners under connection floods: half-open connections can hold
//! at most `max_handshakes` slots, each until the handshake timeout; the next connection
//! waits its turn instead of being lost; at `max_connections` the broker stops accepting
//! until a connection closes. Failed handshakes are counted by listener and reason.
//!
//! Nothing here depends on how fast the machine is: every "still waiting" is read from
//! the broker's own gauges while the slots are provably held (by connections the test
//! keeps open, under a timeout far longer than the test), and every "gets in" is waited
//! for.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::metrics::{count, scrape, value};
use dbvm_e2e::raw::{connect_over, hello, send_raw};
use dbvm_e2e::{eventually, Fleet};
use dbvm_protocol::frame::{encode, MAX_FRAME_LEN};
use dbvm_protocol::messages::BrokerMessage;
use dbvm_protocol::pki::Identity;
use dbvm_protocol::AgentId;
use std::time::Duration;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(30);

/// Waits until the broker's metrics satisfy `ok`, printing them if they never do.
async fn metrics_until(
    broker: &dbvm_e2e::BrokerProc,
    ca: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    eventually(WAIT, what, || async {
        let text = scrape(broker, ca).await;
        ok(&text).then_some(text)
    })
    .await
}

/// A raw agent connection that says Hello as `id` and returns the broker's first answer.
/// Its TCP connection is made before this returns (the kernel completes it even when
/// the broker does not accept it yet); the rest runs in the task.
async fn hello_as(
    fleet: &Fleet,
    broker: &dbvm_e2e::BrokerProc,
    id: &str,
) -> tokio::task::JoinHandle<std::io::Result<Option<BrokerMessage>>> {
    let cert = fleet.client_cert(Identity::Agent(AgentId::new(id).expect("id")));
    let ca = fleet.ca.cert_pem().to_string();
    let id = id.to_string();
    let tcp = TcpStream::connect(broker.agent_addr).await.expect("tcp");
    tokio::spawn(async move {
        let mut s = connect_over(tcp, &ca, Some((&cert.cert_pem, &cert.key_pem))).await?;
        let bytes = encode(&hello(&id, 1), MAX_FRAME_LEN).expect("encode");
        send_raw(&mut s, &bytes, false).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_fill_the_handshake_slots_and_the_next_connection_waits_its_turn() {
    let fleet = Fleet::new();
    // A handshake timeout far beyond the test: the slots stay held until the test lets go.
    let broker = fleet
        .start_broker("[listeners.agent]\nmax_handshakes = 2\nhandshake_timeout_ms = 600000\n");
    let ca = fleet.ca.cert_pem();

    // Two connections that never send a ClientHello.
    let first = TcpStream::connect(broker.agent_addr).await.expect("tcp");
    let _second = TcpStream::connect(broker.agent_addr).await.expect("tcp");
    metrics_until(&broker, ca, "two handshakes in progress", |m| {
        value(m, "dbvm_broker_listener_handshakes{listener=\"agent\"}") == Some(2.0)
    })
    .await;

    // A real client now waits for a slot: accepted, but its handshake has not started.
    let waiting = hello_as(&fleet, &broker, "db1").await;
    let m = metrics_until(&broker, ca, "one connection waiting for a slot", |m| {
        value(
            m,
            "dbvm_broker_listener_handshakes_waiting{listener=\"agent\"}",
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        value(&m, "dbvm_broker_listener_handshakes{listener=\"agent\"}"),
        Some(2.0),
        "the cap must hold:\n{m}"
    );
    assert!(
        count(
            &m,
            "dbvm_broker_listener_saturated_total{listener=\"agent\",limit=\"handshakes\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(!waiting.is_finished(), "a handshake got past the cap");

    // One half-open connection goes away: its slot goes to the waiting client.
    drop(first);
    let reply = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting client got a slot")
        .expect("task")
        .expect("hello");
    assert!(
        matches!(reply, Some(BrokerMessage::Welcome(_))),
        "{reply:?}"
    );
    let m = scrape(&broker, ca).await;
    assert_eq!(
        count(
            &m,
            "dbvm_broker_tls_handshake_failures_total{listener=\"agent\",reason=\"eof\"}"
        ),
        1.0,
        "{m}"
    );
    // The API listener has its own slots: it answered every scrape above.
    assert_eq!(
        count(
            &m,
            "dbvm_broker_listener_saturated_total{listener=\"api\",limit=\"handshakes\"}"
        ),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_gets_in_once_half_open_connections_time_out() {
    let fleet = Fleet::new();
    let broker =
        fleet.start_broker("[listeners.agent]\nmax_handshakes = 2\nhandshake_timeout_ms = 1000\n");
    let ca = fleet.ca.cert_pem();
    let client = fleet.client(&broker);
    let _half_open: Vec<TcpStream> = vec![
        TcpStream::connect(broker.agent_addr).await.expect("tcp"),
        TcpStream::connect(broker.agent_addr).await.expect("tcp"),
    ];
    // Enrollment and the session each need a handshake slot.
    let _agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let m = metrics_until(&broker, ca, "both half-open connections timed out", |m| {
        count(
            m,
            "dbvm_broker_tls_handshake_failures_total{listener=\"agent\",reason=\"timeout\"}",
        ) == 2.0
    })
    .await;
    assert_eq!(
        value(&m, "dbvm_broker_listener_handshakes{listener=\"agent\"}"),
        Some(0.0),
        "{m}"
    );
    let log = broker.proc.log_text();
    assert!(
        log.contains("TLS handshake failed") && log.contains("timeout"),
        "failed handshakes are logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_the_broker_stops_accepting_until_a_connection_closes() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("[listeners.agent]\nmax_connections = 1\nmax_handshakes = 1\n");
    let ca = fleet.ca.cert_pem();
    let client = fleet.client(&broker);
    let mut agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    // The kernel completes the TCP connection (backlog); the broker does not take it.
    let waiting = hello_as(&fleet, &broker, "db2").await;
    let m = metrics_until(
        &broker,
        ca,
        "the agent listener at its connection cap",
        |m| {
            count(
                m,
                "dbvm_broker_listener_saturated_total{listener=\"agent\",limit=\"connections\"}",
            ) >= 1.0
        },
    )
    .await;
    assert_eq!(
        value(&m, "dbvm_broker_listener_connections{listener=\"agent\"}"),
        Some(1.0),
        "the cap must hold:\n{m}"
    );
    assert_eq!(
        value(&m, "dbvm_broker_listener_handshakes{listener=\"agent\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(!waiting.is_finished(), "a connection got past the cap");

    // The agent's connection closes: the waiting client gets in.
    agent.proc.kill();
    let reply = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting client was accepted")
        .expect("task")
        .expect("hello");
    assert!(
        matches!(reply, Some(BrokerMessage::Welcome(_))),
        "{reply:?}"
    );
}
