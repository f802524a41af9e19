//! Raw TLS clients for the broker's agent port: to send what a well-behaved agent never
//! would (garbage, oversized or truncated frames, lying Hellos).

use dbvm_protocol::frame::{read_frame, MAX_FRAME_LEN};
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, Hello};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Connects to `addr` trusting `ca_pem`, presenting `identity` when given.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_over(TcpStream::connect(addr).await?, ca_pem, identity).await
}

/// [`connect`] over a TCP connection already made (say, one waiting in the broker's
/// backlog).
pub async fn connect_over(
    tcp: TcpStream,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let config = dbvm_protocol::tls::client_config(ca_pem, identity)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

pub fn hello(agent_id: &str, major: u16) -> AgentMessage {
    AgentMessage::Hello(Hello {
        protocol_major: major,
        protocol_minor: 0,
        agent_id: agent_id.into(),
        agent_version: "raw-test".into(),
        operations: vec![],
        capabilities: vec![],
        sealing_key: [0; 32],
        db_kind: None,
    })
}

/// Sends raw bytes, then reads what the broker answers (None when it only closed).
/// A TLS-level failure (for example a refused client certificate) is an `Err`.
pub async fn send_raw(
    stream: &mut TlsStream<TcpStream>,
    bytes: &[u8],
    close_write: bool,
) -> std::io::Result<Option<BrokerMessage>> {
    stream.write_all(bytes).await?;
    stream.flush().await?;
    if close_write {
        stream.shutdown().await?;
    }
    read_reply(stream).await
}

pub async fn read_reply(
    stream: &mut TlsStream<TcpStream>,
) -> std::io::Result<Option<BrokerMessage>> {
    match tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<BrokerMessage, _>(stream, MAX_FRAME_LEN),
    )
    .await
    {
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 15 s",
        )),
        Ok(Ok(m)) => Ok(m),
        Ok(Err(dbvm_protocol::frame::FrameError::Io(e))) => Err(e),
        Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
    }
}
