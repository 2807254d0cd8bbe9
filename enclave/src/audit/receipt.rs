//! Audit receipts: the KRE's signed statement, handed to the client inside its `Released`,
//! that the release's audit entry is entry `seq` of chain `chain_id`, with digest
//! `entry_digest`, for the client whose attestation document hashes to `document_sha384`.
//!
//! What this decides: the exact bytes of a receipt, whether its signature holds, and whether a
//! stored trail holds its entry ([`check_receipt`]). What it trusts: nothing but the bytes and
//! the trail's attested audit key, which [`super::verify_trail`] establishes.
//!
//! A receipt is signed with the KRE's audit key (the checkpoint key, bound to the KRE image by
//! its attestation document) over
//!
//! ```text
//! RECEIPT_DOMAIN ‖ version:u8 ‖ chain_id[48] ‖ seq:u64be ‖ entry_digest[48] ‖ document_sha384[48]
//! ```
//!
//! and encoded with a fixed length ([`RECEIPT_LEN`]):
//!
//! ```text
//! version:u8 (=1) ‖ chain_id[48] ‖ seq:u64be ‖ entry_digest[48] ‖ document_sha384[48]
//!   ‖ public_key[97] ‖ signature[96]
//! ```
//!
//! A customer who holds receipts catches a parent that acknowledged an entry without storing
//! it: `keygate audit verify DIR --receipts R` fails, naming the receipt, unless the stored
//! trail holds each receipt's entry with that digest.

use std::fmt;

use keygate_attestation::crypto::{Crypto, P384_POINT_LEN, P384_SIG_LEN};

use super::codec::{check_point, check_seq, short, DecodeError};
use super::event::{AuditEntry, AuditEvent};
use super::signed::{read_signed, signed_body, write_signed, Body, Seal, SealFailure};
use super::trail::TrailSummary;

/// Domain label of the receipt signature.
pub use crate::binding::RECEIPT_DOMAIN;
/// Length of the signed body: version, chain id, seq, entry digest, document digest.
pub const RECEIPT_BODY_LEN: usize = 1 + 48 + 8 + 48 + 48;
/// Length of an encoded receipt: the signed body, the audit key and the signature.
pub const RECEIPT_LEN: usize = RECEIPT_BODY_LEN + P384_POINT_LEN + P384_SIG_LEN;

/// Why a receipt does not prove what it claims. Each case has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, strum::IntoStaticStr)]
#[non_exhaustive]
#[strum(serialize_all = "snake_case")]
pub enum ReceiptError {
    /// The receipt's chain id is not derived from its key: not a receipt of that key's chain.
    #[error("its chain id is not derived from its audit key")]
    ChainIdMismatch,
    /// The signature does not verify under the receipt's key.
    #[error("its signature does not verify")]
    SignatureInvalid,
    /// A valid receipt of another release: it names another client document than this one.
    #[error("it is the receipt of another release (another client document)")]
    OtherRelease,
    /// Signed by another KRE run's key than the trail's: its entry is not in this trail.
    #[error("it is of chain {chain}, not of this trail's chain {trail}")]
    ForeignChain {
        /// The receipt's chain id (hex, 16 digits).
        chain: String,
        /// The trail's chain id (hex, 16 digits).
        trail: String,
    },
    /// The stored trail ends before the receipt's entry: the entry was acknowledged to the KRE
    /// but is not stored.
    #[error("entry {seq} is not in the stored trail (it ends at seq {last_seq})")]
    NotStored {
        /// The receipt's sequence number.
        seq: u64,
        /// The trail's last entry.
        last_seq: u64,
    },
    /// The stored entry at the receipt's sequence number has another digest.
    #[error("the stored entry {seq} is not the one the KRE signed (digest differs)")]
    EntryMismatch {
        /// Sequence number.
        seq: u64,
    },
    /// The stored entry is the signed one, but not the release of the receipt's client document
    /// (never produced by a genuine KRE).
    #[error("the stored entry {seq} is not a release to the receipt's client document")]
    NotARelease {
        /// Sequence number.
        seq: u64,
    },
}

impl ReceiptError {
    /// Stable snake_case name (JSON output).
    pub fn kind(&self) -> &'static str {
        self.into()
    }
}

impl SealFailure for ReceiptError {
    const CHAIN_ID_MISMATCH: Self = Self::ChainIdMismatch;
    const SIGNATURE_INVALID: Self = Self::SignatureInvalid;
}

signed_body! {
    /// What a receipt signs: entry `seq` of the chain, with its digest, the release to the
    /// client document whose SHA-384 is `document_sha384`.
    ReceiptBody under RECEIPT_DOMAIN => {
        seq: u64, entry_digest: [u8; 48], document_sha384: [u8; 48]
    }
}

/// One audit receipt. Decoding only checks the structure; [`Receipt::verify`] checks the
/// signature, [`check_receipt`] the trail.
#[derive(Clone, PartialEq, Eq)]
pub struct Receipt {
    body: ReceiptBody,
    seal: Seal,
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.body.debug(f, "Receipt").finish_non_exhaustive()
    }
}

impl Receipt {
    /// Checks a receipt's structure (the signer's, an assembled or a decoded one).
    pub(super) fn new(body: ReceiptBody, seal: Seal) -> Result<Self, DecodeError> {
        check_seq(body.seq)?;
        check_point(&seal.public_key)?;
        Ok(Self { body, seal })
    }

    /// A receipt from its parts (the signer uses it; tests use it to forge).
    pub fn assemble(
        chain_id: [u8; 48],
        seq: u64,
        entry_digest: [u8; 48],
        document_sha384: [u8; 48],
        public_key: [u8; P384_POINT_LEN],
        signature: [u8; P384_SIG_LEN],
    ) -> Result<Self, DecodeError> {
        Self::new(ReceiptBody { chain_id, seq, entry_digest, document_sha384 }, Seal { public_key, signature })
    }

    /// Strictly decodes a receipt: exactly [`RECEIPT_LEN`] bytes, version 1, a sequence number
    /// from 1, an uncompressed point.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (body, seal, r) = read_signed(bytes, RECEIPT_LEN)?;
        r.finish()?;
        Self::new(body, seal)
    }

    /// The exact encoding ([`RECEIPT_LEN`] bytes).
    pub fn to_bytes(&self) -> [u8; RECEIPT_LEN] {
        let mut out = [0u8; RECEIPT_LEN];
        for (o, b) in out.iter_mut().zip(write_signed(&self.body, &self.seal).into_bytes()) {
            *o = b;
        }
        out
    }

    /// Checks that the chain id is derived from the receipt's key and that the key signed it.
    /// Whether that key is the attested audit key of a KRE is the caller's question: the client
    /// takes the receipt from inside the authenticated `Released`, `keygate audit verify`
    /// compares the key with the trail's attested one.
    pub fn verify(&self, crypto: &dyn Crypto) -> Result<(), ReceiptError> {
        self.seal.check(&self.body, crypto)
    }

    /// [`Self::verify`], and that the receipt is for the release to the client document whose
    /// SHA-384 is `document_sha384` (what a client checks against its own document).
    pub fn verify_for(&self, crypto: &dyn Crypto, document_sha384: &[u8; 48]) -> Result<(), ReceiptError> {
        self.verify(crypto)?;
        if self.body.document_sha384 != *document_sha384 {
            return Err(ReceiptError::OtherRelease);
        }
        Ok(())
    }

    /// The chain (KRE run) of the entry.
    pub fn chain_id(&self) -> &[u8; 48] {
        &self.body.chain_id
    }
    /// The entry's sequence number.
    pub fn seq(&self) -> u64 {
        self.body.seq
    }
    /// The entry's digest (`SHA-384(ENTRY_DOMAIN ‖ entry bytes)`).
    pub fn entry_digest(&self) -> &[u8; 48] {
        &self.body.entry_digest
    }
    /// SHA-384 of the released-to client's attestation document.
    pub fn document_sha384(&self) -> &[u8; 48] {
        &self.body.document_sha384
    }
    /// The audit key that signed it.
    pub fn public_key(&self) -> &[u8; P384_POINT_LEN] {
        &self.seal.public_key
    }
    /// The raw `r ‖ s` signature.
    pub fn signature(&self) -> &[u8; P384_SIG_LEN] {
        &self.seal.signature
    }
    /// A file name for the receipt: `<first 8 bytes of the chain id, hex>-<seq>.receipt`.
    pub fn file_name(&self) -> String {
        format!("{}-{}.receipt", short(&self.body.chain_id), self.body.seq)
    }
}

/// Whether `entries`, a trail that [`super::verify_trail`] accepted with `summary`, holds the
/// receipt's entry: the receipt verifies, it is signed by the trail's attested audit key, the
/// entry at its sequence number is stored with its digest, and that entry is a release to its
/// client document.
pub fn check_receipt(
    receipt: &Receipt,
    summary: &TrailSummary,
    entries: &[AuditEntry],
    crypto: &dyn Crypto,
) -> Result<(), ReceiptError> {
    receipt.verify(crypto)?;
    let (body, seal) = (&receipt.body, &receipt.seal);
    if seal.public_key.as_slice() != summary.checkpoint_key.as_slice() || body.chain_id != summary.chain_id {
        return Err(ReceiptError::ForeignChain {
            chain: hex::encode(&body.chain_id[..8]),
            trail: hex::encode(&summary.chain_id[..8]),
        });
    }
    let seq = body.seq;
    // A verified trail holds seq 1..=last_seq in order; search anyway rather than index.
    let Ok(at) = entries.binary_search_by_key(&seq, AuditEntry::seq) else {
        return Err(ReceiptError::NotStored { seq, last_seq: summary.last_seq });
    };
    let entry = entries.get(at).ok_or(ReceiptError::NotStored { seq, last_seq: summary.last_seq })?;
    if entry.digest() != body.entry_digest || *entry.chain_id() != body.chain_id {
        return Err(ReceiptError::EntryMismatch { seq });
    }
    match entry.event() {
        AuditEvent::ReleaseAllowed { requester, .. } if requester.document_sha384 == body.document_sha384 => Ok(()),
        _ => Err(ReceiptError::NotARelease { seq }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditSigner;
    use keygate_attestation::crypto::{all_backends, default_backend};

    fn signer(fill: u8) -> AuditSigner {
        let mut n = fill;
        let mut s = AuditSigner::generate(default_backend(), |b| {
            for x in b.iter_mut() {
                n = n.wrapping_mul(31).wrapping_add(7);
                *x = n;
            }
        })
        .expect("key");
        s.bind(vec![0xa5; 100]).expect("bind");
        s
    }

    #[test]
    fn sign_encode_decode_verify_round_trip_on_every_backend() {
        let s = signer(1);
        let r = s.sign_receipt(7, [3; 48], [4; 48]).expect("sign");
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), RECEIPT_LEN);
        let d = Receipt::decode(&bytes).expect("decode");
        assert_eq!(d, r);
        assert_eq!(d.to_bytes(), bytes);
        assert_eq!((d.seq(), *d.entry_digest(), *d.document_sha384()), (7, [3; 48], [4; 48]));
        assert_eq!(d.chain_id(), s.chain_id());
        assert_eq!(d.public_key(), s.public_key());
        for c in all_backends() {
            assert_eq!(d.verify(c), Ok(()), "{}", c.name());
            assert_eq!(d.verify_for(c, &[4; 48]), Ok(()), "{}", c.name());
        }
        assert_eq!(d.verify_for(default_backend(), &[5; 48]), Err(ReceiptError::OtherRelease));
        assert_eq!(d.file_name(), format!("{}-7.receipt", hex::encode(&s.chain_id()[..8])));
    }

    /// Every byte of the signed body, of the key and of the signature matters: a flip either
    /// fails to decode or fails to verify, with the variant naming why.
    #[test]
    fn every_single_byte_tamper_fails() {
        let r = signer(2).sign_receipt(9, [1; 48], [2; 48]).expect("sign");
        let bytes = r.to_bytes();
        for i in 0..RECEIPT_LEN {
            let mut b = bytes;
            b[i] ^= 0x01;
            let Ok(t) = Receipt::decode(&b) else { continue };
            let e = t.verify(default_backend()).expect_err("tampered receipt verified");
            let chain = 1..49;
            let key = RECEIPT_BODY_LEN..RECEIPT_BODY_LEN + P384_POINT_LEN;
            let expected = if chain.contains(&i) || key.contains(&i) {
                ReceiptError::ChainIdMismatch
            } else {
                ReceiptError::SignatureInvalid
            };
            assert_eq!(e, expected, "byte {i}");
        }
    }

    #[test]
    fn wrong_key_and_wrong_chain_fail() {
        let (a, b) = (signer(3), signer(4));
        let r = a.sign_receipt(1, [1; 48], [2; 48]).expect("sign");
        // Another KRE's key, with that key's chain id: the signature fails.
        let other =
            Receipt::assemble(*b.chain_id(), 1, [1; 48], [2; 48], *b.public_key(), *r.signature()).expect("assemble");
        assert_eq!(other.verify(default_backend()), Err(ReceiptError::SignatureInvalid));
        // The right key and signature, claiming another chain: refused before the signature.
        let chain =
            Receipt::assemble(*b.chain_id(), 1, [1; 48], [2; 48], *a.public_key(), *r.signature()).expect("assemble");
        assert_eq!(chain.verify(default_backend()), Err(ReceiptError::ChainIdMismatch));
    }

    #[test]
    fn truncations_extensions_and_bad_fields_are_refused() {
        let bytes = signer(5).sign_receipt(1, [0; 48], [0; 48]).expect("sign").to_bytes();
        for n in 0..RECEIPT_LEN {
            assert!(matches!(Receipt::decode(&bytes[..n]), Err(DecodeError::Truncated(_))), "truncated to {n}");
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(Receipt::decode(&long), Err(DecodeError::TooLarge { len: RECEIPT_LEN + 1, max: RECEIPT_LEN }));
        let mut v = bytes;
        v[0] = 2;
        assert_eq!(Receipt::decode(&v), Err(DecodeError::Version(2)));
        let mut z = bytes;
        z[49..57].fill(0);
        assert_eq!(Receipt::decode(&z), Err(DecodeError::ZeroSequence));
        let mut p = bytes;
        p[RECEIPT_BODY_LEN] = 0x02;
        assert_eq!(Receipt::decode(&p), Err(DecodeError::BadPoint));
    }
}
