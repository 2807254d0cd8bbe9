//! The tamper-evident audit trail (the contract is `docs/audit.md`).
//!
//! What this module decides: the exact bytes of an audit entry and of a checkpoint, how
//! entries are chained, when the KRE's buffer refuses a record, and whether a stored trail
//! is intact. What it trusts: the KRE's own NSM (for the document that binds the checkpoint
//! key to the KRE image) and, offline, the pinned Nitro root given to [`verify_trail`].
//!
//! - [`AuditEvent`]: what is recorded (never key material).
//! - [`AuditEntry`]: one record, `seq` from 1, holding the SHA-384 of the previous record,
//!   canonically encoded (version 1, big-endian, length-prefixed) and strictly decoded.
//! - [`AuditLog`]: the KRE's bounded buffer. When it is full, [`AuditLog::append`] refuses
//!   (fail closed): the KRE must not release a key it cannot record.
//! - [`AnonymousTally`]: refusals before any authenticated step are counted per deny code
//!   and recorded as one [`AuditEvent::AnonymousRefusals`] entry per period, appended with
//!   [`AuditLog::append_anonymous`] from the non-release reserve: an unauthenticated flood
//!   costs at most one entry a period and never blocks a release.
//! - [`AuditSigner`] and [`Checkpoint`]: `(seq, chain head, time)` signed with a P-384 key
//!   generated inside the KRE, bound to the KRE's attestation document.
//! - [`Receipt`]: what a client keeps of each release, signed by the same key: the chain, the
//!   sequence number and the digest of the release's entry, and the client's document digest.
//!   [`check_receipt`] proves that a stored trail holds a receipt's entry.
//! - [`PolicyReceipt`]: what the pipeline keeps of each policy change once it is durable,
//!   signed by the same key and carrying the document that binds it: the committed
//!   generation that carries the bundle.
//! - Checkpoints, receipts and durability receipts share one signed shape (`signed.rs`): a
//!   body that starts with the chain id, signed under its own domain label, then the key and
//!   the signature, checked in one place.
//! - [`verify_trail`]: the offline check a customer runs; the first broken link is reported
//!   with its own [`TrailError`] variant.
//! - [`AuditHead`] and [`verify_history`]: runs linked across restarts. The sealed state
//!   carries the head the parent had acknowledged when it was exported; a restarted KRE's
//!   [`AuditEvent::ChainLinked`] entry names it, and every gap the links show is named.
//! - [`files`]: the on-disk framing (pure); [`store`]: the parent's append-only directory
//!   (the only part of this module that does I/O, and it never runs inside the KRE).
//!
//! Everything except [`store`] is pure: bytes, an injected time and an injected random
//! source in, values out.

mod anonymous;
mod checkpoint;
mod codec;
mod durable;
mod event;
pub mod files;
mod history;
mod log;
mod receipt;
mod signed;
mod signer;
pub mod store;
mod trail;

pub use anonymous::{AnonymousTally, ANONYMOUS_PERIOD_MS, MAX_TALLY_CODE_LEN, MIN_PERIOD_MS, OTHER_CODE};
pub use checkpoint::{binding_user_data, chain_id_of, Checkpoint, CHECKPOINT_DOMAIN, SIGNED_BODY_LEN};
pub use codec::DecodeError;
pub use durable::{
    DurablePolicy, PolicyReceipt, PolicyReceiptError, MAX_POLICY_RECEIPT_LEN, POLICY_RECEIPT_BODY_LEN,
    POLICY_RECEIPT_DOMAIN,
};
pub use event::{entry_digest, AuditEntry, AuditEvent, AuditHead, Requester, ENTRY_DOMAIN};
pub use history::{verify_history, HistoryGap, HistoryReport, HistoryRun};
pub use log::{AuditConfig, AuditLog, AuditStatus, FOLLOWER_CHECKPOINT_EVERY_MS};
pub use receipt::{check_receipt, Receipt, ReceiptError, RECEIPT_BODY_LEN, RECEIPT_DOMAIN, RECEIPT_LEN};
pub use signer::AuditSigner;
pub use trail::{verify_trail, verify_trail_with, NotAttested, TrailError, TrailOptions, TrailSummary};

/// Version byte that starts every entry and checkpoint.
pub const FORMAT_VERSION: u8 = 1;
/// Largest encoded entry.
pub const MAX_ENTRY_LEN: usize = 8 * 1024;
/// Largest encoded checkpoint (the signed body, key, signature and binding document).
pub const MAX_CHECKPOINT_LEN: usize = 21 * 1024;
/// Largest reason / detail / value text in an entry.
pub const MAX_TEXT: usize = 1024;
/// Most key ids in one entry (as in a Release).
pub const MAX_KEYS: usize = 16;
/// Most (deny code, count) pairs in one `anonymous_refusals` entry.
pub const MAX_ANONYMOUS_CODES: usize = 32;
/// Most PCRs in one entry.
pub const MAX_PCRS: usize = 32;
/// Largest binding attestation document (the verifier's own limit).
pub const MAX_BINDING_DOCUMENT: usize = keygate_attestation::cose::MAX_DOCUMENT;
pub use crate::binding::CHAIN_DOMAIN;

/// Why the KRE could not record or sign. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The buffer is full because the parent has not collected and acknowledged entries.
    /// The KRE fails closed: a release that cannot be recorded is not made.
    #[error("audit buffer full ({buffered} entries, {bytes} bytes unacknowledged): refusing to record, releases fail closed until the parent collects the trail")]
    BufferFull {
        /// Entries waiting for acknowledgement.
        buffered: usize,
        /// Their size.
        bytes: usize,
    },
    /// An event field exceeds its limit or is not encodable (a bug in the caller).
    #[error("audit event not encodable: {0}")]
    Encode(DecodeError),
    /// The parent acknowledged a sequence number that was never appended.
    #[error("acknowledgement for seq {acked} beyond the last entry {last}")]
    AckBeyondHead {
        /// Acknowledged.
        acked: u64,
        /// Last appended.
        last: u64,
    },
    /// Nothing has been appended yet: there is no head to sign.
    #[error("no entry to checkpoint yet")]
    NothingToCheckpoint,
    /// The signer has no binding attestation document yet.
    #[error("checkpoint key not bound to an attestation document yet")]
    Unbound,
    /// The binding document is empty or larger than the limit.
    #[error("binding attestation document is {len} bytes (1..={max} allowed)")]
    BindingSize {
        /// Its size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Key generation or signing failed.
    #[error("checkpoint key: {0}")]
    Crypto(&'static str),
    /// The NSM could not provide randomness or the binding document.
    #[error("NSM: {0}")]
    Nsm(keygate_attestation::NsmError),
    /// The sequence counter would overflow (never in practice).
    #[error("sequence number overflow")]
    SequenceOverflow,
}
