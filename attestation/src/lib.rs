//! keygate-attestation: verification of AWS Nitro attestation documents (enclave NSM and
//! NitroTPM), PCR expectations, and the NSM interface with a hardware and a mock backend.
//!
//! Everything here is pure (no I/O besides the hardware NSM device): bytes and a time go in,
//! a [`VerifiedAttestation`] or a precise [`VerifyError`] comes out. See `docs/attestation.md`
//! for exactly what is checked and why.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod cbor;
pub mod chain;
pub mod cose;
pub mod crypto;
pub mod document;
pub mod error;
pub mod freshness;
mod kind;
pub mod members;
#[cfg(feature = "mock")]
pub mod mock;
pub mod nsm;
pub mod pcr;
pub mod policy;
pub mod secret;
pub mod time;
pub mod verify;

pub use chain::{AnchorError, TrustAnchor};
pub use document::{DocumentKind, UnknownFields};
pub use error::{CertAt, VerifyError};
pub use nsm::{AttestRequest, HardwareNsm, Nsm, NsmError};
pub use pcr::{PcrExpectation, PcrMismatch};
pub use verify::{UnixMillis, VerifiedAttestation, Verifier, VerifyOptions, VerifyTime};
