//! One module per top-level subcommand.

pub(crate) mod attestation;
pub(crate) mod demo;
pub(crate) mod eif;
