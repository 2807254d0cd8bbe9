//! Writing a whole file so that a reader, a crash or a full disk finds either the old file or
//! the new one, never a part: the bytes go to a new temporary file in the same directory
//! (created exclusively, with the file's mode), are fsynced, the temporary file is renamed
//! onto the target (or hard-linked to it where an existing file must not be replaced), and the
//! directory is fsynced. A failure at any step before the rename removes the temporary file,
//! so nothing is left behind; the previous file, if any, is untouched.
//!
//! It decides the order of the steps and which error names which step; it trusts the file
//! system's rename and link to be atomic within one directory (POSIX). Appends (the audit
//! trail's logs) do not come here: an append's torn tail is the reader's to detect.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The step of an atomic write that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Creating the temporary file beside the target.
    CreateTemporary,
    /// Writing the bytes into it (a full disk, a file size limit).
    Write,
    /// Flushing them to the disk.
    Sync,
    /// Putting the temporary file in the target's place.
    Rename,
    /// Flushing the directory, which makes the rename durable (the new file is in place).
    SyncDirectory,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::CreateTemporary => "creating a temporary file beside it",
            Step::Write => "writing",
            Step::Sync => "syncing",
            Step::Rename => "renaming into place",
            Step::SyncDirectory => "syncing its directory",
        })
    }
}

/// Why a file was not written (or, for [`Step::SyncDirectory`], written but not yet durable).
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    /// A step failed; before [`Step::Rename`] the previous file is untouched and no temporary
    /// file is left.
    #[error("writing {}: {step}: {source}", path.display())]
    Io {
        /// The target.
        path: PathBuf,
        /// The step.
        step: Step,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The target exists and the write was asked not to replace it.
    #[error("{} exists: it is not replaced", .0.display())]
    Exists(PathBuf),
    /// The path names no file (it ends in `..` or is a root).
    #[error("{} is not a file name", .0.display())]
    NotAFile(PathBuf),
}

impl AtomicWriteError {
    /// The target.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. } | Self::Exists(path) | Self::NotAFile(path) => path,
        }
    }
}

/// How the file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// The new file's mode (before the umask), e.g. 0o600 for a private key.
    pub mode: u32,
    /// Replace an existing file (else [`AtomicWriteError::Exists`], and the file is untouched).
    pub replace: bool,
}

impl Default for WriteOptions {
    /// Mode 0o644 (before the umask), replacing an existing file.
    fn default() -> Self {
        Self { mode: 0o644, replace: true }
    }
}

impl WriteOptions {
    /// Mode 0o600, replacing: a secret.
    pub const PRIVATE: Self = Self { mode: 0o600, replace: true };
}

/// Writes `bytes` to `path` with the default options (mode 0o644 before the umask, replacing).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    write_file_with(path, bytes, WriteOptions::default())
}

/// The temporary file's name beside `name`: hidden, unique within this process, and naming
/// the process, so a crashed writer's leftover is recognisable (`.NAME.tmp-PID-N`).
fn temporary_name(name: &std::ffi::OsStr) -> std::ffi::OsString {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut t = std::ffi::OsString::from(".");
    t.push(name);
    t.push(format!(".tmp-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    t
}

/// Writes `bytes` to `path` atomically (see the module's documentation).
pub fn write_file_with(path: &Path, bytes: &[u8], opts: WriteOptions) -> Result<(), AtomicWriteError> {
    let failed_write = |source| AtomicWriteError::Io { path: path.to_path_buf(), step: Step::Write, source };
    write_file_streamed(path, opts, |f: &mut File| f.write_all(bytes).map_err(failed_write))
}

/// Writes to `path` atomically what `fill` writes into the temporary file (a large output
/// written as it is made, e.g. an enclave image), with `fill`'s own error type; `fill` must
/// not keep the file. A `fill` that fails is a failed write: its error is returned, the
/// temporary file removed.
pub fn write_file_streamed<T, E: From<AtomicWriteError>>(
    path: &Path,
    opts: WriteOptions,
    fill: impl FnOnce(&mut File) -> Result<T, E>,
) -> Result<T, E> {
    let name = path.file_name().ok_or_else(|| AtomicWriteError::NotAFile(path.to_path_buf()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fail = |step| move |source| AtomicWriteError::Io { path: path.to_path_buf(), step, source };
    if !opts.replace && path.symlink_metadata().is_ok() {
        return Err(AtomicWriteError::Exists(path.to_path_buf()).into());
    }
    let tmp = dir.join(temporary_name(name));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(opts.mode)
        .open(&tmp)
        .map_err(fail(Step::CreateTemporary))?;
    let written = fill(&mut f).and_then(|t| f.sync_all().map(|()| t).map_err(|e| E::from(fail(Step::Sync)(e))));
    drop(f);
    let placed = written.and_then(|t| {
        if opts.replace {
            std::fs::rename(&tmp, path).map(|()| t).map_err(|e| E::from(fail(Step::Rename)(e)))
        } else {
            // A link fails if the target appeared meanwhile: never replaced.
            std::fs::hard_link(&tmp, path).map(|()| t).map_err(|e| {
                E::from(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    AtomicWriteError::Exists(path.to_path_buf())
                } else {
                    fail(Step::Rename)(e)
                })
            })
        }
    });
    // After a rename the temporary name is gone; after a link or a failure it is removed.
    if !(opts.replace && placed.is_ok()) {
        let _ = std::fs::remove_file(&tmp);
    }
    let t = placed?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| E::from(fail(Step::SyncDirectory)(e)))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_replaces_leaving_only_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("out.bin");
        write_file(&p, b"first").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"first");
        write_file(&p, b"second, longer").expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"second, longer");
        assert_eq!(entries(dir.path()), ["out.bin"], "no temporary file is left");
    }

    #[test]
    fn the_mode_is_the_one_asked_for() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("key");
        write_file_with(&p, b"secret", WriteOptions::PRIVATE).expect("write");
        assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn an_existing_file_is_kept_when_it_must_not_be_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("key");
        let once = WriteOptions { mode: 0o600, replace: false };
        write_file_with(&p, b"one", once).expect("new");
        let err = write_file_with(&p, b"two", once).expect_err("exists");
        assert!(matches!(&err, AtomicWriteError::Exists(e) if e == &p), "{err:?}");
        assert_eq!(std::fs::read(&p).expect("read"), b"one");
        assert_eq!(entries(dir.path()), ["key"]);
    }

    /// A failure after the temporary file was created (here the rename: the target is a
    /// non-empty directory) removes it and leaves the target as it was.
    #[test]
    fn a_failed_rename_leaves_the_old_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("out");
        std::fs::create_dir(&p).expect("dir");
        std::fs::write(p.join("inside"), b"old").expect("inside");
        let err = write_file(&p, b"new").expect_err("a directory is not replaced");
        assert!(matches!(err, AtomicWriteError::Io { step: Step::Rename, .. }), "{err:?}");
        assert!(err.to_string().starts_with(&format!("writing {}: renaming into place: ", p.display())), "{err}");
        assert_eq!(std::fs::read(p.join("inside")).expect("read"), b"old");
        assert_eq!(entries(dir.path()), ["out"], "no temporary file is left");
    }

    /// A directory the writer may not write into: refused at the first step, nothing changed.
    #[test]
    fn an_unwritable_directory_is_refused_before_anything_changes() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("out");
        std::fs::write(&p, b"old").expect("old");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).expect("chmod");
        let result = write_file(&p, b"new");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod back");
        match result {
            // root ignores the directory's mode: then the write simply succeeds.
            Ok(()) => assert_eq!(std::fs::read(&p).expect("read"), b"new"),
            Err(err) => {
                assert!(matches!(err, AtomicWriteError::Io { step: Step::CreateTemporary, .. }), "{err:?}");
                assert_eq!(std::fs::read(&p).expect("read"), b"old");
            }
        }
        assert_eq!(entries(dir.path()), ["out"]);
    }

    /// The child of [`a_full_disk_leaves_the_old_file_and_no_temporary_file`]: the target.
    const FULL_DISK_CHILD: &str = "KEYGATE_ATOMIC_FULL_DISK_TARGET";

    /// A full disk, as a file size limit (RLIMIT_FSIZE, set by a shell for this test binary run
    /// again, with SIGXFSZ ignored so the write fails with EFBIG): the write fails part-way,
    /// the old file is whole and no temporary file is left.
    #[test]
    fn a_full_disk_leaves_the_old_file_and_no_temporary_file() {
        if let Some(target) = std::env::var_os(FULL_DISK_CHILD) {
            let err = write_file(Path::new(&target), &[2u8; 64 * 1024]).expect_err("beyond the size limit");
            assert!(matches!(err, AtomicWriteError::Io { step: Step::Write, .. }), "{err:?}");
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("out");
        std::fs::write(&p, [1u8; 8192]).expect("old");
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new("sh")
            .args(["-c", "trap '' XFSZ; ulimit -f 4 && exec \"$0\" --exact \"$1\" --nocapture --test-threads 1"])
            .arg(&exe)
            .arg("atomic::tests::a_full_disk_leaves_the_old_file_and_no_temporary_file")
            .env(FULL_DISK_CHILD, &p)
            .output()
            .expect("sh");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.contains("1 passed"), "{said}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&p).expect("read"), [1u8; 8192], "the old file is whole");
        assert_eq!(entries(dir.path()), ["out"], "no temporary file is left");
    }

    /// A streamed write whose filler fails: its own error, no temporary file, the old file.
    #[test]
    fn a_failed_streamed_write_is_its_fillers_error() {
        #[derive(Debug, PartialEq)]
        enum Mine {
            Gave,
            Atomic(String),
        }
        impl Mine {
            fn from_io(e: std::io::Error) -> Self {
                Mine::Atomic(e.to_string())
            }
        }
        impl From<AtomicWriteError> for Mine {
            fn from(e: AtomicWriteError) -> Self {
                Mine::Atomic(e.to_string())
            }
        }
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("image.eif");
        std::fs::write(&p, b"old").expect("old");
        let r: Result<(), Mine> = write_file_streamed(&p, WriteOptions::default(), |f| {
            f.write_all(b"half").map_err(|e| Mine::Atomic(e.to_string()))?;
            Err(Mine::Gave)
        });
        assert_eq!(r, Err(Mine::Gave));
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        assert_eq!(entries(dir.path()), ["image.eif"]);
        let n = write_file_streamed(&p, WriteOptions::default(), |f| {
            f.write_all(b"new").map(|()| 3).map_err(Mine::from_io)
        })
        .expect("streamed");
        assert_eq!((n, std::fs::read(&p).expect("read")), (3, b"new".to_vec()));
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        for p in ["/", "..", "a/.."] {
            assert!(matches!(write_file(Path::new(p), b"x"), Err(AtomicWriteError::NotAFile(_))), "{p}");
        }
    }
}
