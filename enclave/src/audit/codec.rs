//! The byte-level codec of audit records: a writer that refuses values over their limits,
//! and a strict reader (every length checked before use, typed errors, no trailing bytes).

use std::collections::BTreeMap;

use crate::wire::Id;

/// Why an audit entry, checkpoint or file did not decode (or an event did not encode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
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
    /// The format version is not 1.
    #[error("unsupported format version {0}")]
    Version(u8),
    /// An event type this version does not know.
    #[error("unknown event type {0}")]
    UnknownEvent(u8),
    /// Bytes follow the record.
    #[error("{0} bytes left over after the record")]
    TrailingBytes(usize),
    /// A text field is not UTF-8.
    #[error("field `{0}` is not valid UTF-8")]
    Utf8(&'static str),
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
    /// An id is not 1–64 bytes of `[A-Za-z0-9._-]`.
    #[error("field `{0}` is not a valid id")]
    BadId(&'static str),
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
    /// A PCR index is ≥ 32 or not strictly increasing, or a value is not 32/48/64 bytes.
    #[error("PCR list: {0}")]
    BadPcr(&'static str),
    /// An `anonymous_refusals` body breaks a rule of its own: first time after last time,
    /// codes not strictly increasing (unsorted or duplicate), or a zero count.
    #[error("anonymous refusal counts: {0}")]
    BadAnonymousCounts(&'static str),
    /// A document kind byte other than 1 (enclave) or 2 (nitrotpm).
    #[error("unknown document kind {0}")]
    BadKind(u8),
    /// A sequence number of 0 (they start at 1).
    #[error("sequence number 0 (sequence numbers start at 1)")]
    ZeroSequence,
    /// A public key that is not an uncompressed SEC1 point.
    #[error("public key is not an uncompressed P-384 point (04 ‖ x ‖ y)")]
    BadPoint,
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

/// Appends fields; every variable-length field is checked against its limit.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn flag(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    /// `len:u8 ‖ UTF-8`, 1..=max bytes (or 0..=max when `allow_empty`).
    pub(crate) fn str8(&mut self, field: &'static str, s: &str, allow_empty: bool) -> Result<(), DecodeError> {
        let len = u8::try_from(s.len()).map_err(|_| DecodeError::FieldTooLong { field, len: s.len(), max: 255 })?;
        if len == 0 && !allow_empty {
            return Err(DecodeError::Empty(field));
        }
        self.u8(len);
        self.bytes(s.as_bytes());
        Ok(())
    }
    /// `len:u16be ‖ UTF-8`, at most `max` bytes.
    pub(crate) fn str16(&mut self, field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
        if s.len() > max {
            return Err(DecodeError::FieldTooLong { field, len: s.len(), max });
        }
        let len = u16::try_from(s.len()).map_err(|_| DecodeError::FieldTooLong { field, len: s.len(), max })?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.bytes(s.as_bytes());
        Ok(())
    }
    pub(crate) fn id(&mut self, id: &Id) {
        // An `Id` is 1–64 bytes by construction.
        self.buf.push(u8::try_from(id.as_str().len()).unwrap_or(0));
        self.bytes(id.as_str().as_bytes());
    }
    /// `n:u8 ‖ (index:u8 ‖ len:u8 ‖ value) × n`, indexes strictly increasing (a BTreeMap).
    pub(crate) fn pcrs(&mut self, pcrs: &BTreeMap<u8, Vec<u8>>) -> Result<(), DecodeError> {
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
            self.u8(u8::try_from(v.len()).unwrap_or(0));
            self.bytes(v);
        }
        Ok(())
    }
}

/// Reads fields from a slice; every read checks the remaining length first.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
    /// A reader of one versioned record (an entry, a checkpoint, a receipt): refuses a record
    /// over `max` bytes before reading anything, then reads and checks the version byte.
    pub(crate) fn record(bytes: &'a [u8], max: usize) -> Result<Self, DecodeError> {
        if bytes.len() > max {
            return Err(DecodeError::TooLarge { len: bytes.len(), max });
        }
        let mut r = Self::new(bytes);
        let version = r.u8("version")?;
        if version != super::FORMAT_VERSION {
            return Err(DecodeError::Version(version));
        }
        Ok(r)
    }
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated(field));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadFlag { field, value }),
        }
    }
    fn utf8(bytes: &[u8], field: &'static str) -> Result<String, DecodeError> {
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DecodeError::Utf8(field))
    }
    pub(crate) fn str8(&mut self, field: &'static str, allow_empty: bool) -> Result<String, DecodeError> {
        let len = usize::from(self.u8(field)?);
        if len == 0 && !allow_empty {
            return Err(DecodeError::Empty(field));
        }
        Self::utf8(self.take(len, field)?, field)
    }
    pub(crate) fn str16(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::FieldTooLong { field, len, max });
        }
        Self::utf8(self.take(len, field)?, field)
    }
    pub(crate) fn id(&mut self, field: &'static str) -> Result<Id, DecodeError> {
        let len = usize::from(self.u8(field)?);
        let raw = self.take(len, field)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::BadId(field))?;
        Id::new(s).map_err(|_| DecodeError::BadId(field))
    }
    pub(crate) fn pcrs(&mut self) -> Result<BTreeMap<u8, Vec<u8>>, DecodeError> {
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
    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.rest.len()))
        }
    }
}
