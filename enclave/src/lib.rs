//! Key release enclave.
#![forbid(unsafe_code)]
