//! The KRE wire format (version 1), specified in `docs/protocol.md`.
//!
//! - [`frame`](self::frame): the length prefix, version and type bytes, [`WireError`] and
//!   [`Unreadable`];
//! - `messages`: every [`Message`] with its payload layout and limits;
//! - `channel`: which [`Channel`] may send which request;
//! - `deny`: the [`DenyCode`]s;
//! - `member`: the member channel's [`MemberMessage`]s (a joining member and a serving one).
//!
//! ```text
//! frame   = length:u32be body           ; 2 <= length <= MAX_FRAME
//! body    = version:u8 (=1) type:u8 payload
//! str8    = len:u8 UTF-8 bytes
//! bytes16 = len:u16be bytes
//! ```
//!
//! Parsing is strict: every length is checked before use (by the crate's one codec,
//! [`crate::codec`]), identifiers are validated, and trailing bytes are an error. Nothing
//! here does I/O. What it trusts: nothing; every frame is untrusted input.

mod channel;
mod deny;
mod frame;
mod member;
mod messages;

pub use self::channel::{Channel, UnknownChannel};
pub use self::deny::DenyCode;
pub use self::frame::{
    frame_len, Unreadable, WireError, MAX_FRAME, MAX_KEYS, MAX_REASON, MAX_RELEASED, NONCE_LEN, VERSION,
};
pub use self::member::{
    max_member_request_body, JoinOffer, MemberMessage, JOIN_OFFER, JOIN_REQUEST, MAX_MEMBER_ATTESTATION,
    SEALED_STATE_KEY_LEN,
};
pub use self::messages::{
    max_request_body, ty, type_name, Message, StateReport, MAX_AUDIT_BATCH, MAX_AUDIT_WAIT_MS, MAX_DURABLE_WAIT_MS,
    UNSEAL_SHARE_LEN,
};
pub use crate::binding::request_digest;
pub use crate::codec::{Id, MAX_ID};
pub use crate::crypto::keys::{WrappedKey, POINT_LEN};
