//! The sealed state through the protocol core, frame by frame without I/O: genesis, the
//! two-phase commit, a restart, the unseal ceremony with the custodians' checks, and every
//! refusal a custodian ceremony must make (too few shares, a non-custodian, a replayed share, a KRE with
//! the wrong PCRs, a tampered blob, a rollback).

use std::sync::Arc;

use keygate_attestation::crypto::{default_backend, p384_scalar_from, P384Scalar};
use keygate_attestation::mock::MockNsm;
use keygate_attestation::policy::ReleasePolicy;
use keygate_attestation::{PcrExpectation, Verifier};
use keygate_enclave::audit::AuditEvent;
use keygate_enclave::kre::{Connection, Event, Kre, KreConfig};
use keygate_enclave::peer::client::{ClientError, FetchRequest, ReleasedKey};
use keygate_enclave::peer::custodian::{self, CustodianError, CustodianRecord, Expectations};
use keygate_enclave::state::custody::CustodianSet;
use keygate_enclave::wire::{Channel, DenyCode, Message};

mod common;
use common::{
    denied, expectations, fetch_as, id, one, pcrs, prod_policy, report, rng_from, sha384, step, sync_stored, T,
};

const SEED: &[u8] = b"durability-test";

/// "prod" allows the image with PCRs `pcrs(0x10)`, KEK version 1.
fn policy() -> ReleasePolicy {
    prod_policy(1, 0)
}

struct Custodians {
    scalars: Vec<P384Scalar>,
    set: CustodianSet,
}

fn custodians(m: u8, n: u8, seed: u64) -> Custodians {
    let c = default_backend();
    let mut scalars = Vec::new();
    let mut keys = Vec::new();
    for i in 0..u64::from(n) {
        let (s, p) = p384_scalar_from(c, rng_from(seed * 1000 + i + 1)).expect("key");
        keys.push(p.try_into().expect("point"));
        scalars.push(s);
    }
    Custodians { scalars, set: CustodianSet::new(c, m, keys).expect("set") }
}

/// A KRE with its own mock NSM (each instance draws its own randomness: a "restart").
fn kre(set: &CustodianSet, kre_pcr: u8) -> Kre {
    let nsm = MockNsm::new(SEED, pcrs(kre_pcr), Arc::new(|| T)).with_instance("kre");
    let verifier = Verifier::new(nsm.root_anchor());
    let config = KreConfig { custodians: Some(set.clone()), ..KreConfig::default() };
    Kre::new(config, verifier, policy(), Arc::new(nsm)).expect("kre")
}

fn fetch(kre: &Kre) -> Result<Vec<ReleasedKey>, ClientError> {
    let cpi = MockNsm::new(SEED, pcrs(0x10), Arc::new(|| T)).with_instance("cpi");
    fetch_as(
        kre,
        &cpi,
        FetchRequest {
            cluster: id("prod"),
            key_ids: vec![id("etcd")],
            expect_kre_pcrs: vec![],
            also_accept_kre: vec![],
        },
    )
}

/// The durable-state steps the KRE refused, in order, from its audit trail: every refusal of
/// a state step is audited under that step's name (not as a release or challenge refusal).
fn refused_steps(kre: &Kre) -> Vec<String> {
    kre.audit()
        .entries_after(0, 1000)
        .into_iter()
        .filter_map(|e| match e.event() {
            AuditEvent::UnsealStep { step, ok: false, .. } => Some(step.clone()),
            _ => None,
        })
        .collect()
}

fn deny_code(r: Result<Vec<ReleasedKey>, ClientError>) -> DenyCode {
    common::fetch_denial(r).0
}

/// Stores what the KRE exports (as the parent does) and commits it.
fn sync(kre: &Kre, store: &mut Option<(Vec<u8>, Vec<u8>, Vec<u8>)>) -> u64 {
    let (generation, stored) = sync_stored(kre);
    if stored.is_some() {
        *store = stored;
    }
    generation
}

/// The parent handing back a stored state.
fn state_load(blob: &[u8], shares: &[u8], genesis: &[u8]) -> Message {
    Message::StateLoad {
        blob: blob.to_vec(),
        shares: shares.to_vec(),
        genesis_attestation: genesis.to_vec(),
        cold_start: false,
    }
}

struct Unsealer<'a> {
    verifier: Verifier,
    kre_pcrs: Vec<PcrExpectation>,
    record: Option<&'a CustodianRecord>,
}

impl Unsealer<'_> {
    /// What this custodian expects: the KRE's PCRs (also for the genesis KRE), its record.
    fn expect(&self, approve_reshare: Option<[u8; 48]>) -> Expectations<'_> {
        Expectations {
            verifier: &self.verifier,
            now_ms: T,
            kre_pcrs: &self.kre_pcrs,
            genesis_pcrs: &self.kre_pcrs,
            record: self.record,
            accept_new_genesis: false,
            approve_reshare,
            cold_start: false,
        }
    }
}

/// A custodian's first step on a new connection: UnsealHello with `nonce`, then its check of
/// the KRE's offer. Returns the connection (for the share) and the custodian's answer.
fn offer(
    kre: &Kre,
    nonce: [u8; 32],
    expect: &Expectations<'_>,
    scalar: &P384Scalar,
    seed: u64,
) -> (Connection, Result<custodian::Response, CustodianError>) {
    let mut conn = Connection::new(Channel::Custodian);
    let s = step(&mut conn, kre, &Message::UnsealHello { client_nonce: nonce }.encode().expect("hello"));
    let resp = custodian::on_offer(&s.reply[4..], &nonce, expect, scalar, default_backend(), &mut rng_from(seed));
    (conn, resp)
}

/// One custodian's unseal step; returns the KRE's progress or the refusal.
fn unseal_one(kre: &Kre, c: &Custodians, i: usize, u: &Unsealer<'_>) -> Result<(u8, u8, bool, u64), CustodianError> {
    let nonce = [u8::try_from(i).expect("small") + 1; 32];
    let (mut conn, resp) = offer(kre, nonce, &u.expect(None), &c.scalars[i], 77);
    let s = step(&mut conn, kre, &resp?.frame);
    custodian::on_progress(&s.reply[4..])
}

fn unsealer(p: u8) -> Unsealer<'static> {
    let nsm = MockNsm::new(SEED, pcrs(0x70), Arc::new(|| T));
    Unsealer { verifier: Verifier::new(nsm.root_anchor()), kre_pcrs: expectations(&pcrs(p)), record: None }
}

#[test]
fn genesis_commit_restart_and_two_of_three_unseal_keep_the_keys() {
    let c = custodians(2, 3, 1);
    let k1 = kre(&c.set, 0x70);
    assert_eq!(deny_code(fetch(&k1)), DenyCode::Sealed, "a KRE with custodians starts sealed");
    assert_eq!(report(&k1, Message::StatePoll).phase, 1);
    let r = report(&k1, Message::StateGenesis);
    assert_eq!((r.phase, r.export_generation, r.committed_generation), (3, 1, 0));
    assert_eq!(deny_code(fetch(&k1)), DenyCode::StatePending, "nothing released before the parent commits");
    // The server logs a state step with the generation it concerns: the export before the
    // commit, the committed one after.
    let poll = Message::StatePoll.encode().expect("poll");
    assert_eq!(
        step(&mut Connection::new(Channel::Parent), &k1, &poll).event,
        Event::State { step: "poll", generation: 1 }
    );
    let mut store = None;
    assert_eq!(sync(&k1, &mut store), 1);
    assert_eq!(
        step(&mut Connection::new(Channel::Parent), &k1, &poll).event,
        Event::State { step: "poll", generation: 1 }
    );
    let keys = fetch(&k1).expect("released after commit");
    assert_eq!(keys[0].version, 1);
    // Genesis twice is refused.
    assert_eq!(denied(one(&k1, Message::StateGenesis)).0, DenyCode::StateRefused);
    assert_eq!(refused_steps(&k1), ["genesis"]);

    // Restart: a new KRE gets the stored state and two custodians.
    let k2 = kre(&c.set, 0x70);
    assert_eq!(deny_code(fetch(&k2)), DenyCode::Sealed);
    let (blob, shares, genesis) = store.clone().expect("stored");
    let r = report(&k2, Message::StateLoad { blob, shares, genesis_attestation: genesis, cold_start: false });
    assert_eq!((r.phase, r.unsealing_generation), (2, 1));
    let u = unsealer(0x70);
    assert_eq!(unseal_one(&k2, &c, 2, &u).expect("first share"), (1, 2, false, 1));
    assert_eq!(deny_code(fetch(&k2)), DenyCode::Sealed, "one share unseals nothing");
    assert_eq!(unseal_one(&k2, &c, 0, &u).expect("second share"), (2, 2, true, 1));
    let again = fetch(&k2).expect("released after unseal");
    assert_eq!(again, keys, "the same data key after the restart");
    // The audit trail records the ceremony.
    let kinds: Vec<String> = k2.audit().entries_after(0, 100).into_iter().map(|e| format!("{:?}", e.event())).collect();
    assert!(kinds.iter().any(|k| k.contains("unsealed")), "{kinds:?}");
}

#[test]
fn custodians_refuse_wrong_pcrs_rollback_and_changed_shares_and_the_kre_refuses_bad_shares() {
    let c = custodians(2, 3, 2);
    let k1 = kre(&c.set, 0x70);
    report(&k1, Message::StateGenesis);
    let mut store = None;
    sync(&k1, &mut store);
    let (blob, shares, genesis) = store.clone().expect("stored");
    let k2 = kre(&c.set, 0x70);
    report(&k2, state_load(&blob, &shares, &genesis));

    // A KRE with other PCRs than expected: the custodian refuses.
    assert!(matches!(unseal_one(&k2, &c, 0, &unsealer(0x60)), Err(CustodianError::KrePcr(_))));
    // No expected PCRs at all: refused.
    let mut none = unsealer(0x70);
    none.kre_pcrs.clear();
    assert!(matches!(unseal_one(&k2, &c, 0, &none), Err(CustodianError::NoExpectedPcrs)));
    // Expected KRE PCRs but no genesis PCRs: refused too.
    let u0 = unsealer(0x70);
    let half = Expectations { genesis_pcrs: &[], ..u0.expect(None) };
    assert!(matches!(offer(&k2, [12; 32], &half, &c.scalars[0], 3).1, Err(CustodianError::NoExpectedPcrs)));
    // A rollback: the custodian has unsealed generation 5 of this set before.
    let u = unsealer(0x70);
    let first = offer(&k2, [9; 32], &u.expect(None), &c.scalars[0], 3).1.expect("offer ok");
    let newer = CustodianRecord { highest_generation: 5, ..first.record.clone() };
    let rb = Unsealer { record: Some(&newer), ..unsealer(0x70) };
    assert!(matches!(unseal_one(&k2, &c, 0, &rb), Err(CustodianError::Rollback { offered: 1, recorded: 5 })));
    // The same generation as recorded (a second restart without changes) is not a rollback.
    let same = CustodianRecord { highest_generation: 1, ..first.record.clone() };
    let sm = Unsealer { record: Some(&same), ..unsealer(0x70) };
    let resp = offer(&k2, [13; 32], &sm.expect(None), &c.scalars[0], 3).1.expect("the same generation again is fine");
    assert_eq!(resp.record.highest_generation, 1);
    let changed = CustodianRecord { shares_sha384: "00".into(), ..first.record.clone() };
    let ch = Unsealer { record: Some(&changed), ..unsealer(0x70) };
    assert!(matches!(unseal_one(&k2, &c, 0, &ch), Err(CustodianError::SharesChanged)));

    // A non-custodian cannot open an envelope.
    let outsider = custodians(1, 1, 9);
    let o = Custodians { scalars: vec![outsider.scalars[0].clone()], set: c.set.clone() };
    assert!(matches!(unseal_one(&k2, &o, 0, &u), Err(CustodianError::Custody(_))));

    // A share replayed on another connection (bound to another attestation) is refused.
    let nonce = [7; 32];
    let resp = offer(&k2, nonce, &u.expect(None), &c.scalars[1], 4).1.expect("offer");
    let mut other = Connection::new(Channel::Custodian);
    step(&mut other, &k2, &Message::UnsealHello { client_nonce: [8; 32] }.encode().expect("hello"));
    let s = step(&mut other, &k2, &resp.frame);
    assert_eq!(denied(Message::decode(&s.reply[4..]).expect("reply")).0, DenyCode::StateRefused);
    assert_eq!(refused_steps(&k2), ["unseal-share"]);
    // A share sent without an offer on its connection.
    assert_eq!(denied(one(&k2, Message::decode(&resp.frame[4..]).expect("frame"))).0, DenyCode::UnexpectedMessage);
    // A share from an earlier boot's session does not open in this one.
    let k3 = kre(&c.set, 0x70);
    report(&k3, state_load(&blob, &shares, &genesis));
    let mut conn3 = Connection::new(Channel::Custodian);
    step(&mut conn3, &k3, &Message::UnsealHello { client_nonce: nonce }.encode().expect("hello"));
    let s = step(&mut conn3, &k3, &resp.frame);
    assert_eq!(denied(Message::decode(&s.reply[4..]).expect("reply")).0, DenyCode::StateRefused);
    // Anything but a share after an offer is refused, and audited as a refused share step.
    let before = refused_steps(&k3).len();
    let mut conn = Connection::new(Channel::Custodian);
    step(&mut conn, &k3, &Message::UnsealHello { client_nonce: [30; 32] }.encode().expect("hello"));
    let s = step(&mut conn, &k3, &Message::UnsealHello { client_nonce: [31; 32] }.encode().expect("hello"));
    assert_eq!(denied(Message::decode(&s.reply[4..]).expect("reply")).0, DenyCode::UnexpectedMessage);
    let steps = refused_steps(&k3);
    assert_eq!((steps.len(), steps.last().map(String::as_str)), (before + 1, Some("unseal-share")));
    // Too few shares: one share leaves the KRE sealed.
    assert!(!unseal_one(&k3, &c, 0, &u).expect("one").2);
    assert_eq!(deny_code(fetch(&k3)), DenyCode::Sealed);

    // A tampered blob: refused at load (digest), or with a recomputed digest, after M shares.
    let mut bad = blob.clone();
    bad[100] ^= 1;
    let k4 = kre(&c.set, 0x70);
    let (code, reason) = denied(one(
        &k4,
        Message::StateLoad {
            blob: bad.clone(),
            shares: shares.clone(),
            genesis_attestation: genesis.clone(),
            cold_start: false,
        },
    ));
    assert_eq!(code, DenyCode::StateRefused);
    assert!(reason.contains("digest"), "{reason}");
    assert_eq!(refused_steps(&k4), ["load"]);
    let n = bad.len() - 48;
    let d = sha384(&bad[..n]);
    bad[n..].copy_from_slice(&d);
    report(
        &k4,
        Message::StateLoad {
            blob: bad,
            shares: shares.clone(),
            genesis_attestation: genesis.clone(),
            cold_start: false,
        },
    );
    unseal_one(&k4, &c, 0, &u).expect("one");
    assert!(matches!(
        unseal_one(&k4, &c, 1, &u),
        Err(CustodianError::Denied { code: DenyCode::StateRefused, ref reason }) if reason.contains("does not open")
    ));
    assert_eq!(deny_code(fetch(&k4)), DenyCode::Sealed);

    // A genesis attestation over another shares file: custodians refuse.
    let k5 = kre(&c.set, 0x70);
    let c2 = kre(&c.set, 0x70);
    report(&c2, Message::StateGenesis);
    let other_genesis = report(&c2, Message::StatePoll).genesis_attestation;
    report(&k5, Message::StateLoad { blob, shares, genesis_attestation: other_genesis, cold_start: false });
    assert!(matches!(unseal_one(&k5, &c, 0, &u), Err(CustodianError::GenesisBinding)));
}

#[test]
fn commits_must_name_the_exported_blob_and_a_kre_without_custodians_has_no_state() {
    let c = custodians(1, 1, 3);
    let k = kre(&c.set, 0x70);
    let r = report(&k, Message::StateGenesis);
    assert_eq!(denied(one(&k, Message::StateCommit { generation: 1, blob_sha384: [0; 48] })).0, DenyCode::StateRefused);
    assert_eq!(denied(one(&k, Message::StateCommit { generation: 2, blob_sha384: [0; 48] })).0, DenyCode::StateRefused);
    assert_eq!(deny_code(fetch(&k)), DenyCode::StatePending);
    let sha = sha384(&r.blob);
    assert!(matches!(
        one(&k, Message::StateCommit { generation: 1, blob_sha384: sha }),
        Message::StateCommitted { generation: 1 }
    ));
    assert!(fetch(&k).is_ok());
    assert_eq!(refused_steps(&k), ["commit", "commit"]);
    // Loading a state into a serving KRE is refused.
    assert_eq!(
        denied(one(
            &k,
            Message::StateLoad {
                blob: r.blob,
                shares: r.shares,
                genesis_attestation: r.genesis_attestation,
                cold_start: false
            }
        ))
        .0,
        DenyCode::StateRefused
    );

    let nsm = MockNsm::new(SEED, pcrs(0x70), Arc::new(|| T)).with_instance("kre");
    let plain = Kre::new(KreConfig::default(), Verifier::new(nsm.root_anchor()), policy(), Arc::new(nsm)).expect("kre");
    assert_eq!(report(&plain, Message::StatePoll).phase, 0);
    assert_eq!(denied(one(&plain, Message::StateGenesis)).0, DenyCode::StateRefused);
    assert_eq!(denied(one(&plain, Message::UnsealHello { client_nonce: [1; 32] })).0, DenyCode::StateRefused);
    assert_eq!(refused_steps(&plain), ["genesis", "unseal-offer"]);
}

/// One current custodian's reshare approval (or refusal) on its own connection.
fn approve(
    kre: &Kre,
    c: &Custodians,
    i: usize,
    approve: Option<[u8; 48]>,
) -> Result<(u8, u8, bool, u64), CustodianError> {
    let u = unsealer(0x70);
    let nonce = [u8::try_from(i).expect("small") + 40; 32];
    let (mut conn, resp) = offer(kre, nonce, &u.expect(approve), &c.scalars[i], 91);
    let s = step(&mut conn, kre, &resp?.frame);
    custodian::on_progress(&s.reply[4..])
}

#[test]
fn reshare_to_a_new_set_needs_a_quorum_of_the_old_one_and_keeps_the_keys() {
    let old = custodians(2, 3, 5);
    let new = custodians(2, 2, 6);
    let k1 = kre(&old.set, 0x70);
    report(&k1, Message::StateGenesis);
    let mut store = None;
    sync(&k1, &mut store);
    let keys = fetch(&k1).expect("released");
    let set_bytes = keygate_enclave::state::vault::encode_set(&new.set);
    let digest = new.set.digest();

    // Without a reshare in progress, an approval is refused by the custodian itself.
    assert!(matches!(
        approve(&k1, &old, 0, Some(digest)),
        Err(CustodianError::Denied { code: DenyCode::StateRefused, .. })
    ));
    assert_eq!(refused_steps(&k1), ["unseal-offer"]);
    assert_eq!(denied(one(&k1, Message::ReshareStart { set: vec![1, 2, 3] })).0, DenyCode::StateRefused);
    assert_eq!(refused_steps(&k1), ["unseal-offer", "reshare"]);
    assert_eq!(report(&k1, Message::ReshareStart { set: set_bytes.clone() }).phase, 3);
    // A custodian that did not approve this set refuses; one that approved another set too.
    assert!(matches!(approve(&k1, &old, 0, None), Err(CustodianError::ReshareNotApproved { .. })));
    assert!(matches!(approve(&k1, &old, 0, Some([0; 48])), Err(CustodianError::ReshareNotApproved { .. })));
    // A new custodian cannot approve (it holds no share of the current key).
    assert!(matches!(approve(&k1, &new, 0, Some(digest)), Err(CustodianError::Custody(_))));
    // An approval replayed on another connection (bound to another offer) is refused by the KRE.
    let u = unsealer(0x70);
    let approval = offer(&k1, [50; 32], &u.expect(Some(digest)), &old.scalars[1], 92).1.expect("approval");
    let mut other = Connection::new(Channel::Custodian);
    step(&mut other, &k1, &Message::UnsealHello { client_nonce: [51; 32] }.encode().expect("hello"));
    let s = step(&mut other, &k1, &approval.frame);
    assert_eq!(denied(Message::decode(&s.reply[4..]).expect("reply")).0, DenyCode::StateRefused);
    assert_eq!(refused_steps(&k1), ["unseal-offer", "reshare", "reshare-share"]);
    assert_eq!(approve(&k1, &old, 0, Some(digest)).expect("first approval"), (1, 2, false, 1));
    assert_eq!(approve(&k1, &old, 2, Some(digest)).expect("second approval"), (2, 2, true, 1));
    // Serving goes on under the old generation until the reshared state is stored.
    assert_eq!(fetch(&k1).expect("still released"), keys);
    assert_eq!(sync(&k1, &mut store), 2, "the reshared state is the next generation");
    // Each KEK version is audited once, when the commit that made it usable lands: the
    // reshare's commit adds none.
    let rotations: Vec<(String, u32)> = k1
        .audit()
        .entries_after(0, 1000)
        .into_iter()
        .filter_map(|e| match e.event() {
            AuditEvent::KekRotated { cluster, new_version } => Some((cluster.to_string(), *new_version)),
            _ => None,
        })
        .collect();
    assert_eq!(rotations, [("prod".to_owned(), 1)]);

    // A KRE configured with the old set cannot load it; one with the new set can, and the new
    // custodians unseal it. The old custodians cannot.
    let (blob, shares, genesis) = store.clone().expect("stored");
    let k_old = kre(&old.set, 0x70);
    let (code, reason) = denied(one(&k_old, state_load(&blob, &shares, &genesis)));
    assert_eq!(code, DenyCode::StateRefused);
    assert!(reason.contains("another custodian set"), "{reason}");
    let k2 = kre(&new.set, 0x70);
    report(&k2, Message::StateLoad { blob, shares, genesis_attestation: genesis, cold_start: false });
    let u = unsealer(0x70);
    assert!(matches!(unseal_one(&k2, &old, 0, &u), Err(CustodianError::Custody(_))), "an old custodian holds no share");
    assert_eq!(unseal_one(&k2, &new, 1, &u).expect("new 1"), (1, 2, false, 2));
    assert_eq!(unseal_one(&k2, &new, 0, &u).expect("new 0"), (2, 2, true, 2));
    assert_eq!(fetch(&k2).expect("released after the reshare"), keys, "same keys under the new custodians");
}

/// A mock NSM whose random source can be made to fail (as a real device can: an ioctl error).
#[derive(Debug)]
struct FlakyNsm {
    inner: MockNsm,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl keygate_attestation::Nsm for FlakyNsm {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn attest(&self, req: &keygate_attestation::AttestRequest) -> Result<Vec<u8>, keygate_attestation::NsmError> {
        self.inner.attest(req)
    }
    fn describe_pcr(
        &self,
        index: u16,
    ) -> Result<keygate_attestation::nsm::PcrDescription, keygate_attestation::NsmError> {
        self.inner.describe_pcr(index)
    }
    fn random(&self, buf: &mut [u8]) -> Result<(), keygate_attestation::NsmError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(keygate_attestation::NsmError::Mock("random source failed".into()));
        }
        self.inner.random(buf)
    }
}

/// A failing NSM random source fails the state step and leaves the durable state as it was:
/// no state key, share, KEK or nonce made from an unfilled buffer survives the failure (an
/// export is kept until committed, so a half-made one would be stored on the next poll).
#[test]
fn a_failing_nsm_random_source_changes_no_durable_state() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = custodians(2, 3, 11);
    let fail = Arc::new(AtomicBool::new(false));
    let nsm =
        FlakyNsm { inner: MockNsm::new(SEED, pcrs(0x70), Arc::new(|| T)).with_instance("kre"), fail: fail.clone() };
    let verifier = Verifier::new(nsm.inner.root_anchor());
    let config = KreConfig { custodians: Some(c.set.clone()), ..KreConfig::default() };
    let k = Kre::new(config, verifier, policy(), Arc::new(nsm)).expect("kre");

    fail.store(true, Ordering::SeqCst);
    let (code, reason) = denied(one(&k, Message::StateGenesis));
    assert_eq!(code, DenyCode::StateRefused);
    assert!(reason.contains("random source failed"), "{reason}");
    let r = report(&k, Message::StatePoll);
    assert_eq!((r.phase, r.export_generation), (1, 0), "still awaiting a state: no genesis was kept");

    fail.store(false, Ordering::SeqCst);
    report(&k, Message::StateGenesis);
    let mut store = None;
    assert_eq!(sync(&k, &mut store), 1);
    let keys = fetch(&k).expect("released");

    // A reshare: the last approval draws the new state key and its shares — it fails with the
    // NSM and nothing of it is kept; then the export of the reshared state fails the same way.
    let new = custodians(2, 2, 12);
    report(&k, Message::ReshareStart { set: keygate_enclave::state::vault::encode_set(&new.set) });
    assert_eq!(approve(&k, &c, 0, Some(new.set.digest())).expect("first approval"), (1, 2, false, 1));
    fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        approve(&k, &c, 1, Some(new.set.digest())),
        Err(CustodianError::Denied { code: DenyCode::StateRefused, ref reason }) if reason.contains("random source")
    ));
    fail.store(false, Ordering::SeqCst);
    assert_eq!(approve(&k, &c, 1, Some(new.set.digest())).expect("second approval"), (2, 2, true, 1));
    fail.store(true, Ordering::SeqCst);
    assert_eq!(denied(one(&k, Message::StatePoll)).0, DenyCode::Internal);
    assert_eq!(refused_steps(&k), ["genesis", "reshare-share", "export"]);
    fail.store(false, Ordering::SeqCst);
    let r = report(&k, Message::StatePoll);
    assert_eq!(r.export_generation, 2);
    let header = keygate_enclave::state::sealed::peek_header(&r.blob).expect("header");
    assert_ne!(header.nonce, [0; 12], "sealed with a drawn nonce, not an unfilled buffer");
    assert_eq!(sync(&k, &mut store), 2);
    assert_eq!(fetch(&k).expect("released"), keys);
}

/// A KRE like [`kre`] whose policy names KEK version `kek_version` for "prod": restarted from
/// a state with version 1, it makes version 2 (a fresh KEK) in the next generation.
fn kre_at(set: &CustodianSet, kek_version: u32) -> Kre {
    let nsm = MockNsm::new(SEED, pcrs(0x70), Arc::new(|| T)).with_instance("kre");
    let verifier = Verifier::new(nsm.root_anchor());
    let config = KreConfig { custodians: Some(set.clone()), ..KreConfig::default() };
    Kre::new(config, verifier, prod_policy(kek_version, 0), Arc::new(nsm)).expect("kre")
}

/// Custodian `i`'s unseal step with its record: the KRE's progress and the record to keep, or
/// the refusal (the record unchanged).
fn unseal_recorded(
    kre: &Kre,
    c: &Custodians,
    i: usize,
    record: &mut Option<CustodianRecord>,
) -> Result<(u8, u8, bool, u64), CustodianError> {
    let u = Unsealer { record: record.as_ref(), ..unsealer(0x70) };
    let nonce = [u8::try_from(i).expect("small") + 50; 32];
    let (mut conn, resp) = offer(kre, nonce, &u.expect(None), &c.scalars[i], 78);
    let resp = resp?;
    let kept = resp.record.clone();
    let s = step(&mut conn, kre, &resp.frame);
    let progress = custodian::on_progress(&s.reply[4..]);
    *record = Some(kept);
    progress
}

/// A KRE restarted from `stored`, unsealed by custodians `who` (with their records).
fn restart_and_unseal(
    c: &Custodians,
    kek_version: u32,
    stored: &(Vec<u8>, Vec<u8>, Vec<u8>),
    who: &[usize],
    records: &mut [Option<CustodianRecord>],
) -> Kre {
    let k = kre_at(&c.set, kek_version);
    report(&k, state_load(&stored.0, &stored.1, &stored.2));
    for &i in who {
        unseal_recorded(&k, c, i, &mut records[i]).expect("share");
    }
    k
}

/// (a) A generation does not name a sealed state: a KRE restarted twice from generation 1
/// seals two different generation-2 states (two KEKs named `prod/v2`). Once custodians have
/// unsealed one of them, a parent that switches to the other at a restart is refused by each
/// of them (a fork), and the KRE stays sealed. (b) A quorum whose records hold a newer
/// (generation, blob) refuses the older generation outright.
#[test]
fn custodians_refuse_the_other_blob_of_a_generation_they_unsealed_and_an_older_one() {
    let c = custodians(2, 3, 12);
    let mut records: Vec<Option<CustodianRecord>> = vec![None, None, None];
    let k1 = kre_at(&c.set, 1);
    report(&k1, Message::StateGenesis);
    let mut store = None;
    assert_eq!(sync(&k1, &mut store), 1);
    let g1 = store.clone().expect("generation 1");

    // Two restarts from generation 1, each making its own generation 2 (fork A and fork B).
    let ka = restart_and_unseal(&c, 2, &g1, &[0, 1], &mut records);
    let mut fork_a = None;
    assert_eq!(sync(&ka, &mut fork_a), 2);
    let fork_a = fork_a.expect("fork A");
    let kb = restart_and_unseal(&c, 2, &g1, &[0, 1], &mut records);
    let mut fork_b = None;
    assert_eq!(sync(&kb, &mut fork_b), 2);
    let fork_b = fork_b.expect("fork B");
    assert_ne!(sha384(&fork_a.0), sha384(&fork_b.0), "two sealed states of generation 2");
    let (keys_a, keys_b) = (fetch(&ka).expect("A"), fetch(&kb).expect("B"));
    assert_eq!((keys_a[0].version, keys_b[0].version), (2, 2));
    assert_ne!(keys_a, keys_b, "prod/v2 names two different data keys");

    // The custodians unseal fork A at the next restart: they record (2, SHA-384(A)).
    let kc = restart_and_unseal(&c, 2, &fork_a, &[0, 2], &mut records);
    assert_eq!(fetch(&kc).expect("A again"), keys_a);
    assert_eq!(records[0].as_ref().and_then(|r| r.blob_sha384.clone()), Some(hex::encode(sha384(&fork_a.0))));
    assert_eq!(records[2].as_ref().map(|r| r.highest_generation), Some(2));

    // (a) The parent switches to fork B at the next restart: both custodians that unsealed A
    // refuse it, by name; the KRE stays sealed.
    let kd = kre_at(&c.set, 2);
    report(&kd, state_load(&fork_b.0, &fork_b.1, &fork_b.2));
    for i in [0, 2] {
        let before = records[i].clone();
        let err = unseal_recorded(&kd, &c, i, &mut records[i]).expect_err("fork refused");
        assert!(matches!(err, CustodianError::Fork { generation: 2, .. }), "custodian {i}: {err:?}");
        assert_eq!(records[i], before, "a refusal changes no record");
    }
    assert_eq!(deny_code(fetch(&kd)), DenyCode::Sealed);
    // Fork A, the blob they recorded, still unseals (a restart with nothing committed since).
    let ke = restart_and_unseal(&c, 2, &fork_a, &[2, 0], &mut records);
    assert_eq!(fetch(&ke).expect("A once more"), keys_a);

    // (b) Generation 1 again: the quorum whose records hold (2, A) refuses it as a rollback.
    let kf = kre_at(&c.set, 2);
    report(&kf, state_load(&g1.0, &g1.1, &g1.2));
    for i in [0, 2] {
        let err = unseal_recorded(&kf, &c, i, &mut records[i]).expect_err("rollback refused");
        assert!(matches!(err, CustodianError::Rollback { offered: 1, recorded: 2 }), "custodian {i}: {err:?}");
    }
    assert_eq!(deny_code(fetch(&kf)), DenyCode::Sealed);
}
