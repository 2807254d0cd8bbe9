//! Where the parent keeps the policy bundles its KRE accepted, so that `policy restore` and the
//! daemon's replay (`policy_store`) can push them to a restarted KRE: a local directory
//! (`policy-v<N>.bundle`, one parent's own) or etcd (shared by the parents of a cluster, so a
//! member replays what another member's parent pushed).
//!
//! What it decides: in etcd, one key per version, `PREFIX/bundles/<version, 20 digits>`,
//! written only if absent (a transaction on the key's version being 0); [`decide`] — the same
//! bundle (body digest) again is a no-op, another bundle at a stored version is refused as a
//! fork ([`BundleStoreError::Fork`], naming both digests), checked before the push and again
//! when writing; every value is bounded by the KRE's bundle limit before it is sent or kept,
//! and a replay reads at most [`MAX_STORED`] keys, in version order. What it trusts: nothing
//! it reads — a stored bundle is only pushed, and the KRE checks its signatures and its chain;
//! etcd can withhold bundles (the replay then stops short, as a lost directory would), never
//! make the KRE accept one.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::etcd::client::{EtcdClient, EtcdError, Limits};
use super::etcd::{Cond, Kv};

/// The largest bundle kept or read back: the most the KRE takes.
pub(crate) const MAX_BUNDLE: usize = keygate_attestation::bundle::MAX_BUNDLE;
/// The most bundles one replay reads.
pub(crate) const MAX_STORED: usize = 10_000;

/// A bundle store as configured: `--store DIR` or `--store etcd://HOST:PORT[,…][/PREFIX]`.
pub(crate) type BundleStore = super::Location;

/// Why keeping or reading a bundle failed. Carries no bundle content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BundleStoreError {
    /// The store holds another bundle at this version: two bundles of one version were
    /// accepted (by different KREs), or one is being pushed over the other's chain.
    #[error(
        "{key} holds another bundle of version {version} (digest {stored}) than this one (digest {offered}): a fork of the policy chain; refused"
    )]
    Fork {
        /// The key or file.
        key: String,
        /// The version.
        version: u64,
        /// The stored bundle's body digest (hex).
        stored: String,
        /// The offered bundle's body digest (hex).
        offered: String,
    },
    /// A bundle over [`MAX_BUNDLE`].
    #[error("{what}: {len} bytes, over the bundle limit of {max} bytes")]
    TooLarge {
        /// The key or file.
        what: String,
        /// Its length (or a lower bound).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More bundles than one replay reads.
    #[error("{store} holds more than {max} bundles newer than version {after}; refusing to read them all")]
    TooMany {
        /// The store.
        store: String,
        /// The version after which they were counted.
        after: u64,
        /// The limit.
        max: usize,
    },
    /// A key under the bundles prefix that does not name a version.
    #[error("{key} is not a bundle key (PREFIX/bundles/<20-digit version>)")]
    BadKey {
        /// The key (shortened).
        key: String,
    },
    /// A stored value that is not a bundle.
    #[error("{key} does not hold a policy bundle: {reason}")]
    NotABundle {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A key listed a moment ago is gone (etcd is not written that way by parents).
    #[error("{key} was listed but is gone")]
    Vanished {
        /// The key.
        key: String,
    },
    /// A stored or offered value that is not a policy timestamp.
    #[error("{key} does not hold a policy timestamp: {reason}")]
    NotATimestamp {
        /// The key or file.
        key: String,
        /// Why.
        reason: String,
    },
    /// Other writers kept changing the key.
    #[error("{key} changed under {tries} attempts to write it")]
    Contended {
        /// The key.
        key: String,
        /// Attempts made.
        tries: usize,
    },
    /// The write was confirmed but reading it back gave other bytes.
    #[error("{key} reads back other bytes than were written")]
    ReadBackMismatch {
        /// The key.
        key: String,
    },
    /// The directory failed.
    #[error("{context}: {source}")]
    Io {
        /// What was done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// Writing a file failed (the previous file is untouched).
    #[error(transparent)]
    Write(#[from] keygate_enclave::atomic::AtomicWriteError),
    /// etcd failed (the outcome of a write is then unknown; keeping again tells).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// What keeping a bundle does, given what the store holds at its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Nothing there: write it (create-only).
    Write,
    /// The same bundle is there: nothing to do.
    AlreadyKept,
}

/// The create-only rule: a version holds one bundle; the same body digest again is a retry,
/// another is a fork.
pub(crate) fn decide(
    key: &str,
    version: u64,
    offered: &[u8; 48],
    stored: Option<&[u8; 48]>,
) -> Result<Keep, BundleStoreError> {
    match stored {
        None => Ok(Keep::Write),
        Some(s) if s == offered => Ok(Keep::AlreadyKept),
        Some(s) => Err(BundleStoreError::Fork {
            key: key.to_owned(),
            version,
            stored: hex::encode(s),
            offered: hex::encode(offered),
        }),
    }
}

/// The body digest of a stored bundle.
fn digest_of(key: &str, bytes: &[u8]) -> Result<[u8; 48], BundleStoreError> {
    use keygate_attestation::bundle;
    bundle::decode_bundle(bytes, keygate_attestation::crypto::default_backend())
        .map(|b| bundle::digest(&b.body_bytes))
        .map_err(|e| BundleStoreError::NotABundle { key: key.to_owned(), reason: e.to_string() })
}

fn bounded(what: &str, len: usize) -> Result<(), BundleStoreError> {
    if len > MAX_BUNDLE {
        return Err(BundleStoreError::TooLarge { what: what.to_owned(), len, max: MAX_BUNDLE });
    }
    Ok(())
}

/// What the etcd backend needs beyond [`Kv`]: the keys of a range, bounded.
pub(crate) trait KeyRange {
    /// At most `limit` keys in `[start, end)`, in order, and whether there are more.
    fn keys(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Vec<u8>>, bool), EtcdError>;
}

impl KeyRange for EtcdClient {
    fn keys(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Vec<u8>>, bool), EtcdError> {
        EtcdClient::keys(self, start, end, i64::try_from(limit).unwrap_or(i64::MAX))
    }
}

/// The bundles in etcd under a prefix.
#[derive(Debug)]
pub(crate) struct EtcdBundles<K> {
    kv: K,
    prefix: String,
}

impl<K: Kv + KeyRange> EtcdBundles<K> {
    /// The bundles under `prefix` of `kv`.
    pub(crate) fn new(kv: K, prefix: &str) -> Self {
        Self { kv, prefix: prefix.to_owned() }
    }

    pub(crate) fn key(&self, version: u64) -> String {
        format!("{}/bundles/{version:020}", self.prefix)
    }

    fn stored_digest(&mut self, key: &str) -> Result<Option<[u8; 48]>, BundleStoreError> {
        match self.kv.get(key.as_bytes())? {
            None => Ok(None),
            Some(v) => {
                bounded(key, v.len())?;
                digest_of(key, &v).map(Some)
            }
        }
    }

    /// Whether bundle `(version, digest)` may be kept: [`decide`] against what is stored.
    pub(crate) fn check(&mut self, version: u64, digest: &[u8; 48]) -> Result<Keep, BundleStoreError> {
        let key = self.key(version);
        let stored = self.stored_digest(&key)?;
        decide(&key, version, digest, stored.as_ref())
    }

    /// Keeps `bytes` (bundle `(version, digest)`) create-only; returns its key.
    pub(crate) fn keep(&mut self, version: u64, digest: &[u8; 48], bytes: &[u8]) -> Result<String, BundleStoreError> {
        let key = self.key(version);
        bounded(&key, bytes.len())?;
        if self.check(version, digest)? == Keep::AlreadyKept {
            return Ok(key);
        }
        let k = key.clone().into_bytes();
        if !self.kv.txn(&[Cond::Absent(k.clone())], &[(k.clone(), bytes.to_vec())], &[])? {
            // Another parent wrote this version first: the same bundle, or a fork.
            let stored = self.stored_digest(&key)?;
            decide(&key, version, digest, stored.as_ref())?;
            return Ok(key);
        }
        if self.kv.get(&k)?.as_deref() != Some(bytes) {
            return Err(BundleStoreError::ReadBackMismatch { key });
        }
        Ok(key)
    }

    /// The versions stored above `after`, ascending; at most [`MAX_STORED`].
    pub(crate) fn versions_after(&mut self, after: u64) -> Result<Vec<u64>, BundleStoreError> {
        let Some(first) = after.checked_add(1) else { return Ok(Vec::new()) };
        let start = self.key(first);
        // The end of the range: just past every key of the form PREFIX/bundles/….
        let end = format!("{}/bundles0", self.prefix);
        let (keys, more) = self.kv.keys(start.as_bytes(), end.as_bytes(), MAX_STORED)?;
        if more || keys.len() > MAX_STORED {
            return Err(BundleStoreError::TooMany { store: self.prefix.clone(), after, max: MAX_STORED });
        }
        let base = format!("{}/bundles/", self.prefix);
        keys.iter()
            .map(|k| {
                std::str::from_utf8(k)
                    .ok()
                    .and_then(|k| k.strip_prefix(&base))
                    .filter(|v| v.len() == 20 && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| BundleStoreError::BadKey {
                        key: String::from_utf8_lossy(k).chars().take(200).collect(),
                    })
            })
            .collect()
    }

    /// The bundle stored at `version`.
    pub(crate) fn read(&mut self, version: u64) -> Result<Vec<u8>, BundleStoreError> {
        let key = self.key(version);
        let v = self.kv.get(key.as_bytes())?.ok_or_else(|| BundleStoreError::Vanished { key: key.clone() })?;
        bounded(&key, v.len())?;
        Ok(v)
    }
}

/// One stored bundle to replay: its name (file or key) and where to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A file of the directory.
    File(PathBuf),
    /// An etcd key, by version.
    Version(u64),
}

/// An opened bundle store.
#[derive(Debug)]
pub(crate) enum Bundles {
    /// A local directory.
    Dir(PathBuf),
    /// etcd.
    Etcd(Box<EtcdBundles<EtcdClient>>),
}

impl BundleStore {
    /// Opens the store (an etcd client connects lazily).
    pub(crate) fn open(&self) -> Result<Bundles, BundleStoreError> {
        Ok(match self {
            BundleStore::Dir(d) => Bundles::Dir(d.clone()),
            BundleStore::Etcd(url) => {
                // One bundle, or the keys of one replay (a key of at most 128 + 29 bytes and its
                // revisions: under 256 bytes each).
                let limits =
                    Limits { max_response: (MAX_BUNDLE + 64 * 1024).max(MAX_STORED * 256), ..Limits::default() };
                Bundles::Etcd(Box::new(EtcdBundles::new(EtcdClient::new(url.clone(), limits)?, &url.prefix)))
            }
        })
    }

    /// The directory, for a store that is one (where `policy push` keeps receipts by default).
    pub(crate) fn dir(&self) -> Option<&Path> {
        match self {
            BundleStore::Dir(d) => Some(d),
            BundleStore::Etcd(_) => None,
        }
    }
}

fn dir_file(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("policy-v{version:08}.bundle"))
}

impl Bundles {
    /// Before a push: refuses a bundle that would fork the stored chain (etcd; a directory
    /// holds one parent's own bundles and is written after the KRE accepted them).
    pub(crate) fn check(&mut self, version: u64, digest: &[u8; 48]) -> Result<(), BundleStoreError> {
        match self {
            Bundles::Dir(_) => Ok(()),
            Bundles::Etcd(e) => e.check(version, digest).map(|_| ()),
        }
    }

    /// Keeps an accepted bundle; returns where (a path or a key).
    pub(crate) fn keep(&mut self, version: u64, digest: &[u8; 48], bytes: &[u8]) -> Result<String, BundleStoreError> {
        match self {
            Bundles::Dir(dir) => {
                std::fs::create_dir_all(&*dir).map_err(|source| BundleStoreError::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })?;
                let kept = dir_file(dir, version);
                keygate_enclave::atomic::write_file(&kept, bytes)?;
                Ok(kept.display().to_string())
            }
            Bundles::Etcd(e) => e.keep(version, digest, bytes),
        }
    }

    /// The stored bundles to replay, in version order: in etcd those above `after` (the key
    /// names the version); in a directory every `*.bundle` file (sorted by name, which the
    /// zero-padded version orders), the caller skipping old ones once read.
    pub(crate) fn entries(&mut self, after: u64) -> Result<Vec<Entry>, BundleStoreError> {
        match self {
            Bundles::Dir(dir) => {
                let io = |source| BundleStoreError::Io { context: format!("reading {}", dir.display()), source };
                let mut files = Vec::new();
                for e in std::fs::read_dir(&*dir).map_err(io)?.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "bundle") {
                        if files.len() == MAX_STORED {
                            let store = dir.display().to_string();
                            return Err(BundleStoreError::TooMany { store, after: 0, max: MAX_STORED });
                        }
                        files.push(p);
                    }
                }
                files.sort();
                Ok(files.into_iter().map(Entry::File).collect())
            }
            Bundles::Etcd(e) => Ok(e.versions_after(after)?.into_iter().map(Entry::Version).collect()),
        }
    }

    /// The name of an entry, for messages.
    pub(crate) fn name(&self, entry: &Entry) -> String {
        match (self, entry) {
            (_, Entry::File(p)) => p.display().to_string(),
            (Bundles::Etcd(e), Entry::Version(v)) => e.key(*v),
            (Bundles::Dir(d), Entry::Version(v)) => dir_file(d, *v).display().to_string(),
        }
    }

    /// Reads one entry (at most [`MAX_BUNDLE`] bytes).
    pub(crate) fn read(&mut self, entry: &Entry) -> Result<Vec<u8>, BundleStoreError> {
        let path = match (&mut *self, entry) {
            (Bundles::Etcd(e), Entry::Version(v)) => return e.read(*v),
            (_, Entry::File(p)) => p.clone(),
            (Bundles::Dir(d), Entry::Version(v)) => dir_file(d, *v),
        };
        read_capped(&path, MAX_BUNDLE)?.ok_or_else(|| BundleStoreError::Vanished { key: path.display().to_string() })
    }
}

/// The file at `path`, if it exists, read only up to `max` bytes (one more tells that it is
/// larger: [`BundleStoreError::TooLarge`]).
fn read_capped(path: &Path, max: usize) -> Result<Option<Vec<u8>>, BundleStoreError> {
    let io = |source| BundleStoreError::Io { context: format!("reading {}", path.display()), source };
    let f = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        f => f.map_err(io)?,
    };
    let mut v = Vec::new();
    f.take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1)).read_to_end(&mut v).map_err(io)?;
    if v.len() > max {
        return Err(BundleStoreError::TooLarge { what: path.display().to_string(), len: v.len(), max });
    }
    Ok(Some(v))
}

mod timestamp;

#[cfg(test)]
mod real_tests;
#[cfg(test)]
mod tests;
