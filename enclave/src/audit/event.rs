//! Audit events and entries: what is recorded, and its canonical encoding.
//!
//! An entry never holds key material: key ids and KEK versions, digests of documents and
//! bundles, PCR values, names and reasons only. Reasons are written by the KRE from its own
//! checks (the same text as a `Denied` reason), never from secret values.

use std::collections::BTreeMap;

use keygate_attestation::{DocumentKind, VerifiedAttestation};

use super::codec::{check_seq, record, DecodeError, ReadAudit, Reader, WriteAudit, Writer};
use super::{FORMAT_VERSION, MAX_ANONYMOUS_CODES, MAX_ENTRY_LEN, MAX_KEYS, MAX_TEXT};
use crate::codec::Id;

pub use crate::binding::{entry_digest, ENTRY_DOMAIN};

/// How far a chain had got: its id, the sequence number of an entry, and that entry's digest
/// (seq 0 and the chain id itself: no entry yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuditHead {
    /// The chain.
    pub chain_id: [u8; 48],
    /// The entry's sequence number (0: none).
    pub seq: u64,
    /// The entry's digest (the chain id for seq 0).
    pub digest: [u8; 48],
}

/// The attested party a decision was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// The `module_id` of its attestation document (≤ 255 bytes).
    pub module_id: String,
    /// Enclave or NitroTPM document.
    pub kind: DocumentKind,
    /// Its PCRs (index → value).
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// SHA-384 of its attestation document as received.
    pub document_sha384: [u8; 48],
}

impl Requester {
    /// The requester as described by a verified document.
    pub fn from_verified(att: &VerifiedAttestation) -> Self {
        Self {
            module_id: att.module_id().to_owned(),
            kind: att.kind(),
            pcrs: att.pcrs().clone(),
            document_sha384: att.document_sha384(),
        }
    }

    fn encode(&self, w: &mut Writer) -> Result<(), DecodeError> {
        w.text8("module_id", &self.module_id, false)?;
        w.u8(kind_to_u8(self.kind));
        w.pcrs(&self.pcrs)?;
        w.bytes(&self.document_sha384);
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            module_id: r.text8("module_id", false)?,
            kind: kind_from_u8(r.u8("document kind")?)?,
            pcrs: r.pcrs()?,
            document_sha384: r.array("document_sha384")?,
        })
    }
}

fn kind_to_u8(k: DocumentKind) -> u8 {
    match k {
        DocumentKind::Enclave => 1,
        DocumentKind::NitroTpm => 2,
    }
}

fn kind_from_u8(b: u8) -> Result<DocumentKind, DecodeError> {
    match b {
        1 => Ok(DocumentKind::Enclave),
        2 => Ok(DocumentKind::NitroTpm),
        other => Err(DecodeError::BadKind(other)),
    }
}

/// What happened. Event type numbers are stable (docs/audit.md).
#[derive(Debug, Clone, PartialEq, Eq, strum::IntoStaticStr)]
#[non_exhaustive]
#[strum(serialize_all = "snake_case")]
pub enum AuditEvent {
    /// (1) The KRE started. Its PCRs are those of its own attestation.
    KreStarted {
        /// "hardware" or "mock".
        nsm_kind: String,
        /// The KRE's own PCRs.
        pcrs: BTreeMap<u8, Vec<u8>>,
        /// The KRE software version.
        software: String,
    },
    /// (2) Data keys were released.
    ReleaseAllowed {
        /// Who received them.
        requester: Requester,
        /// Cluster.
        cluster: Id,
        /// (key id, KEK version) released, in request order (1–16).
        keys: Vec<(Id, u32)>,
        /// The policy image rule that matched.
        image: String,
    },
    /// (3) A release was refused.
    ReleaseDenied {
        /// The deny code (`DenyCode::as_str`).
        code: String,
        /// Human-readable reason (≤ 1024 bytes), never secret.
        reason: String,
        /// The requester, when its document verified.
        requester: Option<Requester>,
        /// The cluster asked for, when known.
        cluster: Option<Id>,
        /// The key ids asked for, when known (0–16).
        key_ids: Vec<Id>,
    },
    /// (4) A Hello was refused (busy, malformed, …). Written by KREs before anonymous
    /// refusals were aggregated; still decoded so that their trails verify.
    ChallengeRefused {
        /// The deny code.
        code: String,
        /// Reason.
        reason: String,
    },
    /// (5) A signed policy bundle was accepted.
    PolicyAccepted {
        /// Its version.
        version: u64,
        /// SHA-384 of its body.
        digest: [u8; 48],
        /// When it is fully in force (ms).
        activates_at_ms: u64,
    },
    /// (6) A policy push was refused.
    PolicyRefused {
        /// The pushed version, if the bundle parsed.
        version: Option<u64>,
        /// SHA-384 of the pushed body, if it parsed.
        digest: Option<[u8; 48]>,
        /// The deny code.
        code: String,
        /// Reason.
        reason: String,
    },
    /// (7) A step of unsealing the KEK state.
    UnsealStep {
        /// Which step (e.g. "sealed-state-loaded", "custodian-share-accepted").
        step: String,
        /// Whether it succeeded.
        ok: bool,
        /// Detail (never a share, key or plaintext).
        detail: String,
    },
    /// (8) A new KEK version was generated for a cluster.
    KekRotated {
        /// Cluster.
        cluster: Id,
        /// The new version.
        new_version: u32,
    },
    /// (9) A configuration setting changed (or was set at start).
    ConfigChanged {
        /// Setting name.
        setting: String,
        /// New value (≤ 1024 bytes).
        value: String,
    },
    /// (10) Events that could not be recorded while the buffer was full (inserted by
    /// [`super::AuditLog`] before the next entry once space is free).
    Unrecorded {
        /// How many appends were refused.
        count: u64,
        /// Time of the first refused append (ms).
        first_ms: u64,
        /// Time of the last refused append (ms).
        last_ms: u64,
    },
    /// (11) Refusals before any authenticated step (malformed or oversized frames,
    /// timeouts, busy, an unexpected first message, a refused Hello), counted per deny code
    /// over one period by [`super::AnonymousTally`]. Takes no release capacity (see
    /// [`super::AuditLog::append_anonymous`]).
    AnonymousRefusals {
        /// Time of the earliest refusal counted (ms).
        first_ms: u64,
        /// Time of the latest refusal counted (ms), ≥ `first_ms`.
        last_ms: u64,
        /// (deny code, count): 1–[`MAX_ANONYMOUS_CODES`] entries, codes strictly increasing
        /// (bytewise), every count ≥ 1.
        counts: Vec<(String, u64)>,
    },
    /// (12) The KRE unsealed a sealed state: this run's chain continues the history of the
    /// run that sealed it. Appended with the `unsealed` step, before any release of the run.
    ChainLinked {
        /// The generation unsealed.
        generation: u64,
        /// The audit head that generation recorded: the previous run's chain and the newest
        /// entry its parent had acknowledged storing when the generation was exported. `None`
        /// for a state sealed before audit heads were recorded (format 1 or 2).
        previous: Option<AuditHead>,
    },
}

impl AuditEvent {
    /// Stable snake_case name (CLI and JSON).
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// The decision: "allow", "deny", "accept", "refuse", "ok", "fail", "info" or "lost".
    pub fn decision(&self) -> &'static str {
        match self {
            AuditEvent::ReleaseAllowed { .. } => "allow",
            AuditEvent::ReleaseDenied { .. }
            | AuditEvent::ChallengeRefused { .. }
            | AuditEvent::AnonymousRefusals { .. } => "deny",
            AuditEvent::PolicyAccepted { .. } => "accept",
            AuditEvent::PolicyRefused { .. } => "refuse",
            AuditEvent::UnsealStep { ok: true, .. } => "ok",
            AuditEvent::UnsealStep { ok: false, .. } => "fail",
            AuditEvent::Unrecorded { .. } => "lost",
            AuditEvent::KreStarted { .. }
            | AuditEvent::KekRotated { .. }
            | AuditEvent::ConfigChanged { .. }
            | AuditEvent::ChainLinked { .. } => "info",
        }
    }

    /// Whether this event releases key material: such an event is refused while the buffer
    /// has only its reserve left (see [`super::AuditConfig::reserve`]).
    pub fn is_release(&self) -> bool {
        matches!(self, AuditEvent::ReleaseAllowed { .. })
    }

    fn type_code(&self) -> u8 {
        match self {
            AuditEvent::KreStarted { .. } => 1,
            AuditEvent::ReleaseAllowed { .. } => 2,
            AuditEvent::ReleaseDenied { .. } => 3,
            AuditEvent::ChallengeRefused { .. } => 4,
            AuditEvent::PolicyAccepted { .. } => 5,
            AuditEvent::PolicyRefused { .. } => 6,
            AuditEvent::UnsealStep { .. } => 7,
            AuditEvent::KekRotated { .. } => 8,
            AuditEvent::ConfigChanged { .. } => 9,
            AuditEvent::Unrecorded { .. } => 10,
            AuditEvent::AnonymousRefusals { .. } => 11,
            AuditEvent::ChainLinked { .. } => 12,
        }
    }

    pub(crate) fn encode(&self, w: &mut Writer) -> Result<(), DecodeError> {
        w.u8(self.type_code());
        match self {
            AuditEvent::KreStarted { nsm_kind, pcrs, software } => {
                w.text8("nsm_kind", nsm_kind, false)?;
                w.pcrs(pcrs)?;
                w.text8("software", software, true)?;
            }
            AuditEvent::ReleaseAllowed { requester, cluster, keys, image } => {
                requester.encode(w)?;
                w.id(cluster);
                if keys.is_empty() || keys.len() > MAX_KEYS {
                    return Err(DecodeError::Count { field: "keys", count: keys.len(), min: 1, max: MAX_KEYS });
                }
                w.u8(u8::try_from(keys.len()).unwrap_or(0));
                for (id, version) in keys {
                    w.id(id);
                    w.u32(*version);
                }
                w.text8("image", image, true)?;
            }
            AuditEvent::ReleaseDenied { code, reason, requester, cluster, key_ids } => {
                w.text8("code", code, false)?;
                w.text16("reason", reason, MAX_TEXT)?;
                w.flag(requester.is_some());
                if let Some(r) = requester {
                    r.encode(w)?;
                }
                w.flag(cluster.is_some());
                if let Some(c) = cluster {
                    w.id(c);
                }
                if key_ids.len() > MAX_KEYS {
                    return Err(DecodeError::Count { field: "key_ids", count: key_ids.len(), min: 0, max: MAX_KEYS });
                }
                w.u8(u8::try_from(key_ids.len()).unwrap_or(0));
                for id in key_ids {
                    w.id(id);
                }
            }
            AuditEvent::ChallengeRefused { code, reason } => {
                w.text8("code", code, false)?;
                w.text16("reason", reason, MAX_TEXT)?;
            }
            AuditEvent::PolicyAccepted { version, digest, activates_at_ms } => {
                w.u64(*version);
                w.bytes(digest);
                w.u64(*activates_at_ms);
            }
            AuditEvent::PolicyRefused { version, digest, code, reason } => {
                w.flag(version.is_some());
                if let Some(v) = version {
                    w.u64(*v);
                }
                w.flag(digest.is_some());
                if let Some(d) = digest {
                    w.bytes(d);
                }
                w.text8("code", code, false)?;
                w.text16("reason", reason, MAX_TEXT)?;
            }
            AuditEvent::UnsealStep { step, ok, detail } => {
                w.text8("step", step, false)?;
                w.flag(*ok);
                w.text16("detail", detail, MAX_TEXT)?;
            }
            AuditEvent::KekRotated { cluster, new_version } => {
                w.id(cluster);
                w.u32(*new_version);
            }
            AuditEvent::ConfigChanged { setting, value } => {
                w.text8("setting", setting, false)?;
                w.text16("value", value, MAX_TEXT)?;
            }
            AuditEvent::Unrecorded { count, first_ms, last_ms } => {
                w.u64(*count);
                w.u64(*first_ms);
                w.u64(*last_ms);
            }
            AuditEvent::AnonymousRefusals { first_ms, last_ms, counts } => {
                check_anonymous(*first_ms, *last_ms, counts.iter().map(|(c, n)| (c.as_str(), *n)))?;
                w.u64(*first_ms);
                w.u64(*last_ms);
                if counts.is_empty() || counts.len() > MAX_ANONYMOUS_CODES {
                    return Err(DecodeError::Count {
                        field: "counts",
                        count: counts.len(),
                        min: 1,
                        max: MAX_ANONYMOUS_CODES,
                    });
                }
                w.u8(u8::try_from(counts.len()).unwrap_or(0));
                for (code, count) in counts {
                    w.text8("code", code, false)?;
                    w.u64(*count);
                }
            }
            AuditEvent::ChainLinked { generation, previous } => {
                w.u64(*generation);
                w.flag(previous.is_some());
                if let Some(h) = previous {
                    w.bytes(&h.chain_id);
                    w.u64(h.seq);
                    w.bytes(&h.digest);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let ty = r.u8("event type")?;
        Ok(match ty {
            1 => AuditEvent::KreStarted {
                nsm_kind: r.text8("nsm_kind", false)?,
                pcrs: r.pcrs()?,
                software: r.text8("software", true)?,
            },
            2 => {
                let requester = Requester::decode(r)?;
                let cluster = r.id("cluster")?;
                let keys = r.list("keys", 1, MAX_KEYS, |r| Ok((r.id("key id")?, r.u32("key version")?)))?;
                AuditEvent::ReleaseAllowed { requester, cluster, keys, image: r.text8("image", true)? }
            }
            3 => {
                let code = r.text8("code", false)?;
                let reason = r.text16("reason", MAX_TEXT)?;
                let requester = if r.flag("requester present")? { Some(Requester::decode(r)?) } else { None };
                let cluster = if r.flag("cluster present")? { Some(r.id("cluster")?) } else { None };
                let key_ids = r.list("key_ids", 0, MAX_KEYS, |r| Ok(r.id("key id")?))?;
                AuditEvent::ReleaseDenied { code, reason, requester, cluster, key_ids }
            }
            4 => AuditEvent::ChallengeRefused { code: r.text8("code", false)?, reason: r.text16("reason", MAX_TEXT)? },
            5 => AuditEvent::PolicyAccepted {
                version: r.u64("version")?,
                digest: r.array("digest")?,
                activates_at_ms: r.u64("activates_at_ms")?,
            },
            6 => {
                let version = if r.flag("version present")? { Some(r.u64("version")?) } else { None };
                let digest = if r.flag("digest present")? { Some(r.array("digest")?) } else { None };
                AuditEvent::PolicyRefused {
                    version,
                    digest,
                    code: r.text8("code", false)?,
                    reason: r.text16("reason", MAX_TEXT)?,
                }
            }
            7 => AuditEvent::UnsealStep {
                step: r.text8("step", false)?,
                ok: r.flag("ok")?,
                detail: r.text16("detail", MAX_TEXT)?,
            },
            8 => AuditEvent::KekRotated { cluster: r.id("cluster")?, new_version: r.u32("new_version")? },
            9 => AuditEvent::ConfigChanged { setting: r.text8("setting", false)?, value: r.text16("value", MAX_TEXT)? },
            10 => AuditEvent::Unrecorded {
                count: r.u64("count")?,
                first_ms: r.u64("first_ms")?,
                last_ms: r.u64("last_ms")?,
            },
            11 => {
                let first_ms = r.u64("first_ms")?;
                let last_ms = r.u64("last_ms")?;
                let counts =
                    r.list("counts", 1, MAX_ANONYMOUS_CODES, |r| Ok((r.text8("code", false)?, r.u64("count")?)))?;
                check_anonymous(first_ms, last_ms, counts.iter().map(|(c, n)| (c.as_str(), *n)))?;
                AuditEvent::AnonymousRefusals { first_ms, last_ms, counts }
            }
            12 => {
                let generation = r.u64("generation")?;
                let previous = if r.flag("previous present")? {
                    Some(AuditHead {
                        chain_id: r.array("previous chain")?,
                        seq: r.u64("previous seq")?,
                        digest: r.array("previous digest")?,
                    })
                } else {
                    None
                };
                AuditEvent::ChainLinked { generation, previous }
            }
            other => return Err(DecodeError::UnknownEvent(other)),
        })
    }
}

/// The rules of an `anonymous_refusals` body that lengths alone do not express, checked
/// identically on encode and decode so that the encoding stays canonical: times in order,
/// codes strictly increasing (sorted, no duplicate), no zero count.
fn check_anonymous<'a>(
    first_ms: u64,
    last_ms: u64,
    counts: impl Iterator<Item = (&'a str, u64)>,
) -> Result<(), DecodeError> {
    if first_ms > last_ms {
        return Err(DecodeError::BadAnonymousCounts("first_ms after last_ms"));
    }
    let mut last: Option<&str> = None;
    for (code, count) in counts {
        if last.is_some_and(|l| code.as_bytes() <= l.as_bytes()) {
            return Err(DecodeError::BadAnonymousCounts("codes not strictly increasing"));
        }
        if count == 0 {
            return Err(DecodeError::BadAnonymousCounts("zero count"));
        }
        last = Some(code);
    }
    Ok(())
}

/// One record of the chain. Holds its exact encoding: the digest is over those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    chain_id: [u8; 48],
    seq: u64,
    prev: [u8; 48],
    time_ms: u64,
    policy_version: u64,
    event: AuditEvent,
    raw: Vec<u8>,
}

impl AuditEntry {
    /// Builds and encodes an entry (used by [`super::AuditLog`]; tests use it to forge).
    pub fn new(
        chain_id: [u8; 48],
        seq: u64,
        prev: [u8; 48],
        time_ms: u64,
        policy_version: u64,
        event: AuditEvent,
    ) -> Result<Self, DecodeError> {
        check_seq(seq)?;
        let mut w = Writer::default();
        w.u8(FORMAT_VERSION);
        w.bytes(&chain_id);
        w.u64(seq);
        w.bytes(&prev);
        w.u64(time_ms);
        w.u64(policy_version);
        event.encode(&mut w)?;
        if w.len() > MAX_ENTRY_LEN {
            return Err(DecodeError::TooLarge { len: w.len(), max: MAX_ENTRY_LEN });
        }
        Ok(Self { chain_id, seq, prev, time_ms, policy_version, event, raw: w.into_bytes() })
    }

    /// Strictly decodes one entry: version 1, every limit, no trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = record(bytes, MAX_ENTRY_LEN)?;
        let chain_id = r.array("chain_id")?;
        let seq = r.seq("seq")?;
        let prev = r.array("prev")?;
        let time_ms = r.u64("time_ms")?;
        let policy_version = r.u64("policy_version")?;
        let event = AuditEvent::decode(&mut r)?;
        r.finish()?;
        Ok(Self { chain_id, seq, prev, time_ms, policy_version, event, raw: bytes.to_vec() })
    }

    /// The exact encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }
    /// `SHA-384(ENTRY_DOMAIN ‖ bytes)`.
    pub fn digest(&self) -> [u8; 48] {
        entry_digest(&self.raw)
    }
    /// The chain (KRE run) this entry belongs to.
    pub fn chain_id(&self) -> &[u8; 48] {
        &self.chain_id
    }
    /// Sequence number, from 1.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Digest of the previous entry (for seq 1: the chain id).
    pub fn prev(&self) -> &[u8; 48] {
        &self.prev
    }
    /// When it was recorded (ms since the Unix epoch, the KRE's clock).
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }
    /// The policy version in force (0: a static policy file, no signed bundle).
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }
    /// What happened.
    pub fn event(&self) -> &AuditEvent {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requester() -> Requester {
        Requester {
            module_id: "i-0123-enc0123".into(),
            kind: DocumentKind::NitroTpm,
            pcrs: (0u8..3).map(|i| (i, vec![i + 1; 48])).collect(),
            document_sha384: [9; 48],
        }
    }

    fn id(s: &str) -> Id {
        Id::new(s).expect("id")
    }

    pub(crate) fn every_event() -> Vec<AuditEvent> {
        vec![
            AuditEvent::KreStarted { nsm_kind: "mock".into(), pcrs: requester().pcrs, software: "0.1.0".into() },
            AuditEvent::ReleaseAllowed {
                requester: requester(),
                cluster: id("prod"),
                keys: vec![(id("etcd-kek"), 3), (id("other"), 1)],
                image: "cp-good".into(),
            },
            AuditEvent::ReleaseDenied {
                code: "image_not_allowed".into(),
                reason: "no image rule matches".into(),
                requester: Some(requester()),
                cluster: Some(id("prod")),
                key_ids: vec![id("etcd-kek")],
            },
            AuditEvent::ReleaseDenied {
                code: "malformed".into(),
                reason: String::new(),
                requester: None,
                cluster: None,
                key_ids: vec![],
            },
            AuditEvent::ChallengeRefused { code: "busy".into(), reason: "challenge table full".into() },
            AuditEvent::PolicyAccepted { version: 7, digest: [1; 48], activates_at_ms: 99 },
            AuditEvent::PolicyRefused {
                version: Some(3),
                digest: Some([2; 48]),
                code: "rollback".into(),
                reason: "x".into(),
            },
            AuditEvent::PolicyRefused { version: None, digest: None, code: "malformed".into(), reason: "y".into() },
            AuditEvent::UnsealStep { step: "sealed-state-loaded".into(), ok: true, detail: "2 clusters".into() },
            AuditEvent::KekRotated { cluster: id("prod"), new_version: 4 },
            AuditEvent::ConfigChanged { setting: "challenge_ttl".into(), value: "30s".into() },
            AuditEvent::Unrecorded { count: 5, first_ms: 1, last_ms: 2 },
            AuditEvent::AnonymousRefusals {
                first_ms: 10,
                last_ms: 70_000,
                counts: vec![("busy".into(), 12), ("wrong_channel".into(), 3)],
            },
            AuditEvent::ChainLinked {
                generation: 9,
                previous: Some(AuditHead { chain_id: [3; 48], seq: 57, digest: [4; 48] }),
            },
            AuditEvent::ChainLinked { generation: 2, previous: None },
        ]
    }

    #[test]
    fn chain_linked_known_bytes_and_strict_flag() {
        let head = AuditHead { chain_id: [3; 48], seq: 57, digest: [4; 48] };
        let ev = AuditEvent::ChainLinked { generation: 9, previous: Some(head) };
        assert_eq!((ev.name(), ev.decision(), ev.is_release()), ("chain_linked", "info", false));
        let e = AuditEntry::new([0; 48], 1, [0; 48], 0, 0, ev).expect("encode");
        assert_eq!(e.bytes()[BODY - 1], 12);
        let body = [&9u64.to_be_bytes()[..], &[1], &[3; 48], &57u64.to_be_bytes(), &[4; 48]].concat();
        assert_eq!(&e.bytes()[BODY..], &body[..]);
        let none =
            AuditEntry::new([0; 48], 1, [0; 48], 0, 0, AuditEvent::ChainLinked { generation: 2, previous: None })
                .expect("encode");
        assert_eq!(&none.bytes()[BODY..], &[&2u64.to_be_bytes()[..], &[0]].concat()[..]);
        let mut b = none.bytes().to_vec();
        b[BODY + 8] = 2;
        assert_eq!(AuditEntry::decode(&b), Err(DecodeError::BadFlag { field: "previous present", value: 2 }));
        let mut b = e.bytes().to_vec();
        b.pop();
        assert!(matches!(AuditEntry::decode(&b), Err(DecodeError::Truncated(_))));
    }

    fn anonymous(counts: &[(&str, u64)]) -> AuditEvent {
        AuditEvent::AnonymousRefusals {
            first_ms: 1,
            last_ms: 2,
            counts: counts.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
        }
    }

    /// Offset of the event body (after the type byte) in an entry.
    const BODY: usize = 1 + 48 + 8 + 48 + 8 + 8 + 1;

    #[test]
    fn anonymous_refusals_known_bytes() {
        let ev = anonymous(&[("busy", 12), ("wrong_channel", 3)]);
        assert_eq!((ev.name(), ev.decision(), ev.is_release()), ("anonymous_refusals", "deny", false));
        let e = AuditEntry::new([0; 48], 1, [0; 48], 0, 0, ev).expect("encode");
        assert_eq!(e.bytes()[BODY - 1], 11);
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_be_bytes());
        body.extend_from_slice(&2u64.to_be_bytes());
        body.push(2);
        body.extend_from_slice(b"\x04busy");
        body.extend_from_slice(&12u64.to_be_bytes());
        body.extend_from_slice(b"\x0dwrong_channel");
        body.extend_from_slice(&3u64.to_be_bytes());
        assert_eq!(&e.bytes()[BODY..], &body[..]);
    }

    #[test]
    fn anonymous_refusals_must_be_canonical() {
        let bad = |counts: &[(&str, u64)]| AuditEntry::new([0; 48], 1, [0; 48], 0, 0, anonymous(counts));
        let unsorted = DecodeError::BadAnonymousCounts("codes not strictly increasing");
        assert_eq!(bad(&[("timeout", 1), ("busy", 1)]), Err(unsorted.clone()));
        assert_eq!(bad(&[("busy", 1), ("busy", 1)]), Err(unsorted.clone()));
        assert_eq!(bad(&[("busy", 0)]), Err(DecodeError::BadAnonymousCounts("zero count")));
        assert_eq!(bad(&[]), Err(DecodeError::Count { field: "counts", count: 0, min: 1, max: MAX_ANONYMOUS_CODES }));
        let codes: Vec<String> = (0..=MAX_ANONYMOUS_CODES).map(|i| format!("c{i:02}")).collect();
        let too_many: Vec<(&str, u64)> = codes.iter().map(|c| (c.as_str(), 1)).collect();
        assert_eq!(bad(&too_many), Err(DecodeError::Count { field: "counts", count: 33, min: 1, max: 32 }));
        assert_eq!(bad(&too_many[..MAX_ANONYMOUS_CODES]).map(|_| ()), Ok(()));
        assert_eq!(bad(&[("", 1)]), Err(DecodeError::Empty("code")));
        let backwards = AuditEvent::AnonymousRefusals { first_ms: 3, last_ms: 2, counts: vec![("busy".into(), 1)] };
        assert_eq!(
            AuditEntry::new([0; 48], 1, [0; 48], 0, 0, backwards),
            Err(DecodeError::BadAnonymousCounts("first_ms after last_ms"))
        );

        // The decoder refuses what the encoder refuses: tamper a valid entry.
        let ok = AuditEntry::new([0; 48], 1, [0; 48], 0, 0, anonymous(&[("aa", 1), ("ab", 1)])).expect("ok");
        let at = |b: &[u8]| AuditEntry::decode(b);
        let n = BODY + 16;
        // n ‖ 02 "aa" ‖ count[8] ‖ 02 "ab" ‖ count[8]
        let (first_code, second_code) = (n + 2, n + 1 + 3 + 8 + 2);
        let mut b = ok.bytes().to_vec();
        b[second_code] = b'a'; // "aa", "aa": a duplicate
        assert_eq!(at(&b), Err(unsorted.clone()));
        let mut b = ok.bytes().to_vec();
        b[first_code] = b'c'; // "ca", "ab": unsorted
        assert_eq!(at(&b), Err(unsorted));
        let mut b = ok.bytes().to_vec();
        b[n + 1 + 3 + 7] = 0; // count of "aa" = 0
        assert_eq!(at(&b), Err(DecodeError::BadAnonymousCounts("zero count")));
        let mut b = ok.bytes().to_vec();
        b[BODY + 7] = 3; // first_ms = 3 > last_ms = 2
        assert_eq!(at(&b), Err(DecodeError::BadAnonymousCounts("first_ms after last_ms")));
        for (count, n_byte) in [(0, 0u8), (33, 33), (255, 255)] {
            let mut b = ok.bytes().to_vec();
            b[n] = n_byte;
            assert_eq!(at(&b), Err(DecodeError::Count { field: "counts", count, min: 1, max: 32 }));
        }
        let mut b = ok.bytes().to_vec();
        b[n] = 3; // one pair more than present: truncated, not an over-allocation
        assert_eq!(at(&b), Err(DecodeError::Truncated("code")));
    }

    /// The names are a stable interface (trail JSON, `audit show`, metrics): pinned here.
    #[test]
    fn event_names_are_the_published_ones() {
        let names: Vec<&str> = every_event().iter().map(AuditEvent::name).collect();
        let mut published = vec![
            "kre_started",
            "release_allowed",
            "release_denied",
            "challenge_refused",
            "policy_accepted",
            "policy_refused",
            "unseal_step",
            "kek_rotated",
            "config_changed",
            "unrecorded",
            "anonymous_refusals",
            "chain_linked",
        ];
        let mut seen = names.clone();
        seen.sort_unstable();
        seen.dedup();
        published.sort_unstable();
        assert_eq!(seen, published, "every event: {names:?}");
    }

    #[test]
    fn every_event_round_trips_canonically() {
        for (i, ev) in every_event().into_iter().enumerate() {
            let e = AuditEntry::new([7; 48], 1 + u64::try_from(i).expect("i"), [8; 48], 1000, 2, ev).expect("encode");
            let d = AuditEntry::decode(e.bytes()).expect("decode");
            assert_eq!(d, e);
            let again =
                AuditEntry::new(*d.chain_id(), d.seq(), *d.prev(), d.time_ms(), d.policy_version(), d.event().clone())
                    .expect("re-encode");
            assert_eq!(again.bytes(), e.bytes(), "not canonical: {}", e.event().name());
        }
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        for ev in every_event() {
            let e = AuditEntry::new([7; 48], 1, [8; 48], 1000, 2, ev).expect("encode");
            let b = e.bytes();
            for n in 0..b.len() {
                assert!(AuditEntry::decode(&b[..n]).is_err(), "{} truncated to {n} accepted", e.event().name());
            }
            let mut long = b.to_vec();
            long.push(0);
            assert_eq!(AuditEntry::decode(&long), Err(DecodeError::TrailingBytes(1)));
        }
    }

    #[test]
    fn every_single_byte_change_fails_or_changes_the_digest() {
        let e = AuditEntry::new([7; 48], 1, [8; 48], 1000, 2, every_event().swap_remove(2)).expect("encode");
        for i in 0..e.bytes().len() {
            let mut b = e.bytes().to_vec();
            b[i] ^= 0x01;
            if let Ok(d) = AuditEntry::decode(&b) {
                assert_ne!(d.digest(), e.digest());
                assert_ne!(d, e);
            }
        }
    }

    #[test]
    fn limits_are_enforced_on_encode_and_decode() {
        let long = "x".repeat(MAX_TEXT + 1);
        let ev = AuditEvent::ChallengeRefused { code: "busy".into(), reason: long };
        assert!(matches!(AuditEntry::new([0; 48], 1, [0; 48], 0, 0, ev), Err(DecodeError::FieldTooLong { .. })));
        let ev = AuditEvent::ChallengeRefused { code: "busy".into(), reason: String::new() };
        assert_eq!(AuditEntry::new([0; 48], 0, [0; 48], 0, 0, ev.clone()), Err(DecodeError::ZeroSequence));
        let mut b = AuditEntry::new([0; 48], 1, [0; 48], 0, 0, ev).expect("ok").bytes().to_vec();
        b[0] = 2;
        assert_eq!(AuditEntry::decode(&b), Err(DecodeError::Version(2)));
        b[0] = 1;
        b[1 + 48 + 8 + 48 + 8 + 8] = 77;
        assert_eq!(AuditEntry::decode(&b), Err(DecodeError::UnknownEvent(77)));
        let too_many = AuditEvent::ReleaseAllowed {
            requester: requester(),
            cluster: id("c"),
            keys: (0..17).map(|i| (id(&format!("k{i}")), 1)).collect(),
            image: String::new(),
        };
        assert!(matches!(AuditEntry::new([0; 48], 1, [0; 48], 0, 0, too_many), Err(DecodeError::Count { .. })));
        assert!(matches!(AuditEntry::decode(&vec![1; MAX_ENTRY_LEN + 1]), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn pcr_lists_must_be_canonical() {
        let ev = AuditEvent::KreStarted {
            nsm_kind: "mock".into(),
            pcrs: BTreeMap::from([(1, vec![0; 48]), (2, vec![0; 48])]),
            software: String::new(),
        };
        let e = AuditEntry::new([0; 48], 1, [0; 48], 0, 0, ev).expect("ok");
        let hdr = 1 + 48 + 8 + 48 + 8 + 8 + 1 + 1 + 4; // … type, str8("mock")
        let mut b = e.bytes().to_vec();
        assert_eq!(b[hdr], 2);
        // Swap the indexes: 2 then 1.
        b[hdr + 1] = 2;
        b[hdr + 1 + 2 + 48] = 1;
        assert_eq!(AuditEntry::decode(&b), Err(DecodeError::BadPcr("indexes not strictly increasing")));
        let mut b = e.bytes().to_vec();
        b[hdr + 1] = 32;
        assert_eq!(AuditEntry::decode(&b), Err(DecodeError::BadPcr("index ≥ 32")));
    }
}
