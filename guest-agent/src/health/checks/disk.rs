//! Check 2, Data disk health and check 3, system disk health: usage and its growth (time to full),
//! inodes, a read-only mount, and file-system errors the kernel counts (ext4's
//! `errors_count`, where the file system has one).

use crate::health::{bytes, duration, grade, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Data,
    System,
}

pub struct Disk {
    which: Which,
    /// (ms since the epoch, used bytes) of earlier runs, oldest first.
    history: Mutex<VecDeque<(i64, f64)>>,
}

impl Disk {
    pub fn new(which: Which) -> Self {
        Self {
            which,
            history: Mutex::new(VecDeque::new()),
        }
    }
}

/// What the file system says.
#[derive(Debug)]
pub struct Usage {
    /// The path measured (the nearest existing ancestor of the configured one).
    pub path: PathBuf,
    pub total: f64,
    pub used: f64,
    pub available: f64,
    pub inodes_total: f64,
    pub inodes_used: f64,
    pub read_only: bool,
    pub mount_point: Option<String>,
    pub device: Option<String>,
    pub fs_errors: Option<f64>,
}

fn existing(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent.to_path_buf(),
            None => break,
        }
    }
    p
}

/// Reads usage with `statvfs` and the mount from `/proc/self/mountinfo` (blocking).
pub fn usage(path: &Path) -> Result<Usage, String> {
    let path = existing(path);
    let st = nix::sys::statvfs::statvfs(&path)
        .map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    let frag = st.fragment_size() as f64;
    let total = st.blocks() as f64 * frag;
    let free = st.blocks_free() as f64 * frag;
    let available = st.blocks_available() as f64 * frag;
    let (mount_point, device, fstype, ro_opt) = mount_of(&path).unwrap_or_default();
    let fs_errors = match (&fstype, &device) {
        (Some(t), Some(d)) if t == "ext4" || t == "ext3" => {
            let name = d.rsplit('/').next().unwrap_or(d);
            std::fs::read_to_string(format!("/sys/fs/ext4/{name}/errors_count"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        }
        _ => None,
    };
    Ok(Usage {
        path,
        total,
        used: total - free,
        available,
        inodes_total: st.files() as f64,
        inodes_used: st.files().saturating_sub(st.files_free()) as f64,
        read_only: st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) || ro_opt,
        mount_point,
        device,
        fs_errors,
    })
}

type Mount = (Option<String>, Option<String>, Option<String>, bool);

/// The mount holding `path`: (mount point, source device, fs type, mounted read-only).
fn mount_of(path: &Path) -> Option<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let path = path.canonicalize().ok()?;
    let mut best: Option<(usize, Mount)> = None;
    for line in text.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (Some(mp), Some(opts)) = (f.get(4), f.get(5)) else {
            continue;
        };
        let mp = mp.replace("\\040", " ");
        if path.starts_with(&mp) && best.as_ref().is_none_or(|(len, _)| mp.len() >= *len) {
            let ro = opts.split(',').any(|o| o == "ro");
            best = Some((
                mp.len(),
                (
                    Some(mp.clone()),
                    r.get(1).map(|s| s.to_string()),
                    r.first().map(|s| s.to_string()),
                    ro,
                ),
            ));
        }
    }
    best.map(|(_, m)| m)
}

#[async_trait]
impl Check for Disk {
    fn id(&self) -> &'static str {
        match self.which {
            Which::Data => "data_disk",
            Which::System => "system_disk",
        }
    }

    async fn run(&self, run: &Run) -> Finding {
        let (name, path) = match self.which {
            Which::Data => ("data disk", run.shared.data_disk.clone()),
            Which::System => ("system disk", run.settings().system_disk.clone()),
        };
        let u = match tokio::task::spawn_blocking(move || usage(&path)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return Finding::unknown(format!("cannot measure the {name}: {e}")),
            Err(e) => return Finding::unknown(format!("cannot measure the {name}: {e}")),
        };
        let t = &run.settings().thresholds;
        // df's definition: used against what users can have (root's reserve excluded).
        let pct = if u.used + u.available > 0.0 {
            100.0 * u.used / (u.used + u.available)
        } else {
            0.0
        };
        let inode_pct = if u.inodes_total > 0.0 {
            100.0 * u.inodes_used / u.inodes_total
        } else {
            0.0
        };
        // Growth over the window: from the oldest sample kept to now.
        let (rate, span_s) = {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            let window_ms = t.disk_growth_window_s as i64 * 1000;
            while h.front().is_some_and(|(at, _)| run.at_ms - at > window_ms) {
                h.pop_front();
            }
            let r = match h.front() {
                Some(&(at, used)) if run.at_ms > at => {
                    let span = (run.at_ms - at) as f64 / 1000.0;
                    (Some((u.used - used) / span), span)
                }
                _ => (None, 0.0),
            };
            h.push_back((run.at_ms, u.used));
            r
        };
        // A prediction from a span shorter than `disk_growth_min_span_s` is noise (one
        // burst of writes); it is neither judged nor shown, so the message never predicts
        // "full in 19 min" beside an ok.
        let judged = span_s >= t.disk_growth_min_span_s as f64;
        let ttf = match rate {
            Some(r) if r > 0.0 && judged => Some(u.available / r),
            _ => None,
        };
        let mut status = grade(pct, t.disk_warning_pct, t.disk_critical_pct).max(grade(
            inode_pct,
            t.inodes_warning_pct,
            t.inodes_critical_pct,
        ));
        if let Some(ttf) = ttf {
            let h = ttf / 3600.0;
            status = status.max(if h <= t.disk_full_critical_h {
                HealthStatus::Critical
            } else if h <= t.disk_full_warning_h {
                HealthStatus::Warning
            } else {
                HealthStatus::Ok
            });
        }
        let mut msg = format!(
            "{name} {pct:.0}% full: {} left of {}",
            bytes(u.available),
            bytes(u.total)
        );
        match (rate, ttf) {
            (Some(r), Some(ttf)) => msg.push_str(&format!(
                " at {}/h, full in about {}",
                bytes(r * 3600.0),
                duration(ttf)
            )),
            // A few seconds of a build or a copy say nothing about the trend: no rate in
            // the message until the window is long enough (the figure has it).
            (Some(_), None) if !judged => msg.push_str(&format!(
                "; growth is judged once measured over {}",
                duration(t.disk_growth_min_span_s as f64)
            )),
            (Some(_), None) => msg.push_str(", not growing"),
            (None, _) => {}
        }
        if inode_pct >= t.inodes_warning_pct {
            msg.push_str(&format!("; {inode_pct:.0}% of inodes used"));
        }
        if u.read_only {
            status = HealthStatus::Critical;
            msg.push_str("; MOUNTED READ-ONLY (the kernel remounts after I/O errors: check dmesg)");
        }
        if let Some(n) = u.fs_errors.filter(|n| *n > 0.0) {
            status = HealthStatus::Critical;
            msg.push_str(&format!(
                "; the kernel counted {n:.0} file-system errors on {}: check dmesg and plan an fsck",
                u.device.as_deref().unwrap_or("it")
            ));
        }
        if status >= HealthStatus::Warning && !u.read_only {
            msg.push_str(match self.which {
                Which::Data => ": grow the data disk or free space (old logs, WAL, dumps)",
                Which::System => ": free space on the system disk (logs, old packages)",
            });
        }
        if let Some(mp) = &u.mount_point {
            msg.push_str(&format!(" [{} on {mp}]", u.path.display()));
        }
        Finding::new(status, msg).figures([
            ("total_bytes", u.total),
            ("used_bytes", u.used),
            ("available_bytes", u.available),
            ("used_pct", pct),
            ("inodes_used_pct", inode_pct),
            ("read_only", f64::from(u8::from(u.read_only))),
            ("growth_bytes_per_s", rate.unwrap_or(f64::NAN)),
            ("time_to_full_s", ttf.unwrap_or(f64::NAN)),
            ("fs_errors", u.fs_errors.unwrap_or(f64::NAN)),
        ])
    }
}
