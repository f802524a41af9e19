//! `bundle-bench`: the agent's log-bundle writer (`dbvm_agent::bundle::collect_to_file`:
//! log-style redaction, `tar`, zstd level 3, the file synced) over generated
//! PostgreSQL-style logs, against `tar -I 'zstd -3' -cf` of the same files, interleaved in
//! the same run; plus the writer's peak RSS.
//!
//! Both sides run as child processes timed by this one (wall time from spawn to exit):
//! `tar` as itself, the writer as this binary re-run with the hidden `--child` flag, so
//! the generator's memory never counts in the writer's peak RSS (the child reports its
//! own `VmHWM` from `/proc/self/status` at its end).

mod e2e;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1024 * 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// GiB of logs to generate.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Log files they are spread over (same size each).
    #[arg(long, default_value_t = 8)]
    files: u32,
    /// Interleaved pairs (tar | zstd, then the writer); the report takes the medians.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Where the run's directory is made (logs, outputs); removed at the end unless
    /// --keep-dir.
    #[arg(long, default_value = "target/bundle-bench")]
    work_dir: PathBuf,
    #[arg(long)]
    keep_dir: bool,
    /// Target for the median ratio writer / tar | zstd.
    #[arg(long, default_value_t = 1.1)]
    target_ratio: f64,
    /// Target for the writer's peak RSS, MiB.
    #[arg(long, default_value_t = 64.0)]
    target_rss_mib: f64,
    /// Print the report as JSON (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// The whole way instead of the writer alone: a signed bundle.collect to the release
    /// agent through the release broker, uploaded while written, fetched and checked at
    /// the control plane (see e2e.rs); needs --agent-bin and --broker-bin.
    #[arg(long, requires_all = ["agent_bin", "broker_bin"])]
    e2e: bool,
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    broker_bin: Option<PathBuf>,
    /// With --e2e: signed pings to the idle agent (the baseline of those sent while a
    /// bundle streams).
    #[arg(long, default_value_t = 200)]
    pings: usize,
    /// Internal: run the writer over the logs in LOGS into OUT_DIR and print its figures.
    #[arg(long, hide = true, num_args = 2, value_names = ["LOGS", "OUT_DIR"])]
    child: Option<Vec<PathBuf>>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(paths) = &args.child {
        return match child(&paths[0], &paths[1]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bundle-bench child: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bundle-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The child: the agent's own runtime shape (2 workers, 8 blocking threads, as
/// `dbvm-agent`'s main), the db capability's log part (`Producer::Dir`, log-style
/// redaction), the capability's options (zstd 3, the 120 s part timeout) with a cap
/// above the input.
fn child(logs: &Path, out_dir: &Path) -> Result<()> {
    use dbvm_agent::bundle::{collect_to_file, Options, Part, Producer, Request};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()?;
    let rss_before = vm_kib("VmRSS")?;
    let start = Instant::now();
    let (manifest, bytes, sha) = rt.block_on(async {
        let parts = vec![Part::log(
            "db/log/",
            logs.display().to_string(),
            Producer::Dir(logs.to_path_buf()),
        )];
        let options = Options {
            agent_id: "bench".into(),
            request: Request {
                since_ms: 0,
                until_ms: i64::MAX,
                include_db_logs: true,
                include_db_views: false,
            },
            max_bytes: 16 * GIB,
            part_timeout: Duration::from_secs(120),
            zstd_level: 3,
            version: dbvm_host::VERSION.to_string(),
        };
        collect_to_file(parts, options, out_dir, "bundle.tar.zst").await
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    if !manifest.failed.is_empty() || manifest.files.is_empty() {
        bail!("the bundle recorded failures: {:?}", manifest.failed);
    }
    let report = json!({
        "elapsed_s": elapsed,
        "bytes": bytes,
        "sha256": sha,
        "files": manifest.files.len(),
        "content_bytes": manifest.content_bytes,
        "redactions": manifest.redactions,
        "rss_before_kib": rss_before,
        "vmhwm_kib": vm_kib("VmHWM")?,
    });
    println!("{report}");
    Ok(())
}

/// A `Vm*` line of /proc/self/status, in KiB.
fn vm_kib(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

fn run(args: &Args) -> Result<bool> {
    if !args.gib.is_finite() || args.gib <= 0.0 || args.files == 0 || args.pairs == 0 {
        bail!("--gib, --files and --pairs must be above 0");
    }
    for tool in ["tar", "zstd"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("{tool} is missing: apt-get install -y tar zstd");
        }
    }
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("cannot create {}", args.work_dir.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&args.work_dir)?;
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs)?;
    let total = (args.gib * GIB as f64) as u64;
    eprintln!(
        "== generating {:.2} GiB of logs in {} files under {}",
        args.gib,
        args.files,
        logs.display()
    );
    let names = generate(&logs, total, args.files)?;
    // Both sides read the logs from the page cache: read them once before the first pair.
    for n in &names {
        std::io::copy(
            &mut std::fs::File::open(logs.join(n))?,
            &mut std::io::sink(),
        )?;
    }
    if args.e2e {
        return run_e2e(args, &logs);
    }
    let exe = std::env::current_exe()?;
    let mut pairs = Vec::new();
    for i in 0..args.pairs {
        let out = dir.path().join(format!("tar-{i}.tar.zst"));
        let cpu = children_cpu_s()?;
        let start = Instant::now();
        let status = Command::new("tar")
            .args(["-I", "zstd -3", "-cf"])
            .arg(&out)
            .arg("-C")
            .arg(&logs)
            .args(&names)
            .status()?;
        // tar's file is synced too, as the writer's is (the writer's figure includes it).
        sync_file(&out)?;
        let tar_s = start.elapsed().as_secs_f64();
        let tar_cpu = children_cpu_s()? - cpu;
        if !status.success() {
            bail!("tar -I 'zstd -3' failed: {status}");
        }
        let tar_bytes = std::fs::metadata(&out)?.len();
        std::fs::remove_file(&out)?;

        let out_dir = dir.path().join(format!("bundle-{i}"));
        let cpu = children_cpu_s()?;
        let start = Instant::now();
        let output = Command::new(&exe)
            .arg("--child")
            .arg(&logs)
            .arg(&out_dir)
            .stderr(Stdio::inherit())
            .output()?;
        let agent_s = start.elapsed().as_secs_f64();
        let agent_cpu = children_cpu_s()? - cpu;
        if !output.status.success() {
            bail!("the writer's child failed: {}", output.status);
        }
        let agent: Value = serde_json::from_slice(&output.stdout)
            .context("the writer's child printed no report")?;
        std::fs::remove_dir_all(&out_dir)?;
        let ratio = agent_s / tar_s;
        eprintln!(
            "pair {}: tar|zstd {tar_s:.2} s ({tar_cpu:.2} s CPU), writer {agent_s:.2} s ({agent_cpu:.2} s CPU) (ratio {ratio:.2}), writer peak RSS {:.1} MiB",
            i + 1,
            agent["vmhwm_kib"].as_f64().unwrap_or(0.0) / 1024.0
        );
        pairs.push(json!({
            "tar_s": tar_s,
            "tar_cpu_s": tar_cpu,
            "agent_cpu_s": agent_cpu,
            "cpu_ratio": agent_cpu / tar_cpu.max(0.01),
            "tar_bytes": tar_bytes,
            "agent_s": agent_s,
            "ratio": ratio,
            "agent": agent,
        }));
    }
    let median = |key: &str| {
        let v: Vec<f64> = pairs.iter().filter_map(|p| p[key].as_f64()).collect();
        median(&v)
    };
    let peak_kib = pairs
        .iter()
        .filter_map(|p| p["agent"]["vmhwm_kib"].as_u64())
        .max()
        .unwrap_or(0);
    let (tar_s, agent_s, ratio) = (median("tar_s"), median("agent_s"), median("ratio"));
    let (tar_cpu, agent_cpu) = (median("tar_cpu_s"), median("agent_cpu_s"));
    let tar_bytes = pairs[0]["tar_bytes"].as_u64().unwrap_or(0);
    let agent_bytes = pairs[0]["agent"]["bytes"].as_u64().unwrap_or(0);
    let rss_mib = peak_kib as f64 / 1024.0;
    let ratio_ok = ratio <= args.target_ratio;
    let rss_ok = rss_mib < args.target_rss_mib;
    let table = format!(
        "\n| | tar -I 'zstd -3' | agent writer | target |\n| --- | --- | --- | --- |\n\
         | wall time (median of {n}) | {tar_s:.2} s | {agent_s:.2} s | |\n\
         | ratio writer / tar (median) | | {ratio:.3} | ≤ {tr} {rm} |\n\
         | CPU, user + system (median) | {tar_cpu:.2} s | {agent_cpu:.2} s ({cr:.2}× tar's) | |\n\
         | throughput | {tt:.0} MiB/s | {at:.0} MiB/s | |\n\
         | output | {tb:.1} MiB | {ab:.1} MiB ({sr:.3}× tar's) | |\n\
         | peak RSS (VmHWM of the writer's process) | | {rss_mib:.1} MiB | < {trss} MiB {rr} |\n\
         | redactions in the bundle | | {red} | |\n",
        n = pairs.len(),
        tr = args.target_ratio,
        rm = if ratio_ok { "met" } else { "MISSED" },
        cr = agent_cpu / tar_cpu.max(0.01),
        tt = total as f64 / MIB / tar_s,
        at = total as f64 / MIB / agent_s,
        tb = tar_bytes as f64 / MIB,
        ab = agent_bytes as f64 / MIB,
        sr = agent_bytes as f64 / tar_bytes.max(1) as f64,
        trss = args.target_rss_mib,
        rr = if rss_ok { "met" } else { "MISSED" },
        red = pairs[0]["agent"]["redactions"],
    );
    let report = json!({
        "input_bytes": total,
        "files": args.files,
        "pairs": pairs,
        "median_tar_s": tar_s,
        "median_agent_s": agent_s,
        "median_ratio": ratio,
        "median_tar_cpu_s": tar_cpu,
        "median_agent_cpu_s": agent_cpu,
        "peak_rss_mib": rss_mib,
        "tar_bytes": tar_bytes,
        "agent_bytes": agent_bytes,
        "targets": {"ratio": args.target_ratio, "rss_mib": args.target_rss_mib},
        "met": ratio_ok && rss_ok,
    });
    if args.json {
        eprintln!("{table}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{table}");
    }
    if args.keep_dir {
        let kept = dir.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(ratio_ok && rss_ok)
}

/// The middle value of `v` (the upper one of an even count; 0 when empty).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The CPU time (user + system, s) of this process's waited-for children so far
/// (`cutime` + `cstime` of /proc/self/stat): a child's own and its children's (tar's
/// zstd), once it has been waited for.
fn children_cpu_s() -> Result<f64> {
    cpu_s("self", 16)
}

/// CPU time (s) from `/proc/<pid>/stat`: fields `first` and `first + 1` (14: the
/// process's own user + system time; 16: its waited-for children's).
pub(crate) fn cpu_s(pid: &str, first: usize) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command (in parentheses, which may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no command in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("a short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    // USER_HZ is 100 on Linux's every architecture this runs on.
    Ok((ticks(first)? + ticks(first + 1)?) / 100.0)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// Writes `total` bytes of PostgreSQL-style log lines into `files` files of `logs`;
/// returns their names. About 2 % of the lines carry something the log patterns redact
/// (a password in a connection string or a statement, a URL with credentials, a bearer
/// header, an AWS key id), the rest vary in their numbers, names and statements, so the
/// text compresses as a server log does (not as one repeated line).
/// `--e2e`: the whole way, with its own table.
fn run_e2e(args: &Args, logs: &Path) -> Result<bool> {
    let (Some(agent_bin), Some(broker_bin)) = (&args.agent_bin, &args.broker_bin) else {
        bail!("--e2e needs --agent-bin and --broker-bin");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(e2e::run(e2e::E2eArgs {
        logs: logs.to_path_buf(),
        pairs: args.pairs,
        idle_pings: args.pings,
        agent_bin: agent_bin.clone(),
        broker_bin: broker_bin.clone(),
        keep_dir: args.keep_dir,
    }))?;
    let ok = e2e::passes(&r);
    for p in &r.slowest_pings {
        eprintln!(
            "slow ping: {:.1} ms = submit {} + queued {} + agent and result {} + answer {} (ms), \
             sent {:.2} s into its pair, whose bundle was seen finished at {:.2} s",
            p.ms, p.submit_ms, p.queued_ms, p.agent_ms, p.answer_ms, p.at_s, p.finished_s
        );
    }
    eprintln!(
        "\n{:.2} GiB of logs, {} pairs\n\
         bundle through the broker to the checked file / tar -I 'zstd -3': median {:.3} (target <= 1.2)\n\
         pairs (s): {:?}\n\
         sizes: bundle {:.1} MiB, tar.zst {:.1} MiB\n\
         agent RSS: idle {:.1} MiB, peak while bundling {:.1} MiB (target < 64)\n\
         signed ping round trip: idle p50 {:.2} ms p99 {:.2} ms (n={}); while the bundle streams p50 {:.2} ms p99 {:.2} ms (n={}) (target p99 <= 2x idle); while it is downloaded and checked p50 {:.2} ms p99 {:.2} ms (n={})\n\
         CPU per pair (s, median): agent {:.2}, broker {:.2}, this process (pings, download, check) {:.2}; tar | zstd -3 {:.2}\n\
         {}",
        r.input_bytes as f64 / GIB as f64,
        r.pairs.len(),
        r.median_ratio,
        r.pairs,
        r.bundle_bytes as f64 / MIB,
        r.tar_bytes as f64 / MIB,
        r.agent_idle_rss_mib,
        r.agent_peak_rss_mib,
        r.ping_idle_ms.p50,
        r.ping_idle_ms.p99,
        r.ping_idle_ms.n,
        r.ping_streaming_ms.p50,
        r.ping_streaming_ms.p99,
        r.ping_streaming_ms.n,
        r.ping_download_ms.p50,
        r.ping_download_ms.p99,
        r.ping_download_ms.n,
        r.cpu.agent,
        r.cpu.broker,
        r.cpu.bench,
        r.cpu.tar,
        if ok { "all targets met" } else { "a target was missed" }
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(ok)
}

fn generate(logs: &Path, total: u64, files: u32) -> Result<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(14);
    let per_file = total / u64::from(files);
    let mut names = Vec::new();
    let mut ms: u64 = 1_764_806_400_000; // 2025-12-04 00:00:00 UTC
    for f in 0..files {
        let name = format!("postgresql-{:02}.log", f + 1);
        let mut out =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(logs.join(&name))?);
        let mut written = 0u64;
        let mut line = String::with_capacity(512);
        while written < per_file {
            line.clear();
            ms += rng.gen_range(0..40);
            log_line(&mut rng, ms, &mut line);
            out.write_all(line.as_bytes())?;
            written += line.len() as u64;
        }
        // Synced: else the kernel writes the gigabyte back about 30 s later (its dirty
        // pages expire), in the middle of the pairs, and every sync then waits behind it
        // (the pings' commits waited up to 238 ms).
        out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
        names.push(name);
    }
    Ok(names)
}

const TABLES: &[&str] = &[
    "orders",
    "order_items",
    "customers",
    "invoices",
    "payments",
    "shipments",
    "products",
    "inventory",
    "sessions",
    "audit_log",
];
const USERS: &[&str] = &["app", "reporting", "batch", "postgres", "dbvm_monitor"];
const APPS: &[&str] = &["api", "worker", "psql", "pg_dump", "metabase", "cron"];

fn log_line(rng: &mut StdRng, ms: u64, line: &mut String) {
    use std::fmt::Write as _;
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let day = 4 + (secs / 86_400) % 20;
    let pid = rng.gen_range(1000..65_000);
    let user = USERS[rng.gen_range(0..USERS.len())];
    let table = TABLES[rng.gen_range(0..TABLES.len())];
    let ip = format!("10.0.{}.{}", rng.gen_range(0..8), rng.gen_range(2..250));
    let _ = write!(
        line,
        "2025-12-{day:02} {h:02}:{m:02}:{s:02}.{:03} UTC [{pid}] {user}@appdb ",
        ms % 1000
    );
    let kind = rng.gen_range(0..1000);
    let _ = match kind {
        // The ~2 % with something to redact.
        0..=4 => write!(
            line,
            "LOG:  statement: ALTER ROLE {user} PASSWORD '{}'",
            secret(rng, 16)
        ),
        5..=9 => write!(
            line,
            "LOG:  could not connect to upstream: host=db-{} port=5432 user=replicator password={} sslmode=verify-full",
            rng.gen_range(1..9),
            secret(rng, 20)
        ),
        10..=13 => write!(
            line,
            "LOG:  archive_command: wal-push to s3://backups/{table} via https://backup:{}@s3.internal:9000/bucket",
            secret(rng, 24)
        ),
        14..=17 => write!(
            line,
            "WARNING:  http_request failed: status 401, headers: Authorization: Bearer {}",
            secret(rng, 32)
        ),
        18..=19 => write!(
            line,
            "LOG:  aws_s3 extension: using key AKIA{}",
            secret(rng, 16).to_uppercase()
        ),
        20..=99 => write!(
            line,
            "LOG:  connection authorized: user={user} database=appdb application_name={} SSL enabled (protocol=TLSv1.3, cipher=TLS_AES_256_GCM_SHA384, bits=256)",
            APPS[rng.gen_range(0..APPS.len())]
        ),
        100..=179 => write!(
            line,
            "LOG:  connection received: host={ip} port={}",
            rng.gen_range(32_768..61_000)
        ),
        180..=259 => write!(
            line,
            "LOG:  disconnection: session time: 0:{:02}:{:02}.{:03} user={user} database=appdb host={ip} port={}",
            rng.gen_range(0..60),
            rng.gen_range(0..60),
            rng.gen_range(0..1000),
            rng.gen_range(32_768..61_000)
        ),
        260..=279 => write!(
            line,
            "ERROR:  duplicate key value violates unique constraint \"{table}_pkey\"\n\
             DETAIL:  Key (id)=({}) already exists.\n\
             STATEMENT:  INSERT INTO {table} (id, customer_id, status, total) VALUES ({}, {}, 'new', {}.{:02})",
            rng.gen_range(1..10_000_000),
            rng.gen_range(1..10_000_000),
            rng.gen_range(1..500_000),
            rng.gen_range(1..10_000),
            rng.gen_range(0..100)
        ),
        280..=289 => write!(
            line,
            "LOG:  checkpoint complete: wrote {} buffers ({:.1}%); 0 WAL file(s) added, 0 removed, {} recycled; write={:.3} s, sync={:.3} s, total={:.3} s; sync files={}, longest=0.00{} s, average=0.001 s; distance={} kB, estimate={} kB",
            rng.gen_range(10..20_000),
            rng.gen_range(0.0..30.0),
            rng.gen_range(0..8),
            rng.gen_range(0.0..30.0),
            rng.gen_range(0.0..0.1),
            rng.gen_range(0.0..30.0),
            rng.gen_range(1..80),
            rng.gen_range(1..9),
            rng.gen_range(100..40_000),
            rng.gen_range(100..40_000)
        ),
        290..=309 => write!(
            line,
            "LOG:  automatic vacuum of table \"appdb.public.{table}\": index scans: 1\n\
             \tpages: 0 removed, {} remain, {} scanned (100.00% of total)\n\
             \ttuples: {} removed, {} remain, 0 are dead but not yet removable",
            rng.gen_range(100..90_000),
            rng.gen_range(100..90_000),
            rng.gen_range(0..50_000),
            rng.gen_range(1000..9_000_000)
        ),
        _ => write!(
            line,
            "LOG:  duration: {}.{:03} ms  statement: SELECT id, status, total, created_at FROM {table} WHERE customer_id = {} AND created_at > now() - interval '{} days' ORDER BY created_at DESC LIMIT {}",
            rng.gen_range(0..2000),
            rng.gen_range(0..1000),
            rng.gen_range(1..500_000),
            rng.gen_range(1..90),
            [10, 20, 50, 100][rng.gen_range(0..4)]
        ),
    };
    line.push('\n');
}

fn secret(rng: &mut StdRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}
