//! `keygate bench attack`: a legitimate client's boot fetches while one attacking process
//! floods the KRE's release port, one attack at a time (docs/benchmarks.md, "Exhaustion").
//!
//! The attacker is a child process (`keygate bench attack-run`, hidden) speaking raw frames
//! over plain sockets, so its CPU and descriptors are its own; the legitimate client is this
//! process, fetching with the default retry budget of `keygate fetch`. Nothing here is a
//! test: it reports what happened, and the targets are read off the table.

// Statistics over counts and durations are floating point; the conversions are intended.
#![allow(clippy::as_conversions, clippy::cast_precision_loss)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_enclave::wire::{self, ty, Message};

use keygate_enclave::net::transport::Addr;

use super::{fetcher, mock_client, rss_kib, start_kre, KreProc};
use crate::error::CliError;

/// What the attacking process does, for as long as it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Attack {
    /// No attacker: the baseline.
    None,
    /// Malformed frames as fast as four connections can send them (each refusal is audited).
    Junk,
    /// 4,100 connections that never send a byte, reopened as soon as the KRE closes one.
    Idle,
    /// 4,000 connections each sending 65,535 bytes of a frame that declares 65,536 (half as a
    /// Release, half as a policy push), reopened as the KRE closes them.
    DeclaredLength,
    /// The costliest hold left: Hello, wait for the Challenge (one NSM attestation each), then
    /// all but one byte of a largest Release, on up to 4,000 connections.
    HalfRelease,
}

impl Attack {
    pub(super) fn name(self) -> &'static str {
        match self {
            Attack::None => "none",
            Attack::Junk => "junk frames",
            Attack::Idle => "4,100 idle connections",
            Attack::DeclaredLength => "4,000 x 65,535 of 65,536 declared",
            Attack::HalfRelease => "Hello + all but 1 byte of a largest Release",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Attack::None => "none",
            Attack::Junk => "junk",
            Attack::Idle => "idle",
            Attack::DeclaredLength => "declared-length",
            Attack::HalfRelease => "half-release",
        }
    }
}

/// A frame header declaring `len` body bytes of type `t`, followed by `send` body bytes.
fn half_frame(t: u8, len: u32, send: usize) -> Vec<u8> {
    let mut f = len.to_be_bytes().to_vec();
    f.extend_from_slice(&[wire::VERSION, t]);
    f.resize(6 + send.saturating_sub(2), 0x5a);
    f
}

/// The attacker's connection: to the KRE's socket, or over TCP to the proxy from a source
/// address of its own (another host, as the proxy sees it).
enum Peer {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Peer {
    fn open(target: &Target) -> Option<Peer> {
        let p = match target {
            Target::Unix(path) => Peer::Unix(UnixStream::connect(path).ok()?),
            Target::Tcp { to, from } => {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
                socket.bind(&SocketAddr::new(*from, 0).into()).ok()?;
                socket.connect(&(*to).into()).ok()?;
                Peer::Tcp(socket.into())
            }
        };
        let (r, w) = (Some(Duration::from_secs(5)), Some(Duration::from_millis(200)));
        match &p {
            Peer::Unix(s) => s.set_read_timeout(r).and_then(|()| s.set_write_timeout(w)).ok()?,
            Peer::Tcp(s) => s.set_read_timeout(r).and_then(|()| s.set_write_timeout(w)).ok()?,
        }
        Some(p)
    }

    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Peer::Unix(s) => s.set_nonblocking(on),
            Peer::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Peer::Unix(s) => s.read(buf),
            Peer::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Peer::Unix(s) => s.write(buf),
            Peer::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the attacker connects.
#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tcp { to: SocketAddr, from: IpAddr },
}

fn read_frame(s: &mut impl Read) -> Option<Vec<u8>> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).ok()?;
    let n = wire::frame_len(prefix).ok()?;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

/// Whether the KRE has closed (or answered, which precedes closing) a held connection.
fn gone(s: &mut Peer) -> bool {
    let mut b = [0u8; 1];
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let r = s.read(&mut b);
    let _ = s.set_nonblocking(false);
    !matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Keeps `n` connections opened by `open` alive until `stop`, replacing each one the KRE
/// closes. Returns how many it opened.
fn hold(n: usize, stop: &AtomicBool, open: impl Fn() -> Option<Peer>) -> u64 {
    let mut held: Vec<Peer> = Vec::with_capacity(n);
    let mut opened = 0u64;
    while !stop.load(Ordering::Relaxed) {
        held.retain_mut(|s| !gone(s));
        while held.len() < n && !stop.load(Ordering::Relaxed) {
            match open() {
                Some(s) => {
                    held.push(s);
                    opened += 1;
                }
                None => break,
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    opened
}

/// The attacking process: runs `attack` against the release port at `to` (from the source
/// address `from`, over TCP) for `seconds` and prints what it did (one number).
pub(crate) fn run_attacker(attack: Attack, to: &str, from: IpAddr, seconds: f64) -> Result<(), CliError> {
    let target = match to.strip_prefix("tcp:") {
        Some(a) => Target::Tcp { to: a.parse().map_err(|_| CliError::input(format!("`{a}` is no IP:PORT")))?, from },
        None => Target::Unix(PathBuf::from(to.strip_prefix("unix:").unwrap_or(to))),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads = 4usize;
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (stop, count, target) = (stop.clone(), count.clone(), target.clone());
            std::thread::spawn(move || {
                let n = match attack {
                    Attack::None => 0,
                    Attack::Junk => {
                        let junk = [0u8, 0, 0, 3, wire::VERSION, 99, 0];
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            if let Some(mut s) = Peer::open(&target) {
                                if s.write_all(&junk).is_ok() && read_frame(&mut s).is_some() {
                                    n += 1;
                                }
                            }
                        }
                        n
                    }
                    Attack::Idle => hold(4100 / threads, &stop, || Peer::open(&target)),
                    Attack::DeclaredLength => hold(4000 / threads, &stop, || {
                        let mut s = Peer::open(&target)?;
                        let t = if i % 2 == 0 { ty::RELEASE } else { ty::POLICY_PUSH };
                        let _ = s.write_all(&half_frame(t, 65_536, 65_535));
                        Some(s)
                    }),
                    Attack::HalfRelease => {
                        let cap = wire::max_request_body(ty::RELEASE).unwrap_or(2);
                        let hello = Message::Hello { client_nonce: [7; 32] }.encode().unwrap_or_default();
                        hold(4000 / threads, &stop, move || {
                            let mut s = Peer::open(&target)?;
                            s.write_all(&hello).ok()?;
                            read_frame(&mut s)?;
                            let _ = s.write_all(&half_frame(ty::RELEASE, u32::try_from(cap).ok()?, cap - 1));
                            Some(s)
                        })
                    }
                };
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    println!("{}", count.load(Ordering::Relaxed));
    Ok(())
}

/// One request on the KRE's parent channel and its answer.
fn ask_parent_channel(kre: &KreProc, m: &Message) -> Result<Message, CliError> {
    let mut path = kre.sock.clone().into_os_string();
    path.push(".parent");
    let mut s = UnixStream::connect(PathBuf::from(path)).map_err(|e| CliError::io("parent channel", e))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| CliError::io("parent channel", e))?;
    let frame = m.encode().map_err(|e| CliError::input(e.to_string()))?;
    s.write_all(&frame).map_err(|e| CliError::io("parent channel", e))?;
    read_frame(&mut s)
        .and_then(|b| Message::decode(&b).ok())
        .ok_or_else(|| CliError::refused(format!("the KRE did not answer {}", m.name())))
}

/// The KRE's status report. With `flush`, an audit pull first makes it write its aggregate
/// of anonymous refusals (as a collecting parent's pulls do).
fn status(kre: &KreProc, flush: bool) -> Result<serde_json::Value, CliError> {
    if flush {
        ask_parent_channel(kre, &Message::AuditPull { after_seq: u64::MAX - 1, max: 1 })?;
    }
    match ask_parent_channel(kre, &Message::Status)? {
        Message::StatusReport { json } => {
            serde_json::from_str(&json).map_err(|e| CliError::input(format!("status report: {e}")))
        }
        _ => Err(CliError::refused("the KRE gave no status report")),
    }
}

fn audit_u64(s: &serde_json::Value, field: &str) -> u64 {
    s["audit"][field].as_u64().unwrap_or(0)
}

/// Starts the attacking process (`keygate bench attack-run`) with a raised descriptor limit,
/// against `to` (`unix:PATH`, or `tcp:IP:PORT` connected from 127.0.0.2).
pub(super) fn spawn_attacker(attack: Attack, to: &str, seconds: f64) -> Result<std::process::Child, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::io("exe", e))?;
    Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n 65536 2>/dev/null || ulimit -n $(ulimit -Hn); exec '{}' bench attack-run --attack {} --to '{to}' --from 127.0.0.2 --seconds {seconds}",
                exe.display(),
                attack.arg(),
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CliError::io("starting the attacker", e))
}

/// The peak resident memory of a process, sampled every 50 ms until stopped.
pub(super) struct PeakRss {
    sampling: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    pub(super) fn sample(pid: u32) -> Self {
        let sampling = Arc::new(AtomicBool::new(true));
        let on = sampling.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while on.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        Self { sampling, sampler }
    }

    /// The peak, in KiB.
    pub(super) fn stop(self) -> u64 {
        self.sampling.store(false, Ordering::Relaxed);
        self.sampler.join().unwrap_or(0)
    }
}

/// Where the attack comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Via {
    /// A network peer: through `keygate proxy` on TCP, from another source address than the
    /// legitimate client (the deployment's only way in for anyone but the parent).
    Proxy,
    /// The parent itself, on the KRE's release socket (no per-source limit applies).
    Direct,
}

/// `keygate proxy` for the release channel, killed when dropped.
struct Proxy(std::process::Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_proxy(kre: &KreProc) -> Result<(Proxy, SocketAddr), CliError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| CliError::io("choosing a port", e))?
        .port();
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    let exe = std::env::current_exe().map_err(|e| CliError::io("exe", e))?;
    let child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n 65536 2>/dev/null || ulimit -n $(ulimit -Hn); exec '{}' proxy --listen tcp:{at} --to unix:'{}'",
                exe.display(),
                kre.sock.display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CliError::io("starting keygate proxy", e))?;
    let proxy = Proxy(child);
    let start = Instant::now();
    while TcpStream::connect(at).is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            return Err(CliError::refused("keygate proxy did not start"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proxy, at))
}

pub(crate) fn bench_attack(attacks: &[Attack], via: &[Via], seconds: f64) -> Result<(), CliError> {
    println!(
        "# keygate bench attack ({seconds} s of boot fetches per row, one after another, each with `keygate fetch`'s default 5 retries; \
         KRE and proxy with default limits; {} cores shared by KRE, proxy, attacker and client)",
        super::cores()
    );
    println!("| attacker | attack | attacker's frames or connections | legitimate fetches | succeeded | p50 ms | p99 ms | max ms | KRE peak RSS MiB | audit entries written (of them releases) | releases refused `audit_full` |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    let (nsm, root) = mock_client();
    for &v in via {
        for &attack in attacks {
            let kre = start_kre(2, &[])?;
            let (_proxy, to, client) = match v {
                Via::Proxy => {
                    let (p, at) = start_proxy(&kre)?;
                    (Some(p), format!("tcp:{at}"), Addr::Tcp(at))
                }
                Via::Direct => (None, format!("unix:{}", kre.sock.display()), Addr::Unix(kre.sock.clone())),
            };
            let f = fetcher(client, nsm.clone(), &root);
            rt.block_on(f.once()).map_err(|e| CliError::refused(format!("warm-up fetch: {e}")))?;
            let before = audit_u64(&status(&kre, true)?, "last_seq");
            let attacker = spawn_attacker(attack, &to, seconds + 2.0)?;
            std::thread::sleep(Duration::from_secs(1));
            let peak = PeakRss::sample(kre.pid());
            let start = Instant::now();
            let (mut lat, mut ok, mut failed) = (Vec::new(), 0u64, 0u64);
            while start.elapsed().as_secs_f64() < seconds {
                let s = Instant::now();
                match rt.block_on(f.with_retries(5)) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                lat.push(s.elapsed().as_secs_f64() * 1000.0);
            }
            let out = attacker.wait_with_output().map_err(|e| CliError::io("attacker", e))?;
            let peak = peak.stop();
            let after = status(&kre, true)?;
            lat.sort_by(|a, b| a.total_cmp(b));
            let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
            let total = ok + failed;
            println!(
                "| {} | {} | {} | {total} | {:.1} % | {:.1} | {:.1} | {:.1} | {:.1} | {} ({ok}) | {} |",
                match v {
                    Via::Proxy => "network peer, through the proxy",
                    Via::Direct => "parent, on the KRE socket",
                },
                attack.name(),
                String::from_utf8_lossy(&out.stdout).trim(),
                100.0 * ok as f64 / total.max(1) as f64,
                pct(0.5),
                pct(0.99),
                lat.last().copied().unwrap_or(0.0),
                peak as f64 / 1024.0,
                audit_u64(&after, "last_seq").saturating_sub(before),
                audit_u64(&after, "releases_refused_because_full"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_frame_declares_its_length_and_carries_the_bytes_sent() {
        let f = half_frame(ty::RELEASE, 65_536, 65_535);
        assert_eq!(&f[..6], &[0, 1, 0, 0, wire::VERSION, ty::RELEASE]);
        assert_eq!(f.len(), 4 + 65_535);
    }
}
