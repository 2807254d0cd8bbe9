//! Chaos over a whole KRE cluster (docs/cluster.md, "Chaos run"): a 3-member etcd cluster,
//! member KREs a, b and c (mock parent instances i-a, i-b, i-c), each beside its own `keygate
//! parent` (release and member proxies, the etcd state sync and adoption, `join_from` the
//! other two). Genesis with custodians on a; b and c are joined by their daemons. Then, for
//! KEYGATE_CHAOS_SECS seconds (default 60), at once: clients fetch without pause with `keygate
//! fetch --kre a --kre b --kre c` (failover, a retry budget); signed bundles rotating `prod`'s
//! KEK are pushed to every running member, in a random order, sometimes at the same time
//! (racing exports: one commits, the others adopt); a random KRE is killed (kill -9; at most
//! two at once, never all) and started again after a random short delay, its daemon joins it
//! and replays the kept bundles (`policy_store`); a random etcd member is killed
//! (never a majority) and started again. At the end it checks, and prints the numbers:
//! (a) every fetch succeeded within its retry budget; (b) no key version was ever released
//! as two different keys (a fork or an uncommitted KEK would show so); (c) no KEK version was
//! lost: every version released during the run that the members still release (the newest
//! four) is released identically by every member at the end, and the newest is the number of
//! rotations pushed; (d) the members converge on one committed generation and policy head.
//! KEYGATE_CHAOS_SEED replays a run's random choices (printed at the start).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use keygate_tests::e2e::{ok, path_arg as s, stderr};
use keygate_tests::etcd::EtcdCluster;
use keygate_tests::members::{fetch, fetched_versions, members_genesis, push, rotating_bundle, Images, Member};
use keygate_tests::{keygate, TempDir};

const IMG: Images = Images { seed: "cluster-chaos-e2e", kre_pcr: 0x4b, cp_pcr: 0x1c };
const NAMES: [(&str, &str); 3] = [("a", "i-a"), ("b", "i-b"), ("c", "i-c")];
/// A client's retry budget: rounds over the three members, and the time for all of them.
const FETCH_RETRIES: u32 = 8;
const FETCH_BUDGET: &str = "30s";
/// How long a restarted KRE may take to serve again (its daemon's join).
const SERVE_LIMIT: Duration = Duration::from_secs(30);
/// How long the members may take to converge at the end.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

/// A small random source (xorshift64*), seeded for replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi` (milliseconds, counts).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the run saw.
#[derive(Default)]
struct Seen {
    /// Each fetch: (succeeded, milliseconds, attempts).
    fetches: Vec<(bool, u64, usize)>,
    /// Every key version released, and its key.
    versions: BTreeMap<u32, Vec<u8>>,
    /// Broken expectations, each one line.
    faults: Vec<String>,
    kre_kills: usize,
    etcd_kills: usize,
    rotations: usize,
    pushes_ok: usize,
    pushes_failed: usize,
    pushes_together: usize,
    /// Why pushes failed (their last line of stderr).
    push_errors: Vec<String>,
    /// Restart of a KRE to its status saying it serves, and to its policy replayed (ms).
    rejoin_ms: Vec<u64>,
    restored_ms: Vec<u64>,
}

struct Run {
    stop: AtomicBool,
    down: AtomicUsize,
    seen: Mutex<Seen>,
    members: Vec<Mutex<Member>>,
    releases: Vec<String>,
    parents: Vec<String>,
    dir: PathBuf,
}

impl Run {
    fn fault(&self, what: String) {
        eprintln!("FAULT: {what}");
        lock(&self.seen).faults.push(what);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps `d`, or less when the run stops.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopped() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())));
        }
    }

    /// Records the versions in `out`; a version released as two keys is a fault.
    fn record_versions(&self, out: &Path, whence: &str) {
        let got = fetched_versions(out);
        let mut seen = lock(&self.seen);
        let mut forks = Vec::new();
        for (v, key) in got {
            match seen.versions.get(&v) {
                Some(k) if *k != key => forks.push(format!("version {v} released as two different keys ({whence})")),
                Some(_) => {}
                None => {
                    seen.versions.insert(v, key);
                }
            }
        }
        drop(seen);
        for f in forks {
            self.fault(f);
        }
    }

    /// A client fetching with failover over every member until the run stops.
    fn client(&self, n: usize) {
        let out = self.dir.join(format!("client-{n}"));
        while !self.stopped() {
            let _ = std::fs::remove_dir_all(&out);
            let start = Instant::now();
            let o = fetch(IMG, &self.releases, &out, FETCH_RETRIES, FETCH_BUDGET);
            let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            let e = stderr(&o);
            let attempts = 1
                + e.matches("KRE attempt failed").count()
                + e.matches("asking the next KRE too").count()
                + e.matches("refused a KRE's answer").count();
            lock(&self.seen).fetches.push((o.status.success(), ms, attempts));
            if o.status.success() {
                self.record_versions(&out, &format!("client {n}"));
            } else {
                self.fault(format!("a fetch failed within its retry budget after {ms} ms: {e}"));
            }
        }
    }

    /// Pushes bundles rotating `prod`'s KEK to the running members until the run stops.
    fn rotations(&self, rng: &mut Rng) {
        let bundles = self.dir.join("bundles");
        let mut prev = self.dir.join("genesis.bundle");
        for k in 2.. {
            self.sleep(rng.ms(1500, 4000));
            if self.stopped() {
                return;
            }
            let b = rotating_bundle(&self.dir, &prev, &format!("v{k}"));
            // The bundle is kept first, so that a KRE restarted meanwhile gets it replayed.
            std::fs::copy(&b, bundles.join(format!("policy-v{k:08}.bundle"))).expect("keep the bundle");
            prev = b.clone();
            let mut order: Vec<usize> = (0..self.members.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, usize::try_from(rng.range(0, u64::try_from(i).unwrap_or(0) + 1)).unwrap_or(0));
            }
            let together = rng.range(0, 2) == 0;
            let pushed = |i: usize| {
                // A member being restarted is skipped: its restore replays the bundle.
                let Ok(m) = self.members[i].try_lock() else { return None };
                if !m.kre_runs() {
                    return None;
                }
                let o = push(&b, &self.parents[i], &self.dir.join(format!("pushed-{}", m.name)));
                if !o.status.success() {
                    let e = stderr(&o);
                    let why = e.lines().last().unwrap_or_default().to_owned();
                    lock(&self.seen).push_errors.push(format!("v{k} to {}: {why}", m.name));
                }
                Some(o.status.success())
            };
            let results: Vec<Option<bool>> = if together {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = order.iter().map(|&i| sc.spawn(move || pushed(i))).collect();
                    hs.into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|p| {
                                let why = p.downcast_ref::<String>().cloned().unwrap_or_default();
                                lock(&self.seen).push_errors.push(format!("v{k}: a push panicked: {why}"));
                                Some(false)
                            })
                        })
                        .collect()
                })
            } else {
                order
                    .iter()
                    .map(|&i| {
                        std::thread::sleep(rng.ms(0, 400));
                        pushed(i)
                    })
                    .collect()
            };
            let mut seen = lock(&self.seen);
            seen.rotations += 1;
            seen.pushes_together += usize::from(together);
            seen.pushes_ok += results.iter().filter(|r| **r == Some(true)).count();
            seen.pushes_failed += results.iter().filter(|r| **r == Some(false)).count();
        }
    }

    /// Kills a random KRE now and then (at most two down at once) and starts it again after a
    /// random short delay; its daemon joins it; the bundles are replayed to it.
    fn kre_chaos(&self, rng: &mut Rng) {
        std::thread::scope(|sc| {
            while !self.stopped() {
                self.sleep(rng.ms(2000, 5000));
                if self.stopped() || self.down.load(Ordering::SeqCst) >= 2 {
                    continue;
                }
                let i = usize::try_from(rng.range(0, 3)).unwrap_or(0);
                let delay = rng.ms(200, 3000);
                let mut m = lock(&self.members[i]);
                if !m.kre_runs() {
                    continue;
                }
                self.down.fetch_add(1, Ordering::SeqCst);
                m.kill_kre();
                lock(&self.seen).kre_kills += 1;
                drop(m);
                sc.spawn(move || {
                    std::thread::sleep(delay);
                    self.restart(i);
                    self.down.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }

    /// Starts member `i`'s KRE again; waits until its daemon has joined it and replayed the
    /// bundles.
    fn restart(&self, i: usize) {
        let mut m = lock(&self.members[i]);
        let started = Instant::now();
        m.start_kre();
        let serving = loop {
            let phase = m.status().and_then(|s| s.pointer("/state/phase").and_then(|p| p.as_str()).map(str::to_owned));
            if phase.as_deref() == Some("serving") {
                break started.elapsed();
            }
            if started.elapsed() > SERVE_LIMIT {
                let log = m.daemon_log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                self.fault(format!("{} was not joined within {SERVE_LIMIT:?}: {phase:?}; daemon: {tail:?}", m.name));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Its daemon replays the kept bundles up to the head the joined state records.
        loop {
            let st = m.status().unwrap_or_default();
            let n = |p: &str| st.pointer(p).and_then(serde_json::Value::as_u64).unwrap_or(0);
            if n("/policy_version") >= n("/policy_durable_version") && n("/policy_durable_version") > 0 {
                break;
            }
            if started.elapsed() > SERVE_LIMIT {
                let log = m.daemon_log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                self.fault(format!(
                    "{}'s policy was not replayed within {SERVE_LIMIT:?}: {st}; daemon: {tail:?}",
                    m.name
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut seen = lock(&self.seen);
        seen.rejoin_ms.push(u64::try_from(serving.as_millis()).unwrap_or(u64::MAX));
        seen.restored_ms.push(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    }

    /// Kills a random etcd member now and then (one at a time: never a majority of three) and
    /// starts it again after a random delay.
    fn etcd_chaos(&self, etcd: &mut EtcdCluster, rng: &mut Rng) {
        while !self.stopped() {
            self.sleep(rng.ms(3000, 8000));
            if self.stopped() {
                return;
            }
            let i = usize::try_from(rng.range(0, 3)).unwrap_or(0);
            etcd.kill(i).expect("kill an etcd member");
            lock(&self.seen).etcd_kills += 1;
            std::thread::sleep(rng.ms(500, 3000));
            if let Err(e) = etcd.restart(i) {
                self.fault(format!("etcd member {i} did not come back: {e}"));
                return;
            }
        }
    }
}

/// The `p`th percentile of sorted `v`.
fn percentile(v: &[u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) * p).div_ceil(100)]
}

#[test]
fn a_cluster_under_kills_and_racing_rotations_loses_no_key_and_converges() {
    let secs: u64 = std::env::var("KEYGATE_CHAOS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("KEYGATE_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos() % (1 << 63)).unwrap_or(1))
            | 1
    });
    eprintln!("chaos run: {secs} s, KEYGATE_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let mut etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let store = etcd.url("/chaos");
    let tmp = TempDir::new("keygate-cluster-chaos").expect("tmp");
    let d = tmp.path();
    members_genesis(d, IMG, &NAMES);
    std::fs::create_dir_all(d.join("bundles")).expect("bundles dir");
    let mut members: Vec<Member> = NAMES.iter().map(|(n, i)| Member::new(d, IMG, n, i)).collect();
    let member_addrs: Vec<String> = members.iter().map(Member::member).collect();
    // Genesis with custodians on a; every daemon joins from the two others.
    members[0].start_kre();
    ok(keygate(&["custodian", "init", "--kre", &members[0].parent(), "--store", &store]));
    for (i, m) in members.iter_mut().enumerate() {
        let others: Vec<String> =
            member_addrs.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, a)| a.clone()).collect();
        m.start_daemon(&store, &others, Some(&d.join("bundles")), None);
    }
    for m in &mut members[1..] {
        m.start_kre();
    }
    for m in &members {
        m.wait_serving(SERVE_LIMIT);
    }

    let run = Run {
        stop: AtomicBool::new(false),
        down: AtomicUsize::new(0),
        seen: Mutex::default(),
        releases: members.iter().map(Member::release).collect(),
        parents: members.iter().map(Member::parent).collect(),
        members: members.into_iter().map(Mutex::new).collect(),
        dir: d.to_path_buf(),
    };
    let started = Instant::now();
    let (mut r1, mut r2, mut r3) = (Rng(rng.next() | 1), Rng(rng.next() | 1), Rng(rng.next() | 1));
    std::thread::scope(|sc| {
        let run = &run;
        sc.spawn(move || run.client(0));
        sc.spawn(move || run.client(1));
        sc.spawn(move || run.rotations(&mut r1));
        sc.spawn(move || run.kre_chaos(&mut r2));
        sc.spawn(|| run.etcd_chaos(&mut etcd, &mut r3));
        run.sleep(Duration::from_secs(secs));
        run.stop.store(true, Ordering::SeqCst);
    });
    let ran = started.elapsed();

    // The end: every KRE runs (the chaos restarted each it killed), replays the bundles, and
    // the members converge.
    for m in &run.members {
        lock(m).wait_serving(SERVE_LIMIT);
    }
    let converge = Instant::now();
    let heads = loop {
        let heads: Vec<(u64, u64, u64)> = run
            .members
            .iter()
            .map(|m| {
                let st = lock(m).status().unwrap_or_default();
                let n = |p: &str| st.pointer(p).and_then(serde_json::Value::as_u64).unwrap_or(0);
                (n("/state/committed_generation"), n("/state/pending_generation"), n("/policy_version"))
            })
            .collect();
        if heads.iter().all(|h| *h == heads[0] && h.1 == 0) {
            break heads;
        }
        assert!(
            converge.elapsed() < CONVERGE_LIMIT,
            "(d) the members did not converge on one committed generation: (committed, pending, policy) {heads:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let converge_ms = converge.elapsed().as_millis();

    // (c): each member releases the newest versions exactly as released during the run.
    let mut finals = Vec::new();
    for (i, release) in run.releases.iter().enumerate() {
        let out = d.join(format!("final-{i}"));
        let o = fetch(IMG, std::slice::from_ref(release), &out, FETCH_RETRIES, FETCH_BUDGET);
        assert!(o.status.success(), "member {i} releases at the end: {}", stderr(&o));
        run.record_versions(&out, &format!("member {i} at the end"));
        finals.push(fetched_versions(&out));
    }
    let seen = std::mem::take(&mut *lock(&run.seen));
    let mut ms: Vec<u64> = seen.fetches.iter().filter(|f| f.0).map(|f| f.1).collect();
    ms.sort_unstable();
    let attempts: usize = seen.fetches.iter().map(|f| f.2).sum();
    let succeeded = seen.fetches.iter().filter(|f| f.0).count();
    let (mut rejoin, mut restored) = (seen.rejoin_ms.clone(), seen.restored_ms.clone());
    rejoin.sort_unstable();
    restored.sort_unstable();
    eprintln!("push failures: {:#?}", seen.push_errors);
    eprintln!(
        "chaos: {} s; fetches {succeeded}/{} succeeded ({attempts} attempts), latency p50 {} ms p99 {} ms max {} ms; \
         KRE kills {}, etcd kills {}; rotations {} (pushes ok {}, failed {}, {} pushed to all at once); \
         restart to serving p50 {} ms max {} ms, to policy replayed p50 {} ms max {} ms; \
         versions released {}; converged in {converge_ms} ms at (generation, pending, policy) {:?}",
        ran.as_secs(),
        seen.fetches.len(),
        percentile(&ms, 50),
        percentile(&ms, 99),
        ms.last().copied().unwrap_or(0),
        seen.kre_kills,
        seen.etcd_kills,
        seen.rotations,
        seen.pushes_ok,
        seen.pushes_failed,
        seen.pushes_together,
        percentile(&rejoin, 50),
        rejoin.last().copied().unwrap_or(0),
        percentile(&restored, 50),
        restored.last().copied().unwrap_or(0),
        seen.versions.len(),
        heads[0],
    );
    // (a) and (b): no fault recorded (a failed fetch, a version with two keys, a member not
    // joined, a failed replay).
    assert!(seen.faults.is_empty(), "faults: {:#?}", seen.faults);
    assert!(succeeded > 0 && succeeded == seen.fetches.len(), "(a) every fetch succeeded");
    // (c): every member releases the same versions, each as it was released during the run,
    // and the newest is the last rotation (no version lost or skipped).
    for (i, f) in finals.iter().enumerate() {
        assert_eq!(f, &finals[0], "(c) member {i} releases other versions than member 0");
        for (v, key) in f {
            assert_eq!(seen.versions.get(v), Some(key), "(c) version {v} as released during the run");
        }
    }
    let newest = finals[0].last().map_or(0, |(v, _)| *v);
    assert_eq!(u64::from(newest), heads[0].2, "(c) the newest version is the policy head's (one per rotation)");
    let released_then: Vec<u32> = seen.versions.keys().copied().filter(|v| *v + 4 > newest).collect();
    let released_now: Vec<u32> = finals[0].iter().map(|(v, _)| *v).collect();
    for v in released_then {
        assert!(released_now.contains(&v), "(c) version {v} released during the run is lost at the end");
    }

    // Revocation: a bundle revoking the control plane's image is pushed to one member and
    // waited for until durable (committed to etcd). The other members hold it once their
    // parents adopt that generation (their floor rises: `policy_stale` until the bundle is
    // pushed to them) or get the bundle; until then they still release under the older policy.
    // The window is measured (bounded by the sync pause with honest parents); then the bundle
    // is pushed to every member and no fetch succeeds.
    let last = std::fs::read_dir(d.join("bundles"))
        .map(|rd| rd.flatten().map(|e| e.path()).max())
        .ok()
        .flatten()
        .unwrap_or_else(|| d.join("genesis.bundle"));
    let revoke = keygate_tests::members::signed_bundle(d, &last, "revoke", &["--revoke", "prod=cp"]);
    let push_durable = |i: usize| {
        let pushed = d.join(format!("pushed-{i}"));
        let root = s(&d.join("root.pem"));
        keygate(&[
            "policy",
            "push",
            &s(&revoke),
            "--kre",
            &run.parents[i],
            "--store",
            &s(&pushed),
            "--durable-within",
            "20s",
            "--root",
            &root,
        ])
    };
    let pushed = Instant::now();
    ok(push_durable(0));
    let durable_ms = pushed.elapsed().as_millis();
    let mut released_after: Vec<(usize, u128)> = Vec::new();
    let probe = Instant::now();
    while probe.elapsed() < Duration::from_secs(3) {
        for (i, release) in run.releases.iter().enumerate() {
            let out = d.join(format!("revoked-{i}"));
            let _ = std::fs::remove_dir_all(&out);
            if fetch(IMG, std::slice::from_ref(release), &out, 0, "5s").status.success() {
                released_after.push((i, probe.elapsed().as_millis()));
            }
        }
    }
    let window = released_after.iter().map(|r| r.1).max();
    eprintln!(
        "revocation durable at member 0 in {durable_ms} ms; releases to the revoked image after it (member, ms): \
         {released_after:?}; in force at every member after {} ms",
        window.map_or("0".to_owned(), |w| format!("at most {w}"))
    );
    assert!(
        window.is_none_or(|w| w < 2000),
        "a member released to the revoked image 2 s after the revocation was durable: {released_after:?}"
    );
    for i in 1..run.parents.len() {
        ok(push_durable(i));
    }
    // Durable in the cluster: every member's own receipt. From then on, no member releases to
    // the revoked image, asked alone or with failover.
    let mut args: Vec<String> = ["policy", "durable", &s(&revoke)].map(String::from).into();
    for p in &run.parents {
        args.extend(["--kre".to_owned(), p.clone()]);
    }
    args.extend(["--root".to_owned(), s(&d.join("root.pem")), "--durable-within".into(), "20s".into()]);
    let out = ok(keygate_tests::e2e::keygate_args(&args));
    assert!(out.contains("durable at every member"), "{out}");
    let mut after_cluster_durable = 0;
    for _ in 0..3 {
        for (i, release) in run.releases.iter().enumerate() {
            let out = d.join(format!("revoked-durable-{i}"));
            let _ = std::fs::remove_dir_all(&out);
            if fetch(IMG, std::slice::from_ref(release), &out, 0, "5s").status.success() {
                after_cluster_durable += 1;
            }
        }
    }
    assert_eq!(after_cluster_durable, 0, "a member released to the revoked image after every member's receipt");
    let out = d.join("revoked-all");
    let o = fetch(IMG, &run.releases, &out, 2, "10s");
    assert!(!o.status.success(), "a fetch by the revoked image succeeded");
    // The policy's verdict (revoking `prod`'s only image leaves no `prod`), not an outage.
    let e = stderr(&o);
    assert!(e.contains("unknown_cluster") || e.contains("image_not_allowed"), "{e}");
}
