//! `keygate bench kms`: the latency of the Kubernetes KMS v2 plugin as kube-apiserver sees it.
//!
//! A real `keygate kms-plugin` fetches its key from a real `keygate-enclave-dev` (mock NSM,
//! audit follower) and serves it on a Unix socket. Closed-loop callers share one gRPC
//! connection (HTTP/2 streams), as kube-apiserver's do, and call Status, Encrypt (a 32-byte
//! plaintext, the size of a DEK seed) and Decrypt (of ciphertexts Encrypt returned, each
//! checked against its plaintext) for a fixed time each. Every call's latency goes into an
//! HDR histogram (microseconds, 3 significant digits).
//!
//! Measuring (`measure`) and printing (`table`) are separate, so the histograms can also be
//! plotted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

use super::{cores, cpu_seconds, latency_histogram, start_call, start_kre, KreProc, OpenLoop, SEED};
use crate::cmd::kms_plugin::pb::key_management_service_client::KeyManagementServiceClient;
use crate::cmd::kms_plugin::pb::{DecryptRequest, EncryptRequest, StatusRequest};
use crate::error::CliError;
use keygate_tests::{spawn_logged, wait_for_socket, ProcessInDir, SocketWaitError, TempDir};

type Client = KeyManagementServiceClient<Channel>;

/// The cluster and key the plugin serves (the bench KRE's policy allows cluster `prod`).
const CLUSTER: &str = "prod";
const KEY_ID: &str = "etcd";
/// Ciphertexts each Encrypt caller keeps for the Decrypt row.
const KEEP_PER_CALLER: usize = 8;
/// The target of every method, at 64 callers: p99 under 1 ms.
const TARGET_P99_MS: f64 = 1.0;

/// A KMS v2 method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Status,
    Encrypt,
    Decrypt,
}

impl Method {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Status => "Status",
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
        }
    }
}

/// What a row measures: one method with `callers` concurrent callers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) method: Method,
    pub(crate) callers: usize,
    /// Open loop: the calls per second offered in all (each call timed from when it was
    /// due); closed loop (each caller calls again when answered) when `None`.
    pub(crate) offered_per_s: Option<f64>,
}

impl std::fmt::Display for Load {
    /// `64 callers` or `64 callers at 2000/s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = if self.callers == 1 { "" } else { "s" };
        write!(f, "{} caller{plural}", self.callers)?;
        match self.offered_per_s {
            None => Ok(()),
            Some(r) => write!(f, " at {r:.0}/s"),
        }
    }
}

/// One row: a [`Load`] for the row's duration, and what it measured.
#[derive(Debug)]
pub(crate) struct KmsRow {
    pub(crate) load: Load,
    /// Every call's latency in microseconds, failed calls included.
    pub(crate) latency: Histogram<u64>,
    pub(crate) wall_seconds: f64,
    /// Failed calls by gRPC code; wrong answers (a Decrypt that returned another plaintext, a
    /// Status that is not healthy) under their own names.
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) plugin_cpu_seconds: f64,
    pub(crate) kre_cpu_seconds: f64,
}

impl KmsRow {
    /// `Encrypt, 64 callers`: the row's name in a plot.
    pub(crate) fn label(&self) -> String {
        format!("{}, {}", self.load.method.name(), self.load)
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Each row's label and latency histogram (microseconds), in the order measured.
pub(crate) fn histograms(rows: &[KmsRow]) -> Vec<(String, Histogram<u64>)> {
    rows.iter().map(|r| (r.label(), r.latency.clone())).collect()
}

/// The plugin process, killed when dropped, and its directory (socket, log, receipts), removed.
struct Plugin {
    p: ProcessInDir,
    sock: PathBuf,
}

impl Plugin {
    /// `keygate kms-plugin` on `kre`'s key, as a control-plane instance runs it (the image the
    /// bench policy allows, checking the KRE's PCR 0, keeping receipts).
    fn start(kre: &KreProc) -> Result<Self, CliError> {
        let dir = TempDir::new("keygate-bench-kms").map_err(|e| CliError::io("bench dir", e))?;
        let exe = std::env::current_exe().map_err(|e| CliError::io("exe", e))?;
        let sock = dir.path().join("kms.sock");
        let client_pcr = hex::encode([0x5au8; 48]);
        let mut cmd = Command::new(exe);
        cmd.args(["kms-plugin", "--listen", &format!("unix:{}", sock.display())])
            .args(["--cluster", CLUSTER, "--key-id", KEY_ID])
            .args(["--kre", &format!("unix:{}", kre.sock.display())])
            .args(["--nsm", "mock", "--mock-seed", SEED])
            .args(["--expect-kre-pcr", &format!("0={}", hex::encode([0x4bu8; 48]))])
            .arg("--receipts")
            .arg(dir.path().join("receipts"));
        for i in 0..3 {
            cmd.args(["--mock-pcr", &format!("{i}={client_pcr}")]);
        }
        let child = spawn_logged(&mut cmd, &dir.path().join("plugin.log"))
            .map_err(|e| CliError::io("starting keygate kms-plugin", e))?;
        Ok(Self { p: ProcessInDir { child, dir: dir.keep() }, sock })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p.dir.join("plugin.log")).unwrap_or_default()
    }

    fn exited(&mut self) -> Result<(), CliError> {
        match self.p.child.try_wait() {
            Ok(Some(status)) => Err(CliError::refused(format!("the plugin exited ({status}): {}", self.log()))),
            _ => Ok(()),
        }
    }

    /// Waits for the socket, connects, and waits for Status to report a key and `ok`.
    async fn connect_when_healthy(&mut self) -> Result<Client, CliError> {
        let start = Instant::now();
        let limit = Duration::from_secs(30);
        if let Err(e) = wait_for_socket(&self.sock, Some(&mut self.p.child), limit) {
            return Err(CliError::refused(match e {
                SocketWaitError::Exited(status) => format!("the plugin exited ({status}): {}", self.log()),
                SocketWaitError::Timeout { .. } => format!("the plugin did not listen: {}", self.log()),
            }));
        }
        let mut client = connect(&self.sock).await?;
        loop {
            self.exited()?;
            let s = client.status(StatusRequest {}).await.map_err(|e| CliError::refused(format!("Status: {e}")))?;
            let s = s.into_inner();
            if s.healthz == "ok" && !s.key_id.is_empty() {
                return Ok(client);
            }
            if start.elapsed() > limit {
                return Err(CliError::refused(format!(
                    "the plugin is not healthy: healthz={:?}; {}",
                    s.healthz,
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One gRPC connection to the plugin's socket; clones share it.
async fn connect(sock: &Path) -> Result<Client, CliError> {
    crate::cmd::kms_plugin::connect_unix(sock).await.map_err(|e| CliError::io("connecting to the plugin", e))
}

/// A plaintext the Encrypt caller `caller` seals on its `n`th call: 32 bytes, distinct per call.
fn plaintext(caller: usize, n: u64) -> Vec<u8> {
    let mut p = vec![0u8; 32];
    let c = u64::try_from(caller).unwrap_or(u64::MAX);
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        let word = n.rotate_left(u32::try_from(i * 16).unwrap_or(0)) ^ c.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    p
}

/// A ciphertext Encrypt returned, with its plaintext.
#[derive(Debug, Clone)]
struct Sealed {
    plaintext: Vec<u8>,
    ciphertext: Vec<u8>,
    key_id: String,
}

/// What one caller saw.
struct CallerResult {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    kept: Vec<Sealed>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn code_name(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

/// One caller: calls `method` until `deadline`, closed loop or on an open-loop schedule.
async fn caller(
    mut client: Client,
    method: Method,
    index: usize,
    deadline: Instant,
    sealed: Arc<Vec<Sealed>>,
    open_loop: Option<OpenLoop>,
) -> Result<CallerResult, CliError> {
    let mut latency = latency_histogram()?;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept = Vec::new();
    let uid = format!("00000000-0000-4000-8000-{index:012}");
    let mut n = 0u64;
    let mut error = |e: String| *errors.entry(e).or_default() += 1;
    // Open loop: this caller's k-th call is due at start + (index + k·callers) / rate.
    let mut due = open_loop.map(|o| o.first_due(index));
    while due.unwrap_or_else(Instant::now) < deadline {
        let start = start_call(due).await;
        n = n.wrapping_add(1);
        match method {
            Method::Status => {
                let r = client.status(StatusRequest {}).await;
                latency.saturating_record(micros(start.elapsed()));
                match r {
                    Ok(s) if s.get_ref().healthz == "ok" => {}
                    Ok(_) => error("not healthy".to_owned()),
                    Err(e) => error(code_name(&e)),
                }
            }
            Method::Encrypt => {
                let pt = plaintext(index, n);
                let req = EncryptRequest { plaintext: pt.clone(), uid: uid.clone() };
                let r = client.encrypt(req).await;
                latency.saturating_record(micros(start.elapsed()));
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        if kept.len() < KEEP_PER_CALLER {
                            kept.push(Sealed { plaintext: pt, ciphertext: r.ciphertext, key_id: r.key_id });
                        }
                    }
                    Err(e) => error(code_name(&e)),
                }
            }
            Method::Decrypt => {
                let len = u64::try_from(sealed.len()).unwrap_or(1).max(1);
                let at = usize::try_from(n.wrapping_add(u64::try_from(index).unwrap_or(0)) % len).unwrap_or(0);
                let Some(s) = sealed.get(at) else {
                    return Err(CliError::refused("no ciphertext to decrypt"));
                };
                let req = DecryptRequest {
                    ciphertext: s.ciphertext.clone(),
                    uid: uid.clone(),
                    key_id: s.key_id.clone(),
                    annotations: Default::default(),
                };
                let r = client.decrypt(req).await;
                latency.saturating_record(micros(start.elapsed()));
                match r {
                    Ok(r) if r.get_ref().plaintext == s.plaintext => {}
                    Ok(_) => error("wrong plaintext".to_owned()),
                    Err(e) => error(code_name(&e)),
                }
            }
        }
        if let (Some(d), Some(o)) = (due.as_mut(), open_loop) {
            *d += o.period();
        }
    }
    Ok(CallerResult { latency, errors, kept })
}

/// One row: `callers` callers of `method` for `seconds`. Returns the row and the ciphertexts
/// the callers kept (Encrypt only).
async fn row(
    client: &Client,
    method: Method,
    callers: usize,
    seconds: f64,
    sealed: Arc<Vec<Sealed>>,
    pids: (u32, u32),
    offered_per_s: Option<f64>,
) -> Result<(KmsRow, Vec<Sealed>), CliError> {
    let (plugin_cpu0, kre_cpu0) = (cpu_seconds(pids.0)?, cpu_seconds(pids.1)?);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let open_loop = offered_per_s.map(|r| OpenLoop::new(start, callers, r));
    let tasks: Vec<_> = (0..callers)
        .map(|i| tokio::spawn(caller(client.clone(), method, i, deadline, sealed.clone(), open_loop)))
        .collect();
    let mut latency = latency_histogram()?;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept = Vec::new();
    for t in tasks {
        let r = t.await.map_err(|e| CliError::refused(format!("a caller failed: {e}")))??;
        latency.add(&r.latency).map_err(|e| CliError::input(format!("histogram: {e}")))?;
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
        kept.extend(r.kept);
    }
    let wall_seconds = start.elapsed().as_secs_f64();
    let row = KmsRow {
        load: Load { method, callers, offered_per_s },
        latency,
        wall_seconds,
        errors,
        plugin_cpu_seconds: cpu_seconds(pids.0)? - plugin_cpu0,
        kre_cpu_seconds: cpu_seconds(pids.1)? - kre_cpu0,
    };
    Ok((row, kept))
}

fn check_args(callers: &[usize], seconds: f64) -> Result<(), CliError> {
    if callers.is_empty() || callers.iter().any(|&n| n == 0 || n > 4096) {
        return Err(CliError::input("--callers: 1 to 4096 each"));
    }
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 3600.0 {
        return Err(CliError::input("--seconds must be more than 0 and at most 3600"));
    }
    Ok(())
}

/// Starts a KRE and a plugin on its key, and measures Status, Encrypt and Decrypt with each
/// number of `callers` for `seconds` each. Both processes are stopped before it returns.
pub(crate) fn measure(callers: &[usize], rates: &[f64], seconds: f64) -> Result<Vec<KmsRow>, CliError> {
    check_args(callers, seconds)?;
    // The callers share one thread (as the calls share one connection): on a multi-threaded
    // runtime the harness took CPU from the plugin it measures, and lengthened the tail.
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    let kre = start_kre(1, &[])?;
    let mut plugin = Plugin::start(&kre)?;
    let pids = (plugin.p.child.id(), kre.pid());
    let rows = rt.block_on(async {
        let measured = async {
            let client = plugin.connect_when_healthy().await?;
            // Warm-up (not reported): the connection, the allocator, the caches.
            let warm = seconds.min(1.0);
            for method in [Method::Status, Method::Encrypt] {
                row(&client, method, callers.iter().copied().max().unwrap_or(1), warm, Arc::default(), pids, None)
                    .await?;
            }
            let mut rows = Vec::new();
            // Closed-loop rows for every caller count, then open-loop rows at each rate with the
            // most callers.
            let most = callers.iter().copied().max().unwrap_or(1);
            let loads =
                callers.iter().map(|&n| (n, None)).chain(rates.iter().filter(|&&r| r > 0.0).map(|&r| (most, Some(r))));
            for (n, offered) in loads {
                let mut sealed = Arc::default();
                for method in [Method::Status, Method::Encrypt, Method::Decrypt] {
                    let (r, kept) = row(&client, method, n, seconds, Arc::clone(&sealed), pids, offered).await?;
                    if method == Method::Encrypt {
                        if kept.is_empty() {
                            return Err(CliError::refused("Encrypt returned no ciphertext to decrypt"));
                        }
                        sealed = Arc::new(kept);
                    }
                    rows.push(r);
                }
            }
            Ok(rows)
        };
        tokio::select! {
            r = measured => r,
            () = crate::cmd::kms_plugin::shutdown_signal() => Err(CliError::refused("interrupted")),
        }
    });
    drop(rt);
    drop(plugin);
    drop(kre);
    rows
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The markdown table of `rows`.
pub(crate) fn table(rows: &[KmsRow]) -> String {
    let mut out = String::from(
        "| method | load | calls | calls/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | plugin CPU s | plugin CPU µs/call | KRE CPU s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let h = &r.latency;
        let calls = h.len();
        let errors = match r.error_count() {
            0 => "0".to_owned(),
            n => {
                let by: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
                format!("{n} ({})", by.join(", "))
            }
        };
        out.push_str(&format!(
            "| {} | {} | {calls} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {errors} | {:.2} | {:.1} | {:.2} |\n",
            r.load.method.name(),
            r.load,
            calls as f64 / r.wall_seconds.max(1e-9),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            r.plugin_cpu_seconds,
            r.plugin_cpu_seconds * 1e6 / (calls.max(1) as f64),
            r.kre_cpu_seconds,
        ));
    }
    out
}

/// The targets, row by row: every method's p99 under 1 ms with 64 callers (Status at any
/// number of callers), and no errors. With several callers, also the floor that the plugin's
/// own CPU per call puts under the mean latency: the plugin serves a connection on one thread,
/// so the calls in flight wait for each other (Little's law: mean >= callers x CPU per call).
pub(crate) fn verdicts(rows: &[KmsRow]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.load.callers == 64 || r.load.method == Method::Status)
        .map(|r| {
            let p99 = ms(r.latency.value_at_quantile(0.99));
            let met = p99 < TARGET_P99_MS && r.error_count() == 0;
            let mut v = format!(
                "{}: p99 {p99:.3} ms, {} errors; target p99 < {TARGET_P99_MS} ms without errors {}",
                r.label(),
                r.error_count(),
                if met { "met" } else { "NOT met" }
            );
            if r.load.callers > 1 && r.load.offered_per_s.is_none() {
                let per_call_us = r.plugin_cpu_seconds * 1e6 / (r.latency.len().max(1) as f64);
                v.push_str(&format!(
                    " (plugin CPU {per_call_us:.1} µs/call on one serving thread: mean >= {} x {per_call_us:.1} µs = {:.2} ms)",
                    r.load.callers,
                    r.load.callers as f64 * per_call_us / 1000.0
                ));
            }
            v
        })
        .collect()
}

/// `keygate bench kms`.
pub(crate) fn bench_kms(
    callers: &[usize],
    rates: &[f64],
    seconds: f64,
    plot_path: Option<&Path>,
) -> Result<(), CliError> {
    let rows = measure(callers, rates, seconds)?;
    println!(
        "# keygate bench kms ({seconds} s per row; closed-loop callers on one thread and one gRPC connection \
         over the plugin's Unix socket, as kube-apiserver's; CPU from /proc; {} cores shared by the plugin, the \
         KRE and the callers)",
        cores()
    );
    print!("{}", table(&rows));
    for v in verdicts(&rows) {
        println!("- {v}");
    }
    if let Some(path) = plot_path {
        let hists = histograms(&rows);
        let series: Vec<(String, &Histogram<u64>)> = hists.iter().map(|(l, h)| (l.clone(), h)).collect();
        super::plot::latency_svg(path, "keygate KMS v2 plugin latency (gRPC over its Unix socket)", &series)?;
        println!("latency plot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_with(method: Method, callers: usize, micros: &[u64], errors: &[(&str, u64)]) -> KmsRow {
        let mut latency = latency_histogram().expect("histogram");
        for &m in micros {
            latency.saturating_record(m);
        }
        KmsRow {
            load: Load { method, callers, offered_per_s: None },
            latency,
            wall_seconds: 2.0,
            errors: errors.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            plugin_cpu_seconds: 0.5,
            kre_cpu_seconds: 0.0,
        }
    }

    #[test]
    fn the_table_reports_percentiles_in_milliseconds_and_errors_by_code() {
        // 1000 calls: 990 of 100 µs, 10 of 5 ms.
        let mut us = vec![100; 990];
        us.extend([5_000; 10]);
        let rows = [
            row_with(Method::Encrypt, 64, &us, &[]),
            row_with(Method::Decrypt, 64, &[200, 300], &[("Unavailable", 2), ("wrong plaintext", 1)]),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("| method | load | calls | calls/s | p50 ms | p90 ms | p99 ms | p99.9 ms |"));
        assert_eq!(
            lines[2],
            "| Encrypt | 64 callers | 1000 | 500 | 0.100 | 0.100 | 0.100 | 5.003 | 5.003 | 0 | 0.50 | 500.0 | 0.00 |"
        );
        assert!(lines[3].contains("| 3 (Unavailable 2, wrong plaintext 1) |"), "{}", lines[3]);
        let v = verdicts(&rows);
        assert!(v[0].starts_with("Encrypt, 64 callers: p99 0.100 ms, 0 errors; target p99 < 1 ms without errors met"));
        assert!(v[0].ends_with("mean >= 64 x 500.0 µs = 32.00 ms)"), "{v:?}");
        assert!(v[1].contains("without errors NOT met"), "{v:?}");
        let h = histograms(&rows);
        assert_eq!((h[0].0.as_str(), h[0].1.len()), ("Encrypt, 64 callers", 1000));
    }

    #[test]
    fn arguments_are_checked_and_plaintexts_are_distinct() {
        assert!(check_args(&[1, 64], 5.0).is_ok());
        for (c, s) in [(vec![], 1.0), (vec![0], 1.0), (vec![1], 0.0), (vec![1], f64::NAN), (vec![1], -1.0)] {
            assert!(check_args(&c, s).is_err(), "{c:?} {s}");
        }
        assert_eq!(plaintext(3, 7).len(), 32);
        assert_ne!(plaintext(3, 7), plaintext(3, 8));
        assert_ne!(plaintext(3, 7), plaintext(4, 7));
    }
}
