//! Check 4, CPU health: utilisation sustained over a window, and the load average against the
//! VM's cores.

use crate::health::{grade, Check, Finding, Run};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Default)]
pub struct Cpu {
    /// (ms since the epoch, busy jiffies, total jiffies) of earlier runs, oldest first.
    history: Mutex<VecDeque<(i64, u64, u64)>>,
}

/// The aggregate `cpu` line of `/proc/stat`: (busy, total) jiffies. Parsed by hand: it is
/// one line, and sysinfo would keep a per-CPU model in memory for the same two numbers.
fn proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is counted in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

fn loadavg() -> Option<(f64, f64, f64)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().filter_map(|x| x.parse().ok());
    Some((it.next()?, it.next()?, it.next()?))
}

#[async_trait]
impl Check for Cpu {
    fn id(&self) -> &'static str {
        "cpu"
    }

    async fn run(&self, run: &Run) -> Finding {
        let t = &run.settings().thresholds;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let Some((busy, total)) = proc_stat() else {
            return Finding::unknown("cannot read /proc/stat");
        };
        let (l1, l5, l15) = loadavg().unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        let (now_pct, window_pct, span_s) = {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            let pct = |from: &(i64, u64, u64)| {
                let dt = total.saturating_sub(from.2);
                (dt > 0).then(|| 100.0 * busy.saturating_sub(from.1) as f64 / dt as f64)
            };
            let now = h.back().and_then(pct);
            let window_ms = t.cpu_window_s as i64 * 1000;
            while h.len() > 1 && h.front().is_some_and(|(at, ..)| run.at_ms - at > window_ms) {
                h.pop_front();
            }
            let window = h.front().and_then(pct);
            let span = h
                .front()
                .map_or(0.0, |(at, ..)| (run.at_ms - at) as f64 / 1000.0);
            h.push_back((run.at_ms, busy, total));
            (now, window, span)
        };
        let Some(window_pct) = window_pct else {
            return Finding::ok(format!(
                "first sample taken; utilisation is known from the next run ({cores:.0} cores, load {l1:.2} {l5:.2} {l15:.2})"
            ))
            .figures([("cores", cores), ("load1", l1), ("load5", l5), ("load15", l15)]);
        };
        let per_core = l5 / cores;
        let status = grade(window_pct, t.cpu_warning_pct, t.cpu_critical_pct).max(grade(
            per_core,
            t.load_warning_per_core,
            t.load_critical_per_core,
        ));
        let mut msg = format!(
            "CPU {window_pct:.0}% busy over the last {} ({:.0}% now) on {cores:.0} cores; load {l1:.2} {l5:.2} {l15:.2} ({per_core:.2} per core over 5 min)",
            crate::health::duration(span_s),
            now_pct.unwrap_or(window_pct)
        );
        if status > dbvm_protocol::health::HealthStatus::Ok {
            msg.push_str(": find the busy queries (pg_stat_activity / SHOW PROCESSLIST) or give the VM more cores");
        }
        Finding::new(status, msg).figures([
            ("cores", cores),
            ("busy_pct", window_pct),
            ("busy_now_pct", now_pct.unwrap_or(window_pct)),
            ("window_s", span_s),
            ("load1", l1),
            ("load5", l5),
            ("load15", l15),
            ("load5_per_core", per_core),
        ])
    }
}
