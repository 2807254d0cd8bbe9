//! The shape every record the audit key signs shares (checkpoints, receipts, durability
//! receipts): a body — the version byte, then fixed-size fields, the chain id first — signed
//! under the record's domain label, followed by the [`Seal`]: the audit key and its signature.
//!
//! What this module decides: how a body is written and read (fields in declaration order, see
//! `signed_body!`), the exact message the key signs (`DOMAIN ‖ version ‖ fields`), and the
//! one check of a seal (the chain id is derived from the key, then the key signed the body).
//! What it trusts: the crypto backend it is given. Whether the key is attested to a KRE image
//! is the trail's question (`trail.rs`).

use std::fmt;

use keygate_attestation::crypto::{Crypto, P384_POINT_LEN, P384_SIG_LEN};

use super::codec::{record, DecodeError, Reader, Writer};
use super::FORMAT_VERSION;
use crate::binding::chain_id_of;

/// A fixed-size field of a signed body: a big-endian `u64`, or 48 bytes (a chain id or digest).
pub(super) trait Field: Sized {
    /// Appends the field.
    fn put(&self, w: &mut Writer);
    /// Reads the field named `field`.
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, DecodeError>;
    /// Adds the field to a `Debug` output.
    fn show(&self, d: &mut fmt::DebugStruct<'_, '_>, name: &str);
}

impl Field for u64 {
    fn put(&self, w: &mut Writer) {
        w.u64(*self);
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, DecodeError> {
        Ok(r.u64(field)?)
    }
    fn show(&self, d: &mut fmt::DebugStruct<'_, '_>, name: &str) {
        d.field(name, self);
    }
}

impl Field for [u8; 48] {
    fn put(&self, w: &mut Writer) {
        w.bytes(self);
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, DecodeError> {
        Ok(r.array(field)?)
    }
    fn show(&self, d: &mut fmt::DebugStruct<'_, '_>, name: &str) {
        d.field(name, &hex::encode(self));
    }
}

/// The fields a record signs, after its version byte. Declared with `signed_body!`.
pub(super) trait Body: Sized {
    /// The domain label of the signature (from [`crate::binding`]).
    const DOMAIN: &'static [u8];
    /// The chain (KRE run) the record belongs to: the first field.
    fn chain_id(&self) -> &[u8; 48];
    /// Appends the fields, in order.
    fn write_fields(&self, w: &mut Writer);
    /// Reads the fields, in order.
    fn read_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
    /// Adds the fields to a `Debug` output.
    fn show_fields(&self, d: &mut fmt::DebugStruct<'_, '_>);

    /// `version ‖ fields`: the body as the record's encoding starts with it.
    fn encode(&self, w: &mut Writer) {
        w.u8(FORMAT_VERSION);
        self.write_fields(w);
    }

    /// `DOMAIN ‖ version ‖ fields`: what the audit key signs.
    fn message(&self) -> Vec<u8> {
        let mut w = Writer::from_vec(Self::DOMAIN.to_vec());
        self.encode(&mut w);
        w.into_bytes()
    }

    /// `name { chain_id: …, fields…`: how a record's `Debug` starts (it never shows the key or
    /// the signature); the record adds its own fields and finishes it.
    fn debug<'a, 'b>(&self, f: &'a mut fmt::Formatter<'b>, name: &str) -> fmt::DebugStruct<'a, 'b> {
        let mut d = f.debug_struct(name);
        self.show_fields(&mut d);
        d
    }
}

/// Declares a signed body: a struct of the chain id and then the given [`Field`]s, written and
/// read in that order (each read naming its field), signed under `$domain`. Its `Debug` shows
/// the chain id short and every other field (digests in hex).
macro_rules! signed_body {
    ($(#[$meta:meta])* $name:ident under $domain:expr => { $($field:ident: $ty:ty),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq)]
        pub(super) struct $name {
            pub(super) chain_id: [u8; 48],
            $(pub(super) $field: $ty,)+
        }

        impl $crate::audit::signed::Body for $name {
            const DOMAIN: &'static [u8] = $domain;
            fn chain_id(&self) -> &[u8; 48] {
                &self.chain_id
            }
            fn write_fields(&self, w: &mut $crate::codec::Writer) {
                w.bytes(&self.chain_id);
                $($crate::audit::signed::Field::put(&self.$field, w);)+
            }
            fn read_fields(r: &mut $crate::codec::Reader<'_>) -> Result<Self, $crate::audit::DecodeError> {
                Ok(Self {
                    chain_id: r.array("chain_id")?,
                    $($field: $crate::audit::signed::Field::get(r, stringify!($field))?,)+
                })
            }
            fn show_fields(&self, d: &mut ::std::fmt::DebugStruct<'_, '_>) {
                d.field("chain_id", &$crate::audit::codec::short(&self.chain_id));
                $($crate::audit::signed::Field::show(&self.$field, d, stringify!($field));)+
            }
        }
    };
}
pub(super) use signed_body;

/// The audit key and its signature over a body.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Seal {
    /// The audit key (uncompressed SEC1; checked by each record's constructor).
    pub(super) public_key: [u8; P384_POINT_LEN],
    /// The raw `r ‖ s` signature.
    pub(super) signature: [u8; P384_SIG_LEN],
}

/// The two ways a seal fails, as a record's own error type names them.
pub(super) trait SealFailure {
    /// The record's chain id is not derived from its key.
    const CHAIN_ID_MISMATCH: Self;
    /// The signature does not verify under the record's key.
    const SIGNATURE_INVALID: Self;
}

impl Seal {
    /// Whether the key signed `body` (not whether the key belongs to the body's chain).
    pub(super) fn signs(&self, body: &impl Body, crypto: &dyn Crypto) -> bool {
        crypto.verify_p384_sha384_fixed(&self.public_key, &body.message(), &self.signature).is_ok()
    }

    /// The body's chain id is derived from the key, and the key signed the body.
    pub(super) fn check<E: SealFailure>(&self, body: &impl Body, crypto: &dyn Crypto) -> Result<(), E> {
        if chain_id_of(&self.public_key) != *body.chain_id() {
            return Err(E::CHAIN_ID_MISMATCH);
        }
        if !self.signs(body, crypto) {
            return Err(E::SIGNATURE_INVALID);
        }
        Ok(())
    }
}

/// `version ‖ fields ‖ public_key ‖ signature`: how every signed record's encoding starts
/// (a record may append more, e.g. its binding document).
pub(super) fn write_signed(body: &impl Body, seal: &Seal) -> Writer {
    let mut w = Writer::default();
    body.encode(&mut w);
    w.bytes(&seal.public_key);
    w.bytes(&seal.signature);
    w
}

/// Reads what [`write_signed`] writes from a record of at most `max` bytes (version 1), and
/// returns the reader for what follows. The record's constructor checks the values.
pub(super) fn read_signed<B: Body>(bytes: &[u8], max: usize) -> Result<(B, Seal, Reader<'_>), DecodeError> {
    let mut r = record(bytes, max)?;
    let body = B::read_fields(&mut r)?;
    let seal = Seal { public_key: r.array("public_key")?, signature: r.array("signature")? };
    Ok((body, seal, r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::CheckpointBody;
    use crate::audit::durable::PolicyBody;
    use crate::audit::receipt::ReceiptBody;
    use crate::audit::{
        AuditSigner, CHECKPOINT_DOMAIN, POLICY_RECEIPT_BODY_LEN, POLICY_RECEIPT_DOMAIN, RECEIPT_BODY_LEN,
        RECEIPT_DOMAIN, SIGNED_BODY_LEN,
    };
    use keygate_attestation::crypto::default_backend;

    /// Each body signs `DOMAIN ‖ version ‖ chain_id ‖ its fields` in declaration order, and reads
    /// back what it writes.
    #[test]
    fn each_body_signs_its_documented_layout() {
        fn layout<B: Body + PartialEq>(body: B, domain: &[u8], fields: &[&[u8]], len: usize) {
            let msg = body.message();
            assert_eq!(msg, [domain, &[FORMAT_VERSION], &[7; 48], &fields.concat()].concat());
            assert_eq!(msg.len(), domain.len() + len);
            let mut r = Reader::new(&msg[domain.len() + 1..]);
            assert!(B::read_fields(&mut r).is_ok_and(|b| b == body) && r.finish().is_ok());
        }
        let cp = CheckpointBody { chain_id: [7; 48], seq: 2, head: [3; 48], time_ms: 4 };
        layout(cp, CHECKPOINT_DOMAIN, &[&2u64.to_be_bytes(), &[3; 48], &4u64.to_be_bytes()], SIGNED_BODY_LEN);
        let rc = ReceiptBody { chain_id: [7; 48], seq: 5, entry_digest: [6; 48], document_sha384: [8; 48] };
        layout(rc, RECEIPT_DOMAIN, &[&5u64.to_be_bytes(), &[6; 48], &[8; 48]], RECEIPT_BODY_LEN);
        let pr = PolicyBody { chain_id: [7; 48], generation: 1, policy_version: 2, policy_digest: [3; 48], time_ms: 4 };
        let fields: [&[u8]; 4] = [&1u64.to_be_bytes(), &2u64.to_be_bytes(), &[3; 48], &4u64.to_be_bytes()];
        layout(pr, POLICY_RECEIPT_DOMAIN, &fields, POLICY_RECEIPT_BODY_LEN);
    }

    /// A record's `Debug` names its chain (short) and its fields, never its key or signature.
    #[test]
    fn debug_shows_the_body_and_never_the_seal() {
        let mut s = AuditSigner::generate(default_backend(), |b| b.fill(3)).expect("key");
        s.bind(vec![0xa5; 10]).expect("bind");
        let chain = hex::encode(&s.chain_id()[..8]);
        let r = s.sign_receipt(7, [1; 48], [2; 48]).expect("receipt");
        let (one, two) = (hex::encode([1; 48]), hex::encode([2; 48]));
        let expected =
            format!("Receipt {{ chain_id: {chain:?}, seq: 7, entry_digest: {one:?}, document_sha384: {two:?}, .. }}");
        assert_eq!(format!("{r:?}"), expected);
        let cp = s.sign(3, [1; 48], 9).expect("checkpoint");
        let expected = format!(
            "Checkpoint {{ chain_id: {chain:?}, seq: 3, head: {one:?}, time_ms: 9, binding_document: 10, .. }}"
        );
        assert_eq!(format!("{cp:?}"), expected);
        let p = s.sign_policy_receipt(4, 5, [2; 48], 6).expect("policy receipt");
        let expected = format!(
            "PolicyReceipt {{ chain_id: {chain:?}, generation: 4, policy_version: 5, policy_digest: {two:?}, time_ms: 6, .. }}"
        );
        assert_eq!(format!("{p:?}"), expected);
        for shown in [format!("{r:?}"), format!("{cp:?}"), format!("{p:?}")] {
            assert!(!shown.contains(&hex::encode(&s.public_key()[1..9])), "{shown}");
        }
    }
}
