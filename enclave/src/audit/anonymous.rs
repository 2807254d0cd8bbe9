//! Anonymous refusals, counted instead of recorded one by one.
//!
//! What this module decides: how refusals made before any authenticated step (a malformed
//! or oversized frame, a timeout, busy, a frame of the wrong channel, an unexpected first
//! message, a refused Hello) become audit entries: a count per deny code over one period,
//! turned into a single [`AuditEvent::AnonymousRefusals`] entry when the period has elapsed
//! or when the caller forces it (at an audit pull). Anyone who can open a connection can
//! cause such a refusal, so one entry each would let an unauthenticated peer fill the buffer
//! that releases need; a tally costs one entry a period whatever the rate.
//!
//! What it trusts: the caller's deny code (the KRE's own constant, never bytes from the
//! peer) and the injected clock. It does no I/O and bounds its own memory: at most
//! [`MAX_ANONYMOUS_CODES`] buckets (named codes of ≤ [`MAX_TALLY_CODE_LEN`] bytes, then
//! [`OTHER_CODE`] for any further or unusable code) and saturating counters.

use std::collections::BTreeMap;

use super::event::AuditEvent;
use super::MAX_ANONYMOUS_CODES;

/// Default aggregation period: at most one entry per minute of anonymous refusals.
pub const ANONYMOUS_PERIOD_MS: u64 = 60_000;
/// Shortest period a tally accepts; shorter periods are raised to this.
pub const MIN_PERIOD_MS: u64 = 1_000;
/// The bucket for codes beyond the named ones, and for empty or over-long codes.
pub const OTHER_CODE: &str = "other";
/// Longest code a tally names; a longer one is counted under [`OTHER_CODE`]. Keeps the
/// largest aggregate entry (32 × (1 + 64 + 8) bytes of counts) far below the entry limit.
pub const MAX_TALLY_CODE_LEN: usize = 64;
/// Named buckets: one of the [`MAX_ANONYMOUS_CODES`] is kept for [`OTHER_CODE`].
const MAX_NAMED: usize = MAX_ANONYMOUS_CODES - 1;

/// Counts of anonymous refusals for the current period (pure: no clock, no I/O).
///
/// The KRE calls [`record`](Self::record) for each anonymous refusal and then
/// [`super::AuditLog::append_anonymous`], which appends an entry only when
/// [`take`](Self::take) yields one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonymousTally {
    period_ms: u64,
    /// Code → count (≥ 1). At most `MAX_NAMED` codes other than [`OTHER_CODE`].
    counts: BTreeMap<String, u64>,
    /// (earliest, latest) time counted; `None` when empty.
    span: Option<(u64, u64)>,
}

impl Default for AnonymousTally {
    fn default() -> Self {
        Self::new(ANONYMOUS_PERIOD_MS)
    }
}

impl AnonymousTally {
    /// An empty tally that yields an entry once `period_ms` (at least [`MIN_PERIOD_MS`])
    /// has elapsed since the earliest refusal it holds.
    pub fn new(period_ms: u64) -> Self {
        Self { period_ms: period_ms.max(MIN_PERIOD_MS), counts: BTreeMap::new(), span: None }
    }

    /// The period in force (ms).
    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    /// True when nothing has been counted since the last [`take`](Self::take).
    pub fn is_empty(&self) -> bool {
        self.span.is_none()
    }

    /// Refusals counted (saturating).
    pub fn total(&self) -> u64 {
        self.counts.values().fold(0u64, |a, n| a.saturating_add(*n))
    }

    /// Counts one refusal with deny code `code` at `now_ms`. Only counts: no entry is made.
    pub fn record(&mut self, code: &str, now_ms: u64) {
        self.add(code, 1, now_ms, now_ms);
    }

    fn add(&mut self, code: &str, n: u64, first_ms: u64, last_ms: u64) {
        if n == 0 {
            return;
        }
        let named = !code.is_empty() && code.len() <= MAX_TALLY_CODE_LEN;
        let known = self.counts.contains_key(code);
        let has_other = self.counts.contains_key(OTHER_CODE);
        let named_len = self.counts.len().saturating_sub(usize::from(has_other));
        let bucket = if named && (known || named_len < MAX_NAMED) { code } else { OTHER_CODE };
        match self.counts.get_mut(bucket) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                self.counts.insert(bucket.to_owned(), n);
            }
        }
        self.span = Some(match self.span {
            Some((f, l)) => (f.min(first_ms), l.max(last_ms)),
            None => (first_ms, last_ms),
        });
    }

    /// True when the tally holds counts and `period_ms` has elapsed since the earliest.
    pub fn is_due(&self, now_ms: u64) -> bool {
        self.span.is_some_and(|(first, _)| now_ms.saturating_sub(first) >= self.period_ms)
    }

    /// The aggregate entry, when the period has elapsed (or, with `force`, whenever the
    /// tally is not empty); the tally is then empty and starts a new period. `None` leaves
    /// it unchanged.
    pub fn take(&mut self, now_ms: u64, force: bool) -> Option<AuditEvent> {
        if !(self.is_due(now_ms) || (force && !self.is_empty())) {
            return None;
        }
        let (first_ms, last_ms) = self.span.take()?;
        let counts = std::mem::take(&mut self.counts).into_iter().collect();
        Some(AuditEvent::AnonymousRefusals { first_ms, last_ms, counts })
    }

    /// Adds the counts of an `anonymous_refusals` event back (an entry that could not be
    /// appended), so that the next entry records them. Returns false, changing nothing, for
    /// any other event.
    pub fn merge(&mut self, event: &AuditEvent) -> bool {
        let AuditEvent::AnonymousRefusals { first_ms, last_ms, counts } = event else {
            return false;
        };
        for (code, n) in counts {
            self.add(code, *n, *first_ms, *last_ms);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(ev: &AuditEvent) -> Vec<(&str, u64)> {
        match ev {
            AuditEvent::AnonymousRefusals { counts, .. } => counts.iter().map(|(c, n)| (c.as_str(), *n)).collect(),
            other => panic!("not an aggregate: {other:?}"),
        }
    }

    #[test]
    fn counts_per_code_sorted_and_one_entry_per_period() {
        let mut t = AnonymousTally::default();
        assert_eq!(t.take(0, true), None);
        t.record("timeout", 1_000);
        t.record("busy", 1_500);
        t.record("timeout", 2_000);
        assert_eq!(t.total(), 3);
        assert_eq!(t.take(60_999, false), None, "period not elapsed");
        assert_eq!(t.total(), 3, "a refused take keeps the counts");
        let ev = t.take(61_000, false).expect("due");
        assert_eq!(
            ev,
            AuditEvent::AnonymousRefusals {
                first_ms: 1_000,
                last_ms: 2_000,
                counts: vec![("busy".into(), 1), ("timeout".into(), 2)],
            }
        );
        assert!(t.is_empty());
        assert_eq!(t.take(u64::MAX, true), None);
    }

    #[test]
    fn force_yields_early_and_period_is_configurable() {
        let mut t = AnonymousTally::new(5_000);
        t.record("malformed", 10);
        assert_eq!(t.take(11, false), None);
        assert_eq!(counts(&t.take(11, true).expect("forced")), vec![("malformed", 1)]);
        t.record("malformed", 20);
        assert_eq!(t.take(5_019, false), None);
        assert!(t.take(5_020, false).is_some());
        assert_eq!(AnonymousTally::new(0).period_ms(), MIN_PERIOD_MS);
    }

    #[test]
    fn distinct_codes_are_bounded_and_the_rest_is_other() {
        let mut t = AnonymousTally::default();
        for i in 0..100 {
            t.record(&format!("code{i:03}"), 5);
        }
        t.record("", 5);
        t.record(&"x".repeat(MAX_TALLY_CODE_LEN + 1), 5);
        t.record("code000", 5);
        let ev = t.take(0, true).expect("forced");
        let c = counts(&ev);
        assert_eq!(c.len(), MAX_ANONYMOUS_CODES);
        assert_eq!(c[0], ("code000", 2));
        assert_eq!(c[MAX_NAMED - 1], ("code030", 1));
        // 69 codes beyond the named ones, one empty, one over-long.
        assert_eq!(c[MAX_NAMED], (OTHER_CODE, 71));
        // It encodes: sorted, distinct, within the entry limit.
        assert!(super::super::AuditEntry::new([0; 48], 1, [0; 48], 0, 0, ev).is_ok());
    }

    #[test]
    fn counters_saturate() {
        let mut t = AnonymousTally::default();
        t.record("busy", 1);
        let ev = AuditEvent::AnonymousRefusals { first_ms: 0, last_ms: 9, counts: vec![("busy".into(), u64::MAX)] };
        assert!(t.merge(&ev));
        assert_eq!(t.total(), u64::MAX);
        assert_eq!(
            t.take(0, true),
            Some(AuditEvent::AnonymousRefusals { first_ms: 0, last_ms: 9, counts: vec![("busy".into(), u64::MAX)] })
        );
    }

    #[test]
    fn merge_restores_exactly_what_take_removed() {
        let mut t = AnonymousTally::default();
        t.record("busy", 7);
        t.record("wrong_channel", 9);
        let before = t.clone();
        let ev = t.take(8, true).expect("forced");
        assert!(t.merge(&ev));
        assert_eq!(t, before);
        assert!(!t.merge(&AuditEvent::Unrecorded { count: 1, first_ms: 0, last_ms: 0 }));
        assert_eq!(t, before);
    }
}
