//! Framing: the length prefix, the version and type bytes, the limits of frames and of
//! their fields, the wire format's error, and the refusals of frames a server does not read
//! with their deny codes (`docs/protocol.md`, "Transport and framing").
//!
//! ```text
//! frame   = length:u32be body           ; 2 <= length <= MAX_FRAME
//! body    = version:u8 (=1) type:u8 payload
//! ```

use super::deny::DenyCode;
use crate::codec::{BadId, CodecError, Reader, Writer};

/// Protocol version carried in every frame.
pub const VERSION: u8 = 1;
/// Largest frame body accepted (bytes after the length prefix).
pub const MAX_FRAME: usize = 64 * 1024;
/// Length of the client and server nonces.
pub const NONCE_LEN: usize = 32;
/// Most key ids in one Release.
pub const MAX_KEYS: usize = 16;
/// Most wrapped keys in one Released: every key id with up to four KEK versions.
pub const MAX_RELEASED: usize = MAX_KEYS * 4;
/// Longest denial reason text.
pub const MAX_REASON: usize = 1024;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The body ended early.
    #[error("frame truncated")]
    Truncated,
    /// Bytes after the message.
    #[error("trailing bytes after the message")]
    TrailingBytes,
    /// Declared length over [`MAX_FRAME`] (or under 2).
    #[error("frame length {0} outside 2..={MAX_FRAME}")]
    BadLength(usize),
    /// Version other than [`VERSION`].
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A cluster or key id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("cluster/key id must be 1-64 characters of [A-Za-z0-9._-]")]
    BadId,
    /// Key count outside 1..=16.
    #[error("key count {0} outside 1..={MAX_KEYS}")]
    BadKeyCount(usize),
    /// A duplicated key id in one request.
    #[error("duplicate key id in one request")]
    DuplicateKeyId,
    /// Text not UTF-8.
    #[error("text is not UTF-8")]
    BadText,
    /// A field too long for its length prefix or limit.
    #[error("field too long")]
    TooLong,
    /// A boolean byte other than 0 or 1.
    #[error("flag byte must be 0 or 1")]
    BadFlag,
    /// A `Released`'s audit receipt has another version, sequence number 0 or a key that is
    /// not an uncompressed point.
    #[error("the audit receipt is malformed")]
    BadReceipt,
}

/// A request frame the server refuses without reading it, and answers with a Denied saying
/// why: decides each one's deny code. The server's reader finds these (`crate::net::io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unreadable {
    /// No complete frame within the time limit.
    #[error("no complete frame in time")]
    Timeout,
    /// The length prefix is out of range.
    #[error("{0}")]
    Length(WireError),
    /// The declared length is more than a request of its type can be.
    #[error("a frame of type {ty} declares {len} bytes; that type has at most {max}")]
    TooLargeForType {
        /// The frame's type byte.
        ty: u8,
        /// Its declared length.
        len: usize,
        /// The most that type can have.
        max: usize,
    },
    /// The bytes in flight across every connection are at their budget.
    #[error("the server's budget of bytes in flight is spent; retry shortly")]
    Busy,
    /// The read was made to give its place up for a newer one (the server's connection slots
    /// or byte budget had run out and this read had waited longest).
    #[error("evicted: the server is at its limits and this connection had waited longest for its frame; retry")]
    Evicted,
}

impl Unreadable {
    /// The code of the Denied that answers it.
    pub fn code(&self) -> DenyCode {
        match self {
            Unreadable::Timeout => DenyCode::Timeout,
            Unreadable::Length(_) | Unreadable::TooLargeForType { .. } => DenyCode::FrameTooLarge,
            Unreadable::Busy | Unreadable::Evicted => DenyCode::Busy,
        }
    }
}

impl From<CodecError> for WireError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Truncated { .. } => WireError::Truncated,
            CodecError::TrailingBytes { .. } => WireError::TrailingBytes,
            CodecError::Utf8 { .. } => WireError::BadText,
            CodecError::TooLong { .. } => WireError::TooLong,
            CodecError::BadId { .. } => WireError::BadId,
            CodecError::BadFlag { .. } => WireError::BadFlag,
        }
    }
}

impl From<BadId> for WireError {
    fn from(_: BadId) -> Self {
        WireError::BadId
    }
}

/// A body under construction: the version and `type` bytes, the payload to follow.
pub(super) fn body(t: u8) -> Writer {
    Writer::from_vec(vec![VERSION, t])
}

/// The complete frame of `body`: its length prefix, then the body, if within [`MAX_FRAME`].
pub(super) fn seal(body: Vec<u8>) -> Result<Vec<u8>, WireError> {
    if body.len() > MAX_FRAME {
        return Err(WireError::BadLength(body.len()));
    }
    let mut frame = u32::try_from(body.len()).map_err(|_| WireError::TooLong)?.to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a body's length and version: its type byte and a reader over its payload.
pub(super) fn open(body: &[u8]) -> Result<(u8, Reader<'_>), WireError> {
    if body.len() < 2 || body.len() > MAX_FRAME {
        return Err(WireError::BadLength(body.len()));
    }
    let mut r = Reader::new(body);
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    Ok((r.u8("type")?, r))
}

/// Reads the length prefix of a frame: the body length, if acceptable.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let n = usize::try_from(u32::from_be_bytes(prefix)).map_err(|_| WireError::BadLength(usize::MAX))?;
    if !(2..=MAX_FRAME).contains(&n) {
        return Err(WireError::BadLength(n));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Denied a server sends for a frame it did not read: these codes and reasons.
    #[test]
    fn unreadable_frames_have_their_codes_and_reasons() {
        let cases = [
            (Unreadable::Timeout, DenyCode::Timeout, "no complete frame in time"),
            (Unreadable::Length(WireError::TooLong), DenyCode::FrameTooLarge, "field too long"),
            (
                Unreadable::TooLargeForType { ty: 1, len: 65_536, max: 34 },
                DenyCode::FrameTooLarge,
                "a frame of type 1 declares 65536 bytes; that type has at most 34",
            ),
            (Unreadable::Busy, DenyCode::Busy, "the server's budget of bytes in flight is spent; retry shortly"),
        ];
        for (why, code, reason) in cases {
            assert_eq!((why.code(), why.to_string().as_str()), (code, reason));
        }
        assert_eq!(Unreadable::Evicted.code(), DenyCode::Busy);
    }
}
