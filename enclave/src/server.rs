//! The thin tokio server around the protocol core: accepts connections, reads frames with
//! time limits, hands them to [`crate::core::Connection`], writes the replies.
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

use crate::core::{Connection, Env, Event, Kre};
use crate::io::{read_request, write_frame, ByteBudget, FrameError};
use crate::transport::{accept_loop, BoxStream, Listener};
use crate::wire::{self, Channel, DenyCode, Message};

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
    /// (see [`crate::io::read_request`]). The parent and custodian channels each have their
    /// own budget, enough for a largest frame on every one of their connections, so that a
    /// flood on the release port can never make a policy push or an unseal share wait.
    pub bytes_in_flight: usize,
    /// Total lifetime of a connection.
    pub connection_timeout: Duration,
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
    let mut tasks = tokio::task::JoinSet::new();
    let mut inline = None;
    for (channel, listener) in listeners {
        let bytes = match channel {
            Channel::Release => cfg.bytes_in_flight,
            Channel::Parent | Channel::Custodian => cfg.max_admin_connections.saturating_mul(wire::MAX_FRAME),
        };
        let budget = ByteBudget::new(bytes);
        let run = accept_channel(channel, listener, kre.clone(), cfg.clone(), budget, stopped.clone());
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

/// One channel's accept loop, until `stopped` turns true.
async fn accept_channel(
    channel: Channel,
    listener: Listener,
    kre: Arc<Kre>,
    cfg: ServerConfig,
    budget: ByteBudget,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let max = if channel == Channel::Release { cfg.max_connections } else { cfg.max_admin_connections };
    let serve_one = |stream: BoxStream, peer: String| {
        let (kre, cfg, budget) = (kre.clone(), cfg.clone(), budget.clone());
        async move { handle(stream, &peer, channel, &kre, &cfg, &budget).await }
    };
    let refuse = |mut stream: BoxStream, _peer: String| async move {
        let busy = Message::Denied { code: DenyCode::Busy, reason: "connection limit reached; retry shortly".into() };
        let _ = write_frame(&mut stream, &busy.encode().unwrap_or_default(), Duration::from_secs(1)).await;
    };
    let until = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let waiting = budget.waiting().clone();
    accept_loop(&listener, max, until, serve_one, refuse, move || waiting.evict_oldest(false)).await;
}

async fn handle(
    mut stream: BoxStream,
    peer: &str,
    channel: Channel,
    kre: &Kre,
    cfg: &ServerConfig,
    budget: &ByteBudget,
) {
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
                let mut rng = os_random;
                conn.on_frame(kre, &req.body, &mut Env { now_ms: now_ms(), rng: &mut rng })
            }
            Err(FrameError::Closed) => {
                conn.abandon(kre);
                tracing::debug!(%peer, "connection closed by peer");
                return;
            }
            Err(FrameError::Timeout) => conn.deny(kre, DenyCode::Timeout, "no complete frame in time", now_ms()),
            Err(FrameError::Length(e)) => conn.deny(kre, DenyCode::FrameTooLarge, &e.to_string(), now_ms()),
            Err(e @ FrameError::TooLargeForType { .. }) => {
                conn.deny(kre, DenyCode::FrameTooLarge, &e.to_string(), now_ms())
            }
            Err(e @ (FrameError::Busy | FrameError::Evicted)) => {
                conn.deny(kre, DenyCode::Busy, &e.to_string(), now_ms())
            }
            Err(FrameError::Io(e)) => {
                conn.abandon(kre);
                tracing::debug!(%peer, error = %e, "connection error");
                return;
            }
        };
        log_event(peer, &step.event);
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
        Event::State { step, generation } => tracing::info!(%peer, step, generation, "sealed state step"),
        Event::UnsealOffered => tracing::info!(%peer, "unseal offer sent to a custodian"),
        Event::UnsealShareAccepted { have, need, serving } => {
            tracing::info!(%peer, have, need, serving, "custodian share accepted");
        }
        Event::PolicyAccepted { version, digest, activates_at_ms } => {
            tracing::info!(%peer, version, digest = %hex::encode(digest), activates_at_ms, "policy bundle accepted");
        }
        Event::Denied { code, reason, cluster, module_id } => {
            tracing::warn!(%peer, %code, %reason, cluster = ?cluster.as_ref().map(|c| c.as_str()), module_id = ?module_id, "request denied");
        }
    }
}
