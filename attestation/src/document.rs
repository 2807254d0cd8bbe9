//! The attestation document payload and its parser. It decides which payloads are
//! well-formed: every limit of AWS's attestation document specification ("Nitro Enclaves
//! attestation process", section "Attestation document specification") is encoded, each set
//! to what the NSM (enclave or NitroTPM) actually signs, so that a genuine document is never
//! refused for its shape and nothing larger is accepted.
//!
//! The parser decides nothing about trust: it turns untrusted bytes into a typed
//! [`ParsedDocument`] or a precise [`VerifyError`]. Only the verifier turns a parsed document
//! into a `VerifiedAttestation`.

use std::collections::BTreeMap;

use crate::cbor::{self, Value};
use crate::error::{Field, VerifyError};

/// Largest payload accepted (AWS spec).
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest certificate or cabundle entry (AWS spec).
pub const MAX_CERT: usize = 1024;

// The three caller-supplied fields take the bounds of what the NSM signs, not the stricter
// advice in the same AWS document's validation checklist (`public_key` 1–1024, `user_data`
// and `nonce` 0–512): the NSM signs documents outside that advice, and refusing a genuine
// document is a failure too. Source (docs/attestation.md, "Where the limits come from"): the
// CDDL `user_data = bytes .size (0..1024)` that AWS's attestation document specification
// uses for all three fields, and the NSM's own hardware test, which requests documents with
// 1,024-byte `user_data`, `nonce` and `public_key`.

/// Largest `public_key` the NSM signs.
pub const MAX_PUBLIC_KEY: usize = 1024;
/// Smallest `public_key`: the NSM signs an empty byte string, which is "present but empty"
/// (`Some(&[])`), not absent. Whether an empty key is usable is the protocol's decision.
pub const MIN_PUBLIC_KEY: usize = 0;
/// Largest `user_data` the NSM signs.
pub const MAX_USER_DATA: usize = 1024;
/// Largest `nonce` the NSM signs.
pub const MAX_NONCE: usize = 1024;
/// Largest number of PCRs (AWS spec).
pub const MAX_PCRS: usize = 32;

pub use crate::kind::DocumentKind;

/// What to do with payload fields that the AWS specification does not define.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownFields {
    /// Refuse the document ([`VerifyError::UnknownField`]). The default: nothing passes
    /// unnoticed.
    #[default]
    Refuse,
    /// Accept the document and list the unknown field names in the verified result, so that
    /// a field AWS adds later does not stop every boot but is still reported.
    TolerateAndReport,
}

/// A payload that parsed and met every limit, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDocument {
    pub(crate) module_id: String,
    pub(crate) digest: String,
    pub(crate) timestamp_ms: u64,
    pub(crate) kind: DocumentKind,
    pub(crate) pcrs: BTreeMap<u8, Vec<u8>>,
    pub(crate) certificate: Vec<u8>,
    pub(crate) cabundle: Vec<Vec<u8>>,
    /// `None` when absent or null; `Some(empty)` when present as an empty byte string.
    pub(crate) public_key: Option<Vec<u8>>,
    pub(crate) user_data: Option<Vec<u8>>,
    pub(crate) nonce: Option<Vec<u8>>,
    pub(crate) unknown_fields: Vec<String>,
}

impl ParsedDocument {
    /// The certificate chain, as received: `cabundle` (root first) then the leaf.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }
    /// The CA bundle, root first.
    pub fn cabundle(&self) -> &[Vec<u8>] {
        &self.cabundle
    }
    /// The document's timestamp, milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
}

const KNOWN: [&str; 10] = [
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "nitrotpm_pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
];

/// Parses an attestation payload (the COSE_Sign1 payload bytes).
pub fn parse_payload(payload: &[u8], unknown: UnknownFields) -> Result<ParsedDocument, VerifyError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(VerifyError::PayloadTooLarge { len: payload.len(), max: MAX_PAYLOAD });
    }
    let root = cbor::decode(payload).map_err(VerifyError::PayloadCbor)?;
    let Value::Map(pairs) = root else {
        return Err(VerifyError::PayloadNotMap);
    };

    // Index the fields by name, refusing duplicates and non-text keys.
    let mut fields: BTreeMap<&str, &Value<'_>> = BTreeMap::new();
    let mut unknown_fields = Vec::new();
    for (k, v) in &pairs {
        let Value::Text(name) = k else {
            return Err(VerifyError::PayloadNotMap);
        };
        let name: &str = name;
        if fields.insert(name, v).is_some() {
            return Err(VerifyError::DuplicateField(name.to_owned()));
        }
        if !KNOWN.contains(&name) {
            match unknown {
                UnknownFields::Refuse => return Err(VerifyError::UnknownField(name.to_owned())),
                UnknownFields::TolerateAndReport => unknown_fields.push(name.to_owned()),
            }
        }
    }
    // A null optional field is the same as an absent one (real documents use null).
    let get = |name: Field| fields.get(name).copied().filter(|v| !matches!(v, Value::Null));
    let required = |name: Field| get(name).ok_or(VerifyError::MissingField(name));

    let module_id = text(required("module_id")?, "module_id")?;
    if module_id.is_empty() {
        return Err(VerifyError::FieldSize { field: "module_id", len: 0, min: 1, max: usize::MAX });
    }
    let digest = text(required("digest")?, "digest")?;
    if digest != "SHA384" {
        return Err(VerifyError::UnsupportedDigest(digest));
    }
    let timestamp_ms = match required("timestamp")? {
        Value::Unsigned(0) => return Err(VerifyError::ZeroTimestamp),
        Value::Unsigned(t) => *t,
        _ => return Err(VerifyError::FieldType { field: "timestamp", expected: "unsigned integer" }),
    };

    let (kind, pcr_field, pcr_value) = match (get("pcrs"), get("nitrotpm_pcrs")) {
        (Some(_), Some(_)) => return Err(VerifyError::AmbiguousKind),
        (Some(v), None) => (DocumentKind::Enclave, "pcrs", v),
        (None, Some(v)) => (DocumentKind::NitroTpm, "nitrotpm_pcrs", v),
        (None, None) => return Err(VerifyError::MissingField("pcrs")),
    };
    let pcrs = parse_pcrs(pcr_value, pcr_field)?;

    let certificate = bytes(required("certificate")?, "certificate", 1, MAX_CERT)?;
    let Value::Array(bundle) = required("cabundle")? else {
        return Err(VerifyError::FieldType { field: "cabundle", expected: "array of byte strings" });
    };
    if bundle.is_empty() {
        return Err(VerifyError::EmptyCabundle);
    }
    let cabundle = bundle.iter().map(|c| bytes(c, "cabundle", 1, MAX_CERT)).collect::<Result<Vec<_>, _>>()?;

    let public_key = get("public_key").map(|v| bytes(v, "public_key", MIN_PUBLIC_KEY, MAX_PUBLIC_KEY)).transpose()?;
    let user_data = get("user_data").map(|v| bytes(v, "user_data", 0, MAX_USER_DATA)).transpose()?;
    let nonce = get("nonce").map(|v| bytes(v, "nonce", 0, MAX_NONCE)).transpose()?;

    Ok(ParsedDocument {
        module_id,
        digest,
        timestamp_ms,
        kind,
        pcrs,
        certificate,
        cabundle,
        public_key,
        user_data,
        nonce,
        unknown_fields,
    })
}

fn text(v: &Value<'_>, field: Field) -> Result<String, VerifyError> {
    match v {
        Value::Text(s) => Ok(s.to_string()),
        _ => Err(VerifyError::FieldType { field, expected: "text string" }),
    }
}

fn bytes(v: &Value<'_>, field: Field, min: usize, max: usize) -> Result<Vec<u8>, VerifyError> {
    match v {
        Value::Bytes(b) if (min..=max).contains(&b.len()) => Ok(b.to_vec()),
        Value::Bytes(b) => Err(VerifyError::FieldSize { field, len: b.len(), min, max }),
        _ => Err(VerifyError::FieldType { field, expected: "byte string" }),
    }
}

fn parse_pcrs(v: &Value<'_>, field: Field) -> Result<BTreeMap<u8, Vec<u8>>, VerifyError> {
    let Value::Map(entries) = v else {
        return Err(VerifyError::FieldType { field, expected: "map of index to byte string" });
    };
    if entries.is_empty() || entries.len() > MAX_PCRS {
        return Err(VerifyError::PcrCount { count: entries.len() });
    }
    let mut pcrs = BTreeMap::new();
    for (k, val) in entries {
        let Value::Unsigned(index) = k else {
            return Err(VerifyError::FieldType { field, expected: "map of index to byte string" });
        };
        let index = match u8::try_from(*index) {
            Ok(i) if usize::from(i) < MAX_PCRS => i,
            _ => return Err(VerifyError::PcrIndex(*index)),
        };
        let Value::Bytes(value) = val else {
            return Err(VerifyError::FieldType { field, expected: "map of index to byte string" });
        };
        if ![32, 48, 64].contains(&value.len()) {
            return Err(VerifyError::PcrLength { index, len: value.len() });
        }
        if pcrs.insert(index, value.to_vec()).is_some() {
            return Err(VerifyError::DuplicatePcr(index));
        }
    }
    Ok(pcrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value as V;

    /// A payload with every required field; `pcr_key` names the PCR map, `extra` sets or
    /// replaces the optional fields. Certificates are opaque bytes here: the parser does not
    /// read them.
    fn payload(pcr_key: &str, pcrs: &[(u8, Vec<u8>)], extra: &[(&str, V)]) -> Vec<u8> {
        let mut m = vec![
            (V::Text("module_id".into()), V::Text("i-0123456789abcdef0-enc0123456789abcdef".into())),
            (V::Text("digest".into()), V::Text("SHA384".into())),
            (V::Text("timestamp".into()), V::Integer(1_795_478_400_000u64.into())),
            (
                V::Text(pcr_key.into()),
                V::Map(pcrs.iter().map(|(i, v)| (V::Integer((*i).into()), V::Bytes(v.clone()))).collect()),
            ),
            (V::Text("certificate".into()), V::Bytes(vec![0x30; 600])),
            (V::Text("cabundle".into()), V::Array(vec![V::Bytes(vec![0x30; 600]); 4])),
            (V::Text("public_key".into()), V::Null),
            (V::Text("user_data".into()), V::Null),
            (V::Text("nonce".into()), V::Null),
        ];
        for (name, value) in extra {
            let slot = m.iter_mut().find(|(k, _)| k.as_text() == Some(name)).expect("a defined field");
            slot.1 = value.clone();
        }
        let mut out = Vec::new();
        ciborium::ser::into_writer(&V::Map(m), &mut out).expect("encode");
        out
    }

    fn enclave(extra: &[(&str, V)]) -> Result<ParsedDocument, VerifyError> {
        let pcrs: Vec<(u8, Vec<u8>)> = (0u8..16).map(|i| (i, vec![i; 48])).collect();
        parse_payload(&payload("pcrs", &pcrs, extra), UnknownFields::Refuse)
    }

    fn bytes_of(n: usize) -> V {
        V::Bytes(vec![0xA5; n])
    }

    #[test]
    fn the_limits_are_what_the_nsm_signs() {
        assert_eq!((MAX_USER_DATA, MAX_NONCE, MIN_PUBLIC_KEY, MAX_PUBLIC_KEY), (1024, 1024, 0, 1024));
    }

    #[test]
    fn user_data_nonce_and_public_key_of_the_nsm_maximum_parse_together() {
        let d = enclave(&[("user_data", bytes_of(1024)), ("nonce", bytes_of(1024)), ("public_key", bytes_of(1024))])
            .expect("1,024 bytes each, as the NSM signs");
        assert_eq!(d.user_data.as_deref().map(<[u8]>::len), Some(1024));
        assert_eq!(d.nonce.as_deref().map(<[u8]>::len), Some(1024));
        assert_eq!(d.public_key.as_deref().map(<[u8]>::len), Some(1024));
    }

    #[test]
    fn one_byte_over_the_nsm_maximum_is_refused_naming_the_field() {
        for (field, max) in [("user_data", MAX_USER_DATA), ("nonce", MAX_NONCE), ("public_key", MAX_PUBLIC_KEY)] {
            let min = if field == "public_key" { MIN_PUBLIC_KEY } else { 0 };
            assert_eq!(
                enclave(&[(field, bytes_of(max + 1))]),
                Err(VerifyError::FieldSize { field, len: max + 1, min, max }),
                "{field}"
            );
        }
    }

    #[test]
    fn an_empty_public_key_is_present_but_empty_not_absent() {
        let empty = enclave(&[("public_key", V::Bytes(vec![]))]).expect("the NSM signs an empty public_key");
        assert_eq!(empty.public_key, Some(Vec::new()));
        let null = enclave(&[]).expect("null public_key");
        assert_eq!(null.public_key, None);
        // Empty user_data and nonce were already accepted; they stay distinct from null too.
        let d = enclave(&[("user_data", V::Bytes(vec![])), ("nonce", V::Bytes(vec![]))]).expect("empty");
        assert_eq!((d.user_data, d.nonce), (Some(Vec::new()), Some(Vec::new())));
    }

    #[test]
    fn a_nitrotpm_document_of_the_real_shape_parses() {
        // PCRs 0–23 of 48 bytes (SHA-384 bank), 17–22 all 0xFF; a 10-byte nonce.
        let pcrs: Vec<(u8, Vec<u8>)> =
            (0u8..24).map(|i| (i, if (17..=22).contains(&i) { vec![0xFF; 48] } else { vec![i; 48] })).collect();
        for key_len in [65, 91] {
            let p = payload("nitrotpm_pcrs", &pcrs, &[("public_key", bytes_of(key_len)), ("nonce", bytes_of(10))]);
            let d = parse_payload(&p, UnknownFields::Refuse).expect("NitroTPM shape");
            assert_eq!(d.kind, DocumentKind::NitroTpm);
            assert_eq!(d.pcrs.len(), 24);
            assert!((17..=22).all(|i| d.pcrs[&i] == [0xFF; 48]));
            assert_eq!(d.public_key.as_deref().map(<[u8]>::len), Some(key_len));
            assert_eq!(d.nonce.as_deref().map(<[u8]>::len), Some(10));
        }
    }
}
