//! The firewall capability: `firewall.apply` and `firewall.status`, the table applied once
//! when the agent starts (so a changed `[firewall]` section or an agent upgrade takes
//! effect without a command), and the firewall as the database manager sees it. The
//! wanted ruleset follows the database's spec ([`FirewallRole::of_database`]: its port,
//! and for MySQL 8 the X protocol and the extras it turns on).

use crate::capability::{Capability, Tasks};
use crate::db::manager::FirewallHook;
use crate::db::{DatabaseSpec, DbManager};
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use crate::firewall::{Firewall, FirewallRole};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// [`FirewallHook`] over the agent's [`Firewall`].
#[derive(Debug)]
pub struct AgentFirewall(pub Arc<Firewall>);

#[async_trait]
impl FirewallHook for AgentFirewall {
    async fn apply(&self, spec: &DatabaseSpec) -> Result<Value, String> {
        let report = self
            .0
            .apply(&FirewallRole::of_database(Some(spec)))
            .await
            .map_err(|e| format!("firewall: {e}"))?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    }

    async fn status(&self, spec: Option<&DatabaseSpec>) -> Result<Value, String> {
        let st = self
            .0
            .status(&FirewallRole::of_database(spec))
            .await
            .map_err(|e| format!("firewall: {e}"))?;
        serde_json::to_value(st).map_err(|e| e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

struct FirewallOp {
    apply: bool,
    firewall: Arc<Firewall>,
    db: Option<Arc<DbManager>>,
}

/// The firewall capability: `firewall.apply` and `firewall.status` for the VM's role
/// (which follows the database, when there is one).
#[derive(Debug)]
pub struct FirewallCapability {
    pub firewall: Arc<Firewall>,
    pub db: Option<Arc<DbManager>>,
}

impl Capability for FirewallCapability {
    fn name(&self) -> &'static str {
        "firewall"
    }

    fn bundle_parts(&self, _request: &crate::bundle::Request) -> Vec<crate::bundle::Part> {
        super::bundle::parts(&self.firewall, self.db.as_ref())
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        [true, false]
            .into_iter()
            .map(|apply| {
                Arc::new(FirewallOp {
                    apply,
                    firewall: self.firewall.clone(),
                    db: self.db.clone(),
                }) as Arc<dyn Operation>
            })
            .collect()
    }

    fn start(&self, tasks: &Tasks) {
        let firewall = self.firewall.clone();
        let db = self.db.clone();
        let token = tasks.token();
        tasks.spawn("firewall-at-start", async move {
            let spec = match &db {
                Some(db) => db.current_spec().await,
                None => None,
            };
            let role = FirewallRole::of_database(spec.as_ref());
            tokio::select! {
                _ = token.cancelled() => {}
                r = firewall.apply(&role) => match r {
                    Ok(report) => tracing::info!(outcome = ?report.outcome, "firewall applied at start"),
                    Err(e) => tracing::warn!(error = %e, "cannot apply the firewall at start; firewall.apply retries it"),
                },
            }
        });
    }
}

#[async_trait]
impl Operation for FirewallOp {
    fn name(&self) -> &'static str {
        if self.apply {
            "firewall.apply"
        } else {
            "firewall.status"
        }
    }

    fn class(&self) -> OperationClass {
        if self.apply {
            OperationClass::Management
        } else {
            OperationClass::Query
        }
    }

    async fn run(&self, _ctx: OpContext, args: Value) -> Result<Value, OpError> {
        if !args.is_null() {
            parse_args::<NoArgs>(args)?;
        }
        // The spec as stored now, every time: the role is never cached.
        let spec = match &self.db {
            Some(db) => db.current_spec().await,
            None => None,
        };
        let role = FirewallRole::of_database(spec.as_ref());
        if self.apply {
            let r = self
                .firewall
                .apply(&role)
                .await
                .map_err(|e| OpError::Failed(format!("firewall: {e}")))?;
            Ok(json!(r))
        } else {
            let s = self
                .firewall
                .status(&role)
                .await
                .map_err(|e| OpError::Failed(format!("firewall: {e}")))?;
            Ok(json!(s))
        }
    }
}
