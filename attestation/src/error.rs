//! The verification error: one variant per check, saying exactly what failed.

use std::fmt;

use crate::cbor::CborError;
use crate::kind::DocumentKind;
use crate::time::{UnixMillis, UnixSeconds};

/// Which certificate of a document's chain an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertAt {
    /// `cabundle[i]`; `cabundle[0]` is the root.
    Cabundle(usize),
    /// The document's `certificate` (the leaf that signs the document).
    Leaf,
}

impl fmt::Display for CertAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertAt::Cabundle(0) => write!(f, "cabundle[0] (root)"),
            CertAt::Cabundle(i) => write!(f, "cabundle[{i}]"),
            CertAt::Leaf => write!(f, "leaf certificate"),
        }
    }
}

/// A field of the attestation payload, for error messages.
pub type Field = &'static str;

/// Why an attestation document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    // ---- input and COSE envelope ----
    /// The whole input exceeds the size limit.
    #[error("document is {len} bytes, more than the {max}-byte limit")]
    DocumentTooLarge { len: usize, max: usize },
    /// The COSE envelope is not well-formed CBOR.
    #[error("COSE_Sign1 envelope: {0}")]
    EnvelopeCbor(CborError),
    /// Tagged with something other than 18 (COSE_Sign1).
    #[error("COSE: unexpected CBOR tag {0} (only 18, COSE_Sign1, or untagged)")]
    UnexpectedTag(u64),
    /// Not an array of four items.
    #[error("COSE: not a COSE_Sign1 structure (an array of 4 items)")]
    NotCoseSign1,
    /// The protected header is not a byte string holding exactly `{1: -35}`.
    #[error("COSE: protected header malformed: {0}")]
    ProtectedHeader(&'static str),
    /// The protected header names an algorithm other than ES384 (-35).
    #[error("COSE: algorithm {0} is not ES384 (-35)")]
    UnsupportedAlgorithm(i128),
    /// The unprotected header is not an empty map.
    #[error("COSE: unprotected header must be an empty map")]
    UnprotectedHeaderNotEmpty,
    /// The payload is nil (detached) or not a byte string.
    #[error("COSE: payload must be an attached byte string")]
    PayloadNotBytes,
    /// The payload exceeds 16 KiB.
    #[error("payload is {len} bytes, more than the {max}-byte limit")]
    PayloadTooLarge { len: usize, max: usize },
    /// The signature is not a 96-byte string.
    #[error("COSE: signature must be 96 bytes (r||s), got {0}")]
    SignatureLength(usize),

    // ---- payload ----
    /// The payload is not well-formed CBOR.
    #[error("payload: {0}")]
    PayloadCbor(CborError),
    /// The payload is not a map with text keys.
    #[error("payload: not a map with text keys")]
    PayloadNotMap,
    /// A required field is absent or null.
    #[error("payload: missing field `{0}`")]
    MissingField(Field),
    /// A field occurs twice.
    #[error("payload: duplicate field `{0}`")]
    DuplicateField(String),
    /// A field this verifier does not know (refused unless tolerated by option).
    #[error("payload: unknown field `{0}`")]
    UnknownField(String),
    /// A field has the wrong CBOR type.
    #[error("payload: field `{field}` has the wrong type (expected {expected})")]
    FieldType { field: Field, expected: &'static str },
    /// A field's length is outside the spec's bounds.
    #[error("payload: field `{field}` is {len} bytes, allowed {min}..={max}")]
    FieldSize { field: Field, len: usize, min: usize, max: usize },
    /// `digest` is not "SHA384".
    #[error("payload: digest `{0}` is not SHA384")]
    UnsupportedDigest(String),
    /// `timestamp` is 0.
    #[error("payload: timestamp is 0")]
    ZeroTimestamp,
    /// The PCR map has 0 or more than 32 entries.
    #[error("payload: {count} PCRs, allowed 1..=32")]
    PcrCount { count: usize },
    /// A PCR index is not below 32.
    #[error("payload: PCR index {0} is not below 32")]
    PcrIndex(u64),
    /// A PCR index occurs twice.
    #[error("payload: PCR {0} occurs twice")]
    DuplicatePcr(u8),
    /// A PCR value is not 32, 48 or 64 bytes.
    #[error("payload: PCR {index} is {len} bytes (32, 48 or 64 allowed)")]
    PcrLength { index: u8, len: usize },
    /// Both `pcrs` and `nitrotpm_pcrs` are present.
    #[error("payload: both `pcrs` and `nitrotpm_pcrs` present; the document kind is ambiguous")]
    AmbiguousKind,
    /// The cabundle is empty.
    #[error("payload: cabundle is empty")]
    EmptyCabundle,

    // ---- certificate chain ----
    /// More certificates than the verifier will process.
    #[error("chain of {len} certificates exceeds the limit of {max}")]
    ChainTooLong { len: usize, max: usize },
    /// `cabundle[0]` is not the pinned root certificate.
    #[error("cabundle[0] is not the pinned root certificate (SHA-256 {found})")]
    RootMismatch { found: String },
    /// A certificate is not parseable DER X.509.
    #[error("{at}: not a valid X.509 certificate")]
    CertificateParse { at: CertAt },
    /// Signature algorithm other than ecdsa-with-SHA384 (or inner and outer differ).
    #[error("{at}: signature algorithm is not ecdsa-with-SHA384")]
    UnsupportedSignatureAlgorithm { at: CertAt },
    /// Public key other than EC P-384.
    #[error("{at}: public key is not EC P-384")]
    UnsupportedPublicKey { at: CertAt },
    /// Issuer name does not equal the previous certificate's subject.
    #[error("{at}: issuer does not match the subject of the certificate above it")]
    IssuerMismatch { at: CertAt },
    /// Signature by the issuer's key does not verify.
    #[error("{at}: signature by its issuer does not verify")]
    BadCertificateSignature { at: CertAt },
    /// Expired at the verification time.
    #[error("{at}: expired (not after {}, verification time {})", UnixSeconds(*.not_after), UnixSeconds(*.time))]
    CertificateExpired { at: CertAt, not_after: i64, time: i64 },
    /// Not yet valid at the verification time.
    #[error("{at}: not yet valid (not before {}, verification time {})", UnixSeconds(*.not_before), UnixSeconds(*.time))]
    CertificateNotYetValid { at: CertAt, not_before: i64, time: i64 },
    /// A certificate above the leaf is not a CA.
    #[error("{at}: is not a CA (basicConstraints cA missing or false)")]
    NotACa { at: CertAt },
    /// The leaf certificate is a CA.
    #[error("leaf certificate is a CA")]
    LeafIsCa,
    /// A CA certificate lacks keyUsage keyCertSign.
    #[error("{at}: keyUsage lacks keyCertSign")]
    MissingKeyCertSign { at: CertAt },
    /// A CA's pathLenConstraint is exceeded by the CAs below it.
    #[error("{at}: pathLenConstraint {path_len} exceeded ({below} CAs below it)")]
    PathLenExceeded { at: CertAt, path_len: u32, below: usize },
    /// A critical extension this verifier does not process.
    #[error("{at}: unhandled critical extension {oid}")]
    UnhandledCriticalExtension { at: CertAt, oid: String },

    // ---- signature, time, mode, kind ----
    /// The COSE signature does not verify under the leaf's key.
    #[error("COSE signature does not verify with the leaf certificate's key")]
    BadSignature,
    /// The document is older than `max_age`.
    #[error("document timestamp {} is older than the maximum age ({max_age_ms} ms) at {}", UnixMillis(*.timestamp_ms), UnixMillis(*.now_ms))]
    DocumentTooOld { timestamp_ms: u64, now_ms: u64, max_age_ms: u64 },
    /// The document's timestamp is in the future beyond the allowed skew.
    #[error("document timestamp {} is in the future (now {}, skew {skew_ms} ms)", UnixMillis(*.timestamp_ms), UnixMillis(*.now_ms))]
    DocumentFromFuture { timestamp_ms: u64, now_ms: u64, skew_ms: u64 },
    /// PCR0, PCR1 and PCR2 are all zero (a debug-mode enclave), and debug was not allowed.
    #[error("debug-mode document (PCR0, PCR1, PCR2 all zero) refused")]
    DebugMode,
    /// A document of the other kind than required.
    #[error("document kind is {found}, required {expected}")]
    WrongKind { expected: DocumentKind, found: DocumentKind },
}
