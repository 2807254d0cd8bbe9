//! End to end: `keygate parent --config FILE` beside a development KRE on Unix sockets. The
//! daemon proxies the release channel, follows the audit trail (without which the KRE
//! withholds every release) and syncs the state; the KRE is killed with kill -9 and started
//! again, and the daemon, still running, serves fetches again; SIGTERM stops it with exit 0.
//! Its metrics and health are scraped with an independent Prometheus text parser throughout.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::e2e::{dev_kre, keygate_args, path_arg, pcr_args, prod_policy_for, stderr, unix, Logged};
use keygate_tests::scrape::{free_loopback_addr, python_ready, sample, scrape};
use keygate_tests::{bin, TempDir};

const SEED: &str = "parent-daemon-seed";
const KRE_PCR: u8 = 0x4b;
const CP_PCR: u8 = 0x5a;
/// How long a fetch may take to succeed again (a KRE restart, the daemon's backoff).
const FETCH_LIMIT: Duration = Duration::from_secs(40);

/// Starts the development KRE listening on `dir/kre.sock` (its log `dir/kre-N.log`).
fn start_kre(dir: &Path, n: u32) -> Logged {
    let sock = dir.join("kre.sock");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--policy", &path_arg(&dir.join("policy.json"))]);
    cmd.args(pcr_args("--mock-pcr", KRE_PCR, 1));
    let mut kre = Logged::start(&mut cmd, &dir.join(format!("kre-{n}.log")));
    kre.wait_for_socket(&sock);
    kre
}

/// Fetches the key `etcd` through `proxy` until it succeeds, at most [`FETCH_LIMIT`].
fn fetch_until_released(proxy: &Path, out: &Path, daemon: &Logged) {
    let mut args: Vec<String> = vec!["fetch".into(), "--kre".into(), unix(proxy), "--out".into(), path_arg(out)];
    for (flag, value) in [("--cluster", "prod"), ("--key-id", "etcd"), ("--nsm", "mock"), ("--mock-seed", SEED)] {
        args.extend([flag.to_owned(), value.to_owned()]);
    }
    args.extend(["--retries".into(), "0".into(), "--timeout".into(), "5".into()]);
    args.extend(pcr_args("--expect-kre-pcr", KRE_PCR, 1));
    args.extend(pcr_args("--mock-pcr", CP_PCR, 3));
    let start = Instant::now();
    loop {
        let o = keygate_args(&args);
        if o.status.success() {
            assert!(out.join("etcd.key").exists(), "the key is written");
            return;
        }
        assert!(
            start.elapsed() < FETCH_LIMIT,
            "no release through the daemon: {}\ndaemon: {}",
            stderr(&o),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Releases the daemon has seen the KRE answer.
fn released(s: &serde_json::Value) -> f64 {
    sample(s, "keygate_kre_releases", "keygate_kre_releases_total", serde_json::json!({}))
}

/// A gauge's value.
fn gauge(s: &serde_json::Value, family: &str, labels: serde_json::Value) -> f64 {
    sample(s, family, family, labels)
}

/// Scrapes the daemon's metrics until `ready` holds (the status is asked every 250 ms).
fn scrape_until(addr: &str, daemon: &Logged, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = scrape(addr);
        if ready(&s) {
            return s;
        }
        assert!(start.elapsed() < FETCH_LIMIT, "metrics never got there: {s}\ndaemon: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_daemon_survives_a_kre_kill_and_stops_cleanly_on_sigterm() {
    let tmp = TempDir::new("keygate-parent-daemon").expect("tmp");
    let dir = tmp.path();
    std::fs::write(dir.join("policy.json"), prod_policy_for("cp", CP_PCR).to_string()).expect("policy");
    let kre = start_kre(dir, 1);

    let proxy = dir.join("proxy.sock");
    let kre_sock = dir.join("kre.sock");
    let metrics = free_loopback_addr();
    let config = format!(
        "kre_parent = \"unix:{}.parent\"\nrelease_listen = \"{}\"\nrelease_to = \"{}\"\n\
         state_dir = \"{}\"\naudit_dir = \"{}\"\naudit_follow = \"1s\"\n\
         metrics_listen = \"{metrics}\"\nstatus_every = \"250ms\"\n",
        kre_sock.display(),
        unix(&proxy),
        unix(&kre_sock),
        dir.join("state").display(),
        dir.join("audit").display(),
    );
    std::fs::write(dir.join("parent.toml"), config).expect("config");
    // One key from each source: the file above, the environment and a flag.
    let mut cmd = Command::new(bin("keygate"));
    cmd.args(["parent", "--config", &path_arg(&dir.join("parent.toml")), "--sync-every", "1s"])
        .env("KEYGATE_PARENT_SHUTDOWN_GRACE", "3s")
        .env("KEYGATE_LOG", "info");
    let mut daemon = Logged::start(&mut cmd, &dir.join("parent.log"));
    daemon.wait_for_socket(&proxy);

    let out = dir.join("out");
    fetch_until_released(&proxy, &out, &daemon);
    let scraping = python_ready("prometheus_client");
    if scraping {
        let s = scrape_until(&metrics, &daemon, |s| released(s) >= 1.0 && s["healthz"][0] == 200);
        assert_eq!(s["healthz"], serde_json::json!([200, "ok\n"]), "{s}");
        assert_eq!(s["families"]["keygate_kre_releases"]["type"], "counter", "{s}");
        assert_eq!(gauge(&s, "keygate_kre_up", serde_json::json!({})), 1.0, "{s}");
        let release = serde_json::json!({"channel": "release"});
        let forwarded = sample(&s, "keygate_proxy_connections", "keygate_proxy_connections_total", release.clone());
        assert!(forwarded >= 1.0, "{s}");
        let lifetimes = "keygate_proxy_connection_duration_seconds";
        assert!(sample(&s, lifetimes, &format!("{lifetimes}_count"), release) >= 1.0, "{s}");
        let steps = "keygate_parent_task_steps";
        let ok = |task: &str| {
            sample(&s, steps, &format!("{steps}_total"), serde_json::json!({"task": task, "outcome": "ok"}))
        };
        assert!(ok("audit pull") >= 1.0 && ok("state sync") >= 1.0, "{s}");
    }

    // kill -9 the KRE: the daemon's tasks fail, are reported and restarted; it keeps running.
    let _ = kre.stop();
    let start = Instant::now();
    while !daemon.log().contains("task failed; restarting it") {
        assert!(start.elapsed() < FETCH_LIMIT, "no task failure reported: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.process.0.try_wait().expect("wait").is_none(), "the daemon exited: {}", daemon.log());
    if scraping {
        // Health reports the outage; the counters keep what they had.
        // (A task's failure may be reported first; the status ask notices within 250 ms.)
        let s = scrape_until(&metrics, &daemon, |s| {
            s["healthz"][0] == 503 && gauge(s, "keygate_kre_up", serde_json::json!({})) == 0.0
        });
        assert!(s["healthz"][1].as_str().unwrap_or_default().contains("does not answer"), "{s}");
        assert_eq!(gauge(&s, "keygate_kre_up", serde_json::json!({})), 0.0, "{s}");
        assert!(released(&s) >= 1.0, "{s}");
    }

    let _kre = start_kre(dir, 2);
    std::fs::remove_dir_all(&out).expect("clear");
    fetch_until_released(&proxy, &out, &daemon);
    assert!(daemon.process.0.try_wait().expect("wait").is_none(), "the daemon exited: {}", daemon.log());
    if scraping {
        // The restarted KRE counts from 0; the daemon's counter only grows.
        let s = scrape_until(&metrics, &daemon, |s| released(s) >= 2.0 && s["healthz"][0] == 200);
        assert_eq!(gauge(&s, "keygate_kre_phase", serde_json::json!({"phase": "serving"})), 1.0, "{s}");
    }
    let runs = std::fs::read_dir(dir.join("audit")).expect("audit dir").flatten();
    assert!(
        runs.into_iter().any(|e| e.file_name().to_string_lossy().starts_with("chain-")),
        "the restarted KRE's chain is followed into its own run directory"
    );

    // SIGTERM: the daemon stops within its grace (3 s) and exits 0.
    let pid = daemon.process.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = daemon.process.0.try_wait().expect("wait") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still running after SIGTERM: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("keygate parent stopped"), "{log}");
    // Its log is a file, not a terminal: plain text, no colour escape codes; times in RFC 3339.
    assert!(!log.contains('\u{1b}'), "escape codes in a log file: {log:?}");
    let first = log.lines().next().unwrap_or_default();
    assert!(first.len() > 20 && first.as_bytes()[4] == b'-' && first[..20].contains('T'), "{first}");
}
