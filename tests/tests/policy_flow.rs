//! The whole pipeline flow from the CLI against a running KRE: genesis, a 2-of-3 signed
//! update, a 1-signature push refused, the activation delay, an immediate revocation,
//! rollback and replay refused, and a restarted KRE restored from the parent's store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keygate_tests::{bin, keygate};

const SEED: &str = "policy-e2e";

fn hex48(b: u8) -> String {
    hex::encode([b; 48])
}

fn pcrs(b: u8) -> String {
    (0..3).map(|i| format!("{i}={}", hex48(b))).collect::<Vec<_>>().join(",")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(needle), "expected `{needle}` in: {e}");
}

/// A KRE and the parent's audit follower (releases and state steps are withheld without one).
struct Kre(Child, PathBuf, #[allow(dead_code)] keygate_tests::AuditFollower);

impl Drop for Kre {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_kre(dir: &Path, genesis: &Path) -> Kre {
    let sock = dir.join("kre.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(bin("keygate-enclave-dev"))
        .args([
            "--listen",
            &format!("unix:{}", sock.display()),
            "--genesis",
            &s(genesis),
            "--nsm",
            "mock",
            "--mock-seed",
            SEED,
        ])
        .args(["--mock-pcr", &format!("0={}", hex48(0x4b))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kre");
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(start.elapsed() < Duration::from_secs(15), "KRE did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let follower =
        keygate_tests::AuditFollower::start(&format!("unix:{}.parent", sock.display()), &dir.join("followed"));
    Kre(child, sock, follower)
}

fn fetch(kre: &Kre, pcr: u8, out: &Path) -> Output {
    let mut args: Vec<String> = [
        "fetch",
        "--kre",
        &format!("unix:{}", kre.1.display()),
        "--cluster",
        "prod",
        "--key-id",
        "etcd",
        "--out",
        &s(out),
        "--nsm",
        "mock",
        "--mock-seed",
        SEED,
        "--retries",
        "0",
        "--expect-kre-pcr",
        &format!("0={}", hex48(0x4b)),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    for i in 0..3 {
        args.push("--mock-pcr".into());
        args.push(format!("{i}={}", hex48(pcr)));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    keygate(&refs)
}

#[test]
fn pipeline_flow_against_a_running_kre() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let p = |n: &str| d.join(n);
    for i in 1..=3 {
        ok(keygate(&["keygen", "-o", &s(&p(&format!("a{i}.pem")))]));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(p("a1.pem")).expect("key").permissions().mode() & 0o777, 0o600);
    ok(keygate(&[
        "policy",
        "init",
        "--approver",
        &s(&p("a1.pub.pem")),
        "--approver",
        &s(&p("a2.pub.pem")),
        "--approver",
        &s(&p("a3.pub.pem")),
        "--threshold",
        "2",
        "--activation-delay",
        "4s",
        "-o",
        &s(&p("genesis.bundle")),
    ]));
    let kre = start_kre(d, &p("genesis.bundle"));
    let store = p("store");

    // Genesis allows nothing.
    refused(fetch(&kre, 0xa, &p("k0")), "unknown_cluster");

    // v2 allows images A and B; signed 1-of-3 first (refused), then 2-of-3.
    ok(keygate(&[
        "policy",
        "propose",
        "--from",
        &s(&p("genesis.bundle")),
        "--allow",
        &format!("prod=img-a@{}", pcrs(0xa)),
        "--allow",
        &format!("prod=img-b@{}", pcrs(0xb)),
        "-o",
        &s(&p("v2.proposal")),
    ]));
    for (k, sig) in [("a1.pem", "s1"), ("a3.pem", "s3")] {
        ok(keygate(&["policy", "sign", &s(&p("v2.proposal")), "--key", &s(&p(k)), "--yes", "-o", &s(&p(sig))]));
    }
    ok(keygate(&["policy", "assemble", &s(&p("v2.proposal")), &s(&p("s1")), "-o", &s(&p("v2-one.bundle"))]));
    refused(
        keygate(&["policy", "push", &s(&p("v2-one.bundle")), "--kre", &format!("unix:{}.parent", kre.1.display())]),
        "policy_refused: 1 valid approver signature(s), 2 required",
    );
    ok(keygate(&["policy", "assemble", &s(&p("v2.proposal")), &s(&p("s1")), &s(&p("s3")), "-o", &s(&p("v2.bundle"))]));
    ok(keygate(&["policy", "verify", &s(&p("v2.bundle")), "--current", &s(&p("genesis.bundle"))]));
    let out = ok(keygate(&[
        "policy",
        "push",
        &s(&p("v2.bundle")),
        "--kre",
        &format!("unix:{}.parent", kre.1.display()),
        "--store",
        &s(&store),
    ]));
    assert!(out.contains("accepted: version 2"), "{out}");

    // Added images wait for the activation delay (4 s), then get keys.
    refused(fetch(&kre, 0xa, &p("k1")), "activation delay");
    std::thread::sleep(Duration::from_millis(4100));
    ok(fetch(&kre, 0xa, &p("k2")));
    ok(fetch(&kre, 0xb, &p("k3")));

    // v3 revokes A: in force at once.
    ok(keygate(&[
        "policy",
        "propose",
        "--from",
        &s(&p("v2.bundle")),
        "--revoke",
        "prod=img-a",
        "--activation-delay",
        "1d",
        "-o",
        &s(&p("v3.proposal")),
    ]));
    for (k, sig) in [("a2.pem", "t2"), ("a3.pem", "t3")] {
        ok(keygate(&[
            "policy",
            "sign",
            &s(&p("v3.proposal")),
            "--key",
            &s(&p(k)),
            "--current",
            &s(&p("v2.bundle")),
            "--yes",
            "-o",
            &s(&p(sig)),
        ]));
    }
    ok(keygate(&["policy", "assemble", &s(&p("v3.proposal")), &s(&p("t2")), &s(&p("t3")), "-o", &s(&p("v3.bundle"))]));
    let out = ok(keygate(&[
        "policy",
        "push",
        &s(&p("v3.bundle")),
        "--kre",
        &format!("unix:{}.parent", kre.1.display()),
        "--store",
        &s(&store),
    ]));
    assert!(out.contains("in force now"), "{out}");
    refused(fetch(&kre, 0xa, &p("k4")), "image_not_allowed");
    ok(fetch(&kre, 0xb, &p("k5")));

    // Replay and rollback are refused.
    refused(
        keygate(&["policy", "push", &s(&p("v3.bundle")), "--kre", &format!("unix:{}.parent", kre.1.display())]),
        "replay",
    );
    refused(
        keygate(&["policy", "push", &s(&p("v2.bundle")), "--kre", &format!("unix:{}.parent", kre.1.display())]),
        "rollback",
    );

    // A restarted KRE starts from genesis; the parent restores the stored chain.
    drop(kre);
    let kre = start_kre(d, &p("genesis.bundle"));
    refused(fetch(&kre, 0xb, &p("k6")), "unknown_cluster");
    let out = ok(keygate(&[
        "policy",
        "restore",
        "--kre",
        &format!("unix:{}.parent", kre.1.display()),
        "--store",
        &s(&store),
    ]));
    assert!(out.contains("restored 2 bundle(s)"), "{out}");
    refused(fetch(&kre, 0xa, &p("k7")), "image_not_allowed");
    // Fail-safe: a KRE without sealed state cannot know when v2 was first accepted, so the
    // images the restored chain adds wait for the largest delay again (v3 carries 1 day).
    refused(fetch(&kre, 0xb, &p("k8")), "activation delay");
}
