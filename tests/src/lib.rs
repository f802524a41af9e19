//! End-to-end test harness: a throwaway fleet (CA, keys, certificates) in a temp dir, real
//! `dbvm-broker` and `dbvm-agent` processes, a control-plane client, a TCP proxy that can
//! cut or black-hole the link, and a "rogue broker" that speaks the protocol directly so
//! tests can hand an agent commands a real broker would never relay (replays, commands
//! for other agents) — the agent must refuse them on its own.
//!
//! Processes are killed when their handle drops; their logs are printed when a test fails.

// This crate exists only to be driven by tests: a setup step that cannot work fails the
// test with a message, which is exactly what `expect` does.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod backup;
pub mod dbtest;
pub mod docker;
pub mod fleet;
pub mod metrics;
pub mod netns;
pub mod proc;
pub mod proxy;
pub mod raw;
pub mod release;
pub mod report;
pub mod rogue;
pub mod s3;

pub use fleet::Fleet;
pub use proc::{AgentProc, BrokerProc};

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Waits until the broker lists agent `id` as connected (30 s at most).
pub async fn connected(client: &dbvmctl::Client, id: &str) {
    eventually(
        std::time::Duration::from_secs(30),
        &format!("agent {id} to connect"),
        || async {
            let agents = client.agents().await.ok()?;
            agents
                .iter()
                .any(|a| a.id == id && a.connected)
                .then_some(())
        },
    )
    .await;
}
