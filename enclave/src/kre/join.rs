//! A serving member's side of a join (`docs/cluster.md`): whether to forward the state key to
//! the KRE that asks, and the answer that forwards it. Pure: a request frame, the vault, the
//! expectations, a clock value, randomness and the NSM's attestation in; a JoinOffer frame or
//! a typed refusal out.
//!
//! The checks, in this order: the frame is a JoinRequest → this KRE serves a committed
//! generation it may forward → the joiner's attestation verifies (chain to the pinned root,
//! now, not older than the maximum age, an enclave document, not debug) → it carries a
//! 32-byte nonce, a valid P-384 public key J and `user_data` binding both
//! ([`binding::join_request_user_data`]) → it runs a KRE image (this KRE's own PCR0..2, or
//! the images the caller names) → its parent instance (PCR4, PCR3 where pinned) is a member
//! of the policy in force. Only then a fresh key pair (s, S) is drawn, the state key sealed to
//! J under the join transcript ([`binding::JoinTranscript`]), and this KRE attests
//! `nonce` = the joiner's nonce, `user_data` = the transcript, `public_key` = S.
//!
//! Trusts the verifier (the pinned root), the member list it is given (the policy in force,
//! signed by a quorum of approvers) and the NSM. A replayed request gets an answer only the
//! enclave holding J's private key can open; the document's age bounds how long a captured
//! request is answered at all.

use std::time::Duration;

use keygate_attestation::crypto::{p384_scalar_from, Crypto, CryptoError, P384_POINT_LEN};
use keygate_attestation::members::{self, Member, NotAMember};
use keygate_attestation::{
    AttestRequest, DocumentKind, NsmError, PcrExpectation, UnknownFields, Verifier, VerifyError, VerifyOptions,
    VerifyTime,
};
use sha2::{Digest, Sha384};

use crate::binding::{self, JoinTranscript};
use crate::crypto::forward;
use crate::state::vault::{Vault, VaultError};
use crate::wire::{DenyCode, JoinOffer, MemberMessage, WireError};

/// What one member expects of the other: a serving member of a joiner, and a joiner of the
/// serving member ([`super::joiner::MemberExpect`]).
#[derive(Debug, Clone, Copy)]
pub struct JoinExpect<'a> {
    /// Verifies the joiner's document (the pinned root).
    pub verifier: &'a Verifier,
    /// Now, ms since the Unix epoch.
    pub now_ms: u64,
    /// Oldest document accepted.
    pub max_doc_age: Duration,
    /// Allowed clock skew.
    pub clock_skew: Duration,
    /// The KRE images a member may run, each every PCR of one image: this KRE's own PCR0..2,
    /// or the images the policy names for KREs.
    pub images: &'a [Vec<PcrExpectation>],
    /// The members of the policy in force (the joiner: of the policy it knows).
    pub members: &'a [Member],
}

impl JoinExpect<'_> {
    /// How the other member's document is verified: at `now_ms`, fresh, a genuine enclave
    /// (never debug, never a NitroTPM document), no unknown fields.
    pub(crate) fn verify_options(&self) -> VerifyOptions {
        VerifyOptions {
            time: VerifyTime::Now(self.now_ms),
            max_age: self.max_doc_age,
            clock_skew: self.clock_skew,
            allow_debug: false,
            unknown_fields: UnknownFields::Refuse,
            require_kind: Some(DocumentKind::Enclave),
            use_cache: true,
        }
    }
}

/// A forwarded state key: the frame to send and what it was.
#[derive(Debug)]
pub struct JoinAnswer {
    /// The JoinOffer frame.
    pub frame: Vec<u8>,
    /// The member it went to.
    pub member: String,
    /// The generation forwarded.
    pub generation: u64,
    /// The joiner's module id (its document).
    pub module_id: String,
    /// The joiner's PCR4, hex.
    pub pcr4: String,
}

/// Why a serving member refused a join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinRefusal {
    /// The frame is not a valid member message.
    #[error("bad frame: {0}")]
    Wire(WireError),
    /// Another message than a JoinRequest.
    #[error("expected a JoinRequest")]
    Unexpected,
    /// Nothing to forward (not serving, nothing committed, a reshare uncommitted).
    #[error("{0}")]
    NotServing(VaultError),
    /// The joiner's attestation does not verify (or is too old).
    #[error("the joiner's attestation does not verify: {0}")]
    Attestation(VerifyError),
    /// The joiner's document carries no 32-byte nonce.
    #[error("the joiner's attestation carries no 32-byte nonce")]
    NoNonce,
    /// No valid P-384 public key in the joiner's document.
    #[error("the joiner's attestation carries no valid P-384 public key")]
    BadPublicKey,
    /// `user_data` does not bind the nonce and key.
    #[error("the joiner's attestation does not bind its nonce and key")]
    UserDataMismatch,
    /// Not a member KRE.
    #[error("the joiner is not a member KRE: {0}")]
    NotAMember(NotAMember),
    /// This KRE's policy has not been replayed up to the head its sealed state records: its
    /// member list may be one a newer bundle has changed.
    #[error("{0}")]
    PolicyStale(super::Error),
    /// This KRE could not attest.
    #[error("attestation failed: {0}")]
    Attest(NsmError),
    /// Cryptography failed.
    #[error("crypto: {0}")]
    Crypto(CryptoError),
}

impl JoinRefusal {
    /// The deny code that answers it.
    pub fn code(&self) -> DenyCode {
        match self {
            JoinRefusal::Wire(_) => DenyCode::Malformed,
            JoinRefusal::Unexpected => DenyCode::UnexpectedMessage,
            JoinRefusal::NotServing(_) => DenyCode::Sealed,
            JoinRefusal::Attestation(VerifyError::DebugMode) => DenyCode::DebugMode,
            JoinRefusal::Attestation(_) => DenyCode::AttestationInvalid,
            JoinRefusal::NoNonce => DenyCode::NonceMismatch,
            JoinRefusal::BadPublicKey => DenyCode::PublicKeyInvalid,
            JoinRefusal::UserDataMismatch => DenyCode::UserDataMismatch,
            JoinRefusal::NotAMember(_) => DenyCode::ImageNotAllowed,
            JoinRefusal::PolicyStale(_) => DenyCode::PolicyStale,
            JoinRefusal::Attest(_) | JoinRefusal::Crypto(_) => DenyCode::Internal,
        }
    }
}

/// Answers a JoinRequest frame `body` (see the module doc for the checks). `attest` is the
/// NSM of this KRE.
pub fn answer(
    expect: &JoinExpect<'_>,
    vault: &Vault,
    body: &[u8],
    crypto: &dyn Crypto,
    rng: &mut dyn FnMut(&mut [u8]),
    attest: &mut dyn FnMut(&AttestRequest) -> Result<Vec<u8>, NsmError>,
) -> Result<JoinAnswer, JoinRefusal> {
    let attestation = match MemberMessage::decode(body).map_err(JoinRefusal::Wire)? {
        MemberMessage::JoinRequest { attestation } => attestation,
        _ => return Err(JoinRefusal::Unexpected),
    };
    let state = vault.forwardable().map_err(JoinRefusal::NotServing)?;
    let opts = expect.verify_options();
    let att = expect.verifier.verify(&attestation, &opts).map_err(JoinRefusal::Attestation)?;
    let nonce: [u8; 32] = att.nonce().and_then(|n| n.try_into().ok()).ok_or(JoinRefusal::NoNonce)?;
    let joiner: [u8; P384_POINT_LEN] =
        att.public_key().and_then(|k| k.try_into().ok()).ok_or(JoinRefusal::BadPublicKey)?;
    crypto.validate_p384_point(&joiner).map_err(|_| JoinRefusal::BadPublicKey)?;
    if att.user_data() != Some(binding::join_request_user_data(&nonce, &joiner).as_slice()) {
        return Err(JoinRefusal::UserDataMismatch);
    }
    let member = members::check(&att, expect.images, expect.members).map_err(JoinRefusal::NotAMember)?;

    let (s, server) = p384_scalar_from(crypto, &mut *rng).map_err(JoinRefusal::Crypto)?;
    let (policy_version, policy_digest) = state.policy_head.unwrap_or((0, [0; 48]));
    let joiner_attestation_sha384: [u8; 48] = Sha384::digest(&attestation).into();
    let t = JoinTranscript {
        joiner_attestation_sha384: &joiner_attestation_sha384,
        nonce: &nonce,
        joiner_public: &joiner,
        server_public: &server,
        generation: state.generation,
        blob_sha384: &state.blob_sha384,
        policy_version,
        policy_digest: &policy_digest,
    }
    .hash();
    let sealed_key = forward::seal_state_key(crypto, &s, &joiner, &t, &state.state_key).map_err(JoinRefusal::Crypto)?;
    let own =
        attest(&AttestRequest { user_data: Some(t.to_vec()), nonce: Some(nonce.to_vec()), public_key: Some(server) })
            .map_err(JoinRefusal::Attest)?;
    let frame = MemberMessage::JoinOffer(Box::new(JoinOffer {
        attestation: own,
        generation: state.generation,
        blob_sha384: state.blob_sha384,
        policy_version,
        policy_digest,
        sealed_key,
    }))
    .encode()
    .map_err(JoinRefusal::Wire)?;
    Ok(JoinAnswer {
        frame,
        member: member.name.clone(),
        generation: state.generation,
        module_id: att.module_id().to_owned(),
        pcr4: att.pcr(4).map(hex::encode).unwrap_or_default(),
    })
}

/// A KRE's own image, as a member expects it of the others: its PCR0, PCR1 and PCR2 (`None`
/// when one cannot be read: a partial image would expect less).
pub fn own_image(pcr: impl Fn(u8) -> Option<Vec<u8>>) -> Option<Vec<PcrExpectation>> {
    (0u8..3).map(|index| Some(PcrExpectation { index, value: pcr(index)? })).collect()
}

impl super::Kre {
    /// The KRE's answer to a JoinRequest frame `body` ([`answer`]): with the members of the
    /// policy in force, this KRE's own image (PCR0..2 from its NSM, unless `images` names the
    /// accepted KRE images), its committed state and its NSM. Refused until the policy has been
    /// replayed up to the head the sealed state records (as releases are: a parent that
    /// withholds the bundle removing a member cannot make this KRE forward to it). Takes the
    /// policy history, the policy source and then the vault, one at a time; the NSM attests
    /// under the vault lock (a sealed-state step).
    pub fn answer_join(
        &self,
        body: &[u8],
        images: Option<&[Vec<PcrExpectation>]>,
        env: &mut super::Env<'_>,
    ) -> Result<JoinAnswer, JoinRefusal> {
        let Some(state) = &self.state else {
            return Err(JoinRefusal::NotServing(VaultError::NothingToForward));
        };
        let floor = state.vault().policy_floor();
        if let Some(f) = floor {
            self.policy.check_floor(f).map_err(JoinRefusal::PolicyStale)?;
        }
        self.settle_unseal(env.now_ms);
        let members = self.policy.members(env.now_ms);
        let own;
        let images = match images {
            Some(i) => i,
            None => {
                own = own_image(|i| self.nsm.describe_pcr(u16::from(i)).ok().map(|d| d.data))
                    .map(|image| vec![image])
                    .unwrap_or_default();
                &own
            }
        };
        let expect = JoinExpect {
            verifier: &self.verifier,
            now_ms: env.now_ms,
            max_doc_age: self.config.max_doc_age,
            clock_skew: self.config.clock_skew,
            images,
            members: &members,
        };
        let vault = state.vault();
        let nsm = &self.nsm;
        let mut attest = |r: &AttestRequest| nsm.attest(r);
        answer(&expect, &vault, body, self.crypto, env.rng, &mut attest)
    }
}
