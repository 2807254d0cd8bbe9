//! Prometheus metrics and a health check over plain HTTP/1.1, for any long-running command.
//!
//! A component builds a [`Registry`] of its metrics and implements [`Exporter`] (which gauges
//! to bring up to date before a scrape, and whether it is healthy); [`serve`] answers
//! `GET /metrics` (the Prometheus text format 0.0.4, or OpenMetrics when the scraper asks for
//! it), `GET /healthz` (200 `ok`, or 503 with the reason) and 404 for anything else.
//!
//! What it decides: the listener's limits — connections at once, bytes of request head, time
//! to send the head and to finish the exchange, one request per connection, no request body.
//! What it trusts: nothing from the network; nothing it serves is secret (counts, times and
//! key ids only), which is why it has no authentication: bind it where only the scraper
//! reaches (loopback, or a pod network behind a NetworkPolicy).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;

/// The OpenMetrics text format's content type (served when the scraper's Accept names it).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A component's health as `/healthz` reports it: a state, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    /// It can do its job (200 `ok`).
    Ok,
    /// It cannot, for this reason (503 with the reason, the same text the component reports
    /// elsewhere, e.g. the KMS plugin's Status `healthz`).
    Unhealthy(String),
}

/// What an HTTP metrics listener serves.
pub(crate) trait Exporter: Send + Sync + 'static {
    /// The metrics to encode.
    fn registry(&self) -> &Registry;
    /// Brings the gauges that mirror state up to date, just before they are encoded.
    fn refresh(&self) {}
    /// Whether the component can do its job now, and if not why (served with 503).
    fn health(&self) -> Health;
}

/// The listener's bounds: every size, count and wait has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Connections served at once. A connection past the limit is closed at once, unanswered:
    /// a scraper retries at its next interval, and a flood holds no memory.
    pub(crate) max_connections: usize,
    /// Largest request head (request line and headers); hyper's floor is 8 KiB.
    pub(crate) max_head: usize,
    /// Time to send the request head. A client that sends it slowly (or never) is cut off
    /// then, and frees its connection slot.
    pub(crate) head_timeout: Duration,
    /// Time for the whole exchange, from accept to the last byte of the answer.
    pub(crate) exchange_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_head: 8 * 1024,
            head_timeout: Duration::from_secs(5),
            exchange_timeout: Duration::from_secs(10),
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn metrics(exporter: &dyn Exporter, accept: &str) -> Response<Full<Bytes>> {
    exporter.refresh();
    let mut body = String::new();
    let (encoded, content_type) = if accept.contains("application/openmetrics-text") {
        (prometheus_client::encoding::text::encode(&mut body, exporter.registry()), OPENMETRICS)
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, exporter.registry()),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n");
    }
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The answer to one request. A request with a body is refused: nothing here takes one.
fn respond(exporter: &dyn Exporter, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let has_body = req.headers().contains_key(TRANSFER_ENCODING)
        || req.headers().get(CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "no request body is accepted\n");
    }
    let path = req.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return text(StatusCode::NOT_FOUND, "not found: GET /metrics or /healthz\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        r.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == "/healthz" {
        return match exporter.health() {
            Health::Ok => text(StatusCode::OK, "ok\n"),
            Health::Unhealthy(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        };
    }
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    metrics(exporter, accept)
}

/// Serves `exporter` on `listener` until the task is dropped (with its runtime). One request
/// per connection: each exchange ends within `limits.exchange_timeout`.
pub(crate) async fn serve(listener: tokio::net::TcpListener, exporter: Arc<dyn Exporter>, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(&*exporter, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(limits.max_head.max(8192))
                .keep_alive(false);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(limits.exchange_timeout, conn).await {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake {
        registry: Registry,
        requests: Counter,
        healthy: AtomicBool,
    }

    impl Exporter for Fake {
        fn registry(&self) -> &Registry {
            &self.registry
        }
        fn refresh(&self) {
            self.requests.inc();
        }
        fn health(&self) -> Health {
            if self.healthy.load(Ordering::SeqCst) {
                Health::Ok
            } else {
                Health::Unhealthy("lease expired 3s ago; refusing new encryptions (transport)".to_owned())
            }
        }
    }

    /// Sends `request` raw and returns the whole answer (the server closes after one).
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // The server may answer and close before an oversized request is all written.
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("answer in time");
        String::from_utf8_lossy(&out).into_owned()
    }

    fn get(path: &str, extra: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").into_bytes()
    }

    #[tokio::test]
    async fn endpoints_limits_and_formats() {
        let mut registry = Registry::with_prefix("keygate");
        let requests = Counter::default();
        registry.register("test_scrapes", "Scrapes seen", requests.clone());
        let fake = Arc::new(Fake { registry, requests, healthy: AtomicBool::new(true) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits { max_connections: 2, head_timeout: Duration::from_secs(1), ..Limits::default() };
        tokio::spawn(serve(listener, fake.clone(), limits));

        let m = exchange(addr, &get("/metrics", "")).await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{m}");
        assert!(m.contains("# TYPE keygate_test_scrapes_total counter\nkeygate_test_scrapes_total 1\n"), "{m}");
        let om = exchange(addr, &get("/metrics", "Accept: application/openmetrics-text;version=1.0.0\r\n")).await;
        assert!(om.contains(&format!("content-type: {OPENMETRICS}")), "{om}");
        assert!(om.contains("keygate_test_scrapes_total 2\n") && om.ends_with("# EOF\n"), "{om}");

        let h = exchange(addr, &get("/healthz", "")).await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("\r\n\r\nok\n"), "{h}");
        fake.healthy.store(false, Ordering::SeqCst);
        let h = exchange(addr, &get("/healthz", "")).await;
        assert!(
            h.starts_with("HTTP/1.1 503")
                && h.ends_with("lease expired 3s ago; refusing new encryptions (transport)\n"),
            "{h}"
        );

        for (request, status) in [
            (get("/", ""), "404"),
            (get("/metrics/x", ""), "404"),
            (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(), "405"),
            (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".to_vec(), "413"),
            (get("/metrics", &format!("X-Pad: {}\r\n", "a".repeat(20_000))), "431"),
        ] {
            let a = exchange(addr, &request).await;
            assert!(a.starts_with(&format!("HTTP/1.1 {status}")), "{status}: {a:.200}");
        }

        // A client that never finishes its head is cut off, and does not hold a slot.
        let slow = Instant::now();
        let a = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(slow.elapsed() < Duration::from_secs(5), "{a}");
        // Connections past the limit are closed unanswered while two are held open.
        let held: Vec<_> = hold_two(addr).await;
        let refused = exchange(addr, &get("/healthz", "")).await;
        assert_eq!(refused, "", "a third connection is refused");
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(exchange(addr, &get("/healthz", "")).await.starts_with("HTTP/1.1 503"));
    }

    /// Two connections that have sent half a request head, holding both slots.
    async fn hold_two(addr: std::net::SocketAddr) -> Vec<tokio::net::TcpStream> {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\n").await.expect("write");
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        held
    }
}
