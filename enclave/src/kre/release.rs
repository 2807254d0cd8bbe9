//! The release channel's connection: Hello → Challenge, then Release → Released, each
//! refusal a `Denied`. Every security decision of a release is here (or in
//! `keygate-attestation`), in this order: frame → state → request ids → attestation (chain,
//! signature, time, debug) → nonce (this connection's challenge, unexpired, unused) →
//! `user_data` = request digest → `public_key` a valid P-384 point → policy (cluster, PCRs,
//! kind, expiry) → derive and wrap. Trusts the verifier, the policy book, the KEK source and
//! the audit log it borrows. Spec: docs/protocol.md.

use keygate_attestation::policy::{self, ClusterRule, PolicyDenial};
use keygate_attestation::{AttestRequest, UnknownFields, VerifyError, VerifyOptions, VerifyTime};
use sha2::{Digest, Sha384};

use crate::audit::{AuditEvent, Requester};
use crate::crypto::keys::{self, Transcript, WrappingKey};
use crate::state::vault::Phase;
use crate::wire::{self, ty, Id, Message};

use super::challenges::Redeem;
use super::error::{Denial, Error, Stage};
use super::{encode, kre_user_data, millis, Env, Event, Kre, Step};

/// The state of a release connection, named for what it waits for.
#[derive(Debug)]
pub(super) enum ReleaseConnection {
    ExpectHello,
    ExpectRelease(Box<Challenged>),
    Done,
}

/// What a connection holds between its Challenge and its Release.
#[derive(Debug)]
pub(super) struct Challenged {
    client_nonce: [u8; 32],
    server_nonce: [u8; 32],
    kre_attestation_sha384: [u8; 48],
    /// The wrapping key whose point the Challenge's attestation carries.
    wrapping: WrappingKey,
}

impl ReleaseConnection {
    /// Whether the connection takes a request of type `t` now.
    pub(super) fn expects(&self, t: u8) -> bool {
        match self {
            Self::ExpectHello => t == ty::HELLO,
            Self::ExpectRelease(_) => t == ty::RELEASE,
            Self::Done => false,
        }
    }

    /// What the connection waits for (`None`: finished).
    pub(super) fn expected(&self) -> Option<&'static str> {
        match self {
            Self::ExpectHello => Some("Hello"),
            Self::ExpectRelease(_) => Some("Release"),
            Self::Done => None,
        }
    }

    /// Finishes the connection, releasing its challenge.
    pub(super) fn abandon(&mut self, kre: &Kre) {
        if let Self::ExpectRelease(c) = std::mem::replace(self, Self::Done) {
            kre.challenges.table().forget(&c.server_nonce);
        }
    }

    /// Handles a decoded request this connection takes.
    pub(super) fn on_message(&mut self, kre: &Kre, msg: Message, env: &mut Env<'_>) -> Result<Step, Denial> {
        match (std::mem::replace(self, Self::Done), msg) {
            (Self::ExpectHello, Message::Hello { client_nonce }) => {
                let (step, challenged) = hello(kre, client_nonce, env)?;
                *self = Self::ExpectRelease(Box::new(challenged));
                Ok(step)
            }
            (Self::ExpectRelease(c), Message::Release { cluster_id, key_ids, attestation }) => {
                let c = *c;
                let t = Transcript {
                    client_nonce: c.client_nonce,
                    server_nonce: c.server_nonce,
                    kre_attestation_sha384: c.kre_attestation_sha384,
                    client_attestation_sha384: Sha384::digest(&attestation).into(),
                    request_digest: wire::request_digest(&cluster_id, &key_ids),
                };
                release(kre, &c.server_nonce, t, c.wrapping, cluster_id, key_ids, &attestation, env)
            }
            (state, m) => {
                // Not reached through on_frame, whose header check refuses every frame this
                // connection does not take; kept total rather than a panic.
                if let Self::ExpectRelease(c) = &state {
                    kre.challenges.table().forget(&c.server_nonce);
                }
                Err(Error::NoHandler(m.name()).into())
            }
        }
    }
}

/// A Challenge: this connection's server nonce and wrapping key, attested by the KRE.
fn hello(kre: &Kre, client_nonce: [u8; 32], env: &mut Env<'_>) -> Result<(Step, Challenged), Denial> {
    let mut server_nonce = [0u8; 32];
    (env.rng)(&mut server_nonce);
    // The key this connection's keys will be wrapped under: its point goes into the KRE's
    // own attestation, so a client accepts a wrap only from the attested KRE.
    let wrapping = WrappingKey::generate(kre.crypto, &mut *env.rng).map_err(Error::WrappingKey)?;
    if !kre.challenges.table().issue(server_nonce, env.now_ms) {
        return Err(Error::Busy.into());
    }
    let req = AttestRequest {
        nonce: Some(client_nonce.to_vec()),
        user_data: Some(kre_user_data(&server_nonce).to_vec()),
        public_key: Some(wrapping.point().to_vec()),
    };
    let kre_attestation = match kre.nsm.attest(&req) {
        Ok(doc) => doc,
        Err(e) => {
            kre.challenges.table().forget(&server_nonce);
            return Err(Error::KreAttestation(e).into());
        }
    };
    let kre_attestation_sha384 = Sha384::digest(&kre_attestation).into();
    let reply = encode(Message::Challenge { server_nonce, kre_attestation }, "challenge")?;
    let challenged = Challenged { client_nonce, server_nonce, kre_attestation_sha384, wrapping };
    Ok((Step { reply, close: false, event: Event::ChallengeIssued }, challenged))
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
) -> Result<Step, Denial> {
    let policy = kre.policy(env.now_ms);
    let undurable = kre.undurable_policy(env.now_ms);
    let with = |error, requester: &Option<Requester>| Denial {
        error,
        stage: Stage::Release,
        cluster: Some(cluster.clone()),
        requester: requester.clone(),
        key_ids: key_ids.clone(),
    };
    let forget = || kre.challenges.table().forget(server_nonce);
    let mut requester: Option<Requester> = None;

    // Fail closed: when the audit buffer has only its reserve left, no release is made.
    if kre.audit().is_full() {
        forget();
        return Err(with(Error::AuditFull, &requester));
    }

    // With custodians: nothing is released while sealed, or while the policy chain is behind
    // the head recorded in the sealed state.
    kre.settle_unseal(env.now_ms);
    if let Some(state) = &kre.state {
        let phase = state.phase();
        if phase != Phase::Serving {
            forget();
            return Err(with(Error::Sealed(phase), &requester));
        }
        let floor = state.vault().policy_floor();
        if let Err(e) = floor.map_or(Ok(()), |f| kre.policy.check_floor(f)) {
            forget();
            return Err(with(e, &requester));
        }
    }
    // The pipeline's word that the newest policy is still the newest, when the policy asks
    // for it: without it, a copy kept on an old policy would release for as long as its
    // parent liked.
    if let Err(e) = kre.policy.check_fresh(env.now_ms) {
        forget();
        return Err(with(e, &requester));
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
            forget();
            return Err(with(Error::DebugAttestation, &requester));
        }
        Err(e) => {
            forget();
            return Err(with(Error::AttestationInvalid(e), &requester));
        }
    };
    requester = Some(Requester::from_verified(&att));

    // Freshness: the document must carry this connection's challenge, unexpired, unused.
    let doc_nonce = att.nonce().unwrap_or_default();
    if doc_nonce != server_nonce.as_slice() {
        let mut table = kre.challenges.table();
        table.forget(server_nonce);
        let e = if table.was_used(doc_nonce) { Error::ReplayedChallenge } else { Error::NonceMismatch };
        return Err(with(e, &requester));
    }
    let redeemed = kre.challenges.table().redeem(server_nonce, env.now_ms);
    match redeemed {
        Redeem::Ok => {}
        Redeem::Expired => {
            return Err(with(Error::ChallengeExpired { ttl_ms: millis(kre.config.challenge_ttl) }, &requester))
        }
        Redeem::Reused => return Err(with(Error::ChallengeReused, &requester)),
        Redeem::Unknown => return Err(with(Error::ChallengeUnknown, &requester)),
    }

    // The request binding and the key to wrap to.
    if att.user_data() != Some(transcript.request_digest.as_slice()) {
        return Err(with(Error::UserDataMismatch, &requester));
    }
    let Some(client_point) = att.public_key() else {
        return Err(with(Error::NoPublicKey, &requester));
    };
    if kre.crypto.validate_p384_point(client_point).is_err() {
        return Err(with(Error::BadPublicKey, &requester));
    }

    // Policy. What only a newer, not yet durable policy allows waits for the parent's commit
    // (retryable, never read as a revocation); what the newest denies is refused for its reason.
    let verdict = match (policy::evaluate(&policy, &att, cluster.as_str(), env.now_ms), &undurable) {
        (Ok(image), _) => Ok(image.name.clone()),
        (Err(e), None) => Err(e),
        (Err(e), Some(newest)) => match policy::evaluate(newest, &att, cluster.as_str(), env.now_ms) {
            Ok(_) => return Err(with(Error::NewestNotDurable(e), &requester)),
            Err(newest_denial) => Err(newest_denial),
        },
    };
    let image = verdict.map_err(|e| {
        with(
            match e {
                PolicyDenial::UnknownCluster(c) => Error::UnknownCluster(c),
                PolicyDenial::DebugMode => Error::PolicyDebugMode,
                e => Error::Policy(e),
            },
            &requester,
        )
    })?;

    // Derive and wrap: for each key id, the current version and the still-active older ones
    // the effective policy does not retire.
    let rule = policy.clusters.get(cluster.as_str()).map_or_else(ClusterRule::default, |r| ClusterRule {
        images: Vec::new(),
        kek_version: r.kek_version,
        kek_retire_below: r.kek_retire_below,
    });
    let keks = kre.keks.releasable(kre.state.as_ref(), &cluster, &rule).map_err(|e| with(e, &requester))?;
    let mut data_keys = Vec::with_capacity(key_ids.len() * keks.len());
    for k in &key_ids {
        for (version, kek) in &keks {
            let dk = keys::derive_data_key(kre.crypto, kek, &cluster, k, *version)
                .map_err(|e| with(Error::Derive(e), &requester))?;
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
            return Err(with(Error::ReleaseNotRecorded(e), &requester));
        }
        let (seq, digest) = log.head();
        (seq, digest, log.signer_handle())
    };
    let receipt = signer
        .sign_receipt(seq, entry_digest, att.document_sha384())
        .map_err(|e| with(Error::Receipt(e), &requester))?;
    let (ephemeral_point, wrapped) =
        keys::wrap_bound(kre.crypto, &transcript, client_point, &data_keys, wrapping, &receipt.to_bytes())
            .map_err(|e| with(Error::Wrap(e), &requester))?;
    let reply = Message::Released { ephemeral_point, keys: wrapped, receipt: Box::new(receipt) }
        .encode()
        .map_err(|source| with(Error::Encode { what: "Released", source }, &requester))?;
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
