//! Runs the phases in order (set-up and create, in-process latency, signed `health`
//! commands, the soak beside the exporters), then judges the figures against the targets
//! and prints them.

use crate::inproc::{self, histogram, InProcess, Latency};
use crate::procfs;
use crate::rig::{self, Bins};
use crate::soak::{self, Soak};
use crate::{scrape, Args};
use anyhow::{Context, Result};
use dbvm_e2e::report::Machine;
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub limit: String,
    pub met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Commands {
    pub n: usize,
    /// Submit → result at the client (broker, relay, agent, back).
    pub round_trip: Latency,
    /// The release agent's own `duration_ms` of each on-demand run.
    pub agent_duration: Latency,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub started_at_utc: String,
    pub started_unix_s: u64,
    pub command_line: String,
    pub quick: bool,
    pub machine: Machine,
    pub load_at_start: [f64; 3],
    pub agent_bin: String,
    pub agent_bin_bytes: u64,
    pub broker_bin: String,
    pub postgres_image: String,
    pub docker_socket: String,
    pub interval_s: u64,
    pub check_timeout_ms: u64,
    pub in_process: InProcess,
    pub commands: Commands,
    pub soak: Soak,
    pub verdicts: Vec<Verdict>,
    pub total_s: f64,
}

pub use dbvm_e2e::report::{file_stamp, utc};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub async fn collect(args: &Args) -> Result<Report> {
    let started = std::time::Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let load_at_start = procfs::loadavg();
    eprintln!(
        "== load average at start {:.2} {:.2} {:.2}",
        load_at_start[0], load_at_start[1], load_at_start[2]
    );
    eprintln!("== starting the private Docker engine (dbvm_e2e::docker::engine), loading images if missing");
    let engine = tokio::task::spawn_blocking(dbvm_e2e::docker::engine)
        .await
        .context("the private Docker engine could not be started (see above)")?;
    let bins = Bins {
        agent: args.agent_bin.clone(),
        broker: args.broker_bin.clone(),
    };
    eprintln!("== broker, release agent, db.create postgres");
    let mut rig = rig::setup(&bins, args, &engine).await?;

    eprintln!(
        "== waiting for the agent's scheduled checks to see the database (db_up 1, connectivity ok)"
    );
    scrape::wait_ready(
        &rig.metrics_addr,
        Duration::from_secs(args.interval_secs * 3 + 30),
        |b| {
            scrape::value(b, "dbvm_agent_db_up") == Some(1.0)
                && b.contains("dbvm_agent_health_status{check=\"connectivity\"} 0")
        },
    )
    .await
    .with_context(|| format!("agent log:\n{}", rig.agent.proc.log_tail()))?;

    eprintln!(
        "== (a) {} in-process runs of all twelve checks ({} warm-up, {} ms apart)",
        args.runs(),
        args.warmup,
        args.gap_ms
    );
    let in_process = inproc::run(
        &rig.agent.config,
        args.runs(),
        args.warmup,
        Duration::from_millis(args.gap_ms),
    )
    .await?;

    eprintln!(
        "== {} signed health commands to the release agent",
        args.commands()
    );
    let mut rt = histogram();
    let mut agent_ms = histogram();
    for _ in 0..args.commands() {
        let (us, ms) = rig::health_command(&rig).await?;
        let _ = rt.record(us.max(1));
        let _ = agent_ms.record((ms * 1000).max(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let commands = Commands {
        n: args.commands(),
        round_trip: Latency::of(&rt),
        agent_duration: Latency::of(&agent_ms),
    };

    eprintln!(
        "== (b)+(c) {} s: agent checks every {} s; agent, node_exporter and postgres_exporter scraped every {} s",
        args.soak_secs(),
        args.interval_secs,
        args.interval_secs
    );
    let (mut node, node_addr, mut pg, pg_addr) = soak::start_exporters(&rig).await?;
    let soaked = soak::run(
        &mut rig,
        &mut node,
        &node_addr,
        &mut pg,
        &pg_addr,
        args.soak_secs(),
        args.interval_secs,
    )
    .await;
    node.terminate();
    pg.terminate();
    let soak = soaked?;
    let agent_bin_bytes = std::fs::metadata(&bins.agent).map(|m| m.len()).unwrap_or(0);
    let postgres_image = engine.postgres_image.clone();
    let docker_socket = engine.socket.display().to_string();
    drop(rig); // agent and broker killed, containers removed, directory deleted

    let verdicts = judge(args, &in_process, &soak);
    Ok(Report {
        started_at_utc: utc(started_unix_s),
        started_unix_s,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        quick: args.quick,
        machine: dbvm_e2e::report::machine(),
        load_at_start,
        agent_bin: bins.agent.display().to_string(),
        agent_bin_bytes,
        broker_bin: bins.broker.display().to_string(),
        postgres_image,
        docker_socket,
        interval_s: args.interval_secs,
        check_timeout_ms: args.check_timeout_ms,
        in_process,
        commands,
        soak,
        verdicts,
        total_s: started.elapsed().as_secs_f64(),
    })
}

fn judge(args: &Args, a: &InProcess, s: &Soak) -> Vec<Verdict> {
    let limit_kib = args.target_rss_mib * 1024.0;
    let ag = &s.agent;
    vec![
        Verdict {
            target: format!(
                "(a) full run of the 12 checks, in-process, {} runs: p99",
                a.runs
            ),
            measured: format!(
                "p99 {:.1} ms (p50 {:.1}, p99.9 {:.1}, max {:.1})",
                a.wall.p99_ms, a.wall.p50_ms, a.wall.p999_ms, a.wall.max_ms
            ),
            limit: format!("< {} ms", args.target_p99_ms),
            met: a.wall.p99_ms < args.target_p99_ms,
        },
        Verdict {
            target: format!(
                "(b) agent CPU, checks + scrape every {} s, {} s",
                s.interval_s, s.secs
            ),
            measured: format!(
                "{:.3} % of one core ({:.0} ms CPU)",
                ag.cpu_pct_of_core, ag.cpu_ms
            ),
            limit: format!("< {} %", args.target_cpu_pct),
            met: ag.cpu_pct_of_core < args.target_cpu_pct,
        },
        Verdict {
            target: "(b) agent RSS: peak over the soak (VmHWM) / end (VmRSS)".into(),
            measured: format!(
                "{:.1} / {:.1} MiB (lifetime peak incl. the create {:.1})",
                mib(ag.peak_kib),
                mib(ag.rss_end_kib),
                mib(ag.lifetime_peak_kib)
            ),
            limit: format!("< {} MiB", args.target_rss_mib),
            met: (ag.peak_kib as f64) < limit_kib && (ag.rss_end_kib as f64) < limit_kib,
        },
        Verdict {
            target: "(c) CPU: agent vs node_exporter + postgres_exporter".into(),
            measured: format!(
                "{:.3} % vs {:.3} % (agent/exporters per {} s window: median {:.2}, {:.2}–{:.2}, n={})",
                ag.cpu_pct_of_core,
                s.exporters_cpu_pct_of_core,
                s.window_s,
                s.cpu_ratio_per_window.median,
                s.cpu_ratio_per_window.min,
                s.cpu_ratio_per_window.max,
                s.cpu_ratio_per_window.n
            ),
            limit: "agent < exporters".into(),
            met: ag.cpu_ms < s.exporters_cpu_ms,
        },
        Verdict {
            target: "(c) memory: agent vs node_exporter + postgres_exporter (peak / end)".into(),
            measured: format!(
                "{:.1} / {:.1} MiB vs {:.1} / {:.1} MiB",
                mib(ag.peak_kib),
                mib(ag.rss_end_kib),
                mib(s.exporters_peak_kib),
                mib(s.exporters_rss_end_kib)
            ),
            limit: "agent < exporters".into(),
            met: ag.peak_kib < s.exporters_peak_kib && ag.rss_end_kib < s.exporters_rss_end_kib,
        },
    ]
}

fn lat(l: &Latency) -> String {
    format!(
        "{:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
    )
}

impl Report {
    pub fn all_met(&self) -> bool {
        self.verdicts.iter().all(|v| v.met)
    }

    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nhealth-bench {}{} — {} ({} CPUs, {}), kernel {}",
            self.started_at_utc,
            if self.quick {
                " (QUICK: harness check, not the benchmark's figures)"
            } else {
                ""
            },
            self.machine.hostname,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel
        );
        let _ = writeln!(
            t,
            "agent {} ({:.1} MiB), broker {}, {}; health.interval_s={}, check_timeout_ms={}; nothing pinned",
            self.agent_bin,
            self.agent_bin_bytes as f64 / (1024.0 * 1024.0),
            self.broker_bin,
            self.postgres_image,
            self.interval_s,
            self.check_timeout_ms,
        );
        let a = &self.in_process;
        let _ = writeln!(
            t,
            "\n(a) in-process Monitor::run_once(), {} runs after {} warm-up, {} ms apart ({:.0} s); cold first run {:.1} ms",
            a.runs, a.warmup, a.gap_ms, a.elapsed_s, a.cold_ms
        );
        let _ = writeln!(
            t,
            "  {:<38} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "ms", "p50", "p90", "p99", "p99.9", "max"
        );
        let _ = writeln!(
            t,
            "  {:<38} {}",
            "run_once() (caller's clock)",
            lat(&a.wall)
        );
        let _ = writeln!(
            t,
            "  {:<38} {}",
            "report duration_ms",
            lat(&a.report_duration)
        );
        let _ = writeln!(
            t,
            "  {:<38} {}",
            "connectivity login + SELECT 1",
            lat(&a.login_query)
        );
        for c in &a.checks {
            let statuses = c
                .statuses
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                t,
                "  {:<38} {}   {}",
                format!("check {}", c.check),
                lat(&c.duration),
                statuses
            );
        }
        let c = &self.commands;
        let _ = writeln!(
            t,
            "\nsigned health commands to the release agent, one at a time, n={}",
            c.n
        );
        let _ = writeln!(
            t,
            "  {:<38} {}",
            "submit → result (client)",
            lat(&c.round_trip)
        );
        let _ = writeln!(
            t,
            "  {:<38} {}",
            "agent's duration_ms",
            lat(&c.agent_duration)
        );

        let s = &self.soak;
        let _ = writeln!(
            t,
            "\n(b)+(c) {} s side by side, {} scrapes each every {} s; load average (1 min) min {:.2} / median {:.2} / max {:.2}, at end {:.2} {:.2} {:.2}; machine busy {:.1} % of {} cores",
            s.secs,
            s.scrapes,
            s.interval_s,
            s.load1.min,
            s.load1.median,
            s.load1.max,
            s.load_at_end[0],
            s.load_at_end[1],
            s.load_at_end[2],
            s.machine_busy_pct,
            self.machine.cpus
        );
        let _ = writeln!(
            t,
            "  {:<30} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>9}",
            "",
            "CPU ms",
            "% core",
            "sched ms",
            "RSS end",
            "peak",
            "Pss end",
            "anon",
            "thr",
            "series",
            "scrape p50"
        );
        for p in [&s.agent, &s.node_exporter, &s.postgres_exporter] {
            let _ = writeln!(
                t,
                "  {:<30} {:>9.0} {:>8.3} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>7} {:>7.1}ms",
                p.name,
                p.cpu_ms,
                p.cpu_pct_of_core,
                p.sched_ms,
                mib(p.rss_end_kib),
                mib(p.peak_kib),
                mib(p.end.pss_kib),
                mib(p.end.rss_anon_kib),
                p.end.threads,
                p.series,
                p.scrape.p50_ms
            );
        }
        let _ = writeln!(
            t,
            "  {:<30} {:>9.0} {:>8.3} {:>9} {:>8.1} {:>8.1}",
            "node + postgres exporters",
            s.exporters_cpu_ms,
            s.exporters_cpu_pct_of_core,
            "",
            mib(s.exporters_rss_end_kib),
            mib(s.exporters_peak_kib)
        );
        let _ = writeln!(
            t,
            "  (MiB; peak = VmHWM reset at the start of the soak; CPU from /proc/<pid>/stat, sched = live threads' schedstat)"
        );
        let _ = writeln!(
            t,
            "  agent's scheduled runs seen in its /metrics: n={}, p50 {:.1} ms, max {:.1} ms; worst status counts {:?}; versions: {}; {}",
            s.agent_scheduled_runs.n,
            s.agent_scheduled_runs.p50_ms,
            s.agent_scheduled_runs.max_ms,
            s.agent_worst_status,
            s.node_exporter.version,
            s.postgres_exporter.version
        );
        let _ = writeln!(t, "\n{:<66} {:<74} {:<18}", "target", "measured", "limit");
        for v in &self.verdicts {
            let _ = writeln!(
                t,
                "{:<66} {:<74} {:<18} {}",
                v.target,
                v.measured,
                v.limit,
                if v.met { "met" } else { "MISS" }
            );
        }
        let _ = writeln!(t, "\ntotal {:.0} s", self.total_s);
        t
    }
}
