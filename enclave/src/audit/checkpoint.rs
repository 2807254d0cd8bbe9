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

use super::codec::{check_point, check_seq, DecodeError};
use super::signed::{read_signed, signed_body, write_signed, Body, Seal};
use super::{MAX_BINDING_DOCUMENT, MAX_CHECKPOINT_LEN};

pub use crate::binding::{chain_id_of, CHECKPOINT_DOMAIN};
/// Length of the signed body: version, chain id, seq, head, time.
pub const SIGNED_BODY_LEN: usize = 1 + 48 + 8 + 48 + 8;

/// The `user_data` the binding attestation document must carry (the chain id).
pub fn binding_user_data(point: &[u8]) -> [u8; 48] {
    chain_id_of(point)
}

signed_body! {
    /// What a checkpoint signs: the chain had `seq` entries, the last with digest `head`, at
    /// `time_ms`.
    CheckpointBody under CHECKPOINT_DOMAIN => { seq: u64, head: [u8; 48], time_ms: u64 }
}

/// A signed checkpoint: the chain `chain_id` had `seq` entries, the last with digest `head`,
/// at `time_ms`; signed by `public_key`, which `binding_document` binds to a KRE image.
/// Holds its exact encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    body: CheckpointBody,
    seal: Seal,
    binding_document: Vec<u8>,
    raw: Vec<u8>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.body.debug(f, "Checkpoint").field("binding_document", &self.binding_document.len()).finish_non_exhaustive()
    }
}

/// The binding document's length prefix: 1..=[`MAX_BINDING_DOCUMENT`] bytes.
fn document_len(len: usize) -> Result<u16, DecodeError> {
    if len == 0 {
        return Err(DecodeError::Empty("binding_document"));
    }
    u16::try_from(len).ok().filter(|&l| usize::from(l) <= MAX_BINDING_DOCUMENT).ok_or(DecodeError::FieldTooLong {
        field: "binding_document",
        len,
        max: MAX_BINDING_DOCUMENT,
    })
}

impl Checkpoint {
    /// Checks and encodes a checkpoint (the signer's, an assembled or a decoded one).
    pub(super) fn new(body: CheckpointBody, seal: Seal, binding_document: Vec<u8>) -> Result<Self, DecodeError> {
        check_seq(body.seq)?;
        check_point(&seal.public_key)?;
        let len = document_len(binding_document.len())?;
        let mut w = write_signed(&body, &seal);
        w.u16(len);
        w.bytes(&binding_document);
        Ok(Self { body, seal, binding_document, raw: w.into_bytes() })
    }

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
        Self::new(CheckpointBody { chain_id, seq, head, time_ms }, Seal { public_key, signature }, binding_document)
    }

    /// Strictly decodes one checkpoint.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (body, seal, mut r) = read_signed(bytes, MAX_CHECKPOINT_LEN)?;
        let len = usize::from(r.u16("binding_document")?);
        document_len(len)?;
        let binding_document = r.take(len, "binding_document")?.to_vec();
        r.finish()?;
        Self::new(body, seal, binding_document)
    }

    /// Checks the signature under the checkpoint's own `public_key` (not whether that key is
    /// attested: [`super::verify_trail`] does that).
    pub fn verify_signature(&self, crypto: &dyn Crypto) -> bool {
        self.seal.signs(&self.body, crypto)
    }

    /// The exact encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }
    /// The chain signed for.
    pub fn chain_id(&self) -> &[u8; 48] {
        &self.body.chain_id
    }
    /// Number of entries covered (the last one's sequence number).
    pub fn seq(&self) -> u64 {
        self.body.seq
    }
    /// Digest of entry `seq`.
    pub fn head(&self) -> &[u8; 48] {
        &self.body.head
    }
    /// When it was signed (ms, the KRE's clock).
    pub fn time_ms(&self) -> u64 {
        self.body.time_ms
    }
    /// The checkpoint key.
    pub fn public_key(&self) -> &[u8; P384_POINT_LEN] {
        &self.seal.public_key
    }
    /// The raw `r ‖ s` signature.
    pub fn signature(&self) -> &[u8; P384_SIG_LEN] {
        &self.seal.signature
    }
    /// The attestation document binding `public_key` to the KRE.
    pub fn binding_document(&self) -> &[u8] {
        &self.binding_document
    }
}
