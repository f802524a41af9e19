//! Check 7, NTP sync: the kernel's own view of clock synchronisation (`adjtimex`: the unsynced
//! flag, estimated and maximum error) and, where chrony runs, its tracking.

use crate::health::{grade, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;
use std::time::Duration;

pub struct Ntp;

/// What the kernel says about its clock.
#[derive(Clone, Copy, Debug)]
pub struct KernelClock {
    pub synced: bool,
    pub max_error_ms: f64,
    pub est_error_ms: f64,
    pub offset_ms: f64,
}

/// Reads the kernel's clock state with `adjtimex` in read-only mode. No crate wraps this
/// call (nix and rustix have no adjtimex), hence the one audited `unsafe` block.
#[allow(unsafe_code)]
pub fn kernel_clock() -> Option<KernelClock> {
    // SAFETY: `timex` is plain old data, so all-zero is a valid value; with `modes == 0`
    // adjtimex only reads kernel state into the buffer, which lives for the whole call.
    let (state, tx) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        (state, tx)
    };
    if state < 0 {
        return None;
    }
    // STA_NANO: the offset is in ns instead of µs.
    let offset_ms = if tx.status & libc::STA_NANO != 0 {
        tx.offset as f64 / 1e6
    } else {
        tx.offset as f64 / 1e3
    };
    Some(KernelClock {
        synced: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        max_error_ms: tx.maxerror as f64 / 1e3,
        est_error_ms: tx.esterror as f64 / 1e3,
        offset_ms,
    })
}

/// chrony's view (`chronyc -c tracking`): (reference, stratum, offset ms, leap status).
async fn chrony(chronyc: &std::path::Path) -> Option<Result<(String, f64, f64, String), String>> {
    if !chronyc.exists() {
        return None;
    }
    let out = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::process::Command::new(chronyc)
            .args(["-c", "-n", "tracking"])
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let out = match out {
        Err(_) => return Some(Err("chronyc did not answer within 2 s".into())),
        Ok(Err(e)) => return Some(Err(format!("cannot run {}: {e}", chronyc.display()))),
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Some(Err(format!("chronyc: {err} (is chronyd running?)")));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.trim().split(',').collect();
    if f.len() < 14 {
        return Some(Err(format!("unexpected chronyc output: {}", text.trim())));
    }
    let stratum = f[2].parse().unwrap_or(f64::NAN);
    let offset_ms = f[4].parse::<f64>().map_or(f64::NAN, |s| s * 1e3);
    Some(Ok((
        f[1].to_string(),
        stratum,
        offset_ms,
        f[13].to_string(),
    )))
}

#[async_trait]
impl Check for Ntp {
    fn id(&self) -> &'static str {
        "ntp_sync"
    }

    async fn run(&self, run: &Run) -> Finding {
        let t = &run.settings().thresholds;
        let Some(k) = kernel_clock() else {
            return Finding::unknown(
                "the kernel refused adjtimex; cannot tell whether the clock is synchronised",
            );
        };
        let mut status = if k.synced {
            grade(k.max_error_ms, t.ntp_warning_ms, t.ntp_critical_ms)
        } else {
            HealthStatus::Critical
        };
        let mut msg = if k.synced {
            format!(
                "the kernel clock is synchronised: estimated error {:.1} ms, maximum {:.0} ms",
                k.est_error_ms, k.max_error_ms
            )
        } else {
            format!(
                "the kernel clock is NOT synchronised (no time service has disciplined it; maximum error {:.1} s): signed commands and backups depend on the time; start chronyd and check its sources",
                k.max_error_ms / 1e3
            )
        };
        let mut figures = vec![
            ("synced", f64::from(u8::from(k.synced))),
            ("max_error_ms", k.max_error_ms),
            ("est_error_ms", k.est_error_ms),
            ("offset_ms", k.offset_ms),
        ];
        match chrony(&run.settings().chronyc).await {
            None => {}
            Some(Ok((reference, stratum, offset_ms, leap))) => {
                msg.push_str(&format!(
                    "; chrony follows {reference} (stratum {stratum:.0}), offset {offset_ms:.3} ms, leap status {leap}"
                ));
                if leap.eq_ignore_ascii_case("Not synchronised") {
                    status = status.max(HealthStatus::Critical);
                }
                figures.push(("chrony_offset_ms", offset_ms));
                figures.push(("chrony_stratum", stratum));
            }
            Some(Err(e)) => {
                msg.push_str(&format!("; {e}"));
                status = status.max(HealthStatus::Warning);
            }
        }
        Finding::new(status, msg).figures(figures)
    }
}
