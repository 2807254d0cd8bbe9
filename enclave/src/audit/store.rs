//! The parent's append-only audit directory. This is the one part of [`super`] that does I/O;
//! it runs in the parent (`keygate audit pull` / the proxy, `keygate audit verify | show`),
//! never inside the KRE.
//!
//! ```text
//! DIR/entries.log       entries, in sequence order   (format: super::files)
//! DIR/checkpoints.log   checkpoints, in sequence order
//! DIR/chain-<16 hex>/   the same two files for every later run (chain) collected into DIR
//! ```
//!
//! One directory holds one chain (one KRE run); a history of runs is DIR with the first chain
//! collected into it and each later one in `DIR/chain-<first 8 bytes of its id, hex>`
//! ([`run_dir_name`], [`read_runs`]). Files are created atomically (temporary
//! file, fsync, rename, fsync of the directory) and only ever appended to, each append
//! followed by fsync; entries are made durable before the checkpoints that cover them. An
//! append is refused unless it continues the stored chain exactly, so the parent never
//! stores a broken trail without noticing. One writer per directory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::codec::DecodeError;
use super::event::AuditEntry;
use super::files::{self, CHECKPOINTS_MAGIC, ENTRIES_MAGIC};
use super::{MAX_CHECKPOINT_LEN, MAX_ENTRY_LEN};

/// The entries file's name.
pub const ENTRIES_FILE: &str = "entries.log";
/// The checkpoints file's name.
pub const CHECKPOINTS_FILE: &str = "checkpoints.log";
/// Largest `entries.log` read whole.
pub const MAX_ENTRIES_FILE: u64 = 1 << 30;
/// Largest `checkpoints.log` read whole.
pub const MAX_CHECKPOINTS_FILE: u64 = 256 << 20;
/// Prefix of the subdirectory of each later run in a history directory.
pub const RUN_DIR_PREFIX: &str = "chain-";
/// Most runs read from one history directory.
pub const MAX_RUNS: usize = 4096;

/// Why the directory could not be read or appended to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is larger than the reader accepts.
    #[error("{} is {len} bytes, more than the {max}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A file is malformed (bad magic, torn or malformed record).
    #[error("{}: {error}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: DecodeError,
    },
    /// An entry or checkpoint of another chain than the one stored.
    #[error("seq {seq} belongs to another chain than the one stored in this directory")]
    ForeignChain {
        /// Its sequence number.
        seq: u64,
    },
    /// An entry does not continue the stored sequence.
    #[error("entry seq {found} does not continue the stored chain (expected seq {expected})")]
    Gap {
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// An entry's `prev` is not the digest of the entry before it.
    #[error("entry seq {seq} does not link to the entry before it")]
    BrokenLink {
        /// Its sequence number.
        seq: u64,
    },
    /// An entry with the same sequence number as the stored last one differs from it.
    #[error("entry seq {seq} differs from the stored entry with the same sequence number")]
    Conflict {
        /// Sequence number.
        seq: u64,
    },
    /// A checkpoint covers entries that are not stored.
    #[error("checkpoint for seq {seq} is beyond the last stored entry {last}")]
    CheckpointAhead {
        /// Its sequence number.
        seq: u64,
        /// The last stored entry.
        last: u64,
    },
    /// A checkpoint's head is not the digest of the entry it names.
    #[error("checkpoint for seq {seq} does not match entry {seq}")]
    CheckpointMismatch {
        /// Its sequence number.
        seq: u64,
    },
    /// More runs in a history directory than the reader accepts.
    #[error("{} holds {count} runs, more than {max}", dir.display())]
    TooManyRuns {
        /// The directory.
        dir: PathBuf,
        /// Runs found.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A checkpoint older than the last stored one.
    #[error("checkpoint for seq {seq} is older than the stored checkpoint for seq {stored}")]
    CheckpointOutOfOrder {
        /// Its sequence number.
        seq: u64,
        /// The last stored checkpoint's.
        stored: u64,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// A directory's contents, read whole and strictly parsed (not verified: see
/// [`super::verify_trail`]).
#[derive(Debug, Clone)]
pub struct StoredTrail {
    /// Entries in stored order.
    pub entries: Vec<AuditEntry>,
    /// Checkpoints in stored order.
    pub checkpoints: Vec<Checkpoint>,
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, StoreError> {
    let f = File::open(path).map_err(io("opening", path))?;
    let len = f.metadata().map_err(io("reading metadata of", path))?.len();
    if len > max {
        return Err(StoreError::TooLarge { path: path.to_path_buf(), len, max });
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(max.saturating_add(1)).read_to_end(&mut buf).map_err(io("reading", path))?;
    if u64::try_from(buf.len()).unwrap_or(u64::MAX) > max {
        return Err(StoreError::TooLarge { path: path.to_path_buf(), len: max.saturating_add(1), max });
    }
    Ok(buf)
}

/// Reads `DIR/entries.log` and `DIR/checkpoints.log`. Both must exist and parse completely.
pub fn read_dir(dir: &Path) -> Result<StoredTrail, StoreError> {
    let ep = dir.join(ENTRIES_FILE);
    let cp = dir.join(CHECKPOINTS_FILE);
    let entries = files::parse_entries_file(&read_capped(&ep, MAX_ENTRIES_FILE)?)
        .map_err(|error| StoreError::Format { path: ep.clone(), error })?;
    let checkpoints = files::parse_checkpoints_file(&read_capped(&cp, MAX_CHECKPOINTS_FILE)?)
        .map_err(|error| StoreError::Format { path: cp.clone(), error })?;
    Ok(StoredTrail { entries, checkpoints })
}

/// The subdirectory name of the run with chain `chain_id` in a history directory.
pub fn run_dir_name(chain_id: &[u8; 48]) -> String {
    format!("{RUN_DIR_PREFIX}{}", hex::encode(&chain_id[..8]))
}

/// Every run stored in the history directory `dir`: `dir` itself when it holds
/// `entries.log`, then each `dir/chain-*` subdirectory holding one, by name. Each is read as
/// [`read_dir`] reads it. At most [`MAX_RUNS`].
pub fn read_runs(dir: &Path) -> Result<Vec<(PathBuf, StoredTrail)>, StoreError> {
    let mut dirs = Vec::new();
    if dir.join(ENTRIES_FILE).exists() {
        dirs.push(dir.to_path_buf());
    }
    let mut subs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("listing", dir))? {
        let entry = entry.map_err(io("listing", dir))?;
        let is_run = entry.file_name().to_str().is_some_and(|n| n.starts_with(RUN_DIR_PREFIX));
        if is_run && entry.path().join(ENTRIES_FILE).exists() {
            subs.push(entry.path());
        }
    }
    subs.sort();
    dirs.extend(subs);
    if dirs.len() > MAX_RUNS {
        return Err(StoreError::TooManyRuns { dir: dir.to_path_buf(), count: dirs.len(), max: MAX_RUNS });
    }
    if dirs.is_empty() {
        // As for a single run: name the file that is not there.
        let path = dir.join(ENTRIES_FILE);
        return Err(StoreError::Io {
            op: "opening",
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no audit trail in this directory"),
        });
    }
    dirs.into_iter().map(|d| read_dir(&d).map(|t| (d, t))).collect()
}

/// What [`append_to_dir`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendReport {
    /// Entries written.
    pub entries_written: usize,
    /// Entries already stored (a repeated pull), skipped.
    pub entries_skipped: usize,
    /// Checkpoints written.
    pub checkpoints_written: usize,
    /// Checkpoints already stored, skipped.
    pub checkpoints_skipped: usize,
    /// The last stored sequence number: what the parent acknowledges to the KRE.
    pub last_seq: u64,
}

/// Creates `path` holding only `magic`, atomically, if it does not exist.
fn ensure_file(dir: &Path, name: &str, magic: &[u8; 8]) -> Result<PathBuf, StoreError> {
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    // Never replaced: a writer that raced this one has created the same header.
    let once = crate::atomic::WriteOptions { mode: 0o666, replace: false };
    match crate::atomic::write_file_with(&path, magic, once) {
        Ok(()) | Err(crate::atomic::AtomicWriteError::Exists(_)) => Ok(path),
        Err(crate::atomic::AtomicWriteError::Io { step, source, .. }) => {
            Err(StoreError::Io { op: step_op(step), path, source })
        }
        Err(crate::atomic::AtomicWriteError::NotAFile(_)) => {
            Err(StoreError::Io { op: "creating", path, source: std::io::ErrorKind::InvalidInput.into() })
        }
    }
}

/// An atomic write's failed step, as [`StoreError::Io`] names what was being done.
fn step_op(step: crate::atomic::Step) -> &'static str {
    use crate::atomic::Step;
    match step {
        Step::CreateTemporary => "creating a temporary file for",
        Step::Write => "writing",
        Step::Sync => "syncing",
        Step::Rename => "renaming into place",
        Step::SyncDirectory => "syncing the directory of",
    }
}

/// Reads the last record of a framed file (found from its trailing length), if any.
fn last_record(path: &Path, magic: &[u8; 8], max_len: usize) -> Result<Option<Vec<u8>>, StoreError> {
    let fmt = |error| StoreError::Format { path: path.to_path_buf(), error };
    let mut f = File::open(path).map_err(io("opening", path))?;
    let len = f.metadata().map_err(io("reading metadata of", path))?.len();
    let mut head = [0u8; 8];
    if len < 8 {
        return Err(fmt(DecodeError::BadMagic(if magic == ENTRIES_MAGIC { "entries" } else { "checkpoints" })));
    }
    f.read_exact(&mut head).map_err(io("reading", path))?;
    if &head != magic {
        return Err(fmt(DecodeError::BadMagic(if magic == ENTRIES_MAGIC { "entries" } else { "checkpoints" })));
    }
    if len == 8 {
        return Ok(None);
    }
    let torn = |what| fmt(DecodeError::Truncated(what));
    if len < 16 {
        return Err(torn("last record"));
    }
    let mut tail = [0u8; 4];
    f.seek(SeekFrom::Start(len - 4)).map_err(io("seeking in", path))?;
    f.read_exact(&mut tail).map_err(io("reading", path))?;
    let body_len = u64::from(u32::from_be_bytes(tail));
    if body_len > u64::try_from(max_len).unwrap_or(u64::MAX) || body_len + 16 > len {
        return Err(torn("last record"));
    }
    let start = len - 8 - body_len;
    f.seek(SeekFrom::Start(start)).map_err(io("seeking in", path))?;
    let mut rec = vec![0u8; usize::try_from(body_len + 4).unwrap_or(0)];
    f.read_exact(&mut rec).map_err(io("reading", path))?;
    let head_len = u64::from(u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]));
    if head_len != body_len {
        return Err(torn("last record"));
    }
    Ok(Some(rec.split_off(4)))
}

fn append_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut f = OpenOptions::new().append(true).open(path).map_err(io("opening for append", path))?;
    f.write_all(bytes).map_err(io("appending to", path))?;
    f.sync_all().map_err(io("syncing", path))
}

/// Appends pulled `entries` and `checkpoints` (each in sequence order) to `dir`, creating it
/// if needed. Entries already stored (sequence numbers up to the stored last one) are
/// skipped; the rest must continue the stored chain exactly. Checkpoints must belong to the
/// same chain and cover only stored entries. Entries are fsynced before checkpoints. Returns
/// the last stored sequence number, which the caller acknowledges to the KRE.
pub fn append_to_dir(
    dir: &Path,
    entries: &[AuditEntry],
    checkpoints: &[Checkpoint],
) -> Result<AppendReport, StoreError> {
    fs::create_dir_all(dir).map_err(io("creating directory", dir))?;
    let ep = ensure_file(dir, ENTRIES_FILE, ENTRIES_MAGIC)?;
    let cp = ensure_file(dir, CHECKPOINTS_FILE, CHECKPOINTS_MAGIC)?;
    let fmt = |path: &Path, error| StoreError::Format { path: path.to_path_buf(), error };

    let stored_last = match last_record(&ep, ENTRIES_MAGIC, MAX_ENTRY_LEN)? {
        Some(b) => Some(AuditEntry::decode(&b).map_err(|e| fmt(&ep, e))?),
        None => None,
    };
    let stored_cp = match last_record(&cp, CHECKPOINTS_MAGIC, MAX_CHECKPOINT_LEN)? {
        Some(b) => Some(Checkpoint::decode(&b).map_err(|e| fmt(&cp, e))?),
        None => None,
    };
    let plan = plan_append(stored_last.as_ref(), stored_cp.as_ref(), entries, checkpoints)?;
    let out: Vec<u8> = plan.entries.iter().flat_map(|e| files::frame_record(e.bytes())).collect();
    let cp_out: Vec<u8> = plan.checkpoints.iter().flat_map(|c| files::frame_record(c.bytes())).collect();
    let report = plan.report;

    // Entries durable first, then the checkpoints that cover them.
    append_file(&ep, &out)?;
    append_file(&cp, &cp_out)?;
    Ok(report)
}

/// What an append writes: the pulled entries and checkpoints that continue the stored
/// chain, in order (entries first), and the report (counts, the last stored seq after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendPlan<'a> {
    /// Entries to write, in sequence order.
    pub entries: Vec<&'a AuditEntry>,
    /// Checkpoints to write, after the entries.
    pub checkpoints: Vec<&'a Checkpoint>,
    /// What the append does once these are written.
    pub report: AppendReport,
}

/// The chain rule of every audit store (this directory, the parent's etcd store), without
/// I/O: given the stored last entry and last checkpoint (if any) and the pulled `entries`
/// and `checkpoints` (each in sequence order), which to write. Entries already stored
/// (sequence numbers up to the stored last one, the last one byte for byte) are skipped; the
/// rest must continue the stored chain exactly. Checkpoints must belong to the same chain,
/// cover only stored (or planned) entries, not go back, and name the digest of their entry
/// when it is known here; the stored last checkpoint again is skipped.
pub fn plan_append<'a>(
    stored_last: Option<&AuditEntry>,
    stored_cp: Option<&Checkpoint>,
    entries: &'a [AuditEntry],
    checkpoints: &'a [Checkpoint],
) -> Result<AppendPlan<'a>, StoreError> {
    let mut chain: Option<[u8; 48]> = stored_last.map(|e| *e.chain_id());
    let mut last_seq = stored_last.map_or(0, AuditEntry::seq);
    let mut last_digest = stored_last.map(AuditEntry::digest);
    // Digests of entries known in this call, for checking checkpoint heads.
    let mut known: Vec<(u64, [u8; 48])> = stored_last.iter().map(|e| (e.seq(), e.digest())).collect();

    let mut report = AppendReport::default();
    let mut out = Vec::new();
    for e in entries {
        let chain_id = *chain.get_or_insert(*e.chain_id());
        if *e.chain_id() != chain_id {
            return Err(StoreError::ForeignChain { seq: e.seq() });
        }
        if e.seq() < last_seq {
            report.entries_skipped += 1;
            continue;
        }
        if e.seq() == last_seq {
            if stored_last.is_some_and(|s| s.bytes() == e.bytes()) {
                report.entries_skipped += 1;
                continue;
            }
            return Err(StoreError::Conflict { seq: e.seq() });
        }
        if e.seq() != last_seq + 1 {
            return Err(StoreError::Gap { expected: last_seq + 1, found: e.seq() });
        }
        if *e.prev() != last_digest.unwrap_or(chain_id) {
            return Err(StoreError::BrokenLink { seq: e.seq() });
        }
        out.push(e);
        last_seq = e.seq();
        last_digest = Some(e.digest());
        known.push((e.seq(), e.digest()));
        report.entries_written += 1;
    }

    let mut cp_out = Vec::new();
    let mut cp_seq = stored_cp.map_or(0, Checkpoint::seq);
    for c in checkpoints {
        if stored_cp.is_some_and(|s| s.bytes() == c.bytes()) {
            report.checkpoints_skipped += 1;
            continue;
        }
        if chain.is_some_and(|id| id != *c.chain_id()) || chain.is_none() {
            return Err(StoreError::ForeignChain { seq: c.seq() });
        }
        if c.seq() > last_seq {
            return Err(StoreError::CheckpointAhead { seq: c.seq(), last: last_seq });
        }
        if c.seq() < cp_seq {
            return Err(StoreError::CheckpointOutOfOrder { seq: c.seq(), stored: cp_seq });
        }
        if known.iter().any(|(s, d)| *s == c.seq() && d != c.head()) {
            return Err(StoreError::CheckpointMismatch { seq: c.seq() });
        }
        cp_seq = c.seq();
        cp_out.push(c);
        report.checkpoints_written += 1;
    }
    report.last_seq = last_seq;
    Ok(AppendPlan { entries: out, checkpoints: cp_out, report })
}

#[cfg(test)]
mod plan_tests;
