//! `dbvm-agent` entry point: load and validate config, open state, run the link until
//! SIGTERM/SIGINT.

use clap::Parser;
use dbvm_agent::config::{Config, LogFormat};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The dbvm agent: manages this database VM on behalf of a control plane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "DBVM_AGENT_CONFIG",
        default_value = "/etc/dbvm/agent.toml"
    )]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let validated = match Config::load(&args.config).and_then(Config::validate) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dbvm-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check {
        println!("configuration {} is valid", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    init_logging(&validated.config);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), agent = %validated.agent_id, "dbvm-agent starting");
    // Two workers: the agent is mostly idle and must stay small beside the database.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dbvm-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let built = dbvm_agent::operations(&validated).and_then(|parts| {
            let agent =
                dbvm_agent::build(validated, parts.dispatcher.clone(), parts.uplink.clone())?;
            Ok((agent, parts))
        });
        let (agent, parts) = match built {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("dbvm-agent: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        notify_ready();
        let shutdown = CancellationToken::new();
        if let Some(db) = parts.db {
            db.spawn_reconciler(shutdown.clone());
        }
        if let Some(health) = parts.health {
            // The endpoint first, so the first run's metrics check finds it listening.
            tokio::spawn(dbvm_agent::health::prometheus::serve(
                health.clone(),
                shutdown.clone(),
            ));
            tokio::task::yield_now().await;
            health.spawn(shutdown.clone());
        }
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            token.cancel();
        });
        agent.run(shutdown).await;
        std::process::ExitCode::SUCCESS
    })
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Tells systemd (Type=notify) the agent is up. Written by hand: one datagram to $NOTIFY_SOCKET.
fn notify_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = sock.send_to(b"READY=1", path);
        }
    }
}
