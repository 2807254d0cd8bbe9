//! The KRE's audit key: it signs every checkpoint, every release's receipt and every policy
//! receipt, and is bound to the KRE image by an attestation document.
//!
//! What this module decides: when the key may sign (only once bound) and what it signs (the
//! bodies of `checkpoint.rs`, `receipt.rs` and `durable.rs`, under their domain labels in
//! [`crate::binding`]). What it trusts: the crypto backend and the KRE's own NSM. The key is
//! generated inside the KRE at start and never leaves it (`docs/audit.md`).

use std::fmt;

use keygate_attestation::crypto::{self, Crypto, P384SigningKey, P384_POINT_LEN};
use keygate_attestation::{AttestRequest, Nsm};

use super::checkpoint::{Checkpoint, CheckpointBody};
use super::codec::short;
use super::durable::{PolicyBody, PolicyReceipt};
use super::receipt::{Receipt, ReceiptBody};
use super::signed::{Body, Seal};
use super::{AuditError, MAX_BINDING_DOCUMENT};
use crate::binding::chain_id_of;

/// The KRE's checkpoint signing key, made once by the KRE's crypto backend (it signs every
/// checkpoint and every release's receipt); the backend's key clears its scalar when dropped.
/// `Debug` shows only the public point's chain id.
pub struct AuditSigner {
    key: Box<dyn P384SigningKey>,
    public: [u8; P384_POINT_LEN],
    chain_id: [u8; 48],
    binding: Option<Vec<u8>>,
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("chain_id", &short(&self.chain_id))
            .field("bound", &self.binding.is_some())
            .finish_non_exhaustive()
    }
}

impl AuditSigner {
    /// A fresh key from `fill` (the NSM's or the OS's random source), not yet bound.
    pub fn generate(crypto: &dyn Crypto, fill: impl FnMut(&mut [u8])) -> Result<Self, AuditError> {
        let (scalar, point) =
            crypto::p384_scalar_from(crypto, fill).map_err(|_| AuditError::Crypto("key generation failed"))?;
        let public: [u8; P384_POINT_LEN] =
            point.as_slice().try_into().map_err(|_| AuditError::Crypto("public point has the wrong length"))?;
        let key = crypto.p384_signing_key(&scalar).map_err(|_| AuditError::Crypto("invalid scalar"))?;
        Ok(Self { key, chain_id: chain_id_of(&public), public, binding: None })
    }

    /// Generates a key with the NSM's randomness and binds it with an NSM attestation: what
    /// the KRE calls once at start.
    pub fn start(nsm: &dyn Nsm, crypto: &dyn Crypto) -> Result<Self, AuditError> {
        let mut failure = None;
        let mut signer = Self::generate(crypto, |buf| {
            if let Err(e) = nsm.random(buf) {
                failure = Some(e);
            }
        })?;
        if let Some(e) = failure {
            return Err(AuditError::Nsm(e));
        }
        let document = nsm.attest(&signer.attestation_request()).map_err(AuditError::Nsm)?;
        signer.bind(document)?;
        Ok(signer)
    }

    /// What to ask the NSM for: `public_key` = the checkpoint point, `user_data` = the chain
    /// id, no nonce (the document is archived and checked at its own time).
    pub fn attestation_request(&self) -> AttestRequest {
        AttestRequest { user_data: Some(self.chain_id.to_vec()), nonce: None, public_key: Some(self.public.to_vec()) }
    }

    /// Attaches the NSM's answer to [`Self::attestation_request`]; every checkpoint carries it.
    pub fn bind(&mut self, document: Vec<u8>) -> Result<(), AuditError> {
        if document.is_empty() || document.len() > MAX_BINDING_DOCUMENT {
            return Err(AuditError::BindingSize { len: document.len(), max: MAX_BINDING_DOCUMENT });
        }
        self.binding = Some(document);
        Ok(())
    }

    /// The checkpoint public key (uncompressed SEC1).
    pub fn public_key(&self) -> &[u8; P384_POINT_LEN] {
        &self.public
    }

    /// The chain id this key signs for.
    pub fn chain_id(&self) -> &[u8; 48] {
        &self.chain_id
    }

    /// Signs `(seq, head, time_ms)` for this chain.
    pub fn sign(&self, seq: u64, head: [u8; 48], time_ms: u64) -> Result<Checkpoint, AuditError> {
        let binding = self.binding.clone().ok_or(AuditError::Unbound)?;
        if seq == 0 {
            return Err(AuditError::NothingToCheckpoint);
        }
        let body = CheckpointBody { chain_id: self.chain_id, seq, head, time_ms };
        Checkpoint::new(body, self.seal(&body)?, binding).map_err(AuditError::Encode)
    }

    /// Signs the receipt of entry `seq` (digest `entry_digest`) of this chain, the release to
    /// the client document whose SHA-384 is `document_sha384` (`super::receipt`).
    pub fn sign_receipt(
        &self,
        seq: u64,
        entry_digest: [u8; 48],
        document_sha384: [u8; 48],
    ) -> Result<Receipt, AuditError> {
        let body = ReceiptBody { chain_id: self.chain_id, seq, entry_digest, document_sha384 };
        Receipt::new(body, self.seal(&body)?).map_err(AuditError::Encode)
    }

    /// Signs the durability receipt of policy bundle `(policy_version, policy_digest)`, carried
    /// by the sealed state committed as `generation` (`super::durable`). Carries the binding
    /// document, so the pipeline can check it alone.
    pub fn sign_policy_receipt(
        &self,
        generation: u64,
        policy_version: u64,
        policy_digest: [u8; 48],
        time_ms: u64,
    ) -> Result<PolicyReceipt, AuditError> {
        let binding = self.binding.clone().ok_or(AuditError::Unbound)?;
        let body = PolicyBody { chain_id: self.chain_id, generation, policy_version, policy_digest, time_ms };
        PolicyReceipt::new(body, self.seal(&body)?, binding).map_err(AuditError::Encode)
    }

    /// ECDSA P-384 / SHA-384 over the body's signed message (nonces as the backend makes them),
    /// as raw `r ‖ s`, with this key.
    fn seal(&self, body: &impl Body) -> Result<Seal, AuditError> {
        let signature = self.key.sign(&body.message()).map_err(|_| AuditError::Crypto("signing failed"))?;
        Ok(Seal { public_key: self.public, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::DecodeError;
    use keygate_attestation::crypto::all_backends;

    fn signer() -> AuditSigner {
        let mut n = 0u8;
        let mut s = AuditSigner::generate(crypto::default_backend(), |b| {
            for x in b.iter_mut() {
                n = n.wrapping_add(1);
                *x = n;
            }
        })
        .expect("key");
        s.bind(vec![0xa5; 100]).expect("bind");
        s
    }

    #[test]
    fn sign_verify_round_trip_on_every_backend() {
        let s = signer();
        let cp = s.sign(5, [3; 48], 1234).expect("sign");
        let d = Checkpoint::decode(cp.bytes()).expect("decode");
        assert_eq!(d, cp);
        for c in all_backends() {
            assert!(d.verify_signature(c), "{}", c.name());
        }
        let mut b = cp.bytes().to_vec();
        b[1 + 48 + 7] ^= 1; // seq
        assert!(!Checkpoint::decode(&b).expect("decode").verify_signature(crypto::default_backend()));
    }

    #[test]
    fn truncations_and_trailing_bytes_refused() {
        let cp = signer().sign(1, [0; 48], 0).expect("sign");
        for n in 0..cp.bytes().len() {
            assert!(Checkpoint::decode(&cp.bytes()[..n]).is_err(), "truncated to {n}");
        }
        let mut long = cp.bytes().to_vec();
        long.push(0);
        assert_eq!(Checkpoint::decode(&long), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn unbound_signer_refuses_and_debug_is_redacted() {
        let mut s = signer();
        s.binding = None;
        assert_eq!(s.sign(1, [0; 48], 0), Err(AuditError::Unbound));
        let dbg = format!("{s:?}");
        assert_eq!(dbg, format!("AuditSigner {{ chain_id: {:?}, bound: false, .. }}", hex::encode(&s.chain_id[..8])));
        assert!(dbg.contains("chain_id"));
        assert!(matches!(s.bind(Vec::new()), Err(AuditError::BindingSize { .. })));
        let req = s.attestation_request();
        assert_eq!(req.public_key.as_deref(), Some(&s.public[..]));
        assert_eq!(req.user_data.as_deref(), Some(&chain_id_of(&s.public)[..]));
        assert_eq!(req.nonce, None);
    }
}
