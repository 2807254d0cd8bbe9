//! COSE_Sign1 (RFC 9052) as Nitro uses it: ES384 only, attached payload, empty unprotected
//! header. The signature is checked over the payload bytes exactly as they arrived.

use crate::cbor::{self, Value};
use crate::crypto::P384_SIG_LEN;
use crate::error::VerifyError;

/// The CBOR tag for COSE_Sign1.
pub const COSE_SIGN1_TAG: u64 = 18;
/// COSE algorithm identifier for ES384.
pub const ES384: i128 = -35;
/// The largest input accepted as a whole document (payload limit plus envelope).
pub const MAX_DOCUMENT: usize = 20 * 1024;

/// The parts of a COSE_Sign1 envelope, borrowed from the input.
#[derive(Debug)]
pub struct Sign1<'a> {
    /// The protected header's serialized bytes, as received.
    pub protected: &'a [u8],
    /// The payload bytes, as received.
    pub payload: std::borrow::Cow<'a, [u8]>,
    /// The 96-byte `r || s` signature.
    pub signature: std::borrow::Cow<'a, [u8]>,
}

/// Parses a COSE_Sign1 envelope, tagged (18) or untagged.
pub fn parse(input: &[u8]) -> Result<Sign1<'_>, VerifyError> {
    if input.len() > MAX_DOCUMENT {
        return Err(VerifyError::DocumentTooLarge { len: input.len(), max: MAX_DOCUMENT });
    }
    let v = cbor::decode(input).map_err(VerifyError::EnvelopeCbor)?;
    let v = match v {
        Value::Tag(COSE_SIGN1_TAG, inner) => *inner,
        Value::Tag(t, _) => return Err(VerifyError::UnexpectedTag(t)),
        v => v,
    };
    let Value::Array(items) = v else {
        return Err(VerifyError::NotCoseSign1);
    };
    let Ok([protected, unprotected, payload, signature]) = <[Value<'_>; 4]>::try_from(items) else {
        return Err(VerifyError::NotCoseSign1);
    };

    // Protected header: a byte string serializing exactly {1: -35}.
    let Value::Bytes(std::borrow::Cow::Borrowed(protected)) = protected else {
        return Err(VerifyError::ProtectedHeader("not a definite-length byte string"));
    };
    check_protected(protected)?;

    match unprotected {
        Value::Map(m) if m.is_empty() => {}
        _ => return Err(VerifyError::UnprotectedHeaderNotEmpty),
    }
    let Value::Bytes(payload) = payload else {
        return Err(VerifyError::PayloadNotBytes);
    };
    let Value::Bytes(signature) = signature else {
        return Err(VerifyError::SignatureLength(0));
    };
    if signature.len() != P384_SIG_LEN {
        return Err(VerifyError::SignatureLength(signature.len()));
    }
    Ok(Sign1 { protected, payload, signature })
}

fn check_protected(protected: &[u8]) -> Result<(), VerifyError> {
    let header = cbor::decode(protected).map_err(|_| VerifyError::ProtectedHeader("not well-formed CBOR"))?;
    let Value::Map(pairs) = header else {
        return Err(VerifyError::ProtectedHeader("not a map"));
    };
    let mut alg = None;
    for (k, v) in &pairs {
        match k {
            Value::Unsigned(1) => {
                if alg.is_some() {
                    return Err(VerifyError::ProtectedHeader("duplicate alg"));
                }
                alg = Some(match v {
                    Value::Negative(n) => -1 - i128::from(*n),
                    Value::Unsigned(n) => i128::from(*n),
                    _ => return Err(VerifyError::ProtectedHeader("alg is not an integer")),
                });
            }
            _ => return Err(VerifyError::ProtectedHeader("fields other than alg")),
        }
    }
    match alg {
        None => Err(VerifyError::ProtectedHeader("no alg")),
        Some(ES384) => Ok(()),
        Some(other) => Err(VerifyError::UnsupportedAlgorithm(other)),
    }
}

/// The bytes that a COSE_Sign1 signature covers:
/// `["Signature1", protected, h'' (external_aad), payload]`.
pub fn sig_structure(protected: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + protected.len() + 32);
    cbor::encode_head(&mut out, 4, 4);
    cbor::encode_head(&mut out, 3, 10);
    out.extend_from_slice(b"Signature1");
    cbor::encode_bytes(&mut out, protected);
    cbor::encode_bytes(&mut out, &[]);
    cbor::encode_bytes(&mut out, payload);
    out
}

/// Serializes a COSE_Sign1 (untagged, as the NSM emits it) from its parts.
pub fn encode_sign1(protected: &[u8], payload: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 128);
    cbor::encode_head(&mut out, 4, 4);
    cbor::encode_bytes(&mut out, protected);
    cbor::encode_head(&mut out, 5, 0);
    cbor::encode_bytes(&mut out, payload);
    cbor::encode_bytes(&mut out, signature);
    out
}

/// The protected header that Nitro uses: `{1: -35}`.
pub const PROTECTED_ES384: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

#[cfg(test)]
mod tests {
    use super::*;

    fn with_protected(protected: &[u8]) -> Vec<u8> {
        encode_sign1(protected, b"payload", &[0u8; P384_SIG_LEN])
    }

    #[test]
    fn size_limit_is_inclusive() {
        let at_limit = vec![0x84; MAX_DOCUMENT];
        assert!(!matches!(parse(&at_limit), Err(VerifyError::DocumentTooLarge { .. })));
        let over = vec![0x84; MAX_DOCUMENT + 1];
        assert_eq!(
            parse(&over).map(|_| ()),
            Err(VerifyError::DocumentTooLarge { len: MAX_DOCUMENT + 1, max: MAX_DOCUMENT })
        );
    }

    #[test]
    fn algorithm_identifiers_of_either_sign_are_named() {
        // {1: 1} (A128GCM, a positive identifier) and {1: -7} (ES256).
        assert_eq!(parse(&with_protected(&[0xa1, 0x01, 0x01])).map(|_| ()), Err(VerifyError::UnsupportedAlgorithm(1)));
        assert_eq!(parse(&with_protected(&[0xa1, 0x01, 0x26])).map(|_| ()), Err(VerifyError::UnsupportedAlgorithm(-7)));
        assert_eq!(
            parse(&with_protected(&[0xa1, 0x01, 0x61, b'x'])).map(|_| ()),
            Err(VerifyError::ProtectedHeader("alg is not an integer"))
        );
        assert!(parse(&with_protected(&PROTECTED_ES384)).is_ok());
    }
}
