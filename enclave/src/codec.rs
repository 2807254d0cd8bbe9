//! The one byte codec of every hand-written format (wire frames, the sealed state, the
//! custodian files, audit records), and the validated identifier [`Id`] they all carry.
//!
//! What this module decides: how a big-endian integer, a fixed array, a length-prefixed
//! byte string or text and an id are laid out, and that reading them never panics — every
//! length is checked before use and a short or over-long input is a typed [`CodecError`]
//! naming the field. What it trusts: nothing; its input is untrusted bytes. Each format
//! (`docs/protocol.md`, `docs/audit.md`, the sealed-state and custody formats) keeps its own
//! error type, converted from [`CodecError`], and its own layout rules above these fields.
//!
//! The lowest layer of the crate: it imports nothing of ours.

use std::fmt;

/// Longest cluster or key id.
pub const MAX_ID: usize = 64;

/// A cluster or key id: 1–64 bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(String);

/// A string is not a valid [`Id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cluster/key id must be 1-64 characters of [A-Za-z0-9._-]")]
pub struct BadId;

impl Id {
    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, BadId> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadId)
        }
    }
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The id's length, which fits its `u8` prefix (1..=[`MAX_ID`] by construction).
    pub fn len_u8(&self) -> u8 {
        u8::try_from(self.0.len()).unwrap_or(u8::MAX)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Id {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Why bytes did not read (or a value did not fit its field). Every variant that concerns a
/// field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The input ends inside the field.
    #[error("truncated inside `{field}`")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes are left after the last field.
    #[error("{len} bytes left over after the record")]
    TrailingBytes {
        /// How many.
        len: usize,
    },
    /// A text field is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    Utf8 {
        /// The field.
        field: &'static str,
    },
    /// A value is longer than its length prefix (or limit) allows.
    #[error("field `{field}` is {len} bytes, more than {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An id field is not a valid [`Id`] (including not UTF-8).
    #[error("field `{field}` is not a valid id")]
    BadId {
        /// The field.
        field: &'static str,
    },
    /// A boolean byte is neither 0 nor 1.
    #[error("field `{field}`: flag {value} is neither 0 nor 1")]
    BadFlag {
        /// The field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
}

/// Reads fields from untrusted bytes; every read checks the remaining length first.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        if self.rest.len() < n {
            return Err(CodecError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
    /// A `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// A big-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    /// A big-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    /// A big-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
    /// A boolean byte: 0 or 1.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, CodecError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(CodecError::BadFlag { field, value }),
        }
    }
    /// `len:u8 ‖ bytes`.
    pub fn bytes8(&mut self, field: &'static str) -> Result<&'a [u8], CodecError> {
        let n = usize::from(self.u8(field)?);
        self.take(n, field)
    }
    /// `len:u16be ‖ bytes`.
    pub fn bytes16(&mut self, field: &'static str) -> Result<&'a [u8], CodecError> {
        let n = usize::from(self.u16(field)?);
        self.take(n, field)
    }
    /// `len:u8 ‖ UTF-8`.
    pub fn str8(&mut self, field: &'static str) -> Result<&'a str, CodecError> {
        utf8(self.bytes8(field)?, field)
    }
    /// `len:u16be ‖ UTF-8`.
    pub fn str16(&mut self, field: &'static str) -> Result<&'a str, CodecError> {
        utf8(self.bytes16(field)?, field)
    }
    /// `len:u8 ‖ id`; bytes that are not UTF-8 are a [`CodecError::BadId`] too.
    pub fn id(&mut self, field: &'static str) -> Result<Id, CodecError> {
        let raw = self.bytes8(field)?;
        std::str::from_utf8(raw).ok().and_then(|s| Id::new(s).ok()).ok_or(CodecError::BadId { field })
    }
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }
    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes { len: self.rest.len() })
        }
    }
}

/// `bytes` as UTF-8 text of `field`.
pub fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, CodecError> {
    std::str::from_utf8(bytes).map_err(|_| CodecError::Utf8 { field })
}

/// Appends fields; every length prefix is checked to hold its value.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// A writer that appends to `buf`.
    pub fn from_vec(buf: Vec<u8>) -> Self {
        Self { buf }
    }
    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
    /// How many bytes are written.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// A `u8`.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A big-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// A big-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// A big-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Raw bytes (a fixed-length field).
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// A boolean byte.
    pub fn flag(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    /// `len:u8 ‖ bytes`.
    pub fn bytes8(&mut self, field: &'static str, v: &[u8]) -> Result<(), CodecError> {
        let len = u8::try_from(v.len()).map_err(|_| CodecError::TooLong { field, len: v.len(), max: 255 })?;
        self.u8(len);
        self.bytes(v);
        Ok(())
    }
    /// `len:u16be ‖ bytes`.
    pub fn bytes16(&mut self, field: &'static str, v: &[u8]) -> Result<(), CodecError> {
        let len = u16::try_from(v.len()).map_err(|_| CodecError::TooLong { field, len: v.len(), max: 65535 })?;
        self.u16(len);
        self.bytes(v);
        Ok(())
    }
    /// `len:u8 ‖ UTF-8`.
    pub fn str8(&mut self, field: &'static str, s: &str) -> Result<(), CodecError> {
        self.bytes8(field, s.as_bytes())
    }
    /// `len:u8 ‖ id` (an id always fits).
    pub fn id(&mut self, id: &Id) {
        self.u8(id.len_u8());
        self.bytes(id.as_str().as_bytes());
    }
}

/// `s` as an [`Id`], for the crate's unit tests (panics on an invalid id).
#[cfg(test)]
pub(crate) fn test_id(s: &str) -> Id {
    Id::new(s).expect("id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(Id::new("prod-1.a_b").is_ok());
        assert_eq!(Id::new(""), Err(BadId));
        assert_eq!(Id::new(&"a".repeat(65)), Err(BadId));
        assert_eq!(Id::new("a b"), Err(BadId));
    }

    #[test]
    fn reads_what_the_writer_wrote() {
        let mut w = Writer::new();
        w.u8(7);
        w.u16(0x0102);
        w.u32(3);
        w.u64(4);
        w.flag(true);
        w.bytes16("b", b"xyz").expect("fits");
        w.str8("s", "héllo").expect("fits");
        w.id(&Id::new("k1").expect("id"));
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a"), Ok(7));
        assert_eq!(r.u16("a"), Ok(0x0102));
        assert_eq!(r.u32("a"), Ok(3));
        assert_eq!(r.u64("a"), Ok(4));
        assert_eq!(r.flag("a"), Ok(true));
        assert_eq!(r.bytes16("b"), Ok(&b"xyz"[..]));
        assert_eq!(r.str8("s"), Ok("héllo"));
        assert_eq!(r.id("k").map(|i| i.as_str().to_owned()), Ok("k1".to_owned()));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn errors_name_the_field() {
        let mut r = Reader::new(&[0, 5, 1]);
        assert_eq!(r.bytes16("blob"), Err(CodecError::Truncated { field: "blob" }));
        assert_eq!(Reader::new(&[2]).flag("serving"), Err(CodecError::BadFlag { field: "serving", value: 2 }));
        assert_eq!(Reader::new(&[1, 0xff]).str8("t"), Err(CodecError::Utf8 { field: "t" }));
        assert_eq!(Reader::new(&[1, 0xff]).id("k"), Err(CodecError::BadId { field: "k" }));
        assert_eq!(Reader::new(&[1, b' ']).id("k"), Err(CodecError::BadId { field: "k" }));
        assert_eq!(Reader::new(&[1, 2]).finish(), Err(CodecError::TrailingBytes { len: 2 }));
        let mut w = Writer::new();
        assert_eq!(w.str8("s", &"a".repeat(256)), Err(CodecError::TooLong { field: "s", len: 256, max: 255 }));
        assert_eq!(w.bytes16("b", &vec![0; 65536]), Err(CodecError::TooLong { field: "b", len: 65536, max: 65535 }));
    }
}
