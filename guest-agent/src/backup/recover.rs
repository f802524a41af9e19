//! `db.recover`: the database recovered IN PLACE, on the same VM, from its own
//! repository, to `latest` or a point in time.
//!
//! Everything that can be checked is checked before the server stops: backups are
//! configured, the repository answers and holds a backup, the target lies inside the
//! recoverable window (the end of the first backup to now), and WAL archiving works (the
//! current segment is switched out and must reach the repository, or the newest
//! transactions would be lost with the old data directory). Then
//! [`DbManager::recover_in_place`] stops the server and runs [`PgRecover`]:
//! `pgbackrest restore --delta` on the same data directory in a one-shot container, with
//! the live configuration (the one `archive_command` uses), and after the start it waits
//! for recovery to end. PostgreSQL then continues on a new timeline; pgBackRest archives
//! it beside the old one, and the next backup continues in the repository as before.

use super::pgbackrest::{self, Info};
use super::restore::{self, rfc3339, Target};
use super::{BackupError, BackupManager, Progress};
use crate::db::engine::Admin;
use crate::db::manager::{DataSource, ProgressFn};
use crate::db::{DbError, DbManager, DbState};
use crate::runtime::RuntimeError;
use async_trait::async_trait;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// pgBackRest records a backup's stop time in whole seconds: a backup counts as before a
/// target only when it ended at least this long before it (otherwise the target could
/// fall inside the backup, which no recovery can reach).
const STOP_SLACK_MS: i64 = 1000;

/// The backup a recover to `target` starts from, and the window it must lie in.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub backup_set: String,
    pub backup_stopped_ms: i64,
    pub window_from_ms: i64,
}

/// Picks the newest intact backup that ended before `target`; a target outside the
/// window (the end of the first backup .. `now_ms`) is refused, naming the window.
pub fn plan(info: &Info, target: &Target, now_ms: i64) -> Result<Plan, String> {
    let intact: Vec<_> = info.backups.iter().filter(|b| !b.error).collect();
    let Some(first) = intact.first() else {
        return Err(
            "the repository holds no backup of this database yet (send backup.run first)".into(),
        );
    };
    let from = first.stopped_ms + STOP_SLACK_MS;
    let window = || format!("{} .. now ({})", rfc3339(from), rfc3339(now_ms));
    let chosen = match target {
        Target::Latest => intact.last().copied(),
        Target::Time(t) => {
            if *t < from || *t > now_ms {
                return Err(format!(
                    "target {} is outside the recoverable window {}",
                    rfc3339(*t),
                    window()
                ));
            }
            intact
                .iter()
                .rev()
                .find(|b| b.stopped_ms + STOP_SLACK_MS <= *t)
                .copied()
        }
    };
    let b = chosen.ok_or_else(|| {
        format!(
            "no backup ends before the target: the recoverable window is {}",
            window()
        )
    })?;
    Ok(Plan {
        backup_set: b.label.clone(),
        backup_stopped_ms: b.stopped_ms,
        window_from_ms: from,
    })
}

/// The in-place restore as a [`DataSource`] of [`DbManager::recover_in_place`].
pub struct PgRecover {
    pub target: Target,
    pub plan: Plan,
    pub process_max: u32,
    pub timeout: Duration,
}

/// Printed by pgBackRest (console level info) once it has chosen the backup set and
/// before it changes any file of the data directory.
const STARTED_MARK: &str = "restore backup set ";

impl PgRecover {
    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--delta".to_string(),
            format!("--set={}", self.plan.backup_set),
            format!("--process-max={}", self.process_max),
            // The line saying the restore began is how a failure before any change is
            // told from one after (see `populate`).
            "--log-level-console=info".to_string(),
        ];
        match self.target {
            Target::Latest => a.push("--type=default".into()),
            Target::Time(ms) => {
                a.push("--type=time".into());
                a.push(format!("--target={}", restore::pg_time(ms)));
                a.push("--target-action=promote".into());
            }
        }
        a
    }
}

#[async_trait]
impl DataSource for PgRecover {
    fn describe(&self) -> Value {
        json!({
            "in_place": true,
            "target": self.target.describe(),
            "backup_set": self.plan.backup_set,
        })
    }

    async fn populate(
        &self,
        db: &DbManager,
        st: &DbState,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let config = pgbackrest::config_path(db.paths());
        let args = self.args();
        progress(
            40,
            &format!(
                "pgbackrest restore --delta from {} to {}",
                self.plan.backup_set,
                self.target.describe()
            ),
        );
        let out = db
            .run_tool(
                st,
                "recover",
                |program| pgbackrest::argv(program, &config, &args, "restore"),
                self.timeout,
            )
            .await
            .map_err(|e| match e {
                // The container did not run at all: nothing was touched (a timeout may
                // have cut the restore off midway: that one is not this case).
                DbError::Runtime(
                    r @ (RuntimeError::EngineUnavailable(_) | RuntimeError::ImageMissing(_)),
                ) => DbError::Invalid(format!("cannot run pgbackrest: {r}")),
                other => other,
            })?;
        if out.exit_code != 0 {
            let text = format!("{}\n{}", out.stdout, out.stderr);
            // The info lines (asked for above) list the options, `--io-timeout` among
            // them: kept out of the explanation, which reads words such as "timeout".
            let stdout: String = out
                .stdout
                .lines()
                .filter(|l| !l.contains(" INFO: "))
                .map(|l| format!("{l}\n"))
                .collect();
            let why = pgbackrest::explain_failure(out.exit_code, &stdout, &out.stderr);
            let why = match super::verify::damage(&text) {
                Some(d) => format!(
                    "{}: {why}",
                    super::verify::damaged_set(Some(&self.plan.backup_set), d)
                ),
                None => why,
            };
            return Err(if text.contains(STARTED_MARK) {
                DbError::Failed(format!("pgbackrest restore failed: {why}"))
            } else {
                DbError::Invalid(format!(
                    "pgbackrest restore failed before it changed the data directory: {why}"
                ))
            });
        }
        Ok(json!({
            "backup_set": self.plan.backup_set,
            "backup_stopped_ms": self.plan.backup_stopped_ms,
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
        let replayed =
            restore::wait_for_recovery_end(admin, &db.paths().log, self.timeout, progress).await?;
        let (reached, how) = match replayed {
            Some(ms) => (ms, "the last transaction replayed"),
            None => (
                self.plan.backup_stopped_ms,
                "the end of the backup (no transaction committed after it before the target)",
            ),
        };
        Ok(json!({
            "recovered_to_ms": reached,
            "recovered_to": rfc3339(reached),
            "recovered_to_is": how,
        }))
    }
}

impl BackupManager {
    /// `db.recover`: validates, makes sure the newest WAL is archived, then recovers the
    /// database in place (see the module's doc).
    pub async fn recover(
        &self,
        target: Target,
        progress: Progress<'_>,
    ) -> Result<Value, BackupError> {
        if self.db.flavour() == Some(crate::db::params::Flavour::Mariadb) {
            return super::maria_recover::recover(self, target, progress).await;
        }
        let st = self.postgres("db.recover").await?;
        let _state = self.configured()?;
        let _busy = self.busy.lock().await;
        let t = Instant::now();
        // What a refusal before anything ran leaves: the database as it was, which is
        // stopped on a half-restored directory when an earlier recover was cut off.
        let unchanged = |m: String| {
            match st.recovering {
            None => format!("{m}; nothing was changed"),
            Some(_) => format!(
                "{m}; nothing was changed by this command, but the data directory is still half-restored by an earlier recover. {}",
                crate::db::manager::RECOVER_INTERRUPTED
            ),
        }
        };
        progress(5, "reading the repository");
        let info = self.info(&st).await.map_err(|e| match e {
            BackupError::Failed(m) => BackupError::Failed(unchanged(m)),
            other => other,
        })?;
        if !info.reachable() {
            let repo = info.repo_message.unwrap_or_default();
            return Err(BackupError::Failed(unchanged(format!(
                "the backup repository cannot be read: {} (pgBackRest: {}: {repo})",
                pgbackrest::cause(&repo),
                info.status_message,
            ))));
        }
        let plan = plan(&info, &target, dbvm_protocol::now_ms())
            .map_err(|e| BackupError::Invalid(unchanged(e)))?;
        if st.recovering.is_none() {
            progress(10, "archiving the newest WAL before the server stops");
            self.archive_current_wal(&st)
                .await
                .map_err(|e| BackupError::Failed(unchanged(e)))?;
        }
        // Else an earlier recover was cut off: the server is down on a half-restored data
        // directory, whose WAL is not worth archiving; this recover rewrites it again.
        let source = PgRecover {
            target,
            plan,
            process_max: self.settings.process_max,
            timeout: Duration::from_secs(self.settings.timeout_s),
        };
        let mut out = self.db.recover_in_place(&source, progress).await?;
        out["took_ms"] = json!(t.elapsed().as_millis() as u64);
        out["note"] = json!(
            "PostgreSQL continues on a new timeline; WAL archiving goes on into the same repository and the next backup continues from there"
        );
        progress(100, "recovered");
        Ok(out)
    }

    /// Switches the current WAL segment out and waits until PostgreSQL reports it
    /// archived: the transactions up to now are in the repository before the data
    /// directory is rewritten.
    async fn archive_current_wal(&self, st: &DbState) -> Result<(), String> {
        let mut admin = Admin::connect(&st.spec, self.db.paths())
            .await
            .map_err(|e| {
                format!(
                    "the database does not answer ({e}); a recover first archives its newest WAL: start it (db.start) and send db.recover again"
                )
            })?;
        let Admin::Postgres(c, _) = &mut admin else {
            return Err("WAL archiving is PostgreSQL's".into());
        };
        let seg: String = c
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .map_err(|e| format!("cannot switch the WAL segment: {e}"))?
            .get(0);
        let deadline = Instant::now() + self.settings.tuning().call_timeout();
        loop {
            let row = c
                .query_one(
                    "SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''),
                            coalesce(last_failed_time > coalesce(last_archived_time, 'epoch'), false)
                     FROM pg_stat_archiver",
                    &[],
                )
                .await
                .map_err(|e| format!("cannot read pg_stat_archiver: {e}"))?;
            let (archived, failed, failing): (String, String, bool) =
                (row.get(0), row.get(1), row.get(2));
            // Names of one timeline sort in WAL order; `.partial` and `.history` files
            // sort beside them without passing a later segment.
            if archived.as_str() >= seg.as_str() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "WAL segment {seg} did not reach the repository within {:?} ({}): a recover now would lose the transactions in it",
                    self.settings.tuning().call_timeout(),
                    if failing {
                        format!("archiving is failing, last at {failed}")
                    } else {
                        format!("last archived: {archived:?}")
                    }
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::pgbackrest::BackupSet;

    fn set(label: &str, stopped_ms: i64, error: bool) -> BackupSet {
        BackupSet::for_test(label, "full", stopped_ms - 5000, stopped_ms, 1, error)
    }

    fn info(backups: Vec<BackupSet>) -> Info {
        Info {
            status_code: 0,
            status_message: "ok".into(),
            repo_message: None,
            backups,
            archive_min: None,
            archive_max: None,
        }
    }

    #[test]
    fn the_newest_backup_before_the_target_is_chosen_and_the_window_is_named() {
        let now = 1_000_000_000;
        let i = info(vec![
            set("A", 100_000, false),
            set("B", 200_000, false),
            set("C", 300_000, true),
        ]);
        let p = plan(&i, &Target::Time(250_000), now).unwrap();
        assert_eq!(p.backup_set, "B");
        assert_eq!(
            plan(&i, &Target::Time(150_000), now).unwrap().backup_set,
            "A"
        );
        // A backup that ended within the same second as the target is not before it.
        assert_eq!(
            plan(&i, &Target::Time(200_500), now).unwrap().backup_set,
            "A"
        );
        assert_eq!(plan(&i, &Target::Latest, now).unwrap().backup_set, "B");
        let e = plan(&i, &Target::Time(50_000), now).unwrap_err();
        assert!(e.contains("outside the recoverable window"), "{e}");
        assert!(e.contains(&rfc3339(101_000)), "{e}");
        assert!(plan(&i, &Target::Time(now + 1), now).is_err());
        let e = plan(&info(vec![]), &Target::Latest, now).unwrap_err();
        assert!(e.contains("no backup"), "{e}");
    }
}
