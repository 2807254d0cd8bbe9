//! `keygate fetch`: the control-plane instance's boot key fetch, and the `Fetcher` the KMS
//! plugin, the bench and the demo use.
//!
//! The protocol's decisions (the KRE's attestation against `--expect-kre-pcr`, the wrap bound to
//! it) are `keygate_enclave::peer::client`'s; this module drives one attempt over a transport
//! (`crate::failover` decides which KRE of a cluster to ask, and what to retry), and writes the
//! released keys (mode 0600) and the audit receipt.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::crypto;
use keygate_attestation::{HardwareNsm, Nsm, PcrExpectation, TrustAnchor, Verifier};
use keygate_enclave::audit::Receipt;
use keygate_enclave::net::io::{read_frame, write_frame, FrameError};
use keygate_enclave::net::transport::{self, Addr};
use keygate_enclave::peer::client::{self, ClientError, FetchRequest, ReleasedKey, TransportError};
use keygate_enclave::wire::Id;

use crate::backoff::Backoff;
use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    /// The KRE (through the parent proxy): unix:PATH, vsock:CID:PORT, tcp:IP:PORT or tcp:HOST:PORT.
    /// Repeatable (at most 16): the members of a KRE cluster, each checked against the same
    /// expected images; a member that cannot serve is passed over (docs/operations.md).
    #[arg(long, required = true)]
    kre: Vec<Addr>,
    /// The cluster whose keys to fetch.
    #[arg(long)]
    cluster: Id,
    /// Key ids (repeatable, 1-16).
    #[arg(long = "key-id", required = true)]
    key_id: Vec<Id>,
    /// Directory to write `<key-id>.key` files into (mode 0600), and the release's audit
    /// receipt into `receipts/<chain id prefix>-<seq>.receipt` beneath it (for
    /// `keygate audit verify --receipts`).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    nsm: NsmArgs,
    /// Trust this root (PEM) for the KRE's attestation. Default: the AWS Nitro root, or
    /// with `--nsm mock` the mock PKI's root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// PCRs the KRE must have (repeatable; at least one).
    #[arg(long = "expect-kre-pcr", value_name = "N=HEX", required = true)]
    expect_kre_pcr: Vec<PcrExpectation>,
    /// Another KRE image accepted instead (repeatable; during a KRE upgrade, the old image and
    /// the new): all of its PCRs, as N=HEX,N=HEX,...
    #[arg(long = "expect-kre-image", value_name = "N=HEX,...")]
    expect_kre_image: Vec<super::args::KreImage>,
    /// Retries after a retryable failure (KRE unreachable, busy, restarting): further rounds
    /// over the KREs, each after a backoff.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Time limit of one attempt (e.g. 10, 10s, 500ms; 100ms to 10m).
    #[arg(long, default_value = "10s", value_parser = super::args::parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Time limit of the whole fetch, every attempt, retry and backoff included (1s to 1h).
    #[arg(long, default_value = "90s", value_parser = super::args::parse_duration, value_name = "DURATION")]
    budget: Duration,
    #[command(flatten)]
    failover: crate::failover::FailoverArgs,
}

/// How this instance attests: its NSM. (Without the `mock` feature the `--mock-*` options are
/// parsed and `--nsm mock` is refused.)
#[derive(Debug, Clone, clap::Args)]
#[cfg_attr(not(feature = "mock"), allow(dead_code))]
pub(crate) struct NsmArgs {
    /// NSM backend: hardware (/dev/nsm) or mock (testing only).
    #[arg(long, default_value = "hardware")]
    pub(crate) nsm: String,
    /// Mock NSM: seed of the mock PKI.
    #[arg(long)]
    pub(crate) mock_seed: Option<String>,
    /// Mock NSM: this instance's PCRs (repeatable; override `--mock-pcrs-from`).
    #[arg(long = "mock-pcr", value_name = "N=HEX")]
    pub(crate) mock_pcr: Vec<PcrExpectation>,
    /// Mock NSM: report the PCRs of this enclave image, as if booted from it.
    #[arg(long, value_name = "FILE.eif")]
    pub(crate) mock_pcrs_from: Option<PathBuf>,
    /// Mock NSM: a name for this instance (its module_id).
    #[arg(long, default_value = "cpi")]
    pub(crate) mock_instance: String,
}

impl NsmArgs {
    /// The NSM, and the root to verify the KRE with: `root` when given, else the mock root for
    /// a mock NSM, else the built-in AWS Nitro root.
    pub(crate) fn open_with_anchor(&self, root: Option<&Path>) -> Result<(Arc<dyn Nsm>, TrustAnchor), CliError> {
        let (nsm, mock_root) = self.open()?;
        let anchor = match (root, mock_root) {
            (Some(p), _) => crate::cmd::attestation::load_anchor(Some(p))?,
            (None, Some(r)) => r,
            (None, None) => crate::cmd::attestation::load_anchor(None)?,
        };
        Ok((nsm, anchor))
    }

    /// The NSM, and the mock root when it is a mock.
    pub(crate) fn open(&self) -> Result<(Arc<dyn Nsm>, Option<TrustAnchor>), CliError> {
        match self.nsm.as_str() {
            "hardware" => Ok((
                Arc::new(
                    HardwareNsm::open()
                        .map_err(|e| CliError::input(format!("{e} (use --nsm mock only for testing)")))?,
                ),
                None,
            )),
            #[cfg(not(feature = "mock"))]
            "mock" => Err(CliError::input("this keygate has no mock NSM (built without the `mock` feature)")),
            #[cfg(feature = "mock")]
            "mock" => {
                use keygate_attestation::mock::{system_clock, MockNsm};
                let seed = self.mock_seed.as_deref().ok_or_else(|| CliError::input("--nsm mock needs --mock-seed"))?;
                let mut pcrs = match &self.mock_pcrs_from {
                    Some(p) => crate::cmd::attestation::pcrs_from_eif(p)?,
                    None => Default::default(),
                };
                pcrs.extend(self.mock_pcr.iter().map(|e| (e.index, e.value.clone())));
                let nsm = MockNsm::new(seed.as_bytes(), pcrs, system_clock()).with_instance(&self.mock_instance);
                let root = nsm.root_anchor();
                tracing::warn!("MOCK NSM in use: this instance's attestation is not genuine (testing only)");
                Ok((Arc::new(nsm), Some(root)))
            }
            other => Err(CliError::input(format!("--nsm must be `hardware` or `mock`, not `{other}`"))),
        }
    }
}

/// Everything one fetch attempt needs.
pub(crate) struct Fetcher {
    /// The KRE [`Fetcher::once`] asks (the bench, the demo); `keygate fetch` and the KMS plugin
    /// ask their members through `crate::failover` with [`Fetcher::once_at`].
    #[cfg_attr(not(feature = "mock"), allow(dead_code))]
    pub(crate) kre: Addr,
    pub(crate) request: FetchRequest,
    pub(crate) nsm: Arc<dyn Nsm>,
    pub(crate) kre_verifier: Verifier,
    pub(crate) timeout: Duration,
}

/// The outcome of one attempt: the keys, their audit receipt, and the Release frame that was
/// sent.
pub(crate) struct Fetched {
    pub(crate) keys: Vec<ReleasedKey>,
    pub(crate) receipt: Receipt,
    /// (Replayed by the demo's attack step.)
    #[cfg_attr(not(feature = "mock"), allow(dead_code))]
    pub(crate) release_frame: Vec<u8>,
}

fn io_err(e: FrameError) -> ClientError {
    ClientError::Transport(e.into())
}

impl Fetcher {
    /// One attempt, bounded by `timeout`.
    #[cfg_attr(not(feature = "mock"), allow(dead_code))]
    pub(crate) async fn once(&self) -> Result<Fetched, ClientError> {
        self.once_at(&self.kre).await
    }

    /// One attempt at the KRE `kre` (a member of a cluster) instead of `self.kre`, bounded by
    /// `timeout`: a whole handshake of its own (its own nonce, attestation and key).
    pub(crate) async fn once_at(&self, kre: &Addr) -> Result<Fetched, ClientError> {
        tokio::time::timeout(self.timeout, self.attempt(kre))
            .await
            .unwrap_or_else(|_| Err(TransportError::NoAnswer { kre: kre.to_string(), within: self.timeout }.into()))
    }

    async fn attempt(&self, kre: &Addr) -> Result<Fetched, ClientError> {
        let crypto = crypto::default_backend();
        let mut rng = |b: &mut [u8]| {
            use rand_core::RngCore;
            rand_core::OsRng.fill_bytes(b);
        };
        let mut s = transport::connect(kre, self.timeout)
            .await
            .map_err(|e| TransportError::Connect { kre: kre.to_string(), kind: e.kind() })?;
        let (await_challenge, hello) = client::start(self.request.clone(), &mut rng)?;
        write_frame(&mut s, &hello, self.timeout).await.map_err(io_err)?;
        let body = read_frame(&mut s, self.timeout).await.map_err(io_err)?;
        let await_released = await_challenge.on_challenge(
            &body,
            &self.kre_verifier,
            crate::cmd::attestation::now_ms(),
            &*self.nsm,
            crypto,
            &mut rng,
        )?;
        let release_frame = await_released.release_frame.clone();
        write_frame(&mut s, &release_frame, self.timeout).await.map_err(io_err)?;
        let body = read_frame(&mut s, self.timeout).await.map_err(io_err)?;
        let released = await_released.on_released(&body, crypto)?;
        Ok(Fetched { keys: released.keys, receipt: released.receipt, release_frame })
    }

    /// Attempts with exponential backoff (0.2 s, 0.4 s, … capped at 5 s) while the failure is
    /// retryable (the bench; `keygate fetch` fails over through `crate::failover`).
    #[cfg_attr(not(feature = "mock"), allow(dead_code))]
    pub(crate) async fn with_retries(&self, retries: u32) -> Result<Fetched, ClientError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 0);
        let mut attempt = 0;
        loop {
            match self.once().await {
                Ok(f) => return Ok(f),
                Err(e) if e.is_retryable() && attempt < retries => {
                    attempt += 1;
                    let delay = backoff.next_wait();
                    tracing::warn!(error = %e, attempt, retries, "fetch failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The subdirectory of a key directory that holds the audit receipts.
pub(crate) const RECEIPTS_DIR: &str = "receipts";

/// Writes every key to `dir/<key-id>.v<version>.key` and, for the newest version of each
/// key id, `dir/<key-id>.key` (32 raw bytes each, mode 0600), and the release's audit receipt
/// to `dir/receipts/<chain id prefix>-<seq>.receipt` (mode 0600; the directory 0700): all
/// temporary files first (fsynced), then the renames, then the directory fsyncs. If any write
/// fails, no key file or receipt is left behind. Returns the `<key-id>.key` paths, in the
/// order of `keys`' first occurrences, and the receipt's path.
pub(crate) fn write_keys(
    dir: &Path,
    keys: &[ReleasedKey],
    receipt: &Receipt,
) -> Result<(Vec<PathBuf>, PathBuf), CliError> {
    let mut newest: Vec<&ReleasedKey> = Vec::new();
    for k in keys {
        match newest.iter_mut().find(|n| n.key_id == k.key_id) {
            Some(n) if n.version < k.version => *n = k,
            Some(_) => {}
            None => newest.push(k),
        }
    }
    let receipts = dir.join(RECEIPTS_DIR);
    let receipt_bytes = receipt.to_bytes();
    let mut files: Vec<(PathBuf, &[u8])> =
        keys.iter().map(|k| (dir.join(format!("{}.v{}.key", k.key_id, k.version)), &k.key.expose()[..])).collect();
    files.extend(newest.iter().map(|k| (dir.join(format!("{}.key", k.key_id)), &k.key.expose()[..])));
    files.push((receipts.join(receipt.file_name()), &receipt_bytes[..]));
    let mut written = write_files(&[dir, &receipts], &files)?;
    let receipt_path = written.pop().unwrap_or_default();
    Ok((written.into_iter().skip(keys.len()).collect(), receipt_path))
}

/// Writes `receipt` into `dir` (created with mode 0700) as `<chain id prefix>-<seq>.receipt`,
/// mode 0600, fsynced with the directory. Returns its path.
pub(crate) fn write_receipt(dir: &Path, receipt: &Receipt) -> Result<PathBuf, CliError> {
    let bytes = receipt.to_bytes();
    let mut written = write_files(&[dir], &[(dir.join(receipt.file_name()), &bytes[..])])?;
    Ok(written.pop().unwrap_or_default())
}

/// Writes each `(path, bytes)` (mode 0600) after creating `dirs` (mode 0700), the parents of
/// every path: temporary files beside their targets first (fsynced), then the renames, then
/// each directory's fsync. On a failure, no temporary file and no target is left behind.
fn write_files(dirs: &[&Path], files: &[(PathBuf, &[u8])]) -> Result<Vec<PathBuf>, CliError> {
    use std::os::unix::fs::DirBuilderExt;
    for d in dirs {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|e| CliError::io(format!("creating {}", d.display()), e))?;
    }
    let mut temps: Vec<(PathBuf, PathBuf)> = Vec::new();
    let cleanup = |temps: &[(PathBuf, PathBuf)]| {
        for (t, _) in temps {
            let _ = std::fs::remove_file(t);
        }
    };
    for (final_path, bytes) in files {
        let final_path = final_path.clone();
        let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = final_path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let written = keygate_enclave::atomic::write_file_with(
            &tmp,
            bytes,
            keygate_enclave::atomic::WriteOptions { mode: 0o600, replace: false },
        );
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            cleanup(&temps);
            return Err(CliError::io(format!("writing {}", final_path.display()), e));
        }
        temps.push((tmp, final_path));
    }
    for (i, (tmp, path)) in temps.iter().enumerate() {
        if let Err(e) = std::fs::rename(tmp, path) {
            // The ones renamed already go too: nothing of a failed write is left behind.
            for (_, done) in temps.iter().take(i) {
                let _ = std::fs::remove_file(done);
            }
            cleanup(&temps);
            return Err(CliError::io(format!("renaming into {}", path.display()), e));
        }
    }
    for d in dirs {
        if let Ok(d) = std::fs::File::open(d) {
            let _ = d.sync_all();
        }
    }
    Ok(temps.into_iter().map(|(_, p)| p).collect())
}

/// The failover over `--kre`'s members for one fetch: `retries` rounds at most, within
/// `budget`, with the shared backoff between rounds (0.2 s doubling to 5 s, ±20 %).
pub(crate) fn failover(
    members: Vec<Addr>,
    args: &crate::failover::FailoverArgs,
    retries: u32,
    budget: Duration,
) -> crate::failover::Failover {
    let policy = crate::failover::Policy {
        hedge: args.hedge,
        budget,
        retries,
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 20),
    };
    crate::failover::Failover::new(members, args.kre_order, policy)
}

fn check_times(a: &FetchArgs) -> Result<(), CliError> {
    a.failover.check(&a.kre)?;
    let within = |d: Duration, lo: Duration, hi: Duration, what: &str| {
        if d < lo || d > hi {
            Err(CliError::input(format!("{what} must be between {lo:?} and {hi:?}, not {d:?}")))
        } else {
            Ok(())
        }
    };
    within(a.timeout, Duration::from_millis(100), Duration::from_secs(600), "--timeout")?;
    within(a.budget, Duration::from_secs(1), Duration::from_secs(3600), "--budget")
}

pub(crate) fn run(a: FetchArgs) -> Result<(), CliError> {
    check_times(&a)?;
    let (nsm, anchor) = a.nsm.open_with_anchor(a.root.as_deref())?;
    let fetcher = Fetcher {
        kre: a.kre.first().cloned().ok_or_else(|| CliError::input("give at least one --kre"))?,
        request: FetchRequest {
            cluster: a.cluster.clone(),
            key_ids: a.key_id.clone(),
            expect_kre_pcrs: a.expect_kre_pcr.clone(),
            also_accept_kre: a.expect_kre_image.iter().map(|i| i.0.clone()).collect(),
        },
        nsm,
        kre_verifier: Verifier::new(anchor),
        timeout: a.timeout,
    };
    let members = failover(a.kre.clone(), &a.failover, a.retries, a.budget);
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    let (fetched, _) = rt
        .block_on(members.run(|kre| fetcher.once_at(kre)))
        .map_err(|e| CliError::refused(format!("fetch failed: {e}")))?;
    let (paths, receipt_path) = write_keys(&a.out, &fetched.keys, &fetched.receipt)?;
    let r = &fetched.receipt;
    let keys = fetched.keys.iter().zip(&paths);
    crate::output::print(&super::reports::Fetched {
        cluster: a.cluster.to_string(),
        keys: keys
            .map(|(k, p)| super::reports::FetchedKey {
                key_id: k.key_id.to_string(),
                version: k.version,
                path: p.display().to_string(),
            })
            .collect(),
        receipt: super::reports::FetchedReceipt {
            chain_id: hex::encode(r.chain_id()),
            seq: r.seq(),
            entry_digest: hex::encode(r.entry_digest()),
            path: receipt_path.display().to_string(),
        },
    })
}
