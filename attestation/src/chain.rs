//! Certificate chain validation from the pinned root through `cabundle` to the leaf.
//!
//! The chain is built strictly in the order the document gives (root first) and checked by
//! issuer/subject name and signature, not by key identifiers: real AWS certificates lack
//! Authority/Subject Key Identifiers. All cheap checks (parsing, algorithms, names, CA
//! constraints, validity at the verification time) run before any signature is verified, so
//! a malformed or stale chain costs no public-key operation.

use std::collections::HashSet;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::crypto::Crypto;
use crate::error::{CertAt, VerifyError};

/// The most certificates (cabundle plus leaf) the verifier processes. Real chains have 5.
pub const MAX_CHAIN: usize = 8;

/// SHA-256 of the DER of the AWS Nitro Enclaves root certificate (CN=aws.nitro-enclaves).
pub const AWS_NITRO_ROOT_SHA256: &str = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

/// The AWS Nitro Enclaves root certificate, as AWS publishes it.
pub const AWS_NITRO_ROOT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
";

const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_SECP384R1: &str = "1.3.132.0.34";
const OID_BASIC_CONSTRAINTS: &str = "2.5.29.19";
const OID_KEY_USAGE: &str = "2.5.29.15";

/// Why a trust anchor could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    /// Not a PEM certificate.
    #[error("not a PEM-encoded certificate")]
    Pem,
    /// Not a parseable X.509 certificate.
    #[error("not a valid X.509 certificate")]
    Certificate,
    /// Not an EC P-384 certificate signed with ecdsa-with-SHA384.
    #[error("root must be an EC P-384 certificate signed with ecdsa-with-SHA384")]
    Algorithm,
    /// The built-in AWS root does not have its published fingerprint.
    #[error("built-in AWS root does not match its pinned SHA-256 fingerprint")]
    Fingerprint,
}

/// The root certificate a verifier trusts. `cabundle[0]` of every document must equal it
/// byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    der: Vec<u8>,
    fingerprint: [u8; 32],
}

impl TrustAnchor {
    /// The AWS Nitro Enclaves root, checked against its published SHA-256 fingerprint.
    pub fn aws_nitro() -> Result<Self, AnchorError> {
        let anchor = Self::from_pem(AWS_NITRO_ROOT_PEM.as_bytes())?;
        if hex::encode(anchor.fingerprint) != AWS_NITRO_ROOT_SHA256 {
            return Err(AnchorError::Fingerprint);
        }
        Ok(anchor)
    }

    /// Any other root (a test PKI, a mock NSM): only by explicit configuration.
    pub fn from_pem(pem: &[u8]) -> Result<Self, AnchorError> {
        let (rest, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|_| AnchorError::Pem)?;
        if pem.label != "CERTIFICATE" || !rest.iter().all(u8::is_ascii_whitespace) {
            return Err(AnchorError::Pem);
        }
        Self::from_der(&pem.contents)
    }

    /// A root given as DER.
    pub fn from_der(der: &[u8]) -> Result<Self, AnchorError> {
        CertInfo::from_der(der, CertAt::Cabundle(0)).map_err(|e| match e {
            VerifyError::CertificateParse { .. } => AnchorError::Certificate,
            _ => AnchorError::Algorithm,
        })?;
        Ok(Self { der: der.to_vec(), fingerprint: Sha256::digest(der).into() })
    }

    /// A root taken as given, without checking that it is a usable P-384 certificate (for
    /// test PKIs whose root is deliberately malformed: documents then fail to verify with the
    /// precise chain error instead of the anchor failing to load).
    #[cfg(feature = "mock")]
    pub(crate) fn from_der_unchecked(der: &[u8]) -> Self {
        Self { der: der.to_vec(), fingerprint: Sha256::digest(der).into() }
    }

    /// The root's DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the root's DER.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The root as PEM.
    pub fn to_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }
}

/// PEM-encodes `der` with `label`, 64 columns.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn parse(der: &[u8], at: CertAt) -> Result<X509Certificate<'_>, VerifyError> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        _ => Err(VerifyError::CertificateParse { at }),
    }
}

/// What the chain check needs from one certificate, extracted once.
#[derive(Debug)]
pub(crate) struct CertInfo<'a> {
    pub(crate) at: CertAt,
    pub(crate) der: &'a [u8],
    tbs: Vec<u8>,
    signature: Vec<u8>,
    subject: Vec<u8>,
    issuer: Vec<u8>,
    /// Uncompressed SEC1 P-384 point.
    pub(crate) point: Vec<u8>,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    is_ca: bool,
    path_len: Option<u32>,
    key_cert_sign: bool,
}

impl<'a> CertInfo<'a> {
    pub(crate) fn from_der(der: &'a [u8], at: CertAt) -> Result<Self, VerifyError> {
        let cert = parse(der, at)?;
        let parse_err = VerifyError::CertificateParse { at };
        let outer = cert.signature_algorithm.algorithm.to_id_string();
        let inner = cert.tbs_certificate.signature.algorithm.to_id_string();
        if outer != OID_ECDSA_SHA384 || inner != OID_ECDSA_SHA384 {
            return Err(VerifyError::UnsupportedSignatureAlgorithm { at });
        }
        let spki = cert.public_key();
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
        if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY
            || curve.as_deref() != Some(OID_SECP384R1)
            || spki.subject_public_key.unused_bits != 0
        {
            return Err(VerifyError::UnsupportedPublicKey { at });
        }
        for ext in cert.extensions() {
            let oid = ext.oid.to_id_string();
            if ext.critical && oid != OID_BASIC_CONSTRAINTS && oid != OID_KEY_USAGE {
                return Err(VerifyError::UnhandledCriticalExtension { at, oid });
            }
        }
        let bc = cert.basic_constraints().map_err(|_| parse_err.clone())?;
        let ku = cert.key_usage().map_err(|_| parse_err.clone())?;
        let validity = cert.validity();
        Ok(CertInfo {
            at,
            der,
            tbs: cert.tbs_certificate.as_ref().to_vec(),
            signature: cert.signature_value.data.to_vec(),
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            point: spki.subject_public_key.data.to_vec(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
            path_len: bc.as_ref().and_then(|b| b.value.path_len_constraint),
            key_cert_sign: ku.is_some_and(|k| k.value.key_cert_sign()),
        })
    }

    fn check_time(&self, time: i64) -> Result<(), VerifyError> {
        if time < self.not_before {
            return Err(VerifyError::CertificateNotYetValid { at: self.at, not_before: self.not_before, time });
        }
        if time > self.not_after {
            return Err(VerifyError::CertificateExpired { at: self.at, not_after: self.not_after, time });
        }
        Ok(())
    }
}

/// The leaf's key and the validity window of the whole chain, after validation.
#[derive(Debug, Clone)]
pub(crate) struct ValidatedChain {
    pub(crate) leaf_point: Vec<u8>,
    pub(crate) leaf_not_before: i64,
    pub(crate) leaf_not_after: i64,
    /// The earliest `not_after` of any certificate in the chain.
    pub(crate) chain_not_after: i64,
}

/// Remembers issuer→subject signatures already verified, keyed by the exact DER bytes of
/// both certificates. Only signatures are cached: names, constraints and validity are
/// re-checked on every use.
#[derive(Debug, Default)]
pub struct ChainCache {
    verified: Mutex<HashSet<[u8; 32]>>,
    hits: std::sync::atomic::AtomicU64,
}

/// Entries kept before the cache is cleared (bounded memory whatever the input).
pub const CHAIN_CACHE_CAPACITY: usize = 4096;

impl ChainCache {
    fn key(issuer: &[u8], subject: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(u64::try_from(issuer.len()).unwrap_or(u64::MAX).to_be_bytes());
        h.update(issuer);
        h.update(subject);
        h.finalize().into()
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        let hit = self.verified.lock().map(|s| s.contains(key)).unwrap_or(false);
        if hit {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit
    }

    /// Signatures not re-verified because they were cached (for metrics and tests).
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn insert(&self, key: [u8; 32]) {
        if let Ok(mut s) = self.verified.lock() {
            if s.len() >= CHAIN_CACHE_CAPACITY {
                s.clear();
            }
            s.insert(key);
        }
    }

    /// Number of cached signatures.
    pub fn len(&self) -> usize {
        self.verified.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Validates `cabundle` + `leaf` against `anchor` at `time` (Unix seconds).
///
/// `before_signatures` runs after every structural and time check passed and before the
/// first signature is verified: the caller's other cheap checks go there.
pub(crate) fn validate(
    crypto: &dyn Crypto,
    anchor: &TrustAnchor,
    cabundle: &[Vec<u8>],
    leaf: &[u8],
    time: i64,
    cache: Option<&ChainCache>,
    before_signatures: impl FnOnce() -> Result<(), VerifyError>,
) -> Result<ValidatedChain, VerifyError> {
    let len = cabundle.len() + 1;
    if len > MAX_CHAIN {
        return Err(VerifyError::ChainTooLong { len, max: MAX_CHAIN });
    }
    let Some(root) = cabundle.first() else {
        return Err(VerifyError::EmptyCabundle);
    };
    if root.as_slice() != anchor.der() {
        return Err(VerifyError::RootMismatch { found: hex::encode(Sha256::digest(root)) });
    }

    let mut certs = Vec::with_capacity(len);
    for (i, der) in cabundle.iter().enumerate() {
        certs.push(CertInfo::from_der(der, CertAt::Cabundle(i))?);
    }
    certs.push(CertInfo::from_der(leaf, CertAt::Leaf)?);
    let last = certs.len() - 1;

    // Structure and time: no public-key operations yet.
    for (i, c) in certs.iter().enumerate() {
        if i > 0 && c.issuer != certs[i - 1].subject {
            return Err(VerifyError::IssuerMismatch { at: c.at });
        }
        if i < last {
            if !c.is_ca {
                return Err(VerifyError::NotACa { at: c.at });
            }
            if !c.key_cert_sign {
                return Err(VerifyError::MissingKeyCertSign { at: c.at });
            }
            // CAs strictly below this one and above the leaf.
            let below = last - i - 1;
            if let Some(path_len) = c.path_len {
                if usize::try_from(path_len).is_ok_and(|p| below > p) {
                    return Err(VerifyError::PathLenExceeded { at: c.at, path_len, below });
                }
            }
        } else if c.is_ca {
            return Err(VerifyError::LeafIsCa);
        }
        c.check_time(time)?;
    }

    before_signatures()?;

    // Signatures, each by the certificate above it. The root is pinned by its bytes.
    for i in 1..certs.len() {
        let (issuer, subject) = (&certs[i - 1], &certs[i]);
        let cacheable = i < last;
        let key = ChainCache::key(issuer.der, subject.der);
        if cacheable && cache.is_some_and(|c| c.contains(&key)) {
            continue;
        }
        crypto
            .verify_p384_sha384_der(&issuer.point, &subject.tbs, &subject.signature)
            .map_err(|_| VerifyError::BadCertificateSignature { at: subject.at })?;
        if cacheable {
            if let Some(c) = cache {
                c.insert(key);
            }
        }
    }

    let chain_not_after = certs.iter().map(|c| c.not_after).min().unwrap_or(i64::MIN);
    let leaf = &certs[last];
    Ok(ValidatedChain {
        leaf_point: leaf.point.clone(),
        leaf_not_before: leaf.not_before,
        leaf_not_after: leaf.not_after,
        chain_not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_aws_root_matches_its_fingerprint() {
        let a = TrustAnchor::aws_nitro().expect("built-in root");
        assert_eq!(hex::encode(a.fingerprint()), AWS_NITRO_ROOT_SHA256);
        assert_eq!(TrustAnchor::from_pem(a.to_pem().as_bytes()).expect("round trip"), a);
    }

    #[test]
    fn anchor_pem_must_be_one_certificate_block_and_nothing_else() {
        let pem = TrustAnchor::aws_nitro().expect("root").to_pem();
        // The same DER under another label.
        let relabelled = pem.replace("CERTIFICATE", "PUBLIC KEY");
        assert_eq!(TrustAnchor::from_pem(relabelled.as_bytes()), Err(AnchorError::Pem));
        // Anything after the block but whitespace.
        assert_eq!(TrustAnchor::from_pem(format!("{pem}\ntrailing").as_bytes()), Err(AnchorError::Pem));
        assert_eq!(TrustAnchor::from_pem(format!("{pem}{pem}").as_bytes()), Err(AnchorError::Pem));
        assert!(TrustAnchor::from_pem(format!("{pem}\n\n  \n").as_bytes()).is_ok());
    }

    #[test]
    fn validity_bounds_are_inclusive() {
        let a = TrustAnchor::aws_nitro().expect("root");
        let c = CertInfo::from_der(a.der(), CertAt::Cabundle(0)).expect("parse");
        assert!(c.check_time(c.not_before).is_ok());
        assert!(c.check_time(c.not_after).is_ok());
        assert!(matches!(c.check_time(c.not_before - 1), Err(VerifyError::CertificateNotYetValid { .. })));
        assert!(matches!(c.check_time(c.not_after + 1), Err(VerifyError::CertificateExpired { .. })));
    }

    #[test]
    fn anchor_rejects_garbage() {
        assert_eq!(TrustAnchor::from_pem(b"nope"), Err(AnchorError::Pem));
        assert_eq!(TrustAnchor::from_der(b"\x30\x03\x02\x01\x01"), Err(AnchorError::Certificate));
    }
}
