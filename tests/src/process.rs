//! The shared kit for running real processes beside their owner — the end-to-end tests, the
//! bench and the demo: a child killed (and reaped) when its owner drops it, a child with its
//! private directory, a private temporary directory, starting a process with its stderr in a
//! log file, and waiting with a deadline until a Unix socket accepts.
//!
//! It decides only lifetimes and deadlines; it trusts nothing a process says (a socket that
//! accepts is "up", nothing more). Except for [`KillOnDrop::keygate`] (test-only: it panics when
//! the binary was not built), nothing here panics: the demo and the bench report its errors.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::bin;

/// A child process and its private directory (socket, log, state): when dropped, the process
/// is killed and reaped, then the directory removed.
#[derive(Debug)]
pub struct ProcessInDir {
    /// The process.
    pub child: Child,
    /// Its directory, removed after the process is gone.
    pub dir: PathBuf,
}

impl Drop for ProcessInDir {
    fn drop(&mut self) {
        crate::cleanup::child_reaping(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        crate::cleanup::dir_removed(&self.dir);
    }
}

/// A child process killed (and reaped) when dropped: a daemon started beside the KRE.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Starts `keygate ARGS` with stdin, stdout and stderr closed.
    pub fn keygate(args: &[&str]) -> Self {
        let child = Command::new(bin("keygate"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("keygate");
        Self(child)
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        crate::cleanup::child_reaping(self.0.id());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private directory under the system's temporary directory, named after `prefix`, this
/// process's id and how many this process made before, created empty (a stale one of the same
/// name, from a process with a reused id, is removed first) and removed when dropped.
#[derive(Debug)]
pub struct TempDir(Option<PathBuf>);

impl TempDir {
    /// Creates `$TMPDIR/<prefix>-<pid>-<n>`: the tests of one process each get their own.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        crate::cleanup::dir_created(&path);
        Ok(Self(Some(path)))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Hands the directory to its new owner (e.g. a [`ProcessInDir`]); it is no longer removed
    /// when this value goes.
    pub fn keep(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(&path);
            crate::cleanup::dir_removed(&path);
        }
    }
}

/// Starts `cmd` with stdin and stdout closed and stderr appended to a new file `log`. The
/// child is recorded for [`crate::clean_up`] until a [`KillOnDrop`] or [`ProcessInDir`] holding
/// it reaps it (an owner that reaps it otherwise un-records it first).
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> std::io::Result<Child> {
    let log = std::fs::File::create(log)?;
    crate::cleanup::prepare(cmd);
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?;
    crate::cleanup::child_started(child.id());
    Ok(child)
}

/// Runs `cmd` to completion with stdin closed and its output captured, recorded for
/// [`crate::clean_up`] while it runs: a short step of the demo (a build, a fetch).
pub fn run_tracked(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    use std::io::Read;
    crate::cleanup::prepare(cmd);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    crate::cleanup::child_started(child.id());
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let status = loop {
        if let Some(status) = crate::cleanup::try_reap(&mut child)? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(std::process::Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// Why a process's socket never accepted.
#[derive(Debug)]
pub enum SocketWaitError {
    /// The process exited first.
    Exited(ExitStatus),
    /// Nothing accepted before the deadline.
    Timeout {
        /// The socket waited for.
        path: PathBuf,
        /// How long.
        waited: Duration,
    },
}

impl fmt::Display for SocketWaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(status) => write!(f, "exited early ({status})"),
            Self::Timeout { path, waited } => write!(f, "did not listen on {} within {waited:?}", path.display()),
        }
    }
}

impl std::error::Error for SocketWaitError {}

/// How often [`wait_for_socket`] tries.
const SOCKET_POLL: Duration = Duration::from_millis(20);

/// Waits until the Unix socket at `path` accepts a connection, at most `limit`; gives up at
/// once when `child` (the process that should listen there) has exited.
pub fn wait_for_socket(path: &Path, mut child: Option<&mut Child>, limit: Duration) -> Result<(), SocketWaitError> {
    let start = Instant::now();
    loop {
        if let Some(Ok(Some(status))) = child.as_deref_mut().map(Child::try_wait) {
            return Err(SocketWaitError::Exited(status));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(SocketWaitError::Timeout { path: path.to_path_buf(), waited: limit });
        }
        std::thread::sleep(SOCKET_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_wait_ends_when_the_process_exits_or_the_deadline_passes() {
        let dir = TempDir::new("keygate-kit-wait").expect("dir");
        let sock = dir.path().join("none.sock");
        let mut done = Command::new("true").spawn().expect("true");
        let _ = done.wait();
        assert!(matches!(
            wait_for_socket(&sock, Some(&mut done), Duration::from_secs(5)),
            Err(SocketWaitError::Exited(_))
        ));
        assert!(matches!(
            wait_for_socket(&sock, None, Duration::from_millis(50)),
            Err(SocketWaitError::Timeout { .. })
        ));
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(wait_for_socket(&sock, None, Duration::from_secs(1)).is_ok());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists(), "the directory goes with its owner");
    }
}
