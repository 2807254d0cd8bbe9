//! The sealed-state store as the state sync sees it, over either backend: the local directory
//! ([`StateStore`], one KRE) or etcd ([`super::etcd::EtcdStore`], several parents sharing one
//! cluster's state). Both store a blob only if it is the generation that may follow what is
//! stored, and both hand back the newest intact generation.
//!
//! What it decides: [`plan`], the compare-and-swap rule of a shared store — generation `g` is
//! written only over exactly `g − 1` (or into an empty store), the same generation with the
//! same bytes is a retry, anything else is a typed refusal ([`StoreError::Conflict`],
//! [`StoreError::Gap`]) after which the caller must not commit to its KRE. What it trusts:
//! nothing it reads (each backend checks every blob with `sealed::peek_header`).

use keygate_enclave::state::sealed::SealedError;

use super::etcd::client::EtcdError;
use super::state::{Loaded, StateFs, StateStore, StateStoreError, Unusable};

/// Why a store or a load failed. Carries no blob content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StoreError {
    /// Another writer stored this or a newer generation first: do not commit.
    #[error(
        "generation {generation} not stored: the store holds generation {stored} from another writer; not committed"
    )]
    Conflict {
        /// The generation offered.
        generation: u64,
        /// The newest generation the store holds.
        stored: u64,
    },
    /// The store is behind: the offered generation does not follow the stored one.
    #[error(
        "generation {generation} not stored: the store holds generation {stored}, and only the one after it may follow"
    )]
    Gap {
        /// The generation offered.
        generation: u64,
        /// The newest generation the store holds.
        stored: u64,
    },
    /// The local directory store failed.
    #[error(transparent)]
    Dir(StateStoreError),
    /// etcd failed (the outcome of a write is then unknown: do not commit; a retry tells).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The blob to store is not an intact sealed state.
    #[error("refusing to store a blob that is not an intact sealed state: {0}")]
    InvalidBlob(SealedError),
    /// The value is over the etcd store's size limit.
    #[error("a value of {len} bytes is over the etcd store's limit of {max} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The current-generation key does not hold a generation number.
    #[error("{key} does not hold a generation number")]
    MalformedCurrent {
        /// The key.
        key: String,
    },
    /// What was read back or found is not usable.
    #[error(transparent)]
    Unusable(#[from] Unusable),
    /// Other custody data for the same custodian set is stored.
    #[error("{key} holds other custody data for the same custodian set (another genesis); refusing to replace it")]
    CustodyConflict {
        /// The key.
        key: String,
    },
}

impl From<StateStoreError> for StoreError {
    fn from(e: StateStoreError) -> Self {
        match e {
            StateStoreError::StaleGeneration { generation, stored } => StoreError::Conflict { generation, stored },
            StateStoreError::GenerationConflict { generation } => {
                StoreError::Conflict { generation, stored: generation }
            }
            e => StoreError::Dir(e),
        }
    }
}

/// A sealed-state store: the two-phase commit's step 2 (docs/durability.md).
pub(crate) trait SealedStore {
    /// Stores `blob` durably as the newest generation and returns its generation. Only after
    /// `Ok` may the KRE commit it; after [`StoreError::Conflict`] it must not.
    fn store(&mut self, blob: &[u8]) -> Result<u64, StoreError>;
    /// The newest intact stored generation, refusing anything older than `min_generation`;
    /// `Ok(None)` only when nothing was ever stored and `min_generation` is 0.
    fn load(&mut self, min_generation: u64) -> Result<Option<Loaded>, StoreError>;
}

/// The local directory: its own rules (an exclusive lock serializes writers; a stale or
/// conflicting generation is refused, mapped to [`StoreError::Conflict`]).
impl<F: StateFs> SealedStore for StateStore<F> {
    fn store(&mut self, blob: &[u8]) -> Result<u64, StoreError> {
        StateStore::store(self, blob).map_err(StoreError::from)
    }

    fn load(&mut self, min_generation: u64) -> Result<Option<Loaded>, StoreError> {
        StateStore::load(self, min_generation).map_err(StoreError::from)
    }
}

/// What a shared store does with generation `generation` given the generation it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Write it if the store is still empty (the first generation it holds).
    WriteIfEmpty,
    /// Write it if the store still holds exactly `expect` (= generation − 1).
    WriteOver {
        /// The generation that must still be current.
        expect: u64,
    },
    /// The store already holds this generation: a retry if the bytes are the same, else a
    /// conflict.
    AlreadyThere,
    /// Refused.
    Conflict {
        /// The stored generation.
        stored: u64,
    },
    /// Refused: the store is behind.
    Gap {
        /// The stored generation.
        stored: u64,
    },
}

/// The compare-and-swap rule: `generation` may only follow exactly the stored generation.
pub(crate) fn plan(stored: Option<u64>, generation: u64) -> Plan {
    match stored {
        None => Plan::WriteIfEmpty,
        Some(s) if s == generation => Plan::AlreadyThere,
        Some(s) if s > generation => Plan::Conflict { stored: s },
        Some(s) if s.checked_add(1) == Some(generation) => Plan::WriteOver { expect: s },
        Some(s) => Plan::Gap { stored: s },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::crash::{blob, disk_with, SimFs};

    #[test]
    fn a_generation_only_follows_exactly_the_stored_one() {
        assert_eq!(plan(None, 1), Plan::WriteIfEmpty);
        assert_eq!(plan(None, 7), Plan::WriteIfEmpty, "an empty store takes its first generation");
        assert_eq!(plan(Some(4), 5), Plan::WriteOver { expect: 4 });
        assert_eq!(plan(Some(5), 5), Plan::AlreadyThere);
        assert_eq!(plan(Some(6), 5), Plan::Conflict { stored: 6 });
        assert_eq!(plan(Some(3), 5), Plan::Gap { stored: 3 });
        assert_eq!(plan(Some(u64::MAX), 0), Plan::Conflict { stored: u64::MAX });
        assert_eq!(plan(Some(u64::MAX), u64::MAX), Plan::AlreadyThere);
    }

    /// The directory store behind the trait keeps its own behaviour; its refusals are typed
    /// conflicts.
    #[test]
    fn the_directory_store_behind_the_trait_maps_its_refusals_to_conflicts() {
        let mut s = StateStore::new(SimFs::new(disk_with(&[1, 2])));
        let store: &mut dyn SealedStore = &mut s;
        assert!(matches!(store.store(&blob(1)), Err(StoreError::Conflict { generation: 1, stored: 2 })));
        assert_eq!(store.store(&blob(2)).expect("retry"), 2);
        assert_eq!(store.store(&blob(3)).expect("next"), 3);
        assert_eq!(store.load(3).expect("load").map(|l| l.header.generation), Some(3));
        assert!(matches!(
            store.load(4),
            Err(StoreError::Dir(StateStoreError::Unusable(Unusable::Rollback { found: 3, min: 4 })))
        ));
    }
}
