//! `keygate proxy`: the parent instance's byte forwarder between the host side and one of the
//! KRE's channels. It sees only attestation documents and ciphertext, and logs connections,
//! never payloads.
//!
//! It forwards one channel to that channel's port only: the release channel (the default),
//! or the custodian channel where the operator opts in. The parent channel is never proxied.
//! As defence in depth (the KRE refuses another channel's frames itself) it reads the first
//! frame's header and refuses a connection whose first frame is not a request of its channel
//! before anything reaches the KRE.

use std::time::Duration;

use keygate_enclave::transport::{self, Addr, BoxStream, Listener};
use keygate_enclave::wire::{self, Channel, DenyCode, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::CliError;

#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    /// Host-side address: unix:PATH or tcp:IP:PORT.
    #[arg(long)]
    listen: Addr,
    /// The KRE's port of that channel: vsock:CID:PORT or unix:PATH.
    #[arg(long)]
    to: Addr,
    /// The channel forwarded: `release` (control planes) or `custodian` (opt-in, on its own
    /// port). The parent channel is never proxied.
    #[arg(long, default_value = "release")]
    channel: Channel,
    /// Seconds a client has to send its first frame's header.
    #[arg(long, default_value_t = 5)]
    first_frame_timeout: u64,
    /// Most concurrent connections.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Seconds a proxied connection may live in all.
    #[arg(long, default_value_t = 60)]
    max_lifetime: u64,
    /// Seconds to connect to the KRE.
    #[arg(long, default_value_t = 5)]
    connect_timeout: u64,
}

/// Proxy limits.
#[derive(Debug, Clone)]
pub(crate) struct ProxyConfig {
    pub(crate) to: Addr,
    pub(crate) channel: Channel,
    pub(crate) first_frame_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_lifetime: Duration,
    pub(crate) connect_timeout: Duration,
}

/// Forwards connections from `listener` to `cfg.to` until `shutdown` resolves.
pub(crate) async fn serve(listener: Listener, cfg: ProxyConfig, shutdown: impl std::future::Future<Output = ()>) {
    let max = cfg.max_connections;
    let serve_one = |client: BoxStream, peer: String| {
        let cfg = cfg.clone();
        async move { forward(client, &peer, &cfg).await }
    };
    // Beyond the limit the connection is closed at once (the proxy speaks no protocol).
    let refuse = |client: BoxStream, _peer: String| async move { drop(client) };
    transport::accept_loop(&listener, max, shutdown, serve_one, refuse).await;
}

/// Reads the first frame's length prefix and its version and type bytes; `Err` with the
/// refusal to answer when they are not a request of `channel`.
async fn first_header(client: &mut BoxStream, cfg: &ProxyConfig) -> Result<[u8; 6], Option<(DenyCode, String)>> {
    let mut head = [0u8; 6];
    match tokio::time::timeout(cfg.first_frame_timeout, client.read_exact(&mut head)).await {
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
                tracing::warn!(%peer, channel = %cfg.channel, %code, %reason, "first frame refused; not forwarded");
                let denied = Message::Denied { code, reason }.encode().unwrap_or_default();
                let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&denied)).await;
            }
            return;
        }
    };
    let mut upstream = match transport::connect(&cfg.to, cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, to = %cfg.to, error = %e, "cannot reach the KRE");
            return;
        }
    };
    tracing::info!(%peer, to = %cfg.to, channel = %cfg.channel, "connection opened");
    if let Err(e) = upstream.write_all(&head).await {
        tracing::info!(%peer, error = %e, "connection ended with an error");
        return;
    }
    match tokio::time::timeout(cfg.max_lifetime, tokio::io::copy_bidirectional(&mut client, &mut upstream)).await {
        Ok(Ok((up, down))) => tracing::info!(%peer, bytes_to_kre = up, bytes_from_kre = down, "connection closed"),
        Ok(Err(e)) => tracing::info!(%peer, error = %e, "connection ended with an error"),
        Err(_) => tracing::warn!(%peer, "connection exceeded its lifetime; closed"),
    }
}

pub(crate) fn run(a: ProxyArgs) -> Result<(), CliError> {
    if matches!(a.listen, Addr::Vsock { .. }) {
        return Err(CliError::input("--listen is the host side: unix:PATH or tcp:IP:PORT"));
    }
    if a.channel == Channel::Parent {
        return Err(CliError::input(
            "the parent channel is never proxied: it serves the parent's own daemon on the parent instance",
        ));
    }
    let cfg = ProxyConfig {
        to: a.to,
        channel: a.channel,
        first_frame_timeout: Duration::from_secs(a.first_frame_timeout.max(1)),
        max_connections: a.max_connections,
        max_lifetime: Duration::from_secs(a.max_lifetime),
        connect_timeout: Duration::from_secs(a.connect_timeout),
    };
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(async move {
        let listener =
            Listener::bind(&a.listen).await.map_err(|e| CliError::io(format!("listening on {}", a.listen), e))?;
        tracing::info!(listen = %a.listen, to = %cfg.to, channel = %cfg.channel, "keygate proxy ready");
        serve(listener, cfg, shutdown_signal()).await;
        Ok(())
    })
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
