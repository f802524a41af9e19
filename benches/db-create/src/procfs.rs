//! The agent's memory and CPU from /proc, as BENCHMARKS.md asks: `VmRSS`/`VmHWM` from
//! `status`, `Pss` from `smaps_rollup`, CPU from `stat` (see [`cpu_ms`]).

use anyhow::{Context, Result};
use serde::Serialize;

use dbvm_e2e::report::kib_field;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    pub vm_rss_kib: u64,
    /// Peak RSS over the process's life (the create included).
    pub vm_hwm_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub pss_kib: u64,
    pub threads: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let need = |key: &str| kib_field(&status, key).with_context(|| format!("{path}: no {key}"));
    let rollup = format!("/proc/{pid}/smaps_rollup");
    let pss = std::fs::read_to_string(&rollup)
        .ok()
        .and_then(|t| kib_field(&t, "Pss"))
        .unwrap_or(0);
    Ok(Memory {
        vm_rss_kib: need("VmRSS")?,
        vm_hwm_kib: need("VmHWM")?,
        rss_anon_kib: kib_field(&status, "RssAnon").unwrap_or(0),
        rss_file_kib: kib_field(&status, "RssFile").unwrap_or(0),
        pss_kib: pss,
        threads: kib_field(&status, "Threads").unwrap_or(0),
    })
}

/// User + system CPU of the whole process in ms, from `/proc/<pid>/stat` (10 ms ticks,
/// USER_HZ = 100). Per-thread `schedstat` is finer but loses the CPU of threads that end,
/// and the agent's blocking-pool threads end while it idles.
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(11) + tick(12)) as f64 * 10.0
}
