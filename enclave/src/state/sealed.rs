//! The sealed KRE state: the only form in which KEKs leave the enclave.
//!
//! What this module decides: the exact bytes of a sealed state blob, how it is encrypted
//! under the state key, and which blobs are refused, each with its own [`SealedError`]
//! variant. What it trusts: nothing in the blob before the digest and the AEAD tag check;
//! the state key comes from the caller (reconstructed from custodian shares).
//!
//! ```text
//! blob    = header ‖ ciphertext ‖ digest
//! header  = magic "KGSEALED" (8) ‖ u16be format_version (4) ‖ u64be generation
//!           ‖ custodian_set_digest (48) ‖ seal_salt (32) ‖ nonce (12) ‖ u32be ciphertext_len  (114 bytes)
//!         | the same without seal_salt, formats 1, 2 and 3                                   (82 bytes)
//! key     = HKDF-SHA384(salt = "keygate/v2/sealed-state", ikm = state_key,
//!                       info = u64be(generation) ‖ custodian_set_digest ‖ seal_salt, L = 32)
//!           (formats 1 to 3: salt "keygate/v1/sealed-state", info without seal_salt)
//! ciphertext = AES-256-GCM(key, nonce, aad = header, plaintext)                  (‖ 16-byte tag)
//! digest  = SHA-384(header ‖ ciphertext)
//!
//! plaintext = policy_head ‖ u32be cluster_count ‖ cluster* ‖ activations ‖ audit_head (formats 3, 4)
//!           | policy_head ‖ u32be cluster_count ‖ cluster* ‖ activations      (format 2)
//!           | policy_head ‖ u32be cluster_count ‖ cluster*                    (format 1)
//! policy_head = 0x00 | 0x01 ‖ u64be version ‖ digest (48)
//! cluster   = str8 id ‖ u16be version_count ‖ (u32be version ‖ u8 status ‖ kek (32))*
//! status    = 1 Current | 2 Active | 3 Retired
//! activations = u16be count ‖ (u64be bundle_version ‖ bundle_digest (48) ‖ u64be activates_at_ms)*
//! audit_head  = 0x00 | 0x01 ‖ chain_id (48) ‖ u64be seq ‖ entry_digest (48)
//! ```
//!
//! Canonical: clusters strictly ascending by id, versions strictly ascending (≥ 1), every
//! cluster non-empty with at most one `Current`; activations strictly ascending by bundle
//! version, at most [`MAX_ACTIVATIONS`]; a blob that violates this is refused, and [`seal`]
//! refuses to write such a state.
//!
//! Format 2 (written by this code) adds the activation record: when each recently accepted
//! policy bundle is (or was) in force, bound to its version and digest, so that a restart
//! re-applies it with its original activation time instead of a fresh activation delay.
//! Format 1 blobs (no activation record) are still read, as a state with no record.
//!
//! Format 3 (written by this code) adds the audit head: the KRE run's audit chain and the
//! newest entry the parent had acknowledged storing when the generation was exported, so
//! that a KRE unsealing this generation names it as its predecessor's head
//! ([`crate::audit::AuditEvent::ChainLinked`]) and a deleted tail of that run's stored trail
//! shows as a gap. Format 2 and 1 blobs are read as states without an audit head.
//!
//! Format 4 (written by this code) adds the seal salt: 32 fresh random bytes per seal, fed
//! into the subkey derivation, so no two seals share an AES-GCM key even when they seal the
//! same generation (a KRE restarted from generation g−1 seals a new generation g, with new
//! KEKs, beside the g it sealed before). Its plaintext is format 3's. Formats 1 to 3 are
//! still read (their subkey is per generation only).
//!
//! The plaintext holds every KEK, so it is written into a buffer of exactly its computed
//! length ([`plaintext_len`]): the buffer never grows, and no reallocation leaves an
//! unzeroized copy of KEKs on the heap.
//!
//! The trailing digest is not a security check (anyone can recompute it): it tells a torn or
//! corrupted file ([`SealedError::Truncated`], [`SealedError::DigestMismatch`]) from a wrong
//! key or a forgery ([`SealedError::Decrypt`]) without the key, so the parent can fall back to
//! the previous generation ([`peek_header`]). The AEAD binds the header (generation,
//! custodian set, salt) to the contents; the per-seal key means a random 96-bit nonce is
//! only ever used with one key for one seal.

use std::collections::BTreeMap;

use keygate_attestation::crypto::{Crypto, CryptoError};
use keygate_attestation::secret::Secret;
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

use crate::audit::AuditHead;
use crate::binding;
use crate::codec::{CodecError, Id, Reader};
use crate::crypto::keys::{Kek, KekStatus};

/// First bytes of every sealed state blob.
pub const MAGIC: [u8; 8] = *b"KGSEALED";
/// The format version this code writes (it also reads [`FORMAT_VERSION_3`],
/// [`FORMAT_VERSION_2`] and [`FORMAT_VERSION_1`]).
pub const FORMAT_VERSION: u16 = 4;
/// The third format: an audit head, no seal salt (the subkey is per generation).
pub const FORMAT_VERSION_3: u16 = 3;
/// The second format: an activation record, no audit head.
pub const FORMAT_VERSION_2: u16 = 2;
/// The first format: no activation record.
pub const FORMAT_VERSION_1: u16 = 1;
/// Length of the fixed header of the format this code writes ([`FORMAT_VERSION`]).
pub const HEADER_LEN: usize = 8 + 2 + 8 + 48 + SALT_LEN + 12 + 4;
/// Length of the header of formats 1 to 3 (no seal salt).
pub const HEADER_LEN_V3: usize = 8 + 2 + 8 + 48 + 12 + 4;
/// Length of the seal salt (format 4).
pub const SALT_LEN: usize = 32;
/// Length of the trailing digest.
pub const DIGEST_LEN: usize = 48;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;
/// Largest blob written or read (a hard cap on what the parent can make the KRE parse).
pub const MAX_BLOB: usize = 4 * 1024 * 1024;
/// Most clusters in one state.
pub const MAX_CLUSTERS: usize = 4096;
/// Most KEK versions per cluster.
pub const MAX_VERSIONS: usize = 1024;
/// Most policy bundles with a recorded activation time (the newest are kept).
pub const MAX_ACTIVATIONS: usize = 16;

/// One KEK version of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekEntry {
    /// The version number (≥ 1).
    pub version: u32,
    /// Current, Active or Retired.
    pub status: KekStatus,
    /// The KEK (zeroized on drop, redacted in `Debug`).
    pub kek: Kek,
}

/// When an accepted policy bundle is (or was) fully in force, as the KRE decided when it
/// first accepted that exact bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    /// The bundle's version.
    pub version: u64,
    /// SHA-384 of the bundle's body (the policy head digest).
    pub digest: [u8; 48],
    /// Its activation time (ms since the Unix epoch).
    pub activates_at_ms: u64,
}

/// Everything the KRE must not lose across a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KreState {
    /// Increases by one with every committed change; the anti-rollback counter.
    pub generation: u64,
    /// The newest policy bundle the KRE accepted: (version, SHA-384 of the bundle).
    pub policy_head: Option<(u64, [u8; 48])>,
    /// KEK versions per cluster, ascending by version.
    pub clusters: BTreeMap<Id, Vec<KekEntry>>,
    /// The activation times of the newest accepted bundles, ascending by version (at most
    /// [`MAX_ACTIVATIONS`]).
    pub activations: Vec<Activation>,
    /// How far the run's audit chain had got (the newest entry the parent had acknowledged)
    /// when this state was exported; `None` in a state read from format 1 or 2. Not content:
    /// a change here alone never makes a new generation.
    pub audit_head: Option<AuditHead>,
}

/// The unencrypted header of a sealed blob; only meaningful once [`peek_header`] or
/// [`open`] has checked the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedHeader {
    /// Format version ([`FORMAT_VERSION`], [`FORMAT_VERSION_3`], [`FORMAT_VERSION_2`] or
    /// [`FORMAT_VERSION_1`] for a header this code returns).
    pub format_version: u16,
    /// The state's generation.
    pub generation: u64,
    /// SHA-384 digest of the custodian set whose shares open this state
    /// ([`crate::state::custody::CustodianSet::digest`]).
    pub custodian_set_digest: [u8; 48],
    /// The seal salt (format 4; `None` in formats 1 to 3).
    pub seal_salt: Option<[u8; SALT_LEN]>,
    /// The AES-GCM nonce.
    pub nonce: [u8; 12],
    /// Length of ciphertext ‖ tag.
    pub ciphertext_len: u32,
}

/// What is wrong with the plaintext of a state (on open), or with a state to seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// The plaintext ends early.
    #[error("plaintext truncated")]
    Truncated,
    /// Bytes after the last cluster.
    #[error("trailing bytes after the state")]
    TrailingBytes,
    /// The policy head tag is neither 0 nor 1.
    #[error("bad policy head tag {tag}")]
    BadPolicyTag {
        /// The tag read.
        tag: u8,
    },
    /// A cluster id is not a valid [`Id`].
    #[error("bad cluster id")]
    BadId,
    /// Clusters not strictly ascending (duplicate or out of order).
    #[error("clusters out of order or duplicated")]
    UnsortedClusters,
    /// More than [`MAX_CLUSTERS`].
    #[error("too many clusters ({count})")]
    TooManyClusters {
        /// The count.
        count: usize,
    },
    /// A cluster without any KEK version.
    #[error("cluster without KEK versions")]
    EmptyCluster,
    /// More than [`MAX_VERSIONS`] versions in a cluster.
    #[error("too many KEK versions ({count})")]
    TooManyVersions {
        /// The count.
        count: usize,
    },
    /// Version 0, or versions not strictly ascending.
    #[error("KEK versions out of order, duplicated or zero")]
    UnsortedVersions,
    /// A status byte that is not 1, 2 or 3.
    #[error("bad KEK status {value}")]
    BadStatus {
        /// The byte read.
        value: u8,
    },
    /// More than one `Current` version in a cluster.
    #[error("more than one current KEK version")]
    MultipleCurrent,
    /// More than [`MAX_ACTIVATIONS`] activation records.
    #[error("too many activation records ({count})")]
    TooManyActivations {
        /// The count.
        count: usize,
    },
    /// Activation records not strictly ascending by bundle version.
    #[error("activation records out of order or duplicated")]
    UnsortedActivations,
    /// The audit head tag is neither 0 nor 1.
    #[error("bad audit head tag {tag}")]
    BadAuditHeadTag {
        /// The tag read.
        tag: u8,
    },
}

impl From<CodecError> for Malformed {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TrailingBytes { .. } => Malformed::TrailingBytes,
            CodecError::BadId { .. } | CodecError::Utf8 { .. } => Malformed::BadId,
            // The plaintext reader reads fixed fields and ids only: every other failure is a
            // field cut short.
            CodecError::Truncated { .. } | CodecError::TooLong { .. } | CodecError::BadFlag { .. } => {
                Malformed::Truncated
            }
        }
    }
}

/// Why a sealed blob could not be written or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealedError {
    /// The blob does not start with [`MAGIC`].
    #[error("not a keygate sealed state (bad magic)")]
    BadMagic,
    /// A format version this code does not read.
    #[error("unsupported sealed state format version {version}")]
    UnsupportedVersion {
        /// The version read.
        version: u16,
    },
    /// Shorter than its header and length say: a torn write.
    #[error("sealed state truncated: {len} bytes, {need} expected")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header calls for (at least).
        need: usize,
    },
    /// Longer than its header says.
    #[error("sealed state has {extra} trailing bytes")]
    TrailingBytes {
        /// Bytes after the digest.
        extra: usize,
    },
    /// Larger than [`MAX_BLOB`] (on open: the length field or the input; on seal: the state).
    #[error("sealed state too large: {len} bytes (max {max})")]
    TooLarge {
        /// The size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The ciphertext length is below the AES-GCM tag length.
    #[error("ciphertext shorter than its tag")]
    CiphertextTooShort,
    /// The trailing SHA-384 does not match: the file is torn or corrupted.
    #[error("sealed state digest mismatch (torn or corrupted file)")]
    DigestMismatch,
    /// Authenticated decryption failed: wrong state key, or a forged/tampered blob.
    #[error("sealed state does not decrypt (wrong key or tampered)")]
    Decrypt,
    /// The plaintext decrypted but is not a valid state (or the state to seal is invalid).
    #[error("malformed state: {0}")]
    Malformed(#[from] Malformed),
    /// A cryptographic primitive failed while sealing.
    #[error("crypto failure while sealing: {0}")]
    Crypto(CryptoError),
}

fn status_byte(s: KekStatus) -> u8 {
    match s {
        KekStatus::Current => 1,
        KekStatus::Active => 2,
        KekStatus::Retired => 3,
    }
}

fn status_from(b: u8) -> Result<KekStatus, Malformed> {
    match b {
        1 => Ok(KekStatus::Current),
        2 => Ok(KekStatus::Active),
        3 => Ok(KekStatus::Retired),
        value => Err(Malformed::BadStatus { value }),
    }
}

/// Checks the canonical-form rules shared by [`seal`] and [`open`] for one cluster.
fn check_versions(entries: &[KekEntry]) -> Result<(), Malformed> {
    if entries.is_empty() {
        return Err(Malformed::EmptyCluster);
    }
    if entries.len() > MAX_VERSIONS {
        return Err(Malformed::TooManyVersions { count: entries.len() });
    }
    let mut prev = 0u32;
    let mut current = 0usize;
    for e in entries {
        if e.version <= prev {
            return Err(Malformed::UnsortedVersions);
        }
        prev = e.version;
        if e.status == KekStatus::Current {
            current += 1;
        }
    }
    if current > 1 {
        return Err(Malformed::MultipleCurrent);
    }
    Ok(())
}

/// Checks the canonical-form rules of the activation record.
fn check_activations(a: &[Activation]) -> Result<(), Malformed> {
    if a.len() > MAX_ACTIVATIONS {
        return Err(Malformed::TooManyActivations { count: a.len() });
    }
    if a.windows(2).any(|w| w[0].version >= w[1].version) {
        return Err(Malformed::UnsortedActivations);
    }
    Ok(())
}

/// The exact length of `state`'s plaintext (format 4), checked against the limits before
/// anything is allocated for it; [`encode_plaintext`] writes exactly this many bytes into a
/// buffer of exactly this capacity.
pub fn plaintext_len(state: &KreState) -> Result<usize, SealedError> {
    if state.clusters.len() > MAX_CLUSTERS {
        return Err(Malformed::TooManyClusters { count: state.clusters.len() }.into());
    }
    check_activations(&state.activations)?;
    let head = if state.policy_head.is_some() { 1 + 8 + 48 } else { 1 };
    let audit = if state.audit_head.is_some() { 1 + 48 + 8 + 48 } else { 1 };
    let mut len = head + 4 + 2 + state.activations.len() * (8 + 48 + 8) + audit;
    for (id, entries) in &state.clusters {
        check_versions(entries)?;
        // Bounded: at most MAX_CLUSTERS × (1 + 255 + 2 + MAX_VERSIONS × 37) bytes in all.
        len += 1 + id.as_str().len() + 2 + entries.len() * (4 + 1 + 32);
        if len > MAX_BLOB {
            return Err(SealedError::TooLarge { len, max: MAX_BLOB });
        }
    }
    Ok(len)
}

fn encode_plaintext(state: &KreState) -> Result<Zeroizing<Vec<u8>>, SealedError> {
    let len = plaintext_len(state)?;
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    match &state.policy_head {
        None => out.push(0),
        Some((version, digest)) => {
            out.push(1);
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(digest);
        }
    }
    // Both counts are bounded above (MAX_CLUSTERS, MAX_VERSIONS), so the conversions hold.
    let count = u32::try_from(state.clusters.len()).map_err(|_| Malformed::TooManyClusters { count: usize::MAX })?;
    out.extend_from_slice(&count.to_be_bytes());
    for (id, entries) in &state.clusters {
        check_versions(entries)?;
        // The plaintext holds KEKs, so it grows in its zeroizing buffer, not a codec Writer.
        out.push(id.len_u8());
        out.extend_from_slice(id.as_str().as_bytes());
        let n = u16::try_from(entries.len()).map_err(|_| Malformed::TooManyVersions { count: entries.len() })?;
        out.extend_from_slice(&n.to_be_bytes());
        for e in entries {
            out.extend_from_slice(&e.version.to_be_bytes());
            out.push(status_byte(e.status));
            out.extend_from_slice(e.kek.expose());
        }
        if out.len() > MAX_BLOB {
            return Err(SealedError::TooLarge { len: out.len(), max: MAX_BLOB });
        }
    }
    check_activations(&state.activations)?;
    // Bounded by MAX_ACTIVATIONS (checked above).
    let n = u16::try_from(state.activations.len())
        .map_err(|_| Malformed::TooManyActivations { count: state.activations.len() })?;
    out.extend_from_slice(&n.to_be_bytes());
    for a in &state.activations {
        out.extend_from_slice(&a.version.to_be_bytes());
        out.extend_from_slice(&a.digest);
        out.extend_from_slice(&a.activates_at_ms.to_be_bytes());
    }
    match &state.audit_head {
        None => out.push(0),
        Some(h) => {
            out.push(1);
            out.extend_from_slice(&h.chain_id);
            out.extend_from_slice(&h.seq.to_be_bytes());
            out.extend_from_slice(&h.digest);
        }
    }
    if out.len() != len {
        // plaintext_len and this encoder disagree: a bug, never sealed.
        return Err(SealedError::Crypto(CryptoError::Kdf));
    }
    Ok(out)
}

fn decode_plaintext(format_version: u16, generation: u64, pt: &[u8]) -> Result<KreState, Malformed> {
    let mut r = Reader::new(pt);
    let policy_head = match r.u8("policy head tag")? {
        0 => None,
        1 => Some((r.u64("policy version")?, r.array::<48>("policy digest")?)),
        tag => return Err(Malformed::BadPolicyTag { tag }),
    };
    let count =
        usize::try_from(r.u32("cluster count")?).map_err(|_| Malformed::TooManyClusters { count: usize::MAX })?;
    if count > MAX_CLUSTERS {
        return Err(Malformed::TooManyClusters { count });
    }
    let mut clusters = BTreeMap::new();
    let mut last: Option<Id> = None;
    for _ in 0..count {
        let id = r.id("cluster id")?;
        if last.as_ref().is_some_and(|l| *l >= id) {
            return Err(Malformed::UnsortedClusters);
        }
        let versions = usize::from(r.u16("version count")?);
        if versions > MAX_VERSIONS {
            return Err(Malformed::TooManyVersions { count: versions });
        }
        let mut entries = Vec::with_capacity(versions);
        for _ in 0..versions {
            let version = r.u32("kek version")?;
            let status = status_from(r.u8("kek status")?)?;
            let kek = Secret::new(r.array::<32>("kek")?);
            entries.push(KekEntry { version, status, kek });
        }
        check_versions(&entries)?;
        last = Some(id.clone());
        clusters.insert(id, entries);
    }
    let mut activations = Vec::new();
    if format_version != FORMAT_VERSION_1 {
        let count = usize::from(r.u16("activation count")?);
        if count > MAX_ACTIVATIONS {
            return Err(Malformed::TooManyActivations { count });
        }
        activations.reserve_exact(count);
        for _ in 0..count {
            let version = r.u64("activation version")?;
            let digest = r.array::<48>("activation digest")?;
            let activates_at_ms = r.u64("activates_at_ms")?;
            activations.push(Activation { version, digest, activates_at_ms });
        }
        check_activations(&activations)?;
    }
    let audit_head = if format_version >= FORMAT_VERSION_3 {
        match r.u8("audit head tag")? {
            0 => None,
            1 => Some(AuditHead {
                chain_id: r.array("audit chain_id")?,
                seq: r.u64("audit seq")?,
                digest: r.array("audit digest")?,
            }),
            tag => return Err(Malformed::BadAuditHeadTag { tag }),
        }
    } else {
        None
    };
    if r.remaining() != 0 {
        return Err(Malformed::TrailingBytes);
    }
    Ok(KreState { generation, policy_head, clusters, activations, audit_head })
}

/// The header's bytes: with the seal salt when it has one (format 4), without it otherwise.
fn encode_header(h: &SealedHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&h.format_version.to_be_bytes());
    out.extend_from_slice(&h.generation.to_be_bytes());
    out.extend_from_slice(&h.custodian_set_digest);
    if let Some(salt) = &h.seal_salt {
        out.extend_from_slice(salt);
    }
    out.extend_from_slice(&h.nonce);
    out.extend_from_slice(&h.ciphertext_len.to_be_bytes());
    out
}

/// The header length of a format this code reads.
fn header_len(format_version: u16) -> usize {
    if format_version >= FORMAT_VERSION {
        HEADER_LEN
    } else {
        HEADER_LEN_V3
    }
}

/// The AES-GCM key of one seal: per seal (format 4, salted), or per generation (formats 1-3).
fn state_subkey(crypto: &dyn Crypto, state_key: &Secret<32>, h: &SealedHeader) -> Result<Secret<32>, CryptoError> {
    let mut okm = Zeroizing::new([0u8; 32]);
    match &h.seal_salt {
        Some(salt) => {
            let info = binding::sealed_state_info_salted(h.generation, &h.custodian_set_digest, salt);
            crypto.hkdf_sha384(binding::SEALED_STATE_SALTED, state_key.expose(), &info, &mut okm[..])?;
        }
        None => {
            let info = binding::sealed_state_info(h.generation, &h.custodian_set_digest);
            crypto.hkdf_sha384(binding::SEALED_STATE, state_key.expose(), &info, &mut okm[..])?;
        }
    }
    Ok(Secret::new(*okm))
}

/// Seals `state` under `state_key` for the custodian set with digest `custodian_set_digest`.
/// `nonce_rng` fills the 32-byte seal salt and the 12-byte AES-GCM nonce.
pub fn seal(
    state: &KreState,
    state_key: &Secret<32>,
    custodian_set_digest: &[u8; 48],
    nonce_rng: &mut dyn FnMut(&mut [u8]),
    crypto: &dyn Crypto,
) -> Result<Vec<u8>, SealedError> {
    let pt = encode_plaintext(state)?;
    let ct_len = pt.len() + TAG_LEN;
    let total = HEADER_LEN + ct_len + DIGEST_LEN;
    if total > MAX_BLOB {
        return Err(SealedError::TooLarge { len: total, max: MAX_BLOB });
    }
    let mut seal_salt = [0u8; SALT_LEN];
    nonce_rng(&mut seal_salt);
    let mut nonce = [0u8; 12];
    nonce_rng(&mut nonce);
    let header = SealedHeader {
        format_version: FORMAT_VERSION,
        generation: state.generation,
        custodian_set_digest: *custodian_set_digest,
        seal_salt: Some(seal_salt),
        nonce,
        ciphertext_len: u32::try_from(ct_len).map_err(|_| SealedError::TooLarge { len: total, max: MAX_BLOB })?,
    };
    let hdr = encode_header(&header);
    let key = state_subkey(crypto, state_key, &header).map_err(SealedError::Crypto)?;
    let ct = crypto.aes256gcm_seal(&key, &nonce, &hdr, &pt).map_err(SealedError::Crypto)?;
    if ct.len() != ct_len {
        return Err(SealedError::Crypto(CryptoError::Decrypt));
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&ct);
    let digest = Sha384::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// Parses and checks everything that can be checked without the key: magic, version,
/// lengths, limits and the trailing digest. A blob that passes is intact as written (not
/// necessarily authentic: that needs the key, see [`open`]).
pub fn peek_header(blob: &[u8]) -> Result<SealedHeader, SealedError> {
    if blob.len() > MAX_BLOB {
        return Err(SealedError::TooLarge { len: blob.len(), max: MAX_BLOB });
    }
    let mut r = Reader::new(blob);
    let trunc = |need: usize| SealedError::Truncated { len: blob.len(), need };
    let magic: [u8; 8] = r.array("magic").map_err(|_| {
        // A prefix of the magic is a torn file; anything else is not ours.
        if MAGIC.starts_with(blob) {
            trunc(HEADER_LEN + TAG_LEN + DIGEST_LEN)
        } else {
            SealedError::BadMagic
        }
    })?;
    if magic != MAGIC {
        return Err(SealedError::BadMagic);
    }
    let min = HEADER_LEN + TAG_LEN + DIGEST_LEN;
    let format_version = r.u16("format version").map_err(|_| trunc(min))?;
    if ![FORMAT_VERSION, FORMAT_VERSION_3, FORMAT_VERSION_2, FORMAT_VERSION_1].contains(&format_version) {
        return Err(SealedError::UnsupportedVersion { version: format_version });
    }
    let header_len = header_len(format_version);
    let min = header_len + TAG_LEN + DIGEST_LEN;
    let generation = r.u64("generation").map_err(|_| trunc(min))?;
    let custodian_set_digest = r.array::<48>("custodian set digest").map_err(|_| trunc(min))?;
    let seal_salt = if format_version >= FORMAT_VERSION {
        Some(r.array::<SALT_LEN>("seal salt").map_err(|_| trunc(min))?)
    } else {
        None
    };
    let nonce = r.array::<12>("nonce").map_err(|_| trunc(min))?;
    let ciphertext_len = r.u32("ciphertext length").map_err(|_| trunc(min))?;
    let ct = usize::try_from(ciphertext_len).map_err(|_| SealedError::TooLarge { len: usize::MAX, max: MAX_BLOB })?;
    let need = header_len.saturating_add(ct).saturating_add(DIGEST_LEN);
    if need > MAX_BLOB {
        return Err(SealedError::TooLarge { len: need, max: MAX_BLOB });
    }
    if ct < TAG_LEN {
        return Err(SealedError::CiphertextTooShort);
    }
    if blob.len() < need {
        return Err(trunc(need));
    }
    if blob.len() > need {
        return Err(SealedError::TrailingBytes { extra: blob.len() - need });
    }
    let (body, digest) = blob.split_at(need - DIGEST_LEN);
    if Sha384::digest(body)[..] != *digest {
        return Err(SealedError::DigestMismatch);
    }
    Ok(SealedHeader { format_version, generation, custodian_set_digest, seal_salt, nonce, ciphertext_len })
}

/// Checks and decrypts a sealed blob with `state_key`.
pub fn open(blob: &[u8], state_key: &Secret<32>, crypto: &dyn Crypto) -> Result<KreState, SealedError> {
    let header = peek_header(blob)?;
    let ct_end = blob.len() - DIGEST_LEN;
    let hl = header_len(header.format_version);
    let key = state_subkey(crypto, state_key, &header).map_err(|_| SealedError::Decrypt)?;
    let pt =
        crypto.aes256gcm_open(&key, &header.nonce, &blob[..hl], &blob[hl..ct_end]).map_err(|_| SealedError::Decrypt)?;
    Ok(decode_plaintext(header.format_version, header.generation, pt.expose())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_id as id;
    use keygate_attestation::crypto::{all_backends, default_backend};

    fn entry(version: u32, status: KekStatus, b: u8) -> KekEntry {
        KekEntry { version, status, kek: Secret::new([b; 32]) }
    }

    fn state() -> KreState {
        let mut clusters = BTreeMap::new();
        clusters.insert(
            id("prod"),
            vec![
                entry(1, KekStatus::Retired, 0x11),
                entry(2, KekStatus::Active, 0x12),
                entry(3, KekStatus::Current, 0x13),
            ],
        );
        clusters.insert(id("staging"), vec![entry(1, KekStatus::Current, 0x21)]);
        let activations = vec![
            Activation { version: 3, digest: [0x33; 48], activates_at_ms: 1_000 },
            Activation { version: 4, digest: [0x44; 48], activates_at_ms: 3_601_000 },
        ];
        let audit_head = Some(AuditHead { chain_id: [0xc1; 48], seq: 57, digest: [0xd1; 48] });
        KreState { generation: 7, policy_head: Some((4, [0x44; 48])), clusters, activations, audit_head }
    }

    const SET: [u8; 48] = [0x5e; 48];

    fn key() -> Secret<32> {
        Secret::new([0x77; 32])
    }

    fn sealed() -> Vec<u8> {
        seal(&state(), &key(), &SET, &mut |b: &mut [u8]| b.fill(9), default_backend()).expect("seal")
    }

    /// Re-seals a hand-made plaintext with a valid header, tag and digest (to reach the
    /// plaintext checks through the AEAD).
    fn seal_raw(pt: &[u8]) -> Vec<u8> {
        seal_raw_as(FORMAT_VERSION_1, pt)
    }

    /// As [`seal_raw`], with the given format version in the header.
    fn seal_raw_as(format_version: u16, pt: &[u8]) -> Vec<u8> {
        let c = default_backend();
        let h = SealedHeader {
            format_version,
            generation: 1,
            custodian_set_digest: SET,
            seal_salt: (format_version >= FORMAT_VERSION).then_some([4; SALT_LEN]),
            nonce: [3; 12],
            ciphertext_len: u32::try_from(pt.len() + TAG_LEN).expect("len"),
        };
        let hdr = encode_header(&h);
        let k = state_subkey(c, &key(), &h).expect("key");
        let mut out = hdr.clone();
        out.extend(c.aes256gcm_seal(&k, &h.nonce, &hdr, pt).expect("seal"));
        let d = Sha384::digest(&out);
        out.extend_from_slice(&d);
        out
    }

    fn redigest(blob: &mut [u8]) {
        let n = blob.len() - DIGEST_LEN;
        let d = Sha384::digest(&blob[..n]);
        blob[n..].copy_from_slice(&d);
    }

    #[test]
    fn round_trip_on_every_backend_and_across_backends() {
        for a in all_backends() {
            let blob = seal(&state(), &key(), &SET, &mut |b: &mut [u8]| b.fill(1), a).expect("seal");
            for b in all_backends() {
                assert_eq!(open(&blob, &key(), b).expect("open"), state(), "{} -> {}", a.name(), b.name());
            }
        }
        let empty = KreState::default();
        let blob = seal(&empty, &key(), &SET, &mut |b: &mut [u8]| b.fill(1), default_backend()).expect("seal");
        assert_eq!(open(&blob, &key(), default_backend()).expect("open"), empty);
    }

    #[test]
    fn header_layout_and_peek() {
        let blob = sealed();
        assert_eq!(&blob[..8], b"KGSEALED");
        assert_eq!(&blob[8..10], &[0, 4]);
        assert_eq!(&blob[10..18], &7u64.to_be_bytes());
        assert_eq!(&blob[18..66], &SET);
        assert_eq!(&blob[66..98], &[9; 32]);
        assert_eq!(&blob[98..110], &[9; 12]);
        assert_eq!(HEADER_LEN, 114);
        let h = peek_header(&blob).expect("peek");
        assert_eq!(h.generation, 7);
        assert_eq!(h.custodian_set_digest, SET);
        assert_eq!(h.seal_salt, Some([9; 32]));
        assert_eq!(h.nonce, [9; 12]);
        assert_eq!(usize::try_from(h.ciphertext_len).expect("len"), blob.len() - HEADER_LEN - DIGEST_LEN);
        // Plaintext: 1 + 8 + 48 + 4 + (1+4 + 2 + 3·37) + (1+7 + 2 + 37) = 226,
        // + activations 2 + 2·64, + audit head 1 + 48 + 8 + 48, + tag 16.
        assert_eq!(h.ciphertext_len, 226 + 2 + 2 * 64 + 105 + 16);
    }

    #[test]
    fn no_kek_or_key_bytes_in_the_blob() {
        let blob = sealed();
        for b in [0x11u8, 0x12, 0x13, 0x21, 0x77] {
            assert!(!blob.windows(8).any(|w| w.iter().all(|x| *x == b)), "{b:#x} visible");
        }
    }

    #[test]
    fn every_truncation_is_detected_as_truncated_and_never_opens() {
        let blob = sealed();
        for n in 0..blob.len() {
            let err = peek_header(&blob[..n]).expect_err("truncated");
            assert!(matches!(err, SealedError::Truncated { len, .. } if len == n), "len {n}: {err:?}");
            assert_eq!(open(&blob[..n], &key(), default_backend()), Err(err));
        }
    }

    #[test]
    fn every_single_byte_tamper_is_detected() {
        let blob = sealed();
        for i in 0..blob.len() {
            let mut t = blob.clone();
            t[i] ^= 0x01;
            let err = open(&t, &key(), default_backend()).expect_err("tampered");
            let expected_kind = match i {
                0..=7 => matches!(err, SealedError::BadMagic),
                // 4 ^ 1 = 5: a format this code does not read.
                8..=9 => matches!(err, SealedError::UnsupportedVersion { .. }),
                // The length field: the blob is now too short or too long for it.
                110..=113 => matches!(
                    err,
                    SealedError::Truncated { .. } | SealedError::TrailingBytes { .. } | SealedError::TooLarge { .. }
                ),
                _ => err == SealedError::DigestMismatch,
            };
            assert!(expected_kind, "byte {i}: {err:?}");
        }
    }

    #[test]
    fn tamper_with_a_recomputed_digest_fails_decryption() {
        // An attacker can recompute the digest; the AEAD still refuses (header is the AAD).
        let blob = sealed();
        for i in (10..HEADER_LEN - 4).chain(HEADER_LEN..blob.len() - DIGEST_LEN) {
            let mut t = blob.clone();
            t[i] ^= 0x80;
            redigest(&mut t);
            assert!(peek_header(&t).is_ok());
            assert_eq!(open(&t, &key(), default_backend()), Err(SealedError::Decrypt), "byte {i}");
        }
    }

    #[test]
    fn wrong_key_fails_decryption() {
        assert_eq!(open(&sealed(), &Secret::new([0x78; 32]), default_backend()), Err(SealedError::Decrypt));
    }

    #[test]
    fn trailing_bytes_bad_magic_and_versions() {
        let mut blob = sealed();
        blob.push(0);
        assert_eq!(peek_header(&blob), Err(SealedError::TrailingBytes { extra: 1 }));
        assert_eq!(peek_header(b"PK\x03\x04 not ours at all"), Err(SealedError::BadMagic));
        assert_eq!(
            peek_header(b"KGS"),
            Err(SealedError::Truncated { len: 3, need: HEADER_LEN + TAG_LEN + DIGEST_LEN })
        );
        assert_eq!(peek_header(b"X"), Err(SealedError::BadMagic));
        let mut v5 = sealed();
        v5[9] = 5;
        assert_eq!(peek_header(&v5), Err(SealedError::UnsupportedVersion { version: 5 }));
        v5[9] = 0;
        assert_eq!(peek_header(&v5), Err(SealedError::UnsupportedVersion { version: 0 }));
    }

    #[test]
    fn limits_are_enforced_before_work() {
        let mut blob = sealed();
        blob[110..114].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(peek_header(&blob), Err(SealedError::TooLarge { .. })));
        blob[110..114].copy_from_slice(&15u32.to_be_bytes());
        assert_eq!(peek_header(&blob), Err(SealedError::CiphertextTooShort));
        let huge = vec![0u8; MAX_BLOB + 1];
        assert_eq!(peek_header(&huge), Err(SealedError::TooLarge { len: MAX_BLOB + 1, max: MAX_BLOB }));
    }

    #[test]
    fn malformed_plaintexts_are_refused_with_their_variant() {
        let c = default_backend();
        let kek = |v: u32, s: u8| [&v.to_be_bytes()[..], &[s], &[0xaa; 32]].concat();
        let cluster = |name: &str, versions: &[Vec<u8>]| {
            let mut v = vec![u8::try_from(name.len()).expect("len")];
            v.extend_from_slice(name.as_bytes());
            v.extend_from_slice(&u16::try_from(versions.len()).expect("n").to_be_bytes());
            for e in versions {
                v.extend_from_slice(e);
            }
            v
        };
        let doc = |head: &[u8], clusters: &[Vec<u8>]| {
            let mut v = head.to_vec();
            v.extend_from_slice(&u32::try_from(clusters.len()).expect("n").to_be_bytes());
            for c in clusters {
                v.extend_from_slice(c);
            }
            v
        };
        let ok = doc(&[0], &[cluster("a", &[kek(1, 2), kek(2, 1)]), cluster("b", &[kek(1, 1)])]);
        assert!(open(&seal_raw(&ok), &key(), c).is_ok());
        let cases: Vec<(Vec<u8>, Malformed)> = vec![
            (ok[..ok.len() - 1].to_vec(), Malformed::Truncated),
            ([ok.clone(), vec![0]].concat(), Malformed::TrailingBytes),
            (doc(&[2], &[]), Malformed::BadPolicyTag { tag: 2 }),
            (doc(&[1, 0, 0], &[]), Malformed::Truncated),
            (doc(&[0], &[cluster("a b", &[kek(1, 1)])]), Malformed::BadId),
            (doc(&[0], &[cluster("", &[kek(1, 1)])]), Malformed::BadId),
            (doc(&[0], &[cluster("b", &[kek(1, 1)]), cluster("a", &[kek(1, 1)])]), Malformed::UnsortedClusters),
            (doc(&[0], &[cluster("a", &[kek(1, 1)]), cluster("a", &[kek(1, 1)])]), Malformed::UnsortedClusters),
            (doc(&[0], &[cluster("a", &[])]), Malformed::EmptyCluster),
            (doc(&[0], &[cluster("a", &[kek(0, 1)])]), Malformed::UnsortedVersions),
            (doc(&[0], &[cluster("a", &[kek(2, 2), kek(2, 1)])]), Malformed::UnsortedVersions),
            (doc(&[0], &[cluster("a", &[kek(3, 2), kek(2, 1)])]), Malformed::UnsortedVersions),
            (doc(&[0], &[cluster("a", &[kek(1, 0)])]), Malformed::BadStatus { value: 0 }),
            (doc(&[0], &[cluster("a", &[kek(1, 4)])]), Malformed::BadStatus { value: 4 }),
            (doc(&[0], &[cluster("a", &[kek(1, 1), kek(2, 1)])]), Malformed::MultipleCurrent),
            ([&[0u8][..], &u32::MAX.to_be_bytes()].concat(), Malformed::TooManyClusters { count: 0xffff_ffff }),
            (
                [&[0u8][..], &1u32.to_be_bytes(), &[1, b'a'], &u16::MAX.to_be_bytes()].concat(),
                Malformed::TooManyVersions { count: 0xffff },
            ),
        ];
        for (pt, want) in cases {
            assert_eq!(open(&seal_raw(&pt), &key(), c), Err(SealedError::Malformed(want)), "{want:?}");
        }
    }

    /// A format-1 blob (written before the activation record existed) still opens, as a
    /// state without activation records; the same plaintext under a format-2 header lacks its
    /// record and is refused as truncated (the header is authenticated, so a parent cannot
    /// relabel one as the other).
    #[test]
    fn format_1_blobs_open_without_activations_and_format_2_needs_its_record() {
        let c = default_backend();
        let mut pt = vec![1u8];
        pt.extend_from_slice(&5u64.to_be_bytes());
        pt.extend_from_slice(&[0x55; 48]);
        pt.extend_from_slice(&0u32.to_be_bytes());
        let s = open(&seal_raw_as(FORMAT_VERSION_1, &pt), &key(), c).expect("format 1 opens");
        assert_eq!((s.policy_head, s.activations), (Some((5, [0x55; 48])), vec![]));
        assert_eq!(open(&seal_raw_as(2, &pt), &key(), c), Err(SealedError::Malformed(Malformed::Truncated)));
        let mut relabelled = seal_raw_as(FORMAT_VERSION_1, &pt);
        relabelled[9] = 2;
        redigest(&mut relabelled);
        assert_eq!(open(&relabelled, &key(), c), Err(SealedError::Decrypt));
    }

    #[test]
    fn malformed_activation_records_are_refused_with_their_variant() {
        let c = default_backend();
        let act = |v: u64| [&v.to_be_bytes()[..], &[0xdd; 48], &9u64.to_be_bytes()].concat();
        let doc = |count: u16, acts: &[Vec<u8>]| {
            let mut v = vec![0u8];
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&count.to_be_bytes());
            for a in acts {
                v.extend_from_slice(a);
            }
            v
        };
        let ok = doc(2, &[act(1), act(2)]);
        assert_eq!(open(&seal_raw_as(2, &ok), &key(), c).expect("opens").activations.len(), 2);
        let max = u16::try_from(MAX_ACTIVATIONS).expect("small");
        let cases: Vec<(Vec<u8>, Malformed)> = vec![
            (ok[..ok.len() - 1].to_vec(), Malformed::Truncated),
            ([ok.clone(), vec![0]].concat(), Malformed::TrailingBytes),
            (doc(3, &[act(1), act(2)]), Malformed::Truncated),
            (doc(2, &[act(2), act(1)]), Malformed::UnsortedActivations),
            (doc(2, &[act(2), act(2)]), Malformed::UnsortedActivations),
            // The count is checked before anything is read or allocated for it.
            (doc(max + 1, &[]), Malformed::TooManyActivations { count: MAX_ACTIVATIONS + 1 }),
            (doc(u16::MAX, &[]), Malformed::TooManyActivations { count: 0xffff }),
        ];
        for (pt, want) in cases {
            assert_eq!(open(&seal_raw_as(2, &pt), &key(), c), Err(SealedError::Malformed(want)), "{want:?}");
        }
        let full: Vec<Vec<u8>> = (1..=u64::from(max)).map(act).collect();
        assert!(open(&seal_raw_as(2, &doc(max, &full)), &key(), c).is_ok(), "exactly the limit");
    }

    /// Format 3 carries the audit head through seal and open, with or without one; a format-2
    /// blob (no audit head) still opens as a state without one, and the same plaintext under a
    /// format-3 header lacks its head and is refused; a bad head tag is refused by name.
    #[test]
    fn format_3_round_trips_the_audit_head_and_format_2_still_opens_without_one() {
        let c = default_backend();
        let with = state();
        let blob = seal(&with, &key(), &SET, &mut |b: &mut [u8]| b.fill(1), c).expect("seal");
        assert_eq!(peek_header(&blob).expect("peek").format_version, FORMAT_VERSION);
        let opened = open(&blob, &key(), c).expect("open");
        assert_eq!(opened.audit_head, Some(AuditHead { chain_id: [0xc1; 48], seq: 57, digest: [0xd1; 48] }));
        assert_eq!(opened, with);
        let without = KreState { audit_head: None, ..state() };
        let blob = seal(&without, &key(), &SET, &mut |b: &mut [u8]| b.fill(1), c).expect("seal");
        assert_eq!(open(&blob, &key(), c).expect("open").audit_head, None);

        // policy head none, no clusters, no activations: a format-2 plaintext.
        let v2 = [&[0u8][..], &0u32.to_be_bytes(), &0u16.to_be_bytes()].concat();
        let s = open(&seal_raw_as(FORMAT_VERSION_2, &v2), &key(), c).expect("format 2 opens");
        assert_eq!(s.audit_head, None);
        assert_eq!(open(&seal_raw_as(3, &v2), &key(), c), Err(SealedError::Malformed(Malformed::Truncated)));
        let head = [&[1u8][..], &[0xc1; 48], &57u64.to_be_bytes(), &[0xd1; 48]].concat();
        let v3 = [&v2[..], &head].concat();
        let s = open(&seal_raw_as(3, &v3), &key(), c).expect("format 3 opens");
        assert_eq!(s.audit_head.map(|h| (h.seq, h.chain_id[0], h.digest[0])), Some((57, 0xc1, 0xd1)));
        assert_eq!(
            open(&seal_raw_as(FORMAT_VERSION_2, &v3), &key(), c),
            Err(SealedError::Malformed(Malformed::TrailingBytes))
        );
        let cases: Vec<(Vec<u8>, Malformed)> = vec![
            ([&v2[..], &[2]].concat(), Malformed::BadAuditHeadTag { tag: 2 }),
            (v3[..v3.len() - 1].to_vec(), Malformed::Truncated),
            ([&v3[..], &[0]].concat(), Malformed::TrailingBytes),
            ([&v2[..], &[0], &[0]].concat(), Malformed::TrailingBytes),
        ];
        for (pt, want) in cases {
            assert_eq!(open(&seal_raw_as(3, &pt), &key(), c), Err(SealedError::Malformed(want)), "{want:?}");
        }
    }

    #[test]
    fn seal_refuses_invalid_states() {
        let c = default_backend();
        let mut rng = |b: &mut [u8]| b.fill(0);
        let mut s = state();
        s.clusters.insert(id("x"), vec![]);
        assert_eq!(seal(&s, &key(), &SET, &mut rng, c), Err(SealedError::Malformed(Malformed::EmptyCluster)));
        let mut s = state();
        s.clusters.insert(id("x"), vec![entry(1, KekStatus::Current, 1), entry(2, KekStatus::Current, 2)]);
        assert_eq!(seal(&s, &key(), &SET, &mut rng, c), Err(SealedError::Malformed(Malformed::MultipleCurrent)));
        let mut s = state();
        s.clusters.insert(id("x"), vec![entry(2, KekStatus::Active, 1), entry(1, KekStatus::Current, 2)]);
        assert_eq!(seal(&s, &key(), &SET, &mut rng, c), Err(SealedError::Malformed(Malformed::UnsortedVersions)));
        let mut s = state();
        s.activations.reverse();
        assert_eq!(seal(&s, &key(), &SET, &mut rng, c), Err(SealedError::Malformed(Malformed::UnsortedActivations)));
        let mut s = state();
        s.activations = (0..=u64::try_from(MAX_ACTIVATIONS).expect("small"))
            .map(|version| Activation { version, digest: [0; 48], activates_at_ms: 0 })
            .collect();
        assert_eq!(
            seal(&s, &key(), &SET, &mut rng, c),
            Err(SealedError::Malformed(Malformed::TooManyActivations { count: MAX_ACTIVATIONS + 1 }))
        );
    }

    #[test]
    fn generation_and_custodian_set_are_bound() {
        // Moving a ciphertext under another header (generation or custodian set) fails.
        let c = default_backend();
        let a = sealed();
        let mut s = state();
        s.generation = 8;
        let b = seal(&s, &key(), &SET, &mut |x: &mut [u8]| x.fill(9), c).expect("seal");
        let mut spliced = b[..HEADER_LEN].to_vec();
        spliced.extend_from_slice(&a[HEADER_LEN..a.len() - DIGEST_LEN]);
        spliced.extend_from_slice(&[0; DIGEST_LEN]);
        redigest(&mut spliced);
        assert_eq!(open(&spliced, &key(), c), Err(SealedError::Decrypt));
        let other = seal(&state(), &key(), &[0x5f; 48], &mut |x: &mut [u8]| x.fill(9), c).expect("seal");
        assert_ne!(other[HEADER_LEN..], a[HEADER_LEN..]);
    }

    /// Two seals of the same state at the same generation (what a KRE restarted from g−1 does
    /// when it seals g again) use different subkeys: the salt in the header differs, each opens
    /// only under its own header, and neither shares an AES-GCM key/nonce pair with the other.
    #[test]
    fn two_seals_of_one_generation_use_different_subkeys_and_both_open() {
        let c = default_backend();
        // The same nonce both times: only the salt differs.
        let mut draws = [[1u8; SALT_LEN], [2u8; SALT_LEN]].into_iter();
        let mut first = true;
        let mut rng = |b: &mut [u8]| {
            if b.len() == SALT_LEN {
                b.copy_from_slice(&draws.next().expect("two seals"));
            } else {
                b.fill(7);
                first = false;
            }
        };
        let a = seal(&state(), &key(), &SET, &mut rng, c).expect("seal a");
        let b = seal(&state(), &key(), &SET, &mut rng, c).expect("seal b");
        assert!(!first);
        let (ha, hb) = (peek_header(&a).expect("a"), peek_header(&b).expect("b"));
        assert_eq!((ha.generation, ha.nonce), (hb.generation, hb.nonce));
        assert_ne!(ha.seal_salt, hb.seal_salt);
        let (ka, kb) = (state_subkey(c, &key(), &ha).expect("ka"), state_subkey(c, &key(), &hb).expect("kb"));
        assert_ne!(ka.expose(), kb.expose(), "one key per seal");
        assert_ne!(a[HEADER_LEN..a.len() - DIGEST_LEN], b[HEADER_LEN..b.len() - DIGEST_LEN]);
        assert_eq!(open(&a, &key(), c).expect("a opens"), state());
        assert_eq!(open(&b, &key(), c).expect("b opens"), state());
        // Each ciphertext opens only under its own salt.
        let mut swapped = a.clone();
        swapped[66..98].copy_from_slice(&[2; SALT_LEN]);
        redigest(&mut swapped);
        assert_eq!(open(&swapped, &key(), c), Err(SealedError::Decrypt));
        // Formats 1 to 3 (no salt) still derive the per-generation key.
        let unsalted = SealedHeader { format_version: FORMAT_VERSION_3, seal_salt: None, ..ha };
        assert_ne!(state_subkey(c, &key(), &unsalted).expect("k3").expose(), ka.expose());
    }

    /// The plaintext (every KEK) is written into a buffer of exactly the computed length, so it
    /// never grows (no reallocation leaves a copy on the heap).
    #[test]
    fn the_plaintext_buffer_is_sized_exactly_before_it_is_written() {
        let mut big = state();
        for i in 0..40u32 {
            let name = format!("cluster-{i:03}");
            let entries = (1..=i % 7 + 1).map(|v| entry(v, KekStatus::Active, 0x30)).collect();
            big.clusters.insert(id(&name), entries);
        }
        for s in [state(), KreState::default(), KreState { audit_head: None, policy_head: None, ..state() }, big] {
            let len = plaintext_len(&s).expect("len");
            let pt = encode_plaintext(&s).expect("encode");
            assert_eq!(pt.len(), len);
            assert_eq!(pt.capacity(), len, "the buffer was allocated once, at its final size");
            let blob = seal(&s, &key(), &SET, &mut |b: &mut [u8]| b.fill(1), default_backend()).expect("seal");
            assert_eq!(blob.len(), HEADER_LEN + len + TAG_LEN + DIGEST_LEN);
        }
        // Limits are checked before the buffer is allocated.
        let mut huge = KreState::default();
        for i in 0..200u32 {
            let entries = (1..=800).map(|v| entry(v, KekStatus::Active, 1)).collect();
            huge.clusters.insert(id(&format!("c{i}")), entries);
        }
        assert!(matches!(plaintext_len(&huge), Err(SealedError::TooLarge { .. })));
    }

    #[test]
    fn errors_and_debug_carry_no_secret() {
        let d = format!("{:?}", state());
        assert!(!d.contains("17, 17") && !d.contains("0x11") && d.contains("redacted"));
        let e = open(&sealed(), &Secret::new([0; 32]), default_backend()).expect_err("wrong key");
        assert!(!format!("{e} {e:?}").contains("119"));
    }
}
