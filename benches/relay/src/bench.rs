//! One benchmark run from start to end: fleet and pre-signed commands, the broker as a
//! child process, N simulated agents connecting and idling (memory), M commands through
//! the API (latency, throughput, CPU), optionally one real agent (footprint), then
//! everything this run started is stopped and its temporary directory removed.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, BrokerProcess};
use crate::fleet::{self, Fleet};
use crate::load::{self, ApiClient, HttpVersion};
use crate::procfs;
use crate::real_agent;
use crate::report::{Check, Commands, Connect, Idle, Latency, Report, RunConfig, Setup};
use crate::sim_agent;

/// Core the broker is pinned to with `--pin`; the load generator takes the other one.
const BROKER_CORE: u32 = 0;
const LOADGEN_CORE: u32 = 1;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Simulated agents, each one mTLS connection from this process with its own certificate.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Signed `ping` commands to send through the API (0: connect and idle only).
    #[arg(long, default_value_t = 10_000)]
    pub commands: usize,
    /// Commands per second, fixed-rate open loop; 0 = saturation (closed loop).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Commands outstanding in saturation mode.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Simulated agents skip the ed25519 check (still decode and check target, time and
    /// replay), so the broker's own cost shows.
    #[arg(long)]
    pub skip_verify: bool,
    /// The broker binary [default: dbvm-broker beside this executable, i.e. target/release].
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// Pin the broker to core 0 (`taskset -c 0`) and this process to core 1 (`taskset -a -p`).
    #[arg(long)]
    pub pin: bool,
    /// Print the report as JSON on stdout (progress always goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// A real dbvm-agent to measure [default: target/x86_64-unknown-linux-musl/release/dbvm-agent when present].
    #[arg(long)]
    pub real_agent_bin: Option<PathBuf>,
    /// Do not run the real agent even when its binary is present.
    #[arg(long)]
    pub no_real_agent: bool,
    /// Pings sent to the real agent.
    #[arg(long, default_value_t = 100)]
    pub real_agent_pings: usize,
    /// Seconds the real agent idles before its memory is read.
    #[arg(long, default_value_t = 10)]
    pub real_agent_idle_secs: u64,
    /// Seconds the connected agents idle before the broker's memory is read.
    #[arg(long, default_value_t = 5)]
    pub idle_secs: u64,
    /// HTTP version of the API connections.
    #[arg(long, value_enum, default_value = "2")]
    pub http: HttpVersion,
    /// HTTP/2 connections to the API (requests are spread over them). With HTTP/1.1, the
    /// connections opened before a fixed-rate run (more open on demand).
    #[arg(long, default_value_t = 4)]
    pub api_connections: usize,
    /// `wait_ms` of each submission: the API answers when the command finished.
    #[arg(long, default_value_t = 10_000)]
    pub wait_ms: u64,
    /// Heartbeat interval written into the broker's config.
    #[arg(long, default_value_t = 10_000)]
    pub heartbeat_interval_ms: u32,
    /// Agent handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Where the temporary fleet directory (and the broker's data) goes [default: $TMPDIR or /tmp].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the temporary directory (logs, broker data) instead of removing it.
    #[arg(long)]
    pub keep_dir: bool,
    /// Name of this run in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// Record a CPU profile of the broker during the command phase with `perf record`.
    #[arg(long)]
    pub perf_record: Option<PathBuf>,
    /// Check: p99 round trip (from the scheduled send time) below this many ms.
    #[arg(long)]
    pub target_p99_ms: Option<f64>,
    /// Check: at least this many commands/s achieved, without errors.
    #[arg(long)]
    pub target_rate: Option<f64>,
    /// Check: broker RSS per idle agent below this many KiB.
    #[arg(long)]
    pub target_idle_kib: Option<f64>,
    /// Check: real agent VmRSS after idling below this many MiB.
    #[arg(long)]
    pub target_agent_rss_mib: Option<f64>,
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("relay-bench: {msg}");
}

fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("this executable has no parent directory")
}

fn filesystem_of(path: &Path) -> String {
    std::process::Command::new("df")
        .args(["--output=fstype,source"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| {
            t.lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs one benchmark. Synchronous set-up (certificates, signing) uses every core before
/// the runtime starts; with `--pin` the runtime then has one worker, on core 1.
pub fn main(args: BenchArgs) -> Result<Report> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        bail!("--rate must be 0 (saturation) or a positive number of commands per second");
    }
    let broker_bin = match &args.broker_bin {
        Some(p) => p.clone(),
        None => exe_dir()?.join("dbvm-broker"),
    };
    let real_agent_bin = if args.no_real_agent {
        None
    } else {
        match &args.real_agent_bin {
            Some(p) => Some(p.clone()),
            None => {
                let p = exe_dir()?.join("../x86_64-unknown-linux-musl/release/dbvm-agent");
                p.is_file().then_some(p)
            }
        }
    };

    progress(format!("issuing {} agent certificates", args.agents));
    let mut fleet = Fleet::create(
        args.agents,
        args.work_dir.as_deref(),
        args.heartbeat_interval_ms,
    )?;
    let certs = std::mem::take(&mut fleet.agents);
    let ids: Vec<String> = certs.iter().map(|a| a.id.clone()).collect();
    // Valid long enough for the slowest run: twice the planned duration plus ten minutes.
    let planned_secs = if args.rate > 0.0 {
        args.commands as f64 / args.rate
    } else {
        60.0
    };
    let lifetime_ms = (planned_secs * 2000.0) as i64 + 600_000;
    let started = Instant::now();
    let bodies = fleet::presign(&fleet.signer, &ids, args.commands, lifetime_ms)?;
    let setup = Setup {
        cert_issue_secs: fleet.issue_secs,
        cert_threads: fleet.issue_threads,
        presigned_commands: bodies.len(),
        presign_secs: started.elapsed().as_secs_f64(),
    };
    progress(format!(
        "{} certificates in {:.2} s, {} commands signed in {:.2} s",
        args.agents, setup.cert_issue_secs, setup.presigned_commands, setup.presign_secs
    ));

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.pin {
        builder.worker_threads(1);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let keep = args.keep_dir;
    let result = runtime.block_on(run(
        args,
        &fleet,
        certs,
        bodies,
        setup,
        &broker_bin,
        real_agent_bin.as_deref(),
    ));
    drop(runtime);
    if keep {
        let dir = fleet.dir.keep();
        progress(format!("kept {}", dir.display()));
    }
    result
}

async fn run(
    args: BenchArgs,
    fleet: &Fleet,
    certs: Vec<fleet::AgentCert>,
    bodies: Vec<bytes::Bytes>,
    setup: Setup,
    broker_bin: &Path,
    real_agent_bin: Option<&Path>,
) -> Result<Report> {
    let me = std::process::id();
    let mut broker = BrokerProcess::start(
        broker_bin,
        &fleet.broker_config,
        fleet.path("broker.log"),
        args.pin.then_some(BROKER_CORE),
    )
    .await?;
    progress(format!(
        "broker pid {} listening agent={} api={}",
        broker.pid, broker.agent_addr, broker.api_addr
    ));
    if args.pin {
        broker::pin_self(LOADGEN_CORE).await?;
    }
    let config = RunConfig {
        agents: args.agents,
        commands: args.commands,
        rate: args.rate,
        concurrency: args.concurrency,
        skip_verify: args.skip_verify,
        pinned: args.pin,
        broker_cpus: procfs::thread_affinities(broker.pid)?.join(" | "),
        loadgen_cpus: procfs::thread_affinities(me)?.join(" | "),
        http: match args.http {
            HttpVersion::Http1 => "1.1".into(),
            HttpVersion::Http2 => "2".into(),
        },
        api_connections: args.api_connections,
        wait_ms: args.wait_ms,
        idle_secs: args.idle_secs,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        broker_bin: broker_bin.display().to_string(),
        data_dir_filesystem: filesystem_of(fleet.dir.path()),
    };
    // Let start-up work (store, lazy statics) settle before the first reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mem_before = procfs::memory(broker.pid)?;
    let sock_before = procfs::sockstat()?;
    let slab_before = procfs::socket_slab_bytes();

    // ---- connect -------------------------------------------------------------------------
    let settings = Arc::new(sim_agent::Settings {
        broker: broker.agent_addr,
        key_id: fleet.signer.key_id().to_string(),
        key: fleet.signer.verifying_key(),
        skip_verify: args.skip_verify,
        roots: Arc::new(dbvm_protocol::tls::roots_from_pem(&fleet.ca_pem)?),
        provider: dbvm_protocol::tls::provider(),
    });
    let stats = Arc::new(sim_agent::Stats::default());
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    progress(format!("connecting {} agents", args.agents));
    let (b0, l0) = (procfs::threads(broker.pid)?, procfs::threads(me)?);
    let t0 = Instant::now();
    sim_agent::spawn_all(
        certs,
        settings,
        stats.clone(),
        args.connect_concurrency,
        shutdown.clone(),
        &tracker,
    );
    let timeout = Duration::from_secs(60 + args.agents as u64 / 200);
    let waited = sim_agent::wait_connected(&stats, args.agents, timeout).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    let (b1, l1) = (procfs::threads(broker.pid)?, procfs::threads(me)?);
    if let Err(e) = waited {
        broker.check_alive()?;
        return Err(e.context(format!(
            "first agent error: {}",
            stats.first_error().unwrap_or_else(|| "none".into())
        )));
    }
    broker.check_alive()?;
    let connected = stats.connected.load(Ordering::Relaxed);
    if connected == 0 {
        bail!(
            "no agent connected; first error: {}",
            stats.first_error().unwrap_or_else(|| "none".into())
        );
    }
    let broker_connect_ms = procfs::cpu_delta(&b0, &b1).run_ms;
    let connect = Connect {
        connected,
        failures: stats.connect_failures.load(Ordering::Relaxed),
        secs: connect_secs,
        per_sec: connected as f64 / connect_secs,
        broker_cpu_ms: broker_connect_ms,
        broker_cpu_us_per_agent: broker_connect_ms * 1000.0 / connected as f64,
        loadgen_cpu_ms: procfs::cpu_delta(&l0, &l1).run_ms,
        first_error: stats.first_error(),
    };
    progress(format!(
        "{} agents connected in {:.2} s; idling {} s",
        connected, connect_secs, args.idle_secs
    ));

    // ---- idle ----------------------------------------------------------------------------
    let hb0 = stats.heartbeats.load(Ordering::Relaxed);
    let idle0 = procfs::threads(broker.pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_cpu_ms = procfs::cpu_delta(&idle0, &procfs::threads(broker.pid)?).run_ms;
    let idle_wall_ms = idle_started.elapsed().as_secs_f64() * 1000.0;
    let mem_after = procfs::memory(broker.pid)?;
    let sock_after = procfs::sockstat()?;
    let slab_after = procfs::socket_slab_bytes();
    let slab_delta =
        slab_after.values().sum::<u64>() as f64 - slab_before.values().sum::<u64>() as f64;
    let loadgen_memory = procfs::memory(me)?;
    let per = |after: u64, before: u64| (after as f64 - before as f64) / connected as f64;
    let conns = sock_after
        .tcp_inuse
        .saturating_sub(sock_before.tcp_inuse)
        .max(1);
    let idle = Idle {
        broker_before: mem_before,
        broker_after: mem_after,
        broker_threads_after: procfs::status(broker.pid)?.threads,
        per_agent_rss_kib: per(mem_after.rss_kib, mem_before.rss_kib),
        per_agent_pss_kib: per(mem_after.pss_kib, mem_before.pss_kib),
        per_agent_anonymous_kib: per(mem_after.anonymous_kib, mem_before.anonymous_kib),
        sockstat_before: sock_before,
        sockstat_after: sock_after,
        kernel_kib_per_connection: (sock_after.tcp_mem_pages as f64
            - sock_before.tcp_mem_pages as f64)
            * procfs::PAGE_KIB as f64
            / (conns as f64 / 2.0).max(1.0),
        kernel_slab_bytes_per_socket: slab_delta / conns as f64,
        kernel_slab_before: slab_before,
        kernel_slab_after: slab_after,
        loadgen_memory,
        loadgen_pss_kib_per_agent: loadgen_memory.pss_kib as f64 / connected as f64,
        broker_idle_cpu_pct: idle_cpu_ms * 100.0 / idle_wall_ms,
        heartbeats_during_idle: stats.heartbeats.load(Ordering::Relaxed) - hb0,
        dropped: stats.dropped.load(Ordering::Relaxed),
    };
    broker.check_alive()?;

    // ---- commands ------------------------------------------------------------------------
    let request_timeout = Duration::from_millis(args.wait_ms) + Duration::from_secs(30);
    let (clients, warm) = match args.http {
        HttpVersion::Http2 => (args.api_connections, 1),
        HttpVersion::Http1 => (
            1,
            if args.rate > 0.0 {
                args.api_connections
            } else {
                args.concurrency
            },
        ),
    };
    let api = Arc::new(ApiClient::new(
        &fleet.ca_pem,
        &fleet.control_plane,
        broker.api_addr,
        args.http,
        clients,
        request_timeout,
    )?);
    let commands = if bodies.is_empty() {
        None
    } else {
        let http_version = api
            .warm_up(warm)
            .await
            .context("cannot reach the broker's API")?;
        progress(format!(
            "sending {} commands ({}, {http_version})",
            bodies.len(),
            if args.rate > 0.0 {
                format!("{} /s", args.rate)
            } else {
                format!("saturation, {} outstanding", args.concurrency)
            }
        ));
        let delivered0 = stats.delivered.load(Ordering::Relaxed);
        let rejected0 = stats.rejected.load(Ordering::Relaxed);
        let perf = match &args.perf_record {
            Some(path) => Some(start_perf(broker.pid, path).await?),
            None => None,
        };
        let (b0, l0, io0) = (
            procfs::threads(broker.pid)?,
            procfs::threads(me)?,
            procfs::io(broker.pid)?,
        );
        let ticks0 = procfs::cpu_ticks()?;
        let result = if args.rate > 0.0 {
            load::fixed_rate(api.clone(), bodies, args.rate, args.wait_ms).await
        } else {
            load::closed_loop(api.clone(), bodies, args.concurrency, args.wait_ms).await
        };
        let (b1, l1, io1) = (
            procfs::threads(broker.pid)?,
            procfs::threads(me)?,
            procfs::io(broker.pid)?,
        );
        let steal_pct = procfs::steal_pct(&ticks0, &procfs::cpu_ticks()?);
        if let Some(mut p) = perf {
            let _ = broker::signal(p.id().unwrap_or(0), "INT").await;
            let _ = tokio::time::timeout(Duration::from_secs(30), p.wait()).await;
        }
        broker.check_alive()?;
        let elapsed = result.elapsed.as_secs_f64();
        let broker_cpu = procfs::cpu_delta(&b0, &b1);
        let loadgen_cpu_ms = procfs::cpu_delta(&l0, &l1).run_ms;
        let r = result.recorder;
        Some(Commands {
            mode: if args.rate > 0.0 {
                format!("open loop {} /s", args.rate)
            } else {
                format!("closed loop, {} outstanding", args.concurrency)
            },
            http_version,
            sent: result.sent,
            ok: r.ok,
            errors: r.errors,
            error_examples: r.error_examples,
            elapsed_secs: elapsed,
            per_sec: r.ok as f64 / elapsed,
            latency: Latency::from_histogram(&r.latency),
            service: Latency::from_histogram(&r.service),
            send_lag: if args.rate > 0.0 {
                Latency::from_histogram(&r.lag)
            } else {
                Latency::default()
            },
            broker_cpu_pct: broker_cpu.run_ms / (elapsed * 10.0),
            broker_cpu_us_per_command: broker_cpu.run_ms * 1000.0 / result.sent as f64,
            broker_runqueue_wait_ms: broker_cpu.wait_ms,
            broker_cpu,
            broker_io: io1.since(&io0),
            broker_memory_after: procfs::memory(broker.pid)?,
            steal_pct,
            loadgen_cpu_ms,
            loadgen_cpu_pct: loadgen_cpu_ms / (elapsed * 10.0),
            loadgen_cpu_us_per_command: loadgen_cpu_ms * 1000.0 / result.sent as f64,
            agents_delivered: stats.delivered.load(Ordering::Relaxed) - delivered0,
            agents_rejected: stats.rejected.load(Ordering::Relaxed) - rejected0,
            dropped: stats.dropped.load(Ordering::Relaxed),
        })
    };

    // ---- real agent ----------------------------------------------------------------------
    let (real_agent, real_agent_error) = match real_agent_bin {
        None => (None, None),
        Some(bin) => {
            progress(format!(
                "real agent {}: {} pings, then {} s idle",
                bin.display(),
                args.real_agent_pings,
                args.real_agent_idle_secs
            ));
            match real_agent::run(
                bin,
                fleet,
                &api,
                broker.agent_addr,
                args.real_agent_pings,
                Duration::from_secs(args.real_agent_idle_secs),
                args.wait_ms,
            )
            .await
            {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            }
        }
    };

    // ---- stop ----------------------------------------------------------------------------
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        progress("some simulated agents did not stop within 10 s");
    }
    drop(api);
    let broker_exit = broker.stop().await?;

    let mut report = Report {
        label: args.label.clone().unwrap_or_else(|| "run".into()),
        config,
        setup,
        connect,
        idle,
        commands,
        real_agent,
        real_agent_error,
        broker_exit,
        checks: Vec::new(),
    };
    report.checks = checks(&args, &report);
    Ok(report)
}

async fn start_perf(pid: u32, path: &Path) -> Result<tokio::process::Child> {
    let child = tokio::process::Command::new("perf")
        .args(["record", "-F", "1999", "-g", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start perf record (is perf installed?)")?;
    // perf needs a moment to attach to every thread.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(child)
}

fn checks(args: &BenchArgs, r: &Report) -> Vec<Check> {
    let mut out = Vec::new();
    // Every command that did not come back `succeeded` is an error.
    let errors = r
        .commands
        .as_ref()
        .map_or(0, |c| (c.sent as u64).saturating_sub(c.ok));
    if let Some(t) = args.target_p99_ms {
        let (measured, pass) = match &r.commands {
            Some(c) => (
                format!("{:.2} ms, {errors} errors", c.latency.p99_ms),
                c.latency.p99_ms < t && errors == 0,
            ),
            None => ("not measured".into(), false),
        };
        out.push(Check {
            name: "p99 round trip (from schedule)".into(),
            target: format!("< {t} ms"),
            measured,
            pass,
        });
    }
    if let Some(t) = args.target_rate {
        let (measured, pass) = match &r.commands {
            Some(c) => (
                format!("{:.0} cmd/s, {errors} errors", c.per_sec),
                c.per_sec >= t && errors == 0,
            ),
            None => ("not measured".into(), false),
        };
        out.push(Check {
            name: "throughput".into(),
            target: format!(">= {t} cmd/s"),
            measured,
            pass,
        });
    }
    if let Some(t) = args.target_idle_kib {
        let i = &r.idle;
        out.push(Check {
            name: format!("broker RSS per idle agent ({})", r.connect.connected),
            target: format!("< {t} KiB"),
            measured: format!(
                "{:.1} KiB (Pss {:.1})",
                i.per_agent_rss_kib, i.per_agent_pss_kib
            ),
            pass: i.per_agent_rss_kib < t && r.connect.connected == r.config.agents,
        });
    }
    if let Some(t) = args.target_agent_rss_mib {
        let (measured, pass) = match &r.real_agent {
            Some(a) => {
                let mib = a.status.vm_rss_kib as f64 / 1024.0;
                (
                    format!("{mib:.1} MiB (Pss {:.1})", a.memory.pss_kib as f64 / 1024.0),
                    mib < t,
                )
            }
            None => ("not measured".into(), false),
        };
        out.push(Check {
            name: "real agent idle VmRSS".into(),
            target: format!("< {t} MiB"),
            measured,
            pass,
        });
    }
    out
}
