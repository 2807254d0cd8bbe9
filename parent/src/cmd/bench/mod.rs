//! `keygate bench crypto | release | cluster | memory | attack | kms`: the measurements of
//! docs/benchmarks.md.
//!
//! Benchmarks, not tests: nothing here asserts a time. Every figure is the median of several
//! rounds, and the ratios that the targets are about are measured in the same run.

// Statistics over counts and durations are floating point; the conversions are intended.
#![allow(clippy::as_conversions, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_attestation::crypto::{self, p384_scalar_from};
use keygate_attestation::mock::{system_clock, MockNsm};
use keygate_attestation::secret::Secret;
use keygate_attestation::{AttestRequest, Nsm, PcrExpectation, TrustAnchor, Verifier, VerifyOptions};
use keygate_enclave::crypto::keys::{self, Transcript};
use keygate_enclave::net::transport::Addr;
use keygate_enclave::peer::client::FetchRequest;
use keygate_enclave::wire::{Id, Message};

use keygate_tests::{wait_for_socket, KillOnDrop, ProcessInDir, TempDir};

use super::fetch::Fetcher;
use crate::error::CliError;

mod attack;
mod cluster;
mod plot;
mod release;
use attack::Attack;
mod kms;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Crypto ceiling and attestation verification, cold and warm, both backends.
    Crypto {
        /// Rounds (the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// Releases per KRE CPU-second and boot-fetch latency over a Unix socket.
    Release {
        /// Concurrent clients (comma-separated).
        #[arg(long, default_value = "1,16,256")]
        clients: String,
        /// KRE worker threads (comma-separated).
        #[arg(long, default_value = "1,2")]
        threads: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Write-ahead audit: `on` (what every KRE does), `off` (answers without waiting for
        /// the parent to store their entries; the development binary only), or `on,off` for
        /// both, row by row, in one run.
        #[arg(long, value_delimiter = ',', default_value = "on")]
        write_ahead: Vec<OnOff>,
        /// Open-loop rows after the closed-loop ones: this many connections offering half the
        /// highest closed-loop rate (comma-separated; 0 for none).
        #[arg(long, value_delimiter = ',', default_value = "256")]
        half_capacity: Vec<usize>,
        /// Write the latency distributions (one client, and the open-loop rows) as an SVG plot.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Releases per second with 1, 2 and 3 member KREs (genesis on the first, the others
    /// joined from it), each client connection to one member, round-robin.
    Cluster {
        /// Member counts, one row each (comma-separated, 1 to 3).
        #[arg(long, default_value = "1,2,3")]
        members: String,
        /// Concurrent client connections (closed loop), spread over the members.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Worker threads of each KRE.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Seconds per row.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// The load generator of `bench release` and `bench cluster` (not for direct use).
    #[command(hide = true)]
    LoadRun {
        /// unix:PATH or tcp:IP:PORT; repeated for several KREs, connection i asking the
        /// (i mod count)-th.
        #[arg(long, required = true)]
        to: Vec<String>,
        /// Concurrent client connections.
        #[arg(long)]
        connections: usize,
        /// Seconds of fetching.
        #[arg(long)]
        seconds: f64,
        /// Open loop at this many fetches per second in all; closed loop without.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// A legitimate client's boot fetches while one process attacks the release port.
    Attack {
        /// Attacks to run, one KRE each (comma-separated; `none` is the baseline).
        #[arg(long, value_delimiter = ',', default_value = "none,junk,idle,declared-length,half-release")]
        attacks: Vec<Attack>,
        /// Where the attacker is: a network peer through the proxy, or the parent itself.
        #[arg(long, value_delimiter = ',', default_value = "proxy,direct")]
        via: Vec<attack::Via>,
        /// Seconds of fetching per attack.
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
    },
    /// The attacking process of `bench attack` (not for direct use).
    #[command(hide = true)]
    AttackRun {
        /// The attack to run.
        #[arg(long)]
        attack: Attack,
        /// unix:PATH or tcp:IP:PORT.
        #[arg(long)]
        to: String,
        /// Source address of TCP connections.
        #[arg(long, default_value = "127.0.0.2")]
        from: std::net::IpAddr,
        /// Seconds of attacking.
        #[arg(long)]
        seconds: f64,
    },
    /// KMS plugin latency (Status, Encrypt, Decrypt) over its Unix socket, on a key from a KRE.
    Kms {
        /// Concurrent callers on one gRPC connection (comma-separated).
        #[arg(long, default_value = "64")]
        callers: String,
        /// Open-loop rows after the closed-loop ones: the most callers offering this many calls
        /// per second in all, each call timed from when it was due (comma-separated; 0 for none).
        #[arg(long, value_delimiter = ',', default_value = "2000")]
        rate: Vec<f64>,
        /// Seconds per method.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Write every row's latency distribution as an SVG plot.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// KRE resident memory: idle, with many idle connections, under a Hello flood.
    Memory {
        /// Idle connections to open.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Seconds of Hello flood.
        #[arg(long, default_value_t = 60)]
        flood_seconds: u64,
    },
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Operations per second of `f`, median over `rounds` rounds of `seconds` each.
fn rate(rounds: usize, seconds: f64, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let samples = (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed().as_secs_f64() < seconds {
                f();
                n += 1;
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    median(samples)
}

const REAL_DOC: &[u8] = include_bytes!("../../../../attestation/tests/vectors/doc-1.cbor");
const REAL_DOC_TIME_MS: u64 = 1_732_983_769_000;

fn bench_crypto(rounds: usize, seconds: f64) -> Result<(), CliError> {
    println!("# keygate bench crypto ({} rounds x {seconds} s, median; {} cores)", rounds, cores());
    let t = super::attestation::now_ms();
    let nsm = MockNsm::new(b"bench", (0..3).map(|i| (i, vec![1u8; 48])).collect(), Arc::new(move || t));
    let mock_doc = nsm
        .attest(&AttestRequest { nonce: Some(vec![1; 32]), ..Default::default() })
        .map_err(|e| CliError::input(e.to_string()))?;
    let mock_root = nsm.root_anchor();
    let aws_root = TrustAnchor::aws_nitro().map_err(|e| CliError::input(e.to_string()))?;
    let attest = rate(rounds, seconds, || {
        let _ =
            nsm.attest(&AttestRequest { nonce: Some(vec![2; 32]), user_data: Some(vec![3; 48]), ..Default::default() });
    });
    println!("mock NSM: {attest:.0} attestation documents/s (fresh leaf certificate + COSE signature, pure-Rust P-384, RFC 6979)");
    println!();
    println!("| backend | P-384 verify/s | key wrap/s | release ceiling/s (1 verify + 1 wrap) | doc | cold verify/s | warm verify/s | cold cost / 5 verifies |");
    println!("|---|---|---|---|---|---|---|---|");
    for c in crypto::all_backends() {
        let sk = keygate_attestation::mock::derive_key(b"bench", "k");
        let point = keygate_attestation::mock::public_point(&sk);
        use p384::ecdsa::signature::Signer;
        let sig: p384::ecdsa::Signature = sk.sign(b"message");
        let sig = sig.to_bytes();
        let verify = rate(rounds, seconds, || {
            let _ = c.verify_p384_sha384_fixed(&point, b"message", &sig);
        });
        let wrap = wrap_rate(c, rounds, seconds)?;
        let ceiling = 1.0 / (1.0 / verify + 1.0 / wrap);
        for (name, doc, anchor, at) in
            [("real doc-1", REAL_DOC, &aws_root, REAL_DOC_TIME_MS), ("mock", mock_doc.as_slice(), &mock_root, t)]
        {
            let mut o = VerifyOptions::at(at);
            o.allow_debug = true;
            let cold = rate(rounds, seconds, || {
                let v = Verifier::with_crypto(anchor.clone(), c);
                let _ = v.verify(doc, &o);
            });
            let warm_v = Verifier::with_crypto(anchor.clone(), c);
            let warm = rate(rounds, seconds, || {
                let _ = warm_v.verify(doc, &o);
            });
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {name} | {:.0} | {:.0} | {:.2} |",
                c.name(),
                verify,
                wrap,
                ceiling,
                cold,
                warm,
                (1.0 / cold) / (5.0 / verify)
            );
        }
    }
    Ok(())
}

/// Key wraps per second (`keys::wrap`: ephemeral key, ECDH, HKDF-SHA384, AES-256-GCM of one
/// 32-byte key), median over `rounds` rounds of `seconds`.
fn wrap_rate(c: &'static dyn crypto::Crypto, rounds: usize, seconds: f64) -> Result<f64, CliError> {
    let (_, client_point) = p384_scalar_from(c, |b| b.fill(3)).map_err(|e| CliError::input(e.to_string()))?;
    let transcript = Transcript {
        client_nonce: [1; 32],
        server_nonce: [2; 32],
        kre_attestation_sha384: [3; 48],
        client_attestation_sha384: [4; 48],
        request_digest: [5; 48],
    };
    let id = Id::new("etcd").map_err(|e| CliError::input(e.to_string()))?;
    let dk = vec![(id, 1u32, Secret::new([9u8; 32]))];
    let mut ctr = 0u8;
    Ok(rate(rounds, seconds, || {
        ctr = ctr.wrapping_add(1);
        let _ = keys::WrappingKey::generate(c, |b| b.fill(ctr | 1))
            .and_then(|w| keys::wrap(c, &transcript, &client_point, &dk, w));
    }))
}

/// A latency histogram: microseconds from 1 µs to 100 s (larger values are recorded as
/// 100 s), 3 significant digits.
pub(super) fn latency_histogram() -> Result<hdrhistogram::Histogram<u64>, CliError> {
    hdrhistogram::Histogram::new_with_bounds(1, 100_000_000, 3).map_err(|e| CliError::input(format!("histogram: {e}")))
}

/// An open-loop schedule: `callers` callers offering `per_s` calls per second in all; caller
/// `i`'s k-th call is due at start + (i + k·callers) / per_s, however slow the answers are (no
/// coordinated omission).
#[derive(Debug, Clone, Copy)]
pub(super) struct OpenLoop {
    start: Instant,
    callers: usize,
    per_s: f64,
}

impl OpenLoop {
    pub(super) fn new(start: Instant, callers: usize, per_s: f64) -> Self {
        Self { start, callers: callers.max(1), per_s: per_s.max(1e-3) }
    }

    /// When caller `i`'s first call is due.
    pub(super) fn first_due(&self, i: usize) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.per_s)
    }

    /// Each caller's interval between calls.
    pub(super) fn period(&self) -> Duration {
        Duration::from_secs_f64(self.callers as f64 / self.per_s)
    }
}

/// Waits until a call is `due` (closed loop: `None`, at once) and returns the instant its
/// latency counts from: now in a closed loop; in an open loop, when it was due, unless the
/// caller is late only by the timer's granularity (tokio's timers fire on the millisecond, up
/// to [`TIMER_SLACK`] late), which is the harness's delay, not the server's. A caller held up
/// longer — its previous call was slow — still counts from when it was due.
pub(super) async fn start_call(due: Option<Instant>) -> Instant {
    if let Some(d) = due {
        tokio::time::sleep_until(d.into()).await;
    }
    let now = Instant::now();
    match due {
        Some(d) if now.saturating_duration_since(d) > TIMER_SLACK => d,
        _ => now,
    }
}

/// How late a tokio timer may fire.
const TIMER_SLACK: Duration = Duration::from_millis(2);

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64, CliError> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| CliError::io("reading /proc stat", e))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // rest starts at field 3 (state): utime = field 14 -> index 11, stime -> index 12.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct KreProc {
    /// The parent's audit follower (`keygate audit pull --follow`), without which the KRE
    /// withholds every release; stopped first.
    _follower: KillOnDrop,
    /// The KRE and its directory (policy, sockets, the follower's trail), removed last.
    kre: ProcessInDir,
    sock: PathBuf,
}

impl KreProc {
    /// The KRE's process id.
    fn pid(&self) -> u32 {
        self.kre.child.id()
    }
}

const SEED: &str = "bench";

/// PCR0-2 (every byte) of the control-plane image the bench policy allows.
const CLIENT_PCR: u8 = 0x5a;
/// PCR0 (every byte) of the bench KRE's image.
const KRE_PCR: u8 = 0x4b;

fn start_kre(threads: usize, extra: &[&str]) -> Result<KreProc, CliError> {
    let dir = TempDir::new(&format!("keygate-bench-{threads}")).map_err(|e| CliError::io("bench dir", e))?;
    let pcr = hex::encode([CLIENT_PCR; 48]);
    let policy =
        serde_json::json!({"clusters": {"prod": {"images": [{"name": "cp", "pcrs": {"0": pcr, "1": pcr, "2": pcr}}]}}});
    let policy_path = dir.path().join("policy.json");
    std::fs::write(&policy_path, policy.to_string()).map_err(|e| CliError::io("policy", e))?;
    let sock = dir.path().join("kre.sock");
    let mut args = vec![
        "--listen".to_owned(),
        format!("unix:{}", sock.display()),
        "--policy".into(),
        policy_path.display().to_string(),
        "--mock-pcr".into(),
        format!("0={}", hex::encode([KRE_PCR; 48])),
    ];
    args.extend(extra.iter().map(|e| (*e).to_owned()));
    spawn_kre(dir, sock, threads, &args)
}

/// `arg` quoted for `sh -c`.
fn sh_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Starts `keygate-enclave-dev --nsm mock --mock-seed SEED --threads THREADS ARGS` in `dir`,
/// listening on `sock`, and its audit follower; the KRE and the follower are killed and `dir`
/// removed when the result is dropped.
fn spawn_kre(dir: TempDir, sock: PathBuf, threads: usize, args: &[String]) -> Result<KreProc, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::io("exe", e))?.with_file_name("keygate-enclave-dev");
    // Raise the descriptor limit for the connection benchmarks through the shell (no unsafe).
    let mut cmd = format!(
        "ulimit -n 65536 2>/dev/null || ulimit -n $(ulimit -Hn); exec {} --nsm mock --mock-seed {SEED} --threads {threads}",
        sh_quote(&exe.display().to_string()),
    );
    for a in args {
        cmd.push(' ');
        cmd.push_str(&sh_quote(a));
    }
    let child = Command::new("sh")
        .args(["-c", &cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CliError::io("starting keygate-enclave-dev", e))?;
    // Owned from here: a KRE that does not start is killed and its directory removed.
    let mut kre = ProcessInDir { child, dir: dir.keep() };
    // Through `sh -c … exec`: the shell's pid is the KRE's.
    wait_for_socket(&sock, Some(&mut kre.child), Duration::from_secs(15))
        .map_err(|e| CliError::refused(format!("keygate-enclave-dev did not start: {e}")))?;
    let follower = Command::new(std::env::current_exe().map_err(|e| CliError::io("exe", e))?)
        .args(["audit", "pull", "--kre", &format!("unix:{}.parent", sock.display()), "--dir"])
        .arg(kre.dir.join("audit"))
        .args(["--follow", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CliError::io("starting keygate audit pull --follow", e))?;
    Ok(KreProc { _follower: KillOnDrop(follower), kre, sock })
}

fn fetcher(kre: Addr, nsm: Arc<dyn Nsm>, root: &TrustAnchor) -> Fetcher {
    Fetcher {
        kre,
        request: FetchRequest {
            cluster: Id::new("prod").unwrap_or_else(|_| unreachable!("valid id")),
            key_ids: vec![Id::new("etcd").unwrap_or_else(|_| unreachable!("valid id"))],
            expect_kre_pcrs: vec![PcrExpectation { index: 0, value: vec![KRE_PCR; 48] }],
            also_accept_kre: vec![],
        },
        nsm,
        kre_verifier: Verifier::new(root.clone()),
        timeout: Duration::from_secs(30),
    }
}

/// A control-plane instance's mock NSM (the image the bench policy allows) and the mock root.
fn mock_client() -> (Arc<dyn Nsm>, TrustAnchor) {
    let pcrs: BTreeMap<u8, Vec<u8>> = (0..3).map(|i| (i, vec![CLIENT_PCR; 48])).collect();
    let nsm: Arc<dyn Nsm> = Arc::new(
        MockNsm::new(SEED.as_bytes(), pcrs, system_clock())
            .with_instance("bench-client")
            .with_fast_signing(crypto::default_backend()),
    );
    (nsm, MockNsm::new(SEED.as_bytes(), BTreeMap::new(), system_clock()).root_anchor())
}

/// A switch of a benchmark row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum OnOff {
    On,
    Off,
}

fn bench_memory(connections: usize, flood_seconds: u64) -> Result<(), CliError> {
    println!("# keygate bench memory");
    let kre = start_kre(2, &["--max-connections", "20000", "--frame-timeout", "600", "--connection-timeout", "600"])?;
    let pid = kre.pid();
    std::thread::sleep(Duration::from_millis(300));
    println!("| state | KRE RSS MiB |");
    println!("|---|---|");
    println!("| idle | {:.1} |", rss_kib(pid) as f64 / 1024.0);
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        match std::os::unix::net::UnixStream::connect(&kre.sock) {
            Ok(c) => conns.push(c),
            Err(e) => {
                println!("(stopped at {i} connections: {e}; raise `ulimit -n`)");
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    println!("| {} idle connections | {:.1} |", conns.len(), rss_kib(pid) as f64 / 1024.0);
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    // Hello flood: connections that send Hello, read the Challenge, and go away.
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    let hello = Message::Hello { client_nonce: [7; 32] }.encode().map_err(|e| CliError::input(e.to_string()))?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut hellos = 0u64;
    while start.elapsed() < Duration::from_secs(flood_seconds) {
        let n: u64 = rt.block_on(async {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let sock = kre.sock.clone();
                    let hello = hello.clone();
                    tokio::spawn(async move {
                        let t = Duration::from_secs(5);
                        let Ok(mut s) = keygate_enclave::net::transport::connect(&Addr::Unix(sock), t).await else {
                            return 0;
                        };
                        if keygate_enclave::net::io::write_frame(&mut s, &hello, t).await.is_err() {
                            return 0;
                        }
                        u64::from(keygate_enclave::net::io::read_frame(&mut s, t).await.is_ok())
                    })
                })
                .collect();
            let mut n = 0;
            for t in tasks {
                n += t.await.unwrap_or(0);
            }
            n
        });
        hellos += n;
        let secs = start.elapsed().as_secs();
        if samples.last().is_none_or(|(s, _)| secs >= s + 10) {
            samples.push((secs, rss_kib(pid)));
        }
    }
    samples.push((start.elapsed().as_secs(), rss_kib(pid)));
    for (s, r) in &samples {
        println!("| Hello flood, t = {s} s ({hellos} Hellos in all) | {:.1} |", *r as f64 / 1024.0);
    }
    drop(kre);
    // The connection attacks of `bench attack`, against a KRE with its default limits.
    for a in [Attack::DeclaredLength, Attack::HalfRelease] {
        let kre = start_kre(2, &[])?;
        let peak = attack::PeakRss::sample(kre.pid());
        let out = attack::spawn_attacker(a, &format!("unix:{}", kre.sock.display()), 10.0)?
            .wait_with_output()
            .map_err(|e| CliError::io("attacker", e))?;
        println!(
            "| {} for 10 s ({} connections opened), peak | {:.1} |",
            a.name(),
            String::from_utf8_lossy(&out.stdout).trim(),
            peak.stop() as f64 / 1024.0
        );
    }
    Ok(())
}

fn list(s: &str) -> Result<Vec<usize>, CliError> {
    s.split(',').map(|x| x.trim().parse().map_err(|_| CliError::input(format!("`{x}` is not a number")))).collect()
}

pub(crate) fn run(cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Crypto { rounds, seconds } => bench_crypto(rounds, seconds),
        BenchCommand::Release { clients, threads, seconds, write_ahead, half_capacity, plot } => {
            release::bench_release(
                &list(&clients)?,
                &list(&threads)?,
                seconds,
                &write_ahead,
                &half_capacity,
                plot.as_deref(),
            )
        }
        BenchCommand::Cluster { members, connections, threads, seconds } => {
            cluster::bench_cluster(&list(&members)?, connections, threads, seconds)
        }
        BenchCommand::LoadRun { to, connections, seconds, rate } => release::run_load(&to, connections, seconds, rate),
        BenchCommand::Kms { callers, rate, seconds, plot } => {
            kms::bench_kms(&list(&callers)?, &rate, seconds, plot.as_deref())
        }
        BenchCommand::Memory { connections, flood_seconds } => bench_memory(connections, flood_seconds),
        BenchCommand::Attack { attacks, via, seconds } => attack::bench_attack(&attacks, &via, seconds),
        BenchCommand::AttackRun { attack, to, from, seconds } => attack::run_attacker(attack, &to, from, seconds),
    }
}
