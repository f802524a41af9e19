//! Getting into the agent link: the TLS accept, the first frame, and the checks of an
//! `Enroll` or a `Hello` before a session starts.

use super::session::{session, Link};
use super::{refuse, send, Reader, Writer};
use crate::enroll;
use crate::hub::{revoked_message, Hub};
use crate::listener::Listener;
use crate::revocation::{LinkCert, Verdict};
use dbvm_protocol::frame;
use dbvm_protocol::messages::{peek_hello_version, AgentMessage, Hello, RefuseCode};
use dbvm_protocol::pki::{identity_of, Identity};
use dbvm_protocol::{AgentId, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Accepts agent connections until `shutdown`. Per-connection errors stay per connection.
pub async fn serve(
    listener: Listener,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // The first frame is part of getting in: it gets the same time as the TLS handshake.
    let first_frame_timeout = listener.limits().handshake_timeout;
    let stop = shutdown.clone();
    listener
        .serve(acceptor, shutdown, tracker, move |tls, peer| {
            connection(tls, peer, hub.clone(), first_frame_timeout, stop.clone())
        })
        .await;
}

async fn connection(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    hub: Arc<Hub>,
    first_frame_timeout: Duration,
    shutdown: CancellationToken,
) {
    // Getting in and the session are two futures in a row, so a connection's task holds
    // room for the larger of them, not for both (`let else`: nothing of getting in stays
    // alive while the session runs).
    let Some(admitted) = get_in(tls, peer, &hub, first_frame_timeout).await else {
        return;
    };
    let span = tracing::info_span!("agent", agent = %admitted.agent);
    let Admitted {
        agent,
        hello,
        link,
        rd,
        wr,
    } = admitted;
    session(hub, agent, hello, link, rd, wr, shutdown)
        .instrument(span)
        .await;
}

/// An agent that got in: a Hello whose certificate passed every check.
struct Admitted {
    agent: AgentId,
    hello: Hello,
    link: Link,
    rd: Reader,
    wr: Writer,
}

/// Reads the first frame and answers it: an enrollment is served and ends there; a
/// Hello is checked (certificate, identity, revocation) and admitted; anything else is
/// refused.
async fn get_in(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    hub: &Hub,
    first_frame_timeout: Duration,
) -> Option<Admitted> {
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let max = hub.settings.max_frame_bytes;
    let (mut rd, mut wr) = tokio::io::split(tls);

    let payload =
        match tokio::time::timeout(first_frame_timeout, frame::read_payload(&mut rd, max)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                refuse(
                    &mut wr,
                    hub,
                    RefuseCode::ProtocolViolation,
                    format!("first frame refused: {e}"),
                )
                .await;
                return None;
            }
            Err(_) => {
                refuse(
                    &mut wr,
                    hub,
                    RefuseCode::ProtocolViolation,
                    format!(
                        "no Hello or Enroll within {} ms",
                        first_frame_timeout.as_millis()
                    ),
                )
                .await;
                return None;
            }
        };
    if let Some((major, minor)) = peek_hello_version(&payload) {
        if major != PROTOCOL_MAJOR {
            let msg = format!(
                "agent speaks protocol {major}.{minor}; this broker speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: upgrade the older side"
            );
            refuse(&mut wr, hub, RefuseCode::UnsupportedVersion, msg).await;
            return None;
        }
    }
    let first: AgentMessage = match frame::decode(&payload) {
        Ok(m) => m,
        Err(e) => {
            refuse(
                &mut wr,
                hub,
                RefuseCode::ProtocolViolation,
                format!("first frame refused: {e}"),
            )
            .await;
            return None;
        }
    };
    match first {
        AgentMessage::Enroll(req) => match enroll::enroll(hub, req).await {
            Ok(reply) => {
                let _ = send(&mut wr, &reply, frame::MAX_FRAME_LEN).await;
                let _ = wr.shutdown().await;
            }
            Err((code, message)) => refuse(&mut wr, hub, code, message).await,
        },
        AgentMessage::Hello(hello) => {
            let Some(der) = peer_cert else {
                let msg = "no client certificate: this agent must enroll first".to_string();
                refuse(&mut wr, hub, RefuseCode::CertificateRequired, msg).await;
                return None;
            };
            let agent = match identity_of(&der) {
                Ok(Identity::Agent(id)) => id,
                Ok(Identity::ControlPlane(name)) => {
                    let msg = format!("certificate is for control plane {name:?}, not an agent");
                    refuse(&mut wr, hub, RefuseCode::IdentityMismatch, msg).await;
                    return None;
                }
                Err(e) => {
                    refuse(&mut wr, hub, RefuseCode::IdentityMismatch, e.to_string()).await;
                    return None;
                }
            };
            if hello.agent_id != agent.as_str() {
                let msg = format!(
                    "Hello claims agent {:?} but the client certificate is for agent {:?}",
                    hello.agent_id,
                    agent.as_str()
                );
                refuse(&mut wr, hub, RefuseCode::IdentityMismatch, msg).await;
                return None;
            }
            let cert = match LinkCert::from_der(&der) {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("client certificate does not parse: {e}");
                    refuse(&mut wr, hub, RefuseCode::IdentityMismatch, msg).await;
                    return None;
                }
            };
            let revoked_at_ms = match not_revoked(hub, &agent, &cert).await {
                Ok(at) => at,
                Err((code, msg)) => {
                    refuse(&mut wr, hub, code, msg).await;
                    return None;
                }
            };
            let link = Link {
                peer,
                cert,
                revoked_at_ms,
            };
            return Some(Admitted {
                agent,
                hello,
                link,
                rd,
                wr,
            });
        }
        other => {
            let msg = format!("first frame must be Hello or Enroll, got {}", kind(&other));
            refuse(&mut wr, hub, RefuseCode::ProtocolViolation, msg).await;
        }
    }
    None
}

/// Checks a Hello's certificate against the revocation list; `Ok` carries when the
/// agent was last revoked (to notice a revocation before the session registers).
async fn not_revoked(
    hub: &Hub,
    agent: &AgentId,
    cert: &LinkCert,
) -> Result<Option<i64>, (RefuseCode, String)> {
    let revoked_at = hub.revocations.revoked_at(agent.as_str());
    let revocation =
        match hub
            .revocations
            .check(&cert.fingerprint, agent.as_str(), cert.not_before_ms)
        {
            Verdict::Good => return Ok(revoked_at),
            Verdict::Revoked(r) => r,
            Verdict::AskStore(r) => match hub.store.certificate(cert.fingerprint).await {
                Ok(Some(c)) if c.revoked_at_ms.is_none() && c.agent_id == agent.as_str() => {
                    return Ok(revoked_at)
                }
                Ok(_) => r,
                Err(e) => {
                    return Err((
                        RefuseCode::Internal,
                        format!("broker store unavailable: {e}"),
                    ))
                }
            },
        };
    Err((
        RefuseCode::CertificateRevoked,
        revoked_message(agent.as_str(), &revocation),
    ))
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
