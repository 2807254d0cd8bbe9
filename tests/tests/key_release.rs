//! End to end: the real `keygate-enclave-dev` (the KRE with the mock NSM), `keygate-enclave`
//! (the production KRE, hardware NSM only) and `keygate` binaries over Unix sockets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keygate_attestation::mock::{system_clock, MockNsm};
use keygate_attestation::{AttestRequest, Nsm};
use keygate_enclave::wire::{self, DenyCode, Id, Message};
use keygate_tests::e2e::{
    dev_kre, exited, hex48, keygate_args as run_fetch, path_arg as s, pcr_args, pcr_list, prod_policy, stderr, unix,
    DevKre, Logged, START_LIMIT,
};
use keygate_tests::relay::{Attack, Relay};
use keygate_tests::{bin, keygate, run_with_limit, TempDir};

const SEED: &str = "e2e-seed";
const GOOD: u8 = 0x5a;
const KRE_PCR: u8 = 0x4b;

struct Kre {
    child: Logged,
    dir: TempDir,
    sock: PathBuf,
    /// The parent's audit follower (the KRE withholds releases without one).
    follower: Option<keygate_tests::AuditFollower>,
}

impl Kre {
    /// A KRE on a Unix socket in a new directory, with the parent's audit follower storing
    /// its trail in `<dir>/followed`.
    fn start(extra: &[&str]) -> Self {
        let mut kre = Self::start_unfollowed(extra);
        if !extra.contains(&"--listen") {
            kre.follower = Some(keygate_tests::AuditFollower::start(&kre.parent(), &kre.dir.path().join("followed")));
        }
        kre
    }

    /// A KRE whose audit nobody collects.
    fn start_unfollowed(extra: &[&str]) -> Self {
        let dir = TempDir::new("keygate-key-release").expect("tmp");
        let policy = serde_json::json!({
            "clusters": {
                "prod": { "images": [ { "name": "cp-good", "pcrs": { "0": hex48(GOOD), "1": hex48(GOOD), "2": hex48(GOOD) } } ] },
                "stage": { "images": [ { "name": "cp-stage", "pcrs": { "0": hex48(0x33), "1": hex48(0x33), "2": hex48(0x33) } } ] }
            }
        });
        let policy_path = dir.path().join("policy.json");
        std::fs::write(&policy_path, policy.to_string()).expect("policy");
        let sock = dir.path().join("kre.sock");
        let mut args: Vec<String> = Vec::new();
        if !extra.contains(&"--listen") {
            args.extend(["--listen".into(), unix(&sock)]);
        }
        args.extend(["--policy".into(), policy_path.display().to_string()]);
        args.extend(pcr_args("--mock-pcr", KRE_PCR, 3));
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Logged::start(dev_kre(SEED).args(&args).env("KEYGATE_LOG", "trace"), &dir.path().join("kre.log"));
        let mut kre = Kre { child, dir, sock, follower: None };
        kre.wait_ready(!extra.contains(&"--listen"));
        kre
    }

    /// Waits until the KRE listens: on its Unix socket, or (`on_unix` false: another
    /// `--listen`) until its log says it is ready.
    fn wait_ready(&mut self, on_unix: bool) {
        if on_unix {
            return self.child.wait_for_socket(&self.sock);
        }
        let start = Instant::now();
        while !self.log().contains("keygate-enclave ready") {
            assert!(start.elapsed() < START_LIMIT, "KRE did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.child.log()
    }

    fn addr(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    /// The parent channel (state, audit, status, policy delivery).
    fn parent(&self) -> String {
        format!("unix:{}.parent", self.sock.display())
    }
}

fn fetch_args(kre: &str, cluster: &str, pcr: u8, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "fetch".into(),
        "--kre".into(),
        kre.into(),
        "--cluster".into(),
        cluster.into(),
        "--key-id".into(),
        "etcd-kek".into(),
        "--key-id".into(),
        "secrets".into(),
        "--out".into(),
        out.display().to_string(),
        "--nsm".into(),
        "mock".into(),
        "--mock-seed".into(),
        SEED.into(),
        "--retries".into(),
        "0".into(),
        "--timeout".into(),
        "10".into(),
    ];
    a.extend(pcr_args("--mock-pcr", pcr, 3));
    a.extend(pcr_args("--expect-kre-pcr", KRE_PCR, 3));
    a
}

fn assert_refused(o: &Output, code: &str, out: &Path) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    let e = stderr(o);
    let last = e.trim().lines().last().unwrap_or_default().to_owned();
    assert!(last.contains(code), "expected `{code}` in: {e}");
    let files: Vec<_> = std::fs::read_dir(out).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(files.is_empty(), "no files may be written on failure: {files:?}");
}

/// A KRE upgrade: a client names the image it knew with `--expect-kre-pcr` and the new one
/// with `--expect-kre-image`, and gets keys from whichever runs; a KRE of neither image is
/// refused before anything is sent.
#[test]
fn a_client_accepts_either_kre_image_during_an_upgrade() {
    let kre = Kre::start(&[]);
    let d = kre.dir.path();
    let fetch_expecting = |first: u8, image: Option<String>, out: &Path| {
        let mut a = fetch_args(&kre.addr(), "prod", GOOD, out);
        a.truncate(a.len() - 6); // fetch_args' own three --expect-kre-pcr
        a.extend(pcr_args("--expect-kre-pcr", first, 3));
        if let Some(image) = image {
            a.extend(["--expect-kre-image".into(), image]);
        }
        run_fetch(&a)
    };
    // The running KRE (KRE_PCR) is the second image named: keys.
    let o = fetch_expecting(0x11, Some(pcr_list(KRE_PCR)), &d.join("k1"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("k1/etcd-kek.key").exists());
    // Named first, beside another: keys too.
    assert!(fetch_expecting(KRE_PCR, Some(pcr_list(0x11)), &d.join("k2")).status.success());
    // Neither image: refused, naming the first image's PCR0; no file written.
    let out = d.join("k3");
    let o = fetch_expecting(0x11, Some(pcr_list(0x22)), &out);
    assert!(stderr(&o).contains(&format!("PCR0 mismatch: expected {}", hex48(0x11))), "{}", stderr(&o));
    assert_refused(&o, "KRE attestation refused", &out);
    // Only the old image named: refused, as before the upgrade.
    assert_refused(&fetch_expecting(0x11, None, &out), "KRE attestation refused", &out);
    // An image that is not N=HEX,...: a usage error.
    exited(&fetch_expecting(0x11, Some("0=zz".into()), &out), 2, "--expect-kre-image");
}

#[test]
fn allowed_image_gets_keys_and_the_same_keys_on_a_second_boot() {
    let kre = Kre::start(&[]);
    let out1 = kre.dir.path().join("keys1");
    // At trace level, so that the scan below covers every log line either side writes.
    let args = fetch_args(&kre.addr(), "prod", GOOD, &out1);
    let o = keygate_tests::keygate_traced(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}\n{}", stderr(&o), kre.log());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("released prod/etcd-kek version 1"), "{stdout}");
    let k1 = std::fs::read(out1.join("etcd-kek.key")).expect("key file");
    assert_eq!(k1.len(), 32);
    assert_eq!(std::fs::read(out1.join("etcd-kek.v1.key")).expect("versioned key file"), k1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(out1.join("etcd-kek.key")).expect("meta").permissions().mode() & 0o777, 0o600);
    // Key bytes appear nowhere in what the tools printed or logged at trace level: not as
    // hex (either case), not as base64, not raw.
    let k2 = std::fs::read(out1.join("secrets.key")).expect("key file");
    let outputs = [stdout.to_string(), stderr(&o), kre.log()];
    assert!(kre.log().contains("TRACE") || kre.log().contains("DEBUG"), "the KRE log is at trace level");
    for key in [&k1, &k2] {
        use base64::Engine as _;
        let forms = [
            hex::encode(key),
            hex::encode_upper(key),
            base64::engine::general_purpose::STANDARD.encode(key),
            String::from_utf8_lossy(key).into_owned(),
        ];
        for text in &outputs {
            for f in &forms {
                assert!(!text.contains(f.as_str()), "key material in an output");
            }
        }
    }

    let out2 = kre.dir.path().join("keys2");
    let o = run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out2));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out2.join("etcd-kek.key")).expect("key"), k1, "same key on a second boot");
    assert_ne!(std::fs::read(out2.join("secrets.key")).expect("key"), k1);
    assert!(kre.log().contains("keys released"), "{}", kre.log());
    // The KRE runs with core dumps disabled.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", kre.child.process.0.id())).expect("limits");
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core limit line");
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
}

#[test]
fn wrong_pcr0_wrong_cluster_and_debug_mode_are_refused_with_their_reason() {
    let kre = Kre::start(&[]);
    let out = kre.dir.path().join("k");
    assert_refused(&run_fetch(&fetch_args(&kre.addr(), "prod", 0x99, &out)), "image_not_allowed", &out);
    assert_refused(&run_fetch(&fetch_args(&kre.addr(), "stage", GOOD, &out)), "image_not_allowed", &out);
    assert_refused(&run_fetch(&fetch_args(&kre.addr(), "nope", GOOD, &out)), "unknown_cluster", &out);
    // Debug mode: no --mock-pcr at all (PCRs zero).
    let mut debug = Vec::new();
    let full = fetch_args(&kre.addr(), "prod", GOOD, &out);
    let mut i = 0;
    while i < full.len() {
        if full[i] == "--mock-pcr" {
            i += 2;
            continue;
        }
        debug.push(full[i].clone());
        i += 1;
    }
    assert_refused(&run_fetch(&debug), "debug_mode", &out);
    let log = kre.log();
    assert!(log.contains("request denied"), "{log}");
    // Fields are values: an unknown cluster's refusal names it, a missing one is left out,
    // never Rust's `Some(…)` / `None`.
    assert!(log.contains("cluster=\"nope\"") || log.contains("cluster=nope"), "{log}");
    assert!(!log.contains("Some(") && !log.contains("=None"), "{log}");
}

#[test]
fn kre_with_unexpected_pcrs_is_refused_by_the_client() {
    let kre = Kre::start(&[]);
    let out = kre.dir.path().join("k");
    let args: Vec<String> = fetch_args(&kre.addr(), "prod", GOOD, &out)
        .into_iter()
        .map(|a| a.replace(&hex48(KRE_PCR), &hex48(0x01)))
        .collect();
    let o = run_fetch(&args);
    assert_refused(&o, "KRE attestation refused: PCR0 mismatch", &out);
}

#[test]
fn unreachable_kre_fails_after_bounded_retries() {
    let dir = TempDir::new("keygate-key-release").expect("tmp");
    let out = dir.path().join("k");
    let mut args = fetch_args(&format!("unix:{}", dir.path().join("none.sock").display()), "prod", GOOD, &out);
    let r = args.iter().position(|a| a == "--retries").expect("retries") + 1;
    args[r] = "2".into();
    let start = Instant::now();
    let o = run_fetch(&args);
    assert_refused(&o, "connecting to", &out);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(stderr(&o).matches("retrying").count() == 2, "{}", stderr(&o));
}

#[test]
fn fetch_through_the_proxy() {
    let kre = Kre::start(&[]);
    let psock = kre.dir.path().join("parent.sock");
    let proxy = start_proxy(&psock, &kre.addr(), &[]);
    let out = kre.dir.path().join("k");
    let o = run_fetch(&fetch_args(&unix(&psock), "prod", GOOD, &out));
    let plog = proxy.stop();
    assert!(o.status.success(), "{}", stderr(&o));
    let key = std::fs::read(out.join("etcd-kek.key")).expect("key");
    assert!(plog.contains("connection opened") && plog.contains("bytes_to_kre"), "{plog}");
    assert!(!plog.contains(&hex::encode(&key)));
}

// ---- raw clients, for what `keygate fetch` never does ----

fn connect(kre: &Kre) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(&kre.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

fn send(s: &mut std::os::unix::net::UnixStream, frame: &[u8]) {
    use std::io::Write;
    s.write_all(frame).expect("write");
}

fn recv(s: &mut std::os::unix::net::UnixStream) -> Message {
    use std::io::Read;
    let mut p = [0u8; 4];
    s.read_exact(&mut p).expect("prefix");
    let mut body = vec![0u8; wire::frame_len(p).expect("len")];
    s.read_exact(&mut body).expect("body");
    Message::decode(&body).expect("message")
}

fn denial(m: Message) -> (DenyCode, String) {
    match m {
        Message::Denied { code, reason } => (code, reason),
        other => panic!("expected Denied, got {other:?}"),
    }
}

fn cpi() -> MockNsm {
    let pcrs: BTreeMap<u8, Vec<u8>> = (0..3).map(|i| (i, vec![GOOD; 48])).collect();
    MockNsm::new(SEED.as_bytes(), pcrs, system_clock()).with_instance("raw")
}

fn point() -> Vec<u8> {
    keygate_attestation::mock::public_point(&keygate_attestation::mock::derive_key(b"e2e", "client"))
}

/// Hello → Challenge; returns the server nonce.
fn hello(s: &mut std::os::unix::net::UnixStream) -> [u8; 32] {
    send(s, &Message::Hello { client_nonce: [3; 32] }.encode().expect("enc"));
    match recv(s) {
        Message::Challenge { server_nonce, .. } => server_nonce,
        m => panic!("{m:?}"),
    }
}

fn release_frame(nsm: &dyn Nsm, nonce: &[u8], user_data: Vec<u8>, cluster: &str) -> Vec<u8> {
    let doc = nsm
        .attest(&AttestRequest { nonce: Some(nonce.to_vec()), user_data: Some(user_data), public_key: Some(point()) })
        .expect("attest");
    let keys = vec![Id::new("etcd-kek").expect("id")];
    Message::Release { cluster_id: Id::new(cluster).expect("id"), key_ids: keys, attestation: doc }
        .encode()
        .expect("enc")
}

fn digest(cluster: &str) -> Vec<u8> {
    wire::request_digest(&Id::new(cluster).expect("id"), &[Id::new("etcd-kek").expect("id")]).to_vec()
}

#[test]
fn replayed_release_is_refused() {
    let kre = Kre::start(&[]);
    let nsm = cpi();
    let mut a = connect(&kre);
    let n = hello(&mut a);
    let frame = release_frame(&nsm, &n, digest("prod"), "prod");
    send(&mut a, &frame);
    assert!(matches!(recv(&mut a), Message::Released { .. }));
    let mut b = connect(&kre);
    hello(&mut b);
    send(&mut b, &frame);
    assert_eq!(denial(recv(&mut b)).0, DenyCode::NonceReused);
}

#[test]
fn expired_challenge_is_refused() {
    let kre = Kre::start(&["--challenge-ttl", "1"]);
    let mut s = connect(&kre);
    let n = hello(&mut s);
    std::thread::sleep(Duration::from_millis(2100));
    send(&mut s, &release_frame(&cpi(), &n, digest("prod"), "prod"));
    assert_eq!(denial(recv(&mut s)).0, DenyCode::ChallengeExpired);
}

#[test]
fn tampered_request_and_wrong_user_data_are_refused() {
    let kre = Kre::start(&[]);
    // The attestation binds "stage", the frame asks for "prod".
    let mut s = connect(&kre);
    let n = hello(&mut s);
    send(&mut s, &release_frame(&cpi(), &n, digest("stage"), "prod"));
    assert_eq!(denial(recv(&mut s)).0, DenyCode::UserDataMismatch);
    // user_data that is no digest at all.
    let mut s = connect(&kre);
    let n = hello(&mut s);
    send(&mut s, &release_frame(&cpi(), &n, b"let me in".to_vec(), "prod"));
    assert_eq!(denial(recv(&mut s)).0, DenyCode::UserDataMismatch);
}

#[test]
fn oversized_frames_garbage_and_slow_clients_get_denials_not_hangs() {
    let kre = Kre::start(&["--frame-timeout", "1"]);
    let mut s = connect(&kre);
    send(&mut s, &[0x7f, 0xff, 0xff, 0xff]);
    assert_eq!(denial(recv(&mut s)).0, DenyCode::FrameTooLarge);
    let mut s = connect(&kre);
    send(&mut s, &[0, 0, 0, 3, 9, 9, 9]);
    assert_eq!(denial(recv(&mut s)).0, DenyCode::UnsupportedVersion);
    // Slowloris: half a frame, then silence.
    let mut s = connect(&kre);
    send(&mut s, &[0, 0, 0, 34, 1]);
    let start = Instant::now();
    assert_eq!(denial(recv(&mut s)).0, DenyCode::Timeout);
    assert!(start.elapsed() < Duration::from_secs(5));
    // The KRE still serves.
    let out = kre.dir.path().join("k");
    let o = run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// At the connection limit, the connection that has waited longest for its next frame gives
/// its slot up (`busy`, "evicted") and the newcomer is served.
#[test]
fn connection_limit_evicts_the_longest_waiting() {
    let kre = Kre::start(&["--max-connections", "2"]);
    // Let the readiness probes' connections finish, then occupy both slots (a Challenge
    // received proves the connection holds a slot).
    std::thread::sleep(Duration::from_millis(300));
    let mut a = connect(&kre);
    hello(&mut a);
    // The KRE counts a connection as waiting from when its task asks for the next frame, just
    // after it sent the Challenge; on a loaded machine that task may run late, so give it time
    // to start waiting before b does (otherwise b is the longest waiting, and is evicted).
    std::thread::sleep(Duration::from_millis(500));
    let mut b = connect(&kre);
    hello(&mut b);
    std::thread::sleep(Duration::from_millis(500));
    let mut c = connect(&kre);
    hello(&mut c);
    let (code, reason) = denial(recv(&mut a));
    assert_eq!(code, DenyCode::Busy);
    assert!(reason.contains("evicted"), "{reason}");
}

#[test]
fn enclave_binary_refuses_bad_configuration() {
    let dir = TempDir::new("keygate-key-release").expect("tmp");
    let policy = dir.path().join("p.json");
    std::fs::write(&policy, r#"{"clusters": {"c": {"images": [{"name": "x", "pcrs": {"0": "00"}}]}}}"#).expect("write");
    let run = |name: &str, args: &[&str]| run_with_limit(Command::new(bin(name)).args(args), Duration::from_secs(10));
    let sock = format!("unix:{}", dir.path().join("s").display());
    // The policy is read after the NSM is open: only the mock NSM gets that far outside Nitro.
    let o = run(
        "keygate-enclave-dev",
        &["--listen", &sock, "--policy", policy.to_str().expect("utf8"), "--nsm", "mock", "--mock-seed", "s"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("PCR"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run("keygate-enclave", &["--listen", &sock, "--policy", policy.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/dev/nsm"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The production binary names its NSM backends and has no mock NSM: `--nsm mock` (alone, or
/// with the dev binary's flags) is refused before anything starts, with a message naming the
/// binary that has one. The development binary lists the mock.
#[test]
fn production_enclave_binary_has_no_mock_nsm() {
    const REFUSAL: &str = "keygate-enclave: error: this binary has no mock NSM (NSM backends: hardware); \
                           the development binary keygate-enclave-dev has one\n";
    let run = |name: &str, args: &[&str]| run_with_limit(Command::new(bin(name)).args(args), Duration::from_secs(10));
    let version = env!("CARGO_PKG_VERSION");

    let o = run("keygate-enclave", &["--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("keygate-enclave {version} (NSM backends: hardware)\n"));
    let o = run("keygate-enclave-dev", &["--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("keygate-enclave-dev {version} (NSM backends: hardware, mock)\n")
    );

    let dir = TempDir::new("keygate-key-release").expect("tmp");
    let policy = dir.path().join("p.json");
    std::fs::write(&policy, r#"{"clusters": {}}"#).expect("write");
    let sock = format!("unix:{}", dir.path().join("s").display());
    let policy = policy.to_str().expect("utf8");
    for args in [
        &["--nsm", "mock"][..],
        &["--listen", &sock, "--policy", policy, "--nsm", "mock"],
        &["--listen", &sock, "--policy", policy, "--nsm=mock"],
        &["--listen", &sock, "--policy", policy, "--nsm", "mock", "--mock-seed", "s"],
        &["--listen", &sock, "--policy", policy, "--mock-pcr", &format!("0={}", hex48(KRE_PCR))],
    ] {
        let o = run("keygate-enclave", args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), REFUSAL, "{args:?}");
        assert!(!dir.path().join("s").exists(), "{args:?}: nothing was bound");
    }
    // Any other backend name is refused too, listing the ones the binary has.
    let o = run("keygate-enclave", &["--listen", &sock, "--policy", policy, "--nsm", "tpm"]);
    exited(&o, 2, "--nsm tpm: no such NSM backend (NSM backends: hardware)");
    // The development binary has the mock NSM: the same command line reaches the mock's own check.
    let o = run("keygate-enclave-dev", &["--listen", &sock, "--policy", policy, "--nsm", "mock"]);
    exited(&o, 2, "--nsm mock needs --mock-seed");
}

#[test]
fn vsock_transport_is_skipped_without_loopback() {
    if let Err(why) = keygate_enclave::net::transport::vsock_loopback() {
        eprintln!("SKIPPED vsock end-to-end: {why}");
        return;
    }
    // Loopback exists (CID 1): the KRE listens on vsock as in production, fetch over vsock.
    let kre = Kre::start(&["--listen", "vsock:1:47124"]);
    let out = kre.dir.path().join("k");
    let o = run_fetch(&fetch_args("vsock:1:47124", "prod", GOOD, &out));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The pipeline path: build an image with `keygate eif build`, allow its measurements
/// (`keygate eif describe --json`), and a mock NSM that boots "from" it gets the keys.
#[test]
fn image_built_by_the_pipeline_gets_keys_via_mock_pcrs_from() {
    let dir = TempDir::new("keygate-key-release").expect("tmp");
    let d = dir.path();
    std::fs::create_dir_all(d.join("rootfs")).expect("dir");
    std::fs::write(d.join("bzImage"), b"kernel").expect("w");
    std::fs::write(d.join("k.config"), b"#\n#\n# Linux/x86_64 6.1.0 Kernel Configuration\n").expect("w");
    std::fs::write(d.join("rootfs/init"), b"#!/bin/sh\n").expect("w");
    let eif = d.join("cp.eif");
    let o = keygate(&[
        "eif",
        "build",
        "--kernel",
        &s(&d.join("bzImage")),
        "--kernel-config",
        &s(&d.join("k.config")),
        "--cmdline",
        "console=ttyS0",
        "--ramdisk",
        &s(&d.join("rootfs")),
        "-o",
        &s(&eif),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = keygate(&["eif", "describe", &s(&eif), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let m = &j["Measurements"];
    let pcr = |k: &str| m[k].as_str().expect("pcr").to_owned();

    // A KRE whose policy allows exactly that image.
    let policy = prod_policy("cp", [&pcr("PCR0"), &pcr("PCR1"), &pcr("PCR2")]);
    std::fs::write(d.join("policy.json"), policy.to_string()).expect("policy");
    let sock = d.join("kre.sock");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--policy", &s(&d.join("policy.json"))]).args(pcr_args(
        "--mock-pcr",
        KRE_PCR,
        1,
    ));
    let kre = DevKre::start(&mut cmd, &sock, &d.join("followed"));
    let out = d.join("keys");
    let o = keygate(&[
        "fetch",
        "--kre",
        &kre.addr(),
        "--cluster",
        "prod",
        "--key-id",
        "etcd-kek",
        "--out",
        &s(&out),
        "--nsm",
        "mock",
        "--mock-seed",
        SEED,
        "--mock-pcrs-from",
        &s(&eif),
        "--expect-kre-pcr",
        &format!("0={}", hex48(KRE_PCR)),
        "--retries",
        "0",
    ]);
    kre.kill();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("etcd-kek.key")).expect("key").len(), 32);

    // `keygate attestation mock --pcrs-from` reports the same measurements.
    let doc = d.join("doc.cbor");
    let root = d.join("root.pem");
    assert!(keygate(&["attestation", "mock", "--seed", SEED, "--pcrs-from", &s(&eif), "-o", &s(&doc)])
        .status
        .success());
    assert!(keygate(&["attestation", "mock-root", "--seed", SEED, "-o", &s(&root)]).status.success());
    let o = keygate(&[
        "attestation",
        "verify",
        &s(&doc),
        "--root",
        &s(&root),
        "--expect-pcr",
        &format!("0={}", pcr("PCR0")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Every decision lands in the audit trail, stored by the parent before the answer leaves the
/// KRE: with nobody acknowledging, a release's answer is withheld (`audit_unacknowledged`,
/// retryable; no key written); with the parent's follower, keys are released and the trail
/// holds each decision; it verifies offline and a tampered copy does not.
#[test]
fn audit_trail_records_decisions_fails_closed_and_verifies_offline() {
    let kre = Kre::start_unfollowed(&["--audit-ack-timeout-ms", "300"]);
    let out = kre.dir.path().join("k");
    let trail = kre.dir.path().join("trail");
    let root = kre.dir.path().join("root.pem");
    let withheld = kre.dir.path().join("withheld");
    assert_refused(&run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &withheld)), "audit_unacknowledged", &withheld);
    let status = keygate(&["status", "--json", "--kre", &kre.parent()]);
    let j: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(j["audit"]["answers_withheld_unacknowledged"], 1, "{j}");

    let follower = keygate_tests::AuditFollower::start(&kre.parent(), &trail);
    // The KRE waits only 300 ms for an acknowledgement: fetch once the follower is running
    // (it has stored what was buffered), not while its process is still starting.
    let start = std::time::Instant::now();
    while std::fs::metadata(trail.join("entries.log")).map_or(true, |m| m.len() == 0) {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "the follower stored nothing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_refused(
        &run_fetch(&fetch_args(&kre.addr(), "prod", 0x99, &kre.dir.path().join("x"))),
        "image_not_allowed",
        &kre.dir.path().join("x"),
    );
    drop(follower);
    // A last one-shot pull stores what followed and a checkpoint at the head.
    let o = keygate(&["audit", "pull", "--kre", &kre.parent(), "--dir", &s(&trail)]);
    assert!(o.status.success(), "{}", stderr(&o));

    assert!(keygate(&["attestation", "mock-root", "--seed", SEED, "-o", &s(&root)]).status.success());
    let expect = format!("0={}", hex48(KRE_PCR));
    let o = keygate(&["audit", "verify", &s(&trail), "--root", &s(&root), "--expect-kre-pcr", &expect, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = keygate(&["audit", "show", &s(&trail), "--json"]);
    let lines = String::from_utf8_lossy(&o.stdout).into_owned();
    for needle in ["kre_started", "release_allowed", "release_denied", "image_not_allowed"] {
        assert!(lines.contains(needle), "trail lacks {needle}: {lines}");
    }
    // Never key material.
    let key = std::fs::read(out.join("etcd-kek.key")).expect("key");
    let raw = std::fs::read(trail.join("entries.log")).expect("entries");
    assert!(!raw.windows(32).any(|w| w == key.as_slice()) && !lines.contains(&hex::encode(&key)));

    // The wrong KRE image expectation, and a tampered copy, are refused.
    let o =
        keygate(&["audit", "verify", &s(&trail), "--root", &s(&root), "--expect-kre-pcr", &format!("0={}", hex48(1))]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let mut bytes = raw.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(trail.join("entries.log"), &bytes).expect("tamper");
    let o = keygate(&["audit", "verify", &s(&trail), "--root", &s(&root), "--expect-kre-pcr", &expect]);
    assert_ne!(o.status.code(), Some(0), "tampered trail accepted");
}

/// A release's answer leaves the KRE only after the parent has stored its audit entry: a
/// kill -9 right after the fetch returns loses nothing, the stored trail already holds the
/// release (with the requester's document digest).
#[test]
fn a_kill_right_after_a_release_loses_no_audit_entry() {
    let mut kre = Kre::start(&[]);
    for i in 0..2 {
        let o = run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &kre.dir.path().join(format!("k{i}"))));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    kre.child.process.0.kill().expect("kill -9");
    let _ = kre.child.process.0.wait();
    let followed = kre.dir.path().join("followed");
    let o = keygate(&["audit", "show", &followed.display().to_string(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let released = String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("\"release_allowed\"")).count();
    assert_eq!(released, 2, "{}", String::from_utf8_lossy(&o.stdout));
}

// ---- channels: the administrative frames are not reachable from the release side ----

/// `keygate proxy --listen unix:LISTEN --to TO EXTRA...`, its log beside the socket; returns
/// once it listens.
fn start_proxy(listen: &Path, to: &str, extra: &[&str]) -> Logged {
    let mut cmd = Command::new(bin("keygate"));
    cmd.args(["proxy", "--listen", &unix(listen), "--to", to]).args(extra);
    let mut proxy = Logged::start(&mut cmd, &listen.with_extension("log"));
    proxy.wait_for_socket(listen);
    proxy
}

fn first_answer(sock: &Path, frame: &[u8]) -> Message {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    send(&mut s, frame);
    recv(&mut s)
}

/// Every administrative frame sent by an anonymous client — through the proxy, or straight to
/// the KRE's release socket — is refused `wrong_channel`, and has no effect: the audit
/// entries it would have acknowledged away are still there for the parent.
#[test]
fn administrative_frames_are_refused_on_the_release_side() {
    let mut kre = Kre::start(&[]);
    let out = kre.dir.path().join("k");
    assert!(run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out)).status.success());
    // From here on nobody acknowledges on the parent channel.
    drop(kre.follower.take());
    let acked = |kre: &Kre| {
        let status = keygate(&["status", "--json", "--kre", &kre.parent()]);
        let j: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
        j["audit"]["acked_up_to"].clone()
    };
    let acked_before = acked(&kre);
    let psock = kre.dir.path().join("proxy.sock");
    let proxy = start_proxy(&psock, &kre.addr(), &[]);
    let admin = [
        Message::AuditAck { up_to_seq: u64::MAX },
        Message::AuditPull { after_seq: 0, max: 10 },
        Message::StateCommit { generation: 1, blob_sha384: [0; 48] },
        Message::StatePoll,
        Message::StateGenesis,
        Message::StateLoad { blob: vec![1], shares: vec![1], genesis_attestation: vec![1], cold_start: false },
        Message::Status,
        Message::PolicyPush { bundle: vec![1] },
        Message::UnsealHello { client_nonce: [1; 32] },
        Message::ReshareStart { set: vec![1] },
    ];
    for m in &admin {
        let frame = m.encode().expect("enc");
        for sock in [&psock, &kre.sock] {
            let (code, reason) = denial(first_answer(sock, &frame));
            assert_eq!(code, DenyCode::WrongChannel, "{} via {}: {reason}", m.name(), sock.display());
        }
    }
    // The parent's own channel still has every entry: nothing was acknowledged away.
    assert_eq!(acked(&kre), acked_before);
    let plog = proxy.stop();
    assert!(plog.contains("first frame refused"), "{plog}");

    // A proxy never forwards the parent channel.
    let o = keygate(&["proxy", "--listen", "unix:/nonexistent/x", "--to", &kre.parent(), "--channel", "parent"]);
    exited(&o, 2, "the parent channel is never proxied");
}

/// One source (here a Unix peer's uid) holds at most `--max-per-source` proxied connections:
/// beyond it the proxy closes at once, and frees the slot when a connection ends.
#[test]
fn the_proxy_limits_connections_per_source() {
    use std::io::Read;
    let kre = Kre::start(&[]);
    let psock = kre.dir.path().join("proxy.sock");
    let mut cmd = Command::new(bin("keygate"));
    // The held connections send nothing: a long first-frame timeout keeps their slots taken
    // however slowly a loaded machine runs the rest of the test.
    cmd.args(["proxy", "--listen", &unix(&psock), "--to", &kre.addr(), "--max-per-source", "2"]);
    cmd.args(["--first-frame-timeout", "60s"]);
    let proxy = Logged::start(cmd.env("KEYGATE_LOG", "debug"), &psock.with_extension("log"));
    // Ready once bound (its log says so): waiting by connecting would take a slot of this
    // source itself until the proxy noticed the probe had gone, and a held connection could
    // then be the one refused.
    let start = Instant::now();
    while !proxy.log().contains("keygate proxy ready") {
        assert!(start.elapsed() < Duration::from_secs(20), "not ready: {}", proxy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let held: Vec<_> = (0..2).map(|_| std::os::unix::net::UnixStream::connect(&psock).expect("connect")).collect();
    // Both hold their slot before the third comes (the proxy admits each in a task of its own).
    let start = Instant::now();
    while proxy.log().matches("connection admitted").count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(20), "not admitted: {}", proxy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut third = std::os::unix::net::UnixStream::connect(&psock).expect("connect");
    third.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let mut b = [0u8; 1];
    let closed = third.read(&mut b);
    assert!(matches!(closed, Ok(0)), "the third is closed at once: {closed:?}; the proxy's log: {}", proxy.log());
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let out = kre.dir.path().join("k");
    let o = run_fetch(&fetch_args(&unix(&psock), "prod", GOOD, &out));
    assert!(o.status.success(), "a slot is free again: {}", stderr(&o));
    assert!(proxy.stop().contains("too many connections from this source"));
}

/// A second KRE (or a proxy) started on a socket a live process serves exits with an error
/// and leaves the live one serving; a stale socket of a killed process is taken over.
#[test]
fn a_second_kre_cannot_take_over_a_live_socket() {
    let kre = Kre::start(&[]);
    let policy = kre.dir.path().join("policy.json");
    let second = run_with_limit(
        dev_kre(SEED).args(["--listen", &kre.addr(), "--policy", policy.to_str().expect("utf8")]),
        Duration::from_secs(15),
    );
    exited(&second, 2, "served by a live process");
    let out = kre.dir.path().join("k");
    assert!(run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out)).status.success(), "the first KRE still serves");
    let o = keygate(&["proxy", "--listen", &kre.addr(), "--to", "unix:/nonexistent"]);
    assert!(stderr(&o).contains("served by a live process"), "{}", stderr(&o));
    assert!(run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out)).status.success(), "the first KRE still serves");
}

// ---- a relay on the path (the parent, or anyone between a control plane and the proxy) ----

/// A relay cannot make `keygate fetch` accept keys the KRE did not wrap: the client takes a
/// wrap only under the point the KRE's attestation carries for this connection.
#[test]
fn a_relay_cannot_substitute_released_keys_or_the_challenge() {
    let kre = Kre::start(&[]);
    let cases = [
        (Attack::SubstituteReleased, "keys are wrapped under a key the KRE did not attest"),
        (Attack::SubstituteChallengePoint, "KRE attestation refused: COSE signature"),
        (Attack::SubstituteChallengeSignature, "KRE attestation refused: COSE signature"),
        (Attack::SpliceChallenge, "KRE attestation refused: its nonce is not our Hello nonce"),
    ];
    for (i, (attack, error)) in cases.into_iter().enumerate() {
        let sock = kre.dir.path().join(format!("relay{i}.sock"));
        let relay = Relay::start(&sock, &kre.sock, cpi().root_anchor(), attack);
        let out = kre.dir.path().join(format!("k{i}"));
        let o = run_fetch(&fetch_args(&unix(&sock), "prod", GOOD, &out));
        assert_refused(&o, error, &out);
        assert!(!stderr(&o).contains("retrying"), "an attack is not retried: {attack:?}: {}", stderr(&o));
        assert_eq!(relay.handled_at_least(1), 1, "{attack:?}");
    }
    // The same relay, forwarding honestly, changes nothing.
    let sock = kre.dir.path().join("honest.sock");
    let _relay = Relay::start(&sock, &kre.sock, cpi().root_anchor(), Attack::Forward);
    let out = kre.dir.path().join("honest");
    let o = run_fetch(&fetch_args(&unix(&sock), "prod", GOOD, &out));
    assert!(o.status.success(), "{}", stderr(&o));
}

// ---- audit receipts: what the customer holds of each release ----

/// The receipts `keygate fetch` kept in `out/receipts`, by file name.
fn receipts_in(out: &Path) -> Vec<(PathBuf, keygate_enclave::audit::Receipt)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out.join("receipts"))
        .expect("receipts directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "receipt"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let r = keygate_enclave::audit::Receipt::decode(&std::fs::read(&p).expect("receipt")).expect("decodes");
            (p, r)
        })
        .collect()
}

/// Each fetch keeps its release's audit receipt beside the keys (mode 0600), and `audit verify
/// --receipts` proves every receipt's entry is in the follower's stored trail. A parent that
/// acknowledged the second release's entry without storing it keeps a trail that ends before
/// it: that trail verifies on its own (nothing shows a gap), but not with the customer's
/// receipts, and the failure names exactly the missing receipt's sequence number.
#[test]
fn a_customer_receipt_catches_a_parent_that_acknowledged_without_storing() {
    use keygate_enclave::audit::store;
    use std::os::unix::fs::PermissionsExt;
    let kre = Kre::start(&[]);
    let out = kre.dir.path().join("keys");
    for _ in 0..2 {
        let o = run_fetch(&fetch_args(&kre.addr(), "prod", GOOD, &out));
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("audit receipt: entry "), "{o:?}");
    }
    let receipts = receipts_in(&out);
    assert_eq!(receipts.len(), 2, "one receipt per release: {receipts:?}");
    for (p, _) in &receipts {
        let meta = std::fs::metadata(p).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", p.display());
        assert_eq!(meta.len(), u64::try_from(keygate_enclave::audit::RECEIPT_LEN).expect("len"));
    }
    let (first, second) = (receipts[0].1.seq().min(receipts[1].1.seq()), receipts[0].1.seq().max(receipts[1].1.seq()));
    assert!(first < second);

    let root = kre.dir.path().join("root.pem");
    assert!(keygate(&["attestation", "mock-root", "--seed", SEED, "-o", &s(&root)]).status.success());
    let expect = format!("0={}", hex48(KRE_PCR));
    let verify = |dir: &Path, receipts: Option<&Path>, json: bool| {
        let mut args = vec!["audit".to_owned(), "verify".into(), s(dir), "--root".into(), s(&root)];
        args.extend(["--expect-kre-pcr".into(), expect.clone()]);
        if let Some(r) = receipts {
            args.extend(["--receipts".into(), s(r)]);
        }
        if json {
            args.push("--json".into());
        }
        keygate(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The follower stored and acknowledged each entry before the answer left the KRE.
    let followed = kre.dir.path().join("followed");
    let o = verify(&followed, Some(&out.join("receipts")), false);
    assert!(o.status.success(), "{}\n{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("receipts     2 checked, 2 with their entry stored"));
    // One receipt file works as well as the directory.
    assert!(verify(&followed, Some(&receipts[0].0), false).status.success());

    // What a parent keeps that acknowledged entry `second` without storing it: the trail up
    // to the entry before, with the checkpoints that cover it.
    let trail = store::read_dir(&followed).expect("stored trail");
    let lying = kre.dir.path().join("lying");
    let entries: Vec<_> = trail.entries.iter().filter(|e| e.seq() < second).cloned().collect();
    let checkpoints: Vec<_> = trail.checkpoints.iter().filter(|c| c.seq() < second).cloned().collect();
    assert!(!checkpoints.is_empty(), "a checkpoint covers the first release");
    store::append_to_dir(&lying, &entries, &checkpoints).expect("store the prefix");
    let o = verify(&lying, None, false);
    assert!(o.status.success(), "without receipts the shortened trail verifies: {}", stderr(&o));

    let o = verify(&lying, Some(&out.join("receipts")), false);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&format!("(seq {second}): entry {second} is not in the stored trail")), "{e}");
    assert!(!e.contains(&format!("(seq {first})")), "the stored release's receipt is not named: {e}");
    assert!(e.contains(&format!("1 of 2 receipts NOT proven by the stored trail (seq {second})")), "{e}");
    let o = verify(&lying, Some(&out.join("receipts")), true);
    assert_eq!(o.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(j["ok"], false, "{j}");
    assert_eq!(j["receipts"]["checked"], 2, "{j}");
    assert_eq!(j["receipts"]["failed"][0]["seq"], second, "{j}");
    assert_eq!(j["receipts"]["failed"][0]["error"], "not_stored", "{j}");
    assert_eq!(j["receipts"]["failed"].as_array().map(Vec::len), Some(1), "{j}");

    // A receipt file that is not one is named too, never skipped.
    let bad = kre.dir.path().join("bad.receipt");
    std::fs::write(&bad, b"not a receipt").expect("write");
    let o = verify(&followed, Some(&bad), false);
    exited(&o, 1, "malformed receipt");
}

/// A relay cannot hand the client a receipt other than its release's own: neither a forged
/// one (the genuine receipt naming another sequence number) nor the genuine receipt of the
/// release before (whose entry the parent did store). `keygate fetch` refuses as an attack,
/// not retried, and writes no key and no receipt.
#[test]
fn a_relay_cannot_hand_the_client_another_releases_receipt() {
    let kre = Kre::start(&[]);
    let sock = kre.dir.path().join("relay.sock");
    let relay = Relay::start(&sock, &kre.sock, cpi().root_anchor(), Attack::ReplaceReceipt);
    let via = unix(&sock);
    for (i, error) in [
        "its audit receipt is not this release's: its signature does not verify",
        "its audit receipt is not this release's: it is the receipt of another release",
    ]
    .into_iter()
    .enumerate()
    {
        let out = kre.dir.path().join(format!("k{i}"));
        let o = run_fetch(&fetch_args(&via, "prod", GOOD, &out));
        assert_refused(&o, error, &out);
        assert!(!stderr(&o).contains("retrying"), "an attack is not retried: {}", stderr(&o));
        assert_eq!(relay.handled_at_least(i + 1), i + 1);
    }
    relay.set(Attack::Forward);
    let out = kre.dir.path().join("honest");
    let o = run_fetch(&fetch_args(&via, "prod", GOOD, &out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(receipts_in(&out).len(), 1);
}
