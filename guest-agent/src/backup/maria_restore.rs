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

use super::manifest::{self, Plan};
use super::mariabackup::{make_fifo, open_fifo, sh_quote, unblock_fifo};
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
    let s3 = S3::new(&storage, io_timeout).map_err(|e| e.to_string())?;
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
    fn stage(db: &DbManager) -> PathBuf {
        db.paths().root.join("restore-stage")
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
        let (uid, gid) = (db.settings().uid, db.settings().gid);
        let stage = Self::stage(db);
        let work = stage.clone();
        let (u, g) = (uid, gid);
        tokio::task::spawn_blocking(move || fresh_dir(&work, u, g))
            .await
            .map_err(|e| DbError::Failed(format!("cannot prepare the restore: {e}")))??;
        let n = self.plan.backups.len();
        let fifos: Vec<PathBuf> = (0..n).map(|i| stage.join(format!("in-{i}"))).collect();
        let verdict = stage.join("verdict");
        for f in fifos.iter().chain(std::iter::once(&verdict)) {
            make_fifo(f, uid, gid).map_err(|e| DbError::Failed(e.to_string()))?;
        }
        progress(
            62,
            &format!(
                "streaming {n} backup(s) of chain {} from {}/{}",
                self.plan.chain, self.storage.bucket, self.storage.prefix
            ),
        );
        let config = db.paths().main_config(Flavour::Mariadb);
        let script = restore_script(&stage, n, &config, &|p| db.program_fn()(p));
        let tool = async {
            let r = db
                .run_tool(
                    st,
                    "restore",
                    |program| vec![program("sh"), "-c".into(), script.clone()],
                    self.timeout,
                )
                .await;
            for f in fifos.iter().chain(std::iter::once(&verdict)) {
                unblock_fifo(f);
            }
            r
        };
        let feed = async {
            let mut failure: Option<String> = None;
            for (i, b) in self.plan.backups.iter().enumerate() {
                let file = match open_fifo(&fifos[i], true).await {
                    Ok(f) => f,
                    Err(e) => {
                        failure.get_or_insert(format!("cannot open {}: {e}", fifos[i].display()));
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
                        failure = Some(format!("cannot write {}: {e}", fifos[i].display()));
                        continue;
                    }
                };
                if let Err(e) = self.s3.download(&b.key, &mut tx, Some(&b.sha256)).await {
                    failure = Some(format!("backup {} ({}): {e}", b.label, b.kind));
                }
            }
            if let Ok(f) = open_fifo(&verdict, true).await {
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
            // What was unpacked is not trusted and not kept (a copy of the source's data).
            let _ = std::fs::remove_dir_all(&stage);
        }
        let out = out?;
        if let Some(f) = failure {
            return Err(DbError::Failed(format!(
                "restore refused, nothing was started: {f} (the chain in the bucket is damaged or incomplete; restore to another time or from another chain)"
            )));
        }
        if out.exit_code != 0 {
            return Err(DbError::Failed(format!(
                "unpacking or preparing the backup failed (exit code {}):\n{}\n{}",
                out.exit_code,
                tail(&out.stderr),
                tail(&out.stdout)
            )));
        }
        let chosen = self.plan.backups.last();
        Ok(json!({
            "backup_set": chosen.map(|b| &b.label),
            "chain": self.plan.chain,
            "backups": self.plan.backups.iter().map(|b| json!({"label": b.label, "type": b.kind, "size_bytes": b.size})).collect::<Vec<_>>(),
            "backup_stopped_ms": chosen.map(|b| b.stopped_ms),
            "target": self.describe()["target"],
        }))
    }

    async fn finish(
        &self,
        db: &DbManager,
        st: &DbState,
        _admin: &mut Admin,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let (uid, gid) = (db.settings().uid, db.settings().gid);
        let stage = Self::stage(db);
        let logs = stage.join("binlog");
        let chosen_stop = self.plan.backups.last().map_or(0, |b| b.stopped_ms);
        let mut reached = chosen_stop;
        let mut replayed = 0usize;
        if !self.plan.binlogs.is_empty() && self.plan.start_pos.is_some() {
            fresh_dir(&logs, uid, gid)?;
            progress(
                82,
                &format!("fetching {} binlog(s) to replay", self.plan.binlogs.len()),
            );
            let mut files = Vec::new();
            for l in &self.plan.binlogs {
                let path = logs.join(&l.name);
                let mut f = tokio::fs::File::create(&path)
                    .await
                    .map_err(|e| DbError::io("create", &path, e))?;
                self.s3
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
            if let Some(pos) = self.plan.start_pos {
                words.push(format!("--start-position={pos}"));
            }
            if let Some(stop) = self.plan.stop_ms {
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
                    self.timeout,
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
            reached = match self.plan.stop_ms {
                Some(t) => t.div_euclid(1000) * 1000 - 1,
                None => self.plan.reached_ms,
            }
            .max(chosen_stop);
        }
        let _ = std::fs::remove_dir_all(&stage);
        Ok(json!({
            "recovered_to_ms": reached,
            "recovered_to": rfc3339(reached),
            "recovered_to_is": if replayed > 0 && self.plan.stop_ms.is_none() {
                "the last event of the newest uploaded binlog"
            } else if replayed > 0 {
                "the last whole second before the target (binlog events carry whole seconds)"
            } else {
                "the end of the backup (no binlog follows it before the target)"
            },
            "binlogs_replayed": replayed,
        }))
    }
}

/// The container's script: each backup object from its FIFO through `zstd -d | mbstream
/// -x`, then the agent's verdict on the checksums, then prepare and move into the data
/// directory. Nothing is prepared unless the verdict is `ok`.
fn restore_script(
    stage: &Path,
    n: usize,
    config: &Path,
    program: &dyn Fn(&str) -> String,
) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let backup = sh_quote(&program("mariadb-backup"));
    let defaults = sh_quote(&format!("--defaults-file={}", config.display()));
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
    s.push_str(&format!(
        "{backup} {defaults} --move-back --target-dir={}; echo 'dbvm: restored'",
        q(&full)
    ));
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
            Path::new("/d/conf/my.cnf"),
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
