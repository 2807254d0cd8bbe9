//! The etcd store's logic against an in-memory key-value store that applies transactions
//! atomically and can lose the reply of a write it applied (the ambiguous outcome of a
//! timeout).

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::storage::crash::blob;

/// An in-memory [`Kv`]: transactions are atomic; a planned fault fires on the next txn.
#[derive(Debug, Default)]
pub(crate) struct MemKv {
    pub(crate) map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The next txn applies, but its caller gets a timeout.
    pub(crate) lose_next_reply: bool,
    /// The next txn fails before it is applied.
    pub(crate) fail_next: bool,
    pub(crate) txns: usize,
}

fn timeout() -> EtcdError {
    EtcdError::Timeout { op: "txn", endpoint: "mem".into(), limit: Duration::from_secs(1) }
}

impl Kv for MemKv {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
        Ok(self.map.get(key).cloned())
    }

    fn txn(&mut self, when: &[Cond], puts: &[(Vec<u8>, Vec<u8>)], deletes: &[Vec<u8>]) -> Result<bool, EtcdError> {
        self.txns += 1;
        if std::mem::take(&mut self.fail_next) {
            return Err(timeout());
        }
        let holds = when.iter().all(|c| match c {
            Cond::Absent(k) => !self.map.contains_key(k),
            Cond::ValueIs(k, v) => self.map.get(k) == Some(v),
        });
        if holds {
            for (k, v) in puts {
                self.map.insert(k.clone(), v.clone());
            }
            for k in deletes {
                self.map.remove(k);
            }
        }
        if std::mem::take(&mut self.lose_next_reply) {
            return Err(timeout());
        }
        Ok(holds)
    }
}

fn store() -> EtcdStore<MemKv> {
    EtcdStore::new(MemKv::default(), "/kg")
}

/// Another blob with generation `g` (another KRE's export of the same generation).
fn other(g: u64) -> Vec<u8> {
    let mut b = blob(g);
    let n = b.len();
    b[70] ^= 1; // the nonce
    let d = <sha2::Sha384 as sha2::Digest>::digest(&b[..n - 48]);
    b[n - 48..].copy_from_slice(&d);
    b
}

#[test]
fn genesis_next_generations_keep_the_previous_and_load_the_newest() {
    let mut s = store();
    assert_eq!(s.load(0).expect("empty"), None);
    assert!(matches!(s.load(1), Err(StoreError::Unusable(Unusable::NoIntactState { .. }))));
    for g in 1..=4 {
        assert_eq!(s.store(&blob(g)).expect("store"), g);
    }
    let keys: Vec<String> = s.kv.map.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(
        keys,
        ["/kg/state/current", "/kg/state/gen/00000000000000000003", "/kg/state/gen/00000000000000000004"],
        "the current and the previous generation, nothing older"
    );
    assert_eq!(s.kv.map[b"/kg/state/current".as_slice()], b"4");
    let l = s.load(4).expect("load").expect("some");
    assert_eq!((l.slot, l.header.generation, l.blob.clone(), l.skipped.clone()), (Slot::Current, 4, blob(4), vec![]));
    assert!(matches!(s.load(5), Err(StoreError::Unusable(Unusable::Rollback { found: 4, min: 5 }))));
}

/// The CAS: a writer that saw generation 4 stores 5; another that also saw 4 loses with a
/// typed conflict, and the stored bytes are the winner's.
#[test]
fn two_writers_of_one_generation_exactly_one_wins() {
    let mut s = store();
    for g in 1..=4 {
        s.store(&blob(g)).expect("store");
    }
    let seen = s.current().expect("current");
    assert_eq!(s.store_seen(&blob(5), seen).expect("first writer"), 5);
    let err = s.store_seen(&other(5), seen).expect_err("second writer");
    assert!(matches!(err, StoreError::Conflict { generation: 5, stored: 5 }), "{err}");
    // A writer one generation behind.
    assert!(matches!(s.store_seen(&other(4), Some(3)), Err(StoreError::Conflict { generation: 4, stored: 5 })));
    assert_eq!(s.load(5).expect("load").expect("some").blob, blob(5));
}

#[test]
fn retries_stale_gaps_and_invalid_blobs() {
    let mut s = store();
    for g in 1..=2 {
        s.store(&blob(g)).expect("store");
    }
    let n = s.kv.txns;
    assert_eq!(s.store(&blob(2)).expect("same bytes again: a retry"), 2);
    assert_eq!(s.kv.txns, n, "a retry writes nothing");
    assert!(matches!(s.store(&other(2)), Err(StoreError::Conflict { generation: 2, stored: 2 })));
    assert!(matches!(s.store(&blob(1)), Err(StoreError::Conflict { generation: 1, stored: 2 })));
    assert!(matches!(s.store(&blob(4)), Err(StoreError::Gap { generation: 4, stored: 2 })));
    let mut torn = blob(3);
    torn.truncate(40);
    assert!(matches!(s.store(&torn), Err(StoreError::InvalidBlob(_))));
    // An empty store takes its first generation, whichever (a move from a directory store).
    let mut fresh = store();
    assert_eq!(fresh.store(&blob(7)).expect("first"), 7);
    assert_eq!(fresh.load(7).expect("load").map(|l| l.header.generation), Some(7));
}

/// A write whose reply is lost (a timeout after etcd applied it): the caller gets an error and
/// does not commit; the retry finds its own bytes and succeeds without writing again.
#[test]
fn a_lost_reply_is_an_error_and_the_retry_is_idempotent() {
    let mut s = store();
    s.store(&blob(1)).expect("store");
    s.kv.lose_next_reply = true;
    assert!(matches!(s.store(&blob(2)), Err(StoreError::Etcd(EtcdError::Timeout { .. }))));
    assert_eq!(s.store(&blob(2)).expect("retry"), 2);
    // Failed before applying: nothing changed, the retry writes.
    s.kv.fail_next = true;
    assert!(s.store(&blob(3)).is_err());
    assert_eq!(s.current().expect("current"), Some(2));
    assert_eq!(s.store(&blob(3)).expect("retry"), 3);
}

#[test]
fn a_damaged_or_misnamed_current_falls_back_to_the_previous() {
    for damage in 0..3 {
        let mut s = store();
        for g in 1..=3 {
            s.store(&blob(g)).expect("store");
        }
        let key = s.generation_key(3).into_bytes();
        match damage {
            0 => s.kv.map.get_mut(&key).expect("gen 3")[100] ^= 1,
            1 => {
                s.kv.map.insert(key, blob(2));
            }
            _ => {
                s.kv.map.remove(&key);
            }
        }
        let l = s.load(2).expect("load").expect("some");
        assert_eq!((l.slot, l.header.generation), (Slot::Previous, 2), "damage {damage}");
        let want = [
            matches!(l.skipped[..], [(Slot::Current, SlotProblem::Damaged(_))]),
            l.skipped == [(Slot::Current, SlotProblem::WrongGeneration { named: 3, holds: 2 })],
            l.skipped == [(Slot::Current, SlotProblem::Missing)],
        ];
        assert!(want[damage], "damage {damage}: {:?}", l.skipped);
        assert!(
            matches!(s.load(3), Err(StoreError::Unusable(Unusable::Rollback { found: 2, min: 3 }))),
            "damage {damage}"
        );
    }
    // A current key that is not a number.
    let mut s = store();
    s.kv.map.insert(b"/kg/state/current".to_vec(), b"3x".to_vec());
    assert!(matches!(s.load(0), Err(StoreError::MalformedCurrent { .. })));
    assert!(matches!(s.store(&blob(1)), Err(StoreError::MalformedCurrent { .. })));
}

#[test]
fn custody_is_written_once_and_never_replaced() {
    let mut s = store();
    let d = [7u8; 48];
    assert_eq!(s.load_custody(&d).expect("none"), None);
    s.store_custody(&d, b"custody-a").expect("first");
    s.store_custody(&d, b"custody-a").expect("the same again");
    assert!(matches!(s.store_custody(&d, b"custody-b"), Err(StoreError::CustodyConflict { .. })));
    assert_eq!(s.load_custody(&d).expect("some").as_deref(), Some(b"custody-a".as_slice()));
    assert!(matches!(
        s.store_custody(&d, &vec![0; MAX_CUSTODY + 1]),
        Err(StoreError::TooLarge { max: MAX_CUSTODY, .. })
    ));
}

/// An intact sealed blob over the etcd limit (many KEK versions) is refused before anything is
/// sent.
#[test]
fn an_oversized_blob_is_refused_before_it_is_sent() {
    use keygate_enclave::codec::Id;
    use keygate_enclave::crypto::keys::KekStatus;
    use keygate_enclave::state::sealed::{KekEntry, KreState};
    let mut state = KreState { generation: 1, ..KreState::default() };
    for c in 0..40 {
        let versions = (1..=800u32)
            .map(|v| KekEntry {
                version: v,
                status: KekStatus::Active,
                kek: keygate_attestation::secret::Secret::new([3; 32]),
            })
            .collect();
        state.clusters.insert(Id::new(&format!("c{c}")).expect("id"), versions);
    }
    let big = sealed::seal(
        &state,
        &keygate_attestation::secret::Secret::new([0x61; 32]),
        &[0x11; 48],
        &mut |b: &mut [u8]| b.fill(1),
        keygate_attestation::crypto::default_backend(),
    )
    .expect("seal");
    assert!(big.len() > MAX_VALUE && big.len() <= sealed::MAX_BLOB, "{}", big.len());
    let mut s = store();
    assert!(matches!(s.store(&big), Err(StoreError::TooLarge { max: MAX_VALUE, .. })));
    assert_eq!(s.kv.txns, 0);
}
