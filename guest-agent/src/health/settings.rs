//! The `[health]` section of the agent's config: how often the checks run, where they
//! look, and the thresholds they judge by. Every key has a default, so an absent section
//! means "all twelve checks, every 10 s, metrics on 127.0.0.1:9273".

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Run the checks at all.
    pub enabled: bool,
    /// Seconds between runs.
    pub interval_s: u64,
    /// A check that has not finished after this long is cut off and reported `unknown`.
    pub check_timeout_ms: u64,
    /// The full report goes to the broker when a status changes, on connect, and at
    /// least this often (so its figures stay fresh there).
    pub report_every_s: u64,
    /// `host:port` of the Prometheus endpoint (`GET /metrics`); empty: no endpoint.
    pub metrics_listen: String,
    /// The file system holding the operating system.
    pub system_disk: PathBuf,
    /// The file system holding the database; default: the database's `data_root`
    /// (or the agent's state directory on a VM without a database).
    pub data_disk: Option<PathBuf>,
    /// The shadow password file whose accounts are checked for expiry.
    pub shadow_file: PathBuf,
    /// Accounts to check; empty: every account that has a usable password.
    pub accounts: Vec<String>,
    /// `chronyc`, used for chrony's tracking when it is installed.
    pub chronyc: PathBuf,
    /// The role the database should have: `primary` or `replica`.
    pub expected_role: String,
    pub telegraf: TelegrafSettings,
    pub thresholds: Thresholds,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_s: 10,
            check_timeout_ms: 5_000,
            report_every_s: 60,
            metrics_listen: "127.0.0.1:9273".into(),
            system_disk: PathBuf::from("/"),
            data_disk: None,
            shadow_file: PathBuf::from("/etc/shadow"),
            accounts: Vec::new(),
            chronyc: PathBuf::from("/usr/bin/chronyc"),
            expected_role: "primary".into(),
            telegraf: TelegrafSettings::default(),
            thresholds: Thresholds::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelegrafSettings {
    /// Process name (`/proc/<pid>/comm`) of the metrics agent.
    pub process_name: String,
    /// A file Telegraf writes on every flush (its `outputs.file`), if any: its age tells
    /// whether the output is fresh.
    pub output_file: Option<PathBuf>,
    /// Output older than this is stale.
    pub max_output_age_s: u64,
}

impl Default for TelegrafSettings {
    fn default() -> Self {
        Self {
            process_name: "telegraf".into(),
            output_file: None,
            max_output_age_s: 120,
        }
    }
}

/// Where each check turns from ok to warning to critical.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    pub disk_warning_pct: f64,
    pub disk_critical_pct: f64,
    pub inodes_warning_pct: f64,
    pub inodes_critical_pct: f64,
    /// Predicted time to full (from the growth over `disk_growth_window_s`).
    pub disk_full_warning_h: f64,
    pub disk_full_critical_h: f64,
    /// Growth is measured over at most this window…
    pub disk_growth_window_s: u64,
    /// …and predicts a time to full only once it spans at least this long (a short burst
    /// of writes must not page anyone).
    pub disk_growth_min_span_s: u64,
    /// CPU utilisation averaged over `cpu_window_s`.
    pub cpu_warning_pct: f64,
    pub cpu_critical_pct: f64,
    pub cpu_window_s: u64,
    /// 5-minute load average per core.
    pub load_warning_per_core: f64,
    pub load_critical_per_core: f64,
    pub connections_warning_pct: f64,
    pub connections_critical_pct: f64,
    /// Samples older than this many check intervals are stale.
    pub metrics_stale_intervals: u32,
    /// The kernel's maximum clock error.
    pub ntp_warning_ms: f64,
    pub ntp_critical_ms: f64,
    /// Share of the data disk taken by WAL / binary logs.
    pub binlog_warning_pct: f64,
    pub binlog_critical_pct: f64,
    /// Age of the newest archived log while logs wait to be archived.
    pub archive_warning_s: u64,
    pub archive_critical_s: u64,
    pub replication_lag_warning_s: f64,
    pub replication_lag_critical_s: f64,
    /// Days before a password expires.
    pub password_warning_days: i64,
    pub password_critical_days: i64,
    /// Days before the fleet CA certificate runs out (connectivity check): every agent
    /// certificate dies with it, so the fleet needs a new CA well before.
    pub ca_warning_days: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            disk_warning_pct: 80.0,
            disk_critical_pct: 90.0,
            inodes_warning_pct: 80.0,
            inodes_critical_pct: 90.0,
            disk_full_warning_h: 24.0,
            disk_full_critical_h: 4.0,
            disk_growth_window_s: 3600,
            disk_growth_min_span_s: 600,
            cpu_warning_pct: 85.0,
            cpu_critical_pct: 95.0,
            cpu_window_s: 300,
            load_warning_per_core: 2.0,
            load_critical_per_core: 4.0,
            connections_warning_pct: 80.0,
            connections_critical_pct: 95.0,
            metrics_stale_intervals: 3,
            ntp_warning_ms: 100.0,
            ntp_critical_ms: 1000.0,
            binlog_warning_pct: 25.0,
            binlog_critical_pct: 50.0,
            archive_warning_s: 900,
            archive_critical_s: 3600,
            replication_lag_warning_s: 30.0,
            replication_lag_critical_s: 300.0,
            password_warning_days: 14,
            password_critical_days: 3,
            ca_warning_days: 30,
        }
    }
}

impl HealthSettings {
    /// Checks the section; returns the key that is wrong and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, p: String| Err((format!("health.{k}"), p));
        if !(1..=3600).contains(&self.interval_s) {
            return bad(
                "interval_s",
                format!("{} is outside 1..3600", self.interval_s),
            );
        }
        if !(100..=600_000).contains(&self.check_timeout_ms) {
            return bad(
                "check_timeout_ms",
                format!("{} is outside 100..600000", self.check_timeout_ms),
            );
        }
        if self.check_timeout_ms > self.interval_s * 1000 {
            return bad(
                "check_timeout_ms",
                format!(
                    "{} ms is longer than the interval ({} s): runs would overlap",
                    self.check_timeout_ms, self.interval_s
                ),
            );
        }
        if self.report_every_s < self.interval_s {
            return bad(
                "report_every_s",
                format!(
                    "{} is shorter than interval_s ({})",
                    self.report_every_s, self.interval_s
                ),
            );
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(
                "metrics_listen",
                format!(
                    "{:?} is not ip:port (for example 127.0.0.1:9273; empty turns the endpoint off)",
                    self.metrics_listen
                ),
            );
        }
        if !self.system_disk.is_absolute() {
            return bad("system_disk", "must be an absolute path".into());
        }
        if matches!(&self.data_disk, Some(p) if !p.is_absolute()) {
            return bad("data_disk", "must be an absolute path".into());
        }
        if !self.shadow_file.is_absolute() {
            return bad("shadow_file", "must be an absolute path".into());
        }
        if !matches!(self.expected_role.as_str(), "primary" | "replica") {
            return bad(
                "expected_role",
                format!("{:?}: must be primary or replica", self.expected_role),
            );
        }
        if self.telegraf.process_name.is_empty() || self.telegraf.process_name.len() > 15 {
            return bad(
                "telegraf.process_name",
                "must be 1 to 15 characters (the kernel's process name limit)".into(),
            );
        }
        let t = &self.thresholds;
        let pairs: [(&str, f64, f64, f64); 9] = [
            ("disk", t.disk_warning_pct, t.disk_critical_pct, 100.0),
            ("inodes", t.inodes_warning_pct, t.inodes_critical_pct, 100.0),
            ("cpu", t.cpu_warning_pct, t.cpu_critical_pct, 100.0),
            (
                "connections",
                t.connections_warning_pct,
                t.connections_critical_pct,
                100.0,
            ),
            ("binlog", t.binlog_warning_pct, t.binlog_critical_pct, 100.0),
            (
                "load",
                t.load_warning_per_core,
                t.load_critical_per_core,
                f64::MAX,
            ),
            ("ntp", t.ntp_warning_ms, t.ntp_critical_ms, f64::MAX),
            (
                "replication_lag",
                t.replication_lag_warning_s,
                t.replication_lag_critical_s,
                f64::MAX,
            ),
            (
                "archive",
                t.archive_warning_s as f64,
                t.archive_critical_s as f64,
                f64::MAX,
            ),
        ];
        for (name, w, c, max) in pairs {
            if !(w.is_finite() && c.is_finite() && w > 0.0 && w <= c && c <= max) {
                return bad(
                    &format!("thresholds.{name}_*"),
                    format!("warning {w} and critical {c} must be positive, warning ≤ critical, at most {max}"),
                );
            }
        }
        if !(t.disk_full_critical_h > 0.0 && t.disk_full_critical_h <= t.disk_full_warning_h) {
            return bad(
                "thresholds.disk_full_*",
                "critical hours must be positive and at most the warning hours".into(),
            );
        }
        if t.password_critical_days < 0 || t.password_critical_days > t.password_warning_days {
            return bad(
                "thresholds.password_*",
                "critical days must be ≥ 0 and at most the warning days".into(),
            );
        }
        if t.disk_growth_window_s < self.interval_s * 2 {
            return bad(
                "thresholds.disk_growth_window_s",
                "must span at least two check intervals".into(),
            );
        }
        if t.metrics_stale_intervals == 0 {
            return bad("thresholds.metrics_stale_intervals", "must be ≥ 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(text: &str) -> String {
        let s: HealthSettings = toml::from_str(text).expect("parses");
        match s.validate() {
            Ok(()) => String::new(),
            Err((k, _)) => k,
        }
    }

    #[test]
    fn defaults_are_valid_and_each_mistake_names_its_key() {
        assert_eq!(key_of(""), "");
        assert_eq!(key_of("interval_s = 0"), "health.interval_s");
        assert_eq!(
            key_of("interval_s = 1\ncheck_timeout_ms = 5000"),
            "health.check_timeout_ms"
        );
        assert_eq!(key_of("report_every_s = 5"), "health.report_every_s");
        assert_eq!(
            key_of("metrics_listen = \"localhost\""),
            "health.metrics_listen"
        );
        assert_eq!(key_of("metrics_listen = \"\""), "");
        assert_eq!(key_of("shadow_file = \"shadow\""), "health.shadow_file");
        assert_eq!(key_of("expected_role = \"leader\""), "health.expected_role");
        assert_eq!(
            key_of("[thresholds]\ndisk_warning_pct = 95.0\ndisk_critical_pct = 90.0"),
            "health.thresholds.disk_*"
        );
        assert_eq!(
            key_of("[telegraf]\nprocess_name = \"a-very-long-process-name\""),
            "health.telegraf.process_name"
        );
        assert!(toml::from_str::<HealthSettings>("surprise = 1").is_err());
    }
}
