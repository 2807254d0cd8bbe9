//! Signed policy bundles: the adversarial table (each refusal with its exact error) and the
//! activation-delay semantics.

use std::collections::BTreeMap;

use keygate_attestation::bundle::{self, ApproverKey, BundleError, PolicyBody, PolicyState};
use keygate_attestation::crypto::{all_backends, default_backend};
use keygate_attestation::mock::{derive_key, public_point, MockNsm};
use keygate_attestation::policy::{self, ClusterRule, ImageRule, MismatchDetail, PolicyDenial, ReleasePolicy};
use keygate_attestation::{AttestRequest, DocumentKind, Nsm, Verifier, VerifyOptions};
use p384::ecdsa::signature::Signer;
use p384::ecdsa::{Signature, SigningKey};

const NOW_MS: u64 = 1_795_478_400_000;
const NOW_S: u64 = NOW_MS / 1000;

fn key(i: u8) -> SigningKey {
    derive_key(b"approvers", &format!("approver-{i}"))
}

fn point(k: &SigningKey) -> ApproverKey {
    public_point(k).try_into().expect("97 bytes")
}

fn image(name: &str, b: u8) -> ImageRule {
    ImageRule {
        name: name.into(),
        pcrs: (0..3).map(|i| (i, vec![b; 48])).collect(),
        kind: DocumentKind::Enclave,
        not_after_ms: None,
        not_before_ms: None,
    }
}

/// A rule of `kind` pinning exactly `pcrs` (each value 48 bytes of `b`).
fn rule(name: &str, kind: DocumentKind, pcrs: &[u8], b: u8) -> ImageRule {
    ImageRule { kind, pcrs: pcrs.iter().map(|i| (*i, vec![b; 48])).collect(), ..image(name, b) }
}

/// A verified document of `kind` whose PCRs `pcrs` are 48 bytes of `b` (others zero).
fn doc(kind: DocumentKind, pcrs: &[u8], b: u8) -> keygate_attestation::VerifiedAttestation {
    let pcrs = pcrs.iter().map(|i| (*i, vec![b; 48])).collect();
    let nsm = MockNsm::with_kind(b"bundle-test", kind, pcrs, std::sync::Arc::new(|| NOW_MS));
    let doc = nsm.attest(&AttestRequest::default()).expect("doc");
    Verifier::new(nsm.root_anchor()).verify(&doc, &VerifyOptions::at(NOW_MS)).expect("verify")
}

fn policy_with(images: Vec<ImageRule>) -> ReleasePolicy {
    let mut clusters = BTreeMap::new();
    if !images.is_empty() {
        clusters.insert("prod".to_owned(), ClusterRule::new(images));
    }
    ReleasePolicy { clusters, allow_debug: false }
}

fn body(
    version: u64,
    previous: [u8; 48],
    signers: &[u8],
    threshold: u32,
    images: Vec<ImageRule>,
    delay: u64,
) -> PolicyBody {
    PolicyBody {
        version,
        previous,
        issued_at: NOW_S,
        activation_delay: delay,
        approvers: signers.iter().map(|i| point(&key(*i))).collect(),
        threshold,
        policy: policy_with(images),
        members: Vec::new(),
        freshness: None,
    }
}

fn sign(body_bytes: &[u8], k: &SigningKey) -> (Vec<u8>, Vec<u8>) {
    let sig: Signature = k.sign(&bundle::signing_message(body_bytes));
    (public_point(k), sig.to_bytes().to_vec())
}

fn bundle_bytes(b: &PolicyBody, signers: &[u8]) -> Vec<u8> {
    let body = bundle::encode_body(b);
    let sigs: Vec<_> = signers.iter().map(|i| sign(&body, &key(*i))).collect();
    bundle::encode_bundle(&body, &sigs)
}

/// Genesis: approvers 1,2,3, threshold 2, image "a" allowed, delay 3600 s.
fn genesis() -> (PolicyState, [u8; 48]) {
    let g = body(1, [0; 48], &[1, 2, 3], 2, vec![image("a", 0xa)], 3600);
    let bytes = bundle_bytes(&g, &[]);
    let state = PolicyState::genesis(&bytes, default_backend()).expect("genesis");
    let d = bundle::digest(&bundle::encode_body(&g));
    (state, d)
}

fn next(prev: [u8; 48], images: Vec<ImageRule>) -> PolicyBody {
    body(2, prev, &[1, 2, 3], 2, images, 3600)
}

/// `b` with the KEK schedule of cluster "prod" set.
fn scheduled(mut b: PolicyBody, kek_version: u32, kek_retire_below: u32) -> PolicyBody {
    let rule = b.policy.clusters.get_mut("prod").expect("prod");
    rule.kek_version = kek_version;
    rule.kek_retire_below = kek_retire_below;
    b
}

/// The body following `prev` (version `prev.version + 1`, signed content otherwise `b`'s).
fn after(prev: &PolicyBody, b: PolicyBody) -> PolicyBody {
    PolicyBody { version: prev.version + 1, previous: bundle::digest(&bundle::encode_body(prev)), ..b }
}

#[test]
fn adversarial_table() {
    let (g, gd) = genesis();
    let good = next(gd, vec![image("a", 0xa), image("b", 0xb)]);
    let good_bytes = bundle_bytes(&good, &[1, 2]);
    let mut applied = g.clone();
    applied.apply(&good_bytes, NOW_MS, default_backend()).expect("valid update");
    let gd2 = bundle::digest(&bundle::encode_body(&good));

    let mut tampered = good_bytes.clone();
    let pos = tampered.len() - 300; // inside the body, after signing
    tampered[pos] ^= 1;

    let mut dup_sig = bundle::decode_bundle(&good_bytes, default_backend()).expect("decode");
    dup_sig.signatures = vec![sign(&dup_sig.body_bytes, &key(1)), sign(&dup_sig.body_bytes, &key(1))];
    let dup_bytes = bundle::encode_bundle(&dup_sig.body_bytes, &dup_sig.signatures);

    let mut bad_sig = bundle::decode_bundle(&good_bytes, default_backend()).expect("decode");
    bad_sig.signatures[1].1[10] ^= 1;
    let bad_sig_bytes = bundle::encode_bundle(&bad_sig.body_bytes, &bad_sig.signatures);

    let rotation = body(2, gd, &[7, 8, 9], 2, vec![image("a", 0xa)], 3600);
    let non_canonical = {
        let b = bundle::encode_body(&good);
        let mut nc = b.clone();
        // The version (2) sits after the array head and the 18-byte tag; re-encode it with a
        // two-byte head: the same value in other bytes.
        assert_eq!(nc[19], 0x02);
        nc.splice(19..20, [0x18, 0x02]);
        nc
    };

    // KEK schedules: a state where "prod" was rotated to version 3, and one where it was then
    // removed (a re-addition must not restart lower).
    let rotated_body = scheduled(next(gd, vec![image("a", 0xa)]), 3, 0);
    let mut rotated = g.clone();
    rotated.apply(&bundle_bytes(&rotated_body, &[1, 2]), NOW_MS, default_backend()).expect("rotation to v3");
    let removed_body = after(&rotated_body, next(gd, vec![]));
    let mut removed = rotated.clone();
    removed.apply(&bundle_bytes(&removed_body, &[1, 2]), NOW_MS, default_backend()).expect("cluster removed");
    let default_written_out = {
        // A 4-element cluster entry carrying the default schedule (1, 0): the same policy as
        // the 2-element entry, in other bytes.
        let mut nc = bundle::encode_body(&scheduled(next(gd, vec![image("a", 0xa)]), 2, 0));
        let n = nc.len();
        assert_eq!(nc[n - 2..], [0x02, 0x00]);
        nc[n - 2] = 0x01;
        nc
    };
    let sign2 = |b: &[u8]| bundle::encode_bundle(b, &[sign(b, &key(1)), sign(b, &key(2))]);
    let runtime: Vec<u8> = (16..=23).collect();
    let runtime_and_8: Vec<u8> = [8].into_iter().chain(16..=23).collect();

    // A bundle giving `prod` the KEK schedule (version, retire below) that the policy refuses.
    let bad_schedule = |name: &'static str, version: u32, retire_below: u32| {
        let bytes = bundle_bytes(&scheduled(next(gd, vec![image("a", 0xa)]), version, retire_below), &[1, 2]);
        let error = policy::PolicyError::BadKekSchedule { cluster: "prod".into(), version, retire_below };
        (name, g.clone(), bytes, BundleError::Policy(error))
    };
    // A bundle whose one image rule the policy refuses.
    let bad_rule = |name: &'static str, rule: ImageRule, error: policy::PolicyError| {
        (name, g.clone(), bundle_bytes(&next(gd, vec![rule]), &[1, 2]), BundleError::Policy(error))
    };
    // A bundle refused below the threshold of 2 with this tally: [valid, unknown, duplicates, invalid].
    let below = |name: &'static str, bytes: Vec<u8>, [valid, unknown, duplicates, invalid]: [usize; 4]| {
        (name, g.clone(), bytes, BundleError::BelowThreshold { valid, threshold: 2, unknown, duplicates, invalid })
    };
    let cases: Vec<(&str, PolicyState, Vec<u8>, BundleError)> = vec![
        below("one signature below the threshold of 2", bundle_bytes(&good, &[1]), [1, 0, 0, 0]),
        below("duplicate signer counts once", dup_bytes, [1, 0, 1, 0]),
        below("unknown signers are ignored", bundle_bytes(&good, &[1, 7, 8]), [1, 2, 0, 0]),
        below("an invalid signature does not count", bad_sig_bytes, [1, 0, 0, 1]),
        below("no signatures", bundle_bytes(&good, &[]), [0, 0, 0, 0]),
        (
            "rollback to genesis",
            applied.clone(),
            bundle_bytes(&body(1, [0; 48], &[1, 2, 3], 2, vec![image("a", 0xa)], 3600), &[1, 2]),
            BundleError::Rollback { current: 2, found: 1 },
        ),
        ("replay of the current bundle", applied.clone(), good_bytes.clone(), BundleError::Replay(2)),
        (
            "fork: same version, other content",
            applied.clone(),
            bundle_bytes(&next(gd, vec![image("c", 0xc)]), &[1, 2]),
            BundleError::Fork(2),
        ),
        (
            "version gap",
            g.clone(),
            bundle_bytes(&body(3, gd, &[1, 2, 3], 2, vec![], 3600), &[1, 2]),
            BundleError::VersionGap { expected: 2, found: 3 },
        ),
        ("wrong previous digest", g.clone(), bundle_bytes(&next(gd2, vec![]), &[1, 2]), BundleError::WrongPrevious),
        below("approver rotation signed only by the new set", bundle_bytes(&rotation, &[7, 8, 9]), [0, 3, 0, 0]),
        (
            "approver rotation not confirmed by the new set",
            g.clone(),
            bundle_bytes(&rotation, &[1, 2]),
            BundleError::RotationNotConfirmed { valid: 0, threshold: 2 },
        ),
        (
            "threshold 0",
            g.clone(),
            bundle_bytes(&body(2, gd, &[1, 2, 3], 0, vec![], 3600), &[1, 2]),
            BundleError::BadThreshold { threshold: 0, approvers: 3 },
        ),
        (
            "threshold greater than the set",
            g.clone(),
            bundle_bytes(&body(2, gd, &[1, 2, 3], 4, vec![], 3600), &[1, 2]),
            BundleError::BadThreshold { threshold: 4, approvers: 3 },
        ),
        (
            "issued in the future",
            g.clone(),
            bundle_bytes(&PolicyBody { issued_at: NOW_S + 3600, ..next(gd, vec![]) }, &[1, 2]),
            BundleError::BadIssueTime { issued_at: NOW_S + 3600, min: NOW_S },
        ),
        (
            "non-canonical body",
            g.clone(),
            bundle::encode_bundle(&non_canonical, &[sign(&non_canonical, &key(1)), sign(&non_canonical, &key(2))]),
            BundleError::NotCanonical,
        ),
        (
            "KEK version decrease",
            rotated.clone(),
            bundle_bytes(&after(&rotated_body, scheduled(next(gd, vec![image("a", 0xa)]), 2, 0)), &[1, 2]),
            BundleError::KekVersionDecrease { cluster: "prod".into(), from: 3, to: 2 },
        ),
        (
            "KEK version restarting lower after the cluster was removed and re-added",
            removed.clone(),
            bundle_bytes(&after(&removed_body, next(gd, vec![image("a", 0xa)])), &[1, 2]),
            BundleError::KekVersionDecrease { cluster: "prod".into(), from: 3, to: 1 },
        ),
        bad_schedule("retirement above the current KEK version", 2, 3),
        bad_schedule("KEK version 0", 0, 0),
        bad_schedule("KEK version above 1024", 1025, 0),
        bad_rule(
            "PCR8-only rule of kind nitrotpm",
            rule("s", DocumentKind::NitroTpm, &[8], 8),
            policy::PolicyError::SignerRuleNotEnclave { cluster: "prod".into(), image: "s".into() },
        ),
        bad_rule(
            "nitrotpm rule pinning PCR8 and PCR16-23 only",
            rule("s", DocumentKind::NitroTpm, &runtime_and_8, 8),
            policy::PolicyError::SignerRuleNotEnclave { cluster: "prod".into(), image: "s".into() },
        ),
        bad_rule(
            "nitrotpm rule pinning PCR16-23 only",
            rule("t", DocumentKind::NitroTpm, &runtime, 9),
            policy::PolicyError::NitroTpmBootUnpinned { cluster: "prod".into(), image: "t".into() },
        ),
        bad_rule(
            "nitrotpm rule pinning PCR0-2 (firmware constants) only",
            rule("t", DocumentKind::NitroTpm, &[0, 1, 2], 9),
            policy::PolicyError::NitroTpmBootUnpinned { cluster: "prod".into(), image: "t".into() },
        ),
        (
            "kind spelled other than enclave, nitrotpm (or the legacy any)",
            g.clone(),
            sign2(&respell(&bundle::encode_body(&next(gd, vec![image("a", 0xa)])), b"\x63Any")),
            BundleError::Malformed("kind must be enclave or nitrotpm"),
        ),
        (
            "default KEK schedule written out (non-canonical)",
            g.clone(),
            sign2(&default_written_out),
            BundleError::NotCanonical,
        ),
    ];
    let mut failures = Vec::new();
    for b in all_backends() {
        for (name, state, bytes, expect) in &cases {
            let mut s = state.clone();
            match s.apply(bytes, NOW_MS, b) {
                Err(e) if e == *expect => {}
                other => failures.push(format!("{name} [{}]: expected {expect:?}, got {other:?}", b.name())),
            }
        }
        // A tampered byte after signing: refused (which check fires depends on the byte).
        let mut s = g.clone();
        assert!(s.apply(&tampered, NOW_MS, b).is_err(), "tampered bundle accepted");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn verified(pcr: u8) -> keygate_attestation::VerifiedAttestation {
    let pcrs = (0u8..3).map(|i| (i, vec![pcr; 48])).collect();
    let nsm = MockNsm::new(b"bundle-test", pcrs, std::sync::Arc::new(|| NOW_MS));
    let doc = nsm.attest(&AttestRequest::default()).expect("doc");
    Verifier::new(nsm.root_anchor()).verify(&doc, &VerifyOptions::at(NOW_MS)).expect("verify")
}

#[test]
fn adding_an_image_waits_for_the_delay_and_removing_one_is_immediate() {
    let (mut s, gd) = genesis();
    let b = verified(0xb);
    let a = verified(0xa);
    // v2 adds "b": pending for 3600 s.
    let v2 = next(gd, vec![image("a", 0xa), image("b", 0xb)]);
    let r = s.apply(&bundle_bytes(&v2, &[1, 3]), NOW_MS, default_backend()).expect("v2");
    assert!(r.loosens);
    assert_eq!(r.activates_at_ms, NOW_MS + 3_600_000);
    let effective = s.effective(NOW_MS + 1000);
    let denied = policy::evaluate(&effective, &b, "prod", NOW_MS + 1000);
    assert_eq!(
        denied,
        Err(PolicyDenial::NoMatchingImage {
            cluster: "prod".into(),
            detail: MismatchDetail::NotYetActive { image: "b".into(), activates_at_ms: NOW_MS + 3_600_000 }
        }),
        "activation delay not yet elapsed"
    );
    assert!(policy::evaluate(&s.effective(NOW_MS + 1000), &a, "prod", NOW_MS + 1000).is_ok());
    let later = NOW_MS + 3_600_000;
    assert!(policy::evaluate(&s.effective(later), &b, "prod", later).is_ok(), "active after the delay");

    // v3 removes "a": no delay, even with a long activation_delay field.
    let v2d = bundle::digest(&bundle::encode_body(&v2));
    let v3 = PolicyBody { version: 3, activation_delay: 86_400, ..next(v2d, vec![image("b", 0xb)]) };
    let r = s.apply(&bundle_bytes(&v3, &[2, 3]), later, default_backend()).expect("v3");
    assert!(!r.loosens);
    assert_eq!(r.activates_at_ms, later);
    assert!(policy::evaluate(&s.effective(later), &a, "prod", later).is_err(), "revocation is immediate");
}

#[test]
fn a_revocation_during_a_pending_addition_applies_at_once_and_keeps_the_addition_waiting() {
    let (mut s, gd) = genesis();
    let v2 = next(gd, vec![image("a", 0xa), image("b", 0xb)]);
    s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2");
    let v2d = bundle::digest(&bundle::encode_body(&v2));
    // v3 keeps "b" (still pending) and revokes "a" — validated by the active (genesis) set.
    let v3 = PolicyBody { version: 3, ..next(v2d, vec![image("b", 0xb)]) };
    let r = s.apply(&bundle_bytes(&v3, &[1, 2]), NOW_MS + 10, default_backend()).expect("v3");
    assert!(r.loosens, "b is still an addition relative to the active policy");
    let t = NOW_MS + 20;
    assert!(policy::evaluate(&s.effective(t), &verified(0xa), "prod", t).is_err());
    assert!(policy::evaluate(&s.effective(t), &verified(0xb), "prod", t).is_err());
}

#[test]
fn expired_entries_stop_matching_by_themselves() {
    let (mut s, gd) = genesis();
    let mut a = image("a", 0xa);
    a.not_after_ms = Some((NOW_S + 60) * 1000);
    let v2 = next(gd, vec![a, image("b", 0xb)]);
    s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2");
    let t = NOW_MS + 30_000;
    assert!(
        policy::evaluate(&s.effective(t), &verified(0xa), "prod", t).is_ok(),
        "old image still allowed during rollout"
    );
    let t = NOW_MS + 61_000;
    assert!(matches!(
        policy::evaluate(&s.effective(t), &verified(0xa), "prod", t),
        Err(PolicyDenial::NoMatchingImage { detail: MismatchDetail::Expired { .. }, .. })
    ));
}

#[test]
fn approver_rotation_with_both_quorums_takes_effect_after_the_delay() {
    let (mut s, gd) = genesis();
    let rot = body(2, gd, &[7, 8, 9], 2, vec![image("a", 0xa)], 60);
    let r = s.apply(&bundle_bytes(&rot, &[1, 2, 7, 8]), NOW_MS, default_backend()).expect("rotation");
    assert!(r.loosens);
    let rd = bundle::digest(&bundle::encode_body(&rot));
    let v3 = PolicyBody { version: 3, ..body(2, rd, &[7, 8, 9], 2, vec![image("a", 0xa)], 60) };
    // Before the rotation is active, the old set still governs.
    let mut early = s.clone();
    assert!(matches!(
        early.apply(&bundle_bytes(&v3, &[7, 8]), NOW_MS + 1000, default_backend()),
        Err(BundleError::BelowThreshold { .. })
    ));
    // After it, the new set governs and the old one no longer can.
    let t = NOW_MS + 3_600_000;
    let mut old_set = s.clone();
    assert!(matches!(
        old_set.apply(&bundle_bytes(&v3, &[1, 2]), t, default_backend()),
        Err(BundleError::BelowThreshold { .. })
    ));
    s.apply(&bundle_bytes(&v3, &[7, 8]), t, default_backend()).expect("new set signs v3");
}

#[test]
fn bodies_round_trip_and_garbage_is_refused() {
    let mut b = next([9; 48], vec![image("a", 0xa), image("b", 0xb)]);
    b.approvers.sort();
    let bytes = bundle::encode_body(&b);
    assert_eq!(bundle::decode_body(&bytes, default_backend()).expect("decode"), b);
    for len in 0..bytes.len() {
        assert!(bundle::decode_body(&bytes[..len], default_backend()).is_err());
    }
    assert!(matches!(bundle::decode_bundle(b"\x80", default_backend()), Err(BundleError::Malformed(_))));
    assert!(matches!(bundle::decode_bundle(&vec![0u8; 70_000], default_backend()), Err(BundleError::TooLarge(_))));
    let sig = bundle::encode_signature(&bytes, &[4; 97], &[1; 96]);
    assert!(bundle::decode_signature(&sig, &bytes).is_ok());
    assert_eq!(bundle::decode_signature(&sig, b"other"), Err(BundleError::SignatureForOtherBody));
}

#[test]
fn kek_schedule_encoding_is_canonical_and_strict() {
    let plain = next([9; 48], vec![image("a", 0xa)]);
    let plain_bytes = bundle::encode_body(&plain);
    // The default schedule keeps the 2-element entry: existing bundles keep their digest.
    // The cluster entry's array head sits just before its id, the text "prod".
    let entry_head = |b: &[u8]| b.windows(5).position(|w| w == b"\x64prod").expect("cluster id") - 1;
    let entry = entry_head(&plain_bytes);
    assert_eq!(plain_bytes[entry], 0x82, "[id, images]");
    let rotated = scheduled(plain.clone(), 7, 5);
    let bytes = bundle::encode_body(&rotated);
    assert_eq!(bytes[bytes.len() - 2..], [0x07, 0x05]);
    let mut expected = rotated.clone();
    expected.approvers.sort();
    assert_eq!(bundle::decode_body(&bytes, default_backend()).expect("decode"), expected);
    // The entry head is 0x84; any other length (3 or 5 elements) is malformed.
    let head = entry_head(&bytes);
    assert_eq!(bytes[head], 0x84, "[id, images, kek_version, kek_retire_below]");
    let mut three = bytes.clone();
    three[head] = 0x83;
    three.pop();
    assert!(matches!(bundle::decode_body(&three, default_backend()), Err(BundleError::Malformed(_))));
    let mut five = bytes.clone();
    five[head] = 0x85;
    five.push(0x00);
    assert!(matches!(bundle::decode_body(&five, default_backend()), Err(BundleError::Malformed(_))));
    // A version that does not fit u32 is malformed, not truncated.
    let mut huge = bytes[..bytes.len() - 2].to_vec();
    huge.extend_from_slice(&[0x1b, 0, 0, 0, 1, 0, 0, 0, 1, 0x00]);
    assert!(matches!(bundle::decode_body(&huge, default_backend()), Err(BundleError::Malformed(_))));
}

#[test]
fn rotation_and_retirement_are_immediate_and_an_unretirement_waits_for_the_delay() {
    let (mut s, gd) = genesis();
    let prod = |s: &PolicyState, t: u64| {
        let p = s.effective(t);
        let r = &p.clusters["prod"];
        (r.kek_version, r.kek_retire_below)
    };
    assert_eq!(prod(&s, NOW_MS), (1, 0));
    // v2 rotates to 2: not a loosening, in force at once (even with a long delay field).
    let v2 = PolicyBody { activation_delay: 86_400, ..scheduled(next(gd, vec![image("a", 0xa)]), 2, 0) };
    let r = s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("rotation");
    assert!(!r.loosens);
    assert_eq!(r.activates_at_ms, NOW_MS);
    assert_eq!(prod(&s, NOW_MS), (2, 0));
    // v3 rotates to 3 and retires versions below 3: a tightening, at once.
    let v3 = after(&v2, scheduled(next(gd, vec![image("a", 0xa)]), 3, 3));
    let r = s.apply(&bundle_bytes(&v3, &[1, 2]), NOW_MS + 10, default_backend()).expect("retirement");
    assert!(!r.loosens);
    assert_eq!(prod(&s, NOW_MS + 10), (3, 3));
    // v4 un-retires version 2: a loosening; the stricter retirement holds until activation.
    let v4 = after(&v3, scheduled(next(gd, vec![image("a", 0xa)]), 3, 2));
    let r = s.apply(&bundle_bytes(&v4, &[1, 2]), NOW_MS + 20, default_backend()).expect("un-retirement");
    assert!(r.loosens);
    assert_eq!(r.activates_at_ms, NOW_MS + 20 + 3_600_000);
    assert_eq!(prod(&s, NOW_MS + 30), (3, 3), "un-retirement waits for the delay");
    assert_eq!(prod(&s, r.activates_at_ms), (3, 2), "in force after the delay");
}

#[test]
fn a_rotation_in_a_loosening_bundle_applies_at_once() {
    let (mut s, gd) = genesis();
    // v2 adds image "b" (waits) and rotates to 2 (does not wait).
    let v2 = scheduled(next(gd, vec![image("a", 0xa), image("b", 0xb)]), 2, 1);
    let r = s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2");
    assert!(r.loosens);
    let p = s.effective(NOW_MS + 1);
    assert_eq!((p.clusters["prod"].kek_version, p.clusters["prod"].kek_retire_below), (2, 1));
    assert!(policy::evaluate(&p, &verified(0xb), "prod", NOW_MS + 1).is_err(), "the added image still waits");
}

#[test]
fn the_signed_message_is_the_documented_one() {
    use sha2::Digest;
    let body = b"any canonical body";
    let mut expected = b"keygate/v1/policy-signature\0".to_vec();
    expected.extend_from_slice(&sha2::Sha384::digest(body));
    assert_eq!(bundle::signing_message(body), expected);
    assert_eq!(bundle::digest(body), <[u8; 48]>::from(sha2::Sha384::digest(body)));
}

#[test]
fn a_body_of_several_kilobytes_is_within_the_limits() {
    // 60 images in one cluster: a body far above 1 KiB and below the 48 KiB limit decodes.
    let images: Vec<ImageRule> = (0u8..60).map(|i| image(&format!("image-{i:03}"), 0x10 + i)).collect();
    let b = body(1, [0; 48], &[1, 2, 3], 2, images, 3600);
    let bytes = bundle::encode_body(&b);
    assert!(bytes.len() > 8 * 1024 && bytes.len() <= bundle::MAX_BODY, "{}", bytes.len());
    let decoded = bundle::decode_body(&bytes, default_backend()).expect("decodes");
    assert!(bundle::encode_body(&decoded) == bytes, "re-encodes to the same bytes");
    assert_eq!(decoded.policy.clusters["prod"].images.len(), 60);
    let whole = bundle_bytes(&b, &[1, 2]);
    assert!(bundle::decode_bundle(&whole, default_backend()).is_ok());
}

#[test]
fn every_limit_of_the_bundle_format_holds_at_its_boundary() {
    let c = default_backend();
    let malformed = |r: Result<PolicyBody, BundleError>, what: &str| match r {
        Err(BundleError::Malformed(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("expected Malformed({what}), got {:?}", other.map(|_| ())),
    };
    // Sizes: exactly the limit is not refused for its size (these bytes are no body at all).
    for (len, max) in [(bundle::MAX_BODY, true), (bundle::MAX_BODY + 1, false)] {
        let r = bundle::decode_body(&vec![0x40; len], c);
        assert_eq!(matches!(r, Err(BundleError::TooLarge(_))), !max, "body of {len}");
    }
    for (len, max) in [(bundle::MAX_BUNDLE, true), (bundle::MAX_BUNDLE + 1, false)] {
        let r = bundle::decode_bundle(&vec![0x40; len], c);
        assert_eq!(matches!(r, Err(BundleError::TooLarge(_))), !max, "bundle of {len}");
    }
    for (len, max) in [(1024, true), (1025, false)] {
        let r = bundle::decode_signature(&vec![0x40; len], b"body");
        assert_eq!(matches!(r, Err(BundleError::TooLarge(_))), !max, "signature of {len}");
    }
    // Threshold equal to the number of approvers is fine.
    let all = body(1, [0; 48], &[1, 2, 3], 3, vec![image("a", 1)], 0);
    assert!(bundle::decode_body(&bundle::encode_body(&all), c).is_ok());
    // 32 approvers is the most.
    let signers: Vec<u8> = (1..=33).collect();
    let many = body(1, [0; 48], &signers, 1, vec![image("a", 1)], 0);
    malformed(bundle::decode_body(&bundle::encode_body(&many), c), "approvers: at most 32");
    let ok32 = body(1, [0; 48], &signers[..32], 1, vec![image("a", 1)], 0);
    assert!(bundle::decode_body(&bundle::encode_body(&ok32), c).is_ok());
    // Names: 1 to 128 bytes, for clusters and images.
    let with_cluster = |id: &str, img: &str| {
        let mut b = body(1, [0; 48], &[1], 1, vec![], 0);
        b.policy.clusters.insert(id.to_owned(), ClusterRule { images: vec![image(img, 1)], ..Default::default() });
        bundle::decode_body(&bundle::encode_body(&b), c)
    };
    assert!(with_cluster(&"c".repeat(128), &"i".repeat(128)).is_ok());
    malformed(with_cluster(&"c".repeat(129), "i"), "cluster id length");
    malformed(with_cluster("", "i"), "cluster id length");
    malformed(with_cluster("c", &"i".repeat(129)), "image name length");
    malformed(with_cluster("c", ""), "image name length");
    // Document kinds survive the encoding.
    let mut kinds = body(1, [0; 48], &[1], 1, vec![image("e", 1), image("t", 2)], 0);
    kinds.policy.clusters.get_mut("prod").expect("prod").images[1] = rule("t", DocumentKind::NitroTpm, &[4, 12], 2);
    let back = bundle::decode_body(&bundle::encode_body(&kinds), c).expect("kinds");
    let got: Vec<_> = back.policy.clusters["prod"].images.iter().map(|i| i.kind).collect();
    assert_eq!(got, [DocumentKind::Enclave, DocumentKind::NitroTpm]);
}

#[test]
fn genesis_and_issue_time_rules_hold_at_their_boundaries() {
    let c = default_backend();
    // Genesis is version 1 *and* previous zero.
    let v1_prev = body(1, [1; 48], &[1, 2, 3], 2, vec![], 3600);
    assert!(matches!(PolicyState::genesis(&bundle_bytes(&v1_prev, &[]), c), Err(BundleError::NotGenesis)));
    let v2_zero = body(2, [0; 48], &[1, 2, 3], 2, vec![], 3600);
    assert!(matches!(PolicyState::genesis(&bundle_bytes(&v2_zero, &[]), c), Err(BundleError::NotGenesis)));
    // issued_at: not before the previous bundle's, at most 300 s ahead of the KRE's clock.
    let (state, d) = genesis();
    let next = |issued_at: u64| {
        let mut b = body(2, d, &[1, 2, 3], 2, vec![image("a", 0xa)], 3600);
        b.issued_at = issued_at;
        let mut s = state.clone();
        s.apply(&bundle_bytes(&b, &[1, 2]), NOW_MS, c).map(|_| ())
    };
    assert!(next(NOW_S).is_ok(), "the same second as the previous bundle");
    assert!(next(NOW_S + 300).is_ok(), "exactly the allowed skew ahead");
    assert!(matches!(next(NOW_S + 301), Err(BundleError::BadIssueTime { .. })));
    assert!(matches!(next(NOW_S - 1), Err(BundleError::BadIssueTime { .. })), "before the previous bundle");
}

/// What counts as a loosening (held back for the activation delay): an image rule is the
/// same only if both its name and its PCRs are; turning debug on loosens by itself.
#[test]
fn new_pcrs_under_an_old_name_and_turning_debug_on_are_loosenings() {
    // Same name "a", new PCRs: a new image, whatever it is called.
    let (mut s, gd) = genesis();
    let v2 = next(gd, vec![image("a", 0xb)]);
    let r = s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2");
    assert!(r.loosens, "PCRs changed under an unchanged name");
    assert_eq!(r.activates_at_ms, NOW_MS + 3_600_000);
    assert!(policy::evaluate(&s.effective(NOW_MS + 1000), &verified(0xb), "prod", NOW_MS + 1000).is_err());
    // Same PCRs under a new name: a renaming, which is also a new rule identity.
    let (mut s, gd) = genesis();
    let v2 = next(gd, vec![image("renamed", 0xa)]);
    assert!(s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2").loosens);

    // Only allow_debug turned on: a loosening.
    let (mut s, gd) = genesis();
    let mut v2 = next(gd, vec![image("a", 0xa)]);
    v2.policy.allow_debug = true;
    let r = s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2");
    assert!(r.loosens, "debug on");
    assert!(!s.effective(NOW_MS + 1000).allow_debug, "held back until the activation");
    assert!(s.effective(NOW_MS + 3_600_000).allow_debug);
    // Keeping it on is not a loosening; turning it off is not either.
    let v2d = bundle::digest(&bundle::encode_body(&v2));
    let v3 = PolicyBody { version: 3, ..next(v2d, vec![image("a", 0xa)]) };
    let mut v3_on = v3.clone();
    v3_on.policy.allow_debug = true;
    let later = NOW_MS + 3_600_000;
    assert!(!s.apply(&bundle_bytes(&v3_on, &[1, 2]), later, default_backend()).expect("v3").loosens);
    let v3d = bundle::digest(&bundle::encode_body(&v3_on));
    let v4 = PolicyBody { version: 4, ..next(v3d, vec![image("a", 0xa)]) };
    assert!(!s.apply(&bundle_bytes(&v4, &[1, 2]), later, default_backend()).expect("v4").loosens);
}

/// PCRs of image "a" in the kind and expiry tests: a rule valid for either kind.
const BOTH: [u8; 5] = [0, 1, 2, 4, 12];

/// A state whose genesis allows image "a" (PCRs [`BOTH`] = 0x0a) with `kind` and `not_after_ms`.
fn genesis_with(kind: DocumentKind, not_after_ms: Option<u64>) -> (PolicyState, [u8; 48]) {
    let a = ImageRule { not_after_ms, ..rule("a", kind, &BOTH, 0xa) };
    let g = body(1, [0; 48], &[1, 2, 3], 2, vec![a], 3600);
    let state = PolicyState::genesis(&bundle_bytes(&g, &[]), default_backend()).expect("genesis");
    (state, bundle::digest(&bundle::encode_body(&g)))
}

/// v2 re-stating image "a" with `kind` and `not_after_ms`, activation delay 2 h.
fn restate(prev: [u8; 48], kind: DocumentKind, not_after_ms: Option<u64>) -> Vec<u8> {
    let a = ImageRule { not_after_ms, ..rule("a", kind, &BOTH, 0xa) };
    bundle_bytes(&body(2, prev, &[1, 2, 3], 2, vec![a], 7200), &[1, 2])
}

/// Changing an image's document kind or extending its expiry loosens: held back (the old kind,
/// the earlier expiry) until the activation; keeping them as they are does not.
#[test]
fn a_changed_kind_or_a_later_expiry_waits_for_the_activation() {
    let c = default_backend();
    let enclave_doc = doc(DocumentKind::Enclave, &BOTH, 0xa);
    let tpm_doc = doc(DocumentKind::NitroTpm, &BOTH, 0xa);
    let pending = NOW_MS + 1_800_000;
    let active = NOW_MS + 7_200_000;
    let (enclave, tpm) = (DocumentKind::Enclave, DocumentKind::NitroTpm);

    // Kind: enclave → NitroTPM (a widening to NitroTPM instances), and back.
    let (mut s, gd) = genesis_with(enclave, None);
    let r = s.apply(&restate(gd, tpm, None), NOW_MS, c).expect("v2");
    assert!(r.loosens, "enclave to nitrotpm");
    assert_eq!(s.effective(pending).clusters["prod"].images[0].kind, enclave);
    assert!(policy::evaluate(&s.effective(pending), &enclave_doc, "prod", pending).is_ok(), "old kind until active");
    assert!(
        matches!(
            policy::evaluate(&s.effective(pending), &tpm_doc, "prod", pending),
            Err(PolicyDenial::NoMatchingImage {
                detail: MismatchDetail::Kind { required: DocumentKind::Enclave, .. },
                ..
            })
        ),
        "NitroTPM documents wait for the activation"
    );
    assert!(policy::evaluate(&s.effective(active), &enclave_doc, "prod", active).is_err(), "new kind once active");
    assert!(policy::evaluate(&s.effective(active), &tpm_doc, "prod", active).is_ok(), "new kind once active");
    let (mut s, gd) = genesis_with(tpm, None);
    assert!(s.apply(&restate(gd, enclave, None), NOW_MS, c).expect("v2").loosens, "nitrotpm to enclave");
    assert_eq!(s.effective(pending).clusters["prod"].images[0].kind, tpm);
    let (mut s, gd) = genesis_with(enclave, None);
    let r = s.apply(&restate(gd, enclave, None), NOW_MS, c).expect("v2");
    assert!(!r.loosens, "the same kind");

    // Expiry: 1 h → 10 h is held at 1 h until the activation (2 h); the same expiry, an
    // earlier one or a new one where there was none are not extensions.
    let (one_h, ten_h) = (NOW_MS + 3_600_000, NOW_MS + 36_000_000);
    let (mut s, gd) = genesis_with(DocumentKind::Enclave, Some(one_h));
    let r = s.apply(&restate(gd, DocumentKind::Enclave, Some(ten_h)), NOW_MS, c).expect("v2");
    assert!(r.loosens, "a later expiry");
    let between = NOW_MS + 5_400_000;
    assert_eq!(s.effective(between).clusters["prod"].images[0].not_after_ms, Some(one_h));
    assert!(policy::evaluate(&s.effective(between), &enclave_doc, "prod", between).is_err(), "expired at 1 h");
    let later = NOW_MS + 9_000_000;
    assert!(policy::evaluate(&s.effective(later), &enclave_doc, "prod", later).is_ok(), "10 h once active");
    for (new, what) in [(Some(one_h), "the same expiry"), (Some(one_h - 1), "an earlier expiry")] {
        let (mut s, gd) = genesis_with(DocumentKind::Enclave, Some(one_h));
        assert!(!s.apply(&restate(gd, DocumentKind::Enclave, new), NOW_MS, c).expect("v2").loosens, "{what}");
    }
    let (mut s, gd) = genesis_with(DocumentKind::Enclave, Some(one_h));
    assert!(s.apply(&restate(gd, DocumentKind::Enclave, None), NOW_MS, c).expect("v2").loosens, "no expiry at all");
    let (mut s, gd) = genesis_with(DocumentKind::Enclave, None);
    assert!(!s.apply(&restate(gd, DocumentKind::Enclave, Some(one_h)), NOW_MS, c).expect("v2").loosens, "a new expiry");
}

/// `body` with the kind of every `enclave` rule spelled `spelling` (a CBOR text item).
fn respell(body: &[u8], spelling: &[u8]) -> Vec<u8> {
    let enclave = b"\x67enclave";
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(enclave.len()).position(|w| w == enclave) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(spelling);
        rest = &rest[at + enclave.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The finding: root on a NitroTPM instance extends its PCR8 to an enclave signer rule's
/// value. A PCR8-only rule is an enclave rule, also when its bundle predates kinds (spelled
/// `any`), so the NitroTPM document is refused; the legacy body keeps its bytes and digest.
#[test]
fn a_pcr8_rule_without_a_kind_is_an_enclave_rule() {
    let c = default_backend();
    let g = body(1, [0; 48], &[1, 2, 3], 2, vec![rule("signer", DocumentKind::Enclave, &[8], 0x88)], 3600);
    let legacy = respell(&bundle::encode_body(&g), b"\x63any");
    assert_ne!(legacy, bundle::encode_body(&g), "the legacy spelling is in the body");
    let decoded = bundle::decode_body(&legacy, c).expect("a legacy body stays canonical");
    assert_eq!(decoded.policy, g.policy, "`any` decodes as enclave");
    let s = PolicyState::genesis(&bundle::encode_bundle(&legacy, &[]), c).expect("legacy genesis");
    assert_eq!(s.latest().digest, bundle::digest(&legacy));

    let forged = doc(DocumentKind::NitroTpm, &[0, 1, 2, 4, 7, 8, 12], 0x88);
    assert_eq!(
        policy::evaluate(&s.effective(NOW_MS), &forged, "prod", NOW_MS),
        Err(PolicyDenial::NoMatchingImage {
            cluster: "prod".into(),
            detail: MismatchDetail::Kind {
                image: "signer".into(),
                required: DocumentKind::Enclave,
                found: DocumentKind::NitroTpm
            }
        })
    );
    let enclave = doc(DocumentKind::Enclave, &[0, 1, 2, 8], 0x88);
    assert!(policy::evaluate(&s.effective(NOW_MS), &enclave, "prod", NOW_MS).is_ok());

    // Old bodies may mix explicit `enclave` rules and kind-less ones: each rule keeps its own
    // spelling.
    let both = body(1, [0; 48], &[1], 1, vec![image("a", 1), image("b", 2)], 0);
    let mixed = {
        let all = respell(&bundle::encode_body(&both), b"\x63any");
        let first = all.windows(4).position(|w| w == b"\x63any").expect("any");
        [&all[..first], b"\x67enclave".as_slice(), &all[first + 4..]].concat()
    };
    let back = bundle::decode_body(&mixed, c).expect("each rule keeps its own spelling");
    assert_eq!(back.policy, both.policy);
}

/// A NitroTPM rule pinning the boot PCRs (PCR4 and PCR12) is accepted; pushed in a bundle it
/// waits for the activation, then matches the instance and not an enclave document.
#[test]
fn a_nitrotpm_rule_pinning_the_boot_pcrs_matches_nitrotpm_documents_only() {
    let c = default_backend();
    let (mut s, gd) = genesis();
    let ami = rule("ami", DocumentKind::NitroTpm, &[4, 12], 0x44);
    let r = s.apply(&bundle_bytes(&next(gd, vec![image("a", 0xa), ami]), &[1, 2]), NOW_MS, c).expect("v2");
    assert!(r.loosens, "a new rule");
    let (pending, active) = (NOW_MS + 1000, NOW_MS + 3_600_000);
    let instance = doc(DocumentKind::NitroTpm, &[0, 1, 2, 4, 12], 0x44);
    assert!(matches!(
        policy::evaluate(&s.effective(pending), &instance, "prod", pending),
        Err(PolicyDenial::NoMatchingImage { detail: MismatchDetail::NotYetActive { .. }, .. })
    ));
    assert_eq!(policy::evaluate(&s.effective(active), &instance, "prod", active).map(|i| i.name.as_str()), Ok("ami"));
    let enclave = doc(DocumentKind::Enclave, &[0, 1, 2, 4, 12], 0x44);
    assert_eq!(
        policy::evaluate(&s.effective(active), &enclave, "prod", active),
        Err(PolicyDenial::NoMatchingImage {
            cluster: "prod".into(),
            detail: MismatchDetail::Kind {
                image: "ami".into(),
                required: DocumentKind::NitroTpm,
                found: DocumentKind::Enclave
            }
        })
    );
}

#[test]
fn the_stricter_of_two_policies_allows_only_what_both_allow() {
    let (a, b, c) = (verified(0xa), verified(0xb), verified(0xc));
    let allows = |p: &ReleasePolicy, d: &keygate_attestation::VerifiedAttestation| {
        policy::evaluate(p, d, "prod", NOW_MS).is_ok()
    };
    let old = policy_with(vec![image("a", 0xa), image("b", 0xb)]);
    // The new policy revokes "b" and adds "c": only "a" is allowed by both.
    let new = policy_with(vec![image("a", 0xa), image("c", 0xc)]);
    let both = bundle::stricter(&old, &new);
    assert!(allows(&both, &a));
    assert!(!allows(&both, &b), "a revocation holds at once");
    assert!(!allows(&both, &c), "an addition waits until the new policy is durable");
    assert_eq!(bundle::stricter(&new, &old), both, "symmetric in what it allows");

    // Time windows: the later start and the earlier end hold.
    let old = policy_with(vec![ImageRule { not_after_ms: Some(NOW_MS - 1), ..image("a", 0xa) }]);
    let new = policy_with(vec![ImageRule { not_after_ms: Some(NOW_MS + 1000), ..image("a", 0xa) }]);
    assert!(allows(&new, &a));
    assert!(!allows(&bundle::stricter(&old, &new), &a), "an extended expiry waits too");
    let new = policy_with(vec![ImageRule { not_before_ms: Some(NOW_MS + 1), ..image("a", 0xa) }]);
    let old = policy_with(vec![image("a", 0xa)]);
    assert!(!allows(&bundle::stricter(&old, &new), &a));

    // A kind change: no document is of both kinds.
    let old = policy_with(vec![rule("t", DocumentKind::Enclave, &[0, 1, 2], 0xa)]);
    let new = policy_with(vec![rule("t", DocumentKind::NitroTpm, &[0, 1, 2], 0xa)]);
    assert!(bundle::stricter(&old, &new).clusters["prod"].images.is_empty());

    // A cluster only one side has is not in the result; retirement takes the higher of the two,
    // the KEK version the new one.
    let mut old = policy_with(vec![image("a", 0xa)]);
    let mut new = old.clone();
    old.clusters.insert("staging".into(), ClusterRule::new(vec![image("a", 0xa)]));
    if let Some(r) = old.clusters.get_mut("prod") {
        (r.kek_version, r.kek_retire_below) = (3, 2);
    }
    if let Some(r) = new.clusters.get_mut("prod") {
        (r.kek_version, r.kek_retire_below) = (4, 1);
    }
    let both = bundle::stricter(&old, &new);
    assert!(!both.clusters.contains_key("staging"));
    assert_eq!((both.clusters["prod"].kek_version, both.clusters["prod"].kek_retire_below), (4, 2));

    // Debug documents only if both allow them.
    let (mut old, mut new) = (policy_with(vec![]), policy_with(vec![]));
    (old.allow_debug, new.allow_debug) = (true, false);
    assert!(!bundle::stricter(&old, &new).allow_debug);
    new.allow_debug = true;
    assert!(bundle::stricter(&old, &new).allow_debug);
}

fn member(name: &str, b: u8) -> keygate_attestation::members::Member {
    keygate_attestation::members::Member { name: name.into(), pcr4: [b; 48], pcr3: None }
}

/// A member list is part of the signed body: an empty one leaves the encoding (and every
/// existing digest) as it was; a list round-trips, only in canonical form, and is validated.
#[test]
fn member_lists_encode_canonically_and_are_validated() {
    use keygate_attestation::members::MemberError;
    // Minimal CBOR heads (lengths below 256) for hand-made bodies.
    fn head(b: &mut Vec<u8>, major: u8, n: usize) {
        match u8::try_from(n).expect("below 256") {
            n @ 0..=23 => b.push(major << 5 | n),
            n => b.extend([major << 5 | 24, n]),
        }
    }
    fn bytes(b: &mut Vec<u8>, v: &[u8]) {
        head(b, 2, v.len());
        b.extend_from_slice(v);
    }
    let c = default_backend();
    let plain = body(1, [0; 48], &[1, 2, 3], 2, vec![image("a", 0xa)], 3600);
    let plain_bytes = bundle::encode_body(&plain);
    assert_eq!(plain_bytes[0], 0x89, "no members: still an array of 9");
    let mut with = plain.clone();
    with.members = vec![member("b", 2), member("a", 1)];
    with.members[0].pcr3 = Some([3; 48]);
    let with_bytes = bundle::encode_body(&with);
    assert_eq!(with_bytes[0], 0x8a, "members: an array of 10");
    assert_eq!(&with_bytes[..plain_bytes.len()][1..], &plain_bytes[1..], "the nine fields are unchanged");
    let back = bundle::decode_body(&with_bytes, c).expect("decode");
    assert_eq!(back.members, vec![member("a", 1), with.members[0].clone()], "sorted by name");

    // A tenth field that is an empty list is not canonical (the empty list is no field).
    let mut empty_tenth = plain_bytes.clone();
    empty_tenth[0] = 0x8a;
    empty_tenth.push(0x80);
    assert_eq!(bundle::decode_body(&empty_tenth, c), Err(BundleError::NotCanonical));
    // Out of order: not canonical.
    let raw = |list: &[(&str, u8)]| {
        let mut b = plain_bytes.clone();
        b[0] = 0x8a;
        head(&mut b, 4, list.len());
        for (n, p) in list {
            head(&mut b, 4, 3);
            head(&mut b, 3, n.len());
            b.extend_from_slice(n.as_bytes());
            bytes(&mut b, &[*p; 48]);
            b.push(0xf6);
        }
        b
    };
    assert_eq!(bundle::decode_body(&raw(&[("b", 2), ("a", 1)]), c), Err(BundleError::NotCanonical));
    assert!(bundle::decode_body(&raw(&[("a", 1), ("b", 2)]), c).is_ok());
    assert_eq!(
        bundle::decode_body(&raw(&[("a", 1), ("a", 2)]), c),
        Err(BundleError::Members(MemberError::DuplicateName("a".into())))
    );
    assert_eq!(
        bundle::decode_body(&raw(&[("a", 1), ("b", 1)]), c),
        Err(BundleError::Members(MemberError::DuplicatePcr4("a".into(), "b".into())))
    );
    assert_eq!(
        bundle::decode_body(&raw(&[("a b", 1)]), c),
        Err(BundleError::Members(MemberError::BadName("a b".into())))
    );
    let names: Vec<String> = (0..65).map(|i| format!("m{i:02}")).collect();
    let many: Vec<(&str, u8)> =
        names.iter().enumerate().map(|(i, n)| (n.as_str(), u8::try_from(i).expect("small"))).collect();
    assert_eq!(bundle::decode_body(&raw(&many), c), Err(BundleError::Members(MemberError::TooMany(65))));
    assert!(bundle::decode_body(&raw(&many[..64]), c).is_ok());
    let mut short = raw(&[("a", 1)]);
    short.truncate(short.len() - 1 - 50);
    bytes(&mut short, &[1; 32]);
    short.push(0xf6);
    assert_eq!(
        bundle::decode_body(&short, c),
        Err(BundleError::Members(MemberError::BadPcrLength { name: "a".into(), index: 4, len: 32 }))
    );
}

/// Adding a member loosens (it waits for the activation delay; until then only the members
/// both bundles name are in force); removing one holds at once.
#[test]
fn members_are_added_after_the_delay_and_removed_at_once() {
    let c = default_backend();
    let mut g = body(1, [0; 48], &[1, 2, 3], 2, vec![image("a", 0xa)], 3600);
    g.members = vec![member("a", 1)];
    let mut s = PolicyState::genesis(&bundle_bytes(&g, &[]), c).expect("genesis");
    assert_eq!(s.members_in_force(NOW_MS), vec![member("a", 1)]);
    let mut v2 = after(&g, g.clone());
    v2.members = vec![member("a", 1), member("b", 2)];
    let r = s.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, c).expect("v2");
    assert!(r.loosens, "a new member loosens");
    assert_eq!(s.members_in_force(NOW_MS), vec![member("a", 1)], "b waits");
    assert_eq!(s.members_in_force(NOW_MS + 3_600_000), v2.members, "b in force after the delay");
    let mut v3 = after(&v2, v2.clone());
    v3.members = vec![member("b", 2)];
    let r = s.apply(&bundle_bytes(&v3, &[1, 2]), NOW_MS + 3_600_000, c).expect("v3");
    assert!(!r.loosens, "a removal tightens");
    assert_eq!(s.members_in_force(NOW_MS + 3_600_000), vec![member("b", 2)]);
    // Below the threshold, a member list change is refused like any other change.
    let mut v4 = after(&v3, v3.clone());
    v4.members = vec![member("b", 2), member("c", 3)];
    assert!(matches!(
        s.apply(&bundle_bytes(&v4, &[1]), NOW_MS + 3_600_000, c),
        Err(BundleError::BelowThreshold { .. })
    ));
}

/// The freshness a test body names: the key of approver `i`'s seed under another label.
fn stamper(i: u8, max_age_s: u64) -> keygate_attestation::freshness::Freshness {
    let k = derive_key(b"timestamps", &format!("stamper-{i}"));
    keygate_attestation::freshness::Freshness { key: point(&k), max_age_s }
}

#[test]
fn a_timestamp_key_is_an_eleventh_field_written_only_when_set_and_strictly_checked() {
    let (_, gd) = genesis();
    let plain = next(gd, vec![image("a", 0xa)]);
    let before = bundle::encode_body(&plain);
    let with = PolicyBody { freshness: Some(stamper(1, 300)), ..plain.clone() };
    let bytes = bundle::encode_body(&with);
    assert_eq!(bytes[0], 0x8b, "an array of 11: the member list is written, empty, before it");
    let decoded = bundle::decode_body(&bytes, default_backend()).expect("decodes");
    assert_eq!((decoded.freshness.clone(), bundle::encode_body(&decoded)), (with.freshness.clone(), bytes.clone()));
    assert_eq!(bundle::encode_body(&PolicyBody { freshness: None, ..with.clone() }), before, "unchanged without it");

    // Ten fields whose member list is empty are another encoding of the body without members.
    let mut ten = before.clone();
    ten[0] = 0x8a;
    ten.push(0x80);
    assert_eq!(bundle::decode_body(&ten, default_backend()), Err(BundleError::NotCanonical));
    for (max_age_s, ok) in [(0, false), (1, true), (7 * 24 * 3600, true), (7 * 24 * 3600 + 1, false)] {
        let b = bundle::encode_body(&PolicyBody { freshness: Some(stamper(1, max_age_s)), ..plain.clone() });
        assert_eq!(bundle::decode_body(&b, default_backend()).is_ok(), ok, "max age {max_age_s}");
    }
    let mut bad_key = bytes.clone();
    let at = bad_key.len() - 60; // inside the key's point
    bad_key[at] ^= 0x55;
    assert_eq!(
        bundle::decode_body(&bad_key, default_backend()),
        Err(BundleError::Malformed("timestamp key must be a P-384 point"))
    );
}

#[test]
fn requiring_timestamps_holds_at_once_and_dropping_or_widening_them_waits_for_the_delay() {
    let (mut g, gd) = genesis();
    assert_eq!(g.freshness_in_force(NOW_MS), None);
    // Added: a tightening, at once.
    let v2 = PolicyBody { freshness: Some(stamper(1, 60)), ..next(gd, vec![image("a", 0xa)]) };
    let r = g.apply(&bundle_bytes(&v2, &[1, 2]), NOW_MS, default_backend()).expect("v2");
    assert!(!r.loosens);
    assert_eq!(g.freshness_in_force(NOW_MS), Some(stamper(1, 60)));

    // A longer maximum age, another key, or none: each waits; meanwhile the stricter holds.
    let later = NOW_MS + 3_600_000;
    for (f, meanwhile) in [
        (Some(stamper(1, 600)), Some(stamper(1, 60))),
        (Some(stamper(2, 30)), Some(stamper(1, 60))),
        (None, Some(stamper(1, 60))),
    ] {
        let mut s = g.clone();
        let v3 = PolicyBody { freshness: f.clone(), ..after(&v2, v2.clone()) };
        let r = s.apply(&bundle_bytes(&v3, &[1, 2]), NOW_MS + 1000, default_backend()).expect("v3");
        assert!(r.loosens, "{f:?}");
        assert_eq!(s.freshness_in_force(NOW_MS + 1000), meanwhile, "{f:?}");
        assert_eq!(s.freshness_in_force(later + 2000), f, "after the delay: {f:?}");
    }
    // A shorter maximum age is a tightening: at once.
    let mut s = g.clone();
    let v3 = PolicyBody { freshness: Some(stamper(1, 10)), ..after(&v2, v2.clone()) };
    assert!(!s.apply(&bundle_bytes(&v3, &[1, 2]), NOW_MS + 1000, default_backend()).expect("v3").loosens);
    assert_eq!(s.freshness_in_force(NOW_MS + 1000), Some(stamper(1, 10)));
}
