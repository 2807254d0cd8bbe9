//! Policy freshness: how long a KRE may go on releasing under its newest policy without word
//! from the pipeline that this policy is still the newest. A policy body may name a timestamp
//! key and a maximum age ([`Freshness`], changed only by a quorum of approvers, like every
//! field of the body); the pipeline then signs, with that online key, short statements
//! ([`Timestamp`]): "policy version V with digest D is the newest as of time T". A KRE whose
//! newest policy names a timestamp key releases only while it holds a timestamp for exactly its
//! head that is younger than the maximum age; a timestamp for a newer version says it is
//! behind, and it releases nothing until that bundle is pushed.
//!
//! Why: the parent decides which bundles and which sealed generations its KRE sees, and an
//! operator can keep a copy of a member serving an old policy (it joined before a revocation)
//! for as long as it likes. The pipeline timestamps only the newest head, so such a copy stops
//! within the maximum age of the revocation, whatever every parent does — the bound TUF's
//! timestamp role gives a repository's mirrors. The timestamp key can only keep the newest
//! policy releasable longer (or stop it by not signing); it can never change a policy.
//!
//! Decides: the timestamp's bytes, its signature check, and [`check`] (whether a held
//! timestamp lets releases go on). Trusts the crypto backend and the policy body that names the
//! key. Pure: bytes, the policy's head and a time in, a decision out. Specified in
//! `docs/policy.md`.

use crate::cbor::{self, Value};
use crate::crypto::{Crypto, P384_POINT_LEN, P384_SIG_LEN};

/// A P-384 public key, uncompressed SEC1 (the timestamp key; the same shape as an approver's).
pub type TimestampKey = [u8; P384_POINT_LEN];

/// Format tag of a timestamp.
pub const TIMESTAMP_TAG: &str = "keygate-policy-timestamp/v1";
/// Domain separation of the timestamp key's signature: ECDSA P-384/SHA-384 over this ‖
/// version (8 bytes, big-endian) ‖ digest (48) ‖ issued_ms (8, big-endian).
pub const TIMESTAMP_DOMAIN: &[u8] = b"keygate/v1/policy-timestamp\0";
/// Largest encoded timestamp.
pub const MAX_TIMESTAMP: usize = 512;
/// Shortest maximum age a policy may name (seconds).
pub const MIN_MAX_AGE_S: u64 = 1;
/// Longest maximum age a policy may name (seconds): 7 days.
pub const MAX_MAX_AGE_S: u64 = 7 * 24 * 3600;

/// What a policy body says about freshness: the timestamp key and the maximum age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    /// The pipeline's timestamp key (P-384, uncompressed SEC1).
    pub key: TimestampKey,
    /// How long a timestamp lets releases go on after it was issued (seconds).
    pub max_age_s: u64,
}

/// A signed statement: policy `version` with body digest `digest` is the newest as of
/// `issued_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    /// The policy version it names.
    pub version: u64,
    /// That version's body digest (SHA-384).
    pub digest: [u8; 48],
    /// When the pipeline issued it (ms since the Unix epoch).
    pub issued_ms: u64,
    /// The key that signed it.
    pub key: TimestampKey,
    /// ECDSA P-384/SHA-384, r ‖ s.
    pub signature: [u8; P384_SIG_LEN],
}

/// Why a timestamp is refused, or releases wait for one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FreshnessError {
    /// Over [`MAX_TIMESTAMP`].
    #[error("timestamp is {0} bytes, over the limit of {MAX_TIMESTAMP}")]
    TooLarge(usize),
    /// Not well-formed CBOR.
    #[error("timestamp is not well-formed CBOR: {0}")]
    Cbor(cbor::CborError),
    /// Not of the timestamp's shape (or not canonically encoded).
    #[error("malformed timestamp: {0}")]
    Malformed(&'static str),
    /// The policy in force names no timestamp key.
    #[error("the policy in force names no timestamp key")]
    NotConfigured,
    /// Signed by another key than the one the policy names.
    #[error("the timestamp is signed by another key than the policy's timestamp key")]
    WrongKey,
    /// The signature does not verify.
    #[error("the timestamp's signature does not verify")]
    BadSignature,
    /// Issued later than now plus the allowed skew.
    #[error("the timestamp was issued at {issued_ms} ms, after now ({now_ms} ms) plus the allowed clock skew")]
    FromTheFuture {
        /// Its time.
        issued_ms: u64,
        /// Now.
        now_ms: u64,
    },
    /// Policy freshness is required and no timestamp is held.
    #[error("the policy names a timestamp key and no timestamp has been pushed")]
    Missing,
    /// The held timestamp names a newer policy: this KRE is behind the pipeline.
    #[error("the pipeline's timestamp names policy version {newest}, newer than version {held} this KRE holds: push the newer bundles")]
    Behind {
        /// The version the timestamp names.
        newest: u64,
        /// This KRE's head.
        held: u64,
    },
    /// The held timestamp names an older policy than this KRE's head.
    #[error("no timestamp for policy version {head} yet (the newest names version {stamped})")]
    NotForHead {
        /// This KRE's head.
        head: u64,
        /// The version the timestamp names.
        stamped: u64,
    },
    /// The held timestamp names this version with another digest (a fork of the chain).
    #[error("the pipeline's timestamp names another policy at version {0} (a fork)")]
    Forked(u64),
    /// The held timestamp is older than the maximum age.
    #[error("the newest timestamp (issued at {issued_ms} ms) expired at {expired_ms} ms")]
    Expired {
        /// Its time.
        issued_ms: u64,
        /// When it stopped counting.
        expired_ms: u64,
    },
}

/// The message the timestamp key signs.
pub fn signing_message(version: u64, digest: &[u8; 48], issued_ms: u64) -> Vec<u8> {
    [TIMESTAMP_DOMAIN, &version.to_be_bytes(), digest, &issued_ms.to_be_bytes()].concat()
}

/// Encodes a timestamp: `[tag, version, digest, issued_ms, key, signature]`.
pub fn encode(t: &Timestamp) -> Vec<u8> {
    let mut out = Vec::with_capacity(300);
    cbor::encode_head(&mut out, 4, 6);
    cbor::encode_text(&mut out, TIMESTAMP_TAG);
    cbor::encode_head(&mut out, 0, t.version);
    cbor::encode_bytes(&mut out, &t.digest);
    cbor::encode_head(&mut out, 0, t.issued_ms);
    cbor::encode_bytes(&mut out, &t.key);
    cbor::encode_bytes(&mut out, &t.signature);
    out
}

/// Whether `bytes` claim to be a timestamp (its tag), so a courier can tell it from a bundle.
pub fn is_timestamp(bytes: &[u8]) -> bool {
    bytes.len() <= MAX_TIMESTAMP
        && matches!(cbor::decode(bytes), Ok(Value::Array(f)) if matches!(f.first(), Some(Value::Text(t)) if *t == TIMESTAMP_TAG))
}

/// Decodes a timestamp (shape, sizes, canonical form). Checks no signature.
pub fn decode(bytes: &[u8]) -> Result<Timestamp, FreshnessError> {
    if bytes.len() > MAX_TIMESTAMP {
        return Err(FreshnessError::TooLarge(bytes.len()));
    }
    let v = cbor::decode(bytes).map_err(FreshnessError::Cbor)?;
    let f = match &v {
        Value::Array(f) if f.len() == 6 => f,
        _ => return Err(FreshnessError::Malformed("a timestamp is an array of 6")),
    };
    if !matches!(&f[0], Value::Text(t) if *t == TIMESTAMP_TAG) {
        return Err(FreshnessError::Malformed("not a keygate policy timestamp"));
    }
    let uint = |v: &Value<'_>, what| match v {
        Value::Unsigned(n) => Ok(*n),
        _ => Err(FreshnessError::Malformed(what)),
    };
    let bytes_of = |v: &Value<'_>, what| match v {
        Value::Bytes(b) => Ok(b.to_vec()),
        _ => Err(FreshnessError::Malformed(what)),
    };
    let t = Timestamp {
        version: uint(&f[1], "version must be an unsigned integer")?,
        digest: bytes_of(&f[2], "digest must be bytes")?
            .try_into()
            .map_err(|_| FreshnessError::Malformed("digest must be 48 bytes"))?,
        issued_ms: uint(&f[3], "issued_ms must be an unsigned integer")?,
        key: bytes_of(&f[4], "key must be bytes")?
            .try_into()
            .map_err(|_| FreshnessError::Malformed("key must be a 97-byte P-384 point"))?,
        signature: bytes_of(&f[5], "signature must be bytes")?
            .try_into()
            .map_err(|_| FreshnessError::Malformed("signature must be 96 bytes"))?,
    };
    if t.version == 0 {
        return Err(FreshnessError::Malformed("version 0 names no policy"));
    }
    if encode(&t) != bytes {
        return Err(FreshnessError::Malformed("not canonically encoded"));
    }
    Ok(t)
}

/// Checks a decoded timestamp against the policy's freshness: the policy names a key, the
/// timestamp is signed by it, and it was not issued after `now_ms` + `skew_ms`.
pub fn verify(
    crypto: &dyn Crypto,
    freshness: Option<&Freshness>,
    t: &Timestamp,
    now_ms: u64,
    skew_ms: u64,
) -> Result<(), FreshnessError> {
    let f = freshness.ok_or(FreshnessError::NotConfigured)?;
    if t.key != f.key {
        return Err(FreshnessError::WrongKey);
    }
    crypto
        .verify_p384_sha384_fixed(&f.key, &signing_message(t.version, &t.digest, t.issued_ms), &t.signature)
        .map_err(|_| FreshnessError::BadSignature)?;
    if t.issued_ms > now_ms.saturating_add(skew_ms) {
        return Err(FreshnessError::FromTheFuture { issued_ms: t.issued_ms, now_ms });
    }
    Ok(())
}

/// Whether releases may go on under the policy head `head` at `now_ms`: always when the
/// newest policy names no timestamp key; otherwise only with a `held` timestamp (verified when
/// it was taken) for exactly `head`, issued no longer than the maximum age ago. Returns the
/// time until which it holds.
pub fn check(
    freshness: Option<&Freshness>,
    held: Option<&Timestamp>,
    head: (u64, [u8; 48]),
    now_ms: u64,
) -> Result<Option<u64>, FreshnessError> {
    let Some(f) = freshness else { return Ok(None) };
    let t = held.ok_or(FreshnessError::Missing)?;
    if t.version > head.0 {
        return Err(FreshnessError::Behind { newest: t.version, held: head.0 });
    }
    if t.version < head.0 {
        return Err(FreshnessError::NotForHead { head: head.0, stamped: t.version });
    }
    if t.digest != head.1 {
        return Err(FreshnessError::Forked(head.0));
    }
    let until = t.issued_ms.saturating_add(f.max_age_s.saturating_mul(1000));
    if now_ms >= until {
        return Err(FreshnessError::Expired { issued_ms: t.issued_ms, expired_ms: until });
    }
    Ok(Some(until))
}

/// Whether `new` should replace `held`: it names a newer version, or the same version and is
/// issued later. (A timestamp for an older version, or an older one for the same version,
/// changes nothing.)
pub fn supersedes(new: &Timestamp, held: Option<&Timestamp>) -> bool {
    held.is_none_or(|h| (new.version, new.issued_ms) > (h.version, h.issued_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RustCrypto;
    use p384::ecdsa::signature::Signer;

    fn key(seed: u8) -> p384::ecdsa::SigningKey {
        p384::ecdsa::SigningKey::from_slice(&[seed; 48]).expect("key")
    }

    fn point(k: &p384::ecdsa::SigningKey) -> TimestampKey {
        k.verifying_key().to_encoded_point(false).as_bytes().try_into().expect("97 bytes")
    }

    fn stamp(k: &p384::ecdsa::SigningKey, version: u64, digest: [u8; 48], issued_ms: u64) -> Timestamp {
        let sig: p384::ecdsa::Signature = k.sign(&signing_message(version, &digest, issued_ms));
        Timestamp {
            version,
            digest,
            issued_ms,
            key: point(k),
            signature: sig.to_bytes()[..].try_into().expect("96 bytes"),
        }
    }

    #[test]
    fn a_timestamp_round_trips_and_every_malformed_or_foreign_encoding_is_refused() {
        let t = stamp(&key(7), 3, [3; 48], 1_000);
        let bytes = encode(&t);
        assert!(is_timestamp(&bytes));
        assert_eq!(decode(&bytes), Ok(t.clone()));
        assert!(matches!(decode(&[0u8; MAX_TIMESTAMP + 1]), Err(FreshnessError::TooLarge(_))));
        assert!(matches!(decode(&[0xff]), Err(FreshnessError::Cbor(_))));
        let mut other = bytes.clone();
        other[5] ^= 1; // inside the tag
        assert!(matches!(decode(&other), Err(FreshnessError::Malformed(_))));
        assert!(!is_timestamp(&other));
        let zero = Timestamp { version: 0, ..t.clone() };
        assert_eq!(decode(&encode(&zero)), Err(FreshnessError::Malformed("version 0 names no policy")));
        // A non-shortest integer is another encoding of the same content.
        let mut long = Vec::new();
        cbor::encode_head(&mut long, 4, 6);
        cbor::encode_text(&mut long, TIMESTAMP_TAG);
        long.extend_from_slice(&[0x1b, 0, 0, 0, 0, 0, 0, 0, 3]);
        cbor::encode_bytes(&mut long, &t.digest);
        cbor::encode_head(&mut long, 0, t.issued_ms);
        cbor::encode_bytes(&mut long, &t.key);
        cbor::encode_bytes(&mut long, &t.signature);
        assert_eq!(decode(&long), Err(FreshnessError::Malformed("not canonically encoded")));
    }

    #[test]
    fn only_the_policys_key_signing_exactly_these_fields_and_not_from_the_future_verifies() {
        let c = RustCrypto;
        let k = key(7);
        let f = Freshness { key: point(&k), max_age_s: 60 };
        let t = stamp(&k, 3, [3; 48], 10_000);
        assert_eq!(verify(&c, Some(&f), &t, 10_000, 0), Ok(()));
        assert_eq!(verify(&c, None, &t, 10_000, 0), Err(FreshnessError::NotConfigured));
        let other = stamp(&key(8), 3, [3; 48], 10_000);
        assert_eq!(verify(&c, Some(&f), &other, 10_000, 0), Err(FreshnessError::WrongKey));
        for forged in [
            Timestamp { version: 4, ..t.clone() },
            Timestamp { digest: [4; 48], ..t.clone() },
            Timestamp { issued_ms: 20_000, ..t.clone() },
        ] {
            assert_eq!(verify(&c, Some(&f), &forged, 30_000, 0), Err(FreshnessError::BadSignature));
        }
        assert_eq!(
            verify(&c, Some(&f), &t, 9_000, 500),
            Err(FreshnessError::FromTheFuture { issued_ms: 10_000, now_ms: 9_000 })
        );
        assert_eq!(verify(&c, Some(&f), &t, 9_000, 1_000), Ok(()), "within the skew");
    }

    #[test]
    fn releases_go_on_only_with_a_young_timestamp_for_exactly_the_head() {
        let k = key(7);
        let f = Freshness { key: point(&k), max_age_s: 60 };
        let head = (3, [3; 48]);
        let t = stamp(&k, 3, [3; 48], 10_000);
        assert_eq!(check(None, None, head, 0), Ok(None), "no key named: freshness not required");
        assert_eq!(check(Some(&f), None, head, 10_000), Err(FreshnessError::Missing));
        assert_eq!(check(Some(&f), Some(&t), head, 10_000), Ok(Some(70_000)));
        assert_eq!(check(Some(&f), Some(&t), head, 69_999), Ok(Some(70_000)));
        assert_eq!(
            check(Some(&f), Some(&t), head, 70_000),
            Err(FreshnessError::Expired { issued_ms: 10_000, expired_ms: 70_000 })
        );
        let newer = stamp(&k, 4, [4; 48], 11_000);
        assert_eq!(check(Some(&f), Some(&newer), head, 11_000), Err(FreshnessError::Behind { newest: 4, held: 3 }));
        let older = stamp(&k, 2, [2; 48], 11_000);
        assert_eq!(
            check(Some(&f), Some(&older), head, 11_000),
            Err(FreshnessError::NotForHead { head: 3, stamped: 2 })
        );
        let fork = stamp(&k, 3, [9; 48], 11_000);
        assert_eq!(check(Some(&f), Some(&fork), head, 11_000), Err(FreshnessError::Forked(3)));
    }

    #[test]
    fn a_held_timestamp_is_replaced_only_by_a_newer_version_or_a_later_one_of_its_version() {
        let k = key(7);
        let t = stamp(&k, 3, [3; 48], 10_000);
        assert!(supersedes(&t, None));
        assert!(supersedes(&stamp(&k, 3, [3; 48], 10_001), Some(&t)));
        assert!(supersedes(&stamp(&k, 4, [4; 48], 1), Some(&t)));
        assert!(!supersedes(&stamp(&k, 3, [3; 48], 10_000), Some(&t)));
        assert!(!supersedes(&stamp(&k, 2, [2; 48], 99_000), Some(&t)), "never back to an older version");
    }
}
