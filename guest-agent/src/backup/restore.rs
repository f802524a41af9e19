//! `db.restore`: a new database from another database's backups, up to a point in time.
//!
//! The source's keys go into a pgBackRest config of the restore's own (0600, the database
//! user's), used by `pgbackrest restore` and then by PostgreSQL's `restore_command` while
//! it replays WAL; it is removed as soon as recovery has ended. The restored database
//! does not archive into the source's repository: its own `backup.configure` gives it
//! one.

use super::pgbackrest::{self, Info, Tuning};
use super::storage::Storage;
use crate::db::engine::Admin;
use crate::db::manager::{DataSource, ProgressFn};
use crate::db::{DbError, DbManager, DbState};
use async_trait::async_trait;
use serde_json::{json, Value};
use std::time::Duration;

/// How far to recover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Everything archived.
    Latest,
    /// A point in time (ms since the epoch, UTC).
    Time(i64),
}

impl Target {
    /// `latest` or an RFC 3339 time (`2026-12-03T18:00:00.250Z`).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| {
                format!("target: {s:?} is neither \"latest\" nor an RFC 3339 time ({e})")
            })?;
        Ok(Self::Time((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }

    pub fn describe(&self) -> Value {
        match self {
            Self::Latest => json!("latest"),
            Self::Time(ms) => json!(rfc3339(*ms)),
        }
    }
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// PostgreSQL's timestamp syntax for `recovery_target_time`, UTC, microseconds.
pub fn pg_time(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// A PostgreSQL restore from a pgBackRest repository.
pub struct PgRestore {
    pub storage: Storage,
    pub target: Target,
    pub tuning: Tuning,
    pub timeout: Duration,
    /// The stop time of the backup set pgBackRest restored (from `populate` to `finish`).
    pub backup_stopped_ms: std::sync::Mutex<Option<i64>>,
    /// What the repository can restore, read before anything is restored.
    window: std::sync::Mutex<Option<Window>>,
    /// The restore's config (the source's keys), removed when the restore ends however
    /// it ends (an agent killed mid-restore leaves it until the next attempt rewrites and
    /// removes it).
    config: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl Drop for PgRestore {
    fn drop(&mut self) {
        let path = self.config.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(path) = path {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the restore's config (it holds the source's keys)")
                }
            }
        }
    }
}

impl PgRestore {
    pub fn new(storage: Storage, target: Target, tuning: Tuning, timeout: Duration) -> Self {
        Self {
            storage,
            target,
            tuning,
            timeout,
            backup_stopped_ms: std::sync::Mutex::new(None),
            window: std::sync::Mutex::new(None),
            config: std::sync::Mutex::new(None),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![format!("--process-max={}", self.tuning.process_max)];
        match self.target {
            Target::Latest => a.push("--type=default".into()),
            Target::Time(ms) => {
                a.push("--type=time".into());
                a.push(format!("--target={}", pg_time(ms)));
                a.push("--target-action=promote".into());
            }
        }
        a
    }

    /// `pgbackrest info` with the restore's config; an unreachable repository fails here,
    /// before anything is restored.
    async fn read_info(
        &self,
        db: &DbManager,
        st: &DbState,
        config: &std::path::Path,
    ) -> Result<Info, DbError> {
        let out = db
            .run_tool(
                st,
                "restore",
                |program| pgbackrest::argv(program, config, &["--output=json".to_string()], "info"),
                self.tuning.call_timeout(),
            )
            .await?;
        let info = (out.exit_code == 0)
            .then(|| pgbackrest::parse_info(&out.stdout).ok())
            .flatten();
        match info {
            // 1 and 3 (no stanza there) answer too: nothing to restore from.
            Some(info) if info.reachable() || matches!(info.status_code, 1 | 3) => Ok(info),
            Some(info) => {
                let _ = std::fs::remove_file(config);
                let repo = info.repo_message.unwrap_or_default();
                Err(DbError::Failed(format!(
                    "the source's repository {}/{} cannot be read: {} (pgBackRest: {}: {repo}); nothing was restored",
                    self.storage.bucket,
                    self.storage.prefix,
                    pgbackrest::cause(&repo),
                    info.status_message,
                )))
            }
            None => {
                let _ = std::fs::remove_file(config);
                Err(DbError::Failed(format!(
                    "pgbackrest info: {}; nothing was restored",
                    pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr)
                )))
            }
        }
    }

    /// Why recovery stopped, from the server's log, with the window when the target lies
    /// beyond the last archived transaction.
    fn recovery_failed(&self, error: &str, log_dir: &std::path::Path) -> String {
        let log = newest_server_log(log_dir);
        let window = self
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Window::describe)
            .unwrap_or_default();
        if log.contains("recovery ended before configured recovery target was reached") {
            let last = last_transaction_time(&log)
                .map(|t| format!("the last archived transaction is from {t}"))
                .unwrap_or_else(|| "no transaction after the backup was archived".into());
            return format!(
                "target {} is after the last archived transaction of {}/{}: {last}; the recoverable window is {window}. Restore to `latest` or a time inside the window (the source may not have archived its newest WAL yet)",
                self.target.describe().as_str().unwrap_or("?"),
                self.storage.bucket,
                self.storage.prefix,
            );
        }
        // `error` already carries the server's last FATAL line.
        error.to_string()
    }
}

/// What a repository can restore: from the end of its first complete backup up to its
/// newest archived WAL. The listing names that segment but not its time; the newest
/// backup's end is the latest time known for certain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub first_backup: String,
    pub from_ms: i64,
    pub newest_backup_ms: i64,
    pub archived_to: Option<String>,
}

impl Window {
    pub fn of(info: &Info) -> Option<Self> {
        let complete = || info.backups.iter().filter(|b| !b.error);
        let first = complete().min_by_key(|b| b.stopped_ms)?;
        Some(Self {
            first_backup: first.label.clone(),
            from_ms: first.stopped_ms,
            newest_backup_ms: complete()
                .map(|b| b.stopped_ms)
                .max()
                .unwrap_or(first.stopped_ms),
            archived_to: info.archive_max.clone(),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "from {} (the end of backup {}) to the newest archived WAL ({}; the newest backup ended {})",
            rfc3339(self.from_ms),
            self.first_backup,
            self.archived_to.as_deref().unwrap_or("none archived"),
            rfc3339(self.newest_backup_ms)
        )
    }
}

/// A restore that ran out of space says so (pgBackRest names only the file it could not
/// write; the file system's free space tells why).
fn disk_full_hint(stdout: &str, stderr: &str, free: Option<u64>) -> &'static str {
    let said =
        stdout.contains("No space left on device") || stderr.contains("No space left on device");
    let unable = stdout.contains("unable to write") || stderr.contains("unable to write");
    if said || (unable && free.is_some_and(|f| f < (16 << 20))) {
        " — the data disk of this VM is full: the restored database does not fit; give the VM a larger data disk and send db.restore again (nothing of the source changed)"
    } else {
        ""
    }
}

/// Bytes for people (the health reports' units).
fn human(b: u64) -> String {
    crate::health::bytes(b as f64)
}

#[async_trait]
impl DataSource for PgRestore {
    fn describe(&self) -> Value {
        json!({ "location": self.storage.describe(), "target": self.target.describe() })
    }

    async fn populate(
        &self,
        db: &DbManager,
        st: &DbState,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let p = db.paths().clone();
        let s = db.settings();
        pgbackrest::prepare_dirs(&p, s.uid, s.gid).map_err(DbError::Failed)?;
        let ca = match &self.storage.ca_pem {
            Some(pem) => {
                let path = pgbackrest::ca_path(&p, "restore");
                crate::db::engine::write_owned(&path, pem.as_bytes(), 0o644, s.uid, s.gid)?;
                Some(path)
            }
            None => None,
        };
        let config = pgbackrest::restore_config_path(&p);
        let text = pgbackrest::config(
            &self.storage,
            ca.as_deref(),
            &p,
            st.spec.port(),
            self.tuning,
        );
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = Some(config.clone());
        crate::db::engine::write_owned(&config, text.as_bytes(), 0o600, s.uid, s.gid)?;
        // The listing first: a target outside what the repository holds is refused
        // before the data directory is touched, naming the window. (The same listing
        // gives the chosen backup's stop time afterwards: no second container start.)
        progress(60, "reading the source's repository");
        let info = self.read_info(db, st, &config).await?;
        let window = Window::of(&info).ok_or_else(|| {
            let _ = std::fs::remove_file(&config);
            DbError::Failed(format!(
                "there is no complete backup in {}/{}: nothing to restore (is the prefix the source's agent id, and did a backup.run succeed there?)",
                self.storage.bucket, self.storage.prefix
            ))
        })?;
        if let Target::Time(ms) = self.target {
            if ms < window.from_ms {
                let _ = std::fs::remove_file(&config);
                return Err(DbError::Failed(format!(
                    "target {} is before the recoverable window of {}/{}: {}; nothing was restored",
                    rfc3339(ms),
                    self.storage.bucket,
                    self.storage.prefix,
                    window.describe()
                )));
            }
        }
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) = Some(window);
        // The set pgBackRest will choose (the newest complete one that ended before the
        // target) must fit on the data disk: refused before a byte is written.
        let chosen = info
            .backups
            .iter()
            .filter(|b| !b.error)
            .filter(|b| match self.target {
                Target::Latest => true,
                Target::Time(ms) => b.stopped_ms <= ms,
            })
            .max_by_key(|b| b.stopped_ms);
        let free = crate::db::manager::fs_free(&p.data);
        if let (Some(set), Some(free)) = (chosen, free) {
            // One WAL segment beside the files, at least.
            let needed = set.size_bytes + (16 << 20);
            if needed > free {
                let _ = std::fs::remove_file(&config);
                return Err(DbError::Failed(format!(
                    "the data disk of this VM is too small: backup {} of {}/{} restores to {} and {} is free on {}; give the VM a larger data disk and send db.restore again (nothing was restored)",
                    set.label,
                    self.storage.bucket,
                    self.storage.prefix,
                    human(set.size_bytes),
                    human(free),
                    p.data.display()
                )));
            }
        }
        progress(
            62,
            &format!(
                "pgbackrest restore from {}/{} to {}",
                self.storage.bucket,
                self.storage.prefix,
                self.target.describe()
            ),
        );
        let args = self.args();
        let out = db
            .run_tool(
                st,
                "restore",
                |program| pgbackrest::argv(program, &config, &args, "restore"),
                self.timeout,
            )
            .await?;
        if out.exit_code != 0 {
            let _ = std::fs::remove_file(&config);
            let text = format!("{}\n{}", out.stdout, out.stderr);
            let set = pgbackrest_log_set(&p.log.join("pgbackrest"));
            let hint = if text.contains("unable to find backup set")
                || text.contains("no backup set found")
            {
                " — the target is before the first backup of this repository; see backup.list on the source for the recoverable window".to_string()
            } else if let Some(damage) = super::verify::damage(&text) {
                format!(
                    " — {}: it cannot be restored as it is (nothing restored from it is used); restore to an earlier time that another chain covers, or run backup.verify on the source",
                    super::verify::damaged_set(set.as_deref(), damage)
                )
            } else {
                String::new()
            };
            return Err(DbError::Failed(format!(
                "restore failed{hint}: {}{}",
                pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr),
                disk_full_hint(
                    &out.stdout,
                    &out.stderr,
                    crate::db::manager::fs_free(&p.data)
                ),
            )));
        }
        // The backup set pgBackRest chose is in its log line "restore backup set …"; its
        // stop time is the point reached when no transaction follows it before the target.
        let set = pgbackrest_log_set(&p.log.join("pgbackrest"));
        let stopped = info
            .backups
            .iter()
            .find(|b| Some(&b.label) == set.as_ref())
            .map(|b| b.stopped_ms);
        *self
            .backup_stopped_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = stopped;
        Ok(json!({
            "backup_set": set,
            "backup_stopped_ms": stopped,
            "target": self.target.describe(),
        }))
    }

    async fn finish(
        &self,
        db: &DbManager,
        _st: &DbState,
        admin: &mut Admin,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let p = db.paths().clone();
        let replayed = match wait_for_recovery_end(admin, &p.log, self.timeout, progress).await {
            Ok(r) => r,
            Err(e) => {
                // The server ends itself when the target cannot be reached.
                let _ = std::fs::remove_file(pgbackrest::restore_config_path(&p));
                return Err(DbError::Failed(
                    self.recovery_failed(&e.to_string(), &p.log),
                ));
            }
        };
        // Recovery is over: the source's keys are no longer needed on this VM.
        let config = pgbackrest::restore_config_path(&p);
        std::fs::remove_file(&config).map_err(|e| DbError::io("remove", &config, e))?;
        // With no transaction replayed after the backup, the database is as the backup
        // left it: the point reached is the backup's end.
        let (reached, how) = match replayed {
            Some(ms) => (Some(ms), "the last transaction replayed"),
            None => (
                *self
                    .backup_stopped_ms
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
                "the end of the backup (no transaction committed after it before the target)",
            ),
        };
        Ok(json!({
            "recovered_to_ms": reached,
            "recovered_to": reached.map(rfc3339),
            "recovered_to_is": how,
        }))
    }
}

/// Waits until the server has left recovery (polling its state; a server that ends
/// itself because the target cannot be reached is explained from its log). Returns the
/// commit time of the last transaction replayed, if any.
pub async fn wait_for_recovery_end(
    admin: &mut Admin,
    log_dir: &std::path::Path,
    timeout: Duration,
    progress: ProgressFn<'_>,
) -> Result<Option<i64>, DbError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut said = false;
    loop {
        match admin.pg_recovery().await {
            Ok((false, replayed)) => return Ok(replayed),
            Ok((true, _)) => {}
            Err(e) => {
                return Err(DbError::Failed(format!(
                    "recovery did not finish: {e}{}",
                    server_log_reason(log_dir)
                )));
            }
        }
        if !said {
            progress(82, "replaying WAL up to the target");
            said = true;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DbError::Failed(format!(
                "recovery did not finish within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The label in pgBackRest's newest "restore backup set" log line, if any.
pub fn pgbackrest_log_set(dir: &std::path::Path) -> Option<String> {
    let text =
        std::fs::read_to_string(dir.join(format!("{}-restore.log", pgbackrest::STANZA))).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.split("restore backup set ").nth(1))
        .map(|s| s.split([',', ' ']).next().unwrap_or(s).to_string())
}

/// The last FATAL line of PostgreSQL's newest log, to say why recovery stopped.
pub fn server_log_reason(dir: &std::path::Path) -> String {
    newest_server_log(dir)
        .lines()
        .rev()
        .find(|l| l.contains("FATAL:"))
        .map(|l| format!(" (the server said: {})", l.trim()))
        .unwrap_or_default()
}

/// The text of PostgreSQL's newest log file (empty when there is none).
fn newest_server_log(dir: &std::path::Path) -> String {
    let newest = std::fs::read_dir(dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("postgresql-"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    newest
        .and_then(|e| std::fs::read_to_string(e.path()).ok())
        .unwrap_or_default()
}

/// The time in the server's "last completed transaction was at log time …" line.
fn last_transaction_time(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find_map(|l| {
            l.split("last completed transaction was at log time ")
                .nth(1)
        })
        .map(|t| t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("latest").unwrap(), Target::Latest);
        assert_eq!(
            Target::parse("2026-12-03T18:00:00.250Z").unwrap(),
            Target::Time(1_796_320_800_250)
        );
        assert_eq!(
            Target::parse("2026-12-03T19:00:00.250+01:00").unwrap(),
            Target::Time(1_796_320_800_250)
        );
        assert!(Target::parse("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(pg_time(1_796_320_800_250), "2026-12-03 18:00:00.250000+00");
        assert_eq!(rfc3339(1_796_320_800_250), "2026-12-03T18:00:00.25Z");
    }

    fn set(label: &str, stopped_ms: i64, error: bool) -> pgbackrest::BackupSet {
        pgbackrest::BackupSet::for_test(label, "full", stopped_ms - 1000, stopped_ms, 1, error)
    }

    #[test]
    fn the_window_starts_at_the_first_complete_backup_and_names_the_archive() {
        let mut info = Info {
            status_code: 0,
            status_message: "ok".into(),
            repo_message: None,
            backups: vec![],
            archive_min: None,
            archive_max: None,
        };
        assert_eq!(Window::of(&info), None, "no backup, no window");
        info.backups = vec![
            set("B0", 1_796_320_700_000, true),
            set("B1", 1_796_320_800_250, false),
            set("B2", 1_796_320_900_000, false),
        ];
        info.archive_max = Some("000000010000000000000007".into());
        let w = Window::of(&info).unwrap();
        assert_eq!(
            (w.first_backup.as_str(), w.from_ms),
            ("B1", 1_796_320_800_250)
        );
        let d = w.describe();
        assert!(
            d.contains("2026-12-03T18:00:00.25Z")
                && d.contains("B1")
                && d.contains("000000010000000000000007"),
            "{d}"
        );
    }

    #[test]
    fn the_last_replayed_transaction_is_read_from_the_server_log() {
        let log = "LOG:  redo done at 0/3000100\nLOG:  last completed transaction was at log time 2026-12-03 18:00:01.5+00\nFATAL:  recovery ended before configured recovery target was reached\n";
        assert_eq!(
            last_transaction_time(log).as_deref(),
            Some("2026-12-03 18:00:01.5+00")
        );
        assert_eq!(last_transaction_time("FATAL: x"), None);
        assert!(disk_full_hint("", "No space left on device", None).contains("full"));
        assert!(
            disk_full_hint("ERROR: [064]: unable to write 'x'", "", Some(4096)).contains("full")
        );
        assert_eq!(
            disk_full_hint("ERROR: [064]: unable to write 'x'", "", Some(1 << 30)),
            ""
        );
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
