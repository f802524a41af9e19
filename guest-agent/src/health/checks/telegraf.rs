//! Check 8, Telegraf service: the metrics agent runs and its output is fresh. Telegraf is
//! configurable (`health.telegraf`); an absent Telegraf is a clear warning.

use crate::health::{duration, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;

pub struct Telegraf;

/// Pids whose kernel process name is `name` (scans `/proc`, blocking).
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

#[async_trait]
impl Check for Telegraf {
    fn id(&self) -> &'static str {
        "telegraf"
    }

    async fn run(&self, run: &Run) -> Finding {
        let s = run.settings().telegraf.clone();
        let now_ms = run.at_ms;
        let found = tokio::task::spawn_blocking(move || {
            let pids = pids_named(&s.process_name);
            let age = s.output_file.as_ref().map(|f| {
                std::fs::metadata(f)
                    .and_then(|m| m.modified())
                    .map(|t| {
                        let ms = t
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64);
                        (now_ms - ms).max(0) as f64 / 1000.0
                    })
                    .map_err(|e| format!("{}: {e}", f.display()))
            });
            (s, pids, age)
        })
        .await;
        let Ok((s, pids, age)) = found else {
            return Finding::unknown("cannot look for the Telegraf process");
        };
        let name = &s.process_name;
        if pids.is_empty() {
            return Finding::new(
                HealthStatus::Warning,
                format!("Telegraf is not running (no process named {name:?}): metrics are not shipped; install and start the telegraf service, or set health.telegraf.process_name"),
            )
            .figure("running", 0.0);
        }
        let pid = pids[0];
        match age {
            None => Finding::ok(format!(
                "Telegraf is running (pid {pid}); its output is not watched (set health.telegraf.output_file to check freshness)"
            ))
            .figures([("running", 1.0), ("pid", f64::from(pid))]),
            Some(Err(e)) => Finding::new(
                HealthStatus::Warning,
                format!("Telegraf is running (pid {pid}) but its output file cannot be read: {e}"),
            )
            .figures([("running", 1.0), ("pid", f64::from(pid))]),
            Some(Ok(a)) if a > s.max_output_age_s as f64 => Finding::new(
                HealthStatus::Warning,
                format!(
                    "Telegraf is running (pid {pid}) but its output is {} old (limit {}): it may be stuck; see its log",
                    duration(a),
                    duration(s.max_output_age_s as f64)
                ),
            )
            .figures([("running", 1.0), ("pid", f64::from(pid)), ("output_age_s", a)]),
            Some(Ok(a)) => Finding::ok(format!(
                "Telegraf is running (pid {pid}); output written {} ago",
                duration(a)
            ))
            .figures([("running", 1.0), ("pid", f64::from(pid)), ("output_age_s", a)]),
        }
    }
}
