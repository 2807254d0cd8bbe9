//! The etcd bundle store against a real 3-member etcd cluster on loopback (the kit's
//! [`EtcdCluster`]): kept and replayed with one member killed; a fork refused.

use keygate_tests::etcd::EtcdCluster;

use super::tests::test_bundle;
use super::*;

#[test]
fn bundles_in_a_real_etcd_survive_a_killed_member_and_refuse_a_fork() {
    let mut c = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let store: BundleStore = c.url("/real-bundles").parse().expect("url");
    let mut a = store.open().expect("open");
    for v in 1..=3 {
        let (bytes, d) = test_bundle(v, 0);
        a.keep(v, &d, &bytes).expect("keep");
    }
    // The first endpoint's member is killed: another parent (another client) still keeps,
    // lists and reads.
    c.kill(0).expect("kill");
    let mut b = store.open().expect("open");
    let (bytes, d) = test_bundle(4, 0);
    b.keep(4, &d, &bytes).expect("keep with a member down");
    let (same, sd) = test_bundle(3, 0);
    b.keep(3, &sd, &same).expect("the same bundle again");
    let (fork, fd) = test_bundle(3, 9);
    let e = b.check(3, &fd).expect_err("a fork, before a push");
    assert!(matches!(e, BundleStoreError::Fork { version: 3, .. }), "{e}");
    let e = b.keep(3, &fd, &fork).expect_err("a fork");
    let m = e.to_string();
    assert!(m.contains(&hex::encode(sd)) && m.contains(&hex::encode(fd)), "{m}");
    let entries = b.entries(1).expect("list");
    assert_eq!(entries, [2, 3, 4].map(Entry::Version));
    assert_eq!(b.read(&entries[1]).expect("read"), same, "the first bundle of version 3 stays");
    assert!(b.name(&entries[0]).ends_with("/real-bundles/bundles/00000000000000000002"));
}

/// How long keeping and reading back a chain of bundles takes in a real 3-member etcd (the
/// daemon's replay reads them so before pushing): printed, bounded loosely.
#[test]
fn keeping_and_listing_two_hundred_bundles_in_a_real_etcd() {
    let c = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let store: BundleStore = c.url("/many-bundles").parse().expect("url");
    let mut s = store.open().expect("open");
    let bundles: Vec<(Vec<u8>, [u8; 48])> = (1..=200).map(|v| test_bundle(v, 0)).collect();
    let start = std::time::Instant::now();
    for (v, (bytes, d)) in (1..).zip(&bundles) {
        s.keep(v, d, bytes).expect("keep");
    }
    let kept = start.elapsed();
    let start = std::time::Instant::now();
    let entries = s.entries(0).expect("list");
    let read: Vec<Vec<u8>> = entries.iter().map(|e| s.read(e).expect("read")).collect();
    let listed = start.elapsed();
    assert_eq!(read.len(), 200);
    assert!(read.iter().zip(&bundles).all(|(r, (b, _))| r == b), "read back in version order");
    eprintln!(
        "200 bundles of {} bytes: kept in {} ms ({} ms each), listed and read back in {} ms",
        bundles[0].0.len(),
        kept.as_millis(),
        kept.as_millis() / 200,
        listed.as_millis()
    );
    assert!(kept + listed < std::time::Duration::from_secs(60));
}
