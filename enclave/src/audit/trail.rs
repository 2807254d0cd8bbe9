//! Offline verification of a stored trail: what a customer runs (`keygate audit verify`).
//!
//! Order: every checkpoint first (order, signature under its own key, the chain id derived
//! from that key, the attestation binding the key — at the document's own time, an enclave
//! document, the expected KRE PCRs — and that all checkpoints share one key), then the
//! entries in stored order (chain id, sequence, link to the previous entry, the head of every
//! checkpoint at that sequence), then checkpoints beyond the last entry. The first failure is
//! returned, naming the broken link.

use std::collections::{BTreeMap, HashMap};

use keygate_attestation::pcr::{self, PcrMismatch};
use keygate_attestation::{DocumentKind, PcrExpectation, VerifiedAttestation, Verifier, VerifyError, VerifyOptions};
use sha2::{Digest, Sha384};

use super::checkpoint::Checkpoint;
use super::codec::short;
use super::event::AuditEntry;
use crate::binding::chain_id_of;

/// Verification switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrailOptions {
    /// Accept a binding document from a debug-mode enclave (PCR0-2 zero; demos only).
    pub allow_debug: bool,
}

/// Why a checkpoint key is not proven to belong to a genuine KRE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotAttested {
    /// The binding document does not verify (root, chain, signature, limits, kind, debug).
    #[error("binding attestation document: {0}")]
    Document(VerifyError),
    /// The document's `public_key` is absent or is another key.
    #[error("the binding document attests a different key (or none)")]
    KeyMismatch,
    /// The document's `user_data` is not the chain id of the key.
    #[error("the binding document's user_data is not this chain's id")]
    UserDataMismatch,
    /// The checkpoint's chain id is not derived from its key.
    #[error("the checkpoint's chain id is not derived from its key")]
    ChainIdMismatch,
}

/// The first broken link of a trail. Each tampering case has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, strum::IntoStaticStr)]
#[non_exhaustive]
#[strum(serialize_all = "snake_case")]
pub enum TrailError {
    /// No entries at all.
    #[error("the trail holds no entries")]
    Empty,
    /// Entries but no checkpoint: nothing proves they come from a KRE.
    #[error("no checkpoint: the {entries} entries are not signed by any KRE")]
    NoCheckpoint {
        /// Number of entries.
        entries: usize,
    },
    /// A checkpoint's signature does not verify under its key.
    #[error("checkpoint #{index} (seq {seq}): signature invalid")]
    CheckpointSignatureInvalid {
        /// 0-based position in the checkpoint file.
        index: usize,
        /// Its sequence number.
        seq: u64,
    },
    /// A checkpoint is signed by a key no genuine KRE attested (a forged checkpoint).
    #[error("checkpoint #{index} (seq {seq}): signed by a key not attested to a KRE: {why}")]
    CheckpointKeyNotAttested {
        /// Position.
        index: usize,
        /// Sequence number.
        seq: u64,
        /// Why.
        why: NotAttested,
    },
    /// The checkpoint key is attested, but by an enclave with other PCRs than expected.
    #[error("checkpoint #{index} (seq {seq}): the KRE image is not the expected one: {mismatch}")]
    KreImageMismatch {
        /// Position.
        index: usize,
        /// Sequence number.
        seq: u64,
        /// The first PCR that differs.
        mismatch: PcrMismatch,
    },
    /// A valid checkpoint of another KRE (another chain) was spliced in.
    #[error("checkpoint #{index} (seq {seq}): from another KRE (chain {chain}), spliced into this trail")]
    ForeignCheckpoint {
        /// Position.
        index: usize,
        /// Sequence number.
        seq: u64,
        /// Its chain id (hex, 16 digits).
        chain: String,
    },
    /// Checkpoints are not in sequence order.
    #[error("checkpoint #{index} (seq {seq}) comes after one for seq {previous_seq}: checkpoints reordered")]
    CheckpointOutOfOrder {
        /// Position.
        index: usize,
        /// Sequence number.
        seq: u64,
        /// The previous checkpoint's.
        previous_seq: u64,
    },
    /// An entry of another KRE's chain was spliced in.
    #[error("entry at position {position} (seq {seq}): from another KRE (chain {chain}), spliced into this trail")]
    ForeignEntry {
        /// 0-based position in the entry file.
        position: usize,
        /// Its sequence number.
        seq: u64,
        /// Its chain id (hex, 16 digits).
        chain: String,
    },
    /// Entries are missing.
    #[error("entries {missing_from}..={missing_to} deleted (after seq {after_seq})")]
    EntryDeleted {
        /// The last intact sequence number before the gap (0: the start).
        after_seq: u64,
        /// First missing.
        missing_from: u64,
        /// Last missing.
        missing_to: u64,
    },
    /// Entries are out of order.
    #[error("entry at position {position} has seq {seq} where seq {expected} was expected: entries reordered")]
    EntryReordered {
        /// Position.
        position: usize,
        /// Found.
        seq: u64,
        /// Expected.
        expected: u64,
    },
    /// An entry appears twice.
    #[error("entry {seq} appears twice{}", if *.identical { "" } else { " with different contents" })]
    EntryDuplicated {
        /// Sequence number.
        seq: u64,
        /// Whether both copies are identical.
        identical: bool,
    },
    /// An entry's bytes do not match the digest its successor recorded.
    #[error("entry {seq} modified: its digest does not match the one entry {} recorded", .seq + 1)]
    EntryModified {
        /// The entry whose digest mismatches (for seq 1 with a wrong genesis link: 1 itself).
        seq: u64,
    },
    /// The chain is internally consistent, but a signed checkpoint says the head at `seq` is
    /// another digest: entries up to `seq` were rewritten.
    #[error("checkpoint #{index} (seq {seq}): signed head differs from entry {seq}: entries up to {seq} modified or rewritten")]
    CheckpointHeadMismatch {
        /// Position.
        index: usize,
        /// Sequence number.
        seq: u64,
    },
    /// A checkpoint covers entries that are not there: the trail was truncated after it.
    #[error("checkpoint #{index} covers seq {checkpoint_seq} but the trail ends at seq {last_seq}: truncated after the checkpoint")]
    TruncatedAfterCheckpoint {
        /// Position.
        index: usize,
        /// The checkpoint's sequence number.
        checkpoint_seq: u64,
        /// The last entry present.
        last_seq: u64,
    },
}

impl TrailError {
    /// Stable snake_case name (JSON output, metrics).
    pub fn kind(&self) -> &'static str {
        self.into()
    }
}

/// What a verified trail proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailSummary {
    /// The chain (KRE run).
    pub chain_id: [u8; 48],
    /// The checkpoint key (uncompressed P-384).
    pub checkpoint_key: Vec<u8>,
    /// Number of entries (they are seq 1..=last_seq).
    pub last_seq: u64,
    /// Entries covered by a signed checkpoint (1..=signed_up_to).
    pub signed_up_to: u64,
    /// Entries after the last checkpoint: chained but not yet signed, so their truncation
    /// would not be detectable.
    pub unsigned_tail: u64,
    /// Number of checkpoints.
    pub checkpoints: usize,
    /// Time of the last checkpoint (ms).
    pub last_checkpoint_ms: u64,
    /// Time of the first and last entries (ms).
    pub time_range_ms: (u64, u64),
    /// The KRE's module id (from the binding document).
    pub kre_module_id: String,
    /// The KRE's PCRs (from the binding document).
    pub kre_pcrs: BTreeMap<u8, Vec<u8>>,
    /// When the binding document was produced (ms).
    pub binding_time_ms: u64,
    /// Whether expected KRE PCRs were given (if not, any genuine enclave was accepted).
    pub pcrs_pinned: bool,
    /// SHA-256 of the root the binding document chains to.
    pub root_sha256: [u8; 32],
}

/// Verifies a trail with default options. See [`verify_trail_with`].
pub fn verify_trail(
    entries: &[AuditEntry],
    checkpoints: &[Checkpoint],
    verifier: &Verifier,
    expect_kre_pcrs: &[PcrExpectation],
) -> Result<TrailSummary, TrailError> {
    verify_trail_with(entries, checkpoints, verifier, expect_kre_pcrs, TrailOptions::default())
}

fn check_binding(
    cp: &Checkpoint,
    verifier: &Verifier,
    options: TrailOptions,
    cache: &mut HashMap<[u8; 48], VerifiedAttestation>,
) -> Result<VerifiedAttestation, NotAttested> {
    let doc_digest: [u8; 48] = Sha384::digest(cp.binding_document()).into();
    if let Some(att) = cache.get(&doc_digest) {
        return check_bound(att.clone(), cp.public_key(), cp.chain_id());
    }
    let att = attested_key(cp.public_key(), cp.chain_id(), cp.binding_document(), verifier, options)?;
    cache.insert(doc_digest, att.clone());
    Ok(att)
}

/// Proves that `public_key` is a KRE's audit key for `chain_id`: the chain id is derived from
/// the key, and `binding` verifies (under `verifier`'s root, at its own time, an enclave
/// document) with that key as `public_key` and the chain id as `user_data`. Returns the KRE's
/// attestation, whose PCRs the caller checks.
pub(crate) fn attested_key(
    public_key: &[u8],
    chain_id: &[u8; 48],
    binding: &[u8],
    verifier: &Verifier,
    options: TrailOptions,
) -> Result<VerifiedAttestation, NotAttested> {
    if chain_id_of(public_key) != *chain_id {
        return Err(NotAttested::ChainIdMismatch);
    }
    let mut opts = VerifyOptions::at_document_time();
    opts.require_kind = Some(DocumentKind::Enclave);
    opts.allow_debug = options.allow_debug;
    let att = verifier.verify(binding, &opts).map_err(NotAttested::Document)?;
    check_bound(att, public_key, chain_id)
}

fn check_bound(
    att: VerifiedAttestation,
    public_key: &[u8],
    chain_id: &[u8; 48],
) -> Result<VerifiedAttestation, NotAttested> {
    if chain_id_of(public_key) != *chain_id {
        return Err(NotAttested::ChainIdMismatch);
    }
    if att.public_key() != Some(public_key) {
        return Err(NotAttested::KeyMismatch);
    }
    if att.user_data() != Some(&chain_id[..]) {
        return Err(NotAttested::UserDataMismatch);
    }
    Ok(att)
}

/// Verifies `entries` (in stored order) and `checkpoints` (in stored order) against the
/// pinned root of `verifier` and the expected KRE PCRs. Returns the first broken link.
pub fn verify_trail_with(
    entries: &[AuditEntry],
    checkpoints: &[Checkpoint],
    verifier: &Verifier,
    expect_kre_pcrs: &[PcrExpectation],
    options: TrailOptions,
) -> Result<TrailSummary, TrailError> {
    if entries.is_empty() {
        return Err(TrailError::Empty);
    }
    if checkpoints.is_empty() {
        return Err(TrailError::NoCheckpoint { entries: entries.len() });
    }
    let crypto = verifier.crypto();

    // 1. Checkpoints: order, signature, binding, one key.
    let mut cache = HashMap::new();
    let mut trail: Option<(&Checkpoint, VerifiedAttestation)> = None;
    let mut previous_seq = 0;
    for (index, cp) in checkpoints.iter().enumerate() {
        let seq = cp.seq();
        if seq < previous_seq {
            return Err(TrailError::CheckpointOutOfOrder { index, seq, previous_seq });
        }
        previous_seq = seq;
        if !cp.verify_signature(crypto) {
            return Err(TrailError::CheckpointSignatureInvalid { index, seq });
        }
        let att = check_binding(cp, verifier, options, &mut cache)
            .map_err(|why| TrailError::CheckpointKeyNotAttested { index, seq, why })?;
        pcr::check(&att, expect_kre_pcrs).map_err(|mismatch| TrailError::KreImageMismatch { index, seq, mismatch })?;
        match &trail {
            Some((first, _)) if first.public_key() != cp.public_key() => {
                return Err(TrailError::ForeignCheckpoint { index, seq, chain: short(cp.chain_id()) });
            }
            Some(_) => {}
            None => trail = Some((cp, att)),
        }
    }
    let Some((first_cp, att)) = trail else {
        return Err(TrailError::NoCheckpoint { entries: entries.len() });
    };
    let chain_id = *first_cp.chain_id();

    // 2. Entries in stored order, with the checkpoint heads at their sequence numbers.
    let mut last_seq = 0u64;
    let mut last_digest = chain_id;
    let mut last_bytes: &[u8] = &[];
    let mut next_cp = 0usize;
    for (position, e) in entries.iter().enumerate() {
        if *e.chain_id() != chain_id {
            return Err(TrailError::ForeignEntry { position, seq: e.seq(), chain: short(e.chain_id()) });
        }
        let expected = last_seq.saturating_add(1);
        let seq = e.seq();
        if seq > expected {
            let later_has_missing = entries[position..].iter().any(|x| x.seq() >= expected && x.seq() < seq);
            if later_has_missing {
                return Err(TrailError::EntryReordered { position, seq, expected });
            }
            return Err(TrailError::EntryDeleted { after_seq: last_seq, missing_from: expected, missing_to: seq - 1 });
        }
        if seq < expected {
            if seq == last_seq {
                return Err(TrailError::EntryDuplicated { seq, identical: e.bytes() == last_bytes });
            }
            return Err(TrailError::EntryReordered { position, seq, expected });
        }
        if *e.prev() != last_digest {
            return Err(TrailError::EntryModified { seq: last_seq.max(1) });
        }
        let digest = e.digest();
        while let Some(cp) = checkpoints.get(next_cp).filter(|cp| cp.seq() == seq) {
            if *cp.head() != digest {
                return Err(TrailError::CheckpointHeadMismatch { index: next_cp, seq });
            }
            next_cp += 1;
        }
        last_seq = seq;
        last_digest = digest;
        last_bytes = e.bytes();
    }

    // 3. Checkpoints beyond the last entry.
    if let Some(cp) = checkpoints.get(next_cp) {
        return Err(TrailError::TruncatedAfterCheckpoint { index: next_cp, checkpoint_seq: cp.seq(), last_seq });
    }

    let last_cp = checkpoints.last().unwrap_or(first_cp);
    let signed_up_to = last_cp.seq();
    Ok(TrailSummary {
        chain_id,
        checkpoint_key: first_cp.public_key().to_vec(),
        last_seq,
        signed_up_to,
        unsigned_tail: last_seq - signed_up_to,
        checkpoints: checkpoints.len(),
        last_checkpoint_ms: last_cp.time_ms(),
        time_range_ms: (entries.first().map_or(0, AuditEntry::time_ms), entries.last().map_or(0, AuditEntry::time_ms)),
        kre_module_id: att.module_id().to_owned(),
        kre_pcrs: att.pcrs().clone(),
        binding_time_ms: att.timestamp_ms(),
        pcrs_pinned: !expect_kre_pcrs.is_empty(),
        root_sha256: att.root_sha256(),
    })
}
