//! End to end: `keygate demo --cluster`, the KRE cluster tour (docs/cluster.md) on a real etcd.
//! It must exit 0 (every step behaved), show the key facts of the tour in its output (the
//! fetches during the outage, none failed; the restart to serving; the rotation adopted; the
//! forked KRE and the older generation refused; the members' status) and leave nothing in its
//! temporary directory.

use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::{bin, run_with_limit, TempDir};

/// The tour takes under 30 s on a debug build; this leaves room for a loaded machine.
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn the_cluster_demo_shows_failover_rejoin_and_a_refused_fork_and_exits_zero() {
    let tmp = TempDir::new("keygate-demo-cluster-test").expect("tmp");
    let started = Instant::now();
    let o = run_with_limit(Command::new(bin("keygate")).args(["demo", "--cluster"]).env("TMPDIR", tmp.path()), LIMIT);
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("keygate demo --cluster took {took:?}");
    assert!(o.status.success(), "exit {}\n{out}\n{err}", o.status);
    assert!(!out.contains("FAIL"), "{out}");
    for needle in [
        "steps behaved as they should",
        "3 etcd members",
        "b is killed with SIGKILL",
        " 0 failed (",
        "every one released the same data key",
        "restart to serving: ",
        "image_not_allowed",
        "the KRE adopted it and serves generation 2",
        "the same new key from all three",
        "state_refused",
        "waiting for a serving member to confirm",
        "a vouches for generation 2, which the copy takes",
        "this KRE is b",
        "d: not serving, not one of the members",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
    let restart = out.split("restart to serving: ").nth(1).and_then(|r| r.split(" ms").next());
    eprintln!("restart to serving: {restart:?} ms");
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("tmp")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}
