//! Keys and the arithmetic over them: KEKs and data keys, data-key derivation, wrapping a
//! data key to an attested public key (and the wrapped-key type), and Shamir's secret
//! sharing of the state key.
//!
//! What this layer decides: how a data key derives from its KEK, how it is wrapped so that
//! only the attested requester opens it, and how the state key splits and recombines. What it
//! trusts: the crypto backend of `keygate-attestation` and the caller's randomness. Spec:
//! `docs/protocol.md` ("Data keys", "Wrapping") and `docs/durability.md` (custody); every
//! label and transcript they use is in [`crate::binding`].

pub mod keys;
pub mod shamir;
