//! The etcd audit store's rules against the in-memory key-value store (`MemKv`, which applies
//! transactions atomically): the key layout and the head's encoding, the split into
//! transactions, appends and repeated appends, a race between two writers, and every refusal
//! of what it reads.

use keygate_attestation::crypto::default_backend;
use keygate_enclave::audit::{AuditConfig, AuditEvent, AuditLog, AuditSigner};

use super::*;
use crate::storage::etcd::tests::MemKv;

impl KvRange for MemKv {
    fn range(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Pair>, bool), EtcdError> {
        let all: Vec<Pair> =
            self.map.range(start.to_vec()..end.to_vec()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let more = all.len() > limit;
        Ok((all.into_iter().take(limit).collect(), more))
    }
}

/// A KRE's audit log (its chain id follows from `key_fill`).
pub(crate) fn log(key_fill: u8) -> AuditLog {
    let mut s = AuditSigner::generate(default_backend(), |b| b.fill(key_fill)).expect("key");
    s.bind(vec![1; 10]).expect("bind");
    AuditLog::new(AuditConfig::default(), s)
}

/// Appends entries `from..=to` to `l`.
pub(crate) fn grow(l: &mut AuditLog, from: u64, to: u64) -> Vec<AuditEntry> {
    for i in from..=to {
        l.append(AuditEvent::ConfigChanged { setting: "n".into(), value: i.to_string() }, i).expect("append");
    }
    l.entries_after(from - 1, usize::MAX)
}

fn store() -> EtcdAudit<MemKv> {
    EtcdAudit::new(MemKv::default(), "/kg")
}

fn keys_of(s: &EtcdAudit<MemKv>) -> Vec<String> {
    s.kv.map.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
}

#[test]
fn the_keys_and_the_head_are_as_documented_and_a_head_is_read_strictly() {
    let chain = [0xab; 48];
    let k = ChainKeys::new("/kg", &chain);
    let base = format!("/kg/audit/{}", "ab".repeat(48));
    assert_eq!(k.head(), format!("{base}/head"));
    assert_eq!(k.entry(7), format!("{base}/e/00000000000000000007"));
    assert_eq!(k.checkpoint(2), format!("{base}/c/00000000000000000002"));
    let h = Head { seq: 12, digest: [0xcd; 48], checkpoints: 3, cp_seq: 10 };
    let v = h.encode();
    assert_eq!(String::from_utf8_lossy(&v), format!("v1 12 {} 3 10", "cd".repeat(48)));
    assert!(v.len() <= MAX_HEAD);
    assert_eq!(Head::decode("k", &v).expect("decode"), h);
    let d = "cd".repeat(48);
    for bad in [
        format!("v2 12 {d} 3 10"),
        format!("v1 012 {d} 3 10"),
        format!("v1 12 {d} 3 13"),
        format!("v1 12 {d} 0 10"),
        format!("v1 12 {} 3 10", "CD".repeat(48)),
        format!("v1 12 {} 3 10", "cd".repeat(47)),
        format!("v1 12 {d} 3 10 "),
        format!("v1  12 {d} 3 10"),
        format!("v1 -1 {d} 3 10"),
        format!("v1 99999999999999999999 {d} 3 10"),
        "x".repeat(MAX_HEAD + 1),
    ] {
        assert!(matches!(Head::decode("k", bad.as_bytes()), Err(AuditStoreError::MalformedHead { .. })), "{bad}");
    }
}

#[test]
fn a_large_pull_is_split_into_transactions_each_conditioned_on_the_head_the_one_before_left() {
    let mut l = log(7);
    let es = grow(&mut l, 1, 250);
    let cp = l.checkpoint(1000).expect("checkpoint");
    let plan = plan_append(None, None, &es, std::slice::from_ref(&cp)).expect("plan");
    let chain = *es[0].chain_id();
    let keys = ChainKeys::new("/kg", &chain);
    let txns = batches(&keys, None, Head::empty(&chain), &plan);
    assert_eq!(txns.iter().map(|t| (t.entries, t.checkpoints)).collect::<Vec<_>>(), [(100, 0), (100, 0), (50, 1)]);
    let head_key = keys.head().into_bytes();
    assert_eq!(txns[0].when[0], Cond::Absent(head_key.clone()), "a new chain: the head must be absent");
    for (i, t) in txns.iter().enumerate() {
        assert!(t.when.len() <= 128 && t.puts.len() <= 128, "under etcd's default --max-txn-ops");
        // Every record key create-only; the head put last.
        assert!(t.when[1..].iter().zip(&t.puts).all(|(c, (k, _))| *c == Cond::Absent(k.clone())));
        let (k, v) = t.puts.last().expect("head");
        assert_eq!(*k, head_key);
        if let Some(next) = txns.get(i + 1) {
            assert_eq!(next.when[0], Cond::ValueIs(head_key.clone(), v.clone()), "chained on the head left");
        }
    }
    let last = Head::decode("h", &txns[2].puts.last().expect("head").1).expect("head");
    assert_eq!(last, Head { seq: 250, digest: es[249].digest(), checkpoints: 1, cp_seq: 250 });
    // Nothing to write: no transaction.
    let none = plan_append(Some(&es[249]), None, &es, &[]).expect("plan");
    assert!(batches(&keys, Some(b"x"), last, &none).is_empty());
}

#[test]
fn appends_write_each_record_once_and_read_back_the_trail() {
    let mut s = store();
    let mut l = log(7);
    let es = grow(&mut l, 1, 3);
    let cp3 = l.checkpoint(100).expect("cp");
    let chain = *es[0].chain_id();
    let r = s.append(&chain, &es, std::slice::from_ref(&cp3)).expect("append");
    assert_eq!((r.report.entries_written, r.report.checkpoints_written, r.report.last_seq, r.txns), (3, 1, 3, 1));
    let base = format!("/kg/audit/{}", hex::encode(chain));
    let mut want: Vec<String> = (1..=3).map(|i| format!("{base}/e/{i:020}")).collect();
    want.insert(0, format!("{base}/c/00000000000000000001"));
    want.push(format!("{base}/head"));
    assert_eq!(keys_of(&s), want);
    // The same pull again: all skipped, nothing written, no transaction.
    let txns = s.kv.txns;
    let r = s.append(&chain, &es, std::slice::from_ref(&cp3)).expect("again");
    assert_eq!((r.report.entries_skipped, r.report.checkpoints_skipped, r.report.last_seq, r.txns), (3, 1, 3, 0));
    assert_eq!(s.kv.txns, txns);
    // A later pull overlapping; a new checkpoint at an unchanged head is kept as well.
    let more = grow(&mut l, 4, 5);
    let cp5 = l.checkpoint(200).expect("cp");
    let cp5b = l.checkpoint(300).expect("cp");
    let all = l.entries_after(0, 100);
    s.append(&chain, &all[1..], std::slice::from_ref(&cp5)).expect("append");
    s.append(&chain, &[], std::slice::from_ref(&cp5b)).expect("a second checkpoint at seq 5");
    let t = s.read(&chain).expect("read");
    assert_eq!(t.entries, all);
    assert_eq!(t.checkpoints, [cp3, cp5, cp5b]);
    assert_eq!(more.len(), 2);
    assert_eq!(s.chains(10).expect("chains"), [chain]);
    // Another chain beside it: listed, in key order.
    let other = grow(&mut log(9), 1, 1);
    s.append(other[0].chain_id(), &other, &[]).expect("append");
    let mut want = vec![chain, *other[0].chain_id()];
    want.sort();
    assert_eq!(s.chains(10).expect("chains"), want);
    assert!(matches!(s.chains(1), Err(AuditStoreError::TooMany { max: 1, .. })));
}

#[test]
fn a_pull_that_does_not_continue_the_chain_is_refused_with_the_directory_s_error() {
    let mut s = store();
    let mut l = log(7);
    let es = grow(&mut l, 1, 4);
    let chain = *es[0].chain_id();
    s.append(&chain, &es[..2], &[]).expect("append");
    let e = s.append(&chain, &es[3..], &[]).expect_err("a gap");
    assert!(matches!(e, AuditStoreError::Chain { source: StoreError::Gap { expected: 3, found: 4 }, .. }), "{e}");
    let other = grow(&mut log(9), 1, 1);
    let e = s.append(&chain, &other, &[]).expect_err("foreign");
    assert!(matches!(e, AuditStoreError::Chain { source: StoreError::ForeignChain { seq: 1 }, .. }), "{e}");
    // Even into an empty chain: the key names the chain.
    let e = s.append(&[1; 48], &es[..1], &[]).expect_err("foreign");
    assert!(matches!(e, AuditStoreError::Chain { source: StoreError::ForeignChain { seq: 1 }, .. }), "{e}");
    assert_eq!(s.read(&chain).expect("read").entries, es[..2]);
}

/// What another writer does (on the same store).
type OtherWriter = Box<dyn FnOnce(&mut EtcdAudit<MemKv>)>;

/// A [`MemKv`] on which another writer appends just before this writer's first transaction.
struct Racing {
    kv: MemKv,
    other: Option<OtherWriter>,
    /// Drop the head condition from this writer's transactions (what the race shows wrong).
    without_head_condition: bool,
}

impl Kv for Racing {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
        self.kv.get(key)
    }

    fn txn(&mut self, when: &[Cond], puts: &[(Vec<u8>, Vec<u8>)], deletes: &[Vec<u8>]) -> Result<bool, EtcdError> {
        if let Some(f) = self.other.take() {
            let mut other = EtcdAudit::new(std::mem::take(&mut self.kv), "/kg");
            f(&mut other);
            self.kv = other.kv;
        }
        let when: Vec<Cond> = if self.without_head_condition {
            when.iter().filter(|c| !matches!(c, Cond::ValueIs(..))).cloned().collect()
        } else {
            when.to_vec()
        };
        self.kv.txn(&when, puts, deletes)
    }
}

impl KeyRange for Racing {
    fn keys(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Vec<u8>>, bool), EtcdError> {
        self.kv.keys(start, end, limit)
    }
}

impl KvRange for Racing {
    fn range(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Pair>, bool), EtcdError> {
        self.kv.range(start, end, limit)
    }
}

/// B read the head, then A stored a checkpoint (moving the head) before B's transaction: B's
/// transaction does not apply, B plans again and writes over A's head. Without the head
/// condition B's head would name one checkpoint fewer than stored (a lost update) and the
/// next checkpoint could never be appended.
fn race(without_head_condition: bool) -> Result<(), String> {
    let mut l = log(7);
    let es = grow(&mut l, 1, 3);
    let cp3 = l.checkpoint(100).expect("cp");
    let more = grow(&mut l, 4, 5);
    let cp5 = l.checkpoint(200).expect("cp");
    let chain = *es[0].chain_id();
    let mut first = store();
    first.append(&chain, &es, &[]).expect("entries 1-3");
    let other: OtherWriter = Box::new(move |a| {
        a.append(&chain, &[], std::slice::from_ref(&cp3)).expect("A stores a checkpoint at seq 3");
    });
    let mut b = EtcdAudit::new(Racing { kv: first.kv, other: Some(other), without_head_condition }, "/kg");
    let r = b.append(&chain, &more, &[]).map_err(|e| e.to_string())?;
    if r.replans != 1 || r.report.entries_written != 2 {
        return Err(format!("B did not plan again: {r:?}"));
    }
    let (_, head) = b.head(&chain).map_err(|e| e.to_string())?;
    if head != (Head { seq: 5, digest: more[1].digest(), checkpoints: 1, cp_seq: 3 }) {
        return Err(format!("the head lost A's checkpoint: {head:?}"));
    }
    b.append(&chain, &[], std::slice::from_ref(&cp5)).map_err(|e| e.to_string())?;
    let t = b.read(&chain).map_err(|e| e.to_string())?;
    if t.entries.len() != 5 || t.checkpoints.len() != 2 {
        return Err(format!("{} entries, {} checkpoints", t.entries.len(), t.checkpoints.len()));
    }
    Ok(())
}

#[test]
fn two_writers_racing_on_one_chain_cannot_interleave_the_loser_plans_again() {
    race(false).expect("with the head condition");
    assert!(race(true).is_err(), "without the head condition the race loses an update");
}

#[test]
fn what_is_read_is_checked_against_the_head_and_bounded() {
    let mut l = log(7);
    let es = grow(&mut l, 1, 3);
    let cp = l.checkpoint(100).expect("cp");
    let chain = *es[0].chain_id();
    let k = ChainKeys::new("/kg", &chain);
    let fresh = || {
        let mut s = store();
        s.append(&chain, &es, std::slice::from_ref(&cp)).expect("append");
        // Another parent's store: it reads the head (a store that wrote it plans on what it
        // left, and its transaction's head condition holds).
        EtcdAudit::new(s.kv, "/kg")
    };
    let next = grow(&mut l, 4, 4);
    let put = |s: &mut EtcdAudit<MemKv>, key: String, v: Vec<u8>| {
        s.kv.map.insert(key.into_bytes(), v);
    };
    // The head names an entry that is gone; another entry; a checkpoint that is gone.
    let mut s = fresh();
    s.kv.map.remove(k.entry(3).as_bytes());
    let e = s.append(&chain, &next, &[]).expect_err("missing");
    assert!(matches!(e, AuditStoreError::HeadMismatch { what: "an entry not stored", .. }), "{e}");
    let mut s = fresh();
    put(&mut s, k.entry(3), es[1].bytes().to_vec());
    assert!(matches!(s.append(&chain, &next, &[]), Err(AuditStoreError::HeadMismatch { .. })));
    let mut s = fresh();
    s.kv.map.remove(k.checkpoint(1).as_bytes());
    assert!(matches!(s.append(&chain, &next, &[]), Err(AuditStoreError::HeadMismatch { .. })));
    // A malformed head; a record beyond the head (written without it).
    let mut s = fresh();
    put(&mut s, k.head(), b"v1 3".to_vec());
    assert!(matches!(s.append(&chain, &next, &[]), Err(AuditStoreError::MalformedHead { .. })));
    let mut s = fresh();
    put(&mut s, k.entry(4), next[0].bytes().to_vec());
    let e = s.append(&chain, &next, &[]).expect_err("orphaned");
    assert!(matches!(e, AuditStoreError::Orphaned { .. }), "{e}");
    // Reads: a value over the limit, a value that is no entry, a key this store never writes.
    let mut s = fresh();
    put(&mut s, k.entry(2), vec![0; MAX_ENTRY_LEN + 1]);
    assert!(matches!(s.read(&chain), Err(AuditStoreError::TooLarge { len, .. }) if len == MAX_ENTRY_LEN + 1));
    let mut s = fresh();
    put(&mut s, k.entry(2), b"not an entry".to_vec());
    assert!(matches!(s.read(&chain), Err(AuditStoreError::Malformed { .. })));
    let mut s = fresh();
    put(&mut s, format!("{}/e/12", k.base()), es[1].bytes().to_vec());
    assert!(matches!(s.read(&chain), Err(AuditStoreError::BadKey { .. })));
    let mut s = fresh();
    put(&mut s, "/kg/audit/zz/head".to_owned(), Vec::new());
    assert!(matches!(s.chains(10), Err(AuditStoreError::BadKey { .. })));
    // A deleted entry is not hidden by the reader: the trail has a hole for verify to name.
    let mut s = fresh();
    s.kv.map.remove(k.entry(2).as_bytes());
    assert_eq!(s.read(&chain).expect("read").entries.iter().map(AuditEntry::seq).collect::<Vec<_>>(), [1, 3]);
}

#[test]
fn reads_page_through_long_chains() {
    let mut s = store();
    let mut l = log(7);
    let es = grow(&mut l, 1, u64::try_from(3 * PAGE + 5).expect("small"));
    let chain = *es[0].chain_id();
    s.append(&chain, &es, &[]).expect("append");
    assert_eq!(s.read(&chain).expect("read").entries, es);
}

#[test]
fn audit_stores_parse_as_a_directory_or_etcd() {
    assert_eq!(
        "/var/audit".parse::<AuditStore>().expect("dir"),
        AuditStore::Dir(std::path::PathBuf::from("/var/audit"))
    );
    let s: AuditStore = "etcd://h:1,h:2/kg".parse().expect("etcd");
    assert_eq!(s.to_string(), "etcd://h:1,h:2/kg");
    assert!("etcd://".parse::<AuditStore>().is_err());
}
