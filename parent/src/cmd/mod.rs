//! One module per top-level subcommand.

pub(crate) mod attestation;
pub(crate) mod audit;
pub(crate) mod bench;
pub(crate) mod custodian;
pub(crate) mod eif;
pub(crate) mod fetch;
pub(crate) mod kms_plugin;
pub(crate) mod policy;
pub(crate) mod proxy;
