//! `keygate parent --config FILE`: the parent instance's side as one supervised daemon. It runs,
//! as tasks of one process, the proxy of the release channel (and of the custodian channel
//! when configured), `state sync` following (with a state directory or an etcd store) and
//! `audit pull` following (with an audit directory or store), and with `join_from` the member join of
//! a KRE awaiting its state, with `policy_store` the replay of the kept bundles to a KRE
//! behind its committed policy head (join.rs), each the verb's own code. It decides which
//! tasks run, that a failed step is retried (supervise.rs) rather than ending the daemon, and the stop:
//! on SIGTERM or SIGINT the proxies stop accepting, each task finishes its current step
//! (waited for at most `shutdown_grace`) and the daemon exits 0. With `metrics_listen` it
//! also serves Prometheus metrics and a health check (metrics.rs), asking the KRE's status
//! every `status_every`. It trusts the verbs' code for what each step does; configuration is
//! config.rs.

mod config;
mod join;
mod metrics;
mod supervise;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keygate_enclave::wire::Channel;
use tokio::task::JoinSet;

pub(crate) use self::config::DaemonArgs;
use self::config::{Config, Forward};
use self::metrics::DaemonMetrics;
use self::supervise::{blocking, supervise, Stop};
use crate::backoff::Backoff;
use crate::cmd::audit::Follower;
use crate::cmd::custodian::{sync_once, sync_once_store};
use crate::cmd::member::StateAt;
use crate::cmd::proxy::{self, ProxyConfig};
use crate::cmd::status;
use crate::error::CliError;

/// How long the metrics' status ask waits for the KRE.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// The wait after a task's failed step: 0.2 s doubling to 5 s, ±20 %.
fn task_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 20)
}

pub(crate) fn run(a: DaemonArgs) -> Result<(), CliError> {
    // Only this verb's variables, and only those that are text (`std::env::vars` would panic
    // on another program's non-UTF-8 value).
    let env: std::collections::HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("KEYGATE_PARENT_"))
        .collect();
    let cfg = config::load(&a, &env).map_err(CliError::input)?;
    proxy::check_forward(&cfg.release.listen, Channel::Release)?;
    if let Some(c) = &cfg.custodian {
        proxy::check_forward(&c.listen, Channel::Custodian)?;
    }
    if let Some(m) = &cfg.member {
        proxy::check_forward(&m.listen, Channel::Member)?;
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| CliError::io("runtime", e))?;
    rt.block_on(daemon(cfg))?;
    // A blocking step still waiting on the KRE past the grace is abandoned with the process.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Starts every configured task, waits for SIGTERM or SIGINT, then stops them. Fails only
/// when the metrics address cannot be bound.
async fn daemon(cfg: Config) -> Result<(), CliError> {
    let (stop_tx, stop) = Stop::new();
    let mut tasks = JoinSet::new();
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, &cfg, &stop, &mut tasks).await?),
        None => None,
    };
    let proxy_metrics = metrics.as_ref().map(|m| m.proxy.clone()).unwrap_or_default();
    let forwards = [
        (Channel::Release, Some(cfg.release.clone())),
        (Channel::Custodian, cfg.custodian.clone()),
        (Channel::Member, cfg.member.clone()),
    ];
    for (channel, forward) in forwards {
        if let Some(Forward { listen, to }) = forward {
            let pc =
                ProxyConfig { to, channel, slots: cfg.slots, timeouts: cfg.timeouts, metrics: proxy_metrics.clone() };
            let s = stop.clone();
            let name = match channel {
                Channel::Release => "proxy release",
                Channel::Member => "proxy member",
                _ => "proxy custodian",
            };
            tasks.spawn(supervise(name, stop.clone(), Duration::ZERO, task_backoff(), metrics.clone(), move || {
                let (listen, pc, s) = (listen.clone(), pc.clone(), s.clone());
                async move { proxy::listen_and_serve(&listen, pc, s.wait()).await }
            }));
        }
    }
    // One state sync task, into the directory or the etcd store (the configuration allows one).
    type SyncRound = Arc<dyn Fn() -> Result<String, CliError> + Send + Sync>;
    let kre = cfg.kre_parent.clone();
    let round: Option<SyncRound> = match (cfg.state_dir.clone(), cfg.state_store.clone()) {
        (Some(dir), _) => Some(Arc::new(move || sync_once(&kre, &dir))),
        (None, Some(url)) => Some(Arc::new(move || sync_once_store(&kre, &url))),
        (None, None) => None,
    };
    if let Some(round) = round {
        tasks.spawn(supervise(
            "state sync",
            stop.clone(),
            cfg.sync_every,
            task_backoff(),
            metrics.clone(),
            move || {
                let round = round.clone();
                async move {
                    let line = blocking(move || round()).await?;
                    tracing::info!(task = "state sync", "{line}");
                    Ok(())
                }
            },
        ));
    }
    // Where the stored state is, for the member join.
    let at = match (cfg.state_dir.clone(), cfg.state_store.clone()) {
        (Some(dir), _) => Some(StateAt::Dir(dir)),
        (None, Some(url)) => Some(StateAt::Etcd(url)),
        (None, None) => None,
    };
    // The member join, and the policy replay to a KRE behind its committed head.
    if !cfg.join_from.is_empty() || cfg.policy_store.is_some() {
        let (kre, members, m) = (cfg.kre_parent.clone(), cfg.join_from.clone(), metrics.clone());
        let bundles = cfg.policy_store.clone();
        tasks.spawn(supervise(
            "member join",
            stop.clone(),
            join::JOIN_POLL,
            task_backoff(),
            metrics.clone(),
            move || join::round(kre.clone(), members.clone(), at.clone(), bundles.clone(), m.clone()),
        ));
    }
    let audit = cfg.audit_store.clone().or_else(|| cfg.audit_dir.clone().map(crate::storage::audit::AuditStore::Dir));
    if let Some(store) = audit {
        let follower = Arc::new(Mutex::new(Follower::new(cfg.kre_parent.clone(), store, cfg.audit_follow)));
        tasks.spawn(supervise(
            "audit pull",
            stop.clone(),
            Duration::ZERO,
            task_backoff(),
            metrics.clone(),
            move || {
                let follower = follower.clone();
                async move {
                    let line =
                        blocking(move || follower.lock().unwrap_or_else(PoisonError::into_inner).round()).await?;
                    if let Some(line) = line {
                        tracing::info!(task = "audit pull", "{line}");
                    }
                    Ok(())
                }
            },
        ));
    }
    tracing::info!(tasks = tasks.len(), kre_parent = %cfg.kre_parent, "keygate parent ready");
    proxy::shutdown_signal().await;
    tracing::info!(grace_ms = cfg.shutdown_grace.as_millis(), "stopping: finishing the current steps");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(cfg.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), "tasks still busy after the grace; exiting without them");
        tasks.abort_all();
    }
    tracing::info!("keygate parent stopped");
    Ok(())
}

/// Binds the metrics listener, serves it, and starts the task that asks the KRE's status
/// every `status_every` for the metrics and health.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    cfg: &Config,
    stop: &Stop,
    tasks: &mut JoinSet<()>,
) -> Result<Arc<DaemonMetrics>, CliError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::io(format!("metrics: listening on {addr}"), e))?;
    let metrics = Arc::new(DaemonMetrics::new());
    tracing::info!(addr = %addr, "metrics and health served over HTTP (GET /metrics, /healthz)");
    let served = tokio::spawn(crate::metrics::serve(listener, metrics.clone(), crate::metrics::Limits::default()));
    let s = stop.clone();
    tokio::spawn(async move {
        s.wait().await;
        served.abort();
    });
    let (kre, m) = (cfg.kre_parent.clone(), metrics.clone());
    // The status ask's own failures are the KRE's health, not a task's: never counted as one.
    tasks.spawn(supervise("status", stop.clone(), cfg.status_every, task_backoff(), None, move || {
        let (kre, m) = (kre.clone(), m.clone());
        async move {
            match blocking(move || status::report(&kre, STATUS_TIMEOUT)).await {
                Ok((_, report)) => m.kre_report(&report),
                Err(e) => m.kre_unreachable(&e.message),
            }
            Ok(())
        }
    }));
    Ok(metrics)
}
