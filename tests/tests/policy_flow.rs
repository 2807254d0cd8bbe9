//! The whole pipeline flow from the CLI against a running KRE: genesis, a 2-of-3 signed
//! update, a 1-signature push refused, the activation delay, an immediate revocation,
//! rollback and replay refused, and a restarted KRE restored from the parent's store.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use keygate_tests::e2e::{
    dev_kre, fetch_prod_etcd, keygate_args, ok, path_arg as s, pcr_args, pcr_list as pcrs, propose, refused, unix,
    DevKre as Kre,
};
use keygate_tests::{keygate, TempDir};

const SEED: &str = "policy-e2e";
const KRE_PCR: u8 = 0x4b;

fn start_kre(dir: &Path, genesis: &Path) -> Kre {
    let sock = dir.join("kre.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--genesis", &s(genesis)]).args(pcr_args("--mock-pcr", KRE_PCR, 1));
    Kre::start(&mut cmd, &sock, &dir.join("followed"))
}

/// `keygate policy push BUNDLE` to the KRE's parent channel, keeping the bundle in `store`
/// when given.
fn push(kre: &Kre, bundle: &Path, store: Option<&Path>) -> Output {
    let mut args = vec!["policy".to_owned(), "push".into(), s(bundle), "--kre".into(), kre.parent()];
    if let Some(store) = store {
        args.extend(["--store".into(), s(store)]);
    }
    keygate_args(&args)
}

/// `keygate policy sign PROPOSAL --key KEY [--current CURRENT] --yes -o OUT`.
fn sign(proposal: &Path, key: &Path, current: Option<&Path>, out: &Path) -> Output {
    let mut args = vec!["policy".to_owned(), "sign".into(), s(proposal), "--key".into(), s(key)];
    if let Some(c) = current {
        args.extend(["--current".into(), s(c)]);
    }
    args.extend(["--yes".into(), "-o".into(), s(out)]);
    keygate_args(&args)
}

fn fetch(kre: &Kre, pcr: u8, out: &Path) -> Output {
    fetch_prod_etcd(SEED, KRE_PCR, &kre.addr(), pcr, out)
}

#[test]
fn pipeline_flow_against_a_running_kre() {
    let dir = TempDir::new("keygate-policy-flow").expect("tmp");
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
    let allow = [format!("prod=img-a@{}", pcrs(0xa)), format!("prod=img-b@{}", pcrs(0xb))];
    propose(&p("genesis.bundle"), &allow, &p("v2.proposal"));
    for (k, sig) in [("a1.pem", "s1"), ("a3.pem", "s3")] {
        ok(sign(&p("v2.proposal"), &p(k), None, &p(sig)));
    }
    // A key outside the approver set signs with a warning naming its fingerprint, the one
    // `keygen` printed; `policy show` lists the approvers' fingerprints.
    let made = ok(keygate(&["keygen", "-o", &s(&p("outsider.pem"))]));
    let fp = made.rsplit("fingerprint ").next().expect("keygen names the fingerprint").trim().to_owned();
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 32, "{made}");
    let o = sign(&p("v2.proposal"), &p("outsider.pem"), Some(&p("genesis.bundle")), &p("sx"));
    let warned = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success() && warned.contains(&format!("warning: key {fp} is not an approver")), "{warned}");
    let shown = ok(keygate(&["policy", "show", &s(&p("genesis.bundle"))]));
    assert_eq!(shown.matches("sha256:").count(), 3, "{shown}");
    assert!(!shown.contains(&fp), "{shown}");
    ok(keygate(&["policy", "assemble", &s(&p("v2.proposal")), &s(&p("s1")), "-o", &s(&p("v2-one.bundle"))]));
    refused(push(&kre, &p("v2-one.bundle"), None), "policy_refused: 1 valid approver signature(s), 2 required");
    ok(keygate(&["policy", "assemble", &s(&p("v2.proposal")), &s(&p("s1")), &s(&p("s3")), "-o", &s(&p("v2.bundle"))]));
    ok(keygate(&["policy", "verify", &s(&p("v2.bundle")), "--current", &s(&p("genesis.bundle"))]));
    let out = ok(push(&kre, &p("v2.bundle"), Some(&store)));
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
        ok(sign(&p("v3.proposal"), &p(k), Some(&p("v2.bundle")), &p(sig)));
    }
    ok(keygate(&["policy", "assemble", &s(&p("v3.proposal")), &s(&p("t2")), &s(&p("t3")), "-o", &s(&p("v3.bundle"))]));
    let out = ok(push(&kre, &p("v3.bundle"), Some(&store)));
    assert!(out.contains("in force now"), "{out}");
    refused(fetch(&kre, 0xa, &p("k4")), "image_not_allowed");
    ok(fetch(&kre, 0xb, &p("k5")));

    // Replay and rollback are refused.
    refused(push(&kre, &p("v3.bundle"), None), "replay");
    refused(push(&kre, &p("v2.bundle"), None), "rollback");

    // A restarted KRE starts from genesis; the parent restores the stored chain.
    drop(kre);
    let kre = start_kre(d, &p("genesis.bundle"));
    refused(fetch(&kre, 0xb, &p("k6")), "unknown_cluster");
    let out = ok(keygate(&["policy", "restore", "--kre", &kre.parent(), "--store", &s(&store)]));
    assert!(out.contains("restored 2 bundle(s)"), "{out}");
    refused(fetch(&kre, 0xa, &p("k7")), "image_not_allowed");
    // Fail-safe: a KRE without sealed state cannot know when v2 was first accepted, so the
    // images the restored chain adds wait for the largest delay again (v3 carries 1 day).
    refused(fetch(&kre, 0xb, &p("k8")), "activation delay");
}
