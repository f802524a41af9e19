//! Logging set-up shared by the broker and the agent: `tracing` to stderr (journald under
//! systemd), human text or JSON lines, the level from `DBVM_LOG` or the config.

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
    // Colour only for a person at a terminal; journald and log files get plain text.
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
