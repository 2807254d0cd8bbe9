//! The parent's durable storage of what the KRE exports. `state`: the sealed-state store (a
//! local directory, written so that a crash at any point leaves an intact generation; the
//! format is the KRE's, docs/durability.md). The audit trail's disk format is
//! `keygate_enclave::audit::store`, written by `cmd::audit`.
//!
//! `etcd`: the same sealed state in etcd v3, shared by the parents of a KRE cluster, written
//! by compare-and-swap on the generation; `store`: the trait the state sync uses over both.
//!
//! `bundles`: where accepted policy bundles are kept for a replay (a directory or etcd);
//! `audit`: where the KRE's audit trail is kept (a directory or etcd).
//!
//! `crash` (test-only) is the disk-with-a-crash-model the store is swept against, and
//! `system_sweep` the whole-system sweep over it (a real KRE core, custodians, the store).

pub(crate) mod audit;
pub(crate) mod bundles;
#[cfg(test)]
mod crash;
pub(crate) mod etcd;
pub(crate) mod state;
pub(crate) mod store;
#[cfg(test)]
mod system_sweep;
