//! The whole way of a bundle, end to end: a signed `bundle.collect` to the release agent
//! through the release broker, the agent writing the bundle while it uploads it, then the
//! download at the control plane checked against both SHA-256s (`dbvmctl::bundle::fetch`,
//! what `dbvmctl bundle` runs), timed from the submission to the checked file; against
//! `tar -I 'zstd -3' -cf` of the same files, interleaved in pairs. Meanwhile signed `ping`s
//! to the same agent, one every [`PING_EVERY`] (a control plane's pace, not a flood that
//! would itself take the CPU the bundle needs), against the same pings while it is idle;
//! and the agent's resident memory sampled every 50 ms.

use crate::median;
use anyhow::{bail, Context, Result};
use dbvm_e2e::release::{Bins, Spec};
use dbvm_e2e::Fleet;
use dbvm_protocol::api::CommandState;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The pace of the pings, idle and while a bundle streams.
const PING_EVERY: Duration = Duration::from_millis(50);

pub struct E2eArgs {
    pub logs: PathBuf,
    pub pairs: usize,
    pub idle_pings: usize,
    pub agent_bin: PathBuf,
    pub broker_bin: PathBuf,
    /// Keep the fleet's directory (configs, logs) at the end.
    pub keep_dir: bool,
}

/// The targets of issue 14: the whole way at most 1.2 × tar | zstd -3, the agent under
/// 64 MiB, pings while a bundle streams within 2 × their idle p99.
pub fn passes(r: &E2eReport) -> bool {
    r.median_ratio <= 1.2
        && r.agent_peak_rss_mib < 64.0
        && r.ping_streaming_ms.p99 <= 2.0 * r.ping_idle_ms.p99
}

#[derive(Debug, serde::Serialize)]
pub struct E2eReport {
    pub input_bytes: u64,
    /// Seconds per pair: (bundle through the broker to the checked file, tar | zstd -3).
    pub pairs: Vec<(f64, f64)>,
    pub median_ratio: f64,
    pub bundle_bytes: u64,
    pub tar_bytes: u64,
    pub agent_peak_rss_mib: f64,
    pub agent_idle_rss_mib: f64,
    pub ping_idle_ms: Percentiles,
    /// Pings sent while the agent wrote and uploaded its bundle (before the command was
    /// seen finished): the target's window.
    pub ping_streaming_ms: Percentiles,
    /// Pings sent while the bundle was downloaded and checked here, after the agent
    /// was done: what a download costs the broker's other work.
    pub ping_download_ms: Percentiles,
    /// The five slowest pings of either window, and where their time went.
    pub slowest_pings: Vec<Ping>,
    /// CPU seconds per pair (medians): where the whole way's CPU goes, beside tar's.
    pub cpu: CpuReport,
}

/// CPU time (user + system, s) of each side, the median of the pairs.
#[derive(Debug, Default, serde::Serialize)]
pub struct CpuReport {
    /// The agent, from the submission to the checked file (idle pings' share included).
    pub agent: f64,
    /// The broker, over the same time.
    pub broker: f64,
    /// This process: the pings, the download and its check.
    pub bench: f64,
    /// `tar -I 'zstd -3'` (tar and zstd).
    pub tar: f64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Percentiles {
        n: v.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One signed ping's round trip (ms) and where its time went.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Ping {
    pub ms: f64,
    /// Sent to accepted: the submission's HTTP request and the broker's commit of it.
    pub submit_ms: i64,
    /// Accepted to handed to the agent's link (the broker's clock).
    pub queued_ms: i64,
    /// Handed to the agent to the broker's record of its result: the agent's journal,
    /// its run, the result's way back.
    pub agent_ms: i64,
    /// The result recorded to the answer here: the broker's commit and the long poll.
    pub answer_ms: i64,
    /// When it was sent, from its pair's submission of the bundle (s).
    pub at_s: f64,
    /// When that pair's bundle was seen finished by the agent, from the same start (s):
    /// a ping after it ran while the download and its check did.
    pub finished_s: f64,
}

async fn ping(fleet: &Fleet, client: &dbvmctl::Client, agent: &str) -> Result<Ping> {
    let started = Instant::now();
    let sent_ms = dbvm_protocol::now_ms();
    let v = client
        .submit(&fleet.sign(agent, "ping", json!({})))
        .await
        .context("submit a ping")?;
    let accepted_ms = dbvm_protocol::now_ms();
    let v = client.wait(v.id, Duration::from_secs(30)).await?;
    if v.state != CommandState::Succeeded {
        bail!("a ping did not succeed: {v:?}");
    }
    let answered_ms = dbvm_protocol::now_ms();
    let delivered = v.delivered_at_ms.unwrap_or(v.submitted_at_ms);
    let finished = v.finished_at_ms.unwrap_or(answered_ms);
    Ok(Ping {
        ms: started.elapsed().as_secs_f64() * 1000.0,
        submit_ms: accepted_ms - sent_ms,
        queued_ms: delivered - v.submitted_at_ms,
        agent_ms: finished - delivered,
        answer_ms: answered_ms - finished,
        at_s: 0.0,
        finished_s: 0.0,
    })
}

fn tar_zstd(logs: &Path, out: &Path) -> Result<f64> {
    let _ = std::fs::remove_file(out);
    let started = Instant::now();
    let status = std::process::Command::new("tar")
        .args(["-I", "zstd -3", "-cf"])
        .arg(out)
        .arg("-C")
        .arg(logs)
        .arg(".")
        .status()
        .context("run tar")?;
    if !status.success() {
        bail!("tar -I 'zstd -3' failed: {status}");
    }
    Ok(started.elapsed().as_secs_f64())
}

pub async fn run(args: E2eArgs) -> Result<E2eReport> {
    let fleet = Fleet::new();
    let bins = Bins {
        agent: args.agent_bin.clone(),
        broker: args.broker_bin.clone(),
    };
    let sections = format!(
        "[health]\nmetrics_listen = \"\"\n[bundle]\nlog_dir = {}\n",
        dbvm_e2e::fleet::toml_path(&args.logs)
    );
    let spec = Spec {
        agent_id: "bench-bundle",
        sections,
        container: String::new(),
        log_level: "info",
        keep_dir: false,
    };
    let (broker, agent, client) = dbvm_e2e::release::start_processes(&fleet, &bins, &spec).await?;
    let pid = agent.proc.pid();
    let input_bytes: u64 = std::fs::read_dir(&args.logs)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();

    // Idle pings first (the agent has settled after its first health run).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid, "VmRSS:");
    let mut idle = Vec::new();
    let mut tick = tokio::time::interval(PING_EVERY);
    for _ in 0..args.idle_pings {
        tick.tick().await;
        idle.push(ping(&fleet, &client, "bench-bundle").await?.ms);
    }

    let out_dir = tempfile::tempdir()?;
    let tar_out = out_dir.path().join("tar.tar.zst");
    let mut pairs = Vec::new();
    let mut streaming = Vec::new();
    let mut peak = 0u64;
    let mut bundle_bytes = 0;
    let (broker_pid, agent_pid) = (broker.proc.pid().to_string(), pid.to_string());
    let own = |p: &str| crate::cpu_s(p, 14).unwrap_or(0.0);
    let mut cpu: [Vec<f64>; 4] = Default::default();
    for pair in 0..args.pairs {
        // The bundle through the broker to the checked file.
        let dest = out_dir.path().join(format!("bundle-{pair}.tar.zst"));
        let done = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (done, peak_kib) = (done.clone(), peak_kib.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    peak_kib.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let cpu_before = [own(&agent_pid), own(&broker_pid), own("self")];
        let started = Instant::now();
        let cmd = fleet.sign(
            "bench-bundle",
            "bundle.collect",
            json!({"hours": 1, "max_bytes": 16u64 << 30, "broker_url": broker.api_url()}),
        );
        let v = client.submit(&cmd).await.context("submit the bundle")?;
        let seen_finished = AtomicU64::new(f64::INFINITY.to_bits());
        let pings = async {
            let mut lat = Vec::new();
            let mut tick = tokio::time::interval(PING_EVERY);
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let at_s = started.elapsed().as_secs_f64();
                match ping(&fleet, &client, "bench-bundle").await {
                    Ok(p) => lat.push(Ping { at_s, ..p }),
                    Err(_) => break,
                }
            }
            lat
        };
        let bundle = async {
            let r = async {
                let v = client.wait(v.id, Duration::from_secs(1800)).await?;
                let out = match (v.state, v.output) {
                    (CommandState::Succeeded, Some(o)) => o,
                    (state, _) => bail!("the bundle did not succeed: {state:?} {:?}", v.error),
                };
                let waited = started.elapsed().as_secs_f64();
                seen_finished.store(waited.to_bits(), Ordering::Relaxed);
                let got =
                    dbvmctl::bundle::fetch(&client, v.id, &dest, out["sha256"].as_str(), |_, _| {})
                        .await
                        .context("fetch the bundle")?;
                eprintln!(
                    "  the agent's command: {} ms on the agent, {} ms submitted to finished; \
                     result seen after {waited:.2} s; fetched and checked after {:.2} s",
                    out["total_ms"],
                    v.finished_at_ms.unwrap_or(0) - v.submitted_at_ms,
                    started.elapsed().as_secs_f64()
                );
                Ok((v.id, got, started.elapsed().as_secs_f64()))
            }
            .await;
            done.store(true, Ordering::Relaxed);
            r
        };
        let (lat, fetched) = tokio::join!(pings, bundle);
        let (id, got, bundle_s) = fetched?;
        let cpu_after = [own(&agent_pid), own(&broker_pid), own("self")];
        for i in 0..3 {
            cpu[i].push(cpu_after[i] - cpu_before[i]);
        }
        let _ = sampler.await;
        let finished_s = f64::from_bits(seen_finished.load(Ordering::Relaxed));
        streaming.extend(lat.into_iter().map(|p| Ping { finished_s, ..p }));
        peak = peak.max(peak_kib.load(Ordering::Relaxed));
        bundle_bytes = got.bytes;
        client.delete_bundle(id).await.ok();
        let _ = std::fs::remove_file(&dest);

        let tar_cpu = crate::cpu_s("self", 16)?;
        let tar_s = tar_zstd(&args.logs, &tar_out)?;
        cpu[3].push(crate::cpu_s("self", 16)? - tar_cpu);
        eprintln!(
            "pair {}: bundle to the checked file {bundle_s:.2} s, tar | zstd -3 {tar_s:.2} s, ratio {:.3}",
            pair + 1,
            bundle_s / tar_s
        );
        pairs.push((bundle_s, tar_s));
    }
    let mut slowest = streaming.clone();
    slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    slowest.truncate(5);
    let (streaming, downloading): (Vec<Ping>, Vec<Ping>) =
        streaming.into_iter().partition(|p| p.at_s < p.finished_s);
    let streaming: Vec<f64> = streaming.iter().map(|p| p.ms).collect();
    let downloading: Vec<f64> = downloading.iter().map(|p| p.ms).collect();
    let tar_bytes = std::fs::metadata(&tar_out).map(|m| m.len()).unwrap_or(0);
    let ratios: Vec<f64> = pairs.iter().map(|(b, t)| b / t).collect();
    let median_ratio = median(&ratios);
    drop(agent);
    drop(broker);
    if args.keep_dir {
        let dir = fleet.dir.keep();
        eprintln!("kept the processes' configs and logs in {}", dir.display());
    }
    Ok(E2eReport {
        input_bytes,
        pairs,
        median_ratio,
        bundle_bytes,
        tar_bytes,
        agent_peak_rss_mib: peak as f64 / 1024.0,
        agent_idle_rss_mib: idle_rss as f64 / 1024.0,
        ping_idle_ms: percentiles(idle),
        ping_streaming_ms: percentiles(streaming),
        ping_download_ms: percentiles(downloading),
        slowest_pings: slowest,
        cpu: CpuReport {
            agent: median(&cpu[0]),
            broker: median(&cpu[1]),
            bench: median(&cpu[2]),
            tar: median(&cpu[3]),
        },
    })
}
