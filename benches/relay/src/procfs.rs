//! Readings from /proc, as BENCHMARKS.md asks: memory from `smaps_rollup` and `status`,
//! CPU per thread from `schedstat` (nanoseconds, not 10 ms ticks), I/O from `io`, and
//! kernel socket memory from `/proc/net/sockstat`.

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
}

/// `Key:   123 kB` lines of smaps_rollup and status, in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A process's memory from `/proc/<pid>/smaps_rollup` (KiB).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
    pub anonymous_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = read(&path)?;
    let field =
        |key: &str| kib_field(&text, key).with_context(|| format!("{path} has no {key} line"));
    Ok(Memory {
        rss_kib: field("Rss")?,
        pss_kib: field("Pss")?,
        pss_anon_kib: kib_field(&text, "Pss_Anon").unwrap_or(0),
        pss_file_kib: kib_field(&text, "Pss_File").unwrap_or(0),
        anonymous_kib: kib_field(&text, "Anonymous").unwrap_or(0),
    })
}

/// Selected lines of `/proc/<pid>/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    pub threads: u64,
    pub cpus_allowed_list: String,
}

pub fn status(pid: u32) -> Result<Status> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    let cpus = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Ok(Status {
        vm_rss_kib: kib_field(&text, "VmRSS").unwrap_or(0),
        vm_hwm_kib: kib_field(&text, "VmHWM").unwrap_or(0),
        threads: kib_field(&text, "Threads").unwrap_or(0),
        cpus_allowed_list: cpus,
    })
}

/// The CPUs every thread of `pid` may run on, deduplicated (one entry when pinned).
pub fn thread_affinities(pid: u32) -> Result<Vec<String>> {
    let mut lists: Vec<String> = Vec::new();
    for tid in tids(pid)? {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) {
            if let Some(l) = text
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            {
                let l = l.trim().to_string();
                if !lists.contains(&l) {
                    lists.push(l);
                }
            }
        }
    }
    Ok(lists)
}

fn tids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let entry = entry.with_context(|| format!("cannot list {dir}"))?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// One thread's scheduler accounting at one instant.
#[derive(Clone, Debug)]
pub struct ThreadCpu {
    pub tid: u32,
    pub comm: String,
    /// Time spent on a CPU (ns).
    pub run_ns: u64,
    /// Time spent runnable but waiting for a CPU (ns).
    pub wait_ns: u64,
    /// Times it was scheduled in.
    pub slices: u64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    /// User and system time from `stat`, in clock ticks (10 ms): coarse, but the only
    /// split between user space and kernel (syscalls: writes, fsync, socket I/O).
    pub user_ticks: u64,
    pub sys_ticks: u64,
}

/// USER_HZ: always 100 on x86-64 Linux.
const TICK_MS: f64 = 10.0;

/// utime and stime (fields 14 and 15) of a `stat` line; the name in parentheses may
/// contain spaces, so fields are counted after its closing parenthesis.
fn stat_times(stat: &str) -> (u64, u64) {
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, i.e. index 11 here.
    let get = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    (get(11), get(12))
}

/// Every thread of a process. Threads that end while being read are skipped.
pub fn threads(pid: u32) -> Result<Vec<ThreadCpu>> {
    let mut out = Vec::new();
    for tid in tids(pid)? {
        let base = format!("/proc/{pid}/task/{tid}");
        let Ok(sched) = std::fs::read_to_string(format!("{base}/schedstat")) else {
            continue;
        };
        let mut f = sched
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        let (run_ns, wait_ns, slices) = (
            f.next().unwrap_or(0),
            f.next().unwrap_or(0),
            f.next().unwrap_or(0),
        );
        let comm = std::fs::read_to_string(format!("{base}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let status = std::fs::read_to_string(format!("{base}/status")).unwrap_or_default();
        let (user_ticks, sys_ticks) =
            stat_times(&std::fs::read_to_string(format!("{base}/stat")).unwrap_or_default());
        out.push(ThreadCpu {
            user_ticks,
            sys_ticks,
            tid,
            comm,
            run_ns,
            wait_ns,
            slices,
            voluntary_switches: kib_field(&status, "voluntary_ctxt_switches").unwrap_or(0),
            involuntary_switches: kib_field(&status, "nonvoluntary_ctxt_switches").unwrap_or(0),
        });
    }
    Ok(out)
}

/// CPU used by one thread between two readings.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadDelta {
    pub tid: u32,
    pub comm: String,
    pub run_ms: f64,
    pub wait_ms: f64,
    pub slices: u64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    /// Split of the time by `stat` ticks (10 ms resolution).
    pub user_ms: f64,
    pub sys_ms: f64,
}

/// CPU used by a process between two readings, in total and by thread (busiest first).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuDelta {
    pub run_ms: f64,
    pub wait_ms: f64,
    pub slices: u64,
    /// User / system split from `stat` ticks (10 ms resolution).
    pub user_ms: f64,
    pub sys_ms: f64,
    pub threads: Vec<ThreadDelta>,
    /// Threads that ended between the readings: their CPU is missing from the totals.
    pub threads_ended: usize,
}

pub fn cpu_delta(before: &[ThreadCpu], after: &[ThreadCpu]) -> CpuDelta {
    let old: HashMap<u32, &ThreadCpu> = before.iter().map(|t| (t.tid, t)).collect();
    let mut d = CpuDelta::default();
    for t in after {
        let zero = ThreadCpu {
            tid: t.tid,
            comm: String::new(),
            run_ns: 0,
            wait_ns: 0,
            slices: 0,
            voluntary_switches: 0,
            involuntary_switches: 0,
            user_ticks: 0,
            sys_ticks: 0,
        };
        let o = old.get(&t.tid).copied().unwrap_or(&zero);
        let (run, wait, slices, vol, invol) = (
            t.run_ns.saturating_sub(o.run_ns),
            t.wait_ns.saturating_sub(o.wait_ns),
            t.slices.saturating_sub(o.slices),
            t.voluntary_switches.saturating_sub(o.voluntary_switches),
            t.involuntary_switches
                .saturating_sub(o.involuntary_switches),
        );
        let user_ms = t.user_ticks.saturating_sub(o.user_ticks) as f64 * TICK_MS;
        let sys_ms = t.sys_ticks.saturating_sub(o.sys_ticks) as f64 * TICK_MS;
        d.user_ms += user_ms;
        d.sys_ms += sys_ms;
        d.run_ms += run as f64 / 1e6;
        d.wait_ms += wait as f64 / 1e6;
        d.slices += slices;
        d.threads.push(ThreadDelta {
            tid: t.tid,
            comm: t.comm.clone(),
            run_ms: run as f64 / 1e6,
            wait_ms: wait as f64 / 1e6,
            slices,
            voluntary_switches: vol,
            involuntary_switches: invol,
            user_ms,
            sys_ms,
        });
    }
    let alive: std::collections::HashSet<u32> = after.iter().map(|t| t.tid).collect();
    d.threads_ended = before.iter().filter(|t| !alive.contains(&t.tid)).count();
    d.threads.sort_by(|a, b| b.run_ms.total_cmp(&a.run_ms));
    d
}

/// `/proc/<pid>/io` counters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Io {
    pub rchar: u64,
    pub wchar: u64,
    pub syscr: u64,
    pub syscw: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

pub fn io(pid: u32) -> Result<Io> {
    let path = format!("/proc/{pid}/io");
    let text = read(&path)?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .strip_prefix(':')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    Ok(Io {
        rchar: get("rchar"),
        wchar: get("wchar"),
        syscr: get("syscr"),
        syscw: get("syscw"),
        read_bytes: get("read_bytes"),
        write_bytes: get("write_bytes"),
    })
}

impl Io {
    pub fn since(&self, before: &Io) -> Io {
        Io {
            rchar: self.rchar.saturating_sub(before.rchar),
            wchar: self.wchar.saturating_sub(before.wchar),
            syscr: self.syscr.saturating_sub(before.syscr),
            syscw: self.syscw.saturating_sub(before.syscw),
            read_bytes: self.read_bytes.saturating_sub(before.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(before.write_bytes),
        }
    }
}

/// The TCP line of `/proc/net/sockstat` (the whole network namespace: both ends of
/// every loopback connection are counted).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SockStat {
    pub tcp_inuse: u64,
    pub tcp_alloc: u64,
    pub tcp_time_wait: u64,
    /// Kernel memory charged to TCP sockets, in pages.
    pub tcp_mem_pages: u64,
}

pub fn sockstat() -> Result<SockStat> {
    let text = read("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .context("/proc/net/sockstat has no TCP line")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let get = |key: &str| {
        words
            .windows(2)
            .find(|w| w[0] == key)
            .and_then(|w| w[1].parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(SockStat {
        tcp_inuse: get("inuse"),
        tcp_alloc: get("alloc"),
        tcp_time_wait: get("tw"),
        tcp_mem_pages: get("mem"),
    })
}

/// Per-CPU tick counters from `/proc/stat`: (total, steal) for `cpu0`, `cpu1`, ...
pub fn cpu_ticks() -> Result<Vec<(u64, u64)>> {
    let text = read("/proc/stat")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal guest guest_nice; guests are
            // already inside user and nice.
            let total: u64 = v.iter().take(8).sum();
            (total, v.get(7).copied().unwrap_or(0))
        })
        .collect())
}

/// Percent of each CPU's time stolen by the hypervisor between two readings.
pub fn steal_pct(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((t0, s0), (t1, s1))| {
            let total = t1.saturating_sub(*t0);
            if total == 0 {
                0.0
            } else {
                s1.saturating_sub(*s0) as f64 * 100.0 / total as f64
            }
        })
        .collect()
}

/// Slab caches that grow by one object per open TCP socket: the socket itself, its
/// inode, its open file and its epoll registration.
pub const SOCKET_SLABS: [&str; 4] = ["TCP", "sock_inode_cache", "filp", "eventpoll_epi"];

/// Bytes in use (active objects × object size) of the [`SOCKET_SLABS`] caches, from
/// `/proc/slabinfo` (root only; empty when unreadable).
pub fn socket_slab_bytes() -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.first()?;
            if !SOCKET_SLABS.contains(&name) {
                return None;
            }
            let active: u64 = f.get(1)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some((name.to_string(), active * size))
        })
        .collect()
}

/// Page size used by `/proc/net/sockstat` (x86-64 Linux: 4 KiB).
pub const PAGE_KIB: u64 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_read() -> Result<()> {
        let pid = std::process::id();
        let m = memory(pid)?;
        assert!(m.rss_kib > 0 && m.pss_kib > 0);
        let t = threads(pid)?;
        assert!(!t.is_empty());
        let d = cpu_delta(&t, &threads(pid)?);
        assert!(d.run_ms >= 0.0);
        assert!(status(pid)?.vm_rss_kib > 0);
        io(pid)?;
        sockstat()?;
        assert!(!cpu_ticks()?.is_empty());
        Ok(())
    }

    #[test]
    fn stat_times_skip_a_name_with_spaces() {
        let line = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 77 88 0 0";
        assert_eq!(stat_times(line), (77, 88));
    }

    #[test]
    fn kib_fields_parse() {
        let text = "Rss:                2048 kB\nPss:                1024 kB\n";
        assert_eq!(kib_field(text, "Rss"), Some(2048));
        assert_eq!(kib_field(text, "Pss"), Some(1024));
        assert_eq!(kib_field(text, "Pss_Anon"), None);
    }
}
