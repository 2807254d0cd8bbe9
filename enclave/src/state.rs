//! The KRE's durable state: the sealed format, its custody by M of N custodians, and the
//! vault state machine that unseals, serves and exports it.
//!
//! What this layer decides: the bytes of a sealed state and of the custody files, which
//! shares open it, and when a KEK version is committed enough to release under. What it
//! trusts: the crypto layer, and the parent only to store and return bytes (everything it
//! returns is authenticated here). Spec: `docs/durability.md`. The sealed state records an
//! audit head, so this layer sits above [`crate::audit`].

pub mod custody;
pub mod sealed;
pub mod vault;
