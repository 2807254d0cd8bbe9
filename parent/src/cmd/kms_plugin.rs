//! `keygate kms-plugin`: the Kubernetes KMS v2 plugin on a control-plane instance.
//!
//! kube-apiserver seals the seeds of its data encryption keys through this plugin (gRPC,
//! `v2.KeyManagementService`, over a Unix socket). The plugin seals them with the keygate data
//! key released by the KRE, so etcd's contents depend on the attested key chain and no key is
//! ever readable by an operator of the plugin's socket.
//!
//! What it decides: which key version seals (the newest held), which opens (the one the
//! `key_id` names), and — with `--kre` — for how long the keys may be used after the last
//! successful attestation (`lease`). What it trusts: the KRE's attestation (checked by the
//! fetch client against `--expect-kre-pcr`), or in `--keys` mode the files in the key
//! directory. Keys live in memory only and are zeroized when dropped.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use keygate_attestation::{PcrExpectation, Verifier};
use keygate_enclave::net::transport::Addr;
use keygate_enclave::peer::client::FetchRequest;
use keygate_enclave::wire::Id;

use crate::cmd::args::parse_duration;
use crate::cmd::fetch::{Fetcher, NsmArgs};
use crate::error::CliError;

mod keyring;
mod lease;
mod metrics;
mod service;
mod source;

pub(crate) use keyring::KeyRing;
pub(crate) use lease::{Lease, LeasePolicy};
pub(crate) use service::API_VERSION;

/// Code generated from `proto/kms/v2/api.proto` (build.rs).
// Generated code: it does not follow the workspace's documentation and visibility lints.
#[allow(unreachable_pub, missing_docs, missing_debug_implementations, clippy::all, clippy::as_conversions)]
pub(crate) mod pb {
    tonic::include_proto!("v2");
}

/// Largest gRPC message accepted or sent: a request carries at most 32 kB of annotations and a
/// ciphertext under 1 kB.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub(crate) struct KmsPluginArgs {
    /// Where kube-apiserver connects: unix:PATH. The socket is created with mode 0600.
    #[arg(long)]
    listen: ListenAddr,
    /// The cluster (part of every key_id, `<cluster>/<key-id>/v<N>`).
    #[arg(long)]
    cluster: Id,
    /// The keygate key that seals (part of every key_id).
    #[arg(long = "key-id")]
    key_id: Id,
    /// Serve the keys in DIR: `<key-id>.v<N>.key` files as `keygate fetch` writes them (the
    /// highest N seals, every one present opens). Rescanned every --rescan.
    #[arg(long, value_name = "DIR", required_unless_present = "kre", conflicts_with = "kre")]
    keys: Option<PathBuf>,
    /// Fetch the key from the KRE (unix:PATH, vsock:CID:PORT or tcp:IP:PORT) and re-attest on
    /// the lease. Repeatable (at most 16): the members of a KRE cluster, each checked against
    /// the same expected images; a member that cannot serve is passed over.
    #[arg(long, value_name = "ADDR")]
    kre: Vec<Addr>,
    /// With --kre: keep the audit receipt of every fetch in DIR (created with mode 0700), as
    /// `<chain id prefix>-<seq>.receipt` (mode 0600, fsynced), for `keygate audit verify
    /// --receipts DIR`. Without it, receipts are checked but not kept.
    #[arg(long, value_name = "DIR", requires = "kre")]
    receipts: Option<PathBuf>,
    /// With --kre: PCRs the KRE must have (repeatable; at least one).
    #[arg(long = "expect-kre-pcr", value_name = "N=HEX")]
    expect_kre_pcr: Vec<PcrExpectation>,
    /// With --kre: another KRE image accepted instead (repeatable; during a KRE upgrade, the
    /// old image and the new): all of its PCRs, as N=HEX,N=HEX,...
    #[arg(long = "expect-kre-image", value_name = "N=HEX,...", requires = "kre")]
    expect_kre_image: Vec<super::args::KreImage>,
    /// With --kre: trust this root (PEM) for the KRE's attestation. Default: the AWS Nitro
    /// root, or with `--nsm mock` the mock PKI's root.
    #[arg(long)]
    root: Option<PathBuf>,
    #[command(flatten)]
    nsm: NsmArgs,
    /// With --kre: keys are valid this long after the last successful fetch, and refreshed
    /// every half lease (e.g. 10m, 90s, 2s).
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    lease: Duration,
    /// With --kre: after the lease ends without a refresh, decryption (not encryption) goes on
    /// this long; then the keys are dropped. At most one lease.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
    /// Time limit of one fetch attempt.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    fetch_timeout: Duration,
    /// With --kre: time limit of one refresh over the KREs, every attempt at every KRE
    /// included. Default: twice --fetch-timeout.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    fetch_budget: Option<Duration>,
    #[command(flatten)]
    failover: crate::failover::FailoverArgs,
    /// With --keys: how often the directory is rescanned.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    rescan: Duration,
    /// Most requests served at once on one connection.
    #[arg(long, default_value_t = 64)]
    max_concurrent: usize,
    /// Time limit of one request.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    request_timeout: Duration,
    /// Serve Prometheus metrics (GET /metrics) and health (GET /healthz: 200 `ok`, or 503 and
    /// why) over HTTP on this TCP address, e.g. 127.0.0.1:9464. Unauthenticated and nothing
    /// secret: bind it where only the scraper reaches. Off without it.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// `unix:PATH`: the only transport kube-apiserver uses for KMS plugins.
#[derive(Debug, Clone)]
pub(crate) struct ListenAddr(PathBuf);

/// A command-line value the plugin does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ArgError {
    #[error("`{0}`: expected unix:PATH (a filesystem socket)")]
    NotUnixPath(String),
}

impl FromStr for ListenAddr {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() && !p.starts_with('@') => Ok(Self(PathBuf::from(p))),
            _ => Err(ArgError::NotUnixPath(s.to_owned())),
        }
    }
}

/// Where the keys come from, and what limits their use.
#[derive(Debug)]
pub(crate) enum Mode {
    /// `--keys DIR`: the directory is the source of truth; `problem` is the last scan's.
    Dir { dir: PathBuf, problem: Option<String> },
    /// `--kre`: the lease.
    Kre { lease: Lease },
}

/// Why a request cannot use the keys now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refusal {
    /// The KRE refused this instance.
    #[error("{0}")]
    Revoked(String),
    /// No usable key now (not fetched yet, lease over, no key files).
    #[error("{0}")]
    Unavailable(String),
}

/// The plugin's state: the keys and what governs them.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) ring: KeyRing,
    pub(crate) mode: Mode,
}

impl State {
    fn no_key(&self) -> Refusal {
        match &self.mode {
            Mode::Dir { dir, problem } => Refusal::Unavailable(match problem {
                Some(p) => format!("no usable key file in {}: {p}", dir.display()),
                None => format!("no key files in {}", dir.display()),
            }),
            Mode::Kre { .. } => Refusal::Unavailable("no key held".to_owned()),
        }
    }

    fn lease_refusal(e: lease::LeaseRefusal) -> Refusal {
        match e {
            lease::LeaseRefusal::Revoked(_) => Refusal::Revoked(e.to_string()),
            _ => Refusal::Unavailable(e.to_string()),
        }
    }

    /// Whether Encrypt may run now.
    pub(crate) fn can_encrypt(&self, now: Instant) -> Result<(), Refusal> {
        self.may_use(|lease| lease.can_encrypt(now))
    }

    /// Whether Decrypt may run now.
    pub(crate) fn can_decrypt(&self, now: Instant) -> Result<(), Refusal> {
        self.may_use(|lease| lease.can_decrypt(now))
    }

    /// A use is allowed when the lease allows it (`--kre` mode) and a key is held.
    fn may_use(&self, lease_allows: impl FnOnce(&Lease) -> Result<(), lease::LeaseRefusal>) -> Result<(), Refusal> {
        if let Mode::Kre { lease } = &self.mode {
            lease_allows(lease).map_err(Self::lease_refusal)?;
        }
        if self.ring.is_empty() {
            return Err(self.no_key());
        }
        Ok(())
    }

    /// Status healthz: "ok" only while a valid key is held and nothing is wrong.
    pub(crate) fn healthz(&self, now: Instant) -> String {
        if let Err(r) = self.can_encrypt(now) {
            return r.to_string();
        }
        match &self.mode {
            Mode::Dir { problem: Some(p), .. } => p.clone(),
            _ => "ok".to_owned(),
        }
    }
}

/// The state shared by the service and the key source, and what they count (always counted,
/// served only with `--metrics-listen`).
#[derive(Debug)]
pub(crate) struct Shared {
    state: RwLock<State>,
    pub(crate) metrics: metrics::KmsMetrics,
}

impl Shared {
    pub(crate) fn new(state: State) -> Arc<Self> {
        let metrics = metrics::KmsMetrics::new(matches!(state.mode, Mode::Kre { .. }));
        Arc::new(Self { state: RwLock::new(state), metrics })
    }
    pub(crate) fn read(&self) -> Result<RwLockReadGuard<'_, State>, ()> {
        self.state.read().map_err(|_| ())
    }
    pub(crate) fn write(&self) -> Result<RwLockWriteGuard<'_, State>, ()> {
        self.state.write().map_err(|_| ())
    }
}

/// Binds the socket at `path` with mode 0600, with no moment at which another user could
/// connect: it is bound inside a fresh 0700 directory, restricted, then renamed into place. A
/// stale socket at `path` is replaced; a live one (another plugin) or any other file is refused.
pub(crate) fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, CliError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(CliError::input(format!("{} exists and is not a socket", path.display())));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(CliError::input(format!("{} is in use by a running process", path.display())));
        }
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = parent.join(format!(".keygate-kms-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| CliError::io(format!("creating {}", private.display()), e))?;
    let inner = private.join("s");
    let bound = (|| {
        let l = tokio::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok::<_, std::io::Error>(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(|e| CliError::io(format!("listening on {}", path.display()), e))
}

/// Serves `shared` on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    max_concurrent: usize,
    request_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let svc = pb::key_management_service_server::KeyManagementServiceServer::new(service::KmsService::new(shared))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let streams = u32::try_from(max_concurrent).unwrap_or(u32::MAX);
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(max_concurrent)
        .max_concurrent_streams(streams)
        .timeout(request_timeout)
        .add_service(svc)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
}

/// A KMS v2 client on one HTTP/2 connection to a plugin's Unix socket (clones share it), as
/// kube-apiserver holds one: for the demo and the bench.
#[cfg(feature = "mock")]
pub(crate) async fn connect_unix(
    sock: &Path,
) -> Result<
    pb::key_management_service_client::KeyManagementServiceClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let path = sock.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://kms-plugin.invalid")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(pb::key_management_service_client::KeyManagementServiceClient::new(channel))
}

/// Resolves on SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down");
}

fn check_limits(a: &KmsPluginArgs) -> Result<(), CliError> {
    let day = Duration::from_secs(86_400);
    let within = |d: Duration, lo: Duration, hi: Duration, what: &str| {
        if d < lo || d > hi {
            Err(CliError::input(format!("{what} must be between {lo:?} and {hi:?}, not {d:?}")))
        } else {
            Ok(())
        }
    };
    within(a.lease, Duration::from_secs(1), day, "--lease")?;
    within(a.grace, Duration::ZERO, a.lease, "--grace")?;
    within(a.fetch_timeout, Duration::from_millis(100), Duration::from_secs(120), "--fetch-timeout")?;
    within(a.rescan, Duration::from_millis(100), Duration::from_secs(3600), "--rescan")?;
    within(a.request_timeout, Duration::from_millis(100), Duration::from_secs(120), "--request-timeout")?;
    if a.max_concurrent == 0 || a.max_concurrent > 4096 {
        return Err(CliError::input("--max-concurrent must be 1 to 4096"));
    }
    if !a.kre.is_empty() && a.expect_kre_pcr.is_empty() {
        return Err(CliError::input("--kre needs at least one --expect-kre-pcr"));
    }
    if !a.kre.is_empty() {
        a.failover.check(&a.kre)?;
    }
    within(fetch_budget(a), Duration::from_millis(100), Duration::from_secs(600), "--fetch-budget")?;
    Ok(())
}

/// `--fetch-budget`, or twice `--fetch-timeout`.
fn fetch_budget(a: &KmsPluginArgs) -> Duration {
    a.fetch_budget.unwrap_or(a.fetch_timeout.saturating_mul(2))
}

pub(crate) fn run(a: KmsPluginArgs) -> Result<(), CliError> {
    check_limits(&a)?;
    let ring = KeyRing::new(a.cluster.clone(), a.key_id.clone());
    let (mode, fetcher) = match (&a.keys, a.kre.as_slice()) {
        (Some(dir), []) => (Mode::Dir { dir: dir.clone(), problem: None }, None),
        (None, [kre, ..]) => {
            let (nsm, anchor) = a.nsm.open_with_anchor(a.root.as_deref())?;
            let fetcher = Fetcher {
                kre: kre.clone(),
                request: FetchRequest {
                    cluster: a.cluster.clone(),
                    key_ids: vec![a.key_id.clone()],
                    expect_kre_pcrs: a.expect_kre_pcr.clone(),
                    also_accept_kre: a.expect_kre_image.iter().map(|i| i.0.clone()).collect(),
                },
                nsm,
                kre_verifier: Verifier::new(anchor),
                timeout: a.fetch_timeout,
            };
            let policy = LeasePolicy { lease: a.lease, grace: a.grace };
            // One round over the KREs per refresh: the lease paces the refreshes.
            let members = crate::cmd::fetch::failover(a.kre.clone(), &a.failover, 0, fetch_budget(&a));
            (Mode::Kre { lease: Lease::new(policy, Instant::now()) }, Some((fetcher, members)))
        }
        _ => return Err(CliError::input("give exactly one of --keys DIR and --kre ADDR")),
    };
    let shared = Shared::new(State { ring, mode });
    // Requests are served on one thread. kube-apiserver holds one HTTP/2 connection, whose
    // frames one task handles, so more threads add no throughput: on a multi-threaded runtime
    // every request also crossed between that task and its stream's task on another worker
    // (`keygate bench kms`: about 40% more plugin CPU per call, and a longer tail, with 64
    // concurrent callers). The key source gets a runtime of its own: a fetch's attestation
    // steps are synchronous CPU work (on hardware, an NSM ioctl) that must not hold up requests.
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    let source_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("keygate-kms-source")
        .enable_all()
        .build()
        .map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(async {
        // Bound before the KMS socket: once that exists, so do the metrics.
        if let Some(addr) = a.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| CliError::io(format!("metrics: listening on {addr}"), e))?;
            tracing::info!(addr = %addr, "metrics and health served over HTTP (GET /metrics, /healthz)");
            let exporter = Arc::new(metrics::KmsExporter(shared.clone()));
            tokio::spawn(crate::metrics::serve(l, exporter, crate::metrics::Limits::default()));
        }
        let listener = bind_socket(&a.listen.0)?;
        match fetcher {
            Some((f, members)) => {
                let p = LeasePolicy { lease: a.lease, grace: a.grace };
                let kres: Vec<String> = members.members().iter().map(ToString::to_string).collect();
                tracing::info!(lease = ?p.lease, grace = ?p.grace, kre = %kres.join(" "), "keys come from the KRE, on a lease");
                match &a.receipts {
                    Some(d) => tracing::info!(dir = %d.display(), "audit receipts are kept"),
                    None => tracing::warn!("no --receipts DIR: the audit receipts of fetches are checked but not kept"),
                }
                source_rt.spawn(source::refresh_from_kre(
                    shared.clone(),
                    f,
                    members,
                    a.key_id.clone(),
                    a.receipts.clone(),
                ));
            }
            None => {
                let dir = a.keys.clone().unwrap_or_default();
                source_rt.spawn(source::watch_dir(shared.clone(), dir, a.key_id.clone(), a.rescan));
            }
        }
        tracing::info!(
            socket = %a.listen.0.display(),
            cluster = %a.cluster,
            key_id = %a.key_id,
            "keygate kms-plugin listening (KMS API {API_VERSION})"
        );
        let served = serve(listener, shared, a.max_concurrent, a.request_timeout, shutdown_signal()).await;
        let _ = std::fs::remove_file(&a.listen.0);
        served.map_err(|e| CliError::io("serving", e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_a_filesystem_unix_socket() {
        assert!(ListenAddr::from_str("unix:/run/kms.sock").is_ok());
        for bad in ["/run/kms.sock", "unix:", "unix:@abstract", "tcp:127.0.0.1:1"] {
            assert!(ListenAddr::from_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_socket_is_owner_only_and_a_stale_one_is_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = keygate_tests::TempDir::new("keygate-kms-unit").expect("dir");
        let dir = tmp.path();
        let p = dir.join("kms.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let l = bind_socket(&p).expect("bind");
            assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
            assert!(bind_socket(&p).is_err(), "a live socket is not stolen");
            drop(l);
            let _l = bind_socket(&p).expect("a stale socket is replaced");
        });
        std::fs::write(dir.join("file"), b"x").expect("write");
        let rt2 = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt2.block_on(async { assert!(bind_socket(&dir.join("file")).is_err()) });
    }
}
