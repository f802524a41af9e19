//! Getting into the agent link: the TLS accept, the first frame, and the checks of an
//! `Enroll` or a `Hello` before a session starts.

use super::session::session;
use super::{refuse, send};
use crate::enroll;
use crate::hub::Hub;
use crate::metrics::Metrics;
use dbvm_protocol::frame;
use dbvm_protocol::messages::{peek_hello_version, AgentMessage, RefuseCode};
use dbvm_protocol::pki::{identity_of, validity_ms_der, Identity};
use dbvm_protocol::{PROTOCOL_MAJOR, PROTOCOL_MINOR};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts agent connections until `shutdown`. Per-connection errors stay per connection.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "agent listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        Metrics::count(&hub.metrics.link_errors, "reason", "tls_handshake");
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        Metrics::count(&hub.metrics.link_errors, "reason", "tls_handshake_timeout");
                        return;
                    }
                };
                connection(tls, hub, shutdown).await;
            }
            .instrument(tracing::debug_span!("agent_conn", %peer)),
        );
    }
}

async fn connection(tls: TlsStream<TcpStream>, hub: Arc<Hub>, shutdown: CancellationToken) {
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let max = hub.settings.max_frame_bytes;
    let (mut rd, mut wr) = tokio::io::split(tls);

    let payload =
        match tokio::time::timeout(FIRST_FRAME_TIMEOUT, frame::read_payload(&mut rd, max)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                refuse(
                    &mut wr,
                    &hub,
                    RefuseCode::ProtocolViolation,
                    format!("first frame refused: {e}"),
                )
                .await;
                return;
            }
            Err(_) => {
                refuse(
                    &mut wr,
                    &hub,
                    RefuseCode::ProtocolViolation,
                    "no Hello within 10 s".into(),
                )
                .await;
                return;
            }
        };
    if let Some((major, minor)) = peek_hello_version(&payload) {
        if major != PROTOCOL_MAJOR {
            let msg = format!(
                "agent speaks protocol {major}.{minor}; this broker speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: upgrade the older side"
            );
            refuse(&mut wr, &hub, RefuseCode::UnsupportedVersion, msg).await;
            return;
        }
    }
    let first: AgentMessage = match frame::decode(&payload) {
        Ok(m) => m,
        Err(e) => {
            refuse(
                &mut wr,
                &hub,
                RefuseCode::ProtocolViolation,
                format!("first frame refused: {e}"),
            )
            .await;
            return;
        }
    };
    match first {
        AgentMessage::Enroll(req) => match enroll::enroll(&hub, req).await {
            Ok(reply) => {
                let _ = send(&mut wr, &reply, frame::MAX_FRAME_LEN).await;
                let _ = wr.shutdown().await;
            }
            Err((code, message)) => refuse(&mut wr, &hub, code, message).await,
        },
        AgentMessage::Hello(hello) => {
            let Some(der) = peer_cert else {
                let msg = "no client certificate: this agent must enroll first".to_string();
                refuse(&mut wr, &hub, RefuseCode::CertificateRequired, msg).await;
                return;
            };
            let agent = match identity_of(&der) {
                Ok(Identity::Agent(id)) => id,
                Ok(Identity::ControlPlane(name)) => {
                    let msg = format!("certificate is for control plane {name:?}, not an agent");
                    refuse(&mut wr, &hub, RefuseCode::IdentityMismatch, msg).await;
                    return;
                }
                Err(e) => {
                    refuse(&mut wr, &hub, RefuseCode::IdentityMismatch, e.to_string()).await;
                    return;
                }
            };
            if hello.agent_id != agent.as_str() {
                let msg = format!(
                    "Hello claims agent {:?} but the client certificate is for agent {:?}",
                    hello.agent_id,
                    agent.as_str()
                );
                refuse(&mut wr, &hub, RefuseCode::IdentityMismatch, msg).await;
                return;
            }
            let not_after = validity_ms_der(&der).ok().map(|(_, na)| na);
            let span = tracing::info_span!("agent", agent = %agent);
            session(hub, agent, hello, not_after, rd, wr, shutdown)
                .instrument(span)
                .await;
        }
        other => {
            let msg = format!("first frame must be Hello or Enroll, got {}", kind(&other));
            refuse(&mut wr, &hub, RefuseCode::ProtocolViolation, msg).await;
        }
    }
}

pub(super) fn kind(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Enroll(_) => "Enroll",
        AgentMessage::Heartbeat { .. } => "Heartbeat",
        AgentMessage::Ack { .. } => "Ack",
        AgentMessage::Progress { .. } => "Progress",
        AgentMessage::Result(_) => "Result",
        AgentMessage::Event(_) => "Event",
        AgentMessage::Renew { .. } => "Renew",
        AgentMessage::Health(_) => "Health",
    }
}
