//! The bundle store's rules against an in-memory key-value store (the etcd store's `MemKv`,
//! which applies transactions atomically and can lose the reply of a write it applied).

use keygate_attestation::bundle::{self, PolicyBody};
use keygate_attestation::mock::{derive_key, public_point};

use super::*;
use crate::storage::etcd::tests::MemKv;

impl KeyRange for MemKv {
    fn keys(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Vec<u8>>, bool), EtcdError> {
        let all: Vec<Vec<u8>> = self.map.range(start.to_vec()..end.to_vec()).map(|(k, _)| k.clone()).collect();
        let more = all.len() > limit;
        Ok((all.into_iter().take(limit).collect(), more))
    }
}

/// A well-formed bundle of `version` (unsigned: the store only reads digests), `salt` making
/// another body of the same version.
pub(crate) fn test_bundle(version: u64, salt: u64) -> (Vec<u8>, [u8; 48]) {
    let k = derive_key(b"bundles", "approver");
    let point: bundle::ApproverKey = public_point(&k).try_into().expect("point");
    let body = PolicyBody {
        version,
        previous: [u8::try_from(version % 200).unwrap_or(0); 48],
        issued_at: 1_700_000_000 + salt,
        activation_delay: 0,
        approvers: vec![point],
        threshold: 1,
        policy: keygate_enclave::policy_file::parse(br#"{"clusters": {}}"#).expect("policy"),
        members: Vec::new(),
        freshness: None,
    };
    let b = bundle::encode_body(&body);
    (bundle::encode_bundle(&b, &[]), bundle::digest(&b))
}

fn store() -> EtcdBundles<MemKv> {
    EtcdBundles::new(MemKv::default(), "/kg")
}

#[test]
fn a_version_holds_one_bundle_the_same_again_is_a_retry_another_a_fork() {
    let (a, b) = ([1u8; 48], [2u8; 48]);
    assert_eq!(decide("k", 3, &a, None).expect("empty"), Keep::Write);
    assert_eq!(decide("k", 3, &a, Some(&a)).expect("same"), Keep::AlreadyKept);
    let e = decide("/kg/bundles/3", 3, &b, Some(&a)).expect_err("fork");
    assert!(matches!(&e, BundleStoreError::Fork { version: 3, .. }), "{e}");
    let m = e.to_string();
    assert!(m.contains(&hex::encode(a)) && m.contains(&hex::encode(b)) && m.contains("fork"), "{m}");
}

#[test]
fn bundles_are_kept_create_only_and_read_back_in_version_order() {
    let mut s = store();
    for v in [3, 1, 2, 10] {
        let (bytes, d) = test_bundle(v, 0);
        assert_eq!(s.keep(v, &d, &bytes).expect("keep"), format!("/kg/bundles/{v:020}"));
    }
    assert_eq!(s.versions_after(0).expect("list"), [1, 2, 3, 10]);
    assert_eq!(s.versions_after(2).expect("list"), [3, 10]);
    assert_eq!(s.versions_after(10).expect("list"), Vec::<u64>::new());
    assert_eq!(s.versions_after(u64::MAX).expect("list"), Vec::<u64>::new());
    assert_eq!(s.read(2).expect("read"), test_bundle(2, 0).0);

    // The same bundle again: nothing written. Another at a stored version: refused, before
    // and at the write, and the stored one stays.
    let txns = s.kv.txns;
    let (same, d) = test_bundle(2, 0);
    s.keep(2, &d, &same).expect("retry");
    assert_eq!(s.kv.txns, txns, "a retry writes nothing");
    let (fork, fd) = test_bundle(2, 1);
    assert!(matches!(s.check(2, &fd), Err(BundleStoreError::Fork { version: 2, .. })));
    let e = s.keep(2, &fd, &fork).expect_err("fork");
    assert!(e.to_string().contains(&hex::encode(d)) && e.to_string().contains(&hex::encode(fd)), "{e}");
    assert_eq!(s.read(2).expect("read"), same);
}

/// A [`MemKv`] where another parent's write lands just before our next transaction (after
/// our check read the key).
#[derive(Debug, Default)]
struct Racing {
    kv: MemKv,
    before_txn: Option<(Vec<u8>, Vec<u8>)>,
}

impl Kv for Racing {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
        self.kv.get(key)
    }

    fn txn(&mut self, when: &[Cond], puts: &[(Vec<u8>, Vec<u8>)], deletes: &[Vec<u8>]) -> Result<bool, EtcdError> {
        if let Some((k, v)) = self.before_txn.take() {
            self.kv.map.insert(k, v);
        }
        self.kv.txn(when, puts, deletes)
    }
}

impl KeyRange for Racing {
    fn keys(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Vec<u8>>, bool), EtcdError> {
        self.kv.keys(start, end, limit)
    }
}

/// Two parents keeping one version at once: the loser of the create-only write reads what
/// won — the same bundle is fine, another is a fork, and the winner's bundle stays. A lost
/// reply of an applied write is a retry.
#[test]
fn a_lost_race_or_a_lost_reply_is_told_apart_by_the_digest() {
    let (bytes, d) = test_bundle(4, 0);
    let (other, od) = test_bundle(4, 7);
    let mut s = EtcdBundles::new(Racing::default(), "/kg");
    let k = s.key(4);
    s.kv.before_txn = Some((k.clone().into_bytes(), other.clone()));
    let e = s.keep(4, &d, &bytes).expect_err("fork");
    assert!(matches!(e, BundleStoreError::Fork { ref key, .. } if *key == k), "{e}");
    assert_eq!(s.kv.kv.map.get(k.as_bytes()), Some(&other), "the first write stays");
    s.kv.kv.map.clear();
    s.kv.before_txn = Some((k.clone().into_bytes(), other.clone()));
    assert_eq!(s.keep(4, &od, &other).expect("the same bundle as stored"), k);

    let mut s = store();
    s.kv.lose_next_reply = true;
    assert!(matches!(s.keep(4, &d, &bytes), Err(BundleStoreError::Etcd(_))), "the outcome is unknown");
    assert_eq!(s.keep(4, &d, &bytes).expect("retry tells"), s.key(4));
}

#[test]
fn sizes_counts_and_keys_are_bounded() {
    let mut s = store();
    let big = vec![0u8; MAX_BUNDLE + 1];
    let txns = s.kv.txns;
    assert!(matches!(s.keep(5, &[0; 48], &big), Err(BundleStoreError::TooLarge { .. })));
    assert_eq!(s.kv.txns, txns, "refused before sending");
    // A value over the limit, or not a bundle, stored by someone else: refused on reading.
    s.kv.map.insert(s.key(5).into_bytes(), big);
    assert!(matches!(s.read(5), Err(BundleStoreError::TooLarge { .. })));
    assert!(matches!(s.check(5, &[0; 48]), Err(BundleStoreError::TooLarge { .. })));
    s.kv.map.insert(s.key(6).into_bytes(), b"junk".to_vec());
    assert!(matches!(s.check(6, &[0; 48]), Err(BundleStoreError::NotABundle { .. })));
    assert!(matches!(s.read(7), Err(BundleStoreError::Vanished { .. })));
    // A key under the prefix that names no version.
    s.kv.map.insert(b"/kg/bundles/x".to_vec(), Vec::new());
    assert!(matches!(s.versions_after(0), Err(BundleStoreError::BadKey { .. })));
    // Too many.
    let mut s = store();
    for v in 1..=u64::try_from(MAX_STORED).expect("fits") + 1 {
        s.kv.map.insert(s.key(v).into_bytes(), Vec::new());
    }
    assert!(matches!(s.versions_after(0), Err(BundleStoreError::TooMany { max: MAX_STORED, .. })));
    assert_eq!(s.versions_after(1).expect("exactly the limit").len(), MAX_STORED);
}

#[test]
fn a_store_is_a_directory_or_an_etcd_url() {
    assert_eq!("/var/b".parse::<BundleStore>().expect("dir"), BundleStore::Dir("/var/b".into()));
    let e: BundleStore = "etcd://10.0.0.1:2379,10.0.0.2:2379/kg".parse().expect("etcd");
    assert_eq!(e.to_string(), "etcd://10.0.0.1:2379,10.0.0.2:2379/kg");
    assert!(e.dir().is_none());
    assert!("etcd://nohost".parse::<BundleStore>().is_err(), "a bad etcd URL is an error, not a directory");
}

/// The directory backend behind the enum: files in version order, bounded reads.
#[test]
fn the_directory_backend_keeps_and_lists_files() {
    let dir = keygate_tests::TempDir::new("keygate-bundles-dir").expect("tmp");
    let mut b = BundleStore::Dir(dir.path().join("b")).open().expect("open");
    for v in [2, 1] {
        let (bytes, d) = test_bundle(v, 0);
        b.keep(v, &d, &bytes).expect("keep");
    }
    let entries = b.entries(0).expect("list");
    assert_eq!(entries.len(), 2);
    assert!(b.name(&entries[0]).ends_with("policy-v00000001.bundle"), "{}", b.name(&entries[0]));
    assert_eq!(b.read(&entries[1]).expect("read"), test_bundle(2, 0).0);
    std::fs::write(dir.path().join("b/policy-v00000003.bundle"), vec![0u8; MAX_BUNDLE + 1]).expect("write");
    let e = b.entries(0).expect("list");
    assert!(matches!(b.read(&e[2]), Err(BundleStoreError::TooLarge { .. })));
}
