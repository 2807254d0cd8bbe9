//! The one small transport abstraction: Unix sockets (tests, the demo, the parent's host
//! side), vsock (production, enclave ↔ parent) and loopback TCP (the proxy's host side).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// An address to listen on or connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `vsock:CID:PORT`, or `vsock:PORT` to listen on any CID.
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// `tcp:IP:PORT`
    Tcp(SocketAddr),
    /// `tcp:HOST:PORT` with a DNS name, resolved at each bind or connect (every address the
    /// name has is tried in turn).
    TcpHost {
        /// The DNS name, checked for its syntax only.
        host: String,
        /// Port.
        port: u16,
    },
}

/// Why an address string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address `{0}`: expected unix:PATH, vsock:CID:PORT, vsock:PORT, tcp:IP:PORT or tcp:HOST:PORT")]
pub struct AddrError(String);

impl FromStr for Addr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddrError(s.to_owned());
        let (scheme, rest) = s.split_once(':').ok_or_else(err)?;
        match scheme {
            "unix" if !rest.is_empty() => Ok(Addr::Unix(PathBuf::from(rest))),
            "vsock" => match rest.split_once(':') {
                Some((cid, port)) => {
                    Ok(Addr::Vsock { cid: cid.parse().map_err(|_| err())?, port: port.parse().map_err(|_| err())? })
                }
                None => Ok(Addr::Vsock { cid: tokio_vsock::VMADDR_CID_ANY, port: rest.parse().map_err(|_| err())? }),
            },
            "tcp" => match rest.parse() {
                Ok(a) => Ok(Addr::Tcp(a)),
                Err(_) => {
                    let (host, port) = rest.rsplit_once(':').ok_or_else(err)?;
                    if !is_dns_name(host) {
                        return Err(err());
                    }
                    Ok(Addr::TcpHost { host: host.to_ascii_lowercase(), port: port.parse().map_err(|_| err())? })
                }
            },
            _ => Err(err()),
        }
    }
}

/// A DNS host name (RFC 1123): dot-separated labels of letters, digits and inner hyphens, each
/// 1–63 characters, 253 in all, not all digits in the last label (that would be an IP address
/// written wrong).
fn is_dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (1..=253).contains(&host.len())
        && host.split('.').all(label_ok)
        && !host.rsplit('.').next().is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::TcpHost { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A bidirectional byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed stream of any transport.
pub type BoxStream = Box<dyn Stream>;

/// A listener of any transport.
#[derive(Debug)]
pub enum Listener {
    /// Unix socket (the path is removed on drop).
    Unix(tokio::net::UnixListener, PathBuf),
    /// vsock.
    Vsock(tokio_vsock::VsockListener),
    /// TCP.
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file at the path is replaced; any other file is not.
    pub async fn bind(addr: &Addr) -> io::Result<Self> {
        match addr {
            Addr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        // A socket someone still accepts on is a live service (a second copy
                        // of the KRE, a proxy): never take it over. Only a stale one goes.
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{} is served by a live process; refusing to take it over", path.display()),
                            ));
                        }
                        std::fs::remove_file(path)?;
                    } else {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                }
                let l = tokio::net::UnixListener::bind(path)?;
                // Owner and group only: the socket is the KRE's (or the plugin's) front door.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix(l, path.clone()))
            }
            Addr::Vsock { cid, port } => {
                Ok(Listener::Vsock(tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))?))
            }
            Addr::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
            Addr::TcpHost { host, port } => {
                Ok(Listener::Tcp(tokio::net::TcpListener::bind((host.as_str(), *port)).await?))
            }
        }
    }

    /// Accepts one connection; returns it and a description of the peer for logs.
    pub async fn accept(&self) -> io::Result<(BoxStream, String)> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let peer = s
                    .peer_cred()
                    .map(|c| match c.pid() {
                        Some(pid) => format!("unix pid={pid} uid={}", c.uid()),
                        None => format!("unix uid={}", c.uid()),
                    })
                    .unwrap_or_else(|_| "unix".into());
                Ok((Box::new(s), peer))
            }
            Listener::Vsock(l) => {
                let (s, a) = l.accept().await?;
                Ok((Box::new(s), format!("vsock cid={} port={}", a.cid(), a.port())))
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                Ok((Box::new(s), format!("tcp {a}")))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Accepts connections until `shutdown` resolves. Up to `max` at once (the slots), each
/// connection goes to `serve_one`, holding its slot until that finishes. Beyond the limit,
/// `make_room` is asked to end a connection that holds a slot to no purpose (it returns whether
/// it did): if so, the new connection is served at once on one of [`EVICTION_HEADROOM`] spare
/// slots (the evicted one gives its slot back within moments); if not, it goes to `refuse`
/// (which should answer quickly and return). An accept error (for example, out of file
/// descriptors) is logged and retried after a short pause, never a spin.
pub async fn accept_loop<S, SF, R, RF>(
    listener: &Listener,
    max: usize,
    shutdown: impl std::future::Future<Output = ()>,
    serve_one: S,
    refuse: R,
    make_room: impl Fn() -> bool,
) where
    S: Fn(BoxStream, String) -> SF,
    SF: std::future::Future<Output = ()> + Send + 'static,
    R: Fn(BoxStream, String) -> RF,
    RF: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max));
    let spare = std::sync::Arc::new(tokio::sync::Semaphore::new(EVICTION_HEADROOM));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = slots.clone().try_acquire_owned().or_else(|_| match spare.clone().try_acquire_owned() {
            Ok(p) if make_room() => Ok(p),
            _ => Err(()),
        });
        match permit {
            Ok(permit) => {
                let work = serve_one(stream, peer);
                tokio::spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Err(()) => {
                tracing::warn!(%peer, "connection limit reached; refusing");
                tokio::spawn(refuse(stream, peer));
            }
        }
    }
}

/// Connections served beyond the limit while the ones evicted to make room close.
pub const EVICTION_HEADROOM: usize = 64;

/// Connects to `addr` within `timeout`.
pub async fn connect(addr: &Addr, timeout: Duration) -> io::Result<BoxStream> {
    let fut = async {
        Ok::<BoxStream, io::Error>(match addr {
            Addr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            Addr::Vsock { cid, port } => {
                Box::new(tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?)
            }
            Addr::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await?),
            Addr::TcpHost { host, port } => Box::new(tokio::net::TcpStream::connect((host.as_str(), *port)).await?),
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr} timed out")))?
}

/// Whether this kernel offers vsock loopback (CID 1), so that vsock can be tested locally.
/// Decided without connecting anywhere: a vsock connection on a machine without loopback
/// goes to the hypervisor.
pub fn vsock_loopback() -> Result<(), NoVsockLoopback> {
    if !std::path::Path::new("/dev/vsock").exists() {
        return Err(NoVsockLoopback::NoDevice);
    }
    if !std::path::Path::new("/sys/module/vsock_loopback").exists() {
        return Err(NoVsockLoopback::NoLoopbackModule);
    }
    Ok(())
}

/// Why vsock cannot be tested on this machine ([`vsock_loopback`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoVsockLoopback {
    /// No vsock device.
    #[error("no /dev/vsock on this machine")]
    NoDevice,
    /// vsock without the loopback module: a connection would reach the hypervisor.
    #[error("the vsock_loopback kernel module is not loaded (no CID 1 loopback); a vsock connection here would go to the hypervisor")]
    NoLoopbackModule,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_addresses() {
        for s in [
            "unix:/tmp/kre.sock",
            "vsock:16:5000",
            "tcp:127.0.0.1:8443",
            "tcp:[::1]:8443",
            "tcp:kre-1.prod.internal:5000",
            "tcp:localhost:1",
        ] {
            assert_eq!(s.parse::<Addr>().expect(s).to_string(), s);
        }
        assert_eq!("vsock:5000".parse::<Addr>(), Ok(Addr::Vsock { cid: tokio_vsock::VMADDR_CID_ANY, port: 5000 }));
        assert_eq!("tcp:KRE.Example.:7".parse::<Addr>(), Ok(Addr::TcpHost { host: "kre.example.".into(), port: 7 }));
        let long_label = format!("tcp:{}.x:1", "a".repeat(64));
        let long_name = format!("tcp:{}:1", ["a"; 128].join("."));
        for bad in [
            "",
            "unix:",
            "vsock:x",
            "vsock:1:y",
            "tcp:localhost",
            "tcp:localhost:",
            "tcp:localhost:65536",
            "tcp::80",
            "tcp:under_score:1",
            "tcp:-lead.x:1",
            "tcp:trail-.x:1",
            "tcp:a..b:1",
            "tcp:10.0.0.256:1",
            "tcp:1.2.3:1",
            &long_label,
            &long_name,
            "http://x",
            "kre.sock",
        ] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }

    /// A name resolves at connect time, trying each of its addresses.
    #[tokio::test]
    async fn a_host_name_is_resolved_when_connecting() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let Listener::Tcp(t) = &l else { panic!("tcp") };
        let port = t.local_addr().expect("port").port();
        let addr: Addr = format!("tcp:localhost:{port}").parse().expect("addr");
        let server = tokio::spawn(async move { l.accept().await.map(|_| ()) });
        connect(&addr, Duration::from_secs(5)).await.expect("localhost resolves to the loopback listener");
        server.await.expect("join").expect("accept");
        let nowhere: Addr = "tcp:no-such-host.invalid:1".parse().expect("syntax is fine");
        assert!(connect(&nowhere, Duration::from_secs(5)).await.is_err());
    }

    #[tokio::test]
    async fn vsock_round_trip_where_loopback_exists() {
        if let Err(why) = vsock_loopback() {
            eprintln!("SKIPPED vsock_round_trip_where_loopback_exists: {why}");
            return;
        }
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = Addr::Vsock { cid: 1, port: 47_123 };
        let l = Listener::bind(&addr).await.expect("bind");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.expect("read");
            s.write_all(&b).await.expect("write");
        });
        let mut c = connect(&addr, Duration::from_secs(2)).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"ping");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn unix_listener_replaces_stale_socket_but_not_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.sock");
        let a = Addr::Unix(p.clone());
        // A socket file nobody accepts on any more, as a crashed process leaves behind.
        drop(std::os::unix::net::UnixListener::bind(&p).expect("bind"));
        let second = Listener::bind(&a).await.expect("rebind over stale socket");
        drop(second);
        std::fs::write(&p, b"not a socket").expect("file");
        assert!(Listener::bind(&a).await.is_err());
    }

    /// A second copy (of the KRE, a proxy) must not unlink a live service's socket and
    /// report itself ready: the bind is refused and the first keeps serving.
    #[tokio::test]
    async fn unix_listener_refuses_to_take_over_a_live_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Addr::Unix(dir.path().join("s.sock"));
        let live = Listener::bind(&a).await.expect("bind");
        let err = Listener::bind(&a).await.expect_err("a live socket is not taken over");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains("served by a live process"), "{err}");
        let server = tokio::spawn(async move { live.accept().await.map(|_| ()) });
        connect(&a, Duration::from_secs(2)).await.expect("the first still serves");
        server.await.expect("join").expect("accept");
    }
}
