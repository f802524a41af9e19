//! `relay-bench`: N simulated agents over real mTLS and M signed commands through a real
//! `dbvm-broker` process; reports latency, throughput, CPU and memory (see `run.sh`).

mod bench;
mod broker;
mod fleet;
mod load;
mod procfs;
mod real_agent;
mod report;
mod sim_agent;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Relay benchmark of dbvm-broker: simulated agents over mTLS, signed commands through
/// the HTTPS API, HDR latency histograms, CPU from schedstat, memory from smaps_rollup.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    bench: bench::BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Print the checks of every JSON report in DIR as one table.
    Summary { dir: PathBuf },
    /// Read fio's JSON output (an fdatasync probe of the disk the broker's store is on)
    /// and write its sync-latency percentiles as a baseline report to OUT.
    Fio { fio_json: PathBuf, out: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Sub::Fio { fio_json, out }) = cli.command {
        return match report::fio_baseline(&fio_json, &out) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Sub::Summary { dir }) = cli.command {
        return match report::summary(&dir) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let json = cli.bench.json;
    let json_out = cli.bench.json_out.clone();
    match bench::main(cli.bench) {
        Ok(report) => {
            if let Some(path) = json_out {
                let written = serde_json::to_string_pretty(&report)
                    .map_err(std::io::Error::other)
                    .and_then(|text| std::fs::write(&path, text + "\n"));
                if let Err(e) = written {
                    eprintln!("relay-bench: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("relay-bench: cannot encode the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
