//! Reading and writing frames on a stream, with time limits.
//!
//! The server reads requests with [`read_request`]: the declared length is checked against the
//! largest body the frame's type can have before anything is allocated, the bytes are taken
//! from a budget shared by every connection (so many half-sent frames cannot take the KRE's
//! memory), and the buffer grows only with the bytes that actually arrive.
//!
//! Every read waits in a [`Waiting`] line. When the connection slots or the byte budget run
//! out, the read that has waited longest is made to give its place up: a legitimate client
//! sends each frame at once, so the oldest waits are those of peers holding resources on
//! purpose, and a flood of them cannot keep a new client out.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::peer::client::TransportError;
use crate::wire::{self, Unreadable};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer closed the connection before a frame started.
    #[error("connection closed")]
    Closed,
    /// No complete frame within the time limit.
    #[error("timed out waiting for a frame")]
    Timeout,
    /// A frame the server refuses to read: its length prefix, its type's cap, the byte
    /// budget, an eviction. (A server's timeout is [`FrameError::Timeout`].)
    #[error(transparent)]
    Refused(#[from] Unreadable),
    /// Any other I/O error (including a close in the middle of a frame).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<FrameError> for TransportError {
    /// A client's view of a failed frame: what happened, without the server's detail.
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Closed => TransportError::Closed,
            FrameError::Timeout => TransportError::FrameTimeout,
            FrameError::Refused(u) => TransportError::Unreadable(u),
            FrameError::Io(e) => TransportError::Frame(e.kind()),
        }
    }
}

/// Reads one frame body within `limit` (the whole frame, not per byte: a client sending
/// one byte per second cannot hold the connection longer).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limit: Duration) -> Result<Vec<u8>, FrameError> {
    tokio::time::timeout(limit, async {
        let mut prefix = [0u8; 4];
        match r.read(&mut prefix[..1]).await? {
            0 => return Err(FrameError::Closed),
            _ => r.read_exact(&mut prefix[1..]).await?,
        };
        let n = wire::frame_len(prefix).map_err(Unreadable::Length)?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).await?;
        Ok(body)
    })
    .await
    .map_err(|_| FrameError::Timeout)?
}

/// The reads waiting for a frame on one listener, oldest first, each of which can be asked to
/// give up (evicted): the server's way to make room for a new connection or for the bytes of
/// a frame when its limits are reached.
#[derive(Debug, Default)]
pub struct Waiting {
    line: std::sync::Mutex<WaitLine>,
}

#[derive(Debug, Default)]
struct WaitLine {
    next: u64,
    /// Waiting reads by arrival; `true` for those holding bytes of the budget.
    reads: std::collections::BTreeMap<u64, (Arc<tokio::sync::Notify>, bool)>,
}

/// One read's place in the [`Waiting`] line; it leaves the line when dropped.
#[derive(Debug)]
pub struct Waiter {
    waiting: Arc<Waiting>,
    id: u64,
    evicted: Arc<tokio::sync::Notify>,
}

impl Waiting {
    fn line(&self) -> std::sync::MutexGuard<'_, WaitLine> {
        // A poisoned line still holds valid entries (each update is one map operation).
        self.line.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Joins the line.
    pub fn enter(self: &Arc<Self>) -> Waiter {
        let evicted = Arc::new(tokio::sync::Notify::new());
        let mut line = self.line();
        let id = line.next;
        line.next += 1;
        line.reads.insert(id, (evicted.clone(), false));
        Waiter { waiting: self.clone(), id, evicted }
    }

    /// Evicts the read that has waited longest (of those holding budget bytes, with
    /// `holding_bytes`). Returns whether there was one.
    pub fn evict_oldest(&self, holding_bytes: bool) -> bool {
        let mut line = self.line();
        let Some(id) = line.reads.iter().find(|(_, (_, h))| *h || !holding_bytes).map(|(id, _)| *id) else {
            return false;
        };
        if let Some((n, _)) = line.reads.remove(&id) {
            n.notify_one();
        }
        true
    }

    /// Reads in the line.
    pub fn len(&self) -> usize {
        self.line().reads.len()
    }

    /// Whether the line is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Waiter {
    fn holding_bytes(&self) {
        if let Some(e) = self.waiting.line().reads.get_mut(&self.id) {
            e.1 = true;
        }
    }

    /// Resolves when this read is evicted.
    async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiting.line().reads.remove(&self.id);
    }
}

/// Bytes of request bodies the server holds at once, across every connection of a listener,
/// and the line of reads that may be asked to give theirs back.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    bytes: Arc<tokio::sync::Semaphore>,
    waiting: Arc<Waiting>,
}

impl ByteBudget {
    /// A budget of `bytes` (capped at what a semaphore can count).
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(tokio::sync::Semaphore::new(bytes.min(tokio::sync::Semaphore::MAX_PERMITS))),
            waiting: Arc::default(),
        }
    }

    /// Bytes not held by any read.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The line of waiting reads.
    pub fn waiting(&self) -> &Arc<Waiting> {
        &self.waiting
    }

    /// `n` bytes: at once if free; otherwise the oldest read holding bytes is evicted and the
    /// bytes are waited for, up to [`MAKE_ROOM_WAIT`].
    async fn take(&self, n: u32) -> Result<tokio::sync::OwnedSemaphorePermit, FrameError> {
        if let Ok(p) = self.bytes.clone().try_acquire_many_owned(n) {
            return Ok(p);
        }
        if !self.waiting.evict_oldest(true) {
            return Err(Unreadable::Busy.into());
        }
        match tokio::time::timeout(MAKE_ROOM_WAIT, self.bytes.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Unreadable::Busy.into()),
        }
    }
}

/// How long a read waits for the bytes an eviction frees before it is refused `busy`.
pub const MAKE_ROOM_WAIT: Duration = Duration::from_millis(250);

/// A request body read by [`read_request`], holding its share of the byte budget until dropped.
#[derive(Debug)]
pub struct Request {
    /// The frame body (after the length prefix).
    pub body: Vec<u8>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Reads one request frame within `limit`. `admit(version, type)` gives the most body bytes
/// the reader takes a frame with that header (the connection's state decides: only the types
/// it waits for, each with its own cap), or `None`: then only the two header bytes are read and
/// returned, for the connection to refuse without waiting for the rest. The cap is checked
/// before allocating, the bytes are taken from `budget`, and the buffer grows with the bytes
/// received.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: Duration,
    budget: &ByteBudget,
    admit: impl Fn(u8, u8) -> Option<usize>,
) -> Result<Request, FrameError> {
    let waiter = budget.waiting.enter();
    let read = tokio::time::timeout(limit, async {
        let mut head = [0u8; 6];
        match r.read(&mut head[..1]).await? {
            0 => return Err(FrameError::Closed),
            _ => r.read_exact(&mut head[1..4]).await?,
        };
        let n = wire::frame_len([head[0], head[1], head[2], head[3]]).map_err(Unreadable::Length)?;
        r.read_exact(&mut head[4..]).await?;
        let Some(max) = admit(head[4], head[5]) else {
            return Ok(Request { body: head[4..].to_vec(), _permit: None });
        };
        if n > max {
            return Err(Unreadable::TooLargeForType { ty: head[5], len: n, max }.into());
        }
        let rest = n - 2;
        let permit = match u32::try_from(rest) {
            Ok(0) => None,
            Ok(k) => Some(budget.take(k).await?),
            Err(_) => return Err(Unreadable::Busy.into()),
        };
        waiter.holding_bytes();
        let mut body = Vec::with_capacity(n.min(4096));
        body.extend_from_slice(&head[4..]);
        let got = (&mut *r).take(u64::try_from(rest).unwrap_or(0)).read_to_end(&mut body).await?;
        if got != rest {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(Request { body, _permit: permit })
    });
    tokio::select! {
        r = read => r.map_err(|_| FrameError::Timeout)?,
        () = waiter.evicted() => Err(Unreadable::Evicted.into()),
    }
}

/// Writes a complete frame within `limit`.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8], limit: Duration) -> Result<(), FrameError> {
    tokio::time::timeout(limit, async {
        w.write_all(frame).await?;
        w.flush().await?;
        Ok(())
    })
    .await
    .map_err(|_| FrameError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;

    fn budget(bytes: usize) -> ByteBudget {
        ByteBudget::new(bytes)
    }

    const T: Duration = Duration::from_secs(1);

    /// Admits every request type with its own cap (no connection state).
    fn by_type(_version: u8, t: u8) -> Option<usize> {
        wire::max_request_body(t)
    }

    /// A frame the connection does not take is returned as its two header bytes: the rest is
    /// neither allocated, nor waited for, nor charged to the budget.
    #[tokio::test]
    async fn a_frame_not_admitted_is_read_no_further_than_its_header() {
        let b = budget(1 << 20);
        let push = Message::PolicyPush { bundle: vec![1; 30_000] }.encode().expect("enc");
        // Only the first 6 bytes are there: a reader waiting for the body would time out.
        let req = read_request(&mut &push[..6], T, &b, |_, _| None).await.expect("header");
        assert_eq!(req.body, push[4..6]);
        assert_eq!(b.available(), 1 << 20);
    }

    #[tokio::test]
    async fn a_request_is_read_and_holds_its_bytes_until_dropped() {
        let b = budget(100);
        let hello = Message::Hello { client_nonce: [7; 32] }.encode().expect("enc");
        let req = read_request(&mut hello.as_slice(), T, &b, by_type).await.expect("read");
        assert_eq!(req.body, hello[4..]);
        assert_eq!(b.available(), 100 - 32);
        drop(req);
        assert_eq!(b.available(), 100);
    }

    /// A Hello that declares a whole frame is refused on its header: nothing is allocated or
    /// read beyond the six header bytes.
    #[tokio::test]
    async fn a_declared_length_beyond_the_types_cap_is_refused_before_reading() {
        let b = budget(1 << 20);
        let mut frame = vec![0, 1, 0, 0, 1, 1]; // 65,536 bytes declared, version 1, Hello
        frame.extend_from_slice(&[0; 10]);
        let err = read_request(&mut frame.as_slice(), T, &b, by_type).await.expect_err("refused");
        assert!(
            matches!(err, FrameError::Refused(Unreadable::TooLargeForType { ty: 1, len: 65_536, max: 34 })),
            "{err}"
        );
        assert_eq!(b.available(), 1 << 20);
    }

    /// Half-sent frames hold only the budget: once it is spent, the next is refused `Busy`.
    #[tokio::test]
    async fn the_budget_of_bytes_in_flight_is_shared_and_bounded() {
        let b = budget(40_000);
        let push = Message::PolicyPush { bundle: vec![1; 30_000] }.encode().expect("enc");
        let held = read_request(&mut push.as_slice(), T, &b, by_type).await.expect("first");
        let err = read_request(&mut push.as_slice(), T, &b, by_type).await.expect_err("over budget");
        assert!(matches!(err, FrameError::Refused(Unreadable::Busy)), "{err}");
        drop(held);
        assert!(read_request(&mut push.as_slice(), T, &b, by_type).await.is_ok());
    }

    /// When the budget is spent, the read holding bytes that has waited longest is evicted and
    /// its bytes go to the new frame; a read holding none is not evicted for bytes.
    #[tokio::test]
    async fn the_read_waiting_longest_gives_its_bytes_to_a_new_frame() {
        use tokio::io::AsyncWriteExt;
        let b = budget(40_000);
        let push = Message::PolicyPush { bundle: vec![1; 30_000] }.encode().expect("enc");
        // An idle read (no bytes) and a stalled one (all but the last byte), in that order.
        let (mut idle_tx, mut idle_rx) = tokio::io::duplex(64);
        let (mut stalled_tx, mut stalled_rx) = tokio::io::duplex(1 << 16);
        let (b1, b2) = (b.clone(), b.clone());
        let idle = tokio::spawn(async move { read_request(&mut idle_rx, T * 5, &b1, by_type).await });
        tokio::task::yield_now().await;
        let stalled = tokio::spawn(async move { read_request(&mut stalled_rx, T * 5, &b2, by_type).await });
        stalled_tx.write_all(&push[..push.len() - 1]).await.expect("send");
        while b.available() == 40_000 {
            tokio::task::yield_now().await;
        }
        let fresh = read_request(&mut push.as_slice(), T, &b, by_type).await.expect("the new frame is read");
        assert_eq!(fresh.body.len(), push.len() - 4);
        let err = stalled.await.expect("join").expect_err("evicted");
        assert!(matches!(err, FrameError::Refused(Unreadable::Evicted)), "{err}");
        assert_eq!(b.waiting().len(), 1, "the idle read still waits");
        // For a slot, the oldest waiting read goes, whether or not it holds bytes.
        assert!(b.waiting().evict_oldest(false));
        assert!(matches!(idle.await.expect("join"), Err(FrameError::Refused(Unreadable::Evicted))));
        assert!(b.waiting().is_empty() && !b.waiting().evict_oldest(false));
        drop((idle_tx.shutdown().await, stalled_tx));
    }

    /// A frame cut short is an I/O error, not a shorter body.
    #[tokio::test]
    async fn a_truncated_body_is_an_error() {
        let b = budget(1000);
        let hello = Message::Hello { client_nonce: [7; 32] }.encode().expect("enc");
        let err = read_request(&mut &hello[..20], T, &b, by_type).await.expect_err("truncated");
        assert!(matches!(err, FrameError::Io(_)), "{err}");
        assert_eq!(b.available(), 1000);
    }

    /// Every request type's cap admits its largest valid message, and the fixed-size ones
    /// exactly.
    #[test]
    fn each_cap_admits_its_largest_message() {
        use crate::wire::{Id, UNSEAL_SHARE_LEN};
        let id = Id::new(&"k".repeat(wire::MAX_ID)).expect("id");
        let ids: Vec<Id> = (0..wire::MAX_KEYS).map(|i| Id::new(&format!("{i:0>64}")).expect("id")).collect();
        let exact = [
            Message::Hello { client_nonce: [0; 32] },
            Message::UnsealHello { client_nonce: [0; 32] },
            Message::AuditPull { after_seq: 0, max: 0 },
            Message::AuditAck { up_to_seq: 0 },
            Message::Status,
            Message::StatePoll,
            Message::StateGenesis,
            Message::StateCommit { generation: 0, blob_sha384: [0; 48] },
            Message::UnsealShare { share: vec![0; UNSEAL_SHARE_LEN] },
        ];
        for m in exact {
            let f = m.encode().expect("enc");
            assert_eq!(wire::max_request_body(f[5]), Some(f.len() - 4), "{}", m.name());
        }
        let release = Message::Release {
            cluster_id: id,
            key_ids: ids,
            attestation: vec![0; keygate_attestation::cose::MAX_DOCUMENT],
        }
        .encode()
        .expect("enc");
        assert_eq!(wire::max_request_body(release[5]), Some(release.len() - 4));
        for t in 0..=255u8 {
            if let Some(max) = wire::max_request_body(t) {
                assert!(max <= wire::MAX_FRAME && wire::Channel::of_request_type(t).is_some(), "type {t}");
            }
        }
    }
}
