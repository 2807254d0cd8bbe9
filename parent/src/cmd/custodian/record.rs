//! The custodian's local record (`KEY.pem.record.json`): what `keygate custodian unseal`
//! remembers between ceremonies, one entry per custodian set — the shares file it acted on and
//! the (generation, blob digest) it unsealed last.
//!
//! What this module decides: only how the record is read and written. Every decision about
//! an offer against the record is the enclave crate's pure
//! [`keygate_enclave::peer::custodian::check_record`]. It trusts the local file system of the
//! custodian's own machine. A record that cannot be read is an error, never an empty record: a
//! custodian that forgot what it unsealed would accept a rollback or a fork. Writes are atomic
//! (a temporary file, fsync, rename, fsync of the directory), so a crash leaves the old record
//! or the new one, never a torn one.

use std::path::{Path, PathBuf};

use keygate_enclave::atomic::{self, AtomicWriteError};

use keygate_enclave::peer::custodian::CustodianRecord;

/// Largest record file read (a record is about 400 bytes per custodian set).
pub(crate) const MAX_RECORD_FILE: u64 = 1024 * 1024;

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The file exists but could not be read.
    #[error("reading the custodian record {}: {source}", path.display())]
    Read {
        /// The record file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_RECORD_FILE`].
    #[error("the custodian record {} is {len} bytes; the limit is {MAX_RECORD_FILE}", path.display())]
    TooLarge {
        /// The record file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The file is not a valid record. It is left as it is: restore it from a backup (moving it
    /// away makes this custodian forget what it unsealed).
    #[error("the custodian record {} is corrupt ({problem}); restore it from a backup — without it this custodian cannot refuse a rollback", path.display())]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        problem: Problem,
    },
    /// The new record could not be encoded.
    #[error("encoding the custodian record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The new record could not be written durably.
    #[error("the custodian record: {0}")]
    Write(#[from] AtomicWriteError),
}

/// What is wrong with a record file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Problem {
    /// Not a JSON list of entries (serde's description).
    #[error("not a record: {0}")]
    Syntax(String),
    /// A digest of an entry is not 96 hex digits.
    #[error("{field} of set {set:?} is not a SHA-384 in hex")]
    Digest {
        /// Which digest.
        field: &'static str,
        /// The entry's set digest, as the file has it.
        set: String,
    },
    /// Two entries for one custodian set.
    #[error("two entries for the custodian set {0}")]
    Duplicate(String),
}

fn is_digest_hex(s: &str) -> bool {
    s.len() == 96 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks one entry: every digest is 96 hex digits.
fn check_entry(r: &CustodianRecord) -> Result<(), Problem> {
    let fields = [("set_digest", Some(&r.set_digest)), ("shares_sha384", Some(&r.shares_sha384))];
    for (field, value) in fields.into_iter().chain([("blob_sha384", r.blob_sha384.as_ref())]) {
        if value.is_some_and(|v| !is_digest_hex(v)) {
            return Err(Problem::Digest { field, set: r.set_digest.clone() });
        }
    }
    Ok(())
}

/// Reads the record at `path`: no file is an empty record (a custodian that never unsealed);
/// anything that is not a valid record is [`RecordError::Corrupt`].
pub(crate) fn load(path: &Path) -> Result<Vec<CustodianRecord>, RecordError> {
    let read = |source| RecordError::Read { path: path.to_path_buf(), source };
    let corrupt = |problem: Problem| RecordError::Corrupt { path: path.to_path_buf(), problem };
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read(e)),
    };
    if len > MAX_RECORD_FILE {
        return Err(RecordError::TooLarge { path: path.to_path_buf(), len });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    let records: Vec<CustodianRecord> =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(Problem::Syntax(e.to_string())))?;
    for (i, r) in records.iter().enumerate() {
        check_entry(r).map_err(&corrupt)?;
        if records[..i].iter().any(|o| o.set_digest == r.set_digest) {
            return Err(corrupt(Problem::Duplicate(r.set_digest.clone())));
        }
    }
    Ok(records)
}

/// `records` with `new` in place of the entry for its set.
pub(crate) fn updated(records: &[CustodianRecord], new: &CustodianRecord) -> Vec<CustodianRecord> {
    let mut out: Vec<CustodianRecord> = records.iter().filter(|r| r.set_digest != new.set_digest).cloned().collect();
    out.push(new.clone());
    out
}

/// Writes `records` to `path` atomically and durably (the one atomic-write helper: a
/// temporary file beside it, fsync, rename, fsync of the directory).
pub(crate) fn store(path: &Path, records: &[CustodianRecord]) -> Result<(), RecordError> {
    let json = serde_json::to_vec_pretty(records)?;
    Ok(atomic::write_file(path, &json)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(set: u8, generation: u64, blob: Option<u8>) -> CustodianRecord {
        CustodianRecord {
            set_digest: hex::encode([set; 48]),
            shares_sha384: hex::encode([0x5a; 48]),
            highest_generation: generation,
            blob_sha384: blob.map(|b| hex::encode([b; 48])),
        }
    }

    fn dir() -> keygate_tests::TempDir {
        keygate_tests::TempDir::new("keygate-custodian-record").expect("mkdir")
    }

    #[test]
    fn a_missing_record_is_empty_and_a_stored_one_reads_back() {
        let d = dir();
        let p = d.path().join("c1.pem.record.json");
        assert!(load(&p).expect("missing").is_empty());
        let records = vec![rec(1, 3, Some(0xa)), rec(2, 9, None)];
        store(&p, &records).expect("store");
        assert_eq!(load(&p).expect("load"), records);
        assert!(!d.path().join("c1.pem.record.json.tmp").exists(), "no temporary file left");
        // An update replaces only its set's entry.
        let next = updated(&records, &rec(1, 4, Some(0xb)));
        store(&p, &next).expect("store");
        assert_eq!(load(&p).expect("load"), vec![rec(2, 9, None), rec(1, 4, Some(0xb))]);
    }

    #[test]
    fn a_stale_temporary_file_does_not_matter() {
        let d = dir();
        let p = d.path().join("k.record.json");
        std::fs::write(d.path().join("k.record.json.tmp"), b"torn {").expect("tmp");
        store(&p, &[rec(1, 1, Some(1))]).expect("store over a stale tmp");
        assert_eq!(load(&p).expect("load"), vec![rec(1, 1, Some(1))]);
    }

    #[test]
    fn a_corrupt_record_is_a_typed_error_never_an_empty_record() {
        let d = dir();
        let p = d.path().join("k.record.json");
        let good = serde_json::to_string(&[rec(1, 1, Some(1))]).expect("json");
        let dup = serde_json::to_string(&[rec(1, 1, Some(1)), rec(1, 2, None)]).expect("json");
        let cases: Vec<(String, &str)> = vec![
            (good[..good.len() - 2].to_string(), "EOF"),
            (String::new(), "EOF"),
            ("{}".into(), "expected a sequence"),
            (r#"[{"set_digest":"aa","shares_sha384":"bb","highest_generation":1}]"#.into(), "not a SHA-384"),
            (good.replace("highest_generation\":1", "highest_generation\":-1"), "invalid value"),
            (good.replacen("0101", "zz01", 1), "not a SHA-384"),
            (good.replace(&hex::encode([1u8; 48])[..], &hex::encode([1u8; 47])), "not a SHA-384"),
            (dup, "two entries"),
        ];
        for (text, want) in cases {
            std::fs::write(&p, &text).expect("write");
            let err = load(&p).expect_err("corrupt");
            assert!(
                matches!(&err, RecordError::Corrupt { problem, .. } if problem.to_string().contains(want)),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("restore it from a backup"), "{err}");
        }
        let f = std::fs::File::create(&p).expect("create");
        f.set_len(MAX_RECORD_FILE + 1).expect("len");
        assert!(matches!(load(&p), Err(RecordError::TooLarge { len, .. }) if len == MAX_RECORD_FILE + 1));
        // A record that cannot be written is an error too (its directory does not exist).
        let nowhere = d.path().join("missing-dir").join("k.record.json");
        assert!(matches!(store(&nowhere, &[]), Err(RecordError::Write { .. })));
    }
}
