//! Cluster membership and key forwarding (`docs/cluster.md`), both sides of a join with real
//! mock attestation documents: a member joins from a serving member and serves the same keys;
//! every adversarial case is refused by the side that must refuse it, with its typed error.

use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::crypto::{default_backend, p384_scalar_from, Crypto};
use keygate_attestation::members::{parent_instance_pcr4, parent_role_pcr3, Member, NotAMember};
use keygate_attestation::mock::MockNsm;
use keygate_attestation::{Nsm, PcrExpectation, Verifier, VerifyError};
use keygate_enclave::kre::join::{self, JoinExpect, JoinRefusal};
use keygate_enclave::kre::joiner::{Floor, JoinError, JoinSession, MemberExpect};
use keygate_enclave::state::custody::CustodianSet;
use keygate_enclave::state::vault::{Custody, Phase, Vault, VaultError};
use keygate_enclave::wire::{JoinOffer, MemberMessage};

mod common;
use common::{expectations, id, pcrs, rng_from, T};

const SEED: &[u8] = b"member-join";
const KRE_IMAGE: u8 = 0x70;

/// A KRE enclave of image `image` on parent instance `instance`.
fn kre_nsm(instance: &str, image: u8) -> MockNsm {
    MockNsm::new(SEED, pcrs(image), Arc::new(|| T)).with_instance(instance).with_parent(instance, None)
}

fn member(name: &str, instance: &str) -> Member {
    Member { name: name.into(), pcr4: parent_instance_pcr4(instance), pcr3: None }
}

struct Cluster {
    crypto: &'static dyn Crypto,
    verifier: Verifier,
    images: Vec<Vec<PcrExpectation>>,
    members: Vec<Member>,
    set: CustodianSet,
    /// The serving member's vault (generation 2 committed) and its NSM.
    serving: Vault,
    s_nsm: MockNsm,
    /// The stored blobs of generations 1 and 2, and the custody stored with them.
    blobs: Vec<Vec<u8>>,
    custody: Custody,
}

/// The members' genesis: approver `approver-1` (threshold 1), the prod policy, the cluster's
/// members, a 1 h activation delay.
fn genesis_body(c: &Cluster) -> keygate_attestation::bundle::PolicyBody {
    let key = keygate_attestation::mock::derive_key(b"member-approvers", "approver-1");
    keygate_attestation::bundle::PolicyBody {
        members: c.members.clone(),
        ..common::genesis_body(&key, common::prod_policy(1, 0))
    }
}

fn cluster() -> Cluster {
    let crypto = default_backend();
    let keys = (0..3u64)
        .map(|i| {
            let (_, public) = p384_scalar_from(crypto, rng_from(100 + i)).expect("key");
            public.try_into().expect("point")
        })
        .collect();
    let set = CustodianSet::new(crypto, 2, keys).expect("set");
    let s_nsm = kre_nsm("i-0serving", KRE_IMAGE);
    let mut v = Vault::new(set.clone());
    let mut r = rng_from(1);
    let mut attest = |_: &[u8; 48]| Ok(b"genesis".to_vec());
    let e = v.genesis(crypto, &[id("a")], Some((1, [1; 48])), &[], &mut r, &mut attest).expect("genesis").clone();
    v.commit(1, &e.blob_sha384).expect("commit 1");
    v.rotate_to(&id("a"), 2, 0, &mut r).expect("rotate");
    let e2 = v.export(crypto, &mut r).expect("export").expect("generation 2").clone();
    v.commit(2, &e2.blob_sha384).expect("commit 2");
    let custody = v.custody().expect("custody").clone();
    Cluster {
        crypto,
        verifier: Verifier::new(s_nsm.root_anchor()),
        images: vec![expectations(&pcrs(KRE_IMAGE)).into_iter().filter(|e| e.index < 3).collect()],
        members: vec![member("serving", "i-0serving"), member("joiner", "i-0joiner")],
        set,
        serving: v,
        s_nsm,
        blobs: vec![e.blob, e2.blob],
        custody,
    }
}

impl Cluster {
    /// A KRE with this cluster's custodians and the genesis bundle `genesis`, on parent
    /// instance `instance`, running the members' image.
    fn kre(&self, instance: &str, genesis: &[u8]) -> keygate_enclave::kre::Kre {
        use keygate_enclave::kre::{Kre, KreConfig};
        let config = KreConfig { custodians: Some(self.set.clone()), ..KreConfig::default() };
        Kre::with_genesis(
            config,
            Verifier::new(self.s_nsm.root_anchor()),
            genesis,
            Arc::new(kre_nsm(instance, KRE_IMAGE)),
        )
        .expect("kre")
    }

    fn s_expect(&self) -> JoinExpect<'_> {
        JoinExpect {
            verifier: &self.verifier,
            now_ms: T,
            max_doc_age: Duration::from_secs(60),
            clock_skew: Duration::from_secs(30),
            images: &self.images,
            members: &self.members,
        }
    }

    fn j_expect(&self) -> MemberExpect<'_> {
        MemberExpect {
            verifier: &self.verifier,
            now_ms: T,
            max_doc_age: Duration::from_secs(60),
            clock_skew: Duration::from_secs(30),
            images: &self.images,
            members: &self.members,
        }
    }

    /// A join request from the KRE behind `j_nsm`: its session and frame body.
    fn request(&self, j_nsm: &MockNsm, seed: u64) -> (JoinSession, Vec<u8>) {
        let mut s = JoinSession::start(self.crypto, &mut rng_from(seed)).expect("session");
        let doc = j_nsm.attest(&s.attest_request()).expect("attest");
        let frame = s.request(doc).expect("request");
        (s, frame[4..].to_vec())
    }

    /// The serving member's answer to `body`, as `s_nsm` and `vault` give it.
    fn answer_by(
        &self,
        vault: &Vault,
        s_nsm: &MockNsm,
        expect: &JoinExpect<'_>,
        body: &[u8],
    ) -> Result<Vec<u8>, JoinRefusal> {
        let mut attest = |r: &keygate_attestation::AttestRequest| s_nsm.attest(r);
        join::answer(expect, vault, body, self.crypto, &mut rng_from(77), &mut attest).map(|a| a.frame[4..].to_vec())
    }

    fn answer(&self, body: &[u8]) -> Result<Vec<u8>, JoinRefusal> {
        self.answer_by(&self.serving, &self.s_nsm, &self.s_expect(), body)
    }
}

fn offer_of(body: &[u8]) -> JoinOffer {
    match MemberMessage::decode(body).expect("decode") {
        MemberMessage::JoinOffer(o) => *o,
        m => panic!("not an offer: {m:?}"),
    }
}

fn reencode(o: JoinOffer) -> Vec<u8> {
    MemberMessage::JoinOffer(Box::new(o)).encode().expect("encode")[4..].to_vec()
}

#[test]
fn a_member_joins_from_a_serving_member_and_serves_the_same_keys() {
    let c = cluster();
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    let (session, req) = c.request(&j_nsm, 5);
    let answer = c.answer(&req).expect("forwarded");
    let mut floor = Floor { generation: 1, policy: Some((1, [1; 48])) };
    let fwd = session.on_offer(&answer, &c.j_expect(), &mut floor, c.crypto).expect("accepted");
    assert_eq!(fwd.state_key.expose(), c.serving.forwardable().expect("fwd").state_key.expose(), "the same state key");
    assert_eq!((fwd.generation, fwd.policy_head), (2, Some((1, [1; 48]))));
    assert_eq!(floor, Floor { generation: 2, policy: Some((1, [1; 48])) }, "the floor rises to what was learned");

    let mut j = Vault::new(c.set.clone());
    assert_eq!(j.join(c.crypto, fwd, c.blobs[1].clone(), c.custody.clone()), Ok(2));
    assert_eq!(j.phase(), Phase::Serving);
    assert_eq!(j.committed_generation(), 2);
    let (mine, theirs) = (j.releasable(&id("a")), c.serving.releasable(&id("a")));
    assert_eq!(mine.len(), 2);
    for (m, t) in mine.iter().zip(&theirs) {
        assert_eq!((m.0, m.1, m.2.expose()), (t.0, t.1, t.2.expose()));
    }
    assert_eq!(j.policy_floor(), Some((1, [1; 48])));
    // A member that joined can forward in turn.
    assert_eq!(j.forwardable().expect("forwardable").generation, 2);
}

#[test]
fn the_serving_member_refuses_a_non_member_copy_of_the_image_and_other_images() {
    let c = cluster();
    // The same image on a parent instance the policy does not name.
    let copy = kre_nsm("i-0stranger", KRE_IMAGE);
    let (_, req) = c.request(&copy, 5);
    let e = c.answer(&req).expect_err("not a member");
    assert!(matches!(e, JoinRefusal::NotAMember(NotAMember::NotListed { .. })), "{e}");
    assert_eq!(e.code(), keygate_enclave::wire::DenyCode::ImageNotAllowed);
    // A member's parent instance, but another image.
    let other = kre_nsm("i-0joiner", 0x71);
    let (_, req) = c.request(&other, 5);
    assert!(matches!(c.answer(&req), Err(JoinRefusal::NotAMember(NotAMember::Image(_)))));
    // No image expected at all: refused, not "anything goes".
    let none = JoinExpect { images: &[], ..c.s_expect() };
    let (_, req) = c.request(&kre_nsm("i-0joiner", KRE_IMAGE), 5);
    assert!(matches!(
        c.answer_by(&c.serving, &c.s_nsm, &none, &req),
        Err(JoinRefusal::NotAMember(NotAMember::NoImages))
    ));
    // A member that pins PCR3: the right instance with another role is refused.
    let pinned =
        vec![Member { pcr3: Some(parent_role_pcr3("arn:aws:iam::1:role/kre")), ..member("joiner", "i-0joiner") }];
    let strict = JoinExpect { members: &pinned, ..c.s_expect() };
    let wrong_role = MockNsm::new(SEED, pcrs(KRE_IMAGE), Arc::new(|| T))
        .with_instance("j")
        .with_parent("i-0joiner", Some("arn:aws:iam::1:role/other"));
    let (_, req) = c.request(&wrong_role, 5);
    assert!(matches!(
        c.answer_by(&c.serving, &c.s_nsm, &strict, &req),
        Err(JoinRefusal::NotAMember(NotAMember::NotListed { .. }))
    ));
    let right_role = MockNsm::new(SEED, pcrs(KRE_IMAGE), Arc::new(|| T))
        .with_instance("j")
        .with_parent("i-0joiner", Some("arn:aws:iam::1:role/kre"));
    let (_, req) = c.request(&right_role, 5);
    assert!(c.answer_by(&c.serving, &c.s_nsm, &strict, &req).is_ok());
}

#[test]
fn the_serving_member_refuses_stale_unbound_and_early_requests() {
    let c = cluster();
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    // A document older than the maximum age.
    let (_, req) = c.request(&j_nsm, 5);
    let later = JoinExpect { now_ms: T + 61_000, ..c.s_expect() };
    assert!(matches!(
        c.answer_by(&c.serving, &c.s_nsm, &later, &req),
        Err(JoinRefusal::Attestation(VerifyError::DocumentTooOld { .. }))
    ));
    // A document whose user_data does not bind its nonce and key.
    let s = JoinSession::start(c.crypto, &mut rng_from(6)).expect("session");
    let mut r = s.attest_request();
    r.user_data = Some(vec![0; 48]);
    let req = MemberMessage::JoinRequest { attestation: j_nsm.attest(&r).expect("doc") }.encode().expect("frame");
    assert!(matches!(c.answer(&req[4..]), Err(JoinRefusal::UserDataMismatch)));
    // Nothing committed to forward: a vault that is not serving.
    let (_, req) = c.request(&j_nsm, 5);
    let empty = Vault::new(c.set.clone());
    assert!(matches!(
        c.answer_by(&empty, &c.s_nsm, &c.s_expect(), &req),
        Err(JoinRefusal::NotServing(VaultError::WrongPhase { .. }))
    ));
}

#[test]
fn the_joiner_refuses_a_serving_kre_that_is_not_a_member() {
    let c = cluster();
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    // A genuine KRE of the same image, serving the same state, on a parent the joiner's
    // policy does not name (its own list names it: it answers).
    let rogue = kre_nsm("i-0rogue", KRE_IMAGE);
    let rogue_members = vec![member("rogue", "i-0rogue"), member("joiner", "i-0joiner")];
    let rogue_expect = JoinExpect { members: &rogue_members, ..c.s_expect() };
    let (session, req) = c.request(&j_nsm, 5);
    let answer = c.answer_by(&c.serving, &rogue, &rogue_expect, &req).expect("the rogue answers");
    let e = session.on_offer(&answer, &c.j_expect(), &mut Floor::default(), c.crypto).expect_err("refused");
    assert!(matches!(e, JoinError::NotAMember(NotAMember::NotListed { .. })), "{e}");
}

#[test]
fn the_joiner_refuses_a_serving_member_older_than_its_floor() {
    let c = cluster();
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    let (session, req) = c.request(&j_nsm, 5);
    let answer = c.answer(&req).expect("forwarded");
    let mut floor = Floor { generation: 3, policy: None };
    let e = session.on_offer(&answer, &c.j_expect(), &mut floor, c.crypto).expect_err("stale");
    assert!(matches!(e, JoinError::StaleGeneration { offered: 2, floor: 3 }), "{e}");
    let mut newer_policy = Floor { generation: 2, policy: Some((2, [2; 48])) };
    let e = session.on_offer(&answer, &c.j_expect(), &mut newer_policy, c.crypto).expect_err("stale policy");
    assert!(matches!(e, JoinError::StalePolicy { offered: 1, floor: 2 }), "{e}");
    assert_eq!(floor.generation, 3, "a refused offer does not move the floor");
}

#[test]
fn the_joiner_refuses_a_replayed_or_tampered_answer() {
    let c = cluster();
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    let (first, req) = c.request(&j_nsm, 5);
    let old_answer = c.answer(&req).expect("forwarded");
    // A later session (a new nonce) is given the old answer.
    let (second, _) = c.request(&j_nsm, 6);
    let e = second.on_offer(&old_answer, &c.j_expect(), &mut Floor::default(), c.crypto).expect_err("replay");
    assert!(matches!(e, JoinError::NonceMismatch), "{e}");
    // The sealed key tampered with.
    let mut o = offer_of(&old_answer);
    o.sealed_key[0] ^= 1;
    let e = first.on_offer(&reencode(o), &c.j_expect(), &mut Floor::default(), c.crypto).expect_err("tampered");
    assert!(matches!(e, JoinError::KeyDoesNotOpen), "{e}");
    // A field the transcript binds, changed by the parent in between.
    for change in [
        |o: &mut JoinOffer| o.generation += 1,
        |o: &mut JoinOffer| o.blob_sha384[0] ^= 1,
        |o: &mut JoinOffer| o.policy_version += 1,
        |o: &mut JoinOffer| o.policy_digest[0] ^= 1,
    ] {
        let mut o = offer_of(&old_answer);
        change(&mut o);
        let e = first.on_offer(&reencode(o), &c.j_expect(), &mut Floor::default(), c.crypto).expect_err("bound");
        assert!(matches!(e, JoinError::TranscriptMismatch), "{e}");
    }
    // The untouched answer is still good for its own session.
    assert!(first.on_offer(&old_answer, &c.j_expect(), &mut Floor::default(), c.crypto).is_ok());
    // A session that sent no request accepts nothing.
    let idle = JoinSession::start(c.crypto, &mut rng_from(9)).expect("session");
    assert!(matches!(
        idle.on_offer(&old_answer, &c.j_expect(), &mut Floor::default(), c.crypto),
        Err(JoinError::NotRequested)
    ));
}

#[test]
fn the_joiner_serves_only_the_blob_the_serving_member_vouched_for() {
    let c = cluster();
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    let (session, req) = c.request(&j_nsm, 5);
    let answer = c.answer(&req).expect("forwarded");
    let fwd = session.on_offer(&answer, &c.j_expect(), &mut Floor::default(), c.crypto).expect("accepted");
    // The parent hands over the older generation: refused, the vault still awaits.
    let mut j = Vault::new(c.set.clone());
    assert_eq!(j.join(c.crypto, fwd.clone(), c.blobs[0].clone(), c.custody.clone()), Err(VaultError::JoinBlobMismatch));
    assert_eq!(j.phase(), Phase::Awaiting);
    // A serving vault takes no join.
    let mut s = c.serving.clone();
    assert!(matches!(
        s.join(c.crypto, fwd.clone(), c.blobs[1].clone(), c.custody.clone()),
        Err(VaultError::WrongPhase { .. })
    ));
    assert_eq!(j.join(c.crypto, fwd, c.blobs[1].clone(), c.custody.clone()), Ok(2));
}

/// The KRE core answers a join: members from its signed genesis, its own image from its NSM,
/// its committed state; a joiner takes the key and serves the stored blob.
#[test]
fn a_kre_answers_a_member_and_refuses_a_copy_of_its_image() {
    use keygate_enclave::kre::Env;

    let c = cluster();
    let body = genesis_body(&c);
    let genesis = common::genesis_bundle(&body);
    let kre = c.kre("i-0serving", &genesis);
    let mut r = rng_from(3);
    let mut env = Env { now_ms: T, rng: &mut r };
    let j_nsm = kre_nsm("i-0joiner", KRE_IMAGE);
    let (session, req) = c.request(&j_nsm, 5);
    assert!(matches!(kre.answer_join(&req, None, &mut env), Err(JoinRefusal::NotServing(_))), "nothing committed yet");
    common::report(&kre, keygate_enclave::wire::Message::StateGenesis);
    let (generation, stored) = common::sync_stored(&kre);
    assert_eq!(generation, 1);
    let (blob, shares, genesis_attestation) = stored.expect("stored");

    let answer = kre.answer_join(&req, None, &mut env).expect("forwarded");
    assert_eq!((answer.member.as_str(), answer.generation), ("joiner", 1));
    let fwd = session.on_offer(&answer.frame[4..], &c.j_expect(), &mut Floor::default(), c.crypto).expect("accepted");
    let mut j = Vault::new(c.set.clone());
    assert_eq!(j.join(c.crypto, fwd, blob, Custody { shares, genesis_attestation }), Ok(1));

    let (_, req) = c.request(&kre_nsm("i-0stranger", KRE_IMAGE), 5);
    assert!(matches!(
        kre.answer_join(&req, None, &mut env),
        Err(JoinRefusal::NotAMember(NotAMember::NotListed { .. }))
    ));
    let (_, req) = c.request(&kre_nsm("i-0joiner", 0x71), 5);
    assert!(matches!(kre.answer_join(&req, None, &mut env), Err(JoinRefusal::NotAMember(NotAMember::Image(_)))));
}

/// A restarted KRE whose sealed state records a newer policy head than its parent has
/// replayed refuses to forward: the bundle that removed a member cannot be withheld to make it
/// forward to that member.
#[test]
fn a_kre_behind_its_sealed_policy_head_refuses_to_forward() {
    use keygate_attestation::bundle::PolicyBody;
    use keygate_attestation::crypto::P384Scalar;
    use keygate_attestation::mock::derive_key;
    use keygate_enclave::kre::Env;
    use keygate_enclave::wire::Message;

    let c = cluster();
    let scalars: Vec<P384Scalar> =
        (0..3u64).map(|i| p384_scalar_from(c.crypto, rng_from(100 + i)).expect("key").0).collect();
    let key = derive_key(b"member-approvers", "approver-1");
    let g = genesis_body(&c);
    let genesis = common::genesis_bundle(&g);
    // Version 2 removes the joiner (a tightening: in force at once).
    let v2 = PolicyBody { members: vec![member("serving", "i-0serving")], ..common::next_body(&g) };
    let v2_bundle = common::signed_bundle(&v2, &key);
    let start = || c.kre("i-0serving", &genesis);
    let kre = start();
    common::report(&kre, Message::StateGenesis);
    common::sync_stored(&kre);
    assert!(matches!(
        common::one(&kre, Message::PolicyPush { bundle: v2_bundle.clone() }),
        Message::PolicyAccepted { .. }
    ));
    let (generation, stored) = common::sync_stored(&kre);
    assert_eq!(generation, 2, "the sealed state records policy version 2");
    let (blob, shares, genesis_attestation) = stored.expect("stored");

    // The restart: genesis v1 only (the parent withholds v2), unsealed by two custodians in a
    // cold start (no other member serves: none to confirm it).
    let k2 = start();
    assert_eq!(
        common::report(&k2, Message::StateLoad { blob, shares, genesis_attestation, cold_start: true }).phase,
        2
    );
    let kre_pcrs = expectations(&pcrs(KRE_IMAGE));
    let expect = common::custodian_expects(&c.verifier, &kre_pcrs, true);
    common::unseal_with(&k2, &scalars[..2], &expect, c.crypto);
    assert_eq!(k2.vault_phase(), Some(Phase::Serving));

    let mut r = rng_from(3);
    let mut env = Env { now_ms: T, rng: &mut r };
    let (_, req) = c.request(&kre_nsm("i-0joiner", KRE_IMAGE), 5);
    let e = k2.answer_join(&req, None, &mut env).expect_err("behind its floor");
    assert!(matches!(e, JoinRefusal::PolicyStale(_)), "{e}");
    // Once the parent replays version 2, the joiner is no member any more.
    assert!(matches!(common::one(&k2, Message::PolicyPush { bundle: v2_bundle }), Message::PolicyAccepted { .. }));
    let e = k2.answer_join(&req, None, &mut env).expect_err("removed");
    assert!(matches!(e, JoinRefusal::NotAMember(NotAMember::NotListed { .. })), "{e}");
}

/// The join over the KREs' connections, as the processes carry it: the joiner's parent
/// channel (JoinStart → its JoinRequest; JoinFinish on the same connection), the serving
/// member's member channel (JoinRequest → JoinOffer). The joiner then serves without any
/// custodian; an offer for another session, a JoinFinish without a JoinStart, a non-member
/// and the member frame on another listener are refused.
#[test]
fn a_join_over_the_member_and_parent_channels_serves_and_refuses_what_it_must() {
    use keygate_enclave::kre::{Connection, Kre};
    use keygate_enclave::wire::{Channel, DenyCode, Message};

    let c = cluster();
    let body = genesis_body(&c);
    let genesis = common::genesis_bundle(&body);
    let start = |instance: &str| c.kre(instance, &genesis);
    let denied = |reply: &[u8]| match MemberMessage::decode(&reply[4..]) {
        Ok(MemberMessage::Denied(Message::Denied { code, .. })) => code,
        other => panic!("expected a Denied, got {other:?}"),
    };
    let s = start("i-0serving");
    common::report(&s, Message::StateGenesis);
    let (_, stored) = common::sync_stored(&s);
    let (blob, shares, genesis_attestation) = stored.expect("stored");
    let finish = |offer: &[u8]| {
        Message::JoinFinish {
            offer: offer.to_vec(),
            blob: blob.clone(),
            shares: shares.clone(),
            genesis_attestation: genesis_attestation.clone(),
        }
        .encode()
        .expect("finish")
    };
    let start_frame = Message::JoinStart.encode().expect("start");

    let j = start("i-0joiner");
    // A JoinFinish without its JoinStart has no session.
    let mut fresh = Connection::new(Channel::Parent);
    assert_eq!(denied(&common::step(&mut fresh, &j, &finish(&[1, 2])).reply), DenyCode::UnexpectedMessage);
    // Two sessions: the offer for the first does not open on the second's connection.
    let mut first = Connection::new(Channel::Parent);
    let req1 = common::step(&mut first, &j, &start_frame);
    assert!(!req1.close, "the connection waits for the JoinFinish");
    let mut second = Connection::new(Channel::Parent);
    common::step(&mut second, &j, &start_frame);
    // The member frame is refused from any other listener, and the member listener takes
    // nothing else.
    for channel in [Channel::Release, Channel::Parent, Channel::Custodian] {
        let r = common::step(&mut Connection::new(channel), &s, &req1.reply);
        assert_eq!(denied(&r.reply), DenyCode::WrongChannel, "{channel}");
    }
    let hello = Message::Hello { client_nonce: [1; 32] }.encode().expect("hello");
    assert_eq!(denied(&common::step(&mut Connection::new(Channel::Member), &s, &hello).reply), DenyCode::WrongChannel);
    let offer = common::step(&mut Connection::new(Channel::Member), &s, &req1.reply);
    assert!(matches!(MemberMessage::decode(&offer.reply[4..]), Ok(MemberMessage::JoinOffer(_))));
    let r = common::step(&mut second, &j, &finish(&offer.reply[4..]));
    assert_eq!(denied(&r.reply), DenyCode::StateRefused, "an offer for another session");
    assert_eq!(j.vault_phase(), Some(Phase::Awaiting));
    // On its own session's connection, it serves the stored generation.
    let r = common::step(&mut first, &j, &finish(&offer.reply[4..]));
    match Message::decode(&r.reply[4..]) {
        Ok(Message::StateReport(rep)) => assert_eq!((rep.phase, rep.committed_generation), (3, 1)),
        other => panic!("expected a StateReport, got {other:?}"),
    }
    assert_eq!(j.vault_phase(), Some(Phase::Serving));
    // StateAdopt (`docs/cluster.md`): the committed blob again is acknowledged; a blob that is
    // no sealed state is refused (`state_refused`), as is any adoption by a KRE not serving.
    let adopt = |kre: &Kre, blob: Vec<u8>| {
        let frame = Message::StateAdopt { blob }.encode().expect("adopt");
        Message::decode(&common::step(&mut Connection::new(Channel::Parent), kre, &frame).reply[4..])
    };
    match adopt(&j, blob.clone()) {
        Ok(Message::StateReport(rep)) => assert_eq!((rep.phase, rep.committed_generation), (3, 1)),
        other => panic!("expected a StateReport, got {other:?}"),
    }
    for (kre, bad) in [(&j, vec![7; 100]), (&start("i-0idle"), blob.clone())] {
        match adopt(kre, bad) {
            Ok(Message::Denied { code, .. }) => assert_eq!(code, DenyCode::StateRefused),
            other => panic!("expected a Denied, got {other:?}"),
        }
    }
    // A serving KRE takes no join; a non-member is refused by the serving member.
    assert_eq!(
        denied(&common::step(&mut Connection::new(Channel::Parent), &j, &start_frame).reply),
        DenyCode::StateRefused
    );
    let stranger = start("i-0stranger");
    let req = common::step(&mut Connection::new(Channel::Parent), &stranger, &start_frame);
    let r = common::step(&mut Connection::new(Channel::Member), &s, &req.reply);
    assert_eq!(denied(&r.reply), DenyCode::ImageNotAllowed);
    // The joined member forwards in turn (to the first member, restarted and awaiting).
    let s2 = start("i-0serving");
    let mut conn = Connection::new(Channel::Parent);
    let req = common::step(&mut conn, &s2, &start_frame);
    let offer = common::step(&mut Connection::new(Channel::Member), &j, &req.reply);
    common::step(&mut conn, &s2, &finish(&offer.reply[4..]));
    assert_eq!(s2.vault_phase(), Some(Phase::Serving));
}

/// The two rollback attacks on a cluster, refused in the KRE: the parent unseals a copy of a
/// member (the same image, on a member's instance) from the generation before the one the
/// members serve (its `state.previous`, from before a revocation was committed), with shares
/// from custodians whose records never saw the newer generation. Unsealed as a member, the copy
/// releases nothing until a serving member confirms it, and the confirmation brings the newer
/// generation. A cold start, which skips the confirmation, needs each custodian's consent, and
/// the parent can neither add it to an offer nor remove it.
#[test]
fn a_copy_unsealed_from_an_older_generation_waits_for_a_member_and_a_cold_start_needs_consent() {
    use keygate_attestation::crypto::P384Scalar;
    use keygate_attestation::mock::derive_key;
    use keygate_enclave::kre::{Connection, Kre};
    use keygate_enclave::peer::custodian::{self, CustodianError};
    use keygate_enclave::wire::{Channel, DenyCode, Message};

    let c = cluster();
    let scalars: Vec<P384Scalar> =
        (0..3u64).map(|i| p384_scalar_from(c.crypto, rng_from(100 + i)).expect("key").0).collect();
    let g = genesis_body(&c);
    let genesis = common::genesis_bundle(&g);
    let start = |instance: &str| c.kre(instance, &genesis);
    // Member S: genesis (generation 1), then policy version 2 committed as generation 2.
    let s = start("i-0serving");
    common::report(&s, Message::StateGenesis);
    let (_, stored) = common::sync_stored(&s);
    let (blob1, shares, genesis_attestation) = stored.expect("stored");
    let key = derive_key(b"member-approvers", "approver-1");
    let v2 = common::signed_bundle(&common::next_body(&g), &key);
    assert!(matches!(common::one(&s, Message::PolicyPush { bundle: v2 }), Message::PolicyAccepted { .. }));
    let (generation, stored) = common::sync_stored(&s);
    assert_eq!(generation, 2);
    let blob2 = stored.expect("stored").0;

    let kre_pcrs = expectations(&pcrs(KRE_IMAGE));
    let expect = |cold_start| common::custodian_expects(&c.verifier, &kre_pcrs, cold_start);
    let load = |kre: &Kre, blob: &[u8], cold_start| {
        let m = Message::StateLoad {
            blob: blob.to_vec(),
            shares: shares.clone(),
            genesis_attestation: genesis_attestation.clone(),
            cold_start,
        };
        assert_eq!(common::report(kre, m).phase, 2);
    };
    let offer = |kre: &Kre, nonce: [u8; 32]| {
        let hello = Message::UnsealHello { client_nonce: nonce }.encode().expect("hello");
        common::step(&mut Connection::new(Channel::Custodian), kre, &hello).reply[4..].to_vec()
    };
    // The offer as a parent that rewrites its cold-start flag would relay it.
    let flipped = |body: &[u8]| {
        let mut m = Message::decode(body).expect("offer");
        if let Message::UnsealOffer { cold_start, .. } = &mut m {
            *cold_start = !*cold_start;
        }
        m.encode().expect("frame")[4..].to_vec()
    };
    let custodian_on = |body: &[u8], nonce: [u8; 32], cold_start| {
        custodian::on_offer(body, &nonce, &expect(cold_start), &scalars[0], c.crypto, &mut rng_from(5))
    };

    // X: a copy on the joiner's instance, unsealed from generation 1 without a cold start.
    let x = start("i-0joiner");
    load(&x, &blob1, false);
    let body = offer(&x, [5; 32]);
    let e = custodian_on(&flipped(&body), [5; 32], true).expect_err("rewritten");
    assert!(matches!(e, CustodianError::KreBinding(_)), "{e}");
    let e = custodian_on(&body, [5; 32], true).expect_err("no cold start");
    assert!(matches!(e, CustodianError::NotAColdStart), "{e}");
    common::unseal_with(&x, &scalars[..2], &expect(false), c.crypto);
    assert_eq!(x.vault_phase(), Some(Phase::Confirming), "unsealed, and waiting for a member");
    assert!(common::sync_stored(&x).1.is_none(), "nothing of it is stored");
    let status = match common::one(&x, Message::Status) {
        Message::StatusReport { json } => json,
        other => panic!("expected a StatusReport, got {other:?}"),
    };
    assert!(status.contains("confirming"), "{status}");
    // It forwards nothing to another member.
    let mut session = JoinSession::start(c.crypto, &mut rng_from(9)).expect("session");
    let doc = kre_nsm("i-0serving", KRE_IMAGE).attest(&session.attest_request()).expect("attest");
    let r = common::step(&mut Connection::new(Channel::Member), &x, &session.request(doc).expect("request"));
    match MemberMessage::decode(&r.reply[4..]) {
        Ok(MemberMessage::Denied(Message::Denied { code, reason })) => {
            assert_eq!(code, DenyCode::Sealed, "{reason}");
            assert!(reason.contains("the KRE is confirming"), "{reason}");
        }
        other => panic!("expected a Denied, got {other:?}"),
    }

    // The confirmation: X's JoinStart, S's answer (generation 2), the JoinFinish.
    let finish = |offer: &[u8], blob: &[u8]| {
        Message::JoinFinish {
            offer: offer.to_vec(),
            blob: blob.to_vec(),
            shares: shares.clone(),
            genesis_attestation: genesis_attestation.clone(),
        }
        .encode()
        .expect("finish")
    };
    let confirm = |blob: &[u8]| {
        let mut conn = Connection::new(Channel::Parent);
        let req = common::step(&mut conn, &x, &Message::JoinStart.encode().expect("start"));
        let answer = common::step(&mut Connection::new(Channel::Member), &s, &req.reply);
        Message::decode(&common::step(&mut conn, &x, &finish(&answer.reply[4..], blob)).reply[4..]).expect("reply")
    };
    // The parent hands over the older blob instead of the one S vouched for: refused.
    match confirm(&blob1) {
        Message::Denied { code, .. } => assert_eq!(code, DenyCode::StateRefused),
        other => panic!("expected a Denied, got {other:?}"),
    }
    assert_eq!(x.vault_phase(), Some(Phase::Confirming));
    match confirm(&blob2) {
        Message::StateReport(r) => assert_eq!((r.phase, r.committed_generation), (3, 2), "the newer generation"),
        other => panic!("expected a StateReport, got {other:?}"),
    }
    assert_eq!(x.vault_phase(), Some(Phase::Serving));

    // Y: a cold start from generation 2. A custodian that did not consent refuses; one that
    // did accepts; the parent removing the flag breaks the binding.
    let y = start("i-0joiner");
    load(&y, &blob2, true);
    let body = offer(&y, [6; 32]);
    let e = custodian_on(&body, [6; 32], false).expect_err("no consent");
    assert!(matches!(e, CustodianError::ColdStartNotApproved { generation: 2 }), "{e}");
    assert!(e.to_string().contains("--cold-start"), "{e}");
    let e = custodian_on(&flipped(&body), [6; 32], false).expect_err("rewritten");
    assert!(matches!(e, CustodianError::KreBinding(_)), "{e}");
    common::unseal_with(&y, &scalars[..2], &expect(true), c.crypto);
    assert_eq!(y.vault_phase(), Some(Phase::Serving), "a cold start serves at once");
}

/// A cluster grown from one KRE by a bundle: the parent withholds that bundle when it hands a
/// copy the stored state, so the copy decides, on its genesis policy of one member, to unseal
/// as a single KRE. Once the parent replays the policy up to the head the state recorded (it
/// must, for releases), the copy decides again on that policy, which names two members: it
/// waits for a serving member's confirmation and forwards nothing.
#[test]
fn a_plain_unseal_on_a_withheld_policy_waits_once_the_recorded_policy_names_members() {
    use keygate_attestation::bundle::PolicyBody;
    use keygate_attestation::crypto::P384Scalar;
    use keygate_attestation::mock::derive_key;
    use keygate_enclave::kre::Env;
    use keygate_enclave::wire::Message;

    let c = cluster();
    let scalars: Vec<P384Scalar> =
        (0..3u64).map(|i| p384_scalar_from(c.crypto, rng_from(100 + i)).expect("key").0).collect();
    // Genesis: one member, no activation delay; version 2 adds the joiner's instance.
    let g = PolicyBody { activation_delay: 0, members: vec![member("serving", "i-0serving")], ..genesis_body(&c) };
    let genesis = common::genesis_bundle(&g);
    let key = derive_key(b"member-approvers", "approver-1");
    let v2 = common::signed_bundle(&PolicyBody { members: c.members.clone(), ..common::next_body(&g) }, &key);
    let s = c.kre("i-0serving", &genesis);
    common::report(&s, Message::StateGenesis);
    common::sync_stored(&s);
    assert!(matches!(common::one(&s, Message::PolicyPush { bundle: v2.clone() }), Message::PolicyAccepted { .. }));
    let (generation, stored) = common::sync_stored(&s);
    assert_eq!(generation, 2, "the sealed state records version 2 (two members)");
    let (blob, shares, genesis_attestation) = stored.expect("stored");

    // The copy on the joiner's instance gets the state without version 2: a plain unseal.
    let x = c.kre("i-0joiner", &genesis);
    let load = Message::StateLoad { blob, shares, genesis_attestation, cold_start: false };
    assert_eq!(common::report(&x, load).phase, 2);
    let kre_pcrs = expectations(&pcrs(KRE_IMAGE));
    let expect = common::custodian_expects(&c.verifier, &kre_pcrs, false);
    common::unseal_with(&x, &scalars[..2], &expect, c.crypto);
    assert_eq!(x.vault_phase(), Some(Phase::Serving), "decided on the withheld policy");
    let mut r = rng_from(3);
    let mut env = Env { now_ms: T, rng: &mut r };
    let (_, req) = c.request(&kre_nsm("i-0serving", KRE_IMAGE), 5);
    let e = x.answer_join(&req, None, &mut env).expect_err("behind its recorded policy");
    assert!(matches!(e, JoinRefusal::PolicyStale(_)), "{e}");
    assert_eq!(x.vault_phase(), Some(Phase::Serving), "not decided again before the policy caught up");
    // The parent replays version 2: decided again, the copy waits and forwards nothing.
    assert!(matches!(common::one(&x, Message::PolicyPush { bundle: v2 }), Message::PolicyAccepted { .. }));
    let e = x.answer_join(&req, None, &mut env).expect_err("confirming");
    assert!(matches!(e, JoinRefusal::NotServing(_)), "{e}");
    assert_eq!(x.vault_phase(), Some(Phase::Confirming));
}
