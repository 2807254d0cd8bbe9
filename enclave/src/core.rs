//! The KRE's protocol core: a state machine per connection, without I/O.
//!
//! Frames go in, frames come out; the clock and the random source are injected. Every
//! security decision of a release is here (or in `keygate-attestation`), in this order:
//! frame → state → request ids → attestation (chain, signature, time, debug) → nonce
//! (this connection's challenge, unexpired, unused) → `user_data` = request digest →
//! `public_key` a valid P-384 point → policy (cluster, PCRs, kind, expiry) → derive and
//! wrap. Every refusal is a `Denied` frame naming the failed check.

// `Deny` carries what the audit entry of a refusal needs (requester PCRs, key ids); it is
// built once per refused connection, so its size on the error path does not matter.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keygate_attestation::bundle::PolicyState;
use keygate_attestation::crypto::Crypto;
use keygate_attestation::policy::{self, PolicyDenial, ReleasePolicy};
use keygate_attestation::{AttestRequest, Nsm, UnknownFields, Verifier, VerifyError, VerifyOptions, VerifyTime};
use sha2::{Digest, Sha384};

use crate::audit::{AuditConfig, AuditError, AuditEvent, AuditLog, AuditSigner, Requester};
use crate::keys::{self, KekStore, Transcript};
use crate::nonces::{NonceTable, Redeem};
use crate::wire::{self, DenyCode, Id, Message, WireError};

/// `user_data` of the KRE's own attestation in a Challenge:
/// `SHA-384("keygate/v1/kre-challenge" ‖ server_nonce)`, binding the challenge to the
/// genuine KRE.
pub fn kre_user_data(server_nonce: &[u8; 32]) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(b"keygate/v1/kre-challenge");
    h.update(server_nonce);
    h.finalize().into()
}

/// Tunables of the KRE (limits and lifetimes).
#[derive(Debug, Clone)]
pub struct KreConfig {
    /// How long a challenge stays valid.
    pub challenge_ttl: Duration,
    /// Most live challenges.
    pub max_challenges: usize,
    /// Maximum age of a client's attestation document.
    pub max_doc_age: Duration,
    /// Allowed clock skew for client documents.
    pub clock_skew: Duration,
    /// The audit buffer's limits.
    pub audit: AuditConfig,
}

impl Default for KreConfig {
    fn default() -> Self {
        Self {
            challenge_ttl: Duration::from_secs(30),
            max_challenges: 16_384,
            max_doc_age: Duration::from_secs(60),
            clock_skew: Duration::from_secs(30),
            audit: AuditConfig::default(),
        }
    }
}

/// What the core decided, for logs and the audit trail. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A challenge was issued.
    ChallengeIssued,
    /// Keys were released.
    Released {
        /// Cluster.
        cluster: Id,
        /// (key id, KEK version) released.
        keys: Vec<(Id, u32)>,
        /// The policy image rule that matched.
        image: String,
        /// The client's module id.
        module_id: String,
        /// SHA-384 of the client's attestation document.
        document_sha384: [u8; 48],
    },
    /// A signed policy bundle was accepted.
    PolicyAccepted {
        /// Its version.
        version: u64,
        /// SHA-384 of its body.
        digest: [u8; 48],
        /// When it is fully in force (ms).
        activates_at_ms: u64,
    },
    /// Audit entries were handed out.
    AuditPulled {
        /// Entries in the batch.
        entries: usize,
    },
    /// Audit entries were acknowledged.
    AuditAcked {
        /// Up to this sequence number.
        up_to_seq: u64,
    },
    /// A status report was sent.
    StatusReported,
    /// A request was refused.
    Denied {
        /// The check that failed.
        code: DenyCode,
        /// Detail.
        reason: String,
        /// The cluster asked for, when known.
        cluster: Option<Id>,
        /// The client's module id, when its document verified.
        module_id: Option<String>,
    },
}

/// One step's output: the frame to send, and whether to close afterwards.
#[derive(Debug)]
pub struct Step {
    /// A complete frame (length prefix included).
    pub reply: Vec<u8>,
    /// Close the connection after sending.
    pub close: bool,
    /// What happened.
    pub event: Event,
}

/// The KRE: verifier, policy, KEKs, challenge table and NSM. Shared by all connections.
#[derive(Debug)]
pub struct Kre {
    config: KreConfig,
    verifier: Verifier,
    policy: RwLock<PolicySource>,
    keks: RwLock<KekStore>,
    nonces: Mutex<NonceTable>,
    nsm: Arc<dyn Nsm>,
    crypto: &'static dyn Crypto,
    audit: Mutex<AuditLog>,
}

/// Where the allowed images come from.
#[derive(Debug)]
enum PolicySource {
    /// A startup policy file (no pushes).
    Static(Arc<ReleasePolicy>),
    /// Pipeline-signed bundles, from the genesis bundle built into the image.
    Signed(PolicyState),
}

/// A KRE could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The policy is unusable.
    #[error("policy: {0}")]
    Policy(#[from] policy::PolicyError),
    /// A cluster name in the policy is not a valid id.
    #[error("policy: cluster name `{0}` is not a valid id")]
    ClusterName(String),
    /// The NSM could not provide randomness.
    #[error("NSM: {0}")]
    Nsm(#[from] keygate_attestation::NsmError),
    /// The genesis bundle is unusable.
    #[error("genesis bundle: {0}")]
    Genesis(#[from] keygate_attestation::bundle::BundleError),
    /// The audit signer could not be set up.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
}

impl Kre {
    /// A KRE with a static `policy` (startup policy file); KEKs for every cluster of the
    /// policy are generated now from the NSM's random source.
    pub fn new(
        config: KreConfig,
        verifier: Verifier,
        policy: ReleasePolicy,
        nsm: Arc<dyn Nsm>,
    ) -> Result<Self, StartError> {
        policy.validate()?;
        Self::build(config, verifier, PolicySource::Static(Arc::new(policy)), nsm)
    }

    /// A KRE governed by pipeline-signed bundles, starting from `genesis` (built into the
    /// image, so covered by its PCRs).
    pub fn with_genesis(
        config: KreConfig,
        verifier: Verifier,
        genesis: &[u8],
        nsm: Arc<dyn Nsm>,
    ) -> Result<Self, StartError> {
        let state = PolicyState::genesis(genesis, verifier.crypto())?;
        Self::build(config, verifier, PolicySource::Signed(state), nsm)
    }

    fn build(
        config: KreConfig,
        verifier: Verifier,
        source: PolicySource,
        nsm: Arc<dyn Nsm>,
    ) -> Result<Self, StartError> {
        let crypto = verifier.crypto();
        let nonces = Mutex::new(NonceTable::new(config.max_challenges, millis(config.challenge_ttl)));
        let signer = AuditSigner::start(&*nsm, crypto)?;
        let audit = Mutex::new(AuditLog::new(config.audit, signer));
        let kre = Self {
            config,
            verifier,
            policy: RwLock::new(source),
            keks: RwLock::new(KekStore::default()),
            nonces,
            nsm,
            crypto,
            audit,
        };
        let clusters: Vec<String> = match &*kre.source() {
            PolicySource::Static(p) => p.clusters.keys().cloned().collect(),
            PolicySource::Signed(s) => s.latest().bundle.body.policy.clusters.keys().cloned().collect(),
        };
        kre.ensure_keks(&clusters)?;
        let pcrs =
            (0u16..16).filter_map(|i| Some((u8::try_from(i).ok()?, kre.nsm.describe_pcr(i).ok()?.data))).collect();
        {
            let mut log = kre.audit();
            log.set_policy_version(kre.policy_head().map_or(0, |(v, _)| v));
            log.append(
                AuditEvent::KreStarted {
                    nsm_kind: kre.nsm.kind().to_owned(),
                    pcrs,
                    software: format!("keygate-enclave {}", env!("CARGO_PKG_VERSION")),
                },
                wall_clock_ms(),
            )?;
        }
        Ok(kre)
    }

    /// The audit log.
    pub fn audit(&self) -> std::sync::MutexGuard<'_, AuditLog> {
        match self.audit.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records a refusal in the audit trail. When even the reserve is exhausted the log
    /// counts it as unrecorded and writes an `Unrecorded` entry once there is room.
    fn record_denial(&self, d: &Deny, now_ms: u64) {
        let (code, reason) = (d.code.as_str().to_owned(), d.reason.clone());
        let event = match &d.stage {
            Stage::Challenge => AuditEvent::ChallengeRefused { code, reason },
            Stage::Release => AuditEvent::ReleaseDenied {
                code,
                reason,
                requester: d.requester.clone(),
                cluster: d.cluster.clone(),
                key_ids: d.key_ids.clone(),
            },
            Stage::Policy { version, digest } => {
                AuditEvent::PolicyRefused { version: *version, digest: *digest, code, reason }
            }
        };
        let _ = self.audit().append(event, now_ms);
    }

    /// A JSON status report (never secret).
    pub fn status_json(&self) -> String {
        let a = self.audit().status();
        let head = self.policy_head();
        serde_json::json!({
            "nsm": self.nsm.kind(),
            "policy_version": head.map(|(v, _)| v),
            "policy_digest": head.map(|(_, d)| hex::encode(d)),
            "live_challenges": self.live_challenges(),
            "audit": {
                "last_seq": a.last_seq,
                "head": hex::encode(a.head),
                "chain_id": hex::encode(a.chain_id),
                "acked_up_to": a.acked_up_to,
                "buffered": a.buffered,
                "buffered_bytes": a.buffered_bytes,
                "capacity": a.capacity,
                "full": a.full,
                "releases_refused_because_full": a.refused_total,
                "unrecorded_pending": a.unrecorded_pending,
                "checkpoints_signed": a.checkpoints_signed,
            },
        })
        .to_string()
    }

    /// Generates a KEK for every named cluster that has none.
    fn ensure_keks(&self, clusters: &[String]) -> Result<(), StartError> {
        let mut keks = match self.keks.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        for name in clusters {
            let id = Id::new(name).map_err(|_| StartError::ClusterName(name.clone()))?;
            let mut err = None;
            keks.ensure_cluster(&id, |b| {
                if let Err(e) = self.nsm.random(b) {
                    err = Some(e);
                }
            });
            if let Some(e) = err {
                return Err(StartError::Nsm(e));
            }
        }
        Ok(())
    }

    fn source(&self) -> std::sync::RwLockReadGuard<'_, PolicySource> {
        match self.policy.read() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        }
    }

    /// The signed policy's newest version and digest (`None` with a static policy file).
    pub fn policy_head(&self) -> Option<(u64, [u8; 48])> {
        match &*self.source() {
            PolicySource::Static(_) => None,
            PolicySource::Signed(s) => Some((s.latest().bundle.body.version, s.latest().digest)),
        }
    }

    /// Verifies and applies a pushed bundle (atomically: all or nothing).
    fn push_policy(&self, bundle: &[u8], now_ms: u64) -> Result<keygate_attestation::bundle::ApplyReport, Deny> {
        let mut guard = match self.policy.write() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        let meta = keygate_attestation::bundle::decode_bundle(bundle, self.crypto).ok();
        let stage = Stage::Policy {
            version: meta.as_ref().map(|b| b.body.version),
            digest: meta.as_ref().map(|b| keygate_attestation::bundle::digest(&b.body_bytes)),
        };
        let deny = |code, reason: String| Deny { stage: stage.clone(), ..Deny::new(code, reason) };
        let PolicySource::Signed(state) = &mut *guard else {
            return Err(deny(DenyCode::PolicyStatic, "this KRE runs a static policy file and takes no pushes".into()));
        };
        // Apply to a copy, make the KEKs, then commit: a failure leaves the state as it was.
        let mut next = state.clone();
        let report =
            next.apply(bundle, now_ms, self.crypto).map_err(|e| deny(DenyCode::PolicyRefused, e.to_string()))?;
        let clusters: Vec<String> = next.latest().bundle.body.policy.clusters.keys().cloned().collect();
        self.ensure_keks(&clusters).map_err(|e| deny(DenyCode::Internal, e.to_string()))?;
        *state = next;
        drop(guard);
        let mut log = self.audit();
        log.set_policy_version(report.version);
        let _ = log.append(
            AuditEvent::PolicyAccepted {
                version: report.version,
                digest: report.digest,
                activates_at_ms: report.activates_at_ms,
            },
            now_ms,
        );
        Ok(report)
    }

    /// The NSM backend in use ("hardware" or "mock").
    pub fn nsm_kind(&self) -> &'static str {
        self.nsm.kind()
    }

    /// Live challenges (for status and metrics).
    pub fn live_challenges(&self) -> usize {
        self.nonces.lock().map(|n| n.len()).unwrap_or(0)
    }

    /// The release policy in force at `now_ms`.
    pub fn policy(&self, now_ms: u64) -> Arc<ReleasePolicy> {
        match &*self.source() {
            PolicySource::Static(p) => p.clone(),
            PolicySource::Signed(s) => Arc::new(s.effective(now_ms)),
        }
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, NonceTable> {
        match self.nonces.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Milliseconds since the Unix epoch, only for the start-up audit entry; every decision
/// takes its time from the caller's `Env`.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The state of one connection, named for what it waits for.
#[derive(Debug)]
enum State {
    ExpectHello,
    ExpectRelease { client_nonce: [u8; 32], server_nonce: [u8; 32], kre_attestation_sha384: [u8; 48] },
    Done,
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    state: State,
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

/// The environment of one step: the time and a random source.
pub struct Env<'a> {
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Fills a buffer with random bytes.
    pub rng: &'a mut dyn FnMut(&mut [u8]),
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("now_ms", &self.now_ms).finish_non_exhaustive()
    }
}

/// What a refusal was about, for the audit trail.
#[derive(Debug, Clone)]
enum Stage {
    /// Before a request: Hello, framing, timeouts.
    Challenge,
    /// A Release.
    Release,
    /// A policy push (version and digest when the bundle decoded).
    Policy { version: Option<u64>, digest: Option<[u8; 48]> },
}

struct Deny {
    code: DenyCode,
    reason: String,
    cluster: Option<Id>,
    module_id: Option<String>,
    stage: Stage,
    requester: Option<Requester>,
    key_ids: Vec<Id>,
}

impl Deny {
    fn new(code: DenyCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            cluster: None,
            module_id: None,
            stage: Stage::Challenge,
            requester: None,
            key_ids: Vec::new(),
        }
    }
}

impl Connection {
    /// A connection waiting for Hello.
    pub fn new() -> Self {
        Self { state: State::ExpectHello }
    }

    /// Whether the connection has finished (a Released or Denied was produced).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Handles one frame body (the bytes after the length prefix).
    pub fn on_frame(&mut self, kre: &Kre, body: &[u8], env: &mut Env<'_>) -> Step {
        let result = match Message::decode(body) {
            Err(WireError::UnsupportedVersion(v)) => Err(Deny::new(
                DenyCode::UnsupportedVersion,
                format!("protocol version {v} not supported (this KRE speaks {})", wire::VERSION),
            )),
            Err(e @ (WireError::BadId | WireError::BadKeyCount(_) | WireError::DuplicateKeyId)) => {
                Err(Deny::new(DenyCode::InvalidRequest, e.to_string()))
            }
            Err(e) => Err(Deny::new(DenyCode::Malformed, e.to_string())),
            Ok(msg) => match (std::mem::replace(&mut self.state, State::Done), msg) {
                (State::ExpectHello, Message::Hello { client_nonce }) => self.hello(kre, client_nonce, env),
                (State::ExpectHello, Message::AuditPull { after_seq, max }) => {
                    audit_pull(kre, after_seq, max, env.now_ms)
                }
                (State::ExpectHello, Message::AuditAck { up_to_seq }) => audit_ack(kre, up_to_seq),
                (State::ExpectHello, Message::Status) => Message::StatusReport { json: kre.status_json() }
                    .encode()
                    .map(|reply| Step { reply, close: true, event: Event::StatusReported })
                    .map_err(|e| Deny::new(DenyCode::Internal, e.to_string())),
                (State::ExpectHello, Message::PolicyPush { bundle }) => match kre.push_policy(&bundle, env.now_ms) {
                    Ok(r) => Message::PolicyAccepted {
                        version: r.version,
                        digest: r.digest,
                        activates_at_ms: r.activates_at_ms,
                    }
                    .encode()
                    .map(|reply| Step {
                        reply,
                        close: true,
                        event: Event::PolicyAccepted {
                            version: r.version,
                            digest: r.digest,
                            activates_at_ms: r.activates_at_ms,
                        },
                    })
                    .map_err(|e| Deny::new(DenyCode::Internal, e.to_string())),
                    Err(d) => Err(d),
                },
                (
                    State::ExpectRelease { client_nonce, server_nonce, kre_attestation_sha384 },
                    Message::Release { cluster_id, key_ids, attestation },
                ) => {
                    let t = Transcript {
                        client_nonce,
                        server_nonce,
                        kre_attestation_sha384,
                        client_attestation_sha384: Sha384::digest(&attestation).into(),
                        request_digest: wire::request_digest(&cluster_id, &key_ids),
                    };
                    release(kre, &server_nonce, t, cluster_id, key_ids, &attestation, env)
                }
                (State::ExpectRelease { server_nonce, .. }, m) => {
                    kre.nonces().forget(&server_nonce);
                    Err(Deny::new(DenyCode::UnexpectedMessage, format!("expected Release, got {}", m.name())))
                }
                (State::ExpectHello, m) => {
                    Err(Deny::new(DenyCode::UnexpectedMessage, format!("expected Hello, got {}", m.name())))
                }
                (State::Done, m) => {
                    Err(Deny::new(DenyCode::UnexpectedMessage, format!("connection finished, got {}", m.name())))
                }
            },
        };
        match result {
            Ok(step) => step,
            Err(d) => {
                self.state = State::Done;
                kre.record_denial(&d, env.now_ms);
                deny_step(d)
            }
        }
    }

    /// A Denied for a frame that could not even be read (bad length prefix, timeout).
    pub fn deny(&mut self, kre: &Kre, code: DenyCode, reason: &str, now_ms: u64) -> Step {
        let mut d = Deny::new(code, reason);
        if let State::ExpectRelease { server_nonce, .. } = &self.state {
            kre.nonces().forget(server_nonce);
            d.stage = Stage::Release;
        }
        self.state = State::Done;
        kre.record_denial(&d, now_ms);
        deny_step(d)
    }

    /// Releases this connection's challenge (the connection closed early).
    pub fn abandon(&mut self, kre: &Kre) {
        if let State::ExpectRelease { server_nonce, .. } = &self.state {
            kre.nonces().forget(server_nonce);
        }
        self.state = State::Done;
    }

    fn hello(&mut self, kre: &Kre, client_nonce: [u8; 32], env: &mut Env<'_>) -> Result<Step, Deny> {
        let mut server_nonce = [0u8; 32];
        (env.rng)(&mut server_nonce);
        if !kre.nonces().issue(server_nonce, env.now_ms) {
            return Err(Deny::new(DenyCode::Busy, "challenge table full; retry shortly"));
        }
        let req = AttestRequest {
            nonce: Some(client_nonce.to_vec()),
            user_data: Some(kre_user_data(&server_nonce).to_vec()),
            public_key: None,
        };
        let kre_attestation = match kre.nsm.attest(&req) {
            Ok(doc) => doc,
            Err(e) => {
                kre.nonces().forget(&server_nonce);
                return Err(Deny::new(DenyCode::Internal, format!("KRE attestation unavailable: {e}")));
            }
        };
        let kre_attestation_sha384 = Sha384::digest(&kre_attestation).into();
        let reply = Message::Challenge { server_nonce, kre_attestation }
            .encode()
            .map_err(|e| Deny::new(DenyCode::Internal, format!("encoding challenge: {e}")))?;
        self.state = State::ExpectRelease { client_nonce, server_nonce, kre_attestation_sha384 };
        Ok(Step { reply, close: false, event: Event::ChallengeIssued })
    }
}

/// Entries after `after_seq` (as many as fit one frame) and, when they reach the head of the
/// chain, a checkpoint over the last one.
fn audit_pull(kre: &Kre, after_seq: u64, max: u16, now_ms: u64) -> Result<Step, Deny> {
    let mut log = kre.audit();
    let wanted = usize::from(max).clamp(1, wire::MAX_AUDIT_BATCH);
    let mut entries = Vec::new();
    let mut size = 0usize;
    let mut last = after_seq;
    for e in log.entries_after(after_seq, wanted) {
        let b = e.bytes();
        // Leave room for the checkpoint (at most 21 KiB) in the 64 KiB frame.
        if size + b.len() + 2 > 40 * 1024 {
            break;
        }
        size += b.len() + 2;
        last = e.seq();
        entries.push(b.to_vec());
    }
    let head = log.status().last_seq;
    let checkpoint = if last == head && head > 0 {
        log.checkpoint(now_ms).map(|c| c.bytes().to_vec()).map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))?
    } else {
        Vec::new()
    };
    let n = entries.len();
    Message::AuditBatch { entries, checkpoint }
        .encode()
        .map(|reply| Step { reply, close: true, event: Event::AuditPulled { entries: n } })
        .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
}

/// The parent has stored entries up to `up_to_seq`: free them from the buffer.
fn audit_ack(kre: &Kre, up_to_seq: u64) -> Result<Step, Deny> {
    let mut log = kre.audit();
    log.ack(up_to_seq).map_err(|e| Deny::new(DenyCode::InvalidRequest, e.to_string()))?;
    let buffered = u32::try_from(log.status().buffered).unwrap_or(u32::MAX);
    Message::AuditAcked { up_to_seq, buffered }
        .encode()
        .map(|reply| Step { reply, close: true, event: Event::AuditAcked { up_to_seq } })
        .map_err(|e| Deny::new(DenyCode::Internal, e.to_string()))
}

fn deny_step(d: Deny) -> Step {
    let reply = Message::Denied { code: d.code, reason: d.reason.clone() }.encode().unwrap_or_default();
    Step {
        reply,
        close: true,
        event: Event::Denied { code: d.code, reason: d.reason, cluster: d.cluster, module_id: d.module_id },
    }
}

fn release(
    kre: &Kre,
    server_nonce: &[u8; 32],
    transcript: Transcript,
    cluster: Id,
    key_ids: Vec<Id>,
    attestation: &[u8],
    env: &mut Env<'_>,
) -> Result<Step, Deny> {
    let policy = kre.policy(env.now_ms);
    let with = |code, reason: String, requester: &Option<Requester>| Deny {
        code,
        reason,
        cluster: Some(cluster.clone()),
        module_id: requester.as_ref().map(|r| r.module_id.clone()),
        stage: Stage::Release,
        requester: requester.clone(),
        key_ids: key_ids.clone(),
    };
    let mut requester: Option<Requester> = None;

    // Fail closed: when the audit buffer has only its reserve left, no release is made.
    if kre.audit().is_full() {
        kre.nonces().forget(server_nonce);
        return Err(with(
            DenyCode::AuditFull,
            "audit buffer full: the parent has not collected the trail; releases are refused until it does".into(),
            &requester,
        ));
    }

    // The attestation document: chain, signature, limits, time.
    let opts = VerifyOptions {
        time: VerifyTime::Now(env.now_ms),
        max_age: kre.config.max_doc_age,
        clock_skew: kre.config.clock_skew,
        allow_debug: policy.allow_debug,
        unknown_fields: UnknownFields::Refuse,
        require_kind: None,
        use_cache: true,
    };
    let att = match kre.verifier.verify(attestation, &opts) {
        Ok(a) => a,
        Err(VerifyError::DebugMode) => {
            kre.nonces().forget(server_nonce);
            return Err(with(
                DenyCode::DebugMode,
                "debug-mode attestation (PCR0-2 zero) not allowed by policy".into(),
                &requester,
            ));
        }
        Err(e) => {
            kre.nonces().forget(server_nonce);
            return Err(with(DenyCode::AttestationInvalid, e.to_string(), &requester));
        }
    };
    requester = Some(Requester::from_verified(&att));

    // Freshness: the document must carry this connection's challenge, unexpired, unused.
    let doc_nonce = att.nonce().unwrap_or_default();
    if doc_nonce != server_nonce.as_slice() {
        let mut nonces = kre.nonces();
        nonces.forget(server_nonce);
        return Err(if nonces.was_used(doc_nonce) {
            with(
                DenyCode::NonceReused,
                "attestation carries a challenge that was already used (replay)".into(),
                &requester,
            )
        } else {
            with(DenyCode::NonceMismatch, "attestation nonce is not this connection's challenge".into(), &requester)
        });
    }
    match kre.nonces().redeem(server_nonce, env.now_ms) {
        Redeem::Ok => {}
        Redeem::Expired => {
            return Err(with(
                DenyCode::ChallengeExpired,
                format!("challenge older than {} ms", millis(kre.config.challenge_ttl)),
                &requester,
            ))
        }
        Redeem::Reused => {
            return Err(with(DenyCode::NonceReused, "challenge already used (replay)".into(), &requester))
        }
        Redeem::Unknown => {
            return Err(with(DenyCode::ChallengeExpired, "challenge no longer known (expired)".into(), &requester))
        }
    }

    // The request binding and the key to wrap to.
    if att.user_data() != Some(transcript.request_digest.as_slice()) {
        return Err(with(
            DenyCode::UserDataMismatch,
            "user_data is not the SHA-384 request digest of this Release".into(),
            &requester,
        ));
    }
    let Some(client_point) = att.public_key() else {
        return Err(with(DenyCode::PublicKeyInvalid, "attestation has no public_key".into(), &requester));
    };
    if kre.crypto.validate_p384_point(client_point).is_err() {
        return Err(with(
            DenyCode::PublicKeyInvalid,
            "public_key is not an uncompressed P-384 point".into(),
            &requester,
        ));
    }

    // Policy.
    let image = match policy::evaluate(&policy, &att, cluster.as_str(), env.now_ms) {
        Ok(image) => image.name.clone(),
        Err(PolicyDenial::UnknownCluster(c)) => {
            return Err(with(DenyCode::UnknownCluster, format!("cluster `{c}` is not in the policy"), &requester))
        }
        Err(PolicyDenial::DebugMode) => {
            return Err(with(DenyCode::DebugMode, "debug-mode attestation not allowed".into(), &requester))
        }
        Err(e) => return Err(with(DenyCode::ImageNotAllowed, e.to_string(), &requester)),
    };

    // Derive and wrap.
    let keks = match kre.keks.read() {
        Ok(k) => k,
        Err(p) => p.into_inner(),
    };
    let Some((version, kek)) = keks.current(&cluster) else {
        return Err(with(DenyCode::Internal, format!("no KEK for cluster `{cluster}`"), &requester));
    };
    let mut data_keys = Vec::with_capacity(key_ids.len());
    for k in &key_ids {
        let dk = keys::derive_data_key(kre.crypto, kek, &cluster, k, version)
            .map_err(|e| with(DenyCode::Internal, format!("deriving keys: {e}"), &requester))?;
        data_keys.push((k.clone(), version, dk));
    }
    drop(keks);
    let (ephemeral_point, wrapped) = keys::wrap(kre.crypto, &transcript, client_point, &data_keys, &mut *env.rng)
        .map_err(|e| with(DenyCode::Internal, format!("wrapping keys: {e}"), &requester))?;
    let reply = Message::Released { ephemeral_point, keys: wrapped }
        .encode()
        .map_err(|e| with(DenyCode::Internal, format!("encoding: {e}"), &requester))?;
    // Recorded before the reply leaves: a release that cannot be recorded is not made.
    let released: Vec<(Id, u32)> = key_ids.iter().map(|k| (k.clone(), version)).collect();
    let allowed = AuditEvent::ReleaseAllowed {
        requester: Requester::from_verified(&att),
        cluster: cluster.clone(),
        keys: released.clone(),
        image: image.clone(),
    };
    if let Err(e) = kre.audit().append(allowed, env.now_ms) {
        return Err(with(DenyCode::AuditFull, format!("not released: {e}"), &requester));
    }
    Ok(Step {
        reply,
        close: true,
        event: Event::Released {
            cluster,
            keys: released,
            image,
            module_id: att.module_id().to_owned(),
            document_sha384: att.document_sha384(),
        },
    })
}
