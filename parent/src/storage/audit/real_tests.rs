//! The etcd audit store against a real 3-member etcd cluster on loopback (the kit's
//! [`EtcdCluster`]): two writers racing on one chain, a member killed mid-run, and how long
//! an append takes next to the directory's fsync.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keygate_tests::etcd::EtcdCluster;

use super::tests::{grow, log};
use super::*;

/// Entries per step of the racing writers.
const STEP: usize = 5;

fn open(c: &EtcdCluster, prefix: &str) -> EtcdAudit<EtcdClient> {
    let url: EtcdUrl = c.url(prefix).parse().expect("url");
    EtcdAudit::connect(&url).expect("connect")
}

/// Two parents pull the same KRE chain at the same time, step by step: each seq is
/// written by exactly one of them, the other's transaction does not apply and it plans again
/// (skipping what the first stored); the stored trail is the chain, once.
#[test]
fn two_writers_racing_on_one_chain_in_a_real_etcd_write_each_seq_once() {
    let c = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let mut l = log(7);
    let es = grow(&mut l, 1, 300);
    let chain = *es[0].chain_id();
    // Both writers take the same steps, each step started together (a barrier): each pull
    // reaches the same seq, in a window of its own (a re-pull overlaps what was stored).
    let run = |mut s: EtcdAudit<EtcdClient>, es: Vec<AuditEntry>, overlap: usize, go: Arc<Barrier>| {
        std::thread::spawn(move || {
            let (mut written, mut replans) = (0, 0);
            for to in (STEP..=es.len()).step_by(STEP) {
                go.wait();
                let from = to.saturating_sub(STEP + overlap);
                let r = s.append(&chain, &es[from..to], &[]).expect("append");
                // What is acknowledged is stored: this pull, or more (the other writer's).
                assert!(r.report.last_seq >= u64::try_from(to).expect("small"), "{r:?}");
                written += r.report.entries_written;
                replans += r.replans;
            }
            (written, replans)
        })
    };
    // Both must have written and lost at least once for the race to have happened; under
    // load one may run ahead, so a few rounds (each on a new prefix).
    for round in 0..5 {
        let prefix = format!("/race{round}");
        let go = Arc::new(Barrier::new(2));
        let a = run(open(&c, &prefix), es.clone(), 0, go.clone());
        let b = run(open(&c, &prefix), es.clone(), 3, go);
        let (wa, ra) = a.join().expect("writer a");
        let (wb, rb) = b.join().expect("writer b");
        eprintln!("racing writers: a wrote {wa}, b wrote {wb}; re-planned {ra} + {rb} times");
        assert_eq!(wa + wb, es.len(), "each seq written exactly once");
        let t = open(&c, &prefix).read(&chain).expect("read");
        assert_eq!(t.entries, es);
        if wa > 0 && wb > 0 && ra + rb > 0 {
            return;
        }
    }
    panic!("the writers never interleaved in five rounds");
}

/// A member is killed mid-run (the first endpoint, which the client was using): appends go on
/// against the majority (a round that failed as it died is tried again, as a follower does),
/// and the trail is complete, each entry once.
#[test]
fn appends_continue_on_the_majority_when_an_etcd_member_is_killed() {
    let mut c = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let mut s = open(&c, "/kill");
    let mut l = log(7);
    let es = grow(&mut l, 1, 300);
    let chain = *es[0].chain_id();
    for (n, part) in es.chunks(10).enumerate() {
        if n == 10 {
            c.kill(0).expect("kill member 0");
        }
        // As a follower does: a failed round (the member that was asked died under it: the
        // outcome is unknown) is tried again; what applied is then skipped.
        let mut tries = 0;
        let r = loop {
            match s.append(&chain, part, &[]) {
                Ok(r) => break r,
                Err(e) if tries < 5 => {
                    eprintln!("append of {}..: {e}; again", part[0].seq());
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("append with a member down: {e}"),
            }
        };
        assert_eq!(r.report.last_seq, part.last().expect("entry").seq());
    }
    let cp = l.checkpoint(1_000).expect("checkpoint");
    s.append(&chain, &[], std::slice::from_ref(&cp)).expect("checkpoint");
    let t = open(&c, "/kill").read(&chain).expect("read");
    assert_eq!((t.entries, t.checkpoints), (es, vec![cp]));
}

/// One entry stored in etcd (one transaction: read the head and the records it names, write)
/// next to one appended to the directory (fsync); then a 1,000-entry follow, one entry per
/// append as a follower stores each release, and the same 1,000 in one pull. Printed, bounded
/// loosely.
#[test]
fn one_entry_and_a_thousand_entry_follow_in_a_real_etcd_against_the_directory() {
    let c = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let mut s = open(&c, "/timing");
    let dir = keygate_tests::TempDir::new("keygate-audit-timing").expect("dir");
    let mut l = log(7);
    let es = grow(&mut l, 1, 1_000);
    let chain = *es[0].chain_id();
    let (mut etcd, mut disk) = (Vec::new(), Vec::new());
    for e in &es {
        let t = Instant::now();
        s.append(&chain, std::slice::from_ref(e), &[]).expect("append");
        etcd.push(t.elapsed());
        let t = Instant::now();
        keygate_enclave::audit::store::append_to_dir(dir.path(), std::slice::from_ref(e), &[]).expect("append");
        disk.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (etcd_total, disk_total): (Duration, Duration) = (etcd.iter().sum(), disk.iter().sum());
    let mut l2 = log(8);
    let es2 = grow(&mut l2, 1, 1_000);
    let t = Instant::now();
    let r = s.append(es2[0].chain_id(), &es2, &[]).expect("one pull");
    let one_pull = t.elapsed();
    let dir2 = keygate_tests::TempDir::new("keygate-audit-timing").expect("dir");
    let t = Instant::now();
    keygate_enclave::audit::store::append_to_dir(dir2.path(), &es2, &[]).expect("one pull");
    let one_pull_disk = t.elapsed();
    eprintln!(
        "one entry: etcd median {:?}, directory (fsync) median {:?}; 1,000 entries one per append: etcd {} ms, directory {} ms; \
         1,000 in one pull: etcd {} ms in {} transactions, directory {} ms",
        median(&mut etcd),
        median(&mut disk),
        etcd_total.as_millis(),
        disk_total.as_millis(),
        one_pull.as_millis(),
        r.txns,
        one_pull_disk.as_millis()
    );
    assert_eq!(r.txns, 10);
    assert!(etcd_total + one_pull < Duration::from_secs(120));
}
