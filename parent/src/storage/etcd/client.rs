//! A thin, typed etcd v3 client over gRPC (tonic, the minimal `proto/etcd` API): single-key
//! Range (and the keys of a range, bounded in count), Txn with compares, and a one-key Watch, each bounded in time and in response size,
//! failing over between the endpoints of an `etcd://` URL.
//!
//! What it decides: which endpoint to ask (the one that answered last, then the next ones in
//! order), when to give up (one deadline per operation, shared by its attempts; a connect and
//! one endpoint's answer have their own shorter bounds, so a member that stops answering is
//! left for the next), which failures are worth another endpoint (the transport's and
//! `Unavailable`: refused, reset, no leader) and which are the answer (every other status). What it trusts: nothing
//! etcd says beyond the protobuf decoding; answers larger than [`Limits::max_response`] are
//! refused by the decoder before they are allocated, and server messages are shortened before
//! they are kept. Plaintext HTTP/2 only (no TLS, no etcd authentication).
//!
//! Synchronous on the outside: each client owns a current-thread tokio runtime, so the
//! synchronous state sync (and the daemon's blocking pool) can use it like the KRE client.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use super::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, RangeRequest, RangeResponse, TxnRequest,
    TxnResponse, WatchCreateRequest, WatchRequest,
};
use super::pb::mvccpb::{event::EventType, KeyValue};

/// The most endpoints one URL may name.
pub(crate) const MAX_ENDPOINTS: usize = 16;
/// The longest key prefix.
pub(crate) const MAX_PREFIX: usize = 128;
/// The prefix when the URL names none.
pub(crate) const DEFAULT_PREFIX: &str = "/keygate";
/// The longest server message kept in an error.
const MAX_MESSAGE: usize = 200;

/// `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`: the endpoints and the key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EtcdUrl {
    /// `host:port` of each endpoint, in the order given.
    pub(crate) endpoints: Vec<String>,
    /// The key prefix: starts with `/`, no trailing `/`.
    pub(crate) prefix: String,
}

/// Why an `etcd://` URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EtcdUrlError {
    #[error("not an etcd URL: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]")]
    NotEtcd,
    #[error("the etcd URL names no endpoint")]
    NoEndpoint,
    #[error("the etcd URL names {0} endpoints; at most {MAX_ENDPOINTS}")]
    TooManyEndpoints(usize),
    #[error(
        "`{0}` is not an etcd endpoint: expected HOST:PORT (a name, an IPv4 address or [IPv6], and a port 1-65535)"
    )]
    BadEndpoint(String),
    #[error("the etcd key prefix must be at most {MAX_PREFIX} bytes of letters, digits and `/._-`, without `//` or a trailing `/`")]
    BadPrefix,
}

fn valid_endpoint(ep: &str) -> bool {
    let Some((host, port)) = ep.rsplit_once(':') else { return false };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    port_ok && host_ok
}

impl FromStr for EtcdUrl {
    type Err = EtcdUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.trim().strip_prefix("etcd://").ok_or(EtcdUrlError::NotEtcd)?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_PREFIX),
        };
        if hosts.is_empty() {
            return Err(EtcdUrlError::NoEndpoint);
        }
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(EtcdUrlError::TooManyEndpoints(endpoints.len()));
        }
        if let Some(bad) = endpoints.iter().find(|e| !valid_endpoint(e)) {
            return Err(EtcdUrlError::BadEndpoint(bad.chars().take(80).collect()));
        }
        let prefix_ok = prefix.len() <= MAX_PREFIX
            && prefix.len() > 1
            && !prefix.ends_with('/')
            && !prefix.contains("//")
            && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        if !prefix_ok {
            return Err(EtcdUrlError::BadPrefix);
        }
        Ok(Self { endpoints, prefix: prefix.to_owned() })
    }
}

impl fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

/// The bounds of every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The longest one connection attempt to one endpoint takes.
    pub(crate) connect: Duration,
    /// The longest one operation takes, over all its attempts.
    pub(crate) call: Duration,
    /// The longest one endpoint has to answer one request before the next endpoint is asked:
    /// a member that stops answering (a frozen process, a partition) still accepts
    /// connections, and would otherwise hold every operation until its deadline.
    pub(crate) attempt: Duration,
    /// The largest answer decoded (bytes of one protobuf message).
    pub(crate) max_response: usize,
    /// The largest request sent.
    pub(crate) max_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            call: Duration::from_secs(5),
            attempt: Duration::from_secs(2),
            max_response: 2 << 20,
            max_request: 2 << 20,
        }
    }
}

/// Why an etcd operation failed. Carries no value bytes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    /// The client's runtime could not be started.
    #[error("etcd: starting the client runtime: {0}")]
    Runtime(std::io::Error),
    /// No endpoint could be reached (or each said it was unavailable).
    #[error("etcd: no endpoint of {endpoints} answered {op} (last: {last})")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        last: String,
    },
    /// The operation's deadline passed (the outcome of a write is then unknown).
    #[error("etcd: {op} did not finish within {limit:?} (at {endpoint})")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The endpoint asked last.
        endpoint: String,
        /// The deadline.
        limit: Duration,
    },
    /// The server answered with an error status (including an answer over the size limit).
    #[error("etcd {endpoint}: {op}: {code:?}: {message}")]
    Status {
        /// The operation.
        op: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The server's message, shortened.
        message: String,
    },
    /// The server ended a watch.
    #[error("etcd: the watch was canceled by the server: {reason}")]
    WatchCanceled {
        /// The server's reason, shortened.
        reason: String,
    },
    /// The answer does not have the shape the operation needs.
    #[error("etcd: malformed answer to {op}: {what}")]
    Malformed {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        what: &'static str,
    },
}

/// A failure of the connection or of the member (refused, reset, no leader), not an answer:
/// the next endpoint is asked. (etcd's own refusals carry other codes.)
fn worth_another_endpoint(code: tonic::Code) -> bool {
    use tonic::Code::{Cancelled, DeadlineExceeded, Unavailable, Unknown};
    matches!(code, Unavailable | Unknown | Cancelled | DeadlineExceeded)
}

fn shorten(s: &str) -> String {
    s.chars().take(MAX_MESSAGE).filter(|c| !c.is_control()).collect()
}

/// A connection to an etcd cluster.
pub(crate) struct EtcdClient {
    rt: tokio::runtime::Runtime,
    url: EtcdUrl,
    limits: Limits,
    /// The endpoint that answered last, and its channel.
    active: usize,
    channel: Option<Channel>,
}

impl fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdClient").field("url", &self.url.to_string()).field("active", &self.active).finish()
    }
}

/// One attempt's failure: worth another endpoint, or the answer.
enum Attempt {
    /// The endpoint could not be reached: try the next.
    Next(String),
    /// The endpoint answered with a passing condition (no leader yet): try the next, and
    /// another round later.
    Answered(String),
    /// The outcome is known: no other endpoint is asked.
    Final(EtcdError),
}

impl EtcdClient {
    /// A client of `url`'s endpoints. Connects lazily (the first operation connects).
    pub(crate) fn new(url: EtcdUrl, limits: Limits) -> Result<Self, EtcdError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(EtcdError::Runtime)?;
        Ok(Self { rt, url, limits, active: 0, channel: None })
    }

    /// Runs `f` against one endpoint after another (starting with the last that answered)
    /// until one answers, all are tried, or the operation's deadline passes.
    fn call<T, F, Fut>(&mut self, op: &'static str, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel, Limits) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let limits = self.limits;
        let n = self.url.endpoints.len();
        let deadline = Instant::now() + limits.call;
        let mut last = String::from("not tried");
        // A round tries every endpoint once. When a reachable member answered with a passing
        // condition (a leader election: "leader changed", "no leader"), another round follows
        // after a short pause, within the same deadline; when none was reachable, one round.
        let mut pause = Duration::from_millis(100);
        loop {
            let mut answered = false;
            for k in 0..n {
                let i = (self.active + k) % n;
                let endpoint = self.url.endpoints[i].clone();
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(EtcdError::Timeout { op, endpoint, limit: limits.call });
                }
                let reuse = if i == self.active { self.channel.take() } else { None };
                let outcome = self.rt.block_on(async {
                    let channel = match reuse {
                        Some(c) => c,
                        None => {
                            let ep = Endpoint::from_shared(format!("http://{endpoint}"))
                                .map_err(|e| Attempt::Next(format!("{endpoint}: {e}")))?
                                .connect_timeout(limits.connect.min(left))
                                .tcp_nodelay(true);
                            match tokio::time::timeout(limits.connect.min(left), ep.connect()).await {
                                Ok(Ok(c)) => c,
                                Ok(Err(e)) => return Err(Attempt::Next(format!("{endpoint}: connect: {e}"))),
                                Err(_) => return Err(Attempt::Next(format!("{endpoint}: connect timed out"))),
                            }
                        }
                    };
                    let bound = limits.attempt.min(left);
                    match tokio::time::timeout(bound, f(channel.clone(), limits)).await {
                        Ok(Ok(v)) => Ok((v, channel)),
                        Ok(Err(s)) if worth_another_endpoint(s.code()) => {
                            Err(Attempt::Answered(format!("{endpoint}: {}", shorten(s.message()))))
                        }
                        Ok(Err(s)) => Err(Attempt::Final(EtcdError::Status {
                            op,
                            endpoint: endpoint.clone(),
                            code: s.code(),
                            message: shorten(s.message()),
                        })),
                        // No answer in this endpoint's share of the time: the next is asked (a
                        // write's outcome is then unknown; every write is conditioned, so a
                        // second attempt elsewhere applies at most once and the caller reads
                        // which happened).
                        Err(_) if bound < left => {
                            Err(Attempt::Answered(format!("{endpoint}: no answer within {:?}", limits.attempt)))
                        }
                        Err(_) => Err(Attempt::Final(EtcdError::Timeout {
                            op,
                            endpoint: endpoint.clone(),
                            limit: limits.call,
                        })),
                    }
                });
                match outcome {
                    Ok((v, channel)) => {
                        self.active = i;
                        self.channel = Some(channel);
                        return Ok(v);
                    }
                    Err(Attempt::Next(why)) => last = why,
                    Err(Attempt::Answered(why)) => {
                        answered = true;
                        last = why;
                    }
                    Err(Attempt::Final(e)) => return Err(e),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !answered || left <= pause {
                return Err(EtcdError::Unavailable { op, endpoints: self.url.endpoints.join(","), last });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn kv(channel: Channel, limits: Limits) -> KvClient<Channel> {
        KvClient::new(channel)
            .max_decoding_message_size(limits.max_response)
            .max_encoding_message_size(limits.max_request)
    }

    /// The key's value and versions (None when absent) and the store's revision at the read
    /// (linearizable).
    pub(crate) fn get(&mut self, key: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let req = RangeRequest { key: key.to_vec(), ..RangeRequest::default() };
        let resp = self.call("range", |ch, l| {
            let req = req.clone();
            async move { Self::kv(ch, l).range(req).await.map(tonic::Response::into_inner) }
        })?;
        if resp.kvs.len() > 1 {
            return Err(EtcdError::Malformed { op: "range", what: "several values for one key" });
        }
        let revision = resp.header.map_or(0, |h| h.revision);
        Ok((resp.kvs.into_iter().next(), revision))
    }

    /// The keys from `start` (inclusive) to `end` (exclusive), in key order, at most `limit`
    /// of them (no values: each is read with [`Self::get`], so one answer stays small);
    /// `more` when etcd holds further keys in the range.
    pub(crate) fn keys(&mut self, start: &[u8], end: &[u8], limit: i64) -> Result<(Vec<Vec<u8>>, bool), EtcdError> {
        let req = RangeRequest {
            key: start.to_vec(),
            range_end: end.to_vec(),
            limit,
            keys_only: true,
            ..RangeRequest::default()
        };
        let resp = self.range_limited(req)?;
        Ok((resp.kvs.into_iter().map(|kv| kv.key).collect(), resp.more))
    }

    /// The keys and values from `start` (inclusive) to `end` (exclusive), in key order, at
    /// most `limit` of them (the answer bounded by [`Limits::max_response`]); `more` when etcd
    /// holds further keys in the range.
    pub(crate) fn range(&mut self, start: &[u8], end: &[u8], limit: i64) -> Result<(Vec<KeyValue>, bool), EtcdError> {
        let req = RangeRequest { key: start.to_vec(), range_end: end.to_vec(), limit, ..RangeRequest::default() };
        let resp = self.range_limited(req)?;
        Ok((resp.kvs, resp.more))
    }

    /// One range request; an answer with more keys than the request's limit is refused.
    fn range_limited(&mut self, req: RangeRequest) -> Result<RangeResponse, EtcdError> {
        let limit = req.limit;
        let resp = self.call("range", |ch, l| {
            let req = req.clone();
            async move { Self::kv(ch, l).range(req).await.map(tonic::Response::into_inner) }
        })?;
        if limit > 0 && resp.kvs.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
            return Err(EtcdError::Malformed { op: "range", what: "more keys than the limit" });
        }
        Ok(resp)
    }

    /// One transaction.
    pub(crate) fn txn(&mut self, req: TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.call("txn", |ch, l| {
            let req = req.clone();
            async move { Self::kv(ch, l).txn(req).await.map(tonic::Response::into_inner) }
        })
    }

    /// Waits at most `wait` for the first put of `key` at or after `start_revision`; returns
    /// it, or None when the wait ends first.
    pub(crate) fn watch_put(
        &mut self,
        key: &[u8],
        start_revision: i64,
        wait: Duration,
    ) -> Result<Option<KeyValue>, EtcdError> {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.to_vec(),
                start_revision,
                ..WatchCreateRequest::default()
            })),
        };
        // The watch may last `wait`; only reaching an endpoint is bounded by the call limit.
        let call = self.limits.call.max(wait + self.limits.connect);
        let limits = Limits { call, attempt: call, ..self.limits };
        let saved = std::mem::replace(&mut self.limits, limits);
        let deadline = Instant::now() + wait;
        let out = self.call("watch", |ch, l| {
            let create = create.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(create).await.map_err(|_| tonic::Status::internal("watch request not sent"))?;
                let mut client = WatchClient::new(ch).max_decoding_message_size(l.max_response);
                let mut stream = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
                let wait = deadline.saturating_duration_since(Instant::now());
                let found = tokio::time::timeout(wait, async {
                    loop {
                        let Some(resp) = stream.message().await? else { return Ok(Err("the watch stream ended")) };
                        if resp.canceled {
                            return Ok(Err("canceled"));
                        }
                        let put = resp.events.into_iter().rev().find(|e| e.r#type() == EventType::Put);
                        if let Some(kv) = put.and_then(|e| e.kv) {
                            return Ok(Ok(kv));
                        }
                    }
                })
                .await;
                drop(tx);
                match found {
                    Err(_) => Ok(Ok(None)),
                    Ok(Ok(Ok(kv))) => Ok(Ok(Some(kv))),
                    Ok(Ok(Err(reason))) => Ok(Err(reason)),
                    Ok(Err(status)) => Err(status),
                }
            }
        });
        self.limits = saved;
        match out? {
            Ok(v) => Ok(v),
            Err(reason) => Err(EtcdError::WatchCanceled { reason: reason.to_owned() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused_precisely() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379,db.example:2380,[::1]:1/kg/prod".parse().expect("url");
        assert_eq!(u.endpoints, ["127.0.0.1:2379", "db.example:2380", "[::1]:1"]);
        assert_eq!(u.prefix, "/kg/prod");
        assert_eq!(u.to_string(), "etcd://127.0.0.1:2379,db.example:2380,[::1]:1/kg/prod");
        let u: EtcdUrl = "etcd://h:2379".parse().expect("url");
        assert_eq!(u.prefix, DEFAULT_PREFIX);
        let refused = [
            ("http://h:1", EtcdUrlError::NotEtcd),
            ("etcd://", EtcdUrlError::NoEndpoint),
            ("etcd:///p", EtcdUrlError::NoEndpoint),
            ("etcd://h", EtcdUrlError::BadEndpoint("h".into())),
            ("etcd://h:0", EtcdUrlError::BadEndpoint("h:0".into())),
            ("etcd://h:99999", EtcdUrlError::BadEndpoint("h:99999".into())),
            ("etcd://h:1,,h:2", EtcdUrlError::BadEndpoint(String::new())),
            ("etcd://h h:1", EtcdUrlError::BadEndpoint("h h:1".into())),
            ("etcd://[zz]:1", EtcdUrlError::BadEndpoint("[zz]:1".into())),
            ("etcd://h:1/", EtcdUrlError::BadPrefix),
            ("etcd://h:1/a/", EtcdUrlError::BadPrefix),
            ("etcd://h:1/a//b", EtcdUrlError::BadPrefix),
            ("etcd://h:1/a b", EtcdUrlError::BadPrefix),
        ];
        for (s, want) in refused {
            assert_eq!(s.parse::<EtcdUrl>(), Err(want), "{s}");
        }
        let many = format!("etcd://{}", vec!["h:1"; MAX_ENDPOINTS + 1].join(","));
        assert_eq!(many.parse::<EtcdUrl>(), Err(EtcdUrlError::TooManyEndpoints(MAX_ENDPOINTS + 1)));
        let long = format!("etcd://h:1/{}", "a".repeat(MAX_PREFIX));
        assert_eq!(long.parse::<EtcdUrl>(), Err(EtcdUrlError::BadPrefix));
    }

    /// Nothing listens: every endpoint is tried, the error is typed, and it comes in time.
    #[test]
    fn unreachable_endpoints_fail_over_then_fail_typed_within_the_deadline() {
        let ports: Vec<u16> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port())
            .collect();
        let url: EtcdUrl =
            format!("etcd://{}", ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(","))
                .parse()
                .expect("url");
        let limits = Limits { call: Duration::from_secs(3), ..Limits::default() };
        let mut c = EtcdClient::new(url, limits).expect("client");
        let t = Instant::now();
        let err = c.get(b"/k").expect_err("nothing listens");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        let EtcdError::Unavailable { op: "range", endpoints, .. } = &err else { panic!("{err}") };
        assert_eq!(endpoints.split(',').count(), 3, "{err}");
    }
}
