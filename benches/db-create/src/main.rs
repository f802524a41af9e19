//! `db-create-bench`: how long a signed `db.create` takes from submit until the new
//! PostgreSQL / MariaDB database accepts a connection as `dbaas`, split into the agent's
//! own phases, and how much memory the agent holds while it idles managing the running
//! database. Real broker, real agent, the test harness's private Docker engine with the
//! images already loaded (see `run.sh` and README.md).

mod procfs;
mod report;
mod run;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Database-create benchmark: a fresh fleet, broker and agent per run, one signed
/// db.create, the time until the database accepts connections, the agent's phase split,
/// and the agent's memory while idle.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Creates per engine (engines are interleaved: pg, maria, pg, maria, …).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Engines to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "postgres,mariadb")]
    pub engines: Vec<DbEngine>,
    /// Seconds the agent idles after each engine's last create before its memory is read.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// The agent executable (run.sh passes the release musl build). Default: `dbvm-agent`
    /// next to this executable.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// The broker executable. Default: `dbvm-broker` next to this executable.
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// `DBVM_LOG` for the broker and the agent.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// The agent's `reconcile_interval_s` (10 is the agent's default; the e2e tests use 1).
    #[arg(long, default_value_t = 10)]
    pub reconcile_secs: u64,
    /// Where the JSON report goes. Default: target/db-create-bench/(UTC time).json.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Keep each run's temporary directory (configs, logs, data) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
    /// Target for submit → accepting connections (ms).
    #[arg(long, default_value_t = 6000)]
    pub target_ms: u64,
    /// Target for the idle agent's VmRSS (MiB).
    #[arg(long, default_value_t = 15.0)]
    pub target_rss_mib: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbEngine {
    Postgres,
    Mariadb,
}

impl DbEngine {
    pub fn name(self) -> &'static str {
        match self {
            DbEngine::Postgres => "postgres",
            DbEngine::Mariadb => "mariadb",
        }
    }
}

/// `name` next to this executable, or an error that says how to get it.
fn beside_self(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("this executable has no directory")?;
    if !path.is_file() {
        bail!(
            "{} does not exist: build it (cargo build --release -p {}) or pass --{}-bin",
            path.display(),
            if name == "dbvm-agent" {
                "dbvm-agent"
            } else {
                "dbvm-broker"
            },
            if name == "dbvm-agent" {
                "agent"
            } else {
                "broker"
            },
        );
    }
    Ok(path)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{} does not exist", path.display()))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("db-create-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ok(true) when every figure met its target.
fn real_main(args: Args) -> Result<bool> {
    if args.runs == 0 || args.engines.is_empty() {
        bail!("nothing to do: --runs must be at least 1 and --engines not empty");
    }
    let agent_bin = match &args.agent_bin {
        Some(p) => absolute(p)?,
        None => beside_self("dbvm-agent")?,
    };
    let broker_bin = match &args.broker_bin {
        Some(p) => absolute(p)?,
        None => beside_self("dbvm-broker")?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let bins = run::Bins {
        agent: agent_bin,
        broker: broker_bin,
    };
    let report = runtime.block_on(report::collect(&args, &bins))?;
    print!("{}", report.text());
    let path = match &args.json_out {
        Some(p) => p.clone(),
        None => dbvm_e2e::docker::workspace_root()
            .join("target")
            .join("db-create-bench")
            .join(format!(
                "{}.json",
                report::file_stamp(report.started_unix_s)
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
