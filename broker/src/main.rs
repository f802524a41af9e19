//! `dbvm-broker` entry point: parse flags, load and validate config, bind, serve, drain.

use anyhow::Context;
use clap::Parser;
use dbvm_broker::{Broker, Config};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the relay allocates small buffers per frame and per
/// request, where glibc's malloc/free showed as ~10 % of the broker's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Relays control-plane-signed commands to dbvm agents over mutual TLS.
#[derive(Parser, Debug)]
#[command(version = dbvm_host::VERSION, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "DBVM_BROKER_CONFIG",
        default_value = "/etc/dbvm/broker.toml"
    )]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dbvm-broker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check {
        return match config.tls_material() {
            Ok(_) => {
                println!("configuration {} is valid", args.config.display());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dbvm-broker: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    dbvm_host::logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dbvm-broker: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("dbvm-broker: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(version = dbvm_host::VERSION, "dbvm-broker starting");
    let broker = Broker::bind(&config).await.context("start-up failed")?;
    tracing::info!(agent_addr = %broker.agent_addr(), api_addr = %broker.api_addr(), data_dir = %config.data_dir.display(), "listening");
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "listening agent={} api={}",
        broker.agent_addr(),
        broker.api_addr()
    );
    dbvm_host::notify::ready();
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    let fed = shutdown.clone();
    tokio::spawn(async move { dbvm_host::notify::watchdog(fed.cancelled_owned()).await });
    tokio::spawn(async move {
        dbvm_host::signals::shutdown().await;
        dbvm_host::notify::stopping();
        signal_token.cancel();
    });
    broker.run(shutdown).await;
    Ok(())
}
