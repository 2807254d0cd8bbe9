//! End to end: DNS names in `tcp:HOST:PORT` addresses. A `keygate proxy` listens on
//! `tcp:localhost:PORT` (loopback only) in front of a development KRE on a Unix socket, and
//! `keygate fetch --kre tcp:localhost:PORT` gets its key through it; a name that does not
//! resolve is refused when binding, with the name in the error.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::e2e::{
    dev_kre, exited, keygate_args, ok, path_arg, pcr_args, prod_policy_for, unix, DevKre, Logged, START_LIMIT,
};
use keygate_tests::{bin, keygate, TempDir};

const SEED: &str = "host-names-seed";
const KRE_PCR: u8 = 0x31;
const CP_PCR: u8 = 0x32;

/// A TCP port on loopback that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Waits until `localhost:port` accepts a TCP connection; panics with the log after the limit.
fn wait_for_tcp(port: u16, proc: &mut Logged) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("localhost", port)).is_err() {
        assert!(proc.process.0.try_wait().expect("wait").is_none(), "exited: {}", proc.log());
        assert!(start.elapsed() < START_LIMIT, "not listening on localhost:{port}: {}", proc.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_proxy_listens_on_a_host_name_and_fetch_connects_to_one() {
    let tmp = TempDir::new("keygate-host-names").expect("tmp");
    let dir = tmp.path();
    std::fs::write(dir.join("policy.json"), prod_policy_for("cp", CP_PCR).to_string()).expect("policy");
    let sock = dir.join("kre.sock");
    let mut cmd = dev_kre(SEED);
    cmd.args(["--listen", &unix(&sock), "--policy", &path_arg(&dir.join("policy.json"))]);
    cmd.args(pcr_args("--mock-pcr", KRE_PCR, 1));
    let kre = DevKre::start(&mut cmd, &sock, &dir.join("audit"));

    let port = free_port();
    let listen = format!("tcp:localhost:{port}");
    let mut proxy_cmd = Command::new(bin("keygate"));
    proxy_cmd.args(["proxy", "--listen", &listen, "--to", &kre.addr(), "--connect-timeout", "2s"]);
    let mut proxy = Logged::start(&mut proxy_cmd, &dir.join("proxy.log"));
    wait_for_tcp(port, &mut proxy);

    let out = dir.join("out");
    let mut args: Vec<String> = vec!["fetch".into(), "--kre".into(), listen.clone(), "--out".into(), path_arg(&out)];
    for (flag, value) in [("--cluster", "prod"), ("--key-id", "etcd"), ("--nsm", "mock"), ("--mock-seed", SEED)] {
        args.extend([flag.to_owned(), value.to_owned()]);
    }
    args.extend(["--retries".into(), "0".into(), "--timeout".into(), "10".into()]);
    args.extend(pcr_args("--expect-kre-pcr", KRE_PCR, 1));
    args.extend(pcr_args("--mock-pcr", CP_PCR, 3));
    ok(keygate_args(&args));
    assert!(out.join("etcd.key").exists(), "the key is written");
    let log = proxy.stop();
    assert!(log.contains(&format!("listen=tcp:localhost:{port}")), "the proxy names its host side: {log}");
    assert!(log.contains("connection opened"), "{log}");

    // A name that does not resolve: refused at bind, naming the address (`.invalid` never
    // resolves, RFC 6761).
    let o = keygate(&["proxy", "--listen", "tcp:no-such-host.invalid:1", "--to", &kre.addr()]);
    exited(&o, 3, "tcp:no-such-host.invalid:1");
}
