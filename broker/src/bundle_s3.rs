//! Copies of complete log bundles in the broker's S3 bucket (`[bundles.s3]`), so a
//! bundle outlives the broker's disk and its local expiry.
//!
//! A bundle is recorded complete with its copy `pending` (in the same write), so a crash
//! never loses a copy owed: the copier looks for owed copies when the broker starts,
//! whenever a bundle completes and every half minute. Each copy streams the file
//! (multipart, bounded memory; see `dbvm_s3`), and is `copied` only when the SHA-256 of
//! what was sent is the bundle's recorded one. A failure is recorded with its cause and
//! tried again later (5 s, doubling, at most 10 min apart) until the bundle is deleted.
//!
//! The object is `<prefix>/<agent>/<id>.tar.zst` (`broker` for the broker's own bundles).
//! Deleting a bundle through the API deletes its copy; local expiry (age, total) does
//! not: how long copies stay is the bucket's lifecycle rules' business.

use crate::bundles::BundleStore;
use dbvm_protocol::api::{BundleCopy, BundleInfo, BundleState, CopyState};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the client waits to connect and for each read of an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The first retry after a failure; each next one waits twice as long, up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(600);
/// The copier looks for owed copies at least this often.
const SWEEP: Duration = Duration::from_secs(30);

/// The broker's S3 client for bundles, and what wakes its copier.
#[derive(Debug)]
pub struct Copier {
    s3: dbvm_s3::S3,
    wake: tokio::sync::Notify,
}

impl Copier {
    pub fn new(endpoint: &dbvm_s3::Endpoint) -> Result<Self, dbvm_s3::S3Error> {
        Ok(Self {
            s3: dbvm_s3::S3::new(endpoint, IO_TIMEOUT)?,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// The name of bundle `b` under the prefix.
    fn name(b: &BundleInfo) -> String {
        let folder = if b.agent_id == crate::own_bundle::BROKER {
            "broker"
        } else {
            b.agent_id.as_str()
        };
        format!("{folder}/{}.tar.zst", b.id)
    }

    /// What a newly complete bundle records: its copy owed.
    pub fn pending(&self, b: &BundleInfo) -> BundleCopy {
        BundleCopy {
            state: CopyState::Pending,
            url: format!("s3://{}/{}", self.s3.bucket, self.s3.key(&Self::name(b))),
            attempts: 0,
            error: None,
            next_attempt_ms: None,
            copied_at_ms: None,
        }
    }

    /// Tells the copier a bundle completed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Deletes bundle `b`'s copy (a bundle deleted through the API).
    pub async fn delete(&self, b: &BundleInfo) -> Result<(), dbvm_s3::S3Error> {
        self.s3.delete(&Self::name(b)).await
    }

    /// Copies bundles until `shutdown`.
    pub async fn run(self: Arc<Self>, bundles: Arc<BundleStore>, shutdown: CancellationToken) {
        loop {
            let next = self.sweep(&bundles).await;
            let wait = next.map_or(SWEEP, |d| d.min(SWEEP));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Copies every complete bundle whose copy is owed now; how long until the next
    /// failed one is due, if any.
    async fn sweep(&self, bundles: &BundleStore) -> Option<Duration> {
        let records = match bundles.records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list bundles to copy to S3");
                return Some(RETRY_FIRST);
            }
        };
        let mut next: Option<i64> = None;
        for b in records {
            if b.state != BundleState::Complete {
                continue;
            }
            let copy = b.s3.clone().unwrap_or_else(|| self.pending(&b));
            let due = match copy.state {
                CopyState::Copied => continue,
                CopyState::Pending => true,
                CopyState::Failed => {
                    let at = copy.next_attempt_ms.unwrap_or(0);
                    if at > dbvm_protocol::now_ms() {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    at <= dbvm_protocol::now_ms()
                }
            };
            if due {
                if let Some(at) = self.copy(bundles, &b, copy).await {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        next.map(|at| {
            Duration::from_millis(u64::try_from(at - dbvm_protocol::now_ms()).unwrap_or(0))
        })
    }

    /// Copies bundle `b` once and records how it went; when it failed, when it is due
    /// again.
    async fn copy(&self, bundles: &BundleStore, b: &BundleInfo, copy: BundleCopy) -> Option<i64> {
        let name = Self::name(b);
        let attempts = copy.attempts.saturating_add(1);
        let started = std::time::Instant::now();
        let outcome = match bundles.open_file(b.id).await {
            // Deleted or expired meanwhile: nothing is owed any more.
            Err(crate::bundles::BundleError::NotFound(_)) => return None,
            Err(e) => Err(e.to_string()),
            Ok((_, mut file)) => match self.s3.upload(&name, &mut file).await {
                Err(e) => Err(e.to_string()),
                Ok(stored) if Some(&stored.sha256) != b.sha256.as_ref() => {
                    // The file on the broker's disk is not what was uploaded to it.
                    let _ = self.s3.delete(&name).await;
                    Err(format!(
                        "the broker's file of the bundle hashes to {} ({} bytes), not the recorded {}: the copy was removed",
                        stored.sha256,
                        stored.size,
                        b.sha256.as_deref().unwrap_or("(none)")
                    ))
                }
                Ok(_) => Ok(()),
            },
        };
        let now = dbvm_protocol::now_ms();
        let (record, due) = match outcome {
            Ok(()) => {
                tracing::info!(bundle = %b.id, url = %copy.url, bytes = b.size, ms = started.elapsed().as_millis() as u64, "bundle copied to S3");
                (
                    BundleCopy {
                        state: CopyState::Copied,
                        attempts,
                        error: None,
                        next_attempt_ms: None,
                        copied_at_ms: Some(now),
                        ..copy
                    },
                    None,
                )
            }
            Err(error) => {
                let wait = RETRY_FIRST
                    .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
                    .min(RETRY_MAX);
                let at = now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                tracing::warn!(bundle = %b.id, url = %copy.url, attempts, retry_in_s = wait.as_secs(), %error, "copying a bundle to S3 failed");
                (
                    BundleCopy {
                        state: CopyState::Failed,
                        attempts,
                        error: Some(error),
                        next_attempt_ms: Some(at),
                        copied_at_ms: None,
                        ..copy
                    },
                    Some(at),
                )
            }
        };
        match bundles.record_copy(b.id, record).await {
            Ok(true) => due,
            Ok(false) => {
                // Deleted while it was being copied: the copy must not outlive it.
                if let Err(e) = self.s3.delete(&name).await {
                    tracing::warn!(bundle = %b.id, error = %e, "cannot delete the S3 copy of a bundle deleted while it was copied");
                }
                None
            }
            Err(e) => {
                tracing::warn!(bundle = %b.id, error = %e, "cannot record a bundle's S3 copy");
                Some(now + i64::try_from(RETRY_FIRST.as_millis()).unwrap_or(0))
            }
        }
    }
}
