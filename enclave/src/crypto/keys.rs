//! KEKs, data-key derivation, and wrapping data keys to an attested public key.
//!
//! ```text
//! data_key  = HKDF-SHA384(salt = "keygate/v1/data-key", ikm = KEK[cluster][version],
//!                         info = str8(cluster) ‖ str8(key_id) ‖ u32be(version), L = 32)
//! T         = SHA-384("keygate/v1/transcript" ‖ client_nonce ‖ server_nonce
//!                     ‖ SHA-384(kre_attestation) ‖ SHA-384(client_attestation)
//!                     ‖ request_digest ‖ ephemeral_point)
//! Z         = ECDH-P384(ephemeral, client_public_key).x
//! key‖nonce = HKDF-SHA384(salt = T, ikm = Z, info = "keygate/v1/wrap" ‖ str8(key_id) ‖ u32be(version), L = 44)
//! sealed    = AES-256-GCM(key, nonce, aad = T ‖ str8(key_id) ‖ u32be(version) ‖ bound, data_key)
//! ```
//!
//! `bound` is what the wrap authenticates beside the keys: in a `Released`, the audit receipt
//! (fixed length); empty in [`wrap`] and [`unwrap`].
//!
//! Everything here is pure; randomness comes from the caller.

use std::collections::BTreeMap;

use keygate_attestation::crypto::{p384_scalar_from, Crypto, CryptoError, P384Scalar};
use keygate_attestation::secret::Secret;

use crate::binding;
use crate::codec::Id;

/// Uncompressed P-384 point length.
pub const POINT_LEN: usize = 97;

/// One data key, wrapped to the client's attested public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The key id requested.
    pub key_id: Id,
    /// The KEK version the key derives from.
    pub version: u32,
    /// AES-256-GCM ciphertext ‖ tag of the 32-byte data key.
    pub sealed: Vec<u8>,
}

/// A 32-byte data key.
pub type DataKey = Secret<32>;
/// A 32-byte key-encryption key.
pub type Kek = Secret<32>;

/// The handshake values that the wrapping binds to.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// The client's Hello nonce.
    pub client_nonce: [u8; 32],
    /// The KRE's challenge nonce.
    pub server_nonce: [u8; 32],
    /// SHA-384 of the KRE's attestation document, as sent.
    pub kre_attestation_sha384: [u8; 48],
    /// SHA-384 of the client's attestation document, as sent.
    pub client_attestation_sha384: [u8; 48],
    /// The request digest (the client's `user_data`).
    pub request_digest: [u8; 48],
}

impl Transcript {
    /// `T` for a given ephemeral point.
    pub fn hash(&self, ephemeral_point: &[u8; POINT_LEN]) -> [u8; 48] {
        binding::transcript(
            &self.client_nonce,
            &self.server_nonce,
            &self.kre_attestation_sha384,
            &self.client_attestation_sha384,
            &self.request_digest,
            ephemeral_point,
        )
    }
}

/// Derives the data key `key_id` of `cluster` from KEK version `version`.
pub fn derive_data_key(
    crypto: &dyn Crypto,
    kek: &Kek,
    cluster: &Id,
    key_id: &Id,
    version: u32,
) -> Result<DataKey, CryptoError> {
    let info = binding::data_key_info(cluster, key_id, version);
    let mut buf = zeroize::Zeroizing::new([0u8; 32]);
    crypto.hkdf_sha384(binding::DATA_KEY, kek.expose(), &info, &mut buf[..])?;
    Ok(Secret::new(*buf))
}

fn wrap_key_and_nonce(
    crypto: &dyn Crypto,
    t: &[u8; 48],
    z: &Secret<48>,
    key_id: &Id,
    version: u32,
) -> Result<(Secret<32>, [u8; 12]), CryptoError> {
    let mut okm = zeroize::Zeroizing::new([0u8; 44]);
    crypto.hkdf_sha384(t, z.expose(), &binding::wrap_info(binding::WRAP, key_id, version), &mut okm[..])?;
    let key = Secret::from_slice(&okm[..32]).ok_or(CryptoError::Kdf)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    Ok((key, nonce))
}

/// The KRE's wrapping key for one connection: drawn at Hello, its point attested in the
/// Challenge (`public_key` of the KRE's document), its scalar used once to wrap the Release's
/// keys. A client accepts a wrap only under the point it saw attested, so no party but the
/// attested KRE can produce keys the client will open.
#[derive(Debug)]
pub struct WrappingKey {
    scalar: P384Scalar,
    point: [u8; POINT_LEN],
}

impl WrappingKey {
    /// A fresh key from `fill`.
    pub fn generate(crypto: &dyn Crypto, fill: impl FnMut(&mut [u8])) -> Result<Self, CryptoError> {
        let (scalar, point) = p384_scalar_from(crypto, fill)?;
        let point: [u8; POINT_LEN] = point.try_into().map_err(|_| CryptoError::BadPublicKey)?;
        Ok(Self { scalar, point })
    }

    /// Its uncompressed SEC1 point `E`.
    pub fn point(&self) -> &[u8; POINT_LEN] {
        &self.point
    }
}

/// Wraps `keys` (id, version, data key) to `client_point` under the connection's wrapping key
/// (consumed: one wrap per key). Returns the point `E` and the wrapped keys. Binds nothing
/// beside the keys: [`wrap_bound`] with empty `bound`.
pub fn wrap(
    crypto: &dyn Crypto,
    transcript: &Transcript,
    client_point: &[u8],
    keys: &[(Id, u32, DataKey)],
    wrapping: WrappingKey,
) -> Result<([u8; POINT_LEN], Vec<WrappedKey>), CryptoError> {
    wrap_bound(crypto, transcript, client_point, keys, wrapping, &[])
}

/// [`wrap`], with `bound` appended to every key's associated data: the client opens no key
/// unless it holds exactly these bytes, as the attested KRE sent them (a `Released` binds
/// its audit receipt so).
pub fn wrap_bound(
    crypto: &dyn Crypto,
    transcript: &Transcript,
    client_point: &[u8],
    keys: &[(Id, u32, DataKey)],
    wrapping: WrappingKey,
    bound: &[u8],
) -> Result<([u8; POINT_LEN], Vec<WrappedKey>), CryptoError> {
    let WrappingKey { scalar: eph, point: eph_point } = wrapping;
    let z = crypto.ecdh_p384(&eph, client_point)?;
    let t = transcript.hash(&eph_point);
    let mut out = Vec::with_capacity(keys.len());
    for (key_id, version, dk) in keys {
        let (k, nonce) = wrap_key_and_nonce(crypto, &t, &z, key_id, *version)?;
        let aad = [t.as_slice(), &binding::wrap_info(b"", key_id, *version), bound].concat();
        let sealed = crypto.aes256gcm_seal(&k, &nonce, &aad, dk.expose())?;
        out.push(WrappedKey { key_id: key_id.clone(), version: *version, sealed });
    }
    Ok((eph_point, out))
}

/// Unwraps keys with the client's private scalar (the client side of [`wrap`]).
pub fn unwrap(
    crypto: &dyn Crypto,
    transcript: &Transcript,
    client_scalar: &P384Scalar,
    ephemeral_point: &[u8; POINT_LEN],
    wrapped: &[WrappedKey],
) -> Result<Vec<(Id, u32, DataKey)>, CryptoError> {
    unwrap_bound(crypto, transcript, client_scalar, ephemeral_point, wrapped, &[])
}

/// The client side of [`wrap_bound`]: fails unless `bound` is exactly what was wrapped with.
pub fn unwrap_bound(
    crypto: &dyn Crypto,
    transcript: &Transcript,
    client_scalar: &P384Scalar,
    ephemeral_point: &[u8; POINT_LEN],
    wrapped: &[WrappedKey],
    bound: &[u8],
) -> Result<Vec<(Id, u32, DataKey)>, CryptoError> {
    let z = crypto.ecdh_p384(client_scalar, ephemeral_point)?;
    let t = transcript.hash(ephemeral_point);
    wrapped
        .iter()
        .map(|w| {
            let (k, nonce) = wrap_key_and_nonce(crypto, &t, &z, &w.key_id, w.version)?;
            let aad = [t.as_slice(), &binding::wrap_info(b"", &w.key_id, w.version), bound].concat();
            let pt = crypto.aes256gcm_open(&k, &nonce, &aad, &w.sealed)?;
            let dk = Secret::from_slice(pt.expose()).ok_or(CryptoError::Decrypt)?;
            Ok((w.key_id.clone(), w.version, dk))
        })
        .collect()
}

/// Status of a KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekStatus {
    /// Wraps/derives new keys.
    Current,
    /// Still released for existing data, never the newest.
    Active,
    /// Retired by policy: never released again; kept in the sealed state so that the
    /// retirement is recorded and the version number is never reused.
    Retired,
}

/// The KEKs of every cluster, by version. Held only in memory, zeroized on drop.
#[derive(Debug, Default)]
pub struct KekStore {
    clusters: BTreeMap<Id, BTreeMap<u32, (KekStatus, Kek)>>,
}

impl KekStore {
    /// Generates version 1 for `cluster` if it has no KEK yet, from `fill`.
    pub fn ensure_cluster(&mut self, cluster: &Id, fill: impl FnOnce(&mut [u8])) {
        self.clusters
            .entry(cluster.clone())
            .or_insert_with(|| BTreeMap::from([(1, (KekStatus::Current, Secret::generate(fill)))]));
    }

    /// Makes `cluster` have KEK versions up to `version` (1 ≤ `version` ≤
    /// [`MAX_KEK_VERSIONS`]): every missing version is generated from `fill`, the newest
    /// becomes `Current` and the older ones `Active`. Returns the versions created, ascending.
    /// All or nothing: when `fill` fails, nothing changes.
    pub fn ensure_versions<E>(
        &mut self,
        cluster: &Id,
        version: u32,
        mut fill: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Vec<u32>, E> {
        let version = version.clamp(1, MAX_KEK_VERSIONS);
        let first = self.clusters.get(cluster).and_then(|e| e.keys().next_back()).map_or(1, |v| v + 1);
        let mut new = Vec::new();
        for v in first..=version {
            let mut result = Ok(());
            let kek: Kek = Secret::generate(|b| result = fill(b));
            result?;
            new.push((v, kek));
        }
        let entries = self.clusters.entry(cluster.clone()).or_default();
        let created: Vec<u32> = new.iter().map(|(v, _)| *v).collect();
        for (v, kek) in new {
            entries.insert(v, (KekStatus::Current, kek));
        }
        if !created.is_empty() {
            let newest = entries.keys().next_back().copied();
            for (v, (s, _)) in entries.iter_mut() {
                if Some(*v) != newest && *s == KekStatus::Current {
                    *s = KekStatus::Active;
                }
            }
        }
        Ok(created)
    }

    /// The newest KEK version of `cluster`, whatever its status (`None`: no KEK yet).
    pub fn newest_version(&self, cluster: &Id) -> Option<u32> {
        self.clusters.get(cluster).and_then(|e| e.keys().next_back()).copied()
    }

    /// The current KEK version of `cluster` and the KEK.
    pub fn current(&self, cluster: &Id) -> Option<(u32, &Kek)> {
        self.clusters.get(cluster)?.iter().rev().find(|(_, (s, _))| *s == KekStatus::Current).map(|(v, (_, k))| (*v, k))
    }

    /// The versions of `cluster` that may be released: the current one first, then the
    /// active older ones, newest first (retired versions never).
    pub fn releasable(&self, cluster: &Id) -> Vec<(u32, KekStatus, &Kek)> {
        let Some(entries) = self.clusters.get(cluster) else {
            return Vec::new();
        };
        releasable_first(entries.iter().map(|(v, (s, k))| (*v, *s, k)))
    }
}

/// The releasable ones of a cluster's KEK `versions`, in release order: the current one
/// first, then the active older ones, newest first (retired versions never). The one order
/// of the ephemeral store and the sealed state.
pub fn releasable_first<K>(versions: impl IntoIterator<Item = (u32, KekStatus, K)>) -> Vec<(u32, KekStatus, K)> {
    let mut out: Vec<(u32, KekStatus, K)> = versions.into_iter().filter(|(_, s, _)| *s != KekStatus::Retired).collect();
    out.sort_by_key(|(v, s, _)| (*s != KekStatus::Current, std::cmp::Reverse(*v)));
    out
}

/// Most KEK versions per cluster (as in the sealed state).
pub const MAX_KEK_VERSIONS: u32 = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_id as id;
    use crate::crypto::test_rng;
    use keygate_attestation::crypto::all_backends;

    fn transcript() -> Transcript {
        Transcript {
            client_nonce: [1; 32],
            server_nonce: [2; 32],
            kre_attestation_sha384: [3; 48],
            client_attestation_sha384: [4; 48],
            request_digest: [5; 48],
        }
    }

    #[test]
    fn wrap_unwrap_round_trip_on_every_backend_and_across_backends() {
        let backends = all_backends();
        for kre in &backends {
            for client in &backends {
                let (scalar, point) = p384_scalar_from(*client, test_rng(9)).expect("client key");
                let kek = Secret::new([7u8; 32]);
                let dk = derive_data_key(*kre, &kek, &id("c"), &id("etcd"), 1).expect("dk");
                let keys = vec![(id("etcd"), 1, dk.clone())];
                let (eph, wrapped) =
                    wrap(*kre, &transcript(), &point, &keys, WrappingKey::generate(*kre, test_rng(3)).expect("key"))
                        .expect("wrap");
                let out = unwrap(*client, &transcript(), &scalar, &eph, &wrapped).expect("unwrap");
                assert_eq!(out[0].2, dk, "{} -> {}", kre.name(), client.name());
            }
        }
    }

    #[test]
    fn data_keys_are_stable_and_distinct() {
        let c = keygate_attestation::crypto::default_backend();
        let kek = Secret::new([7u8; 32]);
        let a = derive_data_key(c, &kek, &id("c"), &id("k"), 1).expect("a");
        assert_eq!(a, derive_data_key(c, &kek, &id("c"), &id("k"), 1).expect("again"));
        assert_ne!(a, derive_data_key(c, &kek, &id("d"), &id("k"), 1).expect("other cluster"));
        assert_ne!(a, derive_data_key(c, &kek, &id("c"), &id("j"), 1).expect("other key"));
        assert_ne!(a, derive_data_key(c, &kek, &id("c"), &id("k"), 2).expect("other version"));
        assert_ne!(a, derive_data_key(c, &Secret::new([8u8; 32]), &id("c"), &id("k"), 1).expect("other kek"));
    }

    #[test]
    fn unwrap_fails_on_any_transcript_or_ciphertext_change() {
        let c = keygate_attestation::crypto::default_backend();
        let (scalar, point) = p384_scalar_from(c, test_rng(9)).expect("client key");
        let keys = vec![(id("etcd"), 1, Secret::new([9u8; 32]))];
        let (eph, wrapped) =
            wrap(c, &transcript(), &point, &keys, WrappingKey::generate(c, test_rng(3)).expect("key")).expect("wrap");
        let variants: [fn(&mut Transcript); 5] = [
            |t| t.client_nonce[0] ^= 1,
            |t| t.server_nonce[0] ^= 1,
            |t| t.kre_attestation_sha384[0] ^= 1,
            |t| t.client_attestation_sha384[0] ^= 1,
            |t| t.request_digest[0] ^= 1,
        ];
        for v in variants {
            let mut t = transcript();
            v(&mut t);
            assert_eq!(unwrap(c, &t, &scalar, &eph, &wrapped).map(|_| ()), Err(CryptoError::Decrypt));
        }
        let mut w = wrapped.clone();
        w[0].sealed[3] ^= 1;
        assert_eq!(unwrap(c, &transcript(), &scalar, &eph, &w).map(|_| ()), Err(CryptoError::Decrypt));
        let mut w = wrapped.clone();
        w[0].version = 2;
        assert_eq!(unwrap(c, &transcript(), &scalar, &eph, &w).map(|_| ()), Err(CryptoError::Decrypt));
        let mut w = wrapped.clone();
        w[0].key_id = id("other");
        assert_eq!(unwrap(c, &transcript(), &scalar, &eph, &w).map(|_| ()), Err(CryptoError::Decrypt));
        let (other, _) = p384_scalar_from(c, test_rng(11)).expect("other key");
        assert_eq!(unwrap(c, &transcript(), &other, &eph, &wrapped).map(|_| ()), Err(CryptoError::Decrypt));
    }

    /// The bytes a wrap binds (a `Released`'s receipt) must be exactly those the client holds:
    /// one flipped, one missing or one more, and no key opens.
    #[test]
    fn unwrap_fails_unless_the_bound_bytes_are_exactly_the_wrapped_ones() {
        let c = keygate_attestation::crypto::default_backend();
        let (scalar, point) = p384_scalar_from(c, test_rng(9)).expect("client key");
        let keys = vec![(id("etcd"), 1, Secret::new([9u8; 32])), (id("etcd"), 2, Secret::new([8u8; 32]))];
        let bound = [0x5a; 346];
        let (eph, wrapped) =
            wrap_bound(c, &transcript(), &point, &keys, WrappingKey::generate(c, test_rng(3)).expect("key"), &bound)
                .expect("wrap");
        let out = unwrap_bound(c, &transcript(), &scalar, &eph, &wrapped, &bound).expect("unwrap");
        assert_eq!(out.len(), 2);
        let mut flipped = bound;
        flipped[100] ^= 1;
        for other in [&flipped[..], &bound[..345], &[bound.as_slice(), &[0]].concat(), &[]] {
            assert_eq!(
                unwrap_bound(c, &transcript(), &scalar, &eph, &wrapped, other).map(|_| ()),
                Err(CryptoError::Decrypt)
            );
        }
        assert_eq!(unwrap(c, &transcript(), &scalar, &eph, &wrapped).map(|_| ()), Err(CryptoError::Decrypt));
    }

    #[test]
    fn kek_store_generates_once() {
        let mut s = KekStore::default();
        s.ensure_cluster(&id("c"), |b| b.fill(1));
        s.ensure_cluster(&id("c"), |b| b.fill(2));
        assert_eq!(s.current(&id("c")).map(|(v, k)| (v, k.expose()[0])), Some((1, 1)));
        assert!(s.current(&id("d")).is_none());
    }

    #[test]
    fn kek_store_rotates_newest_current_older_active() {
        let mut s = KekStore::default();
        s.ensure_cluster(&id("c"), |b| b.fill(1));
        let mut n = 1u8;
        assert_eq!(
            s.ensure_versions(&id("c"), 3, |b| {
                n += 1;
                b.fill(n);
                Ok::<(), ()>(())
            }),
            Ok(vec![2, 3])
        );
        let ok = |x: u8| {
            move |b: &mut [u8]| -> Result<(), ()> {
                b.fill(x);
                Ok(())
            }
        };
        assert_eq!(s.ensure_versions(&id("c"), 2, ok(9)), Ok(vec![]), "never lower, never again");
        assert_eq!(s.ensure_versions(&id("c"), 5, |_| Err("nsm")), Err("nsm"));
        assert_eq!(s.current(&id("c")).map(|(v, _)| v), Some(3), "a failed fill changes nothing");
        // The newest version, whatever its status: what a rotation's audit entries count from.
        assert_eq!((s.newest_version(&id("c")), s.newest_version(&id("d"))), (Some(3), None));
        assert_eq!(s.current(&id("c")).map(|(v, k)| (v, k.expose()[0])), Some((3, 3)));
        let r: Vec<(u32, KekStatus, u8)> =
            s.releasable(&id("c")).into_iter().map(|(v, st, k)| (v, st, k.expose()[0])).collect();
        assert_eq!(r, vec![(3, KekStatus::Current, 3), (2, KekStatus::Active, 2), (1, KekStatus::Active, 1)]);
        // A new cluster created directly at version 2 gets versions 1 and 2.
        assert_eq!(s.ensure_versions(&id("d"), 2, ok(5)), Ok(vec![1, 2]));
        assert_eq!(
            s.releasable(&id("d")).iter().map(|(v, st, _)| (*v, *st)).collect::<Vec<_>>(),
            vec![(2, KekStatus::Current), (1, KekStatus::Active)]
        );
        assert_eq!(s.ensure_versions(&id("e"), 5000, ok(5)).map(|v| v.len()), Ok(1024), "capped");
    }
}
