//! The KRE's protocol core: a state machine per connection, without I/O.
//!
//! Frames go in, frames come out; the clock and the random source are injected. Every
//! security decision of a release is here (or in `keygate-attestation`), in this order:
//! frame → state → request ids → attestation (chain, signature, time, debug) → nonce
//! (this connection's challenge, unexpired, unused) → `user_data` = request digest →
//! `public_key` a valid P-384 point → policy (cluster, PCRs, kind, expiry) → derive and
//! wrap. Every refusal is a `Denied` frame naming the failed check.

// `Deny` carries what the audit entry of a refusal needs (requester PCRs, key ids); it is
// built once per refused connection, so its size on the error path does not matter.
#![allow(clippy::result_large_err)]

pub mod challenges;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keygate_attestation::bundle::PolicyState;
use keygate_attestation::crypto::Crypto;
use keygate_attestation::policy::{self, ClusterRule, PolicyDenial, ReleasePolicy};
use keygate_attestation::{AttestRequest, Nsm, UnknownFields, Verifier, VerifyError, VerifyOptions, VerifyTime};
use sha2::{Digest, Sha384};

use crate::audit::{AnonymousTally, AuditConfig, AuditError, AuditEvent, AuditLog, AuditSigner, Requester, MAX_TEXT};
use crate::custody::{CustodianSet, UnsealShare};
use crate::keys::{self, Kek, KekStatus, KekStore, Transcript, WrappingKey};
use challenges::{NonceTable, Redeem};
use crate::vault::{self, Custody, Phase, UnsealOutcome, Vault, VaultError};
use crate::wire::{self, ty, Channel, DenyCode, Id, Message, StateReport, WireError};

/// Most KEK versions released per key id: the current one and up to three older active ones
/// (so 16 key ids fit one Released frame).
pub const MAX_VERSIONS_RELEASED: usize = 4;

/// `user_data` of the KRE's own attestation in a Challenge:
/// `SHA-384("keygate/v1/kre-challenge" ‖ server_nonce)`, binding the challenge to the
/// genuine KRE.
pub fn kre_user_data(server_nonce: &[u8; 32]) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(b"keygate/v1/kre-challenge");
    h.update(server_nonce);
    h.finalize().into()
}

/// Tunables of the KRE (limits and lifetimes).
#[derive(Debug, Clone)]
pub struct KreConfig {
    /// How long a challenge stays valid.
    pub challenge_ttl: Duration,
    /// Most live challenges.
    pub max_challenges: usize,
    /// Maximum age of a client's attestation document.
    pub max_doc_age: Duration,
    /// Allowed clock skew for client documents.
    pub clock_skew: Duration,
    /// The audit buffer's limits.
    pub audit: AuditConfig,
    /// The custodians of the sealed state (part of the enclave image's configuration). With
    /// custodians the KRE starts sealed and its KEKs survive restarts; without, it generates
    /// ephemeral KEKs at start (tests and demos of the release flow only).
    pub custodians: Option<CustodianSet>,
}

impl Default for KreConfig {
    fn default() -> Self {
        Self {
            challenge_ttl: Duration::from_secs(30),
            max_challenges: 16_384,
            max_doc_age: Duration::from_secs(60),
            clock_skew: Duration::from_secs(30),
            audit: AuditConfig::default(),
            custodians: None,
        }
    }
}

/// What the core decided, for logs and the audit trail. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A challenge was issued.
    ChallengeIssued,
    /// Keys were released.
    Released {
        /// Cluster.
        cluster: Id,
        /// (key id, KEK version) released.
        keys: Vec<(Id, u32)>,
        /// The policy image rule that matched.
        image: String,
        /// The client's module id.
        module_id: String,
        /// SHA-384 of the client's attestation document.
        document_sha384: [u8; 48],
    },
    /// A signed policy bundle was accepted.
    PolicyAccepted {
        /// Its version.
        version: u64,
        /// SHA-384 of its body.
        digest: [u8; 48],
        /// When it is fully in force (ms).
        activates_at_ms: u64,
    },
    /// Audit entries were handed out.
    AuditPulled {
        /// Entries in the batch.
        entries: usize,
    },
    /// Audit entries were acknowledged.
    AuditAcked {
        /// Up to this sequence number.
        up_to_seq: u64,
    },
    /// A status report was sent.
    StatusReported,
    /// A durability receipt was sent: the committed sealed state carries the policy.
    PolicyDurable {
        /// The policy version asked about.
        version: u64,
        /// The committed generation that carries it.
        generation: u64,
    },
    /// A durable-state step (genesis, load, export, commit).
    State {
        /// Which step.
        step: &'static str,
        /// The generation concerned.
        generation: u64,
    },
    /// A custodian's unseal share was accepted.
    UnsealShareAccepted {
        /// Shares accepted so far.
        have: u8,
        /// M.
        need: u8,
        /// Whether the KRE now serves.
        serving: bool,
    },
    /// An unseal offer (attestation with K) was sent to a custodian.
    UnsealOffered,
    /// A request was refused.
    Denied {
        /// The check that failed.
        code: DenyCode,
        /// Detail.
        reason: String,
        /// The cluster asked for, when known.
        cluster: Option<Id>,
        /// The client's module id, when its document verified.
        module_id: Option<String>,
    },
}

/// One step's output: the frame to send, and whether to close afterwards.
#[derive(Debug)]
pub struct Step {
    /// A complete frame (length prefix included).
    pub reply: Vec<u8>,
    /// Close the connection after sending.
    pub close: bool,
    /// What happened.
    pub event: Event,
}

/// The KRE: verifier, policy, KEKs, challenge table and NSM. Shared by all connections.
#[derive(Debug)]
pub struct Kre {
    config: KreConfig,
    verifier: Verifier,
    policy: RwLock<PolicySource>,
    keks: RwLock<KekStore>,
    nonces: Mutex<NonceTable>,
    nsm: Arc<dyn Nsm>,
    crypto: &'static dyn Crypto,
    audit: Mutex<AuditLog>,
    /// Refusals before any authenticated step, counted per code and written as one audit
    /// entry per period (never from the release capacity). Lock order: this, then `audit`.
    anonymous: Mutex<AnonymousTally>,
    /// The durable state (with custodians configured).
    vault: Option<Mutex<Vault>>,
    /// (version, digest) of every bundle accepted in this run, to check the sealed policy head.
    policy_history: Mutex<Vec<(u64, [u8; 48])>>,
    /// Answers withheld because the parent did not acknowledge storing their entries in time.
    withheld: std::sync::atomic::AtomicU64,
}

/// Where the allowed images come from.
#[derive(Debug)]
enum PolicySource {
    /// A startup policy file (no pushes).
    Static(Arc<ReleasePolicy>),
    /// Pipeline-signed bundles, from the genesis bundle built into the image; with custodians,
    /// also the state as of the policy head the committed sealed state carries, kept while a
    /// newer bundle is in force but not yet durable (the stricter of the two then holds).
    Signed(PolicyState, Option<Box<PolicyState>>),
}

/// A KRE could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The policy is unusable.
    #[error("policy: {0}")]
    Policy(#[from] policy::PolicyError),
    /// A cluster name in the policy is not a valid id.
    #[error("policy: cluster name `{0}` is not a valid id")]
    ClusterName(String),
    /// The NSM could not provide randomness.
    #[error("NSM: {0}")]
    Nsm(#[from] keygate_attestation::NsmError),
    /// The genesis bundle is unusable.
    #[error("genesis bundle: {0}")]
    Genesis(#[from] keygate_attestation::bundle::BundleError),
    /// The audit signer could not be set up.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The durable state refused a change.
    #[error("sealed state: {0}")]
    State(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Kre {
    /// A KRE with a static `policy` (startup policy file); KEKs for every cluster of the
    /// policy are generated now from the NSM's random source.
    pub fn new(
        config: KreConfig,
        verifier: Verifier,
        policy: ReleasePolicy,
        nsm: Arc<dyn Nsm>,
    ) -> Result<Self, StartError> {
        policy.validate()?;
        Self::build(config, verifier, PolicySource::Static(Arc::new(policy)), nsm)
    }

    /// A KRE governed by pipeline-signed bundles, starting from `genesis` (built into the
    /// image, so covered by its PCRs).
    pub fn with_genesis(
        config: KreConfig,
        verifier: Verifier,
        genesis: &[u8],
        nsm: Arc<dyn Nsm>,
    ) -> Result<Self, StartError> {
        let state = PolicyState::genesis(genesis, verifier.crypto())?;
        Self::build(config, verifier, PolicySource::Signed(state, None), nsm)
    }

    fn build(
        config: KreConfig,
        verifier: Verifier,
        source: PolicySource,
        nsm: Arc<dyn Nsm>,
    ) -> Result<Self, StartError> {
        let crypto = verifier.crypto();
        let nonces = Mutex::new(NonceTable::new(config.max_challenges, millis(config.challenge_ttl)));
        let signer = AuditSigner::start(&*nsm, crypto)?;
        let audit = Mutex::new(AuditLog::new(config.audit, signer));
        let vault = config.custodians.clone().map(|set| Mutex::new(Vault::new(set)));
        let kre = Self {
            config,
            verifier,
            policy: RwLock::new(source),
            keks: RwLock::new(KekStore::default()),
            nonces,
            nsm,
            crypto,
            audit,
            anonymous: Mutex::new(AnonymousTally::new(crate::audit::ANONYMOUS_PERIOD_MS)),
            vault,
            policy_history: Mutex::new(Vec::new()),
            withheld: std::sync::atomic::AtomicU64::new(0),
        };
        if let Some(head) = kre.policy_head() {
            lock(&kre.policy_history).push(head);
        }
        let pcrs =
            (0u16..16).filter_map(|i| Some((u8::try_from(i).ok()?, kre.nsm.describe_pcr(i).ok()?.data))).collect();
        {
            let mut log = kre.audit();
            log.set_policy_version(kre.policy_head().map_or(0, |(v, _)| v));
            log.append(
                AuditEvent::KreStarted {
                    nsm_kind: kre.nsm.kind().to_owned(),
                    pcrs,
                    software: format!("keygate-enclave {}", env!("CARGO_PKG_VERSION")),
                },
                wall_clock_ms(),
            )?;
        }
        // After KreStarted, so that the rotations of an ephemeral start follow it in the trail.
        drop(kre.ensure_keks(&kre.policy_schedule(), &[])?);
        Ok(kre)
    }

    /// The audit log.
    pub fn audit(&self) -> std::sync::MutexGuard<'_, AuditLog> {
        match self.audit.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records a refusal in the audit trail. A refusal before any authenticated step (a
    /// malformed or foreign frame, a refused Hello, a timeout) is only counted, and the counts
    /// are written as one entry per period from the reserve, so anonymous traffic can neither
    /// fill the buffer nor thin out what releases need. Any other refusal is an entry of its
    /// own; when even the reserve is exhausted the log counts it as unrecorded and writes an
    /// `Unrecorded` entry once there is room.
    fn record_denial(&self, d: &Deny, now_ms: u64) {
        // The reason is cut to what an entry holds, so that a long one is recorded, not refused.
        let (code, reason) = (d.code.as_str().to_owned(), cut_text(d.reason.clone()));
        // Nothing an unauthenticated peer causes takes an entry of its own: refusals before a
        // verified attestation (a Release whose document fails, or one refused before it was
        // checked) are counted with the other anonymous refusals.
        let anonymous = match d.stage {
            Stage::Challenge => true,
            Stage::Release => d.requester.is_none(),
            Stage::Policy { .. } | Stage::State { .. } => false,
        };
        if anonymous {
            lock(&self.anonymous).record(d.code.as_str(), now_ms);
            self.flush_anonymous(now_ms, false);
            return;
        }
        let event = match &d.stage {
            Stage::Challenge | Stage::Release => AuditEvent::ReleaseDenied {
                code,
                reason,
                requester: d.requester.clone(),
                cluster: d.cluster.clone(),
                key_ids: d.key_ids.clone(),
            },
            Stage::Policy { version, digest } => {
                AuditEvent::PolicyRefused { version: *version, digest: *digest, code, reason }
            }
            Stage::State { step } => state_event(step, false, reason),
        };
        if let Err(e) = self.audit().append(event, now_ms) {
            // Counted as unrecorded by the log and written as an `Unrecorded` entry later.
            tracing::debug!(error = %e, "refusal not recorded yet");
        }
    }

    /// Writes the anonymous refusals' aggregate entry when its period is over (or now, with
    /// `force`, e.g. before an audit pull). A refused append keeps the counts for later.
    fn flush_anonymous(&self, now_ms: u64, force: bool) {
        let mut tally = lock(&self.anonymous);
        if let Err(e) = self.audit().append_anonymous(&mut tally, now_ms, force) {
            tracing::debug!(error = %e, "anonymous refusals kept for the next entry");
        }
    }

    /// Counts an answer withheld because its audit entry was not acknowledged in time.
    pub fn count_withheld(&self) {
        self.withheld.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A JSON status report (never secret).
    pub fn status_json(&self) -> String {
        let a = self.audit().status();
        let head = self.policy_head();
        serde_json::json!({
            "nsm": self.nsm.kind(),
            "policy_version": head.map(|(v, _)| v),
            "policy_digest": head.map(|(_, d)| hex::encode(d)),
            "policy_durable_version": self.committed_policy_version(),
            "policy_in_force_not_durable": matches!(&*self.source(), PolicySource::Signed(_, Some(_))),
            "live_challenges": self.live_challenges(),
            "audit": {
                "last_seq": a.last_seq,
                "head": hex::encode(a.head),
                "chain_id": hex::encode(a.chain_id),
                "acked_up_to": a.acked_up_to,
                "buffered": a.buffered,
                "buffered_bytes": a.buffered_bytes,
                "capacity": a.capacity,
                "full": a.full,
                "releases_refused_because_full": a.refused_total,
                "answers_withheld_unacknowledged": self.withheld.load(std::sync::atomic::Ordering::Relaxed),
                "unrecorded_pending": a.unrecorded_pending,
                "checkpoints_signed": a.checkpoints_signed,
            },
        })
        .to_string()
    }

    /// The clusters of the newest policy.
    fn policy_clusters(&self) -> Vec<String> {
        self.policy_schedule().into_iter().map(|(c, _, _)| c).collect()
    }

    /// The clusters of the newest policy with their current KEK version and the version
    /// below which it retires KEKs.
    fn policy_schedule(&self) -> Vec<(String, u32, u32)> {
        match &*self.source() {
            PolicySource::Static(p) => schedule_of(p),
            PolicySource::Signed(s, _) => schedule_of(&s.latest().bundle.body.policy),
        }
    }

    /// Fills `buf` from the NSM's random source.
    fn nsm_random(&self, buf: &mut [u8], failed: &mut bool) {
        if self.nsm.random(buf).is_err() {
            *failed = true;
        }
    }

    /// Runs a step of the durable state with the NSM's random source, on a copy of the vault
    /// that replaces it only if every draw succeeded. A failed draw leaves its buffer
    /// unfilled, and the step goes on with it: had it run on the vault itself, a predictable
    /// state key, KEK or nonce could have stayed behind (an export is kept until committed).
    fn vault_step<T>(
        &self,
        vault: &mut Vault,
        f: impl FnOnce(&mut Vault, &mut dyn FnMut(&mut [u8])) -> T,
    ) -> Result<T, String> {
        let mut work = vault.clone();
        let mut failed = false;
        let out = f(&mut work, &mut |b: &mut [u8]| self.nsm_random(b, &mut failed));
        if failed {
            return Err("the NSM's random source failed; the durable state is unchanged".into());
        }
        *vault = work;
        Ok(out)
    }

    /// Makes every named cluster have KEK versions up to its `kek_version` (the newest
    /// current, the older ones active): in memory (no custodians), or in the durable state's
    /// working copy (stored and committed before use; `KekRotated` is recorded at the commit).
    ///
    /// Nothing is changed unless its record fits: the `KekRotated` entries of the change and
    /// the caller's `then` entries are checked against the audit buffer (reserve included)
    /// while the lock on the KEKs is held, and the rotations are appended under the same
    /// audit lock. The lock is returned, so that the caller appends `then` knowing it fits
    /// (lock order: policy → vault → KEKs → audit). A buffer without room refuses with
    /// [`StartError::Audit`] holding [`AuditError::BufferFull`], and nothing has changed.
    fn ensure_keks(
        &self,
        schedule: &[(String, u32, u32)],
        then: &[AuditEvent],
    ) -> Result<std::sync::MutexGuard<'_, AuditLog>, StartError> {
        let wanted = schedule
            .iter()
            .map(|(n, v, r)| Ok((Id::new(n).map_err(|_| StartError::ClusterName(n.clone()))?, *v, *r)))
            .collect::<Result<Vec<_>, StartError>>()?;
        let now_ms = wall_clock_ms();
        if let Some(v) = &self.vault {
            let mut v = lock(v);
            if v.phase() != Phase::Serving {
                // Genesis or the unsealed state provides them (and `after_unseal` / the
                // genesis step rotate them to the policy's versions).
                drop(v);
                let log = self.audit();
                log.room_for(then)?;
                return Ok(log);
            }
            let ids: Vec<Id> = wanted.iter().map(|(c, _, _)| c.clone()).collect();
            // On a copy: it replaces the state only once its record is known to fit.
            let mut work = v.clone();
            let added = self
                .vault_step(&mut work, |v, rng| -> Result<Vec<Id>, VaultError> {
                    let added = v.ensure_clusters(&ids, rng)?;
                    // The retirement goes into the sealed state too, where it only ever rises:
                    // a version retired there is never released again, whatever bundle
                    // (older, replayed, or un-retiring) is in force later.
                    for (c, version, retire_below) in &wanted {
                        v.rotate_to(c, *version, *retire_below, rng)?;
                    }
                    Ok(added)
                })
                .map_err(StartError::State)?
                .map_err(|e| StartError::State(e.to_string()))?;
            let rotations: Vec<AuditEvent> =
                added.into_iter().map(|c| AuditEvent::KekRotated { cluster: c, new_version: 1 }).collect();
            let mut log = self.audit();
            log.room_for(&[rotations.as_slice(), then].concat())?;
            *v = work;
            drop(v);
            append_admin(&mut log, rotations, now_ms);
            return Ok(log);
        }
        let mut keks = match self.keks.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        // Version 1 of a new cluster is its first KEK, not a rotation.
        let rotations: Vec<AuditEvent> = wanted
            .iter()
            .flat_map(|(id, version, _)| {
                let first = keks.newest_version(id).map_or(1, |n| n.saturating_add(1));
                (first.max(2)..=(*version).min(keys::MAX_KEK_VERSIONS))
                    .map(|new_version| AuditEvent::KekRotated { cluster: id.clone(), new_version })
            })
            .collect();
        let mut log = self.audit();
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
            Some(e) => Err(StartError::Nsm(e)),
            None => Ok(log),
        }
    }

    fn source(&self) -> std::sync::RwLockReadGuard<'_, PolicySource> {
        match self.policy.read() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        }
    }

    /// The signed policy's newest version and digest (`None` with a static policy file).
    pub fn policy_head(&self) -> Option<(u64, [u8; 48])> {
        match &*self.source() {
            PolicySource::Static(_) => None,
            PolicySource::Signed(s, _) => Some((s.latest().bundle.body.version, s.latest().digest)),
        }
    }

    /// Verifies and applies a pushed bundle (atomically: all or nothing).
    fn push_policy(&self, bundle: &[u8], now_ms: u64) -> Result<keygate_attestation::bundle::ApplyReport, Deny> {
        let mut guard = match self.policy.write() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        let meta = keygate_attestation::bundle::decode_bundle(bundle, self.crypto).ok();
        let stage = Stage::Policy {
            version: meta.as_ref().map(|b| b.body.version),
            digest: meta.as_ref().map(|b| keygate_attestation::bundle::digest(&b.body_bytes)),
        };
        let deny = |code, reason: String| Deny { stage: stage.clone(), ..Deny::new(code, reason) };
        // What a restart would come back to (lock order: policy → vault, released at once).
        let committed = self.vault.as_ref().map(|v| lock(v).committed_policy().and_then(|(_, head)| head));
        let PolicySource::Signed(state, durable) = &mut *guard else {
            return Err(deny(DenyCode::PolicyStatic, "this KRE runs a static policy file and takes no pushes".into()));
        };
        // Apply to a copy, make the KEKs, then commit: a failure leaves the state as it was.
        let mut next = state.clone();
        let mut report =
            next.apply(bundle, now_ms, self.crypto).map_err(|e| deny(DenyCode::PolicyRefused, e.to_string()))?;
        // A bundle accepted before (a replay after a restart) keeps the activation time the
        // sealed state recorded for exactly it, not a fresh delay.
        if let Some(at) = self.vault.as_ref().and_then(|v| lock(v).activation_of(report.version, &report.digest)) {
            if next.restore_activation(report.version, &report.digest, at) {
                report.activates_at_ms = at;
            }
        }
        if let Some((fv, fd)) = self.vault.as_ref().and_then(|v| lock(v).policy_floor()) {
            if report.version == fv && report.digest != fd {
                return Err(deny(
                    DenyCode::PolicyRefused,
                    format!(
                        "fork: bundle version {fv} differs from the policy head recorded in the sealed state ({})",
                        hex::encode(&fd[..8])
                    ),
                ));
            }
        }
        // New clusters get their KEKs, and rotated ones their new versions, before the bundle
        // takes effect (with custodians: in the working state, usable once the parent has
        // stored and committed it). Nothing is applied without its record: `ensure_keks`
        // checks that the rotations and the `PolicyAccepted` entry fit before it changes
        // anything, and hands back the audit lock, under which the entry is appended before
        // the new state is committed. Lock order: policy → vault → KEKs → audit (the policy
        // lock is held throughout; the vault is locked again only after the audit lock is
        // released).
        let accepted = AuditEvent::PolicyAccepted {
            version: report.version,
            digest: report.digest,
            activates_at_ms: report.activates_at_ms,
        };
        let schedule = schedule_of(&next.latest().bundle.body.policy);
        let mut log = self.ensure_keks(&schedule, std::slice::from_ref(&accepted)).map_err(|e| match e {
            StartError::Audit(e) => {
                deny(DenyCode::AuditFull, format!("policy not applied: it cannot be recorded: {e}"))
            }
            e => deny(DenyCode::Internal, e.to_string()),
        })?;
        let previous_version = log.policy_version();
        log.set_policy_version(report.version);
        if let Err(e) = log.append(accepted, now_ms) {
            log.set_policy_version(previous_version);
            tracing::debug!(error = %e, "policy acceptance not recorded; the policy is not applied");
            return Err(deny(DenyCode::AuditFull, format!("policy not applied: it cannot be recorded: {e}")));
        }
        let before = std::mem::replace(state, next);
        // With custodians, a bundle beyond the committed head is in force but not durable: the
        // state as of the durable head is kept (if not kept already), and the stricter of the
        // two applies until a commit carries the new head.
        if let Some(committed) = committed {
            if durable.is_none() && committed.is_none_or(|(v, _)| report.version > v) {
                *durable = Some(Box::new(before));
            }
        }
        drop(log);
        drop(guard);
        lock(&self.policy_history).push((report.version, report.digest));
        if let Some(v) = &self.vault {
            let mut v = lock(v);
            v.set_policy_head((report.version, report.digest));
            v.record_activation(report.version, report.digest, report.activates_at_ms);
        }
        Ok(report)
    }

    fn vault_or_refuse(&self, step: &'static str) -> Result<&Mutex<Vault>, Deny> {
        self.vault.as_ref().ok_or_else(|| Deny {
            stage: Stage::State { step },
            ..Deny::new(
                DenyCode::StateRefused,
                "this KRE runs without custodians: its KEKs are ephemeral and it has no sealed state",
            )
        })
    }

    /// Runs a durable-state step (genesis, load, commit, reshare, unseal) that must be
    /// recorded. The step runs on a copy of the vault and `f` returns its result with the
    /// entries recording it; the copy replaces the vault only if those entries fit the audit
    /// buffer (reserve included), and they are appended at once. A buffer without room
    /// refuses with `audit_full` and the state is unchanged.
    ///
    /// Room is checked first (one entry of the largest size, [`AuditLog::has_room_for_admin`])
    /// so that a full buffer refuses before any work, and again exactly once the entries are
    /// known: the vault lock is held from the step to the append, and the audit lock from
    /// the exact check to the append (lock order: vault → audit), so a concurrent refusal
    /// cannot take the room in between.
    fn recorded_step<T>(
        &self,
        vault: &Mutex<Vault>,
        step: &'static str,
        now_ms: u64,
        f: impl FnOnce(&mut Vault) -> Result<(T, Vec<AuditEvent>), Deny>,
    ) -> Result<T, Deny> {
        let full = |e: AuditError| Deny {
            stage: Stage::State { step },
            ..Deny::new(DenyCode::AuditFull, format!("not done: the step cannot be recorded: {e}"))
        };
        let mut v = lock(vault);
        if !self.audit().has_room_for_admin() {
            let s = self.audit().status();
            return Err(full(AuditError::BufferFull { buffered: s.buffered, bytes: s.buffered_bytes }));
        }
        let mut work = v.clone();
        let (out, events) = f(&mut work)?;
        let mut log = self.audit();
        log.room_for(&events).map_err(full)?;
        *v = work;
        append_admin(&mut log, events, now_ms);
        Ok(out)
    }

    /// The durable-state report; when there is a generation to store, it is exported here.
    fn state_report(&self) -> Result<StateReport, Deny> {
        let Some(vault) = &self.vault else {
            return Ok(StateReport {
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
            });
        };
        let mut v = lock(vault);
        let refuse = |e: String| Deny { stage: Stage::State { step: "export" }, ..Deny::new(DenyCode::Internal, e) };
        // A generation exported now records how far the parent has stored this run's trail.
        v.note_audit_head(self.audit().acked_head());
        let export = self
            .vault_step(&mut v, |v, rng| v.export(self.crypto, rng).map(|e| e.cloned()))
            .map_err(refuse)?
            .map_err(|e| refuse(e.to_string()))?;
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

    /// Genesis: a fresh KRE with no stored state creates it (exported, not yet in use).
    fn state_genesis(&self, now_ms: u64) -> Result<StateReport, Deny> {
        let vault = self.vault_or_refuse("genesis")?;
        let refuse =
            |e: String| Deny { stage: Stage::State { step: "genesis" }, ..Deny::new(DenyCode::StateRefused, e) };
        let ids: Vec<Id> = self.policy_clusters().iter().filter_map(|c| Id::new(c).ok()).collect();
        let head = self.policy_head();
        self.recorded_step(vault, "genesis", now_ms, |v| {
            v.note_audit_head(self.audit().acked_head());
            let nsm = &self.nsm;
            let mut attest = |ud: &[u8; 48]| {
                nsm.attest(&AttestRequest { nonce: None, user_data: Some(ud.to_vec()), public_key: None })
                    .map_err(|e| e.to_string())
            };
            let generation = self
                .vault_step(v, |v, rng| v.genesis(self.crypto, &ids, head, rng, &mut attest).map(|e| e.generation))
                .map_err(refuse)?
                .map_err(|e| refuse(e.to_string()))?;
            let detail =
                format!("generation {generation} prepared with {} cluster(s); not used until stored", ids.len());
            Ok(((), vec![state_event("state-genesis", true, detail)]))
        })?;
        // Clusters whose policy names a later KEK version get it in the next generation
        // (exported once this one is committed).
        self.ensure_keks(&self.policy_schedule(), &[]).map(drop).map_err(|e| keks_denial("genesis", e))?;
        self.state_report()
    }

    /// The parent's stored state: starts an unseal session.
    fn state_load(&self, blob: Vec<u8>, custody: Custody, now_ms: u64) -> Result<StateReport, Deny> {
        let vault = self.vault_or_refuse("load")?;
        let refuse = |e: String| Deny { stage: Stage::State { step: "load" }, ..Deny::new(DenyCode::StateRefused, e) };
        let blob_sha: [u8; 48] = Sha384::digest(&blob).into();
        self.recorded_step(vault, "load", now_ms, |v| {
            let generation = self
                .vault_step(v, |v, rng| v.load(self.crypto, blob, custody, rng))
                .map_err(refuse)?
                .map_err(|e| refuse(e.to_string()))?;
            let detail = format!(
                "generation {generation} (blob sha384 {}) loaded; awaiting custodian shares",
                hex::encode(blob_sha)
            );
            Ok(((), vec![state_event("state-loaded", true, detail)]))
        })?;
        self.state_report()
    }

    /// The parent stored the exported generation durably: it becomes the state in use.
    fn state_commit(&self, generation: u64, blob_sha384: &[u8; 48], now_ms: u64) -> Result<u64, Deny> {
        let vault = self.vault_or_refuse("commit")?;
        let refuse = |e: VaultError| Deny {
            stage: Stage::State { step: "commit" },
            ..Deny::new(DenyCode::StateRefused, e.to_string())
        };
        // The commit and every KEK version that becomes usable with it are recorded together,
        // or the commit is refused.
        let committed = self.recorded_step(vault, "commit", now_ms, |v| {
            let before = v.committed_versions();
            let committed = v.commit(generation, blob_sha384).map_err(refuse)?;
            let detail = format!(
                "generation {committed} (blob sha384 {}) stored by the parent and in use",
                hex::encode(blob_sha384)
            );
            let mut events = vec![state_event("state-committed", true, detail)];
            for (cluster, versions) in &v.committed_versions() {
                let old = before.iter().find(|(c, _)| c == cluster).map(|(_, v)| v.as_slice()).unwrap_or(&[]);
                for (version, _) in versions {
                    if !old.iter().any(|(v, _)| v == version) {
                        events.push(AuditEvent::KekRotated { cluster: cluster.clone(), new_version: *version });
                    }
                }
            }
            Ok((committed, events))
        })?;
        self.refresh_durable_policy();
        Ok(committed)
    }

    /// An unseal offer for one custodian: the KRE's attestation with `public_key` = K,
    /// `nonce` = the custodian's nonce and `user_data` binding the session.
    fn unseal_offer(&self, client_nonce: [u8; 32]) -> Result<(Message, [u8; 48]), Deny> {
        let vault = self.vault_or_refuse("unseal-offer")?;
        let refuse = |code, e: String| Deny { stage: Stage::State { step: "unseal-offer" }, ..Deny::new(code, e) };
        let offer = lock(vault).offer().map_err(|e| refuse(DenyCode::StateRefused, e.to_string()))?;
        let shares_sha: [u8; 48] = Sha384::digest(&offer.custody.shares).into();
        let user_data = match &offer.reshare_to {
            None => vault::unseal_user_data(&offer.unseal_nonce, offer.generation, &offer.set_digest, &shares_sha),
            Some(new) => vault::reshare_user_data(
                &offer.unseal_nonce,
                offer.generation,
                &offer.set_digest,
                &shares_sha,
                &new.digest(),
            ),
        };
        let attestation = self
            .nsm
            .attest(&AttestRequest {
                nonce: Some(client_nonce.to_vec()),
                user_data: Some(user_data.to_vec()),
                public_key: Some(offer.kre_public.to_vec()),
            })
            .map_err(|e| refuse(DenyCode::Internal, format!("KRE attestation unavailable: {e}")))?;
        let sha = Sha384::digest(&attestation).into();
        let msg = Message::UnsealOffer {
            attestation,
            unseal_nonce: offer.unseal_nonce,
            generation: offer.generation,
            shares: offer.custody.shares,
            genesis_attestation: offer.custody.genesis_attestation,
            reshare_to: offer.reshare_to.as_ref().map(vault::encode_set).unwrap_or_default(),
        };
        Ok((msg, sha))
    }

    /// Starts a reshare of the state key to a new custodian set (serving KRE).
    fn reshare_start(&self, set: &[u8], now_ms: u64) -> Result<StateReport, Deny> {
        let vault = self.vault_or_refuse("reshare")?;
        let refuse =
            |e: String| Deny { stage: Stage::State { step: "reshare" }, ..Deny::new(DenyCode::StateRefused, e) };
        let new_set = vault::decode_set(self.crypto, set).map_err(|e| refuse(format!("new custodian set: {e}")))?;
        let digest = new_set.digest();
        let (m, n) = (new_set.threshold(), new_set.count());
        self.recorded_step(vault, "reshare", now_ms, |v| {
            self.vault_step(v, |v, rng| v.start_reshare(self.crypto, new_set, rng))
                .map_err(refuse)?
                .map_err(|e| refuse(e.to_string()))?;
            let detail = format!(
                "to {m} of {n} custodians (set {}); awaiting the current custodians' approval",
                hex::encode(digest)
            );
            Ok(((), vec![state_event("reshare-started", true, detail)]))
        })?;
        self.state_report()
    }

    /// A custodian's share for the offer sent on this connection.
    fn unseal_share(&self, attestation_sha384: [u8; 48], share: &[u8], now_ms: u64) -> Result<Step, Deny> {
        let vault = self.vault_or_refuse("unseal-share")?;
        let refuse =
            |e: String| Deny { stage: Stage::State { step: "unseal-share" }, ..Deny::new(DenyCode::StateRefused, e) };
        let msg = UnsealShare::decode(share).map_err(|e| refuse(e.to_string()))?;
        if lock(vault).phase() == Phase::Serving {
            return self.reshare_share(attestation_sha384, &msg, now_ms);
        }
        let (have, need, serving, generation) = self.recorded_step(vault, "unseal-share", now_ms, |v| {
            let need = v.set().threshold();
            let outcome = v.add_share(self.crypto, attestation_sha384, &msg).map_err(|e| refuse(e.to_string()))?;
            Ok(match outcome {
                UnsealOutcome::NeedMore { have, .. } => {
                    let detail = format!("share {} accepted ({have} of {need})", msg.x);
                    let generation = v.unsealing_generation().unwrap_or(0);
                    ((have, need, false, generation), vec![state_event("custodian-share-accepted", true, detail)])
                }
                UnsealOutcome::Serving { generation } => {
                    let detail = format!(
                        "share {} accepted; {need} of {need}: generation {generation} unsealed and in use",
                        msg.x
                    );
                    // This run continues the history of the run that sealed the state.
                    let link = AuditEvent::ChainLinked { generation, previous: v.committed_audit_head() };
                    ((need, need, true, generation), vec![state_event("unsealed", true, detail), link])
                }
            })
        })?;
        if serving {
            self.after_unseal(now_ms);
        }
        Message::UnsealProgress { have, need, serving, generation }
            .encode()
            .map(|reply| Step { reply, close: true, event: Event::UnsealShareAccepted { have, need, serving } })
            .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
    }

    /// An old custodian's share approving the reshare in progress.
    fn reshare_share(&self, attestation_sha384: [u8; 48], msg: &UnsealShare, now_ms: u64) -> Result<Step, Deny> {
        let vault = self.vault_or_refuse("reshare-share")?;
        let refuse =
            |e: String| Deny { stage: Stage::State { step: "reshare-share" }, ..Deny::new(DenyCode::StateRefused, e) };
        let nsm = &self.nsm;
        let mut attest = |ud: &[u8; 48]| {
            nsm.attest(&AttestRequest { nonce: None, user_data: Some(ud.to_vec()), public_key: None })
                .map_err(|e| e.to_string())
        };
        let (have, need, done, generation) = self.recorded_step(vault, "reshare-share", now_ms, |v| {
            let (have, need, done) = self
                .vault_step(v, |v, rng| v.add_reshare_share(self.crypto, attestation_sha384, msg, rng, &mut attest))
                .map_err(refuse)?
                .map_err(|e| refuse(e.to_string()))?;
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
            Ok(((have, need, done, v.committed_generation()), vec![event]))
        })?;
        Message::UnsealProgress { have, need, serving: done, generation }
            .encode()
            .map(|reply| Step { reply, close: true, event: Event::UnsealShareAccepted { have, need, serving: done } })
            .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
    }

    /// After an unseal: bundles replayed before it count toward the policy head (a pending
    /// head takes the activation time the sealed state recorded for it, and the head's time
    /// is recorded), and clusters of the current policy that the state lacks get KEKs
    /// (stored before use).
    fn after_unseal(&self, now_ms: u64) {
        if let Some(v) = &self.vault {
            // Lock order: policy → vault; both released before the KEK step.
            let mut guard = match self.policy.write() {
                Ok(p) => p,
                Err(p) => p.into_inner(),
            };
            if let PolicySource::Signed(state, _) = &mut *guard {
                let (version, digest) = (state.latest().bundle.body.version, state.latest().digest);
                let mut v = lock(v);
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
        self.after_unseal_keks();
        self.refresh_durable_policy();
    }

    /// Clusters of the current policy that the unsealed state lacks get KEKs, rotations
    /// their versions and retirements are sealed (all stored before use).
    fn after_unseal_keks(&self) {
        if let Err(e) = self.ensure_keks(&self.policy_schedule(), &[]).map(drop) {
            tracing::warn!(error = %e, "could not add KEKs for new clusters or rotations after unseal");
        }
    }

    /// Why releases wait for the policy: the sealed state recorded a newer policy head than
    /// the chain replayed so far, or the replayed chain differs at that version (a fork).
    fn policy_floor_denial(&self) -> Option<String> {
        let (fv, fd) = self.vault.as_ref().and_then(|v| lock(v).policy_floor())?;
        let history = lock(&self.policy_history);
        match history.iter().find(|(v, _)| *v == fv) {
            Some((_, d)) if *d == fd => None,
            Some(_) => Some(format!(
                "the policy chain replayed since the restart differs at version {fv} from the one recorded in the sealed state (fork); restart the KRE and replay the right chain"
            )),
            None => Some(format!(
                "the sealed state records policy version {fv}; the parent has replayed only up to version {} (run `keygate policy restore`)",
                history.last().map_or(0, |(v, _)| *v)
            )),
        }
    }

    /// The KEK versions releasable for `cluster` under its effective policy `rule`: current
    /// first, then up to three older active ones, none below `rule.kek_retire_below` (retired
    /// by the policy) nor above `rule.kek_version`. With custodians, only committed versions.
    fn releasable_keks(&self, cluster: &Id, rule: &ClusterRule) -> Result<Vec<(u32, Kek)>, (DenyCode, String)> {
        let allowed = |v: u32| rule.releases_version(v) && v <= rule.kek_version;
        if let Some(v) = &self.vault {
            let v = lock(v);
            let committed = v.releasable(cluster);
            let keks: Vec<(u32, Kek)> = committed
                .iter()
                .filter(|(ver, s, _)| *s != KekStatus::Retired && allowed(*ver))
                .take(MAX_VERSIONS_RELEASED)
                .map(|(ver, _, k)| (*ver, k.clone()))
                .collect();
            if keks.is_empty() {
                let reason = if committed.is_empty() {
                    format!("the KEK of cluster `{cluster}` is not yet durably stored by the parent (retry after `keygate state sync`)")
                } else {
                    format!(
                        "KEK version {} of cluster `{cluster}` is not yet durably stored by the parent and the policy retires versions below {} (retry after `keygate state sync`)",
                        rule.kek_version, rule.kek_retire_below
                    )
                };
                return Err((DenyCode::StatePending, reason));
            }
            return Ok(keks);
        }
        let keks = match self.keks.read() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        let out: Vec<(u32, Kek)> = keks
            .releasable(cluster)
            .into_iter()
            .filter(|(ver, _, _)| allowed(*ver))
            .take(MAX_VERSIONS_RELEASED)
            .map(|(ver, _, k)| (ver, k.clone()))
            .collect();
        if out.is_empty() {
            return Err((DenyCode::Internal, format!("no releasable KEK for cluster `{cluster}`")));
        }
        Ok(out)
    }

    /// The durable state's phase, or `None` without custodians.
    pub fn vault_phase(&self) -> Option<Phase> {
        self.vault.as_ref().map(|v| lock(v).phase())
    }

    /// The NSM backend in use ("hardware" or "mock").
    pub fn nsm_kind(&self) -> &'static str {
        self.nsm.kind()
    }

    /// Live challenges (for status and metrics).
    pub fn live_challenges(&self) -> usize {
        self.nonces.lock().map(|n| n.len()).unwrap_or(0)
    }

    /// The release policy in force at `now_ms`.
    pub fn policy(&self, now_ms: u64) -> Arc<ReleasePolicy> {
        match &*self.source() {
            PolicySource::Static(p) => p.clone(),
            PolicySource::Signed(s, None) => Arc::new(s.effective(now_ms)),
            PolicySource::Signed(s, Some(durable)) => {
                Arc::new(keygate_attestation::bundle::stricter(&durable.effective(now_ms), &s.effective(now_ms)))
            }
        }
    }

    /// The newest policy alone at `now_ms`, while it is in force but not durable (the policy in
    /// force is then the stricter of it and the durable one); `None` once it is durable.
    pub fn undurable_policy(&self, now_ms: u64) -> Option<ReleasePolicy> {
        match &*self.source() {
            PolicySource::Signed(s, Some(_)) => Some(s.effective(now_ms)),
            _ => None,
        }
    }

    /// The policy version the committed sealed state carries (`None` without custodians or
    /// before serving).
    pub fn committed_policy_version(&self) -> Option<u64> {
        let v = self.vault.as_ref()?;
        lock(v).committed_policy().and_then(|(_, head)| head).map(|(version, _)| version)
    }

    /// Whether a `PolicyDurableWait` for `version` has its answer now: without custodians or
    /// before serving at once (a refusal), while serving once the committed head reaches it.
    pub fn durable_answer_ready(&self, version: u64) -> bool {
        let Some(v) = &self.vault else { return true };
        match lock(v).committed_policy() {
            None => true,
            Some((_, head)) => head.is_some_and(|(committed, _)| committed >= version),
        }
    }

    /// Drops the kept durable policy once the committed sealed state carries the newest head
    /// (after a commit or an unseal). Lock order: policy → vault.
    fn refresh_durable_policy(&self) {
        let Some(v) = &self.vault else { return };
        let mut guard = match self.policy.write() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if let PolicySource::Signed(state, durable) = &mut *guard {
            let latest = state.latest().bundle.body.version;
            let carried = lock(v).committed_policy().and_then(|(_, head)| head).is_some_and(|(cv, _)| cv >= latest);
            if durable.is_some() && carried {
                *durable = None;
            }
        }
    }

    /// Whether the committed sealed state carries bundle `(version, digest)`: the durability
    /// receipt when it does, `policy_not_durable` with what is committed when not yet.
    fn policy_durable(&self, version: u64, digest: &[u8; 48], now_ms: u64) -> Result<Step, Deny> {
        let stage = Stage::Policy { version: Some(version), digest: Some(*digest) };
        let deny = |code, reason: String| Deny { stage: stage.clone(), ..Deny::new(code, reason) };
        let vault = self.vault.as_ref().ok_or_else(|| {
            deny(
                DenyCode::StateRefused,
                "this KRE runs without custodians: it has no sealed state, so no policy is durable beyond this run"
                    .into(),
            )
        })?;
        let known = lock(&self.policy_history).iter().any(|(v, d)| *v == version && d == digest);
        if !known {
            return Err(deny(
                DenyCode::PolicyRefused,
                format!("policy v{version} with this digest was not accepted by this KRE run"),
            ));
        }
        let (generation, head) = match lock(vault).committed_policy() {
            Some(c) => c,
            None => return Err(deny(DenyCode::Sealed, "the KRE is sealed: nothing is committed".into())),
        };
        match head {
            Some((cv, _)) if cv >= version => {}
            _ => {
                return Err(deny(
                    DenyCode::PolicyNotDurable,
                    format!(
                        "policy v{version} is in force but not durable: the committed sealed state (generation {generation}) carries {}; the parent has not stored and committed the export that carries it (`keygate state sync`)",
                        head.map_or("no policy head".into(), |(v, _)| format!("policy v{v}"))
                    ),
                ))
            }
        }
        let signer = self.audit().signer_handle();
        let receipt = signer
            .sign_policy_receipt(generation, version, *digest, now_ms)
            .map_err(|e| deny(DenyCode::Internal, format!("signing the durability receipt: {e}")))?;
        Message::PolicyDurable { receipt: receipt.to_bytes() }
            .encode()
            .map(|reply| Step { reply, close: true, event: Event::PolicyDurable { version, generation } })
            .map_err(|e| deny(DenyCode::Internal, e.to_string()))
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, NonceTable> {
        match self.nonces.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Milliseconds since the Unix epoch, only for the start-up audit entry; every decision
/// takes its time from the caller's `Env`.
/// Appends `events` (entries that release nothing), in order. A refused append is counted as
/// unrecorded by the log, which writes an `Unrecorded` entry once there is room.
fn append_admin(log: &mut AuditLog, events: Vec<AuditEvent>, now_ms: u64) {
    for event in events {
        if let Err(e) = log.append(event, now_ms) {
            tracing::debug!(error = %e, "audit entry not recorded; counted as unrecorded");
        }
    }
}

/// The `UnsealStep` entry of a durable-state step (its detail cut to the entry limit).
fn state_event(step: &str, ok: bool, detail: String) -> AuditEvent {
    AuditEvent::UnsealStep { step: step.to_owned(), ok, detail: cut_text(detail) }
}

/// Text recorded in an audit entry (a reason, a detail) is cut to [`MAX_TEXT`] bytes, at a
/// char boundary, ending in `…` when cut: an over-long reason must not make the entry
/// unencodable, and so unrecorded.
fn cut_text(mut text: String) -> String {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    text.truncate(end);
    text.push('…');
    text
}

/// The refusal of a step whose KEKs could not be made (or recorded).
fn keks_denial(step: &'static str, e: StartError) -> Deny {
    let code = match e {
        StartError::Audit(_) => DenyCode::AuditFull,
        _ => DenyCode::StateRefused,
    };
    Deny { stage: Stage::State { step }, ..Deny::new(code, e.to_string()) }
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The state of one connection, named for what it waits for.
#[derive(Debug)]
enum State {
    ExpectHello,
    ExpectUnsealShare {
        attestation_sha384: [u8; 48],
    },
    ExpectRelease {
        client_nonce: [u8; 32],
        server_nonce: [u8; 32],
        kre_attestation_sha384: [u8; 48],
        /// The wrapping key whose point the Challenge's attestation carries.
        wrapping: Box<WrappingKey>,
    },
    Done,
}

/// One client connection's protocol state, on the listener of one channel.
#[derive(Debug)]
pub struct Connection {
    channel: Channel,
    state: State,
}

/// The environment of one step: the time and a random source.
pub struct Env<'a> {
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Fills a buffer with random bytes.
    pub rng: &'a mut dyn FnMut(&mut [u8]),
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("now_ms", &self.now_ms).finish_non_exhaustive()
    }
}

/// What a refusal was about, for the audit trail.
#[derive(Debug, Clone)]
enum Stage {
    /// Before a request: Hello, framing, timeouts.
    Challenge,
    /// A Release.
    Release,
    /// A policy push (version and digest when the bundle decoded).
    Policy { version: Option<u64>, digest: Option<[u8; 48]> },
    /// A durable-state or unseal step.
    State { step: &'static str },
}

struct Deny {
    code: DenyCode,
    reason: String,
    cluster: Option<Id>,
    module_id: Option<String>,
    stage: Stage,
    requester: Option<Requester>,
    key_ids: Vec<Id>,
}

impl Deny {
    fn new(code: DenyCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            cluster: None,
            module_id: None,
            stage: Stage::Challenge,
            requester: None,
            key_ids: Vec::new(),
        }
    }
}

impl Connection {
    /// A connection on `channel`'s listener, waiting for its first frame. Only request frames
    /// of that channel are served; any other is refused with `wrong_channel`.
    pub fn new(channel: Channel) -> Self {
        Self { channel, state: State::ExpectHello }
    }

    /// The channel this connection came in on.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// Whether the connection has finished (a Released or Denied was produced).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether this connection, in its present state, takes a request of type `t` next.
    fn expects(&self, t: u8) -> bool {
        match (&self.state, self.channel) {
            (State::ExpectHello, Channel::Release) => t == ty::HELLO,
            (State::ExpectHello, Channel::Parent) => Channel::of_request_type(t) == Some(Channel::Parent),
            (State::ExpectHello, Channel::Custodian) => matches!(t, ty::UNSEAL_HELLO | ty::RESHARE_START),
            (State::ExpectRelease { .. }, _) => t == ty::RELEASE,
            (State::ExpectUnsealShare { .. }, _) => t == ty::UNSEAL_SHARE,
            (State::Done, _) => false,
        }
    }

    /// The refusal of a frame from its two header bytes alone (version and type), or `None`
    /// when this connection takes that frame now. Nothing after the header is needed to refuse
    /// a frame of another channel or one the connection does not wait for.
    fn refusal_of_header(&self, version: u8, t: u8) -> Option<Deny> {
        if version != wire::VERSION {
            return Some(Deny::new(
                DenyCode::UnsupportedVersion,
                format!("protocol version {version} not supported (this KRE speaks {})", wire::VERSION),
            ));
        }
        let Some(name) = wire::type_name(t) else {
            return Some(Deny::new(DenyCode::Malformed, WireError::UnknownType(t).to_string()));
        };
        if let Some(c) = Channel::of_request_type(t).filter(|c| *c != self.channel) {
            return Some(Deny::new(
                DenyCode::WrongChannel,
                format!("{name} belongs to the {c} channel; this is the {} channel's listener", self.channel),
            ));
        }
        if self.expects(t) {
            return None;
        }
        Some(match self.state {
            State::ExpectHello => Deny::new(DenyCode::UnexpectedMessage, format!("expected Hello, got {name}")),
            State::ExpectRelease { .. } => {
                Deny::new(DenyCode::UnexpectedMessage, format!("expected Release, got {name}"))
            }
            State::ExpectUnsealShare { .. } => Deny {
                stage: Stage::State { step: "unseal-share" },
                ..Deny::new(DenyCode::UnexpectedMessage, format!("expected UnsealShare, got {name}"))
            },
            State::Done => Deny::new(DenyCode::UnexpectedMessage, format!("connection finished, got {name}")),
        })
    }

    /// The most body bytes a frame with this header may declare on this connection now, or
    /// `None` when the frame is refused from its header ([`Connection::on_frame`] with the two
    /// header bytes gives the refusal). The server checks this before it allocates or waits
    /// for a body: a release-port client can make the KRE hold at most a Hello's 34 bytes
    /// until it has been issued a challenge.
    pub fn admit(&self, version: u8, t: u8) -> Option<usize> {
        if self.refusal_of_header(version, t).is_some() {
            return None;
        }
        wire::max_request_body(t)
    }

    /// Handles one frame body (the bytes after the length prefix).
    pub fn on_frame(&mut self, kre: &Kre, body: &[u8], env: &mut Env<'_>) -> Step {
        let header_refusal = match body {
            [version, t, ..] => self.refusal_of_header(*version, *t),
            _ => None,
        };
        let result = match header_refusal {
            Some(d) => {
                if let State::ExpectRelease { server_nonce, .. } = &self.state {
                    kre.nonces().forget(server_nonce);
                }
                Err(d)
            }
            None => self.on_message(kre, body, env),
        };
        match result {
            Ok(step) => step,
            Err(d) => {
                self.state = State::Done;
                kre.record_denial(&d, env.now_ms);
                deny_step(d)
            }
        }
    }

    /// Handles a frame whose header this connection takes.
    fn on_message(&mut self, kre: &Kre, body: &[u8], env: &mut Env<'_>) -> Result<Step, Deny> {
        match Message::decode(body) {
            Err(WireError::UnsupportedVersion(v)) => Err(Deny::new(
                DenyCode::UnsupportedVersion,
                format!("protocol version {v} not supported (this KRE speaks {})", wire::VERSION),
            )),
            Err(e @ (WireError::BadId | WireError::BadKeyCount(_) | WireError::DuplicateKeyId)) => {
                Err(Deny::new(DenyCode::InvalidRequest, e.to_string()))
            }
            Err(e) => Err(Deny::new(DenyCode::Malformed, e.to_string())),
            Ok(msg) => match (std::mem::replace(&mut self.state, State::Done), msg) {
                (State::ExpectHello, Message::Hello { client_nonce }) => self.hello(kre, client_nonce, env),
                // A one-shot pull brings the trail up to date (the anonymous aggregate is
                // written now); the follower's continuous rounds leave it to its period, or
                // it would write one aggregate a round.
                (State::ExpectHello, Message::AuditPull { after_seq, max }) => {
                    audit_pull(kre, after_seq, max, env.now_ms, true)
                }
                (State::ExpectHello, Message::AuditWait { after_seq, max, .. }) => {
                    audit_pull(kre, after_seq, max, env.now_ms, false)
                }
                (State::ExpectHello, Message::AuditAck { up_to_seq }) => audit_ack(kre, up_to_seq),
                (State::ExpectHello, Message::PolicyDurableWait { version, digest, .. }) => {
                    kre.policy_durable(version, &digest, env.now_ms)
                }
                (State::ExpectHello, Message::Status) => Message::StatusReport { json: kre.status_json() }
                    .encode()
                    .map(|reply| Step { reply, close: true, event: Event::StatusReported })
                    .map_err(|e| Deny::new(DenyCode::Internal, e.to_string())),
                (State::ExpectHello, Message::StatePoll) => kre.state_report().and_then(|r| report_step(r, "poll")),
                (State::ExpectHello, Message::StateGenesis) => {
                    kre.state_genesis(env.now_ms).and_then(|r| report_step(r, "genesis"))
                }
                (State::ExpectHello, Message::StateLoad { blob, shares, genesis_attestation }) => kre
                    .state_load(blob, Custody { shares, genesis_attestation }, env.now_ms)
                    .and_then(|r| report_step(r, "load")),
                (State::ExpectHello, Message::StateCommit { generation, blob_sha384 }) => {
                    kre.state_commit(generation, &blob_sha384, env.now_ms).and_then(|generation| {
                        Message::StateCommitted { generation }
                            .encode()
                            .map(|reply| Step {
                                reply,
                                close: true,
                                event: Event::State { step: "commit", generation },
                            })
                            .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
                    })
                }
                (State::ExpectHello, Message::ReshareStart { set }) => {
                    kre.reshare_start(&set, env.now_ms).and_then(|r| report_step(r, "reshare"))
                }
                (State::ExpectHello, Message::UnsealHello { client_nonce }) => {
                    kre.unseal_offer(client_nonce).and_then(|(msg, attestation_sha384)| {
                        let reply = msg.encode().map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))?;
                        self.state = State::ExpectUnsealShare { attestation_sha384 };
                        Ok(Step { reply, close: false, event: Event::UnsealOffered })
                    })
                }
                (State::ExpectUnsealShare { attestation_sha384 }, Message::UnsealShare { share }) => {
                    kre.unseal_share(attestation_sha384, &share, env.now_ms)
                }
                (State::ExpectHello, Message::PolicyPush { bundle }) => match kre.push_policy(&bundle, env.now_ms) {
                    Ok(r) => Message::PolicyAccepted {
                        version: r.version,
                        digest: r.digest,
                        activates_at_ms: r.activates_at_ms,
                    }
                    .encode()
                    .map(|reply| Step {
                        reply,
                        close: true,
                        event: Event::PolicyAccepted {
                            version: r.version,
                            digest: r.digest,
                            activates_at_ms: r.activates_at_ms,
                        },
                    })
                    .map_err(|e| Deny::new(DenyCode::Internal, e.to_string())),
                    Err(d) => Err(d),
                },
                (
                    State::ExpectRelease { client_nonce, server_nonce, kre_attestation_sha384, wrapping },
                    Message::Release { cluster_id, key_ids, attestation },
                ) => {
                    let t = Transcript {
                        client_nonce,
                        server_nonce,
                        kre_attestation_sha384,
                        client_attestation_sha384: Sha384::digest(&attestation).into(),
                        request_digest: wire::request_digest(&cluster_id, &key_ids),
                    };
                    release(kre, &server_nonce, t, *wrapping, cluster_id, key_ids, &attestation, env)
                }
                (state, m) => {
                    // Not reached through on_frame, whose header check refuses every frame this
                    // connection does not take; kept total rather than a panic.
                    if let State::ExpectRelease { server_nonce, .. } = &state {
                        kre.nonces().forget(server_nonce);
                    }
                    Err(Deny::new(DenyCode::Internal, format!("no handler for {} in this state", m.name())))
                }
            },
        }
    }

    /// A Denied for a frame that could not even be read (bad length prefix, timeout).
    pub fn deny(&mut self, kre: &Kre, code: DenyCode, reason: &str, now_ms: u64) -> Step {
        let d = Deny::new(code, reason);
        if let State::ExpectRelease { server_nonce, .. } = &self.state {
            kre.nonces().forget(server_nonce);
        }
        self.state = State::Done;
        kre.record_denial(&d, now_ms);
        deny_step(d)
    }

    /// Releases this connection's challenge (the connection closed early).
    pub fn abandon(&mut self, kre: &Kre) {
        if let State::ExpectRelease { server_nonce, .. } = &self.state {
            kre.nonces().forget(server_nonce);
        }
        self.state = State::Done;
    }

    fn hello(&mut self, kre: &Kre, client_nonce: [u8; 32], env: &mut Env<'_>) -> Result<Step, Deny> {
        let mut server_nonce = [0u8; 32];
        (env.rng)(&mut server_nonce);
        // The key this connection's keys will be wrapped under: its point goes into the KRE's
        // own attestation, so a client accepts a wrap only from the attested KRE.
        let wrapping = WrappingKey::generate(kre.crypto, &mut *env.rng)
            .map_err(|e| Deny::new(DenyCode::Internal, format!("wrapping key: {e}")))?;
        if !kre.nonces().issue(server_nonce, env.now_ms) {
            return Err(Deny::new(DenyCode::Busy, "challenge table full; retry shortly"));
        }
        let req = AttestRequest {
            nonce: Some(client_nonce.to_vec()),
            user_data: Some(kre_user_data(&server_nonce).to_vec()),
            public_key: Some(wrapping.point().to_vec()),
        };
        let kre_attestation = match kre.nsm.attest(&req) {
            Ok(doc) => doc,
            Err(e) => {
                kre.nonces().forget(&server_nonce);
                return Err(Deny::new(DenyCode::Internal, format!("KRE attestation unavailable: {e}")));
            }
        };
        let kre_attestation_sha384 = Sha384::digest(&kre_attestation).into();
        let reply = Message::Challenge { server_nonce, kre_attestation }
            .encode()
            .map_err(|e| Deny::new(DenyCode::Internal, format!("encoding challenge: {e}")))?;
        self.state =
            State::ExpectRelease { client_nonce, server_nonce, kre_attestation_sha384, wrapping: Box::new(wrapping) };
        Ok(Step { reply, close: false, event: Event::ChallengeIssued })
    }
}

/// Entries after `after_seq` (as many as fit one frame) and, when they reach the head of the
/// chain, a checkpoint over the last one.
fn audit_pull(kre: &Kre, after_seq: u64, max: u16, now_ms: u64, flush: bool) -> Result<Step, Deny> {
    kre.flush_anonymous(now_ms, flush);
    let mut log = kre.audit();
    let wanted = usize::from(max).clamp(1, wire::MAX_AUDIT_BATCH);
    let mut entries = Vec::new();
    let mut size = 0usize;
    let mut last = after_seq;
    for e in log.entries_after(after_seq, wanted) {
        let b = e.bytes();
        // Leave room for the checkpoint (at most 21 KiB) in the 64 KiB frame.
        if size + b.len() + 2 > 40 * 1024 {
            break;
        }
        size += b.len() + 2;
        last = e.seq();
        entries.push(b.to_vec());
    }
    let head = log.status().last_seq;
    // A one-shot pull (`flush`) always ends with a checkpoint at the head; a follower's at
    // most once per FOLLOWER_CHECKPOINT_EVERY_MS (the receipts sign each release meanwhile).
    let due = flush || log.checkpoint_due(now_ms, crate::audit::FOLLOWER_CHECKPOINT_EVERY_MS);
    let checkpoint = if last == head && head > 0 && due {
        log.checkpoint(now_ms).map(|c| c.bytes().to_vec()).map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))?
    } else {
        Vec::new()
    };
    let n = entries.len();
    Message::AuditBatch { entries, checkpoint }
        .encode()
        .map(|reply| Step { reply, close: true, event: Event::AuditPulled { entries: n } })
        .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
}

/// The parent has stored entries up to `up_to_seq`: free them from the buffer.
fn audit_ack(kre: &Kre, up_to_seq: u64) -> Result<Step, Deny> {
    let mut log = kre.audit();
    log.ack(up_to_seq).map_err(|e| Deny::new(DenyCode::InvalidRequest, e.to_string()))?;
    let buffered = u32::try_from(log.status().buffered).unwrap_or(u32::MAX);
    Message::AuditAcked { up_to_seq, buffered }
        .encode()
        .map(|reply| Step { reply, close: true, event: Event::AuditAcked { up_to_seq } })
        .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
}

fn report_step(r: StateReport, step: &'static str) -> Result<Step, Deny> {
    let generation = if r.export_generation > 0 { r.export_generation } else { r.committed_generation };
    Message::StateReport(Box::new(r))
        .encode()
        .map(|reply| Step { reply, close: true, event: Event::State { step, generation } })
        .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
}

/// (cluster, kek_version, kek_retire_below) of every cluster of `p`.
fn schedule_of(p: &ReleasePolicy) -> Vec<(String, u32, u32)> {
    p.clusters.iter().map(|(c, r)| (c.clone(), r.kek_version, r.kek_retire_below)).collect()
}

fn deny_step(d: Deny) -> Step {
    let reply = Message::Denied { code: d.code, reason: d.reason.clone() }.encode().unwrap_or_default();
    Step {
        reply,
        close: true,
        event: Event::Denied { code: d.code, reason: d.reason, cluster: d.cluster, module_id: d.module_id },
    }
}

#[allow(clippy::too_many_arguments)] // one call site, each argument a distinct handshake value
fn release(
    kre: &Kre,
    server_nonce: &[u8; 32],
    transcript: Transcript,
    wrapping: WrappingKey,
    cluster: Id,
    key_ids: Vec<Id>,
    attestation: &[u8],
    env: &mut Env<'_>,
) -> Result<Step, Deny> {
    let policy = kre.policy(env.now_ms);
    let undurable = kre.undurable_policy(env.now_ms);
    let with = |code, reason: String, requester: &Option<Requester>| Deny {
        code,
        reason,
        cluster: Some(cluster.clone()),
        module_id: requester.as_ref().map(|r| r.module_id.clone()),
        stage: Stage::Release,
        requester: requester.clone(),
        key_ids: key_ids.clone(),
    };
    let mut requester: Option<Requester> = None;

    // Fail closed: when the audit buffer has only its reserve left, no release is made.
    if kre.audit().is_full() {
        kre.nonces().forget(server_nonce);
        return Err(with(
            DenyCode::AuditFull,
            "audit buffer full: the parent has not collected the trail; releases are refused until it does".into(),
            &requester,
        ));
    }

    // With custodians: nothing is released while sealed, or while the policy chain is behind
    // the head recorded in the sealed state.
    if let Some(phase) = kre.vault_phase() {
        if phase != Phase::Serving {
            kre.nonces().forget(server_nonce);
            return Err(with(
                DenyCode::Sealed,
                format!(
                    "the KRE is sealed ({}): it waits for the parent's stored state and its custodians",
                    phase.as_str()
                ),
                &requester,
            ));
        }
        if let Some(reason) = kre.policy_floor_denial() {
            kre.nonces().forget(server_nonce);
            return Err(with(DenyCode::PolicyStale, reason, &requester));
        }
    }

    // The attestation document: chain, signature, limits, time.
    let opts = VerifyOptions {
        time: VerifyTime::Now(env.now_ms),
        max_age: kre.config.max_doc_age,
        clock_skew: kre.config.clock_skew,
        allow_debug: policy.allow_debug,
        unknown_fields: UnknownFields::Refuse,
        require_kind: None,
        use_cache: true,
    };
    let att = match kre.verifier.verify(attestation, &opts) {
        Ok(a) => a,
        Err(VerifyError::DebugMode) => {
            kre.nonces().forget(server_nonce);
            return Err(with(
                DenyCode::DebugMode,
                "debug-mode attestation (PCR0-2 zero) not allowed by policy".into(),
                &requester,
            ));
        }
        Err(e) => {
            kre.nonces().forget(server_nonce);
            return Err(with(DenyCode::AttestationInvalid, e.to_string(), &requester));
        }
    };
    requester = Some(Requester::from_verified(&att));

    // Freshness: the document must carry this connection's challenge, unexpired, unused.
    let doc_nonce = att.nonce().unwrap_or_default();
    if doc_nonce != server_nonce.as_slice() {
        let mut nonces = kre.nonces();
        nonces.forget(server_nonce);
        return Err(if nonces.was_used(doc_nonce) {
            with(
                DenyCode::NonceReused,
                "attestation carries a challenge that was already used (replay)".into(),
                &requester,
            )
        } else {
            with(DenyCode::NonceMismatch, "attestation nonce is not this connection's challenge".into(), &requester)
        });
    }
    match kre.nonces().redeem(server_nonce, env.now_ms) {
        Redeem::Ok => {}
        Redeem::Expired => {
            return Err(with(
                DenyCode::ChallengeExpired,
                format!("challenge older than {} ms", millis(kre.config.challenge_ttl)),
                &requester,
            ))
        }
        Redeem::Reused => {
            return Err(with(DenyCode::NonceReused, "challenge already used (replay)".into(), &requester))
        }
        Redeem::Unknown => {
            return Err(with(DenyCode::ChallengeExpired, "challenge no longer known (expired)".into(), &requester))
        }
    }

    // The request binding and the key to wrap to.
    if att.user_data() != Some(transcript.request_digest.as_slice()) {
        return Err(with(
            DenyCode::UserDataMismatch,
            "user_data is not the SHA-384 request digest of this Release".into(),
            &requester,
        ));
    }
    let Some(client_point) = att.public_key() else {
        return Err(with(DenyCode::PublicKeyInvalid, "attestation has no public_key".into(), &requester));
    };
    if kre.crypto.validate_p384_point(client_point).is_err() {
        return Err(with(
            DenyCode::PublicKeyInvalid,
            "public_key is not an uncompressed P-384 point".into(),
            &requester,
        ));
    }

    // Policy. What only a newer, not yet durable policy allows waits for the parent's commit
    // (retryable, never read as a revocation); what the newest denies is refused for its reason.
    let verdict = match (policy::evaluate(&policy, &att, cluster.as_str(), env.now_ms), &undurable) {
        (Ok(image), _) => Ok(image.name.clone()),
        (Err(e), None) => Err(e),
        (Err(e), Some(newest)) => match policy::evaluate(newest, &att, cluster.as_str(), env.now_ms) {
            Ok(_) => {
                return Err(with(
                    DenyCode::PolicyNotDurable,
                    format!("{e}; the newest policy allows it, but the parent has not yet committed the sealed state that carries it"),
                    &requester,
                ))
            }
            Err(newest_denial) => Err(newest_denial),
        },
    };
    let image = match verdict {
        Ok(image) => image,
        Err(PolicyDenial::UnknownCluster(c)) => {
            return Err(with(DenyCode::UnknownCluster, format!("cluster `{c}` is not in the policy"), &requester))
        }
        Err(PolicyDenial::DebugMode) => {
            return Err(with(DenyCode::DebugMode, "debug-mode attestation not allowed".into(), &requester))
        }
        // An image whose rule waits for its activation time is not refused for good: a
        // client that holds keys keeps them and asks again (a restart replaying the chain
        // must not read as a revocation).
        Err(e @ PolicyDenial::NoMatchingImage { detail: policy::MismatchDetail::NotYetActive { .. }, .. }) => {
            return Err(with(DenyCode::ActivationPending, e.to_string(), &requester))
        }
        Err(e) => return Err(with(DenyCode::ImageNotAllowed, e.to_string(), &requester)),
    };

    // Derive and wrap: for each key id, the current version and the still-active older ones
    // the effective policy does not retire.
    let rule = policy.clusters.get(cluster.as_str()).map_or_else(ClusterRule::default, |r| ClusterRule {
        images: Vec::new(),
        kek_version: r.kek_version,
        kek_retire_below: r.kek_retire_below,
    });
    let keks = kre.releasable_keks(&cluster, &rule).map_err(|(code, reason)| with(code, reason, &requester))?;
    let mut data_keys = Vec::with_capacity(key_ids.len() * keks.len());
    for k in &key_ids {
        for (version, kek) in &keks {
            let dk = keys::derive_data_key(kre.crypto, kek, &cluster, k, *version)
                .map_err(|e| with(DenyCode::Internal, format!("deriving keys: {e}"), &requester))?;
            data_keys.push((k.clone(), *version, dk));
        }
    }
    drop(keks);
    // Recorded before the keys are wrapped: a release that cannot be recorded is not made, and
    // the reply carries the entry's receipt, which every key's wrap binds. Should the wrap or
    // the signature fail after this (never, short of a bug), the entry records a decision
    // whose answer was not sent, as when the parent does not acknowledge it in time.
    let released: Vec<(Id, u32)> = data_keys.iter().map(|(k, v, _)| (k.clone(), *v)).collect();
    let allowed = AuditEvent::ReleaseAllowed {
        requester: Requester::from_verified(&att),
        cluster: cluster.clone(),
        keys: released.clone(),
        image: image.clone(),
    };
    let (seq, entry_digest, signer) = {
        let mut log = kre.audit();
        if let Err(e) = log.append(allowed, env.now_ms) {
            return Err(with(DenyCode::AuditFull, format!("not released: {e}"), &requester));
        }
        let (seq, digest) = log.head();
        (seq, digest, log.signer_handle())
    };
    let receipt = signer
        .sign_receipt(seq, entry_digest, att.document_sha384())
        .map_err(|e| with(DenyCode::Internal, format!("signing the audit receipt: {e}"), &requester))?;
    let (ephemeral_point, wrapped) =
        keys::wrap_bound(kre.crypto, &transcript, client_point, &data_keys, wrapping, &receipt.to_bytes())
            .map_err(|e| with(DenyCode::Internal, format!("wrapping keys: {e}"), &requester))?;
    let reply = Message::Released { ephemeral_point, keys: wrapped, receipt: Box::new(receipt) }
        .encode()
        .map_err(|e| with(DenyCode::Internal, format!("encoding: {e}"), &requester))?;
    Ok(Step {
        reply,
        close: true,
        event: Event::Released {
            cluster,
            keys: released,
            image,
            module_id: att.module_id().to_owned(),
            document_sha384: att.document_sha384(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keygate_attestation::mock::MockNsm;
    use keygate_attestation::policy::ImageRule;
    use keygate_attestation::DocumentKind;

    use super::*;

    const T: u64 = 1_795_478_400_000;

    fn kre() -> Kre {
        let pcrs: BTreeMap<u8, Vec<u8>> = (0u8..3).map(|i| (i, vec![0x10 + i; 48])).collect();
        let image =
            ImageRule { name: "cp".into(), pcrs, kind: DocumentKind::Enclave, not_after_ms: None, not_before_ms: None };
        let policy = ReleasePolicy {
            clusters: BTreeMap::from([("prod".into(), ClusterRule { images: vec![image], ..Default::default() })]),
            allow_debug: false,
        };
        let nsm = MockNsm::new(b"core-test", BTreeMap::new(), Arc::new(|| T));
        let verifier = Verifier::new(nsm.root_anchor());
        Kre::new(KreConfig::default(), verifier, policy, Arc::new(nsm)).expect("kre")
    }

    /// A refusal with a reason longer than an entry holds is recorded, its reason cut at a
    /// char boundary, for every kind of refusal that carries one.
    #[test]
    fn a_denial_with_a_very_long_reason_is_recorded_cut() {
        let kre = kre();
        // 5,000 bytes of two-byte chars, shifted by one so that `MAX_TEXT - 3` is mid-char.
        let long = format!("x{}", "é".repeat(2_500));
        let stages =
            [Stage::Release, Stage::Policy { version: Some(2), digest: None }, Stage::State { step: "commit" }];
        for stage in stages {
            let before = kre.audit().status().last_seq;
            // A Release refusal has its own entry once the requester's document was verified.
            let requester = Some(crate::audit::Requester {
                module_id: "i-0123".into(),
                kind: DocumentKind::Enclave,
                pcrs: BTreeMap::new(),
                document_sha384: [1; 48],
            });
            let deny = Deny { stage, requester, ..Deny::new(DenyCode::ImageNotAllowed, long.clone()) };
            kre.record_denial(&deny, T);
            let log = kre.audit();
            assert_eq!(log.status().last_seq, before + 1, "recorded");
            assert_eq!(log.status().unrecorded_pending, 0);
            let entries = log.entries_after(before, 1);
            let text = match entries[0].event() {
                AuditEvent::ReleaseDenied { reason, .. } | AuditEvent::PolicyRefused { reason, .. } => reason,
                AuditEvent::UnsealStep { detail, .. } => detail,
                other => panic!("unexpected {other:?}"),
            };
            assert!(text.len() <= MAX_TEXT && text.len() > MAX_TEXT - 4, "{}", text.len());
            assert!(text.ends_with('…'));
            assert!(long.starts_with(text.trim_end_matches('…')));
        }
    }
}
