//! What a process must not leave behind when a signal stops it: the children it started with
//! the kit ([`crate::spawn_logged`], [`crate::run_tracked`]) and the kit's temporary
//! directories. Nothing is recorded until the process asks for it ([`track_for_cleanup`]; the
//! demo does, the tests do not); [`clean_up`] then kills every child still recorded and removes
//! every directory, once.
//!
//! A kill -9 of the owner leaves no time to clean up: for that, a child started while
//! recording gets [`DIE_WITH_PARENT`] in its environment, and a binary that calls
//! [`die_with_parent_if_asked`] first (`keygate`, `keygate-enclave-dev`) asks the kernel to
//! kill it when its parent dies (PR_SET_PDEATHSIG); a program that does not (etcd) is started
//! through `setpriv --pdeathsig KILL` instead. Its directories then remain.
//!
//! It decides only what is stopped: a child is recorded from its start until its owner is
//! about to reap it (never after, so a reused pid is never killed), a directory until it is
//! removed. It trusts the kit's owners to un-record what they reap.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The recorded children and directories.
#[derive(Debug, Default)]
struct Tracked {
    /// Recording (set by [`track_for_cleanup`]).
    on: bool,
    /// [`clean_up`] ran: a child started after it is killed at once.
    closed: bool,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static TRACKED: Mutex<Tracked> = Mutex::new(Tracked { on: false, closed: false, pids: Vec::new(), dirs: Vec::new() });

fn tracked() -> std::sync::MutexGuard<'static, Tracked> {
    TRACKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What [`clean_up`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    /// Children killed (SIGKILL).
    pub killed: usize,
    /// Directories removed.
    pub removed: usize,
}

/// From now on, record this process's kit children and temporary directories for
/// [`clean_up`].
pub fn track_for_cleanup() {
    tracked().on = true;
}

fn kill(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok())
}

/// The environment variable that asks a child to die with its parent: the parent's pid.
pub const DIE_WITH_PARENT: &str = "KEYGATE_DIE_WITH_PARENT";

/// Called first by a binary the kit may start: when [`DIE_WITH_PARENT`] names this
/// process's parent, the kernel kills this process (SIGKILL) when the parent dies; when the
/// parent died already (the variable names another pid), exits at once. Otherwise nothing.
pub fn die_with_parent_if_asked() {
    let Some(parent) = std::env::var(DIE_WITH_PARENT).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return;
    };
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // Checked after asking: a parent that died before is seen here, one that dies after is
    // the kernel's to report.
    if rustix::process::getppid().map(rustix::process::Pid::as_raw_nonzero).map(|p| p.get()) != Some(parent) {
        std::process::exit(1);
    }
}

/// Where util-linux's `setpriv` is: it starts a program that does not call
/// [`die_with_parent_if_asked`] (etcd) with the parent death signal set.
const SETPRIV: &str = "/usr/bin/setpriv";

/// A command for `program`, which does not call [`die_with_parent_if_asked`]: while recording
/// (and when `setpriv` is there), it is started through `setpriv --pdeathsig KILL`, so that it
/// too dies with this process's thread that started it. Otherwise plainly.
pub(crate) fn command_dying_with_parent(program: &Path) -> std::process::Command {
    if tracked().on && Path::new(SETPRIV).exists() {
        let mut cmd = std::process::Command::new(SETPRIV);
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    }
}

/// Asks `cmd`'s process to die with this one ([`die_with_parent_if_asked`]) while recording.
pub(crate) fn prepare(cmd: &mut std::process::Command) {
    if tracked().on {
        cmd.env(DIE_WITH_PARENT, std::process::id().to_string());
    }
}

/// Records a child just started; after [`clean_up`], kills it at once.
pub(crate) fn child_started(pid: u32) {
    let mut t = tracked();
    if t.closed {
        kill(pid);
    } else if t.on {
        t.pids.push(pid);
    }
}

/// Forgets a child its owner is about to kill or reap.
pub(crate) fn child_reaping(pid: u32) {
    tracked().pids.retain(|p| *p != pid);
}

/// Reaps `child` if it has exited, un-recording it in the same step (so [`clean_up`] never
/// kills its pid once reaped).
pub(crate) fn try_reap(child: &mut std::process::Child) -> std::io::Result<Option<std::process::ExitStatus>> {
    let mut t = tracked();
    let status = child.try_wait()?;
    if status.is_some() {
        let pid = child.id();
        t.pids.retain(|p| *p != pid);
    }
    Ok(status)
}

/// Records a directory just created.
pub(crate) fn dir_created(path: &Path) {
    let mut t = tracked();
    if t.on {
        t.dirs.push(path.to_path_buf());
    }
}

/// Forgets a directory its owner removed.
pub(crate) fn dir_removed(path: &Path) {
    tracked().dirs.retain(|d| d != path);
}

/// Kills every recorded child (SIGKILL: they hold nothing outside the recorded directories)
/// and removes every recorded directory; children started later are killed when they start.
/// A second call finds nothing left.
pub fn clean_up() -> Cleaned {
    let mut t = tracked();
    t.closed = true;
    let killed = std::mem::take(&mut t.pids).into_iter().filter(|p| kill(*p)).count();
    let removed = std::mem::take(&mut t.dirs).into_iter().filter(|d| remove_settled(d)).count();
    Cleaned { killed, removed }
}

/// How long [`clean_up`] keeps removing a directory that a killed child was still writing
/// into (SIGKILL is delivered, not instant: a dying child may create a file or a socket after
/// the first removal began, which then fails with "directory not empty").
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Removes `dir`, trying again every 20 ms for at most [`REMOVE_WAIT`]; whether it is gone.
fn remove_settled(dir: &Path) -> bool {
    let start = std::time::Instant::now();
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) if start.elapsed() < REMOVE_WAIT => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(_) => return false,
        }
    }
}
