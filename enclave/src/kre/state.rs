//! The sealed-state service: the one owner of the vault (the KRE's durable state with
//! custodians) and its steps as the parent and the custodians drive them: report (and
//! export), genesis, load, commit, unseal offer and share, reshare. Decides that a step is
//! recorded or not done: each runs on a copy of the vault that replaces it only if the
//! step's audit entries fit and every NSM draw succeeded. Trusts the vault's own checks
//! (`crate::state::vault`) and the NSM. Spec: docs/durability.md.

use std::sync::{Arc, Mutex, MutexGuard};

use keygate_attestation::crypto::Crypto;
use keygate_attestation::{AttestRequest, Nsm};
use sha2::{Digest, Sha384};

use crate::audit::{AuditError, AuditEvent};
use crate::binding;
use crate::crypto::keys::KekStatus;
use crate::state::custody::{CustodianSet, PublicKey, UnsealShare};
use crate::state::vault::{self, Custody, Phase, PolicyHead, UnsealOutcome, Vault, VaultError};
use crate::wire::{Id, Message, StateReport};

use super::audit::{append_admin, state_event, AuditTrail};
use super::error::{Denial, Error, RandomFailed};
use super::lock;

/// A custodian's share accepted.
#[derive(Debug, Clone, Copy)]
pub(super) struct Progress {
    /// Shares accepted so far.
    pub(super) have: u8,
    /// The threshold.
    pub(super) need: u8,
    /// Whether the unseal or the reshare is complete.
    pub(super) done: bool,
    /// Whether this share completed an unseal (the KRE now serves).
    pub(super) unsealed: bool,
    /// The generation concerned.
    pub(super) generation: u64,
}

/// The vault and what its steps draw from.
#[derive(Debug)]
pub(super) struct StateService {
    vault: Mutex<Vault>,
    nsm: Arc<dyn Nsm>,
    crypto: &'static dyn Crypto,
}

impl StateService {
    pub(super) fn new(set: CustodianSet, nsm: Arc<dyn Nsm>, crypto: &'static dyn Crypto) -> Self {
        Self { vault: Mutex::new(Vault::new(set)), nsm, crypto }
    }

    /// The vault, locked.
    pub(super) fn vault(&self) -> MutexGuard<'_, Vault> {
        lock(&self.vault)
    }

    /// The durable state's phase.
    pub(super) fn phase(&self) -> Phase {
        self.vault().phase()
    }

    /// Runs a step of the durable state with the NSM's random source, on a copy of the vault
    /// that replaces it only if every draw succeeded. A failed draw leaves its buffer
    /// unfilled, and the step goes on with it: had it run on the vault itself, a predictable
    /// state key, KEK or nonce could have stayed behind (an export is kept until committed).
    pub(super) fn step<T>(
        &self,
        vault: &mut Vault,
        f: impl FnOnce(&mut Vault, &mut dyn FnMut(&mut [u8])) -> T,
    ) -> Result<T, RandomFailed> {
        let mut work = vault.clone();
        let mut failed = false;
        let out = f(&mut work, &mut |b: &mut [u8]| {
            if self.nsm.random(b).is_err() {
                failed = true;
            }
        });
        if failed {
            return Err(RandomFailed);
        }
        *vault = work;
        Ok(out)
    }

    /// [`Self::step`] for a vault step that may refuse: a failed draw is [`Error::Random`], a
    /// refusal [`Error::Vault`].
    fn vault_step<T>(
        &self,
        vault: &mut Vault,
        f: impl FnOnce(&mut Vault, &mut dyn FnMut(&mut [u8])) -> Result<T, VaultError>,
    ) -> Result<T, Error> {
        self.step(vault, f).map_err(Error::Random)?.map_err(Error::Vault)
    }

    /// Produces the KRE's attestation with `user_data` (genesis and reshare shares files).
    fn attest(&self, user_data: &[u8; 48]) -> Result<Vec<u8>, keygate_attestation::NsmError> {
        self.nsm.attest(&AttestRequest { nonce: None, user_data: Some(user_data.to_vec()), public_key: None })
    }

    /// Runs a durable-state step (genesis, load, commit, reshare, unseal) that must be
    /// recorded. The step runs on a copy of the vault and `f` returns its result with the
    /// entries recording it; the copy replaces the vault only if those entries fit the audit
    /// buffer (reserve included), and they are appended at once. A buffer without room
    /// refuses with `audit_full` and the state is unchanged.
    ///
    /// Room is checked first (one entry of the largest size,
    /// [`crate::audit::AuditLog::has_room_for_admin`]) so that a full buffer refuses before
    /// any work, and again exactly once the entries are known: the vault lock is held from
    /// the step to the append, and the audit lock from the exact check to the append (lock
    /// order: vault → audit log), so a concurrent refusal cannot take the room in between.
    fn recorded<T>(
        &self,
        audit: &AuditTrail,
        step: &'static str,
        now_ms: u64,
        f: impl FnOnce(&mut Vault) -> Result<(T, Vec<AuditEvent>), Error>,
    ) -> Result<T, Denial> {
        let full = |e: AuditError| Denial::state(step, Error::StepNotRecorded(e));
        let mut v = self.vault();
        if !audit.log().has_room_for_admin() {
            let s = audit.log().status();
            return Err(full(AuditError::BufferFull { buffered: s.buffered, bytes: s.buffered_bytes }));
        }
        let mut work = v.clone();
        let (out, events) = f(&mut work).map_err(|e| Denial::state(step, e))?;
        let mut log = audit.log();
        log.room_for(&events).map_err(full)?;
        *v = work;
        append_admin(&mut log, events, now_ms);
        Ok(out)
    }

    /// [`Self::recorded`] for a step recorded by one successful state event `event`, whose
    /// detail `f` returns.
    fn recorded_event(
        &self,
        audit: &AuditTrail,
        step: &'static str,
        event: &'static str,
        now_ms: u64,
        f: impl FnOnce(&mut Vault) -> Result<String, Error>,
    ) -> Result<(), Denial> {
        self.recorded(audit, step, now_ms, |v| Ok(((), vec![state_event(event, true, f(v)?)])))
    }

    /// Where the sealed state is, for the status report (read only: nothing is exported).
    pub(super) fn summary(&self) -> serde_json::Value {
        let v = self.vault();
        serde_json::json!({
            "phase": v.phase().as_str(),
            "committed_generation": v.committed_generation(),
            "pending_generation": v.pending_generation(),
            "unsealing_generation": v.unsealing_generation(),
            "shares_accepted": v.shares_accepted(),
            "threshold": v.set().threshold(),
            "custodians": v.set().keys().len(),
            "set_digest": hex::encode(v.set().digest()),
        })
    }

    /// The durable-state report; when there is a generation to store, it is exported here.
    pub(super) fn report(&self, audit: &AuditTrail) -> Result<StateReport, Denial> {
        let mut v = self.vault();
        let refuse = |e: Error| Denial::state("export", Error::Export(Box::new(e)));
        // A generation exported now records how far the parent has stored this run's trail.
        v.note_audit_head(audit.log().acked_head());
        let export =
            self.vault_step(&mut v, |v, rng| v.export(self.crypto, rng).map(|e| e.cloned())).map_err(refuse)?;
        let custody = export.as_ref().and_then(|_| v.custody().cloned());
        Ok(StateReport {
            phase: v.phase().code(),
            committed_generation: v.committed_generation(),
            unsealing_generation: v.unsealing_generation().unwrap_or(0),
            shares_accepted: v.shares_accepted(),
            threshold: v.set().threshold(),
            set_digest: v.set().digest(),
            export_generation: export.as_ref().map_or(0, |e| e.generation),
            blob: export.map(|e| e.blob).unwrap_or_default(),
            shares: custody.as_ref().map(|c| c.shares.clone()).unwrap_or_default(),
            genesis_attestation: custody.map(|c| c.genesis_attestation).unwrap_or_default(),
        })
    }

    /// Genesis: a fresh KRE with no stored state creates it (exported, not yet in use) with a
    /// KEK for each of `clusters` and the policy `head`. Refused if a custodian key is one of
    /// `approvers` (the policy signing keys in force).
    pub(super) fn genesis(
        &self,
        audit: &AuditTrail,
        clusters: &[Id],
        head: Option<(u64, [u8; 48])>,
        approvers: &[PublicKey],
        now_ms: u64,
    ) -> Result<(), Denial> {
        self.recorded_event(audit, "genesis", "state-genesis", now_ms, |v| {
            v.note_audit_head(audit.log().acked_head());
            let mut attest = |ud: &[u8; 48]| self.attest(ud);
            let generation = self.vault_step(v, |v, rng| {
                v.genesis(self.crypto, clusters, head, approvers, rng, &mut attest).map(|e| e.generation)
            })?;
            Ok(format!("generation {generation} prepared with {} cluster(s); not used until stored", clusters.len()))
        })
    }

    /// The parent's stored state: starts an unseal session that ends as `mode` says.
    pub(super) fn load(
        &self,
        audit: &AuditTrail,
        blob: Vec<u8>,
        custody: Custody,
        mode: vault::UnsealMode,
        now_ms: u64,
    ) -> Result<(), Denial> {
        let blob_sha: [u8; 48] = Sha384::digest(&blob).into();
        self.recorded_event(audit, "load", "state-loaded", now_ms, |v| {
            let generation = self.vault_step(v, |v, rng| v.load_with(self.crypto, blob, custody, mode, rng))?;
            let blob_sha = hex::encode(blob_sha);
            let then = match mode {
                vault::UnsealMode::Plain => "",
                vault::UnsealMode::AwaitMember => ", then a serving member's confirmation",
                vault::UnsealMode::ColdStart => " for a cold start (no member's confirmation)",
            };
            Ok(format!("generation {generation} (blob sha384 {blob_sha}) loaded; awaiting custodian shares{then}"))
        })
    }

    /// The parent stored the exported generation durably: it becomes the state in use. The
    /// commit and every KEK version that becomes usable with it are recorded together, or the
    /// commit is refused.
    pub(super) fn commit(
        &self,
        audit: &AuditTrail,
        generation: u64,
        blob_sha384: &[u8; 48],
        now_ms: u64,
    ) -> Result<u64, Denial> {
        self.recorded(audit, "commit", now_ms, |v| {
            let before = v.committed_versions();
            let committed = v.commit(generation, blob_sha384).map_err(Error::Vault)?;
            let detail = format!(
                "generation {committed} (blob sha384 {}) stored by the parent and in use",
                hex::encode(blob_sha384)
            );
            let mut events = vec![state_event("state-committed", true, detail)];
            events.extend(new_versions(&before, v));
            Ok((committed, events))
        })
    }

    /// An unseal offer for one custodian: the KRE's attestation with `public_key` = K,
    /// `nonce` = the custodian's nonce and `user_data` binding the session. The NSM is asked
    /// with no lock held.
    pub(super) fn offer(&self, client_nonce: [u8; 32]) -> Result<(Message, [u8; 48]), Denial> {
        let refuse = |e| Denial::state("unseal-offer", e);
        let offer = self.vault().offer().map_err(|e| refuse(Error::Vault(e)))?;
        let shares_sha: [u8; 48] = Sha384::digest(&offer.custody.shares).into();
        let new_set_digest = offer.reshare_to.as_ref().map(CustodianSet::digest);
        let user_data = binding::offer_user_data(
            &offer.unseal_nonce,
            offer.generation,
            &offer.blob_sha384,
            &offer.set_digest,
            &shares_sha,
            new_set_digest.as_ref(),
            offer.cold_start,
        );
        let attestation = self
            .nsm
            .attest(&AttestRequest {
                nonce: Some(client_nonce.to_vec()),
                user_data: Some(user_data.to_vec()),
                public_key: Some(offer.kre_public.to_vec()),
            })
            .map_err(|e| refuse(Error::KreAttestation(e)))?;
        let sha = Sha384::digest(&attestation).into();
        let msg = Message::UnsealOffer {
            attestation,
            unseal_nonce: offer.unseal_nonce,
            generation: offer.generation,
            shares: offer.custody.shares,
            genesis_attestation: offer.custody.genesis_attestation,
            reshare_to: offer.reshare_to.as_ref().map(vault::encode_set).unwrap_or_default(),
            blob_sha384: offer.blob_sha384,
            cold_start: offer.cold_start,
        };
        Ok((msg, sha))
    }

    /// Starts a reshare of the state key to a new custodian set (serving KRE); refused if a new
    /// custodian key is one of `approvers` (the policy signing keys in force).
    pub(super) fn reshare_start(
        &self,
        audit: &AuditTrail,
        set: &[u8],
        approvers: &[PublicKey],
        now_ms: u64,
    ) -> Result<(), Denial> {
        let new_set = vault::decode_set(self.crypto, set).map_err(|e| Denial::state("reshare", Error::NewSet(e)))?;
        let digest = new_set.digest();
        let (m, n) = (new_set.threshold(), new_set.count());
        self.recorded_event(audit, "reshare", "reshare-started", now_ms, |v| {
            self.vault_step(v, |v, rng| v.start_reshare(self.crypto, new_set, approvers, rng))?;
            let digest = hex::encode(digest);
            Ok(format!("to {m} of {n} custodians (set {digest}); awaiting the current custodians' approval"))
        })
    }

    /// A custodian's share for the offer sent on its connection: toward the unseal, or (when
    /// serving) approving the reshare in progress.
    pub(super) fn share(
        &self,
        audit: &AuditTrail,
        attestation_sha384: [u8; 48],
        share: &[u8],
        now_ms: u64,
    ) -> Result<Progress, Denial> {
        let msg = UnsealShare::decode(share).map_err(|e| Denial::state("unseal-share", Error::Share(e)))?;
        if self.phase() == Phase::Serving {
            return self.reshare_share(audit, attestation_sha384, &msg, now_ms);
        }
        self.recorded(audit, "unseal-share", now_ms, |v| {
            let need = v.set().threshold();
            let outcome = v.add_share(self.crypto, attestation_sha384, &msg).map_err(Error::Vault)?;
            Ok(match outcome {
                UnsealOutcome::NeedMore { have, .. } => {
                    let detail = format!("share {} accepted ({have} of {need})", msg.x);
                    let generation = v.unsealing_generation().unwrap_or(0);
                    let progress = Progress { have, need, done: false, unsealed: false, generation };
                    (progress, vec![state_event("custodian-share-accepted", true, detail)])
                }
                UnsealOutcome::Serving { generation } => {
                    let detail = format!(
                        "share {} accepted; {need} of {need}: generation {generation} unsealed and in use",
                        msg.x
                    );
                    // This run continues the history of the run that sealed the state.
                    let link = AuditEvent::ChainLinked { generation, previous: v.committed_audit_head() };
                    let progress = Progress { have: need, need, done: true, unsealed: true, generation };
                    (progress, vec![state_event("unsealed", true, detail), link])
                }
            })
        })
    }

    /// An old custodian's share approving the reshare in progress.
    fn reshare_share(
        &self,
        audit: &AuditTrail,
        attestation_sha384: [u8; 48],
        msg: &UnsealShare,
        now_ms: u64,
    ) -> Result<Progress, Denial> {
        let mut attest = |ud: &[u8; 48]| self.attest(ud);
        self.recorded(audit, "reshare-share", now_ms, |v| {
            let (have, need, done) =
                self.vault_step(v, |v, rng| v.add_reshare_share(self.crypto, attestation_sha384, msg, rng, &mut attest))?;
            let event = if done {
                state_event(
                    "reshared",
                    true,
                    format!(
                        "share {} accepted; {need} of {need} current custodians approved: new state key split for the new set; stored with the next generation",
                        msg.x
                    ),
                )
            } else {
                state_event("reshare-share-accepted", true, format!("share {} accepted ({have} of {need})", msg.x))
            };
            Ok((Progress { have, need, done, unsealed: false, generation: v.committed_generation() }, vec![event]))
        })
    }

    /// A join (`docs/cluster.md`): the state key a serving member forwarded, checked by the
    /// joiner's session, with the stored blob and custody the parent hands over. Serves exactly
    /// the vouched generation ([`Vault::join`]), recorded or not done.
    pub(super) fn join(
        &self,
        audit: &AuditTrail,
        forwarded: vault::Forwardable,
        blob: Vec<u8>,
        custody: Custody,
        now_ms: u64,
    ) -> Result<u64, Denial> {
        let blob_sha: [u8; 48] = Sha384::digest(&blob).into();
        self.recorded(audit, "join", now_ms, |v| {
            let generation = v.join(self.crypto, forwarded, blob, custody).map_err(Error::Vault)?;
            let detail = format!(
                "generation {generation} (blob sha384 {}) forwarded by a serving member and in use",
                hex::encode(blob_sha)
            );
            Ok((generation, vec![state_event("joined", true, detail)]))
        })
    }

    /// An adoption (`docs/cluster.md`): a newer generation another member committed to the
    /// shared store becomes the state in use ([`Vault::adopt`]); an outstanding export of this
    /// member is dropped. Recorded with every KEK version that becomes usable with it, or not
    /// done.
    pub(super) fn adopt(&self, audit: &AuditTrail, blob: &[u8], now_ms: u64) -> Result<u64, Denial> {
        let blob_sha: [u8; 48] = Sha384::digest(blob).into();
        self.recorded(audit, "adopt", now_ms, |v| {
            let before = v.committed_versions();
            let dropped = v.pending_generation();
            let generation = v.adopt(self.crypto, blob).map_err(Error::Vault)?;
            let dropped = dropped.map(|g| format!("; this member's export of generation {g} lost and dropped"));
            let detail = format!(
                "generation {generation} (blob sha384 {}) committed by another member, adopted and in use{}",
                hex::encode(blob_sha),
                dropped.unwrap_or_default()
            );
            let mut events = vec![state_event("state-adopted", true, detail)];
            events.extend(new_versions(&before, v));
            Ok((generation, events))
        })
    }

    /// A confirmation (`docs/cluster.md`): a member unsealed by custodians takes a serving
    /// member's word that no newer generation exists, or adopts the newer one it vouched for
    /// ([`Vault::confirm`]); then it serves. Recorded with every KEK version that becomes
    /// usable with it, or not done.
    pub(super) fn confirm(
        &self,
        audit: &AuditTrail,
        forwarded: vault::Forwardable,
        blob: &[u8],
        now_ms: u64,
    ) -> Result<u64, Denial> {
        self.recorded(audit, "confirm", now_ms, |v| {
            let before = v.committed_versions();
            let unsealed = v.committed_generation();
            let generation = v.confirm(self.crypto, forwarded, blob).map_err(Error::Vault)?;
            let detail = if generation == unsealed {
                format!("generation {generation} confirmed by a serving member as the newest; in use")
            } else {
                format!("generation {unsealed} was not the newest: generation {generation} vouched for by a serving member adopted and in use")
            };
            let mut events = vec![state_event("state-confirmed", true, detail)];
            events.extend(new_versions(&before, v));
            Ok((generation, events))
        })
    }

    /// Records that this serving member forwarded its state key (`detail` names the joiner
    /// and the generation); refused, and nothing is sent, if the entry cannot be recorded.
    pub(super) fn record_forward(&self, audit: &AuditTrail, detail: String, now_ms: u64) -> Result<(), Denial> {
        let events = vec![state_event("state-key-forwarded", true, detail)];
        let mut log = audit.log();
        log.room_for(&events).map_err(|e| Denial::state("join-answer", Error::StepNotRecorded(e)))?;
        append_admin(&mut log, events, now_ms);
        Ok(())
    }

    /// The committed sealed state's generation and the policy head it carries (`None`
    /// before serving).
    pub(super) fn committed_policy(&self) -> Option<(u64, Option<PolicyHead>)> {
        self.vault().committed_policy()
    }

    /// The policy version the committed sealed state carries.
    pub(super) fn committed_policy_version(&self) -> Option<u64> {
        self.committed_policy().and_then(|(_, head)| head).map(|(version, _)| version)
    }
}

/// The report of a KRE without custodians: nothing sealed, nothing to store.
pub(super) fn empty_report() -> StateReport {
    StateReport {
        phase: 0,
        committed_generation: 0,
        unsealing_generation: 0,
        shares_accepted: 0,
        threshold: 0,
        set_digest: [0; 48],
        export_generation: 0,
        blob: Vec::new(),
        shares: Vec::new(),
        genesis_attestation: Vec::new(),
    }
}

/// The KEK versions `v` has committed that `before` (its committed versions earlier) lacked:
/// one KEK-rotation audit entry each.
fn new_versions(before: &[(Id, Vec<(u32, KekStatus)>)], v: &Vault) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    for (cluster, versions) in &v.committed_versions() {
        let old = before.iter().find(|(c, _)| c == cluster).map(|(_, v)| v.as_slice()).unwrap_or(&[]);
        for (version, _) in versions {
            if !old.iter().any(|(v, _)| v == version) {
                events.push(AuditEvent::KekRotated { cluster: cluster.clone(), new_version: *version });
            }
        }
    }
    events
}
