//! Sending a command end to end, as `dbvmctl send` does, for any control plane: seal the
//! secret arguments to the agent's key, sign, submit, wait for the result, and open the
//! values sealed to this control plane in it (or hide them).
//!
//! ```no_run
//! # async fn demo(client: &dbvmctl::Client, home: &dbvmctl::Home) -> Result<(), Box<dyn std::error::Error>> {
//! use dbvmctl::send::{self, Request};
//! let request = Request::new(dbvm_protocol::AgentId::new("db1")?, "ping");
//! let signer = home.signer()?;
//! let sender = send::Sender::new(client, &signer, home.sealing_public_key()?);
//! let done = sender.send_and_wait(request, std::time::Duration::from_secs(60)).await?;
//! let shown = send::readable(&done, Some(&home.sealing_key()?));
//! println!("{}: {}", done.state.as_str(), shown.value);
//! # Ok(()) }
//! ```

use crate::args::{seal_secrets, ArgsError};
use crate::client::{Client, ClientError, MAX_POLL};
use crate::reveal::{redact, reveal, RevealError};
use crate::sign::{sign_command, SignError};
use dbvm_protocol::api::CommandView;
use dbvm_protocol::command::CommandSigner;
use dbvm_protocol::seal::{self, SealingKey, Secret};
use dbvm_protocol::AgentId;
use serde_json::{Map, Value};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The agent cannot receive sealed secrets yet: what the broker knows of it.
    #[error("agent {agent} has no usable sealing key ({reason}), so secrets cannot be sealed to it: start its agent, check `dbvmctl agents`, then send again")]
    AgentNotReady { agent: AgentId, reason: String },
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl SendError {
    /// Whether the fault is on this side (arguments, keys, settings) rather than the
    /// broker's or the agent's.
    pub fn is_local(&self) -> bool {
        match self {
            Self::AgentNotReady { .. } => false,
            Self::Args(_) | Self::Sign(_) => true,
            Self::Client(c) => c.is_local(),
        }
    }
}

/// One command to send.
#[derive(Debug)]
pub struct Request {
    pub agent: AgentId,
    pub operation: String,
    /// The plain arguments (a JSON object).
    pub args: Map<String, Value>,
    /// Arguments sealed to the agent's key before they leave this process.
    pub secrets: Vec<(String, Secret)>,
    /// How long the command stays valid.
    pub ttl: Duration,
}

impl Request {
    /// `operation` for `agent` with no arguments, valid for 5 minutes.
    pub fn new(agent: AgentId, operation: &str) -> Self {
        Self {
            agent,
            operation: operation.to_string(),
            args: Map::new(),
            secrets: Vec::new(),
            ttl: Duration::from_secs(300),
        }
    }
}

/// A control plane's identity for sending: the broker client, the signing key, and the
/// public key results are sealed to.
pub struct Sender<'a> {
    client: &'a Client,
    signer: &'a CommandSigner,
    reply_key: [u8; 32],
}

impl std::fmt::Debug for Sender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("broker", &self.client.base_url().as_str())
            .field("key_id", &self.signer.key_id())
            .finish_non_exhaustive()
    }
}

impl<'a> Sender<'a> {
    pub fn new(client: &'a Client, signer: &'a CommandSigner, reply_key: [u8; 32]) -> Self {
        Self {
            client,
            signer,
            reply_key,
        }
    }

    /// Seals the secrets to the agent's key (as the broker reports it), signs and
    /// submits; returns the command as the broker accepted it.
    pub async fn submit(&self, request: Request) -> Result<CommandView, SendError> {
        let Request {
            agent,
            operation,
            mut args,
            secrets,
            ttl,
        } = request;
        if !secrets.is_empty() {
            let key = self.sealing_key_of(&agent).await?;
            seal_secrets(&mut args, &secrets, &key)?;
        }
        let command = sign_command(
            self.signer,
            &agent,
            &operation,
            Value::Object(args),
            ttl,
            Some(self.reply_key),
        )?;
        Ok(self.client.submit(&command).await?)
    }

    /// [`Sender::submit`], then waits up to `timeout` for the command to finish; returns
    /// its last state (finished, or still under way when the time ran out).
    pub async fn send_and_wait(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<CommandView, SendError> {
        let view = self.submit(request).await?;
        Ok(wait(self.client, view, timeout, MAX_POLL, |_| {}).await?)
    }

    /// The agent's public sealing key, as the broker reports it.
    async fn sealing_key_of(&self, agent: &AgentId) -> Result<[u8; 32], SendError> {
        let not_ready = |reason: String| SendError::AgentNotReady {
            agent: agent.clone(),
            reason,
        };
        let view = match self.client.agent(agent.as_str()).await {
            Ok(view) => view,
            Err(ClientError::Http(status, e)) if status == reqwest::StatusCode::NOT_FOUND => {
                return Err(not_ready(format!(
                    "the broker does not know it: {}",
                    e.error
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let key = view
            .sealing_key
            .ok_or_else(|| not_ready("it has never connected to the broker".into()))?;
        seal::parse_public_key(&key)
            .map_err(|e| not_ready(format!("the broker reports a bad key: {e}")))
    }
}

/// Waits up to `timeout` for a submitted command to finish, polling at most `poll` at a
/// time and calling `progress` with each state seen; returns at once when `view` is
/// finished already.
pub async fn wait(
    client: &Client,
    view: CommandView,
    timeout: Duration,
    poll: Duration,
    progress: impl FnMut(&CommandView),
) -> Result<CommandView, ClientError> {
    if view.state.is_terminal() {
        return Ok(view);
    }
    client
        .wait_with_progress(view.id, timeout, poll, progress)
        .await
}

/// A command as JSON for people: the values sealed to this control plane opened with
/// `key`, or hidden (`***`) without one.
#[derive(Debug)]
pub struct Readable {
    pub value: Value,
    /// Why a sealed value did not open (it stays hidden then).
    pub revealed: Result<(), RevealError>,
}

pub fn readable(view: &CommandView, key: Option<&SealingKey>) -> Readable {
    // A CommandView always encodes: plain strings, numbers and JSON values.
    let mut value = serde_json::to_value(view).unwrap_or(Value::Null);
    let revealed = match key {
        Some(key) => reveal(&mut value, key).map(|_| ()),
        None => {
            redact(&mut value);
            Ok(())
        }
    };
    if revealed.is_err() {
        // A value that did not open was left sealed: hide those that are still sealed.
        redact(&mut value);
    }
    Readable { value, revealed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::api::{CommandState, OperationClass};
    use dbvm_protocol::seal::Sealed;

    fn view(output: Value) -> CommandView {
        CommandView {
            id: uuid::Uuid::nil(),
            agent_id: "db1".into(),
            operation: "db.create".into(),
            class: OperationClass::Deployment,
            state: CommandState::Succeeded,
            submitted_at_ms: 0,
            not_after_ms: 1,
            delivered_at_ms: None,
            finished_at_ms: None,
            progress: None,
            output: Some(output),
            error: None,
        }
    }

    #[test]
    fn sealed_values_open_with_the_key_and_are_hidden_without_it() {
        let key = SealingKey::generate();
        let sealed: String = Sealed::seal(&key.public_key(), "s3cret").unwrap().into();
        let v = view(serde_json::json!({ "password": sealed, "port": 5432 }));

        let shown = readable(&v, Some(&key));
        assert!(shown.revealed.is_ok());
        assert_eq!(shown.value["output"]["password"], "s3cret");
        assert_eq!(shown.value["output"]["port"], 5432);

        let hidden = readable(&v, None);
        assert!(hidden.revealed.is_ok());
        assert!(!hidden.value.to_string().contains("s3cret"));
        assert!(!hidden.value.to_string().contains("sealed:v1:"));

        // Another key: the value stays hidden, and why is said.
        let other = SealingKey::generate();
        let wrong = readable(&v, Some(&other));
        assert!(wrong.revealed.is_err());
        assert!(!wrong.value.to_string().contains("sealed:v1:"));
    }

    #[test]
    fn local_faults_are_told_from_the_broker_s() {
        let not_ready = SendError::AgentNotReady {
            agent: AgentId::new("db1").unwrap(),
            reason: "never connected".into(),
        };
        assert!(!not_ready.is_local());
        assert!(SendError::Sign(SignError::TtlTooShort).is_local());
        assert!(SendError::Args(ArgsError::Duplicate("a".into())).is_local());
    }
}
