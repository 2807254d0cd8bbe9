//! Policy bundles kept in etcd (`--store etcd://…`, docs/cluster.md), end to end: real KREs
//! (`keygate-enclave-dev`), `keygate` and a real 3-member etcd cluster over loopback.
//! Two KREs on one genesis: a bundle pushed to one is replayed to the other by `policy
//! restore` from etcd, also with an etcd member killed; a different bundle of a stored
//! version (a fork) is refused before it reaches a KRE, naming both digests. And the gap the
//! chaos run found: a member's daemon (`policy_store`) replays a bundle another member's
//! parent pushed, not only what its own directory holds.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use keygate_tests::e2e::{dev_kre, ok, path_arg as s, pcr_args, pcr_list, policy_init, refused, unix, DevKre as Kre};
use keygate_tests::etcd::EtcdCluster;
use keygate_tests::members::{
    a_serving_b_fresh, fetch, fetched_versions, push as kit_push, rotating_bundle, signed_bundle, Images, Member,
};
use keygate_tests::{keygate, run_with_limit, TempDir};

const SEED: &str = "etcd-bundles-e2e";
const KRE_PCR: u8 = 0x4b;

fn start_kre(d: &Path, name: &str) -> Kre {
    let home = d.join(name);
    std::fs::create_dir_all(&home).expect("dir");
    let sock = home.join("kre.sock");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--genesis", &s(&d.join("genesis.bundle"))]).args(pcr_args(
        "--mock-pcr",
        KRE_PCR,
        1,
    ));
    Kre::start(&mut cmd, &sock, &home.join("followed"))
}

fn push(kre: &Kre, bundle: &Path, store: &str) -> Output {
    keygate(&["policy", "push", &s(bundle), "--kre", &kre.parent(), "--store", store, "--durable-within", "0"])
}

fn restore(kre: &Kre, store: &str) -> Output {
    run_with_limit(
        std::process::Command::new(keygate_tests::bin("keygate")).args([
            "policy",
            "restore",
            "--kre",
            &kre.parent(),
            "--store",
            store,
        ]),
        Duration::from_secs(60),
    )
}

/// The KRE's policy version and digest (hex).
fn head(kre: &Kre) -> (u64, String) {
    let o = keygate(&["--json", "status", "--kre", &kre.parent()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    (j["policy_version"].as_u64().expect("version"), j["policy_digest"].as_str().expect("digest").to_owned())
}

/// A bundle's body digest (hex), as `policy show --json` prints it.
fn digest(bundle: &Path) -> String {
    let j: serde_json::Value =
        serde_json::from_str(&ok(keygate(&["policy", "show", &s(bundle), "--json"]))).expect("show JSON");
    j["digest"].as_str().expect("digest").to_owned()
}

#[test]
fn bundles_pushed_to_one_kre_are_restored_to_another_from_etcd_and_a_fork_is_refused() {
    let mut etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let url = etcd.url("/bundles-e2e");
    let dir = TempDir::new("keygate-etcd-bundles").expect("tmp");
    let d = dir.path();
    ok(keygate(&["keygen", "-o", &s(&d.join("a1.pem"))]));
    policy_init(&d.join("a1.pub.pem"), "0s", &d.join("genesis.bundle"));
    let allow = |b: u8| ["--allow".to_owned(), format!("prod=cp@{}", pcr_list(b))];
    let v2 = signed_bundle(d, &d.join("genesis.bundle"), "v2", &allow(0x1c).each_ref().map(String::as_str));
    let fork = signed_bundle(d, &d.join("genesis.bundle"), "fork", &allow(0x2d).each_ref().map(String::as_str));
    let v3 = signed_bundle(d, &v2, "v3", &allow(0x3e).each_ref().map(String::as_str));
    let (x, y) = (start_kre(d, "x"), start_kre(d, "y"));

    // X's parent pushes v2 and keeps it in etcd; Y's parent, with nothing of its own,
    // restores it from etcd.
    let o =
        keygate(&["--json", "policy", "push", &s(&v2), "--kre", &x.parent(), "--store", &url, "--durable-within", "0"]);
    let j: serde_json::Value = serde_json::from_str(&ok(o)).expect("push JSON");
    assert_eq!(j["stored"], "/bundles-e2e/bundles/00000000000000000002", "{j}");

    // Another bundle of version 2, pushed to Y (still at v1, which would take it): refused
    // before the push, naming both digests; Y stays at the genesis.
    let refusal = push(&y, &fork, &url);
    refused(refusal.clone(), "a fork of the policy chain");
    let err = String::from_utf8_lossy(&refusal.stderr).into_owned();
    assert!(err.contains(&digest(&v2)) && err.contains(&digest(&fork)), "{err}");
    assert_eq!(head(&y).0, 1, "the forking bundle never reached the KRE");

    let out = ok(restore(&y, &url));
    assert!(out.contains("restored 1 bundle(s) from etcd://"), "{out}");
    assert_eq!(head(&y), (2, digest(&v2)), "Y holds X's bundle, from etcd");

    // One etcd member killed (the first endpoint): push and restore still work.
    etcd.kill(0).expect("kill an etcd member");
    ok(push(&x, &v3, &url));
    let out = ok(restore(&y, &url));
    assert!(out.contains("restored 1 bundle(s)"), "{out}");
    assert_eq!(head(&y), (3, digest(&v3)));
    // A directory store is still one: Y's own (empty) directory restores nothing.
    std::fs::create_dir_all(d.join("y-bundles")).expect("dir");
    let out = ok(restore(&y, &s(&d.join("y-bundles"))));
    assert!(out.contains("restored 0 bundle(s)"), "{out}");
}

const IMG: Images = Images { seed: "etcd-bundles-daemon-e2e", kre_pcr: 0x4b, cp_pcr: 0x1c };

/// Fetches through `release` until the release has KEK version `v` (at most 20 s).
fn release_of(v: u32, release: &str, out: &Path, m: &Member) -> Vec<u8> {
    let start = std::time::Instant::now();
    loop {
        let _ = std::fs::remove_dir_all(out);
        if fetch(IMG, &[release.to_owned()], out, 0, "2s").status.success() {
            if let Some((_, key)) = fetched_versions(out).into_iter().find(|(n, _)| *n == v) {
                return key;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{} never releases version {v}: {}", m.name, m.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Members A and B, each beside its own daemon with the state and the bundles in etcd: a
/// bundle pushed to A by A's parent (kept in etcd, not in any directory B's daemon reads) is
/// replayed to B by B's daemon after B adopts the state that carries it.
#[test]
fn a_member_daemon_replays_from_etcd_a_bundle_another_member_parent_pushed() {
    let etcd = EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
    let store = etcd.url("/daemon-bundles");
    let dir = TempDir::new("keygate-etcd-bundles-daemon").expect("tmp");
    let d = dir.path();
    let (a, mut b) = a_serving_b_fresh(d, IMG, &store);
    b.start_daemon(&store, &[a.member()], Some(Path::new(&store)), None);
    b.start_kre();
    let key = release_of(1, &b.release(), &d.join("kb1"), &b);
    assert_eq!(release_of(1, &a.release(), &d.join("ka1"), &a), key);

    let v2 = rotating_bundle(d, &d.join("genesis.bundle"), "v2");
    ok(kit_push(&v2, &a.parent(), Path::new(&store)));
    let key = release_of(2, &a.release(), &d.join("ka2"), &a);
    assert_eq!(release_of(2, &b.release(), &d.join("kb2"), &b), key, "B releases A's rotated key");
    let log = b.daemon_log();
    assert!(log.contains("the kept bundles replayed") && log.contains("etcd://"), "{log}");
}
