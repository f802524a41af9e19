//! `backup-bench`: an agent-driven pgBackRest full backup — a signed `backup.run` through
//! the broker, waited for — against the same `pgbackrest backup --type=full` run directly
//! in a one-shot container of the database's image on the same data, interleaved in
//! pairs, on a `pgbench -i -s SCALE` database; plus the agent's peak memory and the
//! static agent's size. Then the point-in-time restore of that database: a signed
//! `db.restore` to a new agent, waited for, against `pgbackrest restore --type=time` and
//! PostgreSQL's recovery to the same target run directly, interleaved. Real broker, real
//! agents, the test harness's S3 server (s3s-fs behind stunnel) and private Docker engine
//! (see run.sh).
//!
//! `--engine mariadb` measures MariaDB's streamed backup instead ([`mariadb`]).

mod mariadb;

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

/// The database the bench backs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DbEngine {
    /// pgBackRest, agent-driven against direct; then point-in-time restores.
    Postgres,
    /// mariabackup streamed to S3 by the agent against `mariadb-backup --stream | zstd`
    /// to a local file.
    Mariadb,
}

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[arg(long, value_enum, default_value_t = DbEngine::Postgres)]
    engine: DbEngine,
    /// `pgbench -i -s SCALE` (100 ≈ 1.5 GB); for MariaDB, SCALE × 100,000 rows in
    /// pgbench_accounts' shape (100 ≈ 1.4 GB).
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
    /// Interleaved restore pairs (a signed db.restore to a point in time on a new agent,
    /// against pgbackrest restore + PostgreSQL's recovery run directly); 0 skips them.
    #[arg(long, default_value_t = 3)]
    restore_pairs: usize,
    /// Target for the median restore ratio agent / direct.
    #[arg(long, default_value_t = 1.10)]
    target_restore_ratio: f64,
    /// MariaDB: target for the median throughput ratio agent / direct.
    #[arg(long, default_value_t = 0.80)]
    target_throughput: f64,
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
        json!({"engine": match args.engine {
            DbEngine::Postgres => "postgres",
            DbEngine::Mariadb => "mariadb",
        }, "database": "app", "port": port}),
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
    if args.engine == DbEngine::Mariadb {
        let db = mariadb::Db {
            rig: &rig,
            s3_dir: &s3.dir,
            engine: &engine,
            root: &root,
            container: &rig.container,
        };
        let ok = mariadb::bench(&args, &db).await?;
        return Ok(ok && static_size_ok(&bins));
    }

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
    let restore = if args.restore_pairs > 0 {
        Some(
            restore_pairs(
                &rig,
                &bins,
                &engine,
                &s3,
                &ca,
                &root,
                port,
                password.expose(),
                args.restore_pairs,
            )
            .await?,
        )
    } else {
        None
    };
    let ratio_ok = ratio <= args.target_ratio;
    let rss_ok = hwm_mib.is_some_and(|h| h < 64.0);
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
    let size_ok = static_size_ok(&bins);
    let restore_ok = match restore {
        Some((ra, rd, rss)) => {
            let r = ra / rd;
            let ok = r <= args.target_restore_ratio && rss < 64.0;
            println!(
                "point-in-time restore, median of {}: agent {ra:.2} s vs direct {rd:.2} s: ratio {r:.3} (target ≤ {}) {}; restoring agent's peak RSS {rss:.1} MiB (target < 64) {}",
                args.restore_pairs,
                args.target_restore_ratio,
                verdict(r <= args.target_restore_ratio),
                verdict(rss < 64.0)
            );
            ok
        }
        None => true,
    };
    Ok(ratio_ok && rss_ok && size_ok && restore_ok)
}

/// Prints the static agent's size; whether it is under its target.
fn static_size_ok(bins: &Bins) -> bool {
    let size_mib = std::fs::metadata(&bins.agent)
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(f64::NAN);
    let ok = size_mib < 25.0;
    println!(
        "static agent: {size_mib:.1} MiB (target < 25) {}",
        if ok { "met" } else { "MISSED" }
    );
    ok
}

fn docker(engine: &dbvm_e2e::docker::Engine) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", engine.docker_host());
    c
}

/// Writes for a while, takes the target time, writes more, archives it all; then
/// interleaves restores to that target. Returns the medians (agent, direct) in seconds
/// and the restoring agents' highest peak RSS in MiB.
#[allow(clippy::too_many_arguments)]
async fn restore_pairs(
    rig: &Rig,
    bins: &Bins,
    engine: &dbvm_e2e::docker::Engine,
    s3: &S3Server,
    ca: &str,
    root: &std::path::Path,
    port: u16,
    password: &str,
    pairs: usize,
) -> Result<(f64, f64, f64)> {
    let pgbench = |secs: &str| -> Result<()> {
        let st = Command::new("/usr/lib/postgresql/15/bin/pgbench")
            .args(["-n", "-c", "2", "-T", secs, "-h", "127.0.0.1"])
            .args(["-p", &port.to_string(), "-U", "dbaas", "app"])
            .env("PGPASSWORD", password)
            .stdout(std::process::Stdio::null())
            .status()
            .context("pgbench")?;
        if !st.success() {
            bail!("pgbench failed");
        }
        Ok(())
    };
    let psql_super = |sql: &str| -> Result<String> {
        let o = Command::new("psql")
            .arg("-h")
            .arg(root.join("run"))
            .args([
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .output()
            .context("psql")?;
        if !o.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    eprintln!("== pgbench writes, the target, more writes");
    pgbench("10")?;
    std::thread::sleep(Duration::from_millis(1100));
    let target = psql_super(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
    )?;
    std::thread::sleep(Duration::from_millis(1100));
    pgbench("5")?;
    let seg = psql_super("SELECT pg_walfile_name(pg_switch_wal())")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while psql_super("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")? < seg {
        if Instant::now() > deadline {
            bail!("WAL {seg} was not archived within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let pg_target = target.replace('T', " ").replace('Z', "+00");
    eprintln!("   target {target}");

    let conf = root.join("conf").join("pgbackrest.conf");
    let direct = |i: usize| -> Result<f64> {
        let dir = rig.fleet.path(&format!("direct-restore-{i}"));
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(999), Some(999))?;
        let name = dbvm_e2e::docker::unique_name("bench-direct");
        let t = Instant::now();
        let o = docker(engine)
            .args(["run", "--rm", "--network", "host", "--user", "999:999"])
            .arg("-v")
            .arg(format!("{0}:{0}", root.display()))
            .arg("-v")
            .arg(format!("{0}:{0}", dir.display()))
            .arg(&engine.postgres_image)
            .arg("pgbackrest")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--pg1-path={}", dir.display()))
            .args(["--stanza=db", "--type=time", "--target-action=promote"])
            .arg(format!("--target={pg_target}"))
            .arg("restore")
            .output()
            .context("docker run pgbackrest restore")?;
        if !o.status.success() {
            bail!(
                "direct restore failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let rport = dbvm_e2e::docker::free_port();
        let st = docker(engine)
            .args([
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                "host",
                "--user",
                "999:999",
            ])
            .arg("-v")
            .arg(format!("{0}:{0}", root.display()))
            .arg("-v")
            .arg(format!("{0}:{0}", dir.display()))
            .arg(&engine.postgres_image)
            .args(["postgres", "-D"])
            .arg(&dir)
            .args([
                "-c",
                &format!("port={rport}"),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "archive_mode=off", "-c", "logging_collector=off"])
            .stdout(std::process::Stdio::null())
            .status()
            .context("docker run postgres")?;
        if !st.success() {
            bail!("cannot start PostgreSQL on the restored directory");
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        let done = loop {
            let o = docker(engine).args(["logs", &name]).output()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if text.contains("database system is ready to accept connections") {
                break t.elapsed().as_secs_f64();
            }
            if text.contains("FATAL") || Instant::now() > deadline {
                let _ = docker(engine).args(["rm", "-f", &name]).output();
                bail!("the directly restored PostgreSQL did not come up:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = docker(engine).args(["rm", "-f", &name]).output();
        let _ = std::fs::remove_dir_all(&dir);
        Ok(done)
    };
    let mut agent_s = Vec::new();
    let mut direct_s = Vec::new();
    let mut peak = 0.0f64;
    for i in 0..pairs {
        let id = format!("bench-rs{i}");
        let container = dbvm_e2e::docker::unique_name("bench-rs");
        let rroot = rig.fleet.path(&format!("{id}-db"));
        let sections = engine.database_section(&rroot, &container, 10, "");
        let agent = rig.add_agent(bins, &id, &sections, "info").await?;
        let view = rig.client.agent(&id).await.context("agent")?;
        let key = dbvm_protocol::seal::parse_public_key(
            view.sealing_key.as_deref().context("no sealing key")?,
        )
        .context("sealing key")?;
        let seal = |s: &str| Sealed::seal(&key, s).map_err(|e| anyhow::anyhow!("seal: {e}"));
        let args = json!({
            "spec": {"engine": "postgres", "database": "app", "port": dbvm_e2e::docker::free_port()},
            "source": {"endpoint": s3.endpoint_url(), "bucket": "bkp", "region": s3.region, "prefix": AGENT_ID, "ca_pem": ca},
            "access_key_id": seal(&s3.access_key)?,
            "secret_access_key": seal(&s3.secret_key)?,
            "target": target,
        });
        let t = Instant::now();
        let cmd = rig.fleet.sign(&id, "db.restore", args);
        let v = rig.client.submit(&cmd).await.context("submit")?;
        let v = rig
            .client
            .wait(v.id, Duration::from_secs(3600))
            .await
            .context("wait")?;
        let a = t.elapsed().as_secs_f64();
        if v.state != CommandState::Succeeded {
            bail!(
                "db.restore did not succeed: {:?}\n{}",
                v.error,
                agent.proc.log_tail()
            );
        }
        peak = peak.max(vm_hwm_kib(agent.proc.pid()).map_or(0.0, |k| k as f64 / 1024.0));
        let mut agent = agent;
        agent.proc.kill();
        engine.remove_container(&container);
        let _ = std::fs::remove_dir_all(&rroot);
        let d = direct(i)?;
        println!(
            "restore pair {}: agent {a:.2} s (signed db.restore on a new agent, waited: restore, recovery to {target}, users), direct {d:.2} s (pgbackrest restore --type=time, then PostgreSQL until it accepts connections), ratio {:.3}",
            i + 1,
            a / d
        );
        agent_s.push(a);
        direct_s.push(d);
    }
    Ok((median(agent_s), median(direct_s), peak))
}
