//! The bundle capability: `bundle.collect` (signed; a management operation) gathers every
//! capability's parts into `state_dir/bundle/<command id>.tar.zst` and answers with the
//! manifest's summary; and the agent's own parts: its journal, its config (redacted),
//! its version and what `--check` says of its config now.
//!
//! With `broker_url` in its arguments, the bundle goes to the broker as it is written
//! ([`super::upload`]) and the local file is removed once the broker has checked it;
//! without, it stays in the state directory.

use super::{ConfigFormat, Options, Part, Producer, Request};
use crate::capability::{Capability, Context};
use crate::dispatch::{parse_args, OpContext, OpError, Operation};
use async_trait::async_trait;
use dbvm_protocol::api::OperationClass;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The `[bundle]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleSettings {
    /// The systemd unit whose journal entries are the agent's logs.
    pub journal_unit: String,
    /// The size cap when a command names none (bytes of files, before compression).
    pub default_max_bytes: u64,
    /// Bundles kept in `state_dir/bundle/` (the oldest go when a new one is written).
    pub keep: usize,
    /// A directory of the agent's own log files (every regular file in it), collected
    /// when journald is not running (an agent whose supervisor writes its standard error
    /// to files).
    pub log_dir: Option<PathBuf>,
}

impl Default for BundleSettings {
    fn default() -> Self {
        Self {
            journal_unit: "dbvm-agent".into(),
            default_max_bytes: 512 * MIB,
            keep: 3,
            log_dir: None,
        }
    }
}

const MIB: u64 = 1024 * 1024;
/// The largest size cap a command may ask for.
pub const MAX_BYTES_LIMIT: u64 = 16 * 1024 * MIB;
/// The smallest (below it, a bundle would hold little more than its manifest).
pub const MIN_BYTES_LIMIT: u64 = MIB;
/// The longest window a command may ask for, in hours (30 days).
pub const MAX_WINDOW_HOURS: u32 = 720;
/// The window when a command names none.
const DEFAULT_WINDOW_HOURS: u32 = 24;
/// How long one command of the bundle may run (journalctl over a large window).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

impl BundleSettings {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.journal_unit.trim().is_empty() || self.journal_unit.starts_with('-') {
            return Err((
                "bundle.journal_unit".into(),
                "must name a systemd unit (dbvm-agent)".into(),
            ));
        }
        if !(MIN_BYTES_LIMIT..=MAX_BYTES_LIMIT).contains(&self.default_max_bytes) {
            return Err((
                "bundle.default_max_bytes".into(),
                format!("must be between {MIN_BYTES_LIMIT} and {MAX_BYTES_LIMIT} bytes"),
            ));
        }
        if !(1..=100).contains(&self.keep) {
            return Err(("bundle.keep".into(), "must be between 1 and 100".into()));
        }
        Ok(())
    }
}

/// The keys of the agent's config that keep their values in a bundle. The agent's
/// config holds no secret by design (secrets reach the agent sealed, in commands); this
/// list names every key there is, so a key added later is redacted until it is listed.
pub const AGENT_CONFIG_SAFE_KEYS: &[&str] = &[
    "agent_id",
    "state_dir",
    "broker.address",
    "broker.server_name",
    "broker.ca_cert",
    "broker.enrollment_token_file",
    "trusted_keys.key_id",
    "trusted_keys.public_key",
    "link.initial_backoff_ms",
    "link.max_backoff_ms",
    "link.drain_timeout_s",
    "log.format",
    "log.level",
    "database.runtime",
    "database.docker_socket",
    "database.data_root",
    "database.container_name",
    "database.images.*",
    "database.uid",
    "database.gid",
    "database.start_timeout_s",
    "database.engine_wait_s",
    "database.reconcile_interval_s",
    "database.process_path",
    "firewall.enabled",
    "firewall.table",
    "firewall.management_interface",
    "firewall.application_interface",
    "firewall.nft",
    "firewall.netns",
    "firewall.extra_tcp_ports",
    "firewall.allow_icmp",
    "firewall.command_timeout_ms",
    "health.enabled",
    "health.interval_s",
    "health.check_timeout_ms",
    "health.report_every_s",
    "health.metrics_listen",
    "health.system_disk",
    "health.data_disk",
    "health.shadow_file",
    "health.accounts",
    "health.chronyc",
    "health.expected_role",
    "health.telegraf.*",
    "health.thresholds.*",
    "backup.io_timeout_s",
    "backup.process_max",
    "backup.timeout_s",
    "backup.purge_at",
    "backup.binlog_rotate_s",
    "backup.verify_every_days",
    "backup.cloud_copy_s",
    "bundle.journal_unit",
    "bundle.default_max_bytes",
    "bundle.keep",
    "bundle.log_dir",
];

/// The bundle capability: `bundle.collect` over the parts of every other capability.
pub struct Bundles {
    inner: Arc<Inner>,
}

struct Inner {
    agent_id: String,
    state_dir: PathBuf,
    config_file: Option<PathBuf>,
    settings: BundleSettings,
    others: Vec<Arc<dyn Capability>>,
    /// One bundle at a time: a second `bundle.collect` is refused while one runs.
    busy: tokio::sync::Mutex<()>,
    /// The fleet CA's certificate (PEM file), which the broker's API is checked against
    /// when a bundle is uploaded.
    ca_cert: Option<PathBuf>,
}

impl std::fmt::Debug for Bundles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundles").finish_non_exhaustive()
    }
}

impl Bundles {
    /// The capability over `others` (every capability made before it). `config_file` is
    /// the agent's config file, when it was read from one.
    pub fn new(
        ctx: &Context,
        settings: BundleSettings,
        config_file: Option<PathBuf>,
        others: Vec<Arc<dyn Capability>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                agent_id: ctx.agent_id.clone(),
                state_dir: ctx.state_dir.clone(),
                config_file,
                settings,
                others,
                busy: tokio::sync::Mutex::new(()),
                ca_cert: None,
            }),
        }
    }

    /// Bundles may be uploaded to the broker whose API presents a certificate of the
    /// fleet CA in `ca_cert` (the link's).
    pub fn uploading_with(mut self, ca_cert: PathBuf) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ca_cert = Some(ca_cert);
        }
        self
    }

    /// Every part of a bundle for `request`: the agent's own small parts first, then each
    /// capability's in the order they were made, the agent's journal last (a size cap
    /// cuts logs, not facts).
    pub fn parts(&self, request: &Request) -> Vec<Part> {
        let mut own = self.bundle_parts(request);
        let journal = own.pop();
        let mut parts = own;
        for c in &self.inner.others {
            parts.extend(c.bundle_parts(request));
        }
        parts.extend(journal);
        parts
    }

    /// Takes the one-bundle-at-a-time guard, makes `state_dir/bundle` (0700) and removes
    /// what an interrupted bundle left there; the writer's options for `request`.
    async fn prepare(
        &self,
        request: &Request,
        max_bytes: u64,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, PathBuf, Options), OpError> {
        let inner = &self.inner;
        let running = inner.busy.try_lock().map_err(|_| {
            OpError::Failed(
                "a bundle is already being collected on this agent; try again when it has finished"
                    .into(),
            )
        })?;
        let dir = inner.state_dir.join("bundle");
        make_private_dir(&dir)
            .await
            .map_err(|e| OpError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        remove_leftovers(&dir).await;
        let options = Options {
            agent_id: inner.agent_id.clone(),
            request: request.clone(),
            max_bytes,
            part_timeout: COMMAND_TIMEOUT,
            zstd_level: 3,
            version: dbvm_host::VERSION.to_string(),
        };
        Ok((running, dir, options))
    }

    /// Builds a bundle into `state_dir/bundle/<name>.tar.zst`.
    pub async fn collect(
        &self,
        name: &str,
        request: Request,
        max_bytes: u64,
    ) -> Result<serde_json::Value, OpError> {
        let inner = &self.inner;
        let (_running, dir, options) = self.prepare(&request, max_bytes).await?;
        let file = format!("{name}.tar.zst");
        let (m, bytes, sha256) = super::collect_to_file(self.parts(&request), options, &dir, &file)
            .await
            .map_err(|e| OpError::Failed(e.to_string()))?;
        prune(&dir, inner.settings.keep).await;
        Ok(serde_json::json!({
            "path": dir.join(&file),
            "bytes": bytes,
            "sha256": sha256,
            "files": m.files.len(),
            "content_bytes": m.content_bytes,
            "max_bytes": m.max_bytes,
            "redactions": m.redactions,
            "failed": m.failed,
            "skipped": m.skipped,
            "left_out": m.left_out,
        }))
    }
}

impl Bundles {
    /// Builds a bundle and uploads it to the broker while it is written (see
    /// [`super::upload`]); the local file is removed at the end, whatever happened (the
    /// broker holds the bundle, or the command failed and says why).
    pub async fn collect_and_upload(
        &self,
        ctx: &OpContext,
        request: Request,
        max_bytes: u64,
        broker: &hyper::Uri,
    ) -> Result<serde_json::Value, OpError> {
        use super::upload::{self, End, Written};
        let id = ctx.command.id.to_string();
        let dest = self.destination(broker, &id)?;
        let (_running, dir, options) = self.prepare(&request, max_bytes).await?;
        let file = dir.join(format!(".{id}.upload"));
        let spool_dir = dir.join(format!(".{id}.spool"));
        let started = std::time::Instant::now();
        let out = upload::create(&file)
            .await
            .map_err(|e| OpError::Failed(format!("cannot create {}: {e}", file.display())))?;
        let (chunks, rx) = tokio::sync::mpsc::channel(super::writer::CHANNEL_CHUNKS);
        let (wtx, wrx) = tokio::sync::watch::channel(Written::default());
        let writing = async {
            let (m, spooled) = tokio::join!(
                super::collect(self.parts(&request), options, &spool_dir, chunks),
                upload::spool(out, rx, &wtx)
            );
            let result = match (m, spooled) {
                (Ok(m), Ok((size, sha256))) => {
                    wtx.send_modify(|w| {
                        w.end = Some(End::Complete {
                            size,
                            sha256: sha256.clone(),
                        })
                    });
                    Ok((m, size, sha256))
                }
                (_, Err(e)) => Err(format!("cannot write {}: {e}", file.display())),
                (Err(e), Ok(_)) => Err(e.to_string()),
            };
            if result.is_err() {
                wtx.send_modify(|w| w.end = Some(End::Failed));
            }
            result
        };
        let watched = wrx.clone();
        let last = std::sync::Mutex::new(std::time::Instant::now());
        let uploading = upload::upload(&dest, &file, wrx, |stored| {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= std::time::Duration::from_secs(1) {
                *last = std::time::Instant::now();
                let w = watched.borrow().bytes;
                ctx.progress(
                    50,
                    format!(
                        "collecting and uploading: {} MiB written, {} MiB on the broker",
                        w >> 20,
                        stored >> 20
                    ),
                );
            }
        });
        tokio::pin!(writing);
        tokio::pin!(uploading);
        let outcome = tokio::select! {
            written = &mut writing => match written {
                Ok(w) => {
                    ctx.progress(90, format!("bundle written ({} bytes); finishing the upload", w.1));
                    uploading.await.map(|u| (w, u)).map_err(|e| format!("uploading the bundle to {broker}: {e}"))
                }
                Err(e) => Err(e),
            },
            // Only a failure ends the upload before the writer (it needs the end).
            uploaded = &mut uploading => Err(match uploaded {
                Err(e) => format!("uploading the bundle to {broker}: {e}"),
                Ok(_) => "the upload ended before the bundle was written".into(),
            }),
        };
        let _ = tokio::fs::remove_file(&file).await;
        let _ = tokio::fs::remove_dir_all(&spool_dir).await;
        let ((m, bytes, sha256), uploaded) = outcome.map_err(OpError::Failed)?;
        Ok(serde_json::json!({
            "bundle_id": id,
            "bytes": bytes,
            "sha256": sha256,
            "files": m.files.len(),
            "content_bytes": m.content_bytes,
            "max_bytes": m.max_bytes,
            "redactions": m.redactions,
            "failed": m.failed,
            "skipped": m.skipped,
            "left_out": m.left_out,
            "uploaded": { "bytes": uploaded.bytes, "resumed": uploaded.resumed },
            "total_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    /// Where bundle `id` goes on `broker`, with the agent's credentials.
    fn destination(
        &self,
        broker: &hyper::Uri,
        id: &str,
    ) -> Result<super::upload::Destination, OpError> {
        let Some(ca_cert) = &self.inner.ca_cert else {
            return Err(OpError::Failed(
                "this agent has no fleet CA certificate to check the broker's API with".into(),
            ));
        };
        let ca_pem = std::fs::read_to_string(ca_cert).map_err(|e| {
            OpError::Failed(format!(
                "cannot read the fleet CA certificate {}: {e}",
                ca_cert.display()
            ))
        })?;
        let identity = crate::identity::StateDir::open(&self.inner.state_dir)
            .and_then(|s| s.identity())
            .map_err(|e| OpError::Failed(format!("the agent's identity: {e}")))?
            .ok_or_else(|| {
                OpError::Failed("the agent has no certificate to upload the bundle with".into())
            })?;
        let base = broker.to_string();
        Ok(super::upload::Destination {
            bundle_url: format!("{}/v1/bundles/{id}", base.trim_end_matches('/')),
            ca_pem,
            identity,
        })
    }
}

async fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::create_dir_all(dir).await?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).await
}

/// Removes what a bundle cut short by a crash left (its temporary file and spool
/// directory, both dot-named): one bundle runs at a time, so none is in use now.
async fn remove_leftovers(dir: &Path) {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        if !e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        let removed = match e.file_type().await {
            Ok(t) if t.is_dir() => tokio::fs::remove_dir_all(&path).await,
            _ => tokio::fs::remove_file(&path).await,
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed what an interrupted bundle left")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove what an interrupted bundle left")
            }
        }
    }
}

/// Removes all but the newest `keep` bundles.
async fn prune(dir: &Path, keep: usize) {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return;
    };
    let mut bundles = Vec::new();
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tar.zst") && !name.starts_with('.') {
            if let Ok(md) = e.metadata().await {
                bundles.push((md.modified().ok(), e.path()));
            }
        }
    }
    bundles.sort();
    let excess = bundles.len().saturating_sub(keep);
    for (_, path) in bundles.into_iter().take(excess) {
        if let Err(e) = tokio::fs::remove_file(&path).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an old bundle");
        }
    }
}

impl Capability for Bundles {
    fn name(&self) -> &'static str {
        "bundle"
    }

    fn operations(&self) -> Vec<Arc<dyn Operation>> {
        vec![Arc::new(Collect(Bundles {
            inner: self.inner.clone(),
        }))]
    }

    /// The agent's own parts; the journal is the last (see [`Bundles::parts`]).
    fn bundle_parts(&self, request: &Request) -> Vec<Part> {
        let inner = &self.inner;
        let mut parts = vec![Part::produced("agent/version.txt", "the agent itself", {
            async move {
                Ok(format!(
                    "dbvm-agent {}\nprotocol {}.{}\n",
                    env!("CARGO_PKG_VERSION"),
                    dbvm_protocol::PROTOCOL_MAJOR,
                    dbvm_protocol::PROTOCOL_MINOR
                )
                .into_bytes())
            }
        })];
        match &inner.config_file {
            Some(file) => {
                parts.push(Part::config(
                    "agent/config.toml",
                    file.display().to_string(),
                    Producer::File(file.clone()),
                    ConfigFormat::Toml,
                    AGENT_CONFIG_SAFE_KEYS,
                ));
                let f = file.clone();
                parts.push(Part::produced(
                    "agent/config-check.txt",
                    format!("dbvm-agent --check --config {}", file.display()),
                    async move {
                        let check = tokio::task::spawn_blocking(move || {
                            crate::config::Config::load(&f).and_then(|c| c.validate())
                        })
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
                "agent/config.toml",
                "the agent's config file",
                Producer::Unavailable(
                    "this agent was not started from a config file (built in-process)".into(),
                ),
            )),
        }
        let state_dir = inner.state_dir.clone();
        parts.push(Part::produced(
            "agent/state-dir.txt",
            format!(
                "a listing of {} (names, sizes, modes; no contents)",
                inner.state_dir.display()
            ),
            async move {
                tokio::task::spawn_blocking(move || list_tree(&state_dir, 3))
                    .await
                    .map_err(|e| e.to_string())?
            },
        ));
        parts.push(journal_part(
            &inner.settings.journal_unit,
            inner.settings.log_dir.as_deref(),
            request,
        ));
        parts
    }
}

/// The agent's journal entries in the window, where journald runs; its log files in
/// `log_dir` otherwise.
fn journal_part(unit: &str, log_dir: Option<&Path>, request: &Request) -> Part {
    let path = "agent/journal.log";
    let source = format!("journalctl -u {unit}");
    if !Path::new("/run/systemd/journal/socket").exists() {
        if let Some(dir) = log_dir {
            return Part::log(
                "agent/logs",
                format!("the agent's log files in {}", dir.display()),
                Producer::Dir(dir.to_path_buf()),
            );
        }
        return Part::log(
            path,
            source,
            Producer::Unavailable(
                "journald is not running here (no /run/systemd/journal/socket) and bundle.log_dir \
                 is not set; the agent logs to its standard error, which only its supervisor keeps"
                    .into(),
            ),
        );
    }
    let since = format!("@{}", request.since_ms.div_euclid(1000));
    let until = format!("@{}", request.until_ms.div_euclid(1000) + 1);
    Part::command(
        path,
        &[
            "journalctl",
            "--no-pager",
            "--output=short-iso-precise",
            "-u",
            unit,
            "--since",
            &since,
            "--until",
            &until,
        ],
        COMMAND_TIMEOUT,
    )
}

/// A listing of `root` down to `depth` levels: path, size, mode; never contents.
fn list_tree(root: &Path, depth: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = String::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, level)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries.into_iter().rev() {
            let Ok(md) = e.metadata() else { continue };
            let rel = e.path();
            let rel = rel.strip_prefix(root).unwrap_or(&rel).display().to_string();
            let kind = if md.is_dir() { "dir " } else { "file" };
            out.push_str(&format!(
                "{kind} {:o} {:>12} {rel}\n",
                md.permissions().mode() & 0o7777,
                md.len()
            ));
            if md.is_dir() && level + 1 < depth {
                stack.push((e.path(), level + 1));
            }
        }
    }
    Ok(out.into_bytes())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    hours: Option<u32>,
    include_db_logs: Option<bool>,
    include_db_views: Option<bool>,
    max_bytes: Option<u64>,
    /// The broker's API (`https://host:port`): the bundle is uploaded there.
    broker_url: Option<String>,
}

impl Args {
    /// The request and the size cap, or why the arguments are refused.
    fn check(self, now_ms: i64, default_max: u64) -> Result<(Request, u64), String> {
        let (since_ms, until_ms) = match (self.hours, self.since_ms, self.until_ms) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err("give either hours or since_ms/until_ms, not both".into())
            }
            (Some(h), None, None) => {
                if !(1..=MAX_WINDOW_HOURS).contains(&h) {
                    return Err(format!(
                        "hours must be between 1 and {MAX_WINDOW_HOURS}, not {h}"
                    ));
                }
                (now_ms - i64::from(h) * 3_600_000, now_ms)
            }
            (None, since, until) => {
                let until = until.unwrap_or(now_ms);
                let since = since.unwrap_or(until - i64::from(DEFAULT_WINDOW_HOURS) * 3_600_000);
                if since < 0 || since >= until {
                    return Err(format!(
                        "since_ms ({since}) must be before until_ms ({until}) and not negative"
                    ));
                }
                if until - since > i64::from(MAX_WINDOW_HOURS) * 3_600_000 {
                    return Err(format!(
                        "the window is longer than {MAX_WINDOW_HOURS} hours"
                    ));
                }
                (since, until)
            }
        };
        let max_bytes = self.max_bytes.unwrap_or(default_max);
        if !(MIN_BYTES_LIMIT..=MAX_BYTES_LIMIT).contains(&max_bytes) {
            return Err(format!(
                "max_bytes must be between {MIN_BYTES_LIMIT} and {MAX_BYTES_LIMIT}, not {max_bytes}"
            ));
        }
        Ok((
            Request {
                since_ms,
                until_ms,
                include_db_logs: self.include_db_logs.unwrap_or(true),
                include_db_views: self.include_db_views.unwrap_or(false),
            },
            max_bytes,
        ))
    }
}

struct Collect(Bundles);

#[async_trait]
impl Operation for Collect {
    fn name(&self) -> &'static str {
        "bundle.collect"
    }

    fn class(&self) -> OperationClass {
        OperationClass::Management
    }

    async fn run(
        &self,
        ctx: OpContext,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, OpError> {
        let args: Args = if args.is_null() {
            Args::default()
        } else {
            parse_args(args)?
        };
        let broker = args
            .broker_url
            .as_deref()
            .map(super::upload::check_broker_url)
            .transpose()
            .map_err(OpError::BadArguments)?;
        let (request, max_bytes) = args
            .check(
                dbvm_protocol::now_ms(),
                self.0.inner.settings.default_max_bytes,
            )
            .map_err(OpError::BadArguments)?;
        if let Some(broker) = broker {
            ctx.progress(0, "collecting the bundle and uploading it");
            return self
                .0
                .collect_and_upload(&ctx, request, max_bytes, &broker)
                .await;
        }
        ctx.progress(0, "collecting the bundle");
        let summary = self
            .0
            .collect(&ctx.command.id.to_string(), request, max_bytes)
            .await?;
        ctx.progress(100, "bundle written");
        Ok(summary)
    }
}

#[cfg(test)]
mod tests;
