//! Targets (b) and (c): the release agent running its checks on schedule, its
//! `/metrics` scraped every interval, for `soak_secs`; beside it, in the same run,
//! `prometheus-node-exporter` and `prometheus-postgres-exporter` (the latter on the same
//! database, over its unix socket as `postgres`), scraped at the same ticks by the same
//! client. CPU of each process from `/proc/<pid>/stat` deltas, memory from `status` and
//! `smaps_rollup`, the peak from `VmHWM` after resetting it at the start.

use crate::inproc::{histogram, Latency};
use crate::procfs::{self, Sample};
use crate::rig::{spawn_other, Rig};
use crate::scrape;
use anyhow::{bail, Context, Result};
use dbvm_e2e::proc::Proc;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const NODE_EXPORTER: &str = "prometheus-node-exporter";
pub const POSTGRES_EXPORTER: &str = "prometheus-postgres-exporter";

/// One process over the soak.
#[derive(Clone, Debug, Serialize)]
pub struct ProcSummary {
    pub name: String,
    pub pid: u32,
    pub version: String,
    /// utime + stime over the soak (ms) and as a share of one core (%).
    pub cpu_ms: f64,
    pub cpu_pct_of_core: f64,
    /// Children it waited for (ms).
    pub children_cpu_ms: f64,
    /// The live threads' `schedstat` delta (ms): a cross-check; lower when threads ended.
    pub sched_ms: f64,
    /// CPU per window (ms), for the side-by-side ratios.
    pub window_cpu_ms: Vec<f64>,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    /// Highest `VmRSS` seen in any sample (one before and one right after every scrape).
    pub rss_max_sampled_kib: u64,
    /// `VmHWM` at the end, reset at the start: the kernel's peak over the soak.
    pub peak_kib: u64,
    /// `VmHWM` just before the reset: the peak over the process's whole life.
    pub lifetime_peak_kib: u64,
    pub end: Sample,
    pub scrape: Latency,
    pub scrape_bytes: usize,
    pub series: usize,
    pub scrape_errors: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            min: v[0],
            median,
            max: v[n - 1],
            n,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    pub secs: u64,
    pub interval_s: u64,
    pub scrapes: usize,
    pub window_s: u64,
    pub agent: ProcSummary,
    pub node_exporter: ProcSummary,
    pub postgres_exporter: ProcSummary,
    /// node + postgres exporter.
    pub exporters_cpu_ms: f64,
    pub exporters_cpu_pct_of_core: f64,
    pub exporters_peak_kib: u64,
    pub exporters_rss_end_kib: u64,
    /// agent CPU ÷ (node + postgres exporter CPU), per window.
    pub cpu_ratio_per_window: Spread,
    /// 1-minute load average sampled every interval.
    pub load1: Spread,
    pub load_at_end: [f64; 3],
    /// Share of all cores busy over the soak (`/proc/stat`), %.
    pub machine_busy_pct: f64,
    /// The release agent's own scheduled runs, from its `/metrics`
    /// (`dbvm_agent_health_run_duration_seconds`, one per distinct report).
    pub agent_scheduled_runs: Latency,
    /// `dbvm_agent_health_worst_status` seen in the agent's scrapes (0 ok … 3 critical).
    pub agent_worst_status: BTreeMap<String, u64>,
}

fn version(bin: &str) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn require(bin: &str) -> Result<()> {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        bail!(
            "{bin} is not installed: apt-get -o DPkg::Lock::Timeout=300 install -y prometheus-node-exporter prometheus-postgres-exporter (do not start their systemd units; the benchmark runs them itself)"
        );
    }
    Ok(())
}

struct Track {
    name: &'static str,
    addr: String,
    pid: u32,
    version: String,
    samples: Vec<Sample>,
    rss_max: u64,
    lifetime_peak_kib: u64,
    scrape: hdrhistogram::Histogram<u64>,
    scrape_bytes: usize,
    series: usize,
    errors: u64,
}

impl Track {
    fn new(name: &'static str, addr: String, pid: u32, version: String) -> Self {
        Self {
            name,
            addr,
            pid,
            version,
            samples: Vec::new(),
            rss_max: 0,
            lifetime_peak_kib: 0,
            scrape: histogram(),
            scrape_bytes: 0,
            series: 0,
            errors: 0,
        }
    }

    fn summary(&self, secs: f64, window_ticks: usize) -> Result<ProcSummary> {
        let first = *self.samples.first().context("no samples")?;
        let end = *self.samples.last().context("no samples")?;
        let cpu_ms = end.cpu_ms - first.cpu_ms;
        let window_cpu_ms = self
            .samples
            .iter()
            .step_by(window_ticks)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1].cpu_ms - w[0].cpu_ms)
            .collect();
        Ok(ProcSummary {
            name: self.name.to_string(),
            pid: self.pid,
            version: self.version.clone(),
            cpu_ms,
            cpu_pct_of_core: cpu_ms / (secs * 1000.0) * 100.0,
            children_cpu_ms: end.children_cpu_ms - first.children_cpu_ms,
            sched_ms: end.sched_ms - first.sched_ms,
            window_cpu_ms,
            rss_start_kib: first.vm_rss_kib,
            rss_end_kib: end.vm_rss_kib,
            rss_max_sampled_kib: self.rss_max,
            peak_kib: end.vm_hwm_kib,
            lifetime_peak_kib: self.lifetime_peak_kib,
            end,
            scrape: Latency::of(&self.scrape),
            scrape_bytes: self.scrape_bytes,
            series: self.series,
            scrape_errors: self.errors,
        })
    }
}

/// Starts the two exporters (killed when the returned `Proc`s drop).
pub async fn start_exporters(rig: &Rig) -> Result<(Proc, String, Proc, String)> {
    require(NODE_EXPORTER)?;
    require(POSTGRES_EXPORTER)?;
    let textfile = rig.fleet.path("node-exporter-textfile");
    std::fs::create_dir_all(&textfile)
        .with_context(|| format!("cannot create {}", textfile.display()))?;
    let node_addr = format!("127.0.0.1:{}", dbvm_e2e::docker::free_port());
    let node = spawn_other(
        "node-exporter",
        NODE_EXPORTER,
        &[
            format!("--web.listen-address={node_addr}"),
            format!("--collector.textfile.directory={}", textfile.display()),
        ],
        &[],
        rig.fleet.path("node-exporter.log"),
    )?;
    let pg_addr = format!("127.0.0.1:{}", dbvm_e2e::docker::free_port());
    // The database's unix socket as `postgres` (pg_hba: `local all postgres trust`), the
    // way an exporter installed on the VM would reach it.
    let dsn = format!(
        "host={} port={} user=postgres dbname=postgres sslmode=disable",
        rig.db_socket_dir.display(),
        rig.db_port
    );
    let pg = spawn_other(
        "postgres-exporter",
        POSTGRES_EXPORTER,
        &[format!("--web.listen-address={pg_addr}")],
        &[("DATA_SOURCE_NAME", dsn)],
        rig.fleet.path("postgres-exporter.log"),
    )?;
    scrape::wait_ready(&node_addr, Duration::from_secs(30), |_| true)
        .await
        .with_context(|| format!("node exporter (log {})", node.log.display()))?;
    scrape::wait_ready(&pg_addr, Duration::from_secs(30), |b| {
        scrape::value(b, "pg_up") == Some(1.0)
    })
    .await
    .with_context(|| {
        format!(
            "postgres exporter never reported pg_up 1 (log {}):\n{}",
            pg.log.display(),
            pg.log_tail()
        )
    })?;
    Ok((node, node_addr, pg, pg_addr))
}

pub async fn run(
    rig: &mut Rig,
    node: &mut Proc,
    node_addr: &str,
    pg: &mut Proc,
    pg_addr: &str,
    secs: u64,
    interval_s: u64,
) -> Result<Soak> {
    let mut tracks = [
        Track::new(
            "dbvm-agent",
            rig.metrics_addr.clone(),
            rig.agent.proc.pid(),
            String::new(),
        ),
        Track::new(
            NODE_EXPORTER,
            node_addr.to_string(),
            node.pid(),
            version(NODE_EXPORTER),
        ),
        Track::new(
            POSTGRES_EXPORTER,
            pg_addr.to_string(),
            pg.pid(),
            version(POSTGRES_EXPORTER),
        ),
    ];
    let ticks = usize::try_from(secs / interval_s)
        .unwrap_or(usize::MAX)
        .max(1);
    let window_ticks = if ticks >= 30 { 6 } else { 1 };
    let interval = Duration::from_secs(interval_s);
    let mut load1 = Vec::new();
    let mut run_durations = histogram();
    let mut seen_reports = std::collections::BTreeSet::new();
    let mut worst: BTreeMap<String, u64> = BTreeMap::new();

    for t in &mut tracks {
        t.lifetime_peak_kib = procfs::sample(t.pid, 0.0)?.vm_hwm_kib;
        procfs::reset_peak(t.pid)?;
    }
    let jiffies0 = procfs::machine_jiffies();
    let t0 = Instant::now();
    for i in 0..=ticks {
        tokio::time::sleep_until((t0 + interval * u32::try_from(i).unwrap_or(u32::MAX)).into())
            .await;
        let at = t0.elapsed().as_secs_f64();
        if !rig.agent.proc.is_running() {
            bail!(
                "the agent exited during the soak:\n{}",
                rig.agent.proc.log_tail()
            );
        }
        if !node.is_running() || !pg.is_running() {
            bail!(
                "an exporter exited during the soak:\n{}\n{}",
                node.log_tail(),
                pg.log_tail()
            );
        }
        for t in &mut tracks {
            let s = procfs::sample(t.pid, at)?;
            t.rss_max = t.rss_max.max(s.vm_rss_kib);
            t.samples.push(s);
        }
        load1.push(procfs::loadavg()[0]);
        if i == ticks {
            break;
        }
        for t in &mut tracks {
            match scrape::get(&t.addr, Duration::from_secs(5)).await {
                Ok(s) => {
                    let _ = t.scrape.record(s.micros.max(1));
                    t.scrape_bytes = s.body_bytes;
                    t.series = s.series;
                    if t.name == "dbvm-agent" {
                        let stamp =
                            scrape::value(&s.body, "dbvm_agent_health_report_timestamp_seconds");
                        let took = scrape::value(&s.body, "dbvm_agent_health_run_duration_seconds");
                        if let (Some(stamp), Some(took)) = (stamp, took) {
                            if seen_reports.insert(stamp.to_bits()) {
                                let _ = run_durations.record(((took * 1e6) as u64).max(1));
                            }
                        }
                        if let Some(w) = scrape::value(&s.body, "dbvm_agent_health_worst_status") {
                            *worst.entry(format!("{w}")).or_default() += 1;
                        }
                    }
                }
                Err(e) => {
                    t.errors += 1;
                    eprintln!("   scrape of {} failed: {e:#}", t.name);
                }
            }
            // Right after its scrape: the process's memory while it holds the answer.
            if let Ok(s) = procfs::sample(t.pid, at) {
                t.rss_max = t.rss_max.max(s.vm_rss_kib);
            }
        }
        if i > 0 && (i % 6 == 0) {
            let pct = |t: &Track| {
                let a = t.samples.first().map_or(0.0, |s| s.cpu_ms);
                let b = t.samples.last().map_or(0.0, |s| s.cpu_ms);
                (b - a) / (at * 1000.0) * 100.0
            };
            eprintln!(
                "   {:>4.0} s: CPU agent {:.3} %, node {:.3} %, pg {:.3} %; VmRSS agent {:.1} MiB, node {:.1}, pg {:.1}; load {:.2}",
                at,
                pct(&tracks[0]),
                pct(&tracks[1]),
                pct(&tracks[2]),
                tracks[0].samples.last().map_or(0, |s| s.vm_rss_kib) as f64 / 1024.0,
                tracks[1].samples.last().map_or(0, |s| s.vm_rss_kib) as f64 / 1024.0,
                tracks[2].samples.last().map_or(0, |s| s.vm_rss_kib) as f64 / 1024.0,
                load1.last().copied().unwrap_or(f64::NAN),
            );
        }
    }
    let jiffies1 = procfs::machine_jiffies();
    let elapsed = tracks[0].samples.last().map_or(0.0, |s| s.t_s);
    let [agent, node_s, pg_s] = [
        tracks[0].summary(elapsed, window_ticks)?,
        tracks[1].summary(elapsed, window_ticks)?,
        tracks[2].summary(elapsed, window_ticks)?,
    ];
    let ratios: Vec<f64> = agent
        .window_cpu_ms
        .iter()
        .zip(node_s.window_cpu_ms.iter().zip(&pg_s.window_cpu_ms))
        .map(|(a, (n, p))| a / (n + p))
        .collect();
    let busy = (jiffies1.0.saturating_sub(jiffies0.0)) as f64;
    let total = (jiffies1.1.saturating_sub(jiffies0.1)) as f64;
    Ok(Soak {
        secs,
        interval_s,
        scrapes: ticks,
        window_s: interval_s * window_ticks as u64,
        exporters_cpu_ms: node_s.cpu_ms + pg_s.cpu_ms,
        exporters_cpu_pct_of_core: node_s.cpu_pct_of_core + pg_s.cpu_pct_of_core,
        exporters_peak_kib: node_s.peak_kib + pg_s.peak_kib,
        exporters_rss_end_kib: node_s.rss_end_kib + pg_s.rss_end_kib,
        agent,
        node_exporter: node_s,
        postgres_exporter: pg_s,
        cpu_ratio_per_window: Spread::of(&ratios),
        load1: Spread::of(&load1),
        load_at_end: procfs::loadavg(),
        machine_busy_pct: if total > 0.0 {
            busy / total * 100.0
        } else {
            f64::NAN
        },
        agent_scheduled_runs: Latency::of(&run_durations),
        agent_worst_status: worst,
    })
}
