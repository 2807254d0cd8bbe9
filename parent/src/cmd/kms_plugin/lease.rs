//! The lease on keys fetched from the KRE (`--kre`): when to re-attest, and what the plugin may
//! do with the keys it holds as time passes. Pure: the caller passes `now`.
//!
//! With `L` = `--lease` and `G` = `--grace`, and `t` = the time of the last successful fetch:
//!
//! | time | Encrypt | Decrypt | Status |
//! |---|---|---|---|
//! | no fetch yet | refused | refused | not ready (retrying with backoff) |
//! | `t` … `t + L` | yes | yes | `ok` (a refresh is tried from `t + L/2`) |
//! | `t + L` … `t + L + G` | refused | yes | lease expired, decrypt-only |
//! | after `t + L + G` | refused | refused | keys dropped (zeroized) |
//!
//! If the KRE answers a refresh with a final refusal (the image or cluster is no longer
//! allowed, or the KRE itself no longer attests as expected), that is a revocation: Encrypt
//! stops at once and the keys are dropped at `t + L`, without grace. The plugin asks again
//! every `L/2`; a later successful fetch restores service. A revoked or cut-off instance therefore loses its keys at most `L + G`
//! after its last successful fetch.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

/// First retry delay after a failed fetch; doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay (also bounded by a quarter lease).
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Each wait moved by up to ±20 % at random.
const BACKOFF_JITTER_PCT: u32 = 20;

/// The configured lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeasePolicy {
    pub(crate) lease: Duration,
    pub(crate) grace: Duration,
}

/// Why an operation is refused under the lease. Carries no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LeaseRefusal {
    /// No fetch has succeeded yet.
    #[error("no keys yet: waiting for the first key fetch from the KRE ({0})")]
    NotReady(String),
    /// The lease ended; the keys are decrypt-only until the grace ends.
    #[error("lease expired {0:?} ago; refusing new encryptions ({1})")]
    Expired(Duration, String),
    /// The KRE refused this instance.
    #[error("revoked: the KRE refused this instance ({0})")]
    Revoked(String),
    /// The lease and grace are over; the keys were dropped.
    #[error("lease and grace ended {0:?} ago; keys dropped ({1})")]
    Dropped(Duration, String),
}

/// The lease state.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    policy: LeasePolicy,
    last_success: Option<Instant>,
    revoked: bool,
    last_error: Option<String>,
    /// The wait before the next attempt after failures (jittered, so that a fleet of plugins
    /// does not retry a restarted KRE in step).
    backoff: Backoff,
    /// Answers refused by the client's checks (relays, substituted KREs) since the start.
    refused_answers: u64,
    next_attempt: Instant,
}

/// The longest wait between attempts: [`MAX_BACKOFF`], or a quarter of a shorter lease.
fn retry_cap(policy: LeasePolicy) -> Duration {
    MAX_BACKOFF.min((policy.lease / 4).max(Duration::from_millis(100)))
}

impl Lease {
    /// A lease with no keys yet; the first fetch is due at `now`.
    pub(crate) fn new(policy: LeasePolicy, now: Instant) -> Self {
        Self {
            policy,
            last_success: None,
            revoked: false,
            last_error: None,
            backoff: Backoff::new(FIRST_BACKOFF, retry_cap(policy), BACKOFF_JITTER_PCT),
            refused_answers: 0,
            next_attempt: now,
        }
    }

    /// A fetch succeeded at `now`: the lease restarts, the next refresh is due at half lease.
    pub(crate) fn on_success(&mut self, now: Instant) {
        self.last_success = Some(now);
        self.revoked = false;
        self.last_error = None;
        self.backoff.reset();
        self.next_attempt = now + self.policy.lease / 2;
    }

    /// A fetch failed at `now` with `reason` (never secret). `revocation` = the failure is
    /// final (the KRE refused this instance, or the KRE failed our checks).
    pub(crate) fn on_failure(&mut self, now: Instant, reason: String, revocation: bool) {
        self.revoked |= revocation;
        self.last_error = Some(reason);
        // After a refusal, asking again at once would only fill the KRE's audit log: try again
        // on the refresh schedule (the policy may allow the image again).
        // Never past the cap, jitter included: a lease sees several attempts before it ends.
        let backoff = self.backoff.next_wait().min(retry_cap(self.policy));
        let wait = if self.revoked { backoff.max(self.policy.lease / 2) } else { backoff };
        self.next_attempt = now + wait;
    }

    /// An answer failed the client's checks at `now` (a relay or a substituted KRE): not a
    /// revocation, the held keys stay, the refusal is counted and reported, and the next
    /// attempt comes with backoff.
    pub(crate) fn on_refused_answer(&mut self, now: Instant, reason: String) {
        self.refused_answers = self.refused_answers.saturating_add(1);
        self.on_failure(now, reason, false);
    }

    /// Answers refused by the client's checks since the start.
    pub(crate) fn refused_answers(&self) -> u64 {
        self.refused_answers
    }

    /// When the next fetch should start.
    pub(crate) fn next_attempt(&self) -> Instant {
        self.next_attempt
    }

    /// When the keys must be dropped (None: no keys were ever fetched).
    pub(crate) fn drop_at(&self) -> Option<Instant> {
        let t = self.last_success?;
        Some(if self.revoked { t + self.policy.lease } else { t + self.policy.lease + self.policy.grace })
    }

    fn reason(&self) -> String {
        self.last_error.clone().unwrap_or_else(|| "no error recorded".to_owned())
    }

    /// How long Encrypt may still run after `now` without a refresh (zero: no keys, or revoked).
    pub(crate) fn encrypt_remaining(&self, now: Instant) -> Duration {
        match self.last_success {
            Some(t) if !self.revoked => (t + self.policy.lease).saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    /// Whether Encrypt may run at `now`.
    pub(crate) fn can_encrypt(&self, now: Instant) -> Result<(), LeaseRefusal> {
        self.can_decrypt(now)?;
        let Some(t) = self.last_success else { return Err(LeaseRefusal::NotReady(self.reason())) };
        if self.revoked {
            return Err(LeaseRefusal::Revoked(self.reason()));
        }
        let end = t + self.policy.lease;
        if now >= end {
            return Err(LeaseRefusal::Expired(now.duration_since(end), self.reason()));
        }
        Ok(())
    }

    /// Whether Decrypt may run at `now`.
    pub(crate) fn can_decrypt(&self, now: Instant) -> Result<(), LeaseRefusal> {
        let Some(drop_at) = self.drop_at() else { return Err(LeaseRefusal::NotReady(self.reason())) };
        if now >= drop_at {
            return Err(LeaseRefusal::Dropped(now.duration_since(drop_at), self.reason()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    trait Healthz {
        fn healthz(&self, now: Instant) -> String;
    }
    impl Healthz for Lease {
        fn healthz(&self, now: Instant) -> String {
            self.can_encrypt(now).map(|()| "ok".to_owned()).unwrap_or_else(|e| e.to_string())
        }
    }

    fn lease(t0: Instant) -> Lease {
        Lease::new(LeasePolicy { lease: 10 * S, grace: 4 * S }, t0)
    }

    #[test]
    fn nothing_before_the_first_fetch() {
        let t0 = Instant::now();
        let mut l = lease(t0);
        assert_eq!(l.next_attempt(), t0);
        assert!(matches!(l.can_encrypt(t0), Err(LeaseRefusal::NotReady(_))));
        assert!(matches!(l.can_decrypt(t0), Err(LeaseRefusal::NotReady(_))));
        l.on_failure(t0, "connecting to unix:/x: refused".into(), false);
        assert!(l.healthz(t0).contains("connecting to"), "{}", l.healthz(t0));
        assert_eq!(l.drop_at(), None);
    }

    #[test]
    fn valid_for_one_lease_refreshed_at_half() {
        let t0 = Instant::now();
        let mut l = lease(t0);
        l.on_success(t0);
        assert_eq!(l.healthz(t0), "ok");
        assert_eq!(l.next_attempt(), t0 + 5 * S);
        assert!(l.can_encrypt(t0 + 9 * S).is_ok());
        assert_eq!(l.encrypt_remaining(t0 + 4 * S), 6 * S);
        assert_eq!(l.encrypt_remaining(t0 + 11 * S), Duration::ZERO);
        l.on_success(t0 + 5 * S);
        assert!(l.can_encrypt(t0 + 14 * S).is_ok());
        assert_eq!(l.drop_at(), Some(t0 + 19 * S));
    }

    #[test]
    fn unreachable_kre_expires_encrypt_at_lease_end_and_decrypt_after_grace() {
        let t0 = Instant::now();
        let mut l = lease(t0);
        l.on_success(t0);
        let mut t = t0 + 5 * S;
        while t < t0 + 20 * S {
            l.on_failure(t, "transport: no answer".into(), false);
            assert!(l.next_attempt() > t && l.next_attempt() <= t + 5 * S / 2);
            t = l.next_attempt();
        }
        assert!(l.can_encrypt(t0 + 10 * S - Duration::from_millis(1)).is_ok());
        assert!(matches!(l.can_encrypt(t0 + 10 * S), Err(LeaseRefusal::Expired(..))));
        assert!(l.can_decrypt(t0 + 13 * S).is_ok());
        assert!(matches!(l.can_decrypt(t0 + 14 * S), Err(LeaseRefusal::Dropped(..))));
        assert!(l.healthz(t0 + 11 * S).contains("lease expired"));
        // The KRE comes back: service resumes.
        l.on_success(t0 + 20 * S);
        assert_eq!(l.healthz(t0 + 20 * S), "ok");
    }

    #[test]
    fn revocation_stops_encrypt_at_once_and_decrypt_at_lease_end() {
        let t0 = Instant::now();
        let mut l = lease(t0);
        l.on_success(t0);
        l.on_failure(t0 + 5 * S, "the KRE denied the request: image_not_allowed".into(), true);
        assert!(matches!(l.can_encrypt(t0 + 5 * S), Err(LeaseRefusal::Revoked(_))));
        assert_eq!(l.encrypt_remaining(t0 + 5 * S), Duration::ZERO);
        assert!(l.healthz(t0 + 5 * S).contains("image_not_allowed"));
        assert!(l.can_decrypt(t0 + 9 * S).is_ok());
        assert!(l.can_decrypt(t0 + 10 * S).is_err(), "no grace after a revocation");
        // Transient failures afterwards do not lift the revocation.
        l.on_failure(t0 + 6 * S, "transport".into(), false);
        assert!(matches!(l.can_encrypt(t0 + 6 * S), Err(LeaseRefusal::Revoked(_))));
    }

    #[test]
    fn backoff_doubles_and_is_capped_within_its_jitter() {
        let t0 = Instant::now();
        let within = |d: Duration, nominal: Duration| nominal * 8 / 10 <= d && d <= nominal * 12 / 10;
        let mut l = Lease::new(LeasePolicy { lease: 600 * S, grace: S }, t0);
        let mut delays = Vec::new();
        for _ in 0..8 {
            l.on_failure(t0, "x".into(), false);
            delays.push(l.next_attempt() - t0);
        }
        assert!(within(delays[0], Duration::from_millis(200)), "{delays:?}");
        assert!(within(delays[1], Duration::from_millis(400)), "{delays:?}");
        assert!(within(delays[7], MAX_BACKOFF) && delays[7] <= MAX_BACKOFF, "{delays:?}");
        let mut short = Lease::new(LeasePolicy { lease: 2 * S, grace: S }, t0);
        for _ in 0..8 {
            short.on_failure(t0, "x".into(), false);
        }
        let capped = short.next_attempt() - t0;
        assert!(within(capped, Duration::from_millis(500)) && capped <= Duration::from_millis(500), "{capped:?}");
        // A success starts the doubling again.
        short.on_success(t0);
        short.on_failure(t0, "x".into(), false);
        assert!(within(short.next_attempt() - t0, Duration::from_millis(200)));
    }
}
