//! The backup capability's bundle parts: its state file (no secrets by design; still
//! through the log patterns), pgBackRest's configs with only the keys known to be safe
//! (the S3 keys and any cipher pass are replaced), and pgBackRest's logs when the bundle
//! includes database logs. `cloud-storage.json` (the copier's keys) is never read.

use super::BackupManager;
use crate::bundle::{ConfigFormat, Part, Producer, Request};
use std::sync::Arc;

/// pgBackRest keys whose values are safe in a bundle, in any section (`[global]`, the
/// stanza's). Everything else — `repo1-s3-key`, `repo1-s3-key-secret`, a cipher pass, a
/// key the agent does not write yet — is redacted.
pub const PGBACKREST_SAFE_KEYS: &[&str] = &[
    "*.repo1-type",
    "*.repo1-s3-endpoint",
    "*.repo1-storage-port",
    "*.repo1-s3-uri-style",
    "*.repo1-s3-bucket",
    "*.repo1-s3-region",
    "*.repo1-storage-ca-file",
    "*.repo1-path",
    "*.repo1-retention-full-type",
    "*.repo1-retention-full",
    "*.expire-auto",
    "*.start-fast",
    "*.compress-type",
    "*.process-max",
    "*.io-timeout",
    "*.log-path",
    "*.lock-path",
    "*.log-level-console",
    "*.log-level-stderr",
    "*.log-level-file",
    "*.log-timestamp",
    "*.pg1-path",
    "*.pg1-port",
    "*.pg1-socket-path",
    "*.pg1-user",
];

pub fn parts(manager: &Arc<BackupManager>, request: &Request) -> Vec<Part> {
    let p = manager.db().paths();
    let mut parts = vec![Part::log_file("backup/state.json", &manager.state_path)];
    for name in ["pgbackrest.conf", "pgbackrest-cloud.conf"] {
        let file = p.conf.join(name);
        if file.exists() {
            parts.push(Part::config(
                format!("backup/{name}"),
                file.display().to_string(),
                Producer::File(file),
                ConfigFormat::KeyValue,
                PGBACKREST_SAFE_KEYS,
            ));
        }
    }
    let logs = p.log.join("pgbackrest");
    if !request.include_db_logs {
        parts.push(Part::log(
            "backup/pgbackrest-log/",
            logs.display().to_string(),
            Producer::Unavailable("the bundle was asked without database logs".into()),
        ));
    } else if logs.exists() {
        parts.push(Part::log(
            "backup/pgbackrest-log/",
            logs.display().to_string(),
            Producer::Dir(logs),
        ));
    }
    parts
}
