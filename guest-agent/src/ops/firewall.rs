//! `firewall.apply` and `firewall.status`, and the firewall as the database manager sees
//! it: the wanted ruleset follows the VM's role (which engine, which MySQL extras).

use crate::capability::Capability;
use crate::db::manager::FirewallHook;
use crate::db::params::Flavour;
use crate::db::{DatabaseSpec, DbManager};
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use crate::firewall::{DbEngine, Firewall, FirewallRole};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The role a database spec gives the VM (no database: management ports only).
pub fn role_of(spec: Option<&DatabaseSpec>) -> FirewallRole {
    match spec {
        None => FirewallRole {
            engine: None,
            mysql_group_replication: false,
            mysql_router: false,
        },
        Some(s) => FirewallRole {
            engine: Some(match s.engine {
                Flavour::Postgres => DbEngine::Postgres,
                Flavour::Mariadb | Flavour::Mysql8 => DbEngine::Mysql,
            }),
            mysql_group_replication: s.mysql.group_replication,
            mysql_router: s.mysql.router,
        },
    }
}

/// [`FirewallHook`] over the agent's [`Firewall`].
#[derive(Debug)]
pub struct AgentFirewall(pub Arc<Firewall>);

#[async_trait]
impl FirewallHook for AgentFirewall {
    async fn apply(&self, spec: &DatabaseSpec) -> Result<Value, String> {
        let report = self
            .0
            .apply(&role_of(Some(spec)))
            .await
            .map_err(|e| format!("firewall: {e}"))?;
        serde_json::to_value(report).map_err(|e| e.to_string())
    }

    async fn status(&self, spec: Option<&DatabaseSpec>) -> Result<Value, String> {
        let st = self
            .0
            .status(&role_of(spec))
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
        let spec = match &self.db {
            Some(db) => db.current_spec().await,
            None => None,
        };
        let role = role_of(spec.as_ref());
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
