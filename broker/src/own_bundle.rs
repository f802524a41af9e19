//! The broker's own log bundle (`POST /v1/broker/bundle`, `dbvmctl bundle --broker`): its
//! version, its config (redacted by an allow-list of keys) and what a check of that file
//! says now, its logs (the journal of `dbvm-broker` where journald runs, the files of
//! `[bundles] log_dir` otherwise), the store's statistics, the agents it knows, its
//! metrics and the host's basics, made with the same writer and redaction as the agents'
//! bundles and kept in the same bundle store (its agent is [`BROKER`]), so it is listed,
//! fetched, checked and expired like theirs.

use crate::bundles::{BundleError, BundleStore};
use crate::hub::Hub;
use dbvm_bundle::{ConfigFormat, Part, Producer, Request};
use dbvm_protocol::api::BundleInfo;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The `agent_id` of the broker's own bundles: no agent id can be this (agent ids have
/// no parentheses).
pub const BROKER: &str = "(broker)";
/// How long one part may take (journalctl over a large window).
const PART_TIMEOUT: Duration = Duration::from_secs(120);
/// The cap on the files' bytes (before compression): logs keep their newest lines.
const MAX_BYTES: u64 = 512 * 1024 * 1024;

/// The broker config's keys whose values a bundle keeps (every key there is: the config
/// holds paths, addresses, limits and public keys, never a secret; a key added later is
/// redacted until it is listed here).
pub const BROKER_CONFIG_SAFE_KEYS: &[&str] = &[
    "agent_listen",
    "api_listen",
    "data_dir",
    "tls.*",
    "trusted_keys.key_id",
    "trusted_keys.public_key",
    "agents.*",
    "limits.*",
    "listeners.*",
    "log.*",
    "artifacts.*",
    "bundles.*",
];

/// What goes into the broker's bundle.
pub struct Sources {
    pub config_file: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
}

fn json_part(path: &str, source: &str, value: serde_json::Value) -> Part {
    Part::produced(path, source, async move {
        serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())
    })
}

/// Every part of the broker's bundle for the last `hours`.
async fn parts(hub: &Arc<Hub>, sources: &Sources, hours: u32) -> Vec<Part> {
    let mut parts = vec![Part::produced(
        "broker/version.txt",
        "the broker itself",
        async move {
            Ok(format!(
                "dbvm-broker {}\nprotocol {}.{}\n",
                dbvm_host::VERSION,
                dbvm_protocol::PROTOCOL_MAJOR,
                dbvm_protocol::PROTOCOL_MINOR
            )
            .into_bytes())
        },
    )];
    match &sources.config_file {
        Some(file) => {
            parts.push(Part::config(
                "broker/config.toml",
                file.display().to_string(),
                Producer::File(file.clone()),
                ConfigFormat::Toml,
                BROKER_CONFIG_SAFE_KEYS,
            ));
            let f = file.clone();
            parts.push(Part::produced(
                "broker/config-check.txt",
                format!("dbvm-broker --check --config {}", file.display()),
                async move {
                    let check = tokio::task::spawn_blocking(move || crate::Config::load(&f))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(match check {
                        Ok(_) => "the configuration is valid\n".to_string(),
                        Err(e) => format!("the configuration is NOT valid: {e}\n"),
                    }
                    .into_bytes())
                },
            ));
        }
        None => parts.push(Part::log(
            "broker/config.toml",
            "the broker's config file",
            Producer::Unavailable("this broker was not started from a config file".into()),
        )),
    }
    let store = match hub.store.stats().await {
        Ok(v) => v,
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    parts.push(json_part("broker/store.json", "the store's counts", store));
    match hub.agent_views().await {
        Ok(agents) => parts.push(json_part(
            "broker/agents.json",
            "GET /v1/agents",
            serde_json::to_value(agents).unwrap_or_default(),
        )),
        Err(e) => parts.push(Part::log(
            "broker/agents.json",
            "GET /v1/agents",
            Producer::Unavailable(format!("the store could not list the agents: {e}")),
        )),
    }
    hub.refresh_metrics();
    let metrics = hub.metrics.render();
    parts.push(Part::produced(
        "broker/metrics.txt",
        "GET /metrics",
        async move { Ok(metrics.into_bytes()) },
    ));
    parts.push(Part::command(
        "system/disk.txt",
        &["df", "-P", &sources.data_dir.display().to_string()],
        PART_TIMEOUT,
    ));
    parts.push(Part::log_file("system/os-release", "/etc/os-release"));
    parts.push(Part::log_file("system/kernel-version", "/proc/version"));
    parts.push(Part::log_file("system/meminfo", "/proc/meminfo"));
    parts.push(logs_part(sources.log_dir.as_deref(), hours));
    parts
}

/// The broker's logs for the last `hours`: its journal where journald runs, the files of
/// `log_dir` otherwise.
fn logs_part(log_dir: Option<&Path>, hours: u32) -> Part {
    if Path::new("/run/systemd/journal/socket").exists() {
        let since = format!("-{hours}h");
        return Part::command(
            "broker/journal.log",
            &[
                "journalctl",
                "--no-pager",
                "--output=short-iso-precise",
                "-u",
                "dbvm-broker",
                "--since",
                &since,
            ],
            PART_TIMEOUT,
        );
    }
    match log_dir {
        Some(dir) => Part::log(
            "broker/logs",
            format!("the broker's log files in {}", dir.display()),
            Producer::Dir(dir.to_path_buf()),
        ),
        None => Part::log(
            "broker/journal.log",
            "journalctl -u dbvm-broker",
            Producer::Unavailable(
                "journald is not running here and bundles.log_dir is not set; the broker logs \
                 to its standard error, which only its supervisor keeps"
                    .into(),
            ),
        ),
    }
}

/// Makes the broker's bundle of the last `hours` and stores it complete.
pub async fn collect(
    hub: &Arc<Hub>,
    bundles: &BundleStore,
    sources: &Sources,
    hours: u32,
) -> Result<BundleInfo, BundleError> {
    let now = dbvm_protocol::now_ms();
    let options = dbvm_bundle::Options {
        agent_id: BROKER.into(),
        request: Request {
            since_ms: now - i64::from(hours) * 3_600_000,
            until_ms: now,
            include_db_logs: false,
            include_db_views: false,
        },
        max_bytes: MAX_BYTES,
        part_timeout: PART_TIMEOUT,
        zstd_level: 3,
        version: dbvm_host::VERSION.to_string(),
    };
    let parts = parts(hub, sources, hours).await;
    bundles.store_made(BROKER, parts, options).await
}
