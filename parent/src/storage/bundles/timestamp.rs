//! The pipeline's newest policy timestamp (`keygate_attestation::freshness`) beside the
//! bundles, so that the daemon's replay hands a restarted KRE the timestamp it needs before it
//! releases: in a directory `policy-timestamp.cbor`, in etcd `PREFIX/policy-timestamp`.
//!
//! What it decides: a timestamp replaces the kept one only when it supersedes it (a newer
//! version, or a later one of the same); in etcd the replacement is a transaction on the value
//! read, retried a bounded number of times, so two pipelines writing at once never put an older
//! one back. What it trusts: nothing it reads — the KRE checks the signature; a timestamp here
//! is only decoded to compare times.

use keygate_attestation::freshness::{self, Timestamp};

use super::{read_capped, BundleStoreError, Bundles, EtcdBundles, KeyRange};
use crate::storage::etcd::{Cond, Kv};

/// The file of a directory store.
pub(crate) const TIMESTAMP_FILE: &str = "policy-timestamp.cbor";

/// How often a contended etcd write is tried.
const TRIES: usize = 8;

fn decode(key: &str, bytes: &[u8]) -> Result<Timestamp, BundleStoreError> {
    freshness::decode(bytes).map_err(|e| BundleStoreError::NotATimestamp { key: key.to_owned(), reason: e.to_string() })
}

impl<K: Kv + KeyRange> EtcdBundles<K> {
    pub(crate) fn timestamp_key(&self) -> String {
        format!("{}/policy-timestamp", self.prefix)
    }

    /// The kept timestamp's bytes, if any (bounded).
    pub(crate) fn timestamp(&mut self) -> Result<Option<Vec<u8>>, BundleStoreError> {
        let key = self.timestamp_key();
        match self.kv.get(key.as_bytes())? {
            Some(v) if v.len() > freshness::MAX_TIMESTAMP => {
                Err(BundleStoreError::TooLarge { what: key, len: v.len(), max: freshness::MAX_TIMESTAMP })
            }
            v => Ok(v),
        }
    }

    /// Keeps `bytes` unless the kept timestamp is as new; returns whether it was written.
    pub(crate) fn keep_timestamp(&mut self, bytes: &[u8]) -> Result<bool, BundleStoreError> {
        let key = self.timestamp_key();
        let new = decode(&key, bytes)?;
        for _ in 0..TRIES {
            let kept = self.timestamp()?;
            let cond = match &kept {
                Some(old) => {
                    if !freshness::supersedes(&new, Some(&decode(&key, old)?)) {
                        return Ok(false);
                    }
                    Cond::ValueIs(key.clone().into_bytes(), old.clone())
                }
                None => Cond::Absent(key.clone().into_bytes()),
            };
            if self.kv.txn(&[cond], &[(key.clone().into_bytes(), bytes.to_vec())], &[])? {
                return Ok(true);
            }
        }
        Err(BundleStoreError::Contended { key, tries: TRIES })
    }
}

impl Bundles {
    /// Where the timestamp is kept, for messages.
    pub(crate) fn timestamp_name(&self) -> String {
        match self {
            Bundles::Dir(d) => d.join(TIMESTAMP_FILE).display().to_string(),
            Bundles::Etcd(e) => e.timestamp_key(),
        }
    }

    /// The kept timestamp's bytes, if any.
    pub(crate) fn timestamp(&mut self) -> Result<Option<Vec<u8>>, BundleStoreError> {
        match self {
            Bundles::Etcd(e) => e.timestamp(),
            Bundles::Dir(dir) => read_capped(&dir.join(TIMESTAMP_FILE), freshness::MAX_TIMESTAMP),
        }
    }

    /// Keeps a timestamp the KRE took, unless the kept one is as new; returns whether it was
    /// written.
    pub(crate) fn keep_timestamp(&mut self, bytes: &[u8]) -> Result<bool, BundleStoreError> {
        let dir = match self {
            Bundles::Etcd(e) => return e.keep_timestamp(bytes),
            Bundles::Dir(dir) => dir.clone(),
        };
        let path = dir.join(TIMESTAMP_FILE);
        let name = path.display().to_string();
        let new = decode(&name, bytes)?;
        if let Some(old) = read_capped(&path, freshness::MAX_TIMESTAMP)? {
            if !freshness::supersedes(&new, Some(&decode(&name, &old)?)) {
                return Ok(false);
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|source| BundleStoreError::Io { context: format!("creating {}", dir.display()), source })?;
        keygate_enclave::atomic::write_file(&path, bytes)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use keygate_attestation::freshness::{encode, Timestamp};

    use super::*;
    use crate::storage::etcd::tests::MemKv;

    /// A timestamp (unsigned: the store only compares versions and times).
    fn stamp(version: u64, issued_ms: u64) -> Vec<u8> {
        encode(&Timestamp { version, digest: [1; 48], issued_ms, key: [4; 97], signature: [0; 96] })
    }

    type Keep<S> = fn(&mut S, &[u8]) -> Result<bool, BundleStoreError>;
    type Kept<S> = fn(&mut S) -> Result<Option<Vec<u8>>, BundleStoreError>;

    /// The replacement rule, through one store's `keep_timestamp` and `timestamp`.
    fn only_a_newer_one_replaces<S>(s: &mut S, keep: Keep<S>, kept: Kept<S>) {
        assert_eq!(kept(s).expect("none"), None);
        assert!(keep(s, &stamp(2, 100)).expect("first"));
        assert!(!keep(s, &stamp(2, 100)).expect("same"), "the same again changes nothing");
        assert!(!keep(s, &stamp(2, 99)).expect("older"));
        assert!(!keep(s, &stamp(1, 500)).expect("older version"));
        assert_eq!(kept(s).expect("kept"), Some(stamp(2, 100)));
        assert!(keep(s, &stamp(2, 101)).expect("later"));
        assert!(keep(s, &stamp(3, 1)).expect("newer version"));
        assert_eq!(kept(s).expect("kept"), Some(stamp(3, 1)));
        let e = keep(s, b"not a timestamp").expect_err("refused");
        assert!(matches!(e, BundleStoreError::NotATimestamp { .. }), "{e}");
    }

    #[test]
    fn only_a_newer_timestamp_replaces_the_kept_one_in_etcd_and_in_a_directory() {
        let mut etcd = EtcdBundles::new(MemKv::default(), "/kg");
        only_a_newer_one_replaces(&mut etcd, EtcdBundles::keep_timestamp, EtcdBundles::timestamp);
        let tmp = keygate_tests::TempDir::new("keygate-timestamp-dir").expect("tmp");
        let mut dir = Bundles::Dir(tmp.path().join("b"));
        only_a_newer_one_replaces(&mut dir, Bundles::keep_timestamp, Bundles::timestamp);
    }
}
