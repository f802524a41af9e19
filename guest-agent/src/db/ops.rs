//! The database capability: the `db.*` operations (thin adapters from signed commands to
//! the [`DbManager`]; arguments are decoded strictly, unknown fields refused, before
//! anything runs) and the reconciler as its background task.

use crate::capability::{Capability, Tasks};
use crate::db::{DatabaseSpec, DbError, DbManager};
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

impl From<DbError> for OpError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Invalid(m) => OpError::BadArguments(m),
            other => OpError::Failed(other.to_string()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Create,
    Preconfigure,
    Configure,
    Start,
    Stop,
    Restart,
    Shutdown,
    Status,
    SetParameters,
    Upgrade,
    ExportTemplate,
}

const ALL: [(Kind, &str); 11] = [
    (Kind::Create, "db.create"),
    (Kind::Preconfigure, "db.preconfigure"),
    (Kind::Configure, "db.configure"),
    (Kind::Start, "db.start"),
    (Kind::Stop, "db.stop"),
    (Kind::Restart, "db.restart"),
    (Kind::Shutdown, "db.shutdown"),
    (Kind::Status, "db.status"),
    (Kind::SetParameters, "db.set_parameters"),
    (Kind::Upgrade, "db.upgrade"),
    (Kind::ExportTemplate, "db.export_template"),
];

/// The database on this VM, as a capability.
#[derive(Debug)]
pub struct Database(pub Arc<DbManager>);

impl Capability for Database {
    fn name(&self) -> &'static str {
        "database"
    }

    fn bundle_parts(&self, request: &crate::bundle::Request) -> Vec<crate::bundle::Part> {
        super::bundle::parts(&self.0, request)
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        ALL.iter()
            .map(|&(kind, name)| {
                Arc::new(DbOp {
                    kind,
                    name,
                    manager: self.0.clone(),
                }) as Arc<dyn Operation>
            })
            .collect()
    }

    fn start(&self, tasks: &Tasks) {
        let manager = self.0.clone();
        let token = tasks.token();
        tasks.spawn(
            "db-reconciler",
            async move { manager.reconcile(token).await },
        );
    }

    fn db_kind(&self) -> Option<String> {
        // The spec's own spelling (`postgres`, `mariadb`, `mysql8`), as `db.create` takes it.
        let f = self.0.flavour()?;
        serde_json::to_value(f).ok()?.as_str().map(str::to_string)
    }
}

struct DbOp {
    kind: Kind,
    name: &'static str,
    manager: Arc<DbManager>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParametersArgs {
    parameters: serde_json::Map<String, Value>,
    #[serde(default)]
    allow_restart: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeArgs {
    image: String,
}

fn no_args(args: Value) -> Result<(), OpError> {
    if args.is_null() {
        return Ok(());
    }
    parse_args::<NoArgs>(args).map(|_| ())
}

#[async_trait]
impl Operation for DbOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn class(&self) -> OperationClass {
        match self.kind {
            Kind::Create | Kind::Preconfigure | Kind::Configure => OperationClass::Deployment,
            Kind::Status | Kind::ExportTemplate => OperationClass::Query,
            Kind::Start
            | Kind::Stop
            | Kind::Restart
            | Kind::Shutdown
            | Kind::SetParameters
            | Kind::Upgrade => OperationClass::Management,
        }
    }

    async fn run(&self, ctx: OpContext, args: Value) -> Result<Value, OpError> {
        let progress_ctx = ctx.clone();
        let progress = move |p: u8, m: &str| progress_ctx.progress(p, m);
        let m = &self.manager;
        let out = match self.kind {
            Kind::Create | Kind::Preconfigure | Kind::Configure => {
                let spec: DatabaseSpec = parse_args(args)?;
                let (pre, conf) = match self.kind {
                    Kind::Create => (true, true),
                    Kind::Preconfigure => (true, false),
                    _ => (false, true),
                };
                m.create(spec, pre, conf, ctx.command.reply_key, None, &progress)
                    .await?
            }
            Kind::Start => {
                no_args(args)?;
                m.start(&progress).await?
            }
            Kind::Stop => {
                no_args(args)?;
                m.stop(&progress).await?
            }
            Kind::Restart => {
                no_args(args)?;
                m.restart(&progress).await?
            }
            Kind::Shutdown => {
                no_args(args)?;
                m.shutdown(&progress).await?
            }
            Kind::Status => {
                no_args(args)?;
                m.status().await?
            }
            Kind::SetParameters => {
                let a: SetParametersArgs = parse_args(args)?;
                m.set_parameters(a.parameters, a.allow_restart, &progress)
                    .await?
            }
            Kind::Upgrade => {
                let a: UpgradeArgs = parse_args(args)?;
                m.upgrade(a.image, &progress).await?
            }
            Kind::ExportTemplate => {
                no_args(args)?;
                m.export_template().await?
            }
        };
        Ok(out)
    }
}
