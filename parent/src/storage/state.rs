//! Durable storage of the KRE's sealed state on the parent.
//!
//! What this module decides: how a sealed blob ([`keygate_enclave::state::sealed`]) is written so
//! that a crash at any point leaves an intact generation on disk, and which stored
//! generation is handed back to the KRE after a restart. What it trusts: nothing it reads;
//! every file is checked with [`sealed::peek_header`] (lengths, trailing SHA-384) before it
//! is considered intact. Authenticity is the KRE's business (AEAD under the state key); the
//! parent only keeps torn and corrupted files from being chosen over intact ones.
//!
//! ```text
//! DIR/state.current    the newest generation
//! DIR/state.previous   the generation before it (the fallback for a damaged current)
//! DIR/state.tmp        a write in progress; never read
//! DIR/state.lock       held (flock, exclusive) by whichever process stores or loads
//! ```
//!
//! Two processes may work on one directory (a `state sync --follow` loop and a one-shot
//! `state sync`, or a custodian's `unseal` beside them): each [`StateStore::store`] and
//! [`StateStore::load`] holds an exclusive lock on `state.lock` for its whole run, waiting at
//! most [`LOCK_WAIT`] for another, so one writer's `state.tmp` is never renamed by another
//! and the generation checks see what the last writer left.
//!
//! [`StateStore::store`]: check the blob → write `state.tmp` → fsync it → rename
//! `state.current` to `state.previous` (only if the current file is intact: a damaged one
//! never displaces an intact previous) → rename `state.tmp` to `state.current` → fsync the
//! directory → read `state.current` back and compare. Only when `store` returns `Ok` may the
//! KRE commit the generation (two-phase commit, docs/durability.md).
//!
//! [`StateStore::load`]: the newest intact generation of the two files; a torn or corrupted
//! `state.current` falls back to `state.previous` (and says so in [`Loaded::skipped`]); a
//! result older than the caller's minimum (the highest generation acknowledged) is refused,
//! never returned.
//!
//! File operations go through [`StateFs`] so the tests can inject a failure or a crash at
//! every step ([`DirFs`] is the real one).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keygate_enclave::state::sealed::{self, SealedError, SealedHeader};

/// The newest generation.
pub(crate) const CURRENT: &str = "state.current";
/// The generation before it.
pub(crate) const PREVIOUS: &str = "state.previous";
/// A write in progress.
pub(crate) const TEMP: &str = "state.tmp";
/// The lock file: held exclusively for each store and load.
pub(crate) const LOCK: &str = "state.lock";
/// The longest a store or load waits for another process's to finish.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The file operations the store needs, each one step that a test can fail or crash.
pub(crate) trait StateFs {
    /// Held while one store or load runs; dropping it lets another process in.
    type Guard;
    /// Exclusive use of the directory against other processes, waiting at most `wait`.
    fn lock(&mut self, wait: Duration) -> io::Result<Self::Guard>;
    /// Creates or truncates `name` (mode 0600) and writes all of `bytes`.
    fn write_file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// fsync of `name`'s data and metadata.
    fn sync_file(&mut self, name: &str) -> io::Result<()>;
    /// Atomic rename within the directory (replaces `to`).
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;
    /// fsync of the directory (makes renames durable).
    fn sync_dir(&mut self) -> io::Result<()>;
    /// The file's bytes, at most `max + 1` of them (so an oversized file is seen as such);
    /// `None` if it does not exist.
    fn read_file(&mut self, name: &str, max: usize) -> io::Result<Option<Vec<u8>>>;
}

/// The real filesystem: one directory.
#[derive(Debug)]
pub(crate) struct DirFs {
    dir: PathBuf,
}

impl DirFs {
    /// The store in `dir` (which must exist).
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl StateFs for DirFs {
    /// The open lock file: the kernel drops the flock when it closes.
    type Guard = File;

    fn lock(&mut self, wait: Duration) -> io::Result<File> {
        let path = self.dir.join(LOCK);
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path)?;
        let deadline = Instant::now() + wait;
        loop {
            match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(f),
                Err(e) if e == rustix::io::Errno::WOULDBLOCK && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("another process has held {} for {} s", path.display(), wait.as_secs()),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn write_file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(self.dir.join(name))?;
        f.write_all(bytes)?;
        f.flush()
    }

    fn sync_file(&mut self, name: &str) -> io::Result<()> {
        // fsync applies to the file, whichever descriptor it is called on.
        OpenOptions::new().write(true).open(self.dir.join(name))?.sync_all()
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn read_file(&mut self, name: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
        let f = match File::open(self.dir.join(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
        f.take(limit).read_to_end(&mut out)?;
        Ok(Some(out))
    }
}

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// `state.current`.
    Current,
    /// `state.previous`.
    Previous,
}

impl Slot {
    fn file(self) -> &'static str {
        match self {
            Slot::Current => CURRENT,
            Slot::Previous => PREVIOUS,
        }
    }
}

/// Why a slot was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotProblem {
    /// The file does not exist.
    Missing,
    /// The file could not be read.
    Unreadable(io::ErrorKind),
    /// The file is torn, corrupted or not a sealed state.
    Damaged(SealedError),
    /// An intact sealed state under another generation's name (the etcd store's keys name
    /// their generation; the directory store never reports this).
    WrongGeneration {
        /// The generation the key names.
        named: u64,
        /// The generation the blob's header holds.
        holds: u64,
    },
}

impl fmt::Display for SlotProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotProblem::Missing => f.write_str("missing"),
            SlotProblem::Unreadable(k) => write!(f, "unreadable ({k})"),
            SlotProblem::Damaged(e) => write!(f, "damaged ({e})"),
            SlotProblem::WrongGeneration { named, holds } => {
                write!(f, "holds generation {holds} under the name of generation {named}")
            }
        }
    }
}

/// The store step an I/O error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Taking `state.lock` (another process stores or loads, or the directory is unusable).
    Lock,
    /// Writing `state.tmp`.
    WriteTemp,
    /// fsync of `state.tmp`.
    SyncTemp,
    /// Renaming `state.current` to `state.previous`.
    RenameCurrentToPrevious,
    /// Renaming `state.tmp` to `state.current`.
    RenameTempToCurrent,
    /// fsync of the directory.
    SyncDir,
    /// Reading `state.current` back.
    ReadBack,
}

/// Why a store or a load failed. Carries no blob content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StateStoreError {
    /// A file operation failed; the generation is not stored (do not commit it).
    #[error("state store: {step:?} failed: {source}")]
    Io {
        /// The step.
        step: Step,
        /// The error.
        source: io::Error,
    },
    /// The blob to store is not an intact sealed state.
    #[error("refusing to store a blob that is not an intact sealed state: {0}")]
    InvalidBlob(SealedError),
    /// The blob is older than what is stored.
    #[error("refusing to store generation {generation}: generation {stored} is already stored")]
    StaleGeneration {
        /// The blob's generation.
        generation: u64,
        /// The stored generation.
        stored: u64,
    },
    /// A different blob with the same generation is stored.
    #[error("a different sealed state with generation {generation} is already stored")]
    GenerationConflict {
        /// The generation.
        generation: u64,
    },
    /// What was read back or found is not usable (both stores refuse these alike).
    #[error(transparent)]
    Unusable(#[from] Unusable),
}

/// Why a stored generation is not handed back, or a write not trusted: the refusals the
/// directory store and the etcd store share.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unusable {
    /// What was read back is not what was written.
    #[error("sealed state read back differs from what was written")]
    ReadBackMismatch,
    /// Neither slot holds an intact state.
    #[error("no intact sealed state: current {current}, previous {previous}")]
    NoIntactState {
        /// What is wrong with the current generation.
        current: SlotProblem,
        /// What is wrong with the previous one.
        previous: SlotProblem,
    },
    /// The newest intact state is older than the minimum acknowledged generation.
    #[error("newest intact sealed state is generation {found}, older than the acknowledged {min}: refused")]
    Rollback {
        /// The newest intact stored generation.
        found: u64,
        /// The minimum the caller accepts.
        min: u64,
    },
}

/// What [`StateStore::load`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    /// The sealed blob (intact; its authenticity is checked by the KRE).
    pub(crate) blob: Vec<u8>,
    /// Its header.
    pub(crate) header: SealedHeader,
    /// Which file it came from.
    pub(crate) slot: Slot,
    /// Slots that were not used and why (a fallback to `Previous` is listed here).
    pub(crate) skipped: Vec<(Slot, SlotProblem)>,
}

type SlotRead = Result<(Vec<u8>, SealedHeader), SlotProblem>;

/// The sealed state directory.
#[derive(Debug)]
pub(crate) struct StateStore<F: StateFs> {
    pub(super) fs: F,
}

impl<F: StateFs> StateStore<F> {
    /// A store over `fs`.
    pub(crate) fn new(fs: F) -> Self {
        Self { fs }
    }

    fn read_slot(&mut self, slot: Slot) -> SlotRead {
        match self.fs.read_file(slot.file(), sealed::MAX_BLOB) {
            Ok(None) => Err(SlotProblem::Missing),
            Err(e) => Err(SlotProblem::Unreadable(e.kind())),
            Ok(Some(blob)) => match sealed::peek_header(&blob) {
                Ok(h) => Ok((blob, h)),
                Err(e) => Err(SlotProblem::Damaged(e)),
            },
        }
    }

    /// Stores `blob` durably as the newest generation and returns its generation. Only
    /// after `Ok` may the KRE commit it. Storing the generation that is already current
    /// with the same bytes is a no-op (a retry); anything older is refused.
    pub(crate) fn store(&mut self, blob: &[u8]) -> Result<u64, StateStoreError> {
        let header = sealed::peek_header(blob).map_err(StateStoreError::InvalidBlob)?;
        let _held = self.fs.lock(LOCK_WAIT).map_err(|source| StateStoreError::Io { step: Step::Lock, source })?;
        let generation = header.generation;
        let current = self.read_slot(Slot::Current);
        let previous = self.read_slot(Slot::Previous);
        if let Some((stored_blob, stored)) = [&current, &previous]
            .into_iter()
            .filter_map(|r| r.as_ref().ok())
            .max_by_key(|(_, h)| h.generation)
            .map(|(b, h)| (b, h.generation))
        {
            if generation < stored {
                return Err(StateStoreError::StaleGeneration { generation, stored });
            }
            if generation == stored {
                if stored_blob.as_slice() == blob && current.as_ref().is_ok_and(|(_, h)| h.generation == generation) {
                    return Ok(generation);
                }
                if stored_blob.as_slice() != blob {
                    return Err(StateStoreError::GenerationConflict { generation });
                }
                // Same bytes, but only in `state.previous`: write it again as current.
            }
        }
        let failed = |step: Step| move |source: io::Error| StateStoreError::Io { step, source };
        self.fs.write_file(TEMP, blob).map_err(failed(Step::WriteTemp))?;
        self.fs.sync_file(TEMP).map_err(failed(Step::SyncTemp))?;
        if current.is_ok() {
            // Keep the intact current as the fallback. A damaged current is simply replaced,
            // so it can never displace an intact previous.
            self.fs.rename(CURRENT, PREVIOUS).map_err(failed(Step::RenameCurrentToPrevious))?;
        }
        self.fs.rename(TEMP, CURRENT).map_err(failed(Step::RenameTempToCurrent))?;
        self.fs.sync_dir().map_err(failed(Step::SyncDir))?;
        let back = self.fs.read_file(CURRENT, sealed::MAX_BLOB).map_err(failed(Step::ReadBack))?;
        if back.as_deref() != Some(blob) {
            return Err(Unusable::ReadBackMismatch.into());
        }
        Ok(generation)
    }

    /// The newest intact stored generation, refusing anything older than `min_generation`.
    /// `Ok(None)` only when nothing was ever stored and `min_generation` is 0 (genesis).
    pub(crate) fn load(&mut self, min_generation: u64) -> Result<Option<Loaded>, StateStoreError> {
        let _held = self.fs.lock(LOCK_WAIT).map_err(|source| StateStoreError::Io { step: Step::Lock, source })?;
        let current = self.read_slot(Slot::Current);
        let previous = self.read_slot(Slot::Previous);
        let (slot, (blob, header), other) = match (current, previous) {
            (Err(SlotProblem::Missing), Err(SlotProblem::Missing)) if min_generation == 0 => return Ok(None),
            (Err(c), Err(p)) => return Err(Unusable::NoIntactState { current: c, previous: p }.into()),
            (Ok(c), Err(p)) => (Slot::Current, c, Some((Slot::Previous, p))),
            (Err(c), Ok(p)) => (Slot::Previous, p, Some((Slot::Current, c))),
            // Both intact: the newer one (current on a tie).
            (Ok(c), Ok(p)) => {
                if p.1.generation > c.1.generation {
                    (Slot::Previous, p, None)
                } else {
                    (Slot::Current, c, None)
                }
            }
        };
        if header.generation < min_generation {
            return Err(Unusable::Rollback { found: header.generation, min: min_generation }.into());
        }
        // A missing previous is normal (only one generation stored yet); not worth reporting.
        let skipped = other.into_iter().filter(|(_, p)| *p != SlotProblem::Missing || slot == Slot::Previous).collect();
        Ok(Some(Loaded { blob, header, slot, skipped }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::crash::{blob, disk_with, loaded_gen, Disk, Fault, SimFs, Survives, ALL_SURVIVES};

    // ---------- the exhaustive crash/failure sweep ----------

    /// Injects every fault at every file operation of one `store` (of generation 3 over a disk
    /// holding 1 and 2, and of generation 1 over an empty disk), then for a crash every way the
    /// unsynced state can survive it, and checks after "restart": an intact generation loads,
    /// it is the new one if `store` returned Ok, it is never older than the last acknowledged
    /// one, and its bytes are exactly the ones stored for that generation.
    #[test]
    fn every_failure_at_every_step_keeps_the_newest_committed_generation() {
        let faults = [Fault::DiskFull, Fault::IoError, Fault::Crash, Fault::TornWriteCrash, Fault::CorruptRead];
        let mut points = 0usize;
        let mut scenarios = 0usize;
        for (history, new_gen) in [(vec![1u64, 2], 3u64), (vec![], 1), (vec![1], 2)] {
            let acked = history.last().copied().unwrap_or(0);
            let base = disk_with(&history);
            // Count the operations of a clean store.
            let mut clean = StateStore::new(SimFs::new(base.clone()));
            clean.store(&blob(new_gen)).expect("clean store");
            let n_ops = clean.fs.ops;
            for at in 0..=n_ops {
                for fault in faults {
                    let mut fs = SimFs::new(base.clone());
                    fs.plan = Some((at, fault));
                    let mut s = StateStore::new(fs);
                    let res = s.store(&blob(new_gen));
                    if !s.fs.fired {
                        // `at == n_ops`: the fault lands after the store; covered as a crash
                        // after success below.
                        assert!(res.is_ok());
                    }
                    points += 1;
                    let committed = if res.is_ok() { new_gen } else { acked };
                    let check = |disk: Disk, what: &str| {
                        let got = loaded_gen(disk, committed)
                            .unwrap_or_else(|e| panic!("{what}: at {at} {fault:?}: load failed: {e}"));
                        let (g, b) = match got {
                            Some(x) => x,
                            None => {
                                assert_eq!(committed, 0, "{what}: nothing loaded after a commit");
                                return;
                            }
                        };
                        assert!(g >= committed && g <= new_gen, "{what}: at {at} {fault:?}: loaded {g}");
                        assert_eq!(b, blob(g), "{what}: bytes of generation {g}");
                    };
                    let disk = s.fs.disk.clone();
                    if !s.fs.crashed {
                        // The process goes on: what it sees now, and a crash right after.
                        check(disk.clone(), "running");
                        scenarios += 1;
                    }
                    for survives in ALL_SURVIVES {
                        check(disk.after_crash(survives), &format!("{survives:?}"));
                        scenarios += 1;
                    }
                    // After the failure, a retry (after restart) succeeds and is durable.
                    for survives in ALL_SURVIVES {
                        let mut again = StateStore::new(SimFs::new(disk.after_crash(survives)));
                        assert_eq!(again.store(&blob(new_gen)).expect("retry"), new_gen);
                        let after = again.fs.disk.after_crash(Survives::DurableOnly);
                        assert_eq!(loaded_gen(after, new_gen).expect("load").map(|x| x.0), Some(new_gen));
                    }
                }
            }
        }
        // 3 histories × (ops + 1) positions × 5 faults; each checked over up to 6 outcomes.
        eprintln!("state_store: {points} injection points, {scenarios} crash/continue outcomes checked");
        assert!(points >= 100, "{points}");
    }

    // ---------- targeted cases ----------

    #[test]
    fn corrupted_or_torn_current_falls_back_to_previous() {
        type Damage = (&'static str, fn(&mut Vec<u8>), SealedError);
        let damages: [Damage; 4] = [
            ("bit flip", |v| v[100] ^= 1, SealedError::DigestMismatch),
            ("torn", |v| v.truncate(v.len() - 10), SealedError::Truncated { len: 0, need: 0 }),
            ("emptied", |v| v.clear(), SealedError::Truncated { len: 0, need: 0 }),
            ("garbage", |v| v.iter_mut().for_each(|b| *b = 0), SealedError::BadMagic),
        ];
        for (what, damage, want) in damages {
            let mut disk = disk_with(&[1, 2]);
            disk.damage(CURRENT, damage);
            let mut s = StateStore::new(SimFs::new(disk.clone()));
            let l = s.load(1).expect(what).expect("some");
            assert_eq!((l.slot, l.header.generation), (Slot::Previous, 1), "{what}");
            let [(Slot::Current, SlotProblem::Damaged(e))] = l.skipped.as_slice() else { panic!("{what}: {l:?}") };
            assert_eq!(std::mem::discriminant(e), std::mem::discriminant(&want), "{what}");
            // But not if generation 2 was acknowledged: no silent rollback.
            assert!(
                matches!(s.load(2), Err(StateStoreError::Unusable(Unusable::Rollback { found: 1, min: 2 }))),
                "{what}"
            );
            // Storing generation 3 replaces the damaged current and keeps the intact previous.
            assert_eq!(s.store(&blob(3)).expect("store"), 3);
            let d = s.fs.disk.after_crash(Survives::DurableOnly);
            assert_eq!(d.slot(PREVIOUS), Some(&blob(1)), "{what}");
            assert_eq!(d.slot(CURRENT), Some(&blob(3)), "{what}");
        }
    }

    #[test]
    fn both_damaged_missing_and_genesis() {
        let mut disk = disk_with(&[1, 2]);
        disk.damage(CURRENT, |v| v[5] ^= 1);
        disk.damage(PREVIOUS, |v| v.truncate(3));
        let err = loaded_gen(disk, 0).expect_err("both damaged");
        assert!(matches!(
            err,
            StateStoreError::Unusable(Unusable::NoIntactState {
                current: SlotProblem::Damaged(SealedError::BadMagic),
                previous: SlotProblem::Damaged(SealedError::Truncated { .. })
            })
        ));
        assert!(!format!("{err}").is_empty());
        // Nothing stored: genesis only if nothing was ever acknowledged.
        assert_eq!(loaded_gen(Disk::default(), 0).expect("genesis"), None);
        assert!(matches!(
            loaded_gen(Disk::default(), 1),
            Err(StateStoreError::Unusable(Unusable::NoIntactState {
                current: SlotProblem::Missing,
                previous: SlotProblem::Missing
            }))
        ));
        // Only a previous file (crash between the two renames): it loads.
        let mut disk = disk_with(&[1, 2]);
        let i = disk.v_dir.remove(CURRENT).expect("current");
        disk.d_dir.remove(CURRENT);
        disk.v_data.remove(&i);
        assert_eq!(loaded_gen(disk, 1).expect("load").map(|x| x.0), Some(1));
    }

    #[test]
    fn store_refuses_stale_conflicting_and_invalid_blobs() {
        let mut s = StateStore::new(SimFs::new(disk_with(&[1, 2])));
        assert!(matches!(s.store(&blob(1)), Err(StateStoreError::StaleGeneration { generation: 1, stored: 2 })));
        // The same generation again, same bytes: a retry, nothing written.
        let ops = s.fs.ops;
        assert_eq!(s.store(&blob(2)).expect("retry"), 2);
        assert_eq!(s.fs.ops, ops + 2, "only the two reads");
        // The same generation, other bytes: refused.
        let mut other = blob(2);
        let n = other.len();
        other[70] ^= 1; // the nonce
        let d = <sha2::Sha384 as sha2::Digest>::digest(&other[..n - 48]);
        other[n - 48..].copy_from_slice(&d);
        assert!(matches!(s.store(&other), Err(StateStoreError::GenerationConflict { generation: 2 })));
        let mut torn = blob(3);
        torn.truncate(50);
        assert!(matches!(s.store(&torn), Err(StateStoreError::InvalidBlob(SealedError::Truncated { .. }))));
        assert_eq!(loaded_gen(s.fs.disk.clone(), 2).expect("load").map(|x| x.0), Some(2));
    }

    #[test]
    fn a_previous_newer_than_current_is_still_preferred() {
        // An operator copied files around: the newest intact generation wins, whichever slot.
        let mut disk = disk_with(&[1, 2]);
        let c = disk.v_dir[CURRENT];
        let p = disk.v_dir[PREVIOUS];
        for dir in [&mut disk.v_dir, &mut disk.d_dir] {
            dir.insert(CURRENT.to_owned(), p);
            dir.insert(PREVIOUS.to_owned(), c);
        }
        let l = StateStore::new(SimFs::new(disk)).load(2).expect("load").expect("some");
        assert_eq!((l.slot, l.header.generation), (Slot::Previous, 2));
    }

    // ---------- the real filesystem ----------

    #[test]
    fn real_directory_round_trip_modes_and_fallback() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = keygate_tests::TempDir::new("keygate-state-store").expect("mkdir");
        let dir = tmp.path();
        let mut s = StateStore::new(DirFs::new(dir));
        assert_eq!(s.load(0).expect("empty"), None);
        for g in 1..=3 {
            assert_eq!(s.store(&blob(g)).expect("store"), g);
        }
        let l = s.load(3).expect("load").expect("some");
        assert_eq!((l.slot, l.header.generation, l.skipped.clone()), (Slot::Current, 3, vec![]));
        assert_eq!(std::fs::read(dir.join(PREVIOUS)).expect("prev"), blob(2));
        assert!(!dir.join(TEMP).exists());
        let mode = std::fs::metadata(dir.join(CURRENT)).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Torn current on disk.
        let cur = std::fs::read(dir.join(CURRENT)).expect("read");
        std::fs::write(dir.join(CURRENT), &cur[..cur.len() / 3]).expect("tear");
        let l = s.load(2).expect("load").expect("some");
        assert_eq!((l.slot, l.header.generation), (Slot::Previous, 2));
        assert!(matches!(s.load(3), Err(StateStoreError::Unusable(Unusable::Rollback { found: 2, min: 3 }))));
        // An oversized file is damaged, not read whole.
        std::fs::write(dir.join(CURRENT), vec![0u8; sealed::MAX_BLOB + 10]).expect("big");
        let l = s.load(2).expect("load").expect("some");
        assert!(matches!(l.skipped[..], [(Slot::Current, SlotProblem::Damaged(SealedError::TooLarge { .. }))]));
    }

    /// Two processes' stores on one directory (a follow loop and a one-shot sync) take turns:
    /// neither renames the other's `state.tmp`, each either commits or loses to a newer
    /// generation, and the directory ends at the newest committed one.
    #[test]
    fn concurrent_stores_on_one_directory_take_turns() {
        let tmp = keygate_tests::TempDir::new("keygate-state-race").expect("mkdir");
        let dir = tmp.path().to_path_buf();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let mut s = StateStore::new(DirFs::new(dir));
                    let mut committed = 0;
                    for g in (1..=120u64).filter(|g| g % 2 == w) {
                        match s.store(&blob(g)) {
                            Ok(n) => committed = committed.max(n),
                            Err(StateStoreError::StaleGeneration { .. }) => {}
                            Err(e) => panic!("writer {w} generation {g}: {e}"),
                        }
                    }
                    committed
                })
            })
            .collect();
        let newest = writers.into_iter().map(|t| t.join().expect("writer")).max().expect("two");
        let l = StateStore::new(DirFs::new(&dir)).load(newest).expect("load").expect("some");
        assert_eq!((l.slot, l.header.generation), (Slot::Current, newest));
        assert!(!dir.join(TEMP).exists());
    }

    #[test]
    fn a_held_lock_makes_the_other_wait_then_time_out() {
        let tmp = keygate_tests::TempDir::new("keygate-state-lock").expect("mkdir");
        let mut first = DirFs::new(tmp.path());
        let held = first.lock(Duration::ZERO).expect("free");
        let err = DirFs::new(tmp.path()).lock(Duration::from_millis(50)).expect_err("held elsewhere");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(held);
        DirFs::new(tmp.path()).lock(Duration::ZERO).expect("released with the file");
    }
}
