//! `keygate proxy`: the parent instance's byte forwarder between the host side and one of the
//! KRE's channels. It sees only attestation documents and ciphertext, and logs connections,
//! never payloads.
//!
//! It forwards one channel to that channel's port only: the release channel (the default),
//! or the custodian or member channel where the operator opts in. The parent channel is never proxied.
//! As defence in depth (the KRE refuses another channel's frames itself) it reads the first
//! frame's header and refuses a connection whose first frame is not a request of its channel
//! before anything reaches the KRE.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate_enclave::net::transport::{self, Addr, BoxStream, Listener};
use keygate_enclave::wire::{self, Channel, DenyCode, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::CliError;

mod stats;

pub(crate) use self::stats::ProxyMetrics;

#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    /// Host-side address: unix:PATH, tcp:IP:PORT or tcp:HOST:PORT (a DNS name, resolved when
    /// binding, e.g. tcp:localhost:8443).
    #[arg(long)]
    listen: Addr,
    /// The KRE's port of that channel: vsock:CID:PORT, unix:PATH, tcp:IP:PORT or tcp:HOST:PORT
    /// (resolved at each connect).
    #[arg(long)]
    to: Addr,
    /// The channel forwarded: `release` (control planes), `custodian` or `member` (opt-in, on its own
    /// port). The parent channel is never proxied.
    #[arg(long, default_value = "release")]
    channel: Channel,
    /// How long a client has to send its first frame's header (a duration, e.g. 5s or 500ms;
    /// at least 1s).
    #[arg(long, default_value = "5s", value_parser = super::args::parse_duration, value_name = "DURATION")]
    first_frame_timeout: Duration,
    /// Most concurrent connections.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most concurrent connections from one source (an IP address; a Unix peer's uid): one
    /// host cannot take every slot.
    #[arg(long, default_value_t = 64)]
    max_per_source: usize,
    /// How long a proxied connection may live in all (a duration, e.g. 60s or 10m).
    #[arg(long, default_value = "60s", value_parser = super::args::parse_duration, value_name = "DURATION")]
    max_lifetime: Duration,
    /// How long to connect to the KRE (a duration, e.g. 5s).
    #[arg(long, default_value = "5s", value_parser = super::args::parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,
}

/// Where the proxy forwards, which channel, and its limits.
#[derive(Debug, Clone)]
pub(crate) struct ProxyConfig {
    pub(crate) to: Addr,
    pub(crate) channel: Channel,
    pub(crate) slots: Slots,
    pub(crate) timeouts: Timeouts,
    /// What it counts (registered by the daemon; the one-off verb keeps them unread).
    pub(crate) metrics: ProxyMetrics,
}

/// Most concurrent connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slots {
    /// In all.
    pub(crate) total: usize,
    /// From one source (at least 1).
    pub(crate) per_source: usize,
}

/// How long each step of a proxied connection may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// For the client's first frame header.
    pub(crate) first_frame: Duration,
    /// To connect to the KRE.
    pub(crate) connect: Duration,
    /// For the whole connection.
    pub(crate) lifetime: Duration,
}

/// Forwards connections from `listener` to `cfg.to` until `shutdown` resolves.
pub(crate) async fn serve(listener: Listener, cfg: ProxyConfig, shutdown: impl std::future::Future<Output = ()>) {
    let max = cfg.slots.total;
    let sources = Arc::new(Sources::default());
    let serve_one = |client: BoxStream, peer: String| {
        let (cfg, sources) = (cfg.clone(), sources.clone());
        async move {
            let Some(_held) = sources.enter(&peer, cfg.slots.per_source) else {
                tracing::warn!(%peer, max = cfg.slots.per_source, "too many connections from this source; closed");
                cfg.metrics.refused(cfg.channel, "per_source_limit");
                return;
            };
            tracing::debug!(%peer, "connection admitted");
            let _open = cfg.metrics.open(cfg.channel);
            forward(client, &peer, &cfg).await
        }
    };
    // Beyond the limit the connection is closed at once (the proxy speaks no protocol).
    let metrics = (cfg.metrics.clone(), cfg.channel);
    let refuse = move |client: BoxStream, _peer: String| {
        metrics.0.refused(metrics.1, "connection_limit");
        async move { drop(client) }
    };
    // No eviction here: one source is held to its share by the per-source limit, and the KRE
    // evicts the reads that wait longest when its own limits are reached.
    transport::accept_loop(&listener, max, shutdown, serve_one, refuse, || false).await;
}

/// Open connections per source. A source is what identifies a peer host: the IP address of a
/// TCP peer (not its port), the uid of a Unix peer.
#[derive(Debug, Default)]
struct Sources(Mutex<HashMap<String, usize>>);

/// One connection counted against its source until dropped.
struct Held<'a> {
    sources: &'a Sources,
    key: String,
}

impl Sources {
    fn enter(&self, peer: &str, max: usize) -> Option<Held<'_>> {
        let key = source_of(peer);
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held { sources: self, key })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut map = self.sources.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The source of a peer label from the transport (`tcp IP:PORT`, `unix pid=… uid=N`).
fn source_of(peer: &str) -> String {
    if let Some(addr) = peer.strip_prefix("tcp ") {
        if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
            return a.ip().to_string();
        }
    }
    if let Some(uid) = peer.split_whitespace().find(|w| w.starts_with("uid=")) {
        return format!("unix {uid}");
    }
    peer.to_owned()
}

/// Reads the first frame's length prefix and its version and type bytes; `Err` with the
/// refusal to answer when they are not a request of `channel`.
async fn first_header(client: &mut BoxStream, cfg: &ProxyConfig) -> Result<[u8; 6], Option<(DenyCode, String)>> {
    let mut head = [0u8; 6];
    match tokio::time::timeout(cfg.timeouts.first_frame, client.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err(None),
        Err(_) => return Err(Some((DenyCode::Timeout, "no first frame in time".into()))),
    }
    let len = [head[0], head[1], head[2], head[3]];
    if let Err(e) = wire::frame_len(len) {
        return Err(Some((DenyCode::FrameTooLarge, e.to_string())));
    }
    match Channel::of_request_type(head[5]) {
        Some(c) if c == cfg.channel => Ok(head),
        Some(c) => Err(Some((
            DenyCode::WrongChannel,
            format!("this proxy forwards the {} channel; the first frame is of the {c} channel", cfg.channel),
        ))),
        None => Err(Some((
            DenyCode::WrongChannel,
            format!(
                "this proxy forwards the {} channel; frame type {} is not one of its requests",
                cfg.channel, head[5]
            ),
        ))),
    }
}

async fn forward(mut client: BoxStream, peer: &str, cfg: &ProxyConfig) {
    let head = match first_header(&mut client, cfg).await {
        Ok(h) => h,
        Err(refusal) => {
            if let Some((code, reason)) = refusal {
                cfg.metrics.refused(cfg.channel, code.as_str());
                tracing::warn!(%peer, channel = %cfg.channel, %code, %reason, "first frame refused; not forwarded");
                let denied = Message::Denied { code, reason }.encode().unwrap_or_default();
                let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&denied)).await;
            }
            return;
        }
    };
    let mut upstream = match transport::connect(&cfg.to, cfg.timeouts.connect).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, to = %cfg.to, error = %e, "cannot reach the KRE");
            cfg.metrics.refused(cfg.channel, "kre_unreachable");
            return;
        }
    };
    tracing::info!(%peer, to = %cfg.to, channel = %cfg.channel, "connection opened");
    if let Err(e) = upstream.write_all(&head).await {
        tracing::info!(%peer, error = %e, "connection ended with an error");
        return;
    }
    match tokio::time::timeout(cfg.timeouts.lifetime, tokio::io::copy_bidirectional(&mut client, &mut upstream)).await {
        Ok(Ok((up, down))) => tracing::info!(%peer, bytes_to_kre = up, bytes_from_kre = down, "connection closed"),
        Ok(Err(e)) => tracing::info!(%peer, error = %e, "connection ended with an error"),
        Err(_) => tracing::warn!(%peer, "connection exceeded its lifetime; closed"),
    }
}

impl Slots {
    /// At least one connection per source.
    pub(crate) fn new(total: usize, per_source: usize) -> Self {
        Self { total, per_source: per_source.max(1) }
    }
}

impl Timeouts {
    /// A client has at least a second for its first frame's header.
    pub(crate) fn new(first_frame: Duration, connect: Duration, lifetime: Duration) -> Self {
        Self { first_frame: first_frame.max(Duration::from_secs(1)), connect, lifetime }
    }
}

/// Refuses a host side on vsock and the parent channel (never proxied).
pub(crate) fn check_forward(listen: &Addr, channel: Channel) -> Result<(), CliError> {
    if matches!(listen, Addr::Vsock { .. }) {
        return Err(CliError::input("--listen is the host side: unix:PATH, tcp:IP:PORT or tcp:HOST:PORT"));
    }
    if channel == Channel::Parent {
        return Err(CliError::input(
            "the parent channel is never proxied: it serves the parent's own daemon on the parent instance",
        ));
    }
    Ok(())
}

/// Binds `listen` and forwards its connections to `cfg.to` until `shutdown` resolves: the
/// `proxy` verb and each proxy task of `keygate parent`.
pub(crate) async fn listen_and_serve(
    listen: &Addr,
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CliError> {
    let listener = Listener::bind(listen).await.map_err(|e| CliError::io(format!("listening on {listen}"), e))?;
    tracing::info!(%listen, to = %cfg.to, channel = %cfg.channel, "keygate proxy ready");
    serve(listener, cfg, shutdown).await;
    Ok(())
}

pub(crate) fn run(a: ProxyArgs) -> Result<(), CliError> {
    check_forward(&a.listen, a.channel)?;
    let cfg = ProxyConfig {
        to: a.to,
        channel: a.channel,
        metrics: ProxyMetrics::default(),
        slots: Slots::new(a.max_connections, a.max_per_source),
        timeouts: Timeouts::new(a.first_frame_timeout, a.connect_timeout, a.max_lifetime),
    };
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(listen_and_serve(&a.listen, cfg, shutdown_signal()))
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_is_a_host_side_vsock_and_the_parent_channel_are_not() {
        let host: Addr = "tcp:localhost:8443".parse().expect("a host name");
        assert!(check_forward(&host, Channel::Release).is_ok());
        assert!(check_forward(&"tcp:127.0.0.1:1".parse().expect("ip"), Channel::Custodian).is_ok());
        let err = check_forward(&"vsock:3:5000".parse().expect("vsock"), Channel::Release).expect_err("vsock");
        assert!(err.message.contains("tcp:HOST:PORT"), "{}", err.message);
        assert!(check_forward(&host, Channel::Parent).is_err());
    }

    #[test]
    fn a_source_is_the_ip_or_the_uid_not_the_port_or_pid() {
        assert_eq!(source_of("tcp 10.0.0.5:40001"), "10.0.0.5");
        assert_eq!(source_of("tcp [::1]:9"), "::1");
        assert_eq!(source_of("unix pid=42 uid=1000"), "unix uid=1000");
        assert_eq!(source_of("unix pid=43 uid=1000"), source_of("unix pid=42 uid=1000"));
        assert_eq!(source_of("unix uid=1000"), source_of("unix pid=42 uid=1000"));
        assert_eq!(source_of("vsock cid=3 port=9"), "vsock cid=3 port=9");
    }

    #[test]
    fn each_source_has_its_own_limit_released_on_drop() {
        let s = Sources::default();
        let a: Vec<_> = (0..3).map(|p| s.enter(&format!("tcp 10.0.0.1:{p}"), 3).expect("room")).collect();
        assert!(s.enter("tcp 10.0.0.1:99", 3).is_none(), "a fourth from the same host");
        assert!(s.enter("tcp 10.0.0.2:1", 3).is_some(), "another host is not affected");
        drop(a);
        assert!(s.enter("tcp 10.0.0.1:99", 3).is_some());
    }
}
