//! The parent daemon rejoins its KRE by itself (`join_from`, docs/cluster.md): members A and
//! B, each beside its own `keygate parent` with the state in etcd. A does genesis with its
//! custodians; B starts fresh and its daemon joins it from A. B's KRE is then killed (kill -9)
//! and started again: its daemon joins it again, replays the policy bundles (a KEK rotation
//! pushed to A only) and it serves without any custodian or operator; the time from the
//! restart to the first release through B's proxy is printed.
//! With every other member down, the daemon's joins fail, are logged with the member and the
//! reason, counted, retried, and B stays sealed.

use std::time::{Duration, Instant};

use keygate_tests::e2e::ok;
use keygate_tests::members::{
    a_serving_b_fresh, fetch, fetched_versions, metric, metrics_text, push, rotating_bundle, Images, Member,
};
use keygate_tests::scrape::free_loopback_addr;
use keygate_tests::TempDir;

const IMG: Images = Images { seed: "cluster-rejoin-e2e", kre_pcr: 0x4b, cp_pcr: 0x1c };
/// How long a KRE may take to serve again after its start (the target is 1 s).
const SERVE_LIMIT: Duration = Duration::from_secs(15);

/// Fetches through `release` until a release succeeds (at most [`SERVE_LIMIT`]); the key.
fn first_release(release: &str, out: &std::path::Path, b: &Member) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let _ = std::fs::remove_dir_all(out);
        let o = fetch(IMG, &[release.to_owned()], out, 0, "2s");
        if o.status.success() {
            return std::fs::read(out.join("etcd.key")).expect("key");
        }
        assert!(
            start.elapsed() < SERVE_LIMIT,
            "no release: {}\ndaemon: {}",
            String::from_utf8_lossy(&o.stderr),
            b.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fetches through `release` until the release has KEK version `v` (committed: at most
/// [`SERVE_LIMIT`]); that version's key.
fn release_of(v: u32, release: &str, out: &std::path::Path, m: &Member) -> Vec<u8> {
    let start = Instant::now();
    loop {
        first_release(release, out, m);
        if let Some((_, key)) = fetched_versions(out).into_iter().find(|(n, _)| *n == v) {
            return key;
        }
        assert!(start.elapsed() < SERVE_LIMIT, "{} never releases version {v}: {}", m.name, m.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_member_kre_is_joined_again_by_its_daemon_and_serves_without_custodians() {
    let etcd = keygate_tests::etcd::EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
    let store = etcd.url("/rejoin");
    let dir = TempDir::new("keygate-cluster-rejoin").expect("tmp");
    let d = dir.path();
    // A: genesis with its custodians, then its daemon.
    let (mut a, mut b) = a_serving_b_fresh(d, IMG, &store);
    let key = first_release(&a.release(), &d.join("ka"), &a);

    // B's daemon: A, and a member that does not exist (tried first half of the time).
    let nowhere = format!("unix:{}", d.join("nowhere.pmember").display());
    let metrics = free_loopback_addr();
    let bundles = d.join("bundles");
    std::fs::create_dir_all(&bundles).expect("bundles dir");
    b.start_daemon(&store, &[a.member(), nowhere.clone()], Some(&bundles), Some(&metrics));
    // B starts fresh: its daemon joins it from A.
    b.start_kre();
    assert_eq!(first_release(&b.release(), &d.join("kb"), &b), key, "B releases A's data key");

    // A bundle rotating prod's KEK is pushed to A only (kept in the bundles B's daemon
    // replays); A's daemon commits generation 2, B's adopts it and replays the bundle: B
    // releases the rotated key without anyone pushing to it.
    let v2 = rotating_bundle(d, &d.join("genesis.bundle"), "v2");
    ok(push(&v2, &a.parent(), &bundles));
    let key = release_of(2, &a.release(), &d.join("ka2"), &a);
    assert_eq!(release_of(2, &b.release(), &d.join("kb1"), &b), key, "B releases A's rotated key");
    assert!(b.daemon_log().contains("the kept bundles replayed"), "{}", b.daemon_log());

    // kill -9 of B's KRE, and a restart: the daemon joins it again.
    b.kill_kre();
    let restarted = Instant::now();
    b.start_kre();
    let up = restarted.elapsed();
    assert_eq!(first_release(&b.release(), &d.join("kb2"), &b), key, "the restarted B releases A's key");
    let serving = restarted.elapsed();
    eprintln!(
        "restart to first release through B's daemon: {} ms (the KRE's start to its socket: {} ms)",
        serving.as_millis(),
        up.as_millis()
    );
    let log = b.daemon_log();
    assert_eq!(log.matches("the KRE joined from a member and serves").count(), 2, "{log}");
    let text = metrics_text(&metrics);
    assert!(metric(&text, "keygate_member_joins_total{outcome=\"ok\"}") >= 2.0, "{text}");
    let status = b.status().expect("status");
    assert_eq!(status.pointer("/state/phase").and_then(|p| p.as_str()), Some("serving"), "{status}");

    // Every other member down: B's daemon tries each, logs why, counts it and backs off; B
    // stays sealed (only custodians can unseal it now).
    a.kill_kre();
    b.kill_kre();
    b.start_kre();
    let start = Instant::now();
    while b.daemon_log().matches("no member joined the KRE").count() < 2 {
        assert!(start.elapsed() < SERVE_LIMIT, "no failed join reported: {}", b.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = b.daemon_log();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("a join failed")).collect();
    assert!(failed.iter().any(|l| l.contains(&a.member())), "{log}");
    assert!(failed.iter().any(|l| l.contains(&nowhere)), "{log}");
    let text = metrics_text(&metrics);
    assert!(metric(&text, "keygate_member_joins_total{outcome=\"failed\"}") >= 4.0, "{text}");
    let phase = b.status().and_then(|s| s.pointer("/state/phase").and_then(|p| p.as_str()).map(str::to_owned));
    assert_ne!(phase.as_deref(), Some("serving"), "B serves with no member to join from");
}
