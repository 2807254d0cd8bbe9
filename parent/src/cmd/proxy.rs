//! `keygate proxy`: the parent instance's byte forwarder between the host side and the KRE.
//! It sees only attestation documents and ciphertext, and logs connections, never payloads.

use std::time::Duration;

use keygate_enclave::transport::{self, Addr, BoxStream, Listener};

use crate::CliError;

#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    /// Host-side address: unix:PATH or tcp:IP:PORT.
    #[arg(long)]
    listen: Addr,
    /// The KRE: vsock:CID:PORT or unix:PATH.
    #[arg(long)]
    to: Addr,
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

async fn forward(mut client: BoxStream, peer: &str, cfg: &ProxyConfig) {
    let mut upstream = match transport::connect(&cfg.to, cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, to = %cfg.to, error = %e, "cannot reach the KRE");
            return;
        }
    };
    tracing::info!(%peer, to = %cfg.to, "connection opened");
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
    let cfg = ProxyConfig {
        to: a.to,
        max_connections: a.max_connections,
        max_lifetime: Duration::from_secs(a.max_lifetime),
        connect_timeout: Duration::from_secs(a.connect_timeout),
    };
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(async move {
        let listener =
            Listener::bind(&a.listen).await.map_err(|e| CliError::io(format!("listening on {}", a.listen), e))?;
        tracing::info!(listen = %a.listen, to = %cfg.to, "keygate proxy ready");
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
