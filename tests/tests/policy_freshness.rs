//! Policy freshness with the real binaries: a policy naming the pipeline's timestamp key makes
//! the KRE release only while it holds a young timestamp for its newest policy. The pipeline
//! signs timestamps (`keygate policy timestamp`) and pushes them like bundles; the parent keeps
//! the newest beside the bundles, its daemon hands it on (also one pushed through another
//! member's parent), and `policy restore` gives it back to a restarted KRE. The attack: a copy
//! of a member kept on the policy before a revocation (its parent never pushes it) stops
//! releasing within the maximum age, whatever its parent replays.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keygate_tests::e2e::{
    dev_kre, exited, fetch_prod_etcd, keygate_args, ok, path_arg as s, pcr_args, pcr_list as pcrs, refused, unix,
    DevKre as Kre, Logged,
};
use keygate_tests::{bin, keygate, TempDir};

const SEED: &str = "freshness-e2e";
const KRE_PCR: u8 = 0x5b;
/// The policy's maximum timestamp age.
const MAX_AGE: Duration = Duration::from_secs(4);

fn start_kre(dir: &Path, name: &str, genesis: &Path) -> Kre {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--genesis", &s(genesis)]).args(pcr_args("--mock-pcr", KRE_PCR, 1));
    Kre::start(&mut cmd, &sock, &dir.join(format!("{name}-followed")))
}

/// `keygate policy push FILE --kre KRE [--store STORE]` (a bundle or a timestamp).
fn push(kre: &Kre, file: &Path, store: Option<&Path>) -> Output {
    let mut args = vec!["policy".to_owned(), "push".into(), s(file), "--kre".into(), kre.parent()];
    if let Some(store) = store {
        args.extend(["--store".into(), s(store)]);
    }
    keygate_args(&args)
}

/// `keygate policy timestamp BUNDLE --key KEY -o OUT`.
fn stamp(bundle: &Path, key: &Path, out: &Path) -> Output {
    keygate(&["policy", "timestamp", &s(bundle), "--key", &s(key), "-o", &s(out)])
}

/// A fetch by the control plane image `pcrs(image)`.
fn fetch(kre: &Kre, image: u8, out: &Path) -> Output {
    fetch_prod_etcd(SEED, KRE_PCR, &kre.addr(), image, out)
}

/// `keygate status --json` of the KRE.
fn status(kre: &Kre) -> serde_json::Value {
    let o = keygate(&["--json", "status", "--kre", &kre.parent()]);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status ({e}): {o:?}"))
}

/// The issue time (ms) of the timestamp the KRE holds.
fn held_issued_ms(kre: &Kre) -> Option<u64> {
    status(kre).pointer("/policy_timestamp/issued_ms").and_then(serde_json::Value::as_u64)
}

/// A signed bundle from `from` with `change` (`--allow …` / `--revoke …`), signed by `key`.
fn signed(d: &Path, from: &Path, name: &str, change: &[&str], key: &Path) -> std::path::PathBuf {
    let proposal = d.join(format!("{name}.proposal"));
    let mut args = vec!["policy".to_owned(), "propose".into(), "--from".into(), s(from)];
    args.extend(change.iter().map(|c| (*c).to_owned()));
    args.extend(["--activation-delay".into(), "1s".into(), "-o".into(), s(&proposal)]);
    ok(keygate_args(&args));
    let sig = d.join(format!("{name}.sig"));
    ok(keygate(&["policy", "sign", &s(&proposal), "--key", &s(key), "--yes", "-o", &s(&sig)]));
    let out = d.join(format!("{name}.bundle"));
    ok(keygate(&["policy", "assemble", &s(&proposal), &s(&sig), "-o", &s(&out)]));
    out
}

#[test]
fn a_kre_releases_only_with_a_young_pipeline_timestamp_and_a_copy_kept_on_a_revoked_policy_stops() {
    let dir = TempDir::new("keygate-freshness").expect("tmp");
    let d = dir.path();
    let p = |n: &str| d.join(n);
    for k in ["approver", "stamper", "operator"] {
        ok(keygate(&["keygen", "-o", &s(&p(&format!("{k}.pem")))]));
    }
    ok(keygate(&[
        "policy",
        "init",
        "--approver",
        &s(&p("approver.pub.pem")),
        "--threshold",
        "1",
        "--activation-delay",
        "1s",
        "--timestamp-key",
        &s(&p("stamper.pub.pem")),
        "--timestamp-max-age",
        "4s",
        "-o",
        &s(&p("genesis.bundle")),
    ]));
    let shown = ok(keygate(&["policy", "show", &s(&p("genesis.bundle"))]));
    assert!(shown.contains("timestamps: key sha256:") && shown.contains("max age 4 s"), "{shown}");
    let store = p("store");
    let main = start_kre(d, "main", &p("genesis.bundle"));

    // v2 allows images A and B; without a timestamp nothing is released.
    let allow = [format!("--allow=prod=img-a@{}", pcrs(0xa)), format!("--allow=prod=img-b@{}", pcrs(0xb))];
    let v2 = signed(d, &p("genesis.bundle"), "v2", &[&allow[0], &allow[1]], &p("approver.pem"));
    ok(push(&main, &v2, Some(&store)));
    std::thread::sleep(Duration::from_millis(1100)); // the activation delay of the added images
    refused(
        fetch(&main, 0xa, &p("k0")),
        "policy_stale: policy not fresh: the policy names a timestamp key and no timestamp has been pushed",
    );

    // Only the pipeline's key signs; a forged or foreign timestamp is refused.
    exited(&stamp(&v2, &p("operator.pem"), &p("op.ts")), 2, "is not the timestamp key");
    ok(stamp(&v2, &p("stamper.pem"), &p("t1.ts")));
    let mut forged = std::fs::read(p("t1.ts")).expect("t1");
    let last = forged.len() - 1;
    forged[last] ^= 1;
    std::fs::write(p("forged.ts"), forged).expect("forged");
    refused(
        push(&main, &p("forged.ts"), None),
        "policy_refused: timestamp refused: the timestamp's signature does not verify",
    );

    let out = ok(push(&main, &p("t1.ts"), Some(&store)));
    assert!(out.contains("timestamp accepted: the KRE holds one for policy version 2"), "{out}");
    assert!(store.join("policy-timestamp.cbor").exists(), "kept beside the bundles");
    let t1_issued = held_issued_ms(&main).expect("held");
    ok(fetch(&main, 0xa, &p("k1")));

    // The main KRE's daemon replays the kept timestamp; a newer one arrives in the store through
    // another member's parent (the copy's), and the daemon hands it on before t1 expires.
    let config = p("main-parent.toml");
    std::fs::write(
        &config,
        format!(
            "kre_parent = \"{}\"\nrelease_listen = \"unix:{}\"\nrelease_to = \"{}\"\npolicy_store = \"{}\"\n",
            main.parent(),
            s(&p("main.proxy")),
            main.addr(),
            s(&store)
        ),
    )
    .expect("config");
    let mut cmd = Command::new(bin("keygate"));
    cmd.args(["parent", "--config", &s(&config)]).env("KEYGATE_LOG", "info");
    let mut daemon = Logged::start(&mut cmd, &p("main-parent.log"));
    daemon.wait_for_socket(&p("main.proxy"));

    let copy = start_kre(d, "copy", &p("genesis.bundle"));
    ok(push(&copy, &v2, None));
    std::thread::sleep(Duration::from_millis(300));
    ok(stamp(&v2, &p("stamper.pem"), &p("t2.ts")));
    ok(push(&copy, &p("t2.ts"), Some(&store)));
    std::thread::sleep(Duration::from_millis(1100));
    ok(fetch(&copy, 0xa, &p("k2")));
    let deadline = Instant::now() + MAX_AGE + Duration::from_secs(2);
    while held_issued_ms(&main) == Some(t1_issued) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let held = held_issued_ms(&main).expect("held");
    assert!(held > t1_issued, "the daemon pushed the newer kept timestamp: {}", daemon.log());
    assert!(daemon.log().contains("the kept policy timestamp pushed"), "{}", daemon.log());

    // The pipeline revokes image A (v3) and timestamps only v3 from then on. The main KRE
    // takes both; the copy's parent withholds the revocation.
    let v3 = signed(d, &v2, "v3", &["--revoke=prod=img-a"], &p("approver.pem"));
    ok(push(&main, &v3, Some(&store)));
    refused(fetch(&main, 0xb, &p("k3")), "policy_stale: policy not fresh: no timestamp for policy version 3 yet");
    ok(stamp(&v3, &p("stamper.pem"), &p("t3.ts")));
    ok(push(&main, &p("t3.ts"), Some(&store)));
    refused(fetch(&main, 0xa, &p("k4")), "image_not_allowed");
    ok(fetch(&main, 0xb, &p("k5")));

    // The copy serves the revoked image only until its last v2 timestamp is 4 s old, however
    // often its parent replays the old timestamps.
    ok(fetch(&copy, 0xa, &p("k6")));
    let t2_issued = held_issued_ms(&copy).expect("copy holds t2");
    let expiry = Duration::from_millis(t2_issued + 4_000).saturating_sub(since_epoch());
    std::thread::sleep(expiry + Duration::from_millis(200));
    ok(push(&copy, &p("t1.ts"), None));
    ok(push(&copy, &p("t2.ts"), None));
    refused(fetch(&copy, 0xa, &p("k7")), "policy_stale: policy not fresh: the newest timestamp");
    // Handed the pipeline's newest timestamp without the bundle, it knows it is behind.
    ok(push(&copy, &p("t3.ts"), None));
    refused(fetch(&copy, 0xa, &p("k8")), "names policy version 3, newer than version 2 this KRE holds");

    // A restarted KRE holds no timestamp; `policy restore` gives back the bundles and the newest
    // kept timestamp (a fresh one, pushed through the copy's parent: any KRE of the policy
    // checks it, and the store keeps it).
    drop(daemon);
    main.kill();
    let main = start_kre(d, "main", &p("genesis.bundle"));
    ok(stamp(&v3, &p("stamper.pem"), &p("t4.ts")));
    ok(push(&copy, &p("t4.ts"), Some(&store)));
    let out = ok(keygate(&["policy", "restore", "--kre", &main.parent(), "--store", &s(&store)]));
    assert!(out.contains("restored 2 bundle(s)"), "{out}");
    std::thread::sleep(Duration::from_millis(1100)); // v2's activation delay again: no sealed state recorded it
    ok(fetch(&main, 0xb, &p("k9")));
    refused(fetch(&main, 0xa, &p("k10")), "image_not_allowed");
    assert_eq!(status(&main).pointer("/policy_timestamp/version").and_then(serde_json::Value::as_u64), Some(3));
}

fn since_epoch() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}
