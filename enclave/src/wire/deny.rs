//! The deny codes: why the KRE refused, with stable numbers and names on the wire
//! (`docs/protocol.md`, "Messages", `Denied`).

use std::fmt;

macro_rules! deny_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $text:literal;)*) => {
        /// Why the KRE refused. Stable numbers on the wire (`docs/protocol.md`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum DenyCode {
            $($(#[$doc])* $name,)*
            /// A code this version does not know (from a newer peer).
            Unknown(u16),
        }

        impl DenyCode {
            /// The wire number.
            pub fn to_u16(self) -> u16 {
                match self {
                    $(DenyCode::$name => $code,)*
                    DenyCode::Unknown(c) => c,
                }
            }
            /// From the wire number.
            pub fn from_u16(c: u16) -> Self {
                match c {
                    $($code => DenyCode::$name,)*
                    other => DenyCode::Unknown(other),
                }
            }
            /// A stable snake_case name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DenyCode::$name => $text,)*
                    DenyCode::Unknown(_) => "unknown",
                }
            }
            /// Every known code (for tests and docs).
            pub const ALL: &'static [DenyCode] = &[$(DenyCode::$name,)*];
        }
    };
}

deny_codes! {
    /// The frame could not be parsed.
    Malformed = 1, "malformed";
    /// Protocol version not supported.
    UnsupportedVersion = 2, "unsupported_version";
    /// A message not valid in the connection's state.
    UnexpectedMessage = 3, "unexpected_message";
    /// Frame length over the limit.
    FrameTooLarge = 4, "frame_too_large";
    /// A request frame of another channel than the listener's (docs/protocol.md, "Channels").
    WrongChannel = 6, "wrong_channel";
    /// Too much time without a complete frame, or the connection's total time ran out.
    Timeout = 5, "timeout";
    /// The challenge table is full: retry later.
    Busy = 10, "busy";
    /// Cluster or key ids invalid.
    InvalidRequest = 11, "invalid_request";
    /// The client's attestation document did not verify.
    AttestationInvalid = 20, "attestation_invalid";
    /// A debug-mode document, and the policy does not allow debug.
    DebugMode = 21, "debug_mode";
    /// The attestation's nonce is not this connection's challenge.
    NonceMismatch = 30, "nonce_mismatch";
    /// The challenge expired before the Release arrived.
    ChallengeExpired = 31, "challenge_expired";
    /// The attestation's nonce was already used (a replay).
    NonceReused = 32, "nonce_reused";
    /// `user_data` is not the digest of this request.
    UserDataMismatch = 33, "user_data_mismatch";
    /// `public_key` absent or not a valid P-384 point.
    PublicKeyInvalid = 34, "public_key_invalid";
    /// The cluster is not in the policy.
    UnknownCluster = 40, "unknown_cluster";
    /// No image allowed for the cluster matches the attested PCRs.
    ImageNotAllowed = 41, "image_not_allowed";
    /// The matching image rule waits for its activation time (a loosening policy change
    /// not yet in force): retry later; not a revocation.
    ActivationPending = 42, "activation_pending";
    /// The KRE is sealed (state not yet unsealed).
    Sealed = 50, "sealed";
    /// The KEK version asked for is not yet durably stored (the parent has not committed it).
    StatePending = 51, "state_pending";
    /// A durable-state step was refused (wrong phase, wrong blob, bad share...).
    StateRefused = 52, "state_refused";
    /// The policy chain has not been replayed up to the head recorded in the sealed state.
    PolicyStale = 72, "policy_stale";
    /// Allowed by the newest policy, but not by the one the committed sealed state carries:
    /// until the parent commits the change, the stricter of the two holds. Retry; not a
    /// revocation. Also the answer to a `PolicyDurableWait` that timed out.
    PolicyNotDurable = 73, "policy_not_durable";
    /// An internal failure (NSM, crypto); nothing was released.
    Internal = 60, "internal";
    /// A policy bundle was refused (the reason says which rule).
    PolicyRefused = 70, "policy_refused";
    /// This KRE runs a static policy file and takes no pushes.
    PolicyStatic = 71, "policy_static";
    /// The audit buffer is full (nobody collected it): releases fail closed.
    AuditFull = 80, "audit_full";
    /// The parent did not acknowledge storing the step's audit entry in time, so the answer
    /// (keys, an accepted policy, a state step) is withheld: retry; not a revocation.
    AuditUnacknowledged = 81, "audit_unacknowledged";
}

impl fmt::Display for DenyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyCode::Unknown(c) => write!(f, "unknown({c})"),
            other => f.write_str(other.as_str()),
        }
    }
}
