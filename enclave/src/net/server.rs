//! The thin tokio server around the protocol core: accepts connections, reads frames with
//! time limits, hands them to [`crate::kre::Connection`], writes the replies.
//!
//! One listener per channel (release, parent, custodian), each with its own connection slots:
//! a flood on the release port cannot take the parent's or the custodians' slots. Limits: at
//! most `max_connections` release connections and `max_admin_connections` on each other
//! channel at once (further clients get a `Busy` denial and are closed at once), each frame
//! must arrive within `frame_timeout`, and each connection lives at most
//! `connection_timeout` in all. A slow or half-open client therefore holds a connection slot
//! for a bounded time and cannot hold the service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kre::{Connection, Env, Event, Kre, Step};
use crate::net::io::{read_request, write_frame, ByteBudget, FrameError};
use crate::net::transport::{accept_loop, BoxStream, Listener};
use crate::wire::{self, Channel, DenyCode, Message, Unreadable};

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Concurrent connections on the release channel.
    pub max_connections: usize,
    /// Concurrent connections on each of the parent and custodian channels.
    pub max_admin_connections: usize,
    /// Time allowed for one complete frame.
    pub frame_timeout: Duration,
    /// Time allowed for a connection's first complete frame (shorter: an idle connection
    /// gives its slot back quickly).
    pub first_frame_timeout: Duration,
    /// Bytes of request bodies held at once across every connection of the release channel
    /// (see [`crate::net::io::read_request`]). The parent and custodian channels each have their
    /// own budget, enough for a largest frame on every one of their connections, so that a
    /// flood on the release port can never make a policy push or an unseal share wait.
    pub bytes_in_flight: usize,
    /// Total lifetime of a connection.
    pub connection_timeout: Duration,
    /// How long a step whose audit entry must be stored first (a release, an accepted policy,
    /// a state or unseal step) waits for the parent's acknowledgement before its answer is
    /// withheld (`audit_unacknowledged`).
    pub audit_ack_timeout: Duration,
    /// Whether answers wait for their audit entry to be stored (always, except in the
    /// development binary's `--bench-without-write-ahead`, which measures what it costs).
    pub write_ahead: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_admin_connections: 64,
            frame_timeout: Duration::from_secs(10),
            first_frame_timeout: Duration::from_secs(2),
            bytes_in_flight: 16 * 1024 * 1024,
            connection_timeout: Duration::from_secs(30),
            audit_ack_timeout: Duration::from_secs(2),
            write_ahead: true,
        }
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn os_random(buf: &mut [u8]) {
    use rand_core::RngCore;
    rand_core::OsRng.fill_bytes(buf);
}

/// Serves every channel's listener until `shutdown` resolves. The release channel's accept
/// loop runs on the caller's task (the runtime's main thread under `block_on`), so that
/// accepting never waits behind connections busy in the NSM; the others are spawned.
pub async fn serve(
    listeners: Vec<(Channel, Listener)>,
    kre: Arc<Kre>,
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sync = Arc::new(AuditSync::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut inline = None;
    for (channel, listener) in listeners {
        let bytes = match channel {
            Channel::Release => cfg.bytes_in_flight,
            Channel::Parent | Channel::Custodian | Channel::Member => {
                cfg.max_admin_connections.saturating_mul(wire::MAX_FRAME)
            }
        };
        let budget = ByteBudget::new(bytes);
        let shared = Shared { kre: kre.clone(), cfg: cfg.clone(), budget, sync: sync.clone() };
        let run = accept_channel(channel, listener, shared, stopped.clone());
        if channel == Channel::Release && inline.is_none() {
            inline = Some(run);
        } else {
            tasks.spawn(run);
        }
    }
    // Dropping the release loop at shutdown stops its accepting (and unlinks its socket).
    let release = async move {
        match inline {
            Some(run) => run.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = release => {}
    }
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Wakes the parent's audit follower when entries are appended, and the steps waiting for
/// their entries to be stored when the parent acknowledges.
#[derive(Debug, Default)]
struct AuditSync {
    appended: tokio::sync::Notify,
    acked: tokio::sync::Notify,
}

/// What every connection of a listener shares.
#[derive(Debug, Clone)]
struct Shared {
    kre: Arc<Kre>,
    cfg: ServerConfig,
    budget: ByteBudget,
    sync: Arc<AuditSync>,
}

/// Waits until `ready()` holds or `limit` passes (woken by `notify`, and every 50 ms in any
/// case); returns whether it holds.
async fn wait_until(notify: &tokio::sync::Notify, limit: Duration, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if ready() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), woken).await;
    }
}

/// Whether a step's answer may leave the KRE only once its audit entry is stored by the
/// parent: everything that hands out keys or changes what the KRE will do.
fn write_ahead(event: &Event) -> bool {
    match event {
        Event::Released { .. } | Event::PolicyAccepted { .. } | Event::UnsealShareAccepted { .. } => true,
        Event::State { step, .. } => *step != "poll",
        Event::ChallengeIssued
        | Event::AuditPulled { .. }
        | Event::AuditAcked { .. }
        | Event::StatusReported
        | Event::PolicyDurable { .. }
        | Event::PolicyTimestamp { .. }
        | Event::UnsealOffered
        | Event::Denied { .. } => false,
    }
}

/// One channel's accept loop, until `stopped` turns true.
async fn accept_channel(
    channel: Channel,
    listener: Listener,
    shared: Shared,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let max = if channel == Channel::Release { cfg.max_connections } else { cfg.max_admin_connections };
    let waiting = shared.budget.waiting().clone();
    let serve_one = |stream: BoxStream, peer: String| {
        let shared = shared.clone();
        async move { handle(stream, &peer, channel, &shared).await }
    };
    let kre = shared.kre.clone();
    let refuse = move |mut stream: BoxStream, _peer: String| {
        let reason = "connection limit reached; retry shortly";
        kre.count_answer(&Event::Denied {
            code: DenyCode::Busy,
            reason: reason.into(),
            cluster: None,
            module_id: None,
        });
        async move {
            let busy = Message::Denied { code: DenyCode::Busy, reason: reason.into() };
            let _ = write_frame(&mut stream, &busy.encode().unwrap_or_default(), Duration::from_secs(1)).await;
        }
    };
    let until = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    accept_loop(&listener, max, until, serve_one, refuse, move || waiting.evict_oldest(false)).await;
}

async fn handle(mut stream: BoxStream, peer: &str, channel: Channel, shared: &Shared) {
    let Shared { kre, cfg, budget, sync } = shared;
    let deadline = Instant::now() + cfg.connection_timeout;
    let mut conn = Connection::new(channel);
    tracing::debug!(%peer, %channel, "connection opened");
    let mut first = true;
    while !conn.is_done() {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame_limit = if first { cfg.first_frame_timeout } else { cfg.frame_timeout };
        first = false;
        let step = match read_request(&mut stream, left.min(frame_limit), budget, |v, t| conn.admit(v, t)).await {
            Ok(req) => {
                if req.body.get(1) == Some(&wire::ty::AUDIT_WAIT) {
                    if let Ok(Message::AuditWait { after_seq, wait_ms, .. }) = Message::decode(&req.body) {
                        let limit = Duration::from_millis(u64::from(wait_ms.min(wire::MAX_AUDIT_WAIT_MS)));
                        wait_until(&sync.appended, limit, || kre.audit().status().last_seq > after_seq).await;
                    }
                }
                // A commit appends its entry, so waiting for appends sees it.
                if req.body.get(1) == Some(&wire::ty::POLICY_DURABLE_WAIT) {
                    if let Ok(Message::PolicyDurableWait { version, wait_ms, .. }) = Message::decode(&req.body) {
                        let limit = Duration::from_millis(u64::from(wait_ms.min(wire::MAX_DURABLE_WAIT_MS)));
                        wait_until(&sync.appended, limit, || kre.durable_answer_ready(version)).await;
                    }
                }
                let mut rng = os_random;
                conn.on_frame(kre, &req.body, &mut Env { now_ms: now_ms(), rng: &mut rng })
            }
            Err(FrameError::Closed) => {
                conn.abandon(kre);
                tracing::debug!(%peer, "connection closed by peer");
                return;
            }
            Err(FrameError::Timeout) => conn.deny(kre, Unreadable::Timeout, now_ms()),
            Err(FrameError::Refused(why)) => conn.deny(kre, why, now_ms()),
            Err(FrameError::Io(e)) => {
                conn.abandon(kre);
                tracing::debug!(%peer, error = %e, "connection error");
                return;
            }
        };
        sync.appended.notify_waiters();
        if matches!(step.event, Event::AuditAcked { .. }) {
            sync.acked.notify_waiters();
        }
        let step =
            if cfg.write_ahead && write_ahead(&step.event) { stored_first(step, kre, cfg, sync).await } else { step };
        log_event(peer, &step.event);
        kre.count_answer(&step.event);
        if let Err(e) = write_frame(&mut stream, &step.reply, cfg.frame_timeout).await {
            tracing::debug!(%peer, error = %e, "could not send reply");
            conn.abandon(kre);
            return;
        }
        if step.close {
            break;
        }
    }
}

/// The step's answer once the parent has acknowledged storing every entry up to the head it
/// left (its own among them); otherwise, after `audit_ack_timeout`, a retryable refusal and
/// the answer is never sent. The entry stays in the trail: it records a decision whose answer
/// may have been withheld, never an answer that left unrecorded.
async fn stored_first(step: Step, kre: &Kre, cfg: &ServerConfig, sync: &AuditSync) -> Step {
    let need = kre.audit().status().last_seq;
    if wait_until(&sync.acked, cfg.audit_ack_timeout, || kre.audit().status().acked_up_to >= need).await {
        return step;
    }
    let reason = format!(
        "the parent has not stored this step's audit entry (seq {need}) within {} ms; the answer is withheld; retry",
        cfg.audit_ack_timeout.as_millis()
    );
    kre.count_withheld();
    let reply =
        Message::Denied { code: DenyCode::AuditUnacknowledged, reason: reason.clone() }.encode().unwrap_or_default();
    Step {
        reply,
        close: true,
        event: Event::Denied { code: DenyCode::AuditUnacknowledged, reason, cluster: None, module_id: None },
    }
}

fn log_event(peer: &str, event: &Event) {
    match event {
        Event::ChallengeIssued => tracing::debug!(%peer, "challenge issued"),
        Event::Released { cluster, keys, image, module_id, document_sha384 } => {
            let keys: Vec<String> = keys.iter().map(|(k, v)| format!("{k}@v{v}")).collect();
            tracing::info!(%peer, %cluster, keys = %keys.join(","), %image, %module_id, document = %hex::encode(document_sha384), "keys released");
        }
        Event::AuditPulled { entries } => tracing::debug!(%peer, entries, "audit entries pulled"),
        Event::AuditAcked { up_to_seq } => tracing::info!(%peer, up_to_seq, "audit entries acknowledged"),
        Event::StatusReported => tracing::debug!(%peer, "status reported"),
        Event::PolicyDurable { version, generation } => {
            tracing::info!(%peer, version, generation, "policy durable: receipt sent");
        }
        Event::PolicyTimestamp { version, issued_ms } => {
            tracing::debug!(%peer, version, issued_ms, "policy timestamp held");
        }
        Event::State { step, generation } => tracing::info!(%peer, step, generation, "sealed state step"),
        Event::UnsealOffered => tracing::info!(%peer, "unseal offer sent to a custodian"),
        Event::UnsealShareAccepted { have, need, serving } => {
            tracing::info!(%peer, have, need, serving, "custodian share accepted");
        }
        Event::PolicyAccepted { version, digest, activates_at_ms } => {
            tracing::info!(%peer, version, digest = %hex::encode(digest), activates_at_ms, "policy bundle accepted");
        }
        Event::Denied { code, reason, cluster, module_id } => {
            tracing::warn!(%peer, %code, %reason, cluster = cluster.as_ref().map(|c| c.as_str()), module_id = module_id.as_deref(), "request denied");
        }
    }
}
