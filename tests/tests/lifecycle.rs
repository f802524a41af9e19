//! The agent's own lifecycle with real processes: SIGTERM drains (a running command
//! finishes and is reported; one that outlives the drain deadline is reported
//! interrupted and never runs again; a command delivered during the drain waits for the
//! restart), and certificate expiry shows in the connectivity check before it bites.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::rogue::RogueBroker;
use dbvm_e2e::{eventually, AgentProc, Fleet};
use dbvm_protocol::api::CommandState;
use dbvm_protocol::health::HealthStatus;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use uuid::Uuid;

/// Starts agent `id` against `broker` with a drain deadline of `drain_s` seconds.
async fn agent_with_drain(
    fleet: &Fleet,
    client: &dbvmctl::Client,
    broker: SocketAddr,
    id: &str,
    drain_s: u64,
) -> AgentProc {
    let token = client
        .enrollment_token(id, None)
        .await
        .expect("enrollment token")
        .token;
    let state_dir = fleet.path(&format!("agent-{id}"));
    let token_file = fleet.path(&format!("agent-{id}.token"));
    std::fs::write(&token_file, token).expect("token file");
    let config = fleet
        .agent_config(
            id,
            broker.port(),
            &state_dir,
            &token_file,
            "[health]\nmetrics_listen = \"\"\nshadow_file = \"/nonexistent/shadow\"\n",
        )
        .replace(
            "max_backoff_ms = 1000\n",
            &format!("max_backoff_ms = 1000\ndrain_timeout_s = {drain_s}\n"),
        );
    let path = fleet.path(&format!("agent-{id}.toml"));
    std::fs::write(&path, config).expect("agent config");
    let agent = fleet.run_agent(id, path, state_dir);
    dbvm_e2e::connected(client, id).await;
    agent
}

/// Sends SIGTERM without waiting for the exit.
fn sigterm(agent: &AgentProc) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &agent.proc.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn state_is(client: &dbvmctl::Client, id: Uuid, want: CommandState) {
    eventually(
        Duration::from_secs(20),
        &format!("command {id} {want:?}"),
        || async { (client.command(id).await.ok()?.state == want).then_some(()) },
    )
    .await;
}

async fn log_says(agent: &AgentProc, what: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("the agent log to say {what:?}"),
        || async { agent.proc.log_text().contains(what).then_some(()) },
    )
    .await;
}

fn runs(agent: &AgentProc, id: Uuid) -> usize {
    agent
        .proc
        .log_text()
        .matches(&format!("running command id={id}"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_command_finish_and_leaves_new_ones_for_the_restart() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut agent = agent_with_drain(&fleet, &client, broker.agent_addr, "db1", 30).await;

    let running = client
        .submit(&fleet.sign("db1", "ping", json!({"delay_ms": 2500})))
        .await
        .expect("submit")
        .id;
    state_is(&client, running, CommandState::Running).await;
    sigterm(&agent);
    log_says(&agent, "waiting for running commands to finish").await;

    // Delivered while the agent drains: not taken, not journaled, not lost.
    let later = client
        .submit(&fleet.sign("db1", "ping", json!({"echo": "after"})))
        .await
        .expect("submit")
        .id;
    log_says(&agent, "left for the broker to deliver after the restart").await;

    let exit = agent.proc.terminate().expect("agent exit status");
    assert!(exit.success(), "the agent exits 0 after a drain: {exit:?}");
    let done = client
        .wait(running, Duration::from_secs(20))
        .await
        .expect("wait");
    assert_eq!(
        done.state,
        CommandState::Succeeded,
        "the running command finished inside the drain and its result reached the broker: {done:?}"
    );
    assert_eq!(
        client.command(later).await.expect("command").state,
        CommandState::Delivered,
        "the command delivered during the drain waits for the agent"
    );
    assert_eq!(runs(&agent, later), 0);

    let agent = fleet.restart_agent(&agent);
    let after = client
        .wait(later, Duration::from_secs(20))
        .await
        .expect("wait");
    assert_eq!(after.state, CommandState::Succeeded, "{after:?}");
    assert_eq!(runs(&agent, later), 1, "run once, after the restart");
    assert_eq!(runs(&agent, running), 1, "never run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_outlives_the_drain_deadline_is_reported_interrupted_and_never_rerun() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut agent = agent_with_drain(&fleet, &client, broker.agent_addr, "db1", 1).await;

    let long = client
        .submit(&fleet.sign("db1", "ping", json!({"delay_ms": 60_000})))
        .await
        .expect("submit")
        .id;
    state_is(&client, long, CommandState::Running).await;
    sigterm(&agent);
    let exit = agent.proc.terminate().expect("agent exit status");
    assert!(exit.success(), "{exit:?}");

    let done = client
        .wait(long, Duration::from_secs(20))
        .await
        .expect("wait");
    assert_eq!(done.state, CommandState::Interrupted, "{done:?}");
    let error = done.error.expect("error").message;
    assert!(
        error.contains("drain deadline of 1 s") && error.contains("ping"),
        "{error}"
    );

    // After a restart it is still interrupted and was not run again.
    let agent = fleet.restart_agent(&agent);
    dbvm_e2e::connected(&client, "db1").await;
    let ping = fleet.send_ok(&client, &agent, "ping", json!({})).await;
    assert_eq!(ping["pong"], true);
    assert_eq!(runs(&agent, long), 1);
    assert_eq!(
        client.command(long).await.expect("command").state,
        CommandState::Interrupted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_and_a_dying_ca_turn_connectivity_to_warning_with_figures() {
    let fleet = Fleet::new();
    let rogue = RogueBroker::bind(&fleet).await;
    // A certificate of 9 s: the agent asks to renew it after 6 s; this broker refuses.
    fleet.provision_identity_for("db1", Duration::from_secs(9));
    // The fleet's CA lives ten years; a warning threshold beyond that makes it "near
    // its end" without waiting for years.
    let _agent = fleet.start_agent(
        "db1",
        rogue.addr,
        None,
        "[health]\ninterval_s = 1\nreport_every_s = 1\ncheck_timeout_ms = 800\nmetrics_listen = \"\"\nshadow_file = \"/nonexistent/shadow\"\n[health.thresholds]\nca_warning_days = 4000\n",
    );
    let mut session = rogue.accept().await;

    let connectivity = |r: &dbvm_protocol::health::HealthReport| {
        r.checks.iter().find(|c| c.check == "connectivity").cloned()
    };
    // The first report that knows the certificate: the CA "near its end" already warns.
    let (report, _) = session
        .health_until(Duration::from_secs(20), |r| {
            connectivity(r).is_some_and(|c| c.figures.contains_key("agent_cert_left_s"))
        })
        .await;
    let c = connectivity(&report).unwrap();
    assert_eq!(c.status, HealthStatus::Warning, "{c:?}");
    assert!(c.message.contains("fleet CA certificate runs out"), "{c:?}");
    let ca_days = c.figures["ca_cert_left_days"];
    assert!(ca_days > 3649.0 && ca_days <= 3650.0, "{ca_days}");
    let left = c.figures["agent_cert_left_s"];
    assert!(left > 0.0 && left <= 9.0, "{left}");
    assert_eq!(c.figures["agent_cert_renewal_failures"], 0.0);

    // Then the renewal is refused: the check says so and counts it.
    let (report, refused) = session
        .health_until(Duration::from_secs(20), |r| {
            connectivity(r).is_some_and(|c| c.figures["agent_cert_renewal_failures"] >= 1.0)
        })
        .await;
    assert!(refused >= 1);
    let c = connectivity(&report).unwrap();
    assert_eq!(c.status, HealthStatus::Warning, "{c:?}");
    assert!(
        c.message.contains("could not be renewed")
            && c.message.contains("renewal refused by the test"),
        "{c:?}"
    );
}
