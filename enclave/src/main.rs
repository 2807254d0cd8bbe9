//! `keygate-enclave`: the key release enclave process.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keygate_attestation::{HardwareNsm, Nsm, PcrExpectation, TrustAnchor, Verifier};
use keygate_enclave::core::{Kre, KreConfig};
use keygate_enclave::server::{self, ServerConfig};
use keygate_enclave::transport::{Addr, Listener};
use keygate_enclave::wire::Channel;

#[derive(Debug, Parser)]
#[command(name = "keygate-enclave", version, about = "keygate key release enclave")]
struct Args {
    /// The release channel (control planes; the only one the parent's proxy exposes):
    /// vsock:PORT (production), vsock:CID:PORT, or unix:PATH.
    #[arg(long)]
    listen: Addr,
    /// The parent channel (state, audit, status, policy delivery; never proxied). Default: the
    /// release address's port + 1 (vsock, tcp), or `PATH.parent` (unix).
    #[arg(long)]
    parent_listen: Option<Addr>,
    /// The custodian channel (unseal, reshare), bound only with custodians. Default: the
    /// release address's port + 2 (vsock, tcp), or `PATH.custodian` (unix).
    #[arg(long)]
    custodian_listen: Option<Addr>,
    /// The startup policy file (JSON): per cluster, the allowed images. Takes no pushes.
    #[arg(long, required_unless_present = "genesis", conflicts_with = "genesis")]
    policy: Option<PathBuf>,
    /// The genesis policy bundle (`keygate policy init`), built into the image: its approver
    /// set governs every later, pipeline-signed bundle (`keygate policy push`).
    #[arg(long)]
    genesis: Option<PathBuf>,
    /// NSM backend: hardware (/dev/nsm) or mock (test builds only).
    #[arg(long, default_value = "hardware")]
    nsm: String,
    /// Mock NSM: seed of the mock PKI.
    #[arg(long)]
    mock_seed: Option<String>,
    /// Mock NSM: this KRE's PCRs (repeatable).
    #[arg(long = "mock-pcr", value_name = "N=HEX")]
    mock_pcr: Vec<PcrExpectation>,
    /// Trust this root (PEM) for clients' documents. Default: the AWS Nitro root, or with
    /// `--nsm mock` the mock PKI's root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Challenge lifetime in seconds.
    #[arg(long, default_value_t = 30)]
    challenge_ttl: u64,
    /// Most outstanding challenges.
    #[arg(long, default_value_t = 16_384)]
    max_challenges: usize,
    /// Maximum age of a client's attestation document, seconds.
    #[arg(long, default_value_t = 60)]
    max_doc_age: u64,
    /// Most concurrent connections on the release channel.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most concurrent connections on each of the parent and custodian channels.
    #[arg(long, default_value_t = 64)]
    max_admin_connections: usize,
    /// Seconds allowed for one complete frame.
    #[arg(long, default_value_t = 10)]
    frame_timeout: u64,
    /// Milliseconds allowed for a connection's first complete frame (an idle connection gives
    /// its slot back this soon).
    #[arg(long, default_value_t = 2000)]
    first_frame_timeout_ms: u64,
    /// Most bytes of request bodies held at once across every connection (MiB).
    #[arg(long, default_value_t = 16)]
    bytes_in_flight_mib: usize,
    /// Seconds a connection may live in all.
    #[arg(long, default_value_t = 30)]
    connection_timeout: u64,
    /// Most unacknowledged audit entries; when the parent does not collect them the KRE
    /// refuses releases (fail closed).
    #[arg(long, default_value_t = 65_536)]
    audit_capacity: usize,
    /// A custodian of the sealed state: a P-384 public key (PEM, from `keygate keygen`).
    /// Repeatable, in share order. With custodians the KRE starts sealed, keeps its KEKs in a
    /// state the parent stores, and serves only after M custodians unseal it. Part of the
    /// enclave image's configuration (so covered by its PCRs).
    #[arg(long = "custodian", value_name = "PEM")]
    custodians: Vec<PathBuf>,
    /// M: how many custodians must act to unseal.
    #[arg(long, requires = "custodians")]
    custodian_threshold: Option<u8>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("keygate-enclave: error: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    // No core dumps: a dump of this process would hold KEKs in plaintext.
    if let Err(e) = rlimit::setrlimit(rlimit::Resource::CORE, 0, 0) {
        return fail(format!("cannot disable core dumps: {e}"));
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }

    let (nsm, default_anchor): (Arc<dyn Nsm>, Option<TrustAnchor>) = match args.nsm.as_str() {
        "hardware" => match HardwareNsm::open() {
            Ok(n) => (Arc::new(n), None),
            Err(e) => return fail(format!("{e} (use --nsm mock only for testing)")),
        },
        "mock" => match mock_nsm(&args) {
            Ok(x) => x,
            Err(e) => return fail(e),
        },
        other => return fail(format!("--nsm must be `hardware` or `mock`, not `{other}`")),
    };
    let anchor = match (&args.root, default_anchor) {
        (Some(p), _) => match std::fs::read(p)
            .map_err(|e| e.to_string())
            .and_then(|b| TrustAnchor::from_pem(&b).map_err(|e| e.to_string()))
        {
            Ok(a) => a,
            Err(e) => return fail(format!("--root {}: {e}", p.display())),
        },
        (None, Some(a)) => a,
        (None, None) => match TrustAnchor::aws_nitro() {
            Ok(a) => a,
            Err(e) => return fail(e),
        },
    };
    let config = KreConfig {
        challenge_ttl: Duration::from_secs(args.challenge_ttl),
        max_challenges: args.max_challenges,
        max_doc_age: Duration::from_secs(args.max_doc_age),
        audit: keygate_enclave::audit::AuditConfig {
            capacity: args.audit_capacity.max(2),
            reserve: (args.audit_capacity / 256).clamp(1, 256),
            ..Default::default()
        },
        custodians: match custodian_set(&args) {
            Ok(set) => set,
            Err(e) => return fail(e),
        },
        ..KreConfig::default()
    };
    let verifier = Verifier::new(anchor.clone());
    let built = match (&args.policy, &args.genesis) {
        (Some(path), _) => std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| keygate_enclave::policy_file::parse(&b).map_err(|e| e.to_string()))
            .and_then(|p| Kre::new(config, verifier, p, nsm).map_err(|e| e.to_string()))
            .map_err(|e| format!("--policy {}: {e}", path.display())),
        (None, Some(path)) => std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| Kre::with_genesis(config, verifier, &b, nsm).map_err(|e| e.to_string()))
            .map_err(|e| format!("--genesis {}: {e}", path.display())),
        (None, None) => Err("one of --policy or --genesis is required".to_owned()),
    };
    let kre = match built {
        Ok(k) => Arc::new(k),
        Err(e) => return fail(e),
    };
    let clusters = kre.policy(keygate_enclave::server::now_ms()).clusters.len();
    let server_cfg = ServerConfig {
        max_connections: args.max_connections,
        max_admin_connections: args.max_admin_connections.max(1),
        frame_timeout: Duration::from_secs(args.frame_timeout),
        first_frame_timeout: Duration::from_millis(args.first_frame_timeout_ms.max(1)),
        bytes_in_flight: args.bytes_in_flight_mib.clamp(1, 1024) * 1024 * 1024,
        connection_timeout: Duration::from_secs(args.connection_timeout),
    };

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("runtime: {e}")),
    };
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
        let mut listeners = Vec::with_capacity(addrs.len());
        // The release channel last: once its socket accepts, every channel does.
        for (channel, addr) in addrs.iter().rev() {
            if addrs.iter().filter(|(_, a)| a == addr).count() > 1 {
                return fail(format!("the {channel} channel's address {addr} is also another channel's"));
            }
            match Listener::bind(addr).await {
                Ok(l) => listeners.push((*channel, l)),
                Err(e) => return fail(format!("cannot listen on {addr} ({channel} channel): {e}")),
            }
        }
        let channels: Vec<String> = addrs.iter().map(|(c, a)| format!("{c}={a}")).collect();
        tracing::info!(
            channels = %channels.join(" "),
            nsm = kre.nsm_kind(),
            clusters,
            client_root_sha256 = %hex::encode(anchor.fingerprint()),
            policy_version = ?kre.policy_head().map(|(v, _)| v),
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
        ExitCode::SUCCESS
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
    }
}

/// The custodian set from `--custodian` and `--custodian-threshold`.
fn custodian_set(args: &Args) -> Result<Option<keygate_enclave::custody::CustodianSet>, String> {
    if args.custodians.is_empty() {
        if args.custodian_threshold.is_some() {
            return Err("--custodian-threshold needs --custodian".into());
        }
        return Ok(None);
    }
    let threshold = args.custodian_threshold.ok_or("--custodian needs --custodian-threshold M")?;
    let crypto = keygate_attestation::crypto::default_backend();
    let mut keys = Vec::with_capacity(args.custodians.len());
    for path in &args.custodians {
        use p384::elliptic_curve::sec1::ToEncodedPoint;
        use p384::pkcs8::DecodePublicKey;
        let pem = std::fs::read_to_string(path).map_err(|e| format!("--custodian {}: {e}", path.display()))?;
        let key = p384::PublicKey::from_public_key_pem(&pem)
            .map_err(|e| format!("--custodian {}: not a P-384 public key (PEM): {e}", path.display()))?;
        let point: [u8; 97] = key
            .to_encoded_point(false)
            .as_bytes()
            .try_into()
            .map_err(|_| format!("--custodian {}: not an uncompressed P-384 point", path.display()))?;
        keys.push(point);
    }
    keygate_enclave::custody::CustodianSet::new(crypto, threshold, keys)
        .map(Some)
        .map_err(|e| format!("custodians: {e}"))
}

#[cfg(feature = "mock")]
fn mock_nsm(args: &Args) -> Result<(Arc<dyn Nsm>, Option<TrustAnchor>), String> {
    use keygate_attestation::mock::{system_clock, MockNsm};
    let seed = args.mock_seed.as_deref().ok_or("--nsm mock needs --mock-seed")?;
    let pcrs = args.mock_pcr.iter().map(|e| (e.index, e.value.clone())).collect();
    let nsm = MockNsm::new(seed.as_bytes(), pcrs, system_clock()).with_instance("kre");
    let anchor = nsm.root_anchor();
    for line in [
        "################################################################",
        "#  MOCK NSM IN USE: this KRE's attestation is NOT genuine.     #",
        "#  Documents are signed by a test PKI. NEVER use in production. #",
        "################################################################",
    ] {
        tracing::warn!("{line}");
    }
    Ok((Arc::new(nsm), Some(anchor)))
}

#[cfg(not(feature = "mock"))]
fn mock_nsm(_: &Args) -> Result<(Arc<dyn Nsm>, Option<TrustAnchor>), String> {
    Err("this build has no mock NSM (built without the `mock` feature)".into())
}
