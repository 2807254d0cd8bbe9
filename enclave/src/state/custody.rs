//! Custodians: who holds the shares of the state key, how a share is stored for its
//! custodian, and how a custodian hands its share to a freshly booted, attested KRE.
//!
//! What this module decides: the custodian set and its canonical digest, the envelope that
//! encrypts a Shamir share ([`crate::crypto::shamir`]) to one custodian, the shares file the parent
//! stores, and the unseal message a custodian sends to the KRE, with every check the KRE
//! makes on it. What it trusts: the custodian set given by the caller (in production, the
//! enclave's configuration, covered by its PCRs) and, on the custodian's side, an
//! [`UnsealContext`] built from a KRE attestation that the caller has already verified
//! (PCRs, chain, nonce) — this module does not parse attestation documents.
//!
//! ```text
//! set digest  = SHA-384("keygate/v1/custodian-set" ‖ u8 M ‖ u8 N ‖ C_1 ‖ … ‖ C_N)   (C_i: 97-byte SEC1 points)
//!               share x = i goes to custodian C_i (1-based, in the configured order)
//!
//! envelope (genesis → custodian i), e fresh, E = e·G:
//!   info      = "keygate/v1/share-envelope" ‖ set_digest ‖ u8 x ‖ C_x ‖ E
//!   key‖nonce = HKDF-SHA384(salt = set_digest, ikm = ECDH(e, C_x), info, L = 44)
//!   sealed    = AES-256-GCM(key, nonce, aad = info, y)                         (48 bytes)
//!
//! commitment to share x (shares file format 2):
//!   commit_x  = SHA-384("keygate/v1/share-commitment" ‖ set_digest ‖ u8 x ‖ y)
//!
//! unseal (custodian x → KRE with attested ephemeral key K), e fresh, E = e·G, c = custodian scalar:
//!   T         = SHA-384("keygate/v2/unseal" ‖ SHA-384(kre_attestation) ‖ unseal_nonce ‖ K
//!                       ‖ set_digest ‖ u64be generation ‖ SHA-384(blob) ‖ u8 x ‖ C_x ‖ E)
//!   key‖nonce = HKDF-SHA384(salt = T, ikm = ECDH(e, K) ‖ ECDH(c, K), info = "keygate/v1/unseal-share", L = 44)
//!   sealed    = AES-256-GCM(key, nonce, aad = T, y)
//! ```
//!
//! The second ECDH term (static custodian key × KRE key) authenticates the sender: only the
//! holder of `c` can produce a message the KRE opens under `C_x`, so a share from a
//! non-custodian is refused by name ([`CustodyError::NotACustodian`]) or by the AEAD. `T`
//! binds the KRE's attestation, the unseal nonce the KRE chose for this session and its
//! ephemeral key, so a message captured from an earlier unseal does not open in a later one.
//! Shares are zeroized when dropped ([`Share`] holds a [`Secret`]).
//!
//! The AEAD shows who sent a share, not that the share is the one genesis made: a custodian
//! can encrypt any 32 bytes. So the shares file (format 2) records a hash commitment to every
//! share, and the KRE refuses a share that does not match its index's commitment as it
//! arrives ([`CustodyError::ShareCommitmentMismatch`]); the session goes on with the others,
//! and one malicious custodian can neither make the reconstruction fail nor have an honest
//! one blamed. The commitments are covered by the genesis attestation (over the whole file).
//! A hash commitment rather than Feldman's: Shamir here is over GF(2^8), which has no group
//! to commit in, and the dealer (the genesis KRE) is attested, so only the binding of each
//! share to its index is needed. A share has 256 bits of entropy, so its hash reveals
//! nothing a brute force could use. A custodian key that is also a policy approver is
//! refused ([`check_one_purpose`]): one key, one purpose.

use keygate_attestation::crypto::{p384_scalar_from, Crypto, CryptoError, P384Scalar, P384_POINT_LEN};
use keygate_attestation::secret::Secret;
use zeroize::Zeroizing;

use crate::binding;
use crate::codec::{CodecError, Reader};
use crate::crypto::shamir::{self, ShamirError, Share};

/// A P-384 public key, uncompressed SEC1.
pub type PublicKey = [u8; P384_POINT_LEN];

/// Most custodians in a set.
pub const MAX_CUSTODIANS: usize = 32;
/// Length of an encrypted share (32 bytes ‖ 16-byte tag).
pub const SEALED_SHARE_LEN: usize = 48;
/// First bytes of a shares file.
pub const SHARES_MAGIC: [u8; 8] = *b"KGSHARES";
/// Shares file format version this code writes (format 2: per-share commitments). It also
/// reads [`SHARES_VERSION_1`].
pub const SHARES_VERSION: u16 = 2;
/// The first shares file format: no commitments (shares are checked only by the AEAD and
/// the reconstruction). Read, never written; a reshare writes format 2.
pub const SHARES_VERSION_1: u16 = 1;
/// Length of an encoded [`UnsealShare`].
pub const UNSEAL_SHARE_LEN: usize = 1 + 2 * P384_POINT_LEN + SEALED_SHARE_LEN;

/// Why a custodian operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CustodyError {
    /// A set without custodians.
    #[error("no custodians")]
    NoCustodians,
    /// More than [`MAX_CUSTODIANS`].
    #[error("too many custodians ({count}, max {MAX_CUSTODIANS})")]
    TooManyCustodians {
        /// The count.
        count: usize,
    },
    /// Threshold 0 or above the number of custodians.
    #[error("threshold {threshold} invalid for {custodians} custodians")]
    BadThreshold {
        /// The threshold.
        threshold: u8,
        /// The number of custodians.
        custodians: usize,
    },
    /// A custodian key is not a valid P-384 point.
    #[error("custodian key {index} is not a valid P-384 public key")]
    BadCustodianKey {
        /// 0-based position in the set.
        index: usize,
    },
    /// The same key twice in the set.
    #[error("custodian key {index} appears twice")]
    DuplicateCustodianKey {
        /// 0-based position of the second occurrence.
        index: usize,
    },
    /// Not a shares file.
    #[error("not a keygate shares file (bad magic)")]
    BadMagic,
    /// A shares file version this code does not read.
    #[error("unsupported shares file version {version}")]
    UnsupportedVersion {
        /// The version read.
        version: u16,
    },
    /// Input shorter than its format.
    #[error("truncated")]
    Truncated,
    /// Input longer than its format.
    #[error("trailing bytes")]
    TrailingBytes,
    /// The set digest stored in a shares file is not that of its set (corrupted file).
    #[error("shares file custodian set digest mismatch")]
    SetDigestMismatch,
    /// Envelope `index` does not carry x = index + 1.
    #[error("envelope {index} has the wrong share index")]
    EnvelopeIndexMismatch {
        /// 0-based position.
        index: usize,
    },
    /// The key is not one of the set's custodians.
    #[error("not a custodian of this set")]
    NotACustodian,
    /// The share index claimed is not the custodian's position in the set.
    #[error("share index {claimed} claimed, custodian holds {expected}")]
    ShareIndexMismatch {
        /// x in the message.
        claimed: u8,
        /// x of that custodian.
        expected: u8,
    },
    /// The unseal context is for another custodian set.
    #[error("unseal context is for another custodian set")]
    ContextMismatch,
    /// The KRE's attested public key is not a valid P-384 point.
    #[error("KRE public key is not a valid P-384 point")]
    BadKrePublicKey,
    /// An ephemeral key in an envelope or message is not a valid P-384 point.
    #[error("ephemeral key is not a valid P-384 point")]
    BadEphemeralKey,
    /// The envelope does not open with this custodian key (wrong key, wrong set, tampered).
    #[error("share envelope does not decrypt")]
    EnvelopeDecrypt,
    /// The unseal message does not open (other KRE/session, not from that custodian, tampered).
    #[error("unseal share does not decrypt")]
    UnsealShareDecrypt,
    /// A second share from the same custodian in one unseal session.
    #[error("share {x} already received")]
    DuplicateShare {
        /// The share index.
        x: u8,
    },
    /// The share does not match the commitment the shares file records for its index: a
    /// custodian sent (or holds) another share than genesis made. Refused on arrival; the
    /// session goes on with the other custodians.
    #[error("share {x} does not match its commitment in the shares file (refused; the other custodians' shares still count)")]
    ShareCommitmentMismatch {
        /// The share index.
        x: u8,
    },
    /// A custodian key is also a policy approver key (one key, one purpose).
    #[error("custodian key {index} is also a policy approver key: a key is a custodian or an approver, never both")]
    CustodianIsApprover {
        /// 0-based position in the custodian set.
        index: usize,
    },
    /// Splitting or combining failed.
    #[error("shamir: {0}")]
    Shamir(#[from] ShamirError),
    /// A primitive failed while encrypting.
    #[error("crypto: {0}")]
    Crypto(CryptoError),
}

impl From<CodecError> for CustodyError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TrailingBytes { .. } => CustodyError::TrailingBytes,
            // Custody formats are fixed fields only: every other failure is a field cut short.
            CodecError::Truncated { .. }
            | CodecError::Utf8 { .. }
            | CodecError::TooLong { .. }
            | CodecError::BadId { .. }
            | CodecError::BadFlag { .. } => CustodyError::Truncated,
        }
    }
}

/// The custodians of the state key: M of these N P-384 keys open it. Valid by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodianSet {
    threshold: u8,
    keys: Vec<PublicKey>,
}

impl CustodianSet {
    /// Checks and builds a set: 1 ≤ threshold ≤ N ≤ [`MAX_CUSTODIANS`], valid, distinct keys.
    pub fn new(crypto: &dyn Crypto, threshold: u8, keys: Vec<PublicKey>) -> Result<Self, CustodyError> {
        if keys.is_empty() {
            return Err(CustodyError::NoCustodians);
        }
        if keys.len() > MAX_CUSTODIANS {
            return Err(CustodyError::TooManyCustodians { count: keys.len() });
        }
        if threshold == 0 || usize::from(threshold) > keys.len() {
            return Err(CustodyError::BadThreshold { threshold, custodians: keys.len() });
        }
        for (index, k) in keys.iter().enumerate() {
            crypto.validate_p384_point(k).map_err(|_| CustodyError::BadCustodianKey { index })?;
            if keys[..index].contains(k) {
                return Err(CustodyError::DuplicateCustodianKey { index });
            }
        }
        Ok(Self { threshold, keys })
    }

    /// M.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// The custodian keys; custodian `i` (0-based) holds share x = i + 1.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// N (at most [`MAX_CUSTODIANS`], so it fits a u8).
    pub fn count(&self) -> u8 {
        u8::try_from(self.keys.len()).unwrap_or(u8::MAX)
    }

    /// The share index x of `key`, if it is a custodian.
    pub fn x_of(&self, key: &[u8]) -> Option<u8> {
        let i = self.keys.iter().position(|k| k.as_slice() == key)?;
        u8::try_from(i + 1).ok()
    }

    /// The canonical digest (bound into the sealed state header and every envelope).
    pub fn digest(&self) -> [u8; 48] {
        binding::custodian_set_digest(self.threshold, self.count(), &self.keys)
    }
}

/// One key, one purpose: refuses a custodian set in which a key is also one of `approvers`
/// (the policy signing keys in force). A key holding both roles would let one compromise
/// both approve a policy and hold a share; the KRE checks it at genesis and at a reshare.
pub fn check_one_purpose<A: AsRef<[u8]>>(set: &CustodianSet, approvers: &[A]) -> Result<(), CustodyError> {
    match custodian_also_approver(set, approvers) {
        Some(index) => Err(CustodyError::CustodianIsApprover { index }),
        None => Ok(()),
    }
}

/// The 0-based position of the first custodian key of `set` that is one of `approvers`.
pub fn custodian_also_approver<A: AsRef<[u8]>>(set: &CustodianSet, approvers: &[A]) -> Option<usize> {
    set.keys.iter().position(|k| approvers.iter().any(|a| a.as_ref() == k.as_slice()))
}

/// One share encrypted to one custodian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareEnvelope {
    /// The share index (1-based position of the custodian in the set).
    pub x: u8,
    /// The ephemeral public key E.
    pub ephemeral: PublicKey,
    /// AES-256-GCM ciphertext ‖ tag of the share's 32 bytes.
    pub sealed: [u8; SEALED_SHARE_LEN],
}

fn key_nonce(crypto: &dyn Crypto, salt: &[u8], ikm: &[u8], info: &[u8]) -> Result<(Secret<32>, [u8; 12]), CryptoError> {
    let mut okm = Zeroizing::new([0u8; 44]);
    crypto.hkdf_sha384(salt, ikm, info, &mut okm[..])?;
    let key = Secret::from_slice(&okm[..32]).ok_or(CryptoError::Kdf)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    Ok((key, nonce))
}

fn to_point(v: Vec<u8>) -> Result<PublicKey, CryptoError> {
    v.try_into().map_err(|_| CryptoError::BadPublicKey)
}

fn sealed_array(v: Vec<u8>) -> Result<[u8; SEALED_SHARE_LEN], CustodyError> {
    v.try_into().map_err(|_| CustodyError::Crypto(CryptoError::Decrypt))
}

/// Encrypts `share` to `custodian` (genesis, or a reshare).
pub fn seal_envelope(
    crypto: &dyn Crypto,
    set_digest: &[u8; 48],
    custodian: &PublicKey,
    share: &Share,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<ShareEnvelope, CustodyError> {
    let (e, eph) = p384_scalar_from(crypto, |b: &mut [u8]| rng(b)).map_err(CustodyError::Crypto)?;
    let ephemeral = to_point(eph).map_err(CustodyError::Crypto)?;
    let z = crypto
        .ecdh_p384(&e, custodian)
        .map_err(|_| CustodyError::BadCustodianKey { index: usize::from(share.x).saturating_sub(1) })?;
    let info = binding::share_envelope_info(set_digest, share.x, custodian, &ephemeral);
    let (key, nonce) = key_nonce(crypto, set_digest, z.expose(), &info).map_err(CustodyError::Crypto)?;
    let sealed = crypto.aes256gcm_seal(&key, &nonce, &info, share.y.expose()).map_err(CustodyError::Crypto)?;
    Ok(ShareEnvelope { x: share.x, ephemeral, sealed: sealed_array(sealed)? })
}

/// Opens an envelope with the custodian's private scalar.
pub fn open_envelope(
    crypto: &dyn Crypto,
    set_digest: &[u8; 48],
    custodian_scalar: &P384Scalar,
    envelope: &ShareEnvelope,
) -> Result<Share, CustodyError> {
    let custodian =
        to_point(crypto.p384_public(custodian_scalar).map_err(CustodyError::Crypto)?).map_err(CustodyError::Crypto)?;
    let z = crypto.ecdh_p384(custodian_scalar, &envelope.ephemeral).map_err(|_| CustodyError::BadEphemeralKey)?;
    let info = binding::share_envelope_info(set_digest, envelope.x, &custodian, &envelope.ephemeral);
    let (key, nonce) = key_nonce(crypto, set_digest, z.expose(), &info).map_err(CustodyError::Crypto)?;
    let pt = crypto.aes256gcm_open(&key, &nonce, &info, &envelope.sealed).map_err(|_| CustodyError::EnvelopeDecrypt)?;
    let y = Secret::from_slice(pt.expose()).ok_or(CustodyError::EnvelopeDecrypt)?;
    Ok(Share { x: envelope.x, y })
}

/// What the parent stores next to the sealed state: the custodian set, one envelope per
/// custodian and (format 2) one commitment per share, in set order.
///
/// ```text
/// "KGSHARES" ‖ u16be version = 2 ‖ set_digest (48) ‖ u8 M ‖ u8 N ‖ N × C_i (97)
///            ‖ N × (u8 x ‖ E (97) ‖ sealed (48) ‖ commit_x (48))
/// format 1:  the same with version = 1 and no commit_x
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharesFile {
    set: CustodianSet,
    envelopes: Vec<ShareEnvelope>,
    /// commit_x per envelope (format 2); `None` for a format-1 file.
    commitments: Option<Vec<[u8; 48]>>,
}

/// Refuses `share` if `commitments` (a format-2 shares file's) has another commitment for its
/// index. A format-1 file (`None`) has none to check.
pub fn check_commitment(
    commitments: Option<&[[u8; 48]]>,
    set_digest: &[u8; 48],
    share: &Share,
) -> Result<(), CustodyError> {
    let Some(commitments) = commitments else { return Ok(()) };
    let mismatch = CustodyError::ShareCommitmentMismatch { x: share.x };
    let expected = usize::from(share.x).checked_sub(1).and_then(|i| commitments.get(i)).ok_or(mismatch)?;
    if binding::share_commitment(set_digest, share.x, share.y.expose()) != *expected {
        return Err(mismatch);
    }
    Ok(())
}

impl SharesFile {
    /// Splits `state_key` M-of-N for `set` and encrypts each share to its custodian.
    pub fn create(
        crypto: &dyn Crypto,
        set: CustodianSet,
        state_key: &Secret<32>,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Self, CustodyError> {
        let shares = shamir::split(state_key, set.threshold, set.count(), rng)?;
        let digest = set.digest();
        let envelopes = shares
            .iter()
            .zip(&set.keys)
            .map(|(share, key)| seal_envelope(crypto, &digest, key, share, rng))
            .collect::<Result<Vec<_>, _>>()?;
        let commitments = shares.iter().map(|s| binding::share_commitment(&digest, s.x, s.y.expose())).collect();
        Ok(Self { set, envelopes, commitments: Some(commitments) })
    }

    /// The per-share commitments, in set order (`None` for a format-1 file).
    pub fn commitments(&self) -> Option<&[[u8; 48]]> {
        self.commitments.as_deref()
    }

    /// The custodian set.
    pub fn set(&self) -> &CustodianSet {
        &self.set
    }

    /// The envelopes, envelope i for custodian i.
    pub fn envelopes(&self) -> &[ShareEnvelope] {
        &self.envelopes
    }

    /// The custodian's share: finds its envelope by its public key and opens it.
    pub fn open_share(&self, crypto: &dyn Crypto, custodian_scalar: &P384Scalar) -> Result<Share, CustodyError> {
        let public = crypto.p384_public(custodian_scalar).map_err(CustodyError::Crypto)?;
        let x = self.set.x_of(&public).ok_or(CustodyError::NotACustodian)?;
        let env = self.envelopes.get(usize::from(x) - 1).ok_or(CustodyError::NotACustodian)?;
        let digest = self.set.digest();
        let share = open_envelope(crypto, &digest, custodian_scalar, env)?;
        // A custodian whose own share does not match learns it here, before the KRE does.
        check_commitment(self.commitments(), &digest, &share)?;
        Ok(share)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&SHARES_MAGIC);
        let version = if self.commitments.is_some() { SHARES_VERSION } else { SHARES_VERSION_1 };
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&self.set.digest());
        out.extend_from_slice(&[self.set.threshold, self.set.count()]);
        for k in &self.set.keys {
            out.extend_from_slice(k);
        }
        for (i, e) in self.envelopes.iter().enumerate() {
            out.push(e.x);
            out.extend_from_slice(&e.ephemeral);
            out.extend_from_slice(&e.sealed);
            if let Some(c) = self.commitments.as_ref().and_then(|c| c.get(i)) {
                out.extend_from_slice(c);
            }
        }
        out
    }

    /// Parses and checks a shares file (set validity, digest, envelope order). Envelope
    /// ciphertexts are checked when a custodian opens its own.
    pub fn decode(crypto: &dyn Crypto, bytes: &[u8]) -> Result<Self, CustodyError> {
        let mut r = Reader::new(bytes);
        let magic: [u8; 8] = r.array("magic").map_err(|_| {
            if SHARES_MAGIC.starts_with(bytes) {
                CustodyError::Truncated
            } else {
                CustodyError::BadMagic
            }
        })?;
        if magic != SHARES_MAGIC {
            return Err(CustodyError::BadMagic);
        }
        let version = r.u16("version")?;
        if version != SHARES_VERSION && version != SHARES_VERSION_1 {
            return Err(CustodyError::UnsupportedVersion { version });
        }
        let stored_digest: [u8; 48] = r.array("set digest")?;
        let threshold = r.u8("threshold")?;
        let n = usize::from(r.u8("custodian count")?);
        if n > MAX_CUSTODIANS {
            return Err(CustodyError::TooManyCustodians { count: n });
        }
        let keys = (0..n).map(|_| r.array::<P384_POINT_LEN>("custodian key")).collect::<Result<Vec<_>, _>>()?;
        let mut envelopes = Vec::with_capacity(n);
        let mut commitments = (version == SHARES_VERSION).then(|| Vec::with_capacity(n));
        for index in 0..n {
            let x = r.u8("envelope x")?;
            let ephemeral = r.array("envelope ephemeral")?;
            let sealed = r.array("envelope sealed")?;
            if let Some(c) = commitments.as_mut() {
                c.push(r.array::<48>("share commitment")?);
            }
            if usize::from(x) != index + 1 {
                return Err(CustodyError::EnvelopeIndexMismatch { index });
            }
            envelopes.push(ShareEnvelope { x, ephemeral, sealed });
        }
        if r.remaining() != 0 {
            return Err(CustodyError::TrailingBytes);
        }
        let set = CustodianSet::new(crypto, threshold, keys)?;
        if set.digest() != stored_digest {
            return Err(CustodyError::SetDigestMismatch);
        }
        Ok(Self { set, envelopes, commitments })
    }
}

/// What both sides of an unseal bind the share to. The custodian builds it from the KRE's
/// attestation document after verifying it (PCRs, chain, nonce = its fresh challenge); the
/// KRE builds it from its own values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsealContext {
    /// SHA-384 of the KRE's attestation document, as sent.
    pub kre_attestation_sha384: [u8; 48],
    /// The nonce the KRE chose for this unseal session.
    pub unseal_nonce: [u8; 32],
    /// The KRE's ephemeral public key K (the attestation's `public_key`).
    pub kre_public: PublicKey,
    /// Digest of the custodian set being unsealed.
    pub set_digest: [u8; 48],
    /// Generation of the sealed state being unsealed (custodians record the highest).
    pub generation: u64,
    /// SHA-384 of the exact sealed blob being unsealed (custodians record it with the
    /// generation: two blobs of one generation are a fork).
    pub blob_sha384: [u8; 48],
}

impl UnsealContext {
    fn transcript(&self, x: u8, custodian: &PublicKey, ephemeral: &PublicKey) -> [u8; 48] {
        binding::UnsealTranscript {
            kre_attestation_sha384: &self.kre_attestation_sha384,
            unseal_nonce: &self.unseal_nonce,
            kre_public: &self.kre_public,
            set_digest: &self.set_digest,
            generation: self.generation,
            blob_sha384: &self.blob_sha384,
            x,
            custodian,
            ephemeral,
        }
        .hash()
    }
}

/// A custodian's share, re-encrypted to the KRE for one unseal session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsealShare {
    /// The share index.
    pub x: u8,
    /// The sending custodian's public key C_x.
    pub custodian: PublicKey,
    /// The custodian's fresh ephemeral key E.
    pub ephemeral: PublicKey,
    /// AES-256-GCM ciphertext ‖ tag of the share.
    pub sealed: [u8; SEALED_SHARE_LEN],
}

impl UnsealShare {
    /// `u8 x ‖ C (97) ‖ E (97) ‖ sealed (48)`, [`UNSEAL_SHARE_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        [&[self.x][..], &self.custodian, &self.ephemeral, &self.sealed].concat()
    }

    /// Parses exactly [`UNSEAL_SHARE_LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, CustodyError> {
        let mut r = Reader::new(bytes);
        let m = Self {
            x: r.u8("x")?,
            custodian: r.array("custodian")?,
            ephemeral: r.array("ephemeral")?,
            sealed: r.array("sealed")?,
        };
        if r.remaining() != 0 {
            return Err(CustodyError::TrailingBytes);
        }
        Ok(m)
    }
}

fn unseal_key(
    crypto: &dyn Crypto,
    t: &[u8; 48],
    z1: &Secret<48>,
    z2: &Secret<48>,
) -> Result<(Secret<32>, [u8; 12]), CryptoError> {
    let mut ikm = Zeroizing::new([0u8; 96]);
    ikm[..48].copy_from_slice(z1.expose());
    ikm[48..].copy_from_slice(z2.expose());
    key_nonce(crypto, t, &ikm[..], binding::UNSEAL_SHARE)
}

/// The custodian's side of an unseal: opens its envelope from `shares` and re-encrypts the
/// share to the KRE key in `ctx`. The caller must have verified the KRE attestation that
/// `ctx` was built from, and checked `ctx.generation` against the highest it has unsealed.
pub fn custodian_reencrypt(
    crypto: &dyn Crypto,
    shares: &SharesFile,
    custodian_scalar: &P384Scalar,
    ctx: &UnsealContext,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<UnsealShare, CustodyError> {
    if ctx.set_digest != shares.set.digest() {
        return Err(CustodyError::ContextMismatch);
    }
    crypto.validate_p384_point(&ctx.kre_public).map_err(|_| CustodyError::BadKrePublicKey)?;
    let share = shares.open_share(crypto, custodian_scalar)?;
    let custodian =
        to_point(crypto.p384_public(custodian_scalar).map_err(CustodyError::Crypto)?).map_err(CustodyError::Crypto)?;
    let (e, eph) = p384_scalar_from(crypto, |b: &mut [u8]| rng(b)).map_err(CustodyError::Crypto)?;
    let ephemeral = to_point(eph).map_err(CustodyError::Crypto)?;
    let z1 = crypto.ecdh_p384(&e, &ctx.kre_public).map_err(|_| CustodyError::BadKrePublicKey)?;
    let z2 = crypto.ecdh_p384(custodian_scalar, &ctx.kre_public).map_err(|_| CustodyError::BadKrePublicKey)?;
    let t = ctx.transcript(share.x, &custodian, &ephemeral);
    let (key, nonce) = unseal_key(crypto, &t, &z1, &z2).map_err(CustodyError::Crypto)?;
    let sealed = crypto.aes256gcm_seal(&key, &nonce, &t, share.y.expose()).map_err(CustodyError::Crypto)?;
    Ok(UnsealShare { x: share.x, custodian, ephemeral, sealed: sealed_array(sealed)? })
}

/// The KRE's side: checks that `msg` comes from custodian x of `set` for this session and
/// returns the share.
pub fn kre_open_unseal_share(
    crypto: &dyn Crypto,
    set: &CustodianSet,
    kre_scalar: &P384Scalar,
    ctx: &UnsealContext,
    msg: &UnsealShare,
) -> Result<Share, CustodyError> {
    if ctx.set_digest != set.digest() {
        return Err(CustodyError::ContextMismatch);
    }
    let expected = set.x_of(&msg.custodian).ok_or(CustodyError::NotACustodian)?;
    if msg.x != expected {
        return Err(CustodyError::ShareIndexMismatch { claimed: msg.x, expected });
    }
    let z1 = crypto.ecdh_p384(kre_scalar, &msg.ephemeral).map_err(|_| CustodyError::BadEphemeralKey)?;
    // C_x was validated when the set was built.
    let z2 = crypto.ecdh_p384(kre_scalar, &msg.custodian).map_err(|_| CustodyError::NotACustodian)?;
    let t = ctx.transcript(msg.x, &msg.custodian, &msg.ephemeral);
    let (key, nonce) = unseal_key(crypto, &t, &z1, &z2).map_err(CustodyError::Crypto)?;
    let pt = crypto.aes256gcm_open(&key, &nonce, &t, &msg.sealed).map_err(|_| CustodyError::UnsealShareDecrypt)?;
    let y = Secret::from_slice(pt.expose()).ok_or(CustodyError::UnsealShareDecrypt)?;
    Ok(Share { x: msg.x, y })
}

/// Progress of an unseal session.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsealProgress {
    /// More shares are needed.
    NeedMore {
        /// Shares accepted so far.
        have: u8,
        /// The threshold.
        need: u8,
    },
    /// The state key, reconstructed from `threshold` shares (the session's shares are gone).
    Complete(Secret<32>),
}

/// The KRE's collection of shares for one unseal session (one boot, one [`UnsealContext`]).
/// Pure: the KRE core feeds it messages and opens the sealed state with the key it yields.
#[derive(Debug)]
pub struct UnsealSession {
    set: CustodianSet,
    commitments: Option<Vec<[u8; 48]>>,
    ctx: UnsealContext,
    shares: Vec<Share>,
}

impl UnsealSession {
    /// A session for the set of `shares` (whose commitments each share must match); `ctx`
    /// must carry the set's digest.
    pub fn new(shares: &SharesFile, ctx: UnsealContext) -> Result<Self, CustodyError> {
        if ctx.set_digest != shares.set.digest() {
            return Err(CustodyError::ContextMismatch);
        }
        Ok(Self { set: shares.set.clone(), commitments: shares.commitments.clone(), ctx, shares: Vec::new() })
    }

    /// The context custodians must bind to.
    pub fn context(&self) -> &UnsealContext {
        &self.ctx
    }

    /// Checks and adds one custodian's message; at the threshold, reconstructs the key and
    /// drops (zeroizes) the shares. A refused message leaves the session unchanged.
    pub fn add(
        &mut self,
        crypto: &dyn Crypto,
        kre_scalar: &P384Scalar,
        msg: &UnsealShare,
    ) -> Result<UnsealProgress, CustodyError> {
        collect_share(crypto, &self.set, self.commitments.as_deref(), kre_scalar, &self.ctx, &mut self.shares, msg)
    }
}

/// Opens `msg` for `ctx`, checks it against its index's commitment (when the shares file has
/// them) and adds it to `shares` (one per custodian); at the set's threshold, reconstructs the
/// key and clears (zeroizes) the shares. A refused message leaves `shares` unchanged. The one
/// share collector of every session (unseal and reshare, `crate::state::vault`).
pub fn collect_share(
    crypto: &dyn Crypto,
    set: &CustodianSet,
    commitments: Option<&[[u8; 48]]>,
    kre_scalar: &P384Scalar,
    ctx: &UnsealContext,
    shares: &mut Vec<Share>,
    msg: &UnsealShare,
) -> Result<UnsealProgress, CustodyError> {
    let share = kre_open_unseal_share(crypto, set, kre_scalar, ctx, msg)?;
    check_commitment(commitments, &ctx.set_digest, &share)?;
    if shares.iter().any(|s| s.x == share.x) {
        return Err(CustodyError::DuplicateShare { x: share.x });
    }
    shares.push(share);
    let have = u8::try_from(shares.len()).unwrap_or(u8::MAX);
    if have < set.threshold {
        return Ok(UnsealProgress::NeedMore { have, need: set.threshold });
    }
    let key = shamir::combine(shares, set.threshold);
    shares.clear();
    Ok(UnsealProgress::Complete(key?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::KekStatus;
    use crate::crypto::test_rng as rng;
    use crate::state::sealed::{self, KekEntry, KreState};
    use keygate_attestation::crypto::{all_backends, default_backend};

    fn keypair(c: &dyn Crypto, seed: u8) -> (P384Scalar, PublicKey) {
        let (s, p) = p384_scalar_from(c, rng(seed)).expect("key");
        (s, p.try_into().expect("point"))
    }

    struct Fixture {
        custodians: Vec<(P384Scalar, PublicKey)>,
        set: CustodianSet,
        shares: SharesFile,
        state_key: Secret<32>,
        kre: (P384Scalar, PublicKey),
    }

    fn fixture(c: &dyn Crypto, m: u8, n: u8) -> Fixture {
        let custodians: Vec<_> = (0..n).map(|i| keypair(c, 100 + i)).collect();
        let set = CustodianSet::new(c, m, custodians.iter().map(|(_, p)| *p).collect()).expect("set");
        let state_key = Secret::new([0x5a; 32]);
        let shares = SharesFile::create(c, set.clone(), &state_key, &mut rng(1)).expect("create");
        Fixture { custodians, set, shares, state_key, kre: keypair(c, 7) }
    }

    fn ctx(f: &Fixture, nonce: u8) -> UnsealContext {
        UnsealContext {
            kre_attestation_sha384: [0xa7; 48],
            unseal_nonce: [nonce; 32],
            kre_public: f.kre.1,
            set_digest: f.set.digest(),
            generation: 3,
            blob_sha384: [0xb1; 48],
        }
    }

    /// What a malicious custodian `x` (holding `scalar`) can send: a well-formed message for
    /// this session carrying any 32 bytes `y` instead of its share.
    fn reencrypt_y(c: &dyn Crypto, ctx: &UnsealContext, scalar: &P384Scalar, x: u8, y: &[u8; 32]) -> UnsealShare {
        let (e, eph) = p384_scalar_from(c, rng(41)).expect("eph");
        let ephemeral: PublicKey = eph.try_into().expect("point");
        let custodian: PublicKey = c.p384_public(scalar).expect("public").try_into().expect("point");
        let z1 = c.ecdh_p384(&e, &ctx.kre_public).expect("z1");
        let z2 = c.ecdh_p384(scalar, &ctx.kre_public).expect("z2");
        let t = ctx.transcript(x, &custodian, &ephemeral);
        let (key, nonce) = unseal_key(c, &t, &z1, &z2).expect("key");
        let sealed = c.aes256gcm_seal(&key, &nonce, &t, y).expect("seal");
        UnsealShare { x, custodian, ephemeral, sealed: sealed.try_into().expect("48") }
    }

    #[test]
    fn set_validation_and_digest() {
        let c = default_backend();
        let keys: Vec<PublicKey> = (0..3).map(|i| keypair(c, i).1).collect();
        let set = CustodianSet::new(c, 2, keys.clone()).expect("set");
        assert_eq!(set.digest(), CustodianSet::new(c, 2, keys.clone()).expect("set").digest());
        assert_ne!(set.digest(), CustodianSet::new(c, 3, keys.clone()).expect("set").digest());
        let swapped = vec![keys[1], keys[0], keys[2]];
        assert_ne!(set.digest(), CustodianSet::new(c, 2, swapped).expect("set").digest());
        assert_eq!(set.x_of(&keys[2]), Some(3));
        assert_eq!(set.x_of(&[4; 97]), None);
        assert_eq!(CustodianSet::new(c, 1, vec![]), Err(CustodyError::NoCustodians));
        assert_eq!(
            CustodianSet::new(c, 0, keys.clone()),
            Err(CustodyError::BadThreshold { threshold: 0, custodians: 3 })
        );
        assert_eq!(
            CustodianSet::new(c, 4, keys.clone()),
            Err(CustodyError::BadThreshold { threshold: 4, custodians: 3 })
        );
        let mut bad = keys.clone();
        bad[1][50] ^= 1;
        assert_eq!(CustodianSet::new(c, 2, bad), Err(CustodyError::BadCustodianKey { index: 1 }));
        let dup = vec![keys[0], keys[1], keys[0]];
        assert_eq!(CustodianSet::new(c, 2, dup), Err(CustodyError::DuplicateCustodianKey { index: 2 }));
        let many = vec![keys[0]; MAX_CUSTODIANS + 1];
        assert_eq!(CustodianSet::new(c, 2, many), Err(CustodyError::TooManyCustodians { count: MAX_CUSTODIANS + 1 }));
    }

    #[test]
    fn envelopes_open_only_for_their_custodian_on_every_backend() {
        for a in all_backends() {
            for b in all_backends() {
                let f = fixture(a, 2, 3);
                for (i, (scalar, _)) in f.custodians.iter().enumerate() {
                    let share = f.shares.open_share(b, scalar).expect("open");
                    assert_eq!(usize::from(share.x), i + 1);
                }
                // Custodian 0's key cannot open custodian 1's envelope.
                let d = f.set.digest();
                assert_eq!(
                    open_envelope(b, &d, &f.custodians[0].0, &f.shares.envelopes()[1]),
                    Err(CustodyError::EnvelopeDecrypt)
                );
                let (stranger, _) = keypair(b, 99);
                assert_eq!(f.shares.open_share(b, &stranger), Err(CustodyError::NotACustodian));
            }
        }
    }

    #[test]
    fn envelopes_bind_set_index_and_every_byte() {
        let c = default_backend();
        let f = fixture(c, 2, 3);
        let (s0, _) = &f.custodians[0];
        let env = &f.shares.envelopes()[0];
        assert_eq!(open_envelope(c, &[0; 48], s0, env), Err(CustodyError::EnvelopeDecrypt));
        let mut other_x = env.clone();
        other_x.x = 2;
        assert_eq!(open_envelope(c, &f.set.digest(), s0, &other_x), Err(CustodyError::EnvelopeDecrypt));
        for i in 0..SEALED_SHARE_LEN {
            let mut t = env.clone();
            t.sealed[i] ^= 1;
            assert_eq!(open_envelope(c, &f.set.digest(), s0, &t), Err(CustodyError::EnvelopeDecrypt));
        }
        let mut t = env.clone();
        t.ephemeral[10] ^= 1;
        assert_eq!(open_envelope(c, &f.set.digest(), s0, &t), Err(CustodyError::BadEphemeralKey));
    }

    #[test]
    fn shares_file_round_trip_and_strict_decoding() {
        let c = default_backend();
        let f = fixture(c, 2, 3);
        let bytes = f.shares.encode();
        assert_eq!(bytes.len(), 8 + 2 + 48 + 2 + 3 * 97 + 3 * (1 + 97 + 48 + 48));
        assert_eq!(&bytes[8..10], &[0, 2]);
        assert_eq!(SharesFile::decode(c, &bytes), Ok(f.shares.clone()));
        for n in 0..bytes.len() {
            assert_eq!(SharesFile::decode(c, &bytes[..n]), Err(CustodyError::Truncated), "len {n}");
        }
        assert_eq!(SharesFile::decode(c, &[bytes.clone(), vec![0]].concat()), Err(CustodyError::TrailingBytes));
        assert_eq!(SharesFile::decode(c, b"nope, not it"), Err(CustodyError::BadMagic));
        let mut t = bytes.clone();
        t[9] = 3;
        assert_eq!(SharesFile::decode(c, &t), Err(CustodyError::UnsupportedVersion { version: 3 }));
        let mut t = bytes.clone();
        t[20] ^= 1;
        assert_eq!(SharesFile::decode(c, &t), Err(CustodyError::SetDigestMismatch));
        let mut t = bytes.clone();
        t[58] = 3; // threshold 2 -> 3: still valid, but the digest no longer matches.
        assert_eq!(SharesFile::decode(c, &t), Err(CustodyError::SetDigestMismatch));
        let mut t = bytes.clone();
        t[60 + 97] = 0x05; // custodian 2's key: not a point.
        assert_eq!(SharesFile::decode(c, &t), Err(CustodyError::BadCustodianKey { index: 1 }));
        let mut t = bytes.clone();
        t[60 + 3 * 97] = 2; // first envelope claims x = 2
        assert_eq!(SharesFile::decode(c, &t), Err(CustodyError::EnvelopeIndexMismatch { index: 0 }));
        // Envelope ciphertext tamper decodes, and fails when the custodian opens it.
        let mut t = bytes.clone();
        let last_sealed = t.len() - 1 - 48;
        t[last_sealed] ^= 1;
        let tampered = SharesFile::decode(c, &t).expect("decode");
        assert_eq!(tampered.open_share(c, &f.custodians[2].0), Err(CustodyError::EnvelopeDecrypt));
        // A commitment tamper decodes, and its custodian learns that its share does not match.
        let mut t = bytes.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        let tampered = SharesFile::decode(c, &t).expect("decode");
        assert_eq!(tampered.open_share(c, &f.custodians[2].0), Err(CustodyError::ShareCommitmentMismatch { x: 3 }));
        assert!(tampered.open_share(c, &f.custodians[1].0).is_ok());
    }

    /// A format-1 file (no commitments, written before format 2) still decodes, re-encodes
    /// to the same bytes (the genesis attestation covers them) and unseals without the check.
    #[test]
    fn format_1_shares_files_still_read_without_commitments() {
        let c = default_backend();
        let f = fixture(c, 2, 3);
        let v1 = SharesFile { commitments: None, ..f.shares.clone() };
        let bytes = v1.encode();
        assert_eq!(&bytes[8..10], &[0, 1]);
        assert_eq!(bytes.len(), 8 + 2 + 48 + 2 + 3 * 97 + 3 * (1 + 97 + 48));
        let back = SharesFile::decode(c, &bytes).expect("format 1");
        assert_eq!((back.commitments(), back.encode()), (None, bytes));
        let share = back.open_share(c, &f.custodians[0].0).expect("opens");
        assert_eq!(check_commitment(None, &f.set.digest(), &share), Ok(()));
    }

    /// One malicious custodian (2) sends a well-formed share of its own making: refused on
    /// arrival by name, the session unchanged, and custodians 1 and 3 still unseal. Without
    /// the commitment it would be accepted and the reconstruction would fail for everyone.
    #[test]
    fn a_bad_share_from_custodian_2_is_refused_on_arrival_and_1_and_3_still_unseal() {
        for c in all_backends() {
            let f = fixture(c, 2, 3);
            let mut session = UnsealSession::new(&f.shares, ctx(&f, 1)).expect("session");
            let bad = reencrypt_y(c, session.context(), &f.custodians[1].0, 2, &[0x42; 32]);
            // The message itself is genuine (from custodian 2, for this session)...
            assert!(kre_open_unseal_share(c, &f.set, &f.kre.0, session.context(), &bad).is_ok());
            // ...but its share is not the one genesis committed to.
            assert_eq!(session.add(c, &f.kre.0, &bad), Err(CustodyError::ShareCommitmentMismatch { x: 2 }));
            let m1 = custodian_reencrypt(c, &f.shares, &f.custodians[0].0, session.context(), &mut rng(9)).expect("1");
            assert_eq!(session.add(c, &f.kre.0, &m1), Ok(UnsealProgress::NeedMore { have: 1, need: 2 }));
            assert_eq!(session.add(c, &f.kre.0, &bad), Err(CustodyError::ShareCommitmentMismatch { x: 2 }));
            let m3 = custodian_reencrypt(c, &f.shares, &f.custodians[2].0, session.context(), &mut rng(8)).expect("3");
            let Ok(UnsealProgress::Complete(key)) = session.add(c, &f.kre.0, &m3) else { panic!("not complete") };
            assert_eq!(key, f.state_key);
            // Custodian 2's real share is accepted (the check refuses only a wrong one).
            let mut again = UnsealSession::new(&f.shares, ctx(&f, 1)).expect("session");
            let good = custodian_reencrypt(c, &f.shares, &f.custodians[1].0, again.context(), &mut rng(7)).expect("2");
            assert_eq!(again.add(c, &f.kre.0, &good), Ok(UnsealProgress::NeedMore { have: 1, need: 2 }));
        }
    }

    #[test]
    fn a_custodian_key_that_is_also_an_approver_is_refused() {
        let c = default_backend();
        let keys: Vec<PublicKey> = (0..3).map(|i| keypair(c, i).1).collect();
        let set = CustodianSet::new(c, 2, keys.clone()).expect("set");
        let others: Vec<PublicKey> = (10..12).map(|i| keypair(c, i).1).collect();
        assert_eq!(check_one_purpose(&set, &others), Ok(()));
        assert_eq!(check_one_purpose::<PublicKey>(&set, &[]), Ok(()));
        assert_eq!(check_one_purpose(&set, &[others[0], keys[1]]), Err(CustodyError::CustodianIsApprover { index: 1 }));
        assert_eq!(check_one_purpose(&set, &[keys[2], keys[0]]), Err(CustodyError::CustodianIsApprover { index: 0 }));
    }

    #[test]
    fn two_of_three_unseal_reconstructs_and_opens_the_sealed_state() {
        for c in all_backends() {
            let f = fixture(c, 2, 3);
            // Genesis: a sealed state under the state key for this set.
            let mut clusters = std::collections::BTreeMap::new();
            let kek = KekEntry { version: 1, status: KekStatus::Current, kek: Secret::new([0x33; 32]) };
            clusters.insert(crate::codec::Id::new("prod").expect("id"), vec![kek]);
            let state = KreState { generation: 3, policy_head: None, clusters, activations: vec![], audit_head: None };
            let blob = sealed::seal(&state, &f.state_key, &f.set.digest(), &mut rng(5), c).expect("seal");
            // Any two custodians unseal it.
            for (a, b) in [(0usize, 1usize), (0, 2), (2, 1)] {
                let mut session = UnsealSession::new(&f.shares, ctx(&f, 1)).expect("session");
                let m1 =
                    custodian_reencrypt(c, &f.shares, &f.custodians[a].0, session.context(), &mut rng(9)).expect("m1");
                let m2 =
                    custodian_reencrypt(c, &f.shares, &f.custodians[b].0, session.context(), &mut rng(8)).expect("m2");
                assert_eq!(session.add(c, &f.kre.0, &m1), Ok(UnsealProgress::NeedMore { have: 1, need: 2 }));
                assert_eq!(session.add(c, &f.kre.0, &m1), Err(CustodyError::DuplicateShare { x: m1.x }));
                let Ok(UnsealProgress::Complete(key)) = session.add(c, &f.kre.0, &m2) else {
                    panic!("not complete");
                };
                assert_eq!(key, f.state_key);
                assert_eq!(sealed::open(&blob, &key, c).expect("open"), state);
            }
        }
    }

    #[test]
    fn unseal_refusals() {
        let c = default_backend();
        let f = fixture(c, 2, 3);
        let k = &f.kre.0;
        let now = ctx(&f, 1);
        let msg = custodian_reencrypt(c, &f.shares, &f.custodians[0].0, &now, &mut rng(9)).expect("msg");
        assert!(kre_open_unseal_share(c, &f.set, k, &now, &msg).is_ok());

        // Replayed from an earlier session (other nonce, other attestation, other KRE key,
        // other generation): does not open.
        let mut earlier = now.clone();
        earlier.unseal_nonce = [2; 32];
        let old = custodian_reencrypt(c, &f.shares, &f.custodians[0].0, &earlier, &mut rng(9)).expect("old");
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &now, &old), Err(CustodyError::UnsealShareDecrypt));
        let mut other = now.clone();
        other.kre_attestation_sha384[0] ^= 1;
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &other, &msg), Err(CustodyError::UnsealShareDecrypt));
        let mut other = now.clone();
        other.generation = 2;
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &other, &msg), Err(CustodyError::UnsealShareDecrypt));
        // Another blob of the same generation (a fork): does not open either.
        let mut other = now.clone();
        other.blob_sha384[0] ^= 1;
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &other, &msg), Err(CustodyError::UnsealShareDecrypt));
        let (k2, p2) = keypair(c, 8);
        let mut other = now.clone();
        other.kre_public = p2;
        assert_eq!(kre_open_unseal_share(c, &f.set, &k2, &other, &msg), Err(CustodyError::UnsealShareDecrypt));

        // A non-custodian: its own key is not in the set.
        let (stranger, stranger_pub) = keypair(c, 77);
        assert_eq!(custodian_reencrypt(c, &f.shares, &stranger, &now, &mut rng(9)), Err(CustodyError::NotACustodian));
        let mut forged = msg.clone();
        forged.custodian = stranger_pub;
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &now, &forged), Err(CustodyError::NotACustodian));
        // A non-custodian claiming custodian 1's key, with a share it made up: it cannot
        // compute ECDH(c, K), so the message does not open.
        let fake = {
            let (e, eph) = p384_scalar_from(c, rng(40)).expect("eph");
            let eph: PublicKey = eph.try_into().expect("point");
            let custodian = f.custodians[0].1;
            let z1 = c.ecdh_p384(&e, &now.kre_public).expect("z1");
            let z2 = c.ecdh_p384(&stranger, &now.kre_public).expect("z2");
            let t = now.transcript(1, &custodian, &eph);
            let (key, nonce) = unseal_key(c, &t, &z1, &z2).expect("key");
            let sealed = c.aes256gcm_seal(&key, &nonce, &t, &[0x42; 32]).expect("seal");
            UnsealShare { x: 1, custodian, ephemeral: eph, sealed: sealed.try_into().expect("48") }
        };
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &now, &fake), Err(CustodyError::UnsealShareDecrypt));

        // Wrong index, wrong set, bad ephemeral, bad KRE key.
        let mut wrong_x = msg.clone();
        wrong_x.x = 2;
        assert_eq!(
            kre_open_unseal_share(c, &f.set, k, &now, &wrong_x),
            Err(CustodyError::ShareIndexMismatch { claimed: 2, expected: 1 })
        );
        let mut other_set = now.clone();
        other_set.set_digest = [0; 48];
        assert_eq!(kre_open_unseal_share(c, &f.set, k, &other_set, &msg), Err(CustodyError::ContextMismatch));
        assert_eq!(
            custodian_reencrypt(c, &f.shares, &f.custodians[0].0, &other_set, &mut rng(9)),
            Err(CustodyError::ContextMismatch)
        );
        assert!(UnsealSession::new(&f.shares, other_set).is_err());
        let mut bad_kre = now.clone();
        bad_kre.kre_public[5] ^= 1;
        assert_eq!(
            custodian_reencrypt(c, &f.shares, &f.custodians[0].0, &bad_kre, &mut rng(9)),
            Err(CustodyError::BadKrePublicKey)
        );

        // Every single-bit tamper of the encoded message is refused.
        let bytes = msg.encode();
        assert_eq!(bytes.len(), UNSEAL_SHARE_LEN);
        assert_eq!(UnsealShare::decode(&bytes), Ok(msg.clone()));
        assert_eq!(UnsealShare::decode(&bytes[..UNSEAL_SHARE_LEN - 1]), Err(CustodyError::Truncated));
        assert_eq!(UnsealShare::decode(&[bytes.clone(), vec![0]].concat()), Err(CustodyError::TrailingBytes));
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 1;
            let m = UnsealShare::decode(&t).expect("decode");
            assert!(kre_open_unseal_share(c, &f.set, k, &now, &m).is_err(), "byte {i}");
        }
    }

    #[test]
    fn too_few_or_bad_shares_do_not_unseal() {
        let c = default_backend();
        let f = fixture(c, 3, 5);
        let mut session = UnsealSession::new(&f.shares, ctx(&f, 1)).expect("session");
        for (i, (s, _)) in f.custodians.iter().take(2).enumerate() {
            let m = custodian_reencrypt(c, &f.shares, s, session.context(), &mut rng(20)).expect("m");
            let have = u8::try_from(i + 1).expect("small");
            assert_eq!(session.add(c, &f.kre.0, &m), Ok(UnsealProgress::NeedMore { have, need: 3 }));
        }
        // A refused message does not count.
        let (stranger, _) = keypair(c, 55);
        assert_eq!(
            custodian_reencrypt(c, &f.shares, &stranger, session.context(), &mut rng(1)),
            Err(CustodyError::NotACustodian)
        );
        let m = custodian_reencrypt(c, &f.shares, &f.custodians[4].0, session.context(), &mut rng(3)).expect("m");
        let Ok(UnsealProgress::Complete(key)) = session.add(c, &f.kre.0, &m) else { panic!("not complete") };
        assert_eq!(key, f.state_key);
    }

    #[test]
    fn debug_shows_no_share_or_key() {
        let c = default_backend();
        let f = fixture(c, 2, 2);
        let share = f.shares.open_share(c, &f.custodians[0].0).expect("share");
        let d = format!("{share:?} {:?}", UnsealProgress::Complete(f.state_key.clone()));
        assert!(d.contains("redacted") && !d.contains("90, 90"));
    }
}
