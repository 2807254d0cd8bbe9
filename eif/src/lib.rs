//! Enclave Image Format.
#![forbid(unsafe_code)]
