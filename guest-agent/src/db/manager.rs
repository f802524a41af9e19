//! The database manager: runs the create phases and the day-2 operations one at a time
//! (a mutex over the state), keeps [`DbState`] on disk after every step that changes the
//! VM, and converges the server's container to what it wants on an interval.

use super::engine::{self, Admin, Paths};
use super::params::{self, Flavour};
use super::{DatabaseSpec, DbError, DbSettings, DbState, Phase, RuntimeKind, StateFile};
use crate::runtime::{
    ContainerRuntime, ContainerSpec, Mount, Reconciled, RestartPolicy, RuntimeError, State,
};
use async_trait::async_trait;
use dbvm_protocol::seal::Sealed;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Progress callback: percent and a short message.
pub type ProgressFn<'a> = &'a (dyn Fn(u8, &str) + Send + Sync);

/// The firewall as the database manager sees it: opened for the database's role in
/// preconfigure, reported in status. Implemented over [`crate::firewall`].
#[async_trait]
pub trait FirewallHook: Send + Sync + std::fmt::Debug {
    async fn apply(&self, spec: &DatabaseSpec) -> Result<Value, String>;
    async fn status(&self, spec: Option<&DatabaseSpec>) -> Result<Value, String>;
}

/// Where a new database's data directory comes from when it is not initialised empty: a
/// backup (see [`crate::backup`]). `db.restore` hands one to [`DbManager::create`]; the
/// database manager knows nothing of backups.
#[async_trait]
pub trait DataSource: Send + Sync {
    /// What the state file remembers of the source (no secrets). A restore re-sent with
    /// the same spec and source resumes; another source is refused like another spec.
    fn describe(&self) -> Value;
    /// Fills the empty data directory (a one-shot run through [`DbManager::run_tool`]).
    async fn populate(
        &self,
        db: &DbManager,
        st: &DbState,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError>;
    /// After the server first started on the restored files, before users are made: waits
    /// until recovery has ended and the server takes writes; says what was recovered.
    async fn finish(
        &self,
        db: &DbManager,
        st: &DbState,
        admin: &mut Admin,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError>;
}

/// Environment variable for fault-injection tests only: the agent process exits right
/// after recording the named phase (`preconfigure`; `recover-restored`: an in-place
/// recover's data directory rewritten, the server not started yet), as if it were
/// killed there. A kill
/// at an exact point cannot be produced reliably from outside, hence this switch.
pub const FAULT_EXIT_AFTER_PHASE: &str = "DBVM_AGENT_FAULT_EXIT_AFTER_PHASE";

/// See [`DbManager::health_view`].
#[derive(Debug)]
pub struct HealthView {
    /// `Err(())`: a database operation is in progress.
    pub state: Result<Option<DbState>, ()>,
    pub container: Result<Option<crate::runtime::ContainerStatus>, String>,
}

#[derive(Debug)]
pub struct DbManager {
    settings: DbSettings,
    paths: Paths,
    state_file: StateFile,
    state: Mutex<Option<DbState>>,
    runtime: Mutex<Option<Arc<dyn ContainerRuntime>>>,
    runtime_dir: PathBuf,
    firewall: Option<Arc<dyn FirewallHook>>,
    /// The engine of the database made here (or being made), readable without waiting
    /// behind an operation: the agent's `Hello` names it.
    flavour: std::sync::RwLock<Option<Flavour>>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl DbManager {
    /// Opens the manager: reads the state file (a damaged one is an error, not a reset).
    pub fn open(
        settings: DbSettings,
        state_dir: &Path,
        firewall: Option<Arc<dyn FirewallHook>>,
    ) -> Result<Arc<Self>, DbError> {
        let dir = state_dir.join("db");
        let state_file = StateFile::new(&dir);
        let state = state_file.load()?;
        let flavour = std::sync::RwLock::new(state.as_ref().map(|s| s.spec.engine));
        Ok(Arc::new(Self {
            paths: Paths::new(&settings.data_root),
            settings,
            state_file,
            state: Mutex::new(state),
            runtime: Mutex::new(None),
            runtime_dir: dir.join("process-runtime"),
            firewall,
            flavour,
        }))
    }

    pub fn settings(&self) -> &DbSettings {
        &self.settings
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// What the health checks need, without waiting behind a long operation: the state
    /// (`Err` while an operation such as `db.create` holds it) and the server's
    /// container as the engine sees it.
    /// Waits at most `wait` for the state: the reconciler holds it briefly every few
    /// seconds, an operation such as `db.create` for minutes.
    pub async fn health_view(&self, wait: Duration) -> HealthView {
        let state = match tokio::time::timeout(wait, self.state.lock()).await {
            Ok(g) => Ok(g.clone()),
            Err(_) => Err(()),
        };
        let container = match self.try_runtime().await {
            Ok(rt) => rt
                .inspect(&self.settings.container_name)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        HealthView { state, container }
    }

    /// The spec of the database on this VM, if one was created (or is being created).
    pub async fn current_spec(&self) -> Option<DatabaseSpec> {
        self.state.lock().await.as_ref().map(|s| s.spec.clone())
    }

    /// The container runtime, connecting on first use. While the engine is unreachable
    /// this retries for `engine_wait_s` and then fails with the engine's error.
    async fn runtime(
        &self,
        progress: ProgressFn<'_>,
    ) -> Result<Arc<dyn ContainerRuntime>, DbError> {
        let deadline = Instant::now() + Duration::from_secs(self.settings.engine_wait_s);
        let mut said = false;
        loop {
            let attempt = self.try_runtime().await;
            match attempt {
                Ok(rt) => return Ok(rt),
                Err(RuntimeError::EngineUnavailable(e)) if Instant::now() < deadline => {
                    if !said {
                        progress(0, &format!("container engine unreachable, retrying: {e}"));
                        tracing::warn!(error = %e, "container engine unreachable; retrying");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn try_runtime(&self) -> Result<Arc<dyn ContainerRuntime>, RuntimeError> {
        let mut slot = self.runtime.lock().await;
        if let Some(rt) = slot.as_ref() {
            // A cached connection: make sure the engine still answers.
            rt.version().await?;
            return Ok(rt.clone());
        }
        let rt: Arc<dyn ContainerRuntime> = match self.settings.runtime {
            RuntimeKind::Docker => Arc::new(crate::runtime::docker::DockerRuntime::connect(
                &self.settings.docker_socket,
            )?),
            RuntimeKind::Process => Arc::new(crate::runtime::process::ProcessRuntime::new(
                self.runtime_dir.clone(),
            )),
        };
        rt.version().await?;
        *slot = Some(rt.clone());
        Ok(rt)
    }

    /// A program name for the runtime: bare for images (their PATH finds it), an
    /// absolute host path for the process runtime.
    fn program(&self) -> impl Fn(&str) -> String + '_ {
        move |name: &str| match self.settings.runtime {
            RuntimeKind::Docker => name.to_string(),
            RuntimeKind::Process => self
                .settings
                .process_path
                .iter()
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .map_or_else(|| name.to_string(), |p| p.display().to_string()),
        }
    }

    fn server_container(&self, st: &DbState) -> ContainerSpec {
        let f = st.spec.engine;
        ContainerSpec {
            name: self.settings.container_name.clone(),
            image: st.image.clone(),
            command: engine::server_argv(f, &self.paths, self.program()),
            env: vec![("TZ".into(), "UTC".into())],
            mounts: vec![Mount {
                source: self.paths.root.clone(),
                target: self.paths.root.clone(),
                read_only: false,
            }],
            user: Some(format!("{}:{}", self.settings.uid, self.settings.gid)),
            memory_bytes: st.spec.memory_mb.map(|m| m * 1024 * 1024),
            cpus: st.spec.cpus,
            restart: RestartPolicy::UnlessStopped,
            stop_timeout_s: 60,
            labels: BTreeMap::from([
                ("dbvm.role".to_string(), "database".to_string()),
                ("dbvm.engine".to_string(), format!("{f:?}").to_lowercase()),
                // PostgreSQL's SIGTERM is a *smart* shutdown that waits for every client
                // to leave; SIGINT is the fast, clean one. MySQL's SIGTERM is clean.
                (
                    crate::runtime::STOP_SIGNAL_LABEL.to_string(),
                    if f == Flavour::Postgres {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    }
                    .to_string(),
                ),
            ]),
        }
    }

    fn init_container(&self, st: &DbState) -> ContainerSpec {
        let mut spec = self.server_container(st);
        spec.name = format!("{}-init", self.settings.container_name);
        spec.command = engine::init_argv(st.spec.engine, &self.paths, self.program());
        spec.restart = RestartPolicy::No;
        spec.labels
            .insert("dbvm.role".to_string(), "database-init".to_string());
        spec
    }

    /// The engine of the database made here, if any (see the field).
    pub fn flavour(&self) -> Option<Flavour> {
        *self.flavour.read().unwrap_or_else(|p| p.into_inner())
    }

    async fn save(&self, st: &mut DbState) -> Result<(), DbError> {
        *self.flavour.write().unwrap_or_else(|p| p.into_inner()) = Some(st.spec.engine);
        st.updated_at_ms = dbvm_protocol::now_ms();
        let file = self.state_file.clone();
        let copy = st.clone();
        tokio::task::spawn_blocking(move || file.save(&copy))
            .await
            .map_err(|e| DbError::Failed(format!("state writer failed: {e}")))?
    }

    // ----- create ---------------------------------------------------------------------

    /// Runs the phases of create that are asked for and not yet done. A create with the
    /// spec the database was made with resumes or does nothing; another spec is refused.
    pub async fn create(
        &self,
        spec: DatabaseSpec,
        preconfigure: bool,
        configure: bool,
        reply_key: Option<[u8; 32]>,
        source: Option<&dyn DataSource>,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let validated = spec.validate()?;
        let source_described = source.map(|s| s.describe());
        if configure && reply_key.is_none() {
            return Err(DbError::Invalid(
                "configure returns the dbaas password sealed to the control plane: the command needs a reply_key".into(),
            ));
        }
        let mut guard = self.state.lock().await;
        let now = dbvm_protocol::now_ms();
        let mut st = match guard.as_ref() {
            None => DbState {
                image: spec
                    .image
                    .clone()
                    .unwrap_or_else(|| self.settings.images.for_flavour(spec.engine).to_string()),
                spec: spec.clone(),
                phase: Phase::None,
                want_running: true,
                parameters: spec.parameters.clone().into_iter().collect(),
                restart_pending: vec![],
                archive_command: None,
                restored_from: source_described.clone(),
                recovering: None,
                created_at_ms: now,
                updated_at_ms: now,
            },
            Some(existing)
                if existing.spec == spec && existing.restored_from == source_described =>
            {
                existing.clone()
            }
            // A restore that has not finished may be sent again with another target or
            // source: its data directory is rebuilt from empty anyway.
            Some(existing)
                if existing.spec == spec
                    && existing.phase < Phase::Configured
                    && existing.restored_from.is_some()
                    && source_described.is_some() =>
            {
                let mut st = existing.clone();
                st.restored_from = source_described.clone();
                st
            }
            Some(existing) if existing.spec == spec => {
                return Err(DbError::Invalid(match &existing.restored_from {
                    Some(from) => format!(
                        "this VM's database was restored from {from}; it cannot be made again from another source (a restore builds a new database: use a new VM)"
                    ),
                    None => "this VM's database was created empty; a restore builds a new database on a new VM".to_string(),
                }))
            }
            Some(existing) => {
                return Err(DbError::Invalid(format!(
                    "this VM already has a {} database {:?} created with a different spec (a VM holds one database; use db.set_parameters to change parameters, db.export_template to see the spec)",
                    format!("{:?}", existing.spec.engine).to_lowercase(),
                    existing.spec.database
                )))
            }
        };
        if configure && !preconfigure && st.phase < Phase::Preconfigured {
            return Err(DbError::Invalid(
                "configure needs preconfigure first (send db.preconfigure, or db.create for both)"
                    .into(),
            ));
        }
        let mut out = json!({
            "engine": st.spec.engine,
            "database": st.spec.database,
            "port": st.spec.port(),
            "tls": st.spec.tls,
            "image": st.image,
        });
        let mut timings = serde_json::Map::new();
        if preconfigure {
            if st.phase >= Phase::Preconfigured {
                out["preconfigure"] = json!("already done");
            } else {
                let t = Instant::now();
                let fw = self.preconfigure(&st, progress).await?;
                st.phase = Phase::Preconfigured;
                self.save(&mut st).await?;
                *guard = Some(st.clone());
                timings.insert("preconfigure_ms".into(), json!(ms(t.elapsed())));
                out["preconfigure"] = json!("done");
                if let Some(fw) = fw {
                    out["firewall"] = fw;
                }
                fault_point("preconfigure");
            }
        }
        if configure {
            if st.phase >= Phase::Configured {
                out["configure"] = json!("already done");
                out["note"] = json!("the database exists; its dbaas password is not sent again");
            } else {
                let (password, steps, restored) = self
                    .configure(&mut st, &validated, source, progress)
                    .await?;
                for (k, v) in steps {
                    timings.insert(k, v);
                }
                if let Some(r) = restored {
                    out["restored"] = r;
                }
                st.phase = Phase::Configured;
                self.save(&mut st).await?;
                *guard = Some(st.clone());
                let key = reply_key.ok_or_else(|| DbError::Invalid("no reply_key".into()))?;
                let sealed = Sealed::seal(&key, password.expose())
                    .map_err(|e| DbError::Failed(format!("cannot seal the password: {e}")))?;
                out["configure"] = json!("done");
                out["user"] = json!(engine::DBAAS_USER);
                out["password"] = json!(sealed);
            }
        }
        out["phase"] = json!(st.phase);
        out["timings"] = Value::Object(timings);
        progress(100, "done");
        Ok(out)
    }

    async fn preconfigure(
        &self,
        st: &DbState,
        progress: ProgressFn<'_>,
    ) -> Result<Option<Value>, DbError> {
        progress(5, "checking the container runtime");
        let rt = self.runtime(progress).await?;
        progress(10, &format!("checking image {}", st.image));
        if !rt.image_present(&st.image).await? {
            return Err(RuntimeError::ImageMissing(format!(
                "image {} is not on this VM (images are never pulled; build it with packaging/images/build-image.sh or load it)",
                st.image
            ))
            .into());
        }
        progress(20, "creating directories");
        let paths = self.paths.clone();
        let (uid, gid) = (self.settings.uid, self.settings.gid);
        tokio::task::spawn_blocking(move || prepare_dirs(&paths, uid, gid))
            .await
            .map_err(|e| DbError::Failed(format!("directory setup failed: {e}")))??;
        let fw = match &self.firewall {
            Some(fw) => {
                progress(40, "applying the firewall");
                Some(fw.apply(&st.spec).await.map_err(DbError::Failed)?)
            }
            None => None,
        };
        progress(50, "preconfigure done");
        Ok(fw)
    }

    async fn configure(
        &self,
        st: &mut DbState,
        validated: &params::Validated,
        source: Option<&dyn DataSource>,
        progress: ProgressFn<'_>,
    ) -> Result<
        (
            dbvm_protocol::seal::Secret,
            Vec<(String, Value)>,
            Option<Value>,
        ),
        DbError,
    > {
        let mut steps = Vec::new();
        let rt = self.runtime(progress).await?;
        let f = st.spec.engine;
        let (uid, gid) = (self.settings.uid, self.settings.gid);
        progress(55, "writing configuration");
        let t = Instant::now();
        if st.spec.tls && !self.paths.tls_key().exists() {
            engine::make_tls(&self.paths, uid, gid)?;
        }
        self.write_config(st, &validated.values)?;
        steps.push(("config_ms".to_string(), json!(ms(t.elapsed()))));

        let mut restored = None;
        if let Some(source) = source {
            // A restore that did not reach Configured is redone from the start: what an
            // earlier attempt left (a half-replayed cluster) is not trusted.
            progress(60, "restoring the data directory from the backup");
            let t = Instant::now();
            self.stop_server(rt.as_ref(), st, Duration::from_secs(60))
                .await?;
            let data = self.paths.data.clone();
            tokio::task::spawn_blocking(move || empty_dir(&data))
                .await
                .map_err(|e| DbError::Failed(format!("cleanup failed: {e}")))??;
            restored = Some(source.populate(self, st, progress).await?);
            steps.push(("restore_ms".to_string(), json!(ms(t.elapsed()))));
        } else if !self.paths.initialised(f) {
            progress(60, "initialising the data directory");
            let t = Instant::now();
            // A data directory that is not initialised but not empty is what an
            // initialisation cut off by a crash leaves behind: nothing of value, start over.
            let data = self.paths.data.clone();
            tokio::task::spawn_blocking(move || empty_dir(&data))
                .await
                .map_err(|e| DbError::Failed(format!("cleanup failed: {e}")))??;
            let init = self.init_container(st);
            let _ = rt.remove(&init.name).await;
            let out = rt
                .run_to_completion(&init, Duration::from_secs(300))
                .await?;
            if out.exit_code != 0 {
                let tail = |s: &str| {
                    let lines: Vec<&str> = s.lines().collect();
                    lines[lines.len().saturating_sub(8)..].join("\n")
                };
                let space = fs_free(&self.paths.data)
                    .map(|b| format!(" ({} MiB free on the data disk)", b / (1024 * 1024)));
                return Err(DbError::Failed(format!(
                    "initialising the database failed (exit code {}){}:\n{}\n{}",
                    out.exit_code,
                    space.unwrap_or_default(),
                    tail(&out.stderr),
                    tail(&out.stdout)
                )));
            }
            steps.push(("init_ms".to_string(), json!(ms(t.elapsed()))));
        }

        progress(75, "starting the server");
        let t = Instant::now();
        let server = self.server_container(st);
        rt.ensure_running(&server).await?;
        let started = Admin::wait(
            &st.spec,
            &self.paths,
            Duration::from_secs(self.settings.start_timeout_s),
            rt.as_ref(),
            &server.name,
        )
        .await;
        let mut admin = match (started, source) {
            (Ok(a), _) => a,
            (Err(e), Some(_)) => {
                // A restored server that cannot finish recovery must not linger (it would
                // promote wherever its WAL ends): stopped, the error stands.
                let _ = rt.stop(&server.name, Duration::from_secs(30)).await;
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        steps.push(("start_ms".to_string(), json!(ms(t.elapsed()))));
        if let Some(source) = source {
            progress(80, "recovering to the target");
            let t = Instant::now();
            let recovered = match source.finish(self, st, &mut admin, progress).await {
                Ok(r) => r,
                Err(e) => {
                    drop(admin);
                    let _ = rt.stop(&server.name, Duration::from_secs(30)).await;
                    return Err(e);
                }
            };
            steps.push(("recover_ms".to_string(), json!(ms(t.elapsed()))));
            let mut r = restored.take().unwrap_or_else(|| json!({}));
            if let (Some(obj), Value::Object(rec)) = (r.as_object_mut(), recovered) {
                obj.extend(rec);
            }
            restored = Some(r);
        }

        progress(90, "creating the dbaas user and the user database");
        let t = Instant::now();
        let password = engine::generate_password();
        admin
            .ensure_user_and_database(&st.spec.database, &password)
            .await?;
        steps.push(("users_ms".to_string(), json!(ms(t.elapsed()))));
        st.want_running = true;
        Ok((password, steps, restored))
    }

    /// PostgreSQL's WAL cap while archiving is on (see [`engine::WAL_CAP_PCT`]).
    pub fn wal_cap(&self, st: &DbState) -> Option<u64> {
        if st.spec.engine != Flavour::Postgres || st.archive_command.is_none() {
            return None;
        }
        fs_total(&self.paths.data).map(engine::wal_cap)
    }

    fn write_config(
        &self,
        st: &DbState,
        values: &BTreeMap<String, params::Value>,
    ) -> Result<(), DbError> {
        let f = st.spec.engine;
        let (uid, gid) = (self.settings.uid, self.settings.gid);
        engine::write_owned(
            &self.paths.main_config(f),
            engine::main_config(
                &st.spec,
                &self.paths,
                st.archive_command.as_deref(),
                self.wal_cap(st),
            )
            .as_bytes(),
            0o640,
            uid,
            gid,
        )?;
        if f == Flavour::Postgres {
            engine::write_owned(
                &self.paths.conf.join("pg_hba.conf"),
                engine::pg_hba(&st.spec).as_bytes(),
                0o640,
                uid,
                gid,
            )?;
        }
        engine::write_owned(
            &self.paths.params_file(f),
            engine::params_file(f, values).as_bytes(),
            0o640,
            uid,
            gid,
        )
    }

    // ----- for other capabilities ------------------------------------------------------

    /// How a program is named for this runtime (see [`Self::run_tool`]).
    pub fn program_fn(&self) -> impl Fn(&str) -> String + '_ {
        self.program()
    }

    /// The state of a configured database (an error names what is missing).
    pub async fn configured_state(&self) -> Result<DbState, DbError> {
        Ok(self.configured().await?.1)
    }

    /// Runs a tool of the database's own image (pgBackRest, mariabackup, …) once, as the
    /// database user, on the same directories: a one-shot container named
    /// `<container>-<role>` (the process runtime runs the host's binary of that name).
    /// `argv` gets the function that names a program for this runtime.
    pub async fn run_tool(
        &self,
        st: &DbState,
        role: &str,
        argv: impl FnOnce(&dyn Fn(&str) -> String) -> Vec<String>,
        timeout: Duration,
    ) -> Result<crate::runtime::RunOutput, DbError> {
        self.run_tool_bounded(st, role, None, argv, timeout).await
    }

    /// [`Self::run_tool`] with its own memory (bytes) and CPU limits instead of the
    /// server's (a restore drill must not starve the database it checks).
    pub async fn run_tool_bounded(
        &self,
        st: &DbState,
        role: &str,
        limits: Option<(u64, f64)>,
        argv: impl FnOnce(&dyn Fn(&str) -> String) -> Vec<String>,
        timeout: Duration,
    ) -> Result<crate::runtime::RunOutput, DbError> {
        let rt = self.runtime(&|_, _| {}).await?;
        let mut spec = self.server_container(st);
        if let Some((memory, cpus)) = limits {
            spec.memory_bytes = Some(memory);
            spec.cpus = Some(cpus);
        }
        spec.name = format!("{}-{role}", self.settings.container_name);
        let program = self.program();
        spec.command = argv(&program);
        spec.restart = RestartPolicy::No;
        spec.labels
            .insert("dbvm.role".to_string(), format!("database-{role}"));
        // A one-shot left behind by a killed agent is never resumed: it is replaced.
        let _ = rt.remove(&spec.name).await;
        Ok(rt.run_to_completion(&spec, timeout).await?)
    }

    /// Turns PostgreSQL's WAL archiving on (`Some(command)`) or off, with the restart that
    /// `archive_mode` needs (a changed command alone is a reload). Reported like a
    /// parameter change.
    pub async fn set_archive_command(
        &self,
        command: Option<String>,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let (mut guard, mut st) = self.configured().await?;
        if st.spec.engine != Flavour::Postgres {
            return Err(DbError::Invalid(
                "archive_command is PostgreSQL's; this database is not PostgreSQL".into(),
            ));
        }
        let before = st.archive_command.clone();
        if before == command {
            return Ok(json!({ "changed": [], "restarted": false }));
        }
        let mode_changes = before.is_some() != command.is_some();
        let all = params::validate(st.spec.engine, &st.parameters.clone().into_iter().collect())
            .map_err(|e| DbError::Invalid(e.to_string()))?;
        st.archive_command = command;
        self.write_config(&st, &all.values)?;
        if mode_changes && !st.restart_pending.contains(&"archive_mode".to_string()) {
            st.restart_pending.push("archive_mode".to_string());
        }
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        let rt = self.runtime(progress).await?;
        let running = matches!(rt.inspect(&self.settings.container_name).await?, Some(s) if s.state == State::Running);
        let mut restarted = false;
        if running && mode_changes {
            progress(30, "restarting the database: archive_mode needs it");
            self.stop_server(rt.as_ref(), &st, Duration::from_secs(60))
                .await?;
            self.start_and_wait(rt.as_ref(), &st).await?;
            st.restart_pending.retain(|k| k != "archive_mode");
            self.save(&mut st).await?;
            *guard = Some(st.clone());
            restarted = true;
        } else if running {
            let mut admin = Admin::connect(&st.spec, &self.paths).await?;
            admin.reload(&BTreeMap::new(), st.spec.engine).await?;
        }
        let mut changed = vec!["archive_command"];
        if mode_changes {
            changed.push("archive_mode");
        }
        let cap = self.wal_cap(&st);
        if cap.is_some() {
            changed.extend(["max_wal_size", "min_wal_size", "max_slot_wal_keep_size"]);
        }
        Ok(json!({
            "changed": changed,
            "archive_mode": if st.archive_command.is_some() { "on" } else { "off" },
            "wal_cap_bytes": cap,
            "restarted": restarted,
            "restart_required": st.restart_pending,
        }))
    }

    /// Recovers the database in place: records in the state file that a recover is under
    /// way, stops the server, lets `source` rewrite the data directory (a one-shot run),
    /// starts the server and lets `source` wait for the end of recovery. The caller has
    /// validated everything it can first; the database manager knows nothing of backups.
    ///
    /// A `populate` that fails with [`DbError::Invalid`] changed nothing: the server is
    /// started again on its data as they were (unless an earlier recover was cut off:
    /// then they are half-restored and stay stopped and marked). Any later failure leaves the server
    /// stopped and the state marked (`recovering`), so neither the reconciler nor `start`
    /// runs a half-restored data directory; the error says what to do.
    pub async fn recover_in_place(
        &self,
        source: &dyn DataSource,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let (mut guard, mut st) = self.configured().await?;
        let rt = self.runtime(progress).await?;
        let t = Instant::now();
        // An earlier recover cut off left the data directory half-restored: whatever
        // fails now, it stays marked and stopped.
        let half_restored = st.recovering.is_some();
        let still_half = |m: String| {
            DbError::Failed(format!(
                "{m}; the data directory is still half-restored by an earlier recover. {RECOVER_INTERRUPTED}"
            ))
        };
        st.recovering = Some(json!({
            "source": source.describe(),
            "started_ms": dbvm_protocol::now_ms(),
        }));
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        progress(20, "stopping the server");
        if let Err(e) = self
            .stop_server(rt.as_ref(), &st, Duration::from_secs(60))
            .await
        {
            if half_restored {
                return Err(still_half(format!(
                    "cannot stop the server for the recover: {e}"
                )));
            }
            st.recovering = None;
            self.save(&mut st).await?;
            *guard = Some(st.clone());
            return Err(DbError::Failed(format!(
                "cannot stop the server for the recover: {e}; nothing was changed"
            )));
        }
        let touched = |e: DbError| {
            DbError::Failed(format!(
                "recover failed after the data directory was rewritten: {e}. {RECOVER_INTERRUPTED}"
            ))
        };
        progress(30, "restoring the data directory in place");
        let t_populate = Instant::now();
        let restored = match source.populate(self, &st, progress).await {
            Ok(r) => r,
            Err(DbError::Invalid(m)) if half_restored => return Err(still_half(m)),
            Err(DbError::Invalid(m)) => {
                // Refused before any file changed: the database goes on as it was.
                st.recovering = None;
                self.save(&mut st).await?;
                *guard = Some(st.clone());
                let back = self.start_and_wait(rt.as_ref(), &st).await;
                return Err(DbError::Failed(match back {
                    Ok(_) => format!("{m}; nothing was changed: the database runs as before"),
                    Err(b) => format!(
                        "{m}; the data directory was not changed, but the server did not start again: {b}"
                    ),
                }));
            }
            Err(e) => return Err(touched(e)),
        };
        let populate_ms = ms(t_populate.elapsed());
        fault_point("recover-restored");
        progress(75, "starting the server on the restored data");
        let t_start = Instant::now();
        let server = self.server_container(&st);
        let started = match rt.ensure_running(&server).await {
            Ok(_) => {
                Admin::wait(
                    &st.spec,
                    &self.paths,
                    Duration::from_secs(self.settings.start_timeout_s),
                    rt.as_ref(),
                    &server.name,
                )
                .await
            }
            Err(e) => Err(e.into()),
        };
        let mut admin = match started {
            Ok(a) => a,
            Err(e) => {
                let _ = rt.stop(&server.name, Duration::from_secs(30)).await;
                return Err(touched(e));
            }
        };
        let start_ms = ms(t_start.elapsed());
        progress(80, "recovering to the target");
        let t_recover = Instant::now();
        let recovered = match source.finish(self, &st, &mut admin, progress).await {
            Ok(r) => r,
            Err(e) => {
                drop(admin);
                // Not left running: it would promote wherever its WAL ends.
                let _ = rt.stop(&server.name, Duration::from_secs(30)).await;
                return Err(touched(e));
            }
        };
        st.recovering = None;
        st.want_running = true;
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        let mut out = restored;
        if let (Some(obj), Value::Object(rec)) = (out.as_object_mut(), recovered) {
            obj.extend(rec);
        }
        out["timings"] = json!({
            "restore_ms": populate_ms,
            "start_ms": start_ms,
            "recover_ms": ms(t_recover.elapsed()),
            "total_ms": ms(t.elapsed()),
        });
        Ok(out)
    }

    // ----- day 2 ----------------------------------------------------------------------

    async fn configured(
        &self,
    ) -> Result<(tokio::sync::MutexGuard<'_, Option<DbState>>, DbState), DbError> {
        let guard = self.state.lock().await;
        match guard.as_ref() {
            Some(st) if st.phase == Phase::Configured => {
                let st = st.clone();
                Ok((guard, st))
            }
            Some(_) => Err(DbError::Invalid(
                "the database is not configured yet (db.create has not finished)".into(),
            )),
            None => Err(DbError::NotCreated),
        }
    }

    async fn start_and_wait(
        &self,
        rt: &dyn ContainerRuntime,
        st: &DbState,
    ) -> Result<(Reconciled, Admin), DbError> {
        let server = self.server_container(st);
        let r = rt.ensure_running(&server).await?;
        let admin = Admin::wait(
            &st.spec,
            &self.paths,
            Duration::from_secs(self.settings.start_timeout_s),
            rt,
            &server.name,
        )
        .await?;
        Ok((r, admin))
    }

    /// Stops the server cleanly: the container's stop signal is the engine's clean,
    /// prompt shutdown (see the stop-signal label in [`Self::server_container`]).
    async fn stop_server(
        &self,
        rt: &dyn ContainerRuntime,
        _st: &DbState,
        timeout: Duration,
    ) -> Result<bool, DbError> {
        Ok(rt.stop(&self.settings.container_name, timeout).await?)
    }

    pub async fn start(&self, progress: ProgressFn<'_>) -> Result<Value, DbError> {
        let (mut guard, mut st) = self.configured().await?;
        refuse_if_recovering(&st)?;
        let rt = self.runtime(progress).await?;
        st.want_running = true;
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        let t = Instant::now();
        let (r, mut admin) = self.start_and_wait(rt.as_ref(), &st).await?;
        let info = admin.info().await?;
        Ok(
            json!({ "container": format!("{r:?}").to_lowercase(), "server": info, "took_ms": ms(t.elapsed()) }),
        )
    }

    pub async fn stop(&self, progress: ProgressFn<'_>) -> Result<Value, DbError> {
        let (mut guard, mut st) = self.configured().await?;
        let rt = self.runtime(progress).await?;
        st.want_running = false;
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        let t = Instant::now();
        let found = self
            .stop_server(rt.as_ref(), &st, Duration::from_secs(60))
            .await?;
        Ok(json!({ "stopped": found, "took_ms": ms(t.elapsed()) }))
    }

    pub async fn restart(&self, progress: ProgressFn<'_>) -> Result<Value, DbError> {
        let (mut guard, mut st) = self.configured().await?;
        refuse_if_recovering(&st)?;
        let rt = self.runtime(progress).await?;
        let t = Instant::now();
        progress(10, "stopping");
        self.stop_server(rt.as_ref(), &st, Duration::from_secs(60))
            .await?;
        progress(50, "starting");
        let (_, mut admin) = self.start_and_wait(rt.as_ref(), &st).await?;
        st.want_running = true;
        st.restart_pending.clear();
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        let info = admin.info().await?;
        Ok(json!({ "restarted": true, "server": info, "took_ms": ms(t.elapsed()) }))
    }

    /// Power-off safe shutdown: a clean stop that leaves the database wanted running, so
    /// the agent starts it again when the VM comes back.
    pub async fn shutdown(&self, progress: ProgressFn<'_>) -> Result<Value, DbError> {
        let (_guard, st) = self.configured().await?;
        let rt = self.runtime(progress).await?;
        let t = Instant::now();
        let found = self
            .stop_server(rt.as_ref(), &st, Duration::from_secs(120))
            .await?;
        Ok(json!({ "stopped": found, "clean": true, "took_ms": ms(t.elapsed()) }))
    }

    pub async fn status(&self) -> Result<Value, DbError> {
        let guard = self.state.lock().await;
        let Some(st) = guard.clone() else {
            drop(guard);
            let fw = match &self.firewall {
                Some(fw) => Some(
                    fw.status(None)
                        .await
                        .unwrap_or_else(|e| json!({ "error": e })),
                ),
                None => None,
            };
            let runtime = match self.try_runtime().await {
                Ok(rt) => json!({ "kind": rt.kind(), "version": rt.version().await.ok() }),
                Err(e) => json!({ "error": e.to_string() }),
            };
            return Ok(json!({ "created": false, "runtime": runtime, "firewall": fw }));
        };
        drop(guard);
        let mut out = json!({
            "created": true,
            "phase": st.phase,
            "engine": st.spec.engine,
            "database": st.spec.database,
            "port": st.spec.port(),
            "image": st.image,
            "want_running": st.want_running,
            "parameters": st.parameters,
            "restart_pending": st.restart_pending,
        });
        if let Some(r) = &st.recovering {
            out["recovering"] = json!({ "since": r, "what_to_do": RECOVER_INTERRUPTED });
        }
        match self.try_runtime().await {
            Err(e) => out["container"] = json!({ "error": e.to_string() }),
            Ok(rt) => {
                let c = rt.inspect(&self.settings.container_name).await?;
                let running = matches!(&c, Some(s) if s.state == State::Running);
                let matches = c.as_ref().and_then(|s| s.fingerprint.clone())
                    == Some(self.server_container(&st).fingerprint());
                out["container"] =
                    json!({ "runtime": rt.kind(), "status": c, "matches_spec": matches });
                if running && st.phase == Phase::Configured {
                    let server = match Admin::connect(&st.spec, &self.paths).await {
                        Ok(mut a) => a.info().await.map(|i| json!(i)),
                        Err(e) => Err(e),
                    };
                    out["server"] = server.unwrap_or_else(|e| json!({ "error": e.to_string() }));
                }
            }
        }
        if let Some(fw) = &self.firewall {
            out["firewall"] = fw
                .status(Some(&st.spec))
                .await
                .unwrap_or_else(|e| json!({ "error": e }));
        }
        Ok(out)
    }

    /// Changes parameters: every name and value is checked first (nothing changes on a bad
    /// one); the include file is rewritten; the server reloads; what needs a restart is
    /// restarted only when `allow_restart`, and reported either way.
    pub async fn set_parameters(
        &self,
        changes: serde_json::Map<String, Value>,
        allow_restart: bool,
        progress: ProgressFn<'_>,
    ) -> Result<Value, DbError> {
        let (mut guard, mut st) = self.configured().await?;
        // It may restart the server: never on a half-restored data directory.
        refuse_if_recovering(&st)?;
        let f = st.spec.engine;
        if changes.is_empty() {
            return Err(DbError::Invalid("parameters: nothing to change".into()));
        }
        params::validate(f, &changes).map_err(|e| DbError::Invalid(e.to_string()))?;
        let mut merged: serde_json::Map<String, Value> =
            st.parameters.clone().into_iter().collect();
        for (k, v) in &changes {
            // `null` removes an override (the engine's default applies again).
            if v.is_null() {
                merged.remove(k);
            } else {
                merged.insert(k.clone(), v.clone());
            }
        }
        let all = params::validate(f, &merged).map_err(|e| DbError::Invalid(e.to_string()))?;
        let rt = self.runtime(progress).await?;
        self.write_config(&st, &all.values)?;
        st.parameters = merged.into_iter().collect();
        let changed_restart: Vec<String> = changes
            .keys()
            .filter(|k| params::lookup(f, k).is_some_and(|s| s.restart))
            .cloned()
            .collect();
        for k in &changed_restart {
            if !st.restart_pending.contains(k) {
                st.restart_pending.push(k.clone());
            }
        }
        self.save(&mut st).await?;
        *guard = Some(st.clone());

        let running = matches!(rt.inspect(&self.settings.container_name).await?, Some(s) if s.state == State::Running);
        let mut applied_live = false;
        if running {
            let mut admin = Admin::connect(&st.spec, &self.paths).await?;
            let only_changes: BTreeMap<String, params::Value> = all
                .values
                .iter()
                .filter(|(k, _)| changes.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let pending = admin.reload(&only_changes, f).await?;
            for k in pending {
                if !st.restart_pending.contains(&k) {
                    st.restart_pending.push(k);
                }
            }
            applied_live = true;
        }
        let mut restarted = false;
        if !st.restart_pending.is_empty() && allow_restart && st.want_running {
            progress(50, "restarting to apply parameters that need it");
            self.stop_server(rt.as_ref(), &st, Duration::from_secs(60))
                .await?;
            self.start_and_wait(rt.as_ref(), &st).await?;
            st.restart_pending.clear();
            restarted = true;
        }
        self.save(&mut st).await?;
        *guard = Some(st.clone());
        let mut live = serde_json::Map::new();
        if st.want_running {
            if let Ok(mut admin) = Admin::connect(&st.spec, &self.paths).await {
                for k in changes.keys() {
                    if let Ok(Some(v)) = admin.live_parameter(f, k).await {
                        live.insert(k.clone(), json!(v.to_string()));
                    }
                }
            }
        }
        Ok(json!({
            "changed": changes.keys().collect::<Vec<_>>(),
            "applied_live": applied_live,
            "restart_required": st.restart_pending,
            "restarted": restarted,
            "live": live,
        }))
    }

    /// Moves the server to another image (a minor version: the data directory is kept).
    /// If the new container does not become healthy, the old image is put back.
    pub async fn upgrade(&self, image: String, progress: ProgressFn<'_>) -> Result<Value, DbError> {
        super::validate_image_ref(&image).map_err(|e| DbError::Invalid(format!("image: {e}")))?;
        let (mut guard, mut st) = self.configured().await?;
        refuse_if_recovering(&st)?;
        let rt = self.runtime(progress).await?;
        if !rt.image_present(&image).await? {
            return Err(RuntimeError::ImageMissing(format!(
                "image {image} is not on this VM (load it first; images are never pulled)"
            ))
            .into());
        }
        let from = st.image.clone();
        if from == image {
            return Ok(json!({ "from": from, "to": image, "changed": false }));
        }
        let t = Instant::now();
        progress(10, &format!("stopping {from}"));
        self.stop_server(rt.as_ref(), &st, Duration::from_secs(60))
            .await?;
        let mut next = st.clone();
        next.image = image.clone();
        progress(40, &format!("starting {image}"));
        match self.start_and_wait(rt.as_ref(), &next).await {
            Ok((_, mut admin)) => {
                let info = admin.info().await?;
                next.want_running = true;
                self.save(&mut next).await?;
                *guard = Some(next);
                Ok(
                    json!({ "from": from, "to": image, "changed": true, "server": info, "took_ms": ms(t.elapsed()) }),
                )
            }
            Err(e) => {
                progress(
                    70,
                    &format!("{image} did not become healthy; rolling back to {from}"),
                );
                tracing::warn!(error = %e, %image, %from, "upgrade failed; rolling back");
                let _ = rt
                    .stop(&self.settings.container_name, Duration::from_secs(30))
                    .await;
                let back = self.start_and_wait(rt.as_ref(), &st).await;
                st.want_running = true;
                self.save(&mut st).await?;
                *guard = Some(st.clone());
                Err(DbError::Failed(match back {
                    Ok(_) => format!(
                        "upgrade to {image} failed ({e}); rolled back to {from}, which is running"
                    ),
                    Err(b) => format!(
                        "upgrade to {image} failed ({e}); rolling back to {from} failed too ({b})"
                    ),
                }))
            }
        }
    }

    /// The spec a `db.create` accepts to make a database like this one (no secrets).
    pub async fn export_template(&self) -> Result<Value, DbError> {
        let guard = self.state.lock().await;
        let st = guard.as_ref().ok_or(DbError::NotCreated)?;
        let mut spec = st.spec.clone();
        spec.parameters = st.parameters.clone().into_iter().collect();
        spec.image = Some(st.image.clone());
        Ok(json!({ "format": 1, "spec": spec }))
    }

    // ----- reconcile --------------------------------------------------------------------

    /// One pass: if the database should run and its container is not running (or not as
    /// specified), converge. Returns what was done, if anything.
    pub async fn reconcile_once(&self) -> Result<Option<Reconciled>, DbError> {
        let Ok(guard) = self.state.try_lock() else {
            return Ok(None); // an operation is running; it owns the container now
        };
        let Some(st) = guard.clone() else {
            return Ok(None);
        };
        if st.phase != Phase::Configured || !st.want_running {
            return Ok(None);
        }
        if st.recovering.is_some() {
            // A half-restored data directory is never started as if it were fine.
            return Ok(None);
        }
        let rt = self.try_runtime().await?;
        let server = self.server_container(&st);
        let r = rt.ensure_running(&server).await?;
        drop(guard);
        if r != Reconciled::AlreadyRunning {
            tracing::warn!(action = ?r, container = %server.name, "the database container was not running as wanted; converged");
        }
        Ok(Some(r))
    }

    /// Converges at start and then every `reconcile_interval_s` until `shutdown`.
    pub async fn reconcile(&self, shutdown: tokio_util::sync::CancellationToken) {
        let every = Duration::from_secs(self.settings.reconcile_interval_s);
        let mut last_error = String::new();
        loop {
            let pass = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.reconcile_once() => r,
            };
            match pass {
                Ok(_) => last_error.clear(),
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::warn!(error = %e, "cannot converge the database container");
                        last_error = e;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// What to do about a data directory an in-place recover left half-restored.
pub const RECOVER_INTERRUPTED: &str = "The database is stopped and will not be started on a half-restored data directory: send db.recover again (it rewrites the data directory from the backup), or restore the backups into a new database (db.restore on a new VM)";

fn refuse_if_recovering(st: &DbState) -> Result<(), DbError> {
    match &st.recovering {
        Some(_) => Err(DbError::Invalid(format!(
            "an in-place recover did not finish. {RECOVER_INTERRUPTED}"
        ))),
        None => Ok(()),
    }
}

fn fault_point(phase: &str) {
    if std::env::var(FAULT_EXIT_AFTER_PHASE).as_deref() == Ok(phase) {
        tracing::error!(
            phase,
            "fault injection: exiting after this phase as if killed"
        );
        std::process::exit(137);
    }
}

/// Creates the directory tree with owners and modes, and proves the data disk takes writes.
fn prepare_dirs(p: &Paths, uid: u32, gid: u32) -> Result<(), DbError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in p.all() {
        std::fs::create_dir_all(dir).map_err(|e| DbError::io("create directory", dir, e))?;
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| DbError::io("set the owner of", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| DbError::io("set the mode of", dir, e))?;
    }
    let probe = p.data.join(".dbvm-write-probe");
    std::fs::write(&probe, b"probe")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| DbError::io("write to the data directory", &p.data, e))?;
    Ok(())
}

fn empty_dir(dir: &Path) -> Result<(), DbError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DbError::io("read", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DbError::io("read", dir, e))?;
        let path = entry.path();
        let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(|e| DbError::io("remove", &path, e))?;
    }
    Ok(())
}

/// The size of the file system of `path`.
pub fn fs_total(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks() as u64 * s.fragment_size() as u64)
}

/// Bytes free for an unprivileged writer on the file system of `path`.
pub fn fs_free(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}
