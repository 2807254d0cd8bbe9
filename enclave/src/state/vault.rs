//! The KRE's durable state as a state machine without I/O (the contract is docs/durability.md).
//!
//! ```text
//!            StateGenesis                      StateCommit(g+1, digest)
//! Awaiting ───────────────► Serving(pending g=1) ─────────────────────► Serving(g+1)
//!    │ StateLoad(blob, shares)                      ▲  working ≠ committed: export g+1
//!    ▼                                              │
//! Unsealing ── M valid custodian shares ──► open ───┘
//! ```
//!
//! - **Awaiting**: a KRE with custodians configured starts here. It holds no KEK and
//!   releases nothing (`sealed`).
//! - **Unsealing**: the parent handed over the stored blob and shares file; the KRE drew an
//!   ephemeral P-384 key `K` and an unseal nonce for this session and collects custodian
//!   shares re-encrypted to `K` ([`crate::state::custody`]). At M shares it reconstructs the state
//!   key, opens the blob and serves exactly that generation.
//! - **Serving**: `committed` is the newest state the parent has stored durably and
//!   acknowledged; only its KEKs are used. Changes (a new cluster, a rotation, a new policy
//!   head) go to `working`; the parent's next poll exports `working` sealed as generation
//!   `committed + 1`, and only the parent's commit of exactly that generation and blob digest
//!   makes it `committed`. An exported blob is fixed until committed (resending it is
//!   idempotent, so a parent that crashed between store and commit simply stores and
//!   commits it again). No key is ever released under a KEK version that exists only in
//!   `working` or in an uncommitted export.
//!
//! - **Confirming**: unsealed by custodians as a member of a cluster ([`UnsealMode::AwaitMember`]),
//!   it serves only once a serving member has vouched for its generation or a newer one
//!   ([`Vault::confirm`]); meanwhile it releases, exports and forwards nothing. A cold start
//!   ([`UnsealMode::ColdStart`], stated in the offer every share covers) skips it.
//!
//! A serving member may also adopt a newer generation another member of the same state
//! committed to the shared store ([`Vault::adopt`], `docs/cluster.md`): it replaces
//! `committed` and `working`, and an outstanding export (which lost the race) is dropped.
//!
//! The audit head: every export records the head the KRE noted last
//! ([`Vault::note_audit_head`]: the newest audit entry the parent had acknowledged storing),
//! so a committed generation says how far this run's trail had got; after an unseal,
//! [`Vault::committed_audit_head`] is the previous run's. It is never a reason for a new
//! generation by itself.
//!
//! An unseal (and a reshare) is bound to the exact blob, not only its generation: the offer
//! carries the blob's SHA-384 and the KRE's attestation and every share's transcript cover it,
//! so a custodian that records (generation, digest) refuses another blob of that generation.
//! Shares are checked against the shares file's commitments as they arrive. A custodian key
//! that is also a policy approver is refused at genesis and at a reshare (one key, one
//! purpose).
//!
//! The floor: the policy head recorded in the unsealed state. Until the parent has replayed
//! the policy chain up to it (with the same digest at that version), releases are refused
//! (`policy_stale`), so a parent that withholds newer bundles after a restart cannot roll
//! the policy back.

use keygate_attestation::crypto::{p384_scalar_from, Crypto, CryptoError, P384Scalar, P384_POINT_LEN};
use keygate_attestation::secret::Secret;
use sha2::{Digest, Sha384};

use crate::audit::AuditHead;
use crate::binding::genesis_user_data;
use crate::codec::Id;
use crate::crypto::keys::{Kek, KekStatus};
use crate::crypto::shamir::Share;
use crate::state::custody::{
    self, CustodianSet, CustodyError, PublicKey, SharesFile, UnsealContext, UnsealProgress, UnsealShare,
};
use crate::state::sealed::{self, Activation, KekEntry, KreState, SealedError, SealedHeader};

/// Largest sealed blob the KRE exports or loads: it travels in one 64 KiB frame together
/// with the shares file and the genesis attestation. About 1,000 KEK versions with
/// 16-character cluster names.
pub const MAX_STATE_BLOB: usize = 40 * 1024;
/// Largest shares file (32 custodians need 9,372 bytes in format 2).
pub const MAX_SHARES_FILE: usize = 10 * 1024;
/// Largest genesis attestation document.
pub const MAX_GENESIS_ATTESTATION: usize = 12 * 1024;

/// A policy bundle as the sealed state records it: (version, SHA-384 of the body).
pub type PolicyHead = (u64, [u8; 48]);

/// Produces the KRE's attestation document with the given `user_data`.
pub type Attest<'a> = dyn FnMut(&[u8; 48]) -> Result<Vec<u8>, keygate_attestation::NsmError> + 'a;

/// Where the vault is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the parent's stored state (or a genesis).
    Awaiting,
    /// Collecting custodian shares.
    Unsealing,
    /// Unsealed (or created) and serving.
    Serving,
    /// Unsealed by custodians as a member of a cluster, waiting for a serving member to
    /// confirm that its generation is the newest ([`Vault::confirm`]): releases nothing.
    Confirming,
}

impl Phase {
    /// Lower-case name, as in status reports and the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Awaiting => "awaiting_state",
            Phase::Unsealing => "unsealing",
            Phase::Serving => "serving",
            Phase::Confirming => "confirming",
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Phase::Awaiting => 1,
            Phase::Unsealing => 2,
            Phase::Serving => 3,
            Phase::Confirming => 4,
        }
    }
}

/// How an unseal by custodians ends (the KRE decides it from its policy when the parent hands
/// over the stored state, `docs/cluster.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsealMode {
    /// A single KRE (no other member): it serves the unsealed state.
    Plain,
    /// A member of a cluster: it serves only once a serving member has confirmed that no
    /// newer generation exists ([`Vault::confirm`]), so a copy unsealed from an older blob
    /// never releases under it.
    AwaitMember,
    /// A member of a cluster whose custodians state that no member serves: the offer says
    /// so (bound by the attestation every share covers) and it serves at once.
    ColdStart,
}

/// Why the vault refused a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The step does not fit the phase.
    #[error("the KRE is {}; {step} needs it {needs}", phase.as_str())]
    WrongPhase {
        /// Where the vault is.
        phase: Phase,
        /// The step asked for.
        step: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// The sealed blob is unusable.
    #[error("sealed state: {0}")]
    Sealed(#[from] SealedError),
    /// A custody check failed.
    #[error("custody: {0}")]
    Custody(#[from] CustodyError),
    /// The blob's header names another custodian set than the one configured.
    #[error("the sealed state is for another custodian set than this KRE's configuration")]
    StateSetMismatch,
    /// The shares file is for another custodian set.
    #[error("the shares file is for another custodian set than this KRE's configuration")]
    SharesSetMismatch,
    /// A size limit.
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Which input.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The reconstructed key does not open the blob: a tampered blob (or shares file).
    #[error("the reconstructed state key does not open the sealed state (tampered blob or shares file); load the state again")]
    StateDoesNotOpen,
    /// A commit without an export.
    #[error("no exported state to commit")]
    NothingExported,
    /// A commit for another generation or blob than the one exported.
    #[error("commit of generation {got} does not match the exported generation {exported} and its digest")]
    CommitMismatch {
        /// What the parent named.
        got: u64,
        /// What was exported.
        exported: u64,
    },
    /// The generation counter would overflow.
    #[error("generation counter exhausted")]
    GenerationExhausted,
    /// A KEK version limit.
    #[error("cluster `{cluster}` has the maximum number of KEK versions")]
    TooManyVersions {
        /// The cluster.
        cluster: String,
    },
    /// Cryptography failed.
    #[error("crypto: {0}")]
    Crypto(CryptoError),
    /// A custodian key is also a policy approver key (genesis or reshare refused).
    #[error("custodian key {index} is also a policy approver key: a key is a custodian or an approver, never both")]
    CustodianIsApprover {
        /// 0-based position in the custodian set (the configured one at genesis, the new one
        /// at a reshare).
        index: usize,
    },
    /// A reshare needs the outstanding export committed first.
    #[error("an exported generation is not yet committed: run `keygate state sync` first")]
    ExportOutstanding,
    /// The old custodians' shares did not reconstruct the state key in use.
    #[error("the shares do not reconstruct the state key in use: reshare not authorized (session ended)")]
    ReshareNotAuthorized,
    /// The NSM could not attest (genesis).
    #[error("attestation for the genesis shares failed: {0}")]
    Attestation(keygate_attestation::NsmError),
    /// A join: the stored blob is not the one the serving member vouched for.
    #[error("the stored state is not the generation the serving member vouched for (its digest differs)")]
    JoinBlobMismatch,
    /// A join: the blob opened but holds another generation or policy head than vouched for.
    #[error("the forwarded state key opens a state that is not the one the serving member vouched for")]
    JoinStateMismatch,
    /// Forwarding: nothing committed yet, or a reshare's new key is not yet committed.
    #[error("no committed state to forward (nothing committed yet, or a reshare is not yet committed)")]
    NothingToForward,
    /// An adoption: the offered generation is not newer than the committed one.
    #[error("the offered state is generation {offered}; generation {committed} is committed here (only a newer one is adopted)")]
    AdoptNotNewer {
        /// The offered generation.
        offered: u64,
        /// The committed generation.
        committed: u64,
    },
    /// An adoption: another blob of the committed generation (a fork).
    #[error("the offered state is generation {generation}, committed here with another digest (a fork)")]
    AdoptFork {
        /// The generation.
        generation: u64,
    },
    /// An adoption: the offered state's policy head is older than this KRE's floor, or
    /// another bundle of the same version.
    #[error("the offered state's policy head is older than (or forks) the policy this KRE has recorded")]
    AdoptPolicyBehind,
    /// An adoption while a reshare is in progress or its new key is not yet committed.
    #[error("a reshare is in progress or not yet committed: no state is adopted meanwhile")]
    AdoptDuringReshare,
    /// A confirmation: the serving member's state key is not this KRE's (another state).
    #[error("the serving member's state key is not the one this KRE unsealed (another state)")]
    ConfirmKeyMismatch,
}

/// A state the KRE wants the parent to store.
#[derive(Clone)]
pub struct Export {
    /// Its generation.
    pub generation: u64,
    /// The sealed blob.
    pub blob: Vec<u8>,
    /// SHA-384 of the blob (what the commit names).
    pub blob_sha384: [u8; 48],
    state: KreState,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("generation", &self.generation).field("len", &self.blob.len()).finish()
    }
}

/// What the parent stores with every blob: the shares file and the genesis attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Custody {
    /// The shares file (`custody::SharesFile::encode`).
    pub shares: Vec<u8>,
    /// The genesis KRE's attestation over the shares file ([`genesis_user_data`]).
    pub genesis_attestation: Vec<u8>,
}

/// What a custodian needs to act: the session values bound into the KRE's attestation.
#[derive(Debug, Clone)]
pub struct UnsealOffer {
    /// K, the session key (the attestation's `public_key`).
    pub kre_public: PublicKey,
    /// The session nonce.
    pub unseal_nonce: [u8; 32],
    /// The generation being unsealed.
    pub generation: u64,
    /// SHA-384 of the exact blob being unsealed (for a reshare: the committed one).
    pub blob_sha384: [u8; 48],
    /// The custodian set digest.
    pub set_digest: [u8; 48],
    /// The shares file and genesis attestation.
    pub custody: Custody,
    /// For a reshare: the new custodian set the old custodians are asked to approve.
    pub reshare_to: Option<CustodianSet>,
    /// A cold start ([`UnsealMode::ColdStart`]): the KRE will serve without a member's
    /// confirmation.
    pub cold_start: bool,
}

/// The encoding of a custodian set in an unseal offer: `u8 M ‖ u8 N ‖ N × 97-byte keys`.
pub fn encode_set(set: &CustodianSet) -> Vec<u8> {
    let mut out = vec![set.threshold(), set.count()];
    for k in set.keys() {
        out.extend_from_slice(k);
    }
    out
}

/// Parses [`encode_set`] and validates the set.
pub fn decode_set(crypto: &dyn Crypto, b: &[u8]) -> Result<CustodianSet, CustodyError> {
    let (&m, rest) = b.split_first().ok_or(CustodyError::Truncated)?;
    let (&n, rest) = rest.split_first().ok_or(CustodyError::Truncated)?;
    let n = usize::from(n);
    match rest.len().cmp(&(n * P384_POINT_LEN)) {
        std::cmp::Ordering::Less => return Err(CustodyError::Truncated),
        std::cmp::Ordering::Greater => return Err(CustodyError::TrailingBytes),
        std::cmp::Ordering::Equal => {}
    }
    let keys = rest
        .chunks_exact(P384_POINT_LEN)
        .map(|c| c.try_into().map_err(|_| CustodyError::Truncated))
        .collect::<Result<Vec<PublicKey>, _>>()?;
    CustodianSet::new(crypto, m, keys)
}

/// The result of one accepted share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsealOutcome {
    /// More shares are needed.
    NeedMore {
        /// Accepted so far.
        have: u8,
        /// The threshold.
        need: u8,
    },
    /// Unsealed: serving this generation.
    Serving {
        /// The generation.
        generation: u64,
    },
}

#[derive(Clone)]
struct Unsealing {
    blob: Vec<u8>,
    blob_sha384: [u8; 48],
    header: SealedHeader,
    custody: Custody,
    /// The shares file's per-share commitments (`None`: a format-1 file).
    commitments: Option<Vec<[u8; 48]>>,
    kre_key: P384Scalar,
    kre_public: PublicKey,
    unseal_nonce: [u8; 32],
    shares: Vec<Share>,
    mode: UnsealMode,
}

#[derive(Clone)]
struct Serving {
    state_key: Secret<32>,
    custody: Custody,
    committed: KreState,
    /// SHA-384 of the committed blob (the one unsealed, or the last export committed).
    committed_sha384: [u8; 48],
    working: KreState,
    exported: Option<Export>,
    /// A reshare in progress: old custodians prove their shares to authorize it.
    reshare: Option<Box<Reshare>>,
    /// The state key and custodian set changed (a reshare): the next export re-seals.
    resealed: bool,
    /// Unsealed as a member ([`UnsealMode::AwaitMember`]) and not yet confirmed by a serving
    /// member: nothing is released, exported or forwarded.
    unconfirmed: bool,
    /// Unsealed by custodians as a single KRE ([`UnsealMode::Plain`]), decided from a policy
    /// that may be behind the one the state recorded: [`Vault::settle_plain_unseal`] decides
    /// again once the policy has caught up.
    plain_unseal: bool,
}

/// A reshare session: the new set, and the old custodians' shares proving a quorum.
#[derive(Clone)]
struct Reshare {
    new_set: CustodianSet,
    /// The current shares file's per-share commitments.
    commitments: Option<Vec<[u8; 48]>>,
    kre_key: P384Scalar,
    kre_public: PublicKey,
    nonce: [u8; 32],
    shares: Vec<Share>,
}

#[derive(Clone)]
enum Inner {
    Awaiting,
    Unsealing(Box<Unsealing>),
    Serving(Box<Serving>),
}

/// The KRE's durable state. Never prints a key (no field is printed by `Debug`). `Clone` so
/// that a step can run on a copy that is dropped (and zeroized) if it fails half-way.
#[derive(Clone)]
pub struct Vault {
    set: CustodianSet,
    inner: Inner,
    floor: Option<(u64, [u8; 48])>,
    /// The audit head the next export records ([`Vault::note_audit_head`]).
    audit_head: Option<AuditHead>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("phase", &self.phase())
            .field("committed_generation", &self.committed_generation())
            .finish_non_exhaustive()
    }
}

fn check_len(what: &'static str, b: &[u8], max: usize) -> Result<(), VaultError> {
    if b.len() > max {
        return Err(VaultError::TooLarge { what, len: b.len(), max });
    }
    Ok(())
}

impl Vault {
    /// A vault for the configured custodian set, awaiting its state.
    pub fn new(set: CustodianSet) -> Self {
        Self { set, inner: Inner::Awaiting, floor: None, audit_head: None }
    }

    /// Notes how far this run's audit chain has got (the newest entry the parent has
    /// acknowledged storing): the next export records it in the sealed state. Not a change of
    /// content: it never makes a generation of its own, and an export already made keeps the
    /// head it was made with.
    pub fn note_audit_head(&mut self, head: AuditHead) {
        self.audit_head = Some(head);
    }

    /// The audit head recorded in the committed state (serving), e.g. the previous run's, in
    /// the state just unsealed.
    pub fn committed_audit_head(&self) -> Option<AuditHead> {
        match &self.inner {
            Inner::Serving(s) => s.committed.audit_head,
            _ => None,
        }
    }

    /// The configured custodian set.
    pub fn set(&self) -> &CustodianSet {
        &self.set
    }

    /// Where the vault is.
    pub fn phase(&self) -> Phase {
        match self.inner {
            Inner::Awaiting => Phase::Awaiting,
            Inner::Unsealing(_) => Phase::Unsealing,
            Inner::Serving(ref s) if s.unconfirmed => Phase::Confirming,
            Inner::Serving(_) => Phase::Serving,
        }
    }

    /// The generation in use (0 before serving).
    pub fn committed_generation(&self) -> u64 {
        match &self.inner {
            Inner::Serving(s) => s.committed.generation,
            _ => 0,
        }
    }

    /// The generation being unsealed.
    pub fn unsealing_generation(&self) -> Option<u64> {
        match &self.inner {
            Inner::Unsealing(u) => Some(u.header.generation),
            _ => None,
        }
    }

    /// Shares accepted so far in the unseal session.
    pub fn shares_accepted(&self) -> u8 {
        match &self.inner {
            Inner::Unsealing(u) => u8::try_from(u.shares.len()).unwrap_or(u8::MAX),
            _ => 0,
        }
    }

    /// The generation exported and not yet committed by the parent, while serving.
    pub fn pending_generation(&self) -> Option<u64> {
        match &self.inner {
            Inner::Serving(s) => s.exported.as_ref().map(|e| e.generation),
            _ => None,
        }
    }

    /// The policy head recorded in the unsealed state: releases wait until the policy has
    /// been replayed up to it.
    pub fn policy_floor(&self) -> Option<(u64, [u8; 48])> {
        self.floor
    }

    /// The committed generation and the policy head it carries, while serving: what a restart
    /// would come back to. `None` before serving.
    pub fn committed_policy(&self) -> Option<(u64, Option<PolicyHead>)> {
        match &self.inner {
            Inner::Serving(s) => Some((s.committed.generation, s.committed.policy_head)),
            _ => None,
        }
    }

    /// The shares file and genesis attestation (serving or unsealing).
    pub fn custody(&self) -> Option<&Custody> {
        match &self.inner {
            Inner::Serving(s) => Some(&s.custody),
            Inner::Unsealing(u) => Some(&u.custody),
            Inner::Awaiting => None,
        }
    }

    fn wrong(&self, step: &'static str, needs: &'static str) -> VaultError {
        VaultError::WrongPhase { phase: self.phase(), step, needs }
    }

    /// Genesis: draws the state key, splits it among the custodians, creates version 1 of a
    /// KEK for every cluster, and exports generation 1. `attest` produces the KRE's
    /// attestation with the given `user_data` ([`genesis_user_data`] of the shares file).
    /// `approvers` are the policy signing keys in force: none may be a custodian.
    pub fn genesis(
        &mut self,
        crypto: &dyn Crypto,
        clusters: &[Id],
        policy_head: Option<(u64, [u8; 48])>,
        approvers: &[PublicKey],
        rng: &mut dyn FnMut(&mut [u8]),
        attest: &mut Attest<'_>,
    ) -> Result<&Export, VaultError> {
        if !matches!(self.inner, Inner::Awaiting) {
            return Err(self.wrong("genesis", "awaiting state (a fresh KRE with no state loaded)"));
        }
        one_purpose(&self.set, approvers)?;
        let state_key: Secret<32> = Secret::generate(&mut *rng);
        let shares = SharesFile::create(crypto, self.set.clone(), &state_key, rng)?.encode();
        check_len("shares file", &shares, MAX_SHARES_FILE)?;
        let genesis_attestation = attest(&genesis_user_data(&shares)).map_err(VaultError::Attestation)?;
        check_len("genesis attestation", &genesis_attestation, MAX_GENESIS_ATTESTATION)?;
        let committed = KreState::default();
        let mut working = KreState { generation: 0, policy_head, ..KreState::default() };
        for c in clusters {
            working.clusters.entry(c.clone()).or_insert_with(|| {
                vec![KekEntry { version: 1, status: KekStatus::Current, kek: Secret::generate(&mut *rng) }]
            });
        }
        self.inner = Inner::Serving(Box::new(Serving {
            state_key,
            custody: Custody { shares, genesis_attestation },
            committed,
            committed_sha384: [0; 48],
            working,
            exported: None,
            reshare: None,
            resealed: false,
            unconfirmed: false,
            plain_unseal: false,
        }));
        match self.export(crypto, rng)? {
            Some(e) => Ok(e),
            None => Err(VaultError::NothingExported),
        }
    }

    /// The parent hands over the stored state: checks it without the key and starts an
    /// unseal session (a new K and nonce; a session in progress is abandoned) that serves the
    /// unsealed state ([`UnsealMode::Plain`]).
    pub fn load(
        &mut self,
        crypto: &dyn Crypto,
        blob: Vec<u8>,
        custody: Custody,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<u64, VaultError> {
        self.load_with(crypto, blob, custody, UnsealMode::Plain, rng)
    }

    /// As [`Self::load`], ending the unseal as `mode` says.
    pub fn load_with(
        &mut self,
        crypto: &dyn Crypto,
        blob: Vec<u8>,
        custody: Custody,
        mode: UnsealMode,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<u64, VaultError> {
        if matches!(self.inner, Inner::Serving(_)) {
            return Err(self.wrong("loading a state", "awaiting state or unsealing"));
        }
        check_len("sealed state", &blob, MAX_STATE_BLOB)?;
        check_len("shares file", &custody.shares, MAX_SHARES_FILE)?;
        check_len("genesis attestation", &custody.genesis_attestation, MAX_GENESIS_ATTESTATION)?;
        let header = sealed::peek_header(&blob)?;
        if header.custodian_set_digest != self.set.digest() {
            return Err(VaultError::StateSetMismatch);
        }
        let shares = SharesFile::decode(crypto, &custody.shares)?;
        if shares.set() != &self.set {
            return Err(VaultError::SharesSetMismatch);
        }
        let commitments = shares.commitments().map(<[_]>::to_vec);
        let blob_sha384 = Sha384::digest(&blob).into();
        let (kre_key, kre_public) = p384_scalar_from(crypto, &mut *rng).map_err(VaultError::Crypto)?;
        let kre_public: PublicKey = kre_public.try_into().map_err(|_| VaultError::Crypto(CryptoError::BadPublicKey))?;
        let mut unseal_nonce = [0u8; 32];
        rng(&mut unseal_nonce);
        let generation = header.generation;
        self.inner = Inner::Unsealing(Box::new(Unsealing {
            blob,
            blob_sha384,
            header,
            custody,
            commitments,
            kre_key,
            kre_public,
            unseal_nonce,
            shares: Vec::new(),
            mode,
        }));
        Ok(generation)
    }

    /// What a custodian binds its share to (unsealing only).
    pub fn offer(&self) -> Result<UnsealOffer, VaultError> {
        match &self.inner {
            Inner::Unsealing(u) => Ok(UnsealOffer {
                kre_public: u.kre_public,
                unseal_nonce: u.unseal_nonce,
                generation: u.header.generation,
                blob_sha384: u.blob_sha384,
                set_digest: self.set.digest(),
                custody: u.custody.clone(),
                reshare_to: None,
                cold_start: u.mode == UnsealMode::ColdStart,
            }),
            Inner::Serving(s) => {
                match &s.reshare {
                    Some(r) => Ok(UnsealOffer {
                        kre_public: r.kre_public,
                        unseal_nonce: r.nonce,
                        generation: s.committed.generation,
                        blob_sha384: s.committed_sha384,
                        set_digest: self.set.digest(),
                        custody: s.custody.clone(),
                        reshare_to: Some(r.new_set.clone()),
                        cold_start: false,
                    }),
                    None => Err(self
                        .wrong("an unseal offer", "unsealing (the parent has loaded the stored state), or resharing")),
                }
            }
            Inner::Awaiting => Err(self.wrong("an unseal offer", "unsealing (the parent has loaded the stored state)")),
        }
    }

    /// Starts a reshare to `new_set` (serving, nothing exported outstanding). Old custodians
    /// authorize it by proving their shares, exactly as in an unseal ([`Self::add_share`]).
    /// `approvers` are the policy signing keys in force: none may be a new custodian.
    pub fn start_reshare(
        &mut self,
        crypto: &dyn Crypto,
        new_set: CustodianSet,
        approvers: &[PublicKey],
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), VaultError> {
        one_purpose(&new_set, approvers)?;
        let phase = self.phase();
        let Inner::Serving(s) = &mut self.inner else {
            return Err(VaultError::WrongPhase { phase, step: "a reshare", needs: "serving" });
        };
        if s.unconfirmed {
            return Err(VaultError::WrongPhase { phase, step: "a reshare", needs: "serving" });
        }
        if s.exported.is_some() || s.resealed {
            return Err(VaultError::ExportOutstanding);
        }
        let commitments = SharesFile::decode(crypto, &s.custody.shares)?.commitments().map(<[_]>::to_vec);
        let (kre_key, kre_public) = p384_scalar_from(crypto, &mut *rng).map_err(VaultError::Crypto)?;
        let kre_public: PublicKey = kre_public.try_into().map_err(|_| VaultError::Crypto(CryptoError::BadPublicKey))?;
        let mut nonce = [0u8; 32];
        rng(&mut nonce);
        s.reshare = Some(Box::new(Reshare { new_set, commitments, kre_key, kre_public, nonce, shares: Vec::new() }));
        Ok(())
    }

    /// The reshare in progress, if any: (new set, shares accepted).
    pub fn reshare_status(&self) -> Option<(&CustodianSet, u8)> {
        match &self.inner {
            Inner::Serving(s) => {
                s.reshare.as_ref().map(|r| (&r.new_set, u8::try_from(r.shares.len()).unwrap_or(u8::MAX)))
            }
            _ => None,
        }
    }

    /// One old custodian's share for the reshare. At the threshold the reconstructed key
    /// must equal the state key (proof that a quorum of the old set approved); then a new
    /// state key is drawn and split for the new set, `attest` covers the new shares file, and
    /// the next export re-seals the state for the new set. Returns (have, need, done).
    pub fn add_reshare_share(
        &mut self,
        crypto: &dyn Crypto,
        kre_attestation_sha384: [u8; 48],
        msg: &UnsealShare,
        rng: &mut dyn FnMut(&mut [u8]),
        attest: &mut Attest<'_>,
    ) -> Result<(u8, u8, bool), VaultError> {
        let set_digest = self.set.digest();
        let threshold = self.set.threshold();
        let phase = self.phase();
        let Inner::Serving(s) = &mut self.inner else {
            return Err(VaultError::WrongPhase { phase, step: "a reshare share", needs: "serving" });
        };
        let Some(r) = s.reshare.as_mut() else {
            return Err(VaultError::WrongPhase { phase, step: "an unseal share", needs: "unsealing or resharing" });
        };
        let ctx = UnsealContext {
            kre_attestation_sha384,
            unseal_nonce: r.nonce,
            kre_public: r.kre_public,
            set_digest,
            generation: s.committed.generation,
            blob_sha384: s.committed_sha384,
        };
        let commitments = r.commitments.as_deref();
        let key = match custody::collect_share(crypto, &self.set, commitments, &r.kre_key, &ctx, &mut r.shares, msg)? {
            UnsealProgress::NeedMore { have, need } => return Ok((have, need, false)),
            UnsealProgress::Complete(key) => key,
        };
        if key != s.state_key {
            s.reshare = None;
            return Err(VaultError::ReshareNotAuthorized);
        }
        let Some(r) = s.reshare.take() else { return Err(VaultError::NothingExported) };
        let new_key: Secret<32> = Secret::generate(&mut *rng);
        let shares = SharesFile::create(crypto, r.new_set.clone(), &new_key, rng)?.encode();
        check_len("shares file", &shares, MAX_SHARES_FILE)?;
        let genesis_attestation = attest(&genesis_user_data(&shares)).map_err(VaultError::Attestation)?;
        check_len("genesis attestation", &genesis_attestation, MAX_GENESIS_ATTESTATION)?;
        s.state_key = new_key;
        s.custody = Custody { shares, genesis_attestation };
        s.resealed = true;
        self.set = r.new_set;
        Ok((threshold, threshold, true))
    }

    /// One custodian's share, re-encrypted to K and bound to the attestation the KRE sent on
    /// that custodian's connection. At the threshold: reconstructs the key, opens the blob and
    /// serves. A refused share leaves the session as it was, except that a reconstructed key
    /// that does not open the blob ends the session's shares (the parent must load again).
    pub fn add_share(
        &mut self,
        crypto: &dyn Crypto,
        kre_attestation_sha384: [u8; 48],
        msg: &UnsealShare,
    ) -> Result<UnsealOutcome, VaultError> {
        let set_digest = self.set.digest();
        let Inner::Unsealing(u) = &mut self.inner else {
            return Err(self.wrong("an unseal share", "unsealing"));
        };
        let ctx = UnsealContext {
            kre_attestation_sha384,
            unseal_nonce: u.unseal_nonce,
            kre_public: u.kre_public,
            set_digest,
            generation: u.header.generation,
            blob_sha384: u.blob_sha384,
        };
        let commitments = u.commitments.as_deref();
        let key = match custody::collect_share(crypto, &self.set, commitments, &u.kre_key, &ctx, &mut u.shares, msg)? {
            UnsealProgress::NeedMore { have, need } => return Ok(UnsealOutcome::NeedMore { have, need }),
            UnsealProgress::Complete(key) => key,
        };
        let state = sealed::open(&u.blob, &key, crypto).map_err(|e| match e {
            SealedError::Decrypt => VaultError::StateDoesNotOpen,
            other => VaultError::Sealed(other),
        })?;
        let generation = state.generation;
        self.floor = state.policy_head;
        let custody = u.custody.clone();
        let committed_sha384 = u.blob_sha384;
        let unconfirmed = u.mode == UnsealMode::AwaitMember;
        self.inner = Inner::Serving(Box::new(Serving {
            state_key: key,
            custody,
            committed: state.clone(),
            committed_sha384,
            working: state,
            exported: None,
            reshare: None,
            resealed: false,
            unconfirmed,
            plain_unseal: u.mode == UnsealMode::Plain,
        }));
        Ok(UnsealOutcome::Serving { generation })
    }

    /// The state the parent should store next: the fixed export if one is outstanding,
    /// otherwise `working` sealed as `committed + 1` when it differs from `committed`.
    pub fn export(
        &mut self,
        crypto: &dyn Crypto,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Option<&Export>, VaultError> {
        let set_digest = self.set.digest();
        let audit_head = self.audit_head;
        let Inner::Serving(s) = &mut self.inner else {
            return Ok(None);
        };
        // Unconfirmed, the state may be an old one: nothing of it is stored over the newer.
        if s.unconfirmed {
            return Ok(None);
        }
        if s.exported.is_none() && (s.resealed || !same_content(&s.working, &s.committed)) {
            let generation = s.committed.generation.checked_add(1).ok_or(VaultError::GenerationExhausted)?;
            // Each generation records how far the audit chain had got when it was exported.
            s.working.audit_head = audit_head;
            let mut state = s.working.clone();
            state.generation = generation;
            let blob = sealed::seal(&state, &s.state_key, &set_digest, rng, crypto)?;
            check_len("sealed state", &blob, MAX_STATE_BLOB)?;
            let blob_sha384 = Sha384::digest(&blob).into();
            s.exported = Some(Export { generation, blob, blob_sha384, state });
        }
        Ok(s.exported.as_ref())
    }

    /// The parent has stored and read back exactly the exported blob: it becomes the state
    /// in use. Returns the generation.
    pub fn commit(&mut self, generation: u64, blob_sha384: &[u8; 48]) -> Result<u64, VaultError> {
        let Inner::Serving(s) = &mut self.inner else {
            return Err(self.wrong("a commit", "serving"));
        };
        let Some(e) = &s.exported else {
            // Idempotent: a commit of the generation already committed (the parent retried
            // after losing the answer) is acknowledged again. (Serving without an export means
            // at least generation 1 is committed: genesis always exports.)
            if generation == s.committed.generation {
                return Ok(generation);
            }
            return Err(VaultError::NothingExported);
        };
        if e.generation != generation || e.blob_sha384 != *blob_sha384 {
            return Err(VaultError::CommitMismatch { got: generation, exported: e.generation });
        }
        let Some(e) = s.exported.take() else { return Err(VaultError::NothingExported) };
        s.committed = e.state;
        s.committed_sha384 = e.blob_sha384;
        s.working.generation = generation;
        s.resealed = false;
        Ok(generation)
    }

    /// Adds version 1 of a KEK for every cluster that has none (to `working`). Returns the
    /// clusters added.
    pub fn ensure_clusters(&mut self, clusters: &[Id], rng: &mut dyn FnMut(&mut [u8])) -> Result<Vec<Id>, VaultError> {
        let Inner::Serving(s) = &mut self.inner else {
            return Err(self.wrong("adding clusters", "serving"));
        };
        let mut added = Vec::new();
        for c in clusters {
            if !s.working.clusters.contains_key(c) {
                if s.working.clusters.len() >= sealed::MAX_CLUSTERS {
                    return Err(VaultError::TooManyVersions { cluster: c.to_string() });
                }
                let kek: Kek = Secret::generate(&mut *rng);
                s.working.clusters.insert(c.clone(), vec![KekEntry { version: 1, status: KekStatus::Current, kek }]);
                added.push(c.clone());
            }
        }
        Ok(added)
    }

    /// Makes `cluster` have at least KEK version `version` (new versions become current,
    /// the previous current stays active) and retires every version below `retire_below`.
    /// Changes go to `working`. Returns the new current version if one was created.
    pub fn rotate_to(
        &mut self,
        cluster: &Id,
        version: u32,
        retire_below: u32,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Option<u32>, VaultError> {
        let Inner::Serving(s) = &mut self.inner else {
            return Err(self.wrong("a rotation", "serving"));
        };
        let Some(entries) = s.working.clusters.get_mut(cluster) else {
            return Ok(None);
        };
        let mut created = None;
        loop {
            let newest = entries.last().map_or(0, |e| e.version);
            if newest >= version {
                break;
            }
            if entries.len() >= sealed::MAX_VERSIONS {
                return Err(VaultError::TooManyVersions { cluster: cluster.to_string() });
            }
            // The vector holds KEKs: it never grows in place (a reallocation would leave an
            // unzeroized copy of them behind), it is rebuilt at its final size instead.
            let missing = usize::try_from(version - newest).unwrap_or(usize::MAX);
            reserve_kek_entries(entries, missing.min(sealed::MAX_VERSIONS - entries.len()));
            for e in entries.iter_mut() {
                if e.status == KekStatus::Current {
                    e.status = KekStatus::Active;
                }
            }
            let v = newest + 1;
            entries.push(KekEntry { version: v, status: KekStatus::Current, kek: Secret::generate(&mut *rng) });
            created = Some(v);
        }
        for e in entries.iter_mut() {
            if e.version < retire_below && e.status != KekStatus::Current {
                e.status = KekStatus::Retired;
            }
        }
        Ok(created)
    }

    /// Records when the accepted bundle (`version`, `digest`) is fully in force, in
    /// `working` (sealed with the next export). A bundle keeps the time first recorded for
    /// it: accepting it again (a replay after a restart) changes nothing. A record for the
    /// same version with another digest (a bundle no longer in the chain) is replaced. Only
    /// the [`sealed::MAX_ACTIVATIONS`] newest versions are kept.
    pub fn record_activation(&mut self, version: u64, digest: [u8; 48], activates_at_ms: u64) {
        let Inner::Serving(s) = &mut self.inner else {
            return;
        };
        let a = &mut s.working.activations;
        let record = Activation { version, digest, activates_at_ms };
        match a.binary_search_by_key(&version, |r| r.version) {
            Ok(i) if a[i].digest == digest => {}
            Ok(i) => a[i] = record,
            Err(i) => a.insert(i, record),
        }
        if a.len() > sealed::MAX_ACTIVATIONS {
            let extra = a.len() - sealed::MAX_ACTIVATIONS;
            a.drain(..extra);
        }
    }

    /// The activation time recorded for exactly the bundle (`version`, `digest`) (serving).
    pub fn activation_of(&self, version: u64, digest: &[u8; 48]) -> Option<u64> {
        let Inner::Serving(s) = &self.inner else {
            return None;
        };
        s.working.activations.iter().find(|a| a.version == version && a.digest == *digest).map(|a| a.activates_at_ms)
    }

    /// Records a newer policy head in `working`.
    pub fn set_policy_head(&mut self, head: (u64, [u8; 48])) {
        if let Inner::Serving(s) = &mut self.inner {
            if s.working.policy_head.is_none_or(|(v, _)| head.0 > v) {
                s.working.policy_head = Some(head);
            }
        }
    }

    /// The committed KEK versions of `cluster` that may be released: the current one first,
    /// then the active older ones, newest first. Empty when not serving or not committed.
    pub fn releasable(&self, cluster: &Id) -> Vec<(u32, KekStatus, Kek)> {
        let Inner::Serving(s) = &self.inner else {
            return Vec::new();
        };
        let Some(entries) = s.committed.clusters.get(cluster) else {
            return Vec::new();
        };
        let releasable = crate::crypto::keys::releasable_first(entries.iter().map(|e| (e.version, e.status, &e.kek)));
        releasable.into_iter().map(|(v, s, k)| (v, s, k.clone())).collect()
    }

    /// The committed KEK versions per cluster (version, status), for status reports.
    pub fn committed_versions(&self) -> Vec<(Id, Vec<(u32, KekStatus)>)> {
        let Inner::Serving(s) = &self.inner else {
            return Vec::new();
        };
        s.committed
            .clusters
            .iter()
            .map(|(c, es)| (c.clone(), es.iter().map(|e| (e.version, e.status)).collect()))
            .collect()
    }
}

/// Refuses a custodian set in which a key is also a policy approver (one key, one purpose).
fn one_purpose(set: &CustodianSet, approvers: &[PublicKey]) -> Result<(), VaultError> {
    custody::check_one_purpose(set, approvers).map_err(|e| match e {
        CustodyError::CustodianIsApprover { index } => VaultError::CustodianIsApprover { index },
        other => VaultError::Custody(other),
    })
}

/// Makes room for `additional` more entries without a reallocation that would leave KEK
/// bytes behind: a vector without the room is replaced by a copy of exactly the needed
/// capacity, and the old one dropped (each KEK zeroized as it drops).
fn reserve_kek_entries(entries: &mut Vec<KekEntry>, additional: usize) {
    let need = entries.len().saturating_add(additional);
    if entries.capacity() >= need {
        return;
    }
    let mut grown = Vec::with_capacity(need);
    grown.extend(entries.iter().cloned());
    *entries = grown;
}

/// Whether two states hold the same keys and policy records. The audit head is not content: it
/// is recorded with each export, never a reason for one.
fn same_content(a: &KreState, b: &KreState) -> bool {
    a.policy_head == b.policy_head && a.clusters == b.clusters && a.activations == b.activations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_id as id;
    use crate::crypto::test_rng as rng;
    use keygate_attestation::crypto::all_backends;

    struct Custodian {
        scalar: P384Scalar,
    }

    fn setup(crypto: &dyn Crypto, m: u8, n: u8) -> (Vec<Custodian>, CustodianSet) {
        let mut cs = Vec::new();
        let mut keys = Vec::new();
        for i in 0..n {
            let (scalar, public) = p384_scalar_from(crypto, rng(100 + i)).expect("key");
            keys.push(public.try_into().expect("point"));
            cs.push(Custodian { scalar });
        }
        let set = CustodianSet::new(crypto, m, keys).expect("set");
        (cs, set)
    }

    /// The format-1 encoding of a format-2 shares file of `n` custodians (the same envelopes,
    /// no commitments), as written before commitments existed.
    fn format_1(shares: &[u8], n: usize) -> Vec<u8> {
        let head = 8 + 2 + 48 + 2 + n * P384_POINT_LEN;
        let mut out = shares[..head].to_vec();
        out[9] = 1;
        for e in shares[head..].chunks_exact(1 + P384_POINT_LEN + 48 + 48) {
            out.extend_from_slice(&e[..1 + P384_POINT_LEN + 48]);
        }
        out
    }

    fn attest_ok(_: &[u8; 48]) -> Result<Vec<u8>, keygate_attestation::NsmError> {
        Ok(b"genesis-attestation".to_vec())
    }

    /// Genesis, commit; returns the vault and the committed blob and custody.
    fn genesis(crypto: &dyn Crypto, set: &CustodianSet) -> (Vault, Vec<u8>, Custody) {
        let mut v = Vault::new(set.clone());
        let mut r = rng(1);
        let e =
            v.genesis(crypto, &[id("a"), id("b")], Some((1, [9; 48])), &[], &mut r, &mut attest_ok).expect("genesis");
        let (g, blob, sha) = (e.generation, e.blob.clone(), e.blob_sha384);
        assert_eq!(g, 1);
        assert!(v.releasable(&id("a")).is_empty(), "nothing released before the commit");
        assert_eq!(v.commit(1, &sha), Ok(1));
        let custody = v.custody().expect("custody").clone();
        (v, blob, custody)
    }

    /// [`genesis`] on the default backend with `m` of `n` test custodians: the backend, the
    /// custodians, their set, and the serving vault with its committed blob and custody.
    fn serving(m: u8, n: u8) -> (&'static dyn Crypto, Vec<Custodian>, CustodianSet, Vault, Vec<u8>, Custody) {
        let crypto = keygate_attestation::crypto::default_backend();
        let (cs, set) = setup(crypto, m, n);
        let (v, blob, custody) = genesis(crypto, &set);
        (crypto, cs, set, v, blob, custody)
    }

    fn share_for(crypto: &dyn Crypto, c: &Custodian, offer: &UnsealOffer, att: [u8; 48], seed: u8) -> UnsealShare {
        let shares = SharesFile::decode(crypto, &offer.custody.shares).expect("shares");
        let ctx = UnsealContext {
            kre_attestation_sha384: att,
            unseal_nonce: offer.unseal_nonce,
            kre_public: offer.kre_public,
            set_digest: offer.set_digest,
            generation: offer.generation,
            blob_sha384: offer.blob_sha384,
        };
        custody::custodian_reencrypt(crypto, &shares, &c.scalar, &ctx, &mut rng(seed)).expect("reencrypt")
    }

    /// A fresh vault of `set` unsealed from `blob` in `mode` by the first M custodians.
    fn unsealed_as(
        crypto: &dyn Crypto,
        cs: &[Custodian],
        set: &CustodianSet,
        (blob, custody): (&[u8], &Custody),
        mode: UnsealMode,
    ) -> Vault {
        let mut k = Vault::new(set.clone());
        k.load_with(crypto, blob.to_vec(), custody.clone(), mode, &mut rng(60)).expect("load");
        let offer = k.offer().expect("offer");
        assert_eq!(offer.cold_start, mode == UnsealMode::ColdStart, "the offer states a cold start");
        for (seed, c) in (61..).zip(&cs[..usize::from(set.threshold())]) {
            k.add_share(crypto, [7; 48], &share_for(crypto, c, &offer, [7; 48], seed)).expect("share");
        }
        k
    }

    /// The attack: the parent unseals a copy of a member from an older stored blob (its
    /// `state.previous`, from before a revocation was committed), or from a fork of the blob
    /// a member serves. Unsealed as a member, the copy releases, exports and forwards nothing
    /// until a serving member confirms it: then it takes the newest generation, and a fork or
    /// another state is refused with nothing changed.
    #[test]
    fn a_member_unsealed_by_custodians_waits_for_a_serving_member_and_never_serves_an_older_state() {
        let (crypto, cs, set, mut v, g1, custody) = serving(2, 3);
        let at = |blob: &[u8]| -> (Vec<u8>, Custody) { (blob.to_vec(), custody.clone()) };
        // A single KRE and a cold start serve at once; a member waits.
        for (mode, phase) in [
            (UnsealMode::Plain, Phase::Serving),
            (UnsealMode::ColdStart, Phase::Serving),
            (UnsealMode::AwaitMember, Phase::Confirming),
        ] {
            assert_eq!(unsealed_as(crypto, &cs, &set, (&g1, &custody), mode).phase(), phase, "{mode:?}");
        }
        assert_eq!((Phase::Confirming.as_str(), Phase::Confirming.code()), ("confirming", 4));

        // The same generation and blob as the serving member: confirmed.
        let mut k = unsealed_as(crypto, &cs, &set, (&g1, &custody), UnsealMode::AwaitMember);
        assert_eq!(k.confirm(crypto, v.forwardable().expect("fwd"), &g1), Ok(1));
        assert_eq!(k.phase(), Phase::Serving);
        assert!(matches!(k.confirm(crypto, v.forwardable().expect("fwd"), &g1), Err(VaultError::WrongPhase { .. })));

        // A fork of generation 1 (the same key, other content), unsealed as a member: refused.
        let mut fork_state = v.committed_state_for_test();
        fork_state.clusters.remove(&id("a"));
        let forked = v.seal_for_test(crypto, &fork_state);
        let mut f = unsealed_as(crypto, &cs, &set, (&forked, &custody), UnsealMode::AwaitMember);
        assert_eq!(f.confirm(crypto, v.forwardable().expect("fwd"), &g1), Err(VaultError::AdoptFork { generation: 1 }));
        assert_eq!(f.phase(), Phase::Confirming);

        // The serving member commits generation 2 (a rotation; a revocation alike).
        v.rotate_to(&id("a"), 2, 0, &mut rng(70)).expect("rotate");
        let e = v.export(crypto, &mut rng(71)).expect("export").expect("a change").clone();
        v.commit(e.generation, &e.blob_sha384).expect("commit");
        let g2 = e.blob;

        // The copy unsealed from generation 1: confirming, it releases, stores and forwards
        // nothing of it (the release path refuses any phase but serving).
        let (old_blob, old_custody) = at(&g1);
        let mut x = unsealed_as(crypto, &cs, &set, (&old_blob, &old_custody), UnsealMode::AwaitMember);
        assert_eq!(x.phase(), Phase::Confirming);
        x.ensure_clusters(&[id("z")], &mut rng(72)).expect("a change");
        assert!(x.export(crypto, &mut rng(73)).expect("step").is_none(), "nothing of it is stored");
        assert!(matches!(x.forwardable(), Err(VaultError::WrongPhase { .. })), "nothing of it is forwarded");
        let new_set = set.clone();
        assert!(
            matches!(x.start_reshare(crypto, new_set, &[], &mut rng(75)), Err(VaultError::WrongPhase { .. })),
            "no reshare of a state that may be old"
        );
        // A vouched generation with another blob than the one the parent hands over: refused.
        assert_eq!(x.confirm(crypto, v.forwardable().expect("fwd"), &g1), Err(VaultError::JoinBlobMismatch));
        // Another state key (another deployment's member): refused.
        let other = Forwardable { state_key: Secret::new([9; 32]), ..v.forwardable().expect("fwd") };
        assert_eq!(x.confirm(crypto, other, &g2), Err(VaultError::ConfirmKeyMismatch));
        assert_eq!((x.phase(), x.committed_generation()), (Phase::Confirming, 1), "nothing changed");
        // The serving member's generation 2: adopted, and only then served.
        assert_eq!(x.confirm(crypto, v.forwardable().expect("fwd"), &g2), Ok(2));
        assert_eq!((x.phase(), x.committed_generation()), (Phase::Serving, 2));
        let keys =
            |v: &Vault| v.releasable(&id("a")).iter().map(|(n, _, k)| (*n, k.expose().to_vec())).collect::<Vec<_>>();
        assert_eq!(keys(&x), keys(&v), "the copy releases the serving member's KEKs");
        // A plain unseal (a single KRE, decided on the policy at load) is decided again once
        // the policy reached the recorded head: with several members named by then, it waits.
        let mut p = unsealed_as(crypto, &cs, &set, (&g1, &custody), UnsealMode::Plain);
        assert!(p.plain_unseal_pending());
        p.ensure_clusters(&[id("y")], &mut rng(76)).expect("a change");
        assert!(p.export(crypto, &mut rng(77)).expect("export").is_some());
        assert!(p.settle_plain_unseal(3), "several members: it waits");
        assert_eq!((p.phase(), p.pending_generation()), (Phase::Confirming, None), "the export dropped");
        assert!(!p.plain_unseal_pending() && !p.settle_plain_unseal(3), "decided once");
        let mut single = unsealed_as(crypto, &cs, &set, (&g1, &custody), UnsealMode::Plain);
        assert!(!single.settle_plain_unseal(1));
        assert_eq!(single.phase(), Phase::Serving);
        assert!(!single.settle_plain_unseal(3), "a single KRE that grows later keeps serving");
        assert_eq!(single.phase(), Phase::Serving);
        assert!(!x.plain_unseal_pending(), "only a plain unseal is decided again");

        // Its own change while confirming was made on the old state and is dropped with it
        // (the KRE's after-unseal step adds again what its policy names, after generation 2).
        assert!(x.export(crypto, &mut rng(74)).expect("step").is_none());
    }

    #[test]
    fn genesis_commit_restart_unseal_gives_the_same_keks_on_every_backend() {
        for crypto in all_backends() {
            let (cs, set) = setup(crypto, 2, 3);
            let (v, blob, custody) = genesis(crypto, &set);
            let before = v.releasable(&id("a"));
            assert_eq!(before.len(), 1);
            // Restart.
            let mut k = Vault::new(set.clone());
            assert!(k.releasable(&id("a")).is_empty());
            assert_eq!(k.load(crypto, blob, custody, &mut rng(2)), Ok(1));
            let offer = k.offer().expect("offer");
            let out = k.add_share(crypto, [1; 48], &share_for(crypto, &cs[2], &offer, [1; 48], 7)).expect("share");
            assert_eq!(out, UnsealOutcome::NeedMore { have: 1, need: 2 });
            assert!(k.releasable(&id("a")).is_empty(), "one share unseals nothing");
            let out = k.add_share(crypto, [2; 48], &share_for(crypto, &cs[0], &offer, [2; 48], 8)).expect("share");
            assert_eq!(out, UnsealOutcome::Serving { generation: 1 });
            let after = k.releasable(&id("a"));
            assert_eq!(after[0].0, before[0].0);
            assert_eq!(after[0].2, before[0].2, "{}", crypto.name());
            assert_eq!(k.policy_floor(), Some((1, [9; 48])));
        }
    }

    /// Each export records the audit head noted last; a new head alone makes no generation;
    /// an export keeps the head it was made with; the unsealed state gives the head back.
    #[test]
    fn each_export_records_the_noted_audit_head_and_the_unsealed_state_names_it() {
        let crypto = keygate_attestation::crypto::default_backend();
        let (cs, set) = setup(crypto, 2, 3);
        let head = |seq: u64| AuditHead { chain_id: [0xc1; 48], seq, digest: [u8::try_from(seq).expect("small"); 48] };
        let mut v = Vault::new(set.clone());
        v.note_audit_head(head(3));
        let e = v.genesis(crypto, &[id("a")], None, &[], &mut rng(1), &mut attest_ok).expect("genesis");
        assert_eq!(e.state.audit_head, Some(head(3)));
        let sha = e.blob_sha384;
        v.commit(1, &sha).expect("commit");
        assert_eq!(v.committed_audit_head(), Some(head(3)));
        v.note_audit_head(head(9));
        assert!(v.export(crypto, &mut rng(2)).expect("export").is_none(), "a head alone is no new generation");
        v.ensure_clusters(&[id("b")], &mut rng(3)).expect("cluster");
        let e = v.export(crypto, &mut rng(4)).expect("export").expect("generation 2").clone();
        assert_eq!(e.state.audit_head, Some(head(9)));
        v.note_audit_head(head(12));
        let again = v.export(crypto, &mut rng(5)).expect("export").expect("still generation 2");
        assert_eq!((again.generation, again.state.audit_head), (2, Some(head(9))), "an export is fixed");
        v.commit(2, &e.blob_sha384).expect("commit");
        // Restart from generation 2.
        let mut k = Vault::new(set.clone());
        k.load(crypto, e.blob.clone(), v.custody().expect("custody").clone(), &mut rng(6)).expect("load");
        assert_eq!(k.committed_audit_head(), None, "nothing before the unseal");
        let offer = k.offer().expect("offer");
        k.add_share(crypto, [1; 48], &share_for(crypto, &cs[0], &offer, [1; 48], 7)).expect("share");
        let out = k.add_share(crypto, [2; 48], &share_for(crypto, &cs[1], &offer, [2; 48], 8)).expect("share");
        assert_eq!(out, UnsealOutcome::Serving { generation: 2 });
        assert_eq!(k.committed_audit_head(), Some(head(9)));
    }

    #[test]
    fn unseal_refusals() {
        let (crypto, cs, set, _, blob, custody) = serving(2, 3);
        let mut k = Vault::new(set.clone());
        k.load(crypto, blob.clone(), custody.clone(), &mut rng(2)).expect("load");
        let offer = k.offer().expect("offer");
        // A share bound to another connection's attestation.
        let s = share_for(crypto, &cs[0], &offer, [1; 48], 7);
        assert_eq!(k.add_share(crypto, [2; 48], &s), Err(VaultError::Custody(CustodyError::UnsealShareDecrypt)));
        // The same custodian twice.
        k.add_share(crypto, [1; 48], &s).expect("first");
        let again = share_for(crypto, &cs[0], &offer, [3; 48], 9);
        assert_eq!(
            k.add_share(crypto, [3; 48], &again),
            Err(VaultError::Custody(CustodyError::DuplicateShare { x: 1 }))
        );
        // A non-custodian.
        let (outsiders, _) = setup(crypto, 1, 4);
        let shares = SharesFile::decode(crypto, &offer.custody.shares).expect("shares");
        let ctx = UnsealContext {
            kre_attestation_sha384: [4; 48],
            unseal_nonce: offer.unseal_nonce,
            kre_public: offer.kre_public,
            set_digest: offer.set_digest,
            generation: offer.generation,
            blob_sha384: offer.blob_sha384,
        };
        assert!(custody::custodian_reencrypt(crypto, &shares, &outsiders[3].scalar, &ctx, &mut rng(3)).is_err());
        // A share from an earlier session (another K and nonce) is refused.
        let mut k2 = Vault::new(set.clone());
        k2.load(crypto, blob.clone(), custody.clone(), &mut rng(5)).expect("load");
        let old = share_for(crypto, &cs[1], &offer, [5; 48], 4);
        assert!(k2.add_share(crypto, [5; 48], &old).is_err(), "replayed share from another session");
        // A tampered blob is refused before unsealing (digest) ...
        let mut bad = blob.clone();
        bad[super::sealed::HEADER_LEN + 3] ^= 1;
        let mut k3 = Vault::new(set.clone());
        assert_eq!(
            k3.load(crypto, bad, custody.clone(), &mut rng(6)),
            Err(VaultError::Sealed(SealedError::DigestMismatch))
        );
        // ... and a re-digested tampered blob does not open.
        let mut bad = blob.clone();
        bad[super::sealed::HEADER_LEN + 3] ^= 1;
        let n = bad.len() - 48;
        let d = Sha384::digest(&bad[..n]);
        bad[n..].copy_from_slice(&d);
        k3.load(crypto, bad, custody.clone(), &mut rng(6)).expect("loads: digest recomputed");
        let o3 = k3.offer().expect("offer");
        k3.add_share(crypto, [1; 48], &share_for(crypto, &cs[0], &o3, [1; 48], 1)).expect("one");
        assert_eq!(
            k3.add_share(crypto, [2; 48], &share_for(crypto, &cs[1], &o3, [2; 48], 2)),
            Err(VaultError::StateDoesNotOpen)
        );
        assert_eq!(k3.phase(), Phase::Unsealing);
        // A state for another custodian set.
        let (_, other_set) = setup(crypto, 1, 2);
        let mut k4 = Vault::new(other_set);
        assert_eq!(k4.load(crypto, blob, custody, &mut rng(6)), Err(VaultError::StateSetMismatch));
    }

    #[test]
    fn changes_are_used_only_after_commit_and_exports_are_fixed() {
        let (crypto, _, _, mut v, _, _) = serving(1, 1);
        let mut r = rng(3);
        assert!(v.export(crypto, &mut r).expect("export").is_none(), "nothing to export");
        assert_eq!(v.ensure_clusters(&[id("a"), id("c")], &mut r), Ok(vec![id("c")]));
        assert!(v.releasable(&id("c")).is_empty());
        let (g, sha) = {
            let e = v.export(crypto, &mut r).expect("export").expect("some");
            (e.generation, e.blob_sha384)
        };
        assert_eq!(g, 2);
        // A change after the export waits for the next generation; the export is fixed.
        assert_eq!(v.rotate_to(&id("a"), 2, 0, &mut r), Ok(Some(2)));
        let again = v.export(crypto, &mut r).expect("export").expect("some");
        assert_eq!((again.generation, again.blob_sha384), (2, sha));
        assert_eq!(v.commit(2, &[0; 48]), Err(VaultError::CommitMismatch { got: 2, exported: 2 }));
        assert_eq!(v.commit(3, &sha), Err(VaultError::CommitMismatch { got: 3, exported: 2 }));
        assert_eq!(v.commit(2, &sha), Ok(2));
        assert_eq!(v.commit(2, &sha), Ok(2), "a repeated commit is acknowledged");
        assert_eq!(v.releasable(&id("c")).len(), 1);
        assert_eq!(v.releasable(&id("a")).len(), 1, "the rotation is not committed yet");
        let e = v.export(crypto, &mut r).expect("export").expect("some");
        let (g, sha) = (e.generation, e.blob_sha384);
        assert_eq!(g, 3);
        v.commit(3, &sha).expect("commit");
        let a = v.releasable(&id("a"));
        assert_eq!(
            a.iter().map(|(v, s, _)| (*v, *s)).collect::<Vec<_>>(),
            [(2, KekStatus::Current), (1, KekStatus::Active)]
        );
        // Retire version 1.
        assert_eq!(v.rotate_to(&id("a"), 2, 2, &mut r), Ok(None));
        let e = v.export(crypto, &mut r).expect("export").expect("some");
        let sha = e.blob_sha384;
        v.commit(4, &sha).expect("commit");
        assert_eq!(v.releasable(&id("a")).len(), 1);
        assert_eq!(v.committed_versions()[0].1, vec![(1, KekStatus::Retired), (2, KekStatus::Current)]);
    }

    #[test]
    fn a_reshare_needs_shares_of_the_key_in_use() {
        let (crypto, cs, set, mut v, _, custody) = serving(2, 3);
        let (_, new_set) = setup(crypto, 1, 2);
        let mut r = rng(9);
        v.start_reshare(crypto, new_set.clone(), &[], &mut r).expect("start");
        let offer = v.offer().expect("offer");
        assert_eq!(offer.reshare_to.as_ref(), Some(&new_set));
        // Shares of another state key for the same set (custodians cooperating with a forger,
        // or a stale shares file): each opens, but together they do not give the key in use.
        let forged = SharesFile::create(crypto, set.clone(), &Secret::new([5; 32]), &mut rng(3)).expect("forged");
        let forged_offer =
            UnsealOffer { custody: Custody { shares: forged.encode(), genesis_attestation: vec![] }, ..offer.clone() };
        let mut attest = |_: &[u8; 48]| Ok(b"att".to_vec());
        // The shares file in use (format 2) commits to each share: a forged one is refused as
        // it arrives, and the session goes on.
        let s0 = share_for(crypto, &cs[0], &forged_offer, [1; 48], 1);
        assert_eq!(
            v.add_reshare_share(crypto, [1; 48], &s0, &mut r, &mut attest),
            Err(VaultError::Custody(CustodyError::ShareCommitmentMismatch { x: 1 }))
        );
        assert_eq!(v.reshare_status().map(|(_, have)| have), Some(0));
        // With a format-1 shares file (no commitments) each forged share opens, but together
        // they do not give the key in use.
        let mut old = v.clone();
        if let Inner::Serving(s) = &mut old.inner {
            s.custody.shares = format_1(&custody.shares, 3);
        }
        old.start_reshare(crypto, new_set.clone(), &[], &mut r).expect("start");
        let forged_offer = UnsealOffer {
            custody: Custody { shares: forged.encode(), genesis_attestation: vec![] },
            ..old.offer().expect("offer")
        };
        let s0 = share_for(crypto, &cs[0], &forged_offer, [1; 48], 1);
        assert_eq!(old.add_reshare_share(crypto, [1; 48], &s0, &mut r, &mut attest), Ok((1, 2, false)));
        let s1 = share_for(crypto, &cs[1], &forged_offer, [2; 48], 2);
        assert_eq!(
            old.add_reshare_share(crypto, [2; 48], &s1, &mut r, &mut attest),
            Err(VaultError::ReshareNotAuthorized)
        );
        assert!(old.reshare_status().is_none(), "the session ends");
        assert_eq!(old.set(), &set, "nothing changed");
        assert!(old.export(crypto, &mut r).expect("export").is_none(), "nothing to store");
        // With the real shares it goes through; the next export is sealed for the new set.
        v.start_reshare(crypto, new_set.clone(), &[], &mut r).expect("start again");
        let offer = v.offer().expect("offer");
        assert_eq!(offer.custody, custody);
        let s0 = share_for(crypto, &cs[0], &offer, [3; 48], 3);
        v.add_reshare_share(crypto, [3; 48], &s0, &mut r, &mut attest).expect("one");
        let s2 = share_for(crypto, &cs[2], &offer, [4; 48], 4);
        assert_eq!(v.add_reshare_share(crypto, [4; 48], &s2, &mut r, &mut attest), Ok((2, 2, true)));
        assert_eq!(v.set(), &new_set);
        let e = v.export(crypto, &mut r).expect("export").expect("some").clone();
        assert_eq!(sealed::peek_header(&e.blob).expect("header").custodian_set_digest, new_set.digest());
        assert!(matches!(v.start_reshare(crypto, set, &[], &mut r), Err(VaultError::ExportOutstanding)));
        v.commit(e.generation, &e.blob_sha384).expect("commit");
        assert_ne!(v.custody().expect("custody"), &custody, "a new shares file");
    }

    #[test]
    fn phases_name_themselves_and_errors_say_where_the_kre_is() {
        assert_eq!(
            [Phase::Awaiting, Phase::Unsealing, Phase::Serving].map(|p| (p.as_str(), p.code())),
            [("awaiting_state", 1), ("unsealing", 2), ("serving", 3)]
        );
        let e = VaultError::WrongPhase { phase: Phase::Awaiting, step: "an unseal offer", needs: "unsealing" };
        assert_eq!(e.to_string(), "the KRE is awaiting_state; an unseal offer needs it unsealing");
        let (crypto, _, set, v, _, _) = serving(1, 1);
        let dbg = format!("{v:?}");
        assert!(dbg.contains("Serving") && dbg.contains("committed_generation: 1"), "{dbg}");
        let mut w = Vault::new(set);
        let mut r = rng(2);
        let e = w.genesis(crypto, &[id("a")], None, &[], &mut r, &mut attest_ok).expect("genesis");
        let dbg = format!("{e:?}");
        assert!(dbg.contains("generation: 1") && dbg.contains("len:"), "{dbg}");
    }

    #[test]
    fn custodian_sets_encode_and_refuse_bad_lengths() {
        let crypto = keygate_attestation::crypto::default_backend();
        let (_, set) = setup(crypto, 2, 3);
        let b = encode_set(&set);
        assert_eq!(b.len(), 2 + 3 * 97);
        assert_eq!(decode_set(crypto, &b), Ok(set));
        assert_eq!(decode_set(crypto, &b[..b.len() - 1]), Err(CustodyError::Truncated));
        assert_eq!(decode_set(crypto, &[&b[..], &[0]].concat()), Err(CustodyError::TrailingBytes));
        assert_eq!(decode_set(crypto, &b[..1]), Err(CustodyError::Truncated));
        assert_eq!(decode_set(crypto, &[]), Err(CustodyError::Truncated));
        assert_eq!(decode_set(crypto, &[1, 0]), Err(CustodyError::NoCustodians));
    }

    #[test]
    fn size_limits_hold_at_their_boundaries() {
        let crypto = keygate_attestation::crypto::default_backend();
        // 32 custodians: the shares file (9,372 bytes) fits the 10 KiB limit.
        let (_, big) = setup(crypto, 17, 32);
        let mut v = Vault::new(big);
        let mut r = rng(5);
        let e = v.genesis(crypto, &[id("a")], None, &[], &mut r, &mut attest_ok).expect("32 custodians");
        assert_eq!(e.generation, 1);
        assert_eq!(v.custody().expect("custody").shares.len(), 9372);
        // A blob of exactly the limit is not refused for its size (it is not a sealed state).
        let (_, set) = setup(crypto, 1, 1);
        let mut w = Vault::new(set.clone());
        let none = Custody { shares: vec![], genesis_attestation: vec![] };
        assert_eq!(
            w.load(crypto, vec![0; MAX_STATE_BLOB], none.clone(), &mut r),
            Err(VaultError::Sealed(SealedError::BadMagic))
        );
        assert!(matches!(
            w.load(crypto, vec![0; MAX_STATE_BLOB + 1], none, &mut r),
            Err(VaultError::TooLarge { what: "sealed state", .. })
        ));
        // The sealed state limit (40 KiB): 850 clusters fit, 1,000 do not (a typed refusal).
        let (mut s, _, _) = genesis(crypto, &set);
        let many: Vec<Id> = (0..850).map(|i| id(&format!("c{i:04}"))).collect();
        s.ensure_clusters(&many, &mut r).expect("add");
        let e = s.export(crypto, &mut r).expect("850 clusters fit").expect("some").clone();
        assert!(e.blob.len() > 30_000 && e.blob.len() <= MAX_STATE_BLOB, "{}", e.blob.len());
        s.commit(e.generation, &e.blob_sha384).expect("commit");
        let more: Vec<Id> = (850..1000).map(|i| id(&format!("c{i:04}"))).collect();
        s.ensure_clusters(&more, &mut r).expect("add");
        assert!(matches!(s.export(crypto, &mut r), Err(VaultError::TooLarge { what: "sealed state", .. })));
    }

    #[test]
    fn shares_accepted_counts_the_unseal_session() {
        let (crypto, cs, set, _, blob, custody) = serving(2, 3);
        let mut k = Vault::new(set);
        assert_eq!(k.shares_accepted(), 0);
        k.load(crypto, blob, custody, &mut rng(2)).expect("load");
        let offer = k.offer().expect("offer");
        k.add_share(crypto, [1; 48], &share_for(crypto, &cs[1], &offer, [1; 48], 3)).expect("share");
        assert_eq!(k.shares_accepted(), 1);
        k.add_share(crypto, [2; 48], &share_for(crypto, &cs[2], &offer, [2; 48], 4)).expect("share");
        assert_eq!((k.phase(), k.shares_accepted()), (Phase::Serving, 0));
    }

    /// One key, one purpose: a custodian key that is also a policy approver is refused at
    /// genesis (the configured set) and at a reshare (the new set), each by its position.
    #[test]
    fn a_custodian_that_is_also_an_approver_is_refused_at_genesis_and_at_reshare() {
        let crypto = keygate_attestation::crypto::default_backend();
        let (_, set) = setup(crypto, 2, 3);
        let approver: PublicKey = p384_scalar_from(crypto, rng(60)).expect("key").1.try_into().expect("point");
        let mut v = Vault::new(set.clone());
        let mut r = rng(1);
        assert_eq!(
            v.genesis(crypto, &[id("a")], None, &[approver, set.keys()[2]], &mut r, &mut attest_ok).map(|_| ()),
            Err(VaultError::CustodianIsApprover { index: 2 })
        );
        assert_eq!(v.phase(), Phase::Awaiting, "nothing was made");
        v.genesis(crypto, &[id("a")], None, &[approver], &mut r, &mut attest_ok).expect("other approvers are fine");

        let (_, _, _, mut v, _, _) = serving(2, 3);
        let (_, new_set) = setup(crypto, 1, 2);
        let mut r = rng(9);
        assert_eq!(
            v.start_reshare(crypto, new_set.clone(), &[new_set.keys()[0]], &mut r),
            Err(VaultError::CustodianIsApprover { index: 0 })
        );
        assert!(v.reshare_status().is_none());
        v.start_reshare(crypto, new_set, &[approver], &mut r).expect("other approvers are fine");
    }

    /// The offer names the exact blob: two blobs of one generation (a fork) give two offers,
    /// and a share made for one does not count for a KRE that holds the other.
    #[test]
    fn an_unseal_is_bound_to_the_exact_blob_not_only_its_generation() {
        let (crypto, cs, set, mut v, blob1, custody) = serving(2, 3);
        let mut r = rng(4);
        v.rotate_to(&id("a"), 2, 0, &mut r).expect("rotate");
        let a = v.export(crypto, &mut r).expect("export").expect("a").clone();
        // The same state sealed again at the same generation (a restart from generation 1).
        let b = {
            let Inner::Serving(s) = &v.inner else { panic!("serving") };
            sealed::seal(&a.state, &s.state_key, &set.digest(), &mut r, crypto).expect("seal")
        };
        assert_eq!(sealed::peek_header(&b).expect("b").generation, a.generation);
        assert_ne!(b, a.blob);
        let mut ka = Vault::new(set.clone());
        ka.load(crypto, a.blob.clone(), custody.clone(), &mut rng(5)).expect("load a");
        let offer_a = ka.offer().expect("offer");
        assert_eq!(offer_a.blob_sha384, a.blob_sha384);
        let mut kb = Vault::new(set.clone());
        kb.load(crypto, b.clone(), custody.clone(), &mut rng(5)).expect("load b");
        let offer_b = kb.offer().expect("offer");
        assert_eq!(offer_b.blob_sha384, <[u8; 48]>::from(Sha384::digest(&b)));
        // Same boot randomness, same generation: only the blob differs, and the share for A
        // does not open for B.
        assert_eq!((offer_a.unseal_nonce, offer_a.generation), (offer_b.unseal_nonce, offer_b.generation));
        let share = share_for(crypto, &cs[0], &offer_a, [1; 48], 3);
        assert_eq!(kb.add_share(crypto, [1; 48], &share), Err(VaultError::Custody(CustodyError::UnsealShareDecrypt)));
        assert_eq!(ka.add_share(crypto, [1; 48], &share), Ok(UnsealOutcome::NeedMore { have: 1, need: 2 }));
        // A reshare offer names the committed blob.
        v.commit(a.generation, &a.blob_sha384).expect("commit");
        let (_, new_set) = setup(crypto, 1, 2);
        v.start_reshare(crypto, new_set, &[], &mut r).expect("start");
        assert_eq!(v.offer().expect("offer").blob_sha384, a.blob_sha384);
        assert_ne!(a.blob_sha384, <[u8; 48]>::from(Sha384::digest(&blob1)));
    }

    /// A KEK vector never grows in place: a rotation rebuilds it at its final size.
    #[test]
    fn a_rotation_rebuilds_the_kek_vector_at_its_final_size() {
        let (_, _, _, mut v, _, _) = serving(1, 1);
        let mut r = rng(8);
        v.rotate_to(&id("a"), 5, 0, &mut r).expect("rotate");
        let Inner::Serving(s) = &v.inner else { panic!("serving") };
        let entries = &s.working.clusters[&id("a")];
        assert_eq!((entries.len(), entries.capacity()), (5, 5));
        let mut grown = entries.clone();
        reserve_kek_entries(&mut grown, 0);
        assert_eq!(grown.capacity(), 5);
        reserve_kek_entries(&mut grown, 2);
        assert_eq!((grown.len(), grown.capacity()), (5, 7));
        assert_eq!(&grown, entries);
    }

    #[test]
    fn the_policy_head_only_moves_forward_and_is_sealed() {
        let (crypto, _, _, mut v, _, _) = serving(1, 1);
        let mut r = rng(6);
        let key = {
            let Inner::Serving(s) = &v.inner else { panic!("serving") };
            s.state_key.clone()
        };
        v.set_policy_head((2, [2; 48]));
        let e = v.export(crypto, &mut r).expect("export").expect("a new head is a change").clone();
        assert_eq!(sealed::open(&e.blob, &key, crypto).expect("open").policy_head, Some((2, [2; 48])));
        v.commit(e.generation, &e.blob_sha384).expect("commit");
        v.set_policy_head((1, [1; 48]));
        v.set_policy_head((2, [9; 48]));
        assert!(v.export(crypto, &mut r).expect("export").is_none(), "an older or equal head changes nothing");
        assert_eq!(v.commit(e.generation, &[0; 48]), Ok(e.generation), "a repeated commit is acknowledged");
        assert_eq!(v.commit(e.generation + 3, &[0; 48]), Err(VaultError::NothingExported));
    }

    #[test]
    fn reshare_waits_for_outstanding_exports_and_reports_its_progress() {
        let crypto = keygate_attestation::crypto::default_backend();
        let (_, set) = setup(crypto, 1, 1);
        let (_, new_set) = setup(crypto, 1, 2);
        let (mut v, _, _) = genesis(crypto, &set);
        let mut r = rng(7);
        v.ensure_clusters(&[id("z")], &mut r).expect("add");
        let e = v.export(crypto, &mut r).expect("export").expect("some").clone();
        assert_eq!(v.start_reshare(crypto, new_set.clone(), &[], &mut r), Err(VaultError::ExportOutstanding));
        v.commit(e.generation, &e.blob_sha384).expect("commit");
        assert!(v.reshare_status().is_none());
        v.start_reshare(crypto, new_set.clone(), &[], &mut r).expect("start");
        assert_eq!(v.reshare_status().map(|(s, n)| (s.clone(), n)), Some((new_set, 0)));
    }

    /// Activation times are sealed with the state, bound to the bundle's version and digest,
    /// first record wins, and only the newest are kept.
    #[test]
    fn activation_times_are_sealed_bound_to_the_bundle_and_first_one_wins() {
        let (crypto, cs, set, mut v, _, custody) = serving(2, 3);
        let mut r = rng(15);
        v.record_activation(2, [2; 48], 5_000);
        v.record_activation(2, [2; 48], 9_000);
        assert_eq!(v.activation_of(2, &[2; 48]), Some(5_000), "a replay keeps the first time");
        assert_eq!(v.activation_of(2, &[3; 48]), None, "another bundle at that version has none");
        assert_eq!(v.activation_of(3, &[2; 48]), None, "the digest at another version has none");
        let e = v.export(crypto, &mut r).expect("export").expect("a record is a change").clone();
        v.commit(e.generation, &e.blob_sha384).expect("commit");
        let mut k = Vault::new(set);
        assert_eq!(k.activation_of(2, &[2; 48]), None, "nothing before the unseal");
        k.load(crypto, e.blob, custody, &mut rng(16)).expect("load");
        let offer = k.offer().expect("offer");
        k.add_share(crypto, [1; 48], &share_for(crypto, &cs[0], &offer, [1; 48], 17)).expect("share");
        k.add_share(crypto, [2; 48], &share_for(crypto, &cs[1], &offer, [2; 48], 18)).expect("share");
        assert_eq!(k.activation_of(2, &[2; 48]), Some(5_000), "restored from the sealed state");
        // A fork at version 2 replaces the record; the newest MAX_ACTIVATIONS are kept.
        k.record_activation(2, [7; 48], 6_000);
        assert_eq!((k.activation_of(2, &[2; 48]), k.activation_of(2, &[7; 48])), (None, Some(6_000)));
        for n in 3..=40u64 {
            k.record_activation(n, [8; 48], n);
        }
        assert_eq!(k.activation_of(2, &[7; 48]), None);
        assert_eq!(k.activation_of(40 - 15, &[8; 48]), Some(25));
        assert_eq!(k.activation_of(40 - 16, &[8; 48]), None);
        let e = k.export(crypto, &mut r).expect("export").expect("some").clone();
        assert!(e.blob.len() < MAX_STATE_BLOB);
    }

    #[test]
    fn retirement_keeps_the_boundary_version_and_the_current_one() {
        let (crypto, _, _, mut v, _, _) = serving(1, 1);
        let mut r = rng(8);
        v.rotate_to(&id("a"), 3, 2, &mut r).expect("rotate and retire");
        let e = v.export(crypto, &mut r).expect("export").expect("some").clone();
        v.commit(e.generation, &e.blob_sha384).expect("commit");
        assert_eq!(
            v.committed_versions()[0].1,
            vec![(1, KekStatus::Retired), (2, KekStatus::Active), (3, KekStatus::Current)]
        );
    }

    #[test]
    fn nothing_exported_holds_the_state_key_or_a_kek() {
        let (crypto, _, _, mut v, blob, custody) = serving(2, 3);
        let mut r = rng(4);
        v.rotate_to(&id("a"), 3, 0, &mut r).expect("rotate");
        let blob2 = v.export(crypto, &mut r).expect("export").expect("some").blob.clone();
        let Inner::Serving(s) = &v.inner else { panic!("serving") };
        let mut secrets: Vec<Vec<u8>> = vec![s.state_key.expose().to_vec()];
        for entries in s.working.clusters.values() {
            secrets.extend(entries.iter().map(|e| e.kek.expose().to_vec()));
        }
        assert_eq!(secrets.len(), 1 + 3 + 1);
        for out in [&blob, &blob2, &custody.shares, &custody.genesis_attestation] {
            for sec in &secrets {
                assert!(!out.windows(32).any(|w| w == sec.as_slice()), "secret bytes in an export");
            }
        }
        assert!(!format!("{v:?}").contains(&hex::encode(s.state_key.expose())));
    }

    #[test]
    fn phases_refuse_out_of_order_steps() {
        let crypto = keygate_attestation::crypto::default_backend();
        let (_, set) = setup(crypto, 1, 1);
        let mut v = Vault::new(set.clone());
        let mut r = rng(3);
        assert!(matches!(v.offer(), Err(VaultError::WrongPhase { phase: Phase::Awaiting, .. })));
        assert!(matches!(v.commit(1, &[0; 48]), Err(VaultError::WrongPhase { .. })));
        assert!(v.releasable(&id("a")).is_empty());
        let (mut s, blob, custody) = genesis(crypto, &set);
        assert!(matches!(
            s.genesis(crypto, &[], None, &[], &mut r, &mut attest_ok),
            Err(VaultError::WrongPhase { phase: Phase::Serving, .. })
        ));
        assert!(matches!(s.load(crypto, blob.clone(), custody.clone(), &mut r), Err(VaultError::WrongPhase { .. })));
        v.load(crypto, blob, custody, &mut r).expect("load");
        assert!(matches!(
            v.genesis(crypto, &[], None, &[], &mut r, &mut attest_ok),
            Err(VaultError::WrongPhase { phase: Phase::Unsealing, .. })
        ));
        assert!(matches!(
            v.load(
                crypto,
                vec![0; MAX_STATE_BLOB + 1],
                Custody { shares: vec![], genesis_attestation: vec![] },
                &mut r
            ),
            Err(VaultError::TooLarge { .. })
        ));
    }
}

/// What a serving member forwards to a joining one (`docs/cluster.md`): the state key and the
/// committed generation it opens. Never printed.
#[derive(Clone)]
pub struct Forwardable {
    /// The state key.
    pub state_key: Secret<32>,
    /// The committed generation.
    pub generation: u64,
    /// SHA-384 of its blob.
    pub blob_sha384: [u8; 48],
    /// The policy head it carries.
    pub policy_head: Option<PolicyHead>,
}

impl std::fmt::Debug for Forwardable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwardable").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl Vault {
    /// The committed state a serving member may forward: only while serving, after a commit,
    /// and not while a reshare's new state key waits for its first commit (the committed blob
    /// is still sealed under the old key).
    pub fn forwardable(&self) -> Result<Forwardable, VaultError> {
        let Inner::Serving(s) = &self.inner else {
            return Err(self.wrong("forwarding the state key", "serving"));
        };
        if s.unconfirmed {
            return Err(self.wrong("forwarding the state key", "serving"));
        }
        let blob_sha384 = s.committed_sha384;
        if s.resealed || s.committed.generation == 0 {
            return Err(VaultError::NothingToForward);
        }
        Ok(Forwardable {
            state_key: s.state_key.clone(),
            generation: s.committed.generation,
            blob_sha384,
            policy_head: s.committed.policy_head,
        })
    }

    /// A joining member's entry to serving: the state key a serving member forwarded (after
    /// every check of the join, `crate::kre::joiner`), with the generation, blob digest and
    /// policy head it vouched for, and the stored blob and custody the parent hands over.
    /// Serves exactly that generation, only if the blob's digest is the one vouched for, it is
    /// for this KRE's custodian set, the key opens it, and it holds the vouched generation and
    /// policy head. Awaiting state or unsealing (an unseal session in progress is abandoned).
    pub fn join(
        &mut self,
        crypto: &dyn Crypto,
        forwarded: Forwardable,
        blob: Vec<u8>,
        custody: Custody,
    ) -> Result<u64, VaultError> {
        if matches!(self.inner, Inner::Serving(_)) {
            return Err(self.wrong("a join", "awaiting state or unsealing"));
        }
        check_len("sealed state", &blob, MAX_STATE_BLOB)?;
        check_len("shares file", &custody.shares, MAX_SHARES_FILE)?;
        check_len("genesis attestation", &custody.genesis_attestation, MAX_GENESIS_ATTESTATION)?;
        let digest: [u8; 48] = Sha384::digest(&blob).into();
        if digest != forwarded.blob_sha384 {
            return Err(VaultError::JoinBlobMismatch);
        }
        let header = sealed::peek_header(&blob)?;
        if header.custodian_set_digest != self.set.digest() {
            return Err(VaultError::StateSetMismatch);
        }
        if SharesFile::decode(crypto, &custody.shares)?.set() != &self.set {
            return Err(VaultError::SharesSetMismatch);
        }
        let state = sealed::open(&blob, &forwarded.state_key, crypto).map_err(|e| match e {
            SealedError::Decrypt => VaultError::StateDoesNotOpen,
            other => VaultError::Sealed(other),
        })?;
        if state.generation != forwarded.generation || state.policy_head != forwarded.policy_head {
            return Err(VaultError::JoinStateMismatch);
        }
        let generation = state.generation;
        self.floor = state.policy_head;
        self.inner = Inner::Serving(Box::new(Serving {
            state_key: forwarded.state_key,
            custody,
            committed: state.clone(),
            committed_sha384: digest,
            working: state,
            exported: None,
            reshare: None,
            resealed: false,
            unconfirmed: false,
            plain_unseal: false,
        }));
        Ok(generation)
    }
}

impl Vault {
    /// A serving member adopts a newer generation another member committed to the shared
    /// store (`docs/cluster.md`). Only while serving and not during a reshare; the blob must be
    /// for this KRE's custodian set and open under its state key; its generation must be newer
    /// than the committed one (the same generation with another digest is a fork; the same
    /// blob is acknowledged again); its policy head must not be older than (or fork) the
    /// floor and the committed head. Then it is the committed and working state, any
    /// outstanding export is dropped (it lost the race: never committed, so never used for a
    /// release), and the floor rises to its policy head. Returns the generation.
    pub fn adopt(&mut self, crypto: &dyn Crypto, blob: &[u8]) -> Result<u64, VaultError> {
        let set_digest = self.set.digest();
        let floor = self.floor;
        let Inner::Serving(s) = &mut self.inner else {
            return Err(self.wrong("an adoption", "serving"));
        };
        if s.reshare.is_some() || s.resealed {
            return Err(VaultError::AdoptDuringReshare);
        }
        check_len("sealed state", blob, MAX_STATE_BLOB)?;
        let digest: [u8; 48] = Sha384::digest(blob).into();
        let header = sealed::peek_header(blob)?;
        if header.custodian_set_digest != set_digest {
            return Err(VaultError::StateSetMismatch);
        }
        let committed = s.committed.generation;
        if header.generation == committed && digest == s.committed_sha384 {
            return Ok(committed);
        }
        if header.generation == committed {
            return Err(VaultError::AdoptFork { generation: committed });
        }
        if header.generation < committed {
            return Err(VaultError::AdoptNotNewer { offered: header.generation, committed });
        }
        let state = sealed::open(blob, &s.state_key, crypto).map_err(|e| match e {
            SealedError::Decrypt => VaultError::StateDoesNotOpen,
            other => VaultError::Sealed(other),
        })?;
        // The header is authenticated by the open, but check the opened state itself.
        if state.generation <= committed {
            return Err(VaultError::AdoptNotNewer { offered: state.generation, committed });
        }
        for known in [floor, s.committed.policy_head].into_iter().flatten() {
            if !head_not_older(state.policy_head, known) {
                return Err(VaultError::AdoptPolicyBehind);
            }
        }
        let generation = state.generation;
        s.exported = None;
        s.committed = state.clone();
        s.committed_sha384 = digest;
        s.working = state;
        if let Some(h) = s.committed.policy_head {
            if floor.is_none_or(|(v, _)| h.0 > v) {
                self.floor = Some(h);
            }
        }
        Ok(generation)
    }
}

impl Vault {
    /// Whether this KRE was unsealed by custodians as a single KRE and that decision has not
    /// yet been checked against the policy the state recorded ([`Self::settle_plain_unseal`]).
    pub fn plain_unseal_pending(&self) -> bool {
        matches!(&self.inner, Inner::Serving(s) if s.plain_unseal)
    }

    /// Once the replayed policy has reached the head the unsealed state recorded (the floor),
    /// the unseal is decided again on that policy: `members` in force now. A plain unseal
    /// decided on an older policy (the parent withheld the bundle that named several members)
    /// then waits for a serving member's confirmation like any member's ([`Phase::Confirming`]);
    /// an export made meanwhile is dropped (never committed, never released from). Decided
    /// once: a single KRE that grows into a cluster later keeps serving. Returns whether it
    /// now waits.
    pub fn settle_plain_unseal(&mut self, members: usize) -> bool {
        let Inner::Serving(s) = &mut self.inner else { return false };
        if !s.plain_unseal {
            return false;
        }
        s.plain_unseal = false;
        if members > 1 {
            s.unconfirmed = true;
            s.exported = None;
            return true;
        }
        false
    }

    /// A member unsealed by custodians ([`UnsealMode::AwaitMember`], [`Phase::Confirming`])
    /// takes a serving member's word that its state is the newest (`docs/cluster.md`): the
    /// state key, generation, blob digest and policy head that member vouched for (after every
    /// check of the join, `crate::kre::joiner`, whose floor already refuses an older offer),
    /// and the stored blob of that generation the parent hands over. The forwarded key must be
    /// this KRE's own (the same state). The vouched generation equal to the committed one must
    /// be the very blob unsealed (another is a fork, [`VaultError::AdoptFork`]); a newer one is
    /// adopted as [`Self::adopt`] does. Then it serves. Returns the generation.
    pub fn confirm(&mut self, crypto: &dyn Crypto, forwarded: Forwardable, blob: &[u8]) -> Result<u64, VaultError> {
        let Inner::Serving(s) = &self.inner else {
            return Err(self.wrong("a confirmation", "confirming"));
        };
        if !s.unconfirmed {
            return Err(self.wrong("a confirmation", "confirming"));
        }
        if forwarded.state_key != s.state_key {
            return Err(VaultError::ConfirmKeyMismatch);
        }
        check_len("sealed state", blob, MAX_STATE_BLOB)?;
        let digest: [u8; 48] = Sha384::digest(blob).into();
        if digest != forwarded.blob_sha384 {
            return Err(VaultError::JoinBlobMismatch);
        }
        // On a copy: a refusal half-way leaves this vault as it was.
        let mut next = self.clone();
        let generation = next.adopt(crypto, blob)?;
        let Inner::Serving(n) = &mut next.inner else {
            return Err(self.wrong("a confirmation", "confirming"));
        };
        if generation != forwarded.generation || n.committed.policy_head != forwarded.policy_head {
            return Err(VaultError::JoinStateMismatch);
        }
        n.unconfirmed = false;
        *self = next;
        Ok(generation)
    }
}

/// Whether policy head `offered` is at least `known`: a newer version, or the same bundle.
fn head_not_older(offered: Option<PolicyHead>, known: PolicyHead) -> bool {
    offered.is_some_and(|(v, d)| v > known.0 || (v == known.0 && d == known.1))
}

#[cfg(test)]
mod adopt_tests {
    use super::*;
    use crate::codec::test_id as id;
    use crate::crypto::test_rng as rng;
    use keygate_attestation::crypto::all_backends;

    fn attest_ok(_: &[u8; 48]) -> Result<Vec<u8>, keygate_attestation::NsmError> {
        Ok(b"attestation".to_vec())
    }

    fn set(crypto: &dyn Crypto) -> CustodianSet {
        let keys: Vec<PublicKey> = (0..3)
            .map(|i| {
                let (_, p) = p384_scalar_from(crypto, rng(100 + i)).expect("key");
                p.try_into().expect("point")
            })
            .collect();
        CustodianSet::new(crypto, 2, keys).expect("set")
    }

    /// Member A after genesis (generation 1 committed, policy head v1) and member B joined from
    /// it, both serving generation 1.
    fn pair(crypto: &dyn Crypto) -> (Vault, Vault, Vec<u8>) {
        let set = set(crypto);
        let mut a = Vault::new(set.clone());
        let mut r = rng(1);
        let e = a.genesis(crypto, &[id("c1")], Some((1, [1; 48])), &[], &mut r, &mut attest_ok).expect("step").clone();
        a.commit(e.generation, &e.blob_sha384).expect("step");
        let custody = a.custody().expect("step").clone();
        let mut b = Vault::new(set);
        b.join(crypto, a.forwardable().expect("step"), e.blob.clone(), custody).expect("step");
        (a, b, e.blob)
    }

    /// A adds a cluster and commits generation 2 with policy head v2; returns its blob.
    fn a_commits_2(crypto: &dyn Crypto, a: &mut Vault) -> Vec<u8> {
        a.ensure_clusters(&[id("c2")], &mut rng(2)).expect("step");
        a.set_policy_head((2, [2; 48]));
        let e = a.export(crypto, &mut rng(3)).expect("export").expect("a change").clone();
        a.commit(e.generation, &e.blob_sha384).expect("step");
        e.blob
    }

    fn kek_bytes(v: &Vault, c: &str) -> Vec<Vec<u8>> {
        v.releasable(&id(c)).iter().map(|(_, _, k)| k.expose().to_vec()).collect()
    }

    #[test]
    fn a_member_adopts_a_newer_generation_and_releases_its_keks_dropping_its_lost_export() {
        for crypto in all_backends() {
            let (mut a, mut b, _) = pair(crypto);
            let g2 = a_commits_2(crypto, &mut a);
            // B made its own change meanwhile: its export of generation 2 loses the race.
            b.ensure_clusters(&[id("c2")], &mut rng(9)).expect("step");
            let lost = b.export(crypto, &mut rng(10)).expect("export").expect("a change").clone();
            assert_eq!(lost.generation, 2);
            assert!(b.releasable(&id("c2")).is_empty(), "an export is never released from");
            assert_eq!(b.adopt(crypto, &g2), Ok(2));
            assert_eq!(b.committed_generation(), 2);
            assert_eq!(b.pending_generation(), None, "the lost export is dropped");
            assert_eq!(kek_bytes(&b, "c2"), kek_bytes(&a, "c2"));
            assert_eq!(kek_bytes(&b, "c1"), kek_bytes(&a, "c1"));
            assert_eq!(b.policy_floor(), Some((2, [2; 48])), "the floor rises to the adopted head");
            // A commit of the lost export changes nothing (generation 2 is committed: the
            // commit is acknowledged as a repeat); the same blob again is acknowledged.
            assert_eq!(b.commit(2, &lost.blob_sha384), Ok(2));
            assert_eq!(kek_bytes(&b, "c2"), kek_bytes(&a, "c2"));
            assert_eq!(b.adopt(crypto, &g2), Ok(2));
            // Nothing to export: working is the adopted state. The next change follows it.
            assert!(b.export(crypto, &mut rng(11)).expect("step").is_none());
            b.ensure_clusters(&[id("c3")], &mut rng(12)).expect("step");
            assert_eq!(b.export(crypto, &mut rng(13)).expect("export").expect("a change").generation, 3);
            assert_eq!(b.forwardable().expect("step").generation, 2);
        }
    }

    #[test]
    fn an_older_a_forked_or_a_foreign_blob_is_refused_and_nothing_changes() {
        let crypto = all_backends()[0];
        let (mut a, mut b, g1) = pair(crypto);
        let g2 = a_commits_2(crypto, &mut a);
        b.adopt(crypto, &g2).expect("step");
        let before = kek_bytes(&b, "c2");
        // Older.
        assert_eq!(b.adopt(crypto, &g1), Err(VaultError::AdoptNotNewer { offered: 1, committed: 2 }));
        // A fork: another blob of generation 2 under the same key.
        let mut fork_state = b.committed_state_for_test();
        fork_state.clusters.remove(&id("c1"));
        let forked = b.seal_for_test(crypto, &fork_state);
        assert_eq!(b.adopt(crypto, &forked), Err(VaultError::AdoptFork { generation: 2 }));
        // A blob that does not open under this KRE's key: a newer generation of another cluster
        // with the same custodian set.
        let (mut other, _, _) = pair(crypto);
        other.ensure_clusters(&[id("c9")], &mut rng(20)).expect("step");
        let mut other_state = other.committed_state_for_test();
        other_state.generation = 3;
        let foreign = other.seal_with_other_key_for_test(crypto, &other_state);
        assert_eq!(b.adopt(crypto, &foreign), Err(VaultError::StateDoesNotOpen));
        // An older policy head than the floor, at a newer generation.
        let mut behind = b.committed_state_for_test();
        behind.generation = 3;
        behind.policy_head = Some((1, [1; 48]));
        let behind = b.seal_for_test(crypto, &behind);
        assert_eq!(b.adopt(crypto, &behind), Err(VaultError::AdoptPolicyBehind));
        // A forked policy head of the same version.
        let mut forked_head = b.committed_state_for_test();
        forked_head.generation = 3;
        forked_head.policy_head = Some((2, [9; 48]));
        let forked_head = b.seal_for_test(crypto, &forked_head);
        assert_eq!(b.adopt(crypto, &forked_head), Err(VaultError::AdoptPolicyBehind));
        // Garbage.
        assert!(matches!(b.adopt(crypto, b"not a sealed state"), Err(VaultError::Sealed(_))));
        assert_eq!(b.committed_generation(), 2);
        assert_eq!(kek_bytes(&b, "c2"), before);
        // Not serving.
        let mut fresh = Vault::new(b.set().clone());
        assert!(matches!(fresh.adopt(crypto, &g2), Err(VaultError::WrongPhase { .. })));
    }

    impl Vault {
        pub(super) fn committed_state_for_test(&self) -> KreState {
            let Inner::Serving(s) = &self.inner else { panic!("not serving") };
            s.committed.clone()
        }

        pub(super) fn seal_for_test(&self, crypto: &dyn Crypto, state: &KreState) -> Vec<u8> {
            let Inner::Serving(s) = &self.inner else { panic!("not serving") };
            sealed::seal(state, &s.state_key, &self.set.digest(), &mut rng(30), crypto).expect("seal")
        }

        fn seal_with_other_key_for_test(&self, crypto: &dyn Crypto, state: &KreState) -> Vec<u8> {
            let key: Secret<32> = Secret::generate(rng(31));
            sealed::seal(state, &key, &self.set.digest(), &mut rng(32), crypto).expect("seal")
        }
    }
}
