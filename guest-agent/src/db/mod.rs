//! The database in the guest: what the agent is configured with (`[database]`), what a
//! control plane asks for (a [`DatabaseSpec`]), what the agent remembers across restarts
//! ([`DbState`], one JSON file written atomically), and the manager that runs the create
//! phases and day-2 operations against a container runtime.
//!
//! Create runs in two phases, as DSM does: *preconfigure* makes the VM ready (runtime and
//! image present, directories with the right owners, firewall) and *configure* makes the
//! database (configuration files, TLS, initialisation, start, the `dbaas` user and the
//! user database). Each phase records its completion in the state file, so a create that
//! was cut off (agent killed) resumes where it stopped when the control plane sends it
//! again, and a create with the same spec is a no-op.

pub mod bundle;
pub mod engine;
pub mod manager;
pub mod ops;
pub mod params;

use crate::runtime::RuntimeError;
use params::Flavour;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use manager::DbManager;

/// Why a database operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Refused before anything changed.
    #[error("{0}")]
    Invalid(String),
    /// The operation needs a database and none has been created.
    #[error("no database has been created on this VM yet (send db.create first)")]
    NotCreated,
    #[error("container runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sql(String),
    #[error("{0}")]
    Failed(String),
}

impl DbError {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Which container runtime the agent uses.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The Docker Engine API over its unix socket (production: the DSM images are docker images).
    #[default]
    Docker,
    /// Plain host processes from the machine's own packages (development, machines without an engine).
    Process,
}

/// Image references per flavour: configuration, so production images from a registry
/// (pre-loaded on the image) work unchanged.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Images {
    pub postgres: String,
    pub mariadb: String,
    pub mysql8: String,
}

impl Default for Images {
    fn default() -> Self {
        Self {
            postgres: "dbvm/postgres:15".into(),
            mariadb: "dbvm/mariadb:10.11".into(),
            mysql8: "mysql:8.0".into(),
        }
    }
}

impl Images {
    pub fn for_flavour(&self, f: Flavour) -> &str {
        match f {
            Flavour::Postgres => &self.postgres,
            Flavour::Mariadb => &self.mariadb,
            Flavour::Mysql8 => &self.mysql8,
        }
    }
}

/// The agent's `[database]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbSettings {
    pub runtime: RuntimeKind,
    /// The Docker engine's API socket.
    pub docker_socket: PathBuf,
    /// Everything the database owns lives under here: `data/`, `log/`, `run/`, `conf/`, `tls/`.
    pub data_root: PathBuf,
    /// Name of the database server's container.
    pub container_name: String,
    pub images: Images,
    /// The database server's user and group inside its image (and owner of `data_root`).
    pub uid: u32,
    pub gid: u32,
    /// How long the server may take to accept connections after a start.
    pub start_timeout_s: u64,
    /// How long an operation keeps retrying while the container engine is unreachable.
    pub engine_wait_s: u64,
    /// How often the agent converges the container to what it wants (after a crash, a
    /// reboot, or a container killed behind its back).
    pub reconcile_interval_s: u64,
    /// Process runtime only: where to find `postgres`, `initdb`, `mariadbd`, ….
    pub process_path: Vec<PathBuf>,
}

impl Default for DbSettings {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Docker,
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            data_root: PathBuf::from("/var/lib/dbvm/db"),
            container_name: "dbvm-db".into(),
            images: Images::default(),
            uid: 999,
            gid: 999,
            start_timeout_s: 60,
            engine_wait_s: 60,
            reconcile_interval_s: 10,
            process_path: vec![
                PathBuf::from("/usr/lib/postgresql/15/bin"),
                PathBuf::from("/usr/sbin"),
                PathBuf::from("/usr/bin"),
                PathBuf::from("/bin"),
            ],
        }
    }
}

impl DbSettings {
    /// Checks the section; names the key that is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, p: String| Err((format!("database.{k}"), p));
        if !self.data_root.is_absolute() {
            return bad("data_root", "must be an absolute path".into());
        }
        if self.data_root == Path::new("/") {
            return bad("data_root", "must not be /".into());
        }
        if !valid_container_name(&self.container_name) {
            return bad(
                "container_name",
                format!(
                    "{:?} is not a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 63)",
                    self.container_name
                ),
            );
        }
        for (k, v) in [
            ("images.postgres", &self.images.postgres),
            ("images.mariadb", &self.images.mariadb),
            ("images.mysql8", &self.images.mysql8),
        ] {
            if let Err(p) = validate_image_ref(v) {
                return bad(k, p);
            }
        }
        if self.uid == 0 || self.gid == 0 {
            return bad(
                "uid",
                "the database must not run as root (uid/gid 0)".into(),
            );
        }
        if self.start_timeout_s == 0 || self.start_timeout_s > 3600 {
            return bad("start_timeout_s", "must be 1..3600".into());
        }
        if self.engine_wait_s > 3600 {
            return bad("engine_wait_s", "must be at most 3600".into());
        }
        if self.reconcile_interval_s == 0 || self.reconcile_interval_s > 3600 {
            return bad("reconcile_interval_s", "must be 1..3600".into());
        }
        if self.runtime == RuntimeKind::Docker && !self.docker_socket.is_absolute() {
            return bad("docker_socket", "must be an absolute path".into());
        }
        Ok(())
    }
}

fn valid_container_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A docker image reference: `[registry/]name[:tag][@digest]`, conservative characters.
pub fn validate_image_ref(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 255 {
        return Err("an image reference must be 1..255 characters".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | ':' | '.' | '_' | '-' | '@'))
    {
        return Err(format!("{s:?} is not an image reference"));
    }
    if s.starts_with(['/', ':', '.', '-', '@']) {
        return Err(format!("{s:?} is not an image reference"));
    }
    Ok(())
}

/// MySQL-only features (MySQL 8 is the production target; MariaDB, which runs here, has
/// neither group replication nor MySQL Router).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MysqlOptions {
    pub group_replication: bool,
    pub router: bool,
}

/// What the control plane asks for in `db.create` (and what `db.export_template` gives back).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    /// `postgres`, `mariadb` or `mysql8`.
    pub engine: Flavour,
    /// Client port (host networking): 5432 / 3306 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The user database to create, owned by `dbaas`.
    pub database: String,
    /// TLS for client connections (a certificate the agent makes for this VM).
    #[serde(default)]
    pub tls: bool,
    /// Engine parameters, checked against the allow-list.
    #[serde(default)]
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Container memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Image override; the configured image for the engine when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub mysql: MysqlOptions,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A valid database or user name: what both engines accept unquoted, lower case.
pub fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl DatabaseSpec {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.engine {
            Flavour::Postgres => 5432,
            Flavour::Mariadb | Flavour::Mysql8 => 3306,
        })
    }

    /// Checks everything that can be checked without touching the VM. Every problem is
    /// listed, one per line.
    pub fn validate(&self) -> Result<params::Validated, DbError> {
        let mut problems = Vec::new();
        if !valid_identifier(&self.database) {
            problems.push(format!(
                "database: {:?} is not a valid name (lower-case letters, digits and _, starting with a letter or _, at most 63)",
                self.database
            ));
        }
        const RESERVED: [&str; 7] = [
            "postgres",
            "template0",
            "template1",
            "mysql",
            "information_schema",
            "performance_schema",
            "sys",
        ];
        if RESERVED.contains(&self.database.as_str()) {
            problems.push(format!(
                "database: {:?} is reserved by the engine",
                self.database
            ));
        }
        if let Some(p) = self.port {
            if p < 1024 {
                problems.push(format!("port: {p} is below 1024"));
            }
        }
        if let Some(m) = self.memory_mb {
            if !(256..=4 * 1024 * 1024).contains(&m) {
                problems.push(format!("memory_mb: {m} is outside 256..4194304"));
            }
        }
        if let Some(c) = self.cpus {
            if !(c > 0.0 && c <= 1024.0) {
                problems.push(format!("cpus: {c} is outside (0, 1024]"));
            }
        }
        if let Some(img) = &self.image {
            if let Err(p) = validate_image_ref(img) {
                problems.push(format!("image: {p}"));
            }
        }
        if self.engine != Flavour::Mysql8 && (self.mysql.group_replication || self.mysql.router) {
            problems.push(
                "mysql: group replication and MySQL Router are MySQL 8 only (engine mysql8)".into(),
            );
        }
        let validated = match params::validate(self.engine, &self.parameters) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        match validated {
            Some(v) if problems.is_empty() => Ok(v),
            _ => Err(DbError::Invalid(problems.join("\n"))),
        }
    }
}

/// How far create has come.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    None,
    Preconfigured,
    Configured,
}

/// What the agent remembers about its database (`state_dir/db/state.json`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DbState {
    pub spec: DatabaseSpec,
    /// The image the server runs now (changes on upgrade).
    pub image: String,
    pub phase: Phase,
    /// Whether the server should be running (false after `db.stop`).
    pub want_running: bool,
    /// Parameters in force (the spec's, then every accepted change), as given.
    pub parameters: BTreeMap<String, serde_json::Value>,
    /// Parameter changes written but waiting for a restart.
    #[serde(default)]
    pub restart_pending: Vec<String>,
    /// PostgreSQL's `archive_command` while WAL archiving is on (set by the backup
    /// capability, see [`DbManager::set_archive_command`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_command: Option<String>,
    /// What a database restored from a backup was made from (no secrets): a re-sent
    /// restore with the same source resumes instead of being refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<serde_json::Value>,
    /// Set while an in-place recover rewrites the data directory (see
    /// [`DbManager::recover_in_place`]), and left set when it failed after touching it:
    /// the server is not started on a half-restored directory, not even by the reconciler
    /// after an agent restart. Cleared when a recover finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovering: Option<serde_json::Value>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The state file: read at start, written atomically (temporary file, fsync, rename).
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Option<DbState>, DbError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                DbError::Failed(format!(
                    "the database state file {} is damaged: {e}; move it away to start over",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DbError::io("read", &self.path, e)),
        }
    }

    pub fn save(&self, state: &DbState) -> Result<(), DbError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| DbError::io("create", dir, e))?;
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| DbError::Failed(format!("cannot encode the database state: {e}")))?;
        dbvm_host::fs::write_atomic(&self.path, &bytes, 0o600)
            .map_err(|e| DbError::io("write", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DatabaseSpec {
        serde_json::from_value(serde_json::json!({
            "engine": "postgres", "database": "app"
        }))
        .unwrap()
    }

    #[test]
    fn a_plain_spec_is_valid_and_gets_default_ports() {
        let s = spec();
        s.validate().unwrap();
        assert_eq!(s.port(), 5432);
        let mut m = s.clone();
        m.engine = Flavour::Mariadb;
        assert_eq!(m.port(), 3306);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let s: DatabaseSpec = serde_json::from_value(serde_json::json!({
            "engine": "postgres", "database": "Bad-Name", "port": 80,
            "parameters": {"max_connections": 1},
            "mysql": {"router": true}
        }))
        .unwrap();
        let e = s.validate().unwrap_err().to_string();
        for needle in ["database:", "port: 80", "max_connections", "MySQL 8 only"] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
    }

    #[test]
    fn unknown_fields_and_engines_are_refused() {
        assert!(serde_json::from_value::<DatabaseSpec>(
            serde_json::json!({"engine": "postgres", "database": "a", "colour": 1})
        )
        .is_err());
        assert!(serde_json::from_value::<DatabaseSpec>(
            serde_json::json!({"engine": "oracle", "database": "a"})
        )
        .is_err());
    }

    #[test]
    fn settings_are_checked() {
        DbSettings::default().validate().unwrap();
        let s = DbSettings {
            data_root: "relative".into(),
            ..Default::default()
        };
        assert_eq!(s.validate().unwrap_err().0, "database.data_root");
        let s = DbSettings {
            uid: 0,
            ..Default::default()
        };
        assert_eq!(s.validate().unwrap_err().0, "database.uid");
        assert!(validate_image_ref("dbvm/postgres:15").is_ok());
        assert!(validate_image_ref("evil; rm -rf /").is_err());
    }

    #[test]
    fn state_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert!(f.load().unwrap().is_none());
        let st = DbState {
            spec: spec(),
            image: "dbvm/postgres:15".into(),
            phase: Phase::Preconfigured,
            want_running: true,
            parameters: BTreeMap::new(),
            restart_pending: vec![],
            archive_command: None,
            restored_from: None,
            recovering: None,
            created_at_ms: 1,
            updated_at_ms: 2,
        };
        f.save(&st).unwrap();
        let back = f.load().unwrap().unwrap();
        assert_eq!(back.phase, Phase::Preconfigured);
        assert_eq!(back.spec, st.spec);
        std::fs::write(f.path(), b"{not json").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("damaged"));
    }
}
