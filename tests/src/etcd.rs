//! A real etcd cluster for the tests: N members of `/usr/bin/etcd` (Debian's etcd-server,
//! installed by `.ci/etcd-deps.sh`) on loopback ports picked free, each with its data in a
//! private directory of a [`TempDir`], started with one `--initial-cluster`, waited for until
//! every running member reports healthy (bounded). A member can be killed with SIGKILL and
//! restarted on the same data; every member is killed and reaped when the cluster is dropped.
//! Its members and directory are recorded for [`crate::clean_up`] like the kit's other children
//! (and, while the kit records, etcd is started through `setpriv --pdeathsig KILL`: it dies
//! with the demo even when the demo is killed with SIGKILL).
//!
//! It decides only ports, lifetimes and deadlines; it trusts nothing etcd says beyond
//! `/health` answering `"health":"true"`. Nothing here panics: errors are [`EtcdClusterError`].

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Where the tests expect the etcd server.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The longest [`EtcdCluster::start`] and [`EtcdCluster::restart`] wait for health.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// The most members a test cluster has.
const MAX_MEMBERS: usize = 7;
/// How many times [`EtcdCluster::start`] tries new ports after one was taken under it.
const START_ATTEMPTS: usize = 4;

/// Why the cluster could not be started or reached.
#[derive(Debug)]
pub enum EtcdClusterError {
    /// `/usr/bin/etcd` is missing.
    Missing,
    /// A cluster of this size is not offered.
    Size(usize),
    /// A file or process operation failed.
    Io(&'static str, std::io::Error),
    /// A member exited while it should run.
    Exited {
        /// The member.
        member: usize,
        /// The end of its log.
        log_tail: String,
    },
    /// Not every running member was healthy in time.
    Unhealthy {
        /// How long was waited.
        waited: Duration,
        /// The members that were not healthy.
        members: Vec<usize>,
    },
    /// No such member.
    NoMember(usize),
}

impl fmt::Display for EtcdClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(
                f,
                "{ETCD_BIN} is missing: run `bash .ci/etcd-deps.sh` (installs Debian's etcd-server), as .ci/test does"
            ),
            Self::Size(n) => write!(f, "a test cluster has 1 to {MAX_MEMBERS} members, not {n}"),
            Self::Io(what, e) => write!(f, "{what}: {e}"),
            Self::Exited { member, log_tail } => write!(f, "etcd member {member} exited; its log ends:\n{log_tail}"),
            Self::Unhealthy { waited, members } => write!(f, "etcd members {members:?} not healthy within {waited:?}"),
            Self::NoMember(i) => write!(f, "no etcd member {i}"),
        }
    }
}

impl std::error::Error for EtcdClusterError {}

/// One member: its ports, directory and process (None while killed).
#[derive(Debug)]
struct Member {
    client: u16,
    peer: u16,
    child: Option<Child>,
    starts: usize,
}

/// A running etcd cluster on loopback; stopped (SIGKILL) when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: TempDir,
    token: String,
}

/// `n` distinct loopback ports that were free a moment ago (each held until all are picked).
fn free_ports(n: usize) -> Result<Vec<u16>, EtcdClusterError> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpListener::bind("127.0.0.1:0").map_err(|e| EtcdClusterError::Io("binding a free port", e))?);
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| EtcdClusterError::Io("reading a free port", e)))
        .collect()
}

impl EtcdCluster {
    /// Starts `n` members and waits until all are healthy (at most [`HEALTHY_WITHIN`]).
    pub fn start(n: usize) -> Result<Self, EtcdClusterError> {
        if !Path::new(ETCD_BIN).exists() {
            return Err(EtcdClusterError::Missing);
        }
        if n == 0 || n > MAX_MEMBERS {
            return Err(EtcdClusterError::Size(n));
        }
        // A port picked free can be taken by another test before etcd binds it: such a start
        // is thrown away whole and tried again on new ports (a few times).
        let mut attempt = 1;
        loop {
            match Self::start_once(n) {
                Err(EtcdClusterError::Exited { log_tail, .. })
                    if attempt < START_ATTEMPTS && log_tail.contains("address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(n: usize) -> Result<Self, EtcdClusterError> {
        let dir = TempDir::new("keygate-etcd").map_err(|e| EtcdClusterError::Io("creating the data directory", e))?;
        let token = dir.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let ports = free_ports(2 * n)?;
        let members =
            ports.chunks_exact(2).map(|p| Member { client: p[0], peer: p[1], child: None, starts: 0 }).collect();
        let mut cluster = Self { members, dir, token };
        for i in 0..n {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy(HEALTHY_WITHIN)?;
        Ok(cluster)
    }

    fn initial_cluster(&self) -> String {
        let urls: Vec<String> =
            self.members.iter().enumerate().map(|(i, m)| format!("m{i}=http://127.0.0.1:{}", m.peer)).collect();
        urls.join(",")
    }

    fn member_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}"))
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), EtcdClusterError> {
        let initial = self.initial_cluster();
        let data = self.member_dir(i);
        let m = self.members.get_mut(i).ok_or(EtcdClusterError::NoMember(i))?;
        let log = std::fs::File::create(data.with_extension(format!("log.{}", m.starts)))
            .map_err(|e| EtcdClusterError::Io("creating the member's log", e))?;
        m.starts += 1;
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = crate::cleanup::command_dying_with_parent(Path::new(ETCD_BIN));
        // Recorded for `crate::clean_up` (the demo's cluster tour runs one).
        crate::cleanup::prepare(&mut cmd);
        let child = cmd
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Quick elections: the tests kill members and want a leader again soon.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| EtcdClusterError::Io("starting etcd", e))?;
        crate::cleanup::child_started(child.id());
        m.child = Some(child);
        Ok(())
    }

    /// `etcd://127.0.0.1:C1,127.0.0.1:C2,…` followed by `/prefix` when given (keygate's
    /// `--store` syntax).
    pub fn url(&self, prefix: &str) -> String {
        let eps: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.client)).collect();
        format!("etcd://{}{prefix}", eps.join(","))
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> Option<SocketAddr> {
        self.members.get(i).map(|m| SocketAddr::from(([127, 0, 0, 1], m.client)))
    }

    /// Kills member `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        let m = self.members.get_mut(i).ok_or(EtcdClusterError::NoMember(i))?;
        if let Some(mut c) = m.child.take() {
            crate::cleanup::child_reaping(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Stops member `i` with SIGSTOP: a frozen process (or a partition) — its sockets still
    /// accept connections, nothing answers. [`Self::thaw`] lets it go on; dropping the cluster
    /// kills it either way.
    pub fn freeze(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        self.signal(i, rustix::process::Signal::STOP)
    }

    /// Lets a frozen member go on (SIGCONT).
    pub fn thaw(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        self.signal(i, rustix::process::Signal::CONT)
    }

    fn signal(&mut self, i: usize, sig: rustix::process::Signal) -> Result<(), EtcdClusterError> {
        let m = self.members.get_mut(i).ok_or(EtcdClusterError::NoMember(i))?;
        let pid = m
            .child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(EtcdClusterError::NoMember(i))?;
        rustix::process::kill_process(pid, sig).map_err(|e| EtcdClusterError::Io("signalling a member", e.into()))
    }

    /// Starts member `i` again on its data and waits until every running member is healthy.
    pub fn restart(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        self.kill(i)?;
        self.spawn(i, "existing")?;
        self.wait_healthy(HEALTHY_WITHIN)
    }

    /// Waits until every running member answers `/health` with `"health":"true"`.
    pub fn wait_healthy(&mut self, limit: Duration) -> Result<(), EtcdClusterError> {
        let start = Instant::now();
        loop {
            let mut sick = Vec::new();
            for i in 0..self.members.len() {
                let log = self.last_log(i);
                let m = &mut self.members[i];
                let Some(child) = m.child.as_mut() else { continue };
                if let Ok(Some(_)) = crate::cleanup::try_reap(child) {
                    m.child = None;
                    return Err(EtcdClusterError::Exited { member: i, log_tail: log });
                }
                if !healthy(m.client) {
                    sick.push(i);
                }
            }
            if sick.is_empty() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(EtcdClusterError::Unhealthy { waited: limit, members: sick });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of member `i`'s newest log.
    fn last_log(&self, i: usize) -> String {
        let n = self.members.get(i).map_or(0, |m| m.starts.saturating_sub(1));
        let text = std::fs::read_to_string(self.member_dir(i).with_extension(format!("log.{n}"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

impl EtcdCluster {
    /// Puts `key` = `value` through the first running member's JSON gateway (`/v3/kv/put`):
    /// what a test does to etcd behind keygate's back (a tampered record).
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), EtcdClusterError> {
        let body = serde_json::json!({ "key": b64(key), "value": b64(value) });
        self.gateway("/v3/kv/put", &body).map(drop)
    }

    /// The keys and values in `[start, end)` (at most 10,000), through the JSON gateway.
    pub fn range(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, EtcdClusterError> {
        use base64::Engine as _;
        let body = serde_json::json!({ "key": b64(start), "range_end": b64(end), "limit": 10_000 });
        let answer = self.gateway("/v3/kv/range", &body)?;
        let bad = || EtcdClusterError::Io("the range answer", std::io::ErrorKind::InvalidData.into());
        let decode = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).map_err(|_| bad())
        };
        let kvs = answer["kvs"].as_array().cloned().unwrap_or_default();
        kvs.iter().map(|kv| Ok((decode(&kv["key"])?, decode(&kv["value"])?))).collect()
    }

    /// POSTs `body` to `path` of the first running member; its JSON answer.
    fn gateway(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, EtcdClusterError> {
        let m = self.members.iter().find(|m| m.child.is_some()).ok_or(EtcdClusterError::NoMember(0))?;
        let io = |what| move |e| EtcdClusterError::Io(what, e);
        let addr = SocketAddr::from(([127, 0, 0, 1], m.client));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io("connecting to etcd"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("a read timeout"))?;
        s.set_write_timeout(Some(Duration::from_secs(10))).map_err(io("a write timeout"))?;
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(io("writing to the etcd gateway"))?;
        let mut answer = Vec::new();
        s.take(64 << 20).read_to_end(&mut answer).map_err(io("reading the etcd gateway's answer"))?;
        let text = String::from_utf8_lossy(&answer);
        let (head, json) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            let what = std::io::Error::other(head.lines().next().unwrap_or_default().to_owned());
            return Err(EtcdClusterError::Io("the etcd gateway refused", what));
        }
        serde_json::from_str(json).map_err(|e| EtcdClusterError::Io("the etcd gateway's JSON", e.into()))
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Whether the member on `port` answers `/health` with `"health":"true"` within a second.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.take(64 * 1024).read_to_end(&mut body);
    String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_names_the_set_up_script_and_sizes_are_bounded() {
        assert!(EtcdClusterError::Missing.to_string().contains("bash .ci/etcd-deps.sh"));
        if Path::new(ETCD_BIN).exists() {
            assert!(matches!(EtcdCluster::start(0), Err(EtcdClusterError::Size(0))));
            assert!(matches!(EtcdCluster::start(MAX_MEMBERS + 1), Err(EtcdClusterError::Size(_))));
        }
    }

    /// One member: killed, it is not healthy; restarted on its data, it is again.
    #[test]
    fn a_member_is_killed_and_restarted_on_its_data() {
        let mut c = EtcdCluster::start(1).unwrap_or_else(|e| panic!("{e}"));
        let addr = c.client_addr(0).expect("member 0");
        assert!(healthy(addr.port()));
        c.kill(0).expect("kill");
        assert!(!healthy(addr.port()));
        c.restart(0).expect("restart");
        assert!(healthy(addr.port()));
        assert!(matches!(c.kill(3), Err(EtcdClusterError::NoMember(3))));
        // The JSON gateway: a put is read back.
        c.put(b"/t/a", b"\x00\xffvalue").expect("put");
        assert_eq!(c.range(b"/t/", b"/t0").expect("range"), [(b"/t/a".to_vec(), b"\x00\xffvalue".to_vec())]);
        assert!(c.url("/p").starts_with("etcd://127.0.0.1:") && c.url("/p").ends_with("/p"));
    }
}
