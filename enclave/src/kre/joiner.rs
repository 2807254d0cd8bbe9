//! A joining member's side of a join (`docs/cluster.md`): the request it sends a serving
//! member, and whether to take the state key the answer forwards. Pure: the joiner's fresh
//! key and nonce are drawn by the caller's randomness, its attestation made by the caller's
//! NSM; an answer frame in, a [`Forwardable`] for `Vault::join` or a typed refusal out.
//!
//! The checks on the answer, in this order: the frame is a JoinOffer (a Denied is the serving
//! member's refusal) → the serving member's attestation verifies (chain to the pinned root,
//! now, not older than the maximum age, an enclave document, not debug) → its `nonce` is this
//! session's nonce (an answer to an earlier request is refused) → its `public_key` S is a
//! valid P-384 point → its `user_data` is the join transcript over this session's request
//! and the offered generation, blob digest and policy head → it runs a KRE image (this KRE's
//! own PCR0..2, or the images the caller names) → its parent instance is a member of the
//! policy this KRE knows → the offered generation and policy head are not older than this
//! KRE's floor (what it has itself or learned from other members: ROTE-style, never serve an
//! older state than a serving member has) → the state key opens.
//!
//! Trusts the pinned root, the member list it is given and its floor. Pure: uses none of the
//! KRE's parts (its caller, `kre::member`, hands it the policy's members, the image and the
//! floor), as `kre::join` is for the serving side.

use keygate_attestation::crypto::{p384_scalar_from, Crypto, CryptoError, P384Scalar, P384_POINT_LEN};
use keygate_attestation::members::{self, NotAMember};
use keygate_attestation::{AttestRequest, VerifyError};
use sha2::{Digest, Sha384};

use crate::binding::{self, JoinTranscript};
use crate::crypto::forward;
use crate::state::vault::{Forwardable, PolicyHead};
use crate::wire::{DenyCode, MemberMessage, Message, WireError};

/// The newest state this KRE knows of: it never joins from an older one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floor {
    /// The highest committed generation seen (its own stored blob, or offered by a member).
    pub generation: u64,
    /// The newest policy head seen (its own bundles, or offered by a member).
    pub policy: Option<PolicyHead>,
}

impl Floor {
    /// Raises the floor to `generation` and `policy` where they are newer.
    pub fn raise(&mut self, generation: u64, policy: Option<PolicyHead>) {
        self.generation = self.generation.max(generation);
        if let Some(p) = policy {
            if self.policy.is_none_or(|(v, _)| p.0 > v) {
                self.policy = Some(p);
            }
        }
    }
}

/// What a joiner expects of a serving member: the same checks a serving member makes of a
/// joiner (its document, its image, its membership), from this KRE's side.
pub type MemberExpect<'a> = super::join::JoinExpect<'a>;

/// Why a joiner refused an answer (or the serving member refused the joiner).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The frame is not a valid member message.
    #[error("bad frame from the serving member: {0}")]
    Wire(WireError),
    /// The serving member refused.
    #[error("the serving member refused: {code}: {reason}")]
    Denied {
        /// Its code.
        code: DenyCode,
        /// Its reason.
        reason: String,
    },
    /// Another message than a JoinOffer.
    #[error("expected a JoinOffer")]
    Unexpected,
    /// The request has not been made yet ([`JoinSession::request`]).
    #[error("no join request was sent in this session")]
    NotRequested,
    /// The serving member's attestation does not verify (or is too old).
    #[error("the serving member's attestation does not verify: {0}")]
    Attestation(VerifyError),
    /// The answer is not to this session's request (a replayed answer).
    #[error("the serving member's attestation is not for this request's nonce (a replayed answer?)")]
    NonceMismatch,
    /// No valid P-384 key in the serving member's document.
    #[error("the serving member's attestation carries no valid P-384 public key")]
    BadPublicKey,
    /// `user_data` is not the transcript of this join and the offered state.
    #[error("the serving member's attestation does not bind this join and the offered state")]
    TranscriptMismatch,
    /// The offered policy head spells "none" with a non-zero digest.
    #[error("the offered policy head is malformed (version 0 with a digest)")]
    BadPolicyHead,
    /// Not a member KRE.
    #[error("the serving KRE is not a member: {0}")]
    NotAMember(NotAMember),
    /// The serving member's state is older than this KRE's floor (a rollback).
    #[error("the serving member offers generation {offered}, older than generation {floor} this KRE knows of (rollback refused)")]
    StaleGeneration {
        /// Offered.
        offered: u64,
        /// This KRE's floor.
        floor: u64,
    },
    /// The serving member's policy head is older than this KRE's, or another at the same version.
    #[error("the serving member's policy head (version {offered}) is older than or forks from version {floor} this KRE knows of")]
    StalePolicy {
        /// Offered version.
        offered: u64,
        /// This KRE's version.
        floor: u64,
    },
    /// The sealed state key does not open (tampered, or not for this joiner).
    #[error("the forwarded state key does not open")]
    KeyDoesNotOpen,
    /// Cryptography failed.
    #[error("crypto: {0}")]
    Crypto(CryptoError),
}

/// One join attempt: the joiner's fresh key pair J and nonce. Never prints its key.
pub struct JoinSession {
    j: P384Scalar,
    joiner: [u8; P384_POINT_LEN],
    nonce: [u8; 32],
    request_sha384: Option<[u8; 48]>,
}

impl std::fmt::Debug for JoinSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinSession").field("requested", &self.request_sha384.is_some()).finish_non_exhaustive()
    }
}

impl JoinSession {
    /// A new session: draws J and the nonce.
    pub fn start(crypto: &dyn Crypto, rng: &mut dyn FnMut(&mut [u8])) -> Result<Self, JoinError> {
        let (j, joiner) = p384_scalar_from(crypto, &mut *rng).map_err(JoinError::Crypto)?;
        let joiner = joiner.try_into().map_err(|_| JoinError::Crypto(CryptoError::BadPublicKey))?;
        let mut nonce = [0u8; 32];
        rng(&mut nonce);
        Ok(Self { j, joiner, nonce, request_sha384: None })
    }

    /// What this KRE's NSM must attest for the request: `nonce`, `public_key` J, and
    /// `user_data` binding both.
    pub fn attest_request(&self) -> AttestRequest {
        AttestRequest {
            user_data: Some(binding::join_request_user_data(&self.nonce, &self.joiner).to_vec()),
            nonce: Some(self.nonce.to_vec()),
            public_key: Some(self.joiner.to_vec()),
        }
    }

    /// The JoinRequest frame carrying `attestation` (made for [`Self::attest_request`]).
    pub fn request(&mut self, attestation: Vec<u8>) -> Result<Vec<u8>, JoinError> {
        let sha: [u8; 48] = Sha384::digest(&attestation).into();
        let frame = MemberMessage::JoinRequest { attestation }.encode().map_err(JoinError::Wire)?;
        self.request_sha384 = Some(sha);
        Ok(frame)
    }

    /// Checks the serving member's answer `body` (see the module doc) against `expect` and
    /// `floor`; on success raises `floor` to the offered state and returns what `Vault::join`
    /// takes.
    pub fn on_offer(
        &self,
        body: &[u8],
        expect: &MemberExpect<'_>,
        floor: &mut Floor,
        crypto: &dyn Crypto,
    ) -> Result<Forwardable, JoinError> {
        let request_sha384 = self.request_sha384.ok_or(JoinError::NotRequested)?;
        let offer = match MemberMessage::decode(body).map_err(JoinError::Wire)? {
            MemberMessage::JoinOffer(o) => o,
            MemberMessage::Denied(Message::Denied { code, reason }) => return Err(JoinError::Denied { code, reason }),
            _ => return Err(JoinError::Unexpected),
        };
        let opts = expect.verify_options();
        let att = expect.verifier.verify(&offer.attestation, &opts).map_err(JoinError::Attestation)?;
        if att.nonce() != Some(self.nonce.as_slice()) {
            return Err(JoinError::NonceMismatch);
        }
        let server: [u8; P384_POINT_LEN] =
            att.public_key().and_then(|k| k.try_into().ok()).ok_or(JoinError::BadPublicKey)?;
        crypto.validate_p384_point(&server).map_err(|_| JoinError::BadPublicKey)?;
        let t = JoinTranscript {
            joiner_attestation_sha384: &request_sha384,
            nonce: &self.nonce,
            joiner_public: &self.joiner,
            server_public: &server,
            generation: offer.generation,
            blob_sha384: &offer.blob_sha384,
            policy_version: offer.policy_version,
            policy_digest: &offer.policy_digest,
        }
        .hash();
        if att.user_data() != Some(t.as_slice()) {
            return Err(JoinError::TranscriptMismatch);
        }
        let policy_head = match offer.policy_version {
            0 if offer.policy_digest == [0; 48] => None,
            0 => return Err(JoinError::BadPolicyHead),
            v => Some((v, offer.policy_digest)),
        };
        members::check(&att, expect.images, expect.members).map_err(JoinError::NotAMember)?;
        check_floor(floor, offer.generation, policy_head)?;
        let state_key = forward::open_state_key(crypto, &self.j, &server, &t, &offer.sealed_key)
            .map_err(|_| JoinError::KeyDoesNotOpen)?;
        floor.raise(offer.generation, policy_head);
        Ok(Forwardable { state_key, generation: offer.generation, blob_sha384: offer.blob_sha384, policy_head })
    }
}

/// Refuses an offered state older than `floor`: a lower generation (or none), a lower policy
/// version, or another policy at the same version (a fork).
pub fn check_floor(floor: &Floor, generation: u64, policy: Option<PolicyHead>) -> Result<(), JoinError> {
    if generation == 0 || generation < floor.generation {
        return Err(JoinError::StaleGeneration { offered: generation, floor: floor.generation });
    }
    if let Some((fv, fd)) = floor.policy {
        let offered = policy.map_or(0, |(v, _)| v);
        if offered < fv || (offered == fv && policy.map(|(_, d)| d) != Some(fd)) {
            return Err(JoinError::StalePolicy { offered, floor: fv });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_refuses_older_and_forked_states_and_only_rises() {
        let f = Floor { generation: 5, policy: Some((3, [3; 48])) };
        assert!(check_floor(&f, 5, Some((3, [3; 48]))).is_ok());
        assert!(check_floor(&f, 9, Some((4, [4; 48]))).is_ok());
        assert!(matches!(
            check_floor(&f, 4, Some((3, [3; 48]))),
            Err(JoinError::StaleGeneration { offered: 4, floor: 5 })
        ));
        assert!(matches!(check_floor(&f, 6, Some((2, [2; 48]))), Err(JoinError::StalePolicy { offered: 2, floor: 3 })));
        assert!(matches!(check_floor(&f, 6, Some((3, [9; 48]))), Err(JoinError::StalePolicy { .. })), "a fork");
        assert!(matches!(check_floor(&f, 6, None), Err(JoinError::StalePolicy { offered: 0, .. })));
        assert!(matches!(check_floor(&Floor::default(), 0, None), Err(JoinError::StaleGeneration { .. })));
        assert!(check_floor(&Floor::default(), 1, None).is_ok());
        let mut g = f;
        g.raise(4, Some((2, [2; 48])));
        assert_eq!(g, f, "never lowered");
        g.raise(7, Some((5, [5; 48])));
        assert_eq!(g, Floor { generation: 7, policy: Some((5, [5; 48])) });
    }
}
