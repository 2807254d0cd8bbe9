//! Why the KRE refused a request: one [`Error`] for the kre layer, each variant one failed
//! check with its typed data, mapped to its wire deny code in one place
//! (`impl From<&Error> for DenyCode`). The reason a client reads in `Denied` and the audit
//! entry records is the error's `Display`. A [`Denial`] adds what the audit entry of the
//! refusal needs (stage, cluster, requester, key ids). Spec: docs/protocol.md ("The KRE's
//! decision" lists the checks and their codes).

use keygate_attestation::bundle::BundleError;
use keygate_attestation::crypto::CryptoError;
use keygate_attestation::freshness::FreshnessError;
use keygate_attestation::policy::{MismatchDetail, PolicyDenial};
use keygate_attestation::{NsmError, VerifyError};

use crate::audit::{AuditError, Requester};
use crate::state::custody::CustodyError;
use crate::state::vault::{Phase, VaultError};
use crate::wire::{self, Channel, DenyCode, Id, Unreadable, WireError};

/// A refused request, one variant per failed check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- Framing and the connection's state.
    /// The frame's protocol version is not this KRE's.
    #[error("protocol version {0} not supported (this KRE speaks {v})", v = wire::VERSION)]
    UnsupportedVersion(u8),
    /// The frame does not decode.
    #[error("{0}")]
    Malformed(WireError),
    /// The frame decodes, but a request field is invalid (an id, the key count, a duplicate).
    #[error("{0}")]
    InvalidRequest(WireError),
    /// A request of another channel.
    #[error("{name} belongs to the {belongs} channel; this is the {listener} channel's listener")]
    WrongChannel {
        /// The frame type's name.
        name: &'static str,
        /// The channel it belongs to.
        belongs: Channel,
        /// The channel of this listener.
        listener: Channel,
    },
    /// A frame this connection does not wait for now.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the connection waits for.
        expected: &'static str,
        /// The frame type's name.
        got: &'static str,
    },
    /// A frame after the connection finished.
    #[error("connection finished, got {0}")]
    Finished(&'static str),
    /// A decoded message without a handler in this state (not reached: the header check
    /// refuses it first).
    #[error("no handler for {0} in this state")]
    NoHandler(&'static str),
    /// The transport refused a frame it could not read (bad length prefix, timeout, busy).
    #[error("{0}")]
    Transport(Unreadable),
    /// A reply could not be encoded.
    #[error("encoding {what}: {source}")]
    Encode {
        /// Which reply.
        what: &'static str,
        /// Why.
        source: WireError,
    },

    // --- The challenge.
    /// The connection's wrapping key could not be made.
    #[error("wrapping key: {0}")]
    WrappingKey(CryptoError),
    /// The challenge table is full.
    #[error("challenge table full; retry shortly")]
    Busy,
    /// The NSM did not produce the KRE's attestation.
    #[error("KRE attestation unavailable: {0}")]
    KreAttestation(NsmError),

    // --- A release.
    /// Only the audit buffer's reserve is left.
    #[error("audit buffer full: the parent has not collected the trail; releases are refused until it does")]
    AuditFull,
    /// The sealed state is not serving.
    #[error("the KRE is sealed ({}): {}", .0.as_str(), sealed_waits_for(*.0))]
    Sealed(Phase),
    /// The replayed policy chain differs from the sealed state's head at its version.
    #[error("the policy chain replayed since the restart differs at version {0} from the one recorded in the sealed state (fork); restart the KRE and replay the right chain")]
    PolicyForked(u64),
    /// The sealed state records a newer policy head than the chain replayed so far.
    #[error("the sealed state records policy version {recorded}; the parent has replayed only up to version {replayed} (run `keygate policy restore`)")]
    PolicyBehind {
        /// The version the sealed state records.
        recorded: u64,
        /// The newest version replayed in this run (0: none).
        replayed: u64,
    },
    /// A debug-mode document, refused by the verifier.
    #[error("debug-mode attestation (PCR0-2 zero) not allowed by policy")]
    DebugAttestation,
    /// The client's document does not verify.
    #[error("{0}")]
    AttestationInvalid(VerifyError),
    /// The document carries a challenge already used (not this connection's).
    #[error("attestation carries a challenge that was already used (replay)")]
    ReplayedChallenge,
    /// The document carries another nonce.
    #[error("attestation nonce is not this connection's challenge")]
    NonceMismatch,
    /// This connection's challenge expired.
    #[error("challenge older than {ttl_ms} ms")]
    ChallengeExpired {
        /// The challenge lifetime.
        ttl_ms: u64,
    },
    /// This connection's challenge was already redeemed.
    #[error("challenge already used (replay)")]
    ChallengeReused,
    /// This connection's challenge is no longer in the table.
    #[error("challenge no longer known (expired)")]
    ChallengeUnknown,
    /// `user_data` is not the request digest.
    #[error("user_data is not the SHA-384 request digest of this Release")]
    UserDataMismatch,
    /// The document has no `public_key`.
    #[error("attestation has no public_key")]
    NoPublicKey,
    /// The `public_key` is not a valid point.
    #[error("public_key is not an uncompressed P-384 point")]
    BadPublicKey,
    /// Only the newest policy, not yet durable, allows the request.
    #[error("{0}; the newest policy allows it, but the parent has not yet committed the sealed state that carries it")]
    NewestNotDurable(PolicyDenial),
    /// The cluster is not in the policy.
    #[error("cluster `{0}` is not in the policy")]
    UnknownCluster(String),
    /// The policy does not allow debug-mode documents.
    #[error("debug-mode attestation not allowed")]
    PolicyDebugMode,
    /// The policy refuses the image (or its rule is not yet active).
    #[error("{0}")]
    Policy(PolicyDenial),
    /// The sealed state has no committed KEK of the cluster yet.
    #[error("the KEK of cluster `{0}` is not yet durably stored by the parent (retry after `keygate state sync`)")]
    KekNotStored(Id),
    /// The KEK version the policy wants is not committed yet, and older ones are retired.
    #[error("KEK version {version} of cluster `{cluster}` is not yet durably stored by the parent and the policy retires versions below {retire_below} (retry after `keygate state sync`)")]
    KekVersionNotStored {
        /// The cluster.
        cluster: Id,
        /// The policy's KEK version.
        version: u32,
        /// The policy's retirement bound.
        retire_below: u32,
    },
    /// No ephemeral KEK of the cluster may be released.
    #[error("no releasable KEK for cluster `{0}`")]
    NoKek(Id),
    /// A data key could not be derived.
    #[error("deriving keys: {0}")]
    Derive(CryptoError),
    /// The release could not be recorded.
    #[error("not released: {0}")]
    ReleaseNotRecorded(AuditError),
    /// The audit receipt could not be signed.
    #[error("signing the audit receipt: {0}")]
    Receipt(AuditError),
    /// The data keys could not be wrapped.
    #[error("wrapping keys: {0}")]
    Wrap(CryptoError),

    // --- Policy pushes and durability receipts.
    /// The KRE runs a static policy file.
    #[error("this KRE runs a static policy file and takes no pushes")]
    PolicyStatic,
    /// The bundle does not apply.
    #[error("{0}")]
    BundleRefused(BundleError),
    /// A pushed policy timestamp is refused (malformed, not the policy's key, a bad signature,
    /// from the future).
    #[error("timestamp refused: {0}")]
    TimestampRefused(FreshnessError),
    /// The newest policy names a timestamp key and no timestamp lets releases go on: none, too
    /// old, for another version, or one saying this KRE is behind.
    #[error("policy not fresh: {0}")]
    PolicyNotFresh(FreshnessError),
    /// The bundle's approver set holds one of this KRE's custodian keys (one key, one purpose).
    #[error("custodian key {index} of this KRE is an approver key of the bundle: a key is a custodian or an approver, never both")]
    ApproverIsCustodian {
        /// 0-based position in the custodian set.
        index: usize,
    },
    /// The bundle differs from the sealed state's policy head at its version.
    #[error("fork: bundle version {version} differs from the policy head recorded in the sealed state ({})", hex::encode(&.recorded[..8]))]
    BundleForked {
        /// The bundle's version.
        version: u64,
        /// The head's digest recorded in the sealed state.
        recorded: [u8; 48],
    },
    /// The bundle's acceptance (or its KEK rotations) cannot be recorded.
    #[error("policy not applied: it cannot be recorded: {0}")]
    PolicyNotRecorded(AuditError),
    /// The KEKs of a pushed policy could not be made.
    #[error("{0}")]
    PolicyKeks(KekError),
    /// A durability receipt from a KRE without sealed state.
    #[error("this KRE runs without custodians: it has no sealed state, so no policy is durable beyond this run")]
    NoDurability,
    /// A durability receipt for a bundle this run did not accept.
    #[error("policy v{0} with this digest was not accepted by this KRE run")]
    NotAccepted(u64),
    /// A durability receipt while sealed.
    #[error("the KRE is sealed: nothing is committed")]
    NothingCommitted,
    /// The committed sealed state does not carry the policy yet.
    #[error("policy v{version} is in force but not durable: the committed sealed state (generation {generation}) carries {}; the parent has not stored and committed the export that carries it (`keygate state sync`)", .committed.map_or("no policy head".into(), |v| format!("policy v{v}")))]
    PolicyNotDurable {
        /// The version asked about.
        version: u64,
        /// The committed generation.
        generation: u64,
        /// The policy version it carries.
        committed: Option<u64>,
    },
    /// The durability receipt could not be signed.
    #[error("signing the durability receipt: {0}")]
    DurabilityReceipt(AuditError),

    // --- The audit stream.
    /// The checkpoint of an audit pull could not be signed.
    #[error("{0}")]
    Checkpoint(AuditError),
    /// An acknowledgement the log refuses.
    #[error("{0}")]
    Ack(AuditError),

    // --- The sealed state.
    /// A sealed-state step on a KRE without custodians.
    #[error("this KRE runs without custodians: its KEKs are ephemeral and it has no sealed state")]
    NoCustodians,
    /// A sealed-state step that cannot be recorded.
    #[error("not done: the step cannot be recorded: {0}")]
    StepNotRecorded(AuditError),
    /// The sealed state refused the step.
    #[error("{0}")]
    Vault(VaultError),
    /// The NSM's random source failed during a sealed-state step.
    #[error("{0}")]
    Random(RandomFailed),
    /// The sealed state could not be exported for a report.
    #[error("{0}")]
    Export(Box<Error>),
    /// The new custodian set of a reshare does not decode.
    #[error("new custodian set: {0}")]
    NewSet(CustodyError),
    /// A custodian's share does not decode.
    #[error("{0}")]
    Share(CustodyError),
    /// The KEKs after a sealed-state step could not be made (or recorded).
    #[error("{0}")]
    StateKeks(KekError),

    // --- Members (docs/cluster.md).
    /// This KRE, a serving member, refused to forward its state key.
    #[error("join refused: {0}")]
    Join(Box<super::join::JoinRefusal>),
    /// This KRE, joining, refused the serving member's answer (or the member refused it).
    #[error("join failed: {0}")]
    Joiner(crate::kre::joiner::JoinError),
    /// A join asked of a KRE that already serves.
    #[error("this KRE already serves: a join is for a member awaiting its state")]
    JoinWhileServing,
}

impl From<&Error> for DenyCode {
    fn from(e: &Error) -> Self {
        use Error as E;
        match e {
            E::UnsupportedVersion(_) => Self::UnsupportedVersion,
            E::Malformed(_) => Self::Malformed,
            E::InvalidRequest(_) | E::Ack(_) => Self::InvalidRequest,
            E::WrongChannel { .. } => Self::WrongChannel,
            E::Unexpected { .. } | E::Finished(_) => Self::UnexpectedMessage,
            E::Transport(why) => why.code(),
            E::Busy => Self::Busy,
            E::AuditFull | E::ReleaseNotRecorded(_) | E::PolicyNotRecorded(_) | E::StepNotRecorded(_) => {
                Self::AuditFull
            }
            E::StateKeks(KekError::Audit(_)) => Self::AuditFull,
            E::Sealed(_) | E::NothingCommitted => Self::Sealed,
            E::PolicyForked(_) | E::PolicyBehind { .. } | E::PolicyNotFresh(_) => Self::PolicyStale,
            E::DebugAttestation | E::PolicyDebugMode => Self::DebugMode,
            E::AttestationInvalid(_) => Self::AttestationInvalid,
            E::ReplayedChallenge | E::ChallengeReused => Self::NonceReused,
            E::NonceMismatch => Self::NonceMismatch,
            E::ChallengeExpired { .. } | E::ChallengeUnknown => Self::ChallengeExpired,
            E::UserDataMismatch => Self::UserDataMismatch,
            E::NoPublicKey | E::BadPublicKey => Self::PublicKeyInvalid,
            E::NewestNotDurable(_) | E::PolicyNotDurable { .. } => Self::PolicyNotDurable,
            E::UnknownCluster(_) => Self::UnknownCluster,
            // An image whose rule waits for its activation time is not refused for good: a
            // client that holds keys keeps them and asks again (a restart replaying the chain
            // must not read as a revocation).
            E::Policy(PolicyDenial::NoMatchingImage { detail: MismatchDetail::NotYetActive { .. }, .. }) => {
                Self::ActivationPending
            }
            E::Policy(_) => Self::ImageNotAllowed,
            E::KekNotStored(_) | E::KekVersionNotStored { .. } => Self::StatePending,
            E::PolicyStatic => Self::PolicyStatic,
            E::BundleRefused(_)
            | E::TimestampRefused(_)
            | E::BundleForked { .. }
            | E::NotAccepted(_)
            | E::ApproverIsCustodian { .. } => Self::PolicyRefused,
            E::NoDurability
            | E::NoCustodians
            | E::Vault(_)
            | E::Random(_)
            | E::NewSet(_)
            | E::Share(_)
            | E::StateKeks(_)
            | E::JoinWhileServing => Self::StateRefused,
            E::Join(r) => r.code(),
            E::Joiner(crate::kre::joiner::JoinError::Denied { code, .. }) => *code,
            E::Joiner(_) => Self::StateRefused,
            E::NoHandler(_)
            | E::Encode { .. }
            | E::WrappingKey(_)
            | E::KreAttestation(_)
            | E::NoKek(_)
            | E::Derive(_)
            | E::Receipt(_)
            | E::Wrap(_)
            | E::PolicyKeks(_)
            | E::DurabilityReceipt(_)
            | E::Checkpoint(_)
            | E::Export(_) => Self::Internal,
        }
    }
}

/// What a refusal was about, for the audit trail.
#[derive(Debug, Clone)]
pub(super) enum Stage {
    /// Before a request: Hello, framing, timeouts.
    Challenge,
    /// A Release.
    Release,
    /// A policy push (version and digest when the bundle decoded).
    Policy { version: Option<u64>, digest: Option<[u8; 48]> },
    /// A durable-state or unseal step.
    State { step: &'static str },
}

/// A refusal with what its audit entry records.
#[derive(Debug)]
pub(super) struct Denial {
    /// The failed check.
    pub(super) error: Error,
    /// What the refusal was about.
    pub(super) stage: Stage,
    /// The cluster asked for, when known.
    pub(super) cluster: Option<Id>,
    /// The requester, once its document verified.
    pub(super) requester: Option<Requester>,
    /// The key ids asked for.
    pub(super) key_ids: Vec<Id>,
}

impl Denial {
    /// A refusal before any request (stage [`Stage::Challenge`]).
    pub(super) fn new(error: Error) -> Self {
        Self::at(Stage::Challenge, error)
    }

    /// A refusal at `stage`.
    pub(super) fn at(stage: Stage, error: Error) -> Self {
        Self { error, stage, cluster: None, requester: None, key_ids: Vec::new() }
    }

    /// A refused durable-state or unseal `step`.
    pub(super) fn state(step: &'static str, error: Error) -> Self {
        Self::at(Stage::State { step }, error)
    }

    /// The wire code.
    pub(super) fn code(&self) -> DenyCode {
        DenyCode::from(&self.error)
    }
}

impl From<Error> for Denial {
    fn from(e: Error) -> Self {
        Self::new(e)
    }
}

/// The NSM's random source failed during a sealed-state step; the state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the NSM's random source failed; the durable state is unchanged")]
pub struct RandomFailed;

/// Why the KEKs a policy names could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    /// A cluster name in the policy is not a valid id.
    #[error("policy: cluster name `{0}` is not a valid id")]
    ClusterName(String),
    /// The NSM could not provide randomness for an ephemeral KEK.
    #[error("NSM: {0}")]
    Nsm(NsmError),
    /// The rotations (and what the caller records with them) do not fit the audit buffer.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The NSM's random source failed during the sealed-state step.
    #[error("sealed state: {0}")]
    Random(#[from] RandomFailed),
    /// The sealed state refused the step.
    #[error("sealed state: {0}")]
    State(#[from] VaultError),
}

/// What a sealed KRE in `phase` waits for, as its refusals say.
fn sealed_waits_for(phase: Phase) -> &'static str {
    match phase {
        Phase::Confirming => "it waits for a serving member to confirm its unsealed state is the newest",
        _ => "it waits for the parent's stored state and its custodians",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variant's position in the declaration: a match without a wildcard, so that a new
    /// variant does not compile until it is listed here and in `every_variant`.
    fn index(e: &Error) -> usize {
        use Error as E;
        match e {
            E::UnsupportedVersion(_) => 0,
            E::Malformed(_) => 1,
            E::InvalidRequest(_) => 2,
            E::WrongChannel { .. } => 3,
            E::Unexpected { .. } => 4,
            E::Finished(_) => 5,
            E::NoHandler(_) => 6,
            E::Transport(_) => 7,
            E::Encode { .. } => 8,
            E::WrappingKey(_) => 9,
            E::Busy => 10,
            E::KreAttestation(_) => 11,
            E::AuditFull => 12,
            E::Sealed(_) => 13,
            E::PolicyForked(_) => 14,
            E::PolicyBehind { .. } => 15,
            E::DebugAttestation => 16,
            E::AttestationInvalid(_) => 17,
            E::ReplayedChallenge => 18,
            E::NonceMismatch => 19,
            E::ChallengeExpired { .. } => 20,
            E::ChallengeReused => 21,
            E::ChallengeUnknown => 22,
            E::UserDataMismatch => 23,
            E::NoPublicKey => 24,
            E::BadPublicKey => 25,
            E::NewestNotDurable(_) => 26,
            E::UnknownCluster(_) => 27,
            E::PolicyDebugMode => 28,
            E::Policy(_) => 29,
            E::KekNotStored(_) => 30,
            E::KekVersionNotStored { .. } => 31,
            E::NoKek(_) => 32,
            E::Derive(_) => 33,
            E::ReleaseNotRecorded(_) => 34,
            E::Receipt(_) => 35,
            E::Wrap(_) => 36,
            E::PolicyStatic => 37,
            E::BundleRefused(_) => 38,
            E::BundleForked { .. } => 39,
            E::PolicyNotRecorded(_) => 40,
            E::PolicyKeks(_) => 41,
            E::NoDurability => 42,
            E::NotAccepted(_) => 43,
            E::NothingCommitted => 44,
            E::PolicyNotDurable { .. } => 45,
            E::DurabilityReceipt(_) => 46,
            E::Checkpoint(_) => 47,
            E::Ack(_) => 48,
            E::NoCustodians => 49,
            E::StepNotRecorded(_) => 50,
            E::Vault(_) => 51,
            E::Random(_) => 52,
            E::Export(_) => 53,
            E::NewSet(_) => 54,
            E::Share(_) => 55,
            E::StateKeks(_) => 56,
            E::ApproverIsCustodian { .. } => 57,
            E::Join(_) => 58,
            E::Joiner(_) => 59,
            E::JoinWhileServing => 60,
            E::TimestampRefused(_) => 61,
            E::PolicyNotFresh(_) => 62,
        }
    }

    const VARIANTS: usize = 63;

    /// One value of every variant with the code it must map to (and, where the code depends
    /// on the data, one more).
    fn every_variant() -> Vec<(Error, DenyCode)> {
        use DenyCode as C;
        use Error as E;
        let full = || AuditError::BufferFull { buffered: 1, bytes: 2 };
        let id = || Id::new("prod").expect("id");
        let denial = |detail| PolicyDenial::NoMatchingImage { cluster: "prod".into(), detail };
        vec![
            (E::UnsupportedVersion(9), C::UnsupportedVersion),
            (E::Malformed(WireError::UnknownType(0xee)), C::Malformed),
            (E::InvalidRequest(WireError::BadId), C::InvalidRequest),
            (E::WrongChannel { name: "Hello", belongs: Channel::Release, listener: Channel::Parent }, C::WrongChannel),
            (E::Unexpected { expected: "Hello", got: "Release" }, C::UnexpectedMessage),
            (E::Finished("Hello"), C::UnexpectedMessage),
            (E::NoHandler("Hello"), C::Internal),
            (E::Transport(Unreadable::Timeout), C::Timeout),
            (E::Transport(Unreadable::Busy), C::Busy),
            (E::Encode { what: "x", source: WireError::BadId }, C::Internal),
            (E::WrappingKey(CryptoError::Kdf), C::Internal),
            (E::Busy, C::Busy),
            (E::KreAttestation(NsmError::Open), C::Internal),
            (E::AuditFull, C::AuditFull),
            (E::Sealed(Phase::Awaiting), C::Sealed),
            (E::PolicyForked(2), C::PolicyStale),
            (E::PolicyBehind { recorded: 3, replayed: 2 }, C::PolicyStale),
            (E::DebugAttestation, C::DebugMode),
            (E::AttestationInvalid(VerifyError::DebugMode), C::AttestationInvalid),
            (E::ReplayedChallenge, C::NonceReused),
            (E::NonceMismatch, C::NonceMismatch),
            (E::ChallengeExpired { ttl_ms: 1 }, C::ChallengeExpired),
            (E::ChallengeReused, C::NonceReused),
            (E::ChallengeUnknown, C::ChallengeExpired),
            (E::UserDataMismatch, C::UserDataMismatch),
            (E::NoPublicKey, C::PublicKeyInvalid),
            (E::BadPublicKey, C::PublicKeyInvalid),
            (E::NewestNotDurable(PolicyDenial::DebugMode), C::PolicyNotDurable),
            (E::UnknownCluster("x".into()), C::UnknownCluster),
            (E::PolicyDebugMode, C::DebugMode),
            (E::Policy(denial(MismatchDetail::Pcr { image: "cp".into(), index: 0 })), C::ImageNotAllowed),
            (
                E::Policy(denial(MismatchDetail::NotYetActive { image: "cp".into(), activates_at_ms: 1 })),
                C::ActivationPending,
            ),
            (E::KekNotStored(id()), C::StatePending),
            (E::KekVersionNotStored { cluster: id(), version: 2, retire_below: 2 }, C::StatePending),
            (E::NoKek(id()), C::Internal),
            (E::Derive(CryptoError::Kdf), C::Internal),
            (E::ReleaseNotRecorded(full()), C::AuditFull),
            (E::Receipt(full()), C::Internal),
            (E::Wrap(CryptoError::Kdf), C::Internal),
            (E::PolicyStatic, C::PolicyStatic),
            (E::BundleRefused(BundleError::TooLarge(1)), C::PolicyRefused),
            (E::TimestampRefused(FreshnessError::WrongKey), C::PolicyRefused),
            (E::PolicyNotFresh(FreshnessError::Missing), C::PolicyStale),
            (E::BundleForked { version: 2, recorded: [0; 48] }, C::PolicyRefused),
            (E::ApproverIsCustodian { index: 1 }, C::PolicyRefused),
            (E::PolicyNotRecorded(full()), C::AuditFull),
            (E::PolicyKeks(KekError::Random(RandomFailed)), C::Internal),
            (E::NoDurability, C::StateRefused),
            (E::NotAccepted(2), C::PolicyRefused),
            (E::NothingCommitted, C::Sealed),
            (E::PolicyNotDurable { version: 2, generation: 1, committed: None }, C::PolicyNotDurable),
            (E::DurabilityReceipt(full()), C::Internal),
            (E::Checkpoint(full()), C::Internal),
            (E::Ack(full()), C::InvalidRequest),
            (E::NoCustodians, C::StateRefused),
            (E::StepNotRecorded(full()), C::AuditFull),
            (E::Vault(VaultError::ReshareNotAuthorized), C::StateRefused),
            (E::Random(RandomFailed), C::StateRefused),
            (E::Export(Box::new(E::Random(RandomFailed))), C::Internal),
            (E::NewSet(CustodyError::NoCustodians), C::StateRefused),
            (E::Share(CustodyError::NoCustodians), C::StateRefused),
            (E::StateKeks(KekError::ClusterName("x y".into())), C::StateRefused),
            (E::StateKeks(KekError::Audit(full())), C::AuditFull),
            (E::Join(Box::new(super::super::join::JoinRefusal::NoNonce)), C::NonceMismatch),
            (E::Join(Box::new(super::super::join::JoinRefusal::Unexpected)), C::UnexpectedMessage),
            (E::Joiner(crate::kre::joiner::JoinError::KeyDoesNotOpen), C::StateRefused),
            (
                E::Joiner(crate::kre::joiner::JoinError::Denied { code: C::ImageNotAllowed, reason: "no".into() }),
                C::ImageNotAllowed,
            ),
            (E::JoinWhileServing, C::StateRefused),
        ]
    }

    #[test]
    fn every_error_variant_maps_to_its_deny_code() {
        let all = every_variant();
        let mut seen = [false; VARIANTS];
        for (e, code) in &all {
            assert_eq!(DenyCode::from(e), *code, "{e:?}");
            assert!(!e.to_string().is_empty(), "{e:?} has a reason");
            seen[index(e)] = true;
        }
        assert!(seen.iter().all(|s| *s), "every variant is listed: {seen:?}");
    }

    #[test]
    fn reasons_read_as_before() {
        let e = Error::PolicyNotDurable { version: 3, generation: 7, committed: Some(2) };
        assert!(e.to_string().starts_with(
            "policy v3 is in force but not durable: the committed sealed state (generation 7) carries policy v2;"
        ));
        let e = Error::BundleForked { version: 2, recorded: [0xab; 48] };
        assert_eq!(
            e.to_string(),
            "fork: bundle version 2 differs from the policy head recorded in the sealed state (abababababababab)"
        );
        assert_eq!(
            Error::Sealed(Phase::Confirming).to_string(),
            "the KRE is sealed (confirming): it waits for a serving member to confirm its unsealed state is the newest"
        );
        assert_eq!(
            Error::Sealed(Phase::Unsealing).to_string(),
            format!(
                "the KRE is sealed ({}): it waits for the parent's stored state and its custodians",
                Phase::Unsealing.as_str()
            )
        );
    }
}
