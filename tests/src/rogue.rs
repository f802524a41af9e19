//! A "rogue broker": holds the fleet's server certificate and speaks the protocol
//! directly, so a test can deliver to a real agent what a real broker never would
//! (replays, commands for another agent, expired or future commands). The agent alone
//! must refuse them.

use crate::Fleet;
use dbvm_protocol::frame::{read_frame, write_frame, MAX_FRAME_LEN};
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, CommandResult, Hello, Welcome};
use dbvm_protocol::SignedCommand;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub struct RogueBroker {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pub addr: SocketAddr,
}

pub struct RogueSession {
    stream: TlsStream<TcpStream>,
    pub hello: Hello,
}

impl RogueBroker {
    pub async fn bind(fleet: &Fleet) -> Self {
        let config = dbvm_protocol::tls::server_config(
            &fleet.server.cert_pem,
            &fleet.server.key_pem,
            fleet.ca.cert_pem(),
            dbvm_protocol::tls::ClientAuth::Required,
        )
        .expect("rogue TLS config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind rogue");
        let addr = listener.local_addr().expect("addr");
        Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            addr,
        }
    }

    /// Accepts the next agent connection and welcomes it.
    pub async fn accept(&self) -> RogueSession {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), self.listener.accept())
            .await
            .expect("agent did not connect to the rogue broker")
            .expect("accept");
        let mut stream = self.acceptor.accept(tcp).await.expect("TLS accept");
        let hello = match read_frame::<AgentMessage, _>(&mut stream, MAX_FRAME_LEN).await {
            Ok(Some(AgentMessage::Hello(h))) => h,
            other => panic!("expected Hello, got {other:?}"),
        };
        let welcome = BrokerMessage::Welcome(Welcome {
            protocol_major: dbvm_protocol::PROTOCOL_MAJOR,
            protocol_minor: dbvm_protocol::PROTOCOL_MINOR,
            broker_version: "rogue".into(),
            heartbeat_interval_ms: 1000,
        });
        write_frame(&mut stream, &welcome, MAX_FRAME_LEN)
            .await
            .expect("welcome");
        RogueSession { stream, hello }
    }
}

impl RogueSession {
    pub async fn deliver(&mut self, cmd: &SignedCommand) {
        write_frame(
            &mut self.stream,
            &BrokerMessage::Deliver(cmd.clone()),
            MAX_FRAME_LEN,
        )
        .await
        .expect("deliver");
    }

    /// Reads until a Result arrives (answering heartbeats), acknowledges it, returns it.
    pub async fn next_result(&mut self) -> CommandResult {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let msg = tokio::time::timeout_at(
                deadline,
                read_frame::<AgentMessage, _>(&mut self.stream, MAX_FRAME_LEN),
            )
            .await
            .expect("no result from the agent within 20 s")
            .expect("read from agent")
            .expect("agent closed the connection");
            match msg {
                AgentMessage::Result(r) => {
                    write_frame(
                        &mut self.stream,
                        &BrokerMessage::ResultAck { id: r.id },
                        MAX_FRAME_LEN,
                    )
                    .await
                    .expect("ack");
                    return r;
                }
                AgentMessage::Heartbeat { seq } => {
                    write_frame(
                        &mut self.stream,
                        &BrokerMessage::HeartbeatAck { seq },
                        MAX_FRAME_LEN,
                    )
                    .await
                    .expect("heartbeat ack");
                }
                _ => {}
            }
        }
    }

    /// Reads until a health report satisfies `want` (answering heartbeats and refusing
    /// every certificate renewal, as a broker that cannot renew would), returns it and
    /// how many renewals were refused on the way.
    pub async fn health_until(
        &mut self,
        timeout: Duration,
        want: impl Fn(&dbvm_protocol::health::HealthReport) -> bool,
    ) -> (dbvm_protocol::health::HealthReport, u32) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut refused = 0;
        loop {
            let msg = tokio::time::timeout_at(
                deadline,
                read_frame::<AgentMessage, _>(&mut self.stream, MAX_FRAME_LEN),
            )
            .await
            .unwrap_or_else(|_| panic!("no matching health report within {timeout:?}"))
            .expect("read from agent")
            .expect("agent closed the connection");
            let reply = match msg {
                AgentMessage::Health(r) if want(&r) => return (r, refused),
                AgentMessage::Heartbeat { seq } => Some(BrokerMessage::HeartbeatAck { seq }),
                AgentMessage::Renew { .. } => {
                    refused += 1;
                    Some(BrokerMessage::RenewFailed {
                        message: "renewal refused by the test".into(),
                    })
                }
                _ => None,
            };
            if let Some(reply) = reply {
                write_frame(&mut self.stream, &reply, MAX_FRAME_LEN)
                    .await
                    .expect("write to agent");
            }
        }
    }
}
