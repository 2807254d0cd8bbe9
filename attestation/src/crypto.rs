//! The one small crypto interface keygate uses, with two interchangeable backends:
//! aws-lc-rs (default; faster P-384, FIPS-capable) and RustCrypto (pure Rust).
//!
//! Both must agree on every input; the test suites run every check on both.

use std::fmt;

use crate::secret::{Secret, SecretVec};

/// A P-384 private scalar.
pub type P384Scalar = Secret<48>;
/// An ECDH P-384 shared secret (the x-coordinate).
pub type SharedSecret = Secret<48>;
/// An AES-256-GCM key.
pub type AeadKey = Secret<32>;
/// An AES-256-GCM nonce (96 bits).
pub type AeadNonce = [u8; 12];

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
    /// A signature could not be made (the backend's random source failed).
    #[error("signing failed")]
    Sign,
}

/// What every backend operation returns.
pub type CryptoResult<T> = Result<T, CryptoError>;

/// A P-384 signing key, made once from a scalar by a backend ([`Crypto::p384_signing_key`]) and
/// used for many signatures; it zeroizes (or has its backend free) the scalar when dropped.
pub trait P384SigningKey: Send + Sync {
    /// ECDSA P-384 with SHA-384 over `msg`, signature as raw `r || s`.
    fn sign(&self, msg: &[u8]) -> CryptoResult<[u8; P384_SIG_LEN]>;
}

/// Cryptographic primitives needed by verification and key release.
pub trait Crypto: Send + Sync + fmt::Debug {
    /// A short name for logs and benchmark tables.
    fn name(&self) -> &'static str;

    /// ECDSA P-384 with SHA-384 over `msg`, signature as raw `r || s` (COSE form).
    fn verify_p384_sha384_fixed(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> CryptoResult<()>;

    /// ECDSA P-384 with SHA-384 over `msg`, signature as DER `Ecdsa-Sig-Value` (X.509 form).
    fn verify_p384_sha384_der(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> CryptoResult<()>;

    /// Checks that `point` is a valid uncompressed P-384 public key (on the curve, not identity).
    fn validate_p384_point(&self, point: &[u8]) -> CryptoResult<()>;

    /// The uncompressed public point of a private scalar (refused if zero or ≥ n).
    fn p384_public(&self, scalar: &P384Scalar) -> CryptoResult<Vec<u8>>;

    /// ECDH P-384: the x-coordinate of `scalar · peer`.
    fn ecdh_p384(&self, scalar: &P384Scalar, peer: &[u8]) -> CryptoResult<SharedSecret>;

    /// A signing key for `scalar` (refused if zero or ≥ n), to sign many messages.
    fn p384_signing_key(&self, scalar: &P384Scalar) -> CryptoResult<Box<dyn P384SigningKey>>;

    /// HKDF-SHA384 (RFC 5869): fills `out` (at most 255 × 48 bytes).
    fn hkdf_sha384(&self, salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> CryptoResult<()>;

    /// AES-256-GCM encryption; returns ciphertext ‖ 16-byte tag.
    fn aes256gcm_seal(&self, key: &AeadKey, nonce: &AeadNonce, aad: &[u8], plaintext: &[u8]) -> CryptoResult<Vec<u8>>;

    /// AES-256-GCM decryption of ciphertext ‖ tag.
    fn aes256gcm_open(&self, key: &AeadKey, nonce: &AeadNonce, aad: &[u8], sealed: &[u8]) -> CryptoResult<SecretVec>;
}

/// Refuses anything but an uncompressed SEC1 point of P-384's length before a backend parses
/// it: the backends' own parsers differ in what else they would accept.
fn uncompressed_point(point: &[u8]) -> CryptoResult<()> {
    if point.len() == P384_POINT_LEN && point.first() == Some(&0x04) {
        Ok(())
    } else {
        Err(CryptoError::BadPublicKey)
    }
}

/// Derives a P-384 private scalar from random bytes drawn by `fill` (rejection sampling:
/// a 48-byte string that is zero or ≥ n is drawn again; the chance is below 2^-190).
pub fn p384_scalar_from(crypto: &dyn Crypto, mut fill: impl FnMut(&mut [u8])) -> CryptoResult<(P384Scalar, Vec<u8>)> {
    for _ in 0..8 {
        let scalar = Secret::generate(&mut fill);
        if let Ok(public) = crypto.p384_public(&scalar) {
            return Ok((scalar, public));
        }
    }
    Err(CryptoError::BadPublicKey)
}

/// The pure-Rust backend (RustCrypto `p384`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RustCrypto;

impl RustCrypto {
    fn key(point: &[u8]) -> CryptoResult<p384::ecdsa::VerifyingKey> {
        uncompressed_point(point)?;
        p384::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| CryptoError::BadPublicKey)
    }
}

/// RFC 6979 deterministic ECDSA; the ecdsa crate zeroizes the scalar on drop.
struct RustCryptoSigningKey(p384::ecdsa::SigningKey);

impl P384SigningKey for RustCryptoSigningKey {
    fn sign(&self, msg: &[u8]) -> CryptoResult<[u8; P384_SIG_LEN]> {
        use p384::ecdsa::signature::Signer;
        let sig: p384::ecdsa::Signature = self.0.sign(msg);
        sig.to_bytes()[..].try_into().map_err(|_| CryptoError::Sign)
    }
}

impl Crypto for RustCrypto {
    fn name(&self) -> &'static str {
        "rustcrypto"
    }

    fn verify_p384_sha384_fixed(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> CryptoResult<()> {
        use p384::ecdsa::signature::Verifier;
        let key = Self::key(point)?;
        let sig = p384::ecdsa::Signature::from_slice(sig).map_err(|_| CryptoError::BadSignature)?;
        key.verify(msg, &sig).map_err(|_| CryptoError::BadSignature)
    }

    fn verify_p384_sha384_der(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> CryptoResult<()> {
        use p384::ecdsa::signature::Verifier;
        let key = Self::key(point)?;
        let sig = p384::ecdsa::DerSignature::from_bytes(sig).map_err(|_| CryptoError::BadSignature)?;
        key.verify(msg, &sig).map_err(|_| CryptoError::BadSignature)
    }

    fn validate_p384_point(&self, point: &[u8]) -> CryptoResult<()> {
        Self::key(point).map(|_| ())
    }

    fn p384_public(&self, scalar: &P384Scalar) -> CryptoResult<Vec<u8>> {
        let sk = p384::SecretKey::from_slice(scalar.expose()).map_err(|_| CryptoError::BadPublicKey)?;
        use p384::elliptic_curve::sec1::ToEncodedPoint as _;
        Ok(sk.public_key().to_encoded_point(false).as_bytes().to_vec())
    }

    fn p384_signing_key(&self, scalar: &P384Scalar) -> CryptoResult<Box<dyn P384SigningKey>> {
        let key = p384::ecdsa::SigningKey::from_slice(scalar.expose()).map_err(|_| CryptoError::BadPublicKey)?;
        Ok(Box::new(RustCryptoSigningKey(key)))
    }

    fn ecdh_p384(&self, scalar: &P384Scalar, peer: &[u8]) -> CryptoResult<SharedSecret> {
        let _ = Self::key(peer)?;
        let sk = p384::SecretKey::from_slice(scalar.expose()).map_err(|_| CryptoError::BadPublicKey)?;
        let pk = p384::PublicKey::from_sec1_bytes(peer).map_err(|_| CryptoError::BadPublicKey)?;
        let shared = p384::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine());
        Secret::from_slice(&shared.raw_secret_bytes()[..]).ok_or(CryptoError::BadPublicKey)
    }

    fn hkdf_sha384(&self, salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> CryptoResult<()> {
        hkdf::Hkdf::<sha2::Sha384>::new(Some(salt), ikm).expand(info, out).map_err(|_| CryptoError::Kdf)
    }

    fn aes256gcm_seal(&self, key: &AeadKey, nonce: &AeadNonce, aad: &[u8], plaintext: &[u8]) -> CryptoResult<Vec<u8>> {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(key.expose()).map_err(|_| CryptoError::Kdf)?;
        cipher.encrypt(&aes_gcm::Nonce::from(*nonce), Payload { msg: plaintext, aad }).map_err(|_| CryptoError::Kdf)
    }

    fn aes256gcm_open(&self, key: &AeadKey, nonce: &AeadNonce, aad: &[u8], sealed: &[u8]) -> CryptoResult<SecretVec> {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(key.expose()).map_err(|_| CryptoError::Decrypt)?;
        cipher
            .decrypt(&aes_gcm::Nonce::from(*nonce), Payload { msg: sealed, aad })
            .map(SecretVec::new)
            .map_err(|_| CryptoError::Decrypt)
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
    ) -> CryptoResult<()> {
        uncompressed_point(point)?;
        aws_lc_rs::signature::UnparsedPublicKey::new(alg, point).verify(msg, sig).map_err(|_| CryptoError::BadSignature)
    }
}

/// ECDSA with nonces from the system's random source; aws-lc clears the key when it frees it.
#[cfg(feature = "aws-lc")]
struct AwsLcSigningKey(aws_lc_rs::signature::EcdsaKeyPair);

#[cfg(feature = "aws-lc")]
impl P384SigningKey for AwsLcSigningKey {
    fn sign(&self, msg: &[u8]) -> CryptoResult<[u8; P384_SIG_LEN]> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self.0.sign(&rng, msg).map_err(|_| CryptoError::Sign)?;
        sig.as_ref().try_into().map_err(|_| CryptoError::Sign)
    }
}

#[cfg(feature = "aws-lc")]
impl Crypto for AwsLc {
    fn name(&self) -> &'static str {
        "aws-lc-rs"
    }

    fn verify_p384_sha384_fixed(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> CryptoResult<()> {
        if sig.len() != P384_SIG_LEN {
            return Err(CryptoError::BadSignature);
        }
        Self::verify(&aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED, point, msg, sig)
    }

    fn verify_p384_sha384_der(&self, point: &[u8], msg: &[u8], sig: &[u8]) -> CryptoResult<()> {
        Self::verify(&aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1, point, msg, sig)
    }

    fn validate_p384_point(&self, point: &[u8]) -> CryptoResult<()> {
        uncompressed_point(point)?;
        // aws-lc validates the point when parsing it as an ECDH peer key.
        let unparsed = aws_lc_rs::agreement::UnparsedPublicKey::new(&aws_lc_rs::agreement::ECDH_P384, point);
        aws_lc_rs::agreement::ParsedPublicKey::try_from(&unparsed).map(|_| ()).map_err(|_| CryptoError::BadPublicKey)
    }

    fn p384_public(&self, scalar: &P384Scalar) -> CryptoResult<Vec<u8>> {
        use aws_lc_rs::agreement::{PrivateKey, ECDH_P384};
        let key = PrivateKey::from_private_key(&ECDH_P384, scalar.expose()).map_err(|_| CryptoError::BadPublicKey)?;
        key.compute_public_key().map(|p| p.as_ref().to_vec()).map_err(|_| CryptoError::BadPublicKey)
    }

    fn p384_signing_key(&self, scalar: &P384Scalar) -> CryptoResult<Box<dyn P384SigningKey>> {
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
        let public = self.p384_public(scalar)?;
        let key =
            EcdsaKeyPair::from_private_key_and_public_key(&ECDSA_P384_SHA384_FIXED_SIGNING, scalar.expose(), &public)
                .map_err(|_| CryptoError::BadPublicKey)?;
        Ok(Box::new(AwsLcSigningKey(key)))
    }

    fn ecdh_p384(&self, scalar: &P384Scalar, peer: &[u8]) -> CryptoResult<SharedSecret> {
        use aws_lc_rs::agreement::{agree, PrivateKey, UnparsedPublicKey, ECDH_P384};
        uncompressed_point(peer)?;
        let key = PrivateKey::from_private_key(&ECDH_P384, scalar.expose()).map_err(|_| CryptoError::BadPublicKey)?;
        agree(&key, UnparsedPublicKey::new(&ECDH_P384, peer), CryptoError::BadPublicKey, |x| {
            Secret::from_slice(x).ok_or(CryptoError::BadPublicKey)
        })
    }

    fn hkdf_sha384(&self, salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> CryptoResult<()> {
        use aws_lc_rs::hkdf::{KeyType, Salt, HKDF_SHA384};
        struct Len(usize);
        impl KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let info = [info];
        Salt::new(HKDF_SHA384, salt)
            .extract(ikm)
            .expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| CryptoError::Kdf)
    }

    fn aes256gcm_seal(&self, key: &AeadKey, nonce: &AeadNonce, aad: &[u8], plaintext: &[u8]) -> CryptoResult<Vec<u8>> {
        use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| CryptoError::Kdf)?);
        let mut buf = plaintext.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::Kdf)?;
        Ok(buf)
    }

    fn aes256gcm_open(&self, key: &AeadKey, nonce: &AeadNonce, aad: &[u8], sealed: &[u8]) -> CryptoResult<SecretVec> {
        use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| CryptoError::Decrypt)?);
        let mut buf = zeroize::Zeroizing::new(sealed.to_vec());
        let n = key
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::Decrypt)?
            .len();
        Ok(SecretVec::new(buf[..n].to_vec()))
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
    #[cfg_attr(not(feature = "aws-lc"), allow(unused_mut))]
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

    #[test]
    fn each_backend_signs_what_every_backend_verifies_and_refuses_a_bad_scalar() {
        let scalar = Secret::new([5u8; 48]);
        for signer in all_backends() {
            let point = signer.p384_public(&scalar).expect("public");
            let key = signer.p384_signing_key(&scalar).expect("signing key");
            let sig = key.sign(b"keygate").expect("sign");
            for verifier in all_backends() {
                assert!(verifier.verify_p384_sha384_fixed(&point, b"keygate", &sig).is_ok(), "{}", signer.name());
                assert!(verifier.verify_p384_sha384_fixed(&point, b"keygatf", &sig).is_err());
            }
            assert!(signer.p384_signing_key(&Secret::new([0u8; 48])).is_err(), "zero scalar");
            assert!(signer.p384_signing_key(&Secret::new([0xffu8; 48])).is_err(), "scalar ≥ n");
        }
    }

    #[test]
    fn backends_agree_on_ecdh_hkdf_and_aes_gcm() {
        let backends = all_backends();
        let a = Secret::new([3u8; 48]);
        let b = Secret::new([5u8; 48]);
        let mut results = Vec::new();
        for c in &backends {
            let pa = c.p384_public(&a).expect("pub a");
            let pb = c.p384_public(&b).expect("pub b");
            let s1 = c.ecdh_p384(&a, &pb).expect("ecdh");
            let s2 = c.ecdh_p384(&b, &pa).expect("ecdh");
            assert_eq!(s1, s2, "{}", c.name());
            let mut okm = [0u8; 44];
            c.hkdf_sha384(b"salt", s1.expose(), b"info", &mut okm).expect("hkdf");
            let key = Secret::<32>::from_slice(&okm[..32]).expect("key");
            let nonce: [u8; 12] = okm[32..].try_into().expect("nonce");
            let sealed = c.aes256gcm_seal(&key, &nonce, b"aad", b"plaintext").expect("seal");
            assert_eq!(c.aes256gcm_open(&key, &nonce, b"aad", &sealed).expect("open").expose(), b"plaintext");
            assert_eq!(c.aes256gcm_open(&key, &nonce, b"aaX", &sealed), Err(CryptoError::Decrypt));
            let mut bad = sealed.clone();
            bad[0] ^= 1;
            assert_eq!(c.aes256gcm_open(&key, &nonce, b"aad", &bad), Err(CryptoError::Decrypt));
            assert_eq!(c.aes256gcm_open(&key, &nonce, b"aad", &sealed[..15]), Err(CryptoError::Decrypt));
            let mut off_curve = pb.clone();
            off_curve[40] ^= 1;
            assert_eq!(c.ecdh_p384(&a, &off_curve), Err(CryptoError::BadPublicKey), "{}", c.name());
            assert_eq!(c.p384_public(&Secret::new([0u8; 48])), Err(CryptoError::BadPublicKey), "{}", c.name());
            assert_eq!(c.p384_public(&Secret::new([0xffu8; 48])), Err(CryptoError::BadPublicKey), "{}", c.name());
            results.push((pa, s1, sealed));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "backends disagree");
        // RFC 5869-style check against the `hkdf` crate for the aws-lc backend's output.
        let mut expect = [0u8; 42];
        hkdf::Hkdf::<sha2::Sha384>::new(Some(b"s"), b"ikm").expand(b"i", &mut expect).expect("hkdf");
        for c in &backends {
            let mut got = [0u8; 42];
            c.hkdf_sha384(b"s", b"ikm", b"i", &mut got).expect("hkdf");
            assert_eq!(got, expect, "{}", c.name());
        }
    }
}
