//! A strict, bounded CBOR (RFC 8949) reader for untrusted input.
//!
//! Why not a general-purpose CBOR crate here: verification needs (a) the exact bytes of the
//! byte strings as they arrived (the COSE signature covers them; nothing is re-encoded),
//! (b) maps kept as ordered pairs so that duplicate keys are *seen* and refused rather than
//! silently collapsed, (c) every declared length checked against the bytes actually present
//! before anything is allocated, so a 16 KiB document cannot ask for gigabytes, and (d) errors
//! that carry the offset and the reason. This reader does exactly that and nothing more:
//! it never re-encodes, and it decodes definite and indefinite lengths alike (real Nitro
//! documents may use either).
//!
//! Encoding (for documents that keygate itself produces) uses `ciborium`, which emits the
//! canonical, definite-length form.

use std::borrow::Cow;

/// Nesting deeper than this is refused. Attestation documents nest 3 levels.
pub const MAX_DEPTH: usize = 16;
/// Total number of data items in one decoded value. A 16 KiB document holds far fewer.
pub const MAX_ITEMS: usize = 20_000;

/// A decoded CBOR data item. Byte and text strings borrow from the input when they were
/// encoded with a definite length.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// Major type 0.
    Unsigned(u64),
    /// Major type 1: the value is `-1 - n`.
    Negative(u64),
    /// Major type 2.
    Bytes(Cow<'a, [u8]>),
    /// Major type 3.
    Text(Cow<'a, str>),
    /// Major type 4.
    Array(Vec<Value<'a>>),
    /// Major type 5, pairs in the order they were encoded (duplicates preserved).
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// Major type 6.
    Tag(u64, Box<Value<'a>>),
    /// `false` / `true`.
    Bool(bool),
    /// `null`.
    Null,
    /// `undefined`.
    Undefined,
    /// Any other simple value.
    Simple(u8),
    /// A float of any width, as its IEEE 754 bit pattern widened to 64 bits (not interpreted).
    Float(u64),
}

impl Value<'_> {
    /// A short name of the item's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Unsigned(_) => "unsigned integer",
            Value::Negative(_) => "negative integer",
            Value::Bytes(_) => "byte string",
            Value::Text(_) => "text string",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
            Value::Tag(..) => "tag",
            Value::Bool(_) => "bool",
            Value::Null => "null",
            Value::Undefined => "undefined",
            Value::Simple(_) => "simple value",
            Value::Float(_) => "float",
        }
    }
}

/// Why a CBOR input was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CborErrorKind {
    /// The input ended inside an item.
    #[error("input ends inside an item")]
    Truncated,
    /// Bytes follow the top-level item.
    #[error("trailing bytes after the item")]
    TrailingBytes,
    /// Additional information 28..=30 (reserved by RFC 8949).
    #[error("reserved additional information value")]
    Reserved,
    /// A "break" outside an indefinite-length item.
    #[error("unexpected break")]
    UnexpectedBreak,
    /// Indefinite length used where it is not allowed (integers, tags, simple values).
    #[error("indefinite length not allowed here")]
    IndefiniteNotAllowed,
    /// A chunk of an indefinite-length string is not a definite string of the same type.
    #[error("bad chunk in an indefinite-length string")]
    BadChunk,
    /// A text string is not valid UTF-8.
    #[error("text string is not valid UTF-8")]
    InvalidUtf8,
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// More than [`MAX_ITEMS`] items.
    #[error("more than {MAX_ITEMS} items")]
    TooManyItems,
    /// A simple value encoded in two bytes below 32 (not well-formed, RFC 8949 §3.3).
    #[error("badly encoded simple value")]
    BadSimple,
}

/// A CBOR decoding error and the byte offset where it was detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("CBOR: {kind} at byte {offset}")]
pub struct CborError {
    /// What is wrong.
    pub kind: CborErrorKind,
    /// Offset into the input.
    pub offset: usize,
}

/// Decodes exactly one item that spans the whole input.
pub fn decode(input: &[u8]) -> Result<Value<'_>, CborError> {
    let mut r = Reader { input, pos: 0, items: 0 };
    let v = r.item(0)?;
    if r.pos != input.len() {
        return Err(r.err(CborErrorKind::TrailingBytes));
    }
    Ok(v)
}

enum Head {
    Item(u8, Arg),
    Break,
}

#[derive(Clone, Copy)]
enum Arg {
    Value(u64),
    Indefinite,
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    items: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, kind: CborErrorKind) -> CborError {
        CborError { kind, offset: self.pos }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CborError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        match end {
            Some(end) => {
                let s = &self.input[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(CborErrorKind::Truncated)),
        }
    }

    /// Converts a declared length to `usize`, refusing any length larger than what remains.
    fn len(&self, n: u64) -> Result<usize, CborError> {
        let remaining = self.input.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= remaining => Ok(n),
            _ => Err(self.err(CborErrorKind::Truncated)),
        }
    }

    fn head(&mut self) -> Result<Head, CborError> {
        let b = self.take(1)?[0];
        let major = b >> 5;
        let info = b & 0x1f;
        let arg = match info {
            0..=23 => Arg::Value(u64::from(info)),
            24 => Arg::Value(u64::from(self.take(1)?[0])),
            25 => Arg::Value(u64::from(u16::from_be_bytes(self.array::<2>()?))),
            26 => Arg::Value(u64::from(u32::from_be_bytes(self.array::<4>()?))),
            27 => Arg::Value(u64::from_be_bytes(self.array::<8>()?)),
            28..=30 => {
                self.pos -= 1;
                return Err(self.err(CborErrorKind::Reserved));
            }
            _ => {
                if major == 7 {
                    return Ok(Head::Break);
                }
                Arg::Indefinite
            }
        };
        Ok(Head::Item(major, arg))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CborError> {
        let s = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn count_item(&mut self) -> Result<(), CborError> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return Err(self.err(CborErrorKind::TooManyItems));
        }
        Ok(())
    }

    fn item(&mut self, depth: usize) -> Result<Value<'a>, CborError> {
        let start = self.pos;
        match self.head()? {
            Head::Break => {
                self.pos = start;
                Err(self.err(CborErrorKind::UnexpectedBreak))
            }
            Head::Item(major, arg) => self.item_body(depth, start, major, arg),
        }
    }

    fn item_body(&mut self, depth: usize, start: usize, major: u8, arg: Arg) -> Result<Value<'a>, CborError> {
        if depth > MAX_DEPTH {
            return Err(self.err(CborErrorKind::TooDeep));
        }
        self.count_item()?;
        let definite = |_: &Self| match arg {
            Arg::Value(v) => Ok(v),
            Arg::Indefinite => Err(CborError { kind: CborErrorKind::IndefiniteNotAllowed, offset: start }),
        };
        Ok(match major {
            0 => Value::Unsigned(definite(self)?),
            1 => Value::Negative(definite(self)?),
            2 => match arg {
                Arg::Value(n) => {
                    let n = self.len(n)?;
                    Value::Bytes(Cow::Borrowed(self.take(n)?))
                }
                Arg::Indefinite => Value::Bytes(Cow::Owned(self.chunks(2)?)),
            },
            3 => {
                let bytes: Cow<'a, [u8]> = match arg {
                    Arg::Value(n) => {
                        let n = self.len(n)?;
                        Cow::Borrowed(self.take(n)?)
                    }
                    Arg::Indefinite => Cow::Owned(self.chunks(3)?),
                };
                let invalid = CborError { kind: CborErrorKind::InvalidUtf8, offset: start };
                match bytes {
                    Cow::Borrowed(b) => Value::Text(Cow::Borrowed(std::str::from_utf8(b).map_err(|_| invalid)?)),
                    Cow::Owned(b) => Value::Text(Cow::Owned(String::from_utf8(b).map_err(|_| invalid)?)),
                }
            }
            4 => {
                let mut items = Vec::new();
                match arg {
                    Arg::Value(n) => {
                        // Each item takes at least one byte: bound by what remains.
                        let n = self.len(n)?;
                        items.reserve(n);
                        for _ in 0..n {
                            items.push(self.item(depth + 1)?);
                        }
                    }
                    Arg::Indefinite => loop {
                        let at = self.pos;
                        match self.head()? {
                            Head::Break => break,
                            Head::Item(m, a) => items.push(self.item_body(depth + 1, at, m, a)?),
                        }
                    },
                }
                Value::Array(items)
            }
            5 => {
                let mut pairs = Vec::new();
                match arg {
                    Arg::Value(n) => {
                        let n = self.len(n)?;
                        for _ in 0..n {
                            let k = self.item(depth + 1)?;
                            let v = self.item(depth + 1)?;
                            pairs.push((k, v));
                        }
                    }
                    Arg::Indefinite => loop {
                        let at = self.pos;
                        match self.head()? {
                            Head::Break => break,
                            Head::Item(m, a) => {
                                let k = self.item_body(depth + 1, at, m, a)?;
                                let v = self.item(depth + 1)?;
                                pairs.push((k, v));
                            }
                        }
                    },
                }
                Value::Map(pairs)
            }
            6 => {
                let tag = definite(self)?;
                Value::Tag(tag, Box::new(self.item(depth + 1)?))
            }
            _ => {
                // Major type 7: the additional information decides.
                let info = self.input[start] & 0x1f;
                let v = definite(self)?;
                match info {
                    20 => Value::Bool(false),
                    21 => Value::Bool(true),
                    22 => Value::Null,
                    23 => Value::Undefined,
                    0..=19 => Value::Simple(self.input[start] & 0x1f),
                    24 => match u8::try_from(v) {
                        Ok(s) if s >= 32 => Value::Simple(s),
                        _ => return Err(CborError { kind: CborErrorKind::BadSimple, offset: start }),
                    },
                    _ => Value::Float(v),
                }
            }
        })
    }

    /// Reads the chunks of an indefinite-length byte/text string (major type `major`).
    fn chunks(&mut self, major: u8) -> Result<Vec<u8>, CborError> {
        let mut out = Vec::new();
        loop {
            let at = self.pos;
            match self.head()? {
                Head::Break => return Ok(out),
                Head::Item(m, Arg::Value(n)) if m == major => {
                    self.count_item()?;
                    let n = self.len(n)?;
                    out.extend_from_slice(self.take(n)?);
                }
                Head::Item(..) => return Err(CborError { kind: CborErrorKind::BadChunk, offset: at }),
            }
        }
    }
}

/// Appends the CBOR head for major type `major` with argument `n` (shortest form).
pub(crate) fn encode_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | u8::try_from(n).unwrap_or(0));
    } else if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[m | 24, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(m | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(m | 26);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Appends a definite-length text string.
pub(crate) fn encode_text(out: &mut Vec<u8>, s: &str) {
    encode_head(out, 3, u64::try_from(s.len()).unwrap_or(u64::MAX));
    out.extend_from_slice(s.as_bytes());
}

/// Appends a definite-length byte string.
pub(crate) fn encode_bytes(out: &mut Vec<u8>, b: &[u8]) {
    encode_head(out, 2, u64::try_from(b.len()).unwrap_or(u64::MAX));
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &[u8]) -> CborErrorKind {
        decode(input).expect_err("must fail").kind
    }

    #[test]
    fn declared_counts_are_refused_before_reading_when_they_exceed_what_remains() {
        // An array of 4 with 2 bytes left, a map of 3 pairs with 2 bytes left, a byte string of
        // 5 with 3 left: refused at the count (offset 1), before any item is read or reserved.
        for input in [&[0x84, 0x01, 0x02][..], &[0xa3, 0x01, 0x02], &[0x45, 1, 2, 3]] {
            let e = decode(input).expect_err("must fail");
            assert_eq!((e.kind, e.offset), (CborErrorKind::Truncated, 1), "{input:02x?}");
        }
        // Nested: the inner count is checked against what remains at its own position.
        let e = decode(&[0x82, 0x01, 0x83, 0x01, 0x02]).expect_err("must fail");
        assert_eq!((e.kind, e.offset), (CborErrorKind::Truncated, 3));
    }

    #[test]
    fn type_names_name_each_kind() {
        let names: Vec<&str> = [
            Value::Unsigned(0),
            Value::Negative(0),
            Value::Bytes(Cow::Borrowed(&[])),
            Value::Text(Cow::Borrowed("")),
            Value::Array(vec![]),
            Value::Map(vec![]),
            Value::Tag(1, Box::new(Value::Null)),
            Value::Bool(true),
            Value::Null,
            Value::Undefined,
            Value::Simple(16),
            Value::Float(0),
        ]
        .iter()
        .map(Value::type_name)
        .collect();
        assert_eq!(
            names,
            [
                "unsigned integer",
                "negative integer",
                "byte string",
                "text string",
                "array",
                "map",
                "tag",
                "bool",
                "null",
                "undefined",
                "simple value",
                "float"
            ]
        );
    }

    #[test]
    fn scalars() {
        assert_eq!(decode(&[0x00]).ok(), Some(Value::Unsigned(0)));
        assert_eq!(decode(&[0x18, 0xff]).ok(), Some(Value::Unsigned(255)));
        assert_eq!(decode(&[0x38, 0x22]).ok(), Some(Value::Negative(0x22)));
        assert_eq!(decode(&[0xf6]).ok(), Some(Value::Null));
        assert_eq!(decode(&[0xf5]).ok(), Some(Value::Bool(true)));
        assert_eq!(decode(&[0x1b, 0, 0, 0, 0, 0, 0, 1, 0]).ok(), Some(Value::Unsigned(256)));
    }

    #[test]
    fn indefinite_forms_decode() {
        // (_ h'01', h'0203')
        let v = decode(&[0x5f, 0x41, 0x01, 0x42, 0x02, 0x03, 0xff]).expect("ok");
        assert_eq!(v, Value::Bytes(Cow::Owned(vec![1, 2, 3])));
        // {_ 1: 2}
        let v = decode(&[0xbf, 0x01, 0x02, 0xff]).expect("ok");
        assert_eq!(v, Value::Map(vec![(Value::Unsigned(1), Value::Unsigned(2))]));
        // [_ 1, [_ ]]
        let v = decode(&[0x9f, 0x01, 0x9f, 0xff, 0xff]).expect("ok");
        assert_eq!(v, Value::Array(vec![Value::Unsigned(1), Value::Array(vec![])]));
    }

    #[test]
    fn duplicate_keys_are_preserved() {
        let v = decode(&[0xa2, 0x01, 0x02, 0x01, 0x03]).expect("ok");
        match v {
            Value::Map(p) => assert_eq!(p.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_inputs_have_precise_errors() {
        assert_eq!(err(&[]), CborErrorKind::Truncated);
        assert_eq!(err(&[0x00, 0x00]), CborErrorKind::TrailingBytes);
        assert_eq!(err(&[0x1c]), CborErrorKind::Reserved);
        // A reserved additional-information value is reported at its head byte.
        for (input, offset) in [(&[0x1d][..], 0), (&[0x82, 0x01, 0x3e][..], 2), (&[0x81, 0x81, 0x81, 0xfc][..], 3)] {
            let e = decode(input).expect_err("reserved");
            assert_eq!((e.kind, e.offset), (CborErrorKind::Reserved, offset), "{input:02x?}");
        }
        assert_eq!(err(&[0xff]), CborErrorKind::UnexpectedBreak);
        assert_eq!(err(&[0x1f]), CborErrorKind::IndefiniteNotAllowed);
        assert_eq!(err(&[0xdf, 0x00]), CborErrorKind::IndefiniteNotAllowed);
        assert_eq!(err(&[0x5f, 0x61, 0x41, 0xff]), CborErrorKind::BadChunk);
        assert_eq!(err(&[0x5f, 0x5f, 0xff, 0xff]), CborErrorKind::BadChunk);
        assert_eq!(err(&[0x62, 0xff, 0xfe]), CborErrorKind::InvalidUtf8);
        assert_eq!(err(&[0xf8, 0x10]), CborErrorKind::BadSimple);
        // A huge declared length is refused before any allocation.
        assert_eq!(err(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), CborErrorKind::Truncated);
        assert_eq!(err(&[0x9b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), CborErrorKind::Truncated);
        assert_eq!(err(&[0xbb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), CborErrorKind::Truncated);
        let deep = vec![0x81; MAX_DEPTH + 2];
        assert_eq!(err(&deep), CborErrorKind::TooDeep);
        let mut many = vec![0x9f];
        many.extend(std::iter::repeat_n(0x00, MAX_ITEMS + 1));
        many.push(0xff);
        assert_eq!(err(&many), CborErrorKind::TooManyItems);
    }

    #[test]
    fn depth_and_item_limits_hold_at_their_boundaries() {
        // Nesting: the innermost item at depth MAX_DEPTH is fine, one deeper is not.
        let nested = |levels: usize| {
            let mut v = vec![0x81; levels];
            v.push(0x00);
            v
        };
        assert!(decode(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(err(&nested(MAX_DEPTH + 1)), CborErrorKind::TooDeep);
        // Items: an array and its elements, MAX_ITEMS in all, then one more.
        let array = |elements: usize| {
            let mut v = vec![0x99];
            v.extend_from_slice(&u16::try_from(elements).expect("fits").to_be_bytes());
            v.extend(std::iter::repeat_n(0x00, elements));
            v
        };
        assert!(decode(&array(MAX_ITEMS - 1)).is_ok());
        assert_eq!(err(&array(MAX_ITEMS)), CborErrorKind::TooManyItems);
    }

    /// Every way of nesting counts toward the depth limit: map keys and values, indefinite
    /// arrays and maps (keys and values), tags.
    #[test]
    fn every_container_counts_toward_the_depth_limit() {
        let chain = |open: &[u8], middle: &[u8], close: &[u8], levels: usize| {
            let mut v = open.repeat(levels);
            v.extend_from_slice(middle);
            v.extend_from_slice(&close.repeat(levels));
            v
        };
        // (what, opening bytes of one level, the innermost item, closing bytes of one level)
        type Shape = (&'static str, &'static [u8], &'static [u8], &'static [u8]);
        let shapes: [Shape; 6] = [
            ("map value", &[0xa1, 0x00], &[0x00], &[]),
            ("map key", &[0xa1], &[0x00], &[0x00]),
            ("indefinite array", &[0x9f], &[0x00], &[0xff]),
            ("indefinite map value", &[0xbf, 0x00], &[0x00], &[0xff]),
            ("indefinite map key", &[0xbf], &[0x00], &[0x00, 0xff]),
            ("tag", &[0xc1], &[0x00], &[]),
        ];
        for (what, open, middle, close) in shapes {
            assert!(decode(&chain(open, middle, close, MAX_DEPTH)).is_ok(), "{what} at the limit");
            assert_eq!(err(&chain(open, middle, close, MAX_DEPTH + 1)), CborErrorKind::TooDeep, "{what}");
        }
    }

    #[test]
    fn simple_values_decode_to_their_kinds() {
        assert_eq!(decode(&[0xf4]).ok(), Some(Value::Bool(false)));
        assert_eq!(decode(&[0xf5]).ok(), Some(Value::Bool(true)));
        assert_eq!(decode(&[0xf6]).ok(), Some(Value::Null));
        assert_eq!(decode(&[0xf7]).ok(), Some(Value::Undefined));
        assert_eq!(decode(&[0xe0]).ok(), Some(Value::Simple(0)));
        assert_eq!(decode(&[0xe5]).ok(), Some(Value::Simple(5)));
        assert_eq!(decode(&[0xf3]).ok(), Some(Value::Simple(19)));
        assert_eq!(decode(&[0xf8, 0x20]).ok(), Some(Value::Simple(32)));
        assert_eq!(decode(&[0xf8, 0xff]).ok(), Some(Value::Simple(255)));
        assert_eq!(err(&[0xf8, 0x1f]), CborErrorKind::BadSimple);
    }

    #[test]
    fn encode_head_is_shortest_and_round_trips() {
        for n in [0u64, 23, 24, 255, 256, 65535, 65536, u64::from(u32::MAX), u64::from(u32::MAX) + 1] {
            let mut out = Vec::new();
            encode_head(&mut out, 0, n);
            assert_eq!(decode(&out).ok(), Some(Value::Unsigned(n)), "{n}");
        }
    }
}
