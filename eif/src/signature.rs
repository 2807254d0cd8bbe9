//! Signed images: the signing certificate (PCR8), the signature section and its
//! COSE_Sign1 ES384 PCR signatures, as AWS's image-format crate writes them.
//!
//! The signature section is CBOR: an array of `{ "signing_certificate": [u8...],
//! "signature": [u8...] }` maps, where both byte strings are encoded the way
//! serde_cbor encodes a `Vec<u8>` — as *arrays of small integers*, not CBOR byte
//! strings. `signing_certificate` is the certificate file exactly as given (PEM);
//! `signature` is an untagged COSE_Sign1 whose protected header is `{1: -35}`
//! (ES384), whose unprotected header is empty and whose payload is the CBOR map
//! `{ "register_index": 0, "register_value": [PCR0 bytes as integers] }`.
//!
//! Parsing checks structure only; [`PcrSignature::verify`] does the cryptography,
//! the payload comparison and the certificate validity window, with the time
//! passed in by the caller.

use ciborium::value::Value;
use p384::ecdsa::signature::{Signer as _, Verifier as _};
use p384::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
use zeroize::Zeroize;

use crate::error::{CborError, EifError};
use crate::pcr::{pcr8_from_certificate_der, PCR_LEN};
use crate::Measurements;

/// COSE algorithm identifier for ECDSA P-384 with SHA-384.
const COSE_ES384: i128 = -35;
/// COSE header label of `alg`.
const COSE_HEADER_ALG: i128 = 1;
/// Length of a raw `r || s` P-384 signature.
const SIGNATURE_LEN: usize = 96;
/// At most this many PCR signatures are accepted in one section (AWS writes one).
pub const MAX_PCR_SIGNATURES: usize = 32;
/// At most this many PEM blocks are examined when looking for a certificate or key.
const MAX_PEM_BLOCKS: usize = 64;

/// One entry of the signature section, as serde_cbor writes it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PcrSignatureWire {
    signing_certificate: Vec<u8>,
    signature: Vec<u8>,
}

/// The signed payload: which PCR, and its value.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PcrInfoWire {
    register_index: i32,
    register_value: Vec<u8>,
}

/// A signing certificate: the bytes as stored in the image (the whole PEM file) and
/// the DER of its first certificate, which is what PCR8 measures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningCertificate {
    pem: Vec<u8>,
    der: Vec<u8>,
    subject: String,
    issuer: String,
    not_before: i64,
    not_after: i64,
}

impl SigningCertificate {
    /// Parse a PEM file: its first `CERTIFICATE` block must be a well-formed X.509
    /// certificate (as `openssl::X509::from_pem`, which AWS's tools use, requires).
    pub fn from_pem(pem: Vec<u8>) -> Result<Self, EifError> {
        let der = first_pem_block(&pem, &["CERTIFICATE", "X509 CERTIFICATE"])
            .map_err(|reason| EifError::CertificatePem { reason })?;
        let (rest, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| EifError::CertificateDer { reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(EifError::CertificateDer { reason: "trailing bytes after the certificate".to_owned() });
        }
        let subject = cert.subject().to_string();
        let issuer = cert.issuer().to_string();
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        Ok(SigningCertificate { pem, der, subject, issuer, not_before, not_after })
    }

    /// The certificate file as stored in the image.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }
    /// DER of the certificate.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
    /// Subject distinguished name.
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// Issuer distinguished name.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// Start of validity, Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }
    /// End of validity, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
    /// PCR8 of an image signed with this certificate.
    pub fn pcr8(&self) -> [u8; PCR_LEN] {
        pcr8_from_certificate_der(&self.der)
    }

    /// The certificate's public key, which must be ECDSA P-384.
    fn verifying_key(&self) -> Result<VerifyingKey, EifError> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.der)
            .map_err(|e| EifError::CertificateDer { reason: e.to_string() })?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
            return Err(EifError::UnsupportedCertificateKey);
        }
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        if curve.as_ref() != Some(&OID_NIST_EC_P384) {
            return Err(EifError::UnsupportedCertificateKey);
        }
        VerifyingKey::from_sec1_bytes(&spki.subject_public_key.data).map_err(|_| EifError::UnsupportedCertificateKey)
    }
}

/// PCR8 for a PEM certificate file, as `nitro-cli pcr --signing-certificate` computes it.
pub fn pcr8_from_certificate_pem(pem: &[u8]) -> Result<[u8; PCR_LEN], EifError> {
    Ok(SigningCertificate::from_pem(pem.to_vec())?.pcr8())
}

/// The DER contents of the first PEM block whose label is one of `labels`.
fn first_pem_block(pem: &[u8], labels: &[&str]) -> Result<Vec<u8>, &'static str> {
    let mut last_error = "no PEM block with the expected label";
    for block in x509_parser::pem::Pem::iter_from_buffer(pem).take(MAX_PEM_BLOCKS) {
        match block {
            Ok(mut block) => {
                if labels.contains(&block.label.as_str()) {
                    return Ok(std::mem::take(&mut block.contents));
                }
                block.contents.zeroize();
            }
            Err(_) => last_error = "a PEM block could not be decoded",
        }
    }
    Err(last_error)
}

/// A P-384 private key and the certificate it signs for.
pub struct Signer {
    certificate: SigningCertificate,
    key: SigningKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("certificate", &self.certificate.subject).field("key", &"<redacted>").finish()
    }
}

impl Signer {
    /// A signer from a PEM certificate file and a PEM private key (SEC1 `EC PRIVATE
    /// KEY` or PKCS#8 `PRIVATE KEY`, unencrypted), as `eif_build --signing-certificate
    /// --private-key` takes them. The key must belong to the certificate.
    pub fn from_pem(certificate_pem: Vec<u8>, key_pem: &[u8]) -> Result<Self, EifError> {
        let certificate = SigningCertificate::from_pem(certificate_pem)?;
        let public = certificate.verifying_key()?;
        let key = parse_private_key(key_pem)?;
        if key.verifying_key() != &public {
            return Err(EifError::KeyCertificateMismatch);
        }
        Ok(Signer { certificate, key })
    }

    /// The signing certificate.
    pub fn certificate(&self) -> &SigningCertificate {
        &self.certificate
    }

    /// The signature section for an image whose PCR0 is `pcr0`: one COSE_Sign1 over
    /// `{register_index: 0, register_value: PCR0}`. ECDSA nonces are derived as in
    /// RFC 6979, so the same key and image always give the same bytes.
    pub(crate) fn signature_section(&self, pcr0: &[u8; PCR_LEN]) -> Result<Vec<u8>, EifError> {
        let payload = to_cbor(&PcrInfoWire { register_index: 0, register_value: pcr0.to_vec() })?;
        let protected = to_cbor(&Value::Map(vec![(Value::Integer(1.into()), Value::Integer((-35).into()))]))?;
        let to_sign = sig_structure(&protected, &payload)?;
        let signature: Signature = self.key.sign(&to_sign);
        let cose = to_cbor(&Value::Array(vec![
            Value::Bytes(protected),
            Value::Map(Vec::new()),
            Value::Bytes(payload),
            Value::Bytes(signature.to_bytes().to_vec()),
        ]))?;
        to_cbor(&vec![PcrSignatureWire { signing_certificate: self.certificate.pem.clone(), signature: cose }])
    }
}

fn parse_private_key(pem: &[u8]) -> Result<SigningKey, EifError> {
    use p384::pkcs8::DecodePrivateKey;
    let mut found = None;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem).take(MAX_PEM_BLOCKS) {
        let Ok(mut block) = block else { continue };
        let parsed = match block.label.as_str() {
            "EC PRIVATE KEY" => Some(
                p384::SecretKey::from_sec1_der(&block.contents)
                    .map_err(|_| EifError::PrivateKey { reason: "not a SEC1 P-384 private key" }),
            ),
            "PRIVATE KEY" => Some(
                p384::SecretKey::from_pkcs8_der(&block.contents)
                    .map_err(|_| EifError::PrivateKey { reason: "not a PKCS#8 P-384 private key" }),
            ),
            "ENCRYPTED PRIVATE KEY" => {
                Some(Err(EifError::PrivateKey { reason: "encrypted private keys are not supported" }))
            }
            _ => None,
        };
        block.contents.zeroize();
        if let Some(parsed) = parsed {
            found = Some(parsed);
            break;
        }
    }
    let secret = found.ok_or(EifError::PrivateKey { reason: "no EC PRIVATE KEY or PRIVATE KEY PEM block" })??;
    Ok(SigningKey::from(secret))
}

/// One parsed PCR signature from an image's signature section.
#[derive(Clone, Debug)]
pub struct PcrSignature {
    certificate: SigningCertificate,
    protected: Vec<u8>,
    payload: Vec<u8>,
    register_index: i32,
    register_value: Vec<u8>,
    signature: Signature,
}

impl PcrSignature {
    /// The certificate stored with this signature.
    pub fn certificate(&self) -> &SigningCertificate {
        &self.certificate
    }
    /// The PCR index the signature names.
    pub fn register_index(&self) -> i32 {
        self.register_index
    }
    /// The PCR value the signature names.
    pub fn register_value(&self) -> &[u8] {
        &self.register_value
    }

    /// Check this signature (entry `index` of the section) against the image's
    /// measurements at time `now` (Unix seconds): the ECDSA signature verifies with
    /// the certificate's P-384 key, the signed PCR is the image's, and the
    /// certificate is valid at `now` — what nitro-cli checks before it runs a signed image.
    pub fn verify(&self, index: usize, measurements: &Measurements, now: i64) -> Result<(), EifError> {
        let key = self.certificate.verifying_key()?;
        let to_verify = sig_structure(&self.protected, &self.payload)?;
        key.verify(&to_verify, &self.signature).map_err(|_| EifError::BadSignature { index })?;
        let expected: Option<&[u8; PCR_LEN]> = match self.register_index {
            0 => Some(&measurements.pcr0),
            1 => Some(&measurements.pcr1),
            2 => Some(&measurements.pcr2),
            _ => None,
        };
        if expected.map(|e| e.as_slice()) != Some(self.register_value.as_slice()) {
            return Err(EifError::SignedPcrMismatch { index, register: i64::from(self.register_index) });
        }
        if now < self.certificate.not_before || now > self.certificate.not_after {
            return Err(EifError::CertificateNotValidNow {
                now,
                not_before: self.certificate.not_before,
                not_after: self.certificate.not_after,
            });
        }
        Ok(())
    }
}

/// Parse a signature section (already bounded in size by the reader).
pub(crate) fn parse_signature_section(bytes: &[u8]) -> Result<Vec<PcrSignature>, EifError> {
    let entries: Vec<PcrSignatureWire> =
        from_cbor_exact(bytes).map_err(|source| EifError::InvalidSignatureSection { source })?;
    if entries.is_empty() {
        return Err(EifError::EmptySignatureSection);
    }
    if entries.len() > MAX_PCR_SIGNATURES {
        return Err(EifError::TooManySignatures { count: entries.len(), max: MAX_PCR_SIGNATURES });
    }
    entries
        .into_iter()
        .map(|e| {
            let certificate = SigningCertificate::from_pem(e.signing_certificate)?;
            parse_cose_sign1(certificate, &e.signature)
        })
        .collect()
}

fn parse_cose_sign1(certificate: SigningCertificate, bytes: &[u8]) -> Result<PcrSignature, EifError> {
    let malformed = |reason| EifError::MalformedCose { reason };
    let value: Value = from_cbor_exact(bytes).map_err(|_| malformed("not a CBOR item"))?;
    let value = match value {
        Value::Tag(18, inner) => *inner,
        Value::Tag(..) => return Err(malformed("tagged, but not with tag 18")),
        other => other,
    };
    let Value::Array(items) = value else {
        return Err(malformed("not an array"));
    };
    let Ok([protected, unprotected, payload, signature]) = <[Value; 4]>::try_from(items) else {
        return Err(malformed("not an array of four items"));
    };
    let Value::Bytes(protected) = protected else {
        return Err(malformed("protected header is not a byte string"));
    };
    let Value::Map(_) = unprotected else {
        return Err(malformed("unprotected header is not a map"));
    };
    let Value::Bytes(payload) = payload else {
        return Err(malformed("payload is not a byte string"));
    };
    let Value::Bytes(signature) = signature else {
        return Err(malformed("signature is not a byte string"));
    };

    let header: Value = from_cbor_exact(&protected).map_err(|_| malformed("protected header is not CBOR"))?;
    let Value::Map(header) = header else {
        return Err(malformed("protected header is not a map"));
    };
    let mut alg = None;
    for (k, v) in &header {
        if let Value::Integer(k) = k {
            if i128::from(*k) == COSE_HEADER_ALG {
                if alg.is_some() {
                    return Err(malformed("duplicate alg in the protected header"));
                }
                alg = Some(v);
            }
        }
    }
    match alg {
        Some(Value::Integer(a)) if i128::from(*a) == COSE_ES384 => {}
        _ => return Err(EifError::UnsupportedCoseAlgorithm),
    }
    if signature.len() != SIGNATURE_LEN {
        return Err(malformed("signature is not 96 bytes"));
    }
    let signature = Signature::from_slice(&signature).map_err(|_| malformed("signature scalars out of range"))?;
    let info: PcrInfoWire = from_cbor_exact(&payload).map_err(|source| EifError::InvalidPcrPayload { source })?;
    Ok(PcrSignature {
        certificate,
        protected,
        payload,
        register_index: info.register_index,
        register_value: info.register_value,
        signature,
    })
}

/// `Sig_structure` for COSE_Sign1 (RFC 9052 §4.4) with empty external AAD.
fn sig_structure(protected: &[u8], payload: &[u8]) -> Result<Vec<u8>, EifError> {
    to_cbor(&Value::Array(vec![
        Value::Text("Signature1".to_owned()),
        Value::Bytes(protected.to_vec()),
        Value::Bytes(Vec::new()),
        Value::Bytes(payload.to_vec()),
    ]))
}

fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, EifError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out)
        .map_err(|e| EifError::InvalidSignatureSection { source: CborError::Encode(e) })?;
    Ok(out)
}

/// Decode exactly one CBOR item that fills `bytes`.
fn from_cbor_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CborError> {
    let mut rest = bytes;
    let value = ciborium::from_reader(&mut rest)?;
    if !rest.is_empty() {
        return Err(CborError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const CERT: &[u8] = include_bytes!("../testdata/signing-cert.pem");
    pub(crate) const KEY: &[u8] = include_bytes!("../testdata/signing-key.pem");
    const OTHER_KEY: &[u8] = include_bytes!("../testdata/other-key.pem");
    const P256_CERT: &[u8] = include_bytes!("../testdata/p256-cert.pem");
    const P256_KEY: &[u8] = include_bytes!("../testdata/p256-key.pem");
    /// A time inside the fixture certificate's validity (2030-01-01).
    pub(crate) const NOW: i64 = 1_893_456_000;

    pub(crate) fn signer() -> Signer {
        Signer::from_pem(CERT.to_vec(), KEY).expect("fixture signer")
    }

    fn measurements(pcr0: [u8; 48]) -> Measurements {
        Measurements { pcr0, pcr1: [1; 48], pcr2: [2; 48], pcr8: None }
    }

    #[test]
    fn section_encodes_bytes_as_integer_arrays_like_serde_cbor() {
        let section = signer().signature_section(&[0xff; 48]).expect("sign");
        // array(1), map(2), text(19) "signing_certificate", array(len of PEM)
        assert_eq!(section[0], 0x81);
        assert_eq!(section[1], 0xa2);
        assert_eq!(section[2], 0x73);
        assert_eq!(&section[3..22], b"signing_certificate");
        assert_eq!(section[22] >> 5, 4, "certificate must be a CBOR array");
    }

    #[test]
    fn sign_then_parse_then_verify() {
        let pcr0 = [7u8; 48];
        let section = signer().signature_section(&pcr0).expect("sign");
        let sigs = parse_signature_section(&section).expect("parse");
        assert_eq!(sigs.len(), 1);
        assert_eq!(sigs[0].register_index(), 0);
        assert_eq!(sigs[0].register_value(), &pcr0);
        sigs[0].verify(0, &measurements(pcr0), NOW).expect("verify");
        // Signing is deterministic (RFC 6979).
        assert_eq!(section, signer().signature_section(&pcr0).expect("sign"));
    }

    #[test]
    fn verify_rejects_other_pcr_and_time_outside_validity() {
        let section = signer().signature_section(&[7u8; 48]).expect("sign");
        let sig = &parse_signature_section(&section).expect("parse")[0];
        assert!(matches!(
            sig.verify(0, &measurements([8u8; 48]), NOW),
            Err(EifError::SignedPcrMismatch { index: 0, register: 0 })
        ));
        assert!(matches!(
            sig.verify(0, &measurements([7u8; 48]), 0),
            Err(EifError::CertificateNotValidNow { now: 0, .. })
        ));
    }

    #[test]
    fn verify_rejects_a_tampered_signature() {
        let section = signer().signature_section(&[7u8; 48]).expect("sign");
        let sig = &parse_signature_section(&section).expect("parse")[0];
        let mut bad = sig.clone();
        bad.payload.push(0);
        assert!(matches!(bad.verify(3, &measurements([7u8; 48]), NOW), Err(EifError::BadSignature { index: 3 })));
    }

    #[test]
    fn key_must_match_certificate_and_be_p384() {
        assert!(matches!(Signer::from_pem(CERT.to_vec(), OTHER_KEY), Err(EifError::KeyCertificateMismatch)));
        assert!(matches!(Signer::from_pem(P256_CERT.to_vec(), P256_KEY), Err(EifError::UnsupportedCertificateKey)));
        assert!(matches!(Signer::from_pem(CERT.to_vec(), P256_KEY), Err(EifError::PrivateKey { .. })));
        assert!(matches!(Signer::from_pem(b"junk".to_vec(), KEY), Err(EifError::CertificatePem { .. })));
    }

    #[test]
    fn pcr8_is_the_extend_of_the_certificate_der() {
        let cert = SigningCertificate::from_pem(CERT.to_vec()).expect("cert");
        assert_eq!(pcr8_from_certificate_pem(CERT).expect("pcr8"), pcr8_from_certificate_der(cert.der()));
        // Text around the PEM block does not change PCR8.
        let mut noisy = b"Certificate:\n  some text\n".to_vec();
        noisy.extend_from_slice(CERT);
        assert_eq!(pcr8_from_certificate_pem(&noisy).expect("pcr8"), cert.pcr8());
    }

    #[test]
    fn malformed_sections_get_their_own_errors() {
        assert!(matches!(parse_signature_section(&[0x80]), Err(EifError::EmptySignatureSection)));
        assert!(matches!(
            parse_signature_section(&[0xff]),
            Err(EifError::InvalidSignatureSection { source: CborError::Decode(_) })
        ));
        let mut good = signer().signature_section(&[7u8; 48]).expect("sign");
        good.push(0);
        let trailing = parse_signature_section(&good).expect_err("trailing byte");
        assert_eq!(trailing.to_string(), "invalid signature section: 1 trailing bytes after the CBOR item");
        assert!(matches!(trailing, EifError::InvalidSignatureSection { source: CborError::TrailingBytes(1) }));
        let cert = SigningCertificate::from_pem(CERT.to_vec()).expect("cert");
        assert!(matches!(
            parse_cose_sign1(cert.clone(), &[0x83, 0x40, 0xa0, 0x40]),
            Err(EifError::MalformedCose { .. })
        ));
        // alg = ES256 (-7) instead of ES384.
        let protected =
            to_cbor(&Value::Map(vec![(Value::Integer(1.into()), Value::Integer((-7).into()))])).expect("cbor");
        let cose = to_cbor(&Value::Array(vec![
            Value::Bytes(protected),
            Value::Map(vec![]),
            Value::Bytes(vec![]),
            Value::Bytes(vec![1; 96]),
        ]))
        .expect("cbor");
        assert!(matches!(parse_cose_sign1(cert, &cose), Err(EifError::UnsupportedCoseAlgorithm)));
    }
}
