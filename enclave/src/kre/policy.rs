//! The policy book: the one owner of where the allowed images come from (a startup policy
//! file, or pipeline-signed bundles from the genesis bundle built into the image), the
//! bundles accepted in this run, and the durable floor (with custodians, the state as of the
//! policy head the committed sealed state carries; the stricter of it and the newest applies
//! until a commit carries the newest). Decides what policy is in force and whether a pushed
//! bundle is applied (`Kre::push_policy`, all or nothing, never without its audit entry).
//! Trusts `keygate-attestation`'s bundle verification. Spec: docs/policy.md.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use keygate_attestation::bundle::{self, ApplyReport, PolicyState};
use keygate_attestation::freshness::{self, Freshness, Timestamp};
use keygate_attestation::policy::ReleasePolicy;

use crate::audit::AuditEvent;
use crate::state::custody;

use super::error::KekError;
use super::error::{Denial, Error, Stage};
use super::{lock, read, write, Kre};

/// Where the allowed images come from.
#[derive(Debug)]
pub(super) enum PolicySource {
    /// A startup policy file (no pushes).
    Static(Arc<ReleasePolicy>),
    /// Pipeline-signed bundles, from the genesis bundle built into the image; with custodians,
    /// also the state as of the policy head the committed sealed state carries, kept while a
    /// newer bundle is in force but not yet durable (the stricter of the two then holds).
    Signed(PolicyState, Option<Box<PolicyState>>),
}

/// The policy source, the history of accepted bundles and the lock that serialises changes
/// (see the lock order of the module `kre`).
#[derive(Debug)]
pub(super) struct PolicyBook {
    /// Held by every change of the source (a push, the fix-up after an unseal, dropping the
    /// durable floor) from its first read to its last write, NSM draws included; readers
    /// never take it.
    writer: Mutex<()>,
    /// Held only to read or swap in memory.
    source: RwLock<PolicySource>,
    /// (version, digest) of every bundle accepted in this run, to check the sealed policy head.
    history: Mutex<Vec<(u64, [u8; 48])>>,
    /// The newest pipeline timestamp taken ([`freshness`]): it names the newest policy the
    /// pipeline vouches for and when. Kept in memory only: after a restart releases wait for
    /// the next one.
    timestamp: Mutex<Option<Timestamp>>,
}

impl PolicyBook {
    pub(super) fn new(source: PolicySource) -> Self {
        let book = Self {
            writer: Mutex::new(()),
            source: RwLock::new(source),
            history: Mutex::new(Vec::new()),
            timestamp: Mutex::new(None),
        };
        if let Some(head) = book.head() {
            lock(&book.history).push(head);
        }
        book
    }

    fn source(&self) -> RwLockReadGuard<'_, PolicySource> {
        read(&self.source)
    }

    /// The signed policy's newest version and digest (`None` with a static policy file).
    pub(super) fn head(&self) -> Option<(u64, [u8; 48])> {
        match &*self.source() {
            PolicySource::Static(_) => None,
            PolicySource::Signed(s, _) => Some((s.latest().bundle.body.version, s.latest().digest)),
        }
    }

    /// The approver keys of the newest signed policy (none with a static policy file): a
    /// custodian key may not be one of them (one key, one purpose).
    pub(super) fn approvers(&self) -> Vec<[u8; 97]> {
        match &*self.source() {
            PolicySource::Static(_) => Vec::new(),
            PolicySource::Signed(s, _) => s.latest().bundle.body.approvers.clone(),
        }
    }

    /// The clusters of the newest policy with their current KEK version and the version
    /// below which it retires KEKs.
    pub(super) fn schedule(&self) -> Vec<(String, u32, u32)> {
        match &*self.source() {
            PolicySource::Static(p) => schedule_of(p),
            PolicySource::Signed(s, _) => schedule_of(&s.latest().bundle.body.policy),
        }
    }

    /// The clusters of the newest policy.
    pub(super) fn clusters(&self) -> Vec<String> {
        self.schedule().into_iter().map(|(c, _, _)| c).collect()
    }

    /// The release policy in force at `now_ms`.
    pub(super) fn in_force(&self, now_ms: u64) -> Arc<ReleasePolicy> {
        match &*self.source() {
            PolicySource::Static(p) => p.clone(),
            PolicySource::Signed(s, None) => Arc::new(s.effective(now_ms)),
            PolicySource::Signed(s, Some(durable)) => {
                Arc::new(bundle::stricter(&durable.effective(now_ms), &s.effective(now_ms)))
            }
        }
    }

    /// The newest policy alone at `now_ms`, while it is in force but not durable.
    pub(super) fn undurable(&self, now_ms: u64) -> Option<ReleasePolicy> {
        match &*self.source() {
            PolicySource::Signed(s, Some(_)) => Some(s.effective(now_ms)),
            _ => None,
        }
    }

    /// Whether a newer bundle is in force but not yet durable.
    pub(super) fn in_force_not_durable(&self) -> bool {
        matches!(&*self.source(), PolicySource::Signed(_, Some(_)))
    }

    /// Whether this run accepted bundle `(version, digest)`.
    pub(super) fn accepted(&self, version: u64, digest: &[u8; 48]) -> bool {
        lock(&self.history).iter().any(|(v, d)| *v == version && d == digest)
    }

    /// Whether releases may go on under the sealed state's policy `floor`.
    pub(super) fn check_floor(&self, floor: (u64, [u8; 48])) -> Result<(), Error> {
        floor_check(&lock(&self.history), floor)
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        lock(&self.writer)
    }

    /// The timestamp key and maximum age in force at `now_ms` (none with a static policy
    /// file; a loosening of them waits for the activation delay, `PolicyState::freshness_in_force`).
    pub(super) fn freshness(&self, now_ms: u64) -> Option<Freshness> {
        match &*self.source() {
            PolicySource::Static(_) => None,
            PolicySource::Signed(s, _) => s.freshness_in_force(now_ms),
        }
    }

    /// Whether releases may go on at `now_ms` as far as the pipeline's timestamps go
    /// ([`freshness::check`] on the newest policy's head); the time until which they may.
    pub(super) fn check_fresh(&self, now_ms: u64) -> Result<Option<u64>, Error> {
        let Some(head) = self.head() else { return Ok(None) };
        let freshness = self.freshness(now_ms);
        freshness::check(freshness.as_ref(), lock(&self.timestamp).as_ref(), head, now_ms)
            .map_err(Error::PolicyNotFresh)
    }

    /// The held timestamp as the status reports it: (version, issued_ms).
    pub(super) fn timestamp(&self) -> Option<(u64, u64)> {
        lock(&self.timestamp).as_ref().map(|t| (t.version, t.issued_ms))
    }

    /// Takes a pushed timestamp (`bytes`): it must be signed by the newest policy's timestamp
    /// key and not issued after `now_ms` + `skew_ms`; it replaces the held one only when it
    /// names a newer version or is a later one of the same ([`freshness::supersedes`]), so a
    /// replayed older timestamp changes nothing. Returns the timestamp held afterwards.
    pub(super) fn take_timestamp(
        &self,
        crypto: &dyn keygate_attestation::crypto::Crypto,
        bytes: &[u8],
        now_ms: u64,
        skew_ms: u64,
    ) -> Result<Timestamp, Error> {
        let t = freshness::decode(bytes).map_err(Error::TimestampRefused)?;
        freshness::verify(crypto, self.freshness(now_ms).as_ref(), &t, now_ms, skew_ms)
            .map_err(Error::TimestampRefused)?;
        let mut held = lock(&self.timestamp);
        if freshness::supersedes(&t, held.as_ref()) {
            *held = Some(t.clone());
        }
        Ok(held.clone().unwrap_or(t))
    }
}

/// Why releases wait for the policy: the sealed state recorded a newer policy head (`floor`)
/// than the chain replayed so far (`history`), or the replayed chain differs at that version
/// (a fork).
fn floor_check(history: &[(u64, [u8; 48])], (fv, fd): (u64, [u8; 48])) -> Result<(), Error> {
    match history.iter().find(|(v, _)| *v == fv) {
        Some((_, d)) if *d == fd => Ok(()),
        Some(_) => Err(Error::PolicyForked(fv)),
        None => Err(Error::PolicyBehind { recorded: fv, replayed: history.last().map_or(0, |(v, _)| *v) }),
    }
}

/// (cluster, kek_version, kek_retire_below) of every cluster of `p`.
pub(super) fn schedule_of(p: &ReleasePolicy) -> Vec<(String, u32, u32)> {
    p.clusters.iter().map(|(c, r)| (c.clone(), r.kek_version, r.kek_retire_below)).collect()
}

impl Kre {
    /// Verifies and applies a pushed bundle (atomically: all or nothing).
    ///
    /// Applied to a copy, the KEKs made, then swapped in: a failure leaves the state as it
    /// was. New clusters get their KEKs, and rotated ones their new versions, before the
    /// bundle takes effect (with custodians: in the working state, usable once the parent has
    /// stored and committed it). Nothing is applied without its record: `ensure_keks` checks
    /// that the rotations and the `PolicyAccepted` entry fit before it changes anything, and
    /// hands back the audit lock, under which the entry is appended and the new state swapped
    /// in. Locks: policy writer (throughout) → vault → KEKs → audit log → policy source.
    pub(super) fn push_policy(&self, bundle: &[u8], now_ms: u64) -> Result<ApplyReport, Denial> {
        let meta = bundle::decode_bundle(bundle, self.crypto).ok();
        let stage = Stage::Policy {
            version: meta.as_ref().map(|b| b.body.version),
            digest: meta.as_ref().map(|b| bundle::digest(&b.body_bytes)),
        };
        let deny = |e| Denial::at(stage.clone(), e);
        let writer = self.policy.writer();
        // What a restart would come back to.
        let committed = self.state.as_ref().map(|s| s.committed_policy().and_then(|(_, head)| head));
        let mut next = match &*self.policy.source() {
            PolicySource::Static(_) => return Err(deny(Error::PolicyStatic)),
            PolicySource::Signed(state, _) => state.clone(),
        };
        let mut report = next.apply(bundle, now_ms, self.crypto).map_err(|e| deny(Error::BundleRefused(e)))?;
        // One key, one purpose: no approver set in force may hold a custodian key.
        if let Some(s) = &self.state {
            let approvers = &next.latest().bundle.body.approvers;
            if let Some(index) = custody::custodian_also_approver(s.vault().set(), approvers) {
                return Err(deny(Error::ApproverIsCustodian { index }));
            }
        }
        // A bundle accepted before (a replay after a restart) keeps the activation time the
        // sealed state recorded for exactly it, not a fresh delay.
        if let Some(at) = self.state.as_ref().and_then(|s| s.vault().activation_of(report.version, &report.digest)) {
            if next.restore_activation(report.version, &report.digest, at) {
                report.activates_at_ms = at;
            }
        }
        if let Some((fv, fd)) = self.state.as_ref().and_then(|s| s.vault().policy_floor()) {
            if report.version == fv && report.digest != fd {
                return Err(deny(Error::BundleForked { version: fv, recorded: fd }));
            }
        }
        let accepted = AuditEvent::PolicyAccepted {
            version: report.version,
            digest: report.digest,
            activates_at_ms: report.activates_at_ms,
        };
        let schedule = schedule_of(&next.latest().bundle.body.policy);
        let mut log = self.ensure_keks(&schedule, std::slice::from_ref(&accepted)).map_err(|e| match e {
            KekError::Audit(e) => deny(Error::PolicyNotRecorded(e)),
            e => deny(Error::PolicyKeks(e)),
        })?;
        let previous_version = log.policy_version();
        log.set_policy_version(report.version);
        if let Err(e) = log.append(accepted, now_ms) {
            log.set_policy_version(previous_version);
            tracing::debug!(error = %e, "policy acceptance not recorded; the policy is not applied");
            return Err(deny(Error::PolicyNotRecorded(e)));
        }
        if let PolicySource::Signed(state, durable) = &mut *write(&self.policy.source) {
            let before = std::mem::replace(state, next);
            // With custodians, a bundle beyond the committed head is in force but not durable:
            // the state as of the durable head is kept (if not kept already), and the stricter
            // of the two applies until a commit carries the new head.
            if let Some(committed) = committed {
                if durable.is_none() && committed.is_none_or(|(v, _)| report.version > v) {
                    *durable = Some(Box::new(before));
                }
            }
        }
        drop(log);
        lock(&self.policy.history).push((report.version, report.digest));
        if let Some(s) = &self.state {
            let mut v = s.vault();
            v.set_policy_head((report.version, report.digest));
            v.record_activation(report.version, report.digest, report.activates_at_ms);
        }
        drop(writer);
        Ok(report)
    }

    /// After an unseal: bundles replayed before it count toward the policy head (a pending
    /// head takes the activation time the sealed state recorded for it, and the head's time
    /// is recorded), and clusters of the current policy that the state lacks get KEKs
    /// (stored before use). Locks: policy writer → vault → policy source; all released
    /// before the KEK step.
    pub(super) fn after_unseal(&self, now_ms: u64) {
        if let Some(s) = &self.state {
            let _writer = self.policy.writer();
            let mut v = s.vault();
            if let PolicySource::Signed(state, _) = &mut *write(&self.policy.source) {
                let (version, digest) = (state.latest().bundle.body.version, state.latest().digest);
                v.set_policy_head((version, digest));
                // The genesis bundle (version 1) is in force from the start: no record.
                if version > 1 {
                    if let Some(at) = v.activation_of(version, &digest) {
                        state.restore_activation(version, &digest, at);
                    }
                    let at = state.pending_activation().map_or(now_ms, |(_, _, at)| at);
                    v.record_activation(version, digest, at);
                }
            }
        }
        if let Err(e) = self.ensure_keks(&self.policy.schedule(), &[]).map(drop) {
            tracing::warn!(error = %e, "could not add KEKs for new clusters or rotations after unseal");
        }
        self.refresh_durable_policy();
    }

    /// Drops the kept durable policy once the committed sealed state carries the newest head
    /// (after a commit or an unseal). Locks: policy writer → vault, then the policy source.
    pub(super) fn refresh_durable_policy(&self) {
        let Some(s) = &self.state else { return };
        let _writer = self.policy.writer();
        let carried = s.committed_policy_version();
        if let PolicySource::Signed(state, durable) = &mut *write(&self.policy.source) {
            let latest = state.latest().bundle.body.version;
            if durable.is_some() && carried.is_some_and(|cv| cv >= latest) {
                *durable = None;
            }
        }
    }
}

impl PolicyBook {
    /// The cluster members in force at `now_ms` (`docs/cluster.md`): none with a static policy
    /// file; with signed bundles, the members of the bundle in force, and while the newest is
    /// in force but not durable only those the durable bundle also names (as the stricter
    /// policy holds for releases).
    pub(super) fn members(&self, now_ms: u64) -> Vec<keygate_attestation::members::Member> {
        match &*self.source() {
            PolicySource::Static(_) => Vec::new(),
            PolicySource::Signed(s, None) => s.members_in_force(now_ms),
            PolicySource::Signed(s, Some(durable)) => {
                let old = durable.members_in_force(now_ms);
                s.members_in_force(now_ms).into_iter().filter(|m| old.contains(m)).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_holds_until_the_replayed_chain_reaches_it_unforked() {
        let history = [(1, [1; 48]), (2, [2; 48])];
        assert!(floor_check(&history, (2, [2; 48])).is_ok());
        assert!(floor_check(&history, (1, [1; 48])).is_ok());
        assert!(matches!(floor_check(&history, (2, [9; 48])), Err(Error::PolicyForked(2))));
        assert!(matches!(floor_check(&history, (3, [3; 48])), Err(Error::PolicyBehind { recorded: 3, replayed: 2 })));
        assert!(matches!(floor_check(&[], (1, [1; 48])), Err(Error::PolicyBehind { recorded: 1, replayed: 0 })));
    }
}
