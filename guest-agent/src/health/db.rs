//! The database as the health checks see it in one run: the agent's state, the
//! container, and what the server says about itself (connections, WAL / binary logs,
//! archiving, replication). Read once per run over one cached admin connection on the
//! server's unix socket, and shared by the database checks.

use super::Shared;
use crate::db::engine::{Admin, ServerInfo};
use crate::db::params::Flavour;
use crate::db::{DbState, Phase};
use crate::runtime::{ContainerStatus, State};

/// PostgreSQL's WAL and archiver, as `pg_ls_waldir()` and `pg_stat_archiver` report them.
#[derive(Clone, Debug, Default)]
pub struct PgLog {
    pub wal_bytes: f64,
    pub wal_files: f64,
    pub archive_mode: String,
    pub archive_command: String,
    pub archived_count: f64,
    pub failed_count: f64,
    pub last_archived_age_s: Option<f64>,
    pub last_failed_age_s: Option<f64>,
    pub last_archived_wal: Option<String>,
    pub last_failed_wal: Option<String>,
    /// Segments waiting to be archived (`.ready` files).
    pub ready: f64,
}

impl PgLog {
    /// Whether archiving is configured at all (archive_mode on and a command set).
    pub fn archiving(&self) -> bool {
        self.archive_mode != "off" && !self.command_missing()
    }

    /// No archive command: empty, or `(disabled)`, which is how PostgreSQL shows it
    /// while archive_mode is off.
    pub fn command_missing(&self) -> bool {
        let c = self.archive_command.trim();
        c.is_empty() || c == "(disabled)"
    }

    /// Whether the archiver's latest attempt failed.
    pub fn failing(&self) -> bool {
        match (self.last_failed_age_s, self.last_archived_age_s) {
            (Some(failed), Some(archived)) => failed < archived,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// MySQL / MariaDB binary logs (`SHOW BINARY LOGS`).
#[derive(Clone, Debug, Default)]
pub struct MyLog {
    pub log_bin: bool,
    pub files: f64,
    pub bytes: f64,
}

#[derive(Clone, Debug)]
pub enum LogFacts {
    Postgres(PgLog),
    Mysql(MyLog),
}

/// What the server said in this run.
#[derive(Clone, Debug)]
pub struct ServerFacts {
    pub info: ServerInfo,
    /// Connections kept for superusers (PostgreSQL's `superuser_reserved_connections`).
    pub reserved_connections: i64,
    pub log: LogFacts,
    /// Seconds behind the primary, on a replica (when the server knows).
    pub replication_lag_s: Option<f64>,
}

/// Why a database check has nothing to look at, as a sentence.
#[derive(Clone, Debug)]
pub enum Absent {
    NotManaged,
    NotCreated,
    Busy,
    NotConfigured(Phase),
}

impl Absent {
    pub fn message(&self) -> String {
        match self {
            Absent::NotManaged => {
                "this agent manages no database (no [database] section in its config)".into()
            }
            Absent::NotCreated => "no database has been created on this VM yet".into(),
            Absent::Busy => {
                "a database operation (create, upgrade, …) is in progress; checked again next run"
                    .into()
            }
            Absent::NotConfigured(p) => format!(
                "the database is being created (phase {p:?}); checked again once it is configured"
            ),
        }
    }
}

#[derive(Debug)]
pub struct DbSnapshot {
    /// `Err`: there is no database to look at, and why.
    pub state: Result<DbState, Absent>,
    pub container: Result<Option<ContainerStatus>, String>,
    /// `None`: the server was not asked (container not running); `Some(Err)`: it was
    /// asked and did not answer.
    pub server: Option<Result<ServerFacts, String>>,
}

impl DbSnapshot {
    /// What the server said, or the `unknown` finding a check that needs the server
    /// reports without it.
    pub fn facts(&self) -> Result<&ServerFacts, super::Finding> {
        if let Err(a) = &self.state {
            return Err(super::Finding::unknown(a.message()));
        }
        match &self.server {
            None => Err(super::Finding::unknown(
                "the database is not running; see db_service",
            )),
            Some(Err(e)) => Err(super::Finding::unknown(format!(
                "the database did not answer: {e}"
            ))),
            Some(Ok(f)) => Ok(f),
        }
    }

    pub fn running(&self) -> bool {
        matches!(&self.container, Ok(Some(c)) if c.state == State::Running)
    }

    pub async fn take(shared: &Shared) -> Self {
        let Some(manager) = &shared.db else {
            return Self {
                state: Err(Absent::NotManaged),
                container: Ok(None),
                server: None,
            };
        };
        // Half the check timeout: long enough to wait out the reconciler's brief hold,
        // short enough to answer `busy` (not a cut-off) during a long operation.
        let wait = std::time::Duration::from_millis(shared.settings.check_timeout_ms / 2);
        let view = manager.health_view(wait).await;
        let state = match view.state {
            Err(()) => Err(Absent::Busy),
            Ok(None) => Err(Absent::NotCreated),
            Ok(Some(st)) if st.phase != Phase::Configured => Err(Absent::NotConfigured(st.phase)),
            Ok(Some(st)) => Ok(st),
        };
        let mut snap = Self {
            state,
            container: view.container,
            server: None,
        };
        if let (Ok(st), true) = (&snap.state, snap.running()) {
            snap.server = Some(query(shared, st).await);
        }
        snap
    }
}

/// Asks the server, reusing the cached admin connection; a broken cached connection
/// (the server restarted) is replaced once before giving up.
async fn query(shared: &Shared, st: &DbState) -> Result<ServerFacts, String> {
    let paths = match &shared.db {
        Some(m) => m.paths().clone(),
        None => return Err("no database".into()),
    };
    let mut slot = shared.admin.lock().await;
    let cached = slot.take();
    let had_cached = cached.is_some();
    let mut admin = match cached {
        Some(a) => a,
        None => Admin::connect(&st.spec, &paths)
            .await
            .map_err(|e| e.to_string())?,
    };
    let mut result = facts(&mut admin, st.spec.engine).await;
    if result.is_err() && had_cached {
        admin = Admin::connect(&st.spec, &paths)
            .await
            .map_err(|e| e.to_string())?;
        result = facts(&mut admin, st.spec.engine).await;
    }
    if result.is_ok() {
        *slot = Some(admin);
    }
    result
}

fn age(v: Option<f64>) -> Option<f64> {
    v.map(|s| s.max(0.0))
}

async fn facts(admin: &mut Admin, flavour: Flavour) -> Result<ServerFacts, String> {
    let info = admin.info().await.map_err(|e| e.to_string())?;
    match admin {
        Admin::Postgres(c, _) => {
            let row = c
                .query_one(
                    "SELECT current_setting('superuser_reserved_connections')::bigint,
                            (SELECT coalesce(sum(size), 0)::float8 FROM pg_ls_waldir()),
                            (SELECT count(*)::float8 FROM pg_ls_waldir()),
                            current_setting('archive_mode'),
                            current_setting('archive_command'),
                            a.archived_count::float8,
                            a.failed_count::float8,
                            extract(epoch from now() - a.last_archived_time)::float8,
                            extract(epoch from now() - a.last_failed_time)::float8,
                            a.last_archived_wal,
                            a.last_failed_wal,
                            (SELECT count(*)::float8 FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'),
                            CASE WHEN pg_is_in_recovery()
                                 THEN extract(epoch from now() - pg_last_xact_replay_timestamp())::float8
                            END
                     FROM pg_stat_archiver a",
                    &[],
                )
                .await
                .map_err(|e| format!("reading WAL and archiver status: {e}"))?;
            Ok(ServerFacts {
                info,
                reserved_connections: row.get(0),
                log: LogFacts::Postgres(PgLog {
                    wal_bytes: row.get(1),
                    wal_files: row.get(2),
                    archive_mode: row.get(3),
                    archive_command: row.get(4),
                    archived_count: row.get(5),
                    failed_count: row.get(6),
                    last_archived_age_s: age(row.get(7)),
                    last_failed_age_s: age(row.get(8)),
                    last_archived_wal: row.get(9),
                    last_failed_wal: row.get(10),
                    ready: row.get(11),
                }),
                replication_lag_s: age(row.get(12)),
            })
        }
        Admin::Mysql(c) => {
            use mysql_async::prelude::Queryable;
            let log_bin: Option<i64> = c
                .query_first("SELECT @@global.log_bin")
                .await
                .map_err(|e| format!("reading log_bin: {e}"))?;
            let mut log = MyLog {
                log_bin: log_bin == Some(1),
                ..MyLog::default()
            };
            if log.log_bin {
                let rows: Vec<mysql_async::Row> = c
                    .query("SHOW BINARY LOGS")
                    .await
                    .map_err(|e| format!("SHOW BINARY LOGS: {e}"))?;
                for row in rows {
                    log.files += 1.0;
                    log.bytes += row.get::<Option<u64>, usize>(1).flatten().unwrap_or(0) as f64;
                }
            }
            let mut lag = None;
            if info.role == "replica" {
                let rows: Vec<mysql_async::Row> = c
                    .query(if flavour == Flavour::Mysql8 {
                        "SHOW REPLICA STATUS"
                    } else {
                        "SHOW SLAVE STATUS"
                    })
                    .await
                    .map_err(|e| format!("reading replication status: {e}"))?;
                lag = rows.first().and_then(|r| {
                    r.get_opt::<Option<i64>, &str>("Seconds_Behind_Master")
                        .or_else(|| r.get_opt::<Option<i64>, &str>("Seconds_Behind_Source"))
                        .and_then(|v| v.ok())
                        .flatten()
                        .map(|v| v as f64)
                });
            }
            Ok(ServerFacts {
                info,
                reserved_connections: 0,
                log: LogFacts::Mysql(log),
                replication_lag_s: lag,
            })
        }
    }
}
