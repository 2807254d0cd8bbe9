//! Policy freshness through the protocol core, without I/O: a policy naming the pipeline's
//! timestamp key makes the KRE release only while it holds a young timestamp for exactly its
//! newest policy. A copy kept on an old policy (its parent never pushes the revocation) stops
//! releasing once the last timestamp for that policy is older than the maximum age, whatever
//! its parent pushes; a timestamp for a newer version stops it at once.

use std::sync::Arc;

use keygate_attestation::bundle::{self, PolicyBody};
use keygate_attestation::freshness::{self, Freshness, Timestamp};
use keygate_attestation::mock::{derive_key, public_point, MockNsm};
use keygate_attestation::policy::ReleasePolicy;
use keygate_attestation::Verifier;
use keygate_enclave::kre::{Kre, KreConfig};
use keygate_enclave::peer::client::{ClientError, FetchRequest, ReleasedKey};
use keygate_enclave::wire::{DenyCode, Message};
use p384::ecdsa::signature::Signer;
use p384::ecdsa::SigningKey;

mod common;
use common::{denied, fetch_denial, id, image, now, one, pcrs, prod_policy, set_now, T};

const SEED: &[u8] = b"freshness-test";
const MAX_AGE_S: u64 = 60;

/// The pipeline: its approver, its online timestamp key, and the last body it signed.
struct Pipeline {
    approver: SigningKey,
    stamper: SigningKey,
    last: PolicyBody,
}

impl Pipeline {
    /// The genesis bundle ("prod" allows `pcrs(0x10)` and `pcrs(0x20)`), naming the timestamp
    /// key with a 60-second maximum age.
    fn genesis() -> (Vec<u8>, Self) {
        let approver = derive_key(b"freshness-approvers", "approver-1");
        let stamper = derive_key(b"freshness-pipeline", "timestamp");
        let mut policy: ReleasePolicy = prod_policy(1, 0);
        if let Some(rule) = policy.clusters.get_mut("prod") {
            rule.images.push(image("second", 0x20));
        }
        let body = PolicyBody {
            freshness: Some(Freshness { key: public_point(&stamper).try_into().expect("97"), max_age_s: MAX_AGE_S }),
            ..common::genesis_body(&approver, policy)
        };
        let bytes = common::genesis_bundle(&body);
        (bytes, Self { approver, stamper, last: body })
    }

    /// The next bundle, revoking the image `name` from "prod", signed by the approver.
    fn revoke(&mut self, name: &str) -> Vec<u8> {
        let mut body = common::next_body(&self.last);
        if let Some(rule) = body.policy.clusters.get_mut("prod") {
            rule.images.retain(|i| i.name != name);
        }
        let bytes = common::signed_bundle(&body, &self.approver);
        self.last = body;
        bytes
    }

    /// A timestamp for the newest body, issued at `issued_ms`, signed by `key`.
    fn stamp_with(&self, key: &SigningKey, issued_ms: u64) -> Vec<u8> {
        let version = self.last.version;
        let digest = bundle::digest(&bundle::encode_body(&self.last));
        let sig: p384::ecdsa::Signature = key.sign(&freshness::signing_message(version, &digest, issued_ms));
        freshness::encode(&Timestamp {
            version,
            digest,
            issued_ms,
            key: public_point(key).try_into().expect("97"),
            signature: sig.to_bytes()[..].try_into().expect("96"),
        })
    }

    /// A timestamp for the newest body, issued at `issued_ms`.
    fn stamp(&self, issued_ms: u64) -> Vec<u8> {
        self.stamp_with(&self.stamper, issued_ms)
    }
}

fn kre(genesis: &[u8], instance: &str) -> Kre {
    let nsm = MockNsm::new(SEED, pcrs(0x70), Arc::new(now)).with_instance(instance);
    let verifier = Verifier::new(nsm.root_anchor());
    Kre::with_genesis(KreConfig::default(), verifier, genesis, Arc::new(nsm)).expect("kre")
}

/// A fetch by the control plane whose image has PCRs `pcrs(0x10)` (the image "first"
/// names `prod_policy`'s rule).
fn fetch(kre: &Kre) -> Result<Vec<ReleasedKey>, ClientError> {
    let cpi = MockNsm::new(SEED, pcrs(0x10), Arc::new(now)).with_instance("cpi");
    let req = FetchRequest {
        cluster: id("prod"),
        key_ids: vec![id("etcd")],
        expect_kre_pcrs: vec![],
        also_accept_kre: vec![],
    };
    common::fetch_as(kre, &cpi, req)
}

/// Pushes `bytes` (a bundle or a timestamp); the answer's (version, activates_at_ms).
fn push(kre: &Kre, bytes: Vec<u8>) -> (u64, u64) {
    match one(kre, Message::PolicyPush { bundle: bytes }) {
        Message::PolicyAccepted { version, activates_at_ms, .. } => (version, activates_at_ms),
        other => panic!("expected PolicyAccepted, got {other:?}"),
    }
}

fn refused_push(kre: &Kre, bytes: Vec<u8>) -> (DenyCode, String) {
    denied(one(kre, Message::PolicyPush { bundle: bytes }))
}

/// The name of the one image rule of "prod" whose PCRs are `pcrs(0x10)`.
fn first_image_name() -> String {
    prod_policy(1, 0).clusters["prod"].images[0].name.clone()
}

#[test]
fn releases_go_on_only_while_a_young_timestamp_for_the_newest_policy_is_held() {
    let (genesis, pipeline) = Pipeline::genesis();
    let kre = kre(&genesis, "kre");

    let (code, reason) = fetch_denial(fetch(&kre));
    assert_eq!(code, DenyCode::PolicyStale);
    assert!(reason.contains("no timestamp has been pushed"), "{reason}");

    assert_eq!(push(&kre, pipeline.stamp(T)), (1, T + MAX_AGE_S * 1000), "held; counts for 60 s");
    fetch(&kre).expect("released with a young timestamp");
    let status: serde_json::Value = serde_json::from_str(&kre.status_json_at(Some(T))).expect("json");
    assert_eq!(status["policy_timestamp"]["version"], 1);
    assert_eq!(status["policy_fresh_until_ms"], T + MAX_AGE_S * 1000);

    set_now(T + MAX_AGE_S * 1000);
    let (code, reason) = fetch_denial(fetch(&kre));
    assert_eq!(code, DenyCode::PolicyStale);
    assert!(reason.contains("expired"), "{reason}");

    // A replayed older timestamp changes nothing; a later one lets releases go on again.
    assert_eq!(push(&kre, pipeline.stamp(T - 1)), (1, T + MAX_AGE_S * 1000), "the held one is kept");
    assert!(fetch(&kre).is_err());
    assert_eq!(push(&kre, pipeline.stamp(now())).1, now() + MAX_AGE_S * 1000);
    fetch(&kre).expect("released again");
}

#[test]
fn a_timestamp_not_signed_by_the_policys_key_or_from_the_future_or_malformed_is_refused() {
    let (genesis, pipeline) = Pipeline::genesis();
    let kre = kre(&genesis, "kre");
    let intruder = derive_key(b"freshness-intruder", "operator");
    let (code, reason) = refused_push(&kre, pipeline.stamp_with(&intruder, T));
    assert_eq!(code, DenyCode::PolicyRefused);
    assert!(reason.contains("another key"), "{reason}");
    let (code, reason) = refused_push(&kre, pipeline.stamp(T + 3_600_000));
    assert_eq!(code, DenyCode::PolicyRefused);
    assert!(reason.contains("after now"), "{reason}");
    let mut forged = pipeline.stamp(T);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let (code, reason) = refused_push(&kre, forged);
    assert_eq!(code, DenyCode::PolicyRefused);
    assert!(reason.contains("signature does not verify"), "{reason}");
    assert!(fetch(&kre).is_err(), "nothing refused was taken");

    // A policy without a timestamp key takes no timestamp.
    let plain = kre_without_freshness();
    let (code, reason) = refused_push(&plain, pipeline.stamp(T));
    assert_eq!(code, DenyCode::PolicyRefused);
    assert!(reason.contains("names no timestamp key"), "{reason}");
    fetch(&plain).expect("no timestamp needed");
}

fn kre_without_freshness() -> Kre {
    let (_, mut pipeline) = Pipeline::genesis();
    pipeline.last.freshness = None;
    let genesis = common::genesis_bundle(&pipeline.last);
    kre(&genesis, "plain")
}

#[test]
fn a_copy_kept_on_the_revoked_policy_stops_within_the_maximum_age_whatever_its_parent_pushes() {
    let (genesis, mut pipeline) = Pipeline::genesis();
    let member = kre(&genesis, "member");
    let copy = kre(&genesis, "copy");
    let v1_stamp = pipeline.stamp(T);
    push(&member, v1_stamp.clone());
    push(&copy, v1_stamp.clone());
    fetch(&copy).expect("the copy serves while version 1 is the newest");

    // The pipeline revokes the image at T + 10 s and from then on timestamps only version 2.
    set_now(T + 10_000);
    let revocation = pipeline.revoke(&first_image_name());
    push(&member, revocation);
    let (code, reason) = fetch_denial(fetch(&member));
    assert_eq!(code, DenyCode::PolicyStale, "a new head waits for its own timestamp");
    assert!(reason.contains("no timestamp for policy version 2"), "{reason}");
    push(&member, pipeline.stamp(now()));
    assert_eq!(fetch_denial(fetch(&member)).0, DenyCode::ImageNotAllowed, "the revocation holds");

    // The copy's parent withholds the revocation and replays the last version-1 timestamp:
    // the copy serves the revoked image until that timestamp is 60 s old, and never after.
    fetch(&copy).expect("within the maximum age of the last version-1 timestamp");
    set_now(T + MAX_AGE_S * 1000);
    push(&copy, v1_stamp);
    let (code, reason) = fetch_denial(fetch(&copy));
    assert_eq!(code, DenyCode::PolicyStale);
    assert!(reason.contains("expired"), "{reason}");

    // A parent that passes on the pipeline's newest timestamp but not the bundle: the copy
    // knows it is behind and releases nothing even with a young timestamp.
    let fresh_copy = kre(&genesis, "copy-2");
    push(&fresh_copy, pipeline.stamp(now()));
    let (code, reason) = fetch_denial(fetch(&fresh_copy));
    assert_eq!(code, DenyCode::PolicyStale);
    assert!(reason.contains("newer than version 1"), "{reason}");
}
