//! The KRE's audit trail kept in etcd (`audit_store = "etcd://…"`, docs/cluster.md), end to
//! end: a development KRE, `keygate parent` following its trail into a real 3-member etcd
//! cluster over loopback, releases (each answered only once its entry is stored in etcd), the
//! daemon killed with kill -9 while a release waits and started again (no gap, no duplicate),
//! an etcd member killed; `audit export` then `audit verify` pass; a record tampered with in
//! etcd is named by `audit verify`, after an export and read directly.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::e2e::{dev_kre, ok, path_arg as s, pcr_args, prod_policy_for, unix, Logged};
use keygate_tests::etcd::EtcdCluster;
use keygate_tests::members::{fetch, Images};
use keygate_tests::{bin, keygate, KillOnDrop, TempDir};

const IMG: Images = Images { seed: "etcd-audit-e2e", kre_pcr: 0x4b, cp_pcr: 0x5a };
const PREFIX: &str = "/audit-e2e";

fn start_kre(d: &Path) -> Logged {
    let sock = d.join("kre.sock");
    let mut cmd = dev_kre(IMG.seed);
    cmd.args(["--listen", &unix(&sock), "--policy", &s(&d.join("policy.json"))]);
    cmd.args(pcr_args("--mock-pcr", IMG.kre_pcr, 1));
    let mut kre = Logged::start(&mut cmd, &d.join("kre.log"));
    kre.wait_for_socket(&sock);
    kre
}

/// `keygate parent` proxying the release channel and following the audit trail into etcd
/// (`n` numbers its log).
fn start_daemon(d: &Path, store: &str, n: u32) -> Logged {
    let kre = d.join("kre.sock");
    let config = format!(
        "kre_parent = \"unix:{}.parent\"\nrelease_listen = \"{}\"\nrelease_to = \"{}\"\n\
         audit_store = \"{store}\"\naudit_follow = \"200ms\"\n",
        kre.display(),
        unix(&d.join("proxy.sock")),
        unix(&kre),
    );
    std::fs::write(d.join("parent.toml"), config).expect("config");
    let _ = std::fs::remove_file(d.join("proxy.sock"));
    let mut cmd = Command::new(bin("keygate"));
    cmd.args(["parent", "--config", &s(&d.join("parent.toml"))]).env("KEYGATE_LOG", "info");
    let mut daemon = Logged::start(&mut cmd, &d.join(format!("parent-{n}.log")));
    daemon.wait_for_socket(&d.join("proxy.sock"));
    daemon
}

/// A release through `addr`, retried within 30 s; panics with the daemon's log.
fn release(addr: &str, out: &Path, daemon: &Logged) {
    let start = Instant::now();
    loop {
        let _ = std::fs::remove_dir_all(out);
        let o = fetch(IMG, &[addr.to_owned()], out, 0, "10s");
        if o.status.success() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no release: {}\ndaemon: {}",
            String::from_utf8_lossy(&o.stderr),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verify(dir: &str, root: &Path) -> std::process::Output {
    let mut args = vec!["--json".to_owned(), "audit".into(), "verify".into(), dir.into(), "--root".into(), s(root)];
    args.extend(pcr_args("--expect-kre-pcr", IMG.kre_pcr, 1));
    keygate_tests::e2e::keygate_args(&args)
}

/// The KRE's last audit seq and its chain id (hex), from its status.
fn kre_audit(d: &Path) -> (u64, String) {
    let o = keygate(&["--json", "status", "--kre", &format!("unix:{}.parent", d.join("kre.sock").display())]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    (j["audit"]["last_seq"].as_u64().expect("last_seq"), j["audit"]["chain_id"].as_str().expect("chain").to_owned())
}

#[test]
fn the_daemon_follows_the_trail_into_etcd_across_a_kill_and_export_then_verify_pass() {
    let mut etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let url = etcd.url(PREFIX);
    let dir = TempDir::new("keygate-etcd-audit").expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("policy.json"), prod_policy_for("cp", IMG.cp_pcr).to_string()).expect("policy");
    ok(keygate(&["attestation", "mock-root", "--seed", IMG.seed, "-o", &s(&d.join("root.pem"))]));
    let _kre = start_kre(d);
    let direct = unix(&d.join("kre.sock"));
    let proxy = unix(&d.join("proxy.sock"));

    let mut daemon = start_daemon(d, &url, 1);
    for i in 0..2 {
        release(&proxy, &d.join(format!("out{i}")), &daemon);
    }
    // kill -9 of the daemon while a release (straight to the KRE) waits for its entry to be
    // stored: at any point of its round — before the transaction, after it and before the
    // acknowledgement. The next daemon stores what is missing, once, and the release is
    // answered. An etcd member is killed on the way.
    for round in 0..3u32 {
        let out = d.join(format!("direct{round}"));
        let mut a =
            keygate_tests::cluster::fetch_args(IMG.seed, (IMG.kre_pcr, IMG.cp_pcr), &direct, &out, &["etcd"], 3);
        a.extend(["--timeout".into(), "20s".into()]);
        let mut waiting = KillOnDrop(
            Command::new(bin("keygate"))
                .args(&a)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("fetch"),
        );
        std::thread::sleep(Duration::from_millis(40 * u64::from(round)));
        let _ = daemon.stop();
        if round == 1 {
            etcd.kill(0).expect("kill an etcd member");
        }
        daemon = start_daemon(d, &url, round + 2);
        let start = Instant::now();
        let status = loop {
            if let Some(st) = waiting.0.try_wait().expect("wait") {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the release never ended: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "the waiting release was answered after the restart: {}", daemon.log());
        waiting.kill();
    }
    release(&proxy, &d.join("out-last"), &daemon);

    // Everything the KRE wrote is stored, each seq once: the stored entry keys are exactly
    // 1..=last (the KRE's status), and the export verifies.
    let (last, chain) = kre_audit(d);
    let start = Instant::now();
    let base = format!("{PREFIX}/audit/{chain}");
    let stored = loop {
        let keys = etcd.range(format!("{base}/e/").as_bytes(), format!("{base}/e0").as_bytes()).expect("range");
        if u64::try_from(keys.len()).expect("count") >= last || start.elapsed() > Duration::from_secs(20) {
            break keys;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seqs: Vec<u64> = stored
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).rsplit('/').next().and_then(|n| n.parse().ok()).expect("seq"))
        .collect();
    let n = u64::try_from(seqs.len()).expect("count");
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "no gap");
    assert!(n >= last && last >= 7, "stored {n} of the KRE's {last}");
    drop(daemon);
    // `audit pull --store` (one-shot, as another parent would): nothing new, the same head.
    let parent = format!("unix:{}.parent", d.join("kre.sock").display());
    let out = ok(keygate(&["audit", "pull", "--kre", &parent, "--store", &url]));
    assert!(out.contains(&format!("{base} (last seq {n})")), "{out}");

    let export = d.join("export");
    let out = ok(keygate(&["audit", "export", "--store", &url, "--dir", &s(&export)]));
    assert!(out.contains("1 run(s)"), "{out}");
    let v = verify(&s(&export), &d.join("root.pem"));
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).expect("verify JSON");
    assert_eq!(v.status.code(), Some(0), "{j} {}", String::from_utf8_lossy(&v.stderr));
    assert_eq!((j["ok"].as_bool(), j["last_seq"].as_u64()), (Some(true), Some(n)), "{j}");
    // `audit verify` reads etcd directly as well.
    let v = verify(&url, &d.join("root.pem"));
    assert_eq!(v.status.code(), Some(0), "{}", String::from_utf8_lossy(&v.stderr));
    // `audit show` reads etcd directly: the same records as the export.
    let from_etcd = ok(keygate(&["audit", "show", &url, "--json"]));
    assert_eq!(from_etcd, ok(keygate(&["audit", "show", &s(&export), "--json"])));
    // An export never writes over files.
    let again = keygate(&["audit", "export", "--store", &url, "--dir", &s(&export)]);
    assert_eq!(again.status.code(), Some(1), "{}", String::from_utf8_lossy(&again.stderr));

    // Tampering in etcd: entry 3 replaced by entry 2's bytes (a well-formed record in the
    // wrong place). Export copies it; verify names the break, as it does read directly.
    etcd.put(format!("{base}/e/{:020}", 3).as_bytes(), &stored[1].1).expect("tamper");
    let tampered = d.join("tampered");
    ok(keygate(&["audit", "export", "--store", &url, "--dir", &s(&tampered)]));
    for target in [s(&tampered), url.clone()] {
        let v = verify(&target, &d.join("root.pem"));
        let j: serde_json::Value = serde_json::from_slice(&v.stdout).expect("verify JSON");
        assert_eq!((v.status.code(), j["ok"].as_bool()), (Some(1), Some(false)), "{target}: {j}");
    }
}
