//! `ping`: proves the whole path works. Optional `delay_ms` (to exercise long commands),
//! `echo`, and a sealed `secret` that comes back sealed to the control plane's reply key
//! (to exercise secrets end to end: the broker sees only ciphertext both ways).

use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use dbvm_protocol::seal::Sealed;
use serde::Deserialize;
use sha2::{Digest, Sha256};

const MAX_DELAY_MS: u64 = 600_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default)]
    delay_ms: u64,
    echo: Option<String>,
    secret: Option<Sealed>,
}

pub struct Ping;

#[async_trait]
impl Operation for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }

    fn class(&self) -> OperationClass {
        OperationClass::Query
    }

    async fn run(
        &self,
        ctx: OpContext,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, OpError> {
        let args: Args = parse_args(args)?;
        if args.delay_ms > MAX_DELAY_MS {
            return Err(OpError::BadArguments(format!(
                "delay_ms must be at most {MAX_DELAY_MS}"
            )));
        }
        let secret_back = match &args.secret {
            None => None,
            Some(sealed) => {
                let reply_key = ctx.command.reply_key.ok_or_else(|| {
                    OpError::BadArguments(
                        "a secret needs a reply_key so the answer can be sealed".into(),
                    )
                })?;
                let secret = ctx
                    .sealing_key
                    .open(sealed)
                    .map_err(|e| OpError::BadArguments(format!("secret: {e}")))?;
                let digest = Sha256::digest(secret.expose().as_bytes());
                let back = Sealed::seal(&reply_key, secret.expose())
                    .map_err(|e| OpError::Failed(format!("cannot seal the reply: {e}")))?;
                Some((back, digest))
            }
        };
        if args.delay_ms > 0 {
            let steps = 4u64;
            for i in 0..steps {
                ctx.progress(
                    (i * 100 / steps) as u8,
                    format!("waiting {} ms", args.delay_ms),
                );
                tokio::time::sleep(std::time::Duration::from_millis(args.delay_ms / steps)).await;
            }
        }
        let mut out = serde_json::json!({
            "pong": true,
            "agent_id": ctx.agent_id,
            "agent_version": dbvm_host::VERSION,
            "at_ms": dbvm_protocol::now_ms(),
        });
        if let Some(echo) = args.echo {
            out["echo"] = serde_json::Value::String(echo);
        }
        if let Some((back, digest)) = secret_back {
            out["secret_sha256"] =
                serde_json::Value::String(digest.iter().map(|b| format!("{b:02x}")).collect());
            out["secret"] = serde_json::Value::String(back.as_str().to_string());
        }
        Ok(out)
    }
}
