//! Runs the creates (engines interleaved, run by run), summarises them per engine
//! (min / median / max of the total and of every phase) and prints them against the
//! targets.

use crate::run::{self, Bins, CreateRun, Idle};
use crate::{Args, DbEngine};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// The agent's phases in the order it runs them (other keys it reports come after).
const PHASES: [&str; 5] = [
    "preconfigure_ms",
    "config_ms",
    "init_ms",
    "start_ms",
    "users_ms",
];

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            n,
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub label: String,
    pub stats: Option<Stats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineSummary {
    pub engine: DbEngine,
    pub image: String,
    /// Submit → accepting, then its parts (ms).
    pub rows: Vec<Row>,
    pub total: Stats,
    pub idle: Option<Idle>,
    /// Every run under the target.
    pub create_met: bool,
    pub rss_met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub started_at_utc: String,
    pub started_unix_s: u64,
    pub command_line: String,
    pub machine: dbvm_e2e::report::Machine,
    pub agent_bin: String,
    pub agent_bin_bytes: u64,
    pub broker_bin: String,
    pub runs_per_engine: usize,
    pub idle_secs: u64,
    pub log: String,
    pub reconcile_interval_s: u64,
    pub docker_socket: String,
    pub target_create_ms: u64,
    pub target_idle_rss_mib: f64,
    pub engines: Vec<EngineSummary>,
    pub runs: Vec<CreateRun>,
}

pub use dbvm_e2e::report::{file_stamp, utc};

fn phase_label(key: &str) -> String {
    format!("  agent: {}", key.strip_suffix("_ms").unwrap_or(key))
}

pub async fn collect(args: &Args, bins: &Bins) -> Result<Report> {
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!("== starting the private Docker engine (dbvm_e2e::docker::engine), loading images if missing");
    let engine = tokio::task::spawn_blocking(dbvm_e2e::docker::engine)
        .await
        .context("the private Docker engine could not be started (see above)")?;
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        for &db in &args.engines {
            eprintln!("== {} run {run}/{}", db.name(), args.runs);
            let mut rig = run::setup(bins, args, &engine).await?;
            let idle = (run == args.runs).then_some(args.idle_secs);
            if idle.is_some() {
                eprintln!("   then {} s idle, then the agent's memory", args.idle_secs);
            }
            let result = run::create(&mut rig, db, run, idle).await;
            drop(rig); // agent and broker killed, containers removed
            let r = result?;
            eprintln!(
                "   submit → accepting {:.0} ms (command {:.0} ms, then {:.0} ms and {} connect attempt(s)); agent phases {}",
                r.total_ms,
                r.command_ms,
                r.accept_ms,
                r.connect_attempts,
                r.timings
                    .iter()
                    .map(|(k, v)| format!("{}={v:.0}", k.strip_suffix("_ms").unwrap_or(k)))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            runs.push(r);
        }
    }

    let mut engines = Vec::new();
    for &db in &args.engines {
        let mine: Vec<&CreateRun> = runs.iter().filter(|r| r.engine == db).collect();
        let col = |f: &dyn Fn(&CreateRun) -> Option<f64>| -> Vec<f64> {
            mine.iter().filter_map(|r| f(r)).collect()
        };
        let total_values = col(&|r| Some(r.total_ms));
        let Some(total) = Stats::of(&total_values) else {
            continue;
        };
        let mut rows = vec![
            Row {
                label: "submit → accepting connections".into(),
                stats: Some(total),
            },
            Row {
                label: "  submit → command succeeded".into(),
                stats: Stats::of(&col(&|r| Some(r.command_ms))),
            },
            Row {
                label: "  succeeded → first accepted connect".into(),
                stats: Stats::of(&col(&|r| Some(r.accept_ms))),
            },
            Row {
                label: "  broker: submitted → delivered".into(),
                stats: Stats::of(&col(&|r| r.relay_ms.map(|v| v as f64))),
            },
            Row {
                label: "  broker: delivered → finished".into(),
                stats: Stats::of(&col(&|r| r.agent_ms.map(|v| v as f64))),
            },
        ];
        let mut keys: Vec<String> = PHASES.iter().map(|s| s.to_string()).collect();
        let extra: std::collections::BTreeSet<String> = mine
            .iter()
            .flat_map(|r| r.timings.keys().cloned())
            .filter(|k| !PHASES.contains(&k.as_str()))
            .collect();
        keys.extend(extra);
        for key in keys {
            rows.push(Row {
                label: phase_label(&key),
                stats: Stats::of(&col(&|r| r.timings.get(&key).copied())),
            });
        }
        rows.push(Row {
            label: "  outside the agent's phases".into(),
            stats: Stats::of(&col(&|r| Some(r.outside_phases_ms))),
        });
        let idle = mine.iter().rev().find_map(|r| r.idle.clone());
        let rss_met = idle
            .as_ref()
            .map(|i| (i.memory.vm_rss_kib as f64) < args.target_rss_mib * 1024.0);
        engines.push(EngineSummary {
            engine: db,
            image: match db {
                DbEngine::Postgres => engine.postgres_image.clone(),
                DbEngine::Mariadb => engine.mariadb_image.clone(),
            },
            rows,
            total,
            idle,
            create_met: total.max < args.target_ms as f64,
            rss_met,
        });
    }

    let agent_bin_bytes = std::fs::metadata(&bins.agent).map(|m| m.len()).unwrap_or(0);
    Ok(Report {
        started_at_utc: utc(started_unix_s),
        started_unix_s,
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        machine: dbvm_e2e::report::machine(),
        agent_bin: bins.agent.display().to_string(),
        agent_bin_bytes,
        broker_bin: bins.broker.display().to_string(),
        runs_per_engine: args.runs,
        idle_secs: args.idle_secs,
        log: args.log.clone(),
        reconcile_interval_s: args.reconcile_secs,
        docker_socket: engine.socket.display().to_string(),
        target_create_ms: args.target_ms,
        target_idle_rss_mib: args.target_rss_mib,
        engines,
        runs,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISS"
    }
}

impl Report {
    pub fn all_met(&self) -> bool {
        self.engines
            .iter()
            .all(|e| e.create_met && e.rss_met.unwrap_or(true))
    }

    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\ndb-create-bench {} — {} ({} CPUs, {}), kernel {}",
            self.started_at_utc,
            self.machine.hostname,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel
        );
        let _ = writeln!(
            t,
            "agent {} ({:.1} MiB), broker {}; {} run(s) per engine, engines interleaved, fresh broker + agent per run, images present; DBVM_LOG={}, reconcile_interval_s={}",
            self.agent_bin,
            self.agent_bin_bytes as f64 / (1024.0 * 1024.0),
            self.broker_bin,
            self.runs_per_engine,
            self.log,
            self.reconcile_interval_s,
        );
        for e in &self.engines {
            let _ = writeln!(
                t,
                "\n{} ({}), n={}            {:>9} {:>9} {:>9}",
                e.engine.name(),
                e.image,
                e.total.n,
                "min ms",
                "median",
                "max"
            );
            for row in &e.rows {
                match row.stats {
                    Some(s) => {
                        let _ = writeln!(
                            t,
                            "  {:<40} {:>9.0} {:>9.0} {:>9.0}",
                            row.label, s.min, s.median, s.max
                        );
                    }
                    None => {
                        let _ = writeln!(t, "  {:<40} {:>9}", row.label, "-");
                    }
                }
            }
        }
        let _ = writeln!(t, "\n{:<52} {:<46} {:<10} ", "check", "measured", "target");
        for e in &self.engines {
            let _ = writeln!(
                t,
                "{:<52} {:<46} {:<10} {}",
                format!("{} create: submit → accepting (every run)", e.engine.name()),
                format!(
                    "median {:.2} s, min {:.2}, max {:.2}",
                    e.total.median / 1000.0,
                    e.total.min / 1000.0,
                    e.total.max / 1000.0
                ),
                format!("< {:.0} s", self.target_create_ms as f64 / 1000.0),
                verdict(e.create_met)
            );
        }
        for e in &self.engines {
            if let (Some(i), Some(met)) = (&e.idle, e.rss_met) {
                let _ = writeln!(
                    t,
                    "{:<52} {:<46} {:<10} {}",
                    format!(
                        "agent VmRSS, {} s idle managing {}",
                        i.idle_secs,
                        e.engine.name()
                    ),
                    format!(
                        "{:.1} MiB (HWM {:.1}, Pss {:.1}, anon {:.1}, {} thr)",
                        mib(i.memory.vm_rss_kib),
                        mib(i.memory.vm_hwm_kib),
                        mib(i.memory.pss_kib),
                        mib(i.memory.rss_anon_kib),
                        i.memory.threads
                    ),
                    format!("< {} MiB", self.target_idle_rss_mib),
                    verdict(met)
                );
                let _ = writeln!(
                    t,
                    "{:<52} idle CPU {:.0} ms (10 ms ticks) over {} s; database {} after the idle period",
                    "",
                    i.cpu_ms,
                    i.idle_secs,
                    if i.database_still_up {
                        "still accepting"
                    } else {
                        "NOT accepting"
                    }
                );
            }
        }
        t
    }
}
