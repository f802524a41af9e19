//! Check 12, VM password expiry: days until the passwords of the VM's local accounts expire,
//! with `/etc/shadow` semantics (last change + maximum age; the account's own expiry
//! date; a forced change). The file is configurable so tests use a throwaway copy.

use crate::health::{Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;

pub struct PasswordExpiry;

/// One account's expiry, in days from today (negative: already expired).
#[derive(Clone, Debug, PartialEq)]
pub struct Expiry {
    pub account: String,
    pub days_left: i64,
    /// What expires: `password`, `account`, or `password (change forced)`.
    pub what: &'static str,
}

/// Parses shadow lines; `today` in days since the epoch. Accounts without a usable
/// password (locked `!`/`*`, empty) are skipped unless named in `only`.
pub fn expiries(text: &str, today: i64, only: &[String]) -> (usize, Vec<Expiry>) {
    let mut checked = 0;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 8 || line.starts_with('#') {
            continue;
        }
        let (name, pw) = (f[0], f[1]);
        let listed = only.iter().any(|a| a == name);
        if !only.is_empty() && !listed {
            continue;
        }
        let usable = !(pw.is_empty() || pw.starts_with('!') || pw.starts_with('*'));
        if !usable && !listed {
            continue;
        }
        checked += 1;
        let num = |s: &str| s.trim().parse::<i64>().ok();
        let last = num(f[2]);
        let max = num(f[4]).filter(|m| *m < 99_999);
        if last == Some(0) {
            out.push(Expiry {
                account: name.into(),
                days_left: 0,
                what: "password (change forced)",
            });
        } else if let (Some(last), Some(max)) = (last, max) {
            out.push(Expiry {
                account: name.into(),
                days_left: last + max - today,
                what: "password",
            });
        }
        if let Some(exp) = num(f[7]) {
            out.push(Expiry {
                account: name.into(),
                days_left: exp - today,
                what: "account",
            });
        }
    }
    out.sort_by_key(|e| e.days_left);
    (checked, out)
}

fn date(days: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(days * 86_400)
        .map(|d| d.date().to_string())
        .unwrap_or_default()
}

#[async_trait]
impl Check for PasswordExpiry {
    fn id(&self) -> &'static str {
        "password_expiry"
    }

    async fn run(&self, run: &Run) -> Finding {
        let path = run.settings().shadow_file.clone();
        let p = path.clone();
        let text = match tokio::task::spawn_blocking(move || std::fs::read_to_string(p)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Finding::unknown(format!(
                    "cannot read {}: {e} (the agent runs as root to read it; or set health.shadow_file)",
                    path.display()
                ))
            }
            Err(e) => return Finding::unknown(format!("cannot read {}: {e}", path.display())),
        };
        let today = run.at_ms.div_euclid(86_400_000);
        let accounts = &run.settings().accounts;
        let (checked, list) = expiries(&text, today, accounts);
        if let Some(missing) = accounts.iter().find(|a| {
            !text
                .lines()
                .any(|l| l.split(':').next() == Some(a.as_str()))
        }) {
            return Finding::new(
                HealthStatus::Warning,
                format!(
                    "account {missing:?} (health.accounts) is not in {}",
                    path.display()
                ),
            );
        }
        let t = &run.settings().thresholds;
        let Some(first) = list.first() else {
            return Finding::ok(format!(
                "no password expires: {checked} account(s) with a password checked in {}",
                path.display()
            ))
            .figure("accounts_checked", checked as f64);
        };
        let status = if first.days_left <= t.password_critical_days {
            HealthStatus::Critical
        } else if first.days_left <= t.password_warning_days {
            HealthStatus::Warning
        } else {
            HealthStatus::Ok
        };
        let when = |e: &Expiry| {
            if e.days_left < 0 {
                format!(
                    "{}'s {} EXPIRED {} days ago ({})",
                    e.account,
                    e.what,
                    -e.days_left,
                    date(today + e.days_left)
                )
            } else if e.days_left == 0 {
                format!("{}'s {} expires today", e.account, e.what)
            } else {
                format!(
                    "{}'s {} expires in {} days ({})",
                    e.account,
                    e.what,
                    e.days_left,
                    date(today + e.days_left)
                )
            }
        };
        let mut msg = when(first);
        let others: Vec<String> = list
            .iter()
            .skip(1)
            .filter(|e| e.days_left <= t.password_warning_days)
            .map(when)
            .collect();
        if !others.is_empty() {
            msg.push_str(&format!("; {}", others.join("; ")));
        }
        if status > HealthStatus::Ok {
            msg.push_str(": change it with passwd, or adjust the policy with chage");
        }
        Finding::new(status, msg).figures([
            ("min_days_left", first.days_left as f64),
            ("accounts_checked", checked as f64),
            (
                "accounts_expiring",
                list.iter()
                    .filter(|e| e.days_left <= t.password_warning_days)
                    .count() as f64,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_semantics() {
        let today = 20_000;
        let text = "root:$y$hash:19990:0:30:7:::\n\
                    daemon:*:19000:0:99999:7:::\n\
                    locked:!$y$x:19000:0:10:7:::\n\
                    forced:$y$h:0:0:99999:7:::\n\
                    never:$y$h:19000:0:99999:7:::\n\
                    acct:$y$h:19000:0:99999:7::20005:\n";
        let (checked, list) = expiries(text, today, &[]);
        assert_eq!(checked, 4, "root, forced, never, acct");
        assert_eq!(
            list[0],
            Expiry {
                account: "forced".into(),
                days_left: 0,
                what: "password (change forced)"
            }
        );
        assert!(list.contains(&Expiry {
            account: "root".into(),
            days_left: 20,
            what: "password"
        }));
        assert!(list.contains(&Expiry {
            account: "acct".into(),
            days_left: 5,
            what: "account"
        }));
        // A locked account is checked when named.
        let (checked, list) = expiries(text, today, &["locked".into()]);
        assert_eq!(checked, 1);
        assert_eq!(list[0].days_left, 19_010 - today);
    }
}
