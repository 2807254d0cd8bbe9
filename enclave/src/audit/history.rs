//! The history of KRE runs: how each run's chain is linked to the one before it, and which
//! stored entries a link proves are missing.
//!
//! Each KRE run has its own chain (a fresh audit key). A KRE with custodians seals, with every
//! generation it exports, the [`AuditHead`] the parent had acknowledged storing by then. When a
//! restarted KRE unseals that generation, its chain records an
//! [`AuditEvent::ChainLinked`](super::AuditEvent::ChainLinked) entry naming that head. A link
//! is a claim, signed into the successor's chain, that the predecessor's stored trail holds
//! entries `1..=seq` and that entry `seq` has the digest named.
//!
//! What this module decides: the order of the stored runs (by their links; runs that cannot
//! be placed by a link by the time of their first entry), and every gap the links and
//! sequence numbers show — each named exactly, with its own [`HistoryGap`] variant. What it
//! trusts: the entries as given; that each run's chain is intact and attested is
//! [`super::verify_trail`]'s decision, made separately for each run.
//!
//! Limits (docs/audit.md "Linked runs"): entries after the head of the newest committed
//! generation (or of a run nobody linked from) are covered by their checkpoints only, as in
//! a single run.

use std::collections::BTreeMap;

use super::codec::short;
use super::event::{AuditEntry, AuditEvent, AuditHead};

/// One gap in the stored history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, strum::IntoStaticStr)]
#[non_exhaustive]
#[strum(serialize_all = "snake_case")]
pub enum HistoryGap {
    /// A stored chain lacks entries between two stored ones (or before its first).
    #[error("chain {}…: entries {from}–{to} missing (sequence gap)", short(.chain))]
    SequenceGap {
        /// The chain.
        chain: [u8; 48],
        /// First missing sequence number.
        from: u64,
        /// Last missing sequence number.
        to: u64,
    },
    /// A stored chain ends before the head its successor's link names: its tail was deleted.
    #[error(
        "chain {}…: entries {from}–{to} missing (run {}… was unsealed from a state sealed at seq {to}; the stored trail ends at seq {})",
        short(.chain), short(.linked_from), .from.saturating_sub(1)
    )]
    TailMissing {
        /// The chain.
        chain: [u8; 48],
        /// First missing sequence number (one after the last stored).
        from: u64,
        /// The sequence number the link names.
        to: u64,
        /// The run whose link names it.
        linked_from: [u8; 48],
    },
    /// A link names a chain that is not stored at all.
    #[error(
        "chain {}…: not stored (run {}… links to it at seq {seq}: entries 1–{seq} missing)",
        short(.chain), short(.linked_from)
    )]
    ChainMissing {
        /// The chain named.
        chain: [u8; 48],
        /// The sequence number the link names.
        seq: u64,
        /// The run whose link names it.
        linked_from: [u8; 48],
    },
    /// The stored entry at the link's sequence number has another digest: the predecessor's
    /// trail was rewritten (or the link names another history).
    #[error(
        "chain {}…: entry {seq} is not the one run {}… links to (its digest differs)",
        short(.chain), short(.linked_from)
    )]
    LinkDigestMismatch {
        /// The chain.
        chain: [u8; 48],
        /// The sequence number.
        seq: u64,
        /// The run whose link names it.
        linked_from: [u8; 48],
    },
    /// A run after the first has no link: nothing proves the runs before it are complete.
    #[error(
        "chain {}…: not linked to an earlier run (started without unsealing a state that names one)",
        short(.chain)
    )]
    Unlinked {
        /// The chain.
        chain: [u8; 48],
    },
    /// A run records more than one link (one KRE run unseals once).
    #[error("chain {}…: {count} chain_linked entries (one run unseals once)", short(.chain))]
    MultipleLinks {
        /// The chain.
        chain: [u8; 48],
        /// How many.
        count: usize,
    },
    /// Links that lead back to the same run.
    #[error("chain {}…: its links form a cycle", short(.chain))]
    LinkCycle {
        /// A chain on the cycle.
        chain: [u8; 48],
    },
}

impl HistoryGap {
    /// Stable snake_case name (JSON output).
    pub fn kind(&self) -> &'static str {
        self.into()
    }
}

/// One stored run, placed in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRun {
    /// Its index in the slice given to [`verify_history`].
    pub index: usize,
    /// Its chain.
    pub chain_id: [u8; 48],
    /// The highest stored sequence number.
    pub last_seq: u64,
    /// Its link to the run before it (`None`: it started without one).
    pub link: Option<AuditHead>,
    /// Its first entry's time (ms).
    pub first_time_ms: u64,
}

/// The runs in history order and every gap found (empty: the history is complete as far as
/// the links can tell).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryReport {
    /// Runs, predecessors before successors.
    pub runs: Vec<HistoryRun>,
    /// Every gap, in history order.
    pub gaps: Vec<HistoryGap>,
}

/// The link a run's entries record, and how many there are.
fn links_of(entries: &[AuditEntry]) -> (Option<AuditHead>, usize) {
    let mut first = None;
    let mut count = 0;
    for e in entries {
        if let AuditEvent::ChainLinked { previous, .. } = e.event() {
            count += 1;
            if first.is_none() {
                first = Some(*previous);
            }
        }
    }
    (first.flatten(), count)
}

/// Orders the stored runs (each slice one chain's stored entries, in stored order; empty
/// slices are skipped) by their links and names every gap: sequence gaps inside a chain, a
/// chain whose stored entries end before the head its successor names, a link to a chain
/// not stored or to an entry with another digest, a run after the first without a link,
/// more than one link in a run, and cycles. A single run without a link has no gap.
pub fn verify_history(runs: &[&[AuditEntry]]) -> HistoryReport {
    struct Run<'a> {
        index: usize,
        chain: [u8; 48],
        entries: &'a [AuditEntry],
        /// Stored digest by sequence number (the first stored copy).
        digests: BTreeMap<u64, [u8; 48]>,
        link: Option<AuditHead>,
        links: usize,
        first_ms: u64,
    }
    let mut all: Vec<Run<'_>> = Vec::new();
    for (index, entries) in runs.iter().enumerate() {
        let Some(first) = entries.first() else { continue };
        let mut digests = BTreeMap::new();
        for e in entries.iter() {
            digests.entry(e.seq()).or_insert_with(|| e.digest());
        }
        let (link, links) = links_of(entries);
        all.push(Run { index, chain: *first.chain_id(), entries, digests, link, links, first_ms: first.time_ms() });
    }
    let by_chain: BTreeMap<[u8; 48], usize> = all.iter().enumerate().rev().map(|(i, r)| (r.chain, i)).collect();
    let position = |chain: &[u8; 48]| by_chain.get(chain).copied();
    // The stored predecessor of each run, found once (the ordering below is quadratic at most).
    let pred: Vec<Option<usize>> = all.iter().map(|r| r.link.and_then(|l| position(&l.chain_id))).collect();

    // Order: repeatedly place, among the runs whose predecessor is placed or not stored, the
    // one whose first entry is earliest. Runs left over are on a cycle.
    let mut placed: Vec<usize> = Vec::new();
    let mut done = vec![false; all.len()];
    let mut cycles = Vec::new();
    while placed.len() < all.len() {
        let ready = (0..all.len())
            .filter(|&i| !done[i])
            .filter(|&i| match pred[i] {
                Some(p) => done[p] && p != i,
                None => true,
            })
            .min_by_key(|&i| (all[i].first_ms, all[i].index));
        let next = match ready {
            Some(i) => i,
            None => {
                let Some(i) = (0..all.len()).filter(|&i| !done[i]).min_by_key(|&i| (all[i].first_ms, all[i].index))
                else {
                    break;
                };
                cycles.push(all[i].chain);
                i
            }
        };
        done[next] = true;
        placed.push(next);
    }

    let mut gaps = Vec::new();
    for (n, &i) in placed.iter().enumerate() {
        let run = &all[i];
        // Sequence gaps inside the chain (all of them, from 1).
        let mut expect = 1u64;
        for &seq in run.digests.keys() {
            if seq > expect {
                gaps.push(HistoryGap::SequenceGap { chain: run.chain, from: expect, to: seq - 1 });
            }
            expect = expect.max(seq.saturating_add(1));
        }
        if run.links > 1 {
            gaps.push(HistoryGap::MultipleLinks { chain: run.chain, count: run.links });
        }
        if cycles.contains(&run.chain) {
            gaps.push(HistoryGap::LinkCycle { chain: run.chain });
        }
        match run.link {
            None if n > 0 => gaps.push(HistoryGap::Unlinked { chain: run.chain }),
            None => {}
            // Seq 0 claims no entry: the predecessor had nothing acknowledged when it sealed.
            Some(l) if l.seq == 0 => {}
            Some(l) => match position(&l.chain_id) {
                None => gaps.push(HistoryGap::ChainMissing { chain: l.chain_id, seq: l.seq, linked_from: run.chain }),
                Some(p) => {
                    let prev = &all[p];
                    let last = prev.entries.iter().map(AuditEntry::seq).max().unwrap_or(0);
                    match prev.digests.get(&l.seq) {
                        Some(d) if *d == l.digest => {}
                        Some(_) => gaps.push(HistoryGap::LinkDigestMismatch {
                            chain: l.chain_id,
                            seq: l.seq,
                            linked_from: run.chain,
                        }),
                        // Within the stored range: a sequence gap already names it.
                        None if l.seq < last => {}
                        None => gaps.push(HistoryGap::TailMissing {
                            chain: l.chain_id,
                            from: last + 1,
                            to: l.seq,
                            linked_from: run.chain,
                        }),
                    }
                }
            },
        }
    }
    let runs = placed
        .iter()
        .map(|&i| {
            let r = &all[i];
            HistoryRun {
                index: r.index,
                chain_id: r.chain,
                last_seq: r.digests.keys().next_back().copied().unwrap_or(0),
                link: r.link,
                first_time_ms: r.first_ms,
            }
        })
        .collect();
    HistoryReport { runs, gaps }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u8) -> [u8; 48] {
        [n; 48]
    }

    /// Entries 1..=n of chain `c`, starting at time `t0`; entry `link_at` (if any) is the
    /// chain_linked entry naming `link`.
    fn run(c: u8, n: u64, t0: u64, link: Option<(u64, Option<AuditHead>)>) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        let mut prev = chain(c);
        for seq in 1..=n {
            let event = match link {
                Some((at, previous)) if at == seq => AuditEvent::ChainLinked { generation: 3, previous },
                _ => AuditEvent::KekRotated { cluster: crate::codec::Id::new("prod").expect("id"), new_version: 1 },
            };
            let e = AuditEntry::new(chain(c), seq, prev, t0 + seq, 0, event).expect("entry");
            prev = e.digest();
            out.push(e);
        }
        out
    }

    fn head(entries: &[AuditEntry], seq: u64) -> AuditHead {
        let e = &entries[usize::try_from(seq - 1).expect("small")];
        AuditHead { chain_id: *e.chain_id(), seq, digest: e.digest() }
    }

    #[test]
    fn a_single_run_and_a_linked_pair_have_no_gap_and_are_ordered_by_their_links() {
        let a = run(1, 10, 1_000, None);
        assert_eq!(verify_history(&[&a]).gaps, vec![]);
        // The successor's first entry is older (a wrong clock): the link still orders them.
        let b = run(2, 5, 0, Some((3, Some(head(&a, 8)))));
        let r = verify_history(&[&b, &a]);
        assert_eq!(r.gaps, vec![]);
        assert_eq!(r.runs.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(r.runs[1].link, Some(head(&a, 8)));
        // A link at seq 0 claims no entry.
        let c = run(3, 2, 2_000, Some((1, Some(AuditHead { chain_id: chain(9), seq: 0, digest: chain(9) }))));
        assert_eq!(verify_history(&[&c]).gaps, vec![]);
    }

    #[test]
    fn a_deleted_tail_before_the_linked_head_is_named_with_its_exact_range() {
        let a = run(1, 57, 1_000, None);
        let b = run(2, 4, 5_000, Some((2, Some(head(&a, 57)))));
        let r = verify_history(&[&a[..40], &b]);
        assert_eq!(r.gaps, vec![HistoryGap::TailMissing { chain: chain(1), from: 41, to: 57, linked_from: chain(2) }]);
        let msg = r.gaps[0].to_string();
        assert!(msg.starts_with("chain 0101010101010101…: entries 41–57 missing"), "{msg}");
        // Entries after the linked head may go unnoticed (the documented limit).
        assert_eq!(verify_history(&[&a, &b]).gaps, vec![]);
    }

    #[test]
    fn sequence_gaps_missing_chains_and_wrong_digests_are_each_named() {
        let a = run(1, 20, 1_000, None);
        let holes: Vec<AuditEntry> =
            a.iter().filter(|e| !(5..=7).contains(&e.seq()) && e.seq() != 12).cloned().collect();
        assert_eq!(
            verify_history(&[&holes]).gaps,
            vec![
                HistoryGap::SequenceGap { chain: chain(1), from: 5, to: 7 },
                HistoryGap::SequenceGap { chain: chain(1), from: 12, to: 12 },
            ]
        );
        assert_eq!(verify_history(&[&a[3..]]).gaps, vec![HistoryGap::SequenceGap { chain: chain(1), from: 1, to: 3 }]);
        // The predecessor is not stored at all.
        let b = run(2, 3, 5_000, Some((1, Some(head(&a, 20)))));
        assert_eq!(
            verify_history(&[&b]).gaps,
            vec![HistoryGap::ChainMissing { chain: chain(1), seq: 20, linked_from: chain(2) }]
        );
        // The link names a digest the stored entry does not have (a rewritten predecessor).
        let mut wrong = head(&a, 20);
        wrong.digest[0] ^= 1;
        let c = run(3, 3, 5_000, Some((1, Some(wrong))));
        assert_eq!(
            verify_history(&[&a, &c]).gaps,
            vec![HistoryGap::LinkDigestMismatch { chain: chain(1), seq: 20, linked_from: chain(3) }]
        );
    }

    #[test]
    fn unlinked_runs_double_links_and_cycles_are_named() {
        let a = run(1, 5, 1_000, None);
        let b = run(2, 5, 2_000, None);
        assert_eq!(verify_history(&[&b, &a]).gaps, vec![HistoryGap::Unlinked { chain: chain(2) }]);
        let mut d = run(4, 5, 3_000, Some((1, Some(head(&a, 5)))));
        let again = AuditEntry::new(
            chain(4),
            6,
            d[4].digest(),
            3_006,
            0,
            AuditEvent::ChainLinked { generation: 4, previous: Some(head(&a, 5)) },
        )
        .expect("entry");
        d.push(again);
        assert_eq!(verify_history(&[&a, &d]).gaps, vec![HistoryGap::MultipleLinks { chain: chain(4), count: 2 }]);
        // Two runs naming each other (only a forged history can): both are reported.
        let x0 = run(5, 2, 1_000, None);
        let y0 = run(6, 2, 1_000, None);
        let x = run(5, 2, 1_000, Some((1, Some(head(&y0, 2)))));
        let y = run(6, 2, 1_000, Some((1, Some(head(&x0, 2)))));
        let gaps = verify_history(&[&x, &y]).gaps;
        assert!(gaps.iter().any(|g| matches!(g, HistoryGap::LinkCycle { .. })), "{gaps:?}");
    }
}
