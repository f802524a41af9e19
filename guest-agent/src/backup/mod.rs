//! Backups: the database's data and its transaction logs to S3 over TLS, and new
//! databases restored from them. One capability beside `db/`, `firewall/` and `health/`
//! (see [`capability`]); it reaches the database only through [`DbManager`]'s hooks
//! ([`DbManager::run_tool`], [`DbManager::set_archive_command`], the restore
//! [`crate::db::manager::DataSource`]).
//!
//! PostgreSQL is backed up with pgBackRest ([`pgbackrest`]): the agent writes its config
//! (the only place the S3 keys are stored, 0600, the database user's), creates the stanza,
//! turns WAL archiving on (`archive_command` inside the database's container, applied
//! with the restart `archive_mode` needs) and runs `check`; then each `backup.run` is the
//! first of a chain (full) or the next in it (incremental); a new chain starts when the
//! current one is older than the retention (chain expiry = creation + retention days, as
//! DSM has it). `db.restore` builds a new database from a bucket and prefix up to a point
//! in time ([`restore`]). `db.recover` recovers the database in place from its own
//! repository ([`recover`]); `backup.verify` is the restore drill ([`verify`]).
//!
//! MariaDB is backed up by the agent itself ([`mariabackup`]): `mariadb-backup --stream |
//! zstd` in a one-shot container into a FIFO, multipart-uploaded with the agent's own S3
//! client ([`s3`]); binlogs uploaded as they rotate; a manifest per chain in the bucket
//! ([`manifest`]); `db.restore` of MariaDB checks every object against it
//! ([`maria_restore`]); `db.recover` recovers it in place from its own bucket
//! ([`maria_recover`]) and `backup.verify` is its restore drill ([`maria_verify`]).
//!
//! Chains are purged by [`purge`] (daily, and `backup.purge`); [`schedule`] runs backups
//! and drills by itself; [`cloud`] keeps the cloud bucket (the disaster-recovery copy).
//! Not built yet (issue 12 continues): MySQL 8 (XtraBackup).

pub mod binlog_cap;
pub mod bundle;
pub mod capability;
pub mod cloud;
pub mod manifest;
pub mod maria_recover;
pub mod maria_restore;
pub mod maria_verify;
pub mod mariabackup;
pub mod pgbackrest;
pub mod purge;
pub mod recover;
pub mod restore;
/// The S3 client lives in its own crate (the broker copies log bundles with it too).
pub use dbvm_s3 as s3;
pub mod schedule;
pub mod storage;
pub mod verify;

use crate::db::params::Flavour;
use crate::db::{DbError, DbManager, DbState};
use pgbackrest::{BackupSet, Info, Tuning};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::Storage;
use tokio::sync::Mutex;

/// The agent's `[backup]` section (all optional).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSettings {
    /// Seconds a storage call may stall before it fails.
    pub io_timeout_s: u64,
    /// Parallel processes of one backup or restore.
    pub process_max: u32,
    /// How long one backup or restore may take in all.
    pub timeout_s: u64,
    /// When the purger runs every day, `HH:MM` UTC.
    pub purge_at: String,
    /// MariaDB: seconds between binlog rotations (`FLUSH BINARY LOGS`) and upload rounds.
    pub binlog_rotate_s: u64,
    /// Days between the restore drills the agent runs by itself (`backup.verify`);
    /// 0: only on demand.
    pub verify_every_days: u32,
    /// Seconds between the copier's rounds to the cloud bucket (when one is configured).
    pub cloud_copy_s: u64,
}

impl Default for BackupSettings {
    fn default() -> Self {
        Self {
            io_timeout_s: 60,
            process_max: 2,
            timeout_s: 6 * 3600,
            purge_at: "12:00".into(),
            binlog_rotate_s: 60,
            verify_every_days: 7,
            cloud_copy_s: 60,
        }
    }
}

impl BackupSettings {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, p: &str| Err((format!("backup.{k}"), p.to_string()));
        if !(1..=3600).contains(&self.io_timeout_s) {
            return bad("io_timeout_s", "must be 1..3600");
        }
        if !(1..=64).contains(&self.process_max) {
            return bad("process_max", "must be 1..64");
        }
        if !(60..=7 * 86400).contains(&self.timeout_s) {
            return bad("timeout_s", "must be 60..604800");
        }
        if let Err(e) = purge::parse_at(&self.purge_at) {
            return bad("purge_at", &e);
        }
        if !(1..=3600).contains(&self.binlog_rotate_s) {
            return bad("binlog_rotate_s", "must be 1..3600");
        }
        if self.verify_every_days > 365 {
            return bad("verify_every_days", "must be 0..365");
        }
        if !(1..=86400).contains(&self.cloud_copy_s) {
            return bad("cloud_copy_s", "must be 1..86400");
        }
        Ok(())
    }

    fn tuning(&self) -> Tuning {
        Tuning {
            io_timeout_s: self.io_timeout_s,
            process_max: self.process_max,
        }
    }
}

/// What the agent remembers of its backups (`state_dir/backup/state.json`; no secrets).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BackupState {
    /// Endpoint, bucket, region, prefix.
    pub location: Value,
    pub retention_days: u32,
    pub configured_at_ms: i64,
    /// The last restore drill's result (`backup.verify`), for health to report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<Value>,
    /// The cloud bucket, when one is configured ([`cloud`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<cloud::CloudState>,
}

/// Why a backup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Refused before anything changed.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

pub type Progress<'a> = crate::db::manager::ProgressFn<'a>;

/// Backups of this VM's database.
pub struct BackupManager {
    db: Arc<DbManager>,
    settings: BackupSettings,
    agent_id: String,
    state_path: PathBuf,
    /// One backup operation at a time (pgBackRest holds its own lock too).
    busy: Mutex<()>,
    /// One listing (`pgbackrest info`) at a time; it does not wait for `busy`.
    listing: Mutex<()>,
    /// Where background work (the purger) reports events.
    outbox: std::sync::OnceLock<crate::capability::Outbox>,
    /// MariaDB's binlog uploader and manifest lock.
    pub maria: mariabackup::MariaState,
    /// The copier to the cloud bucket.
    pub cloud: cloud::CloudRuntime,
}

impl std::fmt::Debug for BackupManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupManager")
            .field("state", &self.state_path)
            .finish()
    }
}

impl BackupManager {
    pub fn new(
        db: Arc<DbManager>,
        settings: BackupSettings,
        agent_id: &str,
        state_dir: &Path,
    ) -> Arc<Self> {
        verify::remove_leftover(&db.paths().root);
        Arc::new(Self {
            db,
            settings,
            agent_id: agent_id.to_string(),
            state_path: state_dir.join("backup").join("state.json"),
            busy: Mutex::new(()),
            listing: Mutex::new(()),
            outbox: std::sync::OnceLock::new(),
            maria: Default::default(),
            cloud: Default::default(),
        })
    }

    /// Gives background work its outbox (once, when the capability is made).
    pub fn set_outbox(&self, outbox: crate::capability::Outbox) {
        let _ = self.outbox.set(outbox);
    }

    pub fn db(&self) -> &Arc<DbManager> {
        &self.db
    }

    pub fn settings(&self) -> &BackupSettings {
        &self.settings
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    fn load(&self) -> Result<Option<BackupState>, BackupError> {
        match std::fs::read(&self.state_path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                BackupError::Failed(format!(
                    "the backup state file {} is damaged: {e}",
                    self.state_path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BackupError::Failed(format!(
                "cannot read {}: {e}",
                self.state_path.display()
            ))),
        }
    }

    fn save(&self, st: &BackupState) -> Result<(), BackupError> {
        let dir = self.state_path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| BackupError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        let bytes = serde_json::to_vec_pretty(st)
            .map_err(|e| BackupError::Failed(format!("cannot encode the backup state: {e}")))?;
        dbvm_host::fs::write_atomic(&self.state_path, &bytes, 0o600).map_err(|e| {
            BackupError::Failed(format!("cannot write {}: {e}", self.state_path.display()))
        })
    }

    /// The database's state when it is PostgreSQL; `op` names what was asked, for the
    /// refusal (MariaDB's operations dispatch before it; MySQL 8 has none yet).
    async fn postgres(&self, op: &str) -> Result<DbState, BackupError> {
        let st = self.db.configured_state().await?;
        match st.spec.engine {
            Flavour::Postgres => Ok(st),
            other => Err(BackupError::Invalid(format!(
                "{op} is not available for {} databases in this agent yet",
                format!("{other:?}").to_lowercase()
            ))),
        }
    }

    /// Runs pgBackRest once in a one-shot container; a non-zero exit is explained.
    async fn pgbackrest(
        &self,
        st: &DbState,
        config: &Path,
        args: &[String],
        command: &str,
        timeout: Duration,
    ) -> Result<crate::runtime::RunOutput, BackupError> {
        let config = config.to_path_buf();
        // A listing may run beside a backup (backup.list does not wait for one): its
        // one-shot container has a name of its own, so neither replaces the other's,
        // and listings take turns.
        let (role, _turn) = if command == "info" {
            ("info", Some(self.listing.lock().await))
        } else {
            ("backup", None)
        };
        let out = self
            .db
            .run_tool(
                st,
                role,
                |program| pgbackrest::argv(program, &config, args, command),
                timeout,
            )
            .await?;
        if out.exit_code != 0 {
            return Err(BackupError::Failed(format!(
                "pgbackrest {command}: {}",
                pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr)
            )));
        }
        Ok(out)
    }

    fn write_owned(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<(), BackupError> {
        let s = self.db.settings();
        Ok(crate::db::engine::write_owned(
            path, bytes, mode, s.uid, s.gid,
        )?)
    }

    /// `backup.configure`: checks the bucket with the new keys before anything of the
    /// running setup changes, then switches pgBackRest's config, turns WAL archiving on
    /// and proves it with `pgbackrest check`.
    pub async fn configure(
        &self,
        storage: Storage,
        retention_days: u32,
        cloud: Option<cloud::Cloud>,
        progress: Progress<'_>,
    ) -> Result<Value, BackupError> {
        if self.db.flavour() == Some(Flavour::Mariadb) {
            return mariabackup::configure(self, storage, retention_days, cloud, progress).await;
        }
        if !(1..=3650).contains(&retention_days) {
            return Err(BackupError::Invalid(
                "retention_days: must be 1..3650".into(),
            ));
        }
        let st = self.postgres("backup.configure").await?;
        let _busy = self.busy.lock().await;
        let t = Instant::now();
        let p = self.db.paths().clone();
        pgbackrest::prepare_dirs(&p, self.db.settings().uid, self.db.settings().gid)
            .map_err(BackupError::Failed)?;
        // The candidate (config and CA, beside the live ones) is tried first: a wrong key,
        // bucket or CA leaves the working setup as it was.
        let live = pgbackrest::config_path(&p);
        let live_ca = pgbackrest::ca_path(&p, "backup");
        let candidate = p.conf.join("pgbackrest.conf.new");
        let candidate_ca = p.conf.join("backup-ca.pem.new");
        let render = |ca: Option<&Path>| {
            pgbackrest::config(&storage, ca, &p, st.spec.port(), self.settings.tuning())
        };
        let cloud_live = cloud::pg_config_path(&p);
        let cloud_live_ca = pgbackrest::ca_path(&p, "cloud");
        let cloud_candidate = p.conf.join("pgbackrest-cloud.conf.new");
        let cloud_candidate_ca = p.conf.join("cloud-ca.pem.new");
        let render_cloud = |c: &cloud::Cloud, ca: Option<&Path>| {
            pgbackrest::config(&c.storage, ca, &p, st.spec.port(), self.settings.tuning())
        };
        let remove_candidates = || {
            for f in [
                &candidate,
                &candidate_ca,
                &cloud_candidate,
                &cloud_candidate_ca,
            ] {
                let _ = std::fs::remove_file(f);
            }
        };
        if let Some(pem) = &storage.ca_pem {
            self.write_owned(&candidate_ca, pem.as_bytes(), 0o644)?;
        }
        let has_ca = storage.ca_pem.is_some();
        let text = render(has_ca.then_some(candidate_ca.as_path()));
        if let Err(e) = self.write_owned(&candidate, text.as_bytes(), 0o600) {
            remove_candidates();
            return Err(e);
        }
        progress(10, "creating the stanza in the bucket");
        let io = self.settings.tuning().call_timeout();
        if let Err(e) = self
            .pgbackrest(&st, &candidate, &[], "stanza-create", io)
            .await
        {
            remove_candidates();
            return Err(e);
        }
        // The cloud's repository is proven the same way, before anything live changes.
        if let Some(c) = &cloud {
            progress(25, "creating the stanza in the cloud bucket");
            let tried = async {
                if let Some(pem) = &c.storage.ca_pem {
                    self.write_owned(&cloud_candidate_ca, pem.as_bytes(), 0o644)?;
                }
                let text = render_cloud(
                    c,
                    c.storage
                        .ca_pem
                        .is_some()
                        .then_some(cloud_candidate_ca.as_path()),
                );
                self.write_owned(&cloud_candidate, text.as_bytes(), 0o600)?;
                self.pgbackrest(&st, &cloud_candidate, &[], "stanza-create", io)
                    .await
            };
            if let Err(e) = tried.await {
                remove_candidates();
                return Err(BackupError::Failed(format!(
                    "the cloud bucket: {e}; nothing was changed"
                )));
            }
        }
        // Proven: the CA and the config take the live names (the config is rendered again
        // with the CA's live path, and written atomically).
        if has_ca {
            std::fs::rename(&candidate_ca, &live_ca).map_err(|e| {
                BackupError::Failed(format!("cannot move {} in place: {e}", live_ca.display()))
            })?;
        }
        let text = render(has_ca.then_some(live_ca.as_path()));
        self.write_owned(&live, text.as_bytes(), 0o600)?;
        match &cloud {
            Some(c) => {
                let has_ca = c.storage.ca_pem.is_some();
                if has_ca {
                    std::fs::rename(&cloud_candidate_ca, &cloud_live_ca).map_err(|e| {
                        BackupError::Failed(format!(
                            "cannot move {} in place: {e}",
                            cloud_live_ca.display()
                        ))
                    })?;
                }
                let text = render_cloud(c, has_ca.then_some(cloud_live_ca.as_path()));
                self.write_owned(&cloud_live, text.as_bytes(), 0o600)?;
                cloud::save_keys(self, &storage, &c.storage)?;
            }
            None => cloud::forget(self)?,
        }
        remove_candidates();
        dbvm_host::fs::sync_dir(&p.conf)
            .map_err(|e| BackupError::Failed(format!("cannot sync {}: {e}", p.conf.display())))?;
        progress(40, "turning WAL archiving on");
        let archive = {
            let program = self.db.program_fn();
            pgbackrest::archive_command(&program, &live)
        };
        let params = self.db.set_archive_command(Some(archive), progress).await?;
        progress(80, "checking that WAL reaches the bucket");
        self.pgbackrest(&st, &live, &[], "check", io).await?;
        let state = BackupState {
            location: storage.describe(),
            retention_days,
            configured_at_ms: dbvm_protocol::now_ms(),
            last_verify: None,
            cloud: cloud.as_ref().map(cloud::Cloud::state),
        };
        self.save(&state)?;
        progress(100, "backups configured");
        Ok(json!({
            "stanza": pgbackrest::STANZA,
            "location": state.location,
            "retention_days": retention_days,
            "cloud": state.cloud,
            "parameters": params,
            "check": "ok",
            "took_ms": t.elapsed().as_millis() as u64,
        }))
    }

    fn configured(&self) -> Result<BackupState, BackupError> {
        self.load()?.ok_or_else(|| {
            BackupError::Invalid(
                "backups are not configured on this VM (send backup.configure first)".into(),
            )
        })
    }

    /// `pgbackrest info`, read.
    pub async fn info(&self, st: &DbState) -> Result<Info, BackupError> {
        self.info_at(st, &pgbackrest::config_path(self.db.paths()))
            .await
    }

    /// `backup.run`: `auto` is full for the first backup of a chain and incremental
    /// after it; a chain older than the retention starts a new one.
    pub async fn run(&self, kind: RunKind, progress: Progress<'_>) -> Result<Value, BackupError> {
        if self.db.flavour() == Some(Flavour::Mariadb) {
            return mariabackup::run(self, kind, progress).await;
        }
        let st = self.postgres("backup.run").await?;
        let state = self.configured()?;
        let _busy = self.busy.lock().await;
        let t = Instant::now();
        // Which kind comes from the chain in the repository, unless a full one is asked
        // for: then the listing is not needed first (one container start less), and an
        // unreachable repository fails the backup itself, explained the same way.
        let before = if kind == RunKind::Full {
            None
        } else {
            progress(5, "reading the repository");
            let info = self.info(&st).await?;
            if !info.reachable() {
                let repo = info.repo_message.unwrap_or_default();
                return Err(BackupError::Failed(format!(
                    "the backup repository cannot be read: {} (pgBackRest: {}: {repo}); nothing was backed up",
                    pgbackrest::cause(&repo),
                    info.status_message,
                )));
            }
            Some(info.backups)
        };
        let now = dbvm_protocol::now_ms();
        let (kind, why) = choose(
            kind,
            before.as_deref().unwrap_or_default(),
            state.retention_days,
            now,
        );
        progress(10, &format!("{kind} backup starting ({why})"));
        let live = pgbackrest::config_path(self.db.paths());
        // The backup and then `info` in one one-shot container: the new backup's figures
        // cost no second container start (the benchmark's overhead over a direct run).
        let out = self
            .db
            .run_tool(
                &st,
                "backup",
                |program| {
                    pgbackrest::backup_then_info_argv(program, &live, &[format!("--type={kind}")])
                },
                Duration::from_secs(self.settings.timeout_s),
            )
            .await?;
        let (done, listing) = pgbackrest::split_backup_then_info(&out.stdout);
        if !done {
            return Err(BackupError::Failed(format!(
                "pgbackrest backup: {}",
                pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr)
            )));
        }
        progress(90, "reading the new backup");
        let after = match listing.map(pgbackrest::parse_info) {
            Some(Ok(after)) if out.exit_code == 0 => after,
            // The backup is stored; only the listing failed: read it once more.
            _ => self.info(&st).await?,
        };
        // The new backup: the newest one not listed before (the newest, when nothing was
        // listed first).
        let new = after
            .backups
            .iter()
            .rfind(|b| {
                before
                    .as_ref()
                    .is_none_or(|old| !old.iter().any(|o| o.label == b.label))
            })
            .cloned()
            .ok_or_else(|| {
                BackupError::Failed(
                    "pgbackrest backup succeeded but no new backup is listed".into(),
                )
            })?;
        let chain = chains(&after.backups, state.retention_days)
            .into_iter()
            .find(|c| c.backups.iter().any(|b| b.label == new.label));
        let mut out = json!({
            "label": new.label,
            "type": new.kind,
            "why": why,
            "chain": chain.map(|c| json!({"full": c.full, "created_ms": c.created_ms, "expires_ms": c.expires_ms, "backups": c.backups.len()})),
            "size_bytes": new.size_bytes,
            "repo_size_bytes": new.repo_size_bytes,
            "started_ms": new.started_ms,
            "stopped_ms": new.stopped_ms,
            "wal_start": new.wal_start,
            "wal_stop": new.wal_stop,
            "took_ms": t.elapsed().as_millis() as u64,
        });
        // The cloud follows: its failure does not undo the local backup, it is reported
        // beside it (and in health check 10).
        if let Some(cs) = &state.cloud {
            out["cloud"] = match self.pg_cloud_backup(&st, cs, progress).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "backup to the cloud bucket failed");
                    if let Ok(mut s) = self.cloud.status.lock() {
                        s.consecutive_failures += 1;
                        s.last_error = Some(format!("the backup to the cloud: {e}"));
                        s.behind_since_ms = s.behind_since_ms.or(Some(dbvm_protocol::now_ms()));
                    }
                    json!({ "error": e.to_string() })
                }
            };
            out["took_ms"] = json!(t.elapsed().as_millis() as u64);
        }
        Ok(out)
    }

    /// `pgbackrest info` of the repository `config` names.
    async fn info_at(&self, st: &DbState, config: &Path) -> Result<Info, BackupError> {
        let io = self.settings.tuning().call_timeout();
        let out = self
            .pgbackrest(st, config, &["--output=json".to_string()], "info", io)
            .await?;
        pgbackrest::parse_info(&out.stdout).map_err(BackupError::Failed)
    }

    /// After a local backup: a backup to the cloud's repository when its newest is older
    /// than `backup_every_hours`, full or incremental by the cloud's own chains.
    async fn pg_cloud_backup(
        &self,
        st: &DbState,
        cs: &cloud::CloudState,
        progress: Progress<'_>,
    ) -> Result<Value, BackupError> {
        let config = cloud::pg_config_path(self.db.paths());
        progress(92, "reading the cloud's repository");
        let info = self.info_at(st, &config).await?;
        if !info.reachable() {
            let repo = info.repo_message.unwrap_or_default();
            return Err(BackupError::Failed(format!(
                "the cloud's repository cannot be read: {} (pgBackRest: {}: {repo})",
                pgbackrest::cause(&repo),
                info.status_message,
            )));
        }
        let now = dbvm_protocol::now_ms();
        let newest = info
            .backups
            .iter()
            .filter(|b| !b.error)
            .map(|b| b.stopped_ms)
            .max();
        let every_ms = i64::from(cs.backup_every_hours) * 3_600_000;
        if let Some(newest) = newest.filter(|n| now - n < every_ms) {
            return Ok(json!({
                "skipped": format!("the cloud's newest backup is younger than {} hours", cs.backup_every_hours),
                "newest_ms": newest,
            }));
        }
        let (kind, why) = choose(RunKind::Auto, &info.backups, cs.retention_days, now);
        progress(94, &format!("{kind} backup to the cloud ({why})"));
        // WAL reaches the cloud by copy: the copier runs beside the backup, which waits
        // for its last segment in the cloud's archive.
        let done = tokio_util::sync::CancellationToken::new();
        let copier = async {
            loop {
                if let Err(e) = cloud::round(self).await {
                    tracing::debug!(error = %e, "copy round beside the cloud backup failed");
                }
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        };
        let backup = async {
            let r = self
                .db
                .run_tool(
                    st,
                    "backup",
                    |program| {
                        pgbackrest::backup_then_info_argv(
                            program,
                            &config,
                            &[format!("--type={kind}")],
                        )
                    },
                    Duration::from_secs(self.settings.timeout_s),
                )
                .await;
            done.cancel();
            r
        };
        let (out, ()) = tokio::join!(backup, copier);
        let out = out?;
        let (finished, listing) = pgbackrest::split_backup_then_info(&out.stdout);
        if !finished {
            return Err(BackupError::Failed(format!(
                "pgbackrest backup: {}",
                pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr)
            )));
        }
        let new = listing
            .and_then(|l| pgbackrest::parse_info(l).ok())
            .and_then(|after| {
                after
                    .backups
                    .iter()
                    .rfind(|b| !info.backups.iter().any(|o| o.label == b.label))
                    .cloned()
            });
        Ok(json!({
            "label": new.as_ref().map(|b| &b.label),
            "type": kind,
            "why": why,
            "size_bytes": new.as_ref().map(|b| b.size_bytes),
            "repo_size_bytes": new.as_ref().map(|b| b.repo_size_bytes),
            "location": cs.location,
        }))
    }

    /// `backup.list`: chains, sizes, and the window a restore can reach.
    pub async fn list(&self) -> Result<Value, BackupError> {
        if self.db.flavour() == Some(Flavour::Mariadb) {
            return mariabackup::list(self).await;
        }
        let st = self.postgres("backup.list").await?;
        let state = self.configured()?;
        let info = self.info(&st).await?;
        let local_chains = chains(&info.backups, state.retention_days);
        let window = info.backups.iter().find(|b| !b.error).map(|first| {
            json!({
                "from_ms": first.stopped_ms,
                "newest_backup_ms": info.backups.iter().map(|b| b.stopped_ms).max(),
                "archived_wal_to": info.archive_max,
            })
        });
        let mut out = json!({
            "location": state.location,
            "retention_days": state.retention_days,
            "status": {"code": info.status_code, "message": info.status_message, "repo": info.repo_message},
            "chains": local_chains,
            "archive": {"min": info.archive_min, "max": info.archive_max},
            "recoverable": window,
        });
        if let Some(cs) = &state.cloud {
            let copy = self
                .cloud
                .status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            let config = cloud::pg_config_path(self.db.paths());
            out["cloud"] = match self.info_at(&st, &config).await {
                Ok(info) => json!({
                    "location": cs.location,
                    "retention_days": cs.retention_days,
                    "backup_every_hours": cs.backup_every_hours,
                    "status": {"code": info.status_code, "message": info.status_message, "repo": info.repo_message},
                    "chains": chains(&info.backups, cs.retention_days),
                    "archive": {"min": info.archive_min, "max": info.archive_max},
                    "recoverable": info.backups.iter().find(|b| !b.error).map(|first| json!({
                        "from_ms": first.stopped_ms,
                        "newest_backup_ms": info.backups.iter().map(|b| b.stopped_ms).max(),
                        "archived_wal_to": info.archive_max,
                    })),
                    "copy": copy,
                }),
                Err(e) => json!({
                    "location": cs.location,
                    "retention_days": cs.retention_days,
                    "status": {"code": 99, "message": e.to_string()},
                    "copy": copy,
                }),
            };
        }
        Ok(out)
    }
}

impl BackupManager {
    /// `backup.purge` and the daily purger: removes the chains whose last backup has
    /// expired (see [`purge`]), never the newest.
    pub async fn purge(&self, progress: Progress<'_>) -> Result<Value, BackupError> {
        if self.db.flavour() == Some(Flavour::Mariadb) {
            return mariabackup::purge(self, progress).await;
        }
        let st = self.postgres("backup.purge").await?;
        let state = self.configured()?;
        let _busy = self.busy.lock().await;
        let t = Instant::now();
        let live = pgbackrest::config_path(self.db.paths());
        let mut out = self
            .purge_repo(&st, &live, state.retention_days, "the ", progress)
            .await?;
        if let Some(cs) = &state.cloud {
            // The cloud by its own retention; its failure is reported beside the local
            // purge, which stays done.
            let config = cloud::pg_config_path(self.db.paths());
            let _turn = cloud::turn(self).await;
            out["cloud"] = match self
                .purge_repo(&st, &config, cs.retention_days, "the cloud's ", progress)
                .await
            {
                Ok(v) => {
                    // The copier does not bring back WAL the cloud's purge removed.
                    if let Some(min) = v["archive"]["min"].as_str() {
                        let mut now = self.configured()?;
                        if let Some(c) = now.cloud.as_mut() {
                            c.archive_floor = Some(min.to_string());
                        }
                        self.save(&now)?;
                    }
                    v
                }
                Err(e) => json!({ "error": e.to_string() }),
            };
        }
        progress(100, "purge done");
        out["took_ms"] = json!(t.elapsed().as_millis() as u64);
        Ok(out)
    }

    /// Purges one repository (`config`) by `retention_days`; `whose` names it in messages
    /// (`the ` or `the cloud's `).
    async fn purge_repo(
        &self,
        st: &DbState,
        config: &Path,
        retention_days: u32,
        whose: &str,
        progress: Progress<'_>,
    ) -> Result<Value, BackupError> {
        progress(10, &format!("reading {whose}repository"));
        let info = self.info_at(st, config).await?;
        if !info.reachable() {
            let repo = info.repo_message.unwrap_or_default();
            return Err(BackupError::Failed(format!(
                "{whose}backup repository cannot be read: {} (pgBackRest: {}: {repo}); nothing was purged",
                pgbackrest::cause(&repo),
                info.status_message,
            )));
        }
        let all = chains(&info.backups, retention_days);
        let plan = purge::plan(&all, retention_days, dbvm_protocol::now_ms());
        let mut purged = Vec::new();
        for d in plan.iter().filter(|d| d.purge) {
            progress(30, &format!("purging {whose}chain {} ({})", d.full, d.why));
            // `expire --set` removes the full backup and every backup that depends on
            // it, and the WAL no remaining backup needs.
            self.pgbackrest(
                st,
                config,
                &[format!("--set={}", d.full)],
                "expire",
                Duration::from_secs(self.settings.timeout_s),
            )
            .await
            .map_err(|e| {
                BackupError::Failed(format!(
                    "{e}; purged so far: {}",
                    if purged.is_empty() {
                        "none".to_string()
                    } else {
                        purged.join(", ")
                    }
                ))
            })?;
            purged.push(d.full.clone());
        }
        let after = if purged.is_empty() {
            info
        } else {
            // WAL older than the oldest chain left restores nothing: pgBackRest keeps the
            // archive of as many full backups as there are chains left.
            let left = plan.iter().filter(|d| !d.purge).count().max(1);
            self.pgbackrest(
                st,
                config,
                &[
                    "--repo1-retention-archive-type=full".to_string(),
                    format!("--repo1-retention-archive={left}"),
                ],
                "expire",
                Duration::from_secs(self.settings.timeout_s),
            )
            .await?;
            self.info_at(st, config).await?
        };
        Ok(json!({
            "purged": purged,
            "chains": plan,
            "retention_days": retention_days,
            "archive": {"min": after.archive_min, "max": after.archive_max},
        }))
    }

    /// The daily purger at `[backup] purge_at` (UTC), until `token` is cancelled. Results
    /// are events (`backup.purged`, `backup.purge_failed`); a VM without backups
    /// configured has nothing to purge.
    pub async fn purge_daily(self: Arc<Self>, token: tokio_util::sync::CancellationToken) {
        let Ok((hh, mm)) = purge::parse_at(&self.settings.purge_at) else {
            return;
        };
        loop {
            let wait = purge::until_next(dbvm_protocol::now_ms(), hh, mm);
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if !matches!(self.load(), Ok(Some(_))) {
                continue;
            }
            let (kind, payload) = match self.purge(&|_, _| {}).await {
                Ok(v) => {
                    tracing::info!(purged = %v["purged"], "daily purge done");
                    ("backup.purged", v)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "daily purge failed");
                    ("backup.purge_failed", json!({ "error": e.to_string() }))
                }
            };
            if let Some(outbox) = self.outbox.get() {
                outbox.event(kind, dbvm_protocol::now_ms(), payload.to_string());
            }
        }
    }
}

/// What `backup.run` is asked for.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    #[default]
    Auto,
    Full,
    Incr,
}

/// A full backup and the incrementals that depend on it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Chain {
    pub full: String,
    pub created_ms: i64,
    /// Creation + retention days: after this, the next backup starts a new chain; the
    /// chain itself is purged once its last backup has expired too.
    pub expires_ms: i64,
    pub backups: Vec<BackupSet>,
    pub size_bytes: u64,
    pub repo_size_bytes: u64,
}

pub const DAY_MS: i64 = 86_400_000;

/// Environment variable for tests only, honoured only by debug builds: the length of a
/// retention day in seconds. Days cannot pass in a test; a release agent ignores it.
pub const TEST_DAY_S: &str = "DBVM_AGENT_TEST_DAY_S";

/// The length of a retention day: [`DAY_MS`] (see [`TEST_DAY_S`]).
pub fn day_ms() -> i64 {
    if cfg!(debug_assertions) {
        if let Some(s) = std::env::var(TEST_DAY_S)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|s| *s > 0)
        {
            return s * 1000;
        }
    }
    DAY_MS
}

/// Groups backups into chains, oldest first.
pub fn chains(backups: &[BackupSet], retention_days: u32) -> Vec<Chain> {
    let mut out: Vec<Chain> = Vec::new();
    for b in backups {
        if b.kind == "full" || out.is_empty() {
            out.push(Chain {
                full: b.label.clone(),
                created_ms: b.started_ms,
                expires_ms: b.started_ms + i64::from(retention_days) * day_ms(),
                backups: Vec::new(),
                size_bytes: 0,
                repo_size_bytes: 0,
            });
        }
        if let Some(c) = out.last_mut() {
            c.size_bytes += b.size_bytes;
            c.repo_size_bytes += b.repo_size_bytes;
            c.backups.push(b.clone());
        }
    }
    out
}

/// The kind of the next backup, and why.
pub fn choose(
    asked: RunKind,
    backups: &[BackupSet],
    retention_days: u32,
    now_ms: i64,
) -> (&'static str, String) {
    let current = chains(backups, retention_days).pop();
    match (asked, current) {
        (RunKind::Full, _) => ("full", "asked for".into()),
        (_, None) => (
            "full",
            "first backup: a chain starts with a full one".into(),
        ),
        (RunKind::Auto, Some(c)) if now_ms >= c.expires_ms => (
            "full",
            format!(
                "chain {} is older than the retention of {retention_days} days: a new chain starts",
                c.full
            ),
        ),
        (RunKind::Incr, Some(c)) => ("incr", format!("asked for, in chain {}", c.full)),
        (RunKind::Auto, Some(c)) => ("incr", format!("next in chain {}", c.full)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(label: &str, kind: &str, started_ms: i64) -> BackupSet {
        BackupSet::for_test(label, kind, started_ms, started_ms + 1000, 10, false)
    }

    #[test]
    fn the_first_backup_is_full_then_incremental_until_the_chain_expires() {
        let now = 100 * DAY_MS;
        assert_eq!(choose(RunKind::Auto, &[], 7, now).0, "full");
        assert_eq!(choose(RunKind::Incr, &[], 7, now).0, "full");
        let b = vec![
            set("F1", "full", now - 2 * DAY_MS),
            set("I1", "incr", now - DAY_MS),
        ];
        assert_eq!(choose(RunKind::Auto, &b, 7, now).0, "incr");
        assert_eq!(choose(RunKind::Full, &b, 7, now).0, "full");
        let (k, why) = choose(RunKind::Auto, &b, 1, now);
        assert_eq!(k, "full");
        assert!(why.contains("F1"), "{why}");
        let c = chains(&b, 7);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].backups.len(), 2);
        assert_eq!(c[0].expires_ms, now - 2 * DAY_MS + 7 * DAY_MS);
        assert_eq!(c[0].size_bytes, 20);
    }
}
