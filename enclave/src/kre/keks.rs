//! The KEK source: which KEK versions a release may use, from the ephemeral store (a KRE
//! without custodians) or the sealed state's committed KEKs, behind one function; and the
//! making of the versions a policy names (`Kre::ensure_keks`). Decides: current first, then
//! up to three older active ones, none retired by the policy nor above its `kek_version`;
//! with custodians, only committed versions. Trusts the policy in force and the NSM's
//! random source. Spec: docs/policy.md ("KEK rotation"), docs/durability.md.

use std::borrow::Borrow;
use std::sync::{MutexGuard, RwLock};

use keygate_attestation::policy::ClusterRule;

use crate::audit::{AuditEvent, AuditLog};
use crate::crypto::keys::{self, Kek, KekStatus, KekStore};
use crate::state::vault::{Phase, VaultError};
use crate::wire::Id;

use super::audit::append_admin;
use super::error::Error;
use super::error::KekError;
use super::state::StateService;
use super::{read, wall_clock_ms, write, Kre, MAX_VERSIONS_RELEASED};

/// The ephemeral KEKs (a KRE without custodians); with custodians the sealed state's
/// committed KEKs are used instead.
#[derive(Debug, Default)]
pub(super) struct KekSource {
    ephemeral: RwLock<KekStore>,
}

impl KekSource {
    /// The KEK versions releasable for `cluster` under its effective policy `rule`, from the
    /// sealed state when there is one (`sealed`), else from the ephemeral store.
    pub(super) fn releasable(
        &self,
        sealed: Option<&StateService>,
        cluster: &Id,
        rule: &ClusterRule,
    ) -> Result<Vec<(u32, Kek)>, Error> {
        match sealed {
            Some(s) => select(s.vault().releasable(cluster), cluster, rule, true),
            None => select(read(&self.ephemeral).releasable(cluster), cluster, rule, false),
        }
    }
}

/// The one releasable-KEK rule over either store's `offered` versions (current first, then
/// older active ones): those the `rule` releases, at most [`MAX_VERSIONS_RELEASED`]. None is
/// `state_pending` from the sealed state (its KEK is not committed yet), `internal` from the
/// ephemeral store.
fn select<K: Borrow<Kek>>(
    offered: Vec<(u32, KekStatus, K)>,
    cluster: &Id,
    rule: &ClusterRule,
    sealed: bool,
) -> Result<Vec<(u32, Kek)>, Error> {
    let allowed = |v: u32| rule.releases_version(v) && v <= rule.kek_version;
    let out: Vec<(u32, Kek)> = offered
        .iter()
        .filter(|(v, s, _)| *s != KekStatus::Retired && allowed(*v))
        .take(MAX_VERSIONS_RELEASED)
        .map(|(v, _, k)| (*v, k.borrow().clone()))
        .collect();
    match (out.is_empty(), sealed) {
        (false, _) => Ok(out),
        (true, false) => Err(Error::NoKek(cluster.clone())),
        (true, true) if offered.is_empty() => Err(Error::KekNotStored(cluster.clone())),
        (true, true) => Err(Error::KekVersionNotStored {
            cluster: cluster.clone(),
            version: rule.kek_version,
            retire_below: rule.kek_retire_below,
        }),
    }
}

impl Kre {
    /// Makes every named cluster have KEK versions up to its `kek_version` (the newest
    /// current, the older ones active): in memory (no custodians), or in the durable state's
    /// working copy (stored and committed before use; `KekRotated` is recorded at the commit).
    ///
    /// Nothing is changed unless its record fits: the `KekRotated` entries of the change and
    /// the caller's `then` entries are checked against the audit buffer (reserve included)
    /// while the vault or KEK lock is held, and the rotations are appended under the same
    /// audit lock. The audit lock is returned, so that the caller appends `then` knowing it
    /// fits. A buffer without room refuses with [`KekError::Audit`] holding
    /// [`AuditError::BufferFull`], and nothing has changed. Locks: vault → audit log, or
    /// KEKs → audit log; the NSM is drawn from under the vault lock (the step is atomic) or
    /// the KEK and audit locks (ephemeral KEKs, at start-up and on a push only).
    pub(super) fn ensure_keks(
        &self,
        schedule: &[(String, u32, u32)],
        then: &[AuditEvent],
    ) -> Result<MutexGuard<'_, AuditLog>, KekError> {
        let wanted = schedule
            .iter()
            .map(|(n, v, r)| Ok((Id::new(n).map_err(|_| KekError::ClusterName(n.clone()))?, *v, *r)))
            .collect::<Result<Vec<_>, KekError>>()?;
        let now_ms = wall_clock_ms();
        if let Some(state) = &self.state {
            let mut v = state.vault();
            if v.phase() != Phase::Serving {
                // Genesis or the unsealed state provides them (and `after_unseal` / the
                // genesis step rotate them to the policy's versions).
                drop(v);
                let log = self.audit.log();
                log.room_for(then)?;
                return Ok(log);
            }
            let ids: Vec<Id> = wanted.iter().map(|(c, _, _)| c.clone()).collect();
            // On a copy: it replaces the state only once its record is known to fit.
            let mut work = v.clone();
            let added = state.step(&mut work, |v, rng| -> Result<Vec<Id>, VaultError> {
                let added = v.ensure_clusters(&ids, rng)?;
                // The retirement goes into the sealed state too, where it only ever rises:
                // a version retired there is never released again, whatever bundle
                // (older, replayed, or un-retiring) is in force later.
                for (c, version, retire_below) in &wanted {
                    v.rotate_to(c, *version, *retire_below, rng)?;
                }
                Ok(added)
            })??;
            let rotations: Vec<AuditEvent> =
                added.into_iter().map(|c| AuditEvent::KekRotated { cluster: c, new_version: 1 }).collect();
            let mut log = self.audit.log();
            log.room_for(&[rotations.as_slice(), then].concat())?;
            *v = work;
            drop(v);
            append_admin(&mut log, rotations, now_ms);
            return Ok(log);
        }
        let mut keks = write(&self.keks.ephemeral);
        // Version 1 of a new cluster is its first KEK, not a rotation.
        let rotations: Vec<AuditEvent> = wanted
            .iter()
            .flat_map(|(id, version, _)| {
                let first = keks.newest_version(id).map_or(1, |n| n.saturating_add(1));
                (first.max(2)..=(*version).min(keys::MAX_KEK_VERSIONS))
                    .map(|new_version| AuditEvent::KekRotated { cluster: id.clone(), new_version })
            })
            .collect();
        let mut log = self.audit.log();
        log.room_for(&[rotations.as_slice(), then].concat())?;
        let mut created = Vec::new();
        let mut failed = None;
        for (id, version, _) in &wanted {
            match keks.ensure_versions(id, *version, |b| self.nsm.random(b)) {
                Ok(new) => created.extend(new.into_iter().filter(|v| *v > 1).map(|v| (id.clone(), v))),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(keks);
        // Ephemeral KEKs are usable at once: every rotation is recorded as it happens (even
        // when a later cluster's draw failed).
        let rotations =
            created.into_iter().map(|(cluster, new_version)| AuditEvent::KekRotated { cluster, new_version }).collect();
        append_admin(&mut log, rotations, now_ms);
        match failed {
            Some(e) => Err(KekError::Nsm(e)),
            None => Ok(log),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(b: u8) -> Kek {
        let mut s = KekStore::default();
        let id = Id::new("k").expect("id");
        let mut n = 0u8;
        s.ensure_versions(&id, 1, |buf| {
            buf.fill(b.wrapping_add(n));
            n = n.wrapping_add(1);
            Ok::<(), keygate_attestation::NsmError>(())
        })
        .expect("kek");
        s.current(&id).expect("current").1.clone()
    }

    fn rule(kek_version: u32, kek_retire_below: u32) -> ClusterRule {
        ClusterRule { images: Vec::new(), kek_version, kek_retire_below }
    }

    fn versions(r: Result<Vec<(u32, Kek)>, Error>) -> Vec<u32> {
        r.expect("releasable").into_iter().map(|(v, _)| v).collect()
    }

    #[test]
    fn select_releases_what_the_rule_allows_current_first_at_most_four() {
        let c = Id::new("c").expect("id");
        let offered = || {
            let mut o = vec![(6, KekStatus::Current, kek(6))];
            o.extend((1..=5).rev().map(|v| (v, KekStatus::Active, kek(1))));
            o.push((0, KekStatus::Retired, kek(0)));
            o
        };
        assert_eq!(versions(select(offered(), &c, &rule(6, 0), false)), [6, 5, 4, 3]);
        assert_eq!(versions(select(offered(), &c, &rule(6, 5), true)), [6, 5]);
        // Nothing above the policy's version.
        assert_eq!(versions(select(offered(), &c, &rule(4, 4), false)), [4]);
    }

    #[test]
    fn select_with_nothing_releasable_names_the_store() {
        let c = Id::new("c").expect("id");
        let offered = || vec![(1, KekStatus::Current, kek(1))];
        assert!(matches!(select(offered(), &c, &rule(2, 2), false), Err(Error::NoKek(_))));
        assert!(matches!(
            select(offered(), &c, &rule(2, 2), true),
            Err(Error::KekVersionNotStored { version: 2, retire_below: 2, .. })
        ));
        assert!(matches!(
            select(Vec::<(u32, KekStatus, Kek)>::new(), &c, &rule(1, 0), true),
            Err(Error::KekNotStored(_))
        ));
    }
}
