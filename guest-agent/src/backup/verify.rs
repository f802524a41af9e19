//! `backup.verify`: the restore drill. A backup never restored is a hope, not a backup.
//!
//! First `pgbackrest verify` reads every file of every backup and every WAL segment in
//! the repository and checks it against its checksum (damage anywhere, including WAL
//! that a point-in-time restore would need, fails the drill, naming what it found).
//! Then the newest backup (or a named one) is restored into a throwaway directory under
//! the data root (`verify/`); both run in one-shot containers of the database's image
//! bounded to [`MEMORY_BYTES`] and [`CPUS`] (the Docker runtime applies them; the process
//! runtime has no limits). pgBackRest checks every file it restores too. A
//! throwaway PostgreSQL then starts on the copy in a second bounded one-shot container,
//! listening on a unix socket inside the throwaway directory only (`listen_addresses` is
//! empty: nothing reaches it over the network), recovers to the backup's consistent
//! point with WAL from the archive, and is checked: `pg_amcheck` on all databases (heap
//! and every B-tree index, with the heap-all-indexed check), and row counts of the
//! largest tables of the user database compared with the live source. Then the copy is
//! removed, whatever happened; a drill cut off by an agent restart leaves it until the
//! next drill removes it first.
//!
//! The result is kept in the backup state file (`last_verify`) for health to report. A
//! damaged backup fails the command with a reason naming the backup; row counts that
//! differ from the source are reported, not failed (the source moved on since the backup
//! unless it was quiet), but a table that is missing from the copy fails the drill.

use super::pgbackrest::{self, BackupSet};
use super::{BackupError, BackupManager, Progress};
use crate::db::{DbError, DbState};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Memory of each drill container: enough for a throwaway server with default buffers
/// and pgBackRest's restore processes, small beside the database's own.
pub const MEMORY_BYTES: u64 = 1 << 30;
/// CPUs of each drill container: one, so the database keeps the rest.
pub const CPUS: f64 = 1.0;
/// How many of the source's largest tables have their rows counted.
pub(super) const TABLES: i64 = 5;
/// The throwaway server's port: it only names its socket file inside the throwaway
/// directory (no TCP listener).
const DRILL_PORT: u16 = 5999;
/// Markers the drill script prints between its steps.
pub(super) const MARK: &str = "dbvm-verify:";

/// What a pgBackRest failure says about the backup itself, if it says it is damaged.
pub fn damage(text: &str) -> Option<&'static str> {
    let l = text.to_lowercase();
    if l.contains("missing file") || l.contains("filemissingerror") || l.contains("nosuchkey") {
        Some("a file of it is missing from the repository")
    } else if l.contains("checksum") {
        Some("a file of it does not match the checksum recorded when it was backed up")
    } else if l.contains("lz4") || l.contains("decompress") || l.contains("formaterror") {
        Some("a file of it cannot be decompressed")
    } else {
        None
    }
}

/// What `pgbackrest verify --output=text` found wrong, if anything: its lines after
/// `status: error` (which backup or WAL range, and how many files are missing or have an
/// invalid checksum). pgBackRest 2.45 exits 0 either way and prints nothing when all is
/// well.
fn repo_damage(stdout: &str) -> Option<String> {
    let mut lines = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
    lines.find(|l| *l == "status: error")?;
    let found: Vec<&str> = lines.collect();
    Some(if found.is_empty() {
        "no details given".to_string()
    } else {
        found.join("; ").replace(": invalid", ": damaged")
    })
}

/// "backup set X … is damaged: why", naming the backup when it is known.
pub fn damaged_set(set: Option<&str>, why: &str) -> String {
    match set {
        Some(s) => format!("backup set {s} (or a backup it builds on) is damaged: {why}"),
        None => format!("the backup chosen for the restore is damaged: {why}"),
    }
}

/// Single quotes for `sh`.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The drill's script: start the throwaway server on the copy (unix socket only), wait
/// until it has recovered and takes writes (`hot_standby` off: no connection while it
/// recovers, so its connection limits need not match the source's), `pg_amcheck` every database, count rows, stop.
fn script(program: &dyn Fn(&str) -> String, dir: &Path, database: &str, timeout_s: u64) -> String {
    let d = |name: &str| q(&dir.join(name).display().to_string());
    let dirq = q(&dir.display().to_string());
    let conn = format!("-h {dirq} -p {DRILL_PORT} -U postgres");
    let psql = q(&program("psql"));
    let tries = timeout_s * 5;
    format!(
        r#"{postgres} -D {data} -c config_file={conf} -c hba_file={hba} -c listen_addresses= -c port={DRILL_PORT} -c unix_socket_directories={dirq} -c archive_mode=off -c hot_standby=off -c logging_collector=off -c max_connections=20 -c shared_buffers=64MB -c jit=off >{log} 2>&1 &
pid=$!
n=0
while :; do
  r=$({psql} {conn} -d postgres -XAtqc 'SELECT NOT pg_is_in_recovery()' 2>/dev/null)
  [ "$r" = t ] && break
  if ! kill -0 $pid 2>/dev/null; then echo '{MARK} server-exited'; tail -n 15 {log}; exit 3; fi
  n=$((n+1))
  if [ $n -gt {tries} ]; then echo '{MARK} server-timeout'; tail -n 15 {log}; kill -INT $pid; wait $pid; exit 4; fi
  sleep 0.2
done
echo '{MARK} ready'
{amcheck} {conn} --all --install-missing --heapallindexed --no-password 2>&1
echo "{MARK} amcheck $?"
{psql} {conn} -d {db} -XAtq -F '|' -v ON_ERROR_STOP=1 -f {counts} 2>&1
echo "{MARK} counts $?"
kill -INT $pid
wait $pid
echo "{MARK} stopped $?"
"#,
        postgres = q(&program("postgres")),
        data = d("data"),
        conf = d("postgresql.conf"),
        hba = d("pg_hba.conf"),
        log = d("server.log"),
        amcheck = q(&program("pg_amcheck")),
        db = q(database),
        counts = d("counts.sql"),
    )
}

/// What the drill script printed, step by step.
#[derive(Debug, Default, PartialEq, Eq)]
struct Script {
    /// Why the server did not come up, with its log's tail.
    not_started: Option<String>,
    amcheck_exit: Option<i64>,
    amcheck_output: Vec<String>,
    counts_exit: Option<i64>,
    /// `index|count` lines (or psql's errors).
    counts_output: Vec<String>,
}

fn parse_script(stdout: &str) -> Script {
    let mut s = Script::default();
    let mut section = 0; // 0 before ready, 1 amcheck, 2 counts, 3 after
    let mut before = Vec::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix(MARK) {
            let mut w = rest.split_whitespace();
            match (w.next(), w.next().and_then(|c| c.parse().ok())) {
                (Some("ready"), _) => section = 1,
                (Some("amcheck"), code) => {
                    s.amcheck_exit = code;
                    section = 2;
                }
                (Some("counts"), code) => {
                    s.counts_exit = code;
                    section = 3;
                }
                (Some(why @ ("server-exited" | "server-timeout")), _) => {
                    s.not_started = Some(why.to_string());
                    section = 4;
                }
                _ => {}
            }
            continue;
        }
        match section {
            1 => s.amcheck_output.push(line.to_string()),
            2 => s.counts_output.push(line.to_string()),
            4 => before.push(line.to_string()),
            _ => {}
        }
    }
    if let Some(why) = &mut s.not_started {
        let what = if why == "server-exited" {
            "stopped while recovering"
        } else {
            "did not finish recovery in time"
        };
        // The server's own reason, when its log has one.
        let reasons: Vec<&str> = before
            .iter()
            .map(String::as_str)
            .filter(|l| {
                ["FATAL:", "PANIC:", "ERROR:", "DETAIL:", "HINT:"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        let lines = if reasons.is_empty() {
            before.iter().map(String::as_str).collect()
        } else {
            reasons
        };
        *why = format!("the restored copy {what}: {}", lines.join("\n"));
    }
    s
}

/// One table compared.
#[derive(Debug, serde::Serialize)]
struct Table {
    table: String,
    source_rows: i64,
    restored_rows: Option<i64>,
}

/// The drill's verdict and what it saw.
struct Drill {
    failed: Option<String>,
    checked: Vec<&'static str>,
    amcheck: Value,
    tables: Vec<Table>,
    warnings: Vec<String>,
    repo_verify_ms: u64,
    restore_ms: u64,
    check_ms: u64,
}

impl BackupManager {
    /// `backup.verify`: the restore drill (see the module's doc). `label`: a backup of
    /// the repository; the newest intact one when absent.
    pub async fn verify(
        &self,
        label: Option<String>,
        progress: Progress<'_>,
    ) -> Result<Value, BackupError> {
        if self.db.flavour() == Some(crate::db::params::Flavour::Mariadb) {
            return super::maria_verify::verify(self, label, progress).await;
        }
        let st = self.postgres("backup.verify").await?;
        let mut state = self.configured()?;
        let _busy = self.busy.lock().await;
        let t = Instant::now();
        progress(5, "reading the repository");
        let info = self.info(&st).await?;
        if !info.reachable() {
            let repo = info.repo_message.unwrap_or_default();
            return Err(BackupError::Failed(format!(
                "the backup repository cannot be read: {} (pgBackRest: {}: {repo}); nothing was verified",
                pgbackrest::cause(&repo),
                info.status_message,
            )));
        }
        let set = choose(&info.backups, label.as_deref()).map_err(BackupError::Invalid)?;
        let dir = self.db.paths().root.join("verify");
        remove_dir(&dir).await.map_err(BackupError::Failed)?;
        let need = set.size_bytes + set.size_bytes / 5 + (64 << 20);
        if let Some(free) = free_bytes(&self.db.paths().root) {
            if free < need {
                return Err(BackupError::Failed(format!(
                    "not enough disk space for the drill's copy of backup set {}: it needs about {} MiB under {}, {} MiB are free; nothing was verified",
                    set.label,
                    need >> 20,
                    self.db.paths().root.display(),
                    free >> 20
                )));
            }
        }
        progress(10, "reading the source's largest tables");
        let (source, source_note) = match self.source_counts(&st).await {
            Ok(s) => (s, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let drill = self.drill(&st, &set, &dir, source, progress).await;
        // The copy goes, however the drill went.
        let removed = remove_dir(&dir).await;
        let mut drill = drill.map_err(|e| BackupError::Failed(format!("{e}")))?;
        if let Some(n) = source_note {
            drill.warnings.push(format!("row counts not compared: {n}"));
        }
        if let Err(e) = removed {
            drill.warnings.push(e);
        }
        let ok = drill.failed.is_none();
        let result = json!({
            "ok": ok,
            "backup_set": set.label,
            "backup_type": set.kind,
            "backup_stopped_ms": set.stopped_ms,
            "reason": drill.failed,
            "checked": drill.checked,
            "amcheck": drill.amcheck,
            "tables": drill.tables,
            "warnings": drill.warnings,
            "limits": {"memory_bytes": MEMORY_BYTES, "cpus": CPUS},
            "timings": {"repo_verify_ms": drill.repo_verify_ms, "restore_ms": drill.restore_ms, "check_ms": drill.check_ms},
            "at_ms": dbvm_protocol::now_ms(),
            "took_ms": t.elapsed().as_millis() as u64,
        });
        self.record_drill(&mut state, result, &set.label, drill.failed, progress)
    }

    /// Keeps a drill's result for health (`last_verify`), reports it as an event
    /// (`backup.verified`, `backup.verify_failed`) and answers the command: both engines'
    /// drills end here, so the schedule and check 10 read them alike.
    pub(super) fn record_drill(
        &self,
        state: &mut super::BackupState,
        result: Value,
        label: &str,
        failed: Option<String>,
        progress: Progress<'_>,
    ) -> Result<Value, BackupError> {
        let ok = failed.is_none();
        state.last_verify = Some(result.clone());
        self.save(state)?;
        if let Some(outbox) = self.outbox.get() {
            let kind = if ok {
                "backup.verified"
            } else {
                "backup.verify_failed"
            };
            outbox.event(
                kind,
                dbvm_protocol::now_ms(),
                json!({"backup_set": label, "ok": ok, "reason": failed}).to_string(),
            );
        }
        progress(100, if ok { "drill passed" } else { "drill FAILED" });
        match failed {
            None => Ok(result),
            Some(reason) => Err(BackupError::Failed(format!(
                "restore drill of backup set {label} FAILED: {reason}"
            ))),
        }
    }

    /// The largest tables of the user database and their row counts now.
    async fn source_counts(&self, st: &DbState) -> Result<Vec<(String, i64)>, String> {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.db.paths().run)
            .port(st.spec.port())
            .user("postgres")
            .dbname(&st.spec.database)
            .application_name("dbvm-agent-verify")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("the source database does not answer: {e}"))?;
        let task = tokio::spawn(conn);
        let res = async {
            let rows = client
                .query(
                    "SELECT format('%I.%I', n.nspname, c.relname)
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                       AND n.nspname NOT LIKE 'pg_toast%'
                     ORDER BY pg_total_relation_size(c.oid) DESC, 1 LIMIT $1",
                    &[&TABLES],
                )
                .await
                .map_err(|e| format!("cannot list the source's tables: {e}"))?;
            let mut out = Vec::new();
            for r in rows {
                // The name comes quoted by the server itself (`format('%I.%I')`).
                let name: String = r.get(0);
                let n: i64 = client
                    .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                    .await
                    .map_err(|e| format!("cannot count the rows of {name}: {e}"))?
                    .get(0);
                out.push((name, n));
            }
            Ok(out)
        }
        .await;
        drop(client);
        task.abort();
        res
    }

    /// The throwaway directory: `data/` for the copy, the throwaway server's own config
    /// (empty: defaults and the command line) and client authentication (its socket's
    /// directory is the throwaway directory, 0700), the counting queries.
    fn prepare(&self, dir: &Path, source: &[(String, i64)]) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let s = self.db.settings();
        for d in [dir.to_path_buf(), dir.join("data")] {
            std::fs::create_dir_all(&d)
                .and_then(|_| std::os::unix::fs::chown(&d, Some(s.uid), Some(s.gid)))
                .and_then(|_| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)))
                .map_err(|e| format!("cannot prepare {}: {e}", d.display()))?;
        }
        let counts: String = source
            .iter()
            .enumerate()
            .map(|(i, (name, _))| format!("SELECT {i}, count(*) FROM {name};\n"))
            .collect();
        for (name, text) in [
            (
                "postgresql.conf",
                "# the restore drill's throwaway server: defaults and its command line\n"
                    .to_string(),
            ),
            ("pg_hba.conf", "local all postgres trust\n".to_string()),
            ("counts.sql", counts),
        ] {
            crate::db::engine::write_owned(&dir.join(name), text.as_bytes(), 0o600, s.uid, s.gid)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn drill(
        &self,
        st: &DbState,
        set: &BackupSet,
        dir: &Path,
        source: Vec<(String, i64)>,
        progress: Progress<'_>,
    ) -> Result<Drill, DbError> {
        let mut d = Drill {
            failed: None,
            checked: Vec::new(),
            amcheck: Value::Null,
            tables: Vec::new(),
            warnings: Vec::new(),
            repo_verify_ms: 0,
            restore_ms: 0,
            check_ms: 0,
        };
        let timeout = Duration::from_secs(self.settings.timeout_s);
        let config = pgbackrest::config_path(self.db.paths());
        let args = vec![
            format!("--pg1-path={}", dir.join("data").display()),
            format!("--set={}", set.label),
            "--type=immediate".to_string(),
            "--target-action=promote".to_string(),
            format!("--process-max={}", self.settings.process_max),
        ];
        progress(
            15,
            "pgbackrest verify: every backup and WAL file of the repository",
        );
        let t = Instant::now();
        let verify_args = [
            "--output=text".to_string(),
            format!("--process-max={}", self.settings.process_max),
        ];
        let out = self
            .db
            .run_tool_bounded(
                st,
                "verify",
                Some((MEMORY_BYTES, CPUS)),
                |program| pgbackrest::argv(program, &config, &verify_args, "verify"),
                timeout,
            )
            .await?;
        d.repo_verify_ms = t.elapsed().as_millis() as u64;
        if out.exit_code != 0 {
            d.failed = Some(format!(
                "pgbackrest verify could not check the repository: {}",
                pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr)
            ));
            return Ok(d);
        }
        if let Some(found) = repo_damage(&out.stdout) {
            d.failed = Some(format!(
                "pgbackrest verify found the repository damaged (backup set {} was not restored): {found}",
                set.label
            ));
            return Ok(d);
        }
        d.checked.push(
            "pgbackrest verify: every file of every backup and every WAL segment in the repository against its checksum",
        );
        // Made only now: a drill container left by an agent that died mid-drill was
        // replaced by the step above and can no longer write into the new copy.
        remove_dir(dir).await.map_err(DbError::Failed)?;
        self.prepare(dir, &source).map_err(DbError::Failed)?;
        progress(
            20,
            &format!(
                "restoring backup set {} into a throwaway directory",
                set.label
            ),
        );
        let t = Instant::now();
        let out = self
            .db
            .run_tool_bounded(
                st,
                "verify",
                Some((MEMORY_BYTES, CPUS)),
                |program| pgbackrest::argv(program, &config, &args, "restore"),
                timeout,
            )
            .await?;
        d.restore_ms = t.elapsed().as_millis() as u64;
        if out.exit_code != 0 {
            let text = format!("{}\n{}", out.stdout, out.stderr);
            let why = pgbackrest::explain_failure(out.exit_code, &out.stdout, &out.stderr);
            d.failed = Some(match damage(&text) {
                Some(dmg) => format!("{}: {why}", damaged_set(Some(&set.label), dmg)),
                None => format!("backup set {} could not be restored: {why}", set.label),
            });
            return Ok(d);
        }
        d.checked
            .push("restore: every file against its checksum in the backup's manifest");
        progress(
            55,
            "starting a throwaway server on the copy and checking it",
        );
        let t = Instant::now();
        let database = st.spec.database.clone();
        let out = self
            .db
            .run_tool_bounded(
                st,
                "verify",
                Some((MEMORY_BYTES, CPUS)),
                |program| {
                    vec![
                        program("sh"),
                        "-c".to_string(),
                        script(program, dir, &database, self.settings.timeout_s),
                    ]
                },
                timeout + Duration::from_secs(60),
            )
            .await?;
        d.check_ms = t.elapsed().as_millis() as u64;
        let s = parse_script(&out.stdout);
        if let Some(why) = s.not_started {
            d.failed = Some(format!("backup set {}: {why}", set.label));
            return Ok(d);
        }
        d.checked
            .push("recovery to the backup's consistent point with WAL from the archive");
        let tail = |lines: &[String]| lines[lines.len().saturating_sub(12)..].to_vec();
        d.amcheck = json!({"exit_code": s.amcheck_exit, "output": tail(&s.amcheck_output)});
        match s.amcheck_exit {
            Some(0) => d
                .checked
                .push("pg_amcheck on all databases (heap, B-tree indexes, heap-all-indexed)"),
            Some(code) => {
                d.failed = Some(format!(
                    "backup set {}: pg_amcheck found corruption in the restored copy (exit code {code}): {}",
                    set.label,
                    tail(&s.amcheck_output).join("\n")
                ));
                return Ok(d);
            }
            None => {
                d.failed = Some(format!(
                    "backup set {}: the drill script stopped before pg_amcheck finished (exit code {}): {}",
                    set.label,
                    out.exit_code,
                    tail(&out.stderr.lines().map(str::to_string).collect::<Vec<_>>()).join("\n")
                ));
                return Ok(d);
            }
        }
        if source.is_empty() {
            return Ok(d);
        }
        let mut restored = vec![None; source.len()];
        for line in &s.counts_output {
            if let Some((i, n)) = line.split_once('|') {
                if let (Ok(i), Ok(n)) = (i.trim().parse::<usize>(), n.trim().parse::<i64>()) {
                    if let Some(slot) = restored.get_mut(i) {
                        *slot = Some(n);
                    }
                }
            }
        }
        d.tables = source
            .into_iter()
            .zip(restored)
            .map(|((table, source_rows), restored_rows)| Table {
                table,
                source_rows,
                restored_rows,
            })
            .collect();
        if s.counts_exit != Some(0) {
            d.failed = Some(format!(
                "backup set {}: the rows of the source's largest tables could not be counted in the restored copy (a table missing?): {}",
                set.label,
                tail(&s.counts_output).join("\n")
            ));
            return Ok(d);
        }
        d.checked
            .push("row counts of the largest tables against the source");
        for tb in &d.tables {
            if tb.restored_rows != Some(tb.source_rows) {
                d.warnings.push(format!(
                    "{}: {} rows in the copy, {} in the source now (it changed since the backup, or rows are missing)",
                    tb.table,
                    tb.restored_rows.map_or("no count".into(), |n| n.to_string()),
                    tb.source_rows
                ));
            }
        }
        Ok(d)
    }
}

/// The named backup, or the newest intact one.
fn choose(backups: &[BackupSet], label: Option<&str>) -> Result<BackupSet, String> {
    match label {
        Some(l) => backups
            .iter()
            .find(|b| b.label == l)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "backup_set: {l:?} is not in the repository (its backups: {})",
                    backups
                        .iter()
                        .map(|b| b.label.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        None => backups.iter().rfind(|b| !b.error).cloned().ok_or_else(|| {
            "the repository holds no backup to verify yet (send backup.run first)".into()
        }),
    }
}

/// Removes the copy a drill left when the agent died during it (it can be as large as
/// the database, and the next drill may be a week away). In the background: the agent's
/// start does not wait for it.
pub fn remove_leftover(root: &Path) {
    let dir = root.join("verify");
    if !dir.exists() {
        return;
    }
    std::thread::spawn(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "removed the copy an interrupted restore drill left")
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the copy an interrupted restore drill left (the next drill removes it)")
        }
    });
}

pub(super) async fn remove_dir(dir: &Path) -> Result<(), String> {
    let dir: PathBuf = dir.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "cannot remove the drill's copy {}: {e}",
            dir.display()
        )),
    })
    .await
    .map_err(|e| format!("the cleanup task failed: {e}"))?
}

pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_recognised_and_named() {
        let missing = "ERROR: [055]: raised from local-1 shell protocol: unable to open missing file '/r/backup/db/X/pg_data/base/5/16384.lz4' for read";
        assert!(damage(missing).unwrap().contains("missing"));
        let sum = "ERROR: [053]: error restoring 'base/5/16384': actual checksum 'a' does not match expected checksum 'b'";
        assert!(damage(sum).unwrap().contains("checksum"));
        assert!(damage("ERROR: [039]: HTTP request failed with 403 (Forbidden)").is_none());
        assert!(damaged_set(Some("F1"), "x").contains("backup set F1"));
    }

    #[test]
    fn what_pgbackrest_verify_found_is_read() {
        assert_eq!(repo_damage(""), None);
        assert_eq!(repo_damage("stanza: db\nstatus: ok\n"), None);
        let out = "stanza: db\nstatus: error\n  backup: F_I, status: invalid, total files checked: 3, total valid files: 2\n    missing: 1\n";
        assert_eq!(
            repo_damage(out).unwrap(),
            "backup: F_I, status: damaged, total files checked: 3, total valid files: 2; missing: 1"
        );
    }

    #[test]
    fn the_script_is_read_step_by_step() {
        let out = "dbvm-verify: ready\ncheck line\ndbvm-verify: amcheck 2\n0|10\n1|5\ndbvm-verify: counts 0\ndbvm-verify: stopped 0\n";
        let s = parse_script(out);
        assert_eq!(s.amcheck_exit, Some(2));
        assert_eq!(s.amcheck_output, vec!["check line"]);
        assert_eq!(s.counts_exit, Some(0));
        assert_eq!(s.counts_output, vec!["0|10", "1|5"]);
        let s = parse_script("dbvm-verify: server-exited\nFATAL: x\n");
        assert!(s.not_started.unwrap().contains("FATAL: x"));
        let program = |p: &str| p.to_string();
        let sc = script(&program, Path::new("/d/it's"), "app", 60);
        assert!(sc.contains("-c listen_addresses= "), "{sc}");
        assert!(sc.contains("'/d/it'\\''s/data'"), "{sc}");
    }
}
