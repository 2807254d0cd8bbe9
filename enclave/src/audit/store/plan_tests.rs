//! [`plan_append`], the chain rule both audit stores apply: each refusal by its own variant,
//! and what a repeated or overlapping pull skips.

use keygate_attestation::crypto::default_backend;

use super::*;
use crate::audit::{AuditConfig, AuditEvent, AuditLog, AuditSigner};

/// A log whose chain id follows from `key_fill`; entries carry `tag` (two logs with one key
/// and other tags are two histories of one chain).
fn log(key_fill: u8) -> AuditLog {
    let mut s = AuditSigner::generate(default_backend(), |b| b.fill(key_fill)).expect("key");
    s.bind(vec![1; 10]).expect("bind");
    AuditLog::new(AuditConfig::default(), s)
}

/// `n` entries of a log, and a checkpoint after entries 2 and `n`.
fn chain(key_fill: u8, tag: &str, n: u32) -> (Vec<AuditEntry>, Vec<Checkpoint>) {
    let mut l = log(key_fill);
    let mut cps = Vec::new();
    for i in 1..=n {
        l.append(AuditEvent::ConfigChanged { setting: tag.into(), value: i.to_string() }, u64::from(i))
            .expect("append");
        if i == 2 || i == n {
            cps.push(l.checkpoint(100 + u64::from(i)).expect("checkpoint"));
        }
    }
    (l.entries_after(0, usize::MAX), cps)
}

fn seqs(p: &AppendPlan<'_>) -> (Vec<u64>, Vec<u64>) {
    (p.entries.iter().map(|e| e.seq()).collect(), p.checkpoints.iter().map(|c| c.seq()).collect())
}

#[test]
fn an_empty_store_takes_the_chain_and_a_repeated_pull_skips_what_is_stored() {
    let (es, cps) = chain(7, "a", 5);
    let p = plan_append(None, None, &es, &cps).expect("plan");
    assert_eq!(seqs(&p), (vec![1, 2, 3, 4, 5], vec![2, 5]));
    assert_eq!(
        p.report,
        AppendReport { entries_written: 5, checkpoints_written: 2, last_seq: 5, ..AppendReport::default() }
    );
    // Stored up to 3 with the checkpoint at 2: the overlap is skipped, the rest continues.
    let p = plan_append(Some(&es[2]), Some(&cps[0]), &es, &cps).expect("plan");
    assert_eq!(seqs(&p), (vec![4, 5], vec![5]));
    assert_eq!((p.report.entries_skipped, p.report.checkpoints_skipped, p.report.last_seq), (3, 1, 5));
    // Everything stored: nothing to write, the last seq to acknowledge.
    let p = plan_append(Some(&es[4]), Some(&cps[1]), &es, &cps[1..]).expect("plan");
    assert_eq!(seqs(&p), (vec![], vec![]));
    assert_eq!((p.report.entries_skipped, p.report.checkpoints_skipped, p.report.last_seq), (5, 1, 5));
    // Nothing pulled into an empty store.
    assert_eq!(plan_append(None, None, &[], &[]).expect("plan").report, AppendReport::default());
}

#[test]
fn each_break_of_the_chain_is_refused_by_its_own_variant() {
    let (es, cps) = chain(7, "a", 5);
    let (other, other_cps) = chain(9, "a", 5);
    let (fork, fork_cps) = chain(7, "b", 5);
    assert_eq!(*fork[0].chain_id(), *es[0].chain_id(), "one chain id, another history");
    let err = |r: Result<AppendPlan<'_>, StoreError>| r.map(|_| ()).expect_err("refused");

    assert!(matches!(err(plan_append(None, None, &es[1..], &[])), StoreError::Gap { expected: 1, found: 2 }));
    assert!(matches!(err(plan_append(Some(&es[1]), None, &es[3..], &[])), StoreError::Gap { expected: 3, found: 4 }));
    assert!(matches!(err(plan_append(Some(&es[1]), None, &other[2..], &[])), StoreError::ForeignChain { seq: 3 }));
    assert!(matches!(err(plan_append(Some(&es[1]), None, &fork[1..2], &[])), StoreError::Conflict { seq: 2 }));
    assert!(matches!(err(plan_append(Some(&es[1]), None, &fork[2..], &[])), StoreError::BrokenLink { seq: 3 }));
    // Checkpoints: of no stored chain, of another chain, ahead, going back, over another entry.
    assert!(matches!(err(plan_append(None, None, &[], &cps[..1])), StoreError::ForeignChain { seq: 2 }));
    assert!(matches!(err(plan_append(Some(&es[4]), None, &[], &other_cps)), StoreError::ForeignChain { seq: 2 }));
    assert!(matches!(
        err(plan_append(Some(&es[2]), None, &[], &cps[1..])),
        StoreError::CheckpointAhead { seq: 5, last: 3 }
    ));
    assert!(matches!(
        err(plan_append(Some(&es[4]), Some(&cps[1]), &[], &cps[..1])),
        StoreError::CheckpointOutOfOrder { seq: 2, stored: 5 }
    ));
    assert!(matches!(
        err(plan_append(Some(&es[4]), None, &[], &fork_cps[1..])),
        StoreError::CheckpointMismatch { seq: 5 }
    ));
    assert!(matches!(err(plan_append(None, None, &es, &fork_cps[1..])), StoreError::CheckpointMismatch { seq: 5 }));
}
