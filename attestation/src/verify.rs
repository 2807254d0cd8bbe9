//! The verifier: the only way to obtain a [`VerifiedAttestation`].
//!
//! Order of checks (cheap before expensive, so stale or malformed input costs no public-key
//! operation): COSE envelope → payload limits → chain structure, constraints and validity at
//! the verification time → document age → chain signatures → COSE signature → debug mode →
//! document kind.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha384};

use crate::chain::{self, ChainCache, TrustAnchor};
use crate::cose;
use crate::crypto::{self, Crypto};
use crate::document::{self, DocumentKind, UnknownFields};
use crate::error::VerifyError;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// Which time the document and its certificates are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyTime {
    /// The current time, in milliseconds since the Unix epoch. Age and skew limits apply.
    Now(UnixMillis),
    /// The document's own timestamp: verifies an archived document (for audits) as it was
    /// when it was produced. Age and skew limits do not apply.
    DocumentTime,
}

/// How to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The verification time.
    pub time: VerifyTime,
    /// Documents older than this (relative to `time`) are refused.
    pub max_age: Duration,
    /// Documents whose timestamp is ahead of `time` by more than this are refused.
    pub clock_skew: Duration,
    /// Accept debug-mode documents (PCR0, PCR1 and PCR2 all zero).
    pub allow_debug: bool,
    /// What to do with payload fields the AWS spec does not define.
    pub unknown_fields: UnknownFields,
    /// Accept only this kind of document.
    pub require_kind: Option<DocumentKind>,
    /// Use the verifier's cache of verified intermediate signatures.
    pub use_cache: bool,
}

/// Default maximum document age: 5 minutes.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// Default allowed clock skew: 30 seconds.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);

impl VerifyOptions {
    /// Strict defaults at time `now_ms`: 5-minute maximum age, 30 s skew, debug refused,
    /// unknown fields refused, either kind, cache on.
    pub fn at(now_ms: UnixMillis) -> Self {
        Self { time: VerifyTime::Now(now_ms), ..Self::at_document_time() }
    }

    /// Verifies as of the document's own timestamp (archived documents).
    pub fn at_document_time() -> Self {
        Self {
            time: VerifyTime::DocumentTime,
            max_age: DEFAULT_MAX_AGE,
            clock_skew: DEFAULT_CLOCK_SKEW,
            allow_debug: false,
            unknown_fields: UnknownFields::Refuse,
            require_kind: None,
            use_cache: true,
        }
    }
}

/// An attestation document whose signature, chain, limits and time all checked out.
/// Only [`Verifier::verify`] constructs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAttestation {
    kind: DocumentKind,
    module_id: String,
    digest: String,
    timestamp_ms: u64,
    pcrs: BTreeMap<u8, Vec<u8>>,
    public_key: Option<Vec<u8>>,
    user_data: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    unknown_fields: Vec<String>,
    leaf_not_before: i64,
    leaf_not_after: i64,
    chain_not_after: i64,
    document_sha384: [u8; 48],
    root_sha256: [u8; 32],
    debug: bool,
}

impl VerifiedAttestation {
    /// Enclave (NSM) or NitroTPM document.
    pub fn kind(&self) -> DocumentKind {
        self.kind
    }
    /// The issuing module's id.
    pub fn module_id(&self) -> &str {
        &self.module_id
    }
    /// The PCR digest algorithm (always "SHA384").
    pub fn digest(&self) -> &str {
        &self.digest
    }
    /// Milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
    /// PCR index → value (`pcrs` or `nitrotpm_pcrs`, per [`Self::kind`]).
    pub fn pcrs(&self) -> &BTreeMap<u8, Vec<u8>> {
        &self.pcrs
    }
    /// One PCR's value.
    pub fn pcr(&self, index: u8) -> Option<&[u8]> {
        self.pcrs.get(&index).map(Vec::as_slice)
    }
    /// The `public_key` field: `None` when absent or null, `Some(&[])` when the document
    /// carries an empty byte string (the NSM signs those). A protocol that needs a key must
    /// check what it gets (keygate's key release refuses anything but a valid P-384 point).
    pub fn public_key(&self) -> Option<&[u8]> {
        self.public_key.as_deref()
    }
    /// The `user_data` field, if present.
    pub fn user_data(&self) -> Option<&[u8]> {
        self.user_data.as_deref()
    }
    /// The `nonce` field, if present.
    pub fn nonce(&self) -> Option<&[u8]> {
        self.nonce.as_deref()
    }
    /// Unknown payload fields that were tolerated (empty unless tolerated by option).
    pub fn unknown_fields(&self) -> &[String] {
        &self.unknown_fields
    }
    /// The leaf certificate's validity window (Unix seconds).
    pub fn leaf_validity(&self) -> (i64, i64) {
        (self.leaf_not_before, self.leaf_not_after)
    }
    /// The earliest expiry (Unix seconds) of any certificate in the chain.
    pub fn chain_not_after(&self) -> i64 {
        self.chain_not_after
    }
    /// SHA-384 of the whole document as received (for audit records).
    pub fn document_sha384(&self) -> [u8; 48] {
        self.document_sha384
    }
    /// SHA-256 of the root certificate the chain ends in.
    pub fn root_sha256(&self) -> [u8; 32] {
        self.root_sha256
    }
    /// Whether PCR0, PCR1 and PCR2 are all zero (debug mode; accepted only when allowed).
    pub fn is_debug(&self) -> bool {
        self.debug
    }
}

/// Verifies attestation documents against one pinned root.
#[derive(Debug)]
pub struct Verifier {
    anchor: TrustAnchor,
    crypto: &'static dyn Crypto,
    cache: ChainCache,
}

impl Verifier {
    /// A verifier trusting `anchor`, with the default crypto backend.
    pub fn new(anchor: TrustAnchor) -> Self {
        Self::with_crypto(anchor, crypto::default_backend())
    }

    /// A verifier with an explicit crypto backend.
    pub fn with_crypto(anchor: TrustAnchor, crypto: &'static dyn Crypto) -> Self {
        Self { anchor, crypto, cache: ChainCache::default() }
    }

    /// The pinned root.
    pub fn anchor(&self) -> &TrustAnchor {
        &self.anchor
    }

    /// The crypto backend in use.
    pub fn crypto(&self) -> &'static dyn Crypto {
        self.crypto
    }

    /// The cache of verified intermediate signatures.
    pub fn cache(&self) -> &ChainCache {
        &self.cache
    }

    /// Verifies `document` (a COSE_Sign1, tagged or untagged) under `opts`.
    pub fn verify(&self, document: &[u8], opts: &VerifyOptions) -> Result<VerifiedAttestation, VerifyError> {
        let sign1 = cose::parse(document)?;
        let doc = document::parse_payload(&sign1.payload, opts.unknown_fields)?;

        let time_ms = match opts.time {
            VerifyTime::Now(now) => now,
            VerifyTime::DocumentTime => doc.timestamp_ms,
        };
        let time_s = i64::try_from(time_ms / 1000).unwrap_or(i64::MAX);

        // The age check runs between the chain's structural pass and its signatures, so
        // that a stale document costs no public-key operation.
        let check_age = || -> Result<(), VerifyError> {
            if let VerifyTime::Now(now) = opts.time {
                let skew = u64::try_from(opts.clock_skew.as_millis()).unwrap_or(u64::MAX);
                let max_age = u64::try_from(opts.max_age.as_millis()).unwrap_or(u64::MAX);
                if doc.timestamp_ms > now.saturating_add(skew) {
                    return Err(VerifyError::DocumentFromFuture {
                        timestamp_ms: doc.timestamp_ms,
                        now_ms: now,
                        skew_ms: skew,
                    });
                }
                if now.saturating_sub(doc.timestamp_ms) > max_age {
                    return Err(VerifyError::DocumentTooOld {
                        timestamp_ms: doc.timestamp_ms,
                        now_ms: now,
                        max_age_ms: max_age,
                    });
                }
            }
            Ok(())
        };
        let cache = opts.use_cache.then_some(&self.cache);
        let chain =
            chain::validate(self.crypto, &self.anchor, &doc.cabundle, &doc.certificate, time_s, cache, check_age)?;

        let tbs = cose::sig_structure(sign1.protected, &sign1.payload);
        self.crypto
            .verify_p384_sha384_fixed(&chain.leaf_point, &tbs, &sign1.signature)
            .map_err(|_| VerifyError::BadSignature)?;

        let zero = |i: u8| doc.pcrs.get(&i).is_some_and(|v| v.iter().all(|&b| b == 0));
        let debug = zero(0) && zero(1) && zero(2);
        if debug && !opts.allow_debug {
            return Err(VerifyError::DebugMode);
        }
        if let Some(expected) = opts.require_kind {
            if expected != doc.kind {
                return Err(VerifyError::WrongKind { expected, found: doc.kind });
            }
        }

        Ok(VerifiedAttestation {
            kind: doc.kind,
            module_id: doc.module_id,
            digest: doc.digest,
            timestamp_ms: doc.timestamp_ms,
            pcrs: doc.pcrs,
            public_key: doc.public_key,
            user_data: doc.user_data,
            nonce: doc.nonce,
            unknown_fields: doc.unknown_fields,
            leaf_not_before: chain.leaf_not_before,
            leaf_not_after: chain.leaf_not_after,
            chain_not_after: chain.chain_not_after,
            document_sha384: Sha384::digest(document).into(),
            root_sha256: self.anchor.fingerprint(),
            debug,
        })
    }
}
