//! A KRE cluster under its parents' daemons, for the end-to-end tests of the member join and
//! the chaos test: member KREs (`keygate-enclave-dev` with custodians, the genesis naming the
//! members, a member listener and a mock parent instance), each beside its own `keygate
//! parent` (release and member proxies, the etcd state sync and, with `join_from`, the member
//! join), on Unix sockets in one directory. A KRE can be killed (kill -9) and started again
//! while its daemon runs. Decides nothing for the product; panics with the logs when a step
//! fails; every process is killed when its owner is dropped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::cluster::{custodial_kre, custodians_and_root, fetch_args, genesis_with_members};
use crate::e2e::{keygate_args, ok, path_arg as s, policy_init, prod_policy_for, unix, DevKre, Logged};
use crate::{bin, keygate, run_with_limit};

/// The mock images and seed of one cluster test.
#[derive(Debug, Clone, Copy)]
pub struct Images {
    /// The mock NSM's seed (its root of trust).
    pub seed: &'static str,
    /// PCR0 (every byte) of the KRE image.
    pub kre_pcr: u8,
    /// PCR0-2 (every byte) of the control plane's image, which `prod` allows.
    pub cp_pcr: u8,
}

/// Custodians `c1`..`c3`, the mock root, approver `a1` (`d/a1.pem`) and `d/genesis.bundle`:
/// the prod policy allowing the control plane's image, with `members` (name, parent instance).
pub fn members_genesis(d: &Path, img: Images, members: &[(&str, &str)]) {
    custodians_and_root(d, img.seed);
    ok(keygate(&["keygen", "-o", &s(&d.join("a1.pem"))]));
    policy_init(&d.join("a1.pub.pem"), "0s", &d.join("init.bundle"));
    genesis_with_members(
        &d.join("init.bundle"),
        &prod_policy_for("cp", img.cp_pcr),
        members,
        &d.join("genesis.bundle"),
    );
}

/// Members a (instance i-a) and b (i-b) of image `img` in `d`, the genesis naming both: a's KRE
/// done genesis with its custodians into the etcd `store` and serving beside its daemon (which
/// joins from b); b not started.
pub fn a_serving_b_fresh(d: &Path, img: Images, store: &str) -> (Member, Member) {
    members_genesis(d, img, &[("a", "i-a"), ("b", "i-b")]);
    let mut a = Member::new(d, img, "a", "i-a");
    let b = Member::new(d, img, "b", "i-b");
    a.start_kre();
    ok(keygate(&["custodian", "init", "--kre", &a.parent(), "--store", store]));
    a.start_daemon(store, &[b.member()], None, None);
    (a, b)
}

/// Proposes `d/NAME.bundle` from `from` rotating `prod`'s KEK, signed by `a1` and assembled.
pub fn rotating_bundle(d: &Path, from: &Path, name: &str) -> PathBuf {
    signed_bundle(d, from, name, &["--rotate", "prod"])
}

/// Proposes `d/NAME.bundle` from `from` with the `keygate policy propose` arguments `change`,
/// signed by `a1` and assembled.
pub fn signed_bundle(d: &Path, from: &Path, name: &str, change: &[&str]) -> PathBuf {
    let (prop, sig, out) =
        (d.join(format!("{name}.proposal")), d.join(format!("{name}.sig")), d.join(format!("{name}.bundle")));
    let from_arg = s(from);
    let mut propose = vec!["policy", "propose", "--from", &from_arg];
    propose.extend_from_slice(change);
    let prop_arg = s(&prop);
    propose.extend(["-o", &prop_arg]);
    ok(keygate(&propose));
    let key = s(&d.join("a1.pem"));
    ok(keygate(&["policy", "sign", &s(&prop), "--key", &key, "--current", &s(from), "--yes", "-o", &s(&sig)]));
    ok(keygate(&["policy", "assemble", &s(&prop), &s(&sig), "-o", &s(&out)]));
    out
}

/// One member: its KRE (when running) and its parent's daemon (when started), in `dir`.
#[derive(Debug)]
pub struct Member {
    /// The member's name in the policy.
    pub name: String,
    instance: String,
    dir: PathBuf,
    img: Images,
    kre: Option<DevKre>,
    daemon: Option<Logged>,
    starts: u32,
}

impl Member {
    /// Member `name` on mock parent instance `instance`, nothing started.
    pub fn new(dir: &Path, img: Images, name: &str, instance: &str) -> Self {
        Self {
            name: name.into(),
            instance: instance.into(),
            dir: dir.to_path_buf(),
            img,
            kre: None,
            daemon: None,
            starts: 0,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.name))
    }

    /// The KRE's parent channel.
    pub fn parent(&self) -> String {
        format!("unix:{}.parent", self.sock().display())
    }

    /// The daemon's release proxy (control planes connect here).
    pub fn release(&self) -> String {
        unix(&self.dir.join(format!("{}.proxy", self.name)))
    }

    /// The daemon's member proxy (the other members' daemons join from here).
    pub fn member(&self) -> String {
        unix(&self.dir.join(format!("{}.pmember", self.name)))
    }

    /// Starts the KRE (fresh: it awaits its state); returns when its release socket is open.
    pub fn start_kre(&mut self) {
        assert!(self.kre.is_none(), "{} runs already", self.name);
        self.starts += 1;
        let member = self.dir.join(format!("{}.sock.member", self.name));
        let _ = std::fs::remove_file(&member);
        let extra = [
            "--genesis".to_owned(),
            s(&self.dir.join("genesis.bundle")),
            "--member-listen".into(),
            unix(&member),
            "--mock-parent-instance".into(),
            self.instance.clone(),
        ];
        let log = self.dir.join(format!("{}-kre-{}.log", self.name, self.starts));
        self.kre = Some(custodial_kre(&self.dir, self.img.seed, self.img.kre_pcr, &self.sock(), &extra, &log));
    }

    /// kill -9 of the KRE (and its audit follower); its daemon keeps running.
    pub fn kill_kre(&mut self) {
        if let Some(k) = self.kre.take() {
            k.kill();
        }
    }

    /// Whether the KRE runs.
    pub fn kre_runs(&self) -> bool {
        self.kre.is_some()
    }

    /// Starts the member's `keygate parent`: release and member proxies, the state in `store`
    /// (an etcd URL), synced every 250 ms, joining from `join_from` (the other members'
    /// [`Member::member`]), replaying the bundles in `policy_store` (a directory, or an etcd URL as a path) when given, metrics on
    /// `metrics` when given. Returns when its proxy listens.
    pub fn start_daemon(
        &mut self,
        store: &str,
        join_from: &[String],
        policy_store: Option<&Path>,
        metrics: Option<&str>,
    ) {
        let list = join_from.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ");
        let mut config = format!(
            "kre_parent = \"{}\"\nrelease_listen = \"{}\"\nrelease_to = \"{}\"\n\
             member_listen = \"{}\"\nmember_to = \"unix:{}.member\"\nstate_store = \"{store}\"\n\
             sync_every = \"250ms\"\njoin_from = [{list}]\n",
            self.parent(),
            self.release(),
            unix(&self.sock()),
            self.member(),
            self.sock().display(),
        );
        if let Some(p) = policy_store {
            config.push_str(&format!("policy_store = \"{}\"\n", p.display()));
        }
        if let Some(m) = metrics {
            config.push_str(&format!("metrics_listen = \"{m}\"\nstatus_every = \"250ms\"\n"));
        }
        let path = self.dir.join(format!("{}-parent.toml", self.name));
        std::fs::write(&path, config).expect("config");
        let mut cmd = Command::new(bin("keygate"));
        cmd.args(["parent", "--config", &s(&path)]).env("KEYGATE_LOG", "info");
        let mut daemon = Logged::start(&mut cmd, &self.dir.join(format!("{}-parent.log", self.name)));
        daemon.wait_for_socket(&self.dir.join(format!("{}.proxy", self.name)));
        self.daemon = Some(daemon);
    }

    /// What the daemon logged so far.
    pub fn daemon_log(&self) -> String {
        self.daemon.as_ref().map(Logged::log).unwrap_or_default()
    }

    /// `keygate status --json` of the KRE (`None` when it does not answer).
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = keygate(&["--json", "status", "--kre", &self.parent()]);
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Waits until the KRE's status says it serves, at most `limit`; panics with the logs.
    pub fn wait_serving(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let st = self.status();
            if st.as_ref().is_some_and(|s| s.pointer("/state/phase").and_then(|p| p.as_str()) == Some("serving")) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{} does not serve after {limit:?}: {st:?}\ndaemon: {}",
                self.name,
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `keygate fetch` of the key `etcd` from the release addresses `kres` (failover over them),
/// written into `out`, with `retries` rounds within `budget`.
pub fn fetch(img: Images, kres: &[String], out: &Path, retries: u32, budget: &str) -> Output {
    let mut a = fetch_args(img.seed, (img.kre_pcr, img.cp_pcr), &kres[0], out, &["etcd"], retries);
    for k in &kres[1..] {
        a.extend(["--kre".into(), k.clone()]);
    }
    a.extend(["--budget".into(), budget.into(), "--timeout".into(), "5s".into()]);
    a.extend(["--hedge".into(), "500ms".into()]);
    keygate_args(&a)
}

/// Every `etcd.vN.key` file in `out`: (N, the key's bytes).
pub fn fetched_versions(out: &Path) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(out).map(|rd| rd.flatten().collect::<Vec<_>>()).unwrap_or_default() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("etcd.v").and_then(|r| r.strip_suffix(".key")) else { continue };
        if let (Ok(n), Ok(bytes)) = (n.parse::<u32>(), std::fs::read(e.path())) {
            v.push((n, bytes));
        }
    }
    v.sort();
    v
}

/// `GET /metrics` of `addr` (plain HTTP/1.0 over loopback, 5 s limit): the text.
pub fn metrics_text(addr: &str) -> String {
    let get = || -> std::io::Result<String> {
        let mut c = std::net::TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        c.read_to_string(&mut body)?;
        Ok(body)
    };
    get().unwrap_or_default()
}

/// The value of the sample line `name` (with its labels, exactly) in a metrics text (0 when
/// absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// `keygate policy push BUNDLE --kre PARENT --store BUNDLES --durable-within 0`, (30 s limit);
/// BUNDLES is a directory, or an etcd URL as a path.
pub fn push(bundle: &Path, parent: &str, bundles: &Path) -> Output {
    run_with_limit(
        Command::new(bin("keygate")).args([
            "policy",
            "push",
            &s(bundle),
            "--kre",
            parent,
            "--store",
            &s(bundles),
            "--durable-within",
            "0",
        ]),
        Duration::from_secs(30),
    )
}
