//! Log bundles: what a support engineer needs from a sick machine, in one archive, without
//! SSH. The format and the redaction, shared by the agent (`dbvm-agent`'s `bundle/`: its
//! capabilities' parts, the upload to the broker) and the broker (its own bundle).
//!
//! A part is an archive path, where the bytes come from (a file, a directory of files, a
//! command's output, or bytes an async producer makes), and how they are redacted
//! (config-style: an allow-list of keys, everything else replaced; log-style: patterns
//! for passwords, connection strings, PEM private keys, tokens, AWS keys, bearer headers).
//! [`writer`] turns the parts into one `tar` compressed with zstd, streamed as it is built
//! into a bounded channel of byte chunks, with `manifest.json` as the last entry. A part
//! that fails, vanishes or cannot be read is a line in the manifest, never the end of the
//! bundle; a size cap cuts the bundle and the manifest names what was left out.

pub mod redact;
pub mod verify;
pub mod writer;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::AsyncRead;

pub use redact::{ConfigFormat, Redaction};
pub use writer::{collect, collect_to_file, in_background, Manifest, Options};

/// What a bundle is asked for: capabilities read it when they name their parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Log entries from this time on (ms since the Unix epoch), where a source can filter.
    pub since_ms: i64,
    /// Log entries up to this time (ms since the Unix epoch).
    pub until_ms: i64,
    /// The database's server logs and its tools' logs.
    pub include_db_logs: bool,
    /// The database's diagnostic views (settings, activity) read from the server.
    pub include_db_views: bool,
}

/// An async reader the writer drains.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// A future that opens a part's bytes; its error says why it could not.
pub type OpenFuture = Pin<Box<dyn Future<Output = Result<Reader, String>> + Send>>;

/// Where a part's bytes come from.
pub enum Producer {
    /// A file, read when the bundle gets to it.
    File(PathBuf),
    /// Every regular file directly in a directory, each as its own entry under the part's
    /// path (sorted by name; sub-directories are not followed).
    Dir(PathBuf),
    /// A command's standard output; a non-zero exit or a missing program is recorded (with
    /// the start of its standard error, redacted), and what it printed is kept.
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// Bytes an async producer makes (a report, a listing); it may fail, or fail part way
    /// through its reader (then what was read is kept and the failure recorded).
    Open(OpenFuture),
    /// Nothing to collect here, and why (journald not running, no database yet).
    Unavailable(String),
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "File({})", p.display()),
            Self::Dir(p) => write!(f, "Dir({})", p.display()),
            Self::Command { argv, .. } => write!(f, "Command({})", argv.join(" ")),
            Self::Open(_) => write!(f, "Open(..)"),
            Self::Unavailable(why) => write!(f, "Unavailable({why})"),
        }
    }
}

/// One thing a capability adds to a bundle.
#[derive(Debug)]
pub struct Part {
    /// Its path in the archive (`system/meminfo`, `firewall/ruleset.json`); a directory
    /// prefix for [`Producer::Dir`].
    pub path: String,
    /// Where it came from, as the manifest says it (`/proc/meminfo`, `nft -j list …`).
    pub source: String,
    pub producer: Producer,
    pub redaction: Redaction,
}

impl Part {
    /// A part with log-style redaction (patterns): logs, command output, reports.
    pub fn log(path: impl Into<String>, source: impl Into<String>, producer: Producer) -> Self {
        Self {
            path: path.into(),
            source: source.into(),
            producer,
            redaction: Redaction::Log,
        }
    }

    /// A part with config-style redaction: only the keys in `safe_keys` keep their values
    /// (see [`redact::key_allowed`] for the pattern syntax).
    pub fn config(
        path: impl Into<String>,
        source: impl Into<String>,
        producer: Producer,
        format: ConfigFormat,
        safe_keys: &'static [&'static str],
    ) -> Self {
        Self {
            path: path.into(),
            source: source.into(),
            producer,
            redaction: Redaction::Config { format, safe_keys },
        }
    }

    /// A file read as it is: `source` is its path.
    pub fn log_file(path: impl Into<String>, file: impl Into<PathBuf>) -> Self {
        let file = file.into();
        Self::log(path, file.display().to_string(), Producer::File(file))
    }

    /// A command's output: `source` is its argv.
    pub fn command(path: impl Into<String>, argv: &[&str], timeout: Duration) -> Self {
        Self::log(
            path,
            argv.join(" "),
            Producer::Command {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                timeout,
            },
        )
    }

    /// Bytes made by `open` (which runs when the bundle gets to this part).
    pub fn produced<F>(path: impl Into<String>, source: impl Into<String>, open: F) -> Self
    where
        F: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        Self::log(
            path,
            source,
            Producer::Open(Box::pin(async move {
                open.await
                    .map(|bytes| Box::new(std::io::Cursor::new(bytes)) as Reader)
            })),
        )
    }
}
