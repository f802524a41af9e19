//! Framing: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! A frame longer than the receiver's maximum is refused before any of it is read into
//! memory; a zero-length frame, a frame that does not decode, and a peer that vanishes
//! in the middle of a frame are errors. A clean end of stream between frames is `None`.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Hard upper bound on a frame on the agent link (1 MiB). Receivers may set a lower one.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("undecodable frame: {0}")]
    Decode(postcard::Error),
    #[error("could not encode frame: {0}")]
    Encode(postcard::Error),
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("i/o error on the link: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes a message into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4]).map_err(FrameError::Encode)?;
    let len = out.len() - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Decodes the payload of one frame (without its length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// Reads the payload of the next frame. `Ok(None)` on a clean end of stream.
pub async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    match reader.read_exact(&mut payload).await {
        Ok(_) => Ok(Some(payload)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Reads and decodes the next frame. `Ok(None)` on a clean end of stream.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_payload(reader, max).await? {
        None => Ok(None),
        Some(payload) => decode(&payload).map(Some),
    }
}

/// Encodes and writes one frame, then flushes.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    msg: &T,
    max: usize,
) -> Result<(), FrameError> {
    let bytes = encode(msg, max)?;
    writer.write_all(&bytes).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::AgentMessage;

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let msg = AgentMessage::Heartbeat { seq: 7 };
        let bytes = encode(&msg, MAX_FRAME_LEN).unwrap();
        let mut r = &bytes[..];
        let got: Option<AgentMessage> = read_frame(&mut r, MAX_FRAME_LEN).await.unwrap();
        assert_eq!(got, Some(msg));
        let end: Option<AgentMessage> = read_frame(&mut r, MAX_FRAME_LEN).await.unwrap();
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn truncated_garbage_and_oversized_frames_are_errors() {
        let bytes = encode(&AgentMessage::Heartbeat { seq: 7 }, MAX_FRAME_LEN).unwrap();
        let mut r = &bytes[..bytes.len() - 1];
        let e = read_frame::<AgentMessage, _>(&mut r, MAX_FRAME_LEN).await;
        assert!(matches!(e, Err(FrameError::Truncated)), "{e:?}");

        let mut r = &[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..];
        let e = read_frame::<AgentMessage, _>(&mut r, MAX_FRAME_LEN).await;
        assert!(matches!(e, Err(FrameError::Decode(_))), "{e:?}");

        let mut r = &[0x7fu8, 0, 0, 0][..];
        let e = read_frame::<AgentMessage, _>(&mut r, MAX_FRAME_LEN).await;
        assert!(matches!(e, Err(FrameError::TooLarge { .. })), "{e:?}");

        let mut r = &[0u8, 0, 0, 0][..];
        let e = read_frame::<AgentMessage, _>(&mut r, MAX_FRAME_LEN).await;
        assert!(matches!(e, Err(FrameError::Empty)), "{e:?}");

        let big = AgentMessage::Heartbeat { seq: 1 };
        assert!(matches!(encode(&big, 1), Err(FrameError::TooLarge { .. })));
    }
}
