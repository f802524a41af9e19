//! The MariaDB part of `backup-bench` (`--engine mariadb`): a full backup streamed to S3 by
//! the agent — a signed `backup.run {"type":"full"}` through the broker, waited for:
//! `mariadb-backup --stream=xbstream | zstd -3 -T2` in a one-shot container writing into a
//! FIFO that the agent reads into a multipart upload — against the same pipeline run
//! directly in a one-shot container of the same image on the same data directory, into a
//! local file. Interleaved in pairs on a table shaped like pgbench's `pgbench_accounts`
//! (`SCALE` × 100,000 rows; 100 ≈ 1.4 GB on disk), with the agent's peak RSS over the
//! timed backups.

use crate::{docker, median, send, vm_hwm_kib, Args};
use anyhow::{bail, Context, Result};
use dbvm_e2e::release::Rig;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Rows per `INSERT … SELECT` while loading: one transaction each, so no undo log grows
/// to the size of the table.
const CHUNK: u64 = 1_000_000;

/// Where the bench runs its own commands: the agent's data root and database container.
pub struct Db<'a> {
    pub rig: &'a Rig,
    /// The S3 server's directory: its processes (s3s-fs, stunnel) name it.
    pub s3_dir: &'a Path,
    pub engine: &'a dbvm_e2e::docker::Engine,
    pub root: &'a Path,
    pub container: &'a str,
}

impl Db<'_> {
    fn socket(&self) -> PathBuf {
        self.root.join("run").join("mysqld.sock")
    }

    /// SQL through the `mariadb` client in the database's container, as the `mysql` OS
    /// user over the socket (unix_socket authentication; `backup.configure` made the
    /// account): no password anywhere.
    fn sql(&self, sql: &str) -> Result<String> {
        let o = docker(self.engine)
            .args(["exec", "--user", "999:999", self.container, "mariadb"])
            .args(["--user=mysql", "--batch", "--skip-column-names"])
            .arg(format!("--socket={}", self.socket().display()))
            .args(["app", "-e", sql])
            .output()
            .context("docker exec mariadb")?;
        if !o.status.success() {
            bail!("{sql}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// `accounts` like pgbench's `pgbench_accounts` at `scale` (100,000 rows a unit), its
    /// filler an MD5 in hex then blanks (pgbench's is all blanks, which no real table is:
    /// this one compresses about as a real one does). Not written to the binlog: the load
    /// is not what is measured, and the binlog uploader would carry it during the pairs.
    fn load(&self, scale: u32) -> Result<()> {
        self.sql(
            "CREATE TABLE accounts (aid INT NOT NULL PRIMARY KEY, bid INT NOT NULL, \
             abalance INT NOT NULL, filler CHAR(84) NOT NULL) ENGINE=InnoDB",
        )?;
        let rows = u64::from(scale) * 100_000;
        let mut done = 0;
        while done < rows {
            let n = CHUNK.min(rows - done);
            self.sql(&format!(
                "SET SESSION sql_log_bin = 0; \
                 INSERT INTO accounts SELECT seq + {done}, (seq + {done} - 1) DIV 100000 + 1, 0, \
                 CONCAT(MD5(seq + {done}), REPEAT(' ', 52)) FROM seq_1_to_{n}"
            ))?;
            done += n;
        }
        Ok(())
    }

    /// The `sh -c` script the agent's backup container runs (mariabackup.rs,
    /// `backup_argv`, full backup), writing to `out` instead of the agent's FIFO and
    /// keeping its checkpoints in its own `lsndir`; then the shell's `times` (the CPU
    /// its children, mariabackup and zstd, used: [`children_cpu_s`]), once all is done.
    fn script(&self, lsndir: &Path, out: &str) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        format!(
            "set -o pipefail; mkdir -p {lsn} && 'mariadb-backup' {cnf} --backup --stream=xbstream \
             --user=mysql {sock} {target} {extra} | {out} && echo 'dbvm: stream done'; times",
            lsn = q(&lsndir.display().to_string()),
            cnf = q(&format!(
                "--defaults-file={}",
                self.root.join("conf").join("my.cnf").display()
            )),
            sock = q(&format!("--socket={}", self.socket().display())),
            target = q(&format!("--target-dir={}", lsndir.display())),
            extra = q(&format!("--extra-lsndir={}", lsndir.display())),
        )
    }

    /// Runs `script` in a one-shot container of the database's image as the database
    /// user, with the data root and `dir` mounted at their own paths (what the agent's
    /// `run_tool` does; the agent's has no CPU or memory limit either, as the database
    /// was created without one). Returns its stdout.
    fn one_shot(&self, dir: &Path, script: &str) -> Result<String> {
        let o = docker(self.engine)
            .args(["run", "--rm", "--network", "host", "--user", "999:999"])
            .args(["-e", "TZ=UTC", "-v"])
            .arg(format!("{0}:{0}", self.root.display()))
            .arg("-v")
            .arg(format!("{0}:{0}", dir.display()))
            .arg(&self.engine.mariadb_image)
            .args(["sh", "-c", script])
            .output()
            .context("docker run")?;
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() || !stdout.contains("dbvm: stream done") {
            let err = String::from_utf8_lossy(&o.stderr);
            let lines: Vec<&str> = err.lines().collect();
            bail!(
                "the direct backup failed ({}):\n{}",
                o.status,
                lines[lines.len().saturating_sub(10)..].join("\n")
            );
        }
        Ok(stdout)
    }
}

/// The children's user + system CPU seconds from the second line of `times` (`0m5.120000s
/// 0m1.030000s`).
fn children_cpu_s(stdout: &str) -> Option<f64> {
    let line = stdout.lines().next_back()?;
    let mut total = 0.0;
    for t in line.split_whitespace() {
        let (m, s) = t.strip_suffix('s')?.split_once('m')?;
        total += m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?;
    }
    Some(total)
}

/// The data directory's files in bytes (apparent sizes), without the binlogs (which
/// mariabackup does not copy).
fn data_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let md = e.metadata()?;
        if md.is_dir() {
            total += data_bytes(&e.path())?;
        } else if !e.file_name().to_string_lossy().starts_with("binlog.") {
            total += md.len();
        }
    }
    Ok(total)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (`clear_refs` 5).
fn reset_hwm(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("reset the peak RSS of {pid}"))
}

/// CPU time of a process in seconds, user and system, its exited threads included
/// (`/proc/<pid>/stat`, 10 ms ticks: the per-thread `schedstat` loses the threads that
/// ended, such as the S3 server's per-connection ones); 0 once it is gone.
fn cpu_s(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// The processes whose command line names `dir` (the S3 server's s3s-fs and stunnel).
fn pids_naming(dir: &Path) -> Vec<(String, u32)> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push((name.trim().to_string(), pid));
        }
    }
    out
}

/// The machine's busy and total CPU time (`/proc/stat`, 10 ms ticks), to say how much of the
/// two cores everything else on the machine took meanwhile.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds of each watched process and of the machine over a stretch of time.
struct CpuWatch {
    pids: Vec<(String, u32)>,
    start: Vec<f64>,
    machine: (u64, u64),
}

impl CpuWatch {
    fn start(pids: &[(String, u32)]) -> Self {
        Self {
            pids: pids.to_vec(),
            start: pids.iter().map(|(_, p)| cpu_s(*p)).collect(),
            machine: machine_ticks(),
        }
    }

    /// `name seconds` per process, then the whole machine's busy seconds and share of its
    /// cores.
    fn report(&self) -> String {
        let mut parts: Vec<String> = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((n, p), s0)| format!("{n} {:.2}", cpu_s(*p) - s0))
            .collect();
        let (b1, t1) = machine_ticks();
        let (b0, t0) = self.machine;
        parts.push(format!(
            "whole machine {:.2} ({:.0}% of its cores)",
            (b1 - b0) as f64 / 100.0,
            100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64
        ));
        parts.join(", ")
    }
}

fn mb_s(bytes: u64, s: f64) -> f64 {
    bytes as f64 / 1e6 / s
}

/// Loads the database, then the interleaved pairs; prints the figures. Whether every
/// target was met.
pub async fn bench(args: &Args, db: &Db<'_>) -> Result<bool> {
    let rows = u64::from(args.scale) * 100_000;
    eprintln!(
        "== loading {rows} rows (pgbench_accounts' shape, scale {})",
        args.scale
    );
    let t = Instant::now();
    db.load(args.scale)?;
    let data_dir = db.root.join("data");
    let data = data_bytes(&data_dir)?;
    let table = std::fs::metadata(data_dir.join("app").join("accounts.ibd"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "   loaded in {:.1} s: data directory {:.2} GB (accounts.ibd {:.2} GB)",
        t.elapsed().as_secs_f64(),
        data as f64 / 1e9,
        table as f64 / 1e9
    );

    let out_dir = db.rig.fleet.path("direct-out");
    std::fs::create_dir_all(&out_dir)?;
    std::os::unix::fs::chown(&out_dir, Some(999), Some(999))?;
    let out = out_dir.join("full.xbs.zst");
    let lsndir = db.root.join("run").join("direct-lsn");
    // The xbstream's own size (untimed): the bytes mariabackup reads and emits, before
    // zstd; the throughputs are of these bytes.
    let counted = db.one_shot(&out_dir, &db.script(&lsndir, "wc -c"))?;
    let stream: u64 = counted
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("wc -c printed no count")?;
    let direct = || -> Result<(f64, u64, f64)> {
        let _ = std::fs::remove_file(&out);
        let script = db.script(&lsndir, &format!("'zstd' -3 -T2 -q > '{}'", out.display()));
        let t = Instant::now();
        let stdout = db.one_shot(&out_dir, &script)?;
        let s = t.elapsed().as_secs_f64();
        let cpu = children_cpu_s(&stdout).unwrap_or(f64::NAN);
        Ok((s, std::fs::metadata(&out)?.len(), cpu))
    };
    // The same, but into a FIFO that a host process (`cat > file`) reads, as the agent
    // reads its FIFO: what the FIFO between the container and the host costs by itself.
    let via_fifo = || -> Result<f64> {
        let fifo = out_dir.join("stream");
        let _ = std::fs::remove_file(&fifo);
        let _ = std::fs::remove_file(&out);
        let st = Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .context("mkfifo")?;
        if !st.success() {
            bail!("mkfifo {} failed", fifo.display());
        }
        std::os::unix::fs::chown(&fifo, Some(999), Some(999))?;
        let file = std::fs::File::create(&out)?;
        let mut cat = Command::new("cat")
            .arg(&fifo)
            .stdout(file)
            .spawn()
            .context("cat")?;
        let script = db.script(&lsndir, &format!("'zstd' -3 -T2 -q > '{}'", fifo.display()));
        let t = Instant::now();
        let r = db.one_shot(&out_dir, &script);
        if r.is_err() {
            // Its writer may never have come: it would wait on the FIFO forever.
            let _ = cat.kill();
        }
        let st = cat.wait().context("wait for cat")?;
        let s = t.elapsed().as_secs_f64();
        r?;
        if !st.success() {
            bail!("cat {} failed", fifo.display());
        }
        let _ = std::fs::remove_file(&fifo);
        Ok(s)
    };
    // A container that does nothing, for the share of container start in each side.
    let empty = || -> Result<f64> {
        let t = Instant::now();
        let st = docker(db.engine)
            .args(["run", "--rm", "--network", "host", "--user", "999:999"])
            .args([&db.engine.mariadb_image, "true"])
            .status()
            .context("docker run true")?;
        if !st.success() {
            bail!("docker run … true failed");
        }
        Ok(t.elapsed().as_secs_f64())
    };

    // One untimed backup of each kind first: caches and the bucket warm.
    send(db.rig, "backup.run", json!({"type": "full"})).await?;
    direct()?;

    let pid = db.rig.agent.proc.pid();
    let mut watched = vec![("agent".to_string(), pid)];
    watched.extend(pids_naming(db.s3_dir));
    reset_hwm(pid)?;
    let (mut ratios, mut agent_s, mut direct_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut stored, mut local, mut starts, mut fifo_s) = (0, 0, Vec::new(), Vec::new());
    for i in 0..args.pairs {
        let cpu = CpuWatch::start(&watched);
        let t = Instant::now();
        let o = send(db.rig, "backup.run", json!({"type": "full"})).await?;
        let a = t.elapsed().as_secs_f64();
        let agent_cpu = cpu.report();
        if o["type"] != "full" {
            bail!(
                "backup.run made a {} backup, not a full one: {o}",
                o["type"]
            );
        }
        let cpu = CpuWatch::start(&[]);
        let (d, size, tool_cpu) = direct()?;
        let direct_cpu = format!("mariabackup + zstd {tool_cpu:.2}, {}", cpu.report());
        let f = via_fifo()?;
        let e = empty()?;
        stored = o["size_bytes"].as_u64().unwrap_or(0);
        local = size;
        let ms = |k: &str| o[k].as_u64().unwrap_or(0) as f64 / 1000.0;
        println!(
            "pair {}: agent {a:.2} s = {:.0} MB/s (agent's own took {:.2} s: container {:.2} s, upload after the stream {:.2} s; {:.0} MB stored), direct {d:.2} s = {:.0} MB/s ({:.0} MB file), ratio agent/direct throughput {:.3}; direct into a FIFO read by `cat > file` on the host {f:.2} s; empty container {e:.2} s\n  CPU s during the agent's: {agent_cpu}; during the direct: {direct_cpu}",
            i + 1,
            mb_s(stream, a),
            ms("took_ms"),
            ms("container_ms"),
            ms("upload_tail_ms"),
            stored as f64 / 1e6,
            mb_s(stream, d),
            size as f64 / 1e6,
            d / a
        );
        ratios.push(d / a);
        agent_s.push(a);
        direct_s.push(d);
        starts.push(e);
        fifo_s.push(f);
    }
    let hwm = vm_hwm_kib(pid).map(|k| k as f64 / 1024.0);
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(0.0, f64::max);
    let (ratio, ma, md) = (median(ratios), median(agent_s), median(direct_s));
    let ratio_ok = ratio >= args.target_throughput;
    let rss_ok = hwm.is_some_and(|h| h < 64.0);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "database: {rows} rows in pgbench_accounts' shape; data directory {:.2} GB without binlogs (accounts.ibd {:.2} GB); xbstream {:.2} GB; zstd -3 to {:.0} MB (agent's object) / {:.0} MB (direct file)",
        data as f64 / 1e9,
        table as f64 / 1e9,
        stream as f64 / 1e9,
        stored as f64 / 1e6,
        local as f64 / 1e6,
    );
    println!(
        "full backup, median of {}: agent {ma:.2} s = {:.0} MB/s vs direct {md:.2} s = {:.0} MB/s of data (the xbstream's bytes); throughput ratio agent/direct {ratio:.3} (min {min:.3}, max {max:.3}; target ≥ {}) {}",
        args.pairs,
        mb_s(stream, ma),
        mb_s(stream, md),
        args.target_throughput,
        verdict(ratio_ok)
    );
    let mf = median(fifo_s);
    println!(
        "where the time goes: the direct pipeline into a FIFO read on the host (cat > file), median {mf:.2} s = {:.0} MB/s (FIFO alone: {:.3} of direct's throughput); an empty container of the image (docker run --rm … true), median {:.2} s",
        mb_s(stream, mf),
        md / mf,
        median(starts)
    );
    println!(
        "agent peak RSS (VmHWM, reset before the timed backups): {} MiB (target < 64) {}",
        hwm.map_or("?".into(), |h| format!("{h:.1}")),
        verdict(rss_ok)
    );
    let _ = std::fs::remove_file(&out);
    Ok(ratio_ok && rss_ok)
}
