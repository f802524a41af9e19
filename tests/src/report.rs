//! What the benchmarks' reports share (benches/db-create, benches/health): the machine
//! they ran on, UTC time stamps, and the `Key:   123 kB` lines of /proc files.

/// The machine a report was made on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_total_kib: u64,
}

/// The text after `prefix` (and any blanks or colon) on the first line of `path` that
/// starts with it; empty when there is none.
fn first_line_with(path: &str, prefix: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix(prefix)
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
        })
        .unwrap_or_default()
}

/// This machine, from /proc (a field that cannot be read is empty or 0).
pub fn machine() -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Machine {
        hostname: read("/proc/sys/kernel/hostname"),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model: first_line_with("/proc/cpuinfo", "model name"),
        kernel: read("/proc/sys/kernel/osrelease"),
        memory_total_kib: first_line_with("/proc/meminfo", "MemTotal")
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    }
}

/// The number of a `Key:   123 kB` line (`/proc/<pid>/status`, `smaps_rollup`).
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn utc_time(unix_s: u64) -> time::OffsetDateTime {
    i64::try_from(unix_s)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `2026-11-22T10:41:07Z`
pub fn utc(unix_s: u64) -> String {
    let t = utc_time(unix_s);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `20261122-104107` (UTC), for file names.
pub fn file_stamp(unix_s: u64) -> String {
    utc(unix_s).replace(['-', ':', 'Z'], "").replace('T', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_fields_and_this_machine() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        // 2024-02-29 (a leap day) 23:59:59 UTC.
        assert_eq!(utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(file_stamp(1_709_251_199), "20240229-235959");
        assert_eq!(kib_field("VmRSS:\t  1234 kB\n", "VmRSS"), Some(1234));
        assert_eq!(kib_field("VmRSSx: 1 kB\n", "VmRSS"), None);
        let m = machine();
        assert!(m.cpus >= 1 && m.memory_total_kib > 0, "{m:?}");
    }
}
