//! The one request/response round trip to a KRE channel: connect with a bounded wait, send a
//! frame, read the answer within the same bound, decode it. A `Denied` answer stays typed
//! ([`KreError::Denied`] keeps the [`DenyCode`]) so that a caller decides on the code, never on
//! the reason's text.
//!
//! It decides nothing about the answer's content and trusts nothing in it beyond the framing
//! and message encoding of docs/protocol.md; what an answer proves is checked by the caller
//! (receipts, attestation) with `keygate_enclave`'s verifiers.

use std::time::Duration;

use keygate_enclave::net::io::{read_frame, write_frame, FrameError};
use keygate_enclave::net::transport::{self, Addr, BoxStream};
use keygate_enclave::wire::{DenyCode, Message, WireError};

use crate::error::CliError;

/// How long a request waits to connect, and then for each frame, unless the verb says otherwise.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to a KRE got no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KreError {
    /// The async runtime could not be started.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// No connection within the bound.
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// The request could not be encoded (a field over its wire limit).
    #[error("{0}")]
    Encode(WireError),
    /// The request could not be sent.
    #[error("sending: {0}")]
    Send(FrameError),
    /// No complete answer within the bound.
    #[error("reading the answer: {0}")]
    Receive(FrameError),
    /// The answer is not a message of the protocol.
    #[error("bad answer from the KRE: {0}")]
    Decode(WireError),
    /// A well-formed answer, but not one the request can have.
    #[error("unexpected answer {0}")]
    Unexpected(&'static str),
    /// The KRE refused, with its code.
    #[error("the KRE refused: {code}: {reason}")]
    Denied { code: DenyCode, reason: String },
}

impl From<KreError> for CliError {
    fn from(e: KreError) -> Self {
        match e {
            KreError::Runtime(_) | KreError::Connect { .. } | KreError::Send(_) | KreError::Receive(_) => {
                CliError { code: 3, message: e.to_string() }
            }
            KreError::Encode(_) => CliError::input(e),
            KreError::Decode(_) | KreError::Unexpected(_) | KreError::Denied { .. } => CliError::refused(e),
        }
    }
}

/// An unexpected (well-formed) answer, named.
pub(crate) fn unexpected(m: &Message) -> CliError {
    KreError::Unexpected(m.name()).into()
}

/// A connection to one KRE channel; every read and write is bounded by `timeout`.
pub(crate) struct Connection {
    stream: BoxStream,
    timeout: Duration,
}

impl Connection {
    /// Connects to `addr`, waiting at most `timeout`.
    pub(crate) async fn open(addr: &Addr, timeout: Duration) -> Result<Self, KreError> {
        let stream = transport::connect(addr, timeout)
            .await
            .map_err(|source| KreError::Connect { addr: addr.to_string(), source })?;
        Ok(Self { stream, timeout })
    }

    /// Sends one frame.
    pub(crate) async fn send(&mut self, frame: &[u8]) -> Result<(), KreError> {
        write_frame(&mut self.stream, frame, self.timeout).await.map_err(KreError::Send)
    }

    /// Reads one frame's body.
    pub(crate) async fn receive(&mut self) -> Result<Vec<u8>, KreError> {
        read_frame(&mut self.stream, self.timeout).await.map_err(KreError::Receive)
    }

    /// Sends `frame` and decodes the answer; a `Denied` answer is [`KreError::Denied`].
    pub(crate) async fn round_trip(&mut self, frame: &[u8]) -> Result<Message, KreError> {
        self.send(frame).await?;
        let body = self.receive().await?;
        match Message::decode(&body).map_err(KreError::Decode)? {
            Message::Denied { code, reason } => Err(KreError::Denied { code, reason }),
            m => Ok(m),
        }
    }

    /// Sends `msg` and decodes the answer; a `Denied` answer is [`KreError::Denied`].
    pub(crate) async fn ask(&mut self, msg: &Message) -> Result<Message, KreError> {
        let frame = msg.encode().map_err(KreError::Encode)?;
        self.round_trip(&frame).await
    }
}

/// One request on its own connection, blocking: connect, send `msg`, read and decode the
/// answer, each step within `timeout`.
pub(crate) fn ask(kre: &Addr, msg: &Message, timeout: Duration) -> Result<Message, KreError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(KreError::Runtime)?;
    rt.block_on(async { Connection::open(kre, timeout).await?.ask(msg).await })
}
