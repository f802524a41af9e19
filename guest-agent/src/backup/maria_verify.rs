//! `backup.verify` for MariaDB: the restore drill, as PostgreSQL's ([`super::verify`]).
//!
//! The chosen backup (the newest, or the one named as `backup.list` shows it) and every
//! object of its chain up to it are checked against the chain's manifest: the binlogs the
//! manifest lists are read whole and their size and SHA-256 compared (what a
//! point-in-time restore in this chain would replay), and the full backup and its
//! incrementals are streamed into a throwaway directory under the data root (`verify/`,
//! the same one PostgreSQL's drill uses, so an interrupted drill's copy is removed the
//! same way), each checked while it streams; a missing or damaged object fails the drill
//! naming it, and nothing of it is prepared. The copy is prepared (`mariadb-backup
//! --prepare`, the full then each incremental) in a one-shot container of the database's
//! image bounded to [`MEMORY_BYTES`] and [`CPUS`]; never in the live data directory.
//!
//! A throwaway `mariadbd` then starts on the copy in a second bounded one-shot container:
//! the live config (the engine-shaping parameters match the source's) with the network
//! off (`--skip-networking`), its own socket, pid file, error log and temporary files in
//! the throwaway directory (0700, the database user's), no binlog, and no account lookup
//! (`--skip-grant-tables`: only the database user inside that container reaches the
//! socket, and the drill must not depend on an account of the copy). It is checked with
//! `CHECK TABLE … EXTENDED` on every table of every database (what `mariadb-check
//! --all-databases --check --extended` sends; the image has no `mariadb-check`), and the
//! rows of the source's largest tables are counted in it.
//!
//! Row counts are compared with the source as it is now, not with counts recorded at
//! backup time: a count taken while a non-blocking backup runs is not the count at the
//! backup's consistent point, so the manifest could not hold an exact one. Instead the
//! drill asks whether the source changed since the backup: the manifest holds the GTID of
//! the last change in the backup, and when the source's `gtid_binlog_pos` is still that
//! GTID nothing was written since, so any difference is a FAILED drill. When the source
//! moved on (or no GTID is known) a difference is reported as information (a warning),
//! as PostgreSQL's drill does. A table missing from the copy fails the drill either way.
//!
//! The copy is removed whatever happened. The result is recorded like PostgreSQL's
//! (`BackupManager::record_drill`): `last_verify` for check 10 (`drill_ok`,
//! `drill_age_s`), and the events `backup.verified` / `backup.verify_failed`.

use super::manifest::{Backup, Manifest};
use super::maria_restore::{check_object, unpack, Unpack, UnpackError};
use super::mariabackup::sh_quote;
use super::verify::{free_bytes, remove_dir, CPUS, MARK, MEMORY_BYTES, TABLES};
use super::{BackupError, BackupManager, Progress};
use crate::db::engine::Admin;
use crate::db::params::Flavour;
use crate::db::{DbError, DbState};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// The backup a drill restores: its chain's manifest and its place in it.
struct Chosen<'a> {
    chain: &'a Manifest,
    index: usize,
}

impl Chosen<'_> {
    fn backup(&self) -> &Backup {
        &self.chain.backups[self.index]
    }
}

/// The named backup, or the newest one.
fn choose<'a>(all: &'a [Manifest], label: Option<&str>) -> Result<Chosen<'a>, String> {
    match label {
        Some(l) => all
            .iter()
            .find_map(|m| {
                m.backups
                    .iter()
                    .position(|b| b.label == l)
                    .map(|index| Chosen { chain: m, index })
            })
            .ok_or_else(|| {
                format!(
                    "backup_set: {l:?} is not in the bucket (its backups: {})",
                    all.iter()
                        .flat_map(|m| m.backups.iter().map(|b| b.label.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        None => all
            .iter()
            .filter(|m| !m.backups.is_empty())
            .max_by_key(|m| m.backups.last().map(|b| b.stopped_ms))
            .map(|m| Chosen {
                chain: m,
                index: m.backups.len() - 1,
            })
            .ok_or_else(|| {
                "the bucket holds no backup to verify yet (send backup.run first)".into()
            }),
    }
}

/// Backquotes a MariaDB identifier.
fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The same GTID position, whatever the order of its domains.
fn same_gtid(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let mut v: Vec<String> = s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        v.sort();
        v
    };
    norm(a) == norm(b)
}

/// The drill's script: start the throwaway server on the prepared copy (socket only),
/// wait until it answers, check every table, count rows, stop.
fn script(program: &dyn Fn(&str) -> String, dir: &Path, config: &Path, timeout_s: u64) -> String {
    let d = |name: &str| sh_quote(&dir.join(name).display().to_string());
    let sock = d("mysqld.sock");
    let client = format!("--socket={sock} --user=root");
    let tries = timeout_s * 5;
    format!(
        r#"{mariadbd} --defaults-file={conf} --datadir={data} --socket={sock} --pid-file={pid} --skip-networking --skip-log-bin --skip-grant-tables --skip-slave-start --log-error={log} --tmpdir={tmp} --innodb-buffer-pool-size=256M --general-log=0 --slow-query-log=0 >/dev/null 2>&1 &
pid=$!
n=0
while :; do
  {admin} {client} ping >/dev/null 2>&1 && break
  if ! kill -0 $pid 2>/dev/null; then echo '{MARK} server-exited'; tail -n 15 {log}; exit 3; fi
  n=$((n+1))
  if [ $n -gt {tries} ]; then echo '{MARK} server-timeout'; tail -n 15 {log}; kill $pid; wait $pid; exit 4; fi
  sleep 0.2
done
echo '{MARK} ready'
{mariadb} {client} -N -B < {list} > {checks} && {mariadb} {client} -N -B < {checks} 2>&1
echo "{MARK} check $?"
{mariadb} {client} -N -B < {counts} 2>&1
echo "{MARK} counts $?"
{admin} {client} shutdown
wait $pid
echo "{MARK} stopped $?"
"#,
        mariadbd = sh_quote(&program("mariadbd")),
        admin = sh_quote(&program("mariadb-admin")),
        list = d("list.sql"),
        checks = d("check.sql"),
        mariadb = sh_quote(&program("mariadb")),
        conf = sh_quote(&config.display().to_string()),
        data = d("b0"),
        pid = d("mysqld.pid"),
        log = d("server.log"),
        tmp = sh_quote(&dir.display().to_string()),
        counts = d("counts.sql"),
    )
}

/// What the drill script printed, step by step.
#[derive(Debug, Default, PartialEq, Eq)]
struct Script {
    /// Why the server did not come up, with its log's tail.
    not_started: Option<String>,
    check_exit: Option<i64>,
    check_output: Vec<String>,
    counts_exit: Option<i64>,
    counts_output: Vec<String>,
}

fn parse_script(stdout: &str) -> Script {
    let mut s = Script::default();
    let mut section = 0; // 0 before ready, 1 check, 2 counts, 3 after, 4 not started
    let mut before = Vec::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix(MARK) {
            let mut w = rest.split_whitespace();
            match (w.next(), w.next().and_then(|c| c.parse().ok())) {
                (Some("ready"), _) => section = 1,
                (Some("check"), code) => {
                    s.check_exit = code;
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
            1 => s.check_output.push(line.to_string()),
            2 => s.counts_output.push(line.to_string()),
            4 => before.push(line.to_string()),
            _ => {}
        }
    }
    if let Some(why) = &mut s.not_started {
        let what = if why == "server-exited" {
            "stopped while starting"
        } else {
            "did not answer in time"
        };
        let reasons: Vec<&str> = before
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("[ERROR]"))
            .collect();
        let lines = if reasons.is_empty() {
            before.iter().map(String::as_str).collect()
        } else {
            reasons
        };
        *why = format!("the restored copy's server {what}: {}", lines.join("\n"));
    }
    s
}

/// The statements that list every table of the copy as a `CHECK TABLE … EXTENDED`
/// statement (run first; their output is run next). The image has no `mariadb-check`,
/// and this is what it would send.
const LIST_SQL: &str = "SELECT CONCAT('CHECK TABLE `', REPLACE(table_schema, '`', '``'), '`.`', REPLACE(table_name, '`', '``'), '` EXTENDED;') FROM information_schema.tables WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('information_schema', 'performance_schema') ORDER BY table_schema, table_name;\n";

/// What `CHECK TABLE`'s rows (`table, op, type, text`, tab-separated) say: the tables
/// checked OK and the damage reported (`error` rows, `Corrupt`), each with its table.
fn check_rows(lines: &[String]) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut errors = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        match f.as_slice() {
            [table, _op, kind, text] => {
                if *kind == "error" || text.contains("Corrupt") {
                    errors.push(format!("{table}: {text}"));
                } else if *kind == "status" && *text == "OK" {
                    ok += 1;
                }
            }
            // A client error (a table that cannot be opened stops the script).
            _ if !l.trim().is_empty() => errors.push(l.trim().to_string()),
            _ => {}
        }
    }
    (ok, errors)
}

/// One table compared.
#[derive(Debug, serde::Serialize)]
struct Table {
    table: String,
    source_rows: i64,
    restored_rows: Option<i64>,
}

/// What the source says: its largest tables with their row counts now, and its GTID
/// position.
struct Source {
    tables: Vec<(String, i64)>,
    gtid: Option<String>,
}

async fn source(st: &DbState, m: &BackupManager) -> Result<Source, String> {
    use mysql_async::prelude::Queryable;
    let mut admin = Admin::connect(&st.spec, m.db.paths())
        .await
        .map_err(|e| format!("the source database does not answer: {e}"))?;
    let Admin::Mysql(c) = &mut admin else {
        return Err("the source is not MariaDB".into());
    };
    let gtid: Option<String> = c
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .map_err(|e| format!("cannot read the source's GTID position: {e}"))?;
    let names: Vec<(String, String)> = c
        .exec(
            "SELECT table_schema, table_name FROM information_schema.tables
             WHERE table_type = 'BASE TABLE'
               AND table_schema NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
             ORDER BY data_length + index_length DESC, 1, 2 LIMIT ?",
            (TABLES,),
        )
        .await
        .map_err(|e| format!("cannot list the source's tables: {e}"))?;
    let mut tables = Vec::new();
    for (schema, table) in names {
        let name = format!("{}.{}", ident(&schema), ident(&table));
        let n: Option<i64> = c
            .query_first(format!("SELECT COUNT(*) FROM {name}"))
            .await
            .map_err(|e| format!("cannot count the rows of {name}: {e}"))?;
        tables.push((name, n.unwrap_or(0)));
    }
    Ok(Source { tables, gtid })
}

/// The drill's verdict and what it saw.
#[derive(Default)]
struct Drill {
    failed: Option<String>,
    checked: Vec<&'static str>,
    check: Value,
    tables: Vec<Table>,
    warnings: Vec<String>,
    objects_checked: usize,
    binlogs_ms: u64,
    restore_ms: u64,
    check_ms: u64,
}

/// `backup.verify` of a MariaDB database (see the module's doc).
pub(super) async fn verify(
    m: &BackupManager,
    label: Option<String>,
    progress: Progress<'_>,
) -> Result<Value, BackupError> {
    let st = m.db.configured_state().await?;
    if st.spec.engine != Flavour::Mariadb {
        return Err(BackupError::Invalid(
            "this drill is MariaDB's; the database is not MariaDB".into(),
        ));
    }
    let mut state = m.configured()?;
    let storage = super::mariabackup::load_storage(m)?.ok_or_else(|| {
        BackupError::Invalid(
            "backups are not configured on this VM (send backup.configure first)".into(),
        )
    })?;
    let s3 = super::s3::S3::new(
        &storage.endpoint(),
        Duration::from_secs(m.settings.io_timeout_s),
    )
    .map_err(|e| BackupError::Invalid(e.to_string()))?;
    let _busy = m.busy.lock().await;
    let t = Instant::now();
    progress(5, "reading the chains in the bucket");
    let all = super::mariabackup::manifests(&s3).await.map_err(|e| {
        BackupError::Failed(format!(
            "the bucket cannot be read: {e}; nothing was verified"
        ))
    })?;
    let chosen = choose(&all, label.as_deref()).map_err(BackupError::Invalid)?;
    let set = chosen.backup().clone();
    let dir = m.db.paths().root.join("verify");
    remove_dir(&dir).await.map_err(BackupError::Failed)?;
    // The objects are compressed: the copy is larger still; this is the least it needs.
    let need: u64 = chosen.chain.backups[..=chosen.index]
        .iter()
        .map(|b| b.size)
        .sum::<u64>()
        + (64 << 20);
    if let Some(free) = free_bytes(&m.db.paths().root) {
        if free < need {
            return Err(BackupError::Failed(format!(
                "not enough disk space for the drill's copy of backup set {}: it needs more than {} MiB under {}, {} MiB are free; nothing was verified",
                set.label,
                need >> 20,
                m.db.paths().root.display(),
                free >> 20
            )));
        }
    }
    progress(10, "reading the source's largest tables");
    let (src, source_note) = match source(&st, m).await {
        Ok(s) => (s, None),
        Err(e) => (
            Source {
                tables: Vec::new(),
                gtid: None,
            },
            Some(e),
        ),
    };
    let drill = drill(m, &st, &s3, &chosen, &dir, &src, progress).await;
    // The copy goes, however the drill went.
    let removed = remove_dir(&dir).await;
    let mut drill = drill?;
    if let Some(n) = source_note {
        drill.warnings.push(format!("row counts not compared: {n}"));
    }
    if let Err(e) = removed {
        drill.warnings.push(e);
    }
    let result = json!({
        "ok": drill.failed.is_none(),
        "engine": "mariadb",
        "backup_set": set.label,
        "backup_type": set.kind,
        "backup_stopped_ms": set.stopped_ms,
        "chain": chosen.chain.chain,
        "reason": drill.failed,
        "checked": drill.checked,
        "objects_checked": drill.objects_checked,
        "table_check": drill.check,
        "tables": drill.tables,
        "source_changed_since_backup": changed(&set, &src),
        "warnings": drill.warnings,
        "limits": {"memory_bytes": MEMORY_BYTES, "cpus": CPUS},
        "timings": {"binlogs_ms": drill.binlogs_ms, "restore_ms": drill.restore_ms, "check_ms": drill.check_ms},
        "at_ms": dbvm_protocol::now_ms(),
        "took_ms": t.elapsed().as_millis() as u64,
    });
    m.record_drill(&mut state, result, &set.label, drill.failed, progress)
}

/// Whether the source was written since the backup: `Some(false)` when its GTID position
/// is still the backup's; `None` when that cannot be told.
fn changed(b: &Backup, src: &Source) -> Option<bool> {
    match (&b.gtid, &src.gtid) {
        (Some(at_backup), Some(now)) => Some(!same_gtid(at_backup, now)),
        _ => None,
    }
}

/// An object failure as the drill's verdict; a storage that cannot be read as an error
/// (nothing says the backup is damaged, nothing was verified).
fn object_verdict(e: UnpackError, d: &mut Drill) -> Result<(), BackupError> {
    match e {
        e @ UnpackError::Object { .. } => {
            d.failed = Some(format!("an object of the chain is missing or damaged: {e}"));
            Ok(())
        }
        e @ UnpackError::Storage { .. } => Err(BackupError::Failed(format!(
            "the bucket cannot be read: {e}; nothing was verified"
        ))),
        UnpackError::Tool(e) => Err(BackupError::Failed(format!("the drill could not run: {e}"))),
    }
}

async fn drill(
    m: &BackupManager,
    st: &DbState,
    s3: &super::s3::S3,
    chosen: &Chosen<'_>,
    dir: &Path,
    src: &Source,
    progress: Progress<'_>,
) -> Result<Drill, BackupError> {
    let mut d = Drill::default();
    let set = chosen.backup();
    let timeout = Duration::from_secs(m.settings.timeout_s);

    // The chain's binlogs, read whole and compared with the manifest (into nothing: only
    // their bytes' checksum matters here).
    let logs = &chosen.chain.binlogs;
    progress(
        15,
        &format!(
            "checking the {} binlog(s) of chain {} against its manifest",
            logs.len(),
            chosen.chain.chain
        ),
    );
    let t = Instant::now();
    for l in logs {
        let as_backup = Backup {
            label: l.name.clone(),
            kind: "binlog".into(),
            key: l.key.clone(),
            size: l.size,
            sha256: l.sha256.clone(),
            from_lsn: 0,
            to_lsn: 0,
            binlog_file: None,
            binlog_pos: None,
            gtid: None,
            started_ms: l.first_event_ms,
            stopped_ms: l.last_event_ms,
        };
        let got = s3
            .download(&l.key, &mut tokio::io::sink(), Some(&l.sha256))
            .await;
        match check_object(got, &as_backup) {
            Ok(()) => {}
            Err(UnpackError::Object { why, .. }) => {
                d.failed = Some(format!(
                    "binlog {} of chain {} is missing or damaged: {why}",
                    l.name, chosen.chain.chain
                ));
                return Ok(d);
            }
            Err(e) => {
                object_verdict(e, &mut d)?;
                return Ok(d);
            }
        }
        d.objects_checked += 1;
    }
    d.binlogs_ms = t.elapsed().as_millis() as u64;
    d.checked
        .push("every binlog the chain's manifest lists: size and SHA-256 against the manifest");

    let backups = &chosen.chain.backups[..=chosen.index];
    progress(
        25,
        &format!(
            "restoring backup set {} ({} object(s) of chain {}) into a throwaway directory",
            set.label,
            backups.len(),
            chosen.chain.chain
        ),
    );
    let t = Instant::now();
    let unpacked = unpack(
        &m.db,
        st,
        &Unpack {
            s3,
            backups,
            stage: dir,
            role: "verify",
            limits: Some((MEMORY_BYTES, CPUS)),
            move_back: None,
            timeout,
        },
    )
    .await;
    d.restore_ms = t.elapsed().as_millis() as u64;
    match unpacked {
        Ok(()) => {}
        Err(UnpackError::Tool(e)) => {
            // The objects all matched (or the stream was cut by the container): the
            // backup did not unpack or prepare.
            d.failed = Some(format!(
                "backup set {} could not be restored and prepared: {e}",
                set.label
            ));
            return Ok(d);
        }
        Err(e) => {
            object_verdict(e, &mut d)?;
            return Ok(d);
        }
    }
    d.objects_checked += backups.len();
    d.checked.push(
        "the full backup and its incrementals up to the chosen one: size and SHA-256 against the manifest while they streamed",
    );
    d.checked
        .push("mariadb-backup --prepare of the full backup and each incremental");

    prepare_dir(m, dir, &src.tables).map_err(BackupError::Failed)?;
    progress(
        60,
        "starting a throwaway server on the copy and checking it",
    );
    let t = Instant::now();
    let config = m.db.paths().main_config(Flavour::Mariadb);
    let out =
        m.db.run_tool_bounded(
            st,
            "verify",
            Some((MEMORY_BYTES, CPUS)),
            |program| {
                vec![
                    program("sh"),
                    "-c".to_string(),
                    script(program, dir, &config, m.settings.timeout_s),
                ]
            },
            timeout + Duration::from_secs(60),
        )
        .await
        .map_err(|e: DbError| BackupError::Failed(format!("the drill could not run: {e}")))?;
    d.check_ms = t.elapsed().as_millis() as u64;
    let s = parse_script(&out.stdout);
    if let Some(why) = s.not_started {
        d.failed = Some(format!("backup set {}: {why}", set.label));
        return Ok(d);
    }
    d.checked
        .push("a throwaway server started on the prepared copy (socket only)");
    let tail = |lines: &[String]| lines[lines.len().saturating_sub(12)..].to_vec();
    let (tables_ok, errors) = check_rows(&s.check_output);
    d.check = json!({"exit_code": s.check_exit, "tables_checked": tables_ok, "errors": errors});
    match s.check_exit {
        Some(0) if errors.is_empty() => d
            .checked
            .push("CHECK TABLE … EXTENDED on every table of every database"),
        Some(code) => {
            d.failed = Some(format!(
                "backup set {}: CHECK TABLE found damage in the restored copy (exit code {code}): {}",
                set.label,
                if errors.is_empty() {
                    tail(&s.check_output).join("\n")
                } else {
                    errors.join("; ")
                }
            ));
            return Ok(d);
        }
        None => {
            d.failed = Some(format!(
                "backup set {}: the drill script stopped before CHECK TABLE finished (exit code {}): {}",
                set.label,
                out.exit_code,
                tail(&out.stderr.lines().map(str::to_string).collect::<Vec<_>>()).join("\n")
            ));
            return Ok(d);
        }
    }
    if src.tables.is_empty() {
        return Ok(d);
    }
    let mut restored = vec![None; src.tables.len()];
    for line in &s.counts_output {
        if let Some((i, n)) = line.split_once('\t') {
            if let (Ok(i), Ok(n)) = (i.trim().parse::<usize>(), n.trim().parse::<i64>()) {
                if let Some(slot) = restored.get_mut(i) {
                    *slot = Some(n);
                }
            }
        }
    }
    d.tables = src
        .tables
        .iter()
        .cloned()
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
        .push("row counts of the source's largest tables in the copy");
    let differ: Vec<String> = d
        .tables
        .iter()
        .filter(|tb| tb.restored_rows != Some(tb.source_rows))
        .map(|tb| {
            format!(
                "{}: {} rows in the copy, {} in the source now",
                tb.table,
                tb.restored_rows
                    .map_or("no count".into(), |n| n.to_string()),
                tb.source_rows
            )
        })
        .collect();
    if differ.is_empty() {
        return Ok(d);
    }
    match changed(set, src) {
        Some(false) => {
            // Nothing was written since the backup: the copy must hold what the source
            // holds.
            d.failed = Some(format!(
                "backup set {}: rows are missing or extra in the restored copy although the source was not written since the backup (its GTID position is still the backup's): {}",
                set.label,
                differ.join("; ")
            ));
        }
        _ => d.warnings.extend(differ.into_iter().map(|w| {
            format!("{w} (the source was written since the backup: information, not a failure)")
        })),
    }
    Ok(d)
}

/// The throwaway directory after the unpacking: 0700 (the server's socket is in it), and
/// the counting queries.
fn prepare_dir(m: &BackupManager, dir: &Path, tables: &[(String, i64)]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let s = m.db.settings();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
    let counts: String = tables
        .iter()
        .enumerate()
        .map(|(i, (name, _))| format!("SELECT {i}, COUNT(*) FROM {name};\n"))
        .collect();
    for (name, text) in [("counts.sql", counts.as_str()), ("list.sql", LIST_SQL)] {
        crate::db::engine::write_owned(&dir.join(name), text.as_bytes(), 0o600, s.uid, s.gid)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drill_script_is_read_step_by_step_and_damage_is_named() {
        let out = "dbvm-verify: ready\napp.t\tcheck\tstatus\tOK\napp.u\tcheck\terror\tCorrupt\ndbvm-verify: check 0\n0\t10\n1\t5\ndbvm-verify: counts 0\ndbvm-verify: stopped 0\n";
        let s = parse_script(out);
        assert_eq!(s.check_exit, Some(0));
        assert_eq!(
            check_rows(&s.check_output),
            (1, vec!["app.u: Corrupt".to_string()])
        );
        assert_eq!(s.counts_output, vec!["0\t10", "1\t5"]);
        let s = parse_script("dbvm-verify: server-exited\nx\n2026 [ERROR] InnoDB: y\n");
        assert!(s.not_started.unwrap().contains("[ERROR] InnoDB: y"));
        let notes = ["mysql.user\tcheck\tnote\tnot supported".to_string()];
        assert_eq!(check_rows(&notes), (0, vec![]));
        let sc = script(
            &|p: &str| p.to_string(),
            Path::new("/d/verify"),
            Path::new("/d/conf/my.cnf"),
            60,
        );
        assert!(sc.contains("--skip-networking"), "{sc}");
        assert!(sc.contains("--datadir='/d/verify/b0'"), "{sc}");
        assert_eq!(ident("a`b"), "`a``b`");
        assert!(same_gtid("0-1-5,1-2-3", "1-2-3, 0-1-5"));
        assert!(!same_gtid("0-1-5", "0-1-6"));
    }
}
