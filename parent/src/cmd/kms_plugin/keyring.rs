//! The plugin's keys and its ciphertext format. Pure: no I/O, no clock; the nonce comes
//! from the caller.
//!
//! A plugin serves one keygate key (`cluster`, `key-id`) in one or more versions. The
//! newest version seals; every held version opens. Each version has its own KMS `key_id`,
//! `<cluster>/<key-id>/v<N>`, so a new version changes the `key_id` that Status and Encrypt
//! report and kube-apiserver re-seeds its DEKs.
//!
//! Ciphertext (what kube-apiserver stores in etcd as the encrypted DEK source):
//!
//! ```text
//! ciphertext = format:u8 (= 1) ‖ nonce[12] ‖ AES-256-GCM(data_key_v, nonce, aad, plaintext)   ; ct ‖ tag[16]
//! aad        = "keygate/v1/kms-plugin" ‖ format:u8 ‖ u16be(len(key_id)) ‖ key_id
//! ```
//!
//! The AAD binds the KMS `key_id`, so a ciphertext presented under another version's (or
//! another cluster's) `key_id` does not open.

use std::collections::BTreeMap;

use keygate_attestation::crypto::Crypto;
use keygate_attestation::secret::{Secret, SecretVec};
use keygate_enclave::wire::Id;

/// The only ciphertext format.
pub(crate) const FORMAT_V1: u8 = 1;
const AAD_LABEL: &[u8] = b"keygate/v1/kms-plugin";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a ciphertext adds to its plaintext.
pub(crate) const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// Largest plaintext sealed. kube-apiserver sends a 32-byte DEK seed; the cap keeps every
/// ciphertext under its 1 kB limit for the encrypted DEK source.
pub(crate) const MAX_PLAINTEXT: usize = 512;
/// kube-apiserver's limit on a `key_id`.
pub(crate) const MAX_KMS_KEY_ID: usize = 1024;
/// Most versions held at once; the oldest are forgotten beyond it.
pub(crate) const MAX_VERSIONS: usize = 64;

/// Why a request about a key or a ciphertext was refused. Never carries secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum KeyringError {
    /// The `key_id` is empty, too long, or not of the form `<cluster>/<key-id>/v<N>`.
    #[error("key_id is not a keygate key id (<cluster>/<key-id>/v<N>)")]
    MalformedKeyId,
    /// The `key_id` names another cluster or key, or a version this plugin does not hold.
    #[error("unknown key_id `{0}`")]
    UnknownKeyId(String),
    /// No key is held.
    #[error("no key held")]
    NoKey,
    /// The plaintext is empty or longer than [`MAX_PLAINTEXT`].
    #[error("plaintext is {0} bytes; 1 to {MAX_PLAINTEXT} are accepted")]
    PlaintextSize(usize),
    /// The ciphertext is too short or too long to be one of ours.
    #[error("ciphertext is {0} bytes; not a keygate ciphertext")]
    CiphertextSize(usize),
    /// The ciphertext's format byte is unknown.
    #[error("unknown ciphertext format {0}")]
    UnknownFormat(u8),
    /// Authenticated decryption failed: tampered, or sealed under another key_id.
    #[error("ciphertext does not authenticate under key_id `{0}`")]
    Tampered(String),
    /// The crypto backend failed while sealing.
    #[error("encryption failed")]
    Seal,
}

/// The held versions of one keygate key. Keys are zeroized when dropped or replaced.
#[derive(Debug)]
pub(crate) struct KeyRing {
    cluster: Id,
    key_id: Id,
    versions: BTreeMap<u32, Secret<32>>,
}

/// Whether inserting a version changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    /// A version not held before.
    New,
    /// The same bytes were already held for this version.
    Same,
}

/// A version is already held with other bytes: the KRE (or the directory) changed the key of
/// an existing version. Accepting it would make data sealed under the held key unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("version {version} is already held with a different key; refusing the new one")]
pub(crate) struct KeyConflict {
    pub(crate) version: u32,
}

impl KeyRing {
    pub(crate) fn new(cluster: Id, key_id: Id) -> Self {
        Self { cluster, key_id, versions: BTreeMap::new() }
    }

    /// The KMS `key_id` of `version`.
    pub(crate) fn kms_key_id(&self, version: u32) -> String {
        format!("{}/{}/v{version}", self.cluster, self.key_id)
    }

    /// The version a KMS `key_id` names, if it names this ring's key.
    pub(crate) fn parse_kms_key_id(&self, kms_key_id: &str) -> Result<u32, KeyringError> {
        if kms_key_id.is_empty() || kms_key_id.len() > MAX_KMS_KEY_ID {
            return Err(KeyringError::MalformedKeyId);
        }
        let mut parts = kms_key_id.split('/');
        let (Some(cluster), Some(key), Some(v), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(KeyringError::MalformedKeyId);
        };
        let version = parse_version(v.strip_prefix('v').ok_or(KeyringError::MalformedKeyId)?)
            .ok_or(KeyringError::MalformedKeyId)?;
        if cluster != self.cluster.as_str() || key != self.key_id.as_str() {
            return Err(KeyringError::UnknownKeyId(kms_key_id.to_owned()));
        }
        Ok(version)
    }

    /// The newest version held.
    pub(crate) fn current(&self) -> Option<u32> {
        self.versions.keys().next_back().copied()
    }

    /// Versions held, oldest first.
    pub(crate) fn versions(&self) -> Vec<u32> {
        self.versions.keys().copied().collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// Adds `version`; a held version with other bytes is refused. Beyond [`MAX_VERSIONS`]
    /// the oldest version is forgotten.
    pub(crate) fn insert(&mut self, version: u32, key: Secret<32>) -> Result<Insert, KeyConflict> {
        if let Some(held) = self.versions.get(&version) {
            return if *held == key { Ok(Insert::Same) } else { Err(KeyConflict { version }) };
        }
        self.versions.insert(version, key);
        while self.versions.len() > MAX_VERSIONS {
            self.versions.pop_first();
        }
        Ok(Insert::New)
    }

    /// Replaces every held version by `versions` (the directory is the source of truth).
    pub(crate) fn replace(&mut self, mut versions: BTreeMap<u32, Secret<32>>) {
        while versions.len() > MAX_VERSIONS {
            versions.pop_first();
        }
        self.versions = versions;
    }

    /// After a successful fetch that released `released` (the KRE sends the current version
    /// and the still-active older ones, newest first, at most `limit`): forgets (and
    /// zeroizes) every held version the KRE no longer releases because the policy retired
    /// it. A held version older than all released ones counts as retired only when the
    /// release was not cut at `limit` (otherwise it may be active and merely not sent); a
    /// held version newer than every released one is kept. Returns the versions forgotten.
    pub(crate) fn forget_retired(&mut self, released: &[u32], limit: usize) -> Vec<u32> {
        let (Some(&oldest), Some(&newest)) = (released.iter().min(), released.iter().max()) else {
            return Vec::new();
        };
        let complete = released.len() < limit;
        let retired: Vec<u32> = self
            .versions
            .keys()
            .copied()
            .filter(|v| !released.contains(v) && *v < newest && (*v > oldest || complete))
            .collect();
        for v in &retired {
            self.versions.remove(v);
        }
        retired
    }

    /// Forgets (and zeroizes) every key.
    pub(crate) fn clear(&mut self) {
        self.versions.clear();
    }

    /// Seals `plaintext` under the current version; returns (ciphertext, KMS key_id).
    pub(crate) fn seal(
        &self,
        crypto: &dyn Crypto,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, String), KeyringError> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(KeyringError::PlaintextSize(plaintext.len()));
        }
        let (version, key) = self.versions.iter().next_back().ok_or(KeyringError::NoKey)?;
        let kms_key_id = self.kms_key_id(*version);
        let sealed = crypto
            .aes256gcm_seal(key, &nonce, &aad(FORMAT_V1, &kms_key_id), plaintext)
            .map_err(|_| KeyringError::Seal)?;
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok((out, kms_key_id))
    }

    /// Opens a ciphertext that Encrypt returned with `kms_key_id`.
    pub(crate) fn open(
        &self,
        crypto: &dyn Crypto,
        kms_key_id: &str,
        ciphertext: &[u8],
    ) -> Result<SecretVec, KeyringError> {
        let version = self.parse_kms_key_id(kms_key_id)?;
        if ciphertext.len() <= OVERHEAD || ciphertext.len() > OVERHEAD + MAX_PLAINTEXT {
            return Err(KeyringError::CiphertextSize(ciphertext.len()));
        }
        let (format, rest) = ciphertext.split_first().ok_or(KeyringError::CiphertextSize(0))?;
        if *format != FORMAT_V1 {
            return Err(KeyringError::UnknownFormat(*format));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KeyringError::CiphertextSize(ciphertext.len()))?;
        let key = self.versions.get(&version).ok_or_else(|| KeyringError::UnknownKeyId(kms_key_id.to_owned()))?;
        crypto
            .aes256gcm_open(key, &nonce, &aad(*format, kms_key_id), sealed)
            .map_err(|_| KeyringError::Tampered(kms_key_id.to_owned()))
    }
}

fn aad(format: u8, kms_key_id: &str) -> Vec<u8> {
    let id = kms_key_id.as_bytes();
    // A key_id is at most MAX_KMS_KEY_ID bytes (checked or built by us), so it fits a u16.
    let len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut a = Vec::with_capacity(AAD_LABEL.len() + 3 + id.len());
    a.extend_from_slice(AAD_LABEL);
    a.push(format);
    a.extend_from_slice(&len.to_be_bytes());
    a.extend_from_slice(id);
    a
}

/// A version number in canonical decimal (`1`, `42`; not `01`, `+1`, or empty), at least 1.
pub(crate) fn parse_version(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_attestation::crypto::all_backends;

    fn ring() -> KeyRing {
        let mut r = KeyRing::new(Id::new("prod").expect("id"), Id::new("etcd-kek").expect("id"));
        r.insert(1, Secret::new([1; 32])).expect("insert");
        r.insert(2, Secret::new([2; 32])).expect("insert");
        r
    }

    #[test]
    fn seal_open_round_trip_on_both_backends_and_with_the_current_version() {
        for crypto in all_backends() {
            let r = ring();
            let (ct, id) = r.seal(crypto, [9; 12], b"a dek seed of 32 bytes, exactly!").expect("seal");
            assert_eq!(id, "prod/etcd-kek/v2");
            assert_eq!(ct.len(), OVERHEAD + 32);
            assert_eq!(r.open(crypto, &id, &ct).expect("open").expose(), b"a dek seed of 32 bytes, exactly!");
        }
    }

    #[test]
    fn every_single_byte_tamper_and_every_truncation_fails() {
        let crypto = keygate_attestation::crypto::default_backend();
        let r = ring();
        let (ct, id) = r.seal(crypto, [9; 12], &[7; 32]).expect("seal");
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 0x01;
            assert!(r.open(crypto, &id, &t).is_err(), "tamper at {i} accepted");
        }
        for n in 0..ct.len() {
            assert!(r.open(crypto, &id, &ct[..n]).is_err(), "truncation to {n} accepted");
        }
    }

    #[test]
    fn a_ciphertext_presented_under_another_key_id_does_not_open() {
        let crypto = keygate_attestation::crypto::default_backend();
        let mut r = ring();
        let (ct, _) = r.seal(crypto, [9; 12], &[7; 32]).expect("seal");
        // Same key bytes under v1 and v3: only the AAD tells them apart.
        r.insert(3, Secret::new([2; 32])).expect("insert");
        assert_eq!(r.open(crypto, "prod/etcd-kek/v3", &ct), Err(KeyringError::Tampered("prod/etcd-kek/v3".into())));
    }

    #[test]
    fn key_ids_parse_strictly() {
        let r = ring();
        assert_eq!(r.parse_kms_key_id("prod/etcd-kek/v7"), Ok(7));
        for bad in
            ["", "prod/etcd-kek", "prod/etcd-kek/7", "prod/etcd-kek/v07", "prod/etcd-kek/v0", "prod/etcd-kek/v+1"]
        {
            assert_eq!(r.parse_kms_key_id(bad), Err(KeyringError::MalformedKeyId), "{bad}");
        }
        assert_eq!(r.parse_kms_key_id("prod/etcd-kek/v4294967296"), Err(KeyringError::MalformedKeyId));
        assert_eq!(r.parse_kms_key_id(&"x".repeat(2000)), Err(KeyringError::MalformedKeyId));
        assert!(matches!(r.parse_kms_key_id("stage/etcd-kek/v1"), Err(KeyringError::UnknownKeyId(_))));
        assert!(matches!(r.parse_kms_key_id("prod/other/v1"), Err(KeyringError::UnknownKeyId(_))));
        let crypto = keygate_attestation::crypto::default_backend();
        assert!(matches!(r.open(crypto, "prod/etcd-kek/v9", &[1; 61]), Err(KeyringError::UnknownKeyId(_))));
    }

    #[test]
    fn sizes_are_bounded() {
        let crypto = keygate_attestation::crypto::default_backend();
        let r = ring();
        assert_eq!(r.seal(crypto, [0; 12], &[]), Err(KeyringError::PlaintextSize(0)));
        assert_eq!(r.seal(crypto, [0; 12], &[0; MAX_PLAINTEXT + 1]), Err(KeyringError::PlaintextSize(513)));
        let (ct, _) = r.seal(crypto, [0; 12], &[0; MAX_PLAINTEXT]).expect("seal");
        assert!(ct.len() <= 1024, "kube-apiserver's limit on the encrypted DEK source");
        let mut long = ct.clone();
        long.push(0);
        assert!(matches!(r.open(crypto, "prod/etcd-kek/v2", &long), Err(KeyringError::CiphertextSize(_))));
        let mut fmt = ct;
        fmt[0] = 2;
        assert_eq!(r.open(crypto, "prod/etcd-kek/v2", &fmt), Err(KeyringError::UnknownFormat(2)));
    }

    #[test]
    fn a_version_never_changes_its_key_and_old_versions_are_bounded() {
        let mut r = ring();
        assert_eq!(r.insert(1, Secret::new([1; 32])), Ok(Insert::Same));
        assert_eq!(r.insert(1, Secret::new([9; 32])), Err(KeyConflict { version: 1 }));
        for v in 3..=100 {
            r.insert(v, Secret::new([3; 32])).expect("insert");
        }
        assert_eq!(r.versions().len(), MAX_VERSIONS);
        assert_eq!(r.current(), Some(100));
        assert_eq!(r.versions().first(), Some(&37));
        r.clear();
        assert!(r.is_empty() && r.current().is_none());
    }

    #[test]
    fn a_rotation_is_sealed_under_at_once_and_old_versions_open_until_retired() {
        let crypto = keygate_attestation::crypto::default_backend();
        let mut r = KeyRing::new(Id::new("prod").expect("id"), Id::new("etcd-kek").expect("id"));
        r.insert(1, Secret::new([1; 32])).expect("v1");
        let (old_ct, old_id) = r.seal(crypto, [1; 12], &[7; 32]).expect("seal under v1");
        assert_eq!(old_id, "prod/etcd-kek/v1");
        // A refresh after a rotation releases [2, 1]: v2 seals, v1 still opens.
        for (v, b) in [(2, 2u8), (1, 1)] {
            r.insert(v, Secret::new([b; 32])).expect("insert");
        }
        assert!(r.forget_retired(&[2, 1], 4).is_empty());
        let (new_ct, new_id) = r.seal(crypto, [2; 12], &[8; 32]).expect("seal under v2");
        assert_eq!(new_id, "prod/etcd-kek/v2");
        assert_eq!(r.open(crypto, &old_id, &old_ct).expect("v1 opens").expose(), &[7; 32]);
        assert_eq!(r.open(crypto, &new_id, &new_ct).expect("v2 opens").expose(), &[8; 32]);
        // v1 retired: the next refresh releases [2] only and v1 is forgotten.
        assert_eq!(r.forget_retired(&[2], 4), vec![1]);
        assert_eq!(r.versions(), vec![2]);
        assert!(matches!(r.open(crypto, &old_id, &old_ct), Err(KeyringError::UnknownKeyId(_))));
        assert_eq!(r.open(crypto, &new_id, &new_ct).expect("v2 still opens").expose(), &[8; 32]);
    }

    #[test]
    fn only_versions_the_kre_no_longer_releases_are_forgotten() {
        let mut r = KeyRing::new(Id::new("prod").expect("id"), Id::new("etcd-kek").expect("id"));
        for v in 1..=6 {
            r.insert(v, Secret::new([u8::try_from(v).expect("small"); 32])).expect("insert");
        }
        // Cut at the limit: 1 may be active and only not sent, so it is kept; 3 lies inside
        // the released range but was not released, so it is no longer releasable.
        assert_eq!(r.forget_retired(&[6, 5, 4, 2], 4), vec![3]);
        assert_eq!(r.versions(), vec![1, 2, 4, 5, 6]);
        // Not cut: everything below the oldest released is retired.
        assert_eq!(r.forget_retired(&[6, 5], 4), vec![1, 2, 4]);
        // A held version newer than every released one is kept; nothing released, nothing done.
        r.insert(7, Secret::new([7; 32])).expect("insert");
        assert_eq!(r.forget_retired(&[6], 4), vec![5]);
        assert_eq!(r.versions(), vec![6, 7]);
        assert!(r.forget_retired(&[], 4).is_empty());
        assert_eq!(r.versions(), vec![6, 7]);
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let s = format!("{:?}", ring());
        assert!(s.contains("redacted") && !s.contains("[1, 1"), "{s}");
    }
}
