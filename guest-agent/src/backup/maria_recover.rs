//! `db.recover` of a MariaDB database: recovered IN PLACE, on the same VM, from its own
//! bucket's chains, to `latest` or a point in time (as PostgreSQL's, [`super::recover`]).
//!
//! Everything that can be checked is checked before the server stops: backups are
//! configured, the bucket answers, and the target lies inside the recoverable window
//! (refused with the same wording as `db.restore`, [`super::manifest::plan`]). While the
//! server runs, the binlog is rotated and every rotated binlog uploaded first (one round
//! of the uploader), so nothing acknowledged is lost with the old data directory; then
//! the plan is made again from the manifests. Then [`DbManager::recover_in_place`] marks
//! the state (`recovering`), stops the server and runs [`MariaRecover`]: the data
//! directory is moved aside (`recover-old/` beside it), the backups are streamed, checked
//! against their SHA-256, prepared and moved into a fresh data directory (as `db.restore`
//! does, [`super::maria_restore`]); a failure before the move-back puts the old directory
//! back and the database runs on as before. After the server starts, the binlogs are
//! replayed up to the target, and only then the old directory is removed.
//!
//! The recovered server goes on in the same bucket as on a new timeline: its binlogs
//! are numbered from two past the highest number the bucket or the old server used
//! (`RESET MASTER TO`), so no upload replaces an object of the old chains and their
//! manifests see a gap (no restore of an old chain replays the new timeline); and the
//! next backup is a full one, starting a new chain (an incremental on the old chain
//! would miss pages changed after the recover: their LSNs lie below the chain's last
//! one). The recover takes that full backup itself, once the server runs; until it has
//! one, a restore reaches the point recovered to, not the writes after it.

use super::manifest::{self, Manifest, Plan};
use super::maria_restore::{replay, unpack, MariaRestore, Unpack};
use super::restore::{rfc3339, Target};
use super::s3::S3;
use super::{BackupError, BackupManager, Progress, RunKind};
use crate::db::engine::Admin;
use crate::db::manager::{DataSource, ProgressFn};
use crate::db::params::Flavour;
use crate::db::{DbError, DbManager, DbState};
use async_trait::async_trait;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the first backup after a recover is a full one (see the module's doc).
pub const NEW_CHAIN_WHY: &str =
    "the first backup after an in-place recover starts a new chain (the old chain's LSNs are ahead of the recovered data)";

/// The marker that the next backup must start a new chain.
fn marker(m: &BackupManager) -> PathBuf {
    m.state_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("maria-new-chain")
}

/// Whether the next MariaDB backup must be full (an in-place recover happened since
/// the last full one).
pub fn new_chain_needed(m: &BackupManager) -> bool {
    marker(m).exists()
}

/// A full backup started a new chain: the marker goes.
pub fn new_chain_started(m: &BackupManager) {
    let _ = std::fs::remove_file(marker(m));
}

/// Where the old data directory waits until the recovered server runs.
fn old_dir(db: &DbManager) -> PathBuf {
    db.paths().root.join("recover-old")
}

/// The in-place restore as a [`DataSource`] of [`DbManager::recover_in_place`].
pub struct MariaRecover {
    restore: MariaRestore,
    target: Target,
    /// The number of the first binlog the recovered server writes.
    binlog_start: u64,
    /// An earlier recover was cut off: the data directory is half-restored and the data
    /// as they were before it wait in `recover-old/`.
    half_restored: bool,
}

#[async_trait]
impl DataSource for MariaRecover {
    fn describe(&self) -> Value {
        json!({
            "in_place": true,
            "target": self.target.describe(),
            "backup_set": self.restore.plan().backups.last().map(|b| &b.label),
        })
    }

    async fn populate(
        &self,
        db: &DbManager,
        st: &DbState,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let (uid, gid) = (db.settings().uid, db.settings().gid);
        let data = db.paths().data.clone();
        let old = old_dir(db);
        let keep_old = self.half_restored && old.exists();
        let (d, o) = (data.clone(), old.clone());
        // The data directory aside (or, after a cut-off recover, its half-restored
        // content gone: the data as they were before wait in `recover-old/` already).
        let moved = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&d)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o700);
            let moved = if keep_old {
                std::fs::remove_dir_all(&d)
                    .or_else(|e| {
                        (e.kind() == std::io::ErrorKind::NotFound)
                            .then_some(())
                            .ok_or(e)
                    })
                    .map_err(|e| format!("cannot remove the half-restored {}: {e}", d.display()))?;
                false
            } else {
                if o.exists() {
                    // What a finished recover could not remove: not the data any more.
                    std::fs::remove_dir_all(&o)
                        .map_err(|e| format!("cannot remove the leftover {}: {e}", o.display()))?;
                }
                std::fs::rename(&d, &o).map_err(|e| {
                    format!(
                        "cannot move the data directory {} aside to {}: {e}",
                        d.display(),
                        o.display()
                    )
                })?;
                true
            };
            std::fs::create_dir(&d)
                .and_then(|_| std::os::unix::fs::chown(&d, Some(uid), Some(gid)))
                .and_then(|_| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)))
                .map_err(|e| {
                    format!("cannot make the fresh data directory {}: {e}", d.display())
                })?;
            Ok(moved)
        })
        .await
        .map_err(|e| DbError::Failed(format!("cannot move the data directory aside: {e}")))?;
        let moved = match moved {
            Ok(m) => m,
            // Nothing of the data was touched when the move itself failed (a rename is
            // whole or nothing); a fresh directory that could not be made is put back.
            Err(e) => return Err(self.put_back(db, &data, &old, e, !keep_old).await),
        };
        progress(
            40,
            &format!(
                "streaming {} backup(s) of chain {} into a fresh data directory",
                self.restore.plan().backups.len(),
                self.restore.plan().chain
            ),
        );
        let config = db.paths().main_config(Flavour::Mariadb);
        let unpacked = unpack(
            db,
            st,
            &Unpack {
                s3: self.restore.s3(),
                backups: &self.restore.plan().backups,
                stage: &MariaRestore::stage(db),
                role: "recover",
                limits: None,
                move_back: Some(&config),
                timeout: self.restore.timeout(),
            },
        )
        .await;
        if let Err(e) = unpacked {
            let why = e.into_db("the backups could not be restored").to_string();
            return Err(self.put_back(db, &data, &old, why, moved).await);
        }
        Ok(self.restore.restored())
    }

    async fn finish(
        &self,
        db: &DbManager,
        st: &DbState,
        admin: &mut Admin,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        // Before the replay, which the server logs: the new timeline's first binlog.
        if let Admin::Mysql(c) = admin {
            use mysql_async::prelude::Queryable;
            c.query_drop(format!("RESET MASTER TO {}", self.binlog_start))
                .await
                .map_err(|e| {
                    DbError::Failed(format!(
                        "cannot number the recovered server's binlogs from {}: {e}",
                        self.binlog_start
                    ))
                })?;
        }
        let stage = MariaRestore::stage(db);
        let mut out = replay(
            db,
            st,
            self.restore.s3(),
            self.restore.plan(),
            &stage,
            self.restore.timeout(),
            progress,
        )
        .await?;
        let old = old_dir(db);
        let removed = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&stage);
            match std::fs::remove_dir_all(&old) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!(
                    "the old data directory {} could not be removed ({e}); the next recover removes it",
                    old.display()
                )),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("the cleanup task failed: {e}")));
        out["binlogs_continue_at"] = json!(format!("binlog.{:06}", self.binlog_start));
        if let Err(w) = removed {
            out["warning"] = json!(w);
        }
        Ok(out)
    }
}

impl MariaRecover {
    /// A failure before the restored data were moved in: the old data directory goes back
    /// where it was (when this recover moved it), and the error says nothing changed
    /// ([`DbError::Invalid`]: the database starts again as it was).
    async fn put_back(
        &self,
        db: &DbManager,
        data: &Path,
        old: &Path,
        why: String,
        moved: bool,
    ) -> DbError {
        if !moved {
            return DbError::Failed(why);
        }
        let (d, o) = (data.to_path_buf(), old.to_path_buf());
        let stage = MariaRestore::stage(db);
        let back = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&stage);
            match std::fs::remove_dir_all(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::fs::rename(&o, &d)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match back {
            Ok(()) => DbError::Invalid(format!("{why}; the old data directory was put back")),
            Err(e) => DbError::Failed(format!(
                "{why}; the old data directory could not be put back from {} ({e})",
                old.display()
            )),
        }
    }
}

/// The highest binlog number in the bucket's manifests (backups' positions and uploaded
/// binlogs).
fn bucket_max_binlog(all: &[Manifest]) -> u64 {
    all.iter()
        .flat_map(|m| {
            m.binlogs
                .iter()
                .map(|b| b.name.as_str())
                .chain(m.backups.iter().filter_map(|b| b.binlog_file.as_deref()))
        })
        .filter_map(manifest::seq)
        .max()
        .unwrap_or(0)
}

/// The highest binlog number a data directory's server listed.
fn dir_max_binlog(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("binlog.index"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Path::new(l.trim()).file_name())
        .filter_map(|n| manifest::seq(&n.to_string_lossy()))
        .max()
        .unwrap_or(0)
}

/// `db.recover` of a MariaDB database (see the module's doc).
pub(super) async fn recover(
    m: &BackupManager,
    target: Target,
    progress: Progress<'_>,
) -> Result<Value, BackupError> {
    let st = m.db.configured_state().await?;
    if st.spec.engine != Flavour::Mariadb {
        return Err(BackupError::Invalid(
            "this recover is MariaDB's; the database is not MariaDB".into(),
        ));
    }
    let t = Instant::now();
    let unchanged = |msg: String| {
        match st.recovering {
        None => format!("{msg}; nothing was changed"),
        Some(_) => format!(
            "{msg}; nothing was changed by this command, but the data directory is still half-restored by an earlier recover. {}",
            crate::db::manager::RECOVER_INTERRUPTED
        ),
    }
    };
    let _state = m.configured()?;
    let storage = super::mariabackup::load_storage(m)?.ok_or_else(|| {
        BackupError::Invalid(
            "backups are not configured on this VM (send backup.configure first)".into(),
        )
    })?;
    let io = Duration::from_secs(m.settings.io_timeout_s);
    let s3 = S3::new(&storage.endpoint(), io)
        .map_err(|e| BackupError::Invalid(unchanged(e.to_string())))?;
    let mut busy = m.busy.lock().await;
    progress(5, "reading the chains in the bucket");
    let read = |all: Result<Vec<Manifest>, BackupError>| {
        all.map_err(|e| BackupError::Failed(unchanged(format!("the bucket cannot be read: {e}"))))
    };
    let mut all = read(super::mariabackup::manifests(&s3).await)?;
    // A target no upload can bring into the window is refused before anything runs.
    if let Target::Time(ms) = target {
        if ms > dbvm_protocol::now_ms() {
            return Err(BackupError::Invalid(unchanged(format!(
                "target {} is in the future",
                rfc3339(ms)
            ))));
        }
    }
    let before_window = match (&target, manifest::window(&all)) {
        (_, None) => true,
        (Target::Time(ms), Some(w)) => *ms < w.from_ms,
        (Target::Latest, Some(_)) => false,
    };
    if before_window {
        let want = match target {
            Target::Latest => None,
            Target::Time(ms) => Some(ms),
        };
        if let Err(e) = manifest::plan(&all, want) {
            return Err(BackupError::Invalid(unchanged(e)));
        }
    }
    if st.recovering.is_none() {
        // The newest events off the VM first: the old data directory goes. (An earlier
        // recover cut off left the server down on a half-restored directory, whose
        // binlogs are not worth uploading.)
        progress(10, "uploading the newest binlogs before the server stops");
        Admin::connect(&st.spec, m.db.paths()).await.map_err(|e| {
            BackupError::Failed(unchanged(format!(
                "the database does not answer ({e}); a recover first uploads its newest binlog: start it (db.start) and send db.recover again"
            )))
        })?;
        // The uploader's round takes the manifest lock, which a backup holds under
        // `busy`: not held across it.
        drop(busy);
        let round = super::mariabackup::binlog_round(m).await;
        busy = m.busy.lock().await;
        round.map_err(|e| {
            BackupError::Failed(unchanged(format!(
                "the newest binlogs could not be uploaded ({e}): a recover now would lose the transactions in them"
            )))
        })?;
        all = read(super::mariabackup::manifests(&s3).await)?;
    }
    recover_planned(m, &st, target, storage, s3, all, busy, t, progress).await
}

/// The recover once the bucket's chains are read (under `busy`).
#[allow(clippy::too_many_arguments)]
async fn recover_planned(
    m: &BackupManager,
    st: &DbState,
    target: Target,
    storage: super::storage::Storage,
    s3: S3,
    all: Vec<Manifest>,
    busy: tokio::sync::MutexGuard<'_, ()>,
    t: Instant,
    progress: Progress<'_>,
) -> Result<Value, BackupError> {
    let half_restored = st.recovering.is_some();
    let unchanged = |msg: String| {
        if half_restored {
            format!(
                "{msg}; nothing was changed by this command, but the data directory is still half-restored by an earlier recover. {}",
                crate::db::manager::RECOVER_INTERRUPTED
            )
        } else {
            format!("{msg}; nothing was changed")
        }
    };
    let want = match target {
        Target::Latest => None,
        Target::Time(ms) => Some(ms),
    };
    let plan: Plan = manifest::plan(&all, want).map_err(|e| BackupError::Invalid(unchanged(e)))?;
    let need: u64 = plan.backups.iter().map(|b| b.size).sum::<u64>() + (64 << 20);
    if let Some(free) = super::verify::free_bytes(&m.db.paths().root) {
        if free < need {
            return Err(BackupError::Failed(unchanged(format!(
                "not enough disk space to restore beside the old data directory: more than {} MiB are needed under {}, {} MiB are free",
                need >> 20,
                m.db.paths().root.display(),
                free >> 20
            ))));
        }
    }
    // The new timeline's binlogs: two past any number used, so the old chains see a gap.
    let used = bucket_max_binlog(&all)
        .max(dir_max_binlog(&m.db.paths().data))
        .max(dir_max_binlog(&old_dir(&m.db)));
    let binlog_start = used + 2;
    let source = MariaRecover {
        restore: MariaRestore::from_plan(
            storage,
            target.clone(),
            s3,
            plan,
            Duration::from_secs(m.settings.timeout_s),
        ),
        target,
        binlog_start,
        half_restored,
    };
    // The next backup starts a new chain, whichever runs it.
    if let Err(e) = std::fs::write(marker(m), b"an in-place recover ran\n") {
        return Err(BackupError::Failed(unchanged(format!(
            "cannot record that the next backup must be full ({}: {e})",
            marker(m).display()
        ))));
    }
    // No binlog round reads the data directory while it is replaced.
    let manifest_lock = m.maria.manifest_lock.lock().await;
    let mut out = m.db.recover_in_place(&source, progress).await?;
    drop(manifest_lock);
    drop(busy);
    out["took_ms"] = json!(t.elapsed().as_millis() as u64);
    progress(
        92,
        "taking a full backup: the recovered database starts a new chain",
    );
    let full = m
        .run(RunKind::Full, &|p, msg| progress(92 + p / 15, msg))
        .await;
    out["new_chain"] = match full {
        Ok(b) => json!({"full": b["label"], "stopped_ms": b["stopped_ms"]}),
        Err(e) => json!({
            "error": e.to_string(),
            "what_to_do": "send backup.run: the next backup is a full one and starts a new chain; until then a restore reaches the point recovered to, not the writes after it",
        }),
    };
    out["note"] = json!(
        "MariaDB goes on as on a new timeline: its binlogs continue under new numbers in the same bucket, and a new chain starts with a full backup"
    );
    progress(100, "recovered");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_timeline_numbers_binlogs_past_every_used_one() {
        let m = Manifest {
            chain: "F".into(),
            backups: vec![manifest::Backup {
                label: "F".into(),
                kind: "full".into(),
                key: "k".into(),
                size: 1,
                sha256: "00".into(),
                from_lsn: 0,
                to_lsn: 1,
                binlog_file: Some("binlog.000009".into()),
                binlog_pos: Some(4),
                gtid: None,
                started_ms: 0,
                stopped_ms: 1,
            }],
            binlogs: vec![manifest::Binlog {
                name: "binlog.000007".into(),
                key: "b".into(),
                size: 1,
                sha256: "00".into(),
                first_event_ms: 0,
                last_event_ms: 0,
                uploaded_ms: 0,
            }],
            ..Default::default()
        };
        assert_eq!(bucket_max_binlog(&[m]), 9);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("binlog.index"),
            "/d/data/binlog.000011\n/d/data/binlog.000012\n",
        )
        .unwrap();
        assert_eq!(dir_max_binlog(dir.path()), 12);
        assert_eq!(dir_max_binlog(&dir.path().join("none")), 0);
    }
}
