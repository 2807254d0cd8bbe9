//! KEK rotation through the protocol core, without I/O: a policy naming KEK version N makes
//! the KRE release versions N, N-1, … (current first), a pushed bundle rotates (with
//! custodians: released only once the parent has stored and committed the new version), and
//! a retirement removes old versions from releases at once.

use std::sync::Arc;

use keygate_attestation::bundle::{self, PolicyBody};
use keygate_attestation::crypto::{default_backend, p384_scalar_from, P384Scalar};
use keygate_attestation::mock::{derive_key, MockNsm};
use keygate_attestation::policy::ReleasePolicy;
use keygate_attestation::Verifier;
use keygate_enclave::audit::AuditEvent;
use keygate_enclave::kre::{Kre, KreConfig};
use keygate_enclave::peer::client::{ClientError, FetchRequest, ReleasedKey};
use keygate_enclave::state::custody::CustodianSet;
use keygate_enclave::wire::{DenyCode, Message};

mod common;
use common::{
    expectations, fetch_denial as denial, id, image, now, one, pcrs, prod_policy, report, rng_from, set_now, sha384, T,
};

const SEED: &[u8] = b"rotation-test";
const HOUR: u64 = 3_600_000;

/// "prod" allows the image with PCRs `pcrs(0x10)`, with the given KEK schedule.
fn policy(kek_version: u32, kek_retire_below: u32) -> ReleasePolicy {
    prod_policy(kek_version, kek_retire_below)
}

fn nsm() -> MockNsm {
    MockNsm::new(SEED, pcrs(0x70), Arc::new(now)).with_instance("kre")
}

/// Stores what the KRE exports (as the parent does) and commits it; returns the generation.
fn sync(kre: &Kre) -> u64 {
    common::sync_stored(kre).0
}

fn fetch(kre: &Kre) -> Result<Vec<ReleasedKey>, ClientError> {
    fetch_as(kre, 0x10)
}

/// A fetch by the control plane with PCRs `pcrs(image)`.
fn fetch_as(kre: &Kre, image: u8) -> Result<Vec<ReleasedKey>, ClientError> {
    let cpi = MockNsm::new(SEED, pcrs(image), Arc::new(now)).with_instance("cpi");
    let req = FetchRequest {
        cluster: id("prod"),
        key_ids: vec![id("etcd"), id("secrets")],
        expect_kre_pcrs: vec![],
        also_accept_kre: vec![],
    };
    common::fetch_as(kre, &cpi, req)
}

/// (key id, version) of each released key, in release order.
fn versions(keys: &[ReleasedKey]) -> Vec<(String, u32)> {
    keys.iter().map(|k| (k.key_id.to_string(), k.version)).collect()
}

fn expect(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn kek_rotations(kre: &Kre) -> Vec<(String, u32)> {
    kre.audit()
        .entries_after(0, 1000)
        .into_iter()
        .filter_map(|e| match e.event() {
            AuditEvent::KekRotated { cluster, new_version } => Some((cluster.to_string(), *new_version)),
            _ => None,
        })
        .collect()
}

/// A chain of signed bundles: approver 1 alone (threshold 1), "prod" in every bundle.
struct Chain {
    key: p384::ecdsa::SigningKey,
    last: PolicyBody,
}

impl Chain {
    /// The genesis bundle (prod at KEK version 1) and the chain.
    fn genesis() -> (Vec<u8>, Self) {
        Self::genesis_with_delay(3600)
    }

    /// As [`Self::genesis`], with the given activation delay (seconds).
    fn genesis_with_delay(activation_delay: u64) -> (Vec<u8>, Self) {
        let key = derive_key(b"rotation-approvers", "approver-1");
        let body = PolicyBody { activation_delay, ..common::genesis_body(&key, policy(1, 0)) };
        let bytes = common::genesis_bundle(&body);
        (bytes, Self { key, last: body })
    }

    /// The next bundle with `prod`'s KEK schedule set, signed.
    fn next(&mut self, kek_version: u32, kek_retire_below: u32) -> Vec<u8> {
        self.next_policy(policy(kek_version, kek_retire_below))
    }

    /// The next bundle with `policy`, signed.
    fn next_policy(&mut self, policy: ReleasePolicy) -> Vec<u8> {
        let body = PolicyBody { policy, ..common::next_body(&self.last) };
        let bytes = common::signed_bundle(&body, &self.key);
        self.last = body;
        bytes
    }
}

fn push(kre: &Kre, bundle: Vec<u8>) {
    match one(kre, Message::PolicyPush { bundle }) {
        Message::PolicyAccepted { activates_at_ms, .. } => assert_eq!(activates_at_ms, T, "in force at once"),
        other => panic!("expected PolicyAccepted, got {other:?}"),
    }
}

fn custodians() -> CustodianSet {
    custodian_keys().1
}

/// Three custodians, two of them needed: their private scalars and the set.
fn custodian_keys() -> (Vec<P384Scalar>, CustodianSet) {
    let c = default_backend();
    let (scalars, keys): (Vec<P384Scalar>, Vec<[u8; 97]>) = (1..=3u64)
        .map(|i| {
            let (s, p) = p384_scalar_from(c, rng_from(1000 + i)).expect("key");
            let point: [u8; 97] = p.try_into().expect("point");
            (s, point)
        })
        .unzip();
    (scalars, CustodianSet::new(c, 2, keys).expect("set"))
}

/// Stores the KRE's export and commits it; returns the stored (blob, shares, genesis attestation).
fn store(kre: &Kre) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let r = report(kre, Message::StatePoll);
    assert_ne!(r.export_generation, 0, "something to store");
    let stored = (r.blob.clone(), r.shares.clone(), r.genesis_attestation.clone());
    sync(kre);
    stored
}

/// A KRE of the image built with `genesis` and the custodian set `set` (sealed until genesis
/// or an unseal).
fn custodial_kre(genesis: &[u8], set: &CustodianSet) -> Kre {
    let nsm = nsm();
    let verifier = Verifier::new(nsm.root_anchor());
    let config = KreConfig { custodians: Some(set.clone()), ..KreConfig::default() };
    Kre::with_genesis(config, verifier, genesis, Arc::new(nsm)).expect("kre")
}

/// A KRE of the image built with `genesis`, with the three custodians, past genesis and
/// serving generation 1.
fn committed_kre(genesis: &[u8]) -> Kre {
    let kre = custodial_kre(genesis, &custodians());
    report(&kre, Message::StateGenesis);
    assert_eq!(sync(&kre), 1);
    kre
}

/// A restarted KRE (the same image: genesis bundle, custodians) with `stored` loaded, sealed.
fn restarted(genesis: &[u8], set: &CustodianSet, stored: &(Vec<u8>, Vec<u8>, Vec<u8>)) -> Kre {
    let kre = custodial_kre(genesis, set);
    let (blob, shares, genesis_attestation) = stored.clone();
    assert_eq!(report(&kre, Message::StateLoad { blob, shares, genesis_attestation, cold_start: false }).phase, 2);
    kre
}

/// Two custodians unseal `kre`.
fn unseal(kre: &Kre, scalars: &[P384Scalar]) {
    let verifier = Verifier::new(nsm().root_anchor());
    let kre_pcrs = expectations(&pcrs(0x70));
    let expect = common::custodian_expects(&verifier, &kre_pcrs, false);
    common::unseal_with(kre, &scalars[..2], &expect, default_backend());
}

/// The KRE's refusal of `m`.
fn refused(kre: &Kre, m: Message) -> (DenyCode, String) {
    common::denied(one(kre, m))
}

fn status(kre: &Kre) -> (serde_json::Value, serde_json::Value) {
    let v: serde_json::Value = serde_json::from_str(&kre.status_json()).expect("status json");
    (v["policy_version"].clone(), v["policy_digest"].clone())
}

#[test]
fn the_sealed_policy_head_holds_releases_until_replayed_and_refuses_a_fork() {
    let (scalars, set) = custodian_keys();
    let (genesis, mut chain) = Chain::genesis();
    let kre = custodial_kre(&genesis, &set);
    assert_eq!(kre.nsm_kind(), "mock", "the startup log line names the NSM backend");
    report(&kre, Message::StateGenesis);
    store(&kre);
    let keys = fetch(&kre).expect("released");
    let v2 = chain.next(1, 0);
    let v2_digest = bundle::digest(&bundle::encode_body(&chain.last));
    push(&kre, v2.clone());
    assert_eq!(status(&kre), (serde_json::json!(2), serde_json::json!(hex::encode(v2_digest))));
    let stored = store(&kre);
    assert_eq!(kek_rotations(&kre), [("prod".to_owned(), 1)], "a commit of a policy head adds no KEK version");

    // Restart and unseal: releases wait until the parent has replayed up to version 2.
    let k2 = restarted(&genesis, &set, &stored);
    assert_eq!(status(&k2).0, serde_json::json!(1));
    unseal(&k2, &scalars);
    let (code, reason) = denial(fetch(&k2));
    assert_eq!(code, DenyCode::PolicyStale);
    assert!(reason.contains("policy version 2"), "{reason}");
    // Refused before its document was checked, it is counted with the anonymous refusals;
    // a pull writes their aggregate.
    one(&k2, Message::AuditPull { after_seq: 0, max: 1000 });
    assert!(
        k2.audit().entries_after(0, 1000).iter().any(|e| matches!(
            e.event(),
            AuditEvent::AnonymousRefusals { counts, .. } if counts.iter().any(|(c, _)| c == "policy_stale")
        )),
        "the refused release is audited"
    );

    // Another version 2 (a fork of the chain at the recorded head) is refused, and audited
    // with its version and digest.
    let mut fork = Chain { key: chain.key.clone(), last: Chain::genesis().1.last };
    let forked = fork.next(2, 0);
    let fork_digest = bundle::digest(&bundle::encode_body(&fork.last));
    let (code, reason) = refused(&k2, Message::PolicyPush { bundle: forked.clone() });
    assert_eq!(code, DenyCode::PolicyRefused);
    assert!(reason.contains("fork"), "{reason}");
    assert!(k2.audit().entries_after(0, 1000).iter().any(|e| matches!(
        e.event(),
        AuditEvent::PolicyRefused { version: Some(2), digest: Some(d), .. } if *d == fork_digest
    )));
    assert_eq!(denial(fetch(&k2)).0, DenyCode::PolicyStale);
    // The recorded version 2 is accepted, and the keys are those from before the restart.
    push(&k2, v2.clone());
    assert_eq!(status(&k2), (serde_json::json!(2), serde_json::json!(hex::encode(v2_digest))));
    assert_eq!(fetch(&k2).expect("released after the replay"), keys);

    // Bundles replayed while still sealed count once unsealed: a rotation among them gets its
    // KEK version in the next generation, which the parent must store.
    let k3 = restarted(&genesis, &set, &stored);
    push(&k3, v2);
    push(&k3, chain.next(2, 0));
    unseal(&k3, &scalars);
    let r = report(&k3, Message::StatePoll);
    assert_eq!((r.committed_generation, r.export_generation), (2, 3), "the rotation to version 2 awaits storage");
    sync(&k3);
    assert_eq!(
        versions(&fetch(&k3).expect("released")),
        expect(&[("etcd", 2), ("etcd", 1), ("secrets", 2), ("secrets", 1)])
    );

    // A fork replayed while sealed (the KRE cannot know the recorded head yet) is found at
    // the unseal: releases are refused, naming the fork.
    let k4 = restarted(&genesis, &set, &stored);
    push(&k4, forked);
    unseal(&k4, &scalars);
    let (code, reason) = denial(fetch(&k4));
    assert_eq!(code, DenyCode::PolicyStale);
    assert!(reason.contains("fork"), "{reason}");
}

#[test]
fn an_ephemeral_kre_releases_every_version_of_its_static_policy_current_first() {
    let nsm = nsm();
    let verifier = Verifier::new(nsm.root_anchor());
    let kre = Kre::new(KreConfig::default(), verifier, policy(2, 0), Arc::new(nsm)).expect("kre");
    let keys = fetch(&kre).expect("released");
    assert_eq!(versions(&keys), expect(&[("etcd", 2), ("etcd", 1), ("secrets", 2), ("secrets", 1)]));
    assert_ne!(keys[0].key, keys[1].key, "each version derives its own data key");
    assert_ne!(keys[2].key, keys[3].key);
    assert_ne!(keys[0].key, keys[2].key);
    assert_eq!(fetch(&kre).expect("again"), keys, "stable within a run");
    assert_eq!(kek_rotations(&kre), vec![("prod".to_owned(), 2)], "the rotation is audited when created");

    // A static policy retiring version 1: only version 2.
    let nsm = MockNsm::new(SEED, pcrs(0x70), Arc::new(|| T)).with_instance("kre2");
    let verifier = Verifier::new(nsm.root_anchor());
    let kre = Kre::new(KreConfig::default(), verifier, policy(3, 2), Arc::new(nsm)).expect("kre");
    let keys = fetch(&kre).expect("released");
    assert_eq!(versions(&keys), expect(&[("etcd", 3), ("etcd", 2), ("secrets", 3), ("secrets", 2)]));
}

#[test]
fn a_pushed_rotation_without_custodians_is_released_at_once_and_a_retirement_removes_old_versions() {
    let (genesis, mut chain) = Chain::genesis();
    let nsm = nsm();
    let verifier = Verifier::new(nsm.root_anchor());
    let kre = Kre::with_genesis(KreConfig::default(), verifier, &genesis, Arc::new(nsm)).expect("kre");
    let v1 = fetch(&kre).expect("released");
    assert_eq!(versions(&v1), expect(&[("etcd", 1), ("secrets", 1)]));

    push(&kre, chain.next(2, 0));
    let keys = fetch(&kre).expect("released");
    assert_eq!(versions(&keys), expect(&[("etcd", 2), ("etcd", 1), ("secrets", 2), ("secrets", 1)]));
    assert_eq!(keys[1].key, v1[0].key, "version 1 gives the same data key as before the rotation");
    assert_eq!(kek_rotations(&kre), vec![("prod".to_owned(), 2)]);

    push(&kre, chain.next(2, 2));
    let keys = fetch(&kre).expect("released");
    assert_eq!(versions(&keys), expect(&[("etcd", 2), ("secrets", 2)]), "version 1 retired at once");

    // A decrease is refused and changes nothing.
    let mut bad = Chain { key: chain.key.clone(), last: chain.last.clone() };
    let (code, reason) = refused(&kre, Message::PolicyPush { bundle: bad.next(1, 0) });
    assert_eq!(code, DenyCode::PolicyRefused);
    assert!(reason.contains("KEK version 1 is lower than version 2"), "{reason}");
    assert_eq!(versions(&fetch(&kre).expect("released")), expect(&[("etcd", 2), ("secrets", 2)]));
}

#[test]
fn with_custodians_a_rotation_is_released_only_after_the_commit_and_a_retirement_at_once() {
    let (genesis, mut chain) = Chain::genesis();
    let kre = committed_kre(&genesis);
    let v1 = fetch(&kre).expect("released");
    assert_eq!(versions(&v1), expect(&[("etcd", 1), ("secrets", 1)]));

    // The rotation bundle is accepted at once, but version 2 exists only in the working
    // state: releases keep version 1 until the parent has stored it.
    push(&kre, chain.next(2, 0));
    let keys = fetch(&kre).expect("released");
    assert_eq!(versions(&keys), expect(&[("etcd", 1), ("secrets", 1)]), "the new version is not yet durable");
    assert!(!kek_rotations(&kre).contains(&("prod".to_owned(), 2)), "audited at the commit, not before");
    let r = report(&kre, Message::StatePoll);
    assert_eq!((r.committed_generation, r.export_generation), (1, 2));
    assert_eq!(
        versions(&fetch(&kre).expect("released")),
        expect(&[("etcd", 1), ("secrets", 1)]),
        "exported but not committed: still not released"
    );
    assert_eq!(sync(&kre), 2);
    let keys = fetch(&kre).expect("released");
    assert_eq!(versions(&keys), expect(&[("etcd", 2), ("etcd", 1), ("secrets", 2), ("secrets", 1)]));
    assert_eq!(keys[1].key, v1[0].key);
    assert!(kek_rotations(&kre).contains(&("prod".to_owned(), 2)));

    // Retirement of version 1: at once, nothing to store.
    push(&kre, chain.next(2, 2));
    assert_eq!(versions(&fetch(&kre).expect("released")), expect(&[("etcd", 2), ("secrets", 2)]));

    // Rotating and retiring in one bundle: version 3 is not durable yet and version 2 is
    // retired, so nothing may be released until the commit.
    push(&kre, chain.next(3, 3));
    assert_eq!(denial(fetch(&kre)).0, DenyCode::StatePending);
    sync(&kre);
    assert_eq!(versions(&fetch(&kre).expect("released")), expect(&[("etcd", 3), ("secrets", 3)]));
}

#[test]
fn a_genesis_policy_with_a_later_kek_version_gets_it_in_the_next_generation() {
    let key = derive_key(b"rotation-approvers", "approver-1");
    let genesis = common::genesis_bundle(&common::genesis_body(&key, policy(2, 0)));
    let kre = committed_kre(&genesis);
    assert_eq!(versions(&fetch(&kre).expect("released")), expect(&[("etcd", 1), ("secrets", 1)]));
    assert_eq!(sync(&kre), 2);
    assert_eq!(
        versions(&fetch(&kre).expect("released")),
        expect(&[("etcd", 2), ("etcd", 1), ("secrets", 2), ("secrets", 1)])
    );
}

/// Fills the audit buffer until even its reserve is exhausted (entries that release nothing).
fn fill_audit(kre: &Kre) {
    let refused = || AuditEvent::ChallengeRefused { code: "busy".into(), reason: "filler".into() };
    while kre.audit().append(refused(), T).is_ok() {}
    assert!(!kre.audit().has_room_for_admin(), "the reserve is exhausted");
}

/// Acknowledges every buffered entry, as `keygate audit pull` does once they are stored.
fn pull_and_ack(kre: &Kre) {
    let entries = match one(kre, Message::AuditPull { after_seq: 0, max: 1024 }) {
        Message::AuditBatch { entries, .. } => entries,
        other => panic!("expected AuditBatch, got {other:?}"),
    };
    assert!(!entries.is_empty());
    let up_to_seq = kre.audit().status().last_seq;
    match one(kre, Message::AuditAck { up_to_seq }) {
        Message::AuditAcked { .. } => {}
        other => panic!("expected AuditAcked, got {other:?}"),
    }
}

/// A policy push that cannot be recorded is refused (`audit_full`, retryable) and changes
/// nothing: neither the policy head nor the KEKs. Once the trail is collected, the same
/// bundle is accepted and recorded.
#[test]
fn a_policy_push_that_cannot_be_recorded_is_refused_and_changes_nothing() {
    let (genesis, mut chain) = Chain::genesis();
    let nsm = nsm();
    let verifier = Verifier::new(nsm.root_anchor());
    let config = KreConfig {
        audit: keygate_enclave::audit::AuditConfig {
            capacity: 8,
            reserve: 2,
            ..keygate_enclave::audit::AuditConfig::default()
        },
        ..KreConfig::default()
    };
    let kre = Kre::with_genesis(config, verifier, &genesis, Arc::new(nsm)).expect("kre");
    let head = kre.policy_head();
    fill_audit(&kre);

    let next = chain.next(2, 0);
    let (code, reason) = refused(&kre, Message::PolicyPush { bundle: next.clone() });
    assert_eq!(code, DenyCode::AuditFull, "{reason}");
    assert_eq!(kre.policy_head(), head, "the policy is unchanged");
    pull_and_ack(&kre);
    assert_eq!(kek_rotations(&kre), vec![], "no KEK was rotated");
    assert_eq!(versions(&fetch(&kre).expect("released")), expect(&[("etcd", 1), ("secrets", 1)]));

    push(&kre, next);
    assert_eq!(kre.policy_head().map(|(v, _)| v), Some(2));
    let recorded: Vec<u64> = kre
        .audit()
        .entries_after(0, 1000)
        .iter()
        .filter_map(|e| match e.event() {
            AuditEvent::PolicyAccepted { version, .. } => Some(*version),
            _ => None,
        })
        .collect();
    assert_eq!(recorded, vec![2]);
    assert_eq!(kek_rotations(&kre), vec![("prod".to_owned(), 2)]);
}

/// With custodians, a commit whose record (the commit and the KEK versions it makes usable)
/// does not fit is refused, and the exported generation stays uncommitted until it does.
#[test]
fn a_commit_that_cannot_be_recorded_is_refused_until_the_trail_is_collected() {
    let (genesis, mut chain) = Chain::genesis();
    let kre = committed_kre(&genesis);
    push(&kre, chain.next(2, 0));
    let r = report(&kre, Message::StatePoll);
    assert_eq!((r.committed_generation, r.export_generation), (1, 2));
    let sha = sha384(&r.blob);
    fill_audit(&kre);
    let (code, reason) = refused(&kre, Message::StateCommit { generation: r.export_generation, blob_sha384: sha });
    assert_eq!(code, DenyCode::AuditFull, "{reason}");
    assert_eq!(report(&kre, Message::StatePoll).committed_generation, 1, "not committed");
    pull_and_ack(&kre);
    assert_eq!(versions(&fetch(&kre).expect("released")), expect(&[("etcd", 1), ("secrets", 1)]));
    assert_eq!(kek_rotations(&kre), vec![]);
    match one(&kre, Message::StateCommit { generation: r.export_generation, blob_sha384: sha }) {
        Message::StateCommitted { .. } => {}
        other => panic!("expected StateCommitted, got {other:?}"),
    }
    assert_eq!(kek_rotations(&kre), vec![("prod".to_owned(), 2)]);
}

/// The policy's retirement reaches the sealed state and only ever rises there: a later
/// bundle that lowers it (here without an activation delay), an older bundle replayed, and
/// a restart with the chain replayed never make a retired version releasable again.
#[test]
fn a_retired_kek_version_stays_retired_across_an_unretiring_bundle_a_restart_and_a_replay() {
    let (scalars, set) = custodian_keys();
    let (genesis, mut chain) = Chain::genesis_with_delay(0);
    let kre = custodial_kre(&genesis, &set);
    report(&kre, Message::StateGenesis);
    sync(&kre);
    let (v2, v3) = (chain.next(2, 0), chain.next(2, 2));
    push(&kre, v2.clone());
    sync(&kre);
    assert_eq!(
        versions(&fetch(&kre).expect("released")),
        expect(&[("etcd", 2), ("etcd", 1), ("secrets", 2), ("secrets", 1)])
    );
    push(&kre, v3.clone());
    let current_only = expect(&[("etcd", 2), ("secrets", 2)]);
    assert_eq!(versions(&fetch(&kre).expect("released")), current_only, "retired at once");
    let retired = store(&kre);
    // The parent replays the older bundle: refused, nothing changes.
    assert_eq!(refused(&kre, Message::PolicyPush { bundle: v2.clone() }).0, DenyCode::PolicyRefused);
    // A later bundle un-retires (in force at once in this chain): version 1 stays retired.
    let v4 = chain.next(2, 0);
    push(&kre, v4.clone());
    assert_eq!(versions(&fetch(&kre).expect("released")), current_only, "the sealed retirement holds");
    let unretired = store(&kre);
    // Restart at either generation, unseal, replay the chain: version 1 never comes back.
    for (stored, replay) in [
        (&retired, vec![v2.clone(), v3.clone()]),
        (&retired, vec![v2.clone(), v3.clone(), v4.clone()]),
        (&unretired, vec![v2.clone(), v3.clone(), v4.clone()]),
    ] {
        let k = restarted(&genesis, &set, stored);
        unseal(&k, &scalars);
        for b in replay {
            push(&k, b);
        }
        sync(&k);
        assert_eq!(versions(&fetch(&k).expect("released")), current_only);
    }
}

/// "prod" allows the images with PCRs `pcrs(b)` for each `b` (KEK version 1).
fn images(bases: &[u8]) -> ReleasePolicy {
    let mut p = policy(1, 0);
    let rule = p.clusters.get_mut("prod").expect("prod");
    rule.images = bases.iter().map(|b| image(&format!("cp{b:02x}"), *b)).collect();
    p
}

/// The KRE's answer to a push: its activation time.
fn push_at(kre: &Kre, bundle: Vec<u8>) -> u64 {
    match one(kre, Message::PolicyPush { bundle }) {
        Message::PolicyAccepted { activates_at_ms, .. } => activates_at_ms,
        other => panic!("expected PolicyAccepted, got {other:?}"),
    }
}

/// A restart replays the chain with the activation times the sealed state recorded: an
/// image in force for long is released at once after the unseal and restore, one still
/// waiting keeps its original time (not a fresh delay), a new change gets a fresh delay, and
/// a waiting image is refused with `activation_pending`, which a client retries and never
/// reads as a revocation.
#[test]
fn a_restore_reapplies_the_recorded_activation_times_and_pending_is_not_a_revocation() {
    let (scalars, set) = custodian_keys();
    let (genesis, mut chain) = Chain::genesis();
    set_now(T);
    let kre = custodial_kre(&genesis, &set);
    report(&kre, Message::StateGenesis);
    sync(&kre);
    // v2 adds image 0x20: loosening, in force one hour later.
    let v2 = chain.next_policy(images(&[0x10, 0x20]));
    assert_eq!(push_at(&kre, v2.clone()), T + HOUR);
    let e = fetch_as(&kre, 0x20).expect_err("waits");
    let (code, reason) = denial(Err(e.clone()));
    assert_eq!(code, DenyCode::ActivationPending, "{reason}");
    assert!(e.is_retryable() && !e.is_refusal(), "a waiting image is not a revocation");
    sync(&kre);
    set_now(T + 2 * HOUR);
    let keys = fetch_as(&kre, 0x20).expect("in force");
    // v3 adds image 0x30: in force at T + 3 h.
    let v3 = chain.next_policy(images(&[0x10, 0x20, 0x30]));
    assert_eq!(push_at(&kre, v3.clone()), T + 3 * HOUR);
    let stored = store(&kre);

    // Restart half an hour later, unseal, restore.
    set_now(T + 2 * HOUR + HOUR / 2);
    let k = restarted(&genesis, &set, &stored);
    unseal(&k, &scalars);
    assert_eq!(push_at(&k, v2.clone()), T + HOUR, "the recorded time, not a fresh delay");
    assert_eq!(push_at(&k, v3), T + 3 * HOUR);
    assert_eq!(fetch_as(&k, 0x20).expect("in force at once"), keys);
    let (code, reason) = denial(fetch_as(&k, 0x30));
    assert_eq!(code, DenyCode::ActivationPending);
    assert!(reason.contains(&(T + 3 * HOUR).to_string()), "its original time: {reason}");
    set_now(T + 3 * HOUR);
    fetch_as(&k, 0x30).expect("in force at its original time");
    // A new change gets a fresh delay; the parent cannot replay an old one to move a time.
    let v4 = chain.next_policy(images(&[0x10, 0x20, 0x30, 0x40]));
    assert_eq!(push_at(&k, v4), T + 4 * HOUR);
    assert_eq!(denial(fetch_as(&k, 0x40)).0, DenyCode::ActivationPending);
    assert_eq!(refused(&k, Message::PolicyPush { bundle: v2 }).0, DenyCode::PolicyRefused);
    assert_eq!(denial(fetch_as(&k, 0x40)).0, DenyCode::ActivationPending);
}

fn durable_wait(kre: &Kre, version: u64, digest: [u8; 48]) -> Message {
    one(kre, Message::PolicyDurableWait { version, digest, wait_ms: 0 })
}

#[test]
fn a_policy_change_is_durable_only_once_committed_and_until_then_the_stricter_policy_holds() {
    use keygate_enclave::audit::{PolicyReceipt, PolicyReceiptError, TrailOptions};
    // No activation delay: an addition would be in force at once, were it not for durability.
    let (genesis, mut chain) = Chain::genesis_with_delay(0);
    let kre = committed_kre(&genesis);
    fetch_as(&kre, 0x10).expect("the genesis image");
    let not_durable = |kre: &Kre| {
        let v: serde_json::Value = serde_json::from_str(&kre.status_json()).expect("status json");
        v["policy_in_force_not_durable"].as_bool().expect("bool")
    };

    // v2 adds image 0x20: accepted, in force, not durable. The stricter of v1 and v2 holds, so
    // 0x20 waits (retryable, not a revocation) and 0x10 is still served.
    let v2 = chain.next_policy(images(&[0x10, 0x20]));
    let v2_digest = bundle::digest(&bundle::encode_body(&chain.last));
    push(&kre, v2);
    assert!(not_durable(&kre));
    let (code, reason) = denial(fetch_as(&kre, 0x20));
    assert_eq!(code, DenyCode::PolicyNotDurable, "{reason}");
    assert!(ClientError::Denied { code, reason }.is_retryable());
    fetch_as(&kre, 0x10).expect("allowed by both");
    let (code, reason) = refused(&kre, Message::PolicyDurableWait { version: 2, digest: v2_digest, wait_ms: 0 });
    assert_eq!(code, DenyCode::PolicyNotDurable);
    assert!(reason.contains("generation 1") && reason.contains("policy v1"), "{reason}");
    // A bundle this KRE never accepted gets no receipt.
    assert_eq!(
        refused(&kre, Message::PolicyDurableWait { version: 2, digest: [7; 48], wait_ms: 0 }).0,
        DenyCode::PolicyRefused
    );

    // The parent stores and commits the export that carries v2: durable, receipt, 0x20 served.
    assert_eq!(sync(&kre), 2);
    assert!(!not_durable(&kre));
    fetch_as(&kre, 0x20).expect("durable now");
    let Message::PolicyDurable { receipt } = durable_wait(&kre, 2, v2_digest) else { panic!("expected PolicyDurable") };
    let verifier = Verifier::new(nsm().root_anchor());
    let kre_pcrs = expectations(&pcrs(0x70));
    let r = PolicyReceipt::decode(&receipt).expect("decode");
    let proof = r.verify(&verifier, &kre_pcrs, TrailOptions::default(), 2, &v2_digest).expect("verifies");
    assert_eq!((proof.generation, proof.policy_version), (2, 2));
    assert_eq!(PolicyReceipt::decode(&r.to_bytes()).expect("round trip"), r);
    // Each claim is checked: another bundle, another KRE image, a changed byte.
    assert!(matches!(
        r.verify(&verifier, &kre_pcrs, TrailOptions::default(), 2, &[7; 48]),
        Err(PolicyReceiptError::OtherPolicy { expected: 2, found: 2 })
    ));
    let other_kre = expectations(&pcrs(0x71));
    assert!(matches!(
        r.verify(&verifier, &other_kre, TrailOptions::default(), 2, &v2_digest),
        Err(PolicyReceiptError::KreImageMismatch(_))
    ));
    for at in [1 + 48 + 3, 1 + 48 + 8 + 3, receipt.len() - 100] {
        let mut bad = receipt.clone();
        bad[at] ^= 1;
        let verified = PolicyReceipt::decode(&bad)
            .is_ok_and(|b| b.verify(&verifier, &kre_pcrs, TrailOptions::default(), 2, &v2_digest).is_ok());
        assert!(!verified, "byte {at} changed and still verifies");
    }

    // v3 revokes 0x10: in force at once, durable or not.
    let v3 = chain.next_policy(images(&[0x20]));
    push(&kre, v3);
    assert!(not_durable(&kre));
    assert_eq!(denial(fetch_as(&kre, 0x10)).0, DenyCode::ImageNotAllowed, "a revocation does not wait");
    fetch_as(&kre, 0x20).expect("allowed by both");
}

#[test]
fn without_custodians_no_policy_is_reported_durable() {
    let (genesis, mut chain) = Chain::genesis_with_delay(0);
    let nsm = nsm();
    let verifier = Verifier::new(nsm.root_anchor());
    let kre = Kre::with_genesis(KreConfig::default(), verifier, &genesis, Arc::new(nsm)).expect("kre");
    push(&kre, chain.next_policy(images(&[0x10, 0x20])));
    let digest = bundle::digest(&bundle::encode_body(&chain.last));
    fetch_as(&kre, 0x20).expect("no sealed state: the newest policy alone holds");
    let (code, reason) = refused(&kre, Message::PolicyDurableWait { version: 2, digest, wait_ms: 0 });
    assert_eq!(code, DenyCode::StateRefused);
    assert!(reason.contains("without custodians"), "{reason}");
}
