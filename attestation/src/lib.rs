//! Attestation.
#![forbid(unsafe_code)]
