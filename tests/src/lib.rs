//! Helpers for the end-to-end tests: locating the real binaries, running them with bounded
//! time, and the shared test vectors.
#![forbid(unsafe_code)]

mod cleanup;
pub mod cluster;
pub mod e2e;
pub mod etcd;
pub mod members;
mod process;
pub mod relay;
pub mod scrape;
pub mod silent;

pub use cleanup::{clean_up, die_with_parent_if_asked, track_for_cleanup, Cleaned, DIE_WITH_PARENT};
pub use process::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`),
/// found from the running test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// Path of a workspace binary; panics with instructions if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// The real Nitro vectors in `../shared/vectors/nitro` (beside the repository).
pub fn shared_vectors() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/nitro");
    assert!(
        p.join("doc-1.cbor").exists(),
        "shared vectors not found at {} (CI clones ../shared beside the repo)",
        p.display()
    );
    p
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{cmd:?} did not finish within {limit:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `keygate` with `args` (30 s limit).
pub fn keygate(args: &[&str]) -> Output {
    run_with_limit(Command::new(bin("keygate")).args(args), Duration::from_secs(30))
}

/// Runs `keygate` with `args` at trace log level (for scanning every log line for secrets).
pub fn keygate_traced(args: &[&str]) -> Output {
    run_with_limit(Command::new(bin("keygate")).args(args).env("KEYGATE_LOG", "trace"), Duration::from_secs(30))
}

/// `keygate audit pull --follow` on a KRE's parent channel, storing the trail in `dir`: the
/// parent's side of the write-ahead audit, without which the KRE withholds every release's
/// answer (`audit_unacknowledged`). Killed when dropped.
#[derive(Debug)]
pub struct AuditFollower {
    child: std::process::Child,
    dir: PathBuf,
}

impl AuditFollower {
    /// Starts following `parent` (`unix:PATH` or another address of the parent channel).
    pub fn start(parent: &str, dir: &Path) -> Self {
        let child = Command::new(bin("keygate"))
            .args(["audit", "pull", "--kre", parent, "--dir"])
            .arg(dir)
            .args(["--follow", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("keygate audit pull --follow");
        Self { child, dir: dir.to_path_buf() }
    }

    /// Where the trail is stored.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for AuditFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
