//! Log bundles for support engineers: collect one from an agent through the broker,
//! fetch it and check it, list what the broker holds, read a bundle's manifest.
//!
//! ```no_run
//! # async fn demo(client: &dbvmctl::Client, sender: &dbvmctl::send::Sender<'_>) -> Result<(), Box<dyn std::error::Error>> {
//! use dbvmctl::bundle::{Collect, fetch};
//! let agent = "db-017".parse()?;
//! let view = sender.submit(Collect::new(agent).request(client)?).await?;
//! let done = client.wait(view.id, Collect::WAIT).await?;
//! let sha = done.output.as_ref().and_then(|o| o["sha256"].as_str());
//! let got = fetch(client, view.id, "db-017.tar.zst".as_ref(), sha, |_, _| {}).await?;
//! println!("{} bytes, sha256 {}", got.bytes, got.sha256);
//! # Ok(()) }
//! ```

use crate::client::{Client, ClientError};
use crate::send::Request;
use dbvm_protocol::AgentId;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// The agent's operation.
pub const OPERATION: &str = "bundle.collect";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0} exists already: choose another file with -o, or remove it")]
    Exists(PathBuf),
    #[error("the broker's URL {0} has a path; agents need the API's address alone: give --broker-url https://host:port")]
    BrokerUrlWithPath(String),
    #[error("fetching bundle {id}: {source}")]
    Fetch {
        id: Uuid,
        #[source]
        source: ClientError,
    },
    #[error(
        "bundle {id} arrived with SHA-256 {actual} but {who} says {expected}: the file was removed"
    )]
    Checksum {
        id: Uuid,
        actual: String,
        expected: String,
        who: &'static str,
    },
    #[error("cannot {op} {}: {error}", .path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} does not match its manifest: {error}", .path.display())]
    Damaged {
        path: PathBuf,
        error: dbvm_bundle::verify::VerifyError,
    },
    #[error("the manifest of {} is not JSON: {error}", .path.display())]
    BadManifest {
        path: PathBuf,
        error: serde_json::Error,
    },
}

/// A `bundle.collect` to send: what to gather, and where the agent uploads it.
#[derive(Clone, Debug)]
pub struct Collect {
    pub agent: AgentId,
    /// Logs of the last this many hours [agent's default: 24].
    pub hours: Option<u32>,
    pub include_db_logs: bool,
    pub include_db_views: bool,
    /// Cap on the files' bytes before compression [agent's default: 512 MiB].
    pub max_bytes: Option<u64>,
    /// The broker's API as the agent reaches it [default: the client's URL].
    pub broker_url: Option<String>,
}

impl Collect {
    /// How long to wait for a bundle by default.
    pub const WAIT: Duration = Duration::from_secs(1800);

    pub fn new(agent: AgentId) -> Self {
        Self {
            agent,
            hours: None,
            include_db_logs: true,
            include_db_views: false,
            max_bytes: None,
            broker_url: None,
        }
    }

    /// The signed command's request; the agent checks the arguments again.
    pub fn request(&self, client: &Client) -> Result<Request, BundleError> {
        let broker_url = match &self.broker_url {
            Some(u) => u.clone(),
            None => {
                let base = client.base_url();
                if !matches!(base.path(), "" | "/") {
                    return Err(BundleError::BrokerUrlWithPath(base.to_string()));
                }
                base.as_str().trim_end_matches('/').to_string()
            }
        };
        let mut args = Map::new();
        args.insert("broker_url".into(), broker_url.into());
        if let Some(h) = self.hours {
            args.insert("hours".into(), h.into());
        }
        args.insert("include_db_logs".into(), self.include_db_logs.into());
        args.insert("include_db_views".into(), self.include_db_views.into());
        if let Some(m) = self.max_bytes {
            args.insert("max_bytes".into(), m.into());
        }
        Ok(Request {
            args,
            // Queued behind other management work for a while is fine.
            ttl: Duration::from_secs(3600),
            ..Request::new(self.agent.clone(), OPERATION)
        })
    }
}

/// A bundle fetched and checked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fetched {
    pub id: Uuid,
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// The file name a bundle gets when none is given (the broker's own bundles, whose
/// agent is `(broker)`, are `bundle-broker-<id>.tar.zst`).
pub fn default_file(agent: &str, id: Uuid) -> PathBuf {
    let agent: String = agent.chars().filter(|c| !matches!(c, '(' | ')')).collect();
    PathBuf::from(format!("bundle-{agent}-{id}.tar.zst"))
}

/// Downloads bundle `id` to `dest` (which must not exist) and checks its SHA-256 against
/// what the broker says and, when given, what the agent said (`expected`, from the
/// command's result). The bytes arrive in `<dest>.part`, renamed to `dest` only when they
/// check; nothing is left when they do not.
pub async fn fetch(
    client: &Client,
    id: Uuid,
    dest: &Path,
    expected: Option<&str>,
    progress: impl FnMut(u64, Option<u64>),
) -> Result<Fetched, BundleError> {
    if dest.exists() {
        return Err(BundleError::Exists(dest.to_path_buf()));
    }
    let mut part = dest.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    // A fetch cut short earlier left its part: it is ours to replace.
    let _ = tokio::fs::remove_file(&part).await;
    let got = client
        .download_bundle(id, &part, progress)
        .await
        .map_err(|source| BundleError::Fetch { id, source })?;
    let checks = [
        (got.claimed_sha256.as_deref(), "the broker"),
        (expected, "the agent"),
    ];
    for (claim, who) in checks {
        if let Some(claim) = claim {
            if claim != got.sha256 {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(BundleError::Checksum {
                    id,
                    actual: got.sha256,
                    expected: claim.to_string(),
                    who,
                });
            }
        }
    }
    tokio::fs::rename(&part, dest)
        .await
        .map_err(|error| BundleError::File {
            op: "rename into place",
            path: dest.to_path_buf(),
            error,
        })?;
    Ok(Fetched {
        id,
        path: dest.to_path_buf(),
        bytes: got.bytes,
        sha256: got.sha256,
    })
}

/// Checks a bundle file against its own `manifest.json` (every file there with its
/// size and SHA-256, nothing else, the manifest last; streamed, so any size is checked in
/// flat memory) and returns the manifest.
pub fn manifest(path: &Path) -> Result<Value, BundleError> {
    let file = std::fs::File::open(path).map_err(|error| BundleError::File {
        op: "open",
        path: path.to_path_buf(),
        error,
    })?;
    let m = dbvm_bundle::verify::verify(std::io::BufReader::new(file)).map_err(|error| {
        BundleError::Damaged {
            path: path.to_path_buf(),
            error,
        }
    })?;
    serde_json::to_value(&m).map_err(|error| BundleError::BadManifest {
        path: path.to_path_buf(),
        error,
    })
}

/// A manifest in a few lines: what is in the bundle, and every step that failed, had
/// nothing to collect or was cut.
pub fn summary(manifest: &Value) -> String {
    let n = |k: &str| manifest[k].as_array().map_or(0, Vec::len);
    let who = manifest["agent_id"].as_str().unwrap_or("?");
    // The broker's own bundles name it `(broker)` (see the broker's own_bundle.rs).
    let program = if who == "(broker)" {
        "dbvm-broker"
    } else {
        "dbvm-agent"
    };
    let mut out = format!(
        "bundle of agent {who} ({program} {}): {} files, {} bytes before compression, {} redactions\n",
        manifest["agent_version"].as_str().unwrap_or("?"),
        n("files"),
        manifest["content_bytes"].as_u64().unwrap_or(0),
        manifest["redactions"].as_u64().unwrap_or(0),
    );
    let list = |out: &mut String, key: &str, title: &str, why: &str| {
        let Some(items) = manifest[key].as_array().filter(|a| !a.is_empty()) else {
            return;
        };
        out.push_str(&format!("{title} ({}):\n", items.len()));
        for item in items {
            out.push_str(&format!(
                "  {}: {}\n",
                item["path"].as_str().unwrap_or("?"),
                item[why].as_str().unwrap_or("?")
            ));
        }
    };
    list(&mut out, "failed", "failed steps", "error");
    list(&mut out, "skipped", "nothing to collect", "why");
    list(&mut out, "left_out", "left out by the size cap", "why");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_summary_names_every_failed_skipped_and_cut_step() {
        let m = json!({
            "agent_id": "db1", "agent_version": "0.1.0", "content_bytes": 10, "redactions": 3,
            "files": [{"path": "a"}, {"path": "b"}],
            "failed": [{"path": "db/log", "error": "permission denied"}],
            "skipped": [{"path": "agent/journal.log", "why": "journald is not running"}],
            "left_out": [],
        });
        let s = summary(&m);
        assert!(
            s.starts_with("bundle of agent db1 (dbvm-agent 0.1.0): 2 files, 10 bytes"),
            "{s}"
        );
        assert!(
            s.contains("failed steps (1):\n  db/log: permission denied"),
            "{s}"
        );
        assert!(
            s.contains("nothing to collect (1):\n  agent/journal.log: journald"),
            "{s}"
        );
        assert!(!s.contains("left out"), "{s}");
    }
}
