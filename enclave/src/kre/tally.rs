//! Counts of what the KRE answered since it started: releases (and the keys in them) and
//! refusals by deny code, for its status report and the parent's metrics.
//!
//! What it decides: nothing; it only counts the events the channels' state machines produce.
//! What it trusts: nothing; every count is a plain number with no secret in it. The counts
//! are the KRE's word, unauthenticated, like the rest of its status; the authenticated record
//! of each release is the audit trail.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::wire::DenyCode;

use super::Event;

/// Releases and refusals by deny code since the KRE started.
#[derive(Debug)]
pub(crate) struct Tally {
    releases: AtomicU64,
    keys_released: AtomicU64,
    /// One slot per known code, in [`DenyCode::ALL`]'s order, then one for codes it does not
    /// know (a refusal always carries a known code; the slot keeps the count total anyway).
    refusals: Box<[AtomicU64]>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            releases: AtomicU64::new(0),
            keys_released: AtomicU64::new(0),
            refusals: (0..=DenyCode::ALL.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Tally {
    /// Counts `event` if it is a release or a refusal.
    pub(crate) fn record(&self, event: &Event) {
        match event {
            Event::Released { keys, .. } => {
                self.releases.fetch_add(1, Ordering::Relaxed);
                self.keys_released.fetch_add(u64::try_from(keys.len()).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            Event::Denied { code, .. } => {
                let slot = DenyCode::ALL.iter().position(|c| c == code).unwrap_or(DenyCode::ALL.len());
                if let Some(n) = self.refusals.get(slot) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// The counts as the status report carries them: `{"releases": n, "keys_released": n,
    /// "refusals": {"<code>": n, …}}`, refusals only for codes counted at least once.
    pub(crate) fn json(&self) -> serde_json::Value {
        let names = DenyCode::ALL.iter().map(|c| c.as_str()).chain(std::iter::once("unknown"));
        let refusals: serde_json::Map<String, serde_json::Value> = names
            .zip(self.refusals.iter())
            .map(|(name, n)| (name, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| (name.to_owned(), n.into()))
            .collect();
        serde_json::json!({
            "releases": self.releases.load(Ordering::Relaxed),
            "keys_released": self.keys_released.load(Ordering::Relaxed),
            "refusals": refusals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Id;

    fn denied(code: DenyCode) -> Event {
        Event::Denied { code, reason: String::new(), cluster: None, module_id: None }
    }

    #[test]
    fn counts_releases_keys_and_refusals_by_code() {
        let t = Tally::default();
        assert_eq!(t.json(), serde_json::json!({"releases": 0, "keys_released": 0, "refusals": {}}));
        let id = Id::new("k").expect("id");
        let released = Event::Released {
            cluster: id.clone(),
            keys: vec![(id.clone(), 1), (id, 2)],
            image: String::new(),
            module_id: String::new(),
            document_sha384: [0; 48],
        };
        t.record(&released);
        t.record(&denied(DenyCode::Busy));
        t.record(&denied(DenyCode::Busy));
        t.record(&denied(DenyCode::Malformed));
        t.record(&denied(DenyCode::Unknown(999)));
        t.record(&Event::StatusReported);
        assert_eq!(
            t.json(),
            serde_json::json!({
                "releases": 1,
                "keys_released": 2,
                "refusals": {"busy": 2, "malformed": 1, "unknown": 1},
            })
        );
    }
}
