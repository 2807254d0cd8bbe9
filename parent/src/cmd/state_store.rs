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
//! ```
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

use keygate_enclave::state::sealed::{self, SealedError, SealedHeader};

/// The newest generation.
pub(crate) const CURRENT: &str = "state.current";
/// The generation before it.
pub(crate) const PREVIOUS: &str = "state.previous";
/// A write in progress.
pub(crate) const TEMP: &str = "state.tmp";

/// The file operations the store needs, each one step that a test can fail or crash.
pub(crate) trait StateFs {
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
}

impl fmt::Display for SlotProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotProblem::Missing => f.write_str("missing"),
            SlotProblem::Unreadable(k) => write!(f, "unreadable ({k})"),
            SlotProblem::Damaged(e) => write!(f, "damaged ({e})"),
        }
    }
}

/// The store step an I/O error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
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
    /// What was read back is not what was written.
    #[error("sealed state read back differs from what was written")]
    ReadBackMismatch,
    /// Neither file holds an intact state.
    #[error("no intact sealed state: current {current}, previous {previous}")]
    NoIntactState {
        /// What is wrong with `state.current`.
        current: SlotProblem,
        /// What is wrong with `state.previous`.
        previous: SlotProblem,
    },
    /// The newest intact state is older than the minimum acknowledged generation.
    #[error("newest intact sealed state is generation {found}, older than the acknowledged {min}: refused")]
    Rollback {
        /// The newest intact generation on disk.
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
    fs: F,
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
            return Err(StateStoreError::ReadBackMismatch);
        }
        Ok(generation)
    }

    /// The newest intact stored generation, refusing anything older than `min_generation`.
    /// `Ok(None)` only when nothing was ever stored and `min_generation` is 0 (genesis).
    pub(crate) fn load(&mut self, min_generation: u64) -> Result<Option<Loaded>, StateStoreError> {
        let current = self.read_slot(Slot::Current);
        let previous = self.read_slot(Slot::Previous);
        let (slot, (blob, header), other) = match (current, previous) {
            (Err(SlotProblem::Missing), Err(SlotProblem::Missing)) if min_generation == 0 => return Ok(None),
            (Err(c), Err(p)) => return Err(StateStoreError::NoIntactState { current: c, previous: p }),
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
            return Err(StateStoreError::Rollback { found: header.generation, min: min_generation });
        }
        // A missing previous is normal (only one generation stored yet); not worth reporting.
        let skipped = other.into_iter().filter(|(_, p)| *p != SlotProblem::Missing || slot == Slot::Previous).collect();
        Ok(Some(Loaded { blob, header, slot, skipped }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    use keygate_attestation::crypto::default_backend;
    use keygate_attestation::secret::Secret;
    use keygate_enclave::state::sealed::{seal, KreState};

    use super::*;

    // ---------- a simulated disk with a crash model ----------

    /// The process's view (volatile) and what survives a power loss (durable), per directory
    /// entry and per file (inode).
    #[derive(Debug, Clone, Default)]
    struct Disk {
        v_dir: BTreeMap<String, u64>,
        d_dir: BTreeMap<String, u64>,
        v_data: BTreeMap<u64, Vec<u8>>,
        d_data: BTreeMap<u64, Vec<u8>>,
        next: u64,
    }

    /// What a crash keeps of what was not made durable.
    #[derive(Debug, Clone, Copy)]
    enum Survives {
        /// Only what was fsynced (directory and data).
        DurableOnly,
        /// Renames reached the disk, unsynced data did not.
        RenamesNotData,
        /// Everything reached the disk (the kernel flushed it anyway).
        Everything,
        /// Renames reached the disk, unsynced data is torn (half written).
        RenamesTornData,
        /// Renames did not, unsynced data is torn.
        TornDataOnly,
    }

    const ALL_SURVIVES: [Survives; 5] = [
        Survives::DurableOnly,
        Survives::RenamesNotData,
        Survives::Everything,
        Survives::RenamesTornData,
        Survives::TornDataOnly,
    ];

    impl Disk {
        fn after_crash(&self, s: Survives) -> Disk {
            let keep_dir = matches!(s, Survives::Everything | Survives::RenamesNotData | Survives::RenamesTornData);
            let dir = if keep_dir { self.v_dir.clone() } else { self.d_dir.clone() };
            let mut data = BTreeMap::new();
            for inode in dir.values() {
                let durable = self.d_data.get(inode).cloned().unwrap_or_default();
                let volatile = self.v_data.get(inode).cloned().unwrap_or_default();
                let content = match s {
                    Survives::Everything => volatile,
                    Survives::RenamesTornData | Survives::TornDataOnly if volatile != durable => {
                        volatile[..volatile.len() / 2].to_vec()
                    }
                    _ => durable,
                };
                data.insert(*inode, content);
            }
            Disk { v_dir: dir.clone(), d_dir: dir, v_data: data.clone(), d_data: data, next: self.next }
        }

        fn slot(&self, name: &str) -> Option<&Vec<u8>> {
            self.v_dir.get(name).and_then(|i| self.v_data.get(i))
        }

        /// Corrupts a file at rest (volatile and durable alike).
        fn damage(&mut self, name: &str, f: impl Fn(&mut Vec<u8>)) {
            let i = self.v_dir[name];
            for m in [&mut self.v_data, &mut self.d_data] {
                if let Some(v) = m.get_mut(&i) {
                    f(v);
                }
            }
        }
    }

    /// A fault planned at the `at`-th file operation (0-based).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        /// The operation fails with ENOSPC (a write writes half first); the process goes on.
        DiskFull,
        /// The operation fails with EIO; the process goes on.
        IoError,
        /// The process dies before the operation.
        Crash,
        /// A write stops half way and the process dies.
        TornWriteCrash,
        /// A read returns flipped bytes (bad memory/cable); the process goes on.
        CorruptRead,
    }

    #[derive(Debug)]
    struct SimFs {
        disk: Disk,
        ops: usize,
        plan: Option<(usize, Fault)>,
        crashed: bool,
        fired: bool,
    }

    impl SimFs {
        fn new(disk: Disk) -> Self {
            Self { disk, ops: 0, plan: None, crashed: false, fired: false }
        }

        /// Returns the fault for this operation, if it is the planned one.
        fn step(&mut self) -> io::Result<Option<Fault>> {
            if self.crashed {
                return Err(io::Error::other("process is dead"));
            }
            let n = self.ops;
            self.ops += 1;
            match self.plan {
                Some((at, f)) if at == n => {
                    self.fired = true;
                    if matches!(f, Fault::Crash) {
                        self.crashed = true;
                        return Err(io::Error::other("crash"));
                    }
                    Ok(Some(f))
                }
                _ => Ok(None),
            }
        }

        fn inode(&mut self, name: &str) -> u64 {
            if let Some(i) = self.disk.v_dir.get(name) {
                return *i;
            }
            self.disk.next += 1;
            let i = self.disk.next;
            self.disk.v_dir.insert(name.to_owned(), i);
            i
        }
    }

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(28)
    }

    impl StateFs for SimFs {
        fn write_file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
            let fault = self.step()?;
            let i = self.inode(name);
            match fault {
                None | Some(Fault::CorruptRead) => {
                    self.disk.v_data.insert(i, bytes.to_vec());
                    Ok(())
                }
                Some(Fault::DiskFull) => {
                    self.disk.v_data.insert(i, bytes[..bytes.len() / 2].to_vec());
                    Err(enospc())
                }
                Some(Fault::TornWriteCrash) => {
                    self.disk.v_data.insert(i, bytes[..bytes.len() / 2].to_vec());
                    self.crashed = true;
                    Err(io::Error::other("crash"))
                }
                Some(Fault::IoError) => Err(io::Error::from_raw_os_error(5)),
                Some(Fault::Crash) => unreachable!("handled in step"),
            }
        }

        fn sync_file(&mut self, name: &str) -> io::Result<()> {
            match self.step()? {
                Some(Fault::DiskFull) => return Err(enospc()),
                Some(Fault::IoError) => return Err(io::Error::from_raw_os_error(5)),
                Some(Fault::TornWriteCrash) => {
                    self.crashed = true;
                    return Err(io::Error::other("crash"));
                }
                _ => {}
            }
            let i = *self.disk.v_dir.get(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            let v = self.disk.v_data.get(&i).cloned().unwrap_or_default();
            self.disk.d_data.insert(i, v);
            Ok(())
        }

        fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
            match self.step()? {
                Some(Fault::DiskFull) => return Err(enospc()),
                Some(Fault::IoError) => return Err(io::Error::from_raw_os_error(5)),
                Some(Fault::TornWriteCrash) => {
                    self.crashed = true;
                    return Err(io::Error::other("crash"));
                }
                _ => {}
            }
            let i = self.disk.v_dir.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            self.disk.v_dir.insert(to.to_owned(), i);
            Ok(())
        }

        fn sync_dir(&mut self) -> io::Result<()> {
            match self.step()? {
                Some(Fault::DiskFull) => return Err(enospc()),
                Some(Fault::IoError) => return Err(io::Error::from_raw_os_error(5)),
                Some(Fault::TornWriteCrash) => {
                    self.crashed = true;
                    return Err(io::Error::other("crash"));
                }
                _ => {}
            }
            self.disk.d_dir = self.disk.v_dir.clone();
            Ok(())
        }

        fn read_file(&mut self, name: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
            let fault = self.step()?;
            match fault {
                Some(Fault::DiskFull) | Some(Fault::IoError) => return Err(io::Error::from_raw_os_error(5)),
                Some(Fault::TornWriteCrash) => {
                    self.crashed = true;
                    return Err(io::Error::other("crash"));
                }
                _ => {}
            }
            let Some(mut v) = self.disk.slot(name).cloned() else { return Ok(None) };
            v.truncate(max.saturating_add(1));
            if fault == Some(Fault::CorruptRead) {
                if let Some(b) = v.get_mut(20) {
                    *b ^= 0x40;
                }
            }
            Ok(Some(v))
        }
    }

    // ---------- fixtures ----------

    fn blob(generation: u64) -> Vec<u8> {
        let state = KreState { generation, ..KreState::default() };
        let mut n = u8::try_from(generation % 251).unwrap_or(0);
        seal(
            &state,
            &Secret::new([0x61; 32]),
            &[0x11; 48],
            &mut |b: &mut [u8]| {
                n = n.wrapping_add(1);
                b.fill(n)
            },
            default_backend(),
        )
        .expect("seal")
    }

    fn disk_with(generations: &[u64]) -> Disk {
        let mut s = StateStore::new(SimFs::new(Disk::default()));
        for g in generations {
            s.store(&blob(*g)).expect("store");
        }
        s.fs.disk
    }

    fn loaded_gen(disk: Disk, min: u64) -> Result<Option<(u64, Vec<u8>)>, StateStoreError> {
        let mut s = StateStore::new(SimFs::new(disk));
        Ok(s.load(min)?.map(|l| (l.header.generation, l.blob)))
    }

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
            assert!(matches!(s.load(2), Err(StateStoreError::Rollback { found: 1, min: 2 })), "{what}");
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
            StateStoreError::NoIntactState {
                current: SlotProblem::Damaged(SealedError::BadMagic),
                previous: SlotProblem::Damaged(SealedError::Truncated { .. })
            }
        ));
        assert!(!format!("{err}").is_empty());
        // Nothing stored: genesis only if nothing was ever acknowledged.
        assert_eq!(loaded_gen(Disk::default(), 0).expect("genesis"), None);
        assert!(matches!(
            loaded_gen(Disk::default(), 1),
            Err(StateStoreError::NoIntactState { current: SlotProblem::Missing, previous: SlotProblem::Missing })
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

    fn temp_dir() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "keygate-state-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn real_directory_round_trip_modes_and_fallback() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let mut s = StateStore::new(DirFs::new(&dir));
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
        assert!(matches!(s.load(3), Err(StateStoreError::Rollback { found: 2, min: 3 })));
        // An oversized file is damaged, not read whole.
        std::fs::write(dir.join(CURRENT), vec![0u8; sealed::MAX_BLOB + 10]).expect("big");
        let l = s.load(2).expect("load").expect("some");
        assert!(matches!(l.skipped[..], [(Slot::Current, SlotProblem::Damaged(SealedError::TooLarge { .. }))]));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    // ---------- the whole system: a real KRE core, custodians and the store ----------

    mod system {
        use std::sync::Arc;

        use keygate_attestation::bundle::{self, PolicyBody};
        use keygate_attestation::crypto::{default_backend, p384_scalar_from, P384Scalar};
        use keygate_attestation::mock::{derive_key, public_point, MockNsm};
        use keygate_attestation::{PcrExpectation, Verifier};
        use keygate_enclave::kre::{Connection, Env, Kre, KreConfig};
        use keygate_enclave::peer::client::{self, ClientError, FetchRequest};
        use keygate_enclave::peer::custodian::{self, Expectations};
        use keygate_enclave::state::custody::CustodianSet;
        use keygate_enclave::wire::{Channel, DenyCode, Id, Message, StateReport};
        use p384::ecdsa::signature::Signer;
        use sha2::{Digest, Sha384};

        use super::*;

        const T: u64 = 1_795_478_400_000;
        const SEED: &[u8] = b"state-sweep";
        const KRE_PCR: u8 = 0x4b;
        const CP_PCR: u8 = 0x1c;

        fn rng_from(seed: u64) -> impl FnMut(&mut [u8]) {
            let mut n = seed;
            move |b: &mut [u8]| {
                for x in b.iter_mut() {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    *x = n.to_be_bytes()[0];
                }
            }
        }

        fn pcrs(b: u8) -> BTreeMap<u8, Vec<u8>> {
            (0u8..3).map(|i| (i, vec![b; 48])).collect()
        }

        /// Genesis allows `prod`; v2 adds `stage` (a new cluster: a new KEK to store).
        fn bundles() -> (Vec<u8>, Vec<u8>) {
            let k = derive_key(b"sweep", "approver");
            let point: bundle::ApproverKey = public_point(&k).try_into().expect("point");
            let cp = hex::encode([CP_PCR; 48]);
            let policy = |clusters: &[(&str, u32)]| {
                let c: Vec<String> = clusters
                    .iter()
                    .map(|(c, v)| format!(r#""{c}": {{"images": [{{"name": "cp", "pcrs": {{"0": "{cp}", "1": "{cp}", "2": "{cp}"}}}}], "kek_version": {v}}}"#))
                    .collect();
                keygate_enclave::policy_file::parse(format!(r#"{{"clusters": {{{}}}}}"#, c.join(",")).as_bytes())
                    .expect("policy")
            };
            let g = PolicyBody {
                version: 1,
                previous: [0; 48],
                issued_at: T / 1000,
                activation_delay: 0,
                approvers: vec![point],
                threshold: 1,
                policy: policy(&[("prod", 1)]),
            };
            let gb = bundle::encode_body(&g);
            // v2 adds a cluster (a new KEK) and rotates prod's KEK to version 2.
            let v2 = PolicyBody {
                version: 2,
                previous: bundle::digest(&gb),
                policy: policy(&[("prod", 2), ("stage", 1)]),
                ..g
            };
            let vb = bundle::encode_body(&v2);
            let sig: p384::ecdsa::Signature = k.sign(&bundle::signing_message(&vb));
            (
                bundle::encode_bundle(&gb, &[]),
                bundle::encode_bundle(&vb, &[(public_point(&k), sig.to_bytes().to_vec())]),
            )
        }

        struct World {
            custodians: Vec<P384Scalar>,
            set: CustodianSet,
            genesis: Vec<u8>,
            v2: Vec<u8>,
            boots: u64,
            kill_during_unseal: bool,
            #[allow(clippy::type_complexity)]
            seen: std::collections::HashSet<(Option<Vec<u8>>, Option<Vec<u8>>, u64, Vec<(String, u32, [u8; 32])>)>,
        }

        impl World {
            fn new() -> Self {
                let c = default_backend();
                let mut custodians = Vec::new();
                let mut keys = Vec::new();
                for i in 0..3 {
                    let (s, p) = p384_scalar_from(c, rng_from(900 + i)).expect("key");
                    keys.push(p.try_into().expect("point"));
                    custodians.push(s);
                }
                let set = CustodianSet::new(c, 2, keys).expect("set");
                let (genesis, v2) = bundles();
                Self { custodians, set, genesis, v2, boots: 0, kill_during_unseal: false, seen: Default::default() }
            }

            fn boot(&mut self) -> Kre {
                self.boots += 1;
                let nsm = MockNsm::new(SEED, pcrs(KRE_PCR), Arc::new(|| T)).with_instance("kre");
                let verifier = Verifier::new(nsm.root_anchor());
                let config = KreConfig { custodians: Some(self.set.clone()), ..KreConfig::default() };
                Kre::with_genesis(config, verifier, &self.genesis, Arc::new(nsm)).expect("kre")
            }
        }

        fn one(kre: &Kre, m: Message, seed: u64) -> Message {
            let mut r = rng_from(seed);
            let s = Connection::new(m.channel().expect("a request")).on_frame(
                kre,
                &m.encode().expect("encode")[4..],
                &mut Env { now_ms: T, rng: &mut r },
            );
            Message::decode(&s.reply[4..]).expect("reply")
        }

        fn report(kre: &Kre, m: Message) -> StateReport {
            match one(kre, m, 3) {
                Message::StateReport(r) => *r,
                other => panic!("expected a state report, got {other:?}"),
            }
        }

        /// A release of `cluster`'s `etcd` key: Ok((version, key bytes)) or the denial code.
        fn fetch(kre: &Kre, cluster: &str) -> Result<Vec<(u32, [u8; 32])>, DenyCode> {
            let cpi = MockNsm::new(SEED, pcrs(CP_PCR), Arc::new(|| T)).with_instance("cpi");
            let req = FetchRequest {
                cluster: Id::new(cluster).expect("id"),
                key_ids: vec![Id::new("etcd").expect("id")],
                expect_kre_pcrs: vec![],
            };
            use std::sync::atomic::{AtomicU64, Ordering};
            static CALLS: AtomicU64 = AtomicU64::new(1);
            let n = CALLS.fetch_add(1, Ordering::Relaxed);
            let mut r = rng_from(n * 7919);
            let (ac, hello) = client::start(req, &mut r).expect("hello");
            let mut conn = Connection::new(Channel::Release);
            let mut kr = rng_from(n * 104_729 + 1);
            let s = conn.on_frame(kre, &hello[4..], &mut Env { now_ms: T, rng: &mut kr });
            let ar = ac
                .on_challenge(&s.reply[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r)
                .expect("challenge");
            let s = conn.on_frame(kre, &ar.release_frame.clone()[4..], &mut Env { now_ms: T, rng: &mut kr });
            match ar.on_released(&s.reply[4..], default_backend()) {
                Ok(r) => Ok(r.keys.iter().map(|k| (k.version, *k.key.expose())).collect()),
                Err(ClientError::Denied { code, .. }) => Err(code),
                Err(e) => panic!("fetch failed: {e}"),
            }
        }

        /// The parent's side of a sync: store what is exported and commit what was read back.
        /// Ok(generation committed) or Err(the store failed: nothing committed).
        fn sync(kre: &Kre, store: &mut StateStore<SimFs>) -> Result<Option<u64>, ()> {
            let r = report(kre, Message::StatePoll);
            if r.export_generation == 0 {
                return Ok(None);
            }
            let g = store.store(&r.blob).map_err(|_| ())?;
            let back = store.load(g).map_err(|_| ())?.ok_or(())?;
            let sha: [u8; 48] = Sha384::digest(&back.blob).into();
            match one(kre, Message::StateCommit { generation: g, blob_sha384: sha }, 4) {
                Message::StateCommitted { generation } => Ok(Some(generation)),
                other => panic!("commit refused: {other:?}"),
            }
        }

        fn unseal(world: &World, kre: &Kre, blob: Vec<u8>, custody: &(Vec<u8>, Vec<u8>)) -> u64 {
            let r = report(
                kre,
                Message::StateLoad { blob, shares: custody.0.clone(), genesis_attestation: custody.1.clone() },
            );
            assert_eq!(r.phase, 2);
            let verifier = Verifier::new(MockNsm::new(SEED, pcrs(KRE_PCR), Arc::new(|| T)).root_anchor());
            let expect: Vec<PcrExpectation> =
                pcrs(KRE_PCR).into_iter().map(|(index, value)| PcrExpectation { index, value }).collect();
            let mut generation = 0;
            for i in [0usize, 2] {
                let nonce = [u8::try_from(i).expect("small") + 1; 32];
                let mut conn = Connection::new(Channel::Custodian);
                let mut kr = rng_from(40 + u64::try_from(i).expect("small"));
                let s = conn.on_frame(
                    kre,
                    &Message::UnsealHello { client_nonce: nonce }.encode().expect("hello")[4..],
                    &mut Env { now_ms: T, rng: &mut kr },
                );
                let e = Expectations {
                    verifier: &verifier,
                    now_ms: T,
                    kre_pcrs: &expect,
                    genesis_pcrs: &expect,
                    record: None,
                    accept_new_genesis: false,
                    approve_reshare: None,
                };
                let resp = custodian::on_offer(
                    &s.reply[4..],
                    &nonce,
                    &e,
                    &world.custodians[i],
                    default_backend(),
                    &mut rng_from(7),
                )
                .expect("custodian accepts");
                let s = conn.on_frame(kre, &resp.frame[4..], &mut Env { now_ms: T, rng: &mut kr });
                generation = custodian::on_progress(&s.reply[4..]).expect("share accepted").3;
            }
            generation
        }

        /// What one run did before it was cut short.
        #[derive(Default)]
        struct Run {
            /// (cluster, version, key) of every release.
            released: Vec<(String, u32, [u8; 32])>,
            /// The highest generation the KRE committed.
            committed: u64,
            /// Custody data as the parent would hold it (written before the first blob).
            custody: Option<(Vec<u8>, Vec<u8>)>,
            /// Releases refused because their KEK was not yet stored.
            pending_refusals: usize,
            /// The policy version the KRE reported durable (with a durability receipt).
            durable_policy: Option<u64>,
            /// (chain, seq, digest) of every audit entry the parent stored and acknowledged
            /// (its audit directory is fsynced before the acknowledgement: never lost here).
            stored: Vec<([u8; 48], u64, [u8; 48])>,
            /// The newest seq acknowledged when the committed generation was exported.
            acked_at_commit: u64,
        }

        /// The parent's audit follower: stores every new entry, then acknowledges it (what
        /// `audit pull --follow` does between the KRE's steps).
        fn collect(kre: &Kre, run: &mut Run) {
            let after = run.stored.last().map_or(0, |e| e.1);
            let entries = kre.audit().entries_after(after, 4096);
            let Some(last) = entries.last().map(|e| e.seq()) else { return };
            run.stored.extend(entries.iter().map(|e| (*e.chain_id(), e.seq(), e.digest())));
            assert!(matches!(one(kre, Message::AuditAck { up_to_seq: last }, 8), Message::AuditAcked { .. }));
        }

        /// The script: genesis, release prod, push v2 (new cluster), sync, release stage. The
        /// KRE is killed after protocol step `kill_after` (if any); file faults come from the
        /// store's plan. Returns the run and the disk as the process left it.
        fn script(world: &mut World, fs: SimFs, kill_after: Option<usize>) -> (Run, SimFs) {
            let kre = world.boot();
            let mut store = StateStore::new(fs);
            let mut run = Run::default();
            let mut step = 0usize;
            let alive = |step: &mut usize| {
                *step += 1;
                kill_after.is_none_or(|k| *step <= k)
            };
            // 1. Genesis (custody is stored atomically before the blob; modelled as durable).
            let r = report(&kre, Message::StateGenesis);
            run.custody = Some((r.shares.clone(), r.genesis_attestation.clone()));
            if !alive(&mut step) {
                return (run, store.fs);
            }
            // 2. Store and commit generation 1 (exported at genesis, before anything was
            // acknowledged: its audit head is the empty chain).
            collect(&kre, &mut run);
            match sync(&kre, &mut store) {
                Ok(Some(g)) => (run.committed, run.acked_at_commit) = (g, 0),
                Ok(None) => panic!("nothing exported at genesis"),
                Err(()) => {
                    // Not stored: nothing may be released.
                    assert_eq!(fetch(&kre, "prod"), Err(DenyCode::StatePending));
                    run.pending_refusals += 1;
                    return (run, store.fs);
                }
            }
            if !alive(&mut step) || store.fs.crashed {
                return (run, store.fs);
            }
            // 3. Release prod.
            for (v, k) in fetch(&kre, "prod").expect("prod released") {
                run.released.push(("prod".into(), v, k));
            }
            if !alive(&mut step) {
                return (run, store.fs);
            }
            // 4. Push v2: a new cluster whose KEK is not stored yet.
            assert!(matches!(
                one(&kre, Message::PolicyPush { bundle: world.v2.clone() }, 5),
                Message::PolicyAccepted { .. }
            ));
            // The cluster only the not yet durable v2 has waits for the commit (as its KEK does).
            assert_eq!(fetch(&kre, "stage"), Err(DenyCode::PolicyNotDurable), "released under an unstored KEK");
            let prod = fetch(&kre, "prod").expect("prod still released");
            assert!(
                prod.iter().all(|(v, _)| *v == 1),
                "released under the unstored rotated version: {:?}",
                prod.iter().map(|x| x.0).collect::<Vec<_>>()
            );
            run.pending_refusals += 2;
            if !alive(&mut step) {
                return (run, store.fs);
            }
            // 5. Store and commit generation 2.
            collect(&kre, &mut run);
            let acked = run.stored.last().map_or(0, |e| e.1);
            // A refusal is recorded without waiting for the parent (only answers that hand out
            // keys or change the KRE wait): its entry is not yet stored when the state is
            // exported, and a crash may lose it.
            assert_eq!(fetch(&kre, "unknown"), Err(DenyCode::UnknownCluster));
            match sync(&kre, &mut store) {
                Ok(Some(g)) => {
                    (run.committed, run.acked_at_commit) = (g, acked);
                    // The pipeline asks whether v2 is durable: a receipt is a promise that a
                    // restart, whatever happens to the parent's disk, comes back with v2.
                    let b = bundle::decode_bundle(&world.v2, default_backend()).expect("v2");
                    let ask =
                        Message::PolicyDurableWait { version: 2, digest: bundle::digest(&b.body_bytes), wait_ms: 0 };
                    if let Message::PolicyDurable { .. } = one(&kre, ask, 7) {
                        run.durable_policy = Some(2);
                    }
                }
                Ok(None) => panic!("nothing exported after the push"),
                Err(()) => {
                    assert_eq!(fetch(&kre, "stage"), Err(DenyCode::PolicyNotDurable), "released under an unstored KEK");
                    let prod = fetch(&kre, "prod").expect("prod still released");
                    assert!(prod.iter().all(|(v, _)| *v == 1), "released under the unstored rotated version");
                    run.pending_refusals += 2;
                    return (run, store.fs);
                }
            }
            if !alive(&mut step) || store.fs.crashed {
                return (run, store.fs);
            }
            collect(&kre, &mut run);
            // 6. Release stage, and prod under both versions (the rotation is stored).
            for (v, k) in fetch(&kre, "stage").expect("stage released") {
                run.released.push(("stage".into(), v, k));
            }
            let prod = fetch(&kre, "prod").expect("prod released");
            assert_eq!(prod.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [2, 1], "current first, then the older one");
            for (v, k) in prod {
                run.released.push(("prod".into(), v, k));
            }
            collect(&kre, &mut run);
            (run, store.fs)
        }

        /// Restart everything on `disk`, unseal, restore the policy, and check the invariants.
        fn recover_and_check(world: &mut World, run: &Run, disk: Disk, what: &str) -> (usize, usize) {
            // Outcomes that leave the same files after the same run are recovered once.
            let key = (disk.slot(CURRENT).cloned(), disk.slot(PREVIOUS).cloned(), run.committed, run.released.clone());
            if !world.seen.insert(key) {
                return (0, 0);
            }
            let kre = world.boot();
            let mut store = StateStore::new(SimFs::new(disk));
            let loaded = store.load(0).unwrap_or_else(|e| panic!("{what}: load failed: {e}"));
            let Some(loaded) = loaded else {
                assert_eq!(run.committed, 0, "{what}: a committed generation was lost");
                assert!(run.released.is_empty(), "{what}: keys were released but no state survives");
                return (0, 0);
            };
            let g = loaded.header.generation;
            assert!(g >= run.committed, "{what}: rollback: loaded {g}, committed {}", run.committed);
            let custody = run.custody.clone().expect("custody stored before any blob");
            if world.kill_during_unseal {
                // The KRE dies after the load and one custodian's share: a new boot starts over.
                let doomed = world.boot();
                let _ = report(
                    &doomed,
                    Message::StateLoad {
                        blob: loaded.blob.clone(),
                        shares: custody.0.clone(),
                        genesis_attestation: custody.1.clone(),
                    },
                );
                drop(doomed);
            }
            assert_eq!(unseal(world, &kre, loaded.blob, &custody), g, "{what}");
            // The restarted KRE's trail names the run before it at the head the unsealed state
            // recorded: an entry the parent stored (so an honest crash never shows as a gap),
            // and, for the committed generation, no older than what was acknowledged before it
            // was exported.
            let linked = kre
                .audit()
                .entries_after(0, 64)
                .into_iter()
                .find_map(|e| match e.event() {
                    keygate_enclave::audit::AuditEvent::ChainLinked { previous, .. } => Some(*previous),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{what}: no chain_linked entry after the unseal"));
            let head = linked.unwrap_or_else(|| panic!("{what}: the unsealed state records no audit head"));
            if head.seq > 0 {
                assert!(
                    run.stored.contains(&(head.chain_id, head.seq, head.digest)),
                    "{what}: the link names seq {} of the previous run, which the parent never stored",
                    head.seq
                );
            }
            if g == run.committed {
                assert!(
                    head.seq >= run.acked_at_commit,
                    "{what}: the link names seq {}, older than the {} acknowledged before the commit",
                    head.seq,
                    run.acked_at_commit
                );
            }
            // A policy change reported durable is in the state the KRE came back with.
            if let Some(v) = run.durable_policy {
                let status: serde_json::Value = serde_json::from_str(&kre.status_json()).expect("status");
                assert!(
                    status["policy_durable_version"].as_u64().is_some_and(|d| d >= v),
                    "{what}: policy v{v} was reported durable, the recovered state carries {}",
                    status["policy_durable_version"]
                );
            }
            // The parent replays the stored policy chain (v2 if it was pushed).
            let _ = one(&kre, Message::PolicyPush { bundle: world.v2.clone() }, 6);
            // Bring any uncommitted change (a cluster without a stored KEK) to the store.
            let _ = sync(&kre, &mut store);
            let mut checked = 0;
            for (cluster, version, key) in &run.released {
                let again =
                    fetch(&kre, cluster).unwrap_or_else(|c| panic!("{what}: {cluster} refused after recovery: {c}"));
                assert!(
                    again.iter().any(|(v, k)| v == version && k == key),
                    "{what}: {cluster} v{version} lost (a KEK version or a release under an unstored version)"
                );
                checked += 1;
            }
            (checked, 1)
        }

        /// Every fault at every file operation of the whole flow (genesis, a change, the loads of
        /// the unseal), the KRE killed after every protocol step, the parent killed at every
        /// step; then restart, unseal and check: zero KEK versions lost, zero rollbacks, zero
        /// keys released under an unstored version, a policy reported durable always back, and
        /// the restarted run linked to an audit entry the parent stored, no older than what was
        /// acknowledged before the committed generation was exported.
        #[test]
        fn crash_anywhere_in_genesis_change_and_unseal_loses_nothing() {
            let mut world = World::new();
            // A clean run: how many file operations and protocol steps it takes.
            let (clean, fs) = script(&mut world, SimFs::new(Disk::default()), None);
            assert_eq!(clean.released.len(), 4);
            let n_ops = fs.ops;
            let faults = [Fault::DiskFull, Fault::IoError, Fault::Crash, Fault::TornWriteCrash, Fault::CorruptRead];
            let (mut points, mut outcomes, mut releases_checked, mut cases) = (0usize, 0usize, 0usize, 0usize);
            for at in 0..=n_ops {
                for fault in faults {
                    let mut fs = SimFs::new(Disk::default());
                    fs.plan = Some((at, fault));
                    let (run, fs) = script(&mut world, fs, None);
                    points += 1;
                    let mut modes: Vec<(Disk, String)> = ALL_SURVIVES
                        .iter()
                        .map(|m| (fs.disk.after_crash(*m), format!("op {at} {fault:?} {m:?}")))
                        .collect();
                    if !fs.crashed {
                        modes.push((fs.disk.clone(), format!("op {at} {fault:?} running")));
                    }
                    for (disk, what) in modes {
                        cases += 1;
                        let (c, o) = recover_and_check(&mut world, &run, disk, &what);
                        releases_checked += c;
                        outcomes += o;
                    }
                }
            }
            // kill -9 of the KRE after each protocol step (the parent's disk intact), and of
            // the parent (its unsynced writes lost in every way a crash allows).
            for kill in 0..=6 {
                let (run, fs) = script(&mut world, SimFs::new(Disk::default()), Some(kill));
                points += 2;
                let (c, o) =
                    recover_and_check(&mut world, &run, fs.disk.clone(), &format!("KRE killed after step {kill}"));
                releases_checked += c;
                outcomes += o;
                for m in ALL_SURVIVES {
                    let (c, o) = recover_and_check(
                        &mut world,
                        &run,
                        fs.disk.after_crash(m),
                        &format!("parent killed after step {kill} {m:?}"),
                    );
                    releases_checked += c;
                    outcomes += o;
                }
            }
            // The KRE killed during the unseal of a recovery (after the load), for each kill point.
            world.kill_during_unseal = true;
            world.seen.clear();
            for kill in 0..=6 {
                let (run, fs) = script(&mut world, SimFs::new(Disk::default()), Some(kill));
                points += 1;
                cases += 1;
                let (c, o) = recover_and_check(
                    &mut world,
                    &run,
                    fs.disk.clone(),
                    &format!("unseal killed, run cut after {kill}"),
                );
                releases_checked += c;
                outcomes += o;
            }
            eprintln!(
                "system sweep: {points} injection points ({} file operations x 5 faults, 7 KRE kills, 7 parent kills, 7 KRE kills during the unseal), {cases} crash outcomes, {outcomes} distinct recoveries unsealed, {releases_checked} earlier releases reproduced; 0 KEK versions lost, 0 rollbacks, 0 releases under an unstored version",
                n_ops + 1
            );
            assert!(points > 50, "{points}");
            assert!(outcomes > 5 && releases_checked > 5, "{outcomes} {releases_checked}");
        }
    }
}
