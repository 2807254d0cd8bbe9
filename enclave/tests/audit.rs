//! The audit trail under attack: every way the parent (or anyone holding the stored trail)
//! could delete, reorder, edit, truncate, splice or forge is detected, each with its own
//! error; a full buffer refuses appends (fail closed); the parent's store refuses to append
//! anything that does not continue the chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use keygate_attestation::crypto::{all_backends, default_backend};
use keygate_attestation::mock::MockNsm;
use keygate_attestation::{DocumentKind, Nsm, PcrExpectation, TrustAnchor, Verifier, VerifyError};
use keygate_enclave::audit::store::{self, StoreError};
use keygate_enclave::audit::{
    check_receipt, verify_trail, verify_trail_with, AuditConfig, AuditEntry, AuditError, AuditEvent, AuditLog,
    AuditSigner, Checkpoint, NotAttested, Receipt, ReceiptError, Requester, TrailError, TrailOptions,
    CHECKPOINT_DOMAIN, SIGNED_BODY_LEN,
};

mod common;
use common::{expectations, id, pcrs, T};

const SEED: &[u8] = b"audit-test";

fn expect_kre() -> Vec<PcrExpectation> {
    expectations(&pcrs(0x70))
}

fn nsm(instance: &str, pcr_byte: u8) -> MockNsm {
    MockNsm::new(SEED, pcrs(pcr_byte), Arc::new(|| T)).with_instance(instance)
}

fn requester(n: u8) -> Requester {
    Requester {
        module_id: format!("i-cpi-{n}"),
        kind: DocumentKind::Enclave,
        pcrs: pcrs(0x10),
        document_sha384: [n; 48],
    }
}

/// One event of each interesting kind, in a plausible order.
fn event(i: u64) -> AuditEvent {
    let n = u8::try_from(i % 250).expect("small");
    match i % 5 {
        0 => AuditEvent::ReleaseAllowed {
            requester: requester(n),
            cluster: id("prod"),
            keys: vec![(id("etcd-kek"), 1)],
            image: "cp-good".into(),
        },
        1 => AuditEvent::ReleaseDenied {
            code: "image_not_allowed".into(),
            reason: "PCR0 does not match any image of cluster prod".into(),
            requester: Some(requester(n)),
            cluster: Some(id("prod")),
            key_ids: vec![id("etcd-kek")],
        },
        2 => AuditEvent::ChallengeRefused { code: "busy".into(), reason: "challenge table full".into() },
        3 => AuditEvent::PolicyAccepted { version: i, digest: [n; 48], activates_at_ms: T + i },
        _ => AuditEvent::KekRotated { cluster: id("prod"), new_version: u32::try_from(i).expect("small") },
    }
}

struct Kre {
    log: AuditLog,
    root: TrustAnchor,
}

fn start(instance: &str, pcr_byte: u8) -> Kre {
    let nsm = nsm(instance, pcr_byte);
    let signer = AuditSigner::start(&nsm, default_backend()).expect("signer");
    let mut log = AuditLog::new(AuditConfig::default(), signer);
    log.append(
        AuditEvent::KreStarted { nsm_kind: nsm.kind().into(), pcrs: nsm.pcrs().clone(), software: "test".into() },
        T,
    )
    .expect("start entry");
    Kre { log, root: nsm.root_anchor() }
}

/// A KRE run of `n` entries (KreStarted + n-1 events), a checkpoint after every 4th entry
/// and one at the end.
fn trail_of(instance: &str, n: u64) -> (Vec<AuditEntry>, Vec<Checkpoint>, TrustAnchor) {
    let mut kre = start(instance, 0x70);
    let mut cps = Vec::new();
    for i in 2..=n {
        assert_eq!(kre.log.append(event(i), T + i), Ok(i));
        if i % 4 == 0 {
            cps.push(kre.log.checkpoint(T + i).expect("checkpoint"));
        }
    }
    if n % 4 != 0 {
        cps.push(kre.log.checkpoint(T + n + 1).expect("checkpoint"));
    }
    (kre.log.entries_after(0, usize::MAX), cps, kre.root)
}

fn verify(entries: &[AuditEntry], cps: &[Checkpoint], root: &TrustAnchor) -> Result<u64, TrailError> {
    verify_trail(entries, cps, &Verifier::new(root.clone()), &expect_kre()).map(|s| s.last_seq)
}

#[test]
fn an_intact_trail_verifies_on_every_backend() {
    let (entries, cps, root) = trail_of("kre", 10);
    assert_eq!(entries.len(), 10);
    for c in all_backends() {
        let s = verify_trail(&entries, &cps, &Verifier::with_crypto(root.clone(), c), &expect_kre()).expect("verifies");
        assert_eq!((s.last_seq, s.signed_up_to, s.unsigned_tail, s.checkpoints), (10, 10, 0, 3), "{}", c.name());
        assert_eq!(s.kre_pcrs.get(&0), Some(&vec![0x70; 48]));
        assert!(s.pcrs_pinned);
        assert_eq!(s.chain_id, *entries[0].chain_id());
        assert_eq!(s.time_range_ms, (T, T + 10));
    }
    // Entries after the last checkpoint are reported as an unsigned tail, not hidden.
    let s = verify_trail(&entries, &cps[..2], &Verifier::new(root.clone()), &[]).expect("verifies");
    assert_eq!((s.signed_up_to, s.unsigned_tail, s.pcrs_pinned), (8, 2, false));
}

#[test]
fn deleted_entries_are_detected() {
    let (mut entries, cps, root) = trail_of("kre", 10);
    let mut middle = entries.clone();
    middle.drain(3..5); // seq 4 and 5
    assert_eq!(
        verify(&middle, &cps, &root),
        Err(TrailError::EntryDeleted { after_seq: 3, missing_from: 4, missing_to: 5 })
    );
    entries.remove(0);
    assert_eq!(
        verify(&entries, &cps, &root),
        Err(TrailError::EntryDeleted { after_seq: 0, missing_from: 1, missing_to: 1 })
    );
}

#[test]
fn reordered_entries_are_detected() {
    let (mut entries, cps, root) = trail_of("kre", 10);
    entries.swap(3, 4);
    assert_eq!(verify(&entries, &cps, &root), Err(TrailError::EntryReordered { position: 3, seq: 5, expected: 4 }));
}

#[test]
fn duplicated_entries_are_detected() {
    let (mut entries, cps, root) = trail_of("kre", 10);
    entries.insert(5, entries[4].clone());
    assert_eq!(verify(&entries, &cps, &root), Err(TrailError::EntryDuplicated { seq: 5, identical: true }));
}

/// Re-encodes entry `i` with another event but the same links.
fn edited(e: &AuditEntry) -> AuditEntry {
    let ev = AuditEvent::ReleaseDenied {
        code: "image_not_allowed".into(),
        reason: "edited by the parent".into(),
        requester: None,
        cluster: None,
        key_ids: vec![],
    };
    AuditEntry::new(*e.chain_id(), e.seq(), *e.prev(), e.time_ms(), e.policy_version(), ev).expect("entry")
}

#[test]
fn edited_entries_are_detected() {
    let (entries, cps, root) = trail_of("kre", 10);
    // An entry in the middle: its successor's link breaks.
    let mut t = entries.clone();
    t[4] = edited(&t[4]);
    assert_eq!(verify(&t, &cps, &root), Err(TrailError::EntryModified { seq: 5 }));
    // A single flipped byte anywhere in an entry: the link breaks or it no longer decodes.
    for i in 0..entries[6].bytes().len() {
        let mut b = entries[6].bytes().to_vec();
        b[i] ^= 0x20;
        let Ok(e) = AuditEntry::decode(&b) else { continue };
        let mut t = entries.clone();
        t[6] = e;
        assert!(verify(&t, &cps, &root).is_err(), "flip at byte {i} undetected");
    }
    // The last entry (nothing links to it): the checkpoint over it catches the edit.
    let mut t = entries.clone();
    t[9] = edited(&t[9]);
    assert_eq!(verify(&t, &cps, &root), Err(TrailError::CheckpointHeadMismatch { index: 2, seq: 10 }));
}

#[test]
fn a_rewritten_chain_is_caught_by_the_checkpoint() {
    let (entries, cps, root) = trail_of("kre", 10);
    // Edit entry 2 and recompute every later link: internally consistent, but the signed
    // head at seq 4 no longer matches.
    let mut t = vec![entries[0].clone()];
    let mut prev = entries[0].digest();
    for (i, e) in entries.iter().enumerate().skip(1) {
        let ev = if i == 1 { edited(e).event().clone() } else { e.event().clone() };
        let n = AuditEntry::new(*e.chain_id(), e.seq(), prev, e.time_ms(), e.policy_version(), ev).expect("entry");
        prev = n.digest();
        t.push(n);
    }
    assert_eq!(verify(&t, &cps, &root), Err(TrailError::CheckpointHeadMismatch { index: 0, seq: 4 }));
}

#[test]
fn truncation_after_a_checkpoint_is_detected() {
    let (entries, cps, root) = trail_of("kre", 10);
    assert_eq!(
        verify(&entries[..7], &cps, &root),
        Err(TrailError::TruncatedAfterCheckpoint { index: 1, checkpoint_seq: 8, last_seq: 7 })
    );
    assert_eq!(verify(&entries, &[], &root), Err(TrailError::NoCheckpoint { entries: 10 }));
    assert_eq!(verify(&[], &cps, &root), Err(TrailError::Empty));
}

#[test]
fn entries_spliced_from_another_kre_are_detected() {
    let (mut entries, cps, root) = trail_of("kre", 10);
    let (other, other_cps, _) = trail_of("kre-b", 10);
    // Same image, same PKI, another KRE run: its entries carry its chain id.
    entries[5] = other[5].clone();
    assert!(matches!(verify(&entries, &cps, &root), Err(TrailError::ForeignEntry { position: 5, seq: 6, .. })));
    // Its (genuine, attested) checkpoint spliced into ours.
    let (entries, mut cps2, _) = trail_of("kre", 10);
    let _ = cps2.pop();
    cps2.push(other_cps[2].clone());
    let Err(TrailError::ForeignCheckpoint { index: 2, seq: 10, .. }) = verify(&entries, &cps2, &root) else {
        panic!("foreign checkpoint not detected")
    };
    // The other trail, whole, is a valid trail of its own KRE.
    assert_eq!(verify(&other, &other_cps, &root), Ok(10));
}

/// Signs `body` (a checkpoint's signed part) with an attacker's key.
fn attacker_sign(body: &[u8], key: &p384::ecdsa::SigningKey) -> [u8; 96] {
    use p384::ecdsa::signature::Signer;
    let sig: p384::ecdsa::Signature = key.sign(&[CHECKPOINT_DOMAIN, body].concat());
    sig.to_bytes()[..].try_into().expect("96 bytes")
}

fn attacker_key() -> (p384::ecdsa::SigningKey, [u8; 97]) {
    let key = p384::ecdsa::SigningKey::from_slice(&[0x42; 48]).expect("key");
    let point: [u8; 97] = key.verifying_key().to_encoded_point(false).as_bytes().try_into().expect("97");
    (key, point)
}

#[test]
fn checkpoints_forged_with_a_non_attested_key_are_detected() {
    let (entries, cps, root) = trail_of("kre", 10);
    let genuine = &cps[2];
    let (key, point) = attacker_key();

    // The attacker's key with our chain id and the genuine binding document.
    let body = &genuine.bytes()[..SIGNED_BODY_LEN];
    let forged = Checkpoint::assemble(
        *genuine.chain_id(),
        genuine.seq(),
        *genuine.head(),
        genuine.time_ms(),
        point,
        attacker_sign(body, &key),
        genuine.binding_document().to_vec(),
    )
    .expect("assemble");
    let mut t = cps.clone();
    t[2] = forged;
    assert_eq!(
        verify(&entries, &t, &root),
        Err(TrailError::CheckpointKeyNotAttested { index: 2, seq: 10, why: NotAttested::ChainIdMismatch })
    );

    // The attacker's own chain id, still the genuine document (which attests our key).
    let mut signer = AuditSigner::generate(default_backend(), |b| b.fill(0x42)).expect("key");
    signer.bind(genuine.binding_document().to_vec()).expect("bind");
    let forged = signer.sign(10, *genuine.head(), genuine.time_ms()).expect("sign");
    let mut t = cps.clone();
    t[0] = forged;
    assert_eq!(
        verify(&entries, &t, &root),
        Err(TrailError::CheckpointKeyNotAttested { index: 0, seq: 10, why: NotAttested::KeyMismatch })
    );

    // A document of the attacker's own making (another PKI): it does not chain to the root.
    let fake_nsm = MockNsm::new(b"attacker", pcrs(0x70), Arc::new(|| T)).with_instance("kre");
    let fake = AuditSigner::start(&fake_nsm, default_backend()).expect("signer");
    let mut t = cps.clone();
    t[1] = fake.sign(8, *cps[1].head(), T).expect("sign");
    let Err(TrailError::CheckpointKeyNotAttested { index: 1, seq: 8, why: NotAttested::Document(_) }) =
        verify(&entries, &t, &root)
    else {
        panic!("document of another PKI accepted")
    };

    // A genuine KRE document for the key, but not requested for the audit chain.
    let real_nsm = nsm("kre", 0x70);
    let mut s = AuditSigner::generate(default_backend(), |b| b.fill(0x43)).expect("key");
    let mut req = s.attestation_request();
    req.user_data = Some(b"something else".to_vec());
    s.bind(real_nsm.attest(&req).expect("attest")).expect("bind");
    let mut t = cps.clone();
    t[1] = s.sign(8, *cps[1].head(), T).expect("sign");
    assert_eq!(
        verify(&entries, &t, &root),
        Err(TrailError::CheckpointKeyNotAttested { index: 1, seq: 8, why: NotAttested::UserDataMismatch })
    );
}

#[test]
fn invalid_checkpoint_signatures_are_detected() {
    let (entries, cps, root) = trail_of("kre", 10);
    let mut b = cps[1].bytes().to_vec();
    b[SIGNED_BODY_LEN + 97 + 10] ^= 1; // inside the signature
    let mut t = cps.clone();
    t[1] = Checkpoint::decode(&b).expect("decode");
    assert_eq!(verify(&entries, &t, &root), Err(TrailError::CheckpointSignatureInvalid { index: 1, seq: 8 }));
    // A moved checkpoint (another seq and head, the same signature).
    let c = &cps[1];
    let moved = Checkpoint::assemble(
        *c.chain_id(),
        7,
        entries[6].digest(),
        c.time_ms(),
        *c.public_key(),
        *c.signature(),
        c.binding_document().to_vec(),
    )
    .expect("assemble");
    let mut t = cps.clone();
    t[1] = moved;
    assert_eq!(verify(&entries, &t, &root), Err(TrailError::CheckpointSignatureInvalid { index: 1, seq: 7 }));
}

#[test]
fn checkpoints_out_of_order_are_detected() {
    let (entries, mut cps, root) = trail_of("kre", 10);
    cps.swap(0, 1);
    assert_eq!(
        verify(&entries, &cps, &root),
        Err(TrailError::CheckpointOutOfOrder { index: 1, seq: 4, previous_seq: 8 })
    );
}

#[test]
fn the_kre_image_must_be_the_expected_one() {
    let (entries, cps, root) = trail_of("kre", 10);
    let wrong = vec![PcrExpectation { index: 0, value: vec![0x71; 48] }];
    let Err(TrailError::KreImageMismatch { index: 0, seq: 4, mismatch }) =
        verify_trail(&entries, &cps, &Verifier::new(root.clone()), &wrong)
    else {
        panic!("wrong KRE image accepted")
    };
    assert_eq!(mismatch.index, 0);
    // Another root: the binding does not verify.
    let other = MockNsm::new(b"other-root", pcrs(0x70), Arc::new(|| T)).root_anchor();
    let Err(TrailError::CheckpointKeyNotAttested { why: NotAttested::Document(_), .. }) =
        verify(&entries, &cps, &other)
    else {
        panic!("wrong root accepted")
    };
}

#[test]
fn a_debug_mode_kre_is_refused_unless_allowed() {
    // PCR0-2 all zero: a debug-mode enclave.
    let nsm = MockNsm::new(SEED, BTreeMap::new(), Arc::new(|| T)).with_instance("kre-debug");
    let signer = AuditSigner::start(&nsm, default_backend()).expect("signer");
    let mut log = AuditLog::new(AuditConfig::default(), signer);
    log.append(event(3), T).expect("append");
    let cps = vec![log.checkpoint(T).expect("cp")];
    let entries = log.entries_after(0, 10);
    let v = Verifier::new(nsm.root_anchor());
    assert_eq!(
        verify_trail(&entries, &cps, &v, &[]),
        Err(TrailError::CheckpointKeyNotAttested {
            index: 0,
            seq: 1,
            why: NotAttested::Document(VerifyError::DebugMode)
        })
    );
    let ok = verify_trail_with(&entries, &cps, &v, &[], TrailOptions { allow_debug: true }).expect("allowed");
    assert_eq!(ok.last_seq, 1);
}

#[test]
fn a_full_buffer_refuses_appends_and_releases_fail_closed() {
    let nsm = nsm("kre", 0x70);
    let signer = AuditSigner::start(&nsm, default_backend()).expect("signer");
    let mut log = AuditLog::new(AuditConfig { capacity: 6, reserve: 2, ..AuditConfig::default() }, signer);
    for i in 0..4 {
        assert_eq!(log.append(event(5 * i), T), Ok(i + 1), "release {i}");
    }
    assert!(log.is_full());
    assert!(log.status().full);
    assert!(matches!(log.append(event(5), T), Err(AuditError::BufferFull { .. })), "a release must be refused");
    // The reserve records the denials of the refused releases.
    assert_eq!(log.append(event(1), T), Ok(5));
    assert_eq!(log.append(event(1), T), Ok(6));
    assert!(matches!(log.append(event(1), T + 1), Err(AuditError::BufferFull { .. })));
    assert_eq!(log.status().refused_total, 2);
    assert_eq!(log.status().unrecorded_pending, 1);
    // Nothing was dropped: everything is still there for the parent.
    assert_eq!(log.entries_after(0, 100).len(), 6);
    // The parent stores and acknowledges; releases work again, and the loss is on record.
    let dir = tempfile::tempdir().expect("tmp");
    let cp = log.checkpoint(T).expect("cp");
    let report = store::append_to_dir(dir.path(), &log.entries_after(0, 100), &[cp]).expect("store");
    assert_eq!(log.ack(report.last_seq), Ok(6));
    assert!(!log.is_full());
    assert_eq!(log.append(event(5), T + 2), Ok(8));
    let tail = log.entries_after(6, 10);
    assert_eq!(tail[0].event(), &AuditEvent::Unrecorded { count: 1, first_ms: T + 1, last_ms: T + 1 });
}

#[test]
fn the_store_round_trips_and_refuses_broken_appends() {
    let (entries, cps, root) = trail_of("kre", 10);
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().join("audit");
    let r = store::append_to_dir(&d, &entries[..6], &cps[..1]).expect("first pull");
    assert_eq!((r.entries_written, r.checkpoints_written, r.last_seq), (6, 1, 6));
    // A repeated pull overlapping what is stored is idempotent.
    let r = store::append_to_dir(&d, &entries[4..], &cps).expect("second pull");
    assert_eq!((r.entries_written, r.entries_skipped, r.checkpoints_written, r.checkpoints_skipped), (4, 2, 2, 1));
    let stored = store::read_dir(&d).expect("read");
    assert_eq!(stored.entries, entries);
    assert_eq!(stored.checkpoints, cps);
    assert_eq!(verify(&stored.entries, &stored.checkpoints, &root), Ok(10));

    // Refusals: a gap, a foreign chain, a conflicting re-pull, a broken link, a checkpoint
    // ahead of the entries.
    let d2 = dir.path().join("b");
    assert!(matches!(store::append_to_dir(&d2, &entries[1..], &[]), Err(StoreError::Gap { expected: 1, found: 2 })));
    store::append_to_dir(&d2, &entries[..3], &[]).expect("ok");
    assert!(matches!(store::append_to_dir(&d2, &entries[4..], &[]), Err(StoreError::Gap { expected: 4, found: 5 })));
    let (other, other_cps, _) = trail_of("kre-b", 4);
    assert!(matches!(store::append_to_dir(&d2, &other[3..], &[]), Err(StoreError::ForeignChain { seq: 4 })));
    assert!(matches!(store::append_to_dir(&d2, &[], &other_cps), Err(StoreError::ForeignChain { .. })));
    assert!(matches!(store::append_to_dir(&d2, &[edited(&entries[2])], &[]), Err(StoreError::Conflict { seq: 3 })));
    let bad_link = AuditEntry::new(*entries[3].chain_id(), 4, [0; 48], T, 0, event(4)).expect("entry");
    assert!(matches!(store::append_to_dir(&d2, &[bad_link], &[]), Err(StoreError::BrokenLink { seq: 4 })));
    assert!(matches!(store::append_to_dir(&d2, &[], &cps[..1]), Err(StoreError::CheckpointAhead { seq: 4, last: 3 })));
    // Nothing of the refused appends was written.
    assert_eq!(store::read_dir(&d2).expect("read").entries.len(), 3);

    // A torn write at the end is reported, never skipped.
    let ep = d.join(store::ENTRIES_FILE);
    let len = std::fs::metadata(&ep).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&ep).expect("open").set_len(len - 3).expect("truncate");
    assert!(matches!(store::read_dir(&d), Err(StoreError::Format { .. })));
    assert!(matches!(store::append_to_dir(&d, &[], &[]), Err(StoreError::Format { .. })));
}

/// A receipt proves its entry is in a stored trail only when the trail holds exactly that
/// entry: a trail that ends before it (the parent acknowledged the entry without storing it)
/// still verifies on its own, and only the receipt catches it. Each way a receipt fails to
/// prove its entry has its own variant.
#[test]
fn receipts_prove_their_entry_is_in_the_stored_trail() {
    let mut kre = start("kre", 0x70);
    let mut cps = Vec::new();
    for i in 2..=10 {
        assert_eq!(kre.log.append(event(i), T + i), Ok(i));
        if i == 4 || i == 10 {
            cps.push(kre.log.checkpoint(T + i).expect("checkpoint"));
        }
    }
    let entries = kre.log.entries_after(0, usize::MAX);
    let verifier = Verifier::new(kre.root.clone());
    let summary = verify_trail(&entries, &cps, &verifier, &expect_kre()).expect("trail");
    let signer = kre.log.signer();
    // Entry 5 is the release to the client document [5; 48] (`event`).
    let at = |seq: u64| entries[usize::try_from(seq - 1).expect("small")].digest();
    let release = signer.sign_receipt(5, at(5), [5; 48]).expect("receipt");
    let c = default_backend();
    assert_eq!(check_receipt(&release, &summary, &entries, c), Ok(()));

    // The parent stored entries 1..=4 only (and the checkpoint at 4): that trail verifies,
    // the receipt of entry 5 does not.
    let prefix = &entries[..4];
    let short = verify_trail(prefix, &cps[..1], &verifier, &expect_kre()).expect("the prefix verifies on its own");
    assert_eq!(check_receipt(&release, &short, prefix, c), Err(ReceiptError::NotStored { seq: 5, last_seq: 4 }));
    // Signed for another digest than the stored entry 5's.
    let other_digest = signer.sign_receipt(5, [9; 48], [5; 48]).expect("receipt");
    assert_eq!(check_receipt(&other_digest, &summary, &entries, c), Err(ReceiptError::EntryMismatch { seq: 5 }));
    // The stored entry 6 is a refusal, not a release; entry 5 released to another document.
    let refusal = signer.sign_receipt(6, at(6), [6; 48]).expect("receipt");
    assert_eq!(check_receipt(&refusal, &summary, &entries, c), Err(ReceiptError::NotARelease { seq: 6 }));
    let other_doc = signer.sign_receipt(5, at(5), [7; 48]).expect("receipt");
    assert_eq!(check_receipt(&other_doc, &summary, &entries, c), Err(ReceiptError::NotARelease { seq: 5 }));
    // Another KRE's (valid) receipt: of another chain.
    let other = start("other", 0x70);
    let foreign = other.log.signer().sign_receipt(5, at(5), [5; 48]).expect("receipt");
    assert!(matches!(check_receipt(&foreign, &summary, &entries, c), Err(ReceiptError::ForeignChain { .. })));
    // A tampered receipt: the signature fails before anything else is looked at.
    let tampered = Receipt::assemble(
        *release.chain_id(),
        4,
        *release.entry_digest(),
        *release.document_sha384(),
        *release.public_key(),
        *release.signature(),
    )
    .expect("assemble");
    assert_eq!(check_receipt(&tampered, &summary, &entries, c), Err(ReceiptError::SignatureInvalid));
}
