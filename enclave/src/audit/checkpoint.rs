//! Signed checkpoints and the KRE's checkpoint key (which also signs the audit receipts of
//! releases, `super::receipt`).
//!
//! The key is generated inside the KRE at start and never leaves it. Its public point is
//! bound to the KRE image by an attestation document whose `public_key` is the point and
//! whose `user_data` is the chain id `SHA-384("keygate/v1/audit-chain" ‖ point)`: a verifier
//! that checks the document against the Nitro root and the KRE's PCRs knows the checkpoint
//! key belongs to a genuine KRE image, and which chain it signs.

use std::fmt;

use keygate_attestation::crypto::{self, Crypto, P384SigningKey, P384_POINT_LEN, P384_SIG_LEN};
use keygate_attestation::{AttestRequest, Nsm};

use super::codec::{record, DecodeError, Writer};
use super::durable::{policy_receipt_body, PolicyReceipt};
use super::receipt::{receipt_body, Receipt};
use super::{AuditError, FORMAT_VERSION, MAX_BINDING_DOCUMENT, MAX_CHECKPOINT_LEN};

pub use crate::binding::{chain_id_of, CHECKPOINT_DOMAIN};
/// Length of the signed body: version, chain id, seq, head, time.
pub const SIGNED_BODY_LEN: usize = 1 + 48 + 8 + 48 + 8;

/// The `user_data` the binding attestation document must carry (the chain id).
pub fn binding_user_data(point: &[u8]) -> [u8; 48] {
    chain_id_of(point)
}

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
            .field("chain_id", &hex::encode(&self.chain_id[..8]))
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
        let body = signed_body(&self.chain_id, seq, &head, time_ms);
        let signature = self.sign_message(&signed_message(&body))?;
        Checkpoint::assemble(self.chain_id, seq, head, time_ms, self.public, signature, binding)
            .map_err(AuditError::Encode)
    }

    /// Signs the receipt of entry `seq` (digest `entry_digest`) of this chain, the release to
    /// the client document whose SHA-384 is `document_sha384` (`super::receipt`).
    pub fn sign_receipt(
        &self,
        seq: u64,
        entry_digest: [u8; 48],
        document_sha384: [u8; 48],
    ) -> Result<Receipt, AuditError> {
        let signature = self.sign_message(&receipt_body(&self.chain_id, seq, &entry_digest, &document_sha384))?;
        Receipt::assemble(self.chain_id, seq, entry_digest, document_sha384, self.public, signature)
            .map_err(AuditError::Encode)
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
        let msg = policy_receipt_body(&self.chain_id, generation, policy_version, &policy_digest, time_ms);
        let signature = self.sign_message(&msg)?;
        PolicyReceipt::assemble(
            self.chain_id,
            generation,
            policy_version,
            policy_digest,
            time_ms,
            self.public,
            signature,
            binding,
        )
        .map_err(AuditError::Encode)
    }

    /// ECDSA P-384 / SHA-384 over `msg` (nonces as the backend makes them), as raw `r ‖ s`.
    fn sign_message(&self, msg: &[u8]) -> Result<[u8; P384_SIG_LEN], AuditError> {
        self.key.sign(msg).map_err(|_| AuditError::Crypto("signing failed"))
    }
}

fn signed_body(chain_id: &[u8; 48], seq: u64, head: &[u8; 48], time_ms: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(FORMAT_VERSION);
    w.bytes(chain_id);
    w.u64(seq);
    w.bytes(head);
    w.u64(time_ms);
    w.into_bytes()
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [CHECKPOINT_DOMAIN, body].concat()
}

/// A signed checkpoint: the chain `chain_id` had `seq` entries, the last with digest `head`,
/// at `time_ms`; signed by `public_key`, which `binding_document` binds to a KRE image.
/// Holds its exact encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    chain_id: [u8; 48],
    seq: u64,
    head: [u8; 48],
    time_ms: u64,
    public_key: [u8; P384_POINT_LEN],
    signature: [u8; P384_SIG_LEN],
    binding_document: Vec<u8>,
    raw: Vec<u8>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("chain_id", &hex::encode(&self.chain_id[..8]))
            .field("seq", &self.seq)
            .field("head", &hex::encode(self.head))
            .field("time_ms", &self.time_ms)
            .field("binding_document", &self.binding_document.len())
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Encodes a checkpoint from its parts (the signer uses it; tests use it to forge).
    pub fn assemble(
        chain_id: [u8; 48],
        seq: u64,
        head: [u8; 48],
        time_ms: u64,
        public_key: [u8; P384_POINT_LEN],
        signature: [u8; P384_SIG_LEN],
        binding_document: Vec<u8>,
    ) -> Result<Self, DecodeError> {
        if seq == 0 {
            return Err(DecodeError::ZeroSequence);
        }
        if public_key[0] != 0x04 {
            return Err(DecodeError::BadPoint);
        }
        if binding_document.is_empty() {
            return Err(DecodeError::Empty("binding_document"));
        }
        let doc_len = u16::try_from(binding_document.len())
            .ok()
            .filter(|&l| usize::from(l) <= MAX_BINDING_DOCUMENT)
            .ok_or(DecodeError::FieldTooLong {
                field: "binding_document",
                len: binding_document.len(),
                max: MAX_BINDING_DOCUMENT,
            })?;
        let mut w = Writer::from_vec(signed_body(&chain_id, seq, &head, time_ms));
        w.bytes(&public_key);
        w.bytes(&signature);
        w.bytes(&doc_len.to_be_bytes());
        w.bytes(&binding_document);
        Ok(Self { chain_id, seq, head, time_ms, public_key, signature, binding_document, raw: w.into_bytes() })
    }

    /// Strictly decodes one checkpoint.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = record(bytes, MAX_CHECKPOINT_LEN)?;
        let chain_id = r.array("chain_id")?;
        let seq = r.u64("seq")?;
        if seq == 0 {
            return Err(DecodeError::ZeroSequence);
        }
        let head = r.array("head")?;
        let time_ms = r.u64("time_ms")?;
        let public_key: [u8; P384_POINT_LEN] = r.array("public_key")?;
        if public_key[0] != 0x04 {
            return Err(DecodeError::BadPoint);
        }
        let signature = r.array("signature")?;
        let len = usize::from(r.u16("binding_document")?);
        if len == 0 {
            return Err(DecodeError::Empty("binding_document"));
        }
        if len > MAX_BINDING_DOCUMENT {
            return Err(DecodeError::FieldTooLong { field: "binding_document", len, max: MAX_BINDING_DOCUMENT });
        }
        let binding_document = r.take(len, "binding_document")?.to_vec();
        r.finish()?;
        Ok(Self { chain_id, seq, head, time_ms, public_key, signature, binding_document, raw: bytes.to_vec() })
    }

    /// Checks the signature under the checkpoint's own `public_key` (not whether that key is
    /// attested: [`super::verify_trail`] does that).
    pub fn verify_signature(&self, crypto: &dyn Crypto) -> bool {
        let body = signed_body(&self.chain_id, self.seq, &self.head, self.time_ms);
        crypto.verify_p384_sha384_fixed(&self.public_key, &signed_message(&body), &self.signature).is_ok()
    }

    /// The exact encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }
    /// The chain signed for.
    pub fn chain_id(&self) -> &[u8; 48] {
        &self.chain_id
    }
    /// Number of entries covered (the last one's sequence number).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Digest of entry `seq`.
    pub fn head(&self) -> &[u8; 48] {
        &self.head
    }
    /// When it was signed (ms, the KRE's clock).
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }
    /// The checkpoint key.
    pub fn public_key(&self) -> &[u8; P384_POINT_LEN] {
        &self.public_key
    }
    /// The raw `r ‖ s` signature.
    pub fn signature(&self) -> &[u8; P384_SIG_LEN] {
        &self.signature
    }
    /// The attestation document binding `public_key` to the KRE.
    pub fn binding_document(&self) -> &[u8] {
        &self.binding_document
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
