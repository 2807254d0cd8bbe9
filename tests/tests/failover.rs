//! End to end: clients of a KRE cluster fail over between its members. Real `keygate` and
//! `keygate-enclave-dev` processes over Unix sockets; the members are independent single KREs
//! (a dead address, a listener that never answers, a KRE whose policy refuses the client, a
//! KRE that serves), with the kit's relay or silent listener counting who was asked.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keygate_attestation::mock::{system_clock, MockNsm};
use keygate_tests::e2e::{dev_kre, keygate_args, path_arg, pcr_args, prod_policy_for, stderr, unix, DevKre, Logged};
use keygate_tests::relay::{Attack, Relay};
use keygate_tests::silent::Silent;
use keygate_tests::{bin, TempDir};

const SEED: &str = "failover-seed";
const GOOD: u8 = 0x5a;
const KRE_PCR: u8 = 0x4b;

/// A KRE on `<dir>/<name>.sock` whose policy allows the control plane's image (PCRs GOOD)
/// when `allow`, else only another image.
fn start_kre(dir: &Path, name: &str, allow: bool) -> DevKre {
    let policy = dir.join(format!("{name}.policy.json"));
    let image = if allow { GOOD } else { 0x77 };
    std::fs::write(&policy, prod_policy_for("cp", image).to_string()).expect("policy");
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen".into(), unix(&sock), "--policy".into(), path_arg(&policy)]);
    cmd.args(pcr_args("--mock-pcr", KRE_PCR, 3));
    DevKre::start(&mut cmd, &sock, &dir.join(format!("{name}.audit")))
}

/// The control plane's mock NSM root (the relay reads client documents with it).
fn cpi_root() -> keygate_attestation::TrustAnchor {
    let pcrs = (0..3).map(|i| (i, vec![GOOD; 48])).collect();
    MockNsm::new(SEED.as_bytes(), pcrs, system_clock()).root_anchor()
}

/// `keygate fetch` of `prod/etcd` from `kres` (in the order given, unless `extra` names
/// another `--kre-order`), writing into `out`, with
/// `extra` arguments.
fn fetch(kres: &[String], out: &Path, extra: &[&str]) -> (Output, Duration) {
    let mut a: Vec<String> = ["fetch", "--cluster", "prod", "--key-id", "etcd", "--nsm", "mock", "--mock-seed", SEED]
        .map(String::from)
        .to_vec();
    for k in kres {
        a.extend(["--kre".into(), k.clone()]);
    }
    if !extra.contains(&"--kre-order") {
        a.extend(["--kre-order".into(), "listed".into()]);
    }
    a.extend(["--out".into(), path_arg(out)]);
    a.extend(pcr_args("--expect-kre-pcr", KRE_PCR, 3));
    a.extend(pcr_args("--mock-pcr", GOOD, 3));
    a.extend(extra.iter().map(|s| s.to_string()));
    let start = Instant::now();
    let o = keygate_args(&a);
    (o, start.elapsed())
}

fn key_written(out: &Path) -> bool {
    std::fs::read(out.join("etcd.key")).is_ok_and(|k| k.len() == 32)
}

#[test]
fn a_dead_member_is_passed_over() {
    let dir = TempDir::new("keygate-failover").expect("tmp");
    let live = start_kre(dir.path(), "live", true);
    let dead = unix(&dir.path().join("dead.sock"));
    let out = dir.path().join("k");
    let (o, took) = fetch(&[dead.clone(), live.addr()], &out, &["--retries", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(key_written(&out));
    let e = stderr(&o);
    assert!(e.contains("KRE attempt failed; asking the other KREs") && e.contains(&dead), "{e}");
    eprintln!("dead then live: {took:?}");
    // In random order too, whichever starts.
    for i in 0..3 {
        let out = dir.path().join(format!("r{i}"));
        let mut a = vec!["--retries", "0"];
        a.extend(["--kre-order", "random"]);
        let (o, _) = fetch(&[dead.clone(), live.addr()], &out, &a);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

#[test]
fn a_member_that_never_answers_is_hedged_well_within_the_budget() {
    let dir = TempDir::new("keygate-failover").expect("tmp");
    let live = start_kre(dir.path(), "live", true);
    let silent = Silent::start(&dir.path().join("silent.sock")).expect("silent");
    let relay_sock = dir.path().join("relay.sock");
    let relay = Relay::start(&relay_sock, live.sock(), cpi_root(), Attack::Forward);
    let out = dir.path().join("k");
    // One attempt may wait 20 s and the whole fetch 25 s: only the hedge finishes it sooner.
    let (o, took) = fetch(
        &[unix(&dir.path().join("silent.sock")), unix(&relay_sock)],
        &out,
        &["--hedge", "300ms", "--timeout", "20s", "--budget", "25s", "--retries", "0"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(key_written(&out));
    assert!(stderr(&o).contains("no answer within the hedge delay"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(20), "finished only after the silent member's timeout: {took:?}");
    assert_eq!(silent.accepted(), 1);
    assert_eq!(relay.handled_at_least(1), 1);
    eprintln!("silent then live, hedge 300ms: {took:?}");
}

#[test]
fn a_policy_refusal_is_final_and_no_other_member_is_asked() {
    let dir = TempDir::new("keygate-failover").expect("tmp");
    let revoking = start_kre(dir.path(), "revoking", false);
    let live = start_kre(dir.path(), "live", true);
    let relay_sock = dir.path().join("relay.sock");
    let relay = Relay::start(&relay_sock, live.sock(), cpi_root(), Attack::Forward);
    let out = dir.path().join("k");
    let (o, took) = fetch(&[revoking.addr(), unix(&relay_sock)], &out, &["--hedge", "5s", "--retries", "3"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.trim().lines().last().unwrap_or_default().contains("image_not_allowed"), "{e}");
    assert!(!key_written(&out), "no key from a member asked after a refusal");
    assert!(!e.contains("retrying") && !e.contains("asking the other KREs"), "{e}");
    // Had the client tried the other member, the relay would have accepted before it exited.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(relay.accepted(), 0, "the other member was asked after a policy refusal: {e}");
    eprintln!("policy refusal: {took:?}");
    // The same member alone serves the client: only the refusal kept it away.
    let (o, took) = fetch(&[unix(&relay_sock)], &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(relay.accepted(), 1);
    eprintln!("the live member alone: {took:?}");
}

#[test]
fn all_members_dead_or_silent_fail_with_a_typed_error_within_the_budget() {
    let dir = TempDir::new("keygate-failover").expect("tmp");
    let out = dir.path().join("k");
    let dead = [unix(&dir.path().join("a.sock")), unix(&dir.path().join("b.sock"))];
    let (o, took) = fetch(&dead, &out, &["--retries", "1000", "--budget", "2s"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let last = e.trim().lines().last().unwrap_or_default().to_owned();
    assert!(last.contains("no KRE served within the budget of 2s") && last.contains("connecting to"), "{e}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(e.matches("retrying").count() >= 2, "rounds with backoff: {e}");
    eprintln!("all dead, budget 2s: {took:?}");

    // Members that accept and never answer: the budget, not the attempts' 20 s, ends it.
    let s1 = Silent::start(&dir.path().join("s1.sock")).expect("silent");
    let s2 = Silent::start(&dir.path().join("s2.sock")).expect("silent");
    let silent = [unix(&dir.path().join("s1.sock")), unix(&dir.path().join("s2.sock"))];
    let (o, took) = fetch(&silent, &out, &["--timeout", "20s", "--budget", "2s", "--hedge", "100ms"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("no KRE served within the budget of 2s") && e.contains("no answer from"), "{e}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "{took:?}");
    assert_eq!((s1.accepted(), s2.accepted()), (1, 1), "both asked, each once");
    assert!(!key_written(&out));
    eprintln!("all silent, budget 2s: {took:?}");
}

#[test]
fn bad_member_lists_are_refused() {
    let dir = TempDir::new("keygate-failover").expect("tmp");
    let out = dir.path().join("k");
    let a = unix(&dir.path().join("a.sock"));
    let (o, _) = fetch(&[a.clone(), a.clone()], &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is given twice"), "{}", stderr(&o));
    let many: Vec<String> = (0..17).map(|i| unix(&dir.path().join(format!("{i}.sock")))).collect();
    let (o, _) = fetch(&many, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("at most 16"), "{}", stderr(&o));
    let (o, _) = fetch(&[a], &out, &["--hedge", "0s"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// GET `path` from the plugin's metrics server: the status code and the body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// The KMS plugin with a dead member listed first gets its key from the live one; when the live
/// one goes too, its health reports the outage.
#[test]
fn the_kms_plugin_fails_over_and_reports_an_outage() {
    let dir = TempDir::new("keygate-failover").expect("tmp");
    let live = start_kre(dir.path(), "live", true);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let metrics = format!("127.0.0.1:{port}");
    let sock = dir.path().join("kms.sock");
    let mut a: Vec<String> =
        ["kms-plugin", "--cluster", "prod", "--key-id", "etcd", "--nsm", "mock", "--mock-seed", SEED]
            .map(String::from)
            .to_vec();
    a.extend(["--listen".into(), unix(&sock), "--metrics-listen".into(), metrics.clone()]);
    a.extend(["--kre".into(), unix(&dir.path().join("dead.sock")), "--kre".into(), live.addr()]);
    a.extend(["--kre-order".into(), "listed".into(), "--lease".into(), "2s".into(), "--grace".into(), "1s".into()]);
    a.extend(["--fetch-timeout".into(), "1s".into()]);
    a.extend(pcr_args("--expect-kre-pcr", KRE_PCR, 3));
    a.extend(pcr_args("--mock-pcr", GOOD, 3));
    let mut plugin = Logged::start(Command::new(bin("keygate")).args(&a), &dir.path().join("plugin.log"));
    plugin.wait_for_socket(&sock);
    let health = |want: &dyn Fn(&(u16, String)) -> bool, limit: Duration| {
        let start = Instant::now();
        loop {
            let h = http_get(&metrics, "/healthz");
            if h.as_ref().is_some_and(want) {
                return h.unwrap_or_default();
            }
            assert!(start.elapsed() < limit, "healthz {h:?}: {}", plugin.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    health(&|(code, body)| *code == 200 && body.trim() == "ok", Duration::from_secs(15));
    live.kill();
    let (code, body) = health(&|(code, _)| *code == 503, Duration::from_secs(10));
    assert_eq!(code, 503);
    assert!(body.contains("lease expired") || body.contains("keys dropped"), "{body}");
    let log = plugin.stop();
    assert!(log.contains("KRE attempt failed; asking the other KREs"), "{log}");
}
