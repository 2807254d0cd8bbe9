//! A custodian's side of the unseal ceremony, without I/O (docs/durability.md).
//!
//! Every check a custodian makes before handing its share to a KRE is here, in this order:
//! the reply is an UnsealOffer → the KRE's attestation verifies (chain to the pinned root,
//! now, an enclave document, not debug) → its nonce is the custodian's fresh nonce → its PCRs
//! are the expected ones → its `user_data` binds the unseal nonce, the generation, the
//! custodian set and the shares file → its `public_key` is a valid P-384 point (K) → the
//! genesis attestation over the shares file verifies (at its own time) with the expected
//! genesis PCRs, so the shares were made inside a genuine KRE → the custodian's record
//! ([`check_record`]): the same shares file as before (unless a new genesis is explicitly
//! accepted), a generation not older than the highest it has unsealed, and at that same
//! generation the same blob (its SHA-384) → only then is the custodian's envelope opened and
//! the share re-encrypted to K.
//!
//! A generation number alone does not name a sealed state: a KRE restarted from generation
//! g−1 seals a new generation g with new KEKs, so two valid blobs of generation g can exist.
//! The offer names the exact blob (its SHA-384, bound by the attestation's `user_data` and by
//! the share's transcript), and the record keeps (generation, blob digest): a parent that
//! switches to another blob of a generation a custodian has unsealed is refused
//! ([`CustodianError::Fork`]). The caller stores the new record before it sends the share.

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
    /// Hex SHA-384 of the sealed blob it unsealed at `highest_generation`. `None` only in a
    /// record written before blobs were recorded: the next unseal at that generation records
    /// the blob it is offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_sha384: Option<String>,
}

/// What an offer asks a custodian to act on, as [`check_record`] compares it with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offered {
    /// SHA-384 of the custodian set.
    pub set_digest: [u8; 48],
    /// SHA-384 of the shares file.
    pub shares_sha384: [u8; 48],
    /// The generation offered.
    pub generation: u64,
    /// SHA-384 of the exact sealed blob offered.
    pub blob_sha384: [u8; 48],
}

/// The custodian's decision on its record, without I/O: `Ok` with the record to keep, or the
/// refusal. `record` may be for another set (then it is not this set's memory).
///
/// - no record for this set: accept, remember (generation, blob);
/// - another shares file: refuse ([`CustodianError::SharesChanged`]) unless a new genesis is
///   accepted, which starts a new record;
/// - a lower generation than recorded: refuse ([`CustodianError::Rollback`]), whatever the blob;
/// - the recorded generation: only the recorded blob ([`CustodianError::Fork`] otherwise; a
///   record without a blob accepts and records the one offered);
/// - a higher generation: accept, remember (generation, blob).
pub fn check_record(
    record: Option<&CustodianRecord>,
    offered: &Offered,
    accept_new_genesis: bool,
) -> Result<CustodianRecord, CustodianError> {
    let set_hex = hex::encode(offered.set_digest);
    let shares_hex = hex::encode(offered.shares_sha384);
    let blob_hex = hex::encode(offered.blob_sha384);
    let fresh = CustodianRecord {
        set_digest: set_hex.clone(),
        shares_sha384: shares_hex.clone(),
        highest_generation: offered.generation,
        blob_sha384: Some(blob_hex.clone()),
    };
    let Some(r) = record.filter(|r| r.set_digest == set_hex) else {
        return Ok(fresh);
    };
    if r.shares_sha384 != shares_hex {
        return if accept_new_genesis { Ok(fresh) } else { Err(CustodianError::SharesChanged) };
    }
    match offered.generation.cmp(&r.highest_generation) {
        std::cmp::Ordering::Less => {
            Err(CustodianError::Rollback { offered: offered.generation, recorded: r.highest_generation })
        }
        std::cmp::Ordering::Equal => match &r.blob_sha384 {
            Some(recorded) if *recorded != blob_hex => Err(CustodianError::Fork {
                generation: offered.generation,
                offered: blob_hex,
                recorded: recorded.clone(),
            }),
            _ => Ok(fresh),
        },
        std::cmp::Ordering::Greater => Ok(fresh),
    }
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
    /// This custodian states that no member of the KRE's cluster serves, and consents to a
    /// cold start (the KRE serving without a member's confirmation). An offer for a cold
    /// start is refused without it, and it is refused for any other offer.
    pub cold_start: bool,
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
    /// The KRE offers another blob of the generation this custodian unsealed (a fork: two
    /// sealed states of one generation, with different KEKs).
    #[error("the KRE offers generation {generation} as blob {offered}, but this custodian unsealed generation {generation} as blob {recorded} (a fork of that generation: refused)")]
    Fork {
        /// The generation.
        generation: u64,
        /// Hex SHA-384 of the blob offered.
        offered: String,
        /// Hex SHA-384 of the blob recorded.
        recorded: String,
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
    /// The KRE asks for a cold start this custodian did not consent to.
    #[error("the KRE asks for a cold start: it would serve generation {generation} without any other member confirming it is the newest; pass --cold-start only if you know that no member of the cluster serves")]
    ColdStartNotApproved {
        /// The generation offered.
        generation: u64,
    },
    /// This custodian consents to a cold start, but the KRE offers something else.
    #[error("--cold-start given, but the KRE does not ask for a cold start")]
    NotAColdStart,
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
        Message::UnsealOffer {
            attestation,
            unseal_nonce,
            generation,
            shares,
            genesis_attestation,
            reshare_to,
            blob_sha384,
            cold_start,
        } => {
            (attestation, unseal_nonce, (generation, blob_sha384, cold_start), shares, genesis_attestation, reshare_to)
        }
        m => return Err(CustodianError::Unexpected(m.name())),
    };
    let (generation, blob_sha384, cold_start) = generation;
    // A cold start needs this custodian's explicit word that no member serves.
    match (cold_start, expect.cold_start) {
        (true, false) => return Err(CustodianError::ColdStartNotApproved { generation }),
        (false, true) => return Err(CustodianError::NotAColdStart),
        _ => {}
    }
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
    let user_data = binding::offer_user_data(
        &unseal_nonce,
        generation,
        &blob_sha384,
        &set_digest,
        &shares_sha,
        new_set.as_ref(),
        cold_start,
    );
    if att.user_data() != Some(user_data.as_slice()) {
        return Err(CustodianError::KreBinding(
            "its user_data does not bind the unseal nonce, generation, blob and shares",
        ));
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
    let offered = Offered { set_digest, shares_sha384: shares_sha, generation, blob_sha384 };
    let record = check_record(expect.record, &offered, expect.accept_new_genesis)?;
    let ctx = UnsealContext {
        kre_attestation_sha384: Sha384::digest(&attestation).into(),
        unseal_nonce,
        kre_public,
        set_digest,
        generation,
        blob_sha384,
    };
    let msg =
        custody::custodian_reencrypt(crypto, &shares, custodian_scalar, &ctx, rng).map_err(CustodianError::Custody)?;
    let frame = Message::UnsealShare { share: msg.encode() }.encode().map_err(CustodianError::Wire)?;
    Ok(Response { frame, record, generation, x: msg.x, reshared_to: new_set })
}

/// The KRE's answer to a share: (have, need, serving, generation).
pub fn on_progress(body: &[u8]) -> Result<(u8, u8, bool, u64), CustodianError> {
    match expect_ok(body)? {
        Message::UnsealProgress { have, need, serving, generation } => Ok((have, need, serving, generation)),
        m => Err(CustodianError::Unexpected(m.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: [u8; 48] = [1; 48];
    const SHARES: [u8; 48] = [2; 48];
    const A: [u8; 48] = [0xa; 48];
    const B: [u8; 48] = [0xb; 48];

    fn offer(generation: u64, blob: [u8; 48]) -> Offered {
        Offered { set_digest: SET, shares_sha384: SHARES, generation, blob_sha384: blob }
    }

    fn record(generation: u64, blob: Option<[u8; 48]>) -> CustodianRecord {
        CustodianRecord {
            set_digest: hex::encode(SET),
            shares_sha384: hex::encode(SHARES),
            highest_generation: generation,
            blob_sha384: blob.map(hex::encode),
        }
    }

    fn ok(r: Option<&CustodianRecord>, o: &Offered) -> CustodianRecord {
        check_record(r, o, false).expect("accepted")
    }

    #[test]
    fn no_record_or_another_sets_record_accepts_and_records_generation_and_blob() {
        assert_eq!(ok(None, &offer(3, A)), record(3, Some(A)));
        let other = CustodianRecord { set_digest: hex::encode([9u8; 48]), ..record(9, Some(B)) };
        assert_eq!(ok(Some(&other), &offer(3, A)), record(3, Some(A)));
    }

    #[test]
    fn a_higher_generation_is_accepted_with_any_blob_and_recorded() {
        assert_eq!(ok(Some(&record(3, Some(A))), &offer(4, B)), record(4, Some(B)));
        assert_eq!(ok(Some(&record(3, Some(A))), &offer(4, A)), record(4, Some(A)));
        assert_eq!(ok(Some(&record(3, None)), &offer(9, A)), record(9, Some(A)));
    }

    #[test]
    fn the_recorded_generation_opens_only_as_the_recorded_blob() {
        // The same blob again (a restart with nothing committed since): accepted.
        assert_eq!(ok(Some(&record(3, Some(A))), &offer(3, A)), record(3, Some(A)));
        // The parent switches to the other fork of generation 3 at a restart: refused.
        let err = check_record(Some(&record(3, Some(A))), &offer(3, B), false).expect_err("fork");
        assert!(
            matches!(&err, CustodianError::Fork { generation: 3, offered, recorded }
                if *offered == hex::encode(B) && *recorded == hex::encode(A)),
            "{err:?}"
        );
        // accept_new_genesis is about another shares file, not about a fork.
        assert!(matches!(
            check_record(Some(&record(3, Some(A))), &offer(3, B), true),
            Err(CustodianError::Fork { .. })
        ));
        // A record written before blobs were recorded learns the blob at its generation.
        assert_eq!(ok(Some(&record(3, None)), &offer(3, B)), record(3, Some(B)));
    }

    #[test]
    fn a_lower_generation_is_refused_whatever_the_blob() {
        for blob in [A, B] {
            for r in [record(5, Some(A)), record(5, None)] {
                let err = check_record(Some(&r), &offer(4, blob), false).expect_err("rollback");
                assert!(matches!(err, CustodianError::Rollback { offered: 4, recorded: 5 }), "{err:?}");
                let err = check_record(Some(&r), &offer(0, blob), false).expect_err("rollback");
                assert!(matches!(err, CustodianError::Rollback { offered: 0, recorded: 5 }), "{err:?}");
            }
        }
    }

    #[test]
    fn another_shares_file_is_refused_unless_a_new_genesis_is_accepted() {
        let changed = Offered { shares_sha384: [7; 48], ..offer(1, B) };
        let err = check_record(Some(&record(5, Some(A))), &changed, false).expect_err("changed");
        assert!(matches!(err, CustodianError::SharesChanged), "{err:?}");
        let fresh = check_record(Some(&record(5, Some(A))), &changed, true).expect("new genesis");
        assert_eq!(fresh, CustodianRecord { shares_sha384: hex::encode([7u8; 48]), ..record(1, Some(B)) });
    }

    /// A quorum of custodians whose records hold a newer (generation, digest) refuse an older
    /// state, and custodians that unsealed one fork refuse the other: each one's decision.
    #[test]
    fn a_quorum_with_newer_records_refuses_an_older_state_and_the_other_fork() {
        let records = [record(7, Some(A)), record(7, Some(A)), record(6, Some(B))];
        let refusals = |o: &Offered| records.iter().filter(|r| check_record(Some(r), o, false).is_err()).count();
        assert_eq!(refusals(&offer(6, B)), 2, "two of three hold generation 7: no 2-of-3 quorum for 6");
        assert_eq!(refusals(&offer(7, B)), 2, "the other blob of generation 7: refused by those that unsealed A");
        assert_eq!(refusals(&offer(7, A)), 0);
        assert_eq!(refusals(&offer(8, B)), 0);
    }

    #[test]
    fn a_record_without_a_blob_reads_and_a_record_with_one_round_trips() {
        let old = r#"{"set_digest":"aa","shares_sha384":"bb","highest_generation":4}"#;
        let r: CustodianRecord = serde_json::from_str(old).expect("old record");
        assert_eq!(r.blob_sha384, None);
        let new = record(4, Some(A));
        let json = serde_json::to_string(&new).expect("json");
        assert!(json.contains("blob_sha384"));
        assert_eq!(serde_json::from_str::<CustodianRecord>(&json).expect("back"), new);
    }
}
