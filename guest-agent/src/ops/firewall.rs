//! `firewall.apply` and `firewall.status`, and the firewall as the database manager sees
//! it: the wanted ruleset follows the database's spec ([`FirewallRole::of_database`]: its
//! port, and for MySQL 8 the X protocol and the extras it turns on).

use crate::db::manager::FirewallHook;
use crate::db::{DatabaseSpec, DbManager};
use crate::dispatch::{parse_args, Dispatcher, OpContext, OpError, Operation};
use crate::firewall::{Firewall, FirewallRole};
use async_trait::async_trait;
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

/// Registers `firewall.apply` and `firewall.status`.
pub fn register(d: &mut Dispatcher, firewall: &Arc<Firewall>, db: Option<&Arc<DbManager>>) {
    for apply in [true, false] {
        d.register(FirewallOp {
            apply,
            firewall: firewall.clone(),
            db: db.cloned(),
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
