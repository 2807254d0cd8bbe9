//! A custodian's side of the unseal ceremony, without I/O (docs/durability.md).
//!
//! Every check a custodian makes before handing its share to a KRE is here, in this order:
//! the reply is an UnsealOffer → the KRE's attestation verifies (chain to the pinned root,
//! now, an enclave document, not debug) → its nonce is the custodian's fresh nonce → its PCRs
//! are the expected ones → its `user_data` binds the unseal nonce, the generation, the
//! custodian set and the shares file → its `public_key` is a valid P-384 point (K) → the
//! genesis attestation over the shares file verifies (at its own time) with the expected
//! genesis PCRs, so the shares were made inside a genuine KRE → the custodian's record: the
//! same shares file as before (unless a new genesis is explicitly accepted) and a
//! generation not older than the highest it has unsealed → only then is the custodian's
//! envelope opened and the share re-encrypted to K.

use keygate_attestation::crypto::{Crypto, P384Scalar};
use keygate_attestation::pcr::{self, PcrMismatch};
use keygate_attestation::{DocumentKind, PcrExpectation, Verifier, VerifyError, VerifyOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};

use crate::binding;
use crate::state::custody::{self, CustodyError, PublicKey, SharesFile, UnsealContext};
use crate::state::vault;
use crate::wire::{DenyCode, Message, WireError};

/// What a custodian remembers between unseals (one record per custodian set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodianRecord {
    /// Hex SHA-384 of the custodian set.
    pub set_digest: String,
    /// Hex SHA-384 of the shares file this custodian has acted on.
    pub shares_sha384: String,
    /// The highest generation this custodian has unsealed.
    pub highest_generation: u64,
}

/// What the custodian expects of the KRE.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// Verifies the KRE's documents (the pinned root).
    pub verifier: &'a Verifier,
    /// Now, in ms since the Unix epoch.
    pub now_ms: u64,
    /// PCRs the KRE must have (at least one).
    pub kre_pcrs: &'a [PcrExpectation],
    /// PCRs the genesis KRE must have had (at least one).
    pub genesis_pcrs: &'a [PcrExpectation],
    /// What this custodian did before, if anything.
    pub record: Option<&'a CustodianRecord>,
    /// Accept a shares file other than the recorded one (a new genesis, deliberately).
    pub accept_new_genesis: bool,
    /// For a reshare: the digest of the new custodian set this custodian approves. An offer
    /// that asks for a reshare to any other set (or to any set, when `None`) is refused.
    pub approve_reshare: Option<[u8; 48]>,
}

/// Why a custodian refused (or the KRE refused the custodian).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CustodianError {
    /// A frame could not be read.
    #[error("bad frame from the KRE: {0}")]
    Wire(WireError),
    /// The KRE refused.
    #[error("the KRE refused: {code}: {reason}")]
    Denied {
        /// Its code.
        code: DenyCode,
        /// Its reason.
        reason: String,
    },
    /// Another message than expected.
    #[error("unexpected {0} from the KRE")]
    Unexpected(&'static str),
    /// No expected PCRs were given: the custodian would accept any enclave.
    #[error("no expected KRE PCRs given: refusing to hand a share to an unidentified enclave")]
    NoExpectedPcrs,
    /// The KRE's attestation does not verify.
    #[error("the KRE's attestation does not verify: {0}")]
    KreAttestation(VerifyError),
    /// The KRE's attestation is not bound to this session.
    #[error("the KRE's attestation is not bound to this unseal: {0}")]
    KreBinding(&'static str),
    /// The KRE runs another image.
    #[error("the KRE's PCRs are not the expected ones: {0}")]
    KrePcr(PcrMismatch),
    /// The genesis attestation does not verify.
    #[error("the genesis attestation of the shares file does not verify: {0}")]
    GenesisAttestation(VerifyError),
    /// The genesis attestation is not over this shares file.
    #[error("the genesis attestation is not over this shares file")]
    GenesisBinding,
    /// The genesis KRE ran another image.
    #[error("the genesis KRE's PCRs are not the expected ones: {0}")]
    GenesisPcr(PcrMismatch),
    /// The KRE offers an older generation than this custodian has unsealed (a rollback).
    #[error("the KRE offers generation {offered}, older than generation {recorded} this custodian unsealed before (rollback refused)")]
    Rollback {
        /// Offered.
        offered: u64,
        /// Recorded.
        recorded: u64,
    },
    /// The shares file differs from the one this custodian acted on before.
    #[error("the shares file differs from the one this custodian acted on before (a new genesis?); pass --accept-new-genesis only if one was intended")]
    SharesChanged,
    /// The KRE asks to reshare to a set this custodian did not approve.
    #[error("the KRE asks for a reshare to the custodian set {new_set} ({threshold} of {count}); approve it with --approve-reshare {new_set}")]
    ReshareNotApproved {
        /// Hex digest of the proposed set.
        new_set: String,
        /// Its threshold.
        threshold: u8,
        /// Its size.
        count: u8,
    },
    /// This custodian approves a reshare, but the KRE offers a plain unseal.
    #[error("--approve-reshare given, but the KRE asks for an unseal, not a reshare")]
    NotAReshare,
    /// The custody layer refused (not a custodian of the set, bad file, ...).
    #[error("{0}")]
    Custody(CustodyError),
}

fn expect_ok(body: &[u8]) -> Result<Message, CustodianError> {
    match Message::decode(body).map_err(CustodianError::Wire)? {
        Message::Denied { code, reason } => Err(CustodianError::Denied { code, reason }),
        m => Ok(m),
    }
}

/// An accepted offer: the frame carrying the share, and the custodian's updated record.
#[derive(Debug)]
pub struct Response {
    /// The UnsealShare frame.
    pub frame: Vec<u8>,
    /// The record to keep.
    pub record: CustodianRecord,
    /// The generation being unsealed.
    pub generation: u64,
    /// The custodian's share index.
    pub x: u8,
    /// For a reshare: the digest of the new set approved.
    pub reshared_to: Option<[u8; 48]>,
}

/// Checks an UnsealOffer (the reply to `UnsealHello { client_nonce }`) and, if every check
/// passes, re-encrypts this custodian's share to the KRE.
pub fn on_offer(
    body: &[u8],
    client_nonce: &[u8; 32],
    expect: &Expectations<'_>,
    custodian_scalar: &P384Scalar,
    crypto: &dyn Crypto,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<Response, CustodianError> {
    if expect.kre_pcrs.is_empty() || expect.genesis_pcrs.is_empty() {
        return Err(CustodianError::NoExpectedPcrs);
    }
    let (attestation, unseal_nonce, generation, shares_bytes, genesis_attestation, reshare_to) = match expect_ok(body)?
    {
        Message::UnsealOffer { attestation, unseal_nonce, generation, shares, genesis_attestation, reshare_to } => {
            (attestation, unseal_nonce, generation, shares, genesis_attestation, reshare_to)
        }
        m => return Err(CustodianError::Unexpected(m.name())),
    };
    // A reshare needs this custodian's explicit approval of exactly that new set.
    let new_set = if reshare_to.is_empty() {
        if expect.approve_reshare.is_some() {
            return Err(CustodianError::NotAReshare);
        }
        None
    } else {
        let set = vault::decode_set(crypto, &reshare_to).map_err(CustodianError::Custody)?;
        let digest = set.digest();
        if expect.approve_reshare != Some(digest) {
            return Err(CustodianError::ReshareNotApproved {
                new_set: hex::encode(digest),
                threshold: set.threshold(),
                count: set.count(),
            });
        }
        Some(digest)
    };
    // The KRE, now.
    let mut opts = VerifyOptions::at(expect.now_ms);
    opts.require_kind = Some(DocumentKind::Enclave);
    let att = expect.verifier.verify(&attestation, &opts).map_err(CustodianError::KreAttestation)?;
    if att.nonce() != Some(client_nonce.as_slice()) {
        return Err(CustodianError::KreBinding("its nonce is not this custodian's nonce"));
    }
    pcr::check(&att, expect.kre_pcrs).map_err(CustodianError::KrePcr)?;
    let shares = SharesFile::decode(crypto, &shares_bytes).map_err(CustodianError::Custody)?;
    let set_digest = shares.set().digest();
    let shares_sha: [u8; 48] = Sha384::digest(&shares_bytes).into();
    let user_data = binding::offer_user_data(&unseal_nonce, generation, &set_digest, &shares_sha, new_set.as_ref());
    if att.user_data() != Some(user_data.as_slice()) {
        return Err(CustodianError::KreBinding("its user_data does not bind the unseal nonce, generation and shares"));
    }
    let kre_public: PublicKey = att
        .public_key()
        .and_then(|k| k.try_into().ok())
        .ok_or(CustodianError::KreBinding("it carries no 97-byte public key"))?;
    crypto.validate_p384_point(&kre_public).map_err(|_| CustodianError::Custody(CustodyError::BadKrePublicKey))?;
    // The shares were made inside a genuine KRE.
    let mut gopts = VerifyOptions::at_document_time();
    gopts.require_kind = Some(DocumentKind::Enclave);
    let genesis = expect.verifier.verify(&genesis_attestation, &gopts).map_err(CustodianError::GenesisAttestation)?;
    if genesis.user_data() != Some(binding::genesis_user_data(&shares_bytes).as_slice()) {
        return Err(CustodianError::GenesisBinding);
    }
    pcr::check(&genesis, expect.genesis_pcrs).map_err(CustodianError::GenesisPcr)?;
    // This custodian's memory.
    let set_hex = hex::encode(set_digest);
    let shares_hex = hex::encode(shares_sha);
    let mut highest = generation;
    if let Some(r) = expect.record.filter(|r| r.set_digest == set_hex) {
        if r.shares_sha384 != shares_hex {
            if !expect.accept_new_genesis {
                return Err(CustodianError::SharesChanged);
            }
        } else if generation < r.highest_generation {
            return Err(CustodianError::Rollback { offered: generation, recorded: r.highest_generation });
        } else {
            highest = highest.max(r.highest_generation);
        }
    }
    let ctx = UnsealContext {
        kre_attestation_sha384: Sha384::digest(&attestation).into(),
        unseal_nonce,
        kre_public,
        set_digest,
        generation,
    };
    let msg =
        custody::custodian_reencrypt(crypto, &shares, custodian_scalar, &ctx, rng).map_err(CustodianError::Custody)?;
    let frame = Message::UnsealShare { share: msg.encode() }.encode().map_err(CustodianError::Wire)?;
    Ok(Response {
        frame,
        record: CustodianRecord { set_digest: set_hex, shares_sha384: shares_hex, highest_generation: highest },
        generation,
        x: msg.x,
        reshared_to: new_set,
    })
}

/// The KRE's answer to a share: (have, need, serving, generation).
pub fn on_progress(body: &[u8]) -> Result<(u8, u8, bool, u64), CustodianError> {
    match expect_ok(body)? {
        Message::UnsealProgress { have, need, serving, generation } => Ok((have, need, serving, generation)),
        m => Err(CustodianError::Unexpected(m.name())),
    }
}
