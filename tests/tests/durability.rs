//! KEK durability end to end: real `keygate-enclave-dev` (the KRE with the mock NSM) and
//! `keygate` processes over Unix sockets. Genesis, kill -9 of the KRE, restart sealed, the parent hands back the
//! stored state, a 2-of-3 unseal by custodians who check the KRE's attestation, and the same
//! data keys afterwards; the custodians' refusals; the policy head surviving the restart; and
//! a scan of everything the parent wrote for key bytes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keygate_tests::e2e::{
    dev_kre, exited, hex48, keygate_args, ok, path_arg as s, pcr_args, pcr_list, policy_init, prod_policy_for, propose,
    refused, unix, DevKre as Kre,
};
use keygate_tests::{bin, keygate, TempDir};

const SEED: &str = "durability-e2e";
const KRE_PCR: u8 = 0x4b;
const CP_PCR: u8 = 0x1c;

/// Starts the KRE with three custodians, threshold 2, and either a static policy file or a
/// genesis bundle.
fn start_kre(d: &Path, policy: (&str, &Path)) -> Kre {
    start_kre_with(d, policy, &["c1", "c2", "c3"], 2)
}

/// Starts the KRE with the given custodians (public keys `NAME.pub.pem` in `d`) and threshold.
fn start_kre_with(d: &Path, policy: (&str, &Path), custodians: &[&str], threshold: u8) -> Kre {
    let sock = d.join("kre.sock");
    let _ = std::fs::remove_file(&sock);
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::fs::File::create(d.join(format!("kre-{n}.log"))).expect("log");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), policy.0, &s(policy.1)])
        .args(pcr_args("--mock-pcr", KRE_PCR, 1))
        .args(["--custodian-threshold", &threshold.to_string()]);
    for c in custodians {
        cmd.args(["--custodian", &s(&d.join(format!("{c}.pub.pem")))]);
    }
    // Trace level: the logs scanned for secrets are as verbose as they get.
    Kre::start(cmd.env("KEYGATE_LOG", "trace").stderr(log), &sock, &d.join("followed"))
}

/// `keygate fetch` arguments for the mock control plane (PCR0-2 = CP_PCR) asking `addr` for
/// `key_ids` of cluster `prod`, expecting the KRE's PCR0.
fn fetch_args(addr: &str, out: &Path, key_ids: &[&str], retries: u32) -> Vec<String> {
    keygate_tests::cluster::fetch_args(SEED, (KRE_PCR, CP_PCR), addr, out, key_ids, retries)
}

fn fetch(kre: &Kre, out: &Path) -> Output {
    let args = fetch_args(&kre.addr(), out, &["etcd"], 0);
    keygate_args(&args)
}

/// `keygate custodian unseal` arguments: `custodian`'s key, the mock root, the KRE's PCR0.
fn unseal_args(d: &Path, kre: &Kre, custodian: &str, expect_pcr: u8) -> Vec<String> {
    keygate_tests::cluster::unseal_args(d, &kre.custodian(), custodian, expect_pcr)
}

fn unseal(d: &Path, kre: &Kre, custodian: &str, expect_pcr: u8) -> Output {
    keygate_args(&unseal_args(d, kre, custodian, expect_pcr))
}

fn setup(d: &Path) {
    keygate_tests::cluster::custodians_and_root(d, SEED);
}

/// The static policy `d/policy.json`: `prod` allows the control plane `cp` (PCRs `CP_PCR`),
/// at `kek_version` when given.
fn write_cp_policy(d: &Path, kek_version: Option<u32>) {
    let mut policy = prod_policy_for("cp", CP_PCR);
    if let Some(v) = kek_version {
        policy["clusters"]["prod"]["kek_version"] = v.into();
    }
    std::fs::write(d.join("policy.json"), policy.to_string()).expect("policy");
}

/// Starts the KRE on the static policy `d/policy.json`.
fn static_kre(d: &Path) -> Kre {
    start_kre(d, ("--policy", &d.join("policy.json")))
}

/// The custodians' and root keys, the static policy for `cp`, and the KRE started on it.
fn set_up_static(d: &Path) -> Kre {
    setup(d);
    write_cp_policy(d, None);
    static_kre(d)
}

/// `keygate custodian init`: the KRE's genesis, its custody stored in `state`.
fn custodian_init(kre: &Kre, state: &Path) -> Output {
    keygate(&["custodian", "init", "--kre", &kre.parent(), "--state-dir", &s(state)])
}

/// [`set_up_static`], then genesis (custody in `d/state`) and a first fetch into `d/k1`:
/// the KRE, the state directory and the data key `etcd`.
fn serving_static(d: &Path) -> (Kre, PathBuf, Vec<u8>) {
    let kre = set_up_static(d);
    let state = d.join("state");
    ok(custodian_init(&kre, &state));
    ok(fetch(&kre, &d.join("k1")));
    let key1 = std::fs::read(d.join("k1/etcd.key")).expect("key");
    (kre, state, key1)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        let t = e.file_type().expect("type");
        if t.is_dir() {
            out.extend(files(&p));
        } else if t.is_file() {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn kill_restart_and_two_of_three_unseal_keep_the_data_keys() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let kre = set_up_static(d);
    let state = d.join("state");

    // A fresh KRE with custodians is sealed; the parent has nothing to hand it.
    refused(fetch(&kre, &d.join("k0")), "sealed");
    refused(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]), "custodian init");
    let out = ok(custodian_init(&kre, &state));
    assert!(out.contains("generation 1 stored"), "{out}");
    refused(custodian_init(&kre, &state), "genesis refused");
    ok(fetch(&kre, &d.join("k1")));
    let key1 = std::fs::read(d.join("k1/etcd.key")).expect("key");
    assert_eq!(key1.len(), 32);

    // kill -9; the restarted KRE is sealed until the parent hands it the state and two
    // custodians act.
    kre.kill();
    let kre = static_kre(d);
    refused(fetch(&kre, &d.join("k2")), "sealed");
    refused(unseal(d, &kre, "c1", KRE_PCR), "awaiting_state");
    let out = ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    assert!(out.contains("handed stored generation 1"), "{out}");
    // A custodian expecting another KRE image refuses.
    refused(unseal(d, &kre, "c3", 0x4c), "PCR");
    let out = ok(unseal(d, &kre, "c2", KRE_PCR));
    assert!(out.contains("1 of 2"), "{out}");
    refused(fetch(&kre, &d.join("k3")), "sealed");
    // The same custodian twice does not count twice.
    refused(unseal(d, &kre, "c2", KRE_PCR), "already received");
    let out = ok(unseal(d, &kre, "c3", KRE_PCR));
    assert!(out.contains("unsealed generation 1"), "{out}");
    ok(fetch(&kre, &d.join("k4")));
    assert_eq!(std::fs::read(d.join("k4/etcd.key")).expect("key"), key1, "the same data key after kill -9 and unseal");
    // A custodian acting on a serving KRE is refused.
    refused(unseal(d, &kre, "c1", KRE_PCR), "serving");

    // A tampered sealed state is refused at load.
    kre.kill();
    let kre = static_kre(d);
    let cur = state.join("state.current");
    let good = std::fs::read(&cur).expect("state");
    let mut bad = good.clone();
    bad[120] ^= 1;
    std::fs::write(&cur, &bad).expect("tamper");
    // The store falls back to the previous generation if there is one; with only one
    // generation the damaged file leaves nothing intact.
    refused(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]), "no intact sealed state");
    std::fs::write(&cur, &good).expect("restore");
    // Stopped first: its audit follower would otherwise still be creating files under `d`
    // (temporary ones renamed into place) while they are scanned.
    drop(kre);

    // Nothing the parent or the custodians wrote holds the data key.
    for f in files(d) {
        if f.starts_with(d.join("k1")) || f.starts_with(d.join("k4")) {
            continue;
        }
        let b = std::fs::read(&f).expect("read");
        assert!(!contains(&b, &key1), "{} holds the data key", f.display());
        assert!(!contains(&b, hex::encode(&key1).as_bytes()), "{} holds the data key as hex", f.display());
    }
}

#[test]
fn the_policy_head_survives_a_restart_and_a_withheld_bundle_blocks_releases() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    setup(d);
    let p = |n: &str| d.join(n);
    ok(keygate(&["keygen", "-o", &s(&p("a1.pem"))]));
    policy_init(&p("a1.pub.pem"), "0s", &p("genesis.bundle"));
    let state = p("state");
    let store = p("bundles");
    let kre = start_kre(d, ("--genesis", &p("genesis.bundle")));
    ok(custodian_init(&kre, &state));
    let cp = pcr_list(CP_PCR);
    propose(&p("genesis.bundle"), &[format!("prod=cp@{cp}")], &p("v2.proposal"));
    ok(keygate(&["policy", "sign", &s(&p("v2.proposal")), "--key", &s(&p("a1.pem")), "--yes", "-o", &s(&p("sig"))]));
    ok(keygate(&["policy", "assemble", &s(&p("v2.proposal")), &s(&p("sig")), "-o", &s(&p("v2.bundle"))]));
    // Pushed without storing the state: the new cluster's KEK is not usable yet, and the push
    // says the change is not durable.
    refused(
        keygate(&[
            "policy",
            "push",
            &s(&p("v2.bundle")),
            "--kre",
            &kre.parent(),
            "--store",
            &s(&store),
            "--durable-within",
            "1s",
        ]),
        "not durable after 1 s",
    );
    refused(fetch(&kre, &p("k0")), "policy_not_durable");
    let out = ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    assert!(out.contains("committed generation 2"), "{out}");
    ok(fetch(&kre, &p("k1")));
    let key1 = std::fs::read(p("k1/etcd.key")).expect("key");

    kre.kill();
    let kre = start_kre(d, ("--genesis", &p("genesis.bundle")));
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    ok(unseal(d, &kre, "c1", KRE_PCR));
    ok(unseal(d, &kre, "c2", KRE_PCR));
    // The parent has not replayed v2 (withheld): the sealed state says v2 was accepted.
    refused(fetch(&kre, &p("k2")), "policy_stale");
    let out = ok(keygate(&["policy", "restore", "--kre", &kre.parent(), "--store", &s(&store)]));
    assert!(out.contains("restored 1 bundle(s)"), "{out}");
    ok(fetch(&kre, &p("k3")));
    assert_eq!(std::fs::read(p("k3/etcd.key")).expect("key"), key1);
}

#[test]
fn reshare_to_new_custodians_approved_by_two_old_ones_survives_a_restart_with_the_new_set() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let (kre, state, key1) = serving_static(d);
    let mut reshare =
        ["custodian", "reshare", "--kre", &kre.custodian(), "--new-threshold", "2"].map(String::from).to_vec();
    for n in ["d1", "d2"] {
        ok(keygate(&["keygen", "-o", &s(&d.join(format!("{n}.pem")))]));
        reshare.extend(["--new-custodian".into(), s(&d.join(format!("{n}.pub.pem")))]);
    }
    let out = ok(keygate_args(&reshare));
    let digest = out
        .split("--approve-reshare ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("digest in the output")
        .to_owned();
    assert_eq!(digest.len(), 96, "{out}");
    // Without an explicit approval of that set, a custodian refuses.
    refused(unseal(d, &kre, "c1", KRE_PCR), "--approve-reshare");
    let approve = |c: &str| {
        let mut a = unseal_args(d, &kre, c, KRE_PCR);
        a.extend(["--approve-reshare".into(), digest.clone()]);
        keygate_args(&a)
    };
    assert!(ok(approve("c1")).contains("1 of 2"));
    assert!(ok(approve("c3")).contains("new state key"));
    let out = ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    assert!(out.contains("committed generation 2"), "{out}");
    ok(fetch(&kre, &d.join("k2")));

    // The image for the new set: its custodians unseal it; the old ones cannot.
    kre.kill();
    let kre = start_kre_with(d, ("--policy", &d.join("policy.json")), &["d1", "d2"], 2);
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    refused(unseal(d, &kre, "c2", KRE_PCR), "not a custodian");
    assert!(ok(unseal(d, &kre, "d2", KRE_PCR)).contains("1 of 2"));
    assert!(ok(unseal(d, &kre, "d1", KRE_PCR)).contains("unsealed generation 2"));
    ok(fetch(&kre, &d.join("k3")));
    assert_eq!(std::fs::read(d.join("k3/etcd.key")).expect("key"), key1, "the same data key under the new custodians");
}

/// Every output, log and file of a run at trace level, scanned for every secret of the run: the
/// state key, each custodian's share, every KEK and every released data key (raw, hex both
/// cases, base64). The test obtains the state key, shares and KEKs the way a quorum of
/// custodians could — opening their envelopes with their private keys and the sealed state
/// with the reconstructed key — so the scan looks for the real bytes.
#[test]
fn no_kek_share_state_key_or_data_key_in_any_output_log_or_file() {
    use base64::Engine;
    use keygate_attestation::crypto::default_backend;
    use keygate_attestation::secret::Secret;
    use keygate_enclave::state::custody::SharesFile;
    use p384::pkcs8::DecodePrivateKey;

    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    setup(d);
    write_cp_policy(d, Some(2));
    let state = d.join("state");
    let mut outputs: Vec<u8> = Vec::new();
    let mut traced = |args: &[&str]| {
        let o = keygate_tests::keygate_traced(args);
        outputs.extend_from_slice(&o.stdout);
        outputs.extend_from_slice(&o.stderr);
        o
    };
    let kre = static_kre(d);
    ok(traced(&["custodian", "init", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    // The policy's KEK version 2 is made after genesis and stored with the next generation.
    let out = ok(traced(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    assert!(out.contains("committed generation 2"), "{out}");
    let a = fetch_args(&kre.addr(), &d.join("keys-1"), &["etcd", "other"], 0);
    ok(traced(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    ok(traced(&["status", "--kre", &kre.parent()]));
    ok(traced(&["audit", "pull", "--kre", &kre.parent(), "--dir", &s(&d.join("audit-1"))]));
    kre.kill();
    let kre = static_kre(d);
    ok(traced(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    for c in ["c1", "c3"] {
        let a = unseal_args(d, &kre, c, KRE_PCR);
        ok(traced(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    let a = fetch_args(&kre.addr(), &d.join("keys-2"), &["etcd", "other"], 0);
    ok(traced(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    ok(traced(&["audit", "pull", "--kre", &kre.parent(), "--dir", &s(&d.join("audit-2"))]));
    drop(kre);

    // The secrets, recovered as two custodians could.
    let c = default_backend();
    let custody = std::fs::read_dir(&state)
        .expect("state dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("custody-"))
        .map(|e| std::fs::read(e.path()).expect("custody"))
        .expect("a custody file");
    let n = u32::from_be_bytes(custody[8..12].try_into().expect("len"));
    let shares = SharesFile::decode(c, &custody[12..12 + usize::try_from(n).expect("len")]).expect("shares file");
    let scalar = |name: &str| {
        let pem = std::fs::read_to_string(d.join(format!("{name}.pem"))).expect("key");
        let sk = p384::SecretKey::from_pkcs8_pem(&pem).expect("pkcs8");
        Secret::<48>::from_slice(&sk.to_bytes()).expect("48 bytes")
    };
    let opened: Vec<_> =
        ["c1", "c2", "c3"].iter().map(|n| shares.open_share(c, &scalar(n)).expect("my share")).collect();
    let state_key = keygate_enclave::crypto::shamir::combine(&opened[..2], 2).expect("combine");
    let blob = std::fs::read(state.join("state.current")).expect("state");
    let kre_state = keygate_enclave::state::sealed::open(&blob, &state_key, c).expect("open the sealed state");
    let mut secrets: Vec<(String, Vec<u8>)> = vec![("state key".into(), state_key.expose().to_vec())];
    for sh in &opened {
        secrets.push((format!("share {}", sh.x), sh.y.expose().to_vec()));
    }
    for (cluster, entries) in &kre_state.clusters {
        for e in entries {
            secrets.push((format!("KEK {cluster} v{}", e.version), e.kek.expose().to_vec()));
        }
    }
    let mut data_keys = 0;
    for kd in ["keys-1", "keys-2"] {
        // Key files only: the receipts beside them (`receipts/`) are no secret.
        for e in std::fs::read_dir(d.join(kd)).expect("keys").flatten().filter(|e| e.path().is_file()) {
            secrets.push((format!("data key {}", e.path().display()), std::fs::read(e.path()).expect("key")));
            data_keys += 1;
        }
    }
    assert!(kre_state.clusters.values().map(Vec::len).sum::<usize>() >= 2, "two KEK versions (kek_version 2)");
    assert!(data_keys >= 8, "{data_keys} key files");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut haystacks: Vec<(String, Vec<u8>)> = vec![("CLI stdout and stderr".into(), outputs)];
    for f in files(d) {
        if f.starts_with(d.join("keys-1")) || f.starts_with(d.join("keys-2")) {
            continue;
        }
        haystacks.push((f.display().to_string(), std::fs::read(&f).expect("read")));
    }
    let mut scanned = 0usize;
    for (name, secret) in &secrets {
        let needles = [
            secret.clone(),
            hex::encode(secret).into_bytes(),
            hex::encode_upper(secret).into_bytes(),
            b64.encode(secret).into_bytes(),
        ];
        for (where_, hay) in &haystacks {
            for n in &needles {
                assert!(!contains(hay, n), "{name} found in {where_}");
            }
        }
        scanned += 1;
    }
    let bytes: usize = haystacks.iter().map(|(_, h)| h.len()).sum();
    eprintln!("secret scan: {scanned} secrets × {} haystacks ({bytes} bytes, trace level): 0 hits", haystacks.len());
}

/// The KRE killed mid-traffic and restarted sealed: a control plane that keeps retrying gets
/// its keys once the parent has handed back the state and two custodians have unsealed, and
/// they are the same keys.
#[test]
fn a_client_retrying_through_a_kre_kill_and_unseal_gets_the_same_keys() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let (kre, state, key1) = serving_static(d);
    let addr = kre.addr();
    kre.kill();

    // A control plane boots while the KRE is down: it retries (unreachable, then sealed).
    let args = fetch_args(&addr, &d.join("k2"), &["etcd"], 12);
    let mut client = Command::new(bin("keygate"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fetch");
    std::thread::sleep(Duration::from_millis(700));
    let kre = static_kre(d);
    std::thread::sleep(Duration::from_millis(500)); // the client now meets a sealed KRE
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
    ok(unseal(d, &kre, "c1", KRE_PCR));
    ok(unseal(d, &kre, "c2", KRE_PCR));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = client.try_wait().expect("wait") {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(40), "the retrying client did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = client.wait_with_output().expect("output");
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("retrying"), "the client should have retried: {log}");
    assert_eq!(std::fs::read(d.join("k2/etcd.key")).expect("key"), key1, "nothing lost across the kill");
}

/// A signed-policy deployment: approver `a1` (threshold 1), a genesis bundle with
/// `delay`, a KRE with custodians started on it, its genesis stored.
fn signed_setup(d: &Path, delay: &str) -> Kre {
    setup(d);
    ok(keygate(&["keygen", "-o", &s(&d.join("a1.pem"))]));
    policy_init(&d.join("a1.pub.pem"), delay, &d.join("v1.bundle"));
    let kre = start_kre(d, ("--genesis", &d.join("v1.bundle")));
    ok(custodian_init(&kre, &d.join("state")));
    kre
}

/// A signed deployment with activation delay `delay` whose v2 allows the control plane `cp`
/// (PCRs `CP_PCR`), with `more` arguments to its proposal, pushed and durable: the KRE and v2.
fn allowing_cp(d: &Path, delay: &str, more: &[&str]) -> (Kre, PathBuf) {
    let kre = signed_setup(d, delay);
    let allow = format!("prod=cp@{}", pcr_list(CP_PCR));
    let v2 = next_bundle(d, 2, &[&["--allow", allow.as_str()], more].concat());
    push_and_sync(d, &kre, &v2);
    (kre, v2)
}

/// [`allowing_cp`] without activation delay: `cp` is served at once.
fn serving_cp(d: &Path) -> Kre {
    allowing_cp(d, "0s", &[]).0
}

/// Proposes `v{n}.bundle` from `v{n-1}.bundle` with `args`, signs it with `a1` and assembles it.
fn next_bundle(d: &Path, n: u32, args: &[&str]) -> PathBuf {
    let p = |f: String| s(&d.join(f));
    let from = p(format!("v{}.bundle", n - 1));
    let prop = p(format!("v{n}.proposal"));
    let mut a = vec!["policy", "propose", "--from", &from];
    a.extend_from_slice(args);
    a.extend(["-o", &prop]);
    ok(keygate(&a));
    let sig = p(format!("v{n}.sig"));
    ok(keygate(&["policy", "sign", &prop, "--key", &p("a1.pem".into()), "--current", &from, "--yes", "-o", &sig]));
    let out = d.join(format!("v{n}.bundle"));
    ok(keygate(&["policy", "assemble", &prop, &sig, "-o", &s(&out)]));
    out
}

/// `--root` and `--expect-kre-pcr`: what the pipeline checks a durability receipt against.
fn receipt_checks(d: &Path) -> Vec<String> {
    vec!["--root".into(), s(&d.join("root.pem")), "--expect-kre-pcr".into(), format!("0={}", hex48(KRE_PCR))]
}

/// Pushes `bundle` (kept in the parent's bundle store), stores the state it changed and checks
/// the KRE's durability receipt.
fn push_and_sync(d: &Path, kre: &Kre, bundle: &Path) {
    let (store, state) = (s(&d.join("bundles")), s(&d.join("state")));
    let mut args = vec!["policy", "push", &s(bundle), "--kre", &kre.parent(), "--store", &store, "--state-dir", &state]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    args.extend(receipt_checks(d));
    let out = ok(keygate_args(&args));
    assert!(out.contains("durable: the sealed state committed as generation"), "{out}");
}

/// kill -9, restart on the genesis bundle, hand back the stored state, unseal with two
/// custodians, restore the stored policy chain.
fn restart_unseal_restore(d: &Path, kre: Kre) -> (Kre, String) {
    kre.kill();
    let kre = start_kre(d, ("--genesis", &d.join("v1.bundle")));
    // `keygate status` exits 4 until the KRE serves, saying how far the unseal is.
    let status = || keygate(&["status", "--kre", &kre.parent()]);
    exited(&status(), 4, "the KRE is not serving: sealed (awaiting its stored state");
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&d.join("state"))]));
    exited(&status(), 4, ": 0 of 2 custodian shares");
    ok(unseal(d, &kre, "c1", KRE_PCR));
    exited(&status(), 4, ": 1 of 2 custodian shares");
    ok(unseal(d, &kre, "c2", KRE_PCR));
    let table = ok(status());
    assert!(table.lines().any(|l| l.starts_with("Phase ") && l.ends_with(" serving")), "{table}");
    assert!(table.contains("2 of 3 (set "), "{table}");
    let out = ok(keygate(&["policy", "restore", "--kre", &kre.parent(), "--store", &s(&d.join("bundles"))]));
    (kre, out)
}

/// The KEK versions of `etcd` a fetch into `out` received.
fn fetched_versions(out: &Path) -> Vec<u32> {
    (1..=4).filter(|v| out.join(format!("etcd.v{v}.key")).exists()).collect()
}

#[test]
fn a_long_active_image_is_served_at_once_after_a_restart_unseal_and_restore() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let (kre, _) = allowing_cp(d, "4s", &[]);
    // The new image waits for the activation delay: a transient refusal, not a revocation.
    refused(fetch(&kre, &d.join("k0")), "activation_pending");
    std::thread::sleep(Duration::from_secs(5));
    ok(fetch(&kre, &d.join("k1")));
    let key1 = std::fs::read(d.join("k1/etcd.key")).expect("key");

    // The sealed state recorded when v2 came into force: after the restart the image is
    // served at once, not held back by a fresh delay.
    let (kre, out) = restart_unseal_restore(d, kre);
    assert!(out.contains("restored 1 bundle(s)"), "{out}");
    let started = Instant::now();
    ok(fetch(&kre, &d.join("k2")));
    assert!(started.elapsed() < Duration::from_secs(4), "within the delay a fresh one would impose");
    assert_eq!(std::fs::read(d.join("k2/etcd.key")).expect("key"), key1);
}

#[test]
fn a_retired_kek_version_stays_retired_across_an_unretiring_bundle_a_replay_and_a_restart() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let (kre, v2) = allowing_cp(d, "0s", &["--rotate", "prod"]);
    ok(fetch(&kre, &d.join("k1")));
    assert_eq!(fetched_versions(&d.join("k1")), [1, 2]);
    let v3 = next_bundle(d, 3, &["--retire", "prod=2"]);
    push_and_sync(d, &kre, &v3);
    ok(fetch(&kre, &d.join("k2")));
    assert_eq!(fetched_versions(&d.join("k2")), [2]);
    // The parent replays the older bundle: refused.
    refused(keygate(&["policy", "push", &s(&v2), "--kre", &kre.parent()]), "rollback");
    // A later bundle lowers the retirement (no activation delay here): version 1 stays
    // retired, because the sealed state says so.
    let v4 = next_bundle(d, 4, &["--retire", "prod=0"]);
    push_and_sync(d, &kre, &v4);
    ok(fetch(&kre, &d.join("k3")));
    assert_eq!(fetched_versions(&d.join("k3")), [2]);
    // Restart, unseal, restore the whole chain: still retired.
    let (kre, out) = restart_unseal_restore(d, kre);
    assert!(out.contains("restored 3 bundle(s)"), "{out}");
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&d.join("state"))]));
    ok(fetch(&kre, &d.join("k4")));
    assert_eq!(fetched_versions(&d.join("k4")), [2]);
    assert_eq!(
        std::fs::read(d.join("k4/etcd.v2.key")).expect("v2"),
        std::fs::read(d.join("k2/etcd.v2.key")).expect("v2")
    );
}

#[test]
fn a_revocation_is_reported_durable_only_once_committed_and_then_survives_a_restart() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let kre = serving_cp(d);
    ok(fetch(&kre, &d.join("k1")));

    // The revocation is pushed, but the parent withholds the commit: it is in force at once,
    // and the push fails, naming what is committed.
    let v3 = next_bundle(d, 3, &["--revoke", "prod=cp"]);
    let store = s(&d.join("bundles"));
    let mut push = vec!["policy", "push", &s(&v3), "--kre", &kre.parent(), "--store", &store, "--durable-within", "2s"]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    push.extend(receipt_checks(d));
    let o = keygate_args(&push);
    refused(o, "policy v3 was accepted and is in force, but it is not durable after 2 s: policy_not_durable");
    refused(fetch(&kre, &d.join("k2")), "unknown_cluster");
    let receipt = d.join("bundles/policy-v00000003.durable");
    assert!(!receipt.exists(), "no receipt for a change that is not durable");

    // The parent stores and commits; the pipeline asks again and gets the receipt.
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&d.join("state"))]));
    let mut check = vec!["policy", "durable", &s(&v3), "--kre", &kre.parent(), "--receipt-out", &s(&receipt)]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    check.extend(receipt_checks(d));
    let out = ok(keygate_args(&check));
    assert!(
        out.contains("durable: the sealed state committed as generation") && out.contains("carries policy v3"),
        "{out}"
    );
    assert!(receipt.exists());
    // A receipt checked against another KRE image is refused.
    let mut wrong = check.clone();
    let last = wrong.len() - 1;
    wrong[last] = format!("0={}", hex48(CP_PCR));
    refused(keygate_args(&wrong), "does not verify");

    // Durable: a kill -9, restart, unseal and restore keep the image revoked.
    let (kre, _) = restart_unseal_restore(d, kre);
    refused(fetch(&kre, &d.join("k3")), "unknown_cluster");
}

/// The audit history across a kill -9: the restarted KRE's trail names the previous run's
/// chain and the head its sealed state recorded, the follower stores the new run beside the
/// old one, and `audit verify DIR` checks both runs and the link. A parent that deletes the
/// first run's last entries (with the checkpoints covering them, so that run still verifies
/// alone) is caught: the link names entries the stored trail no longer holds, by exact range.
#[test]
fn audit_runs_are_linked_across_a_kill_and_unseal_and_a_deleted_tail_is_named_exactly() {
    use keygate_enclave::audit::{files, store, AuditEvent};

    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let kre = serving_cp(d);
    for out in ["k1", "k2"] {
        ok(fetch(&kre, &d.join(out)));
    }
    // A committed generation after the releases: its sealed audit head covers them.
    let v3 = next_bundle(d, 3, &["--rotate", "prod"]);
    push_and_sync(d, &kre, &v3);
    let (kre, _) = restart_unseal_restore(d, kre);
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&d.join("state"))]));
    ok(fetch(&kre, &d.join("k3")));
    drop(kre);

    let trail = d.join("followed");
    let root = d.join("root.pem");
    let verify = |dir: &Path| {
        keygate(&[
            "audit",
            "verify",
            &s(dir),
            "--root",
            &s(&root),
            "--expect-kre-pcr",
            &format!("0={}", hex48(KRE_PCR)),
        ])
    };
    // (a) Both runs, in DIR, linked.
    let runs = store::read_runs(&trail).expect("runs");
    assert_eq!(
        runs.len(),
        2,
        "the restarted run is stored beside the first: {:?}",
        runs.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    let (first_dir, first) = &runs[0];
    assert_eq!(first_dir, &trail);
    let chain1 = *first.entries[0].chain_id();
    let link = runs[1]
        .1
        .entries
        .iter()
        .find_map(|e| match e.event() {
            AuditEvent::ChainLinked { previous, .. } => Some(previous.expect("the sealed state has an audit head")),
            _ => None,
        })
        .expect("the restarted run records its link");
    assert_eq!(link.chain_id, chain1);
    let released: Vec<u64> = first
        .entries
        .iter()
        .filter(|e| matches!(e.event(), AuditEvent::ReleaseAllowed { .. }))
        .map(|e| e.seq())
        .collect();
    assert_eq!(released.len(), 2);
    assert!(released.iter().all(|&r| r < link.seq), "the sealed head {} covers the releases {released:?}", link.seq);
    let out = ok(verify(&trail));
    assert!(
        out.contains("2 runs")
            && out.contains(&format!("continues chain {}… at seq {}", hex::encode(&chain1[..8]), link.seq)),
        "{out}"
    );

    // (b) The parent deletes the first run's entries from after its last checkpoint before the
    // second release (and the checkpoints covering them): that run alone still verifies.
    let keep =
        first.checkpoints.iter().map(|c| c.seq()).filter(|&c| c < released[1]).max().expect("a checkpoint before it");
    let mut entries = files::ENTRIES_MAGIC.to_vec();
    for e in first.entries.iter().filter(|e| e.seq() <= keep) {
        entries.extend(files::frame_record(e.bytes()));
    }
    let mut checkpoints = files::CHECKPOINTS_MAGIC.to_vec();
    for c in first.checkpoints.iter().filter(|c| c.seq() <= keep) {
        checkpoints.extend(files::frame_record(c.bytes()));
    }
    std::fs::write(trail.join(store::ENTRIES_FILE), &entries).expect("cut");
    std::fs::write(trail.join(store::CHECKPOINTS_FILE), &checkpoints).expect("cut");
    let alone = d.join("first-run-alone");
    std::fs::create_dir(&alone).expect("dir");
    std::fs::write(alone.join(store::ENTRIES_FILE), &entries).expect("copy");
    std::fs::write(alone.join(store::CHECKPOINTS_FILE), &checkpoints).expect("copy");
    ok(verify(&alone));
    let o = verify(&trail);
    let missing = format!("chain {}…: entries {}–{} missing", hex::encode(&chain1[..8]), keep + 1, link.seq);
    refused(o, &missing);
}

/// Every `*.receipt` file under `dir`, copied into `into`.
fn collect_receipts(dir: &Path, into: &Path) -> usize {
    std::fs::create_dir_all(into).expect("receipts dir");
    let mut n = 0;
    for f in files(dir).into_iter().filter(|f| f.extension().is_some_and(|x| x == "receipt")) {
        std::fs::copy(&f, into.join(f.file_name().expect("name"))).expect("copy receipt");
        n += 1;
    }
    n
}

#[test]
fn a_kill_at_any_moment_loses_no_receipted_release_and_no_durable_policy_change() {
    let dir = TempDir::new("keygate-durability").expect("tmp");
    let d = dir.path();
    let mut kre = serving_cp(d);
    let other = pcr_list(0x2d);
    let (store, state) = (s(&d.join("bundles")), s(&d.join("state")));
    let receipts = d.join("all-receipts");
    let (mut held, mut durable_pushes) = (0, 0);
    // The parent's state daemon stores and commits each export within a second; the pipeline's
    // push waits for it, as in a deployment.
    let syncing = |kre: &Kre| {
        keygate_tests::KillOnDrop::keygate(&[
            "state",
            "sync",
            "--kre",
            &kre.parent(),
            "--state-dir",
            &state,
            "--follow",
            "1",
        ])
    };
    let mut sync_daemon = syncing(&kre);
    // Each round: a fetch and a policy push (another image allowed, then revoked; the last one
    // with a KEK rotation) race a kill -9
    // of the KRE: after a delay, from "at once" through the steps of both (each takes 100-300
    // ms here), or the moment the client holds its receipt, or the moment the push reports the
    // change durable.
    #[derive(Debug, Clone, Copy)]
    enum KillAt {
        After(u64),
        ClientHoldsReceipt,
        PushReportsDurable,
    }
    let plan = [
        KillAt::After(0),
        KillAt::ClientHoldsReceipt,
        KillAt::After(150),
        KillAt::PushReportsDurable,
        KillAt::After(300),
        KillAt::ClientHoldsReceipt,
        KillAt::PushReportsDurable,
        KillAt::After(600),
    ];
    for (round, kill_at) in plan.into_iter().enumerate() {
        let n = u32::try_from(round).expect("small") + 3;
        let change = if round % 2 == 0 { format!("prod=other@{other}") } else { "prod=other".to_owned() };
        let flag = if round % 2 == 0 { "--allow" } else { "--revoke" };
        // The last change also rotates prod's KEK: a rotation is a policy change like the others.
        let mut args = vec![flag, change.as_str()];
        if round + 1 == plan.len() {
            args.extend(["--rotate", "prod"]);
        }
        let bundle = next_bundle(d, n, &args);
        let out = d.join(format!("keys-{round}"));
        let fetch_args = fetch_args(&kre.addr(), &out, &["etcd"], 0);
        let fetcher =
            Command::new(bin("keygate")).args(&fetch_args).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let mut push: Vec<String> = ["policy", "push", &s(&bundle), "--kre", &kre.parent(), "--store", &store]
            .into_iter()
            .map(str::to_owned)
            .collect();
        push.extend(["--durable-within".into(), "5s".into()]);
        push.extend(receipt_checks(d));
        let mut pusher = Command::new(bin("keygate"))
            .args(&push)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("push");
        let start = Instant::now();
        let until = |done: &mut dyn FnMut() -> bool| {
            while !done() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        match kill_at {
            KillAt::After(ms) => std::thread::sleep(Duration::from_millis(ms)),
            KillAt::ClientHoldsReceipt => {
                until(&mut || std::fs::read_dir(out.join("receipts")).is_ok_and(|mut r| r.next().is_some()))
            }
            KillAt::PushReportsDurable => until(&mut || pusher.try_wait().is_ok_and(|e| e.is_some())),
        }
        drop(sync_daemon);
        let (restarted, _) = restart_unseal_restore(d, kre);
        kre = restarted;
        sync_daemon = syncing(&kre);
        let fetched = fetcher.expect("fetch").wait().expect("fetch ends");
        let pushed = pusher.wait_with_output().expect("push ends");
        if fetched.success() {
            held += collect_receipts(&out, &receipts);
        }
        // A change the push reported durable is carried by the state the restarted KRE was
        // unsealed from: the KRE proves it with a receipt.
        let reported_durable = pushed.status.success() && String::from_utf8_lossy(&pushed.stdout).contains("durable:");
        if reported_durable {
            durable_pushes += 1;
            // The state the restarted KRE was unsealed from carries it (read from its status,
            // not from its answer to the pipeline).
            let status: serde_json::Value =
                serde_json::from_str(&ok(keygate(&["status", "--json", "--kre", &kre.parent()]))).expect("status json");
            assert!(
                status["policy_durable_version"].as_u64().is_some_and(|v| v >= u64::from(n)),
                "round {round} ({kill_at:?}): v{n} was reported durable, but the restarted KRE's committed state carries {}",
                status["policy_durable_version"]
            );
            let mut check: Vec<String> =
                ["policy", "durable", &s(&bundle), "--kre", &kre.parent(), "--durable-within", "5s"]
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
            check.extend(receipt_checks(d));
            ok(keygate_args(&check));
        } else {
            // Not durable: the pipeline pushes it again (the restore may already have replayed
            // it from the store) and stores the state.
            let _ = keygate(&[
                "policy",
                "push",
                &s(&bundle),
                "--kre",
                &kre.parent(),
                "--store",
                &store,
                "--durable-within",
                "0",
            ]);
            ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &state]));
        }
    }
    drop(sync_daemon);
    kre.kill();
    // Every receipt a client holds names an entry of the stored trail, across every run.
    assert!(held >= 1, "at least one fetch completed before its kill");
    let mut verify: Vec<String> = vec!["audit".into(), "verify".into(), s(&d.join("followed"))];
    verify.extend([
        "--root".into(),
        s(&d.join("root.pem")),
        "--expect-kre-pcr".into(),
        format!("0={}", hex48(KRE_PCR)),
    ]);
    verify.extend(["--receipts".into(), s(&receipts)]);
    let out = ok(keygate_args(&verify));
    assert!(out.contains(&format!("{held} checked, {held} with their entry stored")), "{out}");
    eprintln!("{held} receipts held, {durable_pushes} pushes reported durable, all kept");
}

/// Replaces the parent's state directory `to` with a copy of `from` (the parent choosing which
/// stored states to hand a restarted KRE).
fn put_state(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("dir").flatten() {
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// kill -9, restart on the static policy, and the parent hands over what is in `state`.
fn restart_with(d: &Path, kre: Kre, state: &Path) -> Kre {
    kre.kill();
    let kre = static_kre(d);
    ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(state)]));
    kre
}

/// A generation does not name a sealed state: a KRE restarted twice from generation 1 (its
/// policy now naming KEK version 2) seals two different generation-2 states, and `prod/v2`
/// names two data keys. Once custodians have unsealed fork A, the parent switching to fork B
/// at a restart is refused by each of them (their records hold generation 2 with A's digest),
/// and so is generation 1 (a rollback); fork A still unseals, with the same data key.
#[test]
fn custodians_refuse_a_parent_switching_between_two_blobs_of_one_generation() {
    let dir = TempDir::new("keygate-durability-fork").expect("tmp");
    let d = dir.path();
    let (kre, state, _) = serving_static(d);
    put_state(&state, &d.join("g1"));
    write_cp_policy(d, Some(2));

    // Fork A: restart from generation 1, unsealed by c1 and c2, generation 2 with a new KEK.
    let fork = |kre: Kre, name: &str| {
        put_state(&d.join("g1"), &state);
        let kre = restart_with(d, kre, &state);
        ok(unseal(d, &kre, "c1", KRE_PCR));
        let out = ok(unseal(d, &kre, "c2", KRE_PCR));
        assert!(out.contains("unsealed generation 1"), "{out}");
        let out = ok(keygate(&["state", "sync", "--kre", &kre.parent(), "--state-dir", &s(&state)]));
        assert!(out.contains("committed generation 2"), "{out}");
        ok(fetch(&kre, &d.join(format!("key-{name}"))));
        put_state(&state, &d.join(name));
        (kre, std::fs::read(d.join(format!("key-{name}/etcd.key"))).expect("key"))
    };
    let (kre, key_a) = fork(kre, "fork-a");
    // Fork B: the parent restarts from generation 1 again (the custodians have only seen it).
    let (kre, key_b) = fork(kre, "fork-b");
    let blob = |name: &str| std::fs::read(d.join(name).join("state.current")).expect("blob");
    assert_ne!(blob("fork-a"), blob("fork-b"), "two sealed states of generation 2");
    assert_ne!(key_a, key_b, "prod/v2 names two different data keys");

    // c1 and c3 unseal fork A: their records now hold (2, SHA-384(A)).
    put_state(&d.join("fork-a"), &state);
    let kre = restart_with(d, kre, &state);
    ok(unseal(d, &kre, "c1", KRE_PCR));
    let out = ok(unseal(d, &kre, "c3", KRE_PCR));
    assert!(out.contains("unsealed generation 2"), "{out}");
    ok(fetch(&kre, &d.join("key-a2")));
    assert_eq!(std::fs::read(d.join("key-a2/etcd.key")).expect("key"), key_a);

    // The parent switches to fork B at the next restart: refused by both, the KRE stays sealed.
    put_state(&d.join("fork-b"), &state);
    let kre = restart_with(d, kre, &state);
    refused(unseal(d, &kre, "c1", KRE_PCR), "a fork of that generation");
    refused(unseal(d, &kre, "c3", KRE_PCR), "a fork of that generation");
    refused(fetch(&kre, &d.join("key-b2")), "sealed");
    // Generation 1: refused by the quorum whose records hold generation 2.
    put_state(&d.join("g1"), &state);
    let kre = restart_with(d, kre, &state);
    refused(unseal(d, &kre, "c1", KRE_PCR), "rollback refused");
    refused(unseal(d, &kre, "c3", KRE_PCR), "rollback refused");
    refused(fetch(&kre, &d.join("key-g1")), "sealed");
    // Fork A, the recorded blob, still unseals with its data key.
    put_state(&d.join("fork-a"), &state);
    let kre = restart_with(d, kre, &state);
    ok(unseal(d, &kre, "c3", KRE_PCR));
    ok(unseal(d, &kre, "c1", KRE_PCR));
    ok(fetch(&kre, &d.join("key-a3")));
    assert_eq!(std::fs::read(d.join("key-a3/etcd.key")).expect("key"), key_a);
    drop(kre);
}

/// One key, one purpose: a key that signs policy bundles is refused as a custodian, at genesis
/// (a custodian of the image is an approver of its genesis bundle) and at a reshare (a new
/// custodian is an approver in force), and a bundle that makes a custodian an approver is
/// refused.
#[test]
fn a_custodian_key_that_is_also_an_approver_is_refused_at_genesis_and_at_reshare() {
    let dir = TempDir::new("keygate-durability-purpose").expect("tmp");
    let d = dir.path();
    setup(d);
    let p = |n: &str| d.join(n);
    let bundle = |approver: &str, out: &str| policy_init(&p(approver), "0s", &p(out));
    bundle("c2.pub.pem", "c2-approves.bundle");
    let kre = start_kre(d, ("--genesis", &p("c2-approves.bundle")));
    refused(custodian_init(&kre, &p("state-1")), "custodian key 1 is also a policy approver key");
    refused(fetch(&kre, &p("k0")), "sealed");
    kre.kill();

    ok(keygate(&["keygen", "-o", &s(&p("a1.pem"))]));
    bundle("a1.pub.pem", "a1-approves.bundle");
    let kre = start_kre(d, ("--genesis", &p("a1-approves.bundle")));
    ok(custodian_init(&kre, &p("state-2")));
    let reshare = |new: &[&str]| {
        let mut a =
            ["custodian", "reshare", "--kre", &kre.custodian(), "--new-threshold", "1"].map(String::from).to_vec();
        for n in new {
            a.extend(["--new-custodian".into(), s(&p(n))]);
        }
        keygate_args(&a)
    };
    refused(reshare(&["c1.pub.pem", "a1.pub.pem"]), "custodian key 1 is also a policy approver key");

    // A bundle that rotates a custodian's key into the approver set is refused too.
    let (from, proposal) = (s(&p("a1-approves.bundle")), s(&p("rotate.proposal")));
    let (a1, c3) = (s(&p("a1.pub.pem")), s(&p("c3.pub.pem")));
    let propose = ["policy", "propose", "--from", &from, "--approver", &a1, "--approver", &c3, "--threshold", "1"];
    ok(keygate(&[&propose[..], &["-o", &proposal]].concat()));
    let sig = s(&p("rotate.sig"));
    ok(keygate(&["policy", "sign", &proposal, "--key", &s(&p("a1.pem")), "--yes", "-o", &sig]));
    let rotated = s(&p("rotate.bundle"));
    ok(keygate(&["policy", "assemble", &proposal, &sig, "-o", &rotated]));
    let push = ["policy", "push", &rotated, "--kre", &kre.parent(), "--store", &s(&p("bundles"))];
    refused(keygate(&push), "custodian key 2 of this KRE is an approver key of the bundle");

    ok(reshare(&["c1.pub.pem", "c3.pub.pem"]));
}
