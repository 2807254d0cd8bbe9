//! The KRE's bounded audit buffer.
//!
//! Entries stay in the buffer until the parent has stored them durably and acknowledged
//! them ([`AuditLog::ack`]). The buffer never drops an unacknowledged entry: when it is full
//! [`AuditLog::append`] refuses, and the KRE must then refuse releases (fail closed). A
//! reserve of slots is kept for events that release nothing (denials, policy, start), so that
//! refusals are still recorded while releases are already blocked; appends refused even
//! from the reserve are counted and recorded as one [`AuditEvent::Unrecorded`] entry as soon
//! as space is free again.
//!
//! Aggregates of anonymous refusals ([`AuditEvent::AnonymousRefusals`], one per period) are
//! drawn from the reserve alone: while they are buffered they count against the reserve,
//! never against the `capacity − reserve` that releases may use, so an unauthenticated peer
//! cannot make the buffer refuse a release. At most `reserve` of them are buffered; one that
//! does not fit stays in its [`AnonymousTally`] until it does.

use std::collections::VecDeque;
use std::sync::Arc;

use super::anonymous::AnonymousTally;
use super::checkpoint::Checkpoint;
use super::event::{AuditEntry, AuditEvent, AuditHead};
use super::signer::AuditSigner;
use super::{AuditError, MAX_ENTRY_LEN};

/// Buffer limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Most unacknowledged entries.
    pub capacity: usize,
    /// Most unacknowledged bytes (entries are ≤ 8 KiB each).
    pub max_bytes: usize,
    /// Slots (of `capacity`, and `reserve` × 8 KiB of `max_bytes`) that only non-release
    /// events may use. Anonymous-refusal aggregates may use nothing else.
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
    /// Buffered `anonymous_refusals` entries (held in the reserve, at most `reserve`).
    pub anonymous_buffered: usize,
    /// Checkpoints signed since start.
    pub checkpoints_signed: u64,
}

/// The hash chain and its bounded buffer. One per KRE run.
#[derive(Debug)]
pub struct AuditLog {
    config: AuditConfig,
    /// Shared, so that a release's receipt is signed without holding the log.
    signer: Arc<AuditSigner>,
    buffer: VecDeque<AuditEntry>,
    buffered_bytes: usize,
    last_seq: u64,
    head: [u8; 48],
    acked_up_to: u64,
    /// Digest of entry `acked_up_to` (the chain id while it is 0).
    acked_digest: [u8; 48],
    policy_version: u64,
    refused_total: u64,
    /// (count, first_ms, last_ms) of refused appends not yet recorded.
    unrecorded: Option<(u64, u64, u64)>,
    /// Buffered anonymous-refusal entries and their bytes: part of `buffer` and
    /// `buffered_bytes`, charged to the reserve instead of the release capacity.
    anonymous_slots: usize,
    anonymous_bytes: usize,
    checkpoints_signed: u64,
    /// The sequence number and time of the last checkpoint signed.
    last_checkpoint: Option<(u64, u64)>,
}

/// The follower's checkpoints: at most one per this many milliseconds while entries keep
/// coming. Each signature costs as much as a release's receipt; with write-ahead audit the
/// follower pulls once per release or few, so one per pull was a second signature per release.
pub const FOLLOWER_CHECKPOINT_EVERY_MS: u64 = 1000;

/// Slots and bytes an append needs, split by the budget they are charged to.
#[derive(Debug, Clone, Copy, Default)]
struct Need {
    slots: usize,
    bytes: usize,
    anonymous_slots: usize,
    anonymous_bytes: usize,
}

fn is_anonymous(event: &AuditEvent) -> bool {
    matches!(event, AuditEvent::AnonymousRefusals { .. })
}

impl AuditLog {
    /// A new, empty chain signed by `signer` (its chain id anchors entry 1).
    pub fn new(config: AuditConfig, signer: AuditSigner) -> Self {
        let head = *signer.chain_id();
        Self {
            config,
            signer: Arc::new(signer),
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            last_seq: 0,
            head,
            acked_up_to: 0,
            acked_digest: head,
            policy_version: 0,
            refused_total: 0,
            unrecorded: None,
            anonymous_slots: 0,
            anonymous_bytes: 0,
            checkpoints_signed: 0,
            last_checkpoint: None,
        }
    }

    /// Sets the policy version recorded in later entries (0: static policy).
    pub fn set_policy_version(&mut self, version: u64) {
        self.policy_version = version;
    }

    /// The policy version recorded in new entries.
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    /// The signer (its public key and chain id, for status).
    pub fn signer(&self) -> &AuditSigner {
        &self.signer
    }

    /// The signer, to sign a release's receipt once the log is released.
    pub fn signer_handle(&self) -> Arc<AuditSigner> {
        Arc::clone(&self.signer)
    }

    /// The last entry's sequence number and digest (0 and the chain id before the first).
    pub fn head(&self) -> (u64, [u8; 48]) {
        (self.last_seq, self.head)
    }

    /// The newest entry the parent has acknowledged storing (seq 0 and the chain id before
    /// any): what a sealed state records, so that a link never claims an entry the parent was
    /// not asked to have stored.
    pub fn acked_head(&self) -> AuditHead {
        AuditHead { chain_id: *self.signer.chain_id(), seq: self.acked_up_to, digest: self.acked_digest }
    }

    fn free_slots(&self) -> usize {
        self.config.capacity.saturating_sub(self.buffer.len())
    }

    fn free_bytes(&self) -> usize {
        self.config.max_bytes.saturating_sub(self.buffered_bytes)
    }

    /// Free slots and bytes as a release sees them: anonymous aggregates sit in the
    /// reserve, so the space they hold is not taken from releases.
    fn release_free(&self) -> (usize, usize) {
        (self.free_slots().saturating_add(self.anonymous_slots), self.free_bytes().saturating_add(self.anonymous_bytes))
    }

    /// True when a release cannot be recorded: only the reserve is left. The KRE refuses
    /// releases while this holds (and `append` of a release would refuse anyway).
    pub fn is_full(&self) -> bool {
        let reserve_bytes = self.config.reserve.saturating_add(1).saturating_mul(MAX_ENTRY_LEN);
        let (slots, bytes) = self.release_free();
        slots <= self.config.reserve || bytes < reserve_bytes
    }

    fn fits(&self, need: Need, release: bool) -> bool {
        let reserve_bytes = self.config.reserve.saturating_mul(MAX_ENTRY_LEN);
        let physical = self.free_slots() >= need.slots.saturating_add(need.anonymous_slots)
            && self.free_bytes() >= need.bytes.saturating_add(need.anonymous_bytes);
        let (release_slots, release_bytes) = self.release_free();
        let outside_reserve = !release
            || release_slots >= need.slots.saturating_add(self.config.reserve)
                && release_bytes >= need.bytes.saturating_add(reserve_bytes);
        let within_reserve = need.anonymous_slots == 0
            || self.anonymous_slots.saturating_add(need.anonymous_slots) <= self.config.reserve
                && self.anonymous_bytes.saturating_add(need.anonymous_bytes) <= reserve_bytes;
        physical && outside_reserve && within_reserve
    }

    /// Counts a refused append. A refused release is not a lost record (the release does
    /// not happen; the caller records a denial instead); any other refused event is.
    fn refuse(&mut self, now_ms: u64, release: bool) -> AuditError {
        self.count_refused(now_ms, release);
        AuditError::BufferFull { buffered: self.buffer.len(), bytes: self.buffered_bytes }
    }

    fn count_refused(&mut self, now_ms: u64, release: bool) {
        self.refused_total = self.refused_total.saturating_add(1);
        if release {
            return;
        }
        self.unrecorded = Some(match self.unrecorded {
            Some((n, first, _)) => (n.saturating_add(1), first, now_ms),
            None => (1, now_ms, now_ms),
        });
    }

    fn build(&self, event: AuditEvent, now_ms: u64, seq: u64, prev: [u8; 48]) -> Result<AuditEntry, AuditError> {
        AuditEntry::new(*self.signer.chain_id(), seq, prev, now_ms, self.policy_version, event)
            .map_err(AuditError::Encode)
    }

    fn push(&mut self, entry: AuditEntry) {
        self.head = entry.digest();
        self.last_seq = entry.seq();
        let len = entry.bytes().len();
        self.buffered_bytes = self.buffered_bytes.saturating_add(len);
        if is_anonymous(entry.event()) {
            self.anonymous_slots = self.anonymous_slots.saturating_add(1);
            self.anonymous_bytes = self.anonymous_bytes.saturating_add(len);
        }
        self.buffer.push_back(entry);
    }

    /// Records `event` at `now_ms`; returns its sequence number. Refuses with
    /// [`AuditError::BufferFull`] when it does not fit (a release also when only the reserve
    /// is left): the caller must then not perform the action it was recording. An
    /// [`AuditEvent::AnonymousRefusals`] is charged to the reserve as in
    /// [`append_anonymous`](Self::append_anonymous), which should be preferred: a refused
    /// one appended here is only counted as unrecorded.
    ///
    /// Every refused append of an event that is not a release is counted as unrecorded
    /// (and later written as an [`AuditEvent::Unrecorded`] entry), whether the buffer was
    /// full or the event could not be encoded.
    pub fn append(&mut self, event: AuditEvent, now_ms: u64) -> Result<u64, AuditError> {
        let release = event.is_release();
        match self.try_append(event, now_ms) {
            Ok(Some(seq)) => Ok(seq),
            Ok(None) => Err(self.refuse(now_ms, release)),
            Err(e) => {
                self.count_refused(now_ms, release);
                Err(e)
            }
        }
    }

    /// True when one entry that releases nothing (of the largest size) fits, reserve included:
    /// what a policy change or a durable-state step checks before it is made.
    pub fn has_room_for_admin(&self) -> bool {
        self.fits(self.admin_need(1, MAX_ENTRY_LEN), false)
    }

    /// Whether `events` (none of them a release) would all be appended now, reserve included,
    /// after any pending `Unrecorded` entry. A caller holding the log's lock can check this
    /// before it makes a change and then append the events knowing they fit: the change and
    /// its record happen together or not at all.
    pub fn room_for(&self, events: &[AuditEvent]) -> Result<(), AuditError> {
        let mut bytes = 0usize;
        for event in events {
            if event.is_release() || is_anonymous(event) {
                return Err(AuditError::BufferFull { buffered: self.buffer.len(), bytes: self.buffered_bytes });
            }
            // The size of an entry does not depend on its sequence number or predecessor.
            let probe = self.build(event.clone(), 0, self.last_seq.saturating_add(1), self.head)?;
            bytes = bytes.saturating_add(probe.bytes().len());
        }
        let need = self.admin_need(events.len(), 0);
        let need = Need { bytes: need.bytes.saturating_add(bytes), ..need };
        if self.fits(need, false) {
            Ok(())
        } else {
            Err(AuditError::BufferFull { buffered: self.buffer.len(), bytes: self.buffered_bytes })
        }
    }

    /// What `entries` non-release entries of `each` bytes need, with the pending
    /// `Unrecorded` entry written before them (counted at its largest size).
    fn admin_need(&self, entries: usize, each: usize) -> Need {
        let gap = usize::from(self.unrecorded.is_some());
        Need {
            slots: entries.saturating_add(gap),
            bytes: entries.saturating_mul(each).saturating_add(gap.saturating_mul(MAX_ENTRY_LEN)),
            ..Need::default()
        }
    }

    /// Appends the tally's aggregate entry when one is due ([`AnonymousTally::take`] with
    /// `now_ms` and `force`; force it when the parent pulls the trail). Returns its sequence
    /// number, or `None` when nothing was due.
    ///
    /// The entry is charged to the reserve only: it never reduces what releases may use,
    /// and it is refused once `reserve` aggregates are waiting for acknowledgement. When it
    /// is refused ([`AuditError::BufferFull`], or [`AuditError::Encode`]), its counts are
    /// merged back into `tally`, so the next successful append records them: nothing is
    /// dropped and nothing is counted twice.
    pub fn append_anonymous(
        &mut self,
        tally: &mut AnonymousTally,
        now_ms: u64,
        force: bool,
    ) -> Result<Option<u64>, AuditError> {
        let Some(event) = tally.take(now_ms, force) else {
            return Ok(None);
        };
        let refused = match self.try_append(event.clone(), now_ms) {
            Ok(Some(seq)) => return Ok(Some(seq)),
            Ok(None) => {
                self.refused_total = self.refused_total.saturating_add(1);
                AuditError::BufferFull { buffered: self.buffer.len(), bytes: self.buffered_bytes }
            }
            Err(e) => e,
        };
        tally.merge(&event);
        Err(refused)
    }

    /// Appends `event` (after a pending `Unrecorded` gap) if it fits; `Ok(None)`, with no
    /// change, if it does not.
    fn try_append(&mut self, event: AuditEvent, now_ms: u64) -> Result<Option<u64>, AuditError> {
        let seq = self.last_seq.checked_add(1).ok_or(AuditError::SequenceOverflow)?;
        let release = event.is_release();
        let anonymous = is_anonymous(&event);
        // Encode first: an unencodable event is a caller bug, not a full buffer.
        let probe = self.build(event, now_ms, seq, self.head)?;
        let gap = match self.unrecorded {
            Some((count, first_ms, last_ms)) => {
                Some(self.build(AuditEvent::Unrecorded { count, first_ms, last_ms }, now_ms, seq, self.head)?)
            }
            None => None,
        };
        let mut need = match &gap {
            Some(g) => Need { slots: 1, bytes: g.bytes().len(), ..Need::default() },
            None => Need::default(),
        };
        if anonymous {
            need.anonymous_slots = 1;
            need.anonymous_bytes = probe.bytes().len();
        } else {
            need.slots = need.slots.saturating_add(1);
            need.bytes = need.bytes.saturating_add(probe.bytes().len());
        }
        if !self.fits(need, release) {
            return Ok(None);
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
        Ok(Some(seq))
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
                let len = e.bytes().len();
                self.buffered_bytes = self.buffered_bytes.saturating_sub(len);
                if is_anonymous(e.event()) {
                    self.anonymous_slots = self.anonymous_slots.saturating_sub(1);
                    self.anonymous_bytes = self.anonymous_bytes.saturating_sub(len);
                }
                if e.seq() > self.acked_up_to {
                    self.acked_digest = e.digest();
                }
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
        self.last_checkpoint = Some((self.last_seq, now_ms));
        Ok(cp)
    }

    /// Whether a follower's pull that reached the head gets a new checkpoint: the head is not
    /// covered by the last one, and that one is at least `every_ms` old (or there is none).
    /// A one-shot pull always gets one; a follower's tail is covered by its first pull once
    /// `every_ms` has passed, with new entries or at the end of its wait without them.
    pub fn checkpoint_due(&self, now_ms: u64, every_ms: u64) -> bool {
        match self.last_checkpoint {
            None => self.last_seq > 0,
            Some((seq, at)) => seq < self.last_seq && now_ms.saturating_sub(at) >= every_ms,
        }
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
            anonymous_buffered: self.anonymous_slots,
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
            cluster: crate::codec::Id::new("c").expect("id"),
            keys: vec![(crate::codec::Id::new("k").expect("id"), 1)],
            image: "i".into(),
        }
    }

    #[test]
    fn the_acked_head_is_the_newest_acknowledged_entry() {
        let mut l = log(10, 0);
        let chain = *l.signer().chain_id();
        assert_eq!(l.acked_head(), AuditHead { chain_id: chain, seq: 0, digest: chain });
        for n in 1..=4 {
            l.append(info(n), 10).expect("append");
        }
        let es = l.entries_after(0, 10);
        assert_eq!(l.acked_head().seq, 0, "appended is not acknowledged");
        l.ack(3).expect("ack");
        assert_eq!(l.acked_head(), AuditHead { chain_id: chain, seq: 3, digest: es[2].digest() });
        l.ack(2).expect("an older ack is a no-op");
        assert_eq!(l.acked_head().seq, 3);
        l.ack(4).expect("ack");
        assert_eq!(l.acked_head(), AuditHead { chain_id: chain, seq: 4, digest: es[3].digest() });
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
    fn a_follower_gets_a_checkpoint_when_the_head_moved_and_the_last_is_old_enough() {
        let mut l = log(10, 0);
        assert!(!l.checkpoint_due(0, 1000), "nothing to cover");
        l.append(info(1), 1).expect("append");
        assert!(l.checkpoint_due(1, 1000), "the first one at once");
        l.checkpoint(1).expect("cp");
        assert!(!l.checkpoint_due(5000, 1000), "the head is covered");
        l.append(info(2), 2).expect("append");
        assert!(!l.checkpoint_due(1000, 1000), "too soon");
        assert!(l.checkpoint_due(1001, 1000), "old enough, head moved");
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

    fn anonymous(ev: &AuditEvent) -> (u64, u64, Vec<(&str, u64)>) {
        match ev {
            AuditEvent::AnonymousRefusals { first_ms, last_ms, counts } => {
                (*first_ms, *last_ms, counts.iter().map(|(c, n)| (c.as_str(), *n)).collect())
            }
            other => panic!("not an aggregate: {other:?}"),
        }
    }

    #[test]
    fn anonymous_flood_takes_no_release_capacity() {
        let (capacity, reserve) = (100, 4);
        let mut l = log(capacity, reserve);
        for n in 0..capacity - reserve - 1 {
            l.append(info(u32::try_from(n).expect("small")), 0).expect("fill");
        }
        assert!(!l.is_full());
        let mut tally = AnonymousTally::default();
        let mut appended = Vec::new();
        const T: u64 = 1_000_000;
        for i in 0..100_000u64 {
            tally.record(if i % 4 == 0 { "wrong_channel" } else { "busy" }, T + i);
            if let Some(seq) = l.append_anonymous(&mut tally, T + i, false).expect("reserve has room") {
                appended.push((seq, i));
            }
        }
        // One entry when the first 60 s period elapsed, none since: the flood ends 39,999 ms
        // into the second period.
        assert_eq!(appended, vec![(96, 60_000)]);
        assert_eq!(l.append_anonymous(&mut tally, T + 100_000, true), Ok(Some(97)));
        assert_eq!(l.append_anonymous(&mut tally, T + 100_000, true), Ok(None));
        let es = l.entries_after(95, 10);
        assert_eq!(es.len(), 2);
        assert_eq!(anonymous(es[0].event()), (T, T + 60_000, vec![("busy", 45_000), ("wrong_channel", 15_001)]));
        assert_eq!(
            anonymous(es[1].event()),
            (T + 60_001, T + 99_999, vec![("busy", 30_000), ("wrong_channel", 9_999)])
        );
        assert_eq!(l.status().anonymous_buffered, 2);
        // The release capacity is untouched: the one slot left outside the reserve is free.
        assert!(!l.is_full());
        assert_eq!(l.append(release(), T + 100_001), Ok(98));
        assert!(l.is_full());
        assert!(matches!(l.append(release(), T + 100_002), Err(AuditError::BufferFull { .. })));
        assert_eq!(l.status().refused_total, 1, "the flood itself was never refused");
    }

    #[test]
    fn refused_aggregate_keeps_its_counts_until_it_fits() {
        let mut l = log(10, 2);
        let mut tally = AnonymousTally::default();
        tally.record("malformed", 1);
        assert_eq!(l.append_anonymous(&mut tally, 1, true), Ok(Some(1)));
        tally.record("malformed", 2);
        assert_eq!(l.append_anonymous(&mut tally, 2, true), Ok(Some(2)));
        // Two aggregates fill the reserve share: the third is refused although 8 slots are free.
        tally.record("timeout", 3);
        tally.record("busy", 4);
        assert!(matches!(l.append_anonymous(&mut tally, 5, true), Err(AuditError::BufferFull { .. })));
        assert_eq!(tally.total(), 2, "counts kept");
        let st = l.status();
        assert_eq!((st.last_seq, st.anonymous_buffered, st.refused_total, st.unrecorded_pending), (2, 2, 1, 0));
        tally.record("timeout", 6);
        assert!(matches!(l.append_anonymous(&mut tally, 7, true), Err(AuditError::BufferFull { .. })));
        assert_eq!(l.ack(2), Ok(2));
        assert_eq!(l.status().anonymous_buffered, 0);
        assert_eq!(l.append_anonymous(&mut tally, 8, true), Ok(Some(3)));
        assert!(tally.is_empty());
        let es = l.entries_after(2, 10);
        assert_eq!(anonymous(es[0].event()), (3, 6, vec![("busy", 1), ("timeout", 2)]));
    }

    #[test]
    fn aggregate_refused_by_a_full_buffer_is_recorded_after_the_gap() {
        let mut l = log(3, 1);
        let mut tally = AnonymousTally::default();
        for n in 0..3 {
            l.append(info(n), 0).expect("fill");
        }
        assert!(matches!(l.append(info(3), 1), Err(AuditError::BufferFull { .. })));
        tally.record("busy", 2);
        assert!(matches!(l.append_anonymous(&mut tally, 2, true), Err(AuditError::BufferFull { .. })));
        assert_eq!(tally.total(), 1);
        assert_eq!(l.status().unrecorded_pending, 1, "the aggregate is not a lost record");
        assert_eq!(l.ack(3), Ok(3));
        assert_eq!(l.append_anonymous(&mut tally, 9, true), Ok(Some(5)));
        let es = l.entries_after(3, 10);
        assert_eq!(es[0].event(), &AuditEvent::Unrecorded { count: 1, first_ms: 1, last_ms: 1 });
        assert_eq!(anonymous(es[1].event()), (2, 2, vec![("busy", 1)]));
        assert_eq!(l.status().unrecorded_pending, 0);
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
