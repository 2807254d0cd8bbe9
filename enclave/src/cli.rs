//! The KRE's command line, shared by its two binaries.
//!
//! `keygate-enclave` (the binary that goes into an enclave image) runs [`run`] with the
//! hardware NSM only; `keygate-enclave-dev` (crate `enclave-dev/`) passes the mock NSM in as an
//! extra [`NsmBackend`]. This module decides which backend serves (`--nsm`, among the ones the
//! binary was given, refusing any other before anything starts), the root that clients'
//! documents must chain to, the channels' addresses and the KRE's limits. It has no mock code
//! and names no mock type, so a binary built from it alone cannot attest with a test PKI,
//! whatever features cargo unifies for the workspace (CI checks the production binary's
//! symbols, `.ci/run`).
//!
//! It trusts its arguments and the files they name (the policy or genesis bundle, custodian
//! keys, `--root`): they are part of the enclave image, so covered by its PCRs.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::{AnchorError, HardwareNsm, Nsm, NsmError, TrustAnchor, Verifier};

use crate::kre::{Kre, KreConfig, StartError};
use crate::net::server::{self, ServerConfig};
use crate::net::transport::{Addr, Listener};
use crate::policy_file::PolicyFileError;
use crate::state::custody::{CustodianSet, CustodyError};
use crate::wire::Channel;

/// The NSM backend every binary has: the Nitro Secure Module at `/dev/nsm`.
pub const HARDWARE: &str = "hardware";
/// The `--nsm` value of the mock NSM, which only [`DEV_BINARY`] has.
pub const MOCK: &str = "mock";
/// The development binary: the KRE with the mock NSM, never put in an enclave image.
pub const DEV_BINARY: &str = "keygate-enclave-dev";

/// The KRE's flags, common to both binaries. The mock NSM's own flags (`--mock-seed`,
/// `--mock-pcr`) are only in the development binary.
#[derive(Debug, clap::Args)]
pub struct EnclaveArgs {
    /// The release channel (control planes; the only one the parent's proxy exposes):
    /// vsock:PORT (production), vsock:CID:PORT, or unix:PATH.
    #[arg(long)]
    pub listen: Addr,
    /// The parent channel (state, audit, status, policy delivery; never proxied). Default: the
    /// release address's port + 1 (vsock, tcp), or `PATH.parent` (unix).
    #[arg(long)]
    pub parent_listen: Option<Addr>,
    /// The custodian channel (unseal, reshare), bound only with custodians. Default: the
    /// release address's port + 2 (vsock, tcp), or `PATH.custodian` (unix).
    #[arg(long)]
    pub custodian_listen: Option<Addr>,
    /// The member channel (other member KREs ask this one for the state key,
    /// `docs/cluster.md`), bound only when given.
    #[arg(long)]
    pub member_listen: Option<Addr>,
    /// The startup policy file (JSON): per cluster, the allowed images. Takes no pushes.
    #[arg(long, required_unless_present = "genesis", conflicts_with = "genesis")]
    pub policy: Option<PathBuf>,
    /// The genesis policy bundle (`keygate policy init`), built into the image: its approver
    /// set governs every later, pipeline-signed bundle (`keygate policy push`).
    #[arg(long)]
    pub genesis: Option<PathBuf>,
    /// NSM backend: hardware (/dev/nsm). `--version` lists this binary's backends; the mock
    /// NSM is only in the development binary, keygate-enclave-dev.
    #[arg(long, default_value = HARDWARE)]
    pub nsm: String,
    /// Trust this root (PEM) for clients' documents. Default: the AWS Nitro root, or with
    /// keygate-enclave-dev's `--nsm mock` the mock PKI's root.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Challenge lifetime in seconds.
    #[arg(long, default_value_t = 30)]
    pub challenge_ttl: u64,
    /// Most outstanding challenges.
    #[arg(long, default_value_t = 16_384)]
    pub max_challenges: usize,
    /// Maximum age of a client's attestation document, seconds.
    #[arg(long, default_value_t = 60)]
    pub max_doc_age: u64,
    /// Most concurrent connections on the release channel.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Most concurrent connections on each of the parent and custodian channels.
    #[arg(long, default_value_t = 64)]
    pub max_admin_connections: usize,
    /// Seconds allowed for one complete frame.
    #[arg(long, default_value_t = 10)]
    pub frame_timeout: u64,
    /// Milliseconds allowed for a connection's first complete frame (an idle connection gives
    /// its slot back this soon).
    #[arg(long, default_value_t = 2000)]
    pub first_frame_timeout_ms: u64,
    /// Most bytes of request bodies held at once across every connection (MiB).
    #[arg(long, default_value_t = 16)]
    pub bytes_in_flight_mib: usize,
    /// Seconds a connection may live in all.
    #[arg(long, default_value_t = 30)]
    pub connection_timeout: u64,
    /// Milliseconds a release, an accepted policy or a state step waits for the parent to
    /// acknowledge storing its audit entry (`keygate audit pull --follow`) before its answer
    /// is withheld (`audit_unacknowledged`, retryable). No answer leaves unrecorded.
    #[arg(long, default_value_t = 2000)]
    pub audit_ack_timeout_ms: u64,
    /// Most unacknowledged audit entries; when the parent does not collect them the KRE
    /// refuses releases (fail closed).
    #[arg(long, default_value_t = 65_536)]
    pub audit_capacity: usize,
    /// A custodian of the sealed state: a P-384 public key (PEM, from `keygate keygen`).
    /// Repeatable, in share order. With custodians the KRE starts sealed, keeps its KEKs in a
    /// state the parent stores, and serves only after M custodians unseal it. Part of the
    /// enclave image's configuration (so covered by its PCRs).
    #[arg(long = "custodian", value_name = "PEM")]
    pub custodians: Vec<PathBuf>,
    /// M: how many custodians must act to unseal.
    #[arg(long, requires = "custodians")]
    pub custodian_threshold: Option<u8>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// An NSM backend a binary offers beyond [`HARDWARE`].
pub trait NsmBackend {
    /// The `--nsm` value that selects it.
    fn name(&self) -> &'static str;
    /// Opens it; called only when `--nsm` names it.
    fn open(&self) -> Result<OpenedNsm, Box<dyn StdError + Send + Sync>>;
}

/// An open NSM backend.
#[derive(Debug)]
pub struct OpenedNsm {
    /// The NSM the KRE attests with.
    pub nsm: Arc<dyn Nsm>,
    /// The root clients' documents must chain to unless `--root` says otherwise: `None` for the
    /// AWS Nitro root, a test PKI's root for a mock.
    pub default_root: Option<TrustAnchor>,
}

/// The NSM backends of a binary, [`HARDWARE`] first. Displays as
/// `NSM backends: hardware, mock`, the text `--version` and the refusals show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends(Vec<&'static str>);

impl Backends {
    /// [`HARDWARE`] and the `extra` backend names, in order.
    pub fn new(extra: &[&'static str]) -> Self {
        let mut names = vec![HARDWARE];
        names.extend(extra.iter().copied().filter(|n| *n != HARDWARE));
        Self(names)
    }

    /// [`HARDWARE`] and the names of `extra`.
    pub fn of(extra: &[&dyn NsmBackend]) -> Self {
        let names: Vec<&'static str> = extra.iter().map(|b| b.name()).collect();
        Self::new(&names)
    }

    /// Whether `name` is one of them.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(&name)
    }

    /// The `--version` text: this crate's version and the backends, e.g.
    /// `0.1.0 (NSM backends: hardware)`.
    pub fn version(&self) -> String {
        format!("{} ({self})", env!("CARGO_PKG_VERSION"))
    }

    /// What to add to a `/dev/nsm` failure: how to test without Nitro hardware.
    fn hardware_hint(&self) -> String {
        if self.contains(MOCK) {
            format!(" (use --nsm {MOCK} only for testing)")
        } else {
            format!("; for testing without a Nitro enclave, the development binary {DEV_BINARY} has a mock NSM")
        }
    }
}

impl fmt::Display for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NSM backends: {}", self.0.join(", "))
    }
}

/// Why the NSM `--nsm` names cannot serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsmChoiceError {
    /// `--nsm mock` (or a `--mock-*` flag) given to a binary without the mock NSM.
    #[error("this binary has no mock NSM ({backends}); the development binary {DEV_BINARY} has one")]
    NoMock {
        /// The binary's backends.
        backends: Backends,
    },
    /// A backend this binary does not have.
    #[error("--nsm {given}: no such NSM backend ({backends})")]
    Unknown {
        /// The `--nsm` value.
        given: String,
        /// The binary's backends.
        backends: Backends,
    },
    /// `/dev/nsm` could not be opened.
    #[error("{source}{hint}", hint = .backends.hardware_hint())]
    Hardware {
        /// Why.
        source: NsmError,
        /// The binary's backends.
        backends: Backends,
    },
    /// An extra backend failed to open.
    #[error("{source}")]
    Backend {
        /// The backend.
        name: &'static str,
        /// Why.
        source: Box<dyn StdError + Send + Sync>,
    },
}

/// Opens the backend `name` (the `--nsm` value) among [`HARDWARE`] and `extra`.
pub fn open_nsm(name: &str, extra: &[&dyn NsmBackend]) -> Result<OpenedNsm, NsmChoiceError> {
    let backends = Backends::of(extra);
    if name == HARDWARE {
        return match HardwareNsm::open() {
            Ok(n) => Ok(OpenedNsm { nsm: Arc::new(n), default_root: None }),
            Err(source) => Err(NsmChoiceError::Hardware { source, backends }),
        };
    }
    match extra.iter().find(|b| b.name() == name) {
        Some(b) => b.open().map_err(|source| NsmChoiceError::Backend { name: b.name(), source }),
        None if name == MOCK => Err(NsmChoiceError::NoMock { backends }),
        None => Err(NsmChoiceError::Unknown { given: name.to_owned(), backends }),
    }
}

/// The refusal for a command line that asks for the mock NSM (`--nsm mock`, `--nsm=mock` or
/// any `--mock-*` flag) when `backends` has none, so that it gets the precise message rather
/// than clap's "unexpected argument".
pub fn refuse_missing_mock<S: AsRef<std::ffi::OsStr>>(argv: &[S], backends: &Backends) -> Option<NsmChoiceError> {
    if backends.contains(MOCK) {
        return None;
    }
    let args: Vec<&std::ffi::OsStr> = argv.iter().map(AsRef::as_ref).take_while(|a| *a != "--").collect();
    let asks = args.iter().enumerate().any(|(i, a)| {
        let a = a.to_string_lossy();
        a == "--nsm=mock"
            || a.starts_with("--mock-")
            || (a == "--nsm" && args.get(i.saturating_add(1)).is_some_and(|v| *v == MOCK))
    });
    asks.then(|| NsmChoiceError::NoMock { backends: backends.clone() })
}

/// Parses the process's command line into `P` (a binary's parser, flattening [`EnclaveArgs`])
/// for a binary whose NSM backends are [`HARDWARE`] and `extra`: `--version` lists them, and
/// a request for a mock NSM the binary lacks exits with code 2 and [`NsmChoiceError::NoMock`].
pub fn parse<P: clap::Parser>(extra: &[&'static str]) -> P {
    let backends = Backends::new(extra);
    let mut cmd = P::command().version(backends.version());
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(e) = refuse_missing_mock(argv.get(1..).unwrap_or_default(), &backends) {
        eprintln!("{}: error: {e}", cmd.get_name());
        std::process::exit(2);
    }
    let mut matches = cmd.clone().get_matches_from(argv);
    match P::from_arg_matches_mut(&mut matches) {
        Ok(p) => p,
        Err(e) => e.format(&mut cmd).exit(),
    }
}

/// Why [`run`] did not start the KRE (exit code 2): each failure names the flag, file or
/// address concerned and keeps its cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Core dumps could not be disabled (a dump would hold KEKs in plaintext).
    #[error("cannot disable core dumps: {0}")]
    CoreDumps(#[source] std::io::Error),
    /// The NSM `--nsm` names cannot serve.
    #[error(transparent)]
    Nsm(#[from] NsmChoiceError),
    /// A file a flag names cannot be read.
    #[error("{flag} {}: {source}", .path.display())]
    Read {
        /// The flag (`--root`, `--custodian`, `--policy`, `--genesis`).
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The `--root` file is not a root certificate (PEM).
    #[error("--root {}: {source}", .path.display())]
    Root {
        /// The file.
        path: PathBuf,
        /// Why.
        source: AnchorError,
    },
    /// The built-in AWS Nitro root does not load.
    #[error(transparent)]
    NitroRoot(AnchorError),
    /// `--custodian-threshold` without any `--custodian`.
    #[error("--custodian-threshold needs --custodian")]
    ThresholdWithoutCustodians,
    /// `--custodian` without `--custodian-threshold`.
    #[error("--custodian needs --custodian-threshold M")]
    CustodiansWithoutThreshold,
    /// A `--custodian` file is not a P-384 public key (PEM).
    #[error("--custodian {}: not a P-384 public key (PEM): {source}", .path.display())]
    CustodianKey {
        /// The file.
        path: PathBuf,
        /// Why.
        source: p384::pkcs8::spki::Error,
    },
    /// A `--custodian` key has no 97-byte uncompressed encoding.
    #[error("--custodian {}: not an uncompressed P-384 point", .0.display())]
    CustodianPoint(PathBuf),
    /// The custodian keys and the threshold make no custodian set.
    #[error("custodians: {0}")]
    Custodians(#[source] CustodyError),
    /// The `--policy` file is not a policy file.
    #[error("--policy {}: {source}", .path.display())]
    PolicyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: PolicyFileError,
    },
    /// The KRE did not start with the `--policy` or `--genesis` file.
    #[error("{flag} {}: {source}", .path.display())]
    Start {
        /// `--policy` or `--genesis`.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: StartError,
    },
    /// Neither `--policy` nor `--genesis` (clap refuses this first).
    #[error("one of --policy or --genesis is required")]
    NoPolicy,
    /// The async runtime did not start.
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Two channels were given one address.
    #[error("the {channel} channel's address {addr} is also another channel's")]
    SharedAddress {
        /// The channel.
        channel: Channel,
        /// The address.
        addr: Addr,
    },
    /// A channel's address cannot be listened on.
    #[error("cannot listen on {addr} ({channel} channel): {source}")]
    Listen {
        /// The address.
        addr: Addr,
        /// The channel.
        channel: Channel,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads the file `path` that `flag` names.
fn read_file(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Read { flag, path: path.to_owned(), source })
}

/// Runs the KRE as `program` (the name in error messages) with `args` and the NSM backends
/// [`HARDWARE`] and `extra`, until SIGINT or SIGTERM. Exit code 2: a configuration error.
pub fn run(program: &str, args: EnclaveArgs, extra: &[&dyn NsmBackend]) -> ExitCode {
    run_with(program, args, extra, DevOptions::default())
}

/// What only the development binary may change (never `keygate-enclave`).
#[derive(Debug, Clone, Copy)]
pub struct DevOptions {
    /// Answer without waiting for the parent to store the audit entry (to measure what
    /// write-ahead audit costs; the production binary always waits).
    pub write_ahead: bool,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self { write_ahead: true }
    }
}

/// [`run`] with the development binary's [`DevOptions`].
pub fn run_with(program: &str, args: EnclaveArgs, extra: &[&dyn NsmBackend], dev: DevOptions) -> ExitCode {
    match serve(args, extra, dev) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Logging for every keygate binary, on standard error: `KEYGATE_LOG` filters (default
/// `info`); one JSON object a line with `--log-json`; otherwise text with RFC 3339 UTC times,
/// coloured only when standard error is a terminal (no escape codes in journald or a file).
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Starts the KRE and serves until SIGINT or SIGTERM.
fn serve(args: EnclaveArgs, extra: &[&dyn NsmBackend], dev: DevOptions) -> Result<(), RunError> {
    // No core dumps: a dump of this process would hold KEKs in plaintext.
    rlimit::setrlimit(rlimit::Resource::CORE, 0, 0).map_err(RunError::CoreDumps)?;
    init_logging(args.log_json);

    let OpenedNsm { nsm, default_root } = open_nsm(&args.nsm, extra)?;
    let anchor = match (&args.root, default_root) {
        (Some(p), _) => TrustAnchor::from_pem(&read_file("--root", p)?)
            .map_err(|source| RunError::Root { path: p.clone(), source })?,
        (None, Some(a)) => a,
        (None, None) => TrustAnchor::aws_nitro().map_err(RunError::NitroRoot)?,
    };
    let config = KreConfig {
        challenge_ttl: Duration::from_secs(args.challenge_ttl),
        max_challenges: args.max_challenges,
        max_doc_age: Duration::from_secs(args.max_doc_age),
        audit: crate::audit::AuditConfig {
            capacity: args.audit_capacity.max(2),
            reserve: (args.audit_capacity / 256).clamp(1, 256),
            ..Default::default()
        },
        custodians: custodian_set(&args)?,
        ..KreConfig::default()
    };
    let verifier = Verifier::new(anchor.clone());
    let kre = Arc::new(match (&args.policy, &args.genesis) {
        (Some(path), _) => {
            let policy = crate::policy_file::parse(&read_file("--policy", path)?)
                .map_err(|source| RunError::PolicyFile { path: path.clone(), source })?;
            Kre::new(config, verifier, policy, nsm).map_err(|source| RunError::Start {
                flag: "--policy",
                path: path.clone(),
                source,
            })?
        }
        (None, Some(path)) => Kre::with_genesis(config, verifier, &read_file("--genesis", path)?, nsm)
            .map_err(|source| RunError::Start { flag: "--genesis", path: path.clone(), source })?,
        (None, None) => return Err(RunError::NoPolicy),
    });
    let clusters = kre.policy(server::now_ms()).clusters.len();
    let server_cfg = ServerConfig {
        max_connections: args.max_connections,
        max_admin_connections: args.max_admin_connections.max(1),
        frame_timeout: Duration::from_secs(args.frame_timeout),
        first_frame_timeout: Duration::from_millis(args.first_frame_timeout_ms.max(1)),
        bytes_in_flight: args.bytes_in_flight_mib.clamp(1, 1024) * 1024 * 1024,
        connection_timeout: Duration::from_secs(args.connection_timeout),
        audit_ack_timeout: Duration::from_millis(args.audit_ack_timeout_ms.clamp(1, 60_000)),
        write_ahead: dev.write_ahead,
    };

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().map_err(RunError::Runtime)?;
    rt.block_on(async move {
        let mut addrs = vec![(Channel::Release, args.listen.clone())];
        addrs.push((
            Channel::Parent,
            args.parent_listen.clone().unwrap_or_else(|| beside(&args.listen, Channel::Parent)),
        ));
        if kre.vault_phase().is_some() || args.custodian_listen.is_some() {
            let a = args.custodian_listen.clone().unwrap_or_else(|| beside(&args.listen, Channel::Custodian));
            addrs.push((Channel::Custodian, a));
        }
        if let Some(a) = args.member_listen.clone() {
            addrs.push((Channel::Member, a));
        }
        let mut listeners = Vec::with_capacity(addrs.len());
        // The release channel last: once its socket accepts, every channel does.
        for (channel, addr) in addrs.iter().rev() {
            let (channel, addr) = (*channel, addr.clone());
            if addrs.iter().filter(|(_, a)| *a == addr).count() > 1 {
                return Err(RunError::SharedAddress { channel, addr });
            }
            match Listener::bind(&addr).await {
                Ok(l) => listeners.push((channel, l)),
                Err(source) => return Err(RunError::Listen { addr, channel, source }),
            }
        }
        let channels: Vec<String> = addrs.iter().map(|(c, a)| format!("{c}={a}")).collect();
        tracing::info!(
            channels = %channels.join(" "),
            nsm = kre.nsm_kind(),
            clusters,
            client_root_sha256 = %hex::encode(anchor.fingerprint()),
            policy_version = kre.policy_head().map(|(v, _)| v),
            state = kre.vault_phase().map_or("ephemeral KEKs (no custodians)", |p| p.as_str()),
            "keygate-enclave ready"
        );
        let shutdown = async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        server::serve(listeners, kre, server_cfg, shutdown).await;
        tracing::info!("keygate-enclave stopped");
        Ok(())
    })
}

/// The default address of `channel` beside the release address: port + 1 (parent) or + 2
/// (custodian) for vsock and tcp, `PATH.parent` / `PATH.custodian` for a Unix socket.
fn beside(release: &Addr, channel: Channel) -> Addr {
    let step: u16 = if channel == Channel::Parent { 1 } else { 2 };
    match release {
        Addr::Unix(p) => {
            let mut name = p.as_os_str().to_owned();
            name.push(format!(".{channel}"));
            Addr::Unix(name.into())
        }
        Addr::Vsock { cid, port } => Addr::Vsock { cid: *cid, port: port.saturating_add(u32::from(step)) },
        Addr::Tcp(a) => {
            let mut a = *a;
            a.set_port(a.port().saturating_add(step));
            Addr::Tcp(a)
        }
        Addr::TcpHost { host, port } => Addr::TcpHost { host: host.clone(), port: port.saturating_add(step) },
    }
}

/// The custodian set from `--custodian` and `--custodian-threshold`.
fn custodian_set(args: &EnclaveArgs) -> Result<Option<CustodianSet>, RunError> {
    if args.custodians.is_empty() {
        if args.custodian_threshold.is_some() {
            return Err(RunError::ThresholdWithoutCustodians);
        }
        return Ok(None);
    }
    let threshold = args.custodian_threshold.ok_or(RunError::CustodiansWithoutThreshold)?;
    let crypto = keygate_attestation::crypto::default_backend();
    let mut keys = Vec::with_capacity(args.custodians.len());
    for path in &args.custodians {
        use p384::elliptic_curve::sec1::ToEncodedPoint;
        use p384::pkcs8::DecodePublicKey;
        let pem = std::fs::read_to_string(path).map_err(|source| RunError::Read {
            flag: "--custodian",
            path: path.clone(),
            source,
        })?;
        let key = p384::PublicKey::from_public_key_pem(&pem)
            .map_err(|source| RunError::CustodianKey { path: path.clone(), source })?;
        let point: [u8; 97] =
            key.to_encoded_point(false).as_bytes().try_into().map_err(|_| RunError::CustodianPoint(path.clone()))?;
        keys.push(point);
    }
    CustodianSet::new(crypto, threshold, keys).map(Some).map_err(RunError::Custodians)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "keygate-enclave")]
    struct Cli {
        #[command(flatten)]
        enclave: EnclaveArgs,
    }

    /// A stand-in for the development binary's backend.
    #[derive(Debug)]
    struct Fake(&'static str);

    impl NsmBackend for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn open(&self) -> Result<OpenedNsm, Box<dyn StdError + Send + Sync>> {
            use keygate_attestation::mock::{system_clock, MockNsm};
            let nsm = MockNsm::new(b"cli", Default::default(), system_clock());
            let root = nsm.root_anchor();
            Ok(OpenedNsm { nsm: Arc::new(nsm), default_root: Some(root) })
        }
    }

    #[test]
    fn backends_and_version_name_every_backend() {
        assert_eq!(Backends::new(&[]).to_string(), "NSM backends: hardware");
        assert_eq!(Backends::new(&[MOCK]).to_string(), "NSM backends: hardware, mock");
        assert_eq!(Backends::new(&[HARDWARE, MOCK]), Backends::new(&[MOCK]));
        assert_eq!(Backends::of(&[&Fake(MOCK)]), Backends::new(&[MOCK]));
        assert_eq!(Backends::new(&[]).version(), format!("{} (NSM backends: hardware)", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn mock_is_refused_without_the_backend() {
        let err = open_nsm(MOCK, &[]).expect_err("no mock");
        assert!(matches!(err, NsmChoiceError::NoMock { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "this binary has no mock NSM (NSM backends: hardware); the development binary keygate-enclave-dev has one"
        );
        let err = open_nsm("tpm", &[]).expect_err("unknown");
        assert!(matches!(err, NsmChoiceError::Unknown { ref given, .. } if given == "tpm"), "{err:?}");
        assert_eq!(err.to_string(), "--nsm tpm: no such NSM backend (NSM backends: hardware)");
        let err = open_nsm("tpm", &[&Fake(MOCK)]).expect_err("unknown");
        assert_eq!(err.to_string(), "--nsm tpm: no such NSM backend (NSM backends: hardware, mock)");
    }

    #[test]
    fn an_extra_backend_is_opened_by_name() {
        let opened = open_nsm(MOCK, &[&Fake(MOCK)]).expect("mock");
        assert_eq!(opened.nsm.kind(), "mock");
        assert!(opened.default_root.is_some(), "a test PKI brings its own root");
    }

    #[test]
    fn hardware_failure_says_where_the_mock_is() {
        let e = |extra: &[&'static str]| NsmChoiceError::Hardware {
            source: NsmError::DeviceAbsent,
            backends: Backends::new(extra),
        };
        assert!(e(&[]).to_string().contains("/dev/nsm"));
        assert!(e(&[]).to_string().ends_with("the development binary keygate-enclave-dev has a mock NSM"));
        assert!(e(&[MOCK]).to_string().ends_with("(use --nsm mock only for testing)"));
    }

    #[test]
    fn a_request_for_the_mock_is_found_before_parsing() {
        let hw = Backends::new(&[]);
        for argv in [
            &["--nsm", "mock"][..],
            &["--listen", "unix:s", "--nsm=mock"],
            &["--mock-seed", "s"],
            &["--listen", "unix:s", "--mock-pcr", "0=00"],
        ] {
            assert!(matches!(refuse_missing_mock(argv, &hw), Some(NsmChoiceError::NoMock { .. })), "{argv:?}");
            assert!(refuse_missing_mock(argv, &Backends::new(&[MOCK])).is_none(), "{argv:?}");
        }
        for argv in [&["--nsm", "hardware"][..], &["--policy", "mock"], &["--nsm"], &["--", "--nsm", "mock"], &[]] {
            assert!(refuse_missing_mock(argv, &hw).is_none(), "{argv:?}");
        }
    }

    #[test]
    fn the_shared_flags_have_no_mock_ones() {
        let base = ["keygate-enclave", "--listen", "unix:s", "--policy", "p.json"];
        let cli = Cli::try_parse_from(base).expect("parse");
        assert_eq!(cli.enclave.nsm, HARDWARE);
        for extra in [["--mock-seed", "s"], ["--mock-pcr", "0=00"]] {
            let err = Cli::try_parse_from(base.iter().chain(&extra)).expect_err("no mock flags");
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{extra:?}");
        }
    }

    #[test]
    fn start_up_errors_name_the_flag_and_the_file() {
        let base = ["keygate-enclave", "--listen", "unix:s", "--policy", "p.json"];
        let mut args = Cli::try_parse_from(base).expect("parse").enclave;
        args.custodian_threshold = Some(1);
        let err = |args: &EnclaveArgs| custodian_set(args).expect_err("refused").to_string();
        assert_eq!(err(&args), "--custodian-threshold needs --custodian");
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        args.custodians = vec![missing.clone()];
        assert!(err(&args).starts_with(&format!("--custodian {}: ", missing.display())), "{}", err(&args));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a key").expect("write");
        args.custodians = vec![garbage.clone()];
        let e = err(&args);
        assert!(e.starts_with(&format!("--custodian {}: not a P-384 public key (PEM): ", garbage.display())), "{e}");
        args.custodian_threshold = None;
        assert_eq!(err(&args), "--custodian needs --custodian-threshold M");
        let e = RunError::Read { flag: "--policy", path: missing.clone(), source: std::io::ErrorKind::NotFound.into() };
        assert_eq!(e.to_string(), format!("--policy {}: entity not found", missing.display()));
    }

    #[test]
    fn channels_default_beside_the_release_address() {
        let unix = Addr::Unix("/run/kre.sock".into());
        assert_eq!(beside(&unix, Channel::Parent), Addr::Unix("/run/kre.sock.parent".into()));
        assert_eq!(beside(&unix, Channel::Custodian), Addr::Unix("/run/kre.sock.custodian".into()));
        let vsock = Addr::Vsock { cid: 3, port: 5000 };
        assert_eq!(beside(&vsock, Channel::Parent), Addr::Vsock { cid: 3, port: 5001 });
        assert_eq!(beside(&vsock, Channel::Custodian), Addr::Vsock { cid: 3, port: 5002 });
    }
}
