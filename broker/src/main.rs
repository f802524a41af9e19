//! `dbvm-broker` entry point: parse flags, load and validate config, bind, serve, drain.

use anyhow::Context;
use clap::Parser;
use dbvm_broker::config::LogFormat;
use dbvm_broker::{Broker, Config};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the relay allocates small buffers per frame and per
/// request, where glibc's malloc/free showed as ~10 % of the broker's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Relays control-plane-signed commands to dbvm agents over mutual TLS.
#[derive(Parser, Debug)]
#[command(version, about)]
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
    init_logging(&config);
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

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DBVM_LOG")
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(config.log.level.as_deref().unwrap_or("info"))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal; journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "dbvm-broker starting");
    let broker = Broker::bind(&config).await.context("start-up failed")?;
    tracing::info!(agent_addr = %broker.agent_addr(), api_addr = %broker.api_addr(), data_dir = %config.data_dir.display(), "listening");
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "listening agent={} api={}",
        broker.agent_addr(),
        broker.api_addr()
    );
    notify_ready();
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal_token.cancel();
    });
    broker.run(shutdown).await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Tells systemd (Type=notify) that the listeners are bound. Written by hand: it is one
/// datagram to $NOTIFY_SOCKET.
fn notify_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = sock.send_to(b"READY=1", path);
        }
    }
}
