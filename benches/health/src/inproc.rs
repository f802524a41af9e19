//! Target (a): the latency of a full run of the twelve checks, measured in-process with
//! the `dbvm_agent` library, so the relay and the broker are not in the figure.
//!
//! The monitor is built from the running agent's own config file (`Config::load` +
//! `validate`, as `dbvm-agent` does) over a second `DbManager` opened on the agent's state
//! directory: the same database (its state, container, admin socket, client port and the
//! `dbvm_monitor` role's password file). Its uplink is a fresh `Uplink` that is never
//! linked, so `connectivity` reports the link as down (the database part — an
//! authenticated login and `SELECT 1` over TCP — runs in full) and `metrics` sees no
//! endpoint of its own. Each `Monitor::run_once()` is timed from the caller, every sample
//! into an HDR histogram.

use anyhow::{Context, Result};
use dbvm_agent::capability::Context as AgentContext;
use dbvm_agent::config::Config;
use dbvm_agent::db::DbManager;
use dbvm_agent::health::Monitor;
use dbvm_protocol::health::HealthReport;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// p50 / p90 / p99 / p99.9 / max in ms of a histogram of µs.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub n: u64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant digits: the bounds are constants, so this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            n: h.len(),
            min_ms: ms(h.min()),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// One check across the measured runs.
#[derive(Clone, Debug, Serialize)]
pub struct CheckSummary {
    pub check: String,
    /// From the report's `duration_ms` (whole ms).
    pub duration: Latency,
    /// How many runs ended in each status.
    pub statuses: BTreeMap<String, u64>,
    /// The message of the last run.
    pub last_message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct InProcess {
    pub runs: usize,
    pub warmup: usize,
    pub gap_ms: u64,
    /// The very first run (new Docker client, new admin connection, first login).
    pub cold_ms: f64,
    /// `run_once()` as the caller sees it: the figure of target (a).
    pub wall: Latency,
    /// The report's own `duration_ms`.
    pub report_duration: Latency,
    /// The connectivity check's `login_query_ms` figure: login + `SELECT 1` over TCP.
    pub login_query: Latency,
    pub checks: Vec<CheckSummary>,
    pub elapsed_s: f64,
}

/// One check's durations, status counts and last message, while runs are recorded.
type PerCheck = (Histogram<u64>, BTreeMap<String, u64>, String);

fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.max(1));
}

pub async fn run(config: &Path, runs: usize, warmup: usize, gap: Duration) -> Result<InProcess> {
    let v = Config::load(config)
        .and_then(Config::validate)
        .with_context(|| format!("cannot load the agent's config {}", config.display()))?;
    let db = v
        .config
        .database
        .clone()
        .context("the agent's config has no [database] section")?;
    let manager = DbManager::open(db, &v.config.state_dir, None)
        .context("cannot open the database manager on the agent's state directory")?;
    let ctx = AgentContext::standalone(v.agent_id.to_string(), v.config.state_dir.clone());
    let monitor = Monitor::new(&ctx, v.config.health.clone(), Some(manager), Vec::new());

    let started = Instant::now();
    let t = Instant::now();
    let first = monitor.run_once().await;
    let cold_ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!("   cold run {cold_ms:.1} ms: {}", statuses_line(&first));
    for _ in 0..warmup {
        monitor.run_once().await;
        tokio::time::sleep(gap).await;
    }

    let mut wall = histogram();
    let mut report_duration = histogram();
    let mut login = histogram();
    let mut per_check: BTreeMap<String, PerCheck> = BTreeMap::new();
    let mut last = first;
    for i in 0..runs {
        let t = Instant::now();
        let report = monitor.run_once().await;
        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        record(&mut wall, us);
        record(&mut report_duration, u64::from(report.duration_ms) * 1000);
        for c in &report.checks {
            let entry = per_check
                .entry(c.check.clone())
                .or_insert_with(|| (histogram(), BTreeMap::new(), String::new()));
            record(&mut entry.0, u64::from(c.duration_ms) * 1000);
            *entry.1.entry(c.status.as_str().to_string()).or_default() += 1;
            entry.2.clone_from(&c.message);
            if c.check == "connectivity" {
                if let Some(ms) = c.figures.get("login_query_ms") {
                    record(&mut login, (ms * 1000.0) as u64);
                }
            }
        }
        last = report;
        if (i + 1) % 250 == 0 {
            eprintln!(
                "   {}/{runs} runs, p99 so far {:.1} ms",
                i + 1,
                wall.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
        tokio::time::sleep(gap).await;
    }
    eprintln!("   last run: {}", statuses_line(&last));
    // In CHECKS order, as the reports list them.
    let checks = last
        .checks
        .iter()
        .filter_map(|c| {
            let (h, statuses, msg) = per_check.remove(&c.check)?;
            Some(CheckSummary {
                check: c.check.clone(),
                duration: Latency::of(&h),
                statuses,
                last_message: msg,
            })
        })
        .collect();
    Ok(InProcess {
        runs,
        warmup,
        gap_ms: u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
        cold_ms,
        wall: Latency::of(&wall),
        report_duration: Latency::of(&report_duration),
        login_query: Latency::of(&login),
        checks,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

fn statuses_line(r: &HealthReport) -> String {
    r.checks
        .iter()
        .map(|c| format!("{}={}", c.check, c.status.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}
