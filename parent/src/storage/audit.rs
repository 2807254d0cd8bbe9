//! Where the parent keeps the KRE's audit trail: a local directory
//! (`keygate_enclave::audit::store`, one parent's own) or etcd (shared by the parents of a
//! cluster, so any of them can collect a KRE's trail and every one can export it).
//!
//! ```text
//! PREFIX/audit/<chain id, 96 hex>/e/<seq, 20 digits>   one entry (its exact bytes)
//! PREFIX/audit/<chain id, 96 hex>/c/<n, 20 digits>     the n-th checkpoint stored (its exact bytes)
//! PREFIX/audit/<chain id, 96 hex>/head                 "v1 <last seq> <its digest, hex> <checkpoints> <last checkpoint's seq>"
//! ```
//!
//! Checkpoints are numbered by arrival, not by the seq they cover: the KRE signs a new
//! checkpoint at an unchanged head (a later time), and the directory keeps every one; so does
//! etcd.
//!
//! What it decides: which records an append writes — by the same rule as the directory
//! ([`plan_append`]: the chain is continued exactly or refused with the same
//! [`StoreError`]) — and how they are written: in transactions of at most
//! [`MAX_RECORDS_PER_TXN`] records and [`MAX_TXN_BYTES`] bytes ([`batches`], pure), each
//! conditioned on the head key holding what was read (absent for a new chain) and on every
//! record key being absent, and moving the head in the same step. Two parents appending to
//! one chain cannot interleave: the loser's transaction does not apply; it reads the head
//! again and plans again (what the winner stored is then skipped), at most [`MAX_ATTEMPTS`]
//! times. The caller acknowledges to the KRE only what an applied transaction holds.
//!
//! What it trusts: nothing it reads. The head and the records it names are checked against
//! each other before an append (a head naming a missing or other record is refused, typed);
//! every value read is bounded before it is kept and strictly decoded; [`EtcdAudit::read`]
//! returns a [`StoredTrail`] that `audit verify` checks exactly as it checks a directory.
//! etcd (or whoever controls it) can withhold or delete records — verify then names a broken
//! chain, a missing tail after a checkpoint or a link, or a missing chain — but cannot forge
//! an entry or a checkpoint: they are hash-chained and signed by the KRE.

use keygate_enclave::audit::store::{
    plan_append, AppendPlan, AppendReport, StoreError, StoredTrail, MAX_CHECKPOINTS_FILE, MAX_ENTRIES_FILE,
};
use keygate_enclave::audit::{AuditEntry, Checkpoint, DecodeError, MAX_CHECKPOINT_LEN, MAX_ENTRY_LEN};

use super::bundles::KeyRange;
use super::etcd::client::{EtcdClient, EtcdError, EtcdUrl, Limits};
use super::etcd::{Cond, Kv};

/// Records per transaction: etcd refuses more than `--max-txn-ops` (128 by default)
/// compares or operations, and each transaction also compares and puts the head.
pub(crate) const MAX_RECORDS_PER_TXN: usize = 100;
/// Bytes of records per transaction: under etcd's `--max-request-bytes` (1.5 MiB by default).
pub(crate) const MAX_TXN_BYTES: usize = 1 << 20;
/// Attempts of one append when other writers keep moving the head.
pub(crate) const MAX_ATTEMPTS: usize = 16;
/// The longest head value.
pub(crate) const MAX_HEAD: usize = 256;
/// Most entries one chain read holds (and at most as many bytes as the directory's
/// `entries.log`, `MAX_ENTRIES_FILE`; checkpoints as its `checkpoints.log`).
pub(crate) const MAX_CHAIN_ENTRIES: usize = 4 << 20;
/// Most checkpoints one chain read holds.
pub(crate) const MAX_CHAIN_CHECKPOINTS: usize = 1 << 20;
/// Entries (and checkpoints) asked for per range request.
const PAGE: usize = 64;
/// The largest answer decoded: a page of the largest records, with keys and headers.
const MAX_RESPONSE: usize = PAGE * (MAX_CHECKPOINT_LEN + 512) + 64 * 1024;

/// An audit store as configured: a directory, or `etcd://HOST:PORT[,…][/PREFIX]`.
pub(crate) type AuditStore = super::Location;

/// Why an etcd audit append or read failed. Carries no record content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AuditStoreError {
    /// The pulled records do not continue the stored chain (the directory's refusals).
    #[error("{chain}: {source}")]
    Chain {
        /// The chain's key prefix.
        chain: String,
        /// The refusal.
        source: StoreError,
    },
    /// The head value is not one this store writes.
    #[error("{key} is not an audit head (v1 <seq> <digest hex> <checkpoints> <checkpoint seq>)")]
    MalformedHead {
        /// The key.
        key: String,
    },
    /// The head names a record that is missing or is another one.
    #[error("{key}: the head names {what}")]
    HeadMismatch {
        /// The record's key.
        key: String,
        /// What is wrong.
        what: &'static str,
    },
    /// Records stand beyond the head (written without it): the store was not written by
    /// this rule.
    #[error("{key}: a record key the head does not account for exists; refusing to append")]
    Orphaned {
        /// The head key.
        key: String,
    },
    /// A value that does not decode as the record its key names.
    #[error("{key}: {error}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong.
        error: DecodeError,
    },
    /// A value over the record limit.
    #[error("{key}: {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// The key.
        key: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More records or chains than one read holds.
    #[error("{what}: more than {max}; refusing to read them all")]
    TooMany {
        /// Where.
        what: String,
        /// The limit.
        max: usize,
    },
    /// A key under the audit prefix that this store does not write.
    #[error("{key} is not an audit key (PREFIX/audit/<96 hex>/e|c/<20 digits>)")]
    BadKey {
        /// The key (shortened).
        key: String,
    },
    /// Other writers moved the head on every attempt.
    #[error("{chain}: the head moved under each of {attempts} attempts; nothing more was written")]
    Contended {
        /// The chain's key prefix.
        chain: String,
        /// Attempts made.
        attempts: usize,
    },
    /// etcd failed (the outcome of a write is then unknown; the next append tells).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// The head of a stored chain: its last entry and how many checkpoints it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// The last stored entry's seq (0: none).
    pub(crate) seq: u64,
    /// Its digest (the chain id when none).
    pub(crate) digest: [u8; 48],
    /// Checkpoints stored.
    pub(crate) checkpoints: u64,
    /// The last stored checkpoint's seq (0: none).
    pub(crate) cp_seq: u64,
}

impl Head {
    /// The head of a chain with nothing stored.
    pub(crate) fn empty(chain: &[u8; 48]) -> Self {
        Self { seq: 0, digest: *chain, checkpoints: 0, cp_seq: 0 }
    }

    /// The value stored under the head key.
    pub(crate) fn encode(&self) -> Vec<u8> {
        format!("v1 {} {} {} {}", self.seq, hex::encode(self.digest), self.checkpoints, self.cp_seq).into_bytes()
    }

    /// Strictly parses a head value (what [`Self::encode`] writes, nothing else).
    pub(crate) fn decode(key: &str, v: &[u8]) -> Result<Self, AuditStoreError> {
        let bad = || AuditStoreError::MalformedHead { key: key.to_owned() };
        if v.len() > MAX_HEAD {
            return Err(bad());
        }
        let s = std::str::from_utf8(v).map_err(|_| bad())?;
        let num = |t: &str| {
            (!t.is_empty()
                && t.len() <= 20
                && t.bytes().all(|b| b.is_ascii_digit())
                && (t == "0" || !t.starts_with('0')))
            .then(|| t.parse::<u64>().ok())
            .flatten()
        };
        let parts: Vec<&str> = s.split(' ').collect();
        let [ver, seq, digest, cps, cp_seq] = parts.as_slice() else { return Err(bad()) };
        let digest: [u8; 48] = (digest.len() == 96 && !digest.bytes().any(|b| b.is_ascii_uppercase()))
            .then(|| hex::decode(digest).ok())
            .flatten()
            .and_then(|d| d.try_into().ok())
            .ok_or_else(bad)?;
        let head = Head {
            seq: num(seq).ok_or_else(bad)?,
            digest,
            checkpoints: num(cps).ok_or_else(bad)?,
            cp_seq: num(cp_seq).ok_or_else(bad)?,
        };
        if *ver != "v1" || head.cp_seq > head.seq || (head.checkpoints == 0 && head.cp_seq != 0) {
            return Err(bad());
        }
        Ok(head)
    }
}

/// The keys of one chain under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainKeys {
    base: String,
}

impl ChainKeys {
    /// The keys of `chain` under `prefix`.
    pub(crate) fn new(prefix: &str, chain: &[u8; 48]) -> Self {
        Self { base: format!("{prefix}/audit/{}", hex::encode(chain)) }
    }

    /// `PREFIX/audit/<chain hex>`.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn head(&self) -> String {
        format!("{}/head", self.base)
    }

    pub(crate) fn entry(&self, seq: u64) -> String {
        format!("{}/e/{seq:020}", self.base)
    }

    pub(crate) fn checkpoint(&self, n: u64) -> String {
        format!("{}/c/{n:020}", self.base)
    }

    /// The range `[start, end)` of the entry (`e`) or checkpoint (`c`) keys.
    fn range(&self, kind: char) -> (String, String) {
        (format!("{}/{kind}/", self.base), format!("{}/{kind}0", self.base))
    }
}

/// One transaction of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Txn {
    /// The head holds what the previous step left (absent for a new chain); each record
    /// key is absent.
    pub(crate) when: Vec<Cond>,
    /// The records, then the new head.
    pub(crate) puts: Vec<(Vec<u8>, Vec<u8>)>,
    /// Entries and checkpoints it writes.
    pub(crate) entries: usize,
    pub(crate) checkpoints: usize,
}

/// The transactions that write `plan` over the head read as `seen` (`head`, decoded): entries
/// then checkpoints, at most [`MAX_RECORDS_PER_TXN`] records and [`MAX_TXN_BYTES`] bytes each
/// (a record is never split), each conditioned on the head the one before leaves.
pub(crate) fn batches(keys: &ChainKeys, seen: Option<&[u8]>, head: Head, plan: &AppendPlan<'_>) -> Vec<Txn> {
    // Each record: its key, its bytes, and the head once it is written.
    let mut records = Vec::with_capacity(plan.entries.len() + plan.checkpoints.len());
    let mut h = head;
    for e in &plan.entries {
        h.seq = e.seq();
        h.digest = e.digest();
        records.push((keys.entry(e.seq()), e.bytes(), h, true));
    }
    for c in &plan.checkpoints {
        h.checkpoints += 1;
        h.cp_seq = c.seq();
        records.push((keys.checkpoint(h.checkpoints), c.bytes(), h, false));
    }
    let head_key = keys.head().into_bytes();
    let mut prev: Option<Vec<u8>> = seen.map(<[u8]>::to_vec);
    let mut out = Vec::new();
    let mut rest = records.as_slice();
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len() && n < MAX_RECORDS_PER_TXN && (n == 0 || bytes + rest[n].1.len() <= MAX_TXN_BYTES) {
            bytes += rest[n].1.len();
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut when = vec![match &prev {
            None => Cond::Absent(head_key.clone()),
            Some(v) => Cond::ValueIs(head_key.clone(), v.clone()),
        }];
        let mut puts = Vec::with_capacity(chunk.len() + 1);
        for (key, value, _, _) in chunk {
            when.push(Cond::Absent(key.clone().into_bytes()));
            puts.push((key.clone().into_bytes(), value.to_vec()));
        }
        let new_head = chunk.last().map(|r| r.2.encode()).unwrap_or_default();
        puts.push((head_key.clone(), new_head.clone()));
        let entries = chunk.iter().filter(|r| r.3).count();
        out.push(Txn { when, puts, entries, checkpoints: chunk.len() - entries });
        prev = Some(new_head);
    }
    out
}

/// A key and its value.
pub(crate) type Pair = (Vec<u8>, Vec<u8>);

/// What the etcd store needs beyond [`Kv`] and [`KeyRange`]: the keys and values of a range,
/// bounded in count.
pub(crate) trait KvRange {
    /// At most `limit` (key, value) pairs in `[start, end)`, in order, and whether there are more.
    fn range(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Pair>, bool), EtcdError>;
}

impl KvRange for EtcdClient {
    fn range(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<(Vec<Pair>, bool), EtcdError> {
        let (kvs, more) = EtcdClient::range(self, start, end, i64::try_from(limit).unwrap_or(i64::MAX))?;
        Ok((kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(), more))
    }
}

/// What one etcd append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct EtcdAppend {
    /// Written (summed over the attempts) and skipped (by the last plan); `last_seq` is what
    /// the caller acknowledges.
    pub(crate) report: AppendReport,
    /// Transactions applied.
    pub(crate) txns: usize,
    /// Times another writer moved the head first and the append planned again.
    pub(crate) replans: usize,
}

/// The audit trails in etcd under a prefix.
#[derive(Debug)]
pub(crate) struct EtcdAudit<K> {
    pub(crate) kv: K,
    prefix: String,
    /// What this store's last applied append left (the chain, the head value, the records
    /// it names): the next append to that chain is planned on it without reading, and its
    /// transaction's head condition tells whether it is still the stored head.
    last: Option<Tail>,
}

/// A chain's head as read or written, and the records it names.
#[derive(Debug, Clone)]
struct Tail {
    chain: [u8; 48],
    seen: Option<Vec<u8>>,
    head: Head,
    entry: Option<AuditEntry>,
    checkpoint: Option<Checkpoint>,
}

impl EtcdAudit<EtcdClient> {
    /// The store at `url` (connects lazily), its answers bounded by a page of records.
    pub(crate) fn connect(url: &EtcdUrl) -> Result<Self, AuditStoreError> {
        let limits = Limits { max_response: MAX_RESPONSE, ..Limits::default() };
        Ok(Self::new(EtcdClient::new(url.clone(), limits)?, &url.prefix))
    }
}

impl<K: Kv + KeyRange + KvRange> EtcdAudit<K> {
    /// The trails under `prefix` of `kv`.
    pub(crate) fn new(kv: K, prefix: &str) -> Self {
        Self { kv, prefix: prefix.to_owned(), last: None }
    }

    /// The keys of `chain`.
    pub(crate) fn keys(&self, chain: &[u8; 48]) -> ChainKeys {
        ChainKeys::new(&self.prefix, chain)
    }

    /// The head of `chain` as stored (raw, for the next condition) and decoded (zero: none).
    pub(crate) fn head(&mut self, chain: &[u8; 48]) -> Result<(Option<Vec<u8>>, Head), AuditStoreError> {
        let key = self.keys(chain).head();
        match self.kv.get(key.as_bytes())? {
            None => Ok((None, Head::empty(chain))),
            Some(v) => {
                let h = Head::decode(&key, &v)?;
                Ok((Some(v), h))
            }
        }
    }

    fn get_bounded(&mut self, key: &str, max: usize) -> Result<Option<Vec<u8>>, AuditStoreError> {
        match self.kv.get(key.as_bytes())? {
            Some(v) if v.len() > max => Err(AuditStoreError::TooLarge { key: key.to_owned(), len: v.len(), max }),
            v => Ok(v),
        }
    }

    /// The last entry and checkpoint the head names, each checked against it.
    fn tail(
        &mut self,
        chain: &[u8; 48],
        head: &Head,
    ) -> Result<(Option<AuditEntry>, Option<Checkpoint>), AuditStoreError> {
        let keys = self.keys(chain);
        let mismatch = |key: String, what| AuditStoreError::HeadMismatch { key, what };
        let last = if head.seq == 0 {
            if head.digest != *chain {
                return Err(mismatch(keys.head(), "no entry but a digest other than the chain id"));
            }
            None
        } else {
            let key = keys.entry(head.seq);
            let v =
                self.get_bounded(&key, MAX_ENTRY_LEN)?.ok_or_else(|| mismatch(key.clone(), "an entry not stored"))?;
            let e = AuditEntry::decode(&v).map_err(|error| AuditStoreError::Malformed { key: key.clone(), error })?;
            if e.seq() != head.seq || e.chain_id() != chain || e.digest() != head.digest {
                return Err(mismatch(key, "another entry than the one stored there"));
            }
            Some(e)
        };
        let cp = if head.checkpoints == 0 {
            None
        } else {
            let key = keys.checkpoint(head.checkpoints);
            let v = self
                .get_bounded(&key, MAX_CHECKPOINT_LEN)?
                .ok_or_else(|| mismatch(key.clone(), "a checkpoint not stored"))?;
            let c = Checkpoint::decode(&v).map_err(|error| AuditStoreError::Malformed { key: key.clone(), error })?;
            if c.seq() != head.cp_seq || c.chain_id() != chain {
                return Err(mismatch(key, "another checkpoint than the one stored there"));
            }
            Some(c)
        };
        Ok((last, cp))
    }

    /// Appends pulled `entries` and `checkpoints` of `chain` (each in sequence order): the
    /// directory's rule ([`plan_append`]), written by [`batches`]; a lost race is planned again.
    /// Returns the last stored seq, which the caller acknowledges to the KRE.
    pub(crate) fn append(
        &mut self,
        chain: &[u8; 48],
        entries: &[AuditEntry],
        checkpoints: &[Checkpoint],
    ) -> Result<EtcdAppend, AuditStoreError> {
        let keys = self.keys(chain);
        let refused = |source| AuditStoreError::Chain { chain: keys.base().to_owned(), source };
        // The chain is the key's: a record of another chain is foreign even in an empty store.
        if let Some(seq) = entries.iter().find(|e| e.chain_id() != chain).map(AuditEntry::seq) {
            return Err(refused(StoreError::ForeignChain { seq }));
        }
        if let Some(seq) = checkpoints.iter().find(|c| c.chain_id() != chain).map(Checkpoint::seq) {
            return Err(refused(StoreError::ForeignChain { seq }));
        }
        let mut done = EtcdAppend::default();
        let mut cached = self.last.take().filter(|t| t.chain == *chain);
        for _ in 0..MAX_ATTEMPTS {
            let tail = match cached.take() {
                Some(t) => t,
                None => {
                    let (seen, head) = self.head(chain)?;
                    let (entry, checkpoint) = self.tail(chain, &head)?;
                    Tail { chain: *chain, seen, head, entry, checkpoint }
                }
            };
            let plan =
                plan_append(tail.entry.as_ref(), tail.checkpoint.as_ref(), entries, checkpoints).map_err(refused)?;
            let mut lost = false;
            let mut left = tail.seen.clone();
            for t in batches(&keys, tail.seen.as_deref(), tail.head, &plan) {
                if !self.kv.txn(&t.when, &t.puts, &[])? {
                    lost = true;
                    break;
                }
                left = t.puts.last().map(|(_, v)| v.clone());
                done.txns += 1;
                done.report.entries_written += t.entries;
                done.report.checkpoints_written += t.checkpoints;
            }
            if !lost {
                done.report.entries_skipped = plan.report.entries_skipped;
                done.report.checkpoints_skipped = plan.report.checkpoints_skipped;
                done.report.last_seq = plan.report.last_seq;
                let head = match left.as_deref() {
                    Some(v) if left != tail.seen => Head::decode(&keys.head(), v)?,
                    _ => tail.head,
                };
                self.last = Some(Tail {
                    chain: *chain,
                    seen: left,
                    head,
                    entry: plan.entries.last().map(|e| (*e).clone()).or(tail.entry),
                    checkpoint: plan.checkpoints.last().map(|c| (*c).clone()).or(tail.checkpoint),
                });
                return Ok(done);
            }
            // Another writer moved the head. If it did not move, a record key the head does
            // not account for exists (a head never returns to an earlier value: seqs and
            // counts only grow).
            if self.head(chain)?.0 == tail.seen {
                return Err(AuditStoreError::Orphaned { key: keys.head() });
            }
            done.replans += 1;
        }
        Err(AuditStoreError::Contended { chain: keys.base().to_owned(), attempts: MAX_ATTEMPTS })
    }

    /// Every record of one chain, in key order, each bounded and strictly decoded (not
    /// verified: `audit verify` checks the trail as it checks a directory's).
    pub(crate) fn read(&mut self, chain: &[u8; 48]) -> Result<StoredTrail, AuditStoreError> {
        let keys = self.keys(chain);
        let entries =
            self.read_records(&keys, 'e', (MAX_ENTRY_LEN, MAX_CHAIN_ENTRIES, MAX_ENTRIES_FILE), AuditEntry::decode)?;
        let checkpoints = self.read_records(
            &keys,
            'c',
            (MAX_CHECKPOINT_LEN, MAX_CHAIN_CHECKPOINTS, MAX_CHECKPOINTS_FILE),
            Checkpoint::decode,
        )?;
        Ok(StoredTrail { entries, checkpoints })
    }

    fn read_records<T>(
        &mut self,
        keys: &ChainKeys,
        kind: char,
        (max_len, max_count, max_total): (usize, usize, u64),
        decode: fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, AuditStoreError> {
        let (mut start, end) = keys.range(kind);
        let base = start.clone();
        let mut out = Vec::new();
        let mut total = 0u64;
        loop {
            let (page, more) = self.kv.range(start.as_bytes(), end.as_bytes(), PAGE)?;
            if page.len() > PAGE {
                return Err(EtcdError::Malformed { op: "range", what: "more keys than the limit" }.into());
            }
            if out.len() + page.len() > max_count {
                return Err(AuditStoreError::TooMany { what: base.clone(), max: max_count });
            }
            for (k, v) in &page {
                let key = String::from_utf8_lossy(k).chars().take(300).collect::<String>();
                let named = key.strip_prefix(&base).filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()));
                if named.is_none() || key.len() != k.len() {
                    return Err(AuditStoreError::BadKey { key });
                }
                if v.len() > max_len {
                    return Err(AuditStoreError::TooLarge { key, len: v.len(), max: max_len });
                }
                total = total.saturating_add(u64::try_from(v.len()).unwrap_or(u64::MAX));
                if total > max_total {
                    let max = usize::try_from(max_total).unwrap_or(usize::MAX);
                    return Err(AuditStoreError::TooMany { what: format!("{base} (bytes)"), max });
                }
                out.push(decode(v).map_err(|error| AuditStoreError::Malformed { key, error })?);
            }
            match page.last() {
                Some((k, _)) if more => {
                    // Just past the last key read.
                    start = format!("{}\0", String::from_utf8_lossy(k));
                }
                _ => return Ok(out),
            }
        }
    }

    /// The chains stored under the prefix, in key order (one range request each), at most
    /// `max`.
    pub(crate) fn chains(&mut self, max: usize) -> Result<Vec<[u8; 48]>, AuditStoreError> {
        let base = format!("{}/audit/", self.prefix);
        let end = format!("{}/audit0", self.prefix);
        let mut start = base.clone();
        let mut out = Vec::new();
        loop {
            let (keys, _) = self.kv.keys(start.as_bytes(), end.as_bytes(), 1)?;
            let Some(k) = keys.into_iter().next() else { return Ok(out) };
            let key = String::from_utf8_lossy(&k).chars().take(300).collect::<String>();
            let chain: [u8; 48] = key
                .strip_prefix(&base)
                .and_then(|r| r.split_once('/'))
                .filter(|(h, _)| h.len() == 96 && !h.bytes().any(|b| b.is_ascii_uppercase()))
                .and_then(|(h, _)| hex::decode(h).ok())
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| AuditStoreError::BadKey { key: key.clone() })?;
            if out.len() == max {
                return Err(AuditStoreError::TooMany { what: base, max });
            }
            out.push(chain);
            // Just past every key of this chain ('0' follows '/').
            start = format!("{base}{}0", hex::encode(chain));
        }
    }
}

#[cfg(test)]
mod real_tests;
#[cfg(test)]
mod tests;
