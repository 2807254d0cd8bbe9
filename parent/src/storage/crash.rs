//! The crash simulator for the sealed-state store: a disk with a crash model (what survives a
//! power loss of what was written, renamed or fsynced) and a [`StateFs`] over it that injects a
//! fault (ENOSPC, EIO, a crash before an operation, a torn write, a flipped read) at any chosen
//! file operation. Test-only; the sweeps in `state` and `system_sweep` drive it.

use std::collections::BTreeMap;
use std::io;

use keygate_attestation::crypto::default_backend;
use keygate_attestation::secret::Secret;
use keygate_enclave::state::sealed::{seal, KreState};

use super::state::{StateFs, StateStore, StateStoreError};

// ---------- a simulated disk with a crash model ----------

/// The process's view (volatile) and what survives a power loss (durable), per directory
/// entry and per file (inode).
#[derive(Debug, Clone, Default)]
pub(super) struct Disk {
    pub(super) v_dir: BTreeMap<String, u64>,
    pub(super) d_dir: BTreeMap<String, u64>,
    pub(super) v_data: BTreeMap<u64, Vec<u8>>,
    pub(super) d_data: BTreeMap<u64, Vec<u8>>,
    pub(super) next: u64,
}

/// What a crash keeps of what was not made durable.
#[derive(Debug, Clone, Copy)]
pub(super) enum Survives {
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

pub(super) const ALL_SURVIVES: [Survives; 5] = [
    Survives::DurableOnly,
    Survives::RenamesNotData,
    Survives::Everything,
    Survives::RenamesTornData,
    Survives::TornDataOnly,
];

impl Disk {
    pub(super) fn after_crash(&self, s: Survives) -> Disk {
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

    pub(super) fn slot(&self, name: &str) -> Option<&Vec<u8>> {
        self.v_dir.get(name).and_then(|i| self.v_data.get(i))
    }

    /// Corrupts a file at rest (volatile and durable alike).
    pub(super) fn damage(&mut self, name: &str, f: impl Fn(&mut Vec<u8>)) {
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
pub(super) enum Fault {
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
pub(super) struct SimFs {
    pub(super) disk: Disk,
    pub(super) ops: usize,
    pub(super) plan: Option<(usize, Fault)>,
    pub(super) crashed: bool,
    pub(super) fired: bool,
}

impl SimFs {
    pub(super) fn new(disk: Disk) -> Self {
        Self { disk, ops: 0, plan: None, crashed: false, fired: false }
    }

    /// Returns the fault for this operation, if it is the planned one.
    pub(super) fn step(&mut self) -> io::Result<Option<Fault>> {
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

    /// The fault for an operation that is done whole or not at all (a sync, a rename): a
    /// failure is returned, a torn write becomes the process dying before it, a corrupt read
    /// does nothing.
    fn step_whole(&mut self) -> io::Result<()> {
        match self.step()? {
            Some(Fault::DiskFull) => Err(enospc()),
            Some(Fault::IoError) => Err(eio()),
            Some(Fault::TornWriteCrash) => Err(self.die()),
            _ => Ok(()),
        }
    }

    /// The process dies now.
    fn die(&mut self) -> io::Error {
        self.crashed = true;
        io::Error::other("crash")
    }

    pub(super) fn inode(&mut self, name: &str) -> u64 {
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

fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

impl StateFs for SimFs {
    /// One simulated process: nothing to exclude.
    type Guard = ();

    fn lock(&mut self, _wait: std::time::Duration) -> io::Result<()> {
        Ok(())
    }

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
                Err(self.die())
            }
            Some(Fault::IoError) => Err(eio()),
            Some(Fault::Crash) => unreachable!("handled in step"),
        }
    }

    fn sync_file(&mut self, name: &str) -> io::Result<()> {
        self.step_whole()?;
        let i = *self.disk.v_dir.get(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let v = self.disk.v_data.get(&i).cloned().unwrap_or_default();
        self.disk.d_data.insert(i, v);
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        self.step_whole()?;
        let i = self.disk.v_dir.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        self.disk.v_dir.insert(to.to_owned(), i);
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        self.step_whole()?;
        self.disk.d_dir = self.disk.v_dir.clone();
        Ok(())
    }

    fn read_file(&mut self, name: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
        let fault = self.step()?;
        match fault {
            Some(Fault::DiskFull) | Some(Fault::IoError) => return Err(eio()),
            Some(Fault::TornWriteCrash) => return Err(self.die()),
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

pub(super) fn blob(generation: u64) -> Vec<u8> {
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

pub(super) fn disk_with(generations: &[u64]) -> Disk {
    let mut s = StateStore::new(SimFs::new(Disk::default()));
    for g in generations {
        s.store(&blob(*g)).expect("store");
    }
    s.fs.disk
}

pub(super) fn loaded_gen(disk: Disk, min: u64) -> Result<Option<(u64, Vec<u8>)>, StateStoreError> {
    let mut s = StateStore::new(SimFs::new(disk));
    Ok(s.load(min)?.map(|l| (l.header.generation, l.blob)))
}
