//! `health-bench`: what the agent's twelve health checks cost. (a) the latency of a full
//! run of all twelve against a real PostgreSQL 15 managed by the agent, in-process with
//! the `dbvm_agent` library (plus a few signed `health` commands through the broker);
//! (b) the release agent's CPU and memory with checks every 10 s and its `/metrics`
//! scraped every 10 s, over ten minutes; (c) beside it, in the same run,
//! `prometheus-node-exporter` + `prometheus-postgres-exporter` scraped at the same
//! interval (see `run.sh` and README.md).

mod inproc;
mod procfs;
mod report;
mod rig;
mod scrape;
mod soak;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Health-check benchmark: latency of a full run of the twelve checks, and the agent's
/// CPU and memory with checks every 10 s beside node_exporter + postgres_exporter.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Check the harness: 100 in-process runs, 5 health commands, a 60 s soak (unless
    /// given explicitly). The figures of a quick run are not the benchmark's.
    #[arg(long)]
    pub quick: bool,
    /// In-process `Monitor::run_once()` calls measured (after the warm-up).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Runs before the measured ones (not recorded; the very first is reported as cold).
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Pause between in-process runs (ms), so the database and the machine settle.
    #[arg(long, default_value_t = 10)]
    pub gap_ms: u64,
    /// Signed `health` commands sent through the broker to the release agent, one at a time.
    #[arg(long)]
    pub commands: Option<usize>,
    /// Length of the CPU/memory run beside the exporters (s).
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// The agent's `health.interval_s`, and the scrape interval of all three endpoints.
    #[arg(long, default_value_t = 10)]
    pub interval_secs: u64,
    /// The agent's `health.check_timeout_ms`.
    #[arg(long, default_value_t = 5000)]
    pub check_timeout_ms: u64,
    /// The agent's `database.reconcile_interval_s` (10 is its default).
    #[arg(long, default_value_t = 10)]
    pub reconcile_secs: u64,
    /// The agent executable (run.sh passes the release musl build).
    #[arg(long)]
    pub agent_bin: PathBuf,
    /// The broker executable (run.sh passes the release build).
    #[arg(long)]
    pub broker_bin: PathBuf,
    /// `DBVM_LOG` for the broker and the agent.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Where the JSON report goes. Default: target/health-bench/(UTC time).json.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Keep the run's directory (configs, logs, database files) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
    /// Target (a): p99 of a full in-process run (ms).
    #[arg(long, default_value_t = 100.0)]
    pub target_p99_ms: f64,
    /// Target (b): the agent's CPU over the soak (% of one core).
    #[arg(long, default_value_t = 0.5)]
    pub target_cpu_pct: f64,
    /// Target (b): the agent's RSS, peak and end (MiB).
    #[arg(long, default_value_t = 20.0)]
    pub target_rss_mib: f64,
}

impl Args {
    pub fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.quick { 100 } else { 1000 })
    }
    pub fn commands(&self) -> usize {
        self.commands.unwrap_or(if self.quick { 5 } else { 20 })
    }
    pub fn soak_secs(&self) -> u64 {
        self.soak_secs.unwrap_or(if self.quick { 60 } else { 600 })
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| {
        format!(
            "{} does not exist: build it (see benches/health/run.sh)",
            path.display()
        )
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("health-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ok(true) when every figure met its target.
fn real_main(mut args: Args) -> Result<bool> {
    if args.interval_secs == 0 || args.soak_secs() < args.interval_secs || args.runs() == 0 {
        bail!("nothing to measure: --runs must be ≥ 1 and --soak-secs ≥ --interval-secs ≥ 1");
    }
    args.agent_bin = absolute(&args.agent_bin)?;
    args.broker_bin = absolute(&args.broker_bin)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    // On SIGINT/SIGTERM the measuring future is dropped, and with it everything it
    // started: the exporters, the agent and the broker are killed, the containers and the
    // run's directory removed (their `Drop`s).
    let report = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        tokio::select! {
            r = report::collect(&args) => r,
            _ = term.recv() => bail!("stopped by SIGTERM; cleaned up"),
            _ = int.recv() => bail!("stopped by SIGINT; cleaned up"),
        }
    })?;
    print!("{}", report.text());
    let path = match &args.json_out {
        Some(p) => p.clone(),
        None => dbvm_e2e::docker::workspace_root()
            .join("target")
            .join("health-bench")
            .join(format!(
                "{}{}.json",
                report::file_stamp(report.started_unix_s),
                if args.quick { "-quick" } else { "" }
            )),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
    std::fs::write(&path, text + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("JSON report: {}", path.display());
    Ok(report.all_met())
}
