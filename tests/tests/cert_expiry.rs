//! Certificate expiry is visible before it bites: the broker's `/metrics` carries the
//! earliest expiry of a connected agent's certificate (moving forward as agents renew)
//! and the fleet CA's.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::metrics::{scrape, value};
use dbvm_e2e::{eventually, Fleet};
use std::time::Duration;

const EARLIEST: &str = "dbvm_broker_agent_cert_earliest_expiry_timestamp_seconds";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_earliest_agent_certificate_expiry_and_the_ca_expiry() {
    let fleet = Fleet::new();
    // Six-second certificates: agents renew in band every four seconds.
    let broker =
        fleet.start_broker("[agents]\ncert_lifetime_seconds = 6\nheartbeat_interval_ms = 1000\n");
    let ca = fleet.ca.cert_pem();
    let client = fleet.client(&broker);

    let m = scrape(&broker, ca).await;
    let (_, ca_not_after_ms) = dbvm_protocol::pki::validity_ms(ca).expect("CA validity");
    assert_eq!(
        value(&m, "dbvm_broker_ca_cert_expiry_timestamp_seconds"),
        Some((ca_not_after_ms / 1000) as f64),
        "{m}"
    );
    assert_eq!(
        value(&m, EARLIEST),
        None,
        "no agent connected, no series:\n{m}"
    );

    let _db1 = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let _db2 = fleet
        .enroll_agent(&client, broker.agent_addr, "db2", "")
        .await;
    // The gauge is the smallest certificate expiry the API shows for a connected agent
    // (read until both reads agree: a renewal may land between them).
    let first = eventually(
        Duration::from_secs(30),
        "the gauge to match the agents' certificates",
        || async {
            let agents = client.agents().await.ok()?;
            let earliest = agents
                .iter()
                .filter(|a| a.connected)
                .filter_map(|a| a.cert_not_after_ms)
                .min()?;
            let m = scrape(&broker, ca).await;
            let gauge = value(&m, EARLIEST)?;
            (gauge == (earliest / 1000) as f64).then_some(gauge)
        },
    )
    .await;
    // Renewals move it forward: renewal keeps up.
    eventually(
        Duration::from_secs(30),
        "the earliest expiry to move forward after renewals",
        || async {
            let m = scrape(&broker, ca).await;
            value(&m, EARLIEST).filter(|v| *v > first).map(|_| ())
        },
    )
    .await;
}
