//! Signed checkpoints: the bytes a checkpoint signs and how a stored one is checked. The
//! key that signs them is [`super::AuditSigner`] (`signer.rs`).
//!
//! The key is generated inside the KRE at start and never leaves it. Its public point is
//! bound to the KRE image by an attestation document whose `public_key` is the point and
//! whose `user_data` is the chain id `SHA-384("keygate/v1/audit-chain" ‖ point)`: a verifier
//! that checks the document against the Nitro root and the KRE's PCRs knows the checkpoint
//! key belongs to a genuine KRE image, and which chain it signs.

use std::fmt;

use keygate_attestation::crypto::{Crypto, P384_POINT_LEN, P384_SIG_LEN};

use super::codec::{check_point, check_seq, record, short, DecodeError, ReadAudit, Writer};
use super::{FORMAT_VERSION, MAX_BINDING_DOCUMENT, MAX_CHECKPOINT_LEN};

pub use crate::binding::{chain_id_of, CHECKPOINT_DOMAIN};
/// Length of the signed body: version, chain id, seq, head, time.
pub const SIGNED_BODY_LEN: usize = 1 + 48 + 8 + 48 + 8;

/// The `user_data` the binding attestation document must carry (the chain id).
pub fn binding_user_data(point: &[u8]) -> [u8; 48] {
    chain_id_of(point)
}

pub(super) fn signed_body(chain_id: &[u8; 48], seq: u64, head: &[u8; 48], time_ms: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(FORMAT_VERSION);
    w.bytes(chain_id);
    w.u64(seq);
    w.bytes(head);
    w.u64(time_ms);
    w.into_bytes()
}

pub(super) fn signed_message(body: &[u8]) -> Vec<u8> {
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
            .field("chain_id", &short(&self.chain_id))
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
        check_seq(seq)?;
        check_point(&public_key)?;
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
        let seq = r.seq("seq")?;
        let head = r.array("head")?;
        let time_ms = r.u64("time_ms")?;
        let public_key = r.point("public_key")?;
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
