//! `db.restore` of a MariaDB database: the full backup and the incrementals a target time
//! needs, streamed from the bucket into a one-shot container (`zstd -d | mbstream -x`),
//! each object's SHA-256 checked against the chain's manifest while it streams; prepared
//! (the full, then each incremental) and moved into the empty data directory only when
//! every object matched. After the server starts, the binlogs from the backup's position
//! are replayed up to the target (`mariadb-binlog --stop-datetime`, one-second resolution:
//! events of the target's own second are not replayed, so nothing after the target ever
//! is).
//!
//! The plan (which chain, which objects) is made from the manifests before anything on
//! the VM is touched: a target outside the recoverable window is refused with the window.
//! The unpacking ([`unpack`]) and the replay ([`replay`]) serve the restore drill
//! ([`super::maria_verify`]) and the in-place recover ([`super::maria_recover`]) too.

use super::manifest::{self, Plan};
use super::mariabackup::{make_fifo, sh_quote};
use super::restore::{rfc3339, Target};
use super::s3::S3;
use super::storage::Storage;
use crate::db::engine::Admin;
use crate::db::manager::{DataSource, ProgressFn};
use crate::db::params::Flavour;
use crate::db::{DbError, DbManager, DbState};
use async_trait::async_trait;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A MariaDB restore from a bucket's chains.
pub struct MariaRestore {
    storage: Storage,
    target: Target,
    s3: S3,
    plan: Plan,
    timeout: Duration,
}

/// Reads the manifests and makes the plan: refused (nothing touched) when the target is
/// outside what the bucket can reach.
pub async fn prepare(
    storage: Storage,
    target: Target,
    io_timeout: Duration,
    timeout: Duration,
) -> Result<MariaRestore, String> {
    let s3 = S3::new(&storage.endpoint(), io_timeout).map_err(|e| e.to_string())?;
    let all = super::mariabackup::manifests(&s3)
        .await
        .map_err(|e| format!("the source's backups cannot be read: {e}"))?;
    let t = match target {
        Target::Latest => None,
        Target::Time(ms) => Some(ms),
    };
    let plan = manifest::plan(&all, t)?;
    Ok(MariaRestore {
        storage,
        target,
        s3,
        plan,
        timeout,
    })
}

impl MariaRestore {
    pub fn stage(db: &DbManager) -> PathBuf {
        db.paths().root.join("restore-stage")
    }

    /// A restore from an already read plan (`db.recover` makes its own, see
    /// [`super::maria_recover`]).
    pub fn from_plan(
        storage: Storage,
        target: Target,
        s3: S3,
        plan: Plan,
        timeout: Duration,
    ) -> Self {
        Self {
            storage,
            target,
            s3,
            plan,
            timeout,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn s3(&self) -> &S3 {
        &self.s3
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What `populate` reports: the backups restored.
    pub fn restored(&self) -> Value {
        let chosen = self.plan.backups.last();
        json!({
            "backup_set": chosen.map(|b| &b.label),
            "chain": self.plan.chain,
            "backups": self.plan.backups.iter().map(|b| json!({"label": b.label, "type": b.kind, "size_bytes": b.size})).collect::<Vec<_>>(),
            "backup_stopped_ms": chosen.map(|b| b.stopped_ms),
            "target": self.describe()["target"],
        })
    }
}

/// One unpacking of backups from the bucket into a stage directory (see [`unpack`]).
pub struct Unpack<'a> {
    pub s3: &'a S3,
    /// The full backup and its incrementals up to the one wanted, in order.
    pub backups: &'a [manifest::Backup],
    /// Made afresh (what was there goes); `b0` holds the prepared copy when no move-back
    /// is asked for.
    pub stage: &'a Path,
    /// The one-shot container's role (its name).
    pub role: &'a str,
    /// Memory (bytes) and CPUs of the container, when bounded (the restore drill).
    pub limits: Option<(u64, f64)>,
    /// The server's config whose data directory receives the prepared copy
    /// (`mariadb-backup --move-back`); `None`: it stays in the stage.
    pub move_back: Option<&'a Path>,
    pub timeout: Duration,
}

/// Why an unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An object is missing from the bucket or differs from what its manifest recorded.
    #[error("backup {label} ({kind}): {why}")]
    Object {
        label: String,
        kind: String,
        why: String,
    },
    /// The bucket could not be read (nothing says the backups are damaged).
    #[error("backup {label} ({kind}): {why}")]
    Storage {
        label: String,
        kind: String,
        why: String,
    },
    /// The one-shot container could not run or its script failed.
    #[error(transparent)]
    Tool(#[from] DbError),
}

impl UnpackError {
    /// As a [`DbError`]: an object or storage failure refused before any prepare, with
    /// `refused` saying what that left.
    pub fn into_db(self, refused: &str) -> DbError {
        match self {
            UnpackError::Tool(e) => e,
            e => DbError::Failed(format!(
                "{refused}: {e} (the chain in the bucket is damaged or incomplete, or the bucket cannot be read; restore to another time or from another chain)"
            )),
        }
    }
}

/// Streams each backup of `u.backups` from the bucket into a one-shot container
/// (`zstd -d | mbstream -x`), checking each object's size and SHA-256 against its manifest
/// while it streams; the container prepares (the full, then each incremental) only when
/// every object matched, and moves the copy into the data directory when asked. What was
/// unpacked is removed on any failure (a copy of the source's data, not trusted).
pub async fn unpack(db: &DbManager, st: &DbState, u: &Unpack<'_>) -> Result<(), UnpackError> {
    let (uid, gid) = (db.settings().uid, db.settings().gid);
    let stage = u.stage.to_path_buf();
    let work = stage.clone();
    tokio::task::spawn_blocking(move || fresh_dir(&work, uid, gid))
        .await
        .map_err(|e| DbError::Failed(format!("cannot prepare {}: {e}", stage.display())))??;
    let n = u.backups.len();
    let fifos: Vec<PathBuf> = (0..n).map(|i| stage.join(format!("in-{i}"))).collect();
    let verdict = stage.join("verdict");
    for f in fifos.iter().chain(std::iter::once(&verdict)) {
        make_fifo(f, uid, gid).map_err(|e| DbError::Failed(e.to_string()))?;
    }
    let script = restore_script(&stage, n, u.move_back, &|p| db.program_fn()(p));
    // Set once the container is gone: a FIFO nobody will read is not waited for.
    let done = std::sync::atomic::AtomicBool::new(false);
    let tool = async {
        let r = db
            .run_tool_bounded(
                st,
                u.role,
                u.limits,
                |program| vec![program("sh"), "-c".into(), script.clone()],
                u.timeout,
            )
            .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let feed = async {
        let mut failure: Option<UnpackError> = None;
        for (i, b) in u.backups.iter().enumerate() {
            let file = match open_writer(&fifos[i], &done).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    failure.get_or_insert(UnpackError::Tool(DbError::Failed(format!(
                        "the unpacking container stopped before it read backup {}",
                        b.label
                    ))));
                    continue;
                }
                Err(e) => {
                    failure.get_or_insert(UnpackError::Tool(DbError::Failed(format!(
                        "cannot open {}: {e}",
                        fifos[i].display()
                    ))));
                    continue;
                }
            };
            if failure.is_some() {
                // Closed at once: the container reads an empty stream, then the verdict.
                continue;
            }
            let mut tx = match tokio::net::unix::pipe::Sender::from_file(file) {
                Ok(t) => t,
                Err(e) => {
                    failure = Some(UnpackError::Tool(DbError::Failed(format!(
                        "cannot write {}: {e}",
                        fifos[i].display()
                    ))));
                    continue;
                }
            };
            let got = u.s3.download(&b.key, &mut tx, Some(&b.sha256)).await;
            drop(tx);
            failure = match check_object(got, b) {
                Ok(()) => None,
                // The container stopped reading (zstd or mbstream refused what it got,
                // which a damaged object does before its end is hashed): the object is
                // read once more, whole, to tell damage from a failing tool.
                Err(UnpackError::Tool(e)) => Some(
                    check_object(
                        u.s3.download(&b.key, &mut tokio::io::sink(), Some(&b.sha256))
                            .await,
                        b,
                    )
                    .err()
                    .unwrap_or(UnpackError::Tool(e)),
                ),
                Err(e) => Some(e),
            };
        }
        if let Ok(Some(f)) = open_writer(&verdict, &done).await {
            use std::io::Write;
            let mut f = f;
            let word = if failure.is_none() {
                "ok\n"
            } else {
                "refused\n"
            };
            let _ = tokio::task::spawn_blocking(move || f.write_all(word.as_bytes())).await;
        }
        failure
    };
    let (out, failure) = tokio::join!(tool, feed);
    if out.is_err() || failure.is_some() || out.as_ref().is_ok_and(|o| o.exit_code != 0) {
        let _ = std::fs::remove_dir_all(&stage);
    }
    let out = out?;
    if let Some(f) = failure {
        return Err(f);
    }
    if out.exit_code != 0 {
        return Err(UnpackError::Tool(DbError::Failed(format!(
            "unpacking or preparing the backup failed (exit code {}):\n{}\n{}",
            out.exit_code,
            tail(&out.stderr),
            tail(&out.stdout)
        ))));
    }
    Ok(())
}

/// Opens a FIFO for writing once its reader is there (the container's shell opens it);
/// `None` when the container is gone first. Polled with non-blocking opens: a blocking
/// open waits for a reader that may never come, and no signal can wake it reliably.
async fn open_writer(
    path: &Path,
    done: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => return Ok(Some(f)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A download's result against the manifest's record of the object: damaged or missing
/// objects are told from a storage that cannot be read.
pub fn check_object(
    got: Result<super::s3::Stored, super::s3::S3Error>,
    b: &manifest::Backup,
) -> Result<(), UnpackError> {
    use super::s3::S3Error;
    let (label, kind) = (b.label.clone(), b.kind.clone());
    match got {
        Ok(s) if s.size == b.size => Ok(()),
        Ok(s) => Err(UnpackError::Object {
            label,
            kind,
            why: format!(
                "object {} has {} bytes, the manifest recorded {}",
                b.key, s.size, b.size
            ),
        }),
        Err(e @ (S3Error::Mismatch { .. } | S3Error::NotFound { .. })) => {
            Err(UnpackError::Object {
                label,
                kind,
                why: e.to_string(),
            })
        }
        Err(e @ S3Error::Io { .. }) => Err(UnpackError::Tool(DbError::Failed(format!(
            "backup {label} ({kind}): {e} (the unpacking container stopped reading)"
        )))),
        Err(e) => Err(UnpackError::Storage {
            label,
            kind,
            why: e.to_string(),
        }),
    }
}

fn fresh_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), DbError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| DbError::io("create", dir, e))?;
    nix::unistd::chown(
        dir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| DbError::Failed(format!("cannot chown {}: {e}", dir.display())))
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// `--stop-datetime` for a target: the start of the target's second (mariadb-binlog
/// compares whole seconds, in the container's UTC).
fn stop_datetime(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[async_trait]
impl DataSource for MariaRestore {
    fn describe(&self) -> Value {
        json!({ "location": self.storage.describe(), "target": match self.target {
            Target::Latest => json!("latest"),
            Target::Time(ms) => json!(rfc3339(ms)),
        }})
    }

    async fn populate(
        &self,
        db: &DbManager,
        st: &DbState,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let stage = Self::stage(db);
        progress(
            62,
            &format!(
                "streaming {} backup(s) of chain {} from {}/{}",
                self.plan.backups.len(),
                self.plan.chain,
                self.storage.bucket,
                self.storage.prefix
            ),
        );
        let config = db.paths().main_config(Flavour::Mariadb);
        unpack(
            db,
            st,
            &Unpack {
                s3: &self.s3,
                backups: &self.plan.backups,
                stage: &stage,
                role: "restore",
                limits: None,
                move_back: Some(&config),
                timeout: self.timeout,
            },
        )
        .await
        .map_err(|e| e.into_db("restore refused, nothing was started"))?;
        Ok(self.restored())
    }

    async fn finish(
        &self,
        db: &DbManager,
        st: &DbState,
        _admin: &mut Admin,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let out = replay(
            db,
            st,
            &self.s3,
            &self.plan,
            &Self::stage(db),
            self.timeout,
            progress,
        )
        .await?;
        let _ = std::fs::remove_dir_all(Self::stage(db));
        Ok(out)
    }
}

/// Replays the uploaded binlogs `plan` names from its backup's position up to its target
/// into the running server (fetched into `stage/binlog`, each checked against its
/// SHA-256 first); says what point was reached.
pub async fn replay(
    db: &DbManager,
    st: &DbState,
    s3: &S3,
    plan: &Plan,
    stage: &Path,
    timeout: Duration,
    progress: ProgressFn<'_>,
) -> Result<Value, DbError> {
    let (uid, gid) = (db.settings().uid, db.settings().gid);
    let logs = stage.join("binlog");
    let chosen_stop = plan.backups.last().map_or(0, |b| b.stopped_ms);
    let mut reached = chosen_stop;
    let mut replayed = 0usize;
    if !plan.binlogs.is_empty() && plan.start_pos.is_some() {
        fresh_dir(&logs, uid, gid)?;
        progress(
            82,
            &format!("fetching {} binlog(s) to replay", plan.binlogs.len()),
        );
        let mut files = Vec::new();
        for l in &plan.binlogs {
            let path = logs.join(&l.name);
            let mut f = tokio::fs::File::create(&path)
                .await
                .map_err(|e| DbError::io("create", &path, e))?;
            s3
                    .download(&l.key, &mut f, Some(&l.sha256))
                    .await
                    .map_err(|e| {
                        DbError::Failed(format!(
                            "binlog {} cannot be used: {e}; the restored database is not the target (send the restore again to a time before this binlog)",
                            l.name
                        ))
                    })?;
            nix::unistd::chown(
                &path,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| DbError::Failed(format!("cannot chown {}: {e}", path.display())))?;
            files.push(path);
        }
        progress(86, "replaying binlogs up to the target");
        let mut words = vec![sh_quote(&db.program_fn()("mariadb-binlog"))];
        if let Some(pos) = plan.start_pos {
            words.push(format!("--start-position={pos}"));
        }
        if let Some(stop) = plan.stop_ms {
            words.push(sh_quote(&format!(
                "--stop-datetime={}",
                stop_datetime(stop)
            )));
        }
        words.extend(files.iter().map(|f| sh_quote(&f.display().to_string())));
        let client = [
            sh_quote(&db.program_fn()("mariadb")),
            "--user=mysql".to_string(),
            sh_quote(&format!("--socket={}", db.paths().mysql_socket().display())),
        ];
        let script = format!(
            "set -o pipefail; {} | {} && echo 'dbvm: replayed'",
            words.join(" "),
            client.join(" ")
        );
        let out = db
            .run_tool(
                st,
                "restore",
                |program| vec![program("sh"), "-c".into(), script.clone()],
                timeout,
            )
            .await?;
        if out.exit_code != 0 || !out.stdout.contains("dbvm: replayed") {
            return Err(DbError::Failed(format!(
                "replaying the binlogs failed (exit code {}):\n{}",
                out.exit_code,
                tail(&out.stderr)
            )));
        }
        replayed = files.len();
        reached = match plan.stop_ms {
            Some(t) => t.div_euclid(1000) * 1000 - 1,
            None => plan.reached_ms,
        }
        .max(chosen_stop);
    }
    Ok(json!({
        "recovered_to_ms": reached,
        "recovered_to": rfc3339(reached),
        "recovered_to_is": if replayed > 0 && plan.stop_ms.is_none() {
            "the last event of the newest uploaded binlog"
        } else if replayed > 0 {
            "the last whole second before the target (binlog events carry whole seconds)"
        } else {
            "the end of the backup (no binlog follows it before the target)"
        },
        "binlogs_replayed": replayed,
    }))
}

/// The container's script: each backup object from its FIFO through `zstd -d | mbstream
/// -x`, then the agent's verdict on the checksums, then prepare and move into the data
/// directory. Nothing is prepared unless the verdict is `ok`.
fn restore_script(
    stage: &Path,
    n: usize,
    move_back: Option<&Path>,
    program: &dyn Fn(&str) -> String,
) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let backup = sh_quote(&program("mariadb-backup"));
    let mut s = String::from("set -e; set -o pipefail; ");
    for i in 0..n {
        let dir = stage.join(format!("b{i}"));
        s.push_str(&format!(
            "mkdir -p {d}; {zstd} -d -q < {fifo} | {mbstream} -x -C {d}; ",
            d = q(&dir),
            zstd = sh_quote(&program("zstd")),
            fifo = q(&stage.join(format!("in-{i}"))),
            mbstream = sh_quote(&program("mbstream")),
        ));
    }
    s.push_str(&format!(
        "read v < {verdict}; if [ \"$v\" != ok ]; then echo 'dbvm: the agent refused the stream' >&2; exit 3; fi; ",
        verdict = q(&stage.join("verdict"))
    ));
    let full = stage.join("b0");
    s.push_str(&format!("{backup} --prepare --target-dir={}; ", q(&full)));
    for i in 1..n {
        s.push_str(&format!(
            "{backup} --prepare --target-dir={} --incremental-dir={}; ",
            q(&full),
            q(&stage.join(format!("b{i}")))
        ));
    }
    if let Some(config) = move_back {
        let defaults = sh_quote(&format!("--defaults-file={}", config.display()));
        s.push_str(&format!(
            "{backup} {defaults} --move-back --target-dir={}; ",
            q(&full)
        ));
    }
    s.push_str("echo 'dbvm: restored'");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restore_script_prepares_only_after_the_verdict() {
        let s = restore_script(
            Path::new("/d/restore-stage"),
            2,
            Some(Path::new("/d/conf/my.cnf")),
            &|p: &str| p.to_string(),
        );
        let verdict = s.find("read v <").unwrap();
        assert!(s.find("--prepare").unwrap() > verdict, "{s}");
        assert!(
            s.find("mbstream' -x -C '/d/restore-stage/b1'").unwrap() < verdict,
            "{s}"
        );
        assert!(s.contains("--incremental-dir='/d/restore-stage/b1'"), "{s}");
        assert!(
            s.ends_with("--move-back --target-dir='/d/restore-stage/b0'; echo 'dbvm: restored'"),
            "{s}"
        );
        assert_eq!(stop_datetime(1_796_320_800_250), "2026-12-03 18:00:00");
    }
}
