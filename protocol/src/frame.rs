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

/// Appends one frame (length prefix included) to `out`, so several frames can go out in
/// one write. On error `out` is left as it was.
pub fn encode_into<T: Serialize>(msg: &T, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    if let Err(e) = postcard::serialize_with_flavor(msg, AppendTo(out)) {
        out.truncate(start);
        return Err(FrameError::Encode(e));
    }
    let len = out.len() - start - 4;
    let Some(len32) = u32::try_from(len).ok().filter(|_| len <= max) else {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    };
    out[start..start + 4].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// A postcard output that appends to a borrowed `Vec` (postcard's own `ExtendFlavor` takes
/// the vector by value and loses it on an error).
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Frames cut from a byte stream read in pieces: what was read stays here, so
/// [`FrameBuf::next`] is cancel-safe and can sit in a `select!` beside timers (unlike
/// [`read_frame`], which loses a partly read frame when dropped).
#[derive(Debug, Default)]
pub struct FrameBuf {
    buf: Vec<u8>,
}

/// Room kept for reading: a few small frames arrive in one read.
const READ_CHUNK: usize = 1024;

impl FrameBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// A whole frame from what was read so far, if one is there.
    pub fn take<T: DeserializeOwned>(&mut self, max: usize) -> Result<Option<T>, FrameError> {
        let Some(head) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*head) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// The next frame from `reader`; `Ok(None)` on a clean end of stream between frames.
    /// Cancel-safe: the only await is one `read_buf`, whose bytes stay in the buffer.
    pub async fn next<T: DeserializeOwned, R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        max: usize,
    ) -> Result<Option<T>, FrameError> {
        loop {
            if let Some(m) = self.take(max)? {
                return Ok(Some(m));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
                self.buf.reserve(READ_CHUNK);
            }
            if reader.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }
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
    async fn frames_written_together_are_read_apart_and_partial_reads_are_kept() {
        let mut bytes = Vec::new();
        for seq in 1..=3 {
            encode_into(&AgentMessage::Heartbeat { seq }, MAX_FRAME_LEN, &mut bytes).unwrap();
        }
        assert_eq!(
            &bytes[..bytes.len() / 3],
            &encode(&AgentMessage::Heartbeat { seq: 1 }, MAX_FRAME_LEN).unwrap()[..]
        );
        // Fed one byte at a time, as a slow link would.
        let (mut tx, mut rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                tx.write_all(&[b]).await.unwrap();
            }
        });
        let mut frames = FrameBuf::new();
        for seq in 1..=3 {
            let got: Option<AgentMessage> = frames.next(&mut rx, MAX_FRAME_LEN).await.unwrap();
            assert_eq!(got, Some(AgentMessage::Heartbeat { seq }));
        }
        writer.await.unwrap();
        let end: Option<AgentMessage> = frames.next(&mut rx, MAX_FRAME_LEN).await.unwrap();
        assert_eq!(end, None);
        // Too large for this receiver: refused from the length alone.
        let mut big = Vec::new();
        encode_into(&AgentMessage::Heartbeat { seq: 9 }, MAX_FRAME_LEN, &mut big).unwrap();
        let mut frames = FrameBuf::new();
        let mut r = &big[..4];
        let e = frames.next::<AgentMessage, _>(&mut r, 1).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { max: 1, .. }), "{e}");
        // A frame cut short by the end of the stream.
        let mut frames = FrameBuf::new();
        let mut r = &big[..big.len() - 1];
        let e = frames
            .next::<AgentMessage, _>(&mut r, MAX_FRAME_LEN)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Truncated), "{e}");
        // Too large to encode for the caller's maximum: the buffer keeps what it had.
        let mut out = vec![1, 2, 3];
        let e = encode_into(&AgentMessage::Heartbeat { seq: 9 }, 1, &mut out).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { max: 1, .. }), "{e}");
        assert_eq!(out, vec![1, 2, 3]);
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
