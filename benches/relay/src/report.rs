//! The report of one run (printed as text, or as JSON with `--json`), the checks against
//! the targets given on the command line, and the summary table `run.sh` prints from the
//! JSON reports of a whole set.

use crate::procfs::{self, CpuDelta, Io, Memory, SockStat};
use crate::real_agent::RealAgentReport;
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Percentiles of an HDR histogram recorded in microseconds, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms  (mean {:.2}, n={})",
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.mean_ms,
            self.count
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    pub agents: usize,
    pub commands: usize,
    /// Commands per second; 0 = saturation (closed loop).
    pub rate: f64,
    pub concurrency: usize,
    pub skip_verify: bool,
    pub pinned: bool,
    pub broker_cpus: String,
    pub loadgen_cpus: String,
    pub http: String,
    pub api_connections: usize,
    pub wait_ms: u64,
    pub idle_secs: u64,
    pub heartbeat_interval_ms: u32,
    pub broker_bin: String,
    pub data_dir_filesystem: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    pub cert_issue_secs: f64,
    pub cert_threads: usize,
    pub presigned_commands: usize,
    pub presign_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Connect {
    pub connected: usize,
    pub failures: usize,
    pub secs: f64,
    pub per_sec: f64,
    pub broker_cpu_ms: f64,
    pub broker_cpu_us_per_agent: f64,
    pub loadgen_cpu_ms: f64,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub broker_before: Memory,
    pub broker_after: Memory,
    pub broker_threads_after: u64,
    pub per_agent_rss_kib: f64,
    pub per_agent_pss_kib: f64,
    pub per_agent_anonymous_kib: f64,
    pub sockstat_before: SockStat,
    pub sockstat_after: SockStat,
    /// Kernel TCP buffer memory (sockstat `mem`) per connection, both ends counted
    /// (loopback), in KiB. Idle sockets hold no data, so this is about 0 and moves with
    /// other traffic on the machine.
    pub kernel_kib_per_connection: f64,
    /// Slab memory (socket, inode, file, epoll item) per socket, in bytes: what the
    /// broker's host pays in the kernel for each agent besides buffers.
    pub kernel_slab_bytes_per_socket: f64,
    pub kernel_slab_before: BTreeMap<String, u64>,
    pub kernel_slab_after: BTreeMap<String, u64>,
    pub loadgen_memory: Memory,
    pub loadgen_pss_kib_per_agent: f64,
    /// Broker CPU while idle (heartbeats only), in percent of one core.
    pub broker_idle_cpu_pct: f64,
    pub heartbeats_during_idle: u64,
    pub dropped: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Commands {
    pub mode: String,
    pub http_version: String,
    pub sent: usize,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub error_examples: Vec<String>,
    pub elapsed_secs: f64,
    pub per_sec: f64,
    /// Round trip, from the intended send time (scheduled, for a fixed rate).
    pub latency: Latency,
    /// Round trip from the actual send time.
    pub service: Latency,
    /// How late the generator sent (actual − scheduled), fixed rate only.
    pub send_lag: Latency,
    pub broker_cpu: CpuDelta,
    pub broker_cpu_pct: f64,
    pub broker_cpu_us_per_command: f64,
    pub broker_runqueue_wait_ms: f64,
    pub broker_io: Io,
    pub broker_memory_after: Memory,
    /// CPU time the hypervisor gave to other guests, per core, during the phase (%).
    pub steal_pct: Vec<f64>,
    pub loadgen_cpu_ms: f64,
    pub loadgen_cpu_pct: f64,
    pub loadgen_cpu_us_per_command: f64,
    pub agents_delivered: u64,
    pub agents_rejected: u64,
    pub dropped: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub label: String,
    pub config: RunConfig,
    pub setup: Setup,
    pub connect: Connect,
    pub idle: Idle,
    pub commands: Option<Commands>,
    pub real_agent: Option<RealAgentReport>,
    pub real_agent_error: Option<String>,
    pub broker_exit: String,
    pub checks: Vec<Check>,
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    pub fn text(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let mode = if c.commands == 0 {
            "no command phase".to_string()
        } else if c.rate > 0.0 {
            format!("{} cmd/s fixed rate (open loop)", c.rate)
        } else {
            format!("saturation (closed loop, {} outstanding)", c.concurrency)
        };
        let _ = writeln!(o, "== relay-bench {}", self.label);
        let _ = writeln!(
            o,
            "run       {} agents, {} commands, {mode}, signature check {}, HTTP/{} x{} connection(s)",
            c.agents,
            c.commands,
            if c.skip_verify { "SKIPPED" } else { "on" },
            c.http,
            c.api_connections,
        );
        let _ = writeln!(
            o,
            "pinning   broker CPUs {}, load generator CPUs {}{}; broker data dir on {}",
            c.broker_cpus,
            c.loadgen_cpus,
            if c.pinned {
                " (taskset)"
            } else {
                " (not pinned)"
            },
            c.data_dir_filesystem
        );
        let s = &self.setup;
        let _ = writeln!(
            o,
            "setup     {} agent certificates in {:.2} s on {} threads (fresh P-256 key each); {} pings pre-signed in {:.2} s, before timing",
            c.agents, s.cert_issue_secs, s.cert_threads, s.presigned_commands, s.presign_secs
        );
        let k = &self.connect;
        let _ = writeln!(
            o,
            "connect   {} connected, {} failed in {:.2} s = {:.0} handshakes+Hello/s; broker CPU {:.0} ms = {:.0} µs per agent; load generator CPU {:.0} ms",
            k.connected, k.failures, k.secs, k.per_sec, k.broker_cpu_ms, k.broker_cpu_us_per_agent, k.loadgen_cpu_ms
        );
        if let Some(e) = &k.first_error {
            let _ = writeln!(o, "          first error: {e}");
        }
        let i = &self.idle;
        let _ = writeln!(
            o,
            "memory    broker before agents: RSS {} Pss {}; after {} s idle with {} agents: RSS {} Pss {} ({} threads)",
            mib(i.broker_before.rss_kib),
            mib(i.broker_before.pss_kib),
            c.idle_secs,
            k.connected,
            mib(i.broker_after.rss_kib),
            mib(i.broker_after.pss_kib),
            i.broker_threads_after
        );
        let _ = writeln!(
            o,
            "          per idle agent: {:.1} KiB RSS, {:.1} KiB Pss, {:.1} KiB anonymous (user space, broker only)",
            i.per_agent_rss_kib, i.per_agent_pss_kib, i.per_agent_anonymous_kib
        );
        let _ = writeln!(
            o,
            "          kernel TCP: {} -> {} sockets, {} -> {} KiB = {:.2} KiB per connection (both loopback ends)",
            i.sockstat_before.tcp_inuse,
            i.sockstat_after.tcp_inuse,
            i.sockstat_before.tcp_mem_pages * procfs::PAGE_KIB,
            i.sockstat_after.tcp_mem_pages * procfs::PAGE_KIB,
            i.kernel_kib_per_connection
        );
        let _ = writeln!(
            o,
            "          kernel slab per socket (TCP, sock_inode_cache, filp, eventpoll_epi): {:.0} B (each agent is two sockets here, one per end)",
            i.kernel_slab_bytes_per_socket
        );
        let _ = writeln!(
            o,
            "          idle broker CPU {:.2} % of a core ({} heartbeats); load generator Pss {} = {:.1} KiB per agent; {} dropped",
            i.broker_idle_cpu_pct,
            i.heartbeats_during_idle,
            mib(i.loadgen_memory.pss_kib),
            i.loadgen_pss_kib_per_agent,
            i.dropped
        );
        if let Some(m) = &self.commands {
            let errors: u64 = m.errors.values().sum();
            let _ = writeln!(
                o,
                "commands  {} sent, {} succeeded, {errors} errors in {:.2} s = {:.0} commands/s ({}, {})",
                m.sent, m.ok, m.elapsed_secs, m.per_sec, m.mode, m.http_version
            );
            for (kind, n) in &m.errors {
                let _ = writeln!(o, "          error x{n}: {kind}");
            }
            let from = if c.rate > 0.0 {
                "from scheduled send"
            } else {
                "round trip"
            };
            let _ = writeln!(o, "latency   {from}: {}", m.latency.line());
            if c.rate > 0.0 {
                let _ = writeln!(o, "          from actual send: {}", m.service.line());
                let _ = writeln!(o, "          generator lateness: {}", m.send_lag.line());
            }
            let _ = writeln!(
                o,
                "broker    CPU {:.0} ms over {:.2} s = {:.1} % of a core, {:.0} µs per command (user {:.0} / sys {:.0} ms); runnable but waiting for a CPU {:.0} ms (all threads)",
                m.broker_cpu.run_ms,
                m.elapsed_secs,
                m.broker_cpu_pct,
                m.broker_cpu_us_per_command,
                m.broker_cpu.user_ms,
                m.broker_cpu.sys_ms,
                m.broker_runqueue_wait_ms
            );
            for t in m.broker_cpu.threads.iter().take(6) {
                let _ = writeln!(
                    o,
                    "          {:<16} tid {:<7} {:>8.0} ms  {:>5.1} %  (user {:.0} / sys {:.0} ms)  switches {} voluntary / {} involuntary",
                    t.comm,
                    t.tid,
                    t.run_ms,
                    if m.broker_cpu.run_ms > 0.0 { t.run_ms * 100.0 / m.broker_cpu.run_ms } else { 0.0 },
                    t.user_ms,
                    t.sys_ms,
                    t.voluntary_switches,
                    t.involuntary_switches
                );
            }
            let steal: Vec<String> = m
                .steal_pct
                .iter()
                .enumerate()
                .map(|(i, p)| format!("cpu{i} {p:.1} %"))
                .collect();
            let _ = writeln!(
                o,
                "          stolen by the hypervisor during the phase: {}",
                steal.join(", ")
            );
            if m.broker_cpu.threads_ended > 0 {
                let _ = writeln!(
                    o,
                    "          ({} threads ended during the run: their CPU is not counted)",
                    m.broker_cpu.threads_ended
                );
            }
            let per = |v: u64| v as f64 / m.sent.max(1) as f64;
            let _ = writeln!(
                o,
                "          I/O: {:.1} MiB to disk ({:.0} B per command), {:.1} write syscalls and {:.1} read syscalls per command (sockets included); RSS after: {}",
                m.broker_io.write_bytes as f64 / 1048576.0,
                per(m.broker_io.write_bytes),
                per(m.broker_io.syscw),
                per(m.broker_io.syscr),
                mib(m.broker_memory_after.rss_kib)
            );
            let _ = writeln!(
                o,
                "loadgen   CPU {:.0} ms = {:.1} % of a core, {:.0} µs per command; agents verified {} deliveries, rejected {}; {} links dropped",
                m.loadgen_cpu_ms, m.loadgen_cpu_pct, m.loadgen_cpu_us_per_command, m.agents_delivered, m.agents_rejected, m.dropped
            );
        }
        if let Some(r) = &self.real_agent {
            let _ = writeln!(
                o,
                "agent     real dbvm-agent ({} KiB binary): {}/{} pings ok, {}",
                r.binary_kib,
                r.pings_ok,
                r.pings,
                r.ping_latency.line()
            );
            let _ = writeln!(
                o,
                "          after {} s idle: VmRSS {} Pss {} (anon {}), peak {}, {} threads, idle CPU {:.1} ms",
                r.idle_secs,
                mib(r.status.vm_rss_kib),
                mib(r.memory.pss_kib),
                mib(r.memory.pss_anon_kib),
                mib(r.status.vm_hwm_kib),
                r.status.threads,
                r.idle_cpu_ms
            );
        }
        if let Some(e) = &self.real_agent_error {
            let _ = writeln!(o, "agent     real agent run failed: {e}");
        }
        let _ = writeln!(o, "broker    exit: {}", self.broker_exit);
        for ch in &self.checks {
            let _ = writeln!(
                o,
                "check     {}: {} (target {}) {}",
                ch.name,
                ch.measured,
                ch.target,
                if ch.pass { "PASS" } else { "FAIL" }
            );
        }
        o
    }
}

/// The disk's own fdatasync latency, from fio's JSON output (`sync.lat_ns` percentiles of
/// its first job): the baseline a latency figure of the broker is read against, since every
/// accepted command waits for durable writes. Written to `out` as a report whose checks are
/// the percentiles (informational: no target), printed as text.
pub fn fio_baseline(fio_json: &Path, out: &Path) -> Result<String> {
    let text = std::fs::read_to_string(fio_json)
        .with_context(|| format!("cannot read {}", fio_json.display()))?;
    // fio may print notes before its JSON object.
    let start = text.find('{').context("no JSON object in fio's output")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).context("fio's output is not JSON")?;
    let job = &v["jobs"][0];
    let pct = &job["sync"]["lat_ns"]["percentile"];
    let ms = |key: &str| pct[key].as_f64().map(|ns| ns / 1e6);
    let mut checks = Vec::new();
    let mut o = String::new();
    let _ = write!(o, "disk fdatasync (fio):");
    for (name, key) in [
        ("p50", "50.000000"),
        ("p99", "99.000000"),
        ("p99.9", "99.900000"),
    ] {
        let v = ms(key).with_context(|| format!("fio's output has no sync {name}"))?;
        let _ = write!(o, " {name} {v:.2} ms");
        checks.push(serde_json::json!({
            "name": format!("disk fdatasync {name} (fio)"),
            "measured": format!("{v:.2} ms"),
            "target": "baseline",
            "pass": true,
        }));
    }
    let syncs = job["sync"]["lat_ns"]["N"].as_u64().unwrap_or(0);
    let _ = writeln!(o, " ({syncs} syncs)");
    let report = serde_json::json!({
        "label": "f: disk baseline (fio, 8 KiB write + fdatasync, 300/s)",
        "checks": checks,
    });
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(o)
}

/// Prints one table of every check of every JSON report in `dir` (file name order).
pub fn summary(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<44} {:<38} {:<24} {:<14} result",
        "run", "figure", "measured", "target"
    );
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()))?;
        let label = v["label"].as_str().unwrap_or("?");
        let checks = v["checks"].as_array().cloned().unwrap_or_default();
        for ch in checks {
            let _ = writeln!(
                o,
                "{:<44} {:<38} {:<24} {:<14} {}",
                label,
                ch["name"].as_str().unwrap_or("?"),
                ch["measured"].as_str().unwrap_or("?"),
                ch["target"].as_str().unwrap_or("?"),
                if ch["pass"].as_bool().unwrap_or(false) {
                    "PASS"
                } else {
                    "FAIL"
                }
            );
        }
    }
    Ok(o)
}
