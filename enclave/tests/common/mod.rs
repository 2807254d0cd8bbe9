//! What the enclave's integration tests share: the test clock, PCR, id and policy-chain fixtures, the
//! deterministic random source, and one sans-IO server step (a frame in, the KRE's answer
//! out) with the client's full fetch on top of it. It trusts nothing: every helper panics on
//! an answer other than the one its caller asked for. Each test file includes it as
//! `mod common;` and uses what it needs, hence `dead_code` is allowed here.
#![allow(dead_code)]

use std::collections::BTreeMap;

use keygate_attestation::bundle::{self, PolicyBody};
use keygate_attestation::crypto::default_backend;
use keygate_attestation::crypto::{Crypto, P384Scalar};
use keygate_attestation::mock::{public_point, MockNsm};
use keygate_attestation::policy::{ClusterRule, ImageRule, ReleasePolicy};
use keygate_attestation::{DocumentKind, PcrExpectation, Verifier};
use keygate_enclave::kre::{Connection, Env, Kre, Step};
use keygate_enclave::peer::client::{self, ClientError, FetchRequest, ReleasedKey};
use keygate_enclave::peer::custodian::{self, Expectations};
use keygate_enclave::wire::{Channel, DenyCode, Id, Message, StateReport};
use p384::ecdsa::signature::Signer;
use p384::ecdsa::SigningKey;

/// The tests' wall clock: 2026-11-24 07:00 UTC, within the mock NSM's certificates.
pub(crate) const T: u64 = 1_795_478_400_000 + 7 * 3_600_000;

thread_local! {
    /// The clock of this test (every KRE, NSM and client of a test runs on its thread).
    static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(T) };
}

/// The current test time: [`T`] unless the test moved it with [`set_now`].
pub(crate) fn now() -> u64 {
    NOW.with(std::cell::Cell::get)
}

/// Moves this test's clock.
pub(crate) fn set_now(t: u64) {
    NOW.with(|n| n.set(t));
}

/// PCR0-2 of a mock image: `b`, `b + 1` and `b + 2`, 48 bytes each.
pub(crate) fn pcrs(b: u8) -> BTreeMap<u8, Vec<u8>> {
    (0u8..3).map(|i| (i, vec![b + i; 48])).collect()
}

/// The expectations that pin exactly the PCRs `p`.
pub(crate) fn expectations(p: &BTreeMap<u8, Vec<u8>>) -> Vec<PcrExpectation> {
    p.iter().map(|(i, v)| PcrExpectation { index: *i, value: v.clone() }).collect()
}

/// An enclave image named `name` with the PCRs `pcrs(b)`, valid at any time.
pub(crate) fn image(name: &str, b: u8) -> ImageRule {
    ImageRule { name: name.into(), pcrs: pcrs(b), kind: DocumentKind::Enclave, not_after_ms: None, not_before_ms: None }
}

/// "prod" allows the image "cp" with PCRs `pcrs(0x10)`, with the given KEK schedule.
pub(crate) fn prod_policy(kek_version: u32, kek_retire_below: u32) -> ReleasePolicy {
    let rule = ClusterRule { images: vec![image("cp", 0x10)], kek_version, kek_retire_below };
    ReleasePolicy { clusters: BTreeMap::from([("prod".into(), rule)]), allow_debug: false }
}

/// A genesis body: version 1, `approver` alone (threshold 1), `policy`, a 1 h activation
/// delay, no members and no timestamp key.
pub(crate) fn genesis_body(approver: &SigningKey, policy: ReleasePolicy) -> PolicyBody {
    PolicyBody {
        version: 1,
        previous: [0; 48],
        issued_at: T / 1000 - 60,
        activation_delay: 3600,
        approvers: vec![public_point(approver).try_into().expect("97 bytes")],
        threshold: 1,
        policy,
        members: Vec::new(),
        freshness: None,
    }
}

/// The genesis bundle of `body` (a genesis carries no signatures: the KRE is given it).
pub(crate) fn genesis_bundle(body: &PolicyBody) -> Vec<u8> {
    bundle::encode_bundle(&bundle::encode_body(body), &[])
}

/// The body after `last`: the next version, linked to it, otherwise the same.
pub(crate) fn next_body(last: &PolicyBody) -> PolicyBody {
    PolicyBody { version: last.version + 1, previous: bundle::digest(&bundle::encode_body(last)), ..last.clone() }
}

/// `body` as a bundle signed by `approver` alone.
pub(crate) fn signed_bundle(body: &PolicyBody, approver: &SigningKey) -> Vec<u8> {
    let body_bytes = bundle::encode_body(body);
    let sig: p384::ecdsa::Signature = approver.sign(&bundle::signing_message(&body_bytes));
    bundle::encode_bundle(&body_bytes, &[(public_point(approver), sig.to_bytes().to_vec())])
}

pub(crate) fn id(s: &str) -> Id {
    Id::new(s).expect("id")
}

/// A deterministic generator (tests only; the server uses the OS RNG).
pub(crate) fn rng_from(seed: u64) -> impl FnMut(&mut [u8]) {
    let mut n = seed;
    move |b: &mut [u8]| {
        for x in b.iter_mut() {
            n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = u8::try_from(n >> 56).unwrap_or(0);
        }
    }
}

/// The generator a client uses when the test does not care which stream it gets.
pub(crate) fn rng() -> impl FnMut(&mut [u8]) {
    rng_from(0)
}

/// SHA-384 of `bytes` (what the parent names a stored blob by).
pub(crate) fn sha384(bytes: &[u8]) -> [u8; 48] {
    sha2::Digest::finalize(<sha2::Sha384 as sha2::Digest>::new_with_prefix(bytes)).into()
}

/// One server step at `now`; each call gets its own random stream so challenges differ.
pub(crate) fn step_at(conn: &mut Connection, kre: &Kre, frame: &[u8], now: u64) -> Step {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(1);
    let mut r = rng_from(CALLS.fetch_add(1, Ordering::Relaxed) * 7919);
    conn.on_frame(kre, &frame[4..], &mut Env { now_ms: now, rng: &mut r })
}

/// One server step at the test's clock.
pub(crate) fn step(conn: &mut Connection, kre: &Kre, frame: &[u8]) -> Step {
    step_at(conn, kre, frame, now())
}

/// A request on a new connection of its own channel, and the KRE's answer.
pub(crate) fn one(kre: &Kre, m: Message) -> Message {
    let s = step(&mut Connection::new(m.channel().expect("a request")), kre, &m.encode().expect("encode"));
    Message::decode(&s.reply[4..]).expect("reply")
}

/// The state report the KRE answers `m` with.
pub(crate) fn report(kre: &Kre, m: Message) -> StateReport {
    match one(kre, m) {
        Message::StateReport(r) => *r,
        other => panic!("expected StateReport, got {other:?}"),
    }
}

/// The code and reason of a `Denied` answer.
pub(crate) fn denied(m: Message) -> (DenyCode, String) {
    match m {
        Message::Denied { code, reason } => (code, reason),
        other => panic!("expected Denied, got {other:?}"),
    }
}

/// The code and reason of a fetch the KRE refused.
pub(crate) fn fetch_denial(r: Result<Vec<ReleasedKey>, ClientError>) -> (DenyCode, String) {
    match r {
        Err(ClientError::Denied { code, reason }) => (code, reason),
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// A whole fetch at the test's clock by the control plane `cpi`: Hello, its check of the
/// Challenge, Release, and its check of the answer.
pub(crate) fn fetch_as(kre: &Kre, cpi: &MockNsm, req: FetchRequest) -> Result<Vec<ReleasedKey>, ClientError> {
    let mut r = rng_from(5);
    let (ac, hello) = client::start(req, &mut r).expect("hello");
    let mut conn = Connection::new(Channel::Release);
    let s = step(&mut conn, kre, &hello);
    let ar = ac
        .on_challenge(&s.reply[4..], &Verifier::new(cpi.root_anchor()), now(), cpi, default_backend(), &mut r)
        .expect("challenge");
    let s = step(&mut conn, kre, &ar.release_frame.clone());
    ar.on_released(&s.reply[4..], default_backend()).map(|r| r.keys)
}

/// What the parent stores of an export: the sealed blob, the shares file, the genesis
/// attestation.
pub(crate) type Stored = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Stores what the KRE exports (as the parent does) and commits it; returns the committed
/// generation and, when there was an export, what was stored.
pub(crate) fn sync_stored(kre: &Kre) -> (u64, Option<Stored>) {
    let r = report(kre, Message::StatePoll);
    if r.export_generation == 0 {
        return (r.committed_generation, None);
    }
    let stored = (r.blob.clone(), r.shares.clone(), r.genesis_attestation.clone());
    match one(kre, Message::StateCommit { generation: r.export_generation, blob_sha384: sha384(&r.blob) }) {
        Message::StateCommitted { generation } => (generation, Some(stored)),
        other => panic!("expected StateCommitted, got {other:?}"),
    }
}

/// The custodians holding `scalars` unseal `kre` over its custodian channel, one after the
/// other, each checking the offer against `expect`; the last share makes it serve.
pub(crate) fn unseal_with(kre: &Kre, scalars: &[P384Scalar], expect: &Expectations<'_>, crypto: &dyn Crypto) {
    for (i, scalar) in scalars.iter().enumerate() {
        let nonce = [u8::try_from(i).expect("small") + 1; 32];
        let mut conn = Connection::new(Channel::Custodian);
        let s = step(&mut conn, kre, &Message::UnsealHello { client_nonce: nonce }.encode().expect("hello"));
        let resp = custodian::on_offer(&s.reply[4..], &nonce, expect, scalar, crypto, &mut rng_from(9))
            .expect("the custodian accepts the offer");
        let s = step(&mut conn, kre, &resp.frame);
        assert_eq!(custodian::on_progress(&s.reply[4..]).expect("progress").2, i + 1 == scalars.len());
    }
}

/// What a custodian with no record yet expects at `now()`: the KRE (and the genesis KRE) with
/// `kre_pcrs`, trusted through `verifier`; consenting to a cold start or not.
pub(crate) fn custodian_expects<'a>(
    verifier: &'a Verifier,
    kre_pcrs: &'a [PcrExpectation],
    cold_start: bool,
) -> Expectations<'a> {
    Expectations {
        verifier,
        now_ms: now(),
        kre_pcrs,
        genesis_pcrs: kre_pcrs,
        record: None,
        accept_new_genesis: false,
        approve_reshare: None,
        cold_start,
    }
}
