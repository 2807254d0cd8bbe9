//! keygate-enclave: the key release enclave (KRE).
//!
//! The crate is layered; a module imports only from its own layer and the layers listed
//! before it (`tests/layers.rs` checks every `crate::` and `super::` path):
//!
//! 1. [`codec`]: the one never-panicking byte `Reader`/`Writer` and the validated [`codec::Id`];
//!    decides how fields are laid out and that a malformed input is a typed error naming the field.
//!    Beside it [`atomic`]: a whole file written so a crash or a full disk leaves the old one or
//!    the new one (the parent's files; the KRE writes none).
//! 2. [`binding`]: every domain-separated digest, transcript hash and KDF label; decides the
//!    exact bytes each binding covers.
//! 3. [`crypto`]: KEKs, data-key derivation, wrapping to an attested key, Shamir; decides how
//!    keys derive, wrap and split.
//! 4. [`audit`]: entries, chain, checkpoints, receipts and trail verification; decides what a
//!    trail is and when the KRE's buffer refuses (fail closed).
//! 5. [`state`]: the sealed format, custody (sets, shares, envelopes) and the vault state
//!    machine; decides what is durable and which KEK versions may be used. Above `audit`
//!    because the sealed state carries an audit head.
//! 6. [`wire`]: frames, messages, channels, deny codes; decides the bytes on every channel.
//! 7. [`kre`]: the KRE's parts (policy book, KEK source, sealed-state service, audit log,
//!    challenge table), each with one owner and a written lock order, and the per-channel
//!    connection state machines that borrow them; decides every release, policy, state and
//!    unseal step, without I/O.
//! 8. [`peer`]: the other ends (control-plane client, custodian), without I/O; never uses `kre`.
//! 9. [`net`]: transports, framed I/O with budgets, the server binding channels to
//!    listeners; the only tokio code.
//! 10. [`cli`] and [`policy_file`]: the KRE's command line and start-up, shared by the
//!     production binary (`keygate-enclave`, hardware NSM only) and the development one
//!     (`keygate-enclave-dev`).
#![forbid(unsafe_code)]

pub mod atomic;
pub mod codec;

pub mod binding;

pub mod crypto;

pub mod audit;

pub mod state;

pub mod wire;

pub mod kre;

pub mod peer;

pub mod net;

pub mod cli;
pub mod policy_file;
