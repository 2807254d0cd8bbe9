//! Durability receipts: the KRE's signed statement, handed to the pipeline once a policy
//! change is durable, that the sealed state committed as `generation` carries a policy head at
//! or after bundle `(policy_version, policy_digest)`.
//!
//! What this decides: the exact bytes of a durability receipt and whether it proves what it
//! claims ([`PolicyReceipt::verify`]). What it trusts: the pinned Nitro root of the caller's
//! verifier and the KRE PCRs the caller expects. The receipt carries its own proof: the KRE's
//! audit key (the checkpoint key), its signature, and the attestation document that binds that
//! key to the KRE image — so the pipeline needs no trail and no connection to check it.
//!
//! Signed, by the audit key, over
//!
//! ```text
//! POLICY_RECEIPT_DOMAIN ‖ version:u8 (=1) ‖ chain_id[48] ‖ generation:u64be
//!   ‖ policy_version:u64be ‖ policy_digest[48] ‖ time_ms:u64be
//! ```
//!
//! and encoded as that body (without the domain) ‖ public_key[97] ‖ signature[96] ‖
//! binding_len:u32be ‖ binding document.

use std::fmt;

use keygate_attestation::crypto::{P384_POINT_LEN, P384_SIG_LEN};
use keygate_attestation::pcr::{self, PcrMismatch};
use keygate_attestation::{PcrExpectation, VerifiedAttestation, Verifier};

use super::codec::{check_point, DecodeError};
use super::signed::{read_signed, signed_body, write_signed, Body, Seal, SealFailure};
use super::trail::{attested_key, NotAttested, TrailOptions};
use super::MAX_CHECKPOINT_LEN;

/// Domain label of the durability receipt signature.
pub use crate::binding::POLICY_RECEIPT_DOMAIN;
/// Length of the signed body (without the domain).
pub const POLICY_RECEIPT_BODY_LEN: usize = 1 + 48 + 8 + 8 + 48 + 8;
/// Largest encoded durability receipt (as a checkpoint: body, key, signature, binding).
pub const MAX_POLICY_RECEIPT_LEN: usize = MAX_CHECKPOINT_LEN;

/// Why a durability receipt does not prove what it claims. Each case has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyReceiptError {
    /// The bytes are not a durability receipt.
    #[error("not a durability receipt: {0}")]
    Malformed(DecodeError),
    /// The receipt's chain id is not derived from its key.
    #[error("its chain id is not derived from its audit key")]
    ChainIdMismatch,
    /// The signature does not verify under the receipt's key.
    #[error("its signature does not verify")]
    SignatureInvalid,
    /// The key is not proven to be a KRE's audit key.
    #[error("its audit key is not attested: {0}")]
    NotAttested(NotAttested),
    /// The attested KRE is not the expected image.
    #[error("the attested KRE is not the expected image: {0}")]
    KreImageMismatch(PcrMismatch),
    /// A valid receipt, but for another policy bundle than the one asked about.
    #[error("it is the receipt of policy v{found}, not of v{expected} with this digest")]
    OtherPolicy {
        /// The version asked about.
        expected: u64,
        /// The version the receipt names.
        found: u64,
    },
}

impl SealFailure for PolicyReceiptError {
    const CHAIN_ID_MISMATCH: Self = Self::ChainIdMismatch;
    const SIGNATURE_INVALID: Self = Self::SignatureInvalid;
}

signed_body! {
    /// What a durability receipt signs: the sealed state committed as `generation` carries a
    /// policy head at or after bundle `(policy_version, policy_digest)`; signed at `time_ms`.
    PolicyBody under POLICY_RECEIPT_DOMAIN => {
        generation: u64, policy_version: u64, policy_digest: [u8; 48], time_ms: u64
    }
}

/// One durability receipt. Decoding only checks the structure; [`PolicyReceipt::verify`]
/// checks the signature, the attested key and the bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct PolicyReceipt {
    body: PolicyBody,
    seal: Seal,
    binding: Vec<u8>,
}

impl fmt::Debug for PolicyReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.body.debug(f, "PolicyReceipt").finish_non_exhaustive()
    }
}

/// What a verified durability receipt proves.
#[derive(Debug, Clone)]
pub struct DurablePolicy {
    /// The sealed state's generation that carries the policy.
    pub generation: u64,
    /// The policy version asked about.
    pub policy_version: u64,
    /// When the KRE signed the receipt (its clock, ms).
    pub time_ms: u64,
    /// The KRE's attestation that binds the signing key.
    pub kre: VerifiedAttestation,
}

impl PolicyReceipt {
    /// Checks a receipt's structure (the signer's or a decoded one).
    pub(super) fn new(body: PolicyBody, seal: Seal, binding: Vec<u8>) -> Result<Self, DecodeError> {
        check_point(&seal.public_key)?;
        if binding.is_empty() {
            return Err(DecodeError::Empty("binding"));
        }
        let len = POLICY_RECEIPT_BODY_LEN + P384_POINT_LEN + P384_SIG_LEN + 4 + binding.len();
        if len > MAX_POLICY_RECEIPT_LEN {
            return Err(DecodeError::TooLarge { len, max: MAX_POLICY_RECEIPT_LEN });
        }
        Ok(Self { body, seal, binding })
    }

    /// Strictly decodes a receipt: at most [`MAX_POLICY_RECEIPT_LEN`] bytes, version 1, an
    /// uncompressed point, a non-empty binding document, nothing after it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (body, seal, mut r) = read_signed(bytes, MAX_POLICY_RECEIPT_LEN)?;
        let len = usize::try_from(r.u32("binding_len")?).unwrap_or(usize::MAX);
        let binding = r.take(len, "binding")?.to_vec();
        r.finish()?;
        Self::new(body, seal, binding)
    }

    /// The exact encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = write_signed(&self.body, &self.seal);
        // At most MAX_POLICY_RECEIPT_LEN, checked in `new`.
        w.u32(u32::try_from(self.binding.len()).unwrap_or(u32::MAX));
        w.bytes(&self.binding);
        w.into_bytes()
    }

    /// The generation the receipt names.
    pub fn generation(&self) -> u64 {
        self.body.generation
    }

    /// The policy version the receipt names.
    pub fn policy_version(&self) -> u64 {
        self.body.policy_version
    }

    /// Checks everything the receipt claims for bundle `(policy_version, policy_digest)`: the
    /// chain id is derived from the key, the key signed the body, the binding document (under
    /// `verifier`'s root, at its own time, an enclave document) attests that key for that chain,
    /// the attested KRE has the expected PCRs, and the receipt names exactly that bundle.
    pub fn verify(
        &self,
        verifier: &Verifier,
        expect_kre_pcrs: &[PcrExpectation],
        options: TrailOptions,
        policy_version: u64,
        policy_digest: &[u8; 48],
    ) -> Result<DurablePolicy, PolicyReceiptError> {
        let (body, seal) = (&self.body, &self.seal);
        seal.check::<PolicyReceiptError>(body, verifier.crypto())?;
        let kre = attested_key(&seal.public_key, &body.chain_id, &self.binding, verifier, options)
            .map_err(PolicyReceiptError::NotAttested)?;
        pcr::check(&kre, expect_kre_pcrs).map_err(PolicyReceiptError::KreImageMismatch)?;
        if body.policy_version != policy_version || body.policy_digest != *policy_digest {
            return Err(PolicyReceiptError::OtherPolicy { expected: policy_version, found: body.policy_version });
        }
        Ok(DurablePolicy { generation: body.generation, policy_version, time_ms: body.time_ms, kre })
    }
}
