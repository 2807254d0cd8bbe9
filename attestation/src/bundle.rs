//! Pipeline-signed policy bundles: canonical encoding, M-of-N approval, no rollback, no fork,
//! approver rotation, and asymmetric activation (tightening at once, loosening after a
//! delay). Pure: bytes and a time in, a decision out. Specified in `docs/policy.md`.
//!
//! Every image rule names its document kind. Bodies signed before that spell a kind-less
//! rule `"any"`; it decodes as an enclave rule (never as "any kind"), and such a body stays
//! canonical in that spelling, so its digest and the chain through it are unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sha2::{Digest, Sha384};

use crate::cbor::{self, Value};
use crate::crypto::{Crypto, P384_POINT_LEN, P384_SIG_LEN};
use crate::document::DocumentKind;
use crate::freshness::{self, Freshness};
use crate::members::{self, Member, MemberError};
use crate::policy::{ClusterRule, ImageRule, ReleasePolicy};

/// Format tag of the signed body.
pub const BODY_TAG: &str = "keygate-policy/v1";
/// Format tag of a bundle (body + signatures).
pub const BUNDLE_TAG: &str = "keygate-policy-bundle/v1";
/// Format tag of one detached signature.
pub const SIGNATURE_TAG: &str = "keygate-policy-signature/v1";
/// Domain separation for approver signatures: ECDSA P-384/SHA-384 over this ‖ SHA-384(body).
pub const SIGNING_DOMAIN: &[u8] = b"keygate/v1/policy-signature\0";

/// Most approvers in a set.
pub const MAX_APPROVERS: usize = 32;
/// Most signatures carried by a bundle.
pub const MAX_SIGNATURES: usize = 64;
/// Most clusters.
pub const MAX_CLUSTERS: usize = 1024;
/// Most images per cluster.
pub const MAX_IMAGES: usize = 64;
/// Longest image name / cluster id.
pub const MAX_NAME: usize = 128;
/// Largest encoded body (it must fit one protocol frame with its signatures).
pub const MAX_BODY: usize = 48 * 1024;
/// Largest encoded bundle.
pub const MAX_BUNDLE: usize = 60 * 1024;
/// How far in the future `issued_at` may be (seconds).
pub const ISSUE_SKEW_S: u64 = 300;

/// An approver's P-384 public key (uncompressed SEC1).
pub type ApproverKey = [u8; P384_POINT_LEN];

/// The signed content of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyBody {
    /// Exactly one more than the previous bundle's; the genesis bundle is 1.
    pub version: u64,
    /// SHA-384 of the previous bundle's body bytes (48 zero bytes for genesis).
    pub previous: [u8; 48],
    /// Unix seconds.
    pub issued_at: u64,
    /// Seconds a loosening change waits before it takes effect. The delay in force is the
    /// larger of this and the active bundle's.
    pub activation_delay: u64,
    /// The approver set (sorted, distinct).
    pub approvers: Vec<ApproverKey>,
    /// Signatures needed from the approver set: 1 ≤ threshold ≤ approvers.
    pub threshold: u32,
    /// The release policy.
    pub policy: ReleasePolicy,
    /// The member KREs of the cluster (`docs/cluster.md`): who may be forwarded the state key.
    /// Empty for a body without a member list; such a body encodes exactly as before lists
    /// existed (9 fields), so its digest is unchanged.
    pub members: Vec<Member>,
    /// The pipeline's timestamp key and the maximum age of its timestamps
    /// ([`crate::freshness`]): `None` for a body without one, which encodes exactly as before
    /// (an eleventh field, present only when set; the member list is then written even when
    /// empty), so its digest is unchanged.
    pub freshness: Option<Freshness>,
}

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Over the size limit.
    #[error("bundle is {0} bytes, over the limit")]
    TooLarge(usize),
    /// Not well-formed CBOR.
    #[error("not well-formed CBOR: {0}")]
    Cbor(cbor::CborError),
    /// Well-formed but not of the bundle's shape.
    #[error("malformed bundle: {0}")]
    Malformed(&'static str),
    /// The body is not in canonical form (its bytes must be the one encoding of its content).
    #[error("body is not canonically encoded")]
    NotCanonical,
    /// Threshold 0 or larger than the approver set.
    #[error("threshold {threshold} is invalid for {approvers} approvers")]
    BadThreshold { threshold: u32, approvers: usize },
    /// An approver key is not a valid P-384 point.
    #[error("approver key {0} is not a valid P-384 public key")]
    BadApproverKey(usize),
    /// The policy rules are unusable.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// A genesis bundle must be version 1 with a zero previous digest.
    #[error("not a genesis bundle (version 1, previous = zero)")]
    NotGenesis,
    /// The very bundle already in force.
    #[error("replay: version {0} is already the current bundle")]
    Replay(u64),
    /// An older version than the current one.
    #[error("rollback: version {found} is older than the current version {current}")]
    Rollback { current: u64, found: u64 },
    /// Same version as the current one, different content.
    #[error("fork: version {0} differs from the current bundle of the same version")]
    Fork(u64),
    /// A version that skips ahead.
    #[error("version {found} is not the next version ({expected})")]
    VersionGap { expected: u64, found: u64 },
    /// `previous` is not the digest of the current bundle.
    #[error("previous digest does not match the current bundle")]
    WrongPrevious,
    /// Issued before the current bundle, or too far in the future.
    #[error("issued_at {issued_at} is outside [{min}, now + {ISSUE_SKEW_S} s]")]
    BadIssueTime { issued_at: u64, min: u64 },
    /// A detached signature is for another body.
    #[error("signature is for another proposal")]
    SignatureForOtherBody,
    /// Not enough valid signatures from the approver set in force.
    #[error("{valid} valid approver signature(s), {threshold} required ({unknown} from unknown signers ignored, {duplicates} duplicate(s) counted once, {invalid} invalid)")]
    BelowThreshold { valid: usize, threshold: u32, unknown: usize, duplicates: usize, invalid: usize },
    /// The bundle changes the approver set or threshold but the new set's quorum did not sign.
    #[error("approver rotation not signed by a quorum of the new set ({valid} of {threshold})")]
    RotationNotConfirmed { valid: usize, threshold: u32 },
    /// A cluster's KEK version is lower than one an earlier bundle of the chain set (KEK
    /// versions only move forward, also across a removal and re-addition of the cluster).
    #[error("cluster `{cluster}`: KEK version {to} is lower than version {from} set by an earlier bundle")]
    KekVersionDecrease { cluster: String, from: u32, to: u32 },
    /// The member list is unusable.
    #[error("members: {0}")]
    Members(#[from] MemberError),
}

/// Tally of the signatures on a bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignatureReport {
    /// Approvers of the set whose signature verified (each once).
    pub valid: Vec<ApproverKey>,
    /// Signatures by keys not in the set (ignored).
    pub unknown: usize,
    /// Repeated signatures by one approver (counted once).
    pub duplicates: usize,
    /// Signatures by set members that did not verify.
    pub invalid: usize,
}

/// A parsed bundle: the body's exact bytes, the decoded body, and the signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The canonical body bytes (what is signed and digested).
    pub body_bytes: Vec<u8>,
    /// The decoded body.
    pub body: PolicyBody,
    /// (approver key, 96-byte signature).
    pub signatures: Vec<(Vec<u8>, Vec<u8>)>,
}

/// SHA-384 of body bytes.
pub fn digest(body_bytes: &[u8]) -> [u8; 48] {
    Sha384::digest(body_bytes).into()
}

/// The message an approver signs.
pub fn signing_message(body_bytes: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, digest(body_bytes).as_slice()].concat()
}

/// The spelling of a kind-less rule in bodies signed before every rule named its kind.
const LEGACY_KIND: &str = "any";

/// (cluster id, image name) of the rules a decoded body spelled [`LEGACY_KIND`].
type LegacyKinds = BTreeSet<(String, String)>;

/// Encodes a body canonically (the only accepted encoding of its content).
pub fn encode_body(b: &PolicyBody) -> Vec<u8> {
    encode_body_spelled(b, &LegacyKinds::new())
}

/// [`encode_body`], spelling the kind of the rules in `legacy` as [`LEGACY_KIND`] (they are
/// enclave rules): the canonical form of a body signed before kinds were required.
fn encode_body_spelled(b: &PolicyBody, legacy: &LegacyKinds) -> Vec<u8> {
    let mut out = Vec::new();
    let uint = |out: &mut Vec<u8>, n: u64| cbor::encode_head(out, 0, n);
    let arr = |out: &mut Vec<u8>, n: usize| cbor::encode_head(out, 4, u64::try_from(n).unwrap_or(u64::MAX));
    // A member list is a tenth field, present only when not empty or followed by the
    // freshness field (the eleventh, present only when set).
    arr(
        &mut out,
        if b.freshness.is_some() {
            11
        } else if b.members.is_empty() {
            9
        } else {
            10
        },
    );
    cbor::encode_text(&mut out, BODY_TAG);
    uint(&mut out, b.version);
    cbor::encode_bytes(&mut out, &b.previous);
    uint(&mut out, b.issued_at);
    uint(&mut out, b.activation_delay);
    let mut approvers = b.approvers.clone();
    approvers.sort();
    approvers.dedup();
    arr(&mut out, approvers.len());
    for a in &approvers {
        cbor::encode_bytes(&mut out, a);
    }
    uint(&mut out, u64::from(b.threshold));
    out.push(if b.policy.allow_debug { 0xf5 } else { 0xf4 });
    arr(&mut out, b.policy.clusters.len());
    for (id, rule) in &b.policy.clusters {
        // The KEK schedule is encoded only when it is not the default, so bundles without
        // rotations keep their encoding (and digest).
        let schedule = !rule.has_default_schedule();
        arr(&mut out, if schedule { 4 } else { 2 });
        cbor::encode_text(&mut out, id);
        let mut images: Vec<&ImageRule> = rule.images.iter().collect();
        images.sort_by(|x, y| x.name.cmp(&y.name));
        arr(&mut out, images.len());
        for img in images {
            arr(&mut out, 4);
            cbor::encode_text(&mut out, &img.name);
            arr(&mut out, img.pcrs.len());
            for (i, v) in &img.pcrs {
                arr(&mut out, 2);
                uint(&mut out, u64::from(*i));
                cbor::encode_bytes(&mut out, v);
            }
            let legacy = img.kind == DocumentKind::Enclave && legacy.contains(&(id.clone(), img.name.clone()));
            cbor::encode_text(&mut out, if legacy { LEGACY_KIND } else { img.kind.as_str() });
            match img.not_after_ms {
                Some(ms) => uint(&mut out, ms / 1000),
                None => out.push(0xf6),
            }
        }
        if schedule {
            uint(&mut out, u64::from(rule.kek_version));
            uint(&mut out, u64::from(rule.kek_retire_below));
        }
    }
    if !b.members.is_empty() || b.freshness.is_some() {
        encode_members(&mut out, &b.members);
    }
    if let Some(f) = &b.freshness {
        arr(&mut out, 2);
        cbor::encode_bytes(&mut out, &f.key);
        uint(&mut out, f.max_age_s);
    }
    out
}

/// Whether `new` asks less of timestamps than `old`: none where there was one, a longer
/// maximum age, or another key (trusted only after the activation delay).
fn freshness_loosens(old: Option<&Freshness>, new: Option<&Freshness>) -> bool {
    match (old, new) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(o), Some(n)) => n.key != o.key || n.max_age_s > o.max_age_s,
    }
}

/// Decodes and validates the freshness field: `[timestamp key, max age in seconds]`.
fn decode_freshness(v: &Value<'_>, crypto: &dyn Crypto) -> Result<Freshness, BundleError> {
    let f = array(v, 2, "freshness must be [timestamp key, max age in seconds]")?;
    let key: ApproverKey =
        bstr(&f[0])?.try_into().map_err(|_| BundleError::Malformed("timestamp key must be a P-384 point"))?;
    crypto.validate_p384_point(&key).map_err(|_| BundleError::Malformed("timestamp key must be a P-384 point"))?;
    let max_age_s = uint(&f[1])?;
    if !(freshness::MIN_MAX_AGE_S..=freshness::MAX_MAX_AGE_S).contains(&max_age_s) {
        return Err(BundleError::Malformed("timestamp max age must be 1 s to 7 days"));
    }
    Ok(Freshness { key, max_age_s })
}

/// The member list field: `[[name, pcr4, pcr3 / null], ...]`, sorted by name.
fn encode_members(out: &mut Vec<u8>, list: &[Member]) {
    let mut sorted: Vec<&Member> = list.iter().collect();
    sorted.sort_by(|x, y| x.name.cmp(&y.name));
    cbor::encode_head(out, 4, u64::try_from(sorted.len()).unwrap_or(u64::MAX));
    for m in sorted {
        cbor::encode_head(out, 4, 3);
        cbor::encode_text(out, &m.name);
        cbor::encode_bytes(out, &m.pcr4);
        match &m.pcr3 {
            Some(p) => cbor::encode_bytes(out, p),
            None => out.push(0xf6),
        }
    }
}

/// Decodes and validates the member list field.
fn decode_members(v: &Value<'_>) -> Result<Vec<Member>, BundleError> {
    let items = match v {
        Value::Array(items) if items.len() > members::MAX_MEMBERS => {
            return Err(MemberError::TooMany(items.len()).into())
        }
        Value::Array(items) => items,
        _ => return Err(BundleError::Malformed("members must be an array")),
    };
    let mut list = Vec::with_capacity(items.len());
    for item in items {
        let f = array(item, 3, "member must be [name, pcr4, pcr3 or null]")?;
        let name = text(&f[0])?;
        let pcr4 = members::pcr_value(name, 4, bstr(&f[1])?)?;
        let pcr3 = match &f[2] {
            Value::Null => None,
            v => Some(members::pcr_value(name, 3, bstr(v)?)?),
        };
        list.push(Member { name: name.to_owned(), pcr4, pcr3 });
    }
    members::validate(&list)?;
    Ok(list)
}

/// Encodes a bundle file.
pub fn encode_bundle(body_bytes: &[u8], signatures: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    cbor::encode_head(&mut out, 4, 3);
    cbor::encode_text(&mut out, BUNDLE_TAG);
    cbor::encode_bytes(&mut out, body_bytes);
    cbor::encode_head(&mut out, 4, u64::try_from(signatures.len()).unwrap_or(u64::MAX));
    for (k, s) in signatures {
        cbor::encode_head(&mut out, 4, 2);
        cbor::encode_bytes(&mut out, k);
        cbor::encode_bytes(&mut out, s);
    }
    out
}

/// Encodes one detached signature (what `keygate policy sign` writes).
pub fn encode_signature(body_bytes: &[u8], key: &[u8], sig: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    cbor::encode_head(&mut out, 4, 4);
    cbor::encode_text(&mut out, SIGNATURE_TAG);
    cbor::encode_bytes(&mut out, &digest(body_bytes));
    cbor::encode_bytes(&mut out, key);
    cbor::encode_bytes(&mut out, sig);
    out
}

/// Decodes a detached signature and checks it is for `body_bytes`.
pub fn decode_signature(bytes: &[u8], body_bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), BundleError> {
    let items = SIGNATURE_FILE.fields(bytes)?;
    if bstr(&items[1])? != digest(body_bytes).as_slice() {
        return Err(BundleError::SignatureForOtherBody);
    }
    Ok((bstr(&items[2])?.to_vec(), bstr(&items[3])?.to_vec()))
}

/// The envelope of each file format: at most `max` bytes of CBOR, an array of `fields`
/// whose first field is the text `tag`; each refusal with its own message.
struct Envelope {
    max: usize,
    fields: usize,
    /// Optional fields after the `fields` required ones.
    optional: usize,
    shape: &'static str,
    tag: &'static str,
    other_tag: &'static str,
}

const SIGNATURE_FILE: Envelope = Envelope {
    max: 1024,
    fields: 4,
    optional: 0,
    shape: "signature file",
    tag: SIGNATURE_TAG,
    other_tag: "not a keygate policy signature",
};

const BODY_FILE: Envelope = Envelope {
    max: MAX_BODY,
    fields: 9,
    optional: 2,
    shape: "body must be an array of 9 (10 with members, 11 with a timestamp key)",
    tag: BODY_TAG,
    other_tag: "not a keygate policy body",
};

const BUNDLE_FILE: Envelope = Envelope {
    max: MAX_BUNDLE,
    fields: 3,
    optional: 0,
    shape: "bundle must be an array of 3",
    tag: BUNDLE_TAG,
    other_tag: "not a keygate policy bundle",
};

impl Envelope {
    /// The fields of `bytes`, the tag first, once the envelope checks pass.
    fn fields<'a>(&self, bytes: &'a [u8]) -> Result<Vec<Value<'a>>, BundleError> {
        if bytes.len() > self.max {
            return Err(BundleError::TooLarge(bytes.len()));
        }
        let v = cbor::decode(bytes).map_err(BundleError::Cbor)?;
        let Value::Array(fields) = v else { return Err(BundleError::Malformed(self.shape)) };
        if fields.len() < self.fields || fields.len() > self.fields + self.optional {
            return Err(BundleError::Malformed(self.shape));
        }
        if text(&fields[0])? != self.tag {
            return Err(BundleError::Malformed(self.other_tag));
        }
        Ok(fields)
    }
}

fn array<'a, 'b>(v: &'b Value<'a>, n: usize, what: &'static str) -> Result<&'b [Value<'a>], BundleError> {
    match v {
        Value::Array(items) if items.len() == n => Ok(items),
        _ => Err(BundleError::Malformed(what)),
    }
}

fn list<'a, 'b>(v: &'b Value<'a>, max: usize, what: &'static str) -> Result<&'b [Value<'a>], BundleError> {
    match v {
        Value::Array(items) if items.len() <= max => Ok(items),
        _ => Err(BundleError::Malformed(what)),
    }
}

fn uint(v: &Value<'_>) -> Result<u64, BundleError> {
    match v {
        Value::Unsigned(n) => Ok(*n),
        _ => Err(BundleError::Malformed("expected an unsigned integer")),
    }
}

fn text<'a>(v: &'a Value<'_>) -> Result<&'a str, BundleError> {
    match v {
        Value::Text(s) => Ok(s),
        _ => Err(BundleError::Malformed("expected a text string")),
    }
}

fn bstr<'a>(v: &'a Value<'_>) -> Result<&'a [u8], BundleError> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(BundleError::Malformed("expected a byte string")),
    }
}

/// Decodes and validates a body (canonical form, limits, threshold, keys, rules).
pub fn decode_body(bytes: &[u8], crypto: &dyn Crypto) -> Result<PolicyBody, BundleError> {
    let f = BODY_FILE.fields(bytes)?;
    let previous: [u8; 48] =
        bstr(&f[2])?.try_into().map_err(|_| BundleError::Malformed("previous must be 48 bytes"))?;
    let mut approvers = Vec::new();
    for (i, a) in list(&f[5], MAX_APPROVERS, "approvers: at most 32")?.iter().enumerate() {
        let key: ApproverKey = bstr(a)?.try_into().map_err(|_| BundleError::BadApproverKey(i))?;
        crypto.validate_p384_point(&key).map_err(|_| BundleError::BadApproverKey(i))?;
        approvers.push(key);
    }
    let threshold = u32::try_from(uint(&f[6])?).unwrap_or(u32::MAX);
    if threshold == 0 || usize::try_from(threshold).map_or(true, |t| t > approvers.len()) {
        return Err(BundleError::BadThreshold { threshold, approvers: approvers.len() });
    }
    let allow_debug = match f[7] {
        Value::Bool(b) => b,
        _ => return Err(BundleError::Malformed("allow_debug must be a bool")),
    };
    let mut clusters = BTreeMap::new();
    let mut legacy = LegacyKinds::new();
    for c in list(&f[8], MAX_CLUSTERS, "clusters: at most 1024")? {
        let c = match c {
            Value::Array(items) if items.len() == 2 || items.len() == 4 => items.as_slice(),
            _ => {
                return Err(BundleError::Malformed(
                    "cluster must be [id, images] or [id, images, kek_version, kek_retire_below]",
                ))
            }
        };
        let id = text(&c[0])?;
        if id.is_empty() || id.len() > MAX_NAME {
            return Err(BundleError::Malformed("cluster id length"));
        }
        let mut images = Vec::new();
        for img in list(&c[1], MAX_IMAGES, "images: at most 64 per cluster")? {
            let img = array(img, 4, "image must be [name, pcrs, kind, not_after]")?;
            let name = text(&img[0])?;
            if name.is_empty() || name.len() > MAX_NAME {
                return Err(BundleError::Malformed("image name length"));
            }
            let mut pcrs = BTreeMap::new();
            for p in list(&img[1], 32, "pcrs: at most 32")? {
                let p = array(p, 2, "pcr must be [index, value]")?;
                let index = u8::try_from(uint(&p[0])?).map_err(|_| BundleError::Malformed("PCR index"))?;
                pcrs.insert(index, bstr(&p[1])?.to_vec());
            }
            let kind = match text(&img[2])? {
                LEGACY_KIND => {
                    legacy.insert((id.to_owned(), name.to_owned()));
                    DocumentKind::Enclave
                }
                "enclave" => DocumentKind::Enclave,
                "nitrotpm" => DocumentKind::NitroTpm,
                _ => return Err(BundleError::Malformed("kind must be enclave or nitrotpm")),
            };
            let not_after_ms = match &img[3] {
                Value::Null => None,
                v => Some(uint(v)?.saturating_mul(1000)),
            };
            if images.iter().any(|i: &ImageRule| i.name == name) {
                return Err(BundleError::Malformed("duplicate image name in a cluster"));
            }
            images.push(ImageRule { name: name.to_owned(), pcrs, kind, not_after_ms, not_before_ms: None });
        }
        let mut rule = ClusterRule::new(images);
        if c.len() == 4 {
            // A default schedule written out is not canonical (the re-encoding check below
            // refuses it); out-of-range values are refused by `validate`.
            rule.kek_version = u32::try_from(uint(&c[2])?).map_err(|_| BundleError::Malformed("kek_version"))?;
            rule.kek_retire_below =
                u32::try_from(uint(&c[3])?).map_err(|_| BundleError::Malformed("kek_retire_below"))?;
        }
        clusters.insert(id.to_owned(), rule);
    }
    let body = PolicyBody {
        version: uint(&f[1])?,
        previous,
        issued_at: uint(&f[3])?,
        activation_delay: uint(&f[4])?,
        approvers,
        threshold,
        policy: ReleasePolicy { clusters, allow_debug },
        members: match f.get(9) {
            Some(v) => decode_members(v)?,
            None => Vec::new(),
        },
        freshness: f.get(10).map(|v| decode_freshness(v, crypto)).transpose()?,
    };
    // Canonical: re-encoding the decoded content must give the same bytes (sorted, distinct
    // sets; shortest integers; definite lengths). Two encodings of one policy cannot exist,
    // except that an enclave rule of a body signed before kinds were required keeps its
    // legacy spelling.
    if encode_body_spelled(&body, &legacy) != bytes {
        return Err(BundleError::NotCanonical);
    }
    body.policy.validate()?;
    Ok(body)
}

/// Decodes a bundle file.
pub fn decode_bundle(bytes: &[u8], crypto: &dyn Crypto) -> Result<Bundle, BundleError> {
    let f = BUNDLE_FILE.fields(bytes)?;
    let body_bytes = bstr(&f[1])?.to_vec();
    let body = decode_body(&body_bytes, crypto)?;
    let mut signatures = Vec::new();
    for s in list(&f[2], MAX_SIGNATURES, "signatures: at most 64")? {
        let s = array(s, 2, "signature must be [key, sig]")?;
        signatures.push((bstr(&s[0])?.to_vec(), bstr(&s[1])?.to_vec()));
    }
    Ok(Bundle { body_bytes, body, signatures })
}

/// Counts valid signatures over `body_bytes` by members of `approvers`.
pub fn tally(
    crypto: &dyn Crypto,
    approvers: &[ApproverKey],
    body_bytes: &[u8],
    signatures: &[(Vec<u8>, Vec<u8>)],
) -> SignatureReport {
    let msg = signing_message(body_bytes);
    let set: BTreeSet<&[u8]> = approvers.iter().map(|a| a.as_slice()).collect();
    let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut r = SignatureReport::default();
    for (key, sig) in signatures {
        if !set.contains(key.as_slice()) {
            r.unknown += 1;
            continue;
        }
        if seen.contains(key) {
            r.duplicates += 1;
            continue;
        }
        if sig.len() == P384_SIG_LEN && crypto.verify_p384_sha384_fixed(key, &msg, sig).is_ok() {
            seen.insert(key.clone());
            if let Ok(k) = ApproverKey::try_from(key.as_slice()) {
                r.valid.push(k);
            }
        } else {
            r.invalid += 1;
        }
    }
    r
}

/// A bundle that has been accepted (genesis, or verified against its predecessor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedBundle {
    /// The bundle.
    pub bundle: Bundle,
    /// SHA-384 of its body.
    pub digest: [u8; 48],
}

/// What an accepted push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The new version.
    pub version: u64,
    /// Its digest.
    pub digest: [u8; 48],
    /// When it is fully in force (ms); equal to the push time when it only tightens.
    pub activates_at_ms: u64,
    /// Whether it loosens anything (and so waits for the activation delay).
    pub loosens: bool,
    /// The signature tally.
    pub signatures: SignatureReport,
}

/// The KRE's policy state: the active bundle and at most one pending (loosening) bundle.
#[derive(Debug, Clone)]
pub struct PolicyState {
    active: Arc<AcceptedBundle>,
    pending: Option<(Arc<AcceptedBundle>, u64)>,
    /// Per cluster, the highest KEK version any accepted bundle of this chain named (a
    /// cluster removed and re-added cannot restart lower).
    kek_high: BTreeMap<String, u32>,
}

fn kek_versions(p: &ReleasePolicy) -> BTreeMap<String, u32> {
    p.clusters.iter().map(|(id, r)| (id.clone(), r.kek_version)).collect()
}

impl PolicyState {
    /// Starts from the genesis bundle built into the enclave image (no signatures needed:
    /// the image's PCRs cover it).
    pub fn genesis(bytes: &[u8], crypto: &dyn Crypto) -> Result<Self, BundleError> {
        let bundle = decode_bundle(bytes, crypto)?;
        if bundle.body.version != 1 || bundle.body.previous != [0u8; 48] {
            return Err(BundleError::NotGenesis);
        }
        let digest = digest(&bundle.body_bytes);
        let kek_high = kek_versions(&bundle.body.policy);
        Ok(Self { active: Arc::new(AcceptedBundle { bundle, digest }), pending: None, kek_high })
    }

    /// Starts from a bundle the caller already trusts (the pipeline's current bundle), to
    /// check the next one offline exactly as the KRE will.
    pub fn trusting(bytes: &[u8], crypto: &dyn Crypto) -> Result<Self, BundleError> {
        let bundle = decode_bundle(bytes, crypto)?;
        let digest = digest(&bundle.body_bytes);
        let kek_high = kek_versions(&bundle.body.policy);
        Ok(Self { active: Arc::new(AcceptedBundle { bundle, digest }), pending: None, kek_high })
    }

    fn promote(&mut self, now_ms: u64) {
        if let Some((p, at)) = &self.pending {
            if now_ms >= *at {
                self.active = p.clone();
                self.pending = None;
            }
        }
    }

    /// The newest accepted bundle (pending or active).
    pub fn latest(&self) -> &AcceptedBundle {
        self.pending.as_ref().map_or(&self.active, |(p, _)| p)
    }

    /// Verifies `bytes` as the next bundle and applies it.
    pub fn apply(&mut self, bytes: &[u8], now_ms: u64, crypto: &dyn Crypto) -> Result<ApplyReport, BundleError> {
        self.promote(now_ms);
        let candidate = decode_bundle(bytes, crypto)?;
        let cand_digest = digest(&candidate.body_bytes);
        let latest = self.latest();
        let (cur_v, found) = (latest.bundle.body.version, candidate.body.version);
        match found.cmp(&cur_v) {
            std::cmp::Ordering::Equal if cand_digest == latest.digest => return Err(BundleError::Replay(found)),
            std::cmp::Ordering::Equal => return Err(BundleError::Fork(found)),
            std::cmp::Ordering::Less => return Err(BundleError::Rollback { current: cur_v, found }),
            std::cmp::Ordering::Greater => {}
        }
        if found != cur_v + 1 {
            return Err(BundleError::VersionGap { expected: cur_v + 1, found });
        }
        if candidate.body.previous != latest.digest {
            return Err(BundleError::WrongPrevious);
        }
        let now_s = now_ms / 1000;
        let min = latest.bundle.body.issued_at;
        if candidate.body.issued_at < min || candidate.body.issued_at > now_s.saturating_add(ISSUE_SKEW_S) {
            return Err(BundleError::BadIssueTime { issued_at: candidate.body.issued_at, min });
        }
        // Signatures: a quorum of the approver set in force (the active bundle's).
        let active = &self.active.bundle.body;
        let report = tally(crypto, &active.approvers, &candidate.body_bytes, &candidate.signatures);
        if report.valid.len() < usize::try_from(active.threshold).unwrap_or(usize::MAX) {
            return Err(BundleError::BelowThreshold {
                valid: report.valid.len(),
                threshold: active.threshold,
                unknown: report.unknown,
                duplicates: report.duplicates,
                invalid: report.invalid,
            });
        }
        // Rotation: the new set must also confirm (as TUF rotates its root), so a set whose
        // keys nobody holds cannot be installed.
        let rotates = candidate.body.approvers != active.approvers || candidate.body.threshold != active.threshold;
        if rotates {
            let confirm = tally(crypto, &candidate.body.approvers, &candidate.body_bytes, &candidate.signatures);
            if confirm.valid.len() < usize::try_from(candidate.body.threshold).unwrap_or(usize::MAX) {
                return Err(BundleError::RotationNotConfirmed {
                    valid: confirm.valid.len(),
                    threshold: candidate.body.threshold,
                });
            }
        }
        // KEK versions only move forward.
        for (id, rule) in &candidate.body.policy.clusters {
            if let Some(&from) = self.kek_high.get(id) {
                if rule.kek_version < from {
                    return Err(BundleError::KekVersionDecrease { cluster: id.clone(), from, to: rule.kek_version });
                }
            }
        }
        let adds_member = candidate.body.members.iter().any(|m| !active.members.contains(m));
        let loosens = rotates
            || adds_member
            || freshness_loosens(active.freshness.as_ref(), candidate.body.freshness.as_ref())
            || loosens(&active.policy, &candidate.body.policy);
        let delay_s = candidate.body.activation_delay.max(active.activation_delay);
        let activates_at_ms = if loosens { now_ms.saturating_add(delay_s.saturating_mul(1000)) } else { now_ms };
        for (id, v) in kek_versions(&candidate.body.policy) {
            let high = self.kek_high.entry(id).or_insert(v);
            *high = (*high).max(v);
        }
        let accepted = Arc::new(AcceptedBundle { bundle: candidate, digest: cand_digest });
        if loosens {
            self.pending = Some((accepted, activates_at_ms));
        } else {
            self.active = accepted;
            self.pending = None;
        }
        Ok(ApplyReport { version: found, digest: cand_digest, activates_at_ms, loosens, signatures: report })
    }

    /// The pending (loosening) bundle and when it comes into force: (version, digest,
    /// activation time). `None` when the newest bundle is in force.
    pub fn pending_activation(&self) -> Option<(u64, [u8; 48], u64)> {
        self.pending.as_ref().map(|(p, at)| (p.bundle.body.version, p.digest, *at))
    }

    /// Re-applies the activation time the KRE recorded when it first accepted exactly the
    /// pending bundle (`version`, `digest`): after a restart the chain is replayed, and a
    /// change that was already in force (or waiting) keeps its original time instead of a
    /// fresh delay. Applies only to that exact bundle and only moves the time earlier (the
    /// record is the KRE's own earlier decision; a later time is never adopted). Returns
    /// whether the time changed.
    pub fn restore_activation(&mut self, version: u64, digest: &[u8; 48], activates_at_ms: u64) -> bool {
        match &mut self.pending {
            Some((p, at)) if p.bundle.body.version == version && p.digest == *digest && activates_at_ms < *at => {
                *at = activates_at_ms;
                true
            }
            _ => false,
        }
    }

    /// The members in force at `now_ms`. While a bundle that adds members waits for its
    /// activation, only the members both it and the active bundle name are in force (a
    /// removal holds at once, an addition waits), as for the release policy.
    pub fn members_in_force(&self, now_ms: u64) -> Vec<Member> {
        let active = &self.active.bundle.body.members;
        match &self.pending {
            Some((p, at)) if now_ms < *at => {
                p.bundle.body.members.iter().filter(|m| active.contains(m)).cloned().collect()
            }
            Some((p, _)) => p.bundle.body.members.clone(),
            None => active.clone(),
        }
    }

    /// The timestamp requirement in force at `now_ms` ([`crate::freshness`]). While a loosening
    /// bundle waits, the stricter of the active and the pending bundle's: a requirement added
    /// holds at once; one dropped, a longer maximum age or another key waits for the activation
    /// (meanwhile the active bundle's key signs, with the shorter maximum age).
    pub fn freshness_in_force(&self, now_ms: u64) -> Option<Freshness> {
        let active = self.active.bundle.body.freshness.as_ref();
        match &self.pending {
            Some((p, at)) if now_ms < *at => match (active, p.bundle.body.freshness.as_ref()) {
                (None, f) | (f, None) => f.cloned(),
                (Some(a), Some(n)) if a.key == n.key => {
                    Some(Freshness { key: a.key, max_age_s: a.max_age_s.min(n.max_age_s) })
                }
                (Some(a), Some(_)) => Some(a.clone()),
            },
            Some((p, _)) => p.bundle.body.freshness.clone(),
            None => active.cloned(),
        }
    }

    /// The release policy in force at `now_ms`. While a loosening bundle waits, the effective
    /// policy is the pending one with every loosening held back: rules it adds (or widens)
    /// carry `not_before` = its activation time, and every removal or tightening applies now.
    pub fn effective(&self, now_ms: u64) -> ReleasePolicy {
        match &self.pending {
            Some((p, at)) if now_ms < *at => merge(&self.active.bundle.body.policy, &p.bundle.body.policy, *at),
            Some((p, _)) => p.bundle.body.policy.clone(),
            None => self.active.bundle.body.policy.clone(),
        }
    }
}

fn same_identity(a: &ImageRule, b: &ImageRule) -> bool {
    a.name == b.name && a.pcrs == b.pcrs
}

/// Whether `new` allows anything `old` does not.
fn loosens(old: &ReleasePolicy, new: &ReleasePolicy) -> bool {
    if new.allow_debug && !old.allow_debug {
        return true;
    }
    new.clusters.iter().any(|(id, rule)| {
        // Un-retiring KEK versions releases keys the active policy withholds.
        if old.clusters.get(id).is_some_and(|o| rule.kek_retire_below < o.kek_retire_below) {
            return true;
        }
        rule.images.iter().any(|img| {
            let Some(prev) = old.clusters.get(id).and_then(|r| r.images.iter().find(|o| same_identity(o, img))) else {
                return true;
            };
            // Another kind admits documents the active rule refuses.
            let kind_widens = prev.kind != img.kind;
            let expiry_extends = match (prev.not_after_ms, img.not_after_ms) {
                (Some(a), Some(b)) => b > a,
                (Some(_), None) => true,
                (None, _) => false,
            };
            kind_widens || expiry_extends
        })
    })
}

/// What both `old` and `new` allow, and nothing else: the policy a KRE applies while a change
/// from `old` to `new` is in force but not yet durable. A removal or tightening in `new` holds
/// at once; a cluster, image or looser rule that `new` adds does not, until `new` is durable.
///
/// Per cluster in both: the images both pin with the same PCR values and kind (what admits a
/// document; the name is a label, and a kind change admits no document under both), each
/// within both time windows; the KEK version `new`
/// names (a rotation needs its new KEK committed before anything is released under it); the
/// higher retirement of the two. Debug documents only if both allow them.
pub fn stricter(old: &ReleasePolicy, new: &ReleasePolicy) -> ReleasePolicy {
    let later = |a: Option<u64>, b: Option<u64>| a.max(b);
    let earlier = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut clusters = BTreeMap::new();
    for (id, rule) in &new.clusters {
        let Some(prev) = old.clusters.get(id) else { continue };
        let images = rule
            .images
            .iter()
            .filter_map(|img| {
                let o = prev.images.iter().find(|o| o.pcrs == img.pcrs && o.kind == img.kind)?;
                Some(ImageRule {
                    not_before_ms: later(o.not_before_ms, img.not_before_ms),
                    not_after_ms: earlier(o.not_after_ms, img.not_after_ms),
                    ..img.clone()
                })
            })
            .collect();
        let kek_retire_below = prev.kek_retire_below.max(rule.kek_retire_below).min(rule.kek_version);
        clusters.insert(id.clone(), ClusterRule { images, kek_version: rule.kek_version, kek_retire_below });
    }
    ReleasePolicy { clusters, allow_debug: old.allow_debug && new.allow_debug }
}

/// The policy in force while `new` waits for `activates_at_ms`.
fn merge(old: &ReleasePolicy, new: &ReleasePolicy, activates_at_ms: u64) -> ReleasePolicy {
    let mut clusters = BTreeMap::new();
    for (id, rule) in &new.clusters {
        let images = rule
            .images
            .iter()
            .map(|img| match old.clusters.get(id).and_then(|r| r.images.iter().find(|o| same_identity(o, img))) {
                Some(prev) => {
                    // The active rule's kind holds until the activation (a change of
                    // kind admits documents the active rule refuses).
                    let kind = prev.kind;
                    let not_after_ms = match (prev.not_after_ms, img.not_after_ms) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    ImageRule { kind, not_after_ms, ..img.clone() }
                }
                None => ImageRule { not_before_ms: Some(activates_at_ms), ..img.clone() },
            })
            .collect();
        // A rotation (kek_version) applies at once; an un-retirement waits: the stricter
        // retirement of the two holds until the activation time.
        let kek_retire_below = old
            .clusters
            .get(id)
            .map_or(rule.kek_retire_below, |o| o.kek_retire_below.max(rule.kek_retire_below))
            .min(rule.kek_version);
        clusters.insert(id.clone(), ClusterRule { images, kek_version: rule.kek_version, kek_retire_below });
    }
    ReleasePolicy { clusters, allow_debug: old.allow_debug && new.allow_debug }
}
