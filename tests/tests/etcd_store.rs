//! The sealed state in etcd, end to end: a real 3-member etcd cluster (the kit's
//! `EtcdCluster`), real KREs (`keygate-enclave-dev`) and `keygate` over Unix sockets. Genesis
//! into etcd, a policy change stored and committed by `state sync --store etcd://…` with one
//! etcd member killed, a second parent whose KRE exports the same generation losing the
//! compare-and-swap (nothing committed, its KRE keeps refusing the uncommitted change), and a
//! killed KRE handed its state back from etcd and unsealed; and the daemon (`state_store`)
//! committing a change into etcd.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keygate_tests::e2e::{
    dev_kre, keygate_args, ok, path_arg as s, pcr_args, pcr_list, policy_init, propose, refused, unix, DevKre as Kre,
    Logged,
};
use keygate_tests::etcd::EtcdCluster;
use keygate_tests::{bin, keygate, TempDir};

const SEED: &str = "etcd-store-e2e";
const KRE_PCR: u8 = 0x4b;
const CP_PCR: u8 = 0x1c;

/// Starts a KRE in `d/NAME/` on the genesis bundle `d/genesis.bundle` with `custodians`,
/// threshold 2.
fn start_kre(d: &Path, name: &str, custodians: &[&str]) -> Kre {
    let home = d.join(name);
    std::fs::create_dir_all(&home).expect("dir");
    let sock = home.join("kre.sock");
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(home.join(format!("kre-{}.log", std::process::id()))).expect("log");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--genesis", &s(&d.join("genesis.bundle"))])
        .args(pcr_args("--mock-pcr", KRE_PCR, 1))
        .args(["--custodian-threshold", "2"]);
    for c in custodians {
        cmd.args(["--custodian", &s(&d.join(format!("{c}.pub.pem")))]);
    }
    Kre::start(cmd.stderr(log), &sock, &home.join("followed"))
}

fn fetch(kre: &Kre, out: &Path) -> Output {
    let mut a: Vec<String> = ["fetch", "--kre", &kre.addr(), "--cluster", "prod", "--key-id", "etcd", "--out", &s(out)]
        .map(String::from)
        .into();
    a.extend(["--nsm".into(), "mock".into(), "--mock-seed".into(), SEED.into(), "--retries".into(), "0".into()]);
    a.extend(pcr_args("--expect-kre-pcr", KRE_PCR, 1));
    a.extend(pcr_args("--mock-pcr", CP_PCR, 3));
    keygate_args(&a)
}

fn unseal(d: &Path, kre: &Kre, custodian: &str) -> Output {
    keygate_args(&keygate_tests::cluster::unseal_args(d, &kre.custodian(), custodian, KRE_PCR))
}

fn sync(kre: &Kre, url: &str) -> Output {
    keygate(&["state", "sync", "--kre", &kre.parent(), "--store", url])
}

/// Where `kre`'s parent keeps the bundles it pushed.
fn bundles(kre: &Kre) -> std::path::PathBuf {
    kre.sock().parent().expect("the KRE's directory").join("bundles")
}

/// Pushes `d/v2.bundle` to `kre` without storing the state: accepted, not durable.
fn push_v2(d: &Path, kre: &Kre) {
    refused(
        keygate(&[
            "policy",
            "push",
            &s(&d.join("v2.bundle")),
            "--kre",
            &kre.parent(),
            "--store",
            &s(&bundles(kre)),
            "--durable-within",
            "1s",
        ]),
        "not durable after 1 s",
    );
}

/// The custodians' keys c1-c3, the approver a1, the mock root, the genesis bundle and a
/// signed bundle v2 that adds the control plane `cp` to `prod` (a new KEK: a new generation).
fn setup(d: &Path) {
    let p = |n: &str| d.join(n);
    for c in ["c1", "c2", "c3", "a1"] {
        ok(keygate(&["keygen", "-o", &s(&p(&format!("{c}.pem")))]));
    }
    ok(keygate(&["attestation", "mock-root", "--seed", SEED, "-o", &s(&p("root.pem"))]));
    policy_init(&p("a1.pub.pem"), "0s", &p("genesis.bundle"));
    propose(&p("genesis.bundle"), &[format!("prod=cp@{}", pcr_list(CP_PCR))], &p("v2.proposal"));
    ok(keygate(&["policy", "sign", &s(&p("v2.proposal")), "--key", &s(&p("a1.pem")), "--yes", "-o", &s(&p("sig"))]));
    ok(keygate(&["policy", "assemble", &s(&p("v2.proposal")), &s(&p("sig")), "-o", &s(&p("v2.bundle"))]));
}

#[test]
fn state_sync_with_an_etcd_store_commits_and_a_parent_that_loses_the_cas_commits_nothing() {
    let mut etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let url = etcd.url("/e2e");
    let dir = TempDir::new("keygate-etcd-e2e").expect("tmp");
    let d = dir.path();
    let p = |n: &str| d.join(n);
    setup(d);

    // Parent A: genesis into etcd.
    let a = start_kre(d, "a", &["c1", "c2", "c3"]);
    refused(sync(&a, &url), "custodian init --store");
    let out = ok(keygate(&["custodian", "init", "--kre", &a.parent(), "--store", &url]));
    assert!(out.contains("generation 1 stored in etcd://"), "{out}");
    refused(keygate(&["custodian", "init", "--kre", &a.parent(), "--store", &url]), "genesis refused");
    let out = ok(sync(&a, &url));
    assert!(out.contains("nothing new to store"), "{out}");

    // Parent B, another KRE (custodians c1 and c2: another set) sharing the store: genesis
    // elsewhere, then a policy change that it stores and commits as generation 2 here, with
    // etcd member 0 (the first endpoint) killed.
    let b = start_kre(d, "b", &["c1", "c2"]);
    let url_b = etcd.url("/b-genesis");
    ok(keygate(&["custodian", "init", "--kre", &b.parent(), "--store", &url_b]));
    push_v2(d, &b);
    etcd.kill(0).expect("kill an etcd member");
    let out = ok(sync(&b, &url));
    assert!(out.contains("stored and committed generation 2 in etcd://"), "{out}");
    ok(fetch(&b, &p("kb1")));
    let key_b = std::fs::read(p("kb1/etcd.key")).expect("key");

    // Parent A's KRE exports its own generation 2: the store already holds B's. The CAS is
    // lost, nothing is committed, and the change stays not durable in A.
    push_v2(d, &a);
    let lost = sync(&a, &url);
    refused(lost.clone(), "generation 2 not committed");
    let err = String::from_utf8_lossy(&lost.stderr).into_owned();
    assert!(err.contains("holds generation 2, stored by another parent first"), "{err}");
    refused(fetch(&a, &p("ka")), "policy_not_durable");
    // Following, the loop stops at the lost round instead of retrying it forever.
    let lost = keygate(&["state", "sync", "--kre", &a.parent(), "--store", &url, "--follow", "1"]);
    refused(lost, "stops committing");

    // B's KRE is killed; restarted, it gets generation 2 and its custody back from etcd.
    b.kill();
    let b = start_kre(d, "b", &["c1", "c2"]);
    let out = ok(sync(&b, &url));
    assert!(out.contains("handed stored generation 2"), "{out}");
    ok(unseal(d, &b, "c1"));
    let out = ok(unseal(d, &b, "c2"));
    assert!(out.contains("unsealed generation 2"), "{out}");
    ok(keygate(&["policy", "restore", "--kre", &b.parent(), "--store", &s(&bundles(&b))]));
    ok(fetch(&b, &p("kb2")));
    assert_eq!(std::fs::read(p("kb2/etcd.key")).expect("key"), key_b, "the same data key from the etcd store");
}

/// `keygate parent` with `state_store`: the daemon's state sync task stores and commits a
/// pending change into etcd; the change becomes usable without any other parent step.
#[test]
fn the_daemon_with_an_etcd_state_store_stores_and_commits() {
    let etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let url = etcd.url("/daemon");
    let dir = TempDir::new("keygate-etcd-daemon").expect("tmp");
    let d = dir.path();
    setup(d);
    let kre = start_kre(d, "k", &["c1", "c2", "c3"]);
    ok(keygate(&["custodian", "init", "--kre", &kre.parent(), "--store", &url]));
    push_v2(d, &kre);
    refused(fetch(&kre, &d.join("k0")), "policy_not_durable");
    let mut cmd = Command::new(bin("keygate"));
    cmd.args(["parent", "--kre-parent", &kre.parent(), "--release-to", &kre.addr()])
        .args(["--release-listen", &unix(&d.join("proxy.sock")), "--state-store", &url, "--sync-every", "1s"])
        .env("KEYGATE_LOG", "info");
    let daemon = Logged::start(&mut cmd, &d.join("parent.log"));
    let start = Instant::now();
    while !fetch(&kre, &d.join("k1")).status.success() {
        assert!(start.elapsed() < Duration::from_secs(40), "not committed by the daemon: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = daemon.stop();
    assert!(log.contains("stored and committed generation 2 in etcd://"), "{log}");
    let out = ok(sync(&kre, &url));
    assert!(out.contains("nothing new to store"), "{out}");
}
