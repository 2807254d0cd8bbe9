//! The one small crypto interface keygate uses, with two interchangeable backends:
//! aws-lc-rs (default; faster P-384, FIPS-capable) and RustCrypto (pure Rust).
//!
//! Both must agree on every input; the test suites run every check on both.

use std::fmt;

/// A P-384 public key as an uncompressed SEC1 point (`04 || x || y`, 97 bytes).
pub const P384_POINT_LEN: usize = 97;
/// A raw ECDSA P-384 signature `r || s`.
pub const P384_SIG_LEN: usize = 96;

/// Why a cryptographic operation failed. Deliberately carries no detail: the caller knows
/// which check it was doing and reports that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The public key is not a valid P-384 point.
    #[error("not a valid P-384 public key")]
    BadPublicKey,
    /// The signature is malformed or does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Authenticated decryption failed.
    #[error("decryption failed")]
    Decrypt,
    /// A key derivation was asked for more than it can produce.
    #[error("key derivation failed")]
    Kdf,
}

/// Cryptographic primitives needed by verification and key release.
pub trait Crypto: Send + Sync + fmt::Debug {
    /// A short name for logs and benchmark tables.
    fn name(&self) -> &'static str;

    /// ECDSA P-384 with SHA-384 over `msg`, signature as raw `r || s` (COSE form).
    fn verify_p384_sha384_fixed(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError>;

    /// ECDSA P-384 with SHA-384 over `msg`, signature as DER `Ecdsa-Sig-Value` (X.509 form).
    fn verify_p384_sha384_der(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError>;

    /// Checks that `point` is a valid uncompressed P-384 public key (on the curve, not identity).
    fn validate_p384_point(&self, point: &[u8]) -> Result<(), CryptoError>;
}

/// The pure-Rust backend (RustCrypto `p384`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RustCrypto;

impl RustCrypto {
    fn key(point: &[u8]) -> Result<p384::ecdsa::VerifyingKey, CryptoError> {
        if point.len() != P384_POINT_LEN || point[0] != 0x04 {
            return Err(CryptoError::BadPublicKey);
        }
        p384::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| CryptoError::BadPublicKey)
    }
}

impl Crypto for RustCrypto {
    fn name(&self) -> &'static str {
        "rustcrypto"
    }

    fn verify_p384_sha384_fixed(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        use p384::ecdsa::signature::Verifier;
        let key = Self::key(point)?;
        let sig = p384::ecdsa::Signature::from_slice(sig).map_err(|_| CryptoError::BadSignature)?;
        key.verify(msg, &sig).map_err(|_| CryptoError::BadSignature)
    }

    fn verify_p384_sha384_der(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        use p384::ecdsa::signature::Verifier;
        let key = Self::key(point)?;
        let sig = p384::ecdsa::DerSignature::from_bytes(sig).map_err(|_| CryptoError::BadSignature)?;
        key.verify(msg, &sig).map_err(|_| CryptoError::BadSignature)
    }

    fn validate_p384_point(&self, point: &[u8]) -> Result<(), CryptoError> {
        Self::key(point).map(|_| ())
    }
}

/// The aws-lc-rs backend.
#[cfg(feature = "aws-lc")]
#[derive(Debug, Clone, Copy, Default)]
pub struct AwsLc;

#[cfg(feature = "aws-lc")]
impl AwsLc {
    fn verify(
        alg: &'static aws_lc_rs::signature::EcdsaVerificationAlgorithm,
        point: &[u8],
        msg: &[u8],
        sig: &[u8],
    ) -> Result<(), CryptoError> {
        if point.len() != P384_POINT_LEN || point[0] != 0x04 {
            return Err(CryptoError::BadPublicKey);
        }
        aws_lc_rs::signature::UnparsedPublicKey::new(alg, point).verify(msg, sig).map_err(|_| CryptoError::BadSignature)
    }
}

#[cfg(feature = "aws-lc")]
impl Crypto for AwsLc {
    fn name(&self) -> &'static str {
        "aws-lc-rs"
    }

    fn verify_p384_sha384_fixed(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        if sig.len() != P384_SIG_LEN {
            return Err(CryptoError::BadSignature);
        }
        Self::verify(&aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED, point, msg, sig)
    }

    fn verify_p384_sha384_der(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        Self::verify(&aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1, point, msg, sig)
    }

    fn validate_p384_point(&self, point: &[u8]) -> Result<(), CryptoError> {
        if point.len() != P384_POINT_LEN || point[0] != 0x04 {
            return Err(CryptoError::BadPublicKey);
        }
        // aws-lc validates the point when parsing it as an ECDH peer key.
        let unparsed = aws_lc_rs::agreement::UnparsedPublicKey::new(&aws_lc_rs::agreement::ECDH_P384, point);
        aws_lc_rs::agreement::ParsedPublicKey::try_from(&unparsed).map(|_| ()).map_err(|_| CryptoError::BadPublicKey)
    }
}

/// The default backend: aws-lc-rs when built with it, RustCrypto otherwise.
pub fn default_backend() -> &'static dyn Crypto {
    #[cfg(feature = "aws-lc")]
    {
        &AwsLc
    }
    #[cfg(not(feature = "aws-lc"))]
    {
        &RustCrypto
    }
}

/// Every backend compiled into this build (for tests and benchmarks).
pub fn all_backends() -> Vec<&'static dyn Crypto> {
    let mut v: Vec<&'static dyn Crypto> = vec![&RustCrypto];
    #[cfg(feature = "aws-lc")]
    v.push(&AwsLc);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use p384::ecdsa::signature::Signer;

    fn key_and_sig(msg: &[u8]) -> (Vec<u8>, p384::ecdsa::Signature) {
        let sk = p384::ecdsa::SigningKey::from_slice(&[7u8; 48]).expect("key");
        let point = sk.verifying_key().to_encoded_point(false).as_bytes().to_vec();
        (point, sk.sign(msg))
    }

    #[test]
    fn backends_agree_on_valid_and_invalid() {
        let msg = b"keygate";
        let (point, sig) = key_and_sig(msg);
        let fixed = sig.to_bytes().to_vec();
        let der = sig.to_der().as_bytes().to_vec();
        for b in all_backends() {
            assert_eq!(b.verify_p384_sha384_fixed(&point, msg, &fixed), Ok(()), "{}", b.name());
            assert_eq!(b.verify_p384_sha384_der(&point, msg, &der), Ok(()), "{}", b.name());
            assert_eq!(b.verify_p384_sha384_fixed(&point, b"other", &fixed), Err(CryptoError::BadSignature));
            assert_eq!(b.verify_p384_sha384_der(&point, b"other", &der), Err(CryptoError::BadSignature));
            assert_eq!(b.verify_p384_sha384_fixed(&point, msg, &fixed[..95]), Err(CryptoError::BadSignature));
            assert_eq!(b.verify_p384_sha384_der(&point, msg, &fixed), Err(CryptoError::BadSignature));
            let mut bad_point = point.clone();
            bad_point[50] ^= 1;
            assert_eq!(b.validate_p384_point(&bad_point), Err(CryptoError::BadPublicKey), "{}", b.name());
            assert!(b.verify_p384_sha384_fixed(&bad_point, msg, &fixed).is_err());
            assert_eq!(b.validate_p384_point(&point), Ok(()));
            assert_eq!(b.validate_p384_point(&point[..96]), Err(CryptoError::BadPublicKey));
        }
    }
}
