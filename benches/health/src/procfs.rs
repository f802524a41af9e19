//! What the benchmark reads from /proc about a process and the machine: CPU from
//! `/proc/<pid>/stat` (utime + stime, and the waited-for children's) and, as a
//! cross-check in nanoseconds, `/proc/<pid>/task/*/schedstat`; memory from `status`
//! (`VmRSS`, `VmHWM`, …) and `smaps_rollup` (`Pss`); the load average and the machine's
//! busy share from `/proc/loadavg` and `/proc/stat`.

use anyhow::{Context, Result};
use serde::Serialize;

/// USER_HZ on Linux: `/proc/<pid>/stat` counts CPU time in 10 ms ticks.
const TICK_MS: f64 = 10.0;

use dbvm_e2e::report::kib_field;

/// One reading of one process.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t_s: f64,
    /// utime + stime of the process (all its threads, ended ones included), ms.
    pub cpu_ms: f64,
    /// cutime + cstime: children it has waited for, ms.
    pub children_cpu_ms: f64,
    /// Sum of the live threads' time on CPU (`schedstat`), ms with ns resolution;
    /// threads that ended are not in it.
    pub sched_ms: f64,
    pub vm_rss_kib: u64,
    /// Peak RSS since the process started or since [`reset_peak`].
    pub vm_hwm_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub pss_kib: u64,
    pub threads: u64,
}

/// Reads one sample of `pid`; an error when the process is gone.
pub fn sample(pid: u32, t_s: f64) -> Result<Sample> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat =
        std::fs::read_to_string(&stat_path).with_context(|| format!("cannot read {stat_path}"))?;
    // Fields after the ")" that ends the command name: state is field 3, utime 14,
    // stime 15, cutime 16, cstime 17 (index 11..=14 after the split).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{stat_path}: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0) as f64
    };
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path)
        .with_context(|| format!("cannot read {status_path}"))?;
    let pss_kib = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| kib_field(&t, "Pss"))
        .unwrap_or(0);
    Ok(Sample {
        t_s,
        cpu_ms: (tick(11) + tick(12)) * TICK_MS,
        children_cpu_ms: (tick(13) + tick(14)) * TICK_MS,
        sched_ms: sched_ns(pid) as f64 / 1e6,
        vm_rss_kib: kib_field(&status, "VmRSS").unwrap_or(0),
        vm_hwm_kib: kib_field(&status, "VmHWM").unwrap_or(0),
        rss_anon_kib: kib_field(&status, "RssAnon").unwrap_or(0),
        rss_file_kib: kib_field(&status, "RssFile").unwrap_or(0),
        pss_kib,
        threads: kib_field(&status, "Threads").unwrap_or(0),
    })
}

/// Sum over the live threads of the first `schedstat` field (ns on CPU).
fn sched_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resets the kernel's peak RSS (`VmHWM`) of `pid` to its current RSS (`clear_refs` 5),
/// so a later `VmHWM` is the peak since now. Needs root or the same user.
pub fn reset_peak(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("cannot write 5 to {path}"))
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text
        .split_whitespace()
        .take(3)
        .map(|x| x.parse::<f64>().unwrap_or(f64::NAN));
    [
        v.next().unwrap_or(f64::NAN),
        v.next().unwrap_or(f64::NAN),
        v.next().unwrap_or(f64::NAN),
    ]
}

/// The aggregate `cpu` line of `/proc/stat`: (busy, total) jiffies over all cores.
pub fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle (3) and iowait (4) are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id(), 0.0).unwrap();
        assert!(s.vm_rss_kib > 0 && s.threads >= 1);
        let (busy, total) = machine_jiffies();
        assert!(total >= busy && total > 0);
    }
}
