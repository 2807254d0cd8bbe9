//! The other ends of the KRE's channels, without I/O: the control-plane client of the
//! release handshake and the custodian of unseal and reshare. (A member KRE joining a cluster
//! is the KRE itself: its decision is `kre::joiner`.)
//!
//! What this layer decides: what a peer checks before it trusts a KRE (its attestation, the
//! `user_data` binding, the receipt) and what it sends. What it trusts: the pinned Nitro root
//! and its own policy for the KRE's image. It uses wire, binding, crypto and state, never the
//! KRE's own core. Spec: `docs/protocol.md` and `docs/durability.md`.

pub mod client;
pub mod custodian;
