//! Reading and writing frames on a stream, with time limits.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{self, WireError};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer closed the connection before a frame started.
    #[error("connection closed")]
    Closed,
    /// No complete frame within the time limit.
    #[error("timed out waiting for a frame")]
    Timeout,
    /// The length prefix is out of range.
    #[error("{0}")]
    Length(WireError),
    /// Any other I/O error (including a close in the middle of a frame).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame body within `limit` (the whole frame, not per byte: a client sending
/// one byte per second cannot hold the connection longer).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limit: Duration) -> Result<Vec<u8>, FrameError> {
    tokio::time::timeout(limit, async {
        let mut prefix = [0u8; 4];
        match r.read(&mut prefix[..1]).await? {
            0 => return Err(FrameError::Closed),
            _ => r.read_exact(&mut prefix[1..]).await?,
        };
        let n = wire::frame_len(prefix).map_err(FrameError::Length)?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).await?;
        Ok(body)
    })
    .await
    .map_err(|_| FrameError::Timeout)?
}

/// Writes a complete frame within `limit`.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8], limit: Duration) -> Result<(), FrameError> {
    tokio::time::timeout(limit, async {
        w.write_all(frame).await?;
        w.flush().await?;
        Ok(())
    })
    .await
    .map_err(|_| FrameError::Timeout)?
}
