//! The agent link: the mTLS listener agents dial into, one session per connected agent.
//!
//! `handshake` accepts a connection (TLS, then the first frame: `Enroll` or a checked
//! `Hello`); `session` runs the session of an agent that got in. A session delivers the
//! agent's stored commands (respecting admission slots), records acks, progress and
//! results (a result is acknowledged only once it is durable), relays events, renews the
//! agent's certificate, and closes a connection that stays silent for
//! `missed_heartbeats` intervals.

mod handshake;
mod session;

pub use handshake::serve;

use crate::hub::Hub;
use crate::metrics::Metrics;
use dbvm_protocol::frame::{self, FrameError};
use dbvm_protocol::messages::{BrokerMessage, RefuseCode};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Reader = ReadHalf<TlsStream<TcpStream>>;
type Writer = WriteHalf<TlsStream<TcpStream>>;

pub(super) async fn send(
    wr: &mut Writer,
    msg: &BrokerMessage,
    max: usize,
) -> Result<(), FrameError> {
    match tokio::time::timeout(WRITE_TIMEOUT, frame::write_frame(wr, msg, max)).await {
        Ok(r) => r,
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "agent did not read its frames for 10 s",
        ))),
    }
}

pub(super) async fn refuse(wr: &mut Writer, hub: &Hub, code: RefuseCode, message: String) {
    let reason = format!("{code:?}").to_lowercase();
    Metrics::count(&hub.metrics.link_errors, "reason", &reason);
    if let Some(skipped) = hub.refusal_log.admit() {
        tracing::info!(code = ?code, %message, not_logged_before = skipped, "refusing agent connection");
    }
    let _ = send(
        wr,
        &BrokerMessage::Refused { code, message },
        frame::MAX_FRAME_LEN,
    )
    .await;
    let _ = wr.shutdown().await;
}
