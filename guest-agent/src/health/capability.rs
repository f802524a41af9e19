//! The health capability: the schedule of the twelve checks and the Prometheus endpoint
//! as its background tasks, and the `health` operation, which runs all twelve now and
//! returns the report (or, with `{"cached": true}`, the report of the last scheduled run
//! without running anything).

use crate::capability::{Capability, Tasks};
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use crate::health::Monitor;
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Args {
    cached: bool,
}

/// The health capability over one [`Monitor`].
#[derive(Debug)]
pub struct Health(pub Arc<Monitor>);

impl Capability for Health {
    fn name(&self) -> &'static str {
        "health"
    }

    fn bundle_parts(&self, _request: &crate::bundle::Request) -> Vec<crate::bundle::Part> {
        super::bundle::parts(&self.0)
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        vec![Arc::new(HealthOp(self.0.clone()))]
    }

    fn start(&self, tasks: &Tasks) {
        // The endpoint first, so the first run's metrics check finds it listening (the
        // schedule's first tick yields before it runs).
        tasks.spawn(
            "metrics-endpoint",
            super::prometheus::serve(self.0.clone(), tasks.token()),
        );
        let monitor = self.0.clone();
        let token = tasks.token();
        tasks.spawn("health-schedule", async move {
            tokio::task::yield_now().await;
            monitor.schedule(token).await
        });
    }
}

struct HealthOp(Arc<Monitor>);

#[async_trait]
impl Operation for HealthOp {
    fn name(&self) -> &'static str {
        "health"
    }

    fn class(&self) -> OperationClass {
        OperationClass::Query
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
