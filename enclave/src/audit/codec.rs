//! The audit records' fields above the crate's one byte codec ([`crate::codec`]): text with
//! its emptiness rule and limit, PCR lists, the versioned record, and [`DecodeError`], the
//! audit formats' error (every [`CodecError`] converts into it, naming the same field).

use std::collections::BTreeMap;

use keygate_attestation::crypto::P384_POINT_LEN;

use crate::codec::CodecError;
pub(crate) use crate::codec::{Reader, Writer};

/// Why an audit entry, checkpoint or file did not decode (or an event did not encode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    // --- The record.
    /// The record is larger than its limit.
    #[error("record is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The record ends inside a field.
    #[error("truncated inside `{0}`")]
    Truncated(&'static str),
    /// Bytes follow the record.
    #[error("{0} bytes left over after the record")]
    TrailingBytes(usize),
    /// The format version is not 1.
    #[error("unsupported format version {0}")]
    Version(u8),
    /// An event type this version does not know.
    #[error("unknown event type {0}")]
    UnknownEvent(u8),
    // --- A field.
    /// A text field is not UTF-8.
    #[error("field `{0}` is not valid UTF-8")]
    Utf8(&'static str),
    /// An id is not 1–64 bytes of `[A-Za-z0-9._-]`.
    #[error("field `{0}` is not a valid id")]
    BadId(&'static str),
    /// A document kind byte other than 1 (enclave) or 2 (nitrotpm).
    #[error("unknown document kind {0}")]
    BadKind(u8),
    /// A field is longer than its limit.
    #[error("field `{field}` is {len} bytes, more than {max}")]
    FieldTooLong {
        /// Field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field that must not be empty is empty.
    #[error("field `{0}` is empty")]
    Empty(&'static str),
    /// A presence flag or boolean is neither 0 nor 1.
    #[error("field `{field}`: flag {value} is neither 0 nor 1")]
    BadFlag {
        /// Field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// A count is out of range.
    #[error("field `{field}`: count {count} outside {min}..={max}")]
    Count {
        /// Field.
        field: &'static str,
        /// Found.
        count: usize,
        /// Minimum.
        min: usize,
        /// Maximum.
        max: usize,
    },
    // --- The audit formats' own rules.
    /// A PCR index is ≥ 32 or not strictly increasing, or a value is not 32/48/64 bytes.
    #[error("PCR list: {0}")]
    BadPcr(&'static str),
    /// An `anonymous_refusals` body breaks a rule of its own: first time after last time,
    /// codes not strictly increasing (unsorted or duplicate), or a zero count.
    #[error("anonymous refusal counts: {0}")]
    BadAnonymousCounts(&'static str),
    /// A sequence number of 0 (they start at 1).
    #[error("sequence number 0 (sequence numbers start at 1)")]
    ZeroSequence,
    /// A public key that is not an uncompressed SEC1 point.
    #[error("public key is not an uncompressed P-384 point (04 ‖ x ‖ y)")]
    BadPoint,
    // --- The audit files.
    /// A file does not start with the expected magic.
    #[error("not a keygate audit {0} file (bad magic)")]
    BadMagic(&'static str),
    /// A file record's two length fields differ.
    #[error("record at offset {offset}: leading length {head} and trailing length {tail} differ")]
    LengthMismatch {
        /// Offset of the record.
        offset: usize,
        /// Leading length.
        head: u32,
        /// Trailing length.
        tail: u32,
    },
    /// A record inside a file is malformed.
    #[error("record {index} at offset {offset}: {error}")]
    Record {
        /// 0-based record index.
        index: usize,
        /// Byte offset in the file.
        offset: usize,
        /// What is wrong.
        error: Box<DecodeError>,
    },
    /// A file holds more records than the reader accepts.
    #[error("more than {0} records")]
    TooManyRecords(usize),
}

impl From<CodecError> for DecodeError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Truncated { field } => DecodeError::Truncated(field),
            CodecError::TrailingBytes { len } => DecodeError::TrailingBytes(len),
            CodecError::Utf8 { field } => DecodeError::Utf8(field),
            CodecError::TooLong { field, len, max } => DecodeError::FieldTooLong { field, len, max },
            CodecError::BadId { field } => DecodeError::BadId(field),
            CodecError::BadFlag { field, value } => DecodeError::BadFlag { field, value },
        }
    }
}

/// A sequence number: they start at 1.
pub(crate) fn check_seq(seq: u64) -> Result<u64, DecodeError> {
    if seq == 0 {
        return Err(DecodeError::ZeroSequence);
    }
    Ok(seq)
}

/// A public key: an uncompressed SEC1 P-384 point (`04 ‖ x ‖ y`).
pub(crate) fn check_point(point: &[u8; P384_POINT_LEN]) -> Result<(), DecodeError> {
    if point[0] != 0x04 {
        return Err(DecodeError::BadPoint);
    }
    Ok(())
}

/// The first 8 bytes of a chain id or digest, in hex: how `Debug`, reports and file names
/// name them.
pub(crate) fn short(id: &[u8]) -> String {
    hex::encode(&id[..id.len().min(8)])
}

/// A reader of one versioned record (an entry, a checkpoint, a receipt): refuses a record
/// over `max` bytes before reading anything, then reads and checks the version byte.
pub(crate) fn record(bytes: &[u8], max: usize) -> Result<Reader<'_>, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge { len: bytes.len(), max });
    }
    let mut r = Reader::new(bytes);
    let version = r.u8("version")?;
    if version != super::FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(r)
}

/// The audit fields a [`Writer`] writes: every variable-length field is checked against its
/// limit.
pub(crate) trait WriteAudit {
    /// `len:u8 ‖ UTF-8`, 1..=255 bytes (or 0..=255 when `allow_empty`).
    fn text8(&mut self, field: &'static str, s: &str, allow_empty: bool) -> Result<(), DecodeError>;
    /// `len:u16be ‖ UTF-8`, at most `max` bytes.
    fn text16(&mut self, field: &'static str, s: &str, max: usize) -> Result<(), DecodeError>;
    /// `n:u8 ‖ (index:u8 ‖ len:u8 ‖ value) × n`, indexes strictly increasing (a BTreeMap).
    fn pcrs(&mut self, pcrs: &BTreeMap<u8, Vec<u8>>) -> Result<(), DecodeError>;
}

impl WriteAudit for Writer {
    fn text8(&mut self, field: &'static str, s: &str, allow_empty: bool) -> Result<(), DecodeError> {
        if s.is_empty() && !allow_empty {
            return Err(DecodeError::Empty(field));
        }
        Ok(self.str8(field, s)?)
    }
    fn text16(&mut self, field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
        if s.len() > max {
            return Err(DecodeError::FieldTooLong { field, len: s.len(), max });
        }
        Ok(self.bytes16(field, s.as_bytes())?)
    }
    fn pcrs(&mut self, pcrs: &BTreeMap<u8, Vec<u8>>) -> Result<(), DecodeError> {
        if pcrs.len() > super::MAX_PCRS {
            return Err(DecodeError::Count { field: "pcrs", count: pcrs.len(), min: 0, max: super::MAX_PCRS });
        }
        self.u8(u8::try_from(pcrs.len()).unwrap_or(0));
        for (&i, v) in pcrs {
            if usize::from(i) >= super::MAX_PCRS {
                return Err(DecodeError::BadPcr("index ≥ 32"));
            }
            if ![32, 48, 64].contains(&v.len()) {
                return Err(DecodeError::BadPcr("value not 32, 48 or 64 bytes"));
            }
            self.u8(i);
            self.bytes8("pcr value", v)?;
        }
        Ok(())
    }
}

/// The audit fields a [`Reader`] reads: every length checked before use.
pub(crate) trait ReadAudit {
    /// `len:u8 ‖ UTF-8`, empty only when `allow_empty`.
    fn text8(&mut self, field: &'static str, allow_empty: bool) -> Result<String, DecodeError>;
    /// `len:u16be ‖ UTF-8`, at most `max` bytes.
    fn text16(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError>;
    /// A PCR list as [`WriteAudit::pcrs`] writes it.
    fn pcrs(&mut self) -> Result<BTreeMap<u8, Vec<u8>>, DecodeError>;
    /// `n:u8 ‖ item × n`, with `min <= n <= max` (else [`DecodeError::Count`] naming `field`).
    fn list<T>(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
        item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError>;
    /// A sequence number ([`check_seq`]).
    fn seq(&mut self, field: &'static str) -> Result<u64, DecodeError>;
}

impl ReadAudit for Reader<'_> {
    fn list<T>(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = usize::from(self.u8(field)?);
        if n < min || n > max {
            return Err(DecodeError::Count { field, count: n, min, max });
        }
        (0..n).map(|_| item(self)).collect()
    }
    fn seq(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        check_seq(self.u64(field)?)
    }
    fn text8(&mut self, field: &'static str, allow_empty: bool) -> Result<String, DecodeError> {
        let bytes = self.bytes8(field)?;
        if bytes.is_empty() && !allow_empty {
            return Err(DecodeError::Empty(field));
        }
        Ok(crate::codec::utf8(bytes, field)?.to_owned())
    }
    fn text16(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::FieldTooLong { field, len, max });
        }
        Ok(crate::codec::utf8(self.take(len, field)?, field)?.to_owned())
    }
    fn pcrs(&mut self) -> Result<BTreeMap<u8, Vec<u8>>, DecodeError> {
        let n = usize::from(self.u8("pcrs")?);
        if n > super::MAX_PCRS {
            return Err(DecodeError::Count { field: "pcrs", count: n, min: 0, max: super::MAX_PCRS });
        }
        let mut out = BTreeMap::new();
        let mut last: Option<u8> = None;
        for _ in 0..n {
            let i = self.u8("pcr index")?;
            if usize::from(i) >= super::MAX_PCRS {
                return Err(DecodeError::BadPcr("index ≥ 32"));
            }
            if last.is_some_and(|l| i <= l) {
                return Err(DecodeError::BadPcr("indexes not strictly increasing"));
            }
            last = Some(i);
            let len = usize::from(self.u8("pcr length")?);
            if ![32, 48, 64].contains(&len) {
                return Err(DecodeError::BadPcr("value not 32, 48 or 64 bytes"));
            }
            out.insert(i, self.take(len, "pcr value")?.to_vec());
        }
        Ok(out)
    }
}
