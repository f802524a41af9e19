//! pgBackRest, as the agent drives it: its configuration file (the only place the S3 keys
//! are written: mode 0600, owned by the database user, read by pgBackRest itself so the
//! keys are never in a process's arguments or environment), the argv of each call, and
//! `pgbackrest info --output=json` read into figures.
//!
//! pgBackRest runs in one-shot containers of the database's image (see
//! [`crate::db::DbManager::run_tool`]) and, for `archive-push`, inside the database's own
//! container as its `archive_command`.

use super::storage::Storage;
use crate::db::engine::Paths;
use serde_json::Value;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The one stanza of a database VM.
pub const STANZA: &str = "db";

/// Files under the database's `conf/` directory.
pub fn config_path(p: &Paths) -> PathBuf {
    p.conf.join("pgbackrest.conf")
}

/// The restore's own configuration (the source's keys), removed when the restore ends.
pub fn restore_config_path(p: &Paths) -> PathBuf {
    p.conf.join("pgbackrest-restore.conf")
}

pub fn ca_path(p: &Paths, name: &str) -> PathBuf {
    p.conf.join(format!("{name}-ca.pem"))
}

/// How pgBackRest is tuned; the same for every call.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Seconds a network call may stall before pgBackRest gives up.
    pub io_timeout_s: u64,
    /// Parallel processes for backup and restore.
    pub process_max: u32,
}

impl Tuning {
    /// How long a short call (stanza-create, check, info) may take in all: pgBackRest
    /// retries a stalled request until `io-timeout`, a few times.
    pub fn call_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.io_timeout_s * 4 + 60)
    }
}

/// The directories pgBackRest writes (its log and lock paths), owned by the database user.
pub fn prepare_dirs(p: &Paths, uid: u32, gid: u32) -> Result<(), String> {
    for dir in [p.log.join("pgbackrest"), p.run.join("pgbackrest")] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        nix::unistd::chown(
            &dir,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| format!("cannot chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The configuration file's text. It holds the keys: write it 0600 for the database
/// user only, and keep it out of logs.
pub fn config(
    storage: &Storage,
    ca_file: Option<&Path>,
    p: &Paths,
    port: u16,
    tuning: Tuning,
) -> Zeroizing<String> {
    // Room for the whole file up front: a String that grows leaves copies of the keys in
    // the buffers it gave up, which Zeroizing never sees.
    let mut s = Zeroizing::new(String::with_capacity(4096));
    s.push_str(
        "# Written by dbvm-agent: changes here are overwritten. Mode 0600: it holds the S3 keys.\n[global]\n",
    );
    kv(&mut s, "repo1-type", "s3");
    kv(&mut s, "repo1-s3-endpoint", &storage.host);
    // pgBackRest's port option for S3 (`repo1-port` is something else and is ignored).
    kv(&mut s, "repo1-storage-port", &storage.port.to_string());
    kv(&mut s, "repo1-s3-uri-style", "path");
    kv(&mut s, "repo1-s3-bucket", &storage.bucket);
    kv(&mut s, "repo1-s3-region", &storage.region);
    kv(&mut s, "repo1-s3-key", storage.access_key_id.expose());
    kv(
        &mut s,
        "repo1-s3-key-secret",
        storage.secret_access_key.expose(),
    );
    if let Some(ca) = ca_file {
        kv(&mut s, "repo1-storage-ca-file", &ca.display().to_string());
    }
    kv(&mut s, "repo1-path", &format!("/{}", storage.prefix));
    // Chains are purged by the agent's own rules (chain expiry = creation + retention
    // days), never by pgBackRest's count-based default.
    kv(&mut s, "repo1-retention-full-type", "time");
    kv(&mut s, "repo1-retention-full", "9999999");
    kv(&mut s, "expire-auto", "n");
    kv(&mut s, "start-fast", "y");
    kv(&mut s, "compress-type", "lz4");
    kv(&mut s, "process-max", &tuning.process_max.to_string());
    kv(&mut s, "io-timeout", &tuning.io_timeout_s.to_string());
    kv(
        &mut s,
        "log-path",
        &p.log.join("pgbackrest").display().to_string(),
    );
    kv(
        &mut s,
        "lock-path",
        &p.run.join("pgbackrest").display().to_string(),
    );
    kv(&mut s, "log-level-console", "warn");
    kv(&mut s, "log-level-stderr", "off");
    kv(&mut s, "log-level-file", "info");
    kv(&mut s, "log-timestamp", "y");
    s.push_str(&format!("[{STANZA}]\n"));
    kv(&mut s, "pg1-path", &p.data.display().to_string());
    kv(&mut s, "pg1-port", &port.to_string());
    kv(&mut s, "pg1-socket-path", &p.run.display().to_string());
    kv(&mut s, "pg1-user", "postgres");
    s
}

fn kv(s: &mut String, k: &str, v: &str) {
    s.push_str(k);
    s.push('=');
    s.push_str(v);
    s.push('\n');
}

/// `pgbackrest --config=FILE --stanza=db ARGS… COMMAND`.
pub fn argv(
    program: &dyn Fn(&str) -> String,
    config: &Path,
    args: &[String],
    command: &str,
) -> Vec<String> {
    let mut v = vec![
        program("pgbackrest"),
        format!("--config={}", config.display()),
        format!("--stanza={STANZA}"),
    ];
    v.extend(args.iter().cloned());
    v.push(command.to_string());
    v
}

/// Printed between the backup and `info` by [`backup_then_info_argv`].
const BACKUP_DONE: &str = "dbvm: backup done";

/// `sh -c 'pgbackrest … backup || exit $?; echo MARK; exec pgbackrest … info --output=json'`:
/// both in one container. Every word is single-quoted for the shell.
pub fn backup_then_info_argv(
    program: &dyn Fn(&str) -> String,
    config: &Path,
    backup_args: &[String],
) -> Vec<String> {
    let quote = |words: Vec<String>| {
        words
            .iter()
            .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let backup = quote(argv(program, config, backup_args, "backup"));
    let info = quote(argv(
        program,
        config,
        &["--output=json".to_string()],
        "info",
    ));
    vec![
        program("sh"),
        "-c".to_string(),
        format!("{backup} || exit $?; echo '{BACKUP_DONE}'; exec {info}"),
    ]
}

/// What [`backup_then_info_argv`] printed: whether the backup finished, and the listing
/// after it (the last line that is a JSON array), if any.
pub fn split_backup_then_info(stdout: &str) -> (bool, Option<&str>) {
    match stdout.split_once(BACKUP_DONE) {
        None => (false, None),
        Some((_, after)) => (
            true,
            after
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| l.starts_with('[')),
        ),
    }
}

/// PostgreSQL's `archive_command` (runs in the database's container; `%p` is the segment).
pub fn archive_command(program: &dyn Fn(&str) -> String, config: &Path) -> String {
    format!(
        "{} --config={} --stanza={STANZA} archive-push %p",
        program("pgbackrest"),
        config.display()
    )
}

/// S3 error bodies that pgBackRest prints can echo what was signed; the S3 client cuts
/// them out the same way.
pub use dbvm_s3::redact_echoes;

/// The cause of a pgBackRest failure, in words a person can act on.
pub fn cause(text: &str) -> &'static str {
    let lower = text.to_lowercase();
    if lower.contains("signaturedoesnotmatch")
        || lower.contains("invalidaccesskeyid")
        || lower.contains("accessdenied")
        || lower.contains("403 (forbidden)")
        || lower.contains("403 forbidden")
    {
        "the storage refused the credentials (wrong access key or secret)"
    } else if lower.contains("nosuchbucket") {
        "the bucket does not exist"
    } else if lower.contains("unable to verify certificate")
        || lower.contains("certificate verify failed")
        || lower.contains("[cryptoerror]")
        || lower.contains("unable to find hostname")
    {
        "the storage's TLS certificate was not accepted (is ca_pem the CA that signed it, and does it name the endpoint's host?)"
    } else if lower.contains("unable to connect")
        || lower.contains("connection refused")
        || lower.contains("tls error")
        || lower.contains("timeout")
        || lower.contains("unable to get address")
    {
        "the storage could not be reached"
    } else if lower.contains("no space left") {
        "the disk is full"
    } else {
        "pgBackRest failed"
    }
}

/// Why a pgBackRest call failed, in words a person can act on, with pgBackRest's own
/// message (its last error lines, S3's echoes of the request cut out) after them.
pub fn explain_failure(exit_code: i64, stdout: &str, stderr: &str) -> String {
    let text = redact_echoes(&format!("{stderr}\n{stdout}"));
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("ERROR:") || l.contains("WARN:"))
        .collect();
    let detail = if errors.is_empty() {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(6)..].join("\n")
    } else {
        errors[errors.len().saturating_sub(6)..].join("\n")
    };
    let cause = cause(&text);
    format!("{cause} (pgBackRest exit code {exit_code}):\n{detail}")
}

/// One backup as `pgbackrest info` lists it.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct BackupSet {
    pub label: String,
    /// `full`, `diff` or `incr`.
    pub kind: String,
    pub prior: Option<String>,
    pub started_ms: i64,
    pub stopped_ms: i64,
    pub size_bytes: u64,
    pub repo_size_bytes: u64,
    pub wal_start: Option<String>,
    pub wal_stop: Option<String>,
    pub error: bool,
}

#[cfg(test)]
impl BackupSet {
    /// A listed backup for unit tests (no WAL range, no prior).
    pub fn for_test(
        label: &str,
        kind: &str,
        started_ms: i64,
        stopped_ms: i64,
        size_bytes: u64,
        error: bool,
    ) -> Self {
        Self {
            label: label.into(),
            kind: kind.into(),
            prior: None,
            started_ms,
            stopped_ms,
            size_bytes,
            repo_size_bytes: 1,
            wal_start: None,
            wal_stop: None,
            error,
        }
    }
}

/// What `pgbackrest info --output=json` says of the stanza.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct Info {
    /// pgBackRest's stanza status: 0 ok, 1 missing stanza path, 2 no valid backups,
    /// 3 missing stanza data, 99 other (the repository may be unreachable).
    pub status_code: i64,
    pub status_message: String,
    /// The repository's own status message when it is not ok.
    pub repo_message: Option<String>,
    pub backups: Vec<BackupSet>,
    /// Oldest and newest WAL segment in the archive.
    pub archive_min: Option<String>,
    pub archive_max: Option<String>,
}

impl Info {
    /// Whether the repository answered (it exits 0 even when it did not).
    pub fn reachable(&self) -> bool {
        matches!(self.status_code, 0 | 2)
    }
}

/// Reads `pgbackrest info --output=json` (an array with one stanza).
pub fn parse_info(json: &str) -> Result<Info, String> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| format!("pgbackrest info did not give JSON: {e}"))?;
    let stanza = v
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == STANZA))
        .ok_or_else(|| format!("pgbackrest info lists no stanza {STANZA:?}"))?;
    let status_code = stanza["status"]["code"].as_i64().unwrap_or(99);
    let status_message = stanza["status"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let repo_message = stanza["repo"].as_array().and_then(|repos| {
        repos
            .iter()
            .find(|r| r["status"]["code"].as_i64() != Some(0))
            .and_then(|r| r["status"]["message"].as_str())
            .map(str::to_string)
    });
    let backups = stanza["backup"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| BackupSet {
                    label: b["label"].as_str().unwrap_or("").to_string(),
                    kind: b["type"].as_str().unwrap_or("").to_string(),
                    prior: b["prior"].as_str().map(str::to_string),
                    started_ms: b["timestamp"]["start"].as_i64().unwrap_or(0) * 1000,
                    stopped_ms: b["timestamp"]["stop"].as_i64().unwrap_or(0) * 1000,
                    size_bytes: b["info"]["size"].as_u64().unwrap_or(0),
                    repo_size_bytes: b["info"]["repository"]["size"].as_u64().unwrap_or(0),
                    wal_start: b["archive"]["start"].as_str().map(str::to_string),
                    wal_stop: b["archive"]["stop"].as_str().map(str::to_string),
                    error: b["error"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    let archive = stanza["archive"].as_array().and_then(|a| a.last());
    Ok(Info {
        status_code,
        status_message,
        repo_message,
        backups,
        archive_min: archive.and_then(|a| a["min"].as_str()).map(str::to_string),
        archive_max: archive.and_then(|a| a["max"].as_str()).map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000005","min":"000000010000000000000001"}],
      "backup":[
        {"archive":{"start":"000000010000000000000002","stop":"000000010000000000000002"},"backrest":{"format":5,"version":"2.45"},"database":{"id":1,"repo-key":1},"error":false,"info":{"delta":100,"repository":{"delta":10,"size":10},"size":100},"label":"20261203-180000F","lsn":{"start":"0/2000028","stop":"0/2000100"},"prior":null,"reference":null,"timestamp":{"start":1796320800,"stop":1796320805},"type":"full"},
        {"archive":{"start":"000000010000000000000004","stop":"000000010000000000000004"},"backrest":{"format":5,"version":"2.45"},"database":{"id":1,"repo-key":1},"error":false,"info":{"delta":5,"repository":{"delta":1,"size":11},"size":101},"label":"20261203-180000F_20261203-181000I","prior":"20261203-180000F","reference":["20261203-180000F"],"timestamp":{"start":1796321400,"stop":1796321402},"type":"incr"}],
      "cipher":"none","db":[{"id":1,"repo-key":1,"system-id":1,"version":"15"}],"name":"db",
      "repo":[{"cipher":"none","key":1,"status":{"code":0,"message":"ok"}}],
      "status":{"code":0,"lock":{"backup":{"held":false}},"message":"ok"}}]"#;

    #[test]
    fn info_is_read() {
        let i = parse_info(INFO).unwrap();
        assert!(i.reachable());
        assert_eq!(i.backups.len(), 2);
        assert_eq!(i.backups[0].kind, "full");
        assert_eq!(i.backups[1].prior.as_deref(), Some("20261203-180000F"));
        assert_eq!(i.backups[1].stopped_ms, 1_796_321_402_000);
        assert_eq!(i.archive_max.as_deref(), Some("000000010000000000000005"));
    }

    #[test]
    fn an_unreachable_repository_is_not_ok_although_info_exits_0() {
        let j = r#"[{"archive":[],"backup":[],"cipher":"none","db":[],"name":"db",
          "repo":[{"cipher":"none","key":1,"status":{"code":99,"message":"[HostConnectError] unable to connect"}}],
          "status":{"code":99,"lock":{"backup":{"held":false}},"message":"other"}}]"#;
        let i = parse_info(j).unwrap();
        assert!(!i.reachable());
        assert!(i.repo_message.unwrap().contains("unable to connect"));
    }

    #[test]
    fn backup_then_info_is_one_quoted_script_and_its_output_splits() {
        let program = |p: &str| format!("/usr/bin/{p}");
        let v = backup_then_info_argv(
            &program,
            Path::new("/d/it's/pgbackrest.conf"),
            &["--type=full".to_string()],
        );
        assert_eq!(v[0], "/usr/bin/sh");
        assert_eq!(v[1], "-c");
        assert!(v[2].starts_with("'/usr/bin/pgbackrest' '--config=/d/it'\\''s/pgbackrest.conf' '--stanza=db' '--type=full' 'backup' || exit $?;"), "{}", v[2]);
        assert!(v[2].ends_with("'--output=json' 'info'"), "{}", v[2]);
        assert_eq!(split_backup_then_info("P00 WARN: x\n"), (false, None));
        assert_eq!(
            split_backup_then_info("WARN: y\ndbvm: backup done\n[{\"name\":\"db\"}]\n"),
            (true, Some("[{\"name\":\"db\"}]"))
        );
        assert_eq!(split_backup_then_info("dbvm: backup done\n"), (true, None));
    }

    #[test]
    fn echoed_request_parts_are_cut_out() {
        let body = "ERROR: [039]: HTTP request failed with 403 (Forbidden): <Error><Code>SignatureDoesNotMatch</Code><AWSAccessKeyId>AKIDEXAMPLE</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256\nx</StringToSign></Error>";
        let e = explain_failure(39, "", body);
        assert!(
            !e.contains("AKIDEXAMPLE") && !e.contains("AWS4-HMAC"),
            "{e}"
        );
        assert!(e.contains("refused the credentials"), "{e}");
        assert_eq!(
            redact_echoes("<AWSAccessKeyId>a"),
            "<AWSAccessKeyId>[redacted]"
        );
    }

    #[test]
    fn failures_are_explained() {
        let e = explain_failure(
            1,
            "",
            "P00  ERROR: [029]: S3 request failed ... <Code>SignatureDoesNotMatch</Code>",
        );
        assert!(e.starts_with("the storage refused the credentials"), "{e}");
        let e = explain_failure(
            1,
            "",
            "ERROR: [095]: [CryptoError] unable to verify certificate presented by 'localhost:1'",
        );
        assert!(e.contains("TLS certificate"), "{e}");
    }
}
