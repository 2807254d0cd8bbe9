//! The challenge table: issued server nonces with their issue time, single use, short TTL,
//! bounded size; and a bounded memory of recently used nonces so that a replay is named as
//! such.
//!
//! When the table is full (after dropping expired entries) a new challenge is refused
//! (`Busy`) rather than evicting a live one: evicting would let a Hello flood invalidate
//! legitimate clients' challenges, while refusing only delays new handshakes, which retry.
//! Outstanding challenges are further bounded by the server's connection limit, since each
//! connection holds at most one.
//!
//! Owned by the KRE as [`Challenges`] (a leaf lock); trusts only the caller's clock. Spec:
//! docs/protocol.md (the challenge), docs/threat-model.md (Hello floods).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

/// What became of a nonce presented in a Release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeem {
    /// Issued, unexpired, now consumed.
    Ok,
    /// Issued, but its TTL passed.
    Expired,
    /// Already consumed earlier (a replay).
    Reused,
    /// Never issued (or forgotten long ago).
    Unknown,
}

/// Bounded table of issued and recently used nonces.
#[derive(Debug)]
pub struct NonceTable {
    ttl_ms: u64,
    capacity: usize,
    issued: HashMap<[u8; 32], u64>,
    issued_order: VecDeque<([u8; 32], u64)>,
    used: HashMap<[u8; 32], u64>,
    used_order: VecDeque<[u8; 32]>,
}

impl NonceTable {
    /// A table holding at most `capacity` live challenges, each valid for `ttl_ms`.
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            ttl_ms,
            capacity,
            issued: HashMap::new(),
            issued_order: VecDeque::new(),
            used: HashMap::new(),
            used_order: VecDeque::new(),
        }
    }

    /// Live challenges.
    pub fn len(&self) -> usize {
        self.issued.len()
    }

    /// Whether no challenge is live.
    pub fn is_empty(&self) -> bool {
        self.issued.is_empty()
    }

    /// Drops challenges issued more than a TTL ago (they can only ever be `Expired`;
    /// remembering them as such is not worth unbounded memory).
    fn purge(&mut self, now_ms: u64) {
        while let Some((n, at)) = self.issued_order.front().copied() {
            if now_ms.saturating_sub(at) <= self.ttl_ms {
                break;
            }
            self.issued_order.pop_front();
            if self.issued.get(&n) == Some(&at) {
                self.issued.remove(&n);
            }
        }
    }

    /// Records `nonce` as issued at `now_ms`. `false` when the table is full.
    pub fn issue(&mut self, nonce: [u8; 32], now_ms: u64) -> bool {
        self.purge(now_ms);
        if self.issued_order.len() >= 2 * self.capacity.max(1) {
            // Redeemed or forgotten entries linger in the order queue until their TTL:
            // compact (amortized O(1)) so the queue stays within twice the capacity.
            let issued = &self.issued;
            self.issued_order.retain(|(n, at)| issued.get(n) == Some(at));
        }
        if self.issued.len() >= self.capacity {
            return false;
        }
        self.issued.insert(nonce, now_ms);
        self.issued_order.push_back((nonce, now_ms));
        true
    }

    /// Consumes `nonce` (single use).
    pub fn redeem(&mut self, nonce: &[u8; 32], now_ms: u64) -> Redeem {
        if self.used.contains_key(nonce) {
            return Redeem::Reused;
        }
        let Some(at) = self.issued.remove(nonce) else {
            return Redeem::Unknown;
        };
        self.remember_used(*nonce, now_ms);
        if now_ms.saturating_sub(at) > self.ttl_ms {
            Redeem::Expired
        } else {
            Redeem::Ok
        }
    }

    /// Whether `nonce` was consumed recently.
    pub fn was_used(&self, nonce: &[u8]) -> bool {
        <[u8; 32]>::try_from(nonce).is_ok_and(|n| self.used.contains_key(&n))
    }

    /// Forgets a challenge without using it (its connection closed).
    pub fn forget(&mut self, nonce: &[u8; 32]) {
        self.issued.remove(nonce);
    }

    fn remember_used(&mut self, nonce: [u8; 32], now_ms: u64) {
        // Remember as many used nonces as live ones, FIFO.
        while self.used_order.len() >= self.capacity.max(1) {
            if let Some(old) = self.used_order.pop_front() {
                self.used.remove(&old);
            }
        }
        self.used.insert(nonce, now_ms);
        self.used_order.push_back(nonce);
    }
}

/// The KRE's challenge table, the one owner of its lock (a leaf of the lock order: nothing
/// else is taken while it is held).
#[derive(Debug)]
pub(super) struct Challenges(Mutex<NonceTable>);

impl Challenges {
    /// See [`NonceTable::new`].
    pub(super) fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self(Mutex::new(NonceTable::new(capacity, ttl_ms)))
    }

    /// The table, locked.
    pub(super) fn table(&self) -> MutexGuard<'_, NonceTable> {
        super::lock(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_and_ttl() {
        let mut t = NonceTable::new(4, 1000);
        assert!(t.issue([1; 32], 0));
        assert_eq!(t.redeem(&[1; 32], 500), Redeem::Ok);
        assert_eq!(t.redeem(&[1; 32], 600), Redeem::Reused);
        assert!(t.was_used(&[1; 32]));
        assert!(t.issue([2; 32], 0));
        assert_eq!(t.redeem(&[2; 32], 1001), Redeem::Expired);
        assert_eq!(t.redeem(&[3; 32], 0), Redeem::Unknown);
    }

    #[test]
    fn ttl_boundary_is_inclusive_and_is_empty_tracks_live_challenges() {
        let mut t = NonceTable::new(4, 1000);
        assert!(t.is_empty());
        assert!(t.issue([1; 32], 0));
        assert!(!t.is_empty());
        assert_eq!(t.redeem(&[1; 32], 1000), Redeem::Ok, "valid for exactly its TTL");
        assert!(t.is_empty());
    }

    #[test]
    fn compaction_keeps_live_challenges_purgeable() {
        // A live challenge issued first, then many issued-and-redeemed ones: compaction must
        // drop the redeemed ones from the order queue and keep the live one, so that it is
        // purged when its TTL passes and the table frees up.
        let mut t = NonceTable::new(2, 1000);
        assert!(t.issue([0xaa; 32], 0));
        for i in 0u8..10 {
            assert!(t.issue([i; 32], 0));
            assert_eq!(t.redeem(&[i; 32], 0), Redeem::Ok);
        }
        assert!(t.issue([0xb1; 32], 2000), "the expired live challenge was purged");
        assert!(t.issue([0xb2; 32], 2000), "room for a second one");
        assert!(!t.issue([0xb3; 32], 2000), "and then full");
    }

    #[test]
    fn bounded_and_refuses_when_full() {
        let mut t = NonceTable::new(2, 1000);
        assert!(t.issue([1; 32], 0));
        assert!(t.issue([2; 32], 0));
        assert!(!t.issue([3; 32], 10), "full: refuse, never evict a live challenge");
        assert_eq!(t.redeem(&[1; 32], 20), Redeem::Ok);
        assert!(t.issue([3; 32], 20));
        // After the TTL the old entries are purged and room frees up.
        assert!(t.issue([4; 32], 2000));
        assert!(t.issue([5; 32], 2000));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let mut t = NonceTable::new(100, 50);
        for i in 0u32..100_000 {
            let mut n = [0u8; 32];
            n[..4].copy_from_slice(&i.to_be_bytes());
            let now = u64::from(i);
            if t.issue(n, now) && i % 2 == 0 {
                let _ = t.redeem(&n, now);
            }
            assert!(t.issued.len() <= 100 && t.issued_order.len() <= 200 && t.used.len() <= 100);
        }
    }
}
