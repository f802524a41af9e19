//! `dbvm-agent` entry point: load and validate the config, set up logging, build the agent,
//! run it until SIGTERM/SIGINT, drain, exit.

use clap::Parser;
use dbvm_agent::config::Config;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of musl's malloc (the agent is a static musl binary): musl returns
/// freed memory at once, so buffers that come and go (TLS records, HTTP bodies, a bundle's
/// buffers) cost an `mmap`, page faults and an `munmap` with a TLB shootdown of the other
/// cores each. With it, a 1 GiB log bundle took 0.5 s less of the agent's CPU (5.4-5.5 s
/// against 6.0, bundle-bench), for a peak RSS of 51 MiB against 43.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The dbvm agent: manages this database VM on behalf of a control plane.
#[derive(Parser, Debug)]
#[command(version = dbvm_host::VERSION, about)]
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
    /// First boot: read the OVF environment from this file (instead of VMware Tools'
    /// guestinfo.ovfEnv, then /media/cdrom/ovf-env.xml, then /mnt/cdrom/ovf-env.xml).
    #[arg(long, env = "DBVM_OVF_ENV", value_name = "PATH")]
    ovf_env: Option<PathBuf>,
    /// First boot: write the systemd-networkd files for the OVF's network properties into
    /// this directory (networkctl reload runs only for the default).
    #[arg(
        long,
        env = "DBVM_NETWORK_DIR",
        value_name = "DIR",
        default_value = dbvm_agent::firstboot::NETWORK_DIR
    )]
    network_dir: PathBuf,
    /// Run as an upgrade's trial (the old agent starts the new binary with it): read the
    /// config, state and journal, connect as this agent within the given seconds, print a
    /// report and exit. Writes nothing.
    #[arg(long, value_name = "DEADLINE_S", hide = true)]
    upgrade_trial: Option<u64>,
}

/// Seconds between first-boot attempts while the OVF environment is missing or incomplete
/// (VMware Tools may come up after the agent).
const FIRST_BOOT_RETRY_S: u64 = 5;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(deadline_s) = args.upgrade_trial {
        return upgrade_trial(&args, deadline_s);
    }
    if !args.check {
        match dbvm_agent::firstboot::set_aside_a_cloned_identity(&args.config) {
            Ok(Some(what)) => eprintln!("dbvm-agent: {what}"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("dbvm-agent: cannot check whether this VM is a clone: {e}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    if dbvm_agent::firstboot::needed(&args.config) {
        if args.check {
            println!(
                "configuration {} names no VM yet: first boot fills it from the OVF environment",
                args.config.display()
            );
            return std::process::ExitCode::SUCCESS;
        }
        first_boot(&args);
    }
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
    dbvm_host::logging::init(&validated.config.log);
    tracing::info!(version = dbvm_host::VERSION, agent = %validated.agent_id, "dbvm-agent starting");
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
    let outcome = runtime.block_on(async move {
        let agent = match dbvm_agent::Agent::build(validated) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("dbvm-agent: {e}");
                return Ok(std::process::ExitCode::from(1));
            }
        };
        let shutdown = CancellationToken::new();
        let running = agent.start(shutdown.clone());
        dbvm_host::notify::ready();
        let fed = shutdown.clone();
        tokio::spawn(async move { dbvm_host::notify::watchdog(fed.cancelled_owned()).await });
        tokio::spawn(async move {
            dbvm_host::signals::shutdown().await;
            dbvm_host::notify::stopping();
            shutdown.cancel();
        });
        match running.wait().await {
            Some(exe) => Err(exe),
            None => {
                tracing::info!("dbvm-agent stopped");
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    });
    let exe = match outcome {
        Ok(code) => return code,
        Err(exe) => exe,
    };
    // An upgrade swapped the binary in: the same process becomes the new agent (the
    // journal holds the upgrade's result; the new agent sends it once connected).
    drop(runtime);
    tracing::info!(exe = %exe.display(), "re-executing the upgraded agent");
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("dbvm-agent: cannot re-execute {}: {e}", exe.display());
    std::process::ExitCode::from(1)
}

/// `--upgrade-trial`: see [`dbvm_agent::upgrade`].
fn upgrade_trial(args: &Args, deadline_s: u64) -> std::process::ExitCode {
    let validated = match Config::load(&args.config).and_then(Config::validate) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dbvm-agent: upgrade trial: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dbvm-agent: upgrade trial: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let deadline = std::time::Duration::from_secs(deadline_s);
    match runtime.block_on(dbvm_agent::upgrade::trial_main(validated, deadline)) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dbvm-agent: upgrade trial: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Runs first boot until the OVF environment gives a complete, valid config (see
/// [`dbvm_agent::firstboot`]); each failure is said on stderr (the journal) and in the
/// unit's status, and nothing is written until everything is valid.
fn first_boot(args: &Args) {
    use dbvm_agent::firstboot::{run_once, Source};
    let sources = match &args.ovf_env {
        Some(p) => vec![Source::File(p.clone())],
        None => Source::defaults(),
    };
    loop {
        match run_once(&args.config, &sources, &args.network_dir) {
            Ok(done) => {
                for f in &done.network_files {
                    eprintln!(
                        "dbvm-agent: first boot: wrote {} from the OVF network properties",
                        f.display()
                    );
                }
                if let Some(problem) = &done.reload_problem {
                    eprintln!("dbvm-agent: first boot: the network was not reloaded ({problem}); the files apply at the next boot");
                }
                eprintln!(
                    "dbvm-agent: first boot: {} now configures agent {} (from the OVF environment)",
                    args.config.display(),
                    done.agent_id
                );
                return;
            }
            Err(e) => {
                eprintln!("dbvm-agent: first boot: {e}; trying again in {FIRST_BOOT_RETRY_S} s");
                dbvm_host::notify::status(&format!("first boot: {e}"));
                std::thread::sleep(std::time::Duration::from_secs(FIRST_BOOT_RETRY_S));
            }
        }
    }
}
