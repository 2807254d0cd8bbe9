//! The sealed-state store in etcd v3, shared by the parents of a KRE cluster.
//!
//! What it decides: the keys (below), and that a generation is written only by one etcd
//! transaction that compares the current-generation key with what [`plan`] requires (exactly
//! the generation before, or absent) and in the same step puts the generation and moves the
//! pointer, deleting the generation before the previous one. Two parents storing the same
//! generation: exactly one transaction applies; the other gets [`StoreError::Conflict`] and must
//! not commit to its KRE. What it trusts: nothing it reads — every blob is checked with
//! `sealed::peek_header` and against the generation its key names, and a damaged current
//! generation falls back to the previous one, as in the directory store. etcd (like the
//! parent's disk) is untrusted: authenticity is the KRE's AEAD; the store only keeps honest
//! parents from overwriting each other and torn values from being chosen.
//!
//! ```text
//! PREFIX/state/current          the newest generation's number (ASCII decimal)
//! PREFIX/state/gen/<g, 20 digits>  the sealed blob of generation g (the current and the one before)
//! PREFIX/custody/<hex set digest>  the custody data of one custodian set (written once)
//! PREFIX/bundles/<v, 20 digits>    the accepted policy bundle of version v (storage::bundles)
//! PREFIX/audit/<chain hex>/…       one KRE run's audit chain (storage::audit)
//! ```
//!
//! The client ([`client`]) and the minimal protobuf API it speaks (`proto/etcd/`) are beside.

pub(crate) mod client;

use std::time::{Duration, Instant};

use keygate_enclave::state::sealed;

pub(crate) use self::client::{EtcdClient, EtcdError, EtcdUrl, Limits};
use self::pb::etcdserverpb::{compare, request_op, Compare, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};
use super::state::{Loaded, Slot, SlotProblem, Unusable};
use super::store::{plan, Plan, SealedStore, StoreError};

/// The generated etcd API (build.rs, from `proto/etcd`).
#[allow(unreachable_pub, missing_debug_implementations, clippy::all, clippy::as_conversions)]
pub(crate) mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// The largest sealed blob the etcd store takes: etcd refuses a request over its
/// `--max-request-bytes` (1.5 MiB by default), and a transaction carries the blob once.
pub(crate) const MAX_VALUE: usize = 1024 * 1024;
/// The largest custody value (as the directory store's custody file).
pub(crate) const MAX_CUSTODY: usize = 64 * 1024;

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cond {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key holds exactly this value.
    ValueIs(Vec<u8>, Vec<u8>),
}

/// What the store needs of a key-value store: linearizable reads and an atomic
/// compare-then-write. The etcd client is the real one; the tests have an in-memory one.
pub(crate) trait Kv {
    /// The value of `key`, if any.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError>;
    /// Atomically: if every condition holds, every put and delete; `Ok(true)` if applied.
    fn txn(&mut self, when: &[Cond], puts: &[(Vec<u8>, Vec<u8>)], deletes: &[Vec<u8>]) -> Result<bool, EtcdError>;
}

impl Kv for EtcdClient {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
        Ok(EtcdClient::get(self, key)?.0.map(|kv| kv.value))
    }

    fn txn(&mut self, when: &[Cond], puts: &[(Vec<u8>, Vec<u8>)], deletes: &[Vec<u8>]) -> Result<bool, EtcdError> {
        let compare = when
            .iter()
            .map(|c| match c {
                Cond::Absent(key) => Compare {
                    result: i32::from(compare::CompareResult::Equal),
                    target: i32::from(compare::CompareTarget::Version),
                    key: key.clone(),
                    target_union: Some(compare::TargetUnion::Version(0)),
                    range_end: Vec::new(),
                },
                Cond::ValueIs(key, value) => Compare {
                    result: i32::from(compare::CompareResult::Equal),
                    target: i32::from(compare::CompareTarget::Value),
                    key: key.clone(),
                    target_union: Some(compare::TargetUnion::Value(value.clone())),
                    range_end: Vec::new(),
                },
            })
            .collect();
        let put = puts.iter().map(|(key, value)| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..PutRequest::default()
            })),
        });
        let delete = deletes.iter().map(|key| RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..DeleteRangeRequest::default()
            })),
        });
        let req = TxnRequest { compare, success: put.chain(delete).collect(), failure: Vec::new() };
        Ok(EtcdClient::txn(self, req)?.succeeded)
    }
}

/// The sealed-state store over a key-value store.
#[derive(Debug)]
pub(crate) struct EtcdStore<K: Kv = EtcdClient> {
    pub(crate) kv: K,
    prefix: String,
}

/// What reading one generation's key found.
type GenRead = Result<(Vec<u8>, sealed::SealedHeader), SlotProblem>;

impl EtcdStore<EtcdClient> {
    /// The store at `url` with the default limits (connects lazily).
    pub(crate) fn connect(url: &EtcdUrl) -> Result<Self, StoreError> {
        Self::connect_with(url, Limits::default())
    }

    /// The store at `url` with `limits`.
    pub(crate) fn connect_with(url: &EtcdUrl, limits: Limits) -> Result<Self, StoreError> {
        let limits = Limits { max_response: limits.max_response.max(MAX_VALUE + 64 * 1024), ..limits };
        Ok(Self::new(EtcdClient::new(url.clone(), limits)?, &url.prefix))
    }

    /// Waits at most `wait` for the store to hold a generation newer than `known`; returns it
    /// (at once if it already does), or None when the wait ends first. The state sync's
    /// `--follow` uses it to learn promptly that another parent stored a newer generation.
    pub(crate) fn wait_newer(&mut self, known: u64, wait: Duration) -> Result<Option<u64>, StoreError> {
        let key = self.current_key();
        let deadline = Instant::now() + wait;
        let (kv, mut revision) = self.kv.get(key.as_bytes())?;
        if let Some(g) = kv.map(|kv| parse_generation(&kv.value, &key)).transpose()? {
            if g > known {
                return Ok(Some(g));
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let Some(kv) = self.kv.watch_put(key.as_bytes(), revision.saturating_add(1), left)? else {
                return Ok(None);
            };
            revision = kv.mod_revision;
            let g = parse_generation(&kv.value, &key)?;
            if g > known {
                return Ok(Some(g));
            }
        }
    }
}

fn parse_generation(v: &[u8], key: &str) -> Result<u64, StoreError> {
    std::str::from_utf8(v)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| StoreError::MalformedCurrent { key: key.to_owned() })
}

impl<K: Kv> EtcdStore<K> {
    /// The store under `prefix` of `kv`.
    pub(crate) fn new(kv: K, prefix: &str) -> Self {
        Self { kv, prefix: prefix.to_owned() }
    }

    pub(crate) fn current_key(&self) -> String {
        format!("{}/state/current", self.prefix)
    }

    pub(crate) fn generation_key(&self, g: u64) -> String {
        format!("{}/state/gen/{g:020}", self.prefix)
    }

    pub(crate) fn custody_key(&self, set_digest: &[u8; 48]) -> String {
        format!("{}/custody/{}", self.prefix, hex::encode(set_digest))
    }

    /// The generation the current-generation key names, if any.
    pub(crate) fn current(&mut self) -> Result<Option<u64>, StoreError> {
        let key = self.current_key();
        self.kv.get(key.as_bytes())?.map(|v| parse_generation(&v, &key)).transpose()
    }

    /// Stores `blob`, having seen `seen` as the current generation: the compare-and-swap.
    /// [`SealedStore::store`] reads `seen` first; the tests hand in a stale one.
    pub(crate) fn store_seen(&mut self, blob: &[u8], seen: Option<u64>) -> Result<u64, StoreError> {
        let header = sealed::peek_header(blob).map_err(StoreError::InvalidBlob)?;
        if blob.len() > MAX_VALUE {
            return Err(StoreError::TooLarge { len: blob.len(), max: MAX_VALUE });
        }
        let g = header.generation;
        let current = self.current_key().into_bytes();
        let when = match plan(seen, g) {
            Plan::WriteIfEmpty => Cond::Absent(current.clone()),
            Plan::WriteOver { expect } => Cond::ValueIs(current.clone(), expect.to_string().into_bytes()),
            Plan::AlreadyThere => return self.same_or_conflict(blob, g),
            Plan::Conflict { stored } => return Err(StoreError::Conflict { generation: g, stored }),
            Plan::Gap { stored } => return Err(StoreError::Gap { generation: g, stored }),
        };
        let key = self.generation_key(g).into_bytes();
        let puts = [(key.clone(), blob.to_vec()), (current, g.to_string().into_bytes())];
        // Keep the generation before as the fallback; the one before it goes.
        let deletes: Vec<Vec<u8>> =
            g.checked_sub(2).map(|old| self.generation_key(old).into_bytes()).into_iter().collect();
        if !self.kv.txn(&[when], &puts, &deletes)? {
            // Lost the race (or an earlier attempt of ours applied after all): what is there?
            return match self.current()? {
                Some(s) if s == g => self.same_or_conflict(blob, g),
                Some(s) if s > g => Err(StoreError::Conflict { generation: g, stored: s }),
                Some(s) => Err(StoreError::Gap { generation: g, stored: s }),
                None => Err(StoreError::MalformedCurrent { key: self.current_key() }),
            };
        }
        if self.kv.get(&key)?.as_deref() != Some(blob) {
            return Err(Unusable::ReadBackMismatch.into());
        }
        Ok(g)
    }

    /// The store holds generation `g`: `Ok` if it is these bytes (a retry), else a conflict.
    fn same_or_conflict(&mut self, blob: &[u8], g: u64) -> Result<u64, StoreError> {
        if self.kv.get(self.generation_key(g).as_bytes())?.as_deref() == Some(blob) {
            Ok(g)
        } else {
            Err(StoreError::Conflict { generation: g, stored: g })
        }
    }

    fn read_generation(&mut self, g: u64) -> Result<GenRead, StoreError> {
        let Some(blob) = self.kv.get(self.generation_key(g).as_bytes())? else { return Ok(Err(SlotProblem::Missing)) };
        Ok(match sealed::peek_header(&blob) {
            Err(e) => Err(SlotProblem::Damaged(e)),
            Ok(h) if h.generation != g => Err(SlotProblem::WrongGeneration { named: g, holds: h.generation }),
            Ok(h) => Ok((blob, h)),
        })
    }

    /// Stores custody data once per custodian set; the same bytes again are a no-op, other
    /// bytes are refused.
    pub(crate) fn store_custody(&mut self, set_digest: &[u8; 48], custody: &[u8]) -> Result<(), StoreError> {
        if custody.len() > MAX_CUSTODY {
            return Err(StoreError::TooLarge { len: custody.len(), max: MAX_CUSTODY });
        }
        let key = self.custody_key(set_digest);
        let k = key.clone().into_bytes();
        if !self.kv.txn(&[Cond::Absent(k.clone())], &[(k.clone(), custody.to_vec())], &[])?
            && self.kv.get(&k)?.as_deref() != Some(custody)
        {
            return Err(StoreError::CustodyConflict { key });
        }
        if self.kv.get(&k)?.as_deref() != Some(custody) {
            return Err(Unusable::ReadBackMismatch.into());
        }
        Ok(())
    }

    /// The custody data of the set with `set_digest`, if stored.
    pub(crate) fn load_custody(&mut self, set_digest: &[u8; 48]) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.kv.get(self.custody_key(set_digest).as_bytes())?;
        match v {
            Some(v) if v.len() > MAX_CUSTODY => Err(StoreError::TooLarge { len: v.len(), max: MAX_CUSTODY }),
            v => Ok(v),
        }
    }
}

impl<K: Kv> SealedStore for EtcdStore<K> {
    fn store(&mut self, blob: &[u8]) -> Result<u64, StoreError> {
        let seen = self.current()?;
        self.store_seen(blob, seen)
    }

    fn load(&mut self, min_generation: u64) -> Result<Option<Loaded>, StoreError> {
        let Some(c) = self.current()? else {
            return if min_generation == 0 {
                Ok(None)
            } else {
                Err(Unusable::NoIntactState { current: SlotProblem::Missing, previous: SlotProblem::Missing }.into())
            };
        };
        let current = self.read_generation(c)?;
        let previous = match c.checked_sub(1) {
            Some(p) if p > 0 => self.read_generation(p)?,
            _ => Err(SlotProblem::Missing),
        };
        let (slot, (blob, header), skipped) = match (current, previous) {
            (Ok(cur), _) => (Slot::Current, cur, Vec::new()),
            (Err(why), Ok(prev)) => (Slot::Previous, prev, vec![(Slot::Current, why)]),
            (Err(current), Err(previous)) => return Err(Unusable::NoIntactState { current, previous }.into()),
        };
        if header.generation < min_generation {
            return Err(Unusable::Rollback { found: header.generation, min: min_generation }.into());
        }
        Ok(Some(Loaded { blob, header, slot, skipped }))
    }
}

#[cfg(test)]
mod real_tests;
#[cfg(test)]
pub(crate) mod tests;
