//! Building and signing a command for one agent.

use dbvm_protocol::command::{
    CommandBody, CommandSigner, SignedCommand, BODY_FORMAT, MAX_COMMAND_LIFETIME_MS,
};
use dbvm_protocol::AgentId;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("command arguments must be a JSON object, not {0}")]
    ArgsNotObject(&'static str),
    #[error("command lifetime must be at least 1 second")]
    TtlTooShort,
    #[error("command lifetime of {0} s exceeds the maximum of {max} s", max = MAX_COMMAND_LIFETIME_MS / 1000)]
    TtlTooLong(u64),
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Signs `operation` with `args` for `agent`, valid from now for `ttl`. Secrets in the
/// result are sealed to `reply_key` when one is given.
pub fn sign_command(
    signer: &CommandSigner,
    agent: &AgentId,
    operation: &str,
    args: serde_json::Value,
    ttl: Duration,
    reply_key: Option<[u8; 32]>,
) -> Result<SignedCommand, SignError> {
    if !args.is_object() {
        return Err(SignError::ArgsNotObject(kind(&args)));
    }
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    if ttl_ms > MAX_COMMAND_LIFETIME_MS {
        return Err(SignError::TtlTooLong(ttl.as_secs()));
    }
    if ttl_ms < 1000 {
        return Err(SignError::TtlTooShort);
    }
    let now = dbvm_protocol::now_ms();
    let body = CommandBody {
        format: BODY_FORMAT,
        id: Uuid::new_v4(),
        agent_id: agent.to_string(),
        issued_at_ms: now,
        not_after_ms: now.saturating_add(ttl_ms),
        operation: operation.to_string(),
        args_json: args.to_string(),
        reply_key,
    };
    Ok(signer.sign(&body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::Verifier;
    use serde_json::json;

    #[test]
    fn signed_commands_verify_on_the_agent() {
        let signer = CommandSigner::generate();
        let agent = AgentId::new("db1").unwrap();
        let cmd = sign_command(
            &signer,
            &agent,
            "ping",
            json!({"n": 1}),
            Duration::from_secs(300),
            Some([7; 32]),
        )
        .unwrap();
        let verifier = Verifier::new("db1").trust(signer.key_id(), signer.verifying_key());
        let verified = verifier.verify(&cmd, dbvm_protocol::now_ms()).unwrap();
        let body = verified.body;
        assert_eq!(body.format, BODY_FORMAT);
        assert_eq!(body.operation, "ping");
        assert_eq!(body.agent_id, "db1");
        assert_eq!(body.not_after_ms - body.issued_at_ms, 300_000);
        assert_eq!(body.reply_key, Some([7; 32]));
        let args: serde_json::Value = serde_json::from_str(&body.args_json).unwrap();
        assert_eq!(args, json!({"n": 1}));
        // it survives the trip through the API's base64
        let back = SignedCommand::from_base64(&cmd.to_base64()).unwrap();
        assert_eq!(back, cmd);
        // another agent refuses it
        let other = Verifier::new("db2").trust(signer.key_id(), signer.verifying_key());
        assert!(other.verify(&cmd, dbvm_protocol::now_ms()).is_err());
        // ids are fresh
        let again = sign_command(
            &signer,
            &agent,
            "ping",
            json!({}),
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        assert_ne!(again.peek_body().unwrap().id, body.id);
    }

    #[test]
    fn bad_args_and_lifetimes_are_refused() {
        let signer = CommandSigner::generate();
        let agent = AgentId::new("db1").unwrap();
        let sign = |args, ttl| sign_command(&signer, &agent, "ping", args, ttl, None).map(|_| ());
        assert_eq!(
            sign(json!([1]), Duration::from_secs(60)),
            Err(SignError::ArgsNotObject("an array"))
        );
        assert_eq!(
            sign(json!("x"), Duration::from_secs(60)),
            Err(SignError::ArgsNotObject("a string"))
        );
        assert_eq!(sign(json!({}), Duration::ZERO), Err(SignError::TtlTooShort));
        let week = Duration::from_millis(u64::try_from(MAX_COMMAND_LIFETIME_MS).unwrap());
        assert!(sign(json!({}), week).is_ok());
        assert_eq!(
            sign(json!({}), week + Duration::from_secs(1)),
            Err(SignError::TtlTooLong(7 * 24 * 3600 + 1))
        );
    }
}
