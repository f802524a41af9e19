//! [`DockerRuntime`]: the Docker Engine API over a unix socket (bollard), what database VMs
//! use. Host networking only, images never pulled, a timeout on every call.
//!
//! API version: the client starts at 1.41 (Docker 20.10, the version this code is tested
//! against) and adjusts once, on first use, to what the engine accepts: an older engine
//! ("Maximum supported API version is 1.40") or a newer one that no longer speaks 1.41
//! ("Minimum supported API version is 1.44") is reconnected at the version it names. The
//! connection is made lazily and retried on the next call when it fails, so the agent can
//! start before the engine does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
    HostConfigLogConfig, RestartPolicy as DockerRestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures::StreamExt;
use tokio::sync::OnceCell;

use super::{
    ContainerRuntime, ContainerSpec, ContainerStatus, OutputTail, Reconciled, RestartPolicy,
    RunOutput, RuntimeError, State, MANAGED_LABEL, SPEC_LABEL, STOP_SIGNAL_LABEL,
};

/// The API version this code is written and tested against (Docker 20.10).
const PREFERRED_API: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// Timeout of a single engine call that does not wait for a container.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack added to a stop timeout for the engine's own work.
const STOP_SLACK: Duration = Duration::from_secs(15);

/// The Docker Engine behind one unix socket.
#[derive(Debug)]
pub struct DockerRuntime {
    socket: PathBuf,
    client: OnceCell<Client>,
    call_timeout: Duration,
}

#[derive(Debug, Clone)]
struct Client {
    docker: Docker,
    api: String,
}

impl DockerRuntime {
    /// A runtime for the engine listening on `socket` (e.g. `/var/run/docker.sock`). Nothing
    /// is contacted yet: the first call connects and settles the API version, so this only
    /// fails for a path that can never be a socket.
    pub fn connect(socket: &Path) -> Result<Self, RuntimeError> {
        if !socket.is_absolute() {
            return Err(RuntimeError::EngineUnavailable(format!(
                "Docker socket path {} is not absolute",
                socket.display()
            )));
        }
        if socket.as_os_str().len() > 107 {
            return Err(RuntimeError::EngineUnavailable(format!(
                "Docker socket path {} is longer than a unix socket path can be (107 bytes)",
                socket.display()
            )));
        }
        Ok(Self {
            socket: socket.to_path_buf(),
            client: OnceCell::new(),
            call_timeout: CALL_TIMEOUT,
        })
    }

    /// The socket this runtime talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sets the timeout of single engine calls (default 30 s).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    fn unavailable(&self, detail: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::EngineUnavailable(format!(
            "Docker engine at {} is not reachable ({detail}); start it (`systemctl start docker` on a VM, `bash scripts/dockerd.sh start DIR` for tests) or fix the agent's runtime socket setting",
            self.socket.display()
        ))
    }

    fn image_missing(&self, image: &str) -> RuntimeError {
        RuntimeError::ImageMissing(format!(
            "image {image} is not loaded in the Docker engine at {sock} and dbvm never pulls images; build it with `DOCKER_HOST=unix://{sock} bash packaging/images/build-image.sh postgres|mariadb [TAG]` or load it with `docker load`",
            sock = self.socket.display()
        ))
    }

    /// Maps a bollard error of the call `what`.
    fn map_err(&self, what: &str, e: BollardError) -> RuntimeError {
        match e {
            BollardError::SocketNotFoundError(_)
            | BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. } => self.unavailable(format!("{what}: {e}")),
            BollardError::RequestTimeoutError => {
                RuntimeError::Timeout(format!("{what} on {}", self.socket.display()))
            }
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => RuntimeError::NotFound(format!("{what}: {}", message.trim())),
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => RuntimeError::Failed(format!(
                "{what}: Docker engine answered {status_code}: {}",
                message.trim()
            )),
            other => RuntimeError::Failed(format!("{what}: {other}")),
        }
    }

    /// Runs one engine call with the call timeout.
    async fn call<T, F>(&self, what: &str, fut: F) -> Result<T, RuntimeError>
    where
        F: std::future::Future<Output = Result<T, BollardError>>,
    {
        self.call_with(what, self.call_timeout, fut).await
    }

    async fn call_with<T, F>(
        &self,
        what: &str,
        timeout: Duration,
        fut: F,
    ) -> Result<T, RuntimeError>
    where
        F: std::future::Future<Output = Result<T, BollardError>>,
    {
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r.map_err(|e| self.map_err(what, e)),
            Err(_) => Err(RuntimeError::Timeout(format!(
                "{what} on the Docker engine at {} took longer than {timeout:?}",
                self.socket.display()
            ))),
        }
    }

    /// The connected client, connecting and settling the API version on first use.
    async fn client(&self) -> Result<&Client, RuntimeError> {
        self.client.get_or_try_init(|| self.negotiate()).await
    }

    fn docker_at(&self, version: &ClientVersion) -> Result<Docker, RuntimeError> {
        let path = self.socket.to_string_lossy();
        // bollard's own request timeout is set high: every call here has its own timeout,
        // and waits for a container (run_to_completion) may legitimately take long.
        Docker::connect_with_unix(&path, 24 * 3600, version).map_err(|e| match e {
            BollardError::SocketNotFoundError(_) => self.unavailable("no socket there"),
            other => self.unavailable(other),
        })
    }

    async fn negotiate(&self) -> Result<Client, RuntimeError> {
        let mut version = PREFERRED_API;
        for _ in 0..2 {
            let docker = self.docker_at(&version)?;
            match tokio::time::timeout(self.call_timeout, docker.version()).await {
                Err(_) => {
                    return Err(RuntimeError::Timeout(format!(
                        "GET /version on the Docker engine at {} took longer than {:?}",
                        self.socket.display(),
                        self.call_timeout
                    )))
                }
                Ok(Ok(v)) => {
                    // The engine speaks our version; use a lower one only if it is older.
                    if let Some(server) = v.api_version.as_deref().and_then(parse_api) {
                        if server < (version.major_version, version.minor_version) {
                            version = ClientVersion {
                                major_version: server.0,
                                minor_version: server.1,
                            };
                            let docker = self.docker_at(&version)?;
                            return Ok(Client {
                                docker,
                                api: format!("{}.{}", server.0, server.1),
                            });
                        }
                    }
                    return Ok(Client {
                        docker,
                        api: format!("{}.{}", version.major_version, version.minor_version),
                    });
                }
                Ok(Err(BollardError::DockerResponseServerError {
                    status_code: 400,
                    message,
                })) => match api_from_version_error(&message) {
                    Some((major, minor)) => {
                        tracing::info!(
                            socket = %self.socket.display(),
                            api = %format!("{major}.{minor}"),
                            "Docker engine does not speak API 1.41; using the version it names"
                        );
                        version = ClientVersion {
                            major_version: major,
                            minor_version: minor,
                        };
                    }
                    None => {
                        return Err(RuntimeError::Failed(format!(
                            "Docker engine at {} refused API version negotiation: {}",
                            self.socket.display(),
                            message.trim()
                        )))
                    }
                },
                Ok(Err(e)) => return Err(self.map_err("GET /version", e)),
            }
        }
        Err(RuntimeError::Failed(format!(
            "Docker engine at {} accepts no API version this agent can use",
            self.socket.display()
        )))
    }

    async fn inspect_raw(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        let c = self.client().await?;
        match self
            .call(
                &format!("inspect container {name}"),
                c.docker.inspect_container(name, None),
            )
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(RuntimeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The image's labels, or ImageMissing.
    async fn image_labels(&self, image: &str) -> Result<HashMap<String, String>, RuntimeError> {
        let c = self.client().await?;
        match self
            .call(
                &format!("inspect image {image}"),
                c.docker.inspect_image(image),
            )
            .await
        {
            Ok(i) => Ok(i.config.and_then(|c| c.labels).unwrap_or_default()),
            Err(RuntimeError::NotFound(_)) => Err(self.image_missing(image)),
            Err(e) => Err(e),
        }
    }

    fn create_body(
        spec: &ContainerSpec,
        image_labels: &HashMap<String, String>,
        restart: RestartPolicy,
    ) -> ContainerCreateBody {
        let mut labels: HashMap<String, String> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(SPEC_LABEL.to_string(), spec.fingerprint());
        labels.insert(MANAGED_LABEL.to_string(), "true".to_string());
        let stop_signal = spec
            .stop_signal()
            .map(str::to_string)
            .or_else(|| image_labels.get(STOP_SIGNAL_LABEL).cloned());
        let binds = spec
            .mounts
            .iter()
            .map(|m| {
                format!(
                    "{}:{}{}",
                    m.source.display(),
                    m.target.display(),
                    if m.read_only { ":ro" } else { "" }
                )
            })
            .collect::<Vec<_>>();
        let restart_name = match restart {
            RestartPolicy::No => RestartPolicyNameEnum::NO,
            RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
            RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
        };
        let host_config = HostConfig {
            network_mode: Some("host".to_string()),
            binds: (!binds.is_empty()).then_some(binds),
            memory: spec
                .memory_bytes
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            nano_cpus: spec.cpus.map(|c| (c * 1e9).round() as i64),
            restart_policy: Some(DockerRestartPolicy {
                name: Some(restart_name),
                maximum_retry_count: None,
            }),
            // Bounded logs: a database VM's disk is not for container stdout.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_string()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), "10m".to_string()),
                    ("max-file".to_string(), "3".to_string()),
                ])),
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: (!spec.env.is_empty())
                .then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            user: spec.user.clone(),
            labels: Some(labels),
            stop_timeout: Some(i64::from(spec.stop_timeout_s)),
            stop_signal,
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    async fn create(
        &self,
        spec: &ContainerSpec,
        restart: RestartPolicy,
    ) -> Result<String, RuntimeError> {
        let labels = self.image_labels(&spec.image).await?;
        let c = self.client().await?;
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .call(
                &format!("create container {}", spec.name),
                c.docker
                    .create_container(Some(options), Self::create_body(spec, &labels, restart)),
            )
            .await
            .map_err(|e| match e {
                // The engine says 404 for a missing image at create time too.
                RuntimeError::NotFound(m) if m.contains("image") => self.image_missing(&spec.image),
                e => e,
            })?;
        for w in created.warnings {
            tracing::warn!(container = %spec.name, warning = %w, "Docker engine warning at create");
        }
        Ok(created.id)
    }

    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        self.call(
            &format!("start container {name}"),
            c.docker.start_container(name, None),
        )
        .await
    }

    async fn remove_force(&self, name: &str) -> Result<bool, RuntimeError> {
        let c = self.client().await?;
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self
            .call(
                &format!("remove container {name}"),
                c.docker.remove_container(name, Some(options)),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(RuntimeError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Collects a container's stdout and stderr (each capped).
    async fn logs(&self, name: &str) -> Result<(String, String), RuntimeError> {
        let c = self.client().await?;
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        let collect = async {
            let mut out = OutputTail::default();
            let mut err = OutputTail::default();
            let mut stream = c.docker.logs(name, Some(options));
            while let Some(item) = stream.next().await {
                match item? {
                    bollard::container::LogOutput::StdErr { message } => err.push(&message),
                    other => out.push(&other.into_bytes()),
                }
            }
            Ok::<_, BollardError>((out.into_string(), err.into_string()))
        };
        self.call(&format!("logs of container {name}"), collect)
            .await
    }

    /// Waits for the container to stop; its exit code.
    async fn wait_exit(&self, name: &str, timeout: Duration) -> Result<i64, RuntimeError> {
        let c = self.client().await?;
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let wait = async {
            let mut stream = c.docker.wait_container(name, Some(options));
            match stream.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                // bollard reports a non-zero exit as an error carrying the code.
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
                Some(Err(e)) => Err(e),
                None => Err(BollardError::DockerStreamError {
                    error: "wait stream ended without a status".to_string(),
                }),
            }
        };
        self.call_with(&format!("wait for container {name}"), timeout, wait)
            .await
    }
}

fn parse_api(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The version an engine names in "client version 1.53 is too new. Maximum supported API
/// version is 1.41" (or "... too old. Minimum supported API version is 1.44").
fn api_from_version_error(message: &str) -> Option<(usize, usize)> {
    let rest = message.split("supported API version is ").nth(1)?;
    let token: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    parse_api(token.trim_end_matches('.'))
}

fn status_of(name: &str, r: ContainerInspectResponse) -> ContainerStatus {
    let state = r.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let restarting = state.restarting.unwrap_or(false);
    let st = match state.status {
        _ if restarting => State::Restarting,
        Some(ContainerStateStatusEnum::RUNNING) if running => State::Running,
        Some(ContainerStateStatusEnum::EXITED) | Some(ContainerStateStatusEnum::DEAD) => {
            State::Stopped {
                exit_code: state.exit_code,
            }
        }
        Some(ContainerStateStatusEnum::CREATED) => State::Stopped { exit_code: None },
        Some(other) => State::Other(other.to_string()),
        None => State::Other("unknown".to_string()),
    };
    let started_at_ms = state
        .started_at
        .as_deref()
        .and_then(parse_rfc3339_ms)
        // "0001-01-01T00:00:00Z" means never started.
        .filter(|ms| *ms > 0);
    let config = r.config.unwrap_or_default();
    let fingerprint = config
        .labels
        .as_ref()
        .and_then(|l| l.get(SPEC_LABEL).cloned());
    ContainerStatus {
        name: name.to_string(),
        id: r.id.unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        state: st,
        started_at_ms,
        fingerprint,
        pid: state
            .pid
            .filter(|p| *p > 0)
            .and_then(|p| u32::try_from(p).ok()),
    }
}

fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[async_trait::async_trait]
impl ContainerRuntime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        let c = self.client().await?;
        let v = self.call("GET /version", c.docker.version()).await?;
        Ok(format!(
            "Docker Engine {} (engine API {}, min {}; using API {})",
            v.version.as_deref().unwrap_or("?"),
            v.api_version.as_deref().unwrap_or("?"),
            v.min_api_version.as_deref().unwrap_or("?"),
            c.api
        ))
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.image_labels(image).await {
            Ok(_) => Ok(true),
            Err(RuntimeError::ImageMissing(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerStatus>, RuntimeError> {
        Ok(self.inspect_raw(name).await?.map(|r| status_of(name, r)))
    }

    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<Reconciled, RuntimeError> {
        super::validate_name(&spec.name)?;
        let want = spec.fingerprint();
        let current = self.inspect(&spec.name).await?;
        let outcome = match current {
            None => {
                self.create(spec, spec.restart).await?;
                Reconciled::Created
            }
            Some(st) if st.fingerprint.as_deref() != Some(want.as_str()) => {
                // Check the new image before removing anything.
                self.image_labels(&spec.image).await?;
                tracing::info!(container = %spec.name, old = ?st.fingerprint, new = %want, "spec changed; recreating the container");
                if st.state == State::Running || st.state == State::Restarting {
                    self.stop(
                        &spec.name,
                        Duration::from_secs(u64::from(spec.stop_timeout_s)),
                    )
                    .await?;
                }
                self.remove_force(&spec.name).await?;
                self.create(spec, spec.restart).await?;
                Reconciled::Recreated
            }
            // The engine is already bringing it back (restart policy).
            Some(st) if st.state == State::Running || st.state == State::Restarting => {
                return Ok(Reconciled::AlreadyRunning)
            }
            Some(st) if st.state == State::Other("paused".to_string()) => {
                let c = self.client().await?;
                self.call(
                    &format!("unpause container {}", spec.name),
                    c.docker.unpause_container(&spec.name),
                )
                .await?;
                return Ok(Reconciled::Started);
            }
            Some(_) => Reconciled::Started,
        };
        self.start(&spec.name).await?;
        Ok(outcome)
    }

    async fn stop(&self, name: &str, timeout: Duration) -> Result<bool, RuntimeError> {
        let c = self.client().await?;
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(secs).build();
        match self
            .call_with(
                &format!("stop container {name}"),
                timeout + STOP_SLACK,
                c.docker.stop_container(name, Some(options)),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(RuntimeError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, name: &str) -> Result<bool, RuntimeError> {
        self.remove_force(name).await
    }

    async fn run_to_completion(
        &self,
        spec: &ContainerSpec,
        timeout: Duration,
    ) -> Result<RunOutput, RuntimeError> {
        super::validate_name(&spec.name)?;
        // A leftover from an earlier run (an agent that died mid-run) would block the name.
        if self.remove_force(&spec.name).await? {
            tracing::warn!(container = %spec.name, "removed a leftover one-shot container");
        }
        self.create(spec, RestartPolicy::No).await?;
        let result = async {
            self.start(&spec.name).await?;
            match self.wait_exit(&spec.name, timeout).await {
                Ok(code) => {
                    let (stdout, stderr) = self.logs(&spec.name).await?;
                    Ok(RunOutput {
                        exit_code: code,
                        stdout,
                        stderr,
                    })
                }
                Err(RuntimeError::Timeout(_)) => {
                    let _ = self.kill(&spec.name, "SIGKILL").await;
                    let tail = match self.logs(&spec.name).await {
                        Ok((_, err)) => err,
                        Err(e) => format!("(no logs: {e})"),
                    };
                    Err(RuntimeError::Timeout(format!(
                        "container {} did not finish within {timeout:?} and was killed; stderr: {}",
                        spec.name,
                        last_lines(&tail, 10)
                    )))
                }
                Err(e) => Err(e),
            }
        }
        .await;
        if let Err(e) = self.remove_force(&spec.name).await {
            tracing::warn!(container = %spec.name, error = %e, "could not remove a one-shot container");
        }
        result
    }

    async fn exec(
        &self,
        name: &str,
        argv: &[String],
        user: Option<&str>,
        timeout: Duration,
    ) -> Result<RunOutput, RuntimeError> {
        let c = self.client().await?;
        let created = self
            .call(
                &format!("create exec in container {name}"),
                c.docker.create_exec(
                    name,
                    CreateExecOptions::<String> {
                        cmd: Some(argv.to_vec()),
                        user: user.map(str::to_string),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                ),
            )
            .await?;
        let run = async {
            let started = c
                .docker
                .start_exec(
                    &created.id,
                    Some(StartExecOptions {
                        detach: false,
                        tty: false,
                        output_capacity: None,
                    }),
                )
                .await?;
            let mut out = OutputTail::default();
            let mut err = OutputTail::default();
            if let StartExecResults::Attached { mut output, .. } = started {
                while let Some(item) = output.next().await {
                    match item? {
                        bollard::container::LogOutput::StdErr { message } => err.push(&message),
                        other => out.push(&other.into_bytes()),
                    }
                }
            }
            Ok::<_, BollardError>((out.into_string(), err.into_string()))
        };
        // On timeout the exec'd process is left running: the Engine API cannot kill an exec.
        let (stdout, stderr) = self
            .call_with(
                &format!("exec {:?} in container {name}", argv.first()),
                timeout,
                run,
            )
            .await?;
        let inspected = self
            .call(
                &format!("inspect exec in container {name}"),
                c.docker.inspect_exec(&created.id),
            )
            .await?;
        Ok(RunOutput {
            exit_code: inspected.exit_code.unwrap_or(-1),
            stdout,
            stderr,
        })
    }

    async fn kill(&self, name: &str, signal: &str) -> Result<(), RuntimeError> {
        let c = self.client().await?;
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        self.call(
            &format!("kill container {name} with {signal}"),
            c.docker.kill_container(name, Some(options)),
        )
        .await
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Mount;

    #[test]
    fn version_errors_name_the_version() {
        assert_eq!(
            api_from_version_error(
                "client version 1.53 is too new. Maximum supported API version is 1.41"
            ),
            Some((1, 41))
        );
        assert_eq!(
            api_from_version_error(
                "client version 1.41 is too old. Minimum supported API version is 1.44, please upgrade your client to a newer version"
            ),
            Some((1, 44))
        );
        assert_eq!(api_from_version_error("page not found"), None);
        assert_eq!(parse_api("1.41"), Some((1, 41)));
    }

    #[test]
    fn create_body_carries_the_spec() {
        let mut spec = ContainerSpec::new("db", "dbvm/postgres:15");
        spec.command = vec!["postgres".into()];
        spec.env = vec![("A".into(), "b".into())];
        spec.mounts = vec![
            Mount {
                source: "/data".into(),
                target: "/data".into(),
                read_only: false,
            },
            Mount {
                source: "/etc/x".into(),
                target: "/etc/x".into(),
                read_only: true,
            },
        ];
        spec.user = Some("999:999".into());
        spec.memory_bytes = Some(512 << 20);
        spec.cpus = Some(1.5);
        spec.restart = RestartPolicy::UnlessStopped;
        let image_labels = HashMap::from([(STOP_SIGNAL_LABEL.to_string(), "SIGINT".to_string())]);
        let body = DockerRuntime::create_body(&spec, &image_labels, spec.restart);
        let hc = body.host_config.clone().unwrap_or_default();
        assert_eq!(hc.network_mode.as_deref(), Some("host"));
        assert_eq!(
            hc.binds,
            Some(vec![
                "/data:/data".to_string(),
                "/etc/x:/etc/x:ro".to_string()
            ])
        );
        assert_eq!(hc.memory, Some(512 << 20));
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        assert_eq!(
            hc.restart_policy.and_then(|r| r.name),
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        assert_eq!(body.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(body.env, Some(vec!["A=b".to_string()]));
        assert_eq!(body.user.as_deref(), Some("999:999"));
        let labels = body.labels.unwrap_or_default();
        assert_eq!(labels.get(SPEC_LABEL), Some(&spec.fingerprint()));
        // A spec label wins over the image's.
        spec.labels
            .insert(STOP_SIGNAL_LABEL.into(), "SIGTERM".into());
        let body = DockerRuntime::create_body(&spec, &image_labels, spec.restart);
        assert_eq!(body.stop_signal.as_deref(), Some("SIGTERM"));
    }

    #[test]
    fn relative_socket_is_refused() {
        assert!(matches!(
            DockerRuntime::connect(Path::new("docker.sock")),
            Err(RuntimeError::EngineUnavailable(_))
        ));
    }

    #[tokio::test]
    async fn missing_socket_is_engine_unavailable() {
        let rt = DockerRuntime::connect(Path::new("/nonexistent/dbvm/docker.sock")).unwrap();
        match rt.version().await {
            Err(RuntimeError::EngineUnavailable(m)) => {
                assert!(m.contains("/nonexistent/dbvm/docker.sock"), "{m}");
                assert!(m.contains("dockerd.sh"), "{m}");
            }
            other => panic!("expected EngineUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            parse_rfc3339_ms("2026-12-01T21:12:36.853123456Z").map(|v| v > 0),
            Some(true)
        );
        assert!(parse_rfc3339_ms("0001-01-01T00:00:00Z").is_some_and(|v| v < 0));
    }
}
