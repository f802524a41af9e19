//! The manifest of a MariaDB backup chain: one JSON object per chain in the bucket
//! (`<prefix>/chains/<chain>/manifest.json`), rewritten after each backup and each batch of
//! uploaded binlogs. It lists the backups (object, size, SHA-256, LSN range, binlog
//! position, GTID, times) and the binlogs that follow them (object, size, SHA-256, first
//! and last event time), so that a restore knows exactly what to fetch, checks every byte
//! against it, and sees a missing binlog as a gap instead of replaying past it.
//!
//! This module is pure: what a restore to a time needs ([`plan`]) and the window a chain
//! can reach ([`window`]) are computed from manifests alone.

use serde::{Deserialize, Serialize};

/// Format of the manifest (bumped when a reader of an older agent would misread it).
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub engine: String,
    /// The chain's name: its full backup's label.
    pub chain: String,
    pub created_ms: i64,
    /// Full first, then its incrementals in order.
    pub backups: Vec<Backup>,
    /// Rotated binlogs uploaded while this chain was the newest, in order.
    pub binlogs: Vec<Binlog>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Backup {
    pub label: String,
    /// `full` or `incr`.
    pub kind: String,
    /// The object, relative to the prefix.
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub from_lsn: u64,
    pub to_lsn: u64,
    /// Binlog file and position at the backup's consistent point.
    pub binlog_file: Option<String>,
    pub binlog_pos: Option<u64>,
    pub gtid: Option<String>,
    pub started_ms: i64,
    pub stopped_ms: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Binlog {
    /// The server's file name (`binlog.000007`).
    pub name: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// Time of its first and last event (one-second resolution, as binlogs have it).
    pub first_event_ms: i64,
    pub last_event_ms: i64,
    pub uploaded_ms: i64,
}

/// The sequence number of a binlog file (`binlog.000007` → 7).
pub fn seq(name: &str) -> Option<u64> {
    name.rsplit_once('.')?.1.parse().ok()
}

/// The binlogs of `m` that follow `from` without a gap (`from` itself first), in order.
pub fn run_from<'a>(m: &'a Manifest, from: &str) -> Vec<&'a Binlog> {
    let mut out: Vec<&Binlog> = Vec::new();
    let Some(mut want) = seq(from) else {
        return out;
    };
    let mut logs: Vec<&Binlog> = m.binlogs.iter().collect();
    logs.sort_by_key(|b| seq(&b.name));
    for b in logs {
        match seq(&b.name) {
            Some(s) if s == want => {
                out.push(b);
                want += 1;
            }
            Some(s) if s < want => {}
            _ => break,
        }
    }
    out
}

/// How far a backup reaches: the last event of the gap-free binlogs that follow it, or
/// its own end.
pub fn reach(m: &Manifest, b: &Backup) -> i64 {
    let logs = b
        .binlog_file
        .as_deref()
        .map(|f| run_from(m, f))
        .unwrap_or_default();
    logs.last()
        .map_or(b.stopped_ms, |l| l.last_event_ms.max(b.stopped_ms))
}

/// The window a restore can reach with the chains in `manifests`: from the end of the
/// first backup to the furthest point any backup reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    pub from_ms: i64,
    pub to_ms: i64,
}

pub fn window(manifests: &[Manifest]) -> Option<Window> {
    let from = manifests
        .iter()
        .flat_map(|m| m.backups.iter().map(|b| b.stopped_ms))
        .min()?;
    let to = manifests
        .iter()
        .flat_map(|m| m.backups.iter().map(move |b| reach(m, b)))
        .max()?;
    Some(Window {
        from_ms: from,
        to_ms: to,
    })
}

/// What a restore fetches and replays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub chain: String,
    /// The full backup and the incrementals up to the chosen one, in order.
    pub backups: Vec<Backup>,
    /// The binlogs to replay after them, from the chosen backup's file, in order.
    pub binlogs: Vec<Binlog>,
    pub start_file: Option<String>,
    pub start_pos: Option<u64>,
    /// Replay stops before this time (`None`: everything uploaded).
    pub stop_ms: Option<i64>,
    /// The point the restore reaches.
    pub reached_ms: i64,
}

/// The newest backup that ends at or before `target` (`None`: latest) and whose binlogs
/// reach the target, with what it needs. Refused with the recoverable window when no
/// backup can get there.
pub fn plan(manifests: &[Manifest], target: Option<i64>) -> Result<Plan, String> {
    let Some(w) = window(manifests) else {
        return Err(
            "the bucket holds no MariaDB backup under this prefix: nothing can be restored".into(),
        );
    };
    let describe = |w: Window| {
        format!(
            "the recoverable window is {} to {}",
            super::restore::rfc3339(w.from_ms),
            super::restore::rfc3339(w.to_ms)
        )
    };
    let want = target.unwrap_or(w.to_ms);
    let mut best: Option<(&Manifest, usize)> = None;
    for m in manifests {
        for (i, b) in m.backups.iter().enumerate() {
            if b.stopped_ms <= want && reach(m, b) >= want {
                let better = best.is_none_or(|(bm, bi)| bm.backups[bi].stopped_ms < b.stopped_ms);
                if better {
                    best = Some((m, i));
                }
            }
        }
    }
    let Some((m, i)) = best else {
        let when = match target {
            Some(t) if t < w.from_ms => "before the first backup",
            Some(t) if t > w.to_ms => "after the newest uploaded binlog",
            Some(_) => "in a gap between chains (a binlog is missing)",
            None => "not reachable",
        };
        return Err(format!(
            "target {} is {when}: {}",
            target.map_or("latest".into(), super::restore::rfc3339),
            describe(w)
        ));
    };
    let chosen = &m.backups[i];
    if m.backups[0].kind != "full" {
        return Err(format!(
            "chain {} does not start with a full backup: its manifest is damaged",
            m.chain
        ));
    }
    let mut binlogs: Vec<Binlog> = Vec::new();
    if let Some(f) = &chosen.binlog_file {
        for l in run_from(m, f) {
            binlogs.push(l.clone());
            if target.is_some_and(|t| l.last_event_ms >= t) {
                break;
            }
        }
    }
    let reached = match target {
        Some(t) => t,
        None => reach(m, chosen),
    };
    Ok(Plan {
        chain: m.chain.clone(),
        backups: m.backups[..=i].to_vec(),
        binlogs,
        start_file: chosen.binlog_file.clone(),
        start_pos: chosen.binlog_pos,
        stop_ms: target,
        reached_ms: reached,
    })
}

/// The binlog position and GTID in mariabackup's `xtrabackup_info`:
/// `binlog_pos = filename 'binlog.000002', position '385', GTID of the last change '0-1-2'`.
pub fn parse_binlog_pos(info: &str) -> (Option<String>, Option<u64>, Option<String>) {
    let Some(line) = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("binlog_pos = "))
    else {
        return (None, None, None);
    };
    let quoted: Vec<&str> = line.split('\'').skip(1).step_by(2).collect();
    (
        quoted
            .first()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty()),
        quoted.get(1).and_then(|s| s.parse().ok()),
        quoted
            .get(2)
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty()),
    )
}

/// `from_lsn` and `to_lsn` of mariabackup's `xtrabackup_checkpoints`.
pub fn parse_checkpoints(text: &str) -> Result<(u64, u64), String> {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| {
                let (key, v) = l.split_once('=')?;
                (key.trim() == k).then(|| v.trim().parse::<u64>().ok())?
            })
            .ok_or_else(|| format!("xtrabackup_checkpoints has no {k}"))
    };
    Ok((get("from_lsn")?, get("to_lsn")?))
}

/// The times of a binlog's first and last event (ms), read from the event headers (a
/// binlog is the magic `\xfebin` and then events whose 19-byte header starts with a
/// 4-byte timestamp and holds the event's length at offset 9). Hand-written: no crate
/// reads MariaDB binlogs, and only the headers are walked (seeks, not reads, of the
/// events themselves).
pub fn binlog_times(path: &std::path::Path) -> std::io::Result<(i64, i64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)?;
    if magic != *b"\xfebin" {
        return Err(std::io::Error::other("not a binlog (no \\xfebin magic)"));
    }
    let (mut first, mut last) = (None, 0i64);
    let mut pos = 4u64;
    let mut h = [0u8; 19];
    while pos + 19 <= len {
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut h)?;
        let ts = i64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]])) * 1000;
        let size = u64::from(u32::from_le_bytes([h[9], h[10], h[11], h[12]]));
        if size < 19 {
            break;
        }
        if ts > 0 {
            first.get_or_insert(ts);
            last = last.max(ts);
        }
        pos += size;
    }
    Ok((first.unwrap_or(last), last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(label: &str, kind: &str, stopped: i64, file: &str) -> Backup {
        Backup {
            label: label.into(),
            kind: kind.into(),
            key: format!("chains/c/{label}"),
            size: 1,
            sha256: "00".into(),
            from_lsn: 0,
            to_lsn: 1,
            binlog_file: Some(file.into()),
            binlog_pos: Some(385),
            gtid: None,
            started_ms: stopped - 10,
            stopped_ms: stopped,
        }
    }

    fn log(name: &str, first: i64, last: i64) -> Binlog {
        Binlog {
            name: name.into(),
            key: format!("binlog/{name}"),
            size: 1,
            sha256: "00".into(),
            first_event_ms: first,
            last_event_ms: last,
            uploaded_ms: last,
        }
    }

    fn chain() -> Manifest {
        Manifest {
            version: VERSION,
            engine: "mariadb".into(),
            chain: "F1".into(),
            created_ms: 990,
            backups: vec![
                backup("F1", "full", 1000, "binlog.000002"),
                backup("I1", "incr", 2000, "binlog.000003"),
            ],
            binlogs: vec![
                log("binlog.000002", 900, 1500),
                log("binlog.000003", 1500, 2500),
                log("binlog.000004", 2500, 3000),
            ],
        }
    }

    #[test]
    fn the_plan_takes_the_newest_backup_before_the_target_and_the_binlogs_up_to_it() {
        let m = vec![chain()];
        assert_eq!(
            window(&m),
            Some(Window {
                from_ms: 1000,
                to_ms: 3000
            })
        );
        let p = plan(&m, Some(1200)).unwrap();
        assert_eq!(p.backups.len(), 1);
        assert_eq!(
            p.binlogs
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>(),
            ["binlog.000002"]
        );
        assert_eq!(p.start_pos, Some(385));
        let p = plan(&m, Some(2600)).unwrap();
        assert_eq!(
            p.backups
                .iter()
                .map(|b| b.label.as_str())
                .collect::<Vec<_>>(),
            ["F1", "I1"]
        );
        assert_eq!(
            p.binlogs
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>(),
            ["binlog.000003", "binlog.000004"]
        );
        let latest = plan(&m, None).unwrap();
        assert_eq!(latest.reached_ms, 3000);
        assert_eq!(latest.stop_ms, None);
    }

    #[test]
    fn targets_outside_the_window_or_behind_a_gap_are_refused_with_the_window() {
        let m = vec![chain()];
        let e = plan(&m, Some(500)).unwrap_err();
        assert!(
            e.contains("before the first backup") && e.contains("recoverable window"),
            "{e}"
        );
        let e = plan(&m, Some(5000)).unwrap_err();
        assert!(e.contains("after the newest uploaded binlog"), "{e}");
        // binlog.000003 lost: the incremental still reaches its own end, nothing past it.
        let mut gap = chain();
        gap.binlogs.remove(1);
        assert_eq!(run_from(&gap, "binlog.000002").len(), 1);
        assert_eq!(window(&[gap.clone()]).unwrap().to_ms, 2000);
        assert!(plan(&[gap.clone()], Some(2600)).is_err());
        assert_eq!(plan(&[gap], Some(2000)).unwrap().backups.len(), 2);
        assert!(plan(&[], None).unwrap_err().contains("no MariaDB backup"));
    }

    #[test]
    fn mariabackup_files_are_read() {
        let info = "tool_name = mariabackup\nbinlog_pos = filename 'binlog.000002', position '385', GTID of the last change '0-1-2'\n";
        assert_eq!(
            parse_binlog_pos(info),
            (
                Some("binlog.000002".into()),
                Some(385),
                Some("0-1-2".into())
            )
        );
        assert_eq!(parse_binlog_pos("x = y\n"), (None, None, None));
        let cp = "backup_type = full-backuped\nfrom_lsn = 0\nto_lsn = 47652\nlast_lsn = 47652\n";
        assert_eq!(parse_checkpoints(cp).unwrap(), (0, 47652));
        assert!(parse_checkpoints("x").is_err());
        assert_eq!(seq("binlog.000012"), Some(12));
    }

    #[test]
    fn binlog_event_times_are_read_from_the_headers() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = b"\xfebin".to_vec();
        for (ts, len) in [(100u32, 30u32), (105, 19), (107, 40)] {
            let mut h = vec![0u8; len as usize];
            h[0..4].copy_from_slice(&ts.to_le_bytes());
            h[9..13].copy_from_slice(&len.to_le_bytes());
            bytes.extend(h);
        }
        let p = dir.path().join("binlog.000001");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(binlog_times(&p).unwrap(), (100_000, 107_000));
        std::fs::write(&p, b"junk").unwrap();
        assert!(binlog_times(&p).is_err());
    }
}
