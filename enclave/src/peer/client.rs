//! The control-plane side of the boot key fetch, without I/O: a state machine that
//! produces the frames to send and checks the frames received.
//!
//! It verifies the KRE's attestation (mutual attestation: the KRE's document must carry the
//! client's nonce, bind the server nonce in `user_data`, carry the KRE's wrapping key for this
//! connection in `public_key`, verify to the pinned root, be an enclave document, and have the
//! expected PCRs), attests itself with a fresh ephemeral P-384 key, and unwraps the released
//! keys — only if they are wrapped under the wrapping key the KRE attested. That last check is
//! what makes a relay (the parent, or anyone on the path) unable to answer the Release with
//! keys of its own choice: it cannot obtain a KRE document naming a key it holds.
//!
//! The `Released` also carries the release's audit receipt. Every key's wrap binds the
//! receipt's bytes, so the receipt is the attested KRE's for this very release; the client
//! checks its signature under the key it names, and that it names this client's attestation
//! document, before it opens any key. A receipt that fails is an attack: no key is returned.

use keygate_attestation::crypto::{p384_scalar_from, Crypto, CryptoError, P384Scalar};
use keygate_attestation::{
    pcr, AttestRequest, DocumentKind, Nsm, NsmError, PcrExpectation, PcrMismatch, Verifier, VerifyError, VerifyOptions,
};
use sha2::{Digest, Sha384};

use crate::audit::{Receipt, ReceiptError};
use crate::binding::kre_user_data;
use crate::crypto::keys::{self, DataKey, Transcript};
use crate::wire::{self, DenyCode, Id, Message, WireError, POINT_LEN};

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The KRE refused, saying why.
    #[error("the KRE denied the request: {code}: {reason}")]
    Denied { code: DenyCode, reason: String },
    /// The KRE's attestation did not verify.
    #[error("KRE attestation refused: {0}")]
    KreAttestation(VerifyError),
    /// The KRE's PCRs are not the expected ones.
    #[error("KRE attestation refused: {0}")]
    KrePcr(PcrMismatch),
    /// The KRE's attestation does not carry our nonce, does not bind its challenge, or
    /// carries no usable wrapping key.
    #[error("KRE attestation refused: {0}")]
    KreBinding(&'static str),
    /// `Released` is wrapped under a key other than the one the KRE attested in its Challenge:
    /// someone other than the attested KRE answered the Release (a relay substituting keys).
    #[error("Released refused: its keys are wrapped under a key the KRE did not attest (a relay answered in the KRE's place)")]
    UnattestedWrap,
    /// The audit receipt in `Released` is forged or belongs to another release: a relay
    /// substituted it (the genuine KRE signs each release's own).
    #[error("Released refused: its audit receipt is not this release's: {0}")]
    Receipt(ReceiptError),
    /// The KRE sent something that is not a valid frame.
    #[error("bad frame from the KRE: {0}")]
    Wire(WireError),
    /// The KRE sent a valid message at the wrong time.
    #[error("unexpected {0} from the KRE")]
    Unexpected(&'static str),
    /// The local NSM failed.
    #[error("local NSM: {0}")]
    Nsm(NsmError),
    /// The released keys could not be unwrapped (transcript or ciphertext tampered).
    #[error("released keys could not be unwrapped: {0}")]
    Unwrap(CryptoError),
    /// The Released message does not answer the request.
    #[error("Released does not match the request: {0}")]
    Mismatch(&'static str),
    /// A transport failure.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
}

/// What failed on the way to the KRE (the connection, not the KRE's answer): always worth a
/// retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No connection could be made to the address.
    #[error("connecting to {kre}: {kind}")]
    Connect {
        /// The KRE's address as given.
        kre: String,
        /// Why, as the operating system said.
        kind: std::io::ErrorKind,
    },
    /// The whole attempt took longer than its limit.
    #[error("no answer from {kre} within {within:?}")]
    NoAnswer {
        /// The KRE's address as given.
        kre: String,
        /// The attempt's limit.
        within: std::time::Duration,
    },
    /// The KRE (or the proxy) closed the connection before its answer started.
    #[error("the connection closed before the KRE answered")]
    Closed,
    /// A frame did not arrive whole within the limit.
    #[error("timed out waiting for a frame")]
    FrameTimeout,
    /// A frame the client refuses to read (its length prefix, its type's cap).
    #[error("a frame from the KRE: {0}")]
    Unreadable(wire::Unreadable),
    /// A frame could not be sent or read whole (a close mid-frame, a reset).
    #[error("sending or reading a frame: {0}")]
    Frame(std::io::ErrorKind),
}

impl ClientError {
    /// Whether retrying later may succeed (transport trouble, a busy or restarting KRE, a full
    /// audit buffer that the parent has not collected yet: capacity, never a revocation).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Denied { code, .. } => matches!(
                code,
                DenyCode::Busy
                    | DenyCode::ChallengeExpired
                    | DenyCode::Sealed
                    | DenyCode::StatePending
                    | DenyCode::PolicyStale
                    | DenyCode::PolicyNotDurable
                    | DenyCode::ActivationPending
                    | DenyCode::Timeout
                    | DenyCode::Internal
                    | DenyCode::AuditFull
                    | DenyCode::AuditUnacknowledged
            ),
            _ => false,
        }
    }

    /// Whether the KRE's answer failed a check that only someone other than the genuine,
    /// expected KRE can fail: a relay or a substituted KRE. Never a revocation: a caller that
    /// holds keys keeps them and reports the refused answer.
    pub fn is_attack(&self) -> bool {
        matches!(
            self,
            ClientError::KreAttestation(_)
                | ClientError::KrePcr(_)
                | ClientError::KreBinding(_)
                | ClientError::UnattestedWrap
                | ClientError::Receipt(_)
                | ClientError::Wire(_)
                | ClientError::Unexpected(_)
                | ClientError::Unwrap(_)
                | ClientError::Mismatch(_)
        )
    }

    /// Whether the KRE itself refused for good (its policy no longer allows this requester):
    /// what a KMS plugin treats as a revocation. Transient refusals, failures of the local NSM
    /// and answers that fail the client's checks ([`Self::is_attack`]) are not.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Denied { .. }) && !self.is_retryable()
    }
}

/// What to request and how to check the KRE.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The cluster.
    pub cluster: Id,
    /// The keys.
    pub key_ids: Vec<Id>,
    /// PCRs the KRE must have.
    pub expect_kre_pcrs: Vec<PcrExpectation>,
    /// Other KRE images accepted instead, each its own PCRs (during a KRE upgrade, the old
    /// image and the new): the KRE must match one image entirely.
    pub also_accept_kre: Vec<Vec<PcrExpectation>>,
}

/// A released data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedKey {
    /// The key id.
    pub key_id: Id,
    /// The KEK version it derives from.
    pub version: u32,
    /// The key.
    pub key: DataKey,
}

/// What a successful fetch returns: the keys, and the audit receipt to keep beside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedKeys {
    /// The keys, in the order of the `Released`.
    pub keys: Vec<ReleasedKey>,
    /// The release's audit receipt, verified: signed by the KRE's audit key, for this client's
    /// attestation document, bound by every key's wrap.
    pub receipt: Receipt,
}

/// Waiting for the Challenge.
#[derive(Debug)]
pub struct AwaitChallenge {
    request: FetchRequest,
    client_nonce: [u8; 32],
}

/// Waiting for Released.
#[derive(Debug)]
pub struct AwaitReleased {
    request: FetchRequest,
    transcript: Transcript,
    scalar: P384Scalar,
    /// The KRE's wrapping key for this connection, from its verified attestation.
    kre_wrapping_point: [u8; POINT_LEN],
    /// The Release frame that was sent (kept so tests and the demo can replay it).
    pub release_frame: Vec<u8>,
}

/// Starts a fetch: the Hello frame to send.
pub fn start(request: FetchRequest, rng: &mut dyn FnMut(&mut [u8])) -> Result<(AwaitChallenge, Vec<u8>), ClientError> {
    let mut client_nonce = [0u8; 32];
    rng(&mut client_nonce);
    let frame = Message::Hello { client_nonce }.encode().map_err(ClientError::Wire)?;
    Ok((AwaitChallenge { request, client_nonce }, frame))
}

fn expect_ok(body: &[u8]) -> Result<Message, ClientError> {
    match Message::decode(body).map_err(ClientError::Wire)? {
        Message::Denied { code, reason } => Err(ClientError::Denied { code, reason }),
        m => Ok(m),
    }
}

impl AwaitChallenge {
    /// Checks the Challenge and the KRE's attestation; attests and returns the Release frame.
    pub fn on_challenge(
        self,
        body: &[u8],
        kre_verifier: &Verifier,
        now_ms: u64,
        nsm: &dyn Nsm,
        crypto: &dyn Crypto,
        rng: &mut dyn FnMut(&mut [u8]),
    ) -> Result<AwaitReleased, ClientError> {
        let (server_nonce, kre_attestation) = match expect_ok(body)? {
            Message::Challenge { server_nonce, kre_attestation } => (server_nonce, kre_attestation),
            m => return Err(ClientError::Unexpected(m.name())),
        };
        let mut opts = VerifyOptions::at(now_ms);
        opts.require_kind = Some(DocumentKind::Enclave);
        let att = kre_verifier.verify(&kre_attestation, &opts).map_err(ClientError::KreAttestation)?;
        if att.nonce() != Some(self.client_nonce.as_slice()) {
            return Err(ClientError::KreBinding("its nonce is not our Hello nonce"));
        }
        if att.user_data() != Some(kre_user_data(&server_nonce).as_slice()) {
            return Err(ClientError::KreBinding("its user_data does not bind the challenge"));
        }
        let images = std::iter::once(&self.request.expect_kre_pcrs).chain(&self.request.also_accept_kre);
        pcr::check_any(&att, images.map(Vec::as_slice)).map_err(ClientError::KrePcr)?;
        let kre_wrapping_point: [u8; POINT_LEN] = att
            .public_key()
            .filter(|p| crypto.validate_p384_point(p).is_ok())
            .and_then(|p| p.try_into().ok())
            .ok_or(ClientError::KreBinding("its public_key is not a P-384 wrapping key"))?;

        let (scalar, point) = p384_scalar_from(crypto, &mut *rng).map_err(ClientError::Unwrap)?;
        let request_digest = wire::request_digest(&self.request.cluster, &self.request.key_ids);
        let attestation = nsm
            .attest(&AttestRequest {
                nonce: Some(server_nonce.to_vec()),
                user_data: Some(request_digest.to_vec()),
                public_key: Some(point),
            })
            .map_err(ClientError::Nsm)?;
        let transcript = Transcript {
            client_nonce: self.client_nonce,
            server_nonce,
            kre_attestation_sha384: Sha384::digest(&kre_attestation).into(),
            client_attestation_sha384: Sha384::digest(&attestation).into(),
            request_digest,
        };
        let release_frame = Message::Release {
            cluster_id: self.request.cluster.clone(),
            key_ids: self.request.key_ids.clone(),
            attestation,
        }
        .encode()
        .map_err(ClientError::Wire)?;
        Ok(AwaitReleased { request: self.request, transcript, scalar, kre_wrapping_point, release_frame })
    }
}

impl AwaitReleased {
    /// Checks the audit receipt and unwraps the released keys; they must answer exactly the
    /// request.
    pub fn on_released(self, body: &[u8], crypto: &dyn Crypto) -> Result<ReleasedKeys, ClientError> {
        let (ephemeral_point, wrapped, receipt) = match expect_ok(body)? {
            Message::Released { ephemeral_point, keys, receipt } => (ephemeral_point, keys, receipt),
            m => return Err(ClientError::Unexpected(m.name())),
        };
        // Only the attested KRE holds the scalar of the point its Challenge carried.
        if ephemeral_point != self.kre_wrapping_point {
            return Err(ClientError::UnattestedWrap);
        }
        // Each asked key id, in order, with one or more distinct KEK versions (the current one
        // first, then the still-active older ones).
        let asked: Vec<&Id> = self.request.key_ids.iter().collect();
        let mut got: Vec<&Id> = wrapped.iter().map(|w| &w.key_id).collect();
        got.dedup();
        if asked != got {
            return Err(ClientError::Mismatch("key ids differ from the request"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if !wrapped.iter().all(|w| seen.insert((&w.key_id, w.version))) {
            return Err(ClientError::Mismatch("a key version appears twice"));
        }
        // The receipt: signed by the key it names, for our document. That the key is the KRE's
        // audit key follows from the unwrap below: every wrap binds the receipt's bytes.
        receipt.verify_for(crypto, &self.transcript.client_attestation_sha384).map_err(ClientError::Receipt)?;
        let point: &[u8; POINT_LEN] = &ephemeral_point;
        let keys = keys::unwrap_bound(crypto, &self.transcript, &self.scalar, point, &wrapped, &receipt.to_bytes())
            .map_err(ClientError::Unwrap)?;
        let keys = keys.into_iter().map(|(key_id, version, key)| ReleasedKey { key_id, version, key }).collect();
        Ok(ReleasedKeys { keys, receipt: *receipt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retry classification is a decision the fetch loop and the KMS plugin act on: a
    /// refusal on policy or attestation grounds must never be retried (it would hammer the KRE
    /// and hide the refusal), while a busy, restarting or sealed KRE must be.
    #[test]
    fn exactly_the_transient_refusals_and_transport_errors_are_retryable() {
        let transient = [
            DenyCode::Busy,
            DenyCode::ChallengeExpired,
            DenyCode::Sealed,
            DenyCode::StatePending,
            DenyCode::PolicyStale,
            DenyCode::PolicyNotDurable,
            DenyCode::ActivationPending,
            DenyCode::Timeout,
            DenyCode::Internal,
            DenyCode::AuditFull,
            DenyCode::AuditUnacknowledged,
        ];
        for &code in DenyCode::ALL.iter().chain([DenyCode::Unknown(999)].iter()) {
            let e = ClientError::Denied { code, reason: "r".into() };
            assert_eq!(e.is_retryable(), transient.contains(&code), "{code}");
        }
        for t in [
            TransportError::Connect { kre: "unix:/x".into(), kind: std::io::ErrorKind::ConnectionRefused },
            TransportError::NoAnswer { kre: "unix:/x".into(), within: std::time::Duration::from_secs(1) },
            TransportError::Closed,
            TransportError::FrameTimeout,
            TransportError::Frame(std::io::ErrorKind::UnexpectedEof),
        ] {
            assert!(ClientError::from(t).is_retryable());
        }
        // Exactly the final denials read as a refusal; an answer failing the client's checks
        // is an attack, never a refusal; a local NSM failure is neither.
        for &code in DenyCode::ALL.iter() {
            let e = ClientError::Denied { code, reason: "r".into() };
            assert_eq!(e.is_refusal(), !transient.contains(&code), "{code}");
            assert!(!e.is_attack());
        }
        for e in [
            ClientError::UnattestedWrap,
            ClientError::Receipt(ReceiptError::SignatureInvalid),
            ClientError::Receipt(ReceiptError::OtherRelease),
            ClientError::KreBinding("x"),
            ClientError::Unwrap(CryptoError::Decrypt),
            ClientError::Mismatch("x"),
            ClientError::Wire(WireError::Truncated),
            ClientError::Unexpected("Hello"),
        ] {
            assert!(e.is_attack() && !e.is_refusal(), "{e}");
        }
        let nsm = ClientError::Nsm(NsmError::DeviceAbsent);
        assert!(!nsm.is_attack() && !nsm.is_refusal());
        for e in [
            ClientError::KreBinding("x"),
            ClientError::UnattestedWrap,
            ClientError::Receipt(ReceiptError::SignatureInvalid),
            ClientError::Unexpected("Hello"),
            ClientError::Mismatch("x"),
            ClientError::Wire(WireError::Truncated),
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }
}
