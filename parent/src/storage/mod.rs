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

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use etcd::client::{EtcdUrl, EtcdUrlError};

pub(crate) mod audit;
pub(crate) mod bundles;
#[cfg(test)]
mod crash;
pub(crate) mod etcd;
pub(crate) mod state;
pub(crate) mod store;
#[cfg(test)]
mod system_sweep;

/// Where a store lives, as configured: a local directory, or etcd under a URL's prefix
/// (`etcd://HOST:PORT[,…][/PREFIX]`). The bundle store and the audit store are each one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A local directory.
    Dir(PathBuf),
    /// etcd, under the URL's prefix.
    Etcd(EtcdUrl),
}

impl FromStr for Location {
    type Err = EtcdUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().starts_with("etcd://") {
            s.parse().map(Location::Etcd)
        } else {
            Ok(Location::Dir(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Dir(d) => write!(f, "{}", d.display()),
            Location::Etcd(u) => write!(f, "{u}"),
        }
    }
}
