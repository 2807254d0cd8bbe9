//! End to end: the files `keygate` writes are whole or absent. A command run under a file
//! size limit (RLIMIT_FSIZE set by `sh -c 'ulimit -f'`, SIGXFSZ ignored, so a write past it
//! fails with EFBIG, as on a full disk) exits 3 (I/O), leaves the previous file byte for byte
//! and no temporary file beside it; `keygen` never replaces a key.

use std::path::Path;
use std::process::Command;

use keygate_tests::e2e::{exited, ok, path_arg};
use keygate_tests::{bin, keygate, run_with_limit, TempDir};

/// `keygate ARGS` with writes limited to `blocks` 512-byte blocks (dash's `ulimit -f` unit;
/// bash's is 1024: both far below the files written here).
fn keygate_limited(blocks: u32, args: &[&str]) -> std::process::Output {
    let script = format!("trap '' XFSZ; ulimit -f {blocks} && exec \"$0\" \"$@\"");
    run_with_limit(
        Command::new("sh").args(["-c", &script]).arg(bin("keygate")).args(args),
        std::time::Duration::from_secs(30),
    )
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mock_doc_args<'a>(seed: &'a str, pcr: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["attestation", "mock", "--seed", seed, "--pcr", pcr, "--nonce", "0102", "-o", out]
}

#[test]
fn a_full_disk_leaves_the_previous_file_and_no_temporary_file() {
    let tmp = TempDir::new("keygate-atomic-writes").expect("tmp");
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).expect("dir");
    let doc = dir.join("doc.cbor");
    let (pcr, doc_s) = (format!("0={}", "ab".repeat(48)), path_arg(&doc));
    ok(keygate(&mock_doc_args("first", &pcr, &doc_s)));
    let before = std::fs::read(&doc).expect("doc");
    assert!(before.len() > 2048, "a document larger than the limit below ({} bytes)", before.len());

    let o = keygate_limited(2, &mock_doc_args("second", &pcr, &doc_s));
    exited(&o, 3, &format!("writing {doc_s}: writing:"));
    assert_eq!(std::fs::read(&doc).expect("doc"), before, "the previous document is whole");
    assert_eq!(entries(&dir), ["doc.cbor"], "no temporary file is left");

    // The same with no previous file: nothing at all.
    let fresh = dir.join("fresh.cbor");
    exited(&keygate_limited(2, &mock_doc_args("third", &pcr, &path_arg(&fresh))), 3, "writing");
    assert_eq!(entries(&dir), ["doc.cbor"]);

    // Without the limit the same command replaces the file.
    ok(keygate(&mock_doc_args("second", &pcr, &doc_s)));
    assert_ne!(std::fs::read(&doc).expect("doc"), before);
    assert_eq!(entries(&dir), ["doc.cbor"]);
}

/// An enclave image is written as it is built (streamed): a full disk part-way leaves the
/// previous image.
#[test]
fn a_full_disk_during_an_image_build_leaves_the_previous_image() {
    let tmp = TempDir::new("keygate-atomic-eif").expect("tmp");
    let d = tmp.path();
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/bin")).expect("rootfs");
    std::fs::write(d.join("bzImage"), b"kernel").expect("kernel");
    std::fs::write(
        d.join("kernel.config"),
        b"#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 6.1.0 Kernel Configuration\n",
    )
    .expect("config");
    std::fs::write(rootfs.join("init"), b"#!/bin/sh\n").expect("init");
    // Incompressible (the ramdisk may be compressed): an image far beyond the limit below.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let payload: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(rootfs.join("usr/bin/payload"), payload).expect("payload");
    let out_dir = d.join("images");
    std::fs::create_dir(&out_dir).expect("images");
    let image = out_dir.join("cp.eif");
    let (kernel, config, root, image_s) =
        (path_arg(&d.join("bzImage")), path_arg(&d.join("kernel.config")), path_arg(&rootfs), path_arg(&image));
    let build = |cmdline: &'static str| {
        let args = [
            "eif",
            "build",
            "--kernel",
            &kernel,
            "--kernel-config",
            &config,
            "--cmdline",
            cmdline,
            "--build-time",
            "2026-11-01T00:00:00Z",
            "--ramdisk",
            &root,
            "-o",
            &image_s,
        ]
        .map(str::to_owned);
        args.to_vec()
    };
    let first = build("console=ttyS0");
    ok(keygate(&first.iter().map(String::as_str).collect::<Vec<_>>()));
    let before = std::fs::read(&image).expect("image");
    assert!(before.len() > 8 * 1024, "{}", before.len());
    let second = build("console=ttyS1");
    let o = keygate_limited(8, &second.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&image).expect("image"), before, "the previous image is whole");
    assert_eq!(entries(&out_dir), ["cp.eif"], "no temporary file is left");
}

#[test]
fn keygen_never_replaces_a_key() {
    let tmp = TempDir::new("keygate-atomic-keygen").expect("tmp");
    let key = tmp.path().join("a.pem");
    ok(keygate(&["keygen", "-o", &path_arg(&key)]));
    let before = std::fs::read(&key).expect("key");
    let o = keygate(&["keygen", "-o", &path_arg(&key)]);
    exited(&o, 3, "exists: it is not replaced");
    assert_eq!(std::fs::read(&key).expect("key"), before);
    assert_eq!(entries(tmp.path()), ["a.pem", "a.pub.pem"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777, 0o600);
}
