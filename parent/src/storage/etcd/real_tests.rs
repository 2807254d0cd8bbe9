//! The etcd store against a real 3-member etcd cluster on loopback (the kit's
//! [`EtcdCluster`]; `/usr/bin/etcd` from `.ci/etcd-deps.sh`): round trip, racing writers,
//! a member killed, a majority killed, the watch.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keygate_tests::etcd::EtcdCluster;

use super::*;
use crate::storage::crash::blob;

fn cluster() -> EtcdCluster {
    EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"))
}

fn store_at(c: &EtcdCluster, prefix: &str, call: Duration) -> EtcdStore {
    let url: EtcdUrl = c.url(prefix).parse().expect("url");
    EtcdStore::connect_with(&url, Limits { call, ..Limits::default() }).expect("client")
}

/// Another blob with generation `g` (another KRE's export of the same generation).
fn other(g: u64, salt: u8) -> Vec<u8> {
    let mut b = blob(g);
    let n = b.len();
    b[70] ^= salt; // the nonce
    let d = <sha2::Sha384 as sha2::Digest>::digest(&b[..n - 48]);
    b[n - 48..].copy_from_slice(&d);
    b
}

#[test]
fn real_etcd_round_trip_racing_writers_and_the_watch() {
    let c = cluster();
    let wait = Duration::from_secs(10);

    // Round trip, custody, the previous generation kept.
    let mut s = store_at(&c, "/rt", wait);
    assert_eq!(s.load(0).expect("empty"), None);
    for g in 1..=3 {
        assert_eq!(s.store(&blob(g)).expect("store"), g);
    }
    let l = s.load(3).expect("load").expect("some");
    assert_eq!((l.slot, l.header.generation, l.blob), (Slot::Current, 3, blob(3)));
    assert_eq!(s.kv.get(s.generation_key(2).as_bytes()).expect("get").0.map(|kv| kv.value), Some(blob(2)));
    assert_eq!(s.kv.get(s.generation_key(1).as_bytes()).expect("get").0, None);
    s.store_custody(&[9; 48], b"custody").expect("custody");
    assert_eq!(s.load_custody(&[9; 48]).expect("custody").as_deref(), Some(b"custody".as_slice()));
    assert_eq!(s.store(&blob(3)).expect("a retry"), 3);

    // Two parents that both saw generation 3 store their own generation 4: one wins.
    let mut a = store_at(&c, "/rt", wait);
    let mut b = store_at(&c, "/rt", wait);
    let seen = a.current().expect("current");
    assert_eq!(seen, b.current().expect("current"));
    assert_eq!(a.store_seen(&blob(4), seen).expect("a wins"), 4);
    let err = b.store_seen(&other(4, 1), seen).expect_err("b loses");
    assert!(matches!(err, StoreError::Conflict { generation: 4, stored: 4 }), "{err}");
    assert_eq!(b.load(4).expect("load").expect("some").blob, blob(4), "the winner's bytes");

    // Racing threads, many generations: each generation has exactly one winner, the others
    // a typed conflict, and the store holds the winner's bytes.
    let writers = 3;
    let rounds = 15u64;
    let barrier = Arc::new(Barrier::new(writers));
    let url = c.url("/race");
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let barrier = barrier.clone();
            let url: EtcdUrl = url.parse().expect("url");
            std::thread::spawn(move || {
                let mut s = EtcdStore::connect_with(&url, Limits { call: wait, ..Limits::default() }).expect("client");
                let salt = u8::try_from(w + 1).expect("small");
                let mut won = Vec::new();
                let mut failed = Vec::new();
                for g in 1..=rounds {
                    let mine = other(g, salt);
                    // Everyone reads the current generation before anyone writes (no panic
                    // between the barriers: a writer that stopped would leave the others waiting).
                    let seen = s.current();
                    barrier.wait();
                    match seen.and_then(|seen| s.store_seen(&mine, seen)) {
                        Ok(n) => won.push((n, mine)),
                        Err(StoreError::Conflict { generation, stored }) if (generation, stored) == (g, g) => {}
                        Err(e) => failed.push(format!("writer {w} generation {g}: {e}")),
                    }
                    barrier.wait();
                }
                (won, failed)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("writer")).collect();
    let failed: Vec<&String> = results.iter().flat_map(|r| &r.1).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let mut winners: Vec<(u64, Vec<u8>)> = results.into_iter().flat_map(|r| r.0).collect();
    winners.sort_by_key(|w| w.0);
    assert_eq!(winners.iter().map(|w| w.0).collect::<Vec<_>>(), (1..=rounds).collect::<Vec<_>>(), "one winner each");
    let mut check = store_at(&c, "/race", wait);
    let last = winners.last().expect("winners");
    assert_eq!(check.load(rounds).expect("load").expect("some").blob, last.1);
    eprintln!("etcd race: {writers} writers x {rounds} generations, exactly one winner per generation");

    // The watch: a follower waiting for something newer than 4 learns of 5 promptly.
    let url: EtcdUrl = c.url("/rt").parse().expect("url");
    let watcher = std::thread::spawn(move || {
        let mut w = EtcdStore::connect_with(&url, Limits::default()).expect("client");
        let t = Instant::now();
        (w.wait_newer(4, Duration::from_secs(20)).expect("watch"), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let stored = Instant::now();
    assert_eq!(s.store(&blob(5)).expect("store 5"), 5);
    let (seen, waited) = watcher.join().expect("watcher");
    assert_eq!(seen, Some(5));
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    eprintln!("etcd watch: generation 5 seen {:?} after the store returned", stored.elapsed());
    // Nothing newer: the wait ends at its bound with None.
    let t = Instant::now();
    assert_eq!(s.wait_newer(5, Duration::from_millis(300)).expect("watch"), None);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(s.wait_newer(3, Duration::from_secs(5)).expect("at once"), Some(5));
}

#[test]
fn real_etcd_one_member_down_writes_a_majority_down_fails_in_time() {
    let mut c = cluster();
    let mut s = store_at(&c, "/kill", Duration::from_secs(10));
    assert_eq!(s.store(&blob(1)).expect("store"), 1);
    // The first endpoint of the URL (the one the client uses) dies: it fails over.
    c.kill(0).expect("kill");
    let t = Instant::now();
    assert_eq!(s.store(&blob(2)).expect("store with one member of 3 down"), 2);
    eprintln!("etcd: a store with member 0 killed took {:?}", t.elapsed());
    assert_eq!(s.load(2).expect("load").map(|l| l.header.generation), Some(2));
    // A second member dies: no quorum. The write fails with a typed error within its bound.
    c.kill(1).expect("kill");
    let limit = Duration::from_secs(3);
    let mut s = store_at(&c, "/kill", limit);
    let t = Instant::now();
    let err = s.store(&blob(3)).expect_err("no quorum");
    let took = t.elapsed();
    assert!(matches!(err, StoreError::Etcd(EtcdError::Timeout { .. } | EtcdError::Unavailable { .. })), "{err}");
    assert!(took < limit + Duration::from_secs(2), "{took:?}");
    eprintln!("etcd: a store with 2 of 3 members killed failed after {took:?}: {err}");
    // Both come back: the retry succeeds (whether or not the failed write was applied).
    c.restart(0).expect("restart 0");
    c.restart(1).expect("restart 1");
    let mut s = store_at(&c, "/kill", Duration::from_secs(10));
    assert_eq!(s.store(&blob(3)).expect("after restart"), 3);
    assert_eq!(s.load(3).expect("load").map(|l| l.header.generation), Some(3));
}

/// A member that stops answering — frozen (SIGSTOP), as a paused VM or a partition looks: its
/// sockets still accept connections — is left for the next within the call's deadline, for
/// writes and reads alike, and the calls after it go to the member that answered. Without the
/// per-endpoint bound every call waited on the frozen member until its deadline and failed,
/// and every later one started there again.
#[test]
fn real_etcd_a_member_that_stops_answering_is_left_within_the_deadline() {
    let mut c = cluster();
    let call = Duration::from_secs(5);
    let mut s = store_at(&c, "/frozen", call);
    assert_eq!(s.store(&blob(1)).expect("store"), 1);
    // The client's endpoint (the first of the URL, which answered) freezes.
    c.freeze(0).expect("freeze");
    let t = Instant::now();
    let stored = s.store(&blob(2));
    let first = t.elapsed();
    let t = Instant::now();
    let loaded = s.load(2).map(|l| l.map(|l| l.header.generation));
    let stored3 = s.store(&blob(3));
    let after = t.elapsed();
    c.thaw(0).expect("thaw");
    assert_eq!(stored.expect("a store with member 0 frozen"), 2);
    assert_eq!(loaded.expect("a load with member 0 frozen"), Some(2));
    assert_eq!(stored3.expect("the next store"), 3);
    eprintln!("etcd: member 0 frozen: the first store took {first:?}, a load and a store after it {after:?}");
    // Thawed, it catches up; every member serves the newest.
    c.wait_healthy(Duration::from_secs(20)).expect("healthy again");
    let mut s = store_at(&c, "/frozen", call);
    assert_eq!(s.load(3).expect("load").map(|l| l.header.generation), Some(3));
}
