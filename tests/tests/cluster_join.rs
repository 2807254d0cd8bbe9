//! A KRE cluster's join end to end (`docs/cluster.md`): real `keygate-enclave-dev` (the KRE
//! with the mock NSM) and `keygate` processes over Unix sockets. Member A does genesis with
//! its custodians and serves; member B, fresh and awaiting its state, joins from A through
//! `keygate member join` (its parent relays JoinStart → A's member channel → JoinFinish with
//! the stored blob) and serves without any custodian: both release the same data key. A KRE
//! C of the same image on a parent instance that is not a member is refused by A and keeps
//! no key.

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use keygate_tests::cluster::{custodial_kre, custodians_and_root, fetch_args, genesis_with_members, member_args};
use keygate_tests::e2e::{exited, keygate_args, ok, path_arg as s, policy_init, prod_policy_for, refused, DevKre};
use keygate_tests::members::{rotating_bundle, signed_bundle};
use keygate_tests::{keygate, TempDir};

const SEED: &str = "cluster-join-e2e";
const KRE_PCR: u8 = 0x4b;
const CP_PCR: u8 = 0x1c;

/// A member KRE `name` on the mock parent instance `instance`, with its member listener.
fn member_kre(d: &Path, name: &str, instance: &str) -> DevKre {
    let sock = d.join(format!("{name}.sock"));
    let member = d.join(format!("{name}.sock.member"));
    let _ = std::fs::remove_file(&member);
    let extra = member_args(&d.join("genesis.bundle"), &member, instance);
    custodial_kre(d, SEED, KRE_PCR, &sock, &extra, &d.join(format!("{name}.log")))
}

fn fetch(kre: &DevKre, out: &Path) -> Output {
    keygate_args(&fetch_args(SEED, (KRE_PCR, CP_PCR), &kre.addr(), out, &["etcd"], 0))
}

/// `keygate member join` of `kre` from `from`, the stored state in `store` (`--state-dir
/// DIR` or `--store URL`).
fn join(kre: &DevKre, from: &DevKre, store: &[String; 2]) -> Output {
    keygate(&["member", "join", "--kre", &kre.parent(), "--from", &from.member(), &store[0], &store[1]])
}

/// Whether any file the audit follower of the KRE on `sock` wrote contains `needle`.
fn followed_contains(sock: &Path, needle: &[u8]) -> bool {
    let dir = std::path::PathBuf::from(format!("{}.followed", sock.display()));
    std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten().any(|e| std::fs::read(e.path()).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        })
        .unwrap_or(false)
}

#[test]
fn a_restarted_member_joins_from_a_serving_one_without_custodians_and_a_non_member_is_refused() {
    let dir = TempDir::new("keygate-cluster-join").expect("tmp");
    let d = dir.path();
    let store = ["--state-dir".to_owned(), s(&d.join("state"))];
    join_and_refuse(d, &store);
}

/// The same with the sealed state in a (one-member) etcd store shared by the members' parents.
#[test]
fn a_member_joins_with_the_state_in_etcd() {
    let etcd = keygate_tests::etcd::EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("keygate-cluster-join").expect("tmp");
    let store = ["--store".to_owned(), etcd.url("/cluster")];
    join_and_refuse(dir.path(), &store);
}

/// Custodians, the mock root, approver `a1` and `genesis.bundle`: the prod policy with
/// members `a` (instance `i-a`) and `b` (`i-b`).
fn members_genesis(d: &Path) {
    custodians_and_root(d, SEED);
    ok(keygate(&["keygen", "-o", &s(&d.join("a1.pem"))]));
    policy_init(&d.join("a1.pub.pem"), "0s", &d.join("init.bundle"));
    genesis_with_members(
        &d.join("init.bundle"),
        &prod_policy_for("cp", CP_PCR),
        &[("a", "i-a"), ("b", "i-b")],
        &d.join("genesis.bundle"),
    );
}

/// The members' genesis (`members_genesis`) and member A, which does genesis with its
/// custodians into `store` (`--state-dir DIR` or `--store URL`).
fn genesis_on_a(d: &Path, store: &[String; 2]) -> DevKre {
    members_genesis(d);
    let a = member_kre(d, "a", "i-a");
    ok(keygate(&["custodian", "init", "--kre", &a.parent(), &store[0], &store[1]]));
    a
}

/// `keygate custodian unseal` by custodian `c` of `kre`, with `extra` arguments.
fn unseal(d: &Path, kre: &DevKre, c: &str, extra: &[&str]) -> Output {
    let mut args = keygate_tests::cluster::unseal_args(d, &kre.custodian(), c, KRE_PCR);
    args.extend(extra.iter().map(|e| (*e).to_owned()));
    keygate_args(&args)
}

/// Member A (genesis with its custodians into `etcd`) and member B joined from it; the store
/// arguments.
fn a_and_b_on_etcd(d: &Path, etcd: &keygate_tests::etcd::EtcdCluster) -> ([String; 2], DevKre, DevKre) {
    let store = ["--store".to_owned(), etcd.url("/cluster")];
    let a = genesis_on_a(d, &store);
    let b = member_kre(d, "b", "i-b");
    ok(join(&b, &a, &store));
    (store, a, b)
}

/// Genesis on A into `store`, B joins from A, C (no member) is refused.
fn join_and_refuse(d: &Path, store: &[String; 2]) {
    members_genesis(d);
    // The approvers change members with `policy propose`: what changes, and what the next
    // bundle holds (the proposal is not pushed here).
    let next = d.join("members.proposal");
    let diff = ok(keygate_args(&[
        "policy".into(),
        "propose".into(),
        "--from".into(),
        s(&d.join("genesis.bundle")),
        "--remove-member".into(),
        "b".into(),
        "--member".into(),
        "d=i-d".into(),
        "-o".into(),
        s(&next),
    ]));
    assert!(diff.contains("- member b") && diff.contains("+ member d"), "{diff}");
    let shown = ok(keygate(&["policy", "show", &s(&next)]));
    assert!(shown.contains("member a") && shown.contains("member d") && !shown.contains("member b"), "{shown}");
    // A: genesis with its custodians; serves.
    let a = member_kre(d, "a", "i-a");
    ok(keygate(&["custodian", "init", "--kre", &a.parent(), &store[0], &store[1]]));
    ok(fetch(&a, &d.join("ka")));
    let key_a = std::fs::read(d.join("ka/etcd.key")).expect("key");

    // B: fresh, awaiting its state; joins from A through its parent, no custodian acts.
    let b = member_kre(d, "b", "i-b");
    refused(fetch(&b, &d.join("kb0")), "sealed");
    let started = Instant::now();
    let out = ok(join(&b, &a, store));
    let joined = started.elapsed();
    assert!(out.contains("the KRE serves generation 1"), "{out}");
    ok(fetch(&b, &d.join("kb")));
    let serving = started.elapsed();
    eprintln!("member join: {} ms; join and a first release from B: {} ms", joined.as_millis(), serving.as_millis());
    assert_eq!(std::fs::read(d.join("kb/etcd.key")).expect("key"), key_a, "B releases A's data key");
    ok(fetch(&a, &d.join("ka2")));
    assert_eq!(std::fs::read(d.join("ka2/etcd.key")).expect("key"), key_a);
    // A serving member takes no join.
    refused(join(&a, &b, store), "already serves");
    // `status` names the members and which one answers.
    let status = ok(keygate(&["status", "--kre", &b.parent()]));
    assert!(status.contains("Members") && status.contains("(a, b); this KRE is b"), "{status}");

    // C: the same image on a parent instance that is no member: A refuses, C keeps no key.
    let c = member_kre(d, "c", "i-c");
    refused(join(&c, &a, store), "image_not_allowed");
    refused(fetch(&c, &d.join("kc")), "sealed");
    let status = keygate(&["status", "--kre", &c.parent()]);
    exited(&status, 4, "not serving");
    assert!(String::from_utf8_lossy(&status.stdout).contains("this KRE is not one of them"));

    // A's audit trail records the forward to B and the refusal of C (once the follower has
    // collected them).
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let sock_a = d.join("a.sock");
    while !(followed_contains(&sock_a, b"state-key-forwarded") && followed_contains(&sock_a, b"no member"))
        && Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(followed_contains(&sock_a, b"forwarded to member `b`"), "A records the forward");
    assert!(followed_contains(&sock_a, b"no member"), "A records the refusal of C");
}

/// Convergence (`docs/cluster.md`): A and B serve from one etcd store (B joined from A); a
/// signed bundle rotates `prod`'s KEK through A, whose parent stores and commits generation 2.
/// B's parent finds the newer generation and hands it to B (StateAdopt) instead of stopping;
/// once the bundle is replayed to B, B releases the rotated key, the same one A releases.
#[test]
fn a_serving_member_adopts_the_generation_another_member_committed_to_etcd() {
    let etcd = keygate_tests::etcd::EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("keygate-cluster-adopt").expect("tmp");
    let d = dir.path();
    let (store, a, b) = a_and_b_on_etcd(d, &etcd);
    ok(fetch(&b, &d.join("kb1")));
    let key1 = std::fs::read(d.join("kb1/etcd.key")).expect("key");

    // v2 rotates prod's KEK; A takes it and its parent commits generation 2 to etcd.
    let v2 = rotating_bundle(d, &d.join("genesis.bundle"), "v2");
    let push = |bundle: &Path, kre: &DevKre, bundles: &str| {
        ok(keygate(&[
            "policy",
            "push",
            &s(bundle),
            "--kre",
            &kre.parent(),
            "--store",
            &s(&d.join(bundles)),
            "--durable-within",
            "0",
        ]))
    };
    push(&v2, &a, "bundles-a");
    let out = ok(keygate(&["state", "sync", "--kre", &a.parent(), &store[0], &store[1]]));
    assert!(out.contains("committed generation 2"), "{out}");
    ok(fetch(&a, &d.join("ka2")));
    let key2 = std::fs::read(d.join("ka2/etcd.key")).expect("key");
    assert_ne!(key2, key1, "the rotation gives a new data key");

    // B's parent: etcd holds generation 2, newer than B's committed 1: B adopts it.
    let started = Instant::now();
    let out = ok(keygate(&["state", "sync", "--kre", &b.parent(), &store[0], &store[1]]));
    eprintln!("adoption by B's state sync: {} ms", started.elapsed().as_millis());
    assert!(out.contains("the KRE adopted it and serves generation 2"), "{out}");
    // The adopted state records policy v2: B waits until its parent replays the bundle.
    refused(fetch(&b, &d.join("kb2")), "policy_stale");
    push(&v2, &b, "bundles-b");
    ok(fetch(&b, &d.join("kb3")));
    assert_eq!(std::fs::read(d.join("kb3/etcd.key")).expect("key"), key2, "B releases A's rotated key");
    // Nothing of B's own to store: the adopted generation is what it serves.
    let out = ok(keygate(&["state", "sync", "--kre", &b.parent(), &store[0], &store[1]]));
    assert!(out.contains("the KRE serves generation 2; nothing new to store"), "{out}");

    // The race: v3 rotates again and both members take it, each exporting its own generation 3
    // with its own new KEK. A's parent commits first; B's loses the compare-and-swap, and B
    // adopts A's generation 3, dropping its own export: both release A's key.
    let v3 = rotating_bundle(d, &v2, "v3");
    push(&v3, &a, "bundles-a");
    push(&v3, &b, "bundles-b");
    let out = ok(keygate(&["state", "sync", "--kre", &a.parent(), &store[0], &store[1]]));
    assert!(out.contains("committed generation 3"), "{out}");
    let out = ok(keygate(&["state", "sync", "--kre", &b.parent(), &store[0], &store[1]]));
    assert!(out.contains("the KRE adopted it and serves generation 3"), "{out}");
    assert!(out.contains("its own export of generation 3 lost the compare-and-swap and was dropped"), "{out}");
    ok(fetch(&a, &d.join("ka4")));
    ok(fetch(&b, &d.join("kb4")));
    let key3 = std::fs::read(d.join("ka4/etcd.key")).expect("key");
    assert_ne!(key3, key2);
    assert_eq!(std::fs::read(d.join("kb4/etcd.key")).expect("key"), key3, "B releases A's key, not its own");

    // B's audit trail records the adoption.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let sock_b = d.join("b.sock");
    while !followed_contains(&sock_b, b"state-adopted") && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(followed_contains(&sock_b, b"committed by another member, adopted"), "B records the adoption");
}

/// The two rollbacks of a cluster (`docs/cluster.md`, "Confirmation after an unseal"), with real
/// processes: members A and B serve; a bundle revoking the control plane's image is committed
/// as generation 2. The operator of B's instance boots a copy X of the image there, hands it
/// the stored generation 1 (its `state.previous`), and two custodians whose records never saw
/// generation 2 give their shares. X releases nothing: it waits for a serving member's
/// confirmation, and the confirmation from A brings generation 2, under which the revoked image
/// gets nothing. The boundary of the assumption: a cold start skips the confirmation only when
/// every custodian giving a share says so (`--cold-start`); custodians who say so while a member
/// serves do roll back (copy Y serves generation 1 to the revoked image).
#[test]
fn a_copy_unsealed_from_state_previous_waits_for_a_member_and_gets_the_revocation() {
    let dir = TempDir::new("keygate-cluster-rollback").expect("tmp");
    let d = dir.path();
    let store = ["--state-dir".to_owned(), s(&d.join("state"))];
    let a = genesis_on_a(d, &store);
    ok(fetch(&a, &d.join("ka1")));
    let b = member_kre(d, "b", "i-b");
    ok(join(&b, &a, &store));

    // v2 revokes the control plane's image; A takes it and its parent commits generation 2.
    let revoke = signed_bundle(d, &d.join("genesis.bundle"), "revoke", &["--revoke", "prod=cp"]);
    let push = ["--store".to_owned(), s(&d.join("bundles-a")), "--durable-within".into(), "0".into()];
    ok(keygate_args(
        &[["policy", "push", &s(&revoke), "--kre", &a.parent()].map(String::from).to_vec(), push.to_vec()].concat(),
    ));
    let out = ok(keygate(&["state", "sync", "--kre", &a.parent(), &store[0], &store[1]]));
    assert!(out.contains("committed generation 2"), "{out}");
    refused(fetch(&a, &d.join("ka2")), "cluster `prod` is not in the policy");

    // The fork: a copy of the state directory whose newest generation is the previous one.
    let forked = d.join("forked");
    std::fs::create_dir(&forked).expect("dir");
    for e in std::fs::read_dir(d.join("state")).expect("state").flatten() {
        std::fs::copy(e.path(), forked.join(e.file_name())).expect("copy");
    }
    std::fs::rename(forked.join("state.previous"), forked.join("state.current")).expect("roll back");
    let fork_store = ["--state-dir".to_owned(), s(&forked)];

    // X on B's instance: generation 1 loaded, unsealed by c1 and c2 (no records yet).
    let x = member_kre(d, "x", "i-b");
    let out = ok(keygate(&["state", "sync", "--kre", &x.parent(), &fork_store[0], &fork_store[1]]));
    assert!(out.contains("handed stored generation 1"), "{out}");
    ok(unseal(d, &x, "c1", &[]));
    ok(unseal(d, &x, "c2", &[]));
    let out = ok(keygate(&["state", "sync", "--kre", &x.parent(), &fork_store[0], &fork_store[1]]));
    assert!(out.contains("waits for a serving member to confirm"), "{out}");
    refused(fetch(&x, &d.join("kx1")), "sealed");
    let status = keygate(&["status", "--kre", &x.parent()]);
    exited(&status, 4, "not serving");
    assert!(String::from_utf8_lossy(&status.stdout).contains("waiting for a serving member"));
    // The confirmation from A: X takes generation 2, and the revoked image gets nothing.
    let out = ok(join(&x, &a, &store));
    assert!(out.contains("the KRE serves generation 2"), "{out}");
    refused(fetch(&x, &d.join("kx2")), "the KRE denied the request");

    // The boundary: a cold start. c1 without --cold-start refuses; with it, c1 and c2 make Y
    // serve generation 1 although the members serve generation 2: custodians who say that no
    // member serves when one does can roll the cluster back.
    let y = member_kre(d, "y", "i-b");
    let sync = ["state", "sync", "--kre", &y.parent(), &fork_store[0], &fork_store[1], "--cold-start"];
    ok(keygate(&sync));
    let e = unseal(d, &y, "c1", &[]);
    exited(&e, 1, "asks for a cold start");
    ok(unseal(d, &y, "c1", &["--cold-start"]));
    ok(unseal(d, &y, "c2", &["--cold-start"]));
    ok(fetch(&y, &d.join("ky")));
    assert_eq!(
        std::fs::read(d.join("ky/etcd.key")).expect("key"),
        std::fs::read(d.join("ka1/etcd.key")).expect("key"),
        "the cold-started copy serves generation 1: the documented boundary"
    );
}

/// A revocation is durable in a cluster only when every member the bundle names shows it in
/// its own receipt (`policy durable` with a `--kre` per member): A commits it, but B, whose
/// parent has not adopted the generation, gives no receipt; once B adopts it, both receipts
/// verify, and neither member releases to the revoked image. Two addresses that reach the
/// same member do not count as two members.
#[test]
fn a_revocation_is_durable_in_the_cluster_only_with_every_members_receipt() {
    let etcd = keygate_tests::etcd::EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("keygate-cluster-durable").expect("tmp");
    let d = dir.path();
    let (store, a, b) = a_and_b_on_etcd(d, &etcd);
    let revoke = signed_bundle(d, &d.join("genesis.bundle"), "revoke", &["--revoke", "prod=cp"]);
    let push = ["--store".to_owned(), s(&d.join("bundles-a")), "--durable-within".into(), "0".into()];
    ok(keygate_args(
        &[["policy", "push", &s(&revoke), "--kre", &a.parent()].map(String::from).to_vec(), push.to_vec()].concat(),
    ));
    ok(keygate(&["state", "sync", "--kre", &a.parent(), &store[0], &store[1]]));
    let durable = |kres: &[&DevKre]| {
        let mut args: Vec<String> = ["policy", "durable", &s(&revoke)].map(String::from).into();
        for k in kres {
            args.extend(["--kre".to_owned(), k.parent()]);
        }
        args.extend(["--root".to_owned(), s(&d.join("root.pem")), "--durable-within".into(), "1s".into()]);
        args.extend(keygate_tests::e2e::pcr_args("--expect-kre-pcr", KRE_PCR, 1));
        keygate_args(&args)
    };
    // A alone is durable; the cluster is not: B has not been given the bundle.
    ok(durable(&[&a]));
    refused(durable(&[&a, &b]), &format!("{}: ", b.parent()));
    // The same member twice is not two members.
    refused(durable(&[&a, &a]), "do not reach distinct members");
    // B takes the bundle (in force there at once) but has not committed it: still not durable.
    let push = ["--store".to_owned(), s(&d.join("bundles-b")), "--durable-within".into(), "0".into()];
    ok(keygate_args(
        &[["policy", "push", &s(&revoke), "--kre", &b.parent()].map(String::from).to_vec(), push.to_vec()].concat(),
    ));
    refused(durable(&[&a, &b]), "not durable after 1 s");
    // B's parent: its own export of generation 2 loses to A's, which B adopts; both verify.
    let out = ok(keygate(&["state", "sync", "--kre", &b.parent(), &store[0], &store[1]]));
    assert!(out.contains("adopted it and serves generation 2"), "{out}");
    let out = ok(durable(&[&a, &b]));
    assert!(
        out.contains("durable at every member: policy v2 at a (generation 2") && out.contains("b (generation 2"),
        "{out}"
    );
    // Neither member releases to the revoked image.
    refused(fetch(&a, &d.join("ka")), "the KRE denied the request");
    refused(fetch(&b, &d.join("kb")), "the KRE denied the request");
}

/// Every member down (`docs/cluster.md`, the failure table): both KREs restart fresh; a plain
/// unseal of A would wait for a member that is not there, so its parent asks for a cold start
/// and each custodian consents; A serves the newest stored generation and B joins from it
/// without custodians; both release the key they released before.
#[test]
fn with_every_member_down_a_cold_start_unseals_one_and_the_others_join_from_it() {
    let dir = TempDir::new("keygate-cluster-cold").expect("tmp");
    let d = dir.path();
    let store = ["--state-dir".to_owned(), s(&d.join("state"))];
    let a = genesis_on_a(d, &store);
    let b = member_kre(d, "b", "i-b");
    ok(join(&b, &a, &store));
    ok(fetch(&b, &d.join("before")));
    a.kill();
    b.kill();

    let a = member_kre(d, "a", "i-a");
    let b = member_kre(d, "b", "i-b");
    let sync = ["state", "sync", "--kre", &a.parent(), &store[0], &store[1], "--cold-start"];
    ok(keygate(&sync));
    ok(unseal(d, &a, "c1", &["--cold-start"]));
    ok(unseal(d, &a, "c2", &["--cold-start"]));
    ok(fetch(&a, &d.join("a-after")));
    let out = ok(join(&b, &a, &store));
    assert!(out.contains("the KRE serves generation 1"), "{out}");
    ok(fetch(&b, &d.join("b-after")));
    let key = |p: &str| std::fs::read(d.join(p).join("etcd.key")).expect("key");
    assert_eq!(key("a-after"), key("before"));
    assert_eq!(key("b-after"), key("before"));
}

/// ROTE-style catching up: a joiner asks every listed member at once and takes the newest
/// offer. A commits generation 2 (a KEK rotation) to etcd; B's parent has not synced, so B still
/// serves generation 1. A second KRE on B's instance (the same member), joining from B alone,
/// gets B's offer of generation 1, which its parent cannot complete (the shared store's newest
/// is generation 2); joining from B and A, it serves A's generation 2. A member that does not
/// answer is skipped, and with no offer at all the join fails naming every member's reason.
#[test]
fn a_joiner_asking_several_members_takes_the_newest_offer() {
    let etcd = keygate_tests::etcd::EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("keygate-cluster-newest").expect("tmp");
    let d = dir.path();
    let (store, a, b) = a_and_b_on_etcd(d, &etcd);
    let v2 = rotating_bundle(d, &d.join("genesis.bundle"), "v2");
    ok(keygate(&["policy", "push", &s(&v2), "--kre", &a.parent(), "--durable-within", "0"]));
    let out = ok(keygate(&["state", "sync", "--kre", &a.parent(), &store[0], &store[1]]));
    assert!(out.contains("committed generation 2"), "{out}");

    let join_many = |kre: &DevKre, from: &[&DevKre]| {
        let mut args = vec!["member".to_owned(), "join".into(), "--kre".into(), kre.parent()];
        for f in from {
            args.extend(["--from".into(), f.member()]);
        }
        args.extend(store.iter().cloned());
        keygate_args(&args)
    };
    let from_b_only = member_kre(d, "b-copy-1", "i-b");
    refused(join_many(&from_b_only, &[&b]), "holds generation 2, not the generation 1 the serving member vouched for");
    let out = ok(join_many(&from_b_only, &[&b, &a]));
    assert!(out.contains(&format!("joined from {}: the KRE serves generation 2", a.member())), "{out}");

    let gone = d.join("nobody.sock.member");
    let out = ok(keygate_args(&[
        "member".into(),
        "join".into(),
        "--kre".into(),
        member_kre(d, "b-copy-2", "i-b").parent(),
        "--from".into(),
        format!("unix:{}", gone.display()),
        "--from".into(),
        b.member(),
        "--from".into(),
        a.member(),
        store[0].clone(),
        store[1].clone(),
    ]));
    assert!(out.contains(&format!("joined from {}: the KRE serves generation 2", a.member())), "{out}");

    let lonely = member_kre(d, "b-copy-3", "i-b");
    let o = keygate_args(&[
        "member".into(),
        "join".into(),
        "--kre".into(),
        lonely.parent(),
        "--from".into(),
        format!("unix:{}", gone.display()),
        store[0].clone(),
        store[1].clone(),
    ]);
    refused(o, "no serving member offered its state");
}
