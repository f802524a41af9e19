//! The twelve health checks and their scheduler.
//!
//! Each check is a module under `checks/` with one job: it looks at one thing and returns
//! a [`Finding`] (status, a message a person can act on, figures). The [`Monitor`] runs
//! all of them concurrently every `interval_s`, each under its own timeout (a check that
//! hangs is cut off and reported `unknown`; the others report on time), keeps the latest
//! report, pushes every change of status to the broker as a `health.changed` event at
//! once, and sends the full report on change, on connect and every `report_every_s`.
//!
//! Checks that touch the file system do it on the blocking pool, so a hung mount blocks
//! a pool thread, never the runtime. The database checks share one snapshot per run
//! ([`db::DbSnapshot`]), read over one cached admin connection.

pub mod bundle;
pub mod capability;
pub mod checks;
pub mod db;
pub mod prometheus;
pub mod settings;

use crate::capability::{Context, Outbox};
use crate::db::DbManager;
use async_trait::async_trait;
use dbvm_protocol::health::{
    CheckReport, HealthChange, HealthReport, HealthStatus, HEALTH_CHANGED,
};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

pub use settings::{HealthSettings, Thresholds};

/// What one check found.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub status: HealthStatus,
    pub message: String,
    pub figures: BTreeMap<String, f64>,
}

impl Finding {
    pub fn new(status: HealthStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            figures: BTreeMap::new(),
        }
    }

    pub fn ok(message: impl Into<String>) -> Self {
        Self::new(HealthStatus::Ok, message)
    }

    pub fn unknown(message: impl Into<String>) -> Self {
        Self::new(HealthStatus::Unknown, message)
    }

    /// Adds a figure (non-finite values are left out: they cannot be sent or scraped).
    pub fn figure(mut self, name: &str, value: f64) -> Self {
        if value.is_finite() {
            self.figures.insert(name.to_string(), value);
        }
        self
    }

    pub fn figures(mut self, figures: impl IntoIterator<Item = (&'static str, f64)>) -> Self {
        for (k, v) in figures {
            self = self.figure(k, v);
        }
        self
    }
}

/// Status for a value against warning/critical limits (higher is worse).
pub fn grade(value: f64, warning: f64, critical: f64) -> HealthStatus {
    if value >= critical {
        HealthStatus::Critical
    } else if value >= warning {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    }
}

#[async_trait]
pub trait Check: Send + Sync + 'static {
    /// The id from [`dbvm_protocol::health::CHECKS`].
    fn id(&self) -> &'static str;
    async fn run(&self, run: &Run) -> Finding;
}

/// Counters of the metrics endpoint, read by the `metrics` check.
#[derive(Debug, Default)]
pub struct MetricsStats {
    /// 0: no endpoint configured, 1: listening, 2: could not bind.
    pub state: AtomicU64,
    pub bind_error: std::sync::Mutex<String>,
    pub scrapes: AtomicU64,
    pub last_scrape_ms: AtomicI64,
    /// When the last full set of samples (a health run) was produced.
    pub last_sample_ms: AtomicI64,
    pub series: AtomicU64,
}

/// What the checks share across runs.
pub struct Shared {
    pub agent_id: String,
    pub settings: HealthSettings,
    pub db: Option<Arc<DbManager>>,
    /// Events and reports to the broker, and the link's state.
    pub outbox: Outbox,
    pub state_dir: PathBuf,
    pub data_disk: PathBuf,
    /// When the monitor was made (ms since the epoch): the link gets a grace period.
    pub started_ms: i64,
    pub metrics: MetricsStats,
    /// The cached admin connection (over the database's unix socket).
    pub admin: tokio::sync::Mutex<Option<crate::db::engine::Admin>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

/// One run of the checks.
pub struct Run {
    pub shared: Arc<Shared>,
    pub at_ms: i64,
    db: OnceCell<Arc<db::DbSnapshot>>,
}

impl Run {
    pub fn settings(&self) -> &HealthSettings {
        &self.shared.settings
    }

    /// The database as seen in this run (read once, shared by the database checks).
    pub async fn db(&self) -> Arc<db::DbSnapshot> {
        self.db
            .get_or_init(|| async { Arc::new(db::DbSnapshot::take(&self.shared).await) })
            .await
            .clone()
    }
}

struct Previous {
    status: HealthStatus,
    since_ms: i64,
}

struct RunState {
    previous: HashMap<&'static str, Previous>,
    last_sent: Option<Instant>,
}

/// Runs the checks and keeps the latest report.
pub struct Monitor {
    shared: Arc<Shared>,
    checks: Vec<Arc<dyn Check>>,
    /// Serialises runs (the schedule and on-demand `health` commands).
    state: tokio::sync::Mutex<RunState>,
    latest: std::sync::RwLock<Option<Arc<HealthReport>>>,
    /// The last [`HISTORY_REPORTS`] reports, oldest first (for log bundles).
    history: std::sync::Mutex<std::collections::VecDeque<Arc<HealthReport>>>,
}

/// Reports kept in memory for log bundles (five minutes at the default 10 s interval).
pub const HISTORY_REPORTS: usize = 30;

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    /// A monitor running the twelve checks, where `contributed` checks (from other
    /// capabilities) replace the check of the same id or, with a new id, follow the twelve.
    pub fn new(
        ctx: &Context,
        settings: HealthSettings,
        db: Option<Arc<DbManager>>,
        contributed: Vec<Arc<dyn Check>>,
    ) -> Arc<Self> {
        let data_disk = settings.data_disk.clone().unwrap_or_else(|| match &db {
            Some(m) => m.settings().data_root.clone(),
            None => ctx.state_dir.clone(),
        });
        let mut checks = checks::all();
        for c in contributed {
            match checks.iter_mut().find(|own| own.id() == c.id()) {
                Some(own) => *own = c,
                None => checks.push(c),
            }
        }
        Arc::new(Self {
            shared: Arc::new(Shared {
                agent_id: ctx.agent_id.clone(),
                settings,
                db,
                outbox: ctx.outbox.clone(),
                state_dir: ctx.state_dir.clone(),
                data_disk,
                started_ms: dbvm_protocol::now_ms(),
                metrics: MetricsStats::default(),
                admin: tokio::sync::Mutex::new(None),
            }),
            checks,
            state: tokio::sync::Mutex::new(RunState {
                previous: HashMap::new(),
                last_sent: None,
            }),
            latest: std::sync::RwLock::new(None),
            history: std::sync::Mutex::new(std::collections::VecDeque::new()),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn settings(&self) -> &HealthSettings {
        &self.shared.settings
    }

    /// The report of the last run, if any.
    pub fn latest(&self) -> Option<Arc<HealthReport>> {
        self.latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs every check once (concurrently, each under its timeout) and publishes the
    /// result: changes go to the broker as events at once.
    pub async fn run_once(&self) -> Arc<HealthReport> {
        let mut state = self.state.lock().await;
        let started = Instant::now();
        let run = Arc::new(Run {
            shared: self.shared.clone(),
            at_ms: dbvm_protocol::now_ms(),
            db: OnceCell::new(),
        });
        let timeout = Duration::from_millis(self.shared.settings.check_timeout_ms);
        let runs = self.checks.iter().map(|check| {
            let run = run.clone();
            let check = check.clone();
            async move {
                let t = Instant::now();
                let finding = match tokio::time::timeout(timeout, check.run(&run)).await {
                    Ok(f) => f,
                    Err(_) => Finding::unknown(format!(
                        "the check did not finish within {} ms and was cut off (the other checks are not affected); if this repeats, look at what it reads: see the agent log",
                        timeout.as_millis()
                    )),
                };
                (check.id(), finding, t.elapsed())
            }
        });
        let results = futures::future::join_all(runs).await;
        let now = dbvm_protocol::now_ms();
        let mut checks = Vec::with_capacity(results.len());
        let mut changed = false;
        for (id, finding, took) in results {
            let prev = state.previous.get(id);
            let from = prev.map(|p| p.status);
            let since_ms = match prev {
                Some(p) if p.status == finding.status => p.since_ms,
                _ => now,
            };
            if from != Some(finding.status) {
                changed = true;
                // The first run reports only what is not ok (the full report goes out
                // anyway); later runs report every change.
                if from.is_some() || finding.status != HealthStatus::Ok {
                    self.announce(id, from, &finding, now);
                }
            }
            state.previous.insert(
                id,
                Previous {
                    status: finding.status,
                    since_ms,
                },
            );
            checks.push(CheckReport {
                check: id.to_string(),
                status: finding.status,
                message: finding.message,
                figures: finding.figures,
                duration_ms: u32::try_from(took.as_millis()).unwrap_or(u32::MAX),
                since_ms,
            });
        }
        let report = HealthReport {
            agent_id: self.shared.agent_id.clone(),
            at_ms: run.at_ms,
            interval_ms: u32::try_from(self.shared.settings.interval_s * 1000).unwrap_or(u32::MAX),
            duration_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            checks,
        };
        let due = state.last_sent.is_none_or(|t| {
            t.elapsed() >= Duration::from_secs(self.shared.settings.report_every_s)
        });
        if changed || due {
            state.last_sent = Some(Instant::now());
        }
        self.shared
            .outbox
            .health_report(report.clone(), changed || due);
        self.shared
            .metrics
            .last_sample_ms
            .store(now, Ordering::Release);
        let report = Arc::new(report);
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            if history.len() == HISTORY_REPORTS {
                history.pop_front();
            }
            history.push_back(report.clone());
        }
        report
    }

    /// The recent reports, oldest first (at most [`HISTORY_REPORTS`]).
    pub fn history(&self) -> Vec<Arc<HealthReport>> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn announce(&self, id: &'static str, from: Option<HealthStatus>, f: &Finding, now: i64) {
        let title = dbvm_protocol::health::title(id).unwrap_or(id);
        match f.status {
            HealthStatus::Ok => {
                tracing::info!(check = id, from = ?from.map(|s| s.as_str()), "{title}: {}", f.message)
            }
            _ => {
                tracing::warn!(check = id, status = f.status.as_str(), from = ?from.map(|s| s.as_str()), "{title}: {}", f.message)
            }
        }
        let change = HealthChange {
            check: id.to_string(),
            title: title.to_string(),
            from,
            to: f.status,
            message: f.message.clone(),
            figures: f.figures.clone(),
        };
        match serde_json::to_string(&change) {
            Ok(payload_json) => self.shared.outbox.event(HEALTH_CHANGED, now, payload_json),
            Err(e) => tracing::error!(error = %e, "cannot encode a health change"),
        }
    }

    /// Runs the checks every `interval_s` until `shutdown`.
    pub async fn schedule(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.shared.settings.interval_s));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => { self.run_once().await; }
            }
        }
    }
}

/// Human-readable bytes (binary units), for messages.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Human-readable duration, for messages ("about 23 h", "4 min").
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 90.0 * 60.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 48.0 * 3600.0 {
        format!("{:.0} h", s / 3600.0)
    } else {
        format!("{:.0} days", s / 86400.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, HealthStatus);

    #[async_trait]
    impl Check for Fixed {
        fn id(&self) -> &'static str {
            self.0
        }
        async fn run(&self, _run: &Run) -> Finding {
            Finding::new(self.1, "fixed")
        }
    }

    #[tokio::test]
    async fn a_contributed_check_replaces_its_namesake_and_a_new_one_follows_the_twelve() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::standalone("db1", dir.path().to_path_buf());
        let settings = HealthSettings {
            metrics_listen: String::new(),
            ..HealthSettings::default()
        };
        let monitor = Monitor::new(
            &ctx,
            settings,
            None,
            vec![
                Arc::new(Fixed("binlog_cloud_sync", HealthStatus::Critical)),
                Arc::new(Fixed("restore_drill", HealthStatus::Warning)),
            ],
        );
        let report = monitor.run_once().await;
        let ids: Vec<&str> = report.checks.iter().map(|c| c.check.as_str()).collect();
        assert_eq!(ids.len(), 13);
        assert_eq!(ids[9], "binlog_cloud_sync");
        assert_eq!(report.checks[9].status, HealthStatus::Critical);
        assert_eq!(report.checks[9].message, "fixed");
        assert_eq!(ids[12], "restore_drill");
    }

    #[test]
    fn units_read_like_a_person_would_write_them() {
        assert_eq!(bytes(4.1 * 1024.0 * 1024.0 * 1024.0), "4.1 GiB");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(duration(23.0 * 3600.0), "23 h");
        assert_eq!(duration(240.0), "4 min");
        assert_eq!(duration(3.0 * 86400.0), "3 days");
        assert_eq!(grade(91.0, 80.0, 90.0), HealthStatus::Critical);
        assert_eq!(grade(85.0, 80.0, 90.0), HealthStatus::Warning);
        assert_eq!(grade(10.0, 80.0, 90.0), HealthStatus::Ok);
        let f = Finding::ok("x").figure("a", f64::NAN).figure("b", 1.0);
        assert_eq!(f.figures.len(), 1);
    }
}
