//! The backup capability: `backup.configure`, `backup.run`, `backup.list`,
//! `backup.verify` (the restore drill), `db.restore` (a deployment: it builds the
//! database) and `db.recover` (a deployment too: it rebuilds it in place). Arguments are
//! decoded strictly and checked, sealed keys opened, before anything runs.

use super::restore::{PgRestore, Target};
use super::storage::{Location, Storage};
use super::{BackupError, BackupManager, RunKind};
use crate::capability::Capability;
use crate::db::params::Flavour;
use crate::db::DatabaseSpec;
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use dbvm_protocol::seal::Sealed;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

impl From<BackupError> for OpError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Invalid(m) => OpError::BadArguments(m),
            BackupError::Db(d) => d.into(),
            BackupError::Failed(m) => OpError::Failed(m),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Configure,
    Run,
    List,
    Restore,
    Purge,
    Recover,
    Verify,
}

const ALL: [(Kind, &str); 7] = [
    (Kind::Configure, "backup.configure"),
    (Kind::Run, "backup.run"),
    (Kind::List, "backup.list"),
    (Kind::Restore, "db.restore"),
    (Kind::Purge, "backup.purge"),
    (Kind::Recover, "db.recover"),
    (Kind::Verify, "backup.verify"),
];

/// Backups of this VM's database, as a capability.
#[derive(Debug)]
pub struct Backups(pub Arc<BackupManager>);

impl Capability for Backups {
    fn name(&self) -> &'static str {
        "backup"
    }

    fn bundle_parts(&self, request: &crate::bundle::Request) -> Vec<crate::bundle::Part> {
        super::bundle::parts(&self.0, request)
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        ALL.iter()
            .map(|&(kind, name)| {
                Arc::new(BackupOp {
                    kind,
                    name,
                    manager: self.0.clone(),
                }) as Arc<dyn Operation>
            })
            .collect()
    }

    fn checks(&self) -> Vec<Arc<dyn crate::health::Check>> {
        // Check 10: MariaDB's binlog upload (PostgreSQL's stays the health capability's).
        // Check 9: MariaDB's binlog cap and uploads (the same for other engines).
        vec![
            Arc::new(super::binlog_cap::BinlogCheck(self.0.clone())),
            Arc::new(super::mariabackup::CloudSyncCheck(self.0.clone())),
        ]
    }

    fn start(&self, tasks: &crate::capability::Tasks) {
        tasks.spawn("backup-purger", self.0.clone().purge_daily(tasks.token()));
        tasks.spawn(
            "backup-schedule",
            self.0.clone().run_schedule(tasks.token()),
        );
        // MariaDB's binlog uploader (idle on other engines and until backup.configure).
        tasks.spawn(
            "cloud-copy",
            super::cloud::task(self.0.clone(), tasks.token()),
        );
        tasks.spawn(
            "binlog-upload",
            super::mariabackup::binlog_task(self.0.clone(), tasks.token()),
        );
    }
}

struct BackupOp {
    kind: Kind,
    name: &'static str,
    manager: Arc<BackupManager>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigureArgs {
    storage: Location,
    access_key_id: Sealed,
    secret_access_key: Sealed,
    #[serde(default = "default_retention")]
    retention_days: u32,
    /// Hours between scheduled backups; 0: none.
    #[serde(default = "default_schedule")]
    schedule_hours: u32,
    /// The cloud bucket (a copy for disaster recovery, its own retention); none: the
    /// cloud copy stops.
    #[serde(default)]
    cloud: Option<super::cloud::CloudArgs>,
}

fn default_schedule() -> u32 {
    24
}

fn default_retention() -> u32 {
    7
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    #[serde(default, rename = "type")]
    kind: RunKind,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreArgs {
    /// The new database, as `db.create` takes it.
    spec: DatabaseSpec,
    /// The source's bucket; its `prefix` is required (it is the source agent's).
    source: Location,
    access_key_id: Sealed,
    secret_access_key: Sealed,
    /// `latest` or an RFC 3339 time.
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverArgs {
    /// `latest` or an RFC 3339 time.
    target: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VerifyArgs {
    /// A backup's label (`backup.list`); the newest when absent.
    #[serde(default)]
    backup_set: Option<String>,
}

/// A pgBackRest backup label: `20261203-180000F` or `…F_20261203-181000I`.
fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[async_trait]
impl Operation for BackupOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn class(&self) -> OperationClass {
        match self.kind {
            Kind::Configure => OperationClass::Management,
            Kind::Run => OperationClass::Backup,
            Kind::List => OperationClass::Query,
            Kind::Restore | Kind::Recover => OperationClass::Deployment,
            Kind::Purge | Kind::Verify => OperationClass::Backup,
        }
    }

    async fn run(&self, ctx: OpContext, args: Value) -> Result<Value, OpError> {
        let progress_ctx = ctx.clone();
        let progress = move |p: u8, m: &str| progress_ctx.progress(p, m);
        let m = &self.manager;
        match self.kind {
            Kind::Configure => {
                let a: ConfigureArgs = parse_args(args)?;
                let storage = Storage::open(
                    &a.storage,
                    &a.access_key_id,
                    &a.secret_access_key,
                    &ctx.sealing_key,
                    m.agent_id(),
                )
                .map_err(OpError::BadArguments)?;
                if a.schedule_hours > 24 * 31 {
                    return Err(OpError::BadArguments(
                        "schedule_hours: must be 0 (no schedule) to 744 (a month)".into(),
                    ));
                }
                let cloud = a
                    .cloud
                    .as_ref()
                    .map(|c| c.open(&ctx.sealing_key, m.agent_id()))
                    .transpose()
                    .map_err(OpError::BadArguments)?;
                let mut out = m
                    .configure(storage, a.retention_days, cloud, &progress)
                    .await?;
                let s = m.set_schedule(a.schedule_hours)?;
                out["schedule"] = serde_json::json!({
                    "every_hours": s.every_hours,
                    "next_ms": s.due_ms(),
                });
                Ok(out)
            }
            Kind::Run => {
                let a: RunArgs = if args.is_null() {
                    RunArgs::default()
                } else {
                    parse_args(args)?
                };
                Ok(m.run(a.kind, &progress).await?)
            }
            Kind::List => {
                if !args.is_null() && args != Value::Object(Default::default()) {
                    return Err(OpError::BadArguments(
                        "backup.list takes no arguments".into(),
                    ));
                }
                Ok(m.list().await?)
            }
            Kind::Purge => {
                if !args.is_null() && args != Value::Object(Default::default()) {
                    return Err(OpError::BadArguments(
                        "backup.purge takes no arguments".into(),
                    ));
                }
                Ok(m.purge(&progress).await?)
            }
            Kind::Recover => {
                let a: RecoverArgs = parse_args(args)?;
                let target = Target::parse(&a.target).map_err(OpError::BadArguments)?;
                Ok(m.recover(target, &progress).await?)
            }
            Kind::Verify => {
                let a: VerifyArgs = if args.is_null() {
                    VerifyArgs::default()
                } else {
                    parse_args(args)?
                };
                if let Some(l) = &a.backup_set {
                    if !valid_label(l) {
                        return Err(OpError::BadArguments(format!(
                            "backup_set: {l:?} is not a backup label (see backup.list)"
                        )));
                    }
                }
                Ok(m.verify(a.backup_set, &progress).await?)
            }
            Kind::Restore => {
                let a: RestoreArgs = parse_args(args)?;
                let mut problems = Vec::new();
                if !matches!(a.spec.engine, Flavour::Postgres | Flavour::Mariadb) {
                    problems.push(
                        "spec.engine: restores are available for PostgreSQL and MariaDB so far"
                            .into(),
                    );
                }
                if a.source.prefix.is_none() {
                    problems.push(
                        "source.prefix: name the source database's folder in the bucket (its agent id by default)".to_string(),
                    );
                }
                let target = Target::parse(&a.target).map_err(|e| problems.push(e));
                let storage = Storage::open(
                    &a.source,
                    &a.access_key_id,
                    &a.secret_access_key,
                    &ctx.sealing_key,
                    "",
                )
                .map_err(|e| problems.push(e));
                let (Ok(target), Ok(storage), true) = (target, storage, problems.is_empty()) else {
                    return Err(OpError::BadArguments(problems.join("\n")));
                };
                if let Target::Time(ms) = target {
                    if ms > dbvm_protocol::now_ms() {
                        return Err(OpError::BadArguments(format!(
                            "target: {} is in the future",
                            a.target
                        )));
                    }
                }
                if a.spec.engine == Flavour::Mariadb {
                    // The plan comes from the bucket's manifests before anything on this
                    // VM is touched: a target outside the window is refused here.
                    let source = super::maria_restore::prepare(
                        storage,
                        target,
                        Duration::from_secs(m.settings().io_timeout_s),
                        Duration::from_secs(m.settings().timeout_s),
                    )
                    .await
                    .map_err(OpError::BadArguments)?;
                    return Ok(m
                        .db()
                        .create(
                            a.spec,
                            true,
                            true,
                            ctx.command.reply_key,
                            Some(&source),
                            &progress,
                        )
                        .await?);
                }
                let source = PgRestore::new(
                    storage,
                    target,
                    m.settings().tuning(),
                    Duration::from_secs(m.settings().timeout_s),
                );
                Ok(m.db()
                    .create(
                        a.spec,
                        true,
                        true,
                        ctx.command.reply_key,
                        Some(&source),
                        &progress,
                    )
                    .await?)
            }
        }
    }
}
