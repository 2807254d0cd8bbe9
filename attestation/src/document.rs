//! The attestation document payload and its parser, with every limit of AWS's attestation
//! specification ("Nitro Enclaves attestation process", section "Attestation document
//! specification") encoded.
//!
//! The parser decides nothing about trust: it turns untrusted bytes into a typed
//! [`ParsedDocument`] or a precise [`VerifyError`]. Only the verifier turns a parsed document
//! into a `VerifiedAttestation`.

use std::collections::BTreeMap;
use std::fmt;

use crate::cbor::{self, Value};
use crate::error::{Field, VerifyError};

/// Largest payload accepted (AWS spec).
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest certificate or cabundle entry (AWS spec).
pub const MAX_CERT: usize = 1024;
/// Largest `public_key` (AWS spec).
pub const MAX_PUBLIC_KEY: usize = 1024;
/// Largest `user_data` and `nonce` (AWS spec).
pub const MAX_USER_DATA: usize = 512;
/// Largest number of PCRs (AWS spec).
pub const MAX_PCRS: usize = 32;

/// Which kind of Nitro attestation document this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocumentKind {
    /// Produced by a Nitro enclave's NSM: PCRs under `pcrs`.
    Enclave,
    /// Produced by NitroTPM on an EC2 instance (`nitro-tpm-attest`): PCRs under `nitrotpm_pcrs`.
    NitroTpm,
}

impl DocumentKind {
    /// The stable lower-case name used in CLI output, JSON and policies.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Enclave => "enclave",
            DocumentKind::NitroTpm => "nitrotpm",
        }
    }
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

    let public_key = get("public_key").map(|v| bytes(v, "public_key", 1, MAX_PUBLIC_KEY)).transpose()?;
    let user_data = get("user_data").map(|v| bytes(v, "user_data", 0, MAX_USER_DATA)).transpose()?;
    let nonce = get("nonce").map(|v| bytes(v, "nonce", 0, MAX_USER_DATA)).transpose()?;

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
