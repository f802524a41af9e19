//! The system capability's bundle parts: what this VM is and how it is doing — OS
//! release, kernel, facts (CPUs, memory, disks), mounts, memory, load, processes,
//! network addresses, recent kernel messages. All read from `/proc` or by a command
//! with log-style redaction (a process's argv can carry a password; environments are
//! never read).

use crate::bundle::{Part, Request};
use std::path::Path;
use std::time::Duration;

/// How long `ip` and `dmesg` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub fn parts(_request: &Request) -> Vec<Part> {
    let mut parts = vec![
        Part::log_file("system/os-release", "/etc/os-release"),
        Part::log_file("system/kernel-version", "/proc/version"),
        Part::produced("system/facts.json", "the facts operation", async {
            let facts = tokio::task::spawn_blocking(super::facts::collect)
                .await
                .map_err(|e| e.to_string())?;
            serde_json::to_vec_pretty(&facts).map_err(|e| e.to_string())
        }),
        Part::log_file("system/mounts", "/proc/self/mountinfo"),
        Part::log_file("system/meminfo", "/proc/meminfo"),
        Part::log_file("system/loadavg", "/proc/loadavg"),
        Part::log_file("system/uptime", "/proc/uptime"),
        Part::produced(
            "system/processes.txt",
            "/proc/<pid>/{stat,status,cmdline}",
            async {
                tokio::task::spawn_blocking(|| processes(Path::new("/proc")))
                    .await
                    .map_err(|e| e.to_string())
            },
        ),
    ];
    parts.push(Part::command(
        "system/network.json",
        &["ip", "-j", "addr"],
        COMMAND_TIMEOUT,
    ));
    parts.push(Part::command(
        "system/dmesg.txt",
        &["dmesg", "--time-format", "iso"],
        COMMAND_TIMEOUT,
    ));
    parts
}

/// One line per process: pid, parent, user id, state, resident memory, and its command
/// line (arguments joined by spaces; the bundle's log patterns redact it). A process
/// that ends while it is read is skipped.
pub fn processes(proc: &Path) -> Vec<u8> {
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    let mut out = String::from("PID PPID UID STATE RSS_KB COMMAND\n");
    for pid in pids {
        let dir = proc.join(pid.to_string());
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                .unwrap_or_else(|| "-".into())
        };
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let cmd = if cmdline.is_empty() {
            format!("[{}]", field("Name:"))
        } else {
            String::from_utf8_lossy(&cmdline)
                .trim_end_matches('\0')
                .replace('\0', " ")
        };
        out.push_str(&format!(
            "{pid} {} {} {} {} {cmd}\n",
            field("PPid:"),
            field("Uid:"),
            field("State:"),
            field("VmRSS:"),
        ));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Producer;

    #[test]
    fn the_process_list_has_this_process_and_its_argv() {
        let text = String::from_utf8(processes(Path::new("/proc"))).unwrap();
        let me = std::process::id().to_string();
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{me} "))),
            "{text}"
        );
    }

    #[test]
    fn parts_name_their_sources() {
        let parts = parts(&Request {
            since_ms: 0,
            until_ms: 1,
            include_db_logs: true,
            include_db_views: true,
        });
        assert!(parts.iter().any(|p| p.path == "system/network.json"
            && matches!(&p.producer, Producer::Command { argv, .. } if argv[0] == "ip")));
        assert!(parts.iter().all(|p| !p.source.is_empty()));
    }
}
