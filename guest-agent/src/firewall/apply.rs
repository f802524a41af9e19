//! Applying the wanted table (skipped when the live one matches; dry run, then one atomic
//! batch, then a read-back), reporting how the live table compares, and removing it.

use super::live::{compare, describe_diff, normalise_live, Normalised};
use super::nft::is_enoent;
use super::{Firewall, FirewallError, FirewallRole, Step, WantedRules};
use serde::Serialize;
use std::time::Instant;

/// What `apply` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    /// The live table already matched; nothing was sent to the kernel.
    Unchanged,
    /// The table was (re)placed.
    Applied,
    /// `firewall.enabled` is false; nothing was read or changed.
    Disabled,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    pub outcome: ApplyOutcome,
    /// The differences the apply corrected (empty unless `Applied`).
    pub corrected: Vec<String>,
    /// Differences still seen after applying. Empty unless this `nft` prints the table
    /// in a form the comparison does not know; the kernel accepted the batch either way.
    pub unverified: Vec<String>,
    pub wanted: WantedRules,
    pub elapsed_ms: u64,
}

impl ApplyReport {
    /// Whether the live table was changed.
    pub fn changed(&self) -> bool {
        self.outcome == ApplyOutcome::Applied
    }
}

/// The live table compared with the wanted one.
#[derive(Clone, Debug, Serialize)]
pub struct FirewallStatus {
    /// `inet <table>`.
    pub table: String,
    pub present: bool,
    pub matches: bool,
    /// Why it does not match, in one line; `None` when it matches.
    pub reason: Option<String>,
    /// Wanted chains and rules that are not live (`chain: rule`).
    pub missing: Vec<String>,
    /// Live chains, rules and objects that are not wanted, or rules out of order.
    pub unexpected: Vec<String>,
    /// `nft list table` as the kernel has it (empty when the table is absent).
    pub live_ruleset: String,
    pub wanted: WantedRules,
    pub elapsed_ms: u64,
}

impl Firewall {
    /// Replaces the agent's table with the one `role` needs, unless the live table
    /// already matches (then nothing is sent). Dry-runs the batch first; a rejected batch
    /// leaves the previous ruleset in place.
    pub async fn apply(&self, role: &FirewallRole) -> Result<ApplyReport, FirewallError> {
        let started = Instant::now();
        let wanted = self.wanted(role);
        if !self.config.enabled {
            tracing::info!(table = %self.config.table, "firewall.enabled is false: the firewall is left alone");
            return Ok(ApplyReport {
                outcome: ApplyOutcome::Disabled,
                corrected: Vec::new(),
                unverified: Vec::new(),
                wanted,
                elapsed_ms: elapsed_ms(started),
            });
        }
        let want = self.normalised_wanted(&wanted);
        let before = self.read_live_json().await?;
        let corrected = match &before {
            Some(live) => {
                let (missing, unexpected) = compare(&want, live);
                if missing.is_empty() && unexpected.is_empty() {
                    tracing::debug!(table = %self.config.table, "firewall already as wanted");
                    return Ok(ApplyReport {
                        outcome: ApplyOutcome::Unchanged,
                        corrected: Vec::new(),
                        unverified: Vec::new(),
                        wanted,
                        elapsed_ms: elapsed_ms(started),
                    });
                }
                describe_diff(&missing, &unexpected)
            }
            None => vec![format!("table inet {} was absent", self.config.table)],
        };
        let batch = self.render(role);
        let out = self
            .run(Step::DryRun, &["-c", "-f", "-"], Some(&batch))
            .await?;
        if !out.success {
            return Err(FirewallError::DryRunRejected {
                command: out.command,
                stderr: out.stderr,
            });
        }
        let out = self.run(Step::Apply, &["-f", "-"], Some(&batch)).await?;
        if !out.success {
            return Err(FirewallError::Rejected {
                command: out.command,
                stderr: out.stderr,
            });
        }
        let unverified = match self.read_live_json().await? {
            Some(live) => {
                let (missing, unexpected) = compare(&want, &live);
                describe_diff(&missing, &unexpected)
            }
            None => vec![format!(
                "table inet {} is absent right after applying it",
                self.config.table
            )],
        };
        if !unverified.is_empty() {
            tracing::warn!(table = %self.config.table, ?unverified, "the firewall was applied but the live table reads back differently");
        }
        tracing::info!(table = %self.config.table, ?corrected, "firewall applied");
        Ok(ApplyReport {
            outcome: ApplyOutcome::Applied,
            corrected,
            unverified,
            wanted,
            elapsed_ms: elapsed_ms(started),
        })
    }

    /// Reads the live table and compares it with the one `role` needs.
    pub async fn status(&self, role: &FirewallRole) -> Result<FirewallStatus, FirewallError> {
        let started = Instant::now();
        let wanted = self.wanted(role);
        let table = format!("inet {}", self.config.table);
        let Some(live) = self.read_live_json().await? else {
            return Ok(FirewallStatus {
                reason: Some(format!(
                    "table {table} does not exist: the firewall was never applied here or was removed"
                )),
                missing: vec![format!("table {table}")],
                table,
                present: false,
                matches: false,
                unexpected: Vec::new(),
                live_ruleset: String::new(),
                wanted,
                elapsed_ms: elapsed_ms(started),
            });
        };
        let (missing, unexpected) = compare(&self.normalised_wanted(&wanted), &live);
        let list = ["list", "table", "inet", self.config.table.as_str()];
        let out = self.run(Step::ReadLive, &list, None).await?;
        // The table can vanish between the two reads; report what the first read saw.
        let live_ruleset = if out.success {
            out.stdout
        } else {
            String::new()
        };
        let matches = missing.is_empty() && unexpected.is_empty();
        let reason = (!matches).then(|| {
            format!(
                "table {table} differs from the wanted one: {} missing, {} unexpected",
                missing.len(),
                unexpected.len()
            )
        });
        Ok(FirewallStatus {
            table,
            present: true,
            matches,
            reason,
            missing,
            unexpected,
            live_ruleset,
            wanted,
            elapsed_ms: elapsed_ms(started),
        })
    }

    /// Deletes the agent's table (and nothing else). Returns whether it existed.
    pub async fn remove(&self) -> Result<bool, FirewallError> {
        let args = ["delete", "table", "inet", self.config.table.as_str()];
        let out = self.run(Step::Remove, &args, None).await?;
        if out.success {
            tracing::info!(table = %self.config.table, "firewall table removed");
            Ok(true)
        } else if is_enoent(&out.stderr) {
            Ok(false)
        } else {
            Err(FirewallError::Command {
                step: Step::Remove,
                command: out.command,
                stderr: out.stderr,
            })
        }
    }

    /// The live table in canonical form, or `None` if it does not exist.
    async fn read_live_json(&self) -> Result<Option<Normalised>, FirewallError> {
        let args = ["-j", "list", "table", "inet", self.config.table.as_str()];
        let out = self.run(Step::ReadLive, &args, None).await?;
        if !out.success {
            if is_enoent(&out.stderr) {
                return Ok(None);
            }
            return Err(FirewallError::Command {
                step: Step::ReadLive,
                command: out.command,
                stderr: out.stderr,
            });
        }
        normalise_live(&out.stdout, &self.config.table)
            .map(Some)
            .map_err(|problem| FirewallError::ParseJson {
                command: out.command,
                problem,
            })
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}
