//! The key release enclave's core, without I/O: the KRE's parts, each the one owner of its
//! state, and the per-channel connection state machines that borrow them.
//!
//! Frames go in, frames come out; the clock and the random source are injected. The parts:
//! the policy book ([`policy`]: the policy source, this run's accepted bundles, the durable
//! floor), the KEK source ([`keks`]: ephemeral KEKs or the sealed state's committed ones
//! behind one releasable-KEK rule), the sealed-state service ([`state`]: report, genesis,
//! load, commit, unseal, reshare), the audit trail ([`audit`]: the log and the anonymous
//! tally) and the challenge table ([`challenges`]). The channels: [`release`], [`parent`],
//! [`custodian`], behind [`Connection`]. Every refusal is an [`Error`], mapped to its deny code
//! in one place ([`error`]). Trusts `keygate-attestation` (document verification, policy
//! evaluation, bundles) and the NSM (randomness, the KRE's own attestation). Spec:
//! docs/protocol.md, docs/policy.md, docs/durability.md, docs/audit.md.
//!
//! # Lock order
//!
//! Every lock belongs to one part. An operation that holds several takes them in this order
//! (a lock may be held while taking one further down the list, never one further up):
//!
//! 1. the policy writer (`PolicyBook`): serialises changes of the policy (a push, the fix-up
//!    after an unseal, dropping the durable floor), held from their first read to their last
//!    write;
//! 2. the vault (`StateService`);
//! 3. the ephemeral KEKs (`KekSource`);
//! 4. the anonymous tally, then 5. the audit log (`AuditTrail`);
//! 6. the policy source (`PolicyBook`), held only to read or swap in memory;
//! 7. leaves, under which nothing is taken: the policy history (`PolicyBook`) and the
//!    challenge table (`Challenges`).
//!
//! A release takes them one at a time (the policy source, the audit log, the vault, the
//! policy history, the challenge table, the vault or the KEKs), never two together. The NSM is drawn from only where a step must be atomic: a
//! sealed-state step under the vault lock (its draws and attestation are part of the step),
//! ephemeral KEKs under the KEK and audit locks (at start-up and on a push), and a push under
//! the policy writer; never under the policy source, the audit log alone or the challenge
//! table, so releases and status never wait for it. A poisoned lock is taken as it is
//! ([`lock`], [`read`], [`write`]): every part's state is valid between steps, because each
//! step works on a copy that replaces the state only once complete.

// `Denial` carries what the audit entry of a refusal needs (requester PCRs, key ids); it is
// built once per refused connection, so its size on the error path does not matter.
#![allow(clippy::result_large_err)]

mod audit;
pub mod challenges;
mod connection;
mod custodian;
pub mod error;
pub mod join;
pub mod joiner;
mod keks;
mod member;
mod parent;
mod policy;
mod release;
mod state;
mod tally;

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use keygate_attestation::bundle::PolicyState;
use keygate_attestation::crypto::Crypto;
use keygate_attestation::policy::ReleasePolicy;
use keygate_attestation::{Nsm, Verifier};

use crate::audit::{AuditConfig, AuditError, AuditEvent, AuditLog, AuditSigner};
use crate::state::custody::CustodianSet;
use crate::state::vault::Phase;
use crate::wire::{DenyCode, Id, Message};

pub use connection::Connection;
pub use error::Error;
pub use error::KekError;
pub use error::RandomFailed;

use audit::AuditTrail;
use challenges::Challenges;
use error::Denial;
use keks::KekSource;
use policy::{PolicyBook, PolicySource};
use state::StateService;

/// Most KEK versions released per key id: the current one and up to three older active ones
/// (so 16 key ids fit one Released frame).
pub const MAX_VERSIONS_RELEASED: usize = 4;

pub use crate::binding::kre_user_data;

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
    /// A pipeline timestamp was taken (`keygate_attestation::freshness`).
    PolicyTimestamp {
        /// The policy version the held timestamp names.
        version: u64,
        /// When it was issued (ms).
        issued_ms: u64,
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

/// The KRE: its parts, shared by all connections.
#[derive(Debug)]
pub struct Kre {
    config: KreConfig,
    verifier: Verifier,
    nsm: Arc<dyn Nsm>,
    crypto: &'static dyn Crypto,
    policy: PolicyBook,
    keks: KekSource,
    /// The durable state (with custodians configured).
    state: Option<StateService>,
    audit: AuditTrail,
    challenges: Challenges,
    /// Releases and refusals since the start, for the status report.
    tally: tally::Tally,
}

/// A KRE could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The policy is unusable.
    #[error("policy: {0}")]
    Policy(#[from] keygate_attestation::policy::PolicyError),
    /// The genesis bundle is unusable.
    #[error("genesis bundle: {0}")]
    Genesis(#[from] keygate_attestation::bundle::BundleError),
    /// The audit signer could not be set up.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The KEKs the policy names could not be made.
    #[error(transparent)]
    Keks(#[from] KekError),
}

/// Locks `m`; a poisoned lock is taken as it is (see the module doc).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read-locks `l`; a poisoned lock is taken as it is.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write-locks `l`; a poisoned lock is taken as it is.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let challenges = Challenges::new(config.max_challenges, millis(config.challenge_ttl));
        let audit = AuditTrail::new(config.audit, AuditSigner::start(&*nsm, crypto)?);
        let state = config.custodians.clone().map(|set| StateService::new(set, nsm.clone(), crypto));
        let kre = Self {
            config,
            verifier,
            nsm,
            crypto,
            policy: PolicyBook::new(source),
            keks: KekSource::default(),
            state,
            audit,
            challenges,
            tally: tally::Tally::default(),
        };
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
        drop(kre.ensure_keks(&kre.policy.schedule(), &[])?);
        Ok(kre)
    }

    /// The audit log.
    pub fn audit(&self) -> MutexGuard<'_, AuditLog> {
        self.audit.log()
    }

    /// Counts an answer withheld because its audit entry was not acknowledged in time.
    pub fn count_withheld(&self) {
        self.audit.count_withheld();
    }

    /// Counts an answer the server sends (a release or a refusal) for the status report.
    pub fn count_answer(&self, event: &Event) {
        self.tally.record(event);
    }

    /// The cluster members in force, and which of them this KRE is (by its own PCR4): `null`
    /// without a member list (a single KRE).
    fn members_json(&self) -> serde_json::Value {
        let members = self.policy.members(wall_clock_ms());
        if members.is_empty() {
            return serde_json::Value::Null;
        }
        let own = self.nsm.describe_pcr(4).ok().map(|p| p.data);
        let this = members.iter().find(|m| own.as_deref() == Some(m.pcr4.as_slice())).map(|m| m.name.clone());
        serde_json::json!({
            "names": members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            "this": this,
        })
    }

    /// A JSON status report (never secret).
    pub fn status_json(&self) -> String {
        self.status_json_at(None)
    }

    /// [`Self::status_json`], with the time until which the pipeline's timestamp lets releases
    /// go on when `now_ms` is given (`policy_fresh_until_ms`; null when not fresh, or when the
    /// policy needs no timestamp).
    pub fn status_json_at(&self, now_ms: Option<u64>) -> String {
        let a = self.audit().status();
        let head = self.policy_head();
        serde_json::json!({
            "nsm": self.nsm.kind(),
            "policy_version": head.map(|(v, _)| v),
            "policy_digest": head.map(|(_, d)| hex::encode(d)),
            "policy_durable_version": self.committed_policy_version(),
            "policy_in_force_not_durable": self.policy.in_force_not_durable(),
            "policy_timestamp": self.policy.timestamp().map(|(version, issued_ms)| serde_json::json!({
                "version": version,
                "issued_ms": issued_ms,
            })),
            "policy_timestamp_max_age_s": now_ms.and_then(|now| self.policy.freshness(now)).map(|f| f.max_age_s),
            "policy_fresh_until_ms": now_ms.and_then(|now| self.policy.check_fresh(now).ok().flatten()),
            "live_challenges": self.live_challenges(),
            "answers": self.tally.json(),
            "members": self.members_json(),
            "state": self.state.as_ref().map(StateService::summary),
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
                "answers_withheld_unacknowledged": self.audit.withheld(),
                "unrecorded_pending": a.unrecorded_pending,
                "checkpoints_signed": a.checkpoints_signed,
            },
        })
        .to_string()
    }

    /// Takes a pipeline timestamp pushed as `bytes` (`PolicyBook::take_timestamp`, with this
    /// KRE's allowed clock skew).
    fn take_timestamp(
        &self,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<keygate_attestation::freshness::Timestamp, error::Denial> {
        let skew = u64::try_from(self.config.clock_skew.as_millis()).unwrap_or(u64::MAX);
        self.policy
            .take_timestamp(self.crypto, bytes, now_ms, skew)
            .map_err(|e| error::Denial::at(error::Stage::Policy { version: None, digest: None }, e))
    }

    /// When `t` stops letting releases go on under the newest policy's maximum age (its issue
    /// time when the policy names no timestamp key).
    fn fresh_until(&self, t: &keygate_attestation::freshness::Timestamp, now_ms: u64) -> u64 {
        let age = self.policy.freshness(now_ms).map_or(0, |f| f.max_age_s.saturating_mul(1000));
        t.issued_ms.saturating_add(age)
    }

    /// The signed policy's newest version and digest (`None` with a static policy file).
    pub fn policy_head(&self) -> Option<(u64, [u8; 48])> {
        self.policy.head()
    }

    /// The sealed-state service, or the refusal of `step` on a KRE without custodians.
    fn sealed(&self, step: &'static str) -> Result<&StateService, Denial> {
        self.state.as_ref().ok_or_else(|| Denial::state(step, Error::NoCustodians))
    }

    /// The durable state's phase, or `None` without custodians.
    pub fn vault_phase(&self) -> Option<Phase> {
        self.state.as_ref().map(StateService::phase)
    }

    /// The NSM backend in use ("hardware" or "mock").
    pub fn nsm_kind(&self) -> &'static str {
        self.nsm.kind()
    }

    /// Live challenges (for status and metrics).
    pub fn live_challenges(&self) -> usize {
        self.challenges.table().len()
    }

    /// The release policy in force at `now_ms`.
    pub fn policy(&self, now_ms: u64) -> Arc<ReleasePolicy> {
        self.policy.in_force(now_ms)
    }

    /// The newest policy alone at `now_ms`, while it is in force but not durable (the policy in
    /// force is then the stricter of it and the durable one); `None` once it is durable.
    pub fn undurable_policy(&self, now_ms: u64) -> Option<ReleasePolicy> {
        self.policy.undurable(now_ms)
    }

    /// The policy version the committed sealed state carries (`None` without custodians or
    /// before serving).
    pub fn committed_policy_version(&self) -> Option<u64> {
        self.state.as_ref()?.committed_policy_version()
    }

    /// Whether a `PolicyDurableWait` for `version` has its answer now: without custodians or
    /// before serving at once (a refusal), while serving once the committed head reaches it.
    pub fn durable_answer_ready(&self, version: u64) -> bool {
        let Some(s) = &self.state else { return true };
        match s.committed_policy() {
            None => true,
            Some((_, head)) => head.is_some_and(|(committed, _)| committed >= version),
        }
    }
}

/// Encodes a reply; a failure is `Error::Encode` naming `what`.
fn encode(msg: Message, what: &'static str) -> Result<Vec<u8>, Error> {
    msg.encode().map_err(|source| Error::Encode { what, source })
}

/// Milliseconds since the Unix epoch, only for the start-up audit entry and the KEK
/// rotations' entries; every decision takes its time from the caller's `Env`.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
