//! `dbvm-broker`: relays control-plane-signed commands to agents over mTLS, and results,
//! progress and events back. It holds no signing key and never sees a secret in clear.
//!
//! Start-up follows three steps so tests can drive it in-process on port 0:
//! [`Config`] (parsed and validated, nothing bound) → [`Broker::bind`] (store opened,
//! listeners bound, addresses known) → [`Broker::run`] (serves until the token is
//! cancelled, then drains).

pub mod agent_link;
pub mod api;
pub mod artifacts;
pub mod bundle_s3;
pub mod bundles;
pub mod config;
pub mod enroll;
pub mod health;
pub mod hub;
pub mod listener;
pub mod lists;
pub mod metrics;
pub mod own_bundle;
pub mod revocation;
pub mod store;

pub use config::Config;

use hub::Hub;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] dbvm_protocol::tls::TlsError),
    #[error("fleet CA: {0}")]
    Pki(#[from] dbvm_protocol::pki::PkiError),
    #[error("artifact store: {0}")]
    Artifacts(#[from] artifacts::ArtifactError),
    #[error("bundle store: {0}")]
    Bundles(#[from] bundles::BundleError),
}

/// A broker with its store open and its listeners bound.
pub struct Broker {
    hub: Arc<Hub>,
    agent_listener: listener::Listener,
    api_listener: listener::Listener,
    agent_tls: tokio_rustls::TlsAcceptor,
    api_tls: tokio_rustls::TlsAcceptor,
    /// The control plane's public keys, for checking submitted commands.
    command_keys: dbvm_protocol::command::TrustedKeys,
    artifacts: Arc<artifacts::ArtifactStore>,
    bundles: Arc<bundles::BundleStore>,
    /// What the broker's own bundle reads.
    own_bundle: Arc<own_bundle::Sources>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("agent_addr", &self.agent_addr())
            .field("api_addr", &self.api_addr())
            .finish()
    }
}

impl Broker {
    pub async fn bind(config: &Config) -> Result<Self, BrokerError> {
        config.validate()?;
        let command_keys = config.command_keys()?;
        let tls = config.tls_material()?;
        let ca = dbvm_protocol::pki::FleetCa::load(&tls.ca_cert_pem, &tls.ca_key_pem)?;
        let store: Arc<dyn store::Store> = Arc::new(store::SqliteStore::open(&config.data_dir)?);
        let artifacts = Arc::new(artifacts::ArtifactStore::open(
            &config.data_dir,
            config.artifacts.max_bytes,
        )?);
        let bundles = Arc::new(bundles::BundleStore::open(
            &config.data_dir,
            config.bundles.clone(),
            store.clone(),
        )?);
        let hub = Hub::new(
            store,
            ca,
            config.agents.clone(),
            config.limits.clone(),
            config.events.clone(),
        )
        .await?;
        // Both listeners let a client without a certificate finish the handshake: the
        // agent port so a new VM can enroll, the API so it can answer 401 clearly.
        // Each then refuses what needs an identity.
        let server = dbvm_protocol::tls::server_config(
            &tls.server_cert_pem,
            &tls.server_key_pem,
            &tls.ca_cert_pem,
            dbvm_protocol::tls::ClientAuth::Optional,
        )?;
        let mut api_server = server.clone();
        api_server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BrokerError::Bind { what, addr, source })
        };
        let (agent_limits, api_limits) = config.listener_limits()?;
        let agent_listener = listener::Listener::new(
            bind("agent listener (agent_listen)", config.agent_listen).await?,
            "agent",
            agent_limits,
            &hub.metrics,
        );
        let api_listener = listener::Listener::new(
            bind("API listener (api_listen)", config.api_listen).await?,
            "api",
            api_limits,
            &hub.metrics,
        );
        Ok(Self {
            hub,
            agent_listener,
            api_listener,
            agent_tls: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            api_tls: tokio_rustls::TlsAcceptor::from(Arc::new(api_server)),
            command_keys,
            artifacts,
            bundles,
            own_bundle: Arc::new(own_bundle::Sources {
                config_file: config.file.clone(),
                log_dir: config.bundles.log_dir.clone(),
                data_dir: config.data_dir.clone(),
            }),
        })
    }

    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` is cancelled, then waits up to 5 s for connections to end.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let hub = self.hub.clone();
        let expirer = {
            let hub = hub.clone();
            let bundle_store = self.bundles.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut prune_at = tokio::time::Instant::now();
                let mut bundles_at = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => {
                            if let Err(e) = hub.expire_due().await {
                                tracing::warn!(error = %e, "expiring commands failed");
                            }
                            // Hourly (first at start): certificates expired since need no
                            // revocation (TLS refuses them) and no record.
                            if tokio::time::Instant::now() >= prune_at {
                                prune_at += Duration::from_secs(3600);
                                hub.prune_certificates().await;
                            }
                            // Each minute (first at start): bundles past their age or
                            // the total, and uploads their command gave up.
                            if tokio::time::Instant::now() >= bundles_at {
                                bundles_at += Duration::from_secs(60);
                                if let Err(e) = bundle_store.expire(dbvm_protocol::now_ms()).await {
                                    tracing::warn!(error = %e, "expiring bundles failed");
                                }
                            }
                        }
                    }
                }
            })
        };
        let copier = self
            .bundles
            .copier()
            .map(|c| tokio::spawn(c.run(self.bundles.clone(), shutdown.clone())));
        let agents = tokio::spawn(agent_link::serve(
            self.agent_listener,
            self.agent_tls,
            hub.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        let api = tokio::spawn(api::serve(
            self.api_listener,
            self.api_tls,
            api::router(
                hub.clone(),
                self.command_keys,
                self.artifacts,
                self.bundles,
                self.own_bundle,
            ),
            shutdown.clone(),
            tracker.clone(),
        ));
        shutdown.cancelled().await;
        let _ = tokio::join!(agents, api, expirer);
        if let Some(c) = copier {
            // A copy cut short is owed again at the next start.
            c.abort();
        }
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not end within 5 s of shutdown");
        }
    }
}
