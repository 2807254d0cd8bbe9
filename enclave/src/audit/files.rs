//! The on-disk framing of the parent's audit directory (pure; [`super::store`] does the I/O).
//!
//! ```text
//! entries.log     = "KGAUDE\0\x01" ‖ record*      record = len:u32be ‖ entry ‖ len:u32be
//! checkpoints.log = "KGAUDC\0\x01" ‖ record*      record = len:u32be ‖ checkpoint ‖ len:u32be
//! ```
//!
//! The length is written before and after each record so the last record can be found from
//! the end of the file; both must agree. Nothing is skipped: a bad magic, a torn record, a
//! malformed entry or bytes after the last record are errors naming the record and offset.

use super::checkpoint::Checkpoint;
use super::codec::{DecodeError, Reader, Writer};
use super::event::AuditEntry;
use super::{MAX_CHECKPOINT_LEN, MAX_ENTRY_LEN};

/// First 8 bytes of `entries.log`.
pub const ENTRIES_MAGIC: &[u8; 8] = b"KGAUDE\x00\x01";
/// First 8 bytes of `checkpoints.log`.
pub const CHECKPOINTS_MAGIC: &[u8; 8] = b"KGAUDC\x00\x01";
/// Most records one file may hold when read whole.
pub const MAX_RECORDS: usize = 10_000_000;

/// Frames one record: `len ‖ body ‖ len`.
pub fn frame_record(body: &[u8]) -> Vec<u8> {
    // Bodies are at most MAX_CHECKPOINT_LEN bytes, so the length fits a u32.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut w = Writer::from_vec(Vec::with_capacity(body.len() + 8));
    w.u32(len);
    w.bytes(body);
    w.u32(len);
    w.into_bytes()
}

/// Splits a file into record bodies with their offsets.
pub fn split_records<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    what: &'static str,
    max_len: usize,
) -> Result<Vec<(usize, &'a [u8])>, DecodeError> {
    let rest = bytes.strip_prefix(&magic[..]).ok_or(DecodeError::BadMagic(what))?;
    let mut out = Vec::new();
    let mut offset = magic.len();
    let mut r = Reader::new(rest);
    while r.remaining() > 0 {
        let index = out.len();
        if index >= MAX_RECORDS {
            return Err(DecodeError::TooManyRecords(MAX_RECORDS));
        }
        let err = |error: DecodeError| DecodeError::Record { index, offset, error: Box::new(error) };
        let head_len = r.u32("record length").map_err(|e| err(e.into()))?;
        let len = usize::try_from(head_len).unwrap_or(usize::MAX);
        if len > max_len {
            return Err(err(DecodeError::TooLarge { len, max: max_len }));
        }
        let body = r.take(len, "record body").map_err(|e| err(e.into()))?;
        let tail_len = r.u32("record trailing length").map_err(|e| err(e.into()))?;
        if tail_len != head_len {
            return Err(err(DecodeError::LengthMismatch { offset, head: head_len, tail: tail_len }));
        }
        out.push((offset, body));
        offset += len + 8;
    }
    Ok(out)
}

/// Splits a file and decodes every record, naming the record that does not decode.
fn parse_records<T>(
    bytes: &[u8],
    magic: &[u8; 8],
    what: &'static str,
    max_len: usize,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    split_records(bytes, magic, what, max_len)?
        .into_iter()
        .enumerate()
        .map(|(index, (offset, body))| {
            decode(body).map_err(|e| DecodeError::Record { index, offset, error: Box::new(e) })
        })
        .collect()
}

/// Parses a whole `entries.log`.
pub fn parse_entries_file(bytes: &[u8]) -> Result<Vec<AuditEntry>, DecodeError> {
    parse_records(bytes, ENTRIES_MAGIC, "entries", MAX_ENTRY_LEN, AuditEntry::decode)
}

/// Parses a whole `checkpoints.log`.
pub fn parse_checkpoints_file(bytes: &[u8]) -> Result<Vec<Checkpoint>, DecodeError> {
    parse_records(bytes, CHECKPOINTS_MAGIC, "checkpoints", MAX_CHECKPOINT_LEN, Checkpoint::decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;

    fn file(n: u64) -> Vec<u8> {
        let mut out = ENTRIES_MAGIC.to_vec();
        let mut prev = [0u8; 48];
        for seq in 1..=n {
            let ev = AuditEvent::ConfigChanged { setting: "s".into(), value: seq.to_string() };
            let e = AuditEntry::new([1; 48], seq, prev, seq, 0, ev).expect("entry");
            prev = e.digest();
            out.extend_from_slice(&frame_record(e.bytes()));
        }
        out
    }

    #[test]
    fn round_trip_and_every_truncation_is_reported() {
        let f = file(3);
        assert_eq!(parse_entries_file(&f).expect("parse").len(), 3);
        assert_eq!(parse_entries_file(ENTRIES_MAGIC).expect("empty").len(), 0);
        for n in 0..f.len() {
            let boundary = parse_entries_file(&f[..n]).map(|v| v.len());
            // Only record boundaries parse (fewer records); everything else is an error.
            if let Ok(k) = boundary {
                assert_eq!(n, 8 + (f.len() - 8) / 3 * k, "cut at {n}");
            }
        }
        assert_eq!(parse_checkpoints_file(&f).map(|_| ()), Err(DecodeError::BadMagic("checkpoints")));
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            parse_entries_file(&bad),
            Err(DecodeError::Record { index: 2, error, .. }) if matches!(*error, DecodeError::LengthMismatch { .. })
        ));
        let mut long = f;
        long.push(0);
        assert!(matches!(parse_entries_file(&long), Err(DecodeError::Record { index: 3, .. })));
    }
}
