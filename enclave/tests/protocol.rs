//! The protocol core and the client core, driven frame by frame without I/O: every state,
//! every refusal, each asserting the exact denial code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::crypto::default_backend;
use keygate_attestation::mock::MockNsm;
use keygate_attestation::policy::{ClusterRule, ReleasePolicy};
use keygate_attestation::{AttestRequest, Nsm, Verifier};
use keygate_enclave::audit::{Receipt, ReceiptError};
use keygate_enclave::kre::{Connection, Env, Event, Kre, KreConfig, Step};
use keygate_enclave::peer::client::{self, AwaitChallenge, AwaitReleased, ClientError, FetchRequest, ReleasedKey};
use keygate_enclave::wire::{self, Channel, DenyCode, Id, Message};

mod common;
use common::{expectations, id, image, pcrs, rng, sha384, step_at as step, T};

const SEED: &[u8] = b"protocol-test";

fn kre_pcrs() -> BTreeMap<u8, Vec<u8>> {
    pcrs(0x70)
}

fn policy() -> ReleasePolicy {
    ReleasePolicy {
        clusters: BTreeMap::from([
            ("prod".into(), ClusterRule { images: vec![image("cp-good", 0x10)], ..Default::default() }),
            ("stage".into(), ClusterRule { images: vec![image("cp-stage", 0x20)], ..Default::default() }),
        ]),
        allow_debug: false,
    }
}

fn kre_with(config: KreConfig) -> Kre {
    let nsm = MockNsm::new(SEED, kre_pcrs(), Arc::new(|| T)).with_instance("kre");
    let verifier = Verifier::new(nsm.root_anchor());
    Kre::new(config, verifier, policy(), Arc::new(nsm)).expect("kre")
}

fn kre() -> Kre {
    kre_with(KreConfig::default())
}

fn cpi(pcr_byte: u8) -> MockNsm {
    MockNsm::new(SEED, pcrs(pcr_byte), Arc::new(|| T)).with_instance("cpi")
}

fn request(cluster: &str) -> FetchRequest {
    FetchRequest {
        cluster: id(cluster),
        key_ids: vec![id("etcd-kek"), id("secrets")],
        expect_kre_pcrs: expectations(&kre_pcrs()),
        also_accept_kre: vec![],
    }
}

/// A client's Hello on a new release connection: the client, the Hello frame, the connection
/// and the KRE's answer to the Hello.
fn hello(kre: &Kre, req: FetchRequest, r: &mut dyn FnMut(&mut [u8])) -> (AwaitChallenge, Vec<u8>, Connection, Step) {
    let (c, hello) = client::start(req, r).expect("hello");
    let mut conn = Connection::new(Channel::Release);
    let s = step(&mut conn, kre, &hello, T);
    (c, hello, conn, s)
}

/// The server nonce and KRE attestation of a step that answered with a Challenge.
fn challenge_of(s: &Step) -> ([u8; 32], Vec<u8>) {
    let Message::Challenge { server_nonce, kre_attestation } = Message::decode(&s.reply[4..]).expect("challenge")
    else {
        panic!("no challenge")
    };
    (server_nonce, kre_attestation)
}

/// Runs Hello/Challenge and prepares the Release; returns the connection and client state.
fn handshake(kre: &Kre, cpi: &MockNsm, req: FetchRequest) -> (Connection, AwaitReleased) {
    let mut r = rng();
    let (await_challenge, _, conn, s) = hello(kre, req, &mut r);
    assert_eq!(s.event, Event::ChallengeIssued);
    assert!(!s.close);
    let verifier = Verifier::new(cpi.root_anchor());
    let released = await_challenge
        .on_challenge(&s.reply[4..], &verifier, T, cpi, default_backend(), &mut r)
        .expect("challenge ok");
    (conn, released)
}

/// A good client's prod handshake whose Release the KRE answers at `T`: the client state, its
/// Release frame and the KRE's answer.
fn released(kre: &Kre) -> (AwaitReleased, Vec<u8>, Step) {
    let (mut conn, rel) = handshake(kre, &cpi(0x10), request("prod"));
    let frame = rel.release_frame.clone();
    let s = step(&mut conn, kre, &frame, T);
    (rel, frame, s)
}

fn fetch(kre: &Kre, cpi: &MockNsm, req: FetchRequest) -> Result<Vec<ReleasedKey>, ClientError> {
    let (mut conn, await_released) = handshake(kre, cpi, req);
    let frame = await_released.release_frame.clone();
    let s = step(&mut conn, kre, &frame, T + 10);
    assert!(s.close);
    await_released.on_released(&s.reply[4..], default_backend()).map(|r| r.keys)
}

/// A well-formed receipt that no KRE signed (for frames that never reach a signature check).
fn dummy_receipt() -> Receipt {
    Receipt::assemble([6; 48], 3, [7; 48], [8; 48], [4; 97], [9; 96]).expect("receipt")
}

fn denial(s: &Step) -> (DenyCode, String) {
    match Message::decode(&s.reply[4..]).expect("frame") {
        Message::Denied { code, reason } => {
            assert!(s.close, "a denial closes the connection");
            (code, reason)
        }
        m => panic!("expected Denied, got {m:?}"),
    }
}

#[test]
fn allowed_image_gets_keys_and_the_same_keys_every_boot() {
    let kre = kre();
    let a = fetch(&kre, &cpi(0x10), request("prod")).expect("released");
    let b = fetch(&kre, &cpi(0x10), request("prod")).expect("released again");
    assert_eq!(a.len(), 2);
    assert_eq!(a, b, "same keys on a second boot");
    assert_eq!((a[0].key_id.as_str(), a[0].version), ("etcd-kek", 1));
    assert_ne!(a[0].key, a[1].key);
    assert_eq!(kre.live_challenges(), 0, "challenges are consumed");
}

#[test]
fn keys_differ_per_cluster() {
    let kre = kre();
    let prod = fetch(&kre, &cpi(0x10), request("prod")).expect("prod");
    let stage = fetch(&kre, &cpi(0x20), request("stage")).expect("stage");
    assert_ne!(prod[0].key, stage[0].key);
}

fn denied(kre: &Kre, cpi: &MockNsm, req: FetchRequest) -> (DenyCode, String) {
    match fetch(kre, cpi, req) {
        Err(ClientError::Denied { code, reason }) => (code, reason),
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn wrong_pcr0_is_refused_naming_the_pcr() {
    let mut p = pcrs(0x10);
    p.insert(0, vec![0x99; 48]);
    let cpi = MockNsm::new(SEED, p, Arc::new(|| T)).with_instance("cpi");
    let (code, reason) = denied(&kre(), &cpi, request("prod"));
    assert_eq!(code, DenyCode::ImageNotAllowed);
    assert!(reason.contains("PCR0"), "{reason}");
}

#[test]
fn image_of_another_cluster_is_refused() {
    assert_eq!(denied(&kre(), &cpi(0x20), request("prod")).0, DenyCode::ImageNotAllowed);
}

#[test]
fn unknown_cluster_is_refused() {
    assert_eq!(denied(&kre(), &cpi(0x10), request("nope")).0, DenyCode::UnknownCluster);
}

#[test]
fn debug_mode_is_refused() {
    let debug = MockNsm::new(SEED, BTreeMap::new(), Arc::new(|| T)).with_instance("cpi");
    assert_eq!(denied(&kre(), &debug, request("prod")).0, DenyCode::DebugMode);
}

#[test]
fn foreign_pki_is_refused() {
    let foreign = MockNsm::new(b"another-pki", pcrs(0x10), Arc::new(|| T));
    let kre = kre();
    let mut r = rng();
    let (c, _, mut conn, s) = hello(&kre, request("prod"), &mut r);
    // The client trusts the real (test) PKI for the KRE but attests with a foreign one.
    let kre_verifier = Verifier::new(cpi(0x10).root_anchor());
    let rel = c.on_challenge(&s.reply[4..], &kre_verifier, T, &foreign, default_backend(), &mut r).expect("release");
    let s = step(&mut conn, &kre, &rel.release_frame, T);
    let (code, reason) = denial(&s);
    assert_eq!(code, DenyCode::AttestationInvalid);
    assert!(reason.contains("pinned root"), "{reason}");
}

#[test]
fn replayed_release_is_refused_as_a_replay() {
    let kre = kre();
    let (rel, captured, s) = released(&kre);
    rel.on_released(&s.reply[4..], default_backend()).expect("first release works");
    // A new connection, a new challenge, the old Release.
    let (_, _, mut conn2, _) = hello(&kre, request("prod"), &mut rng());
    let (code, _) = denial(&step(&mut conn2, &kre, &captured, T + 20));
    assert_eq!(code, DenyCode::NonceReused);
}

#[test]
fn release_with_another_connections_challenge_is_refused() {
    let kre = kre();
    let (_conn_a, rel_a) = handshake(&kre, &cpi(0x10), request("prod"));
    let (_, _, mut conn_b, _) = hello(&kre, request("prod"), &mut rng());
    let (code, _) = denial(&step(&mut conn_b, &kre, &rel_a.release_frame, T));
    assert_eq!(code, DenyCode::NonceMismatch);
}

#[test]
fn expired_challenge_is_refused() {
    let kre = kre_with(KreConfig { challenge_ttl: Duration::from_secs(5), ..KreConfig::default() });
    let (mut conn, rel) = handshake(&kre, &cpi(0x10), request("prod"));
    let (code, _) = denial(&step(&mut conn, &kre, &rel.release_frame, T + 5_001));
    assert_eq!(code, DenyCode::ChallengeExpired);
}

#[test]
fn tampered_request_is_refused() {
    // The attestation binds cluster "prod"; the frame asks for "stage".
    let kre = kre();
    let (mut conn, rel) = handshake(&kre, &cpi(0x10), request("prod"));
    let Message::Release { key_ids, attestation, .. } = Message::decode(&rel.release_frame[4..]).expect("release")
    else {
        panic!("not a release")
    };
    let tampered = Message::Release { cluster_id: id("stage"), key_ids, attestation }.encode().expect("encode");
    let (code, _) = denial(&step(&mut conn, &kre, &tampered, T));
    assert_eq!(code, DenyCode::UserDataMismatch);

    // Dropping a key id changes the digest too.
    let (mut conn, rel) = handshake(&kre, &cpi(0x10), request("prod"));
    let Message::Release { cluster_id, attestation, .. } = Message::decode(&rel.release_frame[4..]).expect("release")
    else {
        panic!("not a release")
    };
    let tampered =
        Message::Release { cluster_id, key_ids: vec![id("etcd-kek")], attestation }.encode().expect("encode");
    assert_eq!(denial(&step(&mut conn, &kre, &tampered, T)).0, DenyCode::UserDataMismatch);
}

/// A Release whose attestation the test builds by hand.
fn manual_release(kre: &Kre, cpi: &MockNsm, make: impl FnOnce([u8; 32]) -> AttestRequest) -> Step {
    let (_, _, mut conn, s) = hello(kre, request("prod"), &mut rng());
    let (server_nonce, _) = challenge_of(&s);
    let doc = cpi.attest(&make(server_nonce)).expect("attest");
    let req = request("prod");
    let frame =
        Message::Release { cluster_id: req.cluster, key_ids: req.key_ids, attestation: doc }.encode().expect("encode");
    step(&mut conn, kre, &frame, T)
}

/// A release whose attestation carries the challenge's nonce and the given user data and key.
fn attested_release(kre: &Kre, user_data: Option<Vec<u8>>, public_key: Option<Vec<u8>>) -> Step {
    manual_release(kre, &cpi(0x10), |n| AttestRequest { nonce: Some(n.to_vec()), user_data, public_key })
}

fn valid_point() -> Vec<u8> {
    keygate_attestation::mock::public_point(&keygate_attestation::mock::derive_key(b"k", "client"))
}

#[test]
fn wrong_user_data_is_refused() {
    let kre = kre();
    let s = attested_release(&kre, Some(vec![0; 48]), Some(valid_point()));
    assert_eq!(denial(&s).0, DenyCode::UserDataMismatch);
}

#[test]
fn missing_or_invalid_public_key_is_refused() {
    let kre = kre();
    let digest = wire::request_digest(&id("prod"), &request("prod").key_ids).to_vec();
    let s = attested_release(&kre, Some(digest.clone()), None);
    assert_eq!(denial(&s).0, DenyCode::PublicKeyInvalid);
    let mut off_curve = valid_point();
    off_curve[50] ^= 1;
    let s = attested_release(&kre, Some(digest.clone()), Some(off_curve));
    assert_eq!(denial(&s).0, DenyCode::PublicKeyInvalid);
    let s = attested_release(&kre, Some(digest.clone()), Some(vec![0x04; 32]));
    assert_eq!(denial(&s).0, DenyCode::PublicKeyInvalid);
}

#[test]
fn attestation_without_the_nonce_is_refused() {
    let kre = kre();
    let digest = wire::request_digest(&id("prod"), &request("prod").key_ids).to_vec();
    let s = manual_release(&kre, &cpi(0x10), |_| AttestRequest {
        nonce: None,
        user_data: Some(digest.clone()),
        public_key: Some(valid_point()),
    });
    assert_eq!(denial(&s).0, DenyCode::NonceMismatch);
}

#[test]
fn state_machine_refuses_out_of_order_and_malformed_frames() {
    let kre = kre();
    let release = Message::Release { cluster_id: id("prod"), key_ids: vec![id("k")], attestation: vec![1] }
        .encode()
        .expect("enc");
    let hello = Message::Hello { client_nonce: [1; 32] }.encode().expect("enc");

    // Release before Hello.
    let mut c = Connection::new(Channel::Release);
    assert_eq!(denial(&step(&mut c, &kre, &release, T)).0, DenyCode::UnexpectedMessage);
    assert!(c.is_done());
    // Anything after the connection finished.
    assert_eq!(denial(&step(&mut c, &kre, &hello, T)).0, DenyCode::UnexpectedMessage);
    // Hello twice.
    let mut c = Connection::new(Channel::Release);
    step(&mut c, &kre, &hello, T);
    assert_eq!(kre.live_challenges(), 1);
    assert_eq!(denial(&step(&mut c, &kre, &hello, T)).0, DenyCode::UnexpectedMessage);
    assert_eq!(kre.live_challenges(), 0, "an abandoned challenge is forgotten");
    // Server messages from a client.
    for m in [
        Message::Challenge { server_nonce: [0; 32], kre_attestation: vec![] },
        Message::Denied { code: DenyCode::Busy, reason: String::new() },
        Message::Released { ephemeral_point: [4; 97], keys: vec![], receipt: Box::new(dummy_receipt()) },
    ] {
        let mut c = Connection::new(Channel::Release);
        assert_eq!(denial(&step(&mut c, &kre, &m.encode().expect("enc"), T)).0, DenyCode::UnexpectedMessage);
    }
    // Malformed bodies and versions; invalid ids and key counts.
    for (body, code) in [
        (vec![1u8, 3, 1, b'/', 1, 1, b'k', 0, 0], DenyCode::InvalidRequest),
        (vec![1u8, 3, 1, b'c', 0, 0, 0], DenyCode::InvalidRequest),
        (vec![1u8, 3, 1, b'c', 2, 1, b'k', 1, b'k', 0, 0], DenyCode::InvalidRequest),
        (vec![1u8, 1, 0], DenyCode::Malformed),
        (vec![1u8, 77], DenyCode::Malformed),
        (vec![2u8, 1], DenyCode::UnsupportedVersion),
        (vec![1u8], DenyCode::Malformed),
    ] {
        // Release bodies are read only once a challenge is out.
        let mut c = match body.get(1) {
            Some(3) => handshake(&kre, &cpi(0x10), request("prod")).0,
            _ => Connection::new(Channel::Release),
        };
        let mut frame = u32::try_from(body.len()).expect("len").to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert_eq!(denial(&step(&mut c, &kre, &frame, T)).0, code, "{body:?}");
    }
}

#[test]
fn full_challenge_table_answers_busy() {
    let kre = kre_with(KreConfig { max_challenges: 2, ..KreConfig::default() });
    let hello = Message::Hello { client_nonce: [1; 32] }.encode().expect("enc");
    let mut conns: Vec<Connection> = (0..3).map(|_| Connection::new(Channel::Release)).collect();
    assert_eq!(step(&mut conns[0], &kre, &hello, T).event, Event::ChallengeIssued);
    assert_eq!(step(&mut conns[1], &kre, &hello, T).event, Event::ChallengeIssued);
    assert_eq!(denial(&step(&mut conns[2], &kre, &hello, T)).0, DenyCode::Busy);
    // Abandoning a connection frees its slot.
    conns[0].abandon(&kre);
    let mut c = Connection::new(Channel::Release);
    assert_eq!(step(&mut c, &kre, &hello, T).event, Event::ChallengeIssued);
}

#[test]
fn client_refuses_a_kre_with_unexpected_pcrs() {
    let kre = kre();
    let mut req = request("prod");
    req.expect_kre_pcrs = expectations(&pcrs(0x71));
    let mut r = rng();
    let (c, _, _, s) = hello(&kre, req, &mut r);
    let cpi = cpi(0x10);
    let err = c
        .on_challenge(&s.reply[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r)
        .expect_err("refuse");
    assert!(matches!(err, ClientError::KrePcr(ref m) if m.index == 0), "{err}");
}

/// During a KRE upgrade a client accepts the old image and the new: a KRE matching any one
/// accepted image entirely passes; one matching none is refused with the first image's mismatch.
#[test]
fn client_accepts_any_one_of_its_kre_images_and_nothing_else() {
    let kre = kre();
    let cpi = cpi(0x10);
    let check = |primary: Vec<_>, also: Vec<Vec<_>>| {
        let mut req = request("prod");
        req.expect_kre_pcrs = primary;
        req.also_accept_kre = also;
        let mut r = rng();
        let (c, _, _, s) = hello(&kre, req, &mut r);
        c.on_challenge(&s.reply[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r).map(|_| ())
    };
    let (other, this) = (expectations(&pcrs(0x71)), expectations(&kre_pcrs()));
    assert_eq!(check(other.clone(), vec![this.clone()]), Ok(()), "the new image accepted beside the old");
    assert_eq!(check(this.clone(), vec![other.clone()]), Ok(()));
    let err = check(other.clone(), vec![expectations(&pcrs(0x72))]).expect_err("neither image");
    assert!(matches!(err, ClientError::KrePcr(ref m) if m.expected == hex::encode([0x71; 48])), "{err}");
    // An image is all of its PCRs: this KRE's PCR0 with another image's PCR1 is no image.
    let mut mixed = this.clone();
    mixed[1] = other[1].clone();
    assert!(matches!(check(other, vec![mixed]), Err(ClientError::KrePcr(_))));
}

#[test]
fn client_refuses_a_challenge_not_bound_to_the_kre_attestation() {
    let kre = kre();
    let mut r = rng();
    let (c, _, _, s) = hello(&kre, request("prod"), &mut r);
    let (mut server_nonce, kre_attestation) = challenge_of(&s);
    server_nonce[0] ^= 1; // a man in the middle substitutes the server nonce
    let forged = Message::Challenge { server_nonce, kre_attestation }.encode().expect("enc");
    let cpi = cpi(0x10);
    let err = c
        .on_challenge(&forged[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r)
        .expect_err("refuse");
    assert_eq!(err, ClientError::KreBinding("its user_data does not bind the challenge"));

    // A KRE document carrying another Hello's nonce.
    let (c, _) = client::start(request("prod"), &mut r).expect("hello");
    let err = c
        .on_challenge(&s.reply[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r)
        .expect_err("refuse");
    assert_eq!(err, ClientError::KreBinding("its nonce is not our Hello nonce"));
}

#[test]
fn client_refuses_tampered_released_keys() {
    let kre = kre();
    let (rel, _, s) = released(&kre);
    let Message::Released { ephemeral_point, mut keys, receipt } = Message::decode(&s.reply[4..]).expect("released")
    else {
        panic!("not released")
    };
    keys[1].sealed[0] ^= 1;
    let tampered = Message::Released { ephemeral_point, keys, receipt }.encode().expect("enc");
    assert!(matches!(rel.on_released(&tampered[4..], default_backend()), Err(ClientError::Unwrap(_))));
}

#[test]
fn denial_reasons_never_contain_key_material() {
    let kre = kre();
    let good = fetch(&kre, &cpi(0x10), request("prod")).expect("keys");
    let (_, reason) = denied(&kre, &cpi(0x20), request("prod"));
    for k in &good {
        assert!(!reason.contains(&hex::encode(k.key.expose())));
    }
}

/// Pulls one audit batch after `after`: (entries, checkpoint).
fn pull(kre: &Kre, after: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let frame = Message::AuditPull { after_seq: after, max: 1024 }.encode().expect("encode");
    let s = step(&mut Connection::new(Channel::Parent), kre, &frame, T);
    assert!(s.reply.len() <= 4 + wire::MAX_FRAME, "a batch fits one frame");
    match Message::decode(&s.reply[4..]).expect("reply") {
        Message::AuditBatch { entries, checkpoint } => (entries, checkpoint),
        other => panic!("expected AuditBatch, got {other:?}"),
    }
}

/// Appends audit entries until the entries (each framed with its 2-byte length) total exactly
/// `total` bytes; returns the sequence number of the last one.
fn fill_audit_to(kre: &Kre, total: usize) -> u64 {
    use keygate_enclave::audit::AuditEvent;
    let refused = |n: usize| AuditEvent::ChallengeRefused { code: "busy".into(), reason: "r".repeat(n) };
    let framed = |kre: &Kre| -> usize { kre.audit().entries_after(0, 4096).iter().map(|e| e.bytes().len() + 2).sum() };
    // The overhead of an entry is measured from one with an empty reason; the last entry's
    // reason makes up the difference.
    kre.audit().append(refused(0), T).expect("append");
    let overhead = kre.audit().entries_after(0, 4096).last().expect("entry").bytes().len() + 2;
    while total - framed(kre) > overhead + wire::MAX_REASON {
        let room = total - framed(kre) - 2 * overhead;
        kre.audit().append(refused(room.min(1000)), T).expect("append");
    }
    let last = refused(total - framed(kre) - overhead);
    kre.audit().append(last, T).expect("append");
    assert_eq!(framed(kre), total, "the test's own arithmetic");
    let seq = kre.audit().status().last_seq;
    for _ in 0..60 {
        kre.audit().append(refused(1000), T).expect("append");
    }
    seq
}

/// An audit batch carries at most 40 KiB of entries (room for the checkpoint in the 64 KiB
/// frame) — exactly 40 KiB is allowed, one byte more is not — and only the batch that
/// reaches the head of the chain carries a checkpoint.
#[test]
fn audit_batches_hold_at_most_40_kib_of_entries_and_only_the_head_batch_has_a_checkpoint() {
    use keygate_enclave::audit::AuditEntry;
    const BUDGET: usize = 40 * 1024;
    let seqs = |entries: &[Vec<u8>]| -> Vec<u64> {
        entries.iter().map(|e| AuditEntry::decode(e).expect("entry").seq()).collect()
    };
    let over = kre();
    let crossing = fill_audit_to(&over, BUDGET + 1);
    assert_eq!(seqs(&pull(&over, 0).0), (1..crossing).collect::<Vec<_>>(), "the entry crossing the budget waits");

    let kre = kre();
    let boundary = fill_audit_to(&kre, BUDGET);
    let head = kre.audit().status().last_seq;
    let (entries, checkpoint) = pull(&kre, 0);
    assert_eq!(seqs(&entries), (1..=boundary).collect::<Vec<_>>(), "exactly the entries that fill the budget");
    assert!(checkpoint.is_empty(), "not the head: no checkpoint");
    let mut after = boundary;
    let mut batches = 1;
    loop {
        let (entries, checkpoint) = pull(&kre, after);
        assert!(!entries.is_empty());
        assert!(entries.iter().map(|e| e.len() + 2).sum::<usize>() <= BUDGET);
        let first = AuditEntry::decode(&entries[0]).expect("entry").seq();
        assert_eq!(first, after + 1, "batches are contiguous");
        after = AuditEntry::decode(entries.last().expect("last")).expect("entry").seq();
        batches += 1;
        if after == head {
            assert!(!checkpoint.is_empty(), "the head batch carries a checkpoint");
            break;
        }
        assert!(checkpoint.is_empty());
        assert!(batches < 10, "no progress");
    }
    assert!(batches >= 3, "{batches}");
}

#[test]
fn a_connection_is_done_only_after_its_final_answer() {
    let kre = kre();
    assert!(!Connection::new(Channel::Release).is_done());
    let (mut conn, released) = handshake(&kre, &cpi(0x10), request("prod"));
    assert!(!conn.is_done(), "waiting for the Release");
    step(&mut conn, &kre, &released.release_frame, T);
    assert!(conn.is_done());
}

#[test]
fn env_debug_shows_the_time_not_the_rng_and_the_start_entry_has_the_wall_clock() {
    let mut r = rng();
    let env = Env { now_ms: 42, rng: &mut r };
    assert_eq!(format!("{env:?}"), "Env { now_ms: 42, .. }");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    let kre = kre();
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    let first = kre.audit().entries_after(0, 1).pop().expect("the start entry");
    let t = u128::from(first.time_ms());
    assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
}

/// The wrapping key of a Released is the one the KRE attested in this connection's
/// Challenge: the Challenge document's `public_key` is exactly the Released's point.
#[test]
fn the_released_point_is_the_one_the_challenge_attested() {
    let kre = kre();
    let cpi = cpi(0x10);
    let mut r = rng();
    let (c, _, mut conn, s) = hello(&kre, request("prod"), &mut r);
    let (_, kre_attestation) = challenge_of(&s);
    let verifier = Verifier::new(cpi.root_anchor());
    let attested = verifier.verify(&kre_attestation, &keygate_attestation::VerifyOptions::at(T)).expect("doc");
    let rel = c.on_challenge(&s.reply[4..], &verifier, T, &cpi, default_backend(), &mut r).expect("challenge ok");
    let frame = rel.release_frame.clone();
    let s = step(&mut conn, &kre, &frame, T);
    let Message::Released { ephemeral_point, .. } = Message::decode(&s.reply[4..]).expect("released") else {
        panic!("not released")
    };
    assert_eq!(attested.public_key(), Some(ephemeral_point.as_slice()));
    assert!(rel.on_released(&s.reply[4..], default_backend()).is_ok());
}

/// A relay that answers the Release itself — its own wrapping key, the transcript from what it
/// saw, the client's public key from the client's own document, keys of its choice — is
/// refused: the wrap is not under the attested point.
#[test]
fn client_refuses_a_released_from_anyone_but_the_attested_kre() {
    use keygate_enclave::crypto::keys::{self, Transcript, WrappingKey};
    let kre = kre();
    let cpi = cpi(0x10);
    let mut r = rng();
    let (c, hello, _, s) = hello(&kre, request("prod"), &mut r);
    let Message::Hello { client_nonce } = Message::decode(&hello[4..]).expect("hello") else { panic!("hello") };
    let (server_nonce, kre_attestation) = challenge_of(&s);
    let verifier = Verifier::new(cpi.root_anchor());
    let rel = c.on_challenge(&s.reply[4..], &verifier, T, &cpi, default_backend(), &mut r).expect("challenge ok");
    let Message::Release { cluster_id, key_ids, attestation } = Message::decode(&rel.release_frame[4..]).expect("rel")
    else {
        panic!("release")
    };
    let client_doc = verifier.verify(&attestation, &keygate_attestation::VerifyOptions::at(T)).expect("client doc");
    let t = Transcript {
        client_nonce,
        server_nonce,
        kre_attestation_sha384: sha384(&kre_attestation),
        client_attestation_sha384: sha384(&attestation),
        request_digest: wire::request_digest(&cluster_id, &key_ids),
    };
    let chosen: Vec<_> =
        key_ids.iter().map(|k| (k.clone(), 1, keygate_attestation::secret::Secret::new([0xa7; 32]))).collect();
    let relay_key = WrappingKey::generate(default_backend(), |b| b.fill(0x42)).expect("key");
    let (ephemeral_point, keys) =
        keys::wrap(default_backend(), &t, client_doc.public_key().expect("pk"), &chosen, relay_key).expect("wrap");
    let forged = Message::Released { ephemeral_point, keys, receipt: Box::new(dummy_receipt()) }.encode().expect("enc");
    assert_eq!(rel.on_released(&forged[4..], default_backend()), Err(ClientError::UnattestedWrap));
}

/// A KRE document without a usable wrapping key (none, or not a P-384 point) is refused
/// before the client attests itself.
#[test]
fn client_refuses_a_kre_document_without_a_wrapping_key() {
    let mut r = rng();
    let cpi = cpi(0x10);
    let kre_nsm = MockNsm::new(SEED, kre_pcrs(), Arc::new(|| T)).with_instance("kre");
    for public_key in [None, Some(vec![4u8; 97]), Some(valid_point()[..49].to_vec())] {
        let (c, hello) = client::start(request("prod"), &mut r).expect("hello");
        let Message::Hello { client_nonce } = Message::decode(&hello[4..]).expect("hello") else { panic!("hello") };
        let server_nonce = [9u8; 32];
        let doc = kre_nsm
            .attest(&AttestRequest {
                nonce: Some(client_nonce.to_vec()),
                user_data: Some(keygate_enclave::kre::kre_user_data(&server_nonce).to_vec()),
                public_key,
            })
            .expect("attest");
        let challenge = Message::Challenge { server_nonce, kre_attestation: doc }.encode().expect("enc");
        let err = c
            .on_challenge(&challenge[4..], &Verifier::new(cpi.root_anchor()), T, &cpi, default_backend(), &mut r)
            .expect_err("refused");
        assert_eq!(err, ClientError::KreBinding("its public_key is not a P-384 wrapping key"));
    }
}

/// Each request frame is served only on its own channel's listener; on any other it is
/// refused `wrong_channel` before anything happens (an anonymous client of the release port
/// cannot ack audit entries away, commit or load state, or start an unseal or a reshare).
#[test]
fn every_request_is_served_only_on_its_own_channel() {
    let kre = kre();
    let id = |s: &str| Id::new(s).expect("id");
    let requests = [
        (Message::Hello { client_nonce: [1; 32] }, Channel::Release),
        (Message::Release { cluster_id: id("prod"), key_ids: vec![id("k")], attestation: vec![1] }, Channel::Release),
        (Message::PolicyPush { bundle: vec![1] }, Channel::Parent),
        (Message::AuditPull { after_seq: 0, max: 1 }, Channel::Parent),
        (Message::AuditAck { up_to_seq: 1 }, Channel::Parent),
        (Message::Status, Channel::Parent),
        (Message::StatePoll, Channel::Parent),
        (Message::StateGenesis, Channel::Parent),
        (
            Message::StateLoad { blob: vec![1], shares: vec![1], genesis_attestation: vec![1], cold_start: false },
            Channel::Parent,
        ),
        (Message::StateCommit { generation: 1, blob_sha384: [0; 48] }, Channel::Parent),
        (Message::UnsealHello { client_nonce: [1; 32] }, Channel::Custodian),
        (Message::UnsealShare { share: vec![0; wire::UNSEAL_SHARE_LEN] }, Channel::Custodian),
        (Message::ReshareStart { set: vec![1] }, Channel::Custodian),
    ];
    for (m, home) in requests {
        assert_eq!(m.channel(), Some(home), "{}", m.name());
        let frame = m.encode().expect("enc");
        for channel in Channel::ALL {
            let before = kre.audit().status();
            let s = step(&mut Connection::new(channel), &kre, &frame, T);
            let refused = Message::decode(&s.reply[4..])
                .ok()
                .and_then(|r| match r {
                    Message::Denied { code, .. } => Some(code),
                    _ => None,
                })
                .is_some_and(|c| c == DenyCode::WrongChannel);
            assert_eq!(refused, channel != home, "{} on the {channel} channel", m.name());
            if channel != home {
                assert!(s.close, "{} on {channel}", m.name());
                assert_eq!(kre.audit().status().acked_up_to, before.acked_up_to, "nothing acked");
            }
        }
    }
    // Frames only the KRE sends are no channel's requests.
    for m in [
        Message::StatusReport { json: String::new() },
        Message::Denied { code: DenyCode::Busy, reason: String::new() },
        Message::Released { ephemeral_point: [4; 97], keys: vec![], receipt: Box::new(dummy_receipt()) },
    ] {
        assert_eq!(m.channel(), None, "{}", m.name());
    }
}

/// The reader takes from each connection only the frame it waits for, with that type's cap:
/// a release-port client that has no challenge can make the KRE read at most a Hello. Any
/// other header is refused from its two bytes, with the same code and reason as the whole
/// frame would get.
#[test]
fn a_connection_admits_only_the_frame_it_waits_for() {
    use keygate_enclave::wire::ty;
    let kre = kre();
    let hello = wire::max_request_body(ty::HELLO);
    let fresh = |c| Connection::new(c);
    assert_eq!(fresh(Channel::Release).admit(wire::VERSION, ty::HELLO), hello);
    for t in [ty::RELEASE, ty::POLICY_PUSH, ty::STATE_LOAD, ty::RESHARE_START, ty::DENIED, 99] {
        assert_eq!(fresh(Channel::Release).admit(wire::VERSION, t), None, "type {t} before a challenge");
    }
    assert_eq!(fresh(Channel::Release).admit(2, ty::HELLO), None, "another version");
    let (conn, _) = handshake(&kre, &cpi(0x10), request("prod"));
    assert_eq!(conn.admit(wire::VERSION, ty::RELEASE), wire::max_request_body(ty::RELEASE));
    assert_eq!(conn.admit(wire::VERSION, ty::HELLO), None, "a second Hello");
    assert_eq!(fresh(Channel::Parent).admit(wire::VERSION, ty::POLICY_PUSH), Some(wire::MAX_FRAME));
    assert_eq!(fresh(Channel::Parent).admit(wire::VERSION, ty::HELLO), None);
    assert_eq!(fresh(Channel::Custodian).admit(wire::VERSION, ty::UNSEAL_SHARE), None, "a share before its offer");
    assert_eq!(fresh(Channel::Custodian).admit(wire::VERSION, ty::UNSEAL_HELLO), hello);
    // The refusal from the header alone is the refusal of the whole frame.
    let id = |s: &str| Id::new(s).expect("id");
    let frames = [
        Message::Hello { client_nonce: [1; 32] },
        Message::Release { cluster_id: id("prod"), key_ids: vec![id("k")], attestation: vec![1] },
        Message::PolicyPush { bundle: vec![1] },
        Message::StateCommit { generation: 1, blob_sha384: [0; 48] },
        Message::UnsealShare { share: vec![0; wire::UNSEAL_SHARE_LEN] },
        Message::Denied { code: DenyCode::Busy, reason: String::new() },
    ];
    for m in frames {
        let frame = m.encode().expect("enc");
        for channel in Channel::ALL {
            if fresh(channel).admit(frame[4], frame[5]).is_some() {
                continue;
            }
            let whole = denial(&step(&mut fresh(channel), &kre, &frame, T));
            let header = denial(&step(&mut fresh(channel), &kre, &frame[..6], T));
            assert_eq!(whole, header, "{} on {channel}", m.name());
        }
    }
}

/// A release connection with a challenge in flight that sends another channel's frame loses
/// its challenge (refused `wrong_channel`), as with any out-of-order frame.
#[test]
fn another_channels_frame_mid_handshake_ends_the_handshake() {
    let kre = kre();
    let (mut conn, rel) = handshake(&kre, &cpi(0x10), request("prod"));
    let live = kre.live_challenges();
    let s = step(&mut conn, &kre, &Message::AuditAck { up_to_seq: 1 }.encode().expect("enc"), T);
    assert_eq!(denial(&s).0, DenyCode::WrongChannel);
    assert_eq!(kre.live_challenges(), live - 1);
    let frame = rel.release_frame.clone();
    assert_eq!(denial(&step(&mut conn, &kre, &frame, T)).0, DenyCode::UnexpectedMessage);
}

/// The parent's follower waits in the KRE round after round (AuditWait): its rounds do not
/// write the anonymous aggregate early (or a flood would cost one entry a round), while a
/// one-shot AuditPull brings the trail up to date.
#[test]
fn follower_rounds_leave_the_anonymous_aggregate_to_its_period() {
    let kre = kre();
    let junk = vec![0u8, 0, 0, 3, 1, 99, 0];
    let anonymous = |kre: &Kre| {
        kre.audit()
            .entries_after(0, 1000)
            .iter()
            .filter(|e| matches!(e.event(), keygate_enclave::audit::AuditEvent::AnonymousRefusals { .. }))
            .count()
    };
    for round in 0..5u64 {
        step(&mut Connection::new(Channel::Release), &kre, &junk, T + round);
        let wait = Message::AuditWait { after_seq: 0, max: 1024, wait_ms: 0 }.encode().expect("enc");
        step(&mut Connection::new(Channel::Parent), &kre, &wait, T + round);
    }
    assert_eq!(anonymous(&kre), 0, "no aggregate before its period");
    pull(&kre, 0);
    assert_eq!(anonymous(&kre), 1, "a one-shot pull writes it");
}

/// A follower's rounds that reach the head get a checkpoint at most once per
/// `FOLLOWER_CHECKPOINT_EVERY_MS` while entries keep coming, and none when the head is already
/// covered; a one-shot pull always ends with one.
#[test]
fn a_follower_gets_a_checkpoint_at_most_once_a_second_and_a_one_shot_pull_always() {
    use keygate_enclave::audit::FOLLOWER_CHECKPOINT_EVERY_MS as EVERY;
    let kre = kre();
    let junk = vec![0u8, 0, 0, 3, 1, 99, 0];
    let follow = |after: u64, at: u64| -> (usize, bool) {
        let wait = Message::AuditWait { after_seq: after, max: 1024, wait_ms: 0 }.encode().expect("enc");
        let s = step(&mut Connection::new(Channel::Parent), &kre, &wait, at);
        match Message::decode(&s.reply[4..]).expect("reply") {
            Message::AuditBatch { entries, checkpoint } => (entries.len(), !checkpoint.is_empty()),
            other => panic!("expected AuditBatch, got {other:?}"),
        }
    };
    let head = |kre: &Kre| kre.audit().status().last_seq;
    // The first round at the head gets one.
    assert!(follow(0, T).1, "the first checkpoint at once");
    // A new entry a moment later: pulled, but no signature yet.
    step(&mut Connection::new(Channel::Release), &kre, &junk, T + 1);
    pull(&kre, 0); // a one-shot pull signs (and writes the anonymous aggregate)
    let covered = head(&kre);
    assert_eq!(follow(covered, T + 2), (0, false), "the head is covered: nothing to sign");
    kre.audit()
        .append(keygate_enclave::audit::AuditEvent::ChallengeRefused { code: "busy".into(), reason: "r".into() }, T + 3)
        .expect("append");
    assert_eq!(follow(covered, T + 4), (1, false), "too soon after the last checkpoint");
    assert_eq!(follow(covered, T + 3 + EVERY), (1, true), "a second later, the moved head is signed");
    let (_, cp) = pull(&kre, head(&kre));
    assert!(!cp.is_empty(), "a one-shot pull always ends with a checkpoint");
}

/// A peer that completes a Hello but never shows a valid document is as anonymous as junk:
/// 200 Releases with documents that fail verification, and 200 Release frames that never
/// arrive (timed out or refused `busy`), take no entry of their own from a 64-entry buffer
/// and are counted in the aggregate by deny code.
#[test]
fn unverified_releases_are_counted_with_the_anonymous_refusals() {
    use keygate_enclave::audit::{AuditConfig, AuditEntry, AuditEvent};
    let kre = kre_with(KreConfig {
        audit: AuditConfig { capacity: 64, reserve: 8, ..AuditConfig::default() },
        ..KreConfig::default()
    });
    let hello = Message::Hello { client_nonce: [1; 32] }.encode().expect("enc");
    let bad = Message::Release { cluster_id: id("prod"), key_ids: vec![id("etcd")], attestation: vec![0xa0; 64] }
        .encode()
        .expect("enc");
    let before = kre.audit().status().last_seq;
    for i in 0..400u64 {
        let mut c = Connection::new(Channel::Release);
        step(&mut c, &kre, &hello, T + i);
        let code = if i % 2 == 0 {
            denial(&step(&mut c, &kre, &bad, T + i)).0
        } else {
            denial(&c.deny(&kre, wire::Unreadable::Timeout, T + i)).0
        };
        assert!(matches!(code, DenyCode::AttestationInvalid | DenyCode::Timeout), "{code:?}");
    }
    assert_eq!(kre.audit().status().last_seq, before, "no entry of their own");
    assert!(fetch(&kre, &cpi(0x10), request("prod")).is_ok(), "a release after the flood");
    let (entries, _) = pull(&kre, 0);
    let counts: Vec<(String, u64)> = entries
        .iter()
        .filter_map(|b| AuditEntry::decode(b).ok())
        .filter_map(|e| match e.event() {
            AuditEvent::AnonymousRefusals { counts, .. } => Some(counts.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(counts.contains(&("attestation_invalid".to_owned(), 200)), "{counts:?}");
    assert!(counts.contains(&("timeout".to_owned(), 200)), "{counts:?}");
}

/// Anonymous junk (malformed frames, foreign frames, refused Hellos) is counted, not logged
/// one entry per frame: 10,000 of them leave a 64-entry audit buffer able to record releases,
/// and the counts reach the trail as one aggregate entry at the next pull.
#[test]
fn anonymous_junk_cannot_fill_the_audit_buffer_or_starve_releases() {
    use keygate_enclave::audit::{AuditConfig, AuditEvent};
    let kre = kre_with(KreConfig {
        audit: AuditConfig { capacity: 64, reserve: 8, ..AuditConfig::default() },
        ..KreConfig::default()
    });
    let junk = [vec![0u8, 0, 0, 3, 1, 99, 0], Message::AuditAck { up_to_seq: 1 }.encode().expect("enc")];
    for i in 0..10_000 {
        let frame = &junk[i % 2];
        let s = step(&mut Connection::new(Channel::Release), &kre, frame, T + u64::try_from(i).expect("i"));
        assert!(matches!(denial(&s).0, DenyCode::Malformed | DenyCode::WrongChannel));
    }
    assert!(!kre.audit().is_full(), "{:?}", kre.audit().status());
    assert!(fetch(&kre, &cpi(0x10), request("prod")).is_ok(), "a release after the flood");
    let (entries, _) = pull(&kre, 0);
    let aggregates: Vec<AuditEvent> = entries
        .iter()
        .filter_map(|b| keygate_enclave::audit::AuditEntry::decode(b).ok())
        .map(|e| e.event().clone())
        .filter(|e| matches!(e, AuditEvent::AnonymousRefusals { .. }))
        .collect();
    let total: u64 = aggregates
        .iter()
        .map(|e| match e {
            AuditEvent::AnonymousRefusals { counts, .. } => counts.iter().map(|(_, n)| n).sum::<u64>(),
            _ => 0,
        })
        .sum();
    assert_eq!(total, 10_000, "every refusal counted once: {aggregates:?}");
    assert!(aggregates.len() <= 2, "one entry per period: {}", aggregates.len());
}

/// A release's answer carries the receipt of its own audit entry: signed by the KRE's audit
/// key, naming the entry the KRE appended (its sequence number and digest) and the client's
/// attestation document, which the entry records as the requester's.
#[test]
fn a_released_carries_the_receipt_of_its_audit_entry() {
    let kre = kre();
    let (rel, frame, s) = released(&kre);
    let Message::Release { attestation, .. } = Message::decode(&frame[4..]).expect("release") else {
        panic!("release")
    };
    let got = rel.on_released(&s.reply[4..], default_backend()).expect("released");
    let r = &got.receipt;
    let log = kre.audit();
    let head = log.status();
    assert_eq!((r.seq(), *r.entry_digest(), *r.chain_id()), (head.last_seq, head.head, head.chain_id));
    assert_eq!(r.public_key(), log.signer().public_key());
    let doc = sha384(&attestation);
    assert_eq!(*r.document_sha384(), doc);
    let entry = log.entries_after(r.seq() - 1, 1).pop().expect("the entry");
    match entry.event() {
        keygate_enclave::audit::AuditEvent::ReleaseAllowed { requester, .. } => {
            assert_eq!(requester.document_sha384, doc)
        }
        other => panic!("the receipt names {other:?}"),
    }
    assert_eq!(r.verify(default_backend()), Ok(()));
}

/// The genuine Released with its receipt replaced: the receipt of another release (a valid
/// signature, another client document), a receipt with its sequence number changed (the
/// signature fails), one signed by a key of the relay's own for this very client (its
/// signature holds, but the wraps bind the KRE's receipt), or no receipt at all. Each is an
/// attack, refused before any key is returned.
#[test]
fn client_refuses_a_released_whose_receipt_is_forged_or_another_releases() {
    use keygate_enclave::audit::AuditSigner;
    let kre = kre();
    let cpi = cpi(0x10);
    let answer = |kre: &Kre| {
        let (mut conn, rel) = handshake(kre, &cpi, request("prod"));
        let frame = rel.release_frame.clone();
        let s = step(&mut conn, kre, &frame, T);
        let Message::Released { ephemeral_point, keys, receipt } = Message::decode(&s.reply[4..]).expect("released")
        else {
            panic!("not released")
        };
        (rel, ephemeral_point, keys, receipt)
    };
    let (first, p, k, earlier) = answer(&kre);
    let genuine = Message::Released { ephemeral_point: p, keys: k, receipt: earlier.clone() };
    let earlier_document = *earlier.document_sha384();
    assert!(first.on_released(&genuine.encode().expect("enc")[4..], default_backend()).is_ok());

    let relay_signer = AuditSigner::generate(default_backend(), |b| b.fill(0x42)).expect("relay key");
    for case in ["another release's", "seq changed", "relay-signed", "absent"] {
        let (rel, ephemeral_point, keys, receipt) = answer(&kre);
        assert_ne!(*receipt.document_sha384(), earlier_document);
        let swapped = match case {
            "another release's" => (*earlier).clone(),
            "seq changed" => Receipt::assemble(
                *receipt.chain_id(),
                receipt.seq() + 1,
                *receipt.entry_digest(),
                *receipt.document_sha384(),
                *receipt.public_key(),
                *receipt.signature(),
            )
            .expect("assemble"),
            _ => relay_signer
                .sign_receipt(receipt.seq(), *receipt.entry_digest(), *receipt.document_sha384())
                .expect("relay signs"),
        };
        let mut frame = Message::Released { ephemeral_point, keys, receipt: Box::new(swapped) }.encode().expect("enc");
        if case == "absent" {
            frame.truncate(frame.len() - keygate_enclave::audit::RECEIPT_LEN);
            let len = u32::try_from(frame.len() - 4).expect("len");
            frame[..4].copy_from_slice(&len.to_be_bytes());
        }
        let err = rel.on_released(&frame[4..], default_backend()).expect_err(case);
        let expected = match case {
            "another release's" => ClientError::Receipt(ReceiptError::OtherRelease),
            "seq changed" => ClientError::Receipt(ReceiptError::SignatureInvalid),
            "relay-signed" => ClientError::Unwrap(keygate_attestation::crypto::CryptoError::Decrypt),
            _ => ClientError::Wire(wire::WireError::Truncated),
        };
        assert_eq!(err, expected, "{case}");
        assert!(err.is_attack() && !err.is_retryable() && !err.is_refusal(), "{case}");
    }
}
