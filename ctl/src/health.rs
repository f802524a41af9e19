//! An agent's health: the report the broker keeps ([`crate::Client::health`]) or a fresh
//! run of the checks through the signed `health` command ([`fresh`]).

use crate::client::{Client, ClientError};
use crate::sign::{sign_command, SignError};
use dbvm_protocol::api::{AgentHealth, CommandState, CommandView};
use dbvm_protocol::command::CommandSigner;
use dbvm_protocol::health::HealthReport;
use dbvm_protocol::AgentId;
use std::time::Duration;

/// The operation the agent runs its checks for (args `{}`, output a [`HealthReport`]).
pub const OPERATION: &str = "health";

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("agent {0} is not connected, so its checks cannot run now: see its last report with `dbvmctl health {0}`")]
    NotConnected(String),
    #[error("agent {agent} (version {version}) has no `health` operation: upgrade the agent")]
    Unsupported { agent: String, version: String },
    #[error("the health command {id} for agent {agent} is still {} after {} s; it goes on: see it with `dbvmctl status {id}`", .state.as_str(), .after.as_secs())]
    NotFinished {
        agent: String,
        id: uuid::Uuid,
        state: CommandState,
        after: Duration,
    },
    #[error("the health command {id} for agent {agent} {}: {code}: {message}", .state.as_str())]
    Failed {
        agent: String,
        id: uuid::Uuid,
        state: CommandState,
        code: String,
        message: String,
    },
    #[error("the health command {id} for agent {agent} succeeded but its output is not a health report: {error}")]
    BadOutput {
        agent: String,
        id: uuid::Uuid,
        error: String,
    },
}

/// The health report in a finished `health` command, or why there is none.
pub fn report_of(view: &CommandView, waited: Duration) -> Result<HealthReport, HealthError> {
    match view.state {
        CommandState::Succeeded => {}
        state if state.is_terminal() => {
            let (code, message) = view
                .error
                .as_ref()
                .map(|e| (e.code.clone(), e.message.clone()))
                .unwrap_or_else(|| (state.as_str().to_string(), "no details".to_string()));
            return Err(HealthError::Failed {
                agent: view.agent_id.clone(),
                id: view.id,
                state,
                code,
                message,
            });
        }
        state => {
            return Err(HealthError::NotFinished {
                agent: view.agent_id.clone(),
                id: view.id,
                state,
                after: waited,
            })
        }
    }
    let bad = |error: String| HealthError::BadOutput {
        agent: view.agent_id.clone(),
        id: view.id,
        error,
    };
    let output = view.output.clone().ok_or_else(|| bad("no output".into()))?;
    let report: HealthReport = serde_json::from_value(output).map_err(|e| bad(e.to_string()))?;
    if report.agent_id != view.agent_id {
        return Err(bad(format!(
            "the report is for agent {:?}",
            report.agent_id
        )));
    }
    Ok(report)
}

/// Runs the agent's checks now: makes sure the agent is connected and has the `health`
/// operation, signs and submits the command, waits up to `timeout` and returns the
/// report as [`AgentHealth`] (received now, connected).
pub async fn fresh(
    client: &Client,
    signer: &CommandSigner,
    agent: &AgentId,
    timeout: Duration,
) -> Result<AgentHealth, HealthError> {
    let view = client.agent(agent.as_str()).await?;
    if !view.connected {
        return Err(HealthError::NotConnected(agent.to_string()));
    }
    if !view.operations.iter().any(|o| o == OPERATION) {
        return Err(HealthError::Unsupported {
            agent: agent.to_string(),
            version: view.agent_version.unwrap_or_else(|| "unknown".into()),
        });
    }
    // The command is worth nothing after the wait: it lives as long as that, at least 30 s.
    let ttl = timeout.max(Duration::from_secs(30));
    let command = sign_command(signer, agent, OPERATION, serde_json::json!({}), ttl, None)?;
    let submitted = client.submit(&command).await?;
    let done = client.wait(submitted.id, timeout).await?;
    let report = report_of(&done, timeout)?;
    Ok(AgentHealth::new(report, dbvm_protocol::now_ms(), true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::api::{CommandError, OperationClass};
    use serde_json::json;

    fn view(state: CommandState) -> CommandView {
        CommandView {
            id: uuid::Uuid::nil(),
            agent_id: "db1".into(),
            operation: OPERATION.into(),
            class: OperationClass::Query,
            state,
            submitted_at_ms: 0,
            not_after_ms: 1,
            delivered_at_ms: None,
            finished_at_ms: None,
            progress: None,
            output: None,
            error: None,
        }
    }

    #[test]
    fn the_report_comes_from_a_succeeded_command_only() {
        let mut v = view(CommandState::Succeeded);
        v.output = Some(json!({
            "agent_id": "db1", "at_ms": 1, "interval_ms": 60000, "duration_ms": 3,
            "checks": [{"check": "cpu", "status": "ok", "message": "fine", "figures": {"load": 0.5},
                        "duration_ms": 1, "since_ms": 0}]
        }));
        let r = report_of(&v, Duration::from_secs(1)).unwrap();
        assert_eq!(r.checks[0].figures["load"], 0.5);

        v.output = Some(json!({"pong": true}));
        let e = report_of(&v, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, HealthError::BadOutput { .. }), "{e}");

        let mut v = view(CommandState::Rejected);
        v.error = Some(CommandError {
            code: "unsupported_operation".into(),
            message: "no health here".into(),
        });
        let e = report_of(&v, Duration::from_secs(1)).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("rejected: unsupported_operation: no health here"),
            "{e}"
        );
        let e = report_of(&view(CommandState::Running), Duration::from_secs(30)).unwrap_err();
        assert!(e.to_string().contains("still running after 30 s"), "{e}");
    }
}
