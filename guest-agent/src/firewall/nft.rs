//! Running `nft`: inside `firewall.netns` when set, with a timeout after which the process
//! is killed; a missing program or namespace is an error that says how to fix it.

use super::{Firewall, FirewallError, Step};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

impl Firewall {
    /// Runs `nft ARGS` (inside `firewall.netns` if set) with a timeout. Failures to start
    /// and a missing namespace are errors; a non-zero exit is returned for the caller to
    /// interpret.
    pub(super) async fn run(
        &self,
        step: Step,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<NftOutput, FirewallError> {
        let c = &self.config;
        let mut argv: Vec<&str> = Vec::new();
        if let Some(ns) = &c.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()]);
        }
        argv.push(c.nft.as_str());
        argv.extend_from_slice(args);
        let command = argv.join(" ");
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let timeout_ms = c.command_timeout_ms;
        let run = async {
            let mut child = cmd.spawn().map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    FirewallError::NftMissing {
                        program: argv[0].to_string(),
                        command: command.clone(),
                    }
                } else {
                    FirewallError::Spawn {
                        step,
                        command: command.clone(),
                        source: e,
                    }
                }
            })?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                // nft reads its whole input before it answers, so writing first cannot
                // dead-lock on a full stdout pipe.
                pipe.write_all(text.as_bytes())
                    .await
                    .map_err(|e| FirewallError::Spawn {
                        step,
                        command: command.clone(),
                        source: e,
                    })?;
                drop(pipe);
            }
            child
                .wait_with_output()
                .await
                .map_err(|e| FirewallError::Spawn {
                    step,
                    command: command.clone(),
                    source: e,
                })
        };
        let output = tokio::time::timeout(Duration::from_millis(timeout_ms), run)
            .await
            .map_err(|_| FirewallError::Timeout {
                step,
                command: command.clone(),
                timeout_ms,
            })??;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !output.status.success() {
            if let Some(ns) = &c.netns {
                if stderr.contains("Cannot open network namespace") {
                    return Err(FirewallError::NetnsMissing {
                        netns: ns.clone(),
                        command,
                        stderr,
                    });
                }
                // `ip netns exec` reports an executable it cannot start this way.
                if stderr.starts_with("exec of") {
                    return Err(FirewallError::NftMissing {
                        program: c.nft.clone(),
                        command,
                    });
                }
            }
        }
        Ok(NftOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr,
            command,
        })
    }
}

pub(super) struct NftOutput {
    pub(super) success: bool,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) command: String,
}

/// nft reports a missing table as the kernel's ENOENT.
pub(super) fn is_enoent(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::test_support::{fw, pg};
    use super::super::{ApplyOutcome, FirewallConfig};
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_missing_nft_says_how_to_install_it() {
        let f = fw(FirewallConfig {
            nft: "/nonexistent/dbvm-test/nft".into(),
            ..Default::default()
        });
        let err = f.status(&pg()).await.unwrap_err();
        assert!(matches!(err, FirewallError::NftMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("install nftables"), "{err}");
        // Disabled: nothing runs at all, so the missing binary does not matter.
        let off = fw(FirewallConfig {
            enabled: false,
            nft: "/nonexistent/dbvm-test/nft".into(),
            ..Default::default()
        });
        let r = off.apply(&pg()).await.unwrap();
        assert_eq!(r.outcome, ApplyOutcome::Disabled);
        assert!(!r.changed());
    }

    #[tokio::test]
    async fn a_hung_nft_is_killed_at_the_timeout() {
        // A stand-in, and the only one here: a real nft that hangs cannot be produced on
        // demand, so a script that never returns plays it.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nft");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = fw(FirewallConfig {
            nft: fake.display().to_string(),
            command_timeout_ms: 200,
            ..Default::default()
        });
        let started = Instant::now();
        let err = f.apply(&pg()).await.unwrap_err();
        assert!(
            matches!(
                err,
                FirewallError::Timeout {
                    step: Step::ReadLive,
                    timeout_ms: 200,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.to_string().contains("did not finish within 200 ms"),
            "{err}"
        );
    }
}
