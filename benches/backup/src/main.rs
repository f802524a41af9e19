//! `backup-bench`: an agent-driven pgBackRest full backup — a signed `backup.run` through
//! the broker, waited for — against the same `pgbackrest backup --type=full` run directly
//! in a one-shot container of the database's image on the same data, interleaved in
//! pairs, on a `pgbench -i -s SCALE` database; plus the agent's peak memory and the
//! static agent's size. Real broker, real agent, the test harness's S3 server (s3s-fs
//! behind stunnel) and private Docker engine (see run.sh).

use anyhow::{bail, Context, Result};
use clap::Parser;
use dbvm_e2e::release::{Bins, Rig, Spec};
use dbvm_e2e::s3::S3Server;
use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use dbvm_protocol::seal::Sealed;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const AGENT_ID: &str = "bench-bk";

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// `pgbench -i -s SCALE` (100 ≈ 1.5 GB).
    #[arg(long, default_value_t = 100)]
    scale: u32,
    /// Interleaved pairs (agent, direct).
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    #[arg(long)]
    agent_bin: PathBuf,
    #[arg(long)]
    broker_bin: PathBuf,
    /// Target for the median ratio agent / direct.
    #[arg(long, default_value_t = 1.05)]
    target_ratio: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backup-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("backup-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn send(rig: &Rig, operation: &str, args: Value) -> Result<Value> {
    let cmd = rig.fleet.sign(AGENT_ID, operation, args);
    let v = rig.client.submit(&cmd).await.context("submit")?;
    let v = rig
        .client
        .wait(v.id, Duration::from_secs(3600))
        .await
        .context("wait")?;
    if v.state != CommandState::Succeeded {
        bail!(
            "{operation} did not succeed: {:?}\n{}",
            v.error,
            rig.agent.proc.log_tail()
        );
    }
    v.output.context("no output")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn run(args: Args) -> Result<bool> {
    if args.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let engine = dbvm_e2e::docker::engine();
    let fleet = Fleet::new();
    let s3 = S3Server::start(&fleet.path("s3"));
    s3.create_bucket("bkp");
    let container = dbvm_e2e::docker::unique_name("bench-bk");
    let root = fleet.path(&format!("{AGENT_ID}-db"));
    let sections = engine.database_section(&root, &container, 10, "");
    let bins = Bins {
        agent: std::fs::canonicalize(&args.agent_bin).context("--agent-bin")?,
        broker: std::fs::canonicalize(&args.broker_bin).context("--broker-bin")?,
    };
    let spec = Spec {
        agent_id: AGENT_ID,
        sections,
        container,
        log_level: "info",
        keep_dir: false,
    };
    let rig = dbvm_e2e::release::start(fleet, &bins, &engine, spec).await?;

    let port = dbvm_e2e::docker::free_port();
    let out = send(
        &rig,
        "db.create",
        json!({"engine": "postgres", "database": "app", "port": port}),
    )
    .await?;
    let sealed: Sealed = serde_json::from_value(out["password"].clone()).context("password")?;
    let password = rig
        .fleet
        .reply_key
        .open(&sealed)
        .context("open the password")?;
    let agent = rig.client.agent(AGENT_ID).await.context("agent")?;
    let key = dbvm_protocol::seal::parse_public_key(
        agent.sealing_key.as_deref().context("no sealing key")?,
    )
    .context("sealing key")?;
    let seal = |s: &str| Sealed::seal(&key, s).map_err(|e| anyhow::anyhow!("seal: {e}"));
    let ca = std::fs::read_to_string(&s3.ca_pem_path).context("S3 CA")?;
    send(
        &rig,
        "backup.configure",
        json!({
            "storage": {"endpoint": s3.endpoint_url(), "bucket": "bkp", "region": s3.region, "ca_pem": ca},
            "access_key_id": seal(&s3.access_key)?,
            "secret_access_key": seal(&s3.secret_key)?,
        }),
    )
    .await?;

    eprintln!("== pgbench -i -s {}", args.scale);
    let t = Instant::now();
    let st = Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args(["-i", "-q", "-s", &args.scale.to_string(), "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", "dbaas", "app"])
        .env("PGPASSWORD", password.expose())
        .status()
        .context("pgbench (postgresql-15)")?;
    if !st.success() {
        bail!("pgbench -i failed");
    }
    eprintln!("   loaded in {:.1} s", t.elapsed().as_secs_f64());

    let conf = root.join("conf").join("pgbackrest.conf");
    let direct = || -> Result<f64> {
        let t = Instant::now();
        let o = Command::new("docker")
            .env("DOCKER_HOST", engine.docker_host())
            .args(["run", "--rm", "--network", "host", "--user", "999:999"])
            .arg("-v")
            .arg(format!("{0}:{0}", root.display()))
            .arg(&engine.postgres_image)
            .arg("pgbackrest")
            .arg(format!("--config={}", conf.display()))
            .args(["--stanza=db", "--type=full", "backup"])
            .output()
            .context("docker run")?;
        if !o.status.success() {
            bail!(
                "direct pgbackrest backup failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(t.elapsed().as_secs_f64())
    };
    // One untimed backup of each kind first: caches and the repository warm.
    send(&rig, "backup.run", json!({"type": "full"})).await?;
    direct()?;

    let (mut agent_s, mut direct_s, mut size_mb) = (Vec::new(), Vec::new(), 0);
    for i in 0..args.pairs {
        let t = Instant::now();
        let out = send(&rig, "backup.run", json!({"type": "full"})).await?;
        let a = t.elapsed().as_secs_f64();
        let d = direct()?;
        size_mb = out["size_bytes"].as_u64().unwrap_or(0) / 1_000_000;
        println!(
            "pair {}: agent {a:.2} s (signed backup.run through the broker, waited), direct {d:.2} s (docker run … pgbackrest backup), ratio {:.3}",
            i + 1,
            a / d
        );
        agent_s.push(a);
        direct_s.push(d);
    }
    let (ma, md) = (median(agent_s), median(direct_s));
    let ratio = ma / md;
    let hwm_mib = vm_hwm_kib(rig.agent.proc.pid()).map(|k| k as f64 / 1024.0);
    let size_mib = std::fs::metadata(&bins.agent)
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(f64::NAN);
    let ratio_ok = ratio <= args.target_ratio;
    let rss_ok = hwm_mib.is_some_and(|h| h < 64.0);
    let size_ok = size_mib < 25.0;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "database: pgbench -s {} ({size_mb} MB backed up per full backup)",
        args.scale
    );
    println!(
        "full backup, median of {}: agent {ma:.2} s vs direct {md:.2} s: ratio {ratio:.3} (target ≤ {}) {}",
        args.pairs,
        args.target_ratio,
        verdict(ratio_ok)
    );
    println!(
        "agent peak RSS (VmHWM, whole run): {} MiB (target < 64) {}",
        hwm_mib.map_or("?".into(), |h| format!("{h:.1}")),
        verdict(rss_ok)
    );
    println!(
        "static agent: {size_mib:.1} MiB (target < 25) {}",
        verdict(size_ok)
    );
    Ok(ratio_ok && rss_ok && size_ok)
}
