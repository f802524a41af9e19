//! `health`: runs all twelve checks now and returns the report (or, with
//! `{"cached": true}`, the report of the last scheduled run without running anything).

use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use crate::health::Monitor;
use async_trait::async_trait;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Args {
    cached: bool,
}

pub struct Health(pub Arc<Monitor>);

#[async_trait]
impl Operation for Health {
    fn name(&self) -> &'static str {
        "health"
    }

    async fn run(
        &self,
        _ctx: OpContext,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, OpError> {
        let args: Args = parse_args(args)?;
        let report = match (args.cached, self.0.latest()) {
            (true, Some(r)) => r,
            (true, None) => {
                return Err(OpError::Failed(
                    "no health run has finished yet; ask without cached to run one now".into(),
                ))
            }
            (false, _) => self.0.run_once().await,
        };
        serde_json::to_value(&*report)
            .map_err(|e| OpError::Failed(format!("cannot encode the report: {e}")))
    }
}
