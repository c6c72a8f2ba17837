//! Frames on QUIC streams: `len u32 | message`, decoded by `redo_core::wire`.

use bytes::{BufMut, Bytes, BytesMut};
use redo_core::wire::{frame_len, Message, FRAME_HEADER_BYTES};
use redo_core::DecodeError;
use thiserror::Error;
use tokio::io::AsyncReadExt;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("stream closed mid-frame: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream failed mid-frame: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame too large: {len} bytes, limit {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
}

/// Reads the next frame; `Ok(None)` when the peer finished the stream cleanly.
pub async fn read_message(recv: &mut quinn::RecvStream, frame_bytes_max: usize) -> Result<Option<Message>, FrameError> {
    match read_frame_len(recv, frame_bytes_max).await? {
        Some(len) => read_frame_body(recv, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads a frame's length word; `Ok(None)` when the peer finished the stream
/// cleanly. A server can reserve memory for the body before reading it.
pub async fn read_frame_len(recv: &mut quinn::RecvStream, frame_bytes_max: usize) -> Result<Option<usize>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge { len, max: frame_bytes_max });
    }
    Ok(Some(frame_len(header, frame_bytes_max)?))
}

/// Reads and decodes a frame body of `len` bytes.
pub async fn read_frame_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Message, FrameError> {
    Ok(Message::decode(read_frame_bytes(recv, len).await?)?)
}

/// Reads a frame body of `len` bytes, undecoded.
pub async fn read_frame_bytes(recv: &mut quinn::RecvStream, len: usize) -> Result<Bytes, FrameError> {
    // Read into uninitialised capacity: zeroing first would touch every byte twice.
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        let want = len - body.len();
        let n = recv.read_buf(&mut (&mut body).limit(want)).await?;
        if n == 0 {
            return Err(FrameError::Read(quinn::ReadExactError::FinishedEarly(body.len())));
        }
    }
    Ok(body.freeze())
}

/// Encodes and sends one message.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), quinn::WriteError> {
    send.write_all(&msg.to_frame()).await
}
