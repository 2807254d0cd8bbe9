//! Deterministic ramdisks: a directory tree becomes a gzip-compressed cpio "newc"
//! archive whose bytes depend only on the tree's names, contents, symlink targets and
//! executable bits — not on mtimes, owners, inode numbers, umask or the order the
//! file system lists entries in.
//!
//! Normalisation: entries sorted by the bytes of their relative path (so a directory
//! precedes its contents); mtime 0; uid and gid 0; inode numbers 1, 2, 3… in archive
//! order; directories `0755`, files `0755` if any execute bit is set else `0644`,
//! symlinks `0777`; no setuid, setgid or sticky bits; every link count 1 (2 for
//! directories), so no hard links are recorded. The gzip header carries no file name,
//! mtime 0 and OS byte 255 ("unknown"). The deflate stream comes from `flate2`'s
//! default pure-Rust backend (miniz_oxide) at level 9: its output is pinned by
//! `Cargo.lock`, so an upgrade of that crate may change the ramdisk bytes (and the
//! PCRs) — the golden test below catches that.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::EifError;

/// At most this many entries in one directory tree.
pub const MAX_ENTRIES: usize = 1_000_000;
/// At most this many bytes in one relative path.
pub const MAX_PATH_LEN: usize = 4096;
/// At most this deep a tree.
pub const MAX_DEPTH: usize = 128;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

#[derive(Debug)]
enum EntryKind {
    Dir,
    File { executable: bool },
    Symlink { target: Vec<u8> },
}

#[derive(Debug)]
struct Entry {
    /// Path relative to the root, `/`-separated, no leading `./`.
    name: Vec<u8>,
    full: PathBuf,
    kind: EntryKind,
}

/// Build the gzip-compressed cpio newc archive of the tree under `root` (the root
/// itself is not an entry: its children appear as `bin`, `init`, …).
pub fn ramdisk_from_dir(root: &Path) -> Result<Vec<u8>, EifError> {
    let entries = collect(root)?;
    let mut gz = flate2::GzBuilder::new().mtime(0).operating_system(255).write(Vec::new(), flate2::Compression::best());
    let mut ino: u32 = 0;
    for entry in &entries {
        ino = ino.checked_add(1).ok_or_else(|| limit(root, "too many entries"))?;
        write_entry(&mut gz, ino, entry)?;
    }
    write_trailer(&mut gz)?;
    gz.finish().map_err(EifError::io("compressing the ramdisk"))
}

fn limit(path: &Path, reason: &'static str) -> EifError {
    EifError::RamdiskLimit { path: path.display().to_string(), reason }
}

/// Walk the tree without following symlinks; return entries sorted by name bytes.
fn collect(root: &Path) -> Result<Vec<Entry>, EifError> {
    let meta = std::fs::symlink_metadata(root).map_err(EifError::io("reading the ramdisk root"))?;
    if !meta.is_dir() {
        return Err(EifError::UnsupportedFileType { path: root.display().to_string() });
    }
    let mut out = Vec::new();
    // (directory, its relative name, depth)
    let mut stack: Vec<(PathBuf, Vec<u8>, usize)> = vec![(root.to_path_buf(), Vec::new(), 0)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        if depth >= MAX_DEPTH {
            return Err(limit(&dir, "directory tree too deep"));
        }
        let listing = std::fs::read_dir(&dir).map_err(EifError::io("listing a ramdisk directory"))?;
        for item in listing {
            let item = item.map_err(EifError::io("listing a ramdisk directory"))?;
            let full = item.path();
            let mut name = prefix.clone();
            if !name.is_empty() {
                name.push(b'/');
            }
            name.extend_from_slice(item.file_name().as_bytes());
            if name.len() > MAX_PATH_LEN {
                return Err(limit(&full, "path too long"));
            }
            if out.len() >= MAX_ENTRIES {
                return Err(limit(root, "too many entries"));
            }
            let meta = std::fs::symlink_metadata(&full).map_err(EifError::io("reading ramdisk file metadata"))?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                stack.push((full.clone(), name.clone(), depth + 1));
                EntryKind::Dir
            } else if ft.is_file() {
                EntryKind::File { executable: meta.permissions().mode() & 0o111 != 0 }
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&full).map_err(EifError::io("reading a ramdisk symlink"))?;
                EntryKind::Symlink { target: target.as_os_str().as_bytes().to_vec() }
            } else {
                return Err(EifError::UnsupportedFileType { path: full.display().to_string() });
            };
            out.push(Entry { name, full, kind });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn hex8(v: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    let s = format!("{v:08X}");
    for (d, s) in out.iter_mut().zip(s.bytes()) {
        *d = s;
    }
    out
}

fn padding(len: u64) -> &'static [u8] {
    match len % 4 {
        1 => &[0, 0, 0],
        2 => &[0, 0],
        3 => &[0],
        _ => &[],
    }
}

/// One newc header + name + padding.
fn write_header<W: Write>(
    w: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    name: &[u8],
) -> Result<(), EifError> {
    let io = EifError::io("writing the ramdisk");
    let namesize = u32::try_from(name.len() + 1).map_err(|_| EifError::RamdiskLimit {
        path: String::from_utf8_lossy(name).into_owned(),
        reason: "path too long",
    })?;
    let mut h = Vec::with_capacity(110 + name.len() + 4);
    h.extend_from_slice(b"070701");
    for field in [
        ino, mode, 0, /* uid */ 0, /* gid */ nlink, 0, /* mtime */ filesize, 0, 0, 0, 0, namesize,
        0, /* check */
    ] {
        h.extend_from_slice(&hex8(field));
    }
    h.extend_from_slice(name);
    h.push(0);
    let len = u64::try_from(h.len()).unwrap_or(0);
    h.extend_from_slice(padding(len));
    w.write_all(&h).map_err(io)
}

fn write_entry<W: Write>(w: &mut W, ino: u32, entry: &Entry) -> Result<(), EifError> {
    match &entry.kind {
        EntryKind::Dir => write_header(w, ino, S_IFDIR | 0o755, 2, 0, &entry.name),
        EntryKind::Symlink { target } => {
            let size = u32::try_from(target.len()).map_err(|_| limit(&entry.full, "symlink target too long"))?;
            write_header(w, ino, S_IFLNK | 0o777, 1, size, &entry.name)?;
            w.write_all(target)
                .and_then(|()| w.write_all(padding(u64::from(size))))
                .map_err(EifError::io("writing the ramdisk"))
        }
        EntryKind::File { executable } => {
            let mut file = std::fs::File::open(&entry.full).map_err(EifError::io("opening a ramdisk file"))?;
            let len = file.metadata().map_err(EifError::io("reading ramdisk file metadata"))?.len();
            // newc sizes are 32 bits.
            let size =
                u32::try_from(len).map_err(|_| limit(&entry.full, "file larger than 4 GiB (cpio newc limit)"))?;
            let perm = if *executable { 0o755 } else { 0o644 };
            write_header(w, ino, S_IFREG | perm, 1, size, &entry.name)?;
            let copied = std::io::copy(&mut std::io::Read::take(&mut file, len), w)
                .map_err(EifError::io("copying a ramdisk file"))?;
            let mut probe = [0u8; 1];
            let more = std::io::Read::read(&mut file, &mut probe).map_err(EifError::io("copying a ramdisk file"))?;
            if copied != len || more != 0 {
                return Err(EifError::InputChanged { what: entry.full.display().to_string() });
            }
            w.write_all(padding(len)).map_err(EifError::io("writing the ramdisk"))
        }
    }
}

fn write_trailer<W: Write>(w: &mut W) -> Result<(), EifError> {
    write_header(w, 0, 0, 1, 0, b"TRAILER!!!")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::create_dir_all(root.join("etc/empty")).expect("mkdir");
        std::fs::write(root.join("init"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::write(root.join("etc/hostname"), b"enclave\n").expect("write");
        std::fs::write(root.join("bin/tool"), vec![0xabu8; 70_000]).expect("write");
        std::os::unix::fs::symlink("../init", root.join("bin/init-link")).expect("symlink");
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).expect("gunzip");
        out
    }

    #[test]
    fn archive_is_sorted_normalised_newc() {
        let dir = tempfile::tempdir().expect("tempdir");
        tree(dir.path());
        let gz = ramdisk_from_dir(dir.path()).expect("ramdisk");
        // gzip header: magic, deflate, no flags, mtime 0, xfl, OS 255.
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
        assert_eq!(gz[9], 255);
        let cpio = gunzip(&gz);
        let mut names = Vec::new();
        let mut pos = 0usize;
        loop {
            let h = &cpio[pos..pos + 110];
            assert_eq!(&h[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).expect("hex"), 16).expect("hex")
            };
            let (mode, uid, gid, mtime, size, namesize) = (field(1), field(2), field(3), field(5), field(6), field(11));
            assert_eq!((uid, gid, mtime), (0, 0, 0));
            let nlen = usize::try_from(namesize).expect("usize");
            let name = String::from_utf8(cpio[pos + 110..pos + 110 + nlen - 1].to_vec()).expect("utf8");
            pos = (pos + 110 + nlen + 3) & !3;
            pos = (pos + usize::try_from(size).expect("usize") + 3) & !3;
            if name == "TRAILER!!!" {
                break;
            }
            names.push((name, mode));
        }
        assert_eq!(pos, cpio.len());
        assert_eq!(
            names,
            vec![
                ("bin".to_owned(), 0o040755),
                ("bin/init-link".to_owned(), 0o120777),
                ("bin/tool".to_owned(), 0o100644),
                ("etc".to_owned(), 0o040755),
                ("etc/empty".to_owned(), 0o040755),
                ("etc/hostname".to_owned(), 0o100644),
                ("init".to_owned(), 0o100755),
            ]
        );
    }

    #[test]
    fn same_tree_elsewhere_with_other_mtimes_gives_the_same_bytes() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        tree(a.path());
        tree(b.path());
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(b.path().join("etc/hostname"))
            .expect("open")
            .set_modified(old)
            .expect("set mtime");
        std::fs::set_permissions(b.path().join("etc/hostname"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(ramdisk_from_dir(a.path()).expect("a"), ramdisk_from_dir(b.path()).expect("b"));
    }

    #[test]
    fn golden_digest_of_a_fixed_tree() {
        // Changes only if the archive format or the deflate backend's output changes;
        // either changes every image's PCRs, so it must be a deliberate decision.
        let dir = tempfile::tempdir().expect("tempdir");
        tree(dir.path());
        let gz = ramdisk_from_dir(dir.path()).expect("ramdisk");
        let digest = hex::encode(<sha2::Sha384 as sha2::Digest>::digest(&gz));
        assert_eq!(digest, GOLDEN);
    }

    const GOLDEN: &str =
        "004613fc660138f7726ca95695b6bdce5f8245b982122e784299de59dde65fb7a32bc29de0d0fd9846075fe2827c09cf";

    #[test]
    fn rejects_special_files_and_non_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(ramdisk_from_dir(&file), Err(EifError::UnsupportedFileType { .. })));
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).expect("bind");
        assert!(matches!(
            ramdisk_from_dir(dir.path()),
            Err(EifError::UnsupportedFileType { path }) if path.ends_with("sock")
        ));
    }
}
