//! keygate-enclave: the key release enclave (KRE).
//!
//! - [`wire`]: the framed wire format (docs/protocol.md).
//! - [`kre`]: the KRE's parts (policy book, KEK source, sealed-state service, audit log,
//!   challenge table) and the per-channel connection state machines, without I/O.
//! - [`keys`]: KEKs, data-key derivation, wrapping to an attested key.
//! - [`client`]: the control-plane side of the handshake, without I/O.
//! - [`transport`], [`io`], [`server`]: the thin tokio adapters (Unix sockets, vsock).
//! - [`cli`]: the KRE's command line and start-up, shared by the production binary
//!   (`keygate-enclave`, hardware NSM only) and the development one (`keygate-enclave-dev`).
#![forbid(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod client;
pub mod custodian;
pub mod custody;
pub mod io;
pub mod keys;
pub mod kre;
pub mod policy_file;
pub mod sealed;
pub mod server;
pub mod shamir;
pub mod transport;
pub mod vault;
pub mod wire;
