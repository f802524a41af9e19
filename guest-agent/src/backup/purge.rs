//! The purger: removes expired chains from the bucket, daily at a set time (12:00 UTC by
//! default, as DSM does) and on `backup.purge`.
//!
//! DSM's rules: a chain takes incrementals until its expiry (creation + retention days),
//! then a new chain starts; a chain is purged only once its LAST backup has expired too
//! (that backup's creation + retention days), so every backup stays restorable for the
//! whole retention. The newest chain is never purged, expired or not: the newest
//! restore point needs it.

use super::{day_ms, Chain};
use serde::Serialize;
use std::time::Duration;

/// What the purger decided for one chain.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub full: String,
    pub purge: bool,
    /// When the chain's last backup expires (it may be purged from then on).
    pub purgeable_from_ms: i64,
    pub why: String,
}

/// The decision for every chain, oldest first.
pub fn plan(chains: &[Chain], retention_days: u32, now_ms: i64) -> Vec<Decision> {
    let newest = chains.len().saturating_sub(1);
    chains
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let last = c
                .backups
                .iter()
                .map(|b| b.started_ms)
                .max()
                .unwrap_or(c.created_ms);
            let from = last + i64::from(retention_days) * day_ms();
            let (purge, why) = if i == newest {
                (
                    false,
                    "the newest chain: the newest restore point needs it".to_string(),
                )
            } else if now_ms < from {
                (
                    false,
                    format!("its last backup is kept for {retention_days} days after it was taken"),
                )
            } else {
                (
                    true,
                    format!("its last backup is older than {retention_days} days"),
                )
            };
            Decision {
                full: c.full.clone(),
                purge,
                purgeable_from_ms: from,
                why,
            }
        })
        .collect()
}

/// How long from `now_ms` until the next `hh:mm` UTC.
pub fn until_next(now_ms: i64, hh: u32, mm: u32) -> Duration {
    let day = 86_400_000i64;
    let at = i64::from(hh * 3600 + mm * 60) * 1000;
    let into_day = now_ms.rem_euclid(day);
    let wait = if into_day < at {
        at - into_day
    } else {
        day - into_day + at
    };
    Duration::from_millis(wait as u64)
}

/// `HH:MM`, 24-hour, UTC.
pub fn parse_at(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not a time of day as HH:MM (24-hour, UTC), e.g. \"12:00\"");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || s.len() != 5 {
        return Err(bad());
    }
    Ok((h, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::pgbackrest::BackupSet;
    use crate::backup::{chains, DAY_MS};

    fn set(label: &str, kind: &str, started_ms: i64) -> BackupSet {
        BackupSet::for_test(label, kind, started_ms, started_ms + 1000, 10, false)
    }

    #[test]
    fn a_chain_goes_only_when_its_last_backup_expired_and_never_the_newest() {
        let d = DAY_MS;
        let b = vec![
            set("F1", "full", 0),
            set("I1", "incr", 6 * d),
            set("F2", "full", 8 * d),
            set("I2", "incr", 9 * d),
        ];
        let c = chains(&b, 7);
        assert_eq!(c.len(), 2);
        // Day 10: chain 1 expired as a chain (day 7) but its incremental of day 6 is kept
        // until day 13.
        let p = plan(&c, 7, 10 * d);
        assert_eq!((p[0].purge, p[0].purgeable_from_ms), (false, 13 * d));
        assert!(!p[1].purge);
        let p = plan(&c, 7, 13 * d);
        assert!(p[0].purge, "{p:?}");
        // Long after everything expired, the newest chain stays.
        let p = plan(&c, 7, 100 * d);
        assert!(p[0].purge && !p[1].purge, "{p:?}");
        assert!(p[1].why.contains("newest"));
        assert!(plan(&[], 7, 0).is_empty());
    }

    #[test]
    fn the_daily_run_is_at_the_set_time_utc() {
        let h = 3_600_000i64;
        assert_eq!(
            until_next(10 * h, 12, 0),
            Duration::from_millis(2 * h as u64)
        );
        assert_eq!(
            until_next(12 * h, 12, 0),
            Duration::from_millis(24 * h as u64)
        );
        assert_eq!(
            until_next(13 * h, 12, 30),
            Duration::from_millis((23 * h + h / 2) as u64)
        );
        assert_eq!(parse_at("12:00"), Ok((12, 0)));
        assert!(parse_at("24:00").is_err());
        assert!(parse_at("12").unwrap_err().contains("HH:MM"));
        assert!(parse_at("1:00").is_err());
    }
}
