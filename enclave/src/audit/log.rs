//! The KRE's bounded audit buffer.
//!
//! Entries stay in the buffer until the parent has stored them durably and acknowledged
//! them ([`AuditLog::ack`]). The buffer never drops an unacknowledged entry: when it is full
//! [`AuditLog::append`] refuses, and the KRE must then refuse releases (fail closed). A
//! reserve of slots is kept for events that release nothing (denials, policy, start), so that
//! refusals are still recorded while releases are already blocked; appends refused even
//! from the reserve are counted and recorded as one [`AuditEvent::Unrecorded`] entry as soon
//! as space is free again.

use std::collections::VecDeque;

use super::checkpoint::{AuditSigner, Checkpoint};
use super::event::{AuditEntry, AuditEvent};
use super::{AuditError, MAX_ENTRY_LEN};

/// Buffer limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Most unacknowledged entries.
    pub capacity: usize,
    /// Most unacknowledged bytes (entries are ≤ 8 KiB each).
    pub max_bytes: usize,
    /// Slots (of `capacity`, and `reserve` × 8 KiB of `max_bytes`) that only non-release
    /// events may use.
    pub reserve: usize,
    /// Most entries returned by one [`AuditLog::entries_after`].
    pub max_batch: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { capacity: 65_536, max_bytes: 64 * 1024 * 1024, reserve: 256, max_batch: 1024 }
    }
}

/// Counters for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditStatus {
    /// Sequence number of the last entry (0: none yet).
    pub last_seq: u64,
    /// Digest of the last entry (the chain id before the first).
    pub head: [u8; 48],
    /// The chain id.
    pub chain_id: [u8; 48],
    /// Highest acknowledged sequence number.
    pub acked_up_to: u64,
    /// Entries waiting for acknowledgement.
    pub buffered: usize,
    /// Their size in bytes.
    pub buffered_bytes: usize,
    /// Configured capacity.
    pub capacity: usize,
    /// True when releases are refused (only the reserve is left).
    pub full: bool,
    /// Appends refused since start (buffer full).
    pub refused_total: u64,
    /// Refused appends not yet recorded as an `Unrecorded` entry.
    pub unrecorded_pending: u64,
    /// Checkpoints signed since start.
    pub checkpoints_signed: u64,
}

/// The hash chain and its bounded buffer. One per KRE run.
#[derive(Debug)]
pub struct AuditLog {
    config: AuditConfig,
    signer: AuditSigner,
    buffer: VecDeque<AuditEntry>,
    buffered_bytes: usize,
    last_seq: u64,
    head: [u8; 48],
    acked_up_to: u64,
    policy_version: u64,
    refused_total: u64,
    /// (count, first_ms, last_ms) of refused appends not yet recorded.
    unrecorded: Option<(u64, u64, u64)>,
    checkpoints_signed: u64,
}

impl AuditLog {
    /// A new, empty chain signed by `signer` (its chain id anchors entry 1).
    pub fn new(config: AuditConfig, signer: AuditSigner) -> Self {
        let head = *signer.chain_id();
        Self {
            config,
            signer,
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            last_seq: 0,
            head,
            acked_up_to: 0,
            policy_version: 0,
            refused_total: 0,
            unrecorded: None,
            checkpoints_signed: 0,
        }
    }

    /// Sets the policy version recorded in later entries (0: static policy).
    pub fn set_policy_version(&mut self, version: u64) {
        self.policy_version = version;
    }

    /// The signer (its public key and chain id, for status).
    pub fn signer(&self) -> &AuditSigner {
        &self.signer
    }

    fn free_slots(&self) -> usize {
        self.config.capacity.saturating_sub(self.buffer.len())
    }

    fn free_bytes(&self) -> usize {
        self.config.max_bytes.saturating_sub(self.buffered_bytes)
    }

    /// True when a release cannot be recorded: only the reserve is left. The KRE refuses
    /// releases while this holds (and `append` of a release would refuse anyway).
    pub fn is_full(&self) -> bool {
        let reserve_bytes = self.config.reserve.saturating_add(1).saturating_mul(MAX_ENTRY_LEN);
        self.free_slots() <= self.config.reserve || self.free_bytes() < reserve_bytes
    }

    fn fits(&self, slots: usize, bytes: usize, release: bool) -> bool {
        let (reserve_slots, reserve_bytes) =
            if release { (self.config.reserve, self.config.reserve.saturating_mul(MAX_ENTRY_LEN)) } else { (0, 0) };
        self.free_slots() >= slots.saturating_add(reserve_slots)
            && self.free_bytes() >= bytes.saturating_add(reserve_bytes)
    }

    /// Counts a refused append. A refused release is not a lost record (the release does
    /// not happen; the caller records a denial instead); any other refused event is.
    fn refuse(&mut self, now_ms: u64, release: bool) -> AuditError {
        self.refused_total = self.refused_total.saturating_add(1);
        if release {
            return AuditError::BufferFull { buffered: self.buffer.len(), bytes: self.buffered_bytes };
        }
        self.unrecorded = Some(match self.unrecorded {
            Some((n, first, _)) => (n.saturating_add(1), first, now_ms),
            None => (1, now_ms, now_ms),
        });
        AuditError::BufferFull { buffered: self.buffer.len(), bytes: self.buffered_bytes }
    }

    fn build(&self, event: AuditEvent, now_ms: u64, seq: u64, prev: [u8; 48]) -> Result<AuditEntry, AuditError> {
        AuditEntry::new(*self.signer.chain_id(), seq, prev, now_ms, self.policy_version, event)
            .map_err(AuditError::Encode)
    }

    fn push(&mut self, entry: AuditEntry) {
        self.head = entry.digest();
        self.last_seq = entry.seq();
        self.buffered_bytes = self.buffered_bytes.saturating_add(entry.bytes().len());
        self.buffer.push_back(entry);
    }

    /// Records `event` at `now_ms`; returns its sequence number. Refuses with
    /// [`AuditError::BufferFull`] when it does not fit (a release also when only the reserve
    /// is left): the caller must then not perform the action it was recording.
    pub fn append(&mut self, event: AuditEvent, now_ms: u64) -> Result<u64, AuditError> {
        let seq = self.last_seq.checked_add(1).ok_or(AuditError::SequenceOverflow)?;
        let release = event.is_release();
        // Encode first: an unencodable event is a caller bug, not a full buffer.
        let probe = self.build(event, now_ms, seq, self.head)?;
        let gap = match self.unrecorded {
            Some((count, first_ms, last_ms)) => {
                Some(self.build(AuditEvent::Unrecorded { count, first_ms, last_ms }, now_ms, seq, self.head)?)
            }
            None => None,
        };
        let (slots, bytes) = match &gap {
            Some(g) => (2, g.bytes().len().saturating_add(probe.bytes().len())),
            None => (1, probe.bytes().len()),
        };
        if !self.fits(slots, bytes, release) {
            return Err(self.refuse(now_ms, release));
        }
        let entry = match gap {
            Some(g) => {
                self.push(g);
                self.unrecorded = None;
                let seq = self.last_seq.checked_add(1).ok_or(AuditError::SequenceOverflow)?;
                self.build(probe.event().clone(), now_ms, seq, self.head)?
            }
            None => probe,
        };
        let seq = entry.seq();
        self.push(entry);
        Ok(seq)
    }

    /// Up to `max` (and at most `max_batch`) buffered entries with a sequence number above
    /// `after`, oldest first.
    pub fn entries_after(&self, after: u64, max: usize) -> Vec<AuditEntry> {
        let first = match self.buffer.front() {
            Some(e) => e.seq(),
            None => return Vec::new(),
        };
        let skip = usize::try_from(after.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        self.buffer.iter().skip(skip).take(max.min(self.config.max_batch)).cloned().collect()
    }

    /// The parent has durably stored every entry up to `up_to`: frees their space. Returns
    /// how many entries were freed. Acknowledging less than before is a no-op.
    pub fn ack(&mut self, up_to: u64) -> Result<usize, AuditError> {
        if up_to > self.last_seq {
            return Err(AuditError::AckBeyondHead { acked: up_to, last: self.last_seq });
        }
        let mut freed = 0;
        while self.buffer.front().is_some_and(|e| e.seq() <= up_to) {
            if let Some(e) = self.buffer.pop_front() {
                self.buffered_bytes = self.buffered_bytes.saturating_sub(e.bytes().len());
                freed += 1;
            }
        }
        self.acked_up_to = self.acked_up_to.max(up_to);
        Ok(freed)
    }

    /// Signs the current head: `(last seq, head digest, now_ms)`.
    pub fn checkpoint(&mut self, now_ms: u64) -> Result<Checkpoint, AuditError> {
        if self.last_seq == 0 {
            return Err(AuditError::NothingToCheckpoint);
        }
        let cp = self.signer.sign(self.last_seq, self.head, now_ms)?;
        self.checkpoints_signed = self.checkpoints_signed.saturating_add(1);
        Ok(cp)
    }

    /// Counters for the KRE's status and metrics.
    pub fn status(&self) -> AuditStatus {
        AuditStatus {
            last_seq: self.last_seq,
            head: self.head,
            chain_id: *self.signer.chain_id(),
            acked_up_to: self.acked_up_to,
            buffered: self.buffer.len(),
            buffered_bytes: self.buffered_bytes,
            capacity: self.config.capacity,
            full: self.is_full(),
            refused_total: self.refused_total,
            unrecorded_pending: self.unrecorded.map_or(0, |u| u.0),
            checkpoints_signed: self.checkpoints_signed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_attestation::crypto::default_backend;

    fn log(capacity: usize, reserve: usize) -> AuditLog {
        let mut s = AuditSigner::generate(default_backend(), |b| b.fill(7)).expect("key");
        s.bind(vec![1; 10]).expect("bind");
        AuditLog::new(AuditConfig { capacity, reserve, ..AuditConfig::default() }, s)
    }

    fn info(n: u32) -> AuditEvent {
        AuditEvent::ConfigChanged { setting: "n".into(), value: n.to_string() }
    }

    fn release() -> AuditEvent {
        AuditEvent::ReleaseAllowed {
            requester: super::super::Requester {
                module_id: "m".into(),
                kind: keygate_attestation::DocumentKind::Enclave,
                pcrs: Default::default(),
                document_sha384: [0; 48],
            },
            cluster: crate::wire::Id::new("c").expect("id"),
            keys: vec![(crate::wire::Id::new("k").expect("id"), 1)],
            image: "i".into(),
        }
    }

    #[test]
    fn chain_links_and_sequence() {
        let mut l = log(10, 0);
        assert_eq!(l.append(info(1), 10), Ok(1));
        assert_eq!(l.append(info(2), 11), Ok(2));
        let es = l.entries_after(0, 10);
        assert_eq!(es.len(), 2);
        assert_eq!(es[0].prev(), l.signer().chain_id());
        assert_eq!(es[1].prev(), &es[0].digest());
        assert_eq!(l.status().head, es[1].digest());
        assert_eq!(l.entries_after(1, 10), vec![es[1].clone()]);
        assert_eq!(l.entries_after(2, 10), vec![]);
        assert_eq!(l.entries_after(0, 1).len(), 1);
    }

    #[test]
    fn full_buffer_refuses_and_ack_frees() {
        let mut l = log(3, 1);
        assert_eq!(l.append(release(), 1), Ok(1));
        assert_eq!(l.append(release(), 2), Ok(2));
        assert!(l.is_full());
        // Releases fail closed; the reserve still takes a denial.
        assert!(matches!(l.append(release(), 3), Err(AuditError::BufferFull { .. })));
        assert_eq!(l.append(info(1), 4), Ok(3));
        assert!(matches!(l.append(info(2), 5), Err(AuditError::BufferFull { .. })));
        assert!(matches!(l.append(info(3), 6), Err(AuditError::BufferFull { .. })));
        let st = l.status();
        assert_eq!((st.refused_total, st.unrecorded_pending, st.buffered, st.full), (3, 2, 3, true));
        assert_eq!(l.ack(9), Err(AuditError::AckBeyondHead { acked: 9, last: 3 }));
        assert_eq!(l.ack(2), Ok(2));
        assert_eq!(l.ack(1), Ok(0));
        // The loss is recorded before the next entry.
        assert_eq!(l.append(info(4), 7), Ok(5));
        let es = l.entries_after(2, 10);
        assert_eq!(es[1].event(), &AuditEvent::Unrecorded { count: 2, first_ms: 5, last_ms: 6 });
        assert_eq!(es[1].seq(), 4);
        assert_eq!(es[2].prev(), &es[1].digest());
        assert_eq!(l.status().unrecorded_pending, 0);
    }

    #[test]
    fn checkpoint_signs_the_head() {
        let mut l = log(10, 0);
        assert_eq!(l.checkpoint(1).map(|_| ()), Err(AuditError::NothingToCheckpoint));
        l.append(info(1), 1).expect("append");
        let cp = l.checkpoint(5).expect("cp");
        assert_eq!((cp.seq(), *cp.head(), cp.time_ms()), (1, l.status().head, 5));
        assert!(cp.verify_signature(default_backend()));
        assert_eq!(l.status().checkpoints_signed, 1);
    }

    #[test]
    fn byte_limit_is_enforced() {
        let mut s = AuditSigner::generate(default_backend(), |b| b.fill(7)).expect("key");
        s.bind(vec![1; 10]).expect("bind");
        let mut l = AuditLog::new(AuditConfig { capacity: 100, max_bytes: 300, reserve: 0, max_batch: 10 }, s);
        let mut n = 0;
        while l.append(info(n), 0).is_ok() {
            n += 1;
        }
        assert!(n >= 1 && l.status().buffered_bytes <= 300);
    }
}
