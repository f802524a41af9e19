//! The broker handles each command inside a tracing span carrying the command's id and
//! operation: its submission, its delivery and its result, so every log line about a
//! command says which one (the harness runs the broker at `dbvm_broker=debug`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::Fleet;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_delivery_and_result_of_a_command_are_logged_inside_its_span() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let v = fleet.send(&client, &agent, "ping", json!({})).await;
    let id = v.id;
    // The result's line is written before the result is acknowledged; give the log a
    // moment to reach the file by waiting for it.
    let log = dbvm_e2e::eventually(Duration::from_secs(10), "the result's log line", || {
        let log = broker.proc.log_text();
        async move { log.contains("result stored").then_some(log) }
    })
    .await;
    for (span, message) in [
        ("submit", "command stored"),
        ("deliver", "handed to the agent"),
        ("result", "result stored"),
    ] {
        let wanted = format!("{span}{{id={id} operation=ping}}");
        assert!(
            log.lines()
                .any(|l| l.contains(&wanted) && l.contains(message)),
            "no line with {wanted:?} and {message:?} in the broker's log:\n{log}"
        );
    }
}
