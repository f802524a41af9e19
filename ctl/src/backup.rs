//! What `dbvmctl backup`, `backups`, `restore` and `recover` add to a signed command: the
//! storage location as the agent's operations take it, the S3 keys read from files (never
//! from a process's arguments) and sealed to the agent, and the `backup.list` answer as
//! a table.

use crate::args::{read_secret_files, ArgsError};
use dbvm_protocol::seal::Secret;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Where backups are: an S3 endpoint over TLS, a bucket, and a folder in it.
#[derive(Clone, Debug, Default)]
pub struct StorageArgs {
    /// `https://host:port`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// The folder in the bucket (the agent's id by default for a backup; a restore names
    /// the source's).
    pub prefix: Option<String>,
    /// The CA that signed the endpoint's certificate (PEM), when not a public one.
    pub ca_file: Option<PathBuf>,
    /// Files holding the access key id and the secret access key.
    pub access_key_file: PathBuf,
    pub secret_key_file: PathBuf,
}

/// Why the storage arguments cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageArgsError {
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Keys(#[from] ArgsError),
}

impl StorageArgs {
    /// The `storage`/`source` object, and the two keys as secrets named as the agent's
    /// operations name them (`access_key_id`, `secret_access_key`).
    pub fn build(&self) -> Result<(Value, Vec<(String, Secret)>), StorageArgsError> {
        let mut l = Map::new();
        l.insert("endpoint".into(), json!(self.endpoint));
        l.insert("bucket".into(), json!(self.bucket));
        l.insert("region".into(), json!(self.region));
        if let Some(p) = &self.prefix {
            l.insert("prefix".into(), json!(p));
        }
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read_to_string(path).map_err(|source| StorageArgsError::CaFile {
                path: path.display().to_string(),
                source,
            })?;
            l.insert("ca_pem".into(), json!(pem));
        }
        let pair = |name: &str, path: &Path| format!("{name}={}", path.display());
        let keys = read_secret_files(&[
            pair("access_key_id", &self.access_key_file),
            pair("secret_access_key", &self.secret_key_file),
        ])?;
        Ok((Value::Object(l), keys))
    }
}

fn size(b: Option<u64>) -> String {
    let Some(b) = b else { return "-".into() };
    let f = b as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", f / 1024.0)
    }
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(|ms| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
    })
    .map(|t| {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    })
    .unwrap_or_else(|| "-".into())
}

/// `backup.list`'s answer for people: the location, each chain with its backups, and the
/// window a restore can reach.
pub fn backups_table(v: &Value) -> String {
    let mut out = String::new();
    let loc = &v["location"];
    out.push_str(&format!(
        "location   {}/{}/{} (retention {} days)\n",
        loc["endpoint"].as_str().unwrap_or("?"),
        loc["bucket"].as_str().unwrap_or("?"),
        loc["prefix"].as_str().unwrap_or("?"),
        v["retention_days"]
    ));
    let status = &v["status"];
    if status["code"].as_i64().is_some_and(|c| c != 0) {
        out.push_str(&format!(
            "status     {} {}\n",
            status["message"].as_str().unwrap_or(""),
            status["repo"].as_str().unwrap_or("")
        ));
    }
    let chains = v["chains"].as_array().cloned().unwrap_or_default();
    if chains.is_empty() {
        out.push_str("no backups yet\n");
    }
    for c in &chains {
        out.push_str(&format!(
            "\nchain {}  created {}  expires {}  {} backups  {} ({} stored)\n",
            c["full"].as_str().unwrap_or("?"),
            when(c["created_ms"].as_i64()),
            when(c["expires_ms"].as_i64()),
            c["backups"].as_array().map_or(0, Vec::len),
            size(c["size_bytes"].as_u64()),
            size(c["repo_size_bytes"].as_u64()),
        ));
        out.push_str(&format!(
            "  {:<34} {:<5} {:<21} {:>10} {:>10}\n",
            "LABEL", "TYPE", "ENDED", "SIZE", "STORED"
        ));
        for b in c["backups"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<34} {:<5} {:<21} {:>10} {:>10}{}\n",
                b["label"].as_str().unwrap_or("?"),
                b["kind"].as_str().or(b["type"].as_str()).unwrap_or("?"),
                when(b["stopped_ms"].as_i64()),
                size(b["size_bytes"].as_u64()),
                size(b["repo_size_bytes"].as_u64()),
                if b["error"] == true { "  (error)" } else { "" }
            ));
        }
    }
    match v["recoverable"].as_object() {
        Some(w) => out.push_str(&format!(
            "\nrecoverable from {} (end of the first backup) to the newest archived log {} (newest backup {})\n",
            when(w.get("from_ms").and_then(Value::as_i64)),
            w.get("archived_wal_to")
                .or(w.get("archived_to"))
                .and_then(Value::as_str)
                .unwrap_or("-"),
            when(w.get("newest_backup_ms").and_then(Value::as_i64)),
        )),
        None => out.push_str("\nnothing to restore from yet\n"),
    }
    if v["cloud"].is_object() {
        let c = &v["cloud"];
        out.push_str("\n== cloud copy ==\n");
        out.push_str(&backups_table(c));
        let copy = &c["copy"];
        if copy.is_object() {
            out.push_str(&format!(
                "copy: {} object(s) waiting, {} failed round(s) in a row{}\n",
                copy["pending"].as_u64().unwrap_or(0),
                copy["consecutive_failures"].as_u64().unwrap_or(0),
                copy["last_error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_args_read_the_keys_from_files_and_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ak = dir.path().join("ak");
        let sk = dir.path().join("sk");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ak, "AKID\n").unwrap();
        std::fs::write(&sk, "SECRET\n").unwrap();
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let a = StorageArgs {
            endpoint: "https://localhost:9443".into(),
            bucket: "bkp".into(),
            region: "us-east-1".into(),
            prefix: Some("db1".into()),
            ca_file: Some(ca),
            access_key_file: ak,
            secret_key_file: sk,
        };
        let (loc, keys) = a.build().unwrap();
        assert_eq!(loc["prefix"], "db1");
        assert!(loc["ca_pem"].as_str().unwrap().starts_with("-----BEGIN"));
        assert!(!loc.to_string().contains("SECRET"));
        assert_eq!(keys[0].0, "access_key_id");
        assert_eq!(keys[1].1.expose(), "SECRET");
        let missing = StorageArgs {
            secret_key_file: dir.path().join("nope"),
            ..a
        };
        assert!(missing.build().unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn the_listing_shows_chains_and_the_window() {
        let v = json!({
            "location": {"endpoint": "https://localhost:9443", "bucket": "bkp", "prefix": "db1"},
            "retention_days": 7,
            "status": {"code": 0},
            "chains": [{"full": "20261203-200000F", "created_ms": 1_796_320_800_000i64, "expires_ms": 1_796_925_600_000i64,
                "size_bytes": 3u64 << 30, "repo_size_bytes": 5u64 << 20,
                "backups": [{"label": "20261203-200000F", "kind": "full", "stopped_ms": 1_796_320_810_000i64, "size_bytes": 3u64 << 30, "repo_size_bytes": 5u64 << 20, "error": false}]}],
            "recoverable": {"from_ms": 1_796_320_810_000i64, "newest_backup_ms": 1_796_320_810_000i64, "archived_wal_to": "000000010000000000000009"},
        });
        let t = backups_table(&v);
        assert!(t.contains("chain 20261203-200000F"), "{t}");
        assert!(t.contains("3.0 GiB") && t.contains("5.0 MiB"), "{t}");
        assert!(t.contains("recoverable from 2026-12-03 18:00:10Z"), "{t}");
        assert!(t.contains("000000010000000000000009"), "{t}");
        assert!(backups_table(&json!({"chains": []})).contains("no backups yet"));
    }
}
