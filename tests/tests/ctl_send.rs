//! `dbvmctl::send`, the library other control planes embed, end to end against a real
//! broker and agent: a secret argument is sealed to the agent, the command signed,
//! submitted and waited for, and the secret that comes back sealed to this control plane
//! opens with its key only.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use dbvm_protocol::seal::Secret;
use dbvm_protocol::AgentId;
use dbvmctl::send::{readable, Request};
use dbvmctl::{SendError, Sender};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_seals_signs_submits_waits_and_opens_the_result() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let _agent = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let sender = Sender::new(&client, &fleet.signer, fleet.reply_key.public_key());

    let mut request = Request::new(AgentId::new("db1").unwrap(), "ping");
    request.args.insert("echo".into(), json!("hello"));
    request
        .secrets
        .push(("secret".into(), Secret::new("correct-horse")));
    let done = sender
        .send_and_wait(request, Duration::from_secs(60))
        .await
        .expect("send");
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    let raw = serde_json::to_string(&done).unwrap();
    assert!(
        !raw.contains("correct-horse"),
        "the broker saw it in clear: {raw}"
    );

    let opened = readable(&done, Some(&fleet.reply_key));
    opened.revealed.expect("opens with the reply key");
    assert_eq!(opened.value["output"]["secret"], "correct-horse");
    assert_eq!(opened.value["output"]["echo"], "hello");
    let hidden = readable(&done, None);
    assert!(!hidden.value.to_string().contains("correct-horse"));

    // Secrets for an agent the broker never saw cannot be sealed: said before anything
    // is submitted.
    let mut request = Request::new(AgentId::new("db9").unwrap(), "ping");
    request.secrets.push(("secret".into(), Secret::new("x")));
    let e = sender.submit(request).await.expect_err("no sealing key");
    assert!(matches!(e, SendError::AgentNotReady { .. }), "{e}");
    assert!(e.to_string().contains("db9"), "{e}");
}
