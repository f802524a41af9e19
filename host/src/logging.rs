//! Logging set-up shared by the broker and the agent: when stderr is the journal (systemd
//! says so in `JOURNAL_STREAM`), events go to journald directly with their fields as
//! journal fields (`tracing-journald`: `journalctl -o verbose` shows `F_ID=`, `F_OPERATION=`, …);
//! otherwise `tracing` to stderr, human text or JSON lines. The level comes from `DBVM_LOG`
//! or the config.

use serde::Deserialize;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event (coloured only on a terminal).
    #[default]
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The `[log]` section both programs' configs have.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `dbvm_broker=debug`; `DBVM_LOG` overrides it.
    pub level: Option<String>,
}

impl LogSettings {
    /// Checks the level filter, so a typo is a config error that names the key rather than
    /// a silent fall-back to `info`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(level) = &self.level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| format!("{level:?} is not a tracing filter: {e}"))?;
        }
        Ok(())
    }
}

/// Installs the global subscriber. `DBVM_LOG` wins over `settings.level`; an unusable
/// `DBVM_LOG` falls back to the config (and says so once logging works).
pub fn init(settings: &LogSettings) {
    let from_config = || {
        tracing_subscriber::EnvFilter::try_new(settings.level.as_deref().unwrap_or("info"))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let env = std::env::var("DBVM_LOG").ok();
    let (filter, bad_env) = match env.as_deref().map(tracing_subscriber::EnvFilter::try_new) {
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (from_config(), Some(e.to_string())),
        None => (from_config(), None),
    };
    if stderr_is_the_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()) {
        match tracing_journald::layer() {
            Ok(journal) => {
                use tracing_subscriber::layer::SubscriberExt;
                use tracing_subscriber::util::SubscriberInitExt;
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journal)
                    .init();
                if let Some(e) = bad_env {
                    tracing::warn!(error = %e, "DBVM_LOG is not a tracing filter; using the configured level");
                }
                return;
            }
            // No journald socket after all: plain lines on stderr, which systemd still
            // collects.
            Err(e) => eprintln!("cannot log to journald directly ({e}); logging to stderr"),
        }
    }
    // Colour only for a person at a terminal; log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match settings.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
    if let Some(e) = bad_env {
        tracing::warn!(error = %e, "DBVM_LOG is not a tracing filter; using the configured level");
    }
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to the
/// `device:inode` of the stream it connected stderr to, and a process whose stderr was
/// redirected elsewhere (a pipe, a file) keeps the variable but not the stream.
fn stderr_is_the_journal(journal_stream: Option<&str>) -> bool {
    use std::os::fd::AsFd;
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.dev() == dev && m.ino() == ino
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_journal_is_recognised_by_the_device_and_inode_of_stderr() {
        let own = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
            .expect("stderr's metadata");
        let stream = format!("{}:{}", own.dev(), own.ino());
        assert!(stderr_is_the_journal(Some(&stream)));
        let other = format!("{}:{}", own.dev(), own.ino() + 1);
        for v in [
            None,
            Some(""),
            Some("x:y"),
            Some("12"),
            Some(other.as_str()),
        ] {
            assert!(!stderr_is_the_journal(v), "{v:?}");
        }
    }
}
