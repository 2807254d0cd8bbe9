//! The messages of every channel: their type bytes, payload layouts, limits and strict
//! encoding and decoding (`docs/protocol.md`, "Messages"). Payloads are typed: ids are
//! [`Id`]s, a `Released`'s receipt a [`Receipt`].

use super::deny::DenyCode;
use super::frame::{self, WireError, MAX_FRAME, MAX_KEYS, MAX_REASON, MAX_RELEASED, NONCE_LEN};
use crate::audit::{Receipt, RECEIPT_LEN};
use crate::codec::{Id, Reader, MAX_ID};
use crate::crypto::keys::{WrappedKey, POINT_LEN};

/// Declares the message types in one table: each type byte's constant in [`ty`], its name
/// ([`type_name`], the variant's name) and the [`Message`] variant that carries it
/// ([`Message::type_byte`]).
macro_rules! message_types {
    ($($variant:ident = $constant:ident = $byte:literal,)*) => {
        /// The type bytes of the messages (the second byte of every frame body).
        #[allow(missing_docs)]
        pub mod ty {
            $(pub const $constant: u8 = $byte;)*
        }

        /// The message name of a type byte (`None` for a byte that is no message type).
        pub fn type_name(t: u8) -> Option<&'static str> {
            match t {
                $(ty::$constant => Some(stringify!($variant)),)*
                _ => None,
            }
        }

        impl Message {
            /// The message's type byte on the wire.
            pub(super) fn type_byte(&self) -> u8 {
                match self {
                    $(Message::$variant { .. } => ty::$constant,)*
                }
            }
        }
    };
}

message_types! {
    Hello = HELLO = 1,
    Challenge = CHALLENGE = 2,
    Release = RELEASE = 3,
    Released = RELEASED = 4,
    Denied = DENIED = 5,
    PolicyPush = POLICY_PUSH = 6,
    PolicyAccepted = POLICY_ACCEPTED = 7,
    AuditPull = AUDIT_PULL = 8,
    AuditBatch = AUDIT_BATCH = 9,
    AuditAck = AUDIT_ACK = 10,
    AuditAcked = AUDIT_ACKED = 11,
    Status = STATUS = 12,
    StatusReport = STATUS_REPORT = 13,
    StatePoll = STATE_POLL = 14,
    StateReport = STATE_REPORT = 15,
    StateGenesis = STATE_GENESIS = 16,
    StateLoad = STATE_LOAD = 17,
    StateCommit = STATE_COMMIT = 18,
    StateCommitted = STATE_COMMITTED = 19,
    UnsealHello = UNSEAL_HELLO = 20,
    UnsealOffer = UNSEAL_OFFER = 21,
    UnsealShare = UNSEAL_SHARE = 22,
    UnsealProgress = UNSEAL_PROGRESS = 23,
    ReshareStart = RESHARE_START = 24,
    AuditWait = AUDIT_WAIT = 25,
    PolicyDurableWait = POLICY_DURABLE_WAIT = 26,
    PolicyDurable = POLICY_DURABLE = 27,
    JoinStart = JOIN_START = 28,
    JoinFinish = JOIN_FINISH = 29,
    StateAdopt = STATE_ADOPT = 30,
}

/// The largest body (version and type bytes included) a request of type `t` can have: what the
/// server reader checks against the declared length before it allocates anything (a Hello is
/// 34 bytes; only a policy bundle, a stored state and a custodian set may use a whole frame).
/// `None` for a type that is no request.
pub fn max_request_body(t: u8) -> Option<usize> {
    const HEAD: usize = 2;
    const STR8_ID: usize = 1 + MAX_ID;
    Some(match t {
        ty::HELLO | ty::UNSEAL_HELLO => HEAD + NONCE_LEN,
        ty::RELEASE => HEAD + STR8_ID + 1 + MAX_KEYS * STR8_ID + 2 + keygate_attestation::cose::MAX_DOCUMENT,
        ty::AUDIT_PULL => HEAD + 8 + 2,
        ty::AUDIT_WAIT => HEAD + 8 + 2 + 2,
        ty::POLICY_DURABLE_WAIT => HEAD + 8 + 48 + 2,
        ty::AUDIT_ACK => HEAD + 8,
        ty::STATUS | ty::STATE_POLL | ty::STATE_GENESIS | ty::JOIN_START => HEAD,
        ty::STATE_COMMIT => HEAD + 8 + 48,
        ty::UNSEAL_SHARE => HEAD + UNSEAL_SHARE_LEN,
        ty::POLICY_PUSH | ty::STATE_LOAD | ty::RESHARE_START | ty::JOIN_FINISH | ty::STATE_ADOPT => MAX_FRAME,
        _ => return None,
    })
}

// Every request's largest body fits one frame.
const _: () =
    assert!(2 + 1 + MAX_ID + 1 + MAX_KEYS * (1 + MAX_ID) + 2 + keygate_attestation::cose::MAX_DOCUMENT <= MAX_FRAME);

/// Length of a custodian's unseal share message (`custody::UNSEAL_SHARE_LEN`).
pub const UNSEAL_SHARE_LEN: usize = crate::state::custody::UNSEAL_SHARE_LEN;

/// The KRE's durable-state report (answer to StatePoll, StateGenesis and StateLoad).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateReport {
    /// 1 awaiting state, 2 unsealing, 3 serving (`vault::Phase::code`); 0: this KRE runs
    /// without custodians (ephemeral KEKs, nothing to store).
    pub phase: u8,
    /// The generation in use (0 before serving).
    pub committed_generation: u64,
    /// The generation being unsealed (0 when not unsealing).
    pub unsealing_generation: u64,
    /// Shares accepted in the unseal session.
    pub shares_accepted: u8,
    /// M.
    pub threshold: u8,
    /// Digest of the configured custodian set.
    pub set_digest: [u8; 48],
    /// The generation the parent should store now (0: nothing to store).
    pub export_generation: u64,
    /// Its sealed blob (empty when nothing to store).
    pub blob: Vec<u8>,
    /// The shares file (sent with every export).
    pub shares: Vec<u8>,
    /// The genesis attestation over the shares file (sent with every export).
    pub genesis_attestation: Vec<u8>,
}

/// Most audit entries in one batch.
pub const MAX_AUDIT_BATCH: usize = 1024;
/// Longest wait an [`Message::AuditWait`] may ask for, ms.
pub const MAX_AUDIT_WAIT_MS: u16 = 5000;
/// Longest wait a [`Message::PolicyDurableWait`] may ask for, ms.
pub const MAX_DURABLE_WAIT_MS: u16 = 5000;

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → KRE: opens the handshake.
    Hello {
        /// 32 random bytes; the KRE's attestation document carries them as its `nonce`.
        client_nonce: [u8; NONCE_LEN],
    },
    /// KRE → client: the challenge and the KRE's own attestation.
    Challenge {
        /// 32 random bytes, single use; the client's attestation must carry them as `nonce`.
        server_nonce: [u8; NONCE_LEN],
        /// The KRE's attestation document (`nonce` = client_nonce).
        kre_attestation: Vec<u8>,
    },
    /// Client → KRE: the key request with the client's attestation.
    Release {
        /// The cluster whose keys are requested.
        cluster_id: Id,
        /// 1–16 key ids.
        key_ids: Vec<Id>,
        /// The client's attestation document.
        attestation: Vec<u8>,
    },
    /// KRE → client: the wrapped keys and the audit receipt of the release.
    Released {
        /// The KRE's ephemeral P-384 public key (uncompressed).
        ephemeral_point: [u8; POINT_LEN],
        /// One entry per requested key id, in request order.
        keys: Vec<WrappedKey>,
        /// The release's audit entry (chain, seq, digest), signed by the KRE's audit key; every
        /// key's wrap binds its bytes (`keys::wrap_bound`), so only the KRE that wrapped the
        /// keys can have chosen it.
        receipt: Box<Receipt>,
    },
    /// Pipeline → KRE (through the parent): a signed policy bundle.
    PolicyPush {
        /// The bundle file's bytes (`docs/policy.md`).
        bundle: Vec<u8>,
    },
    /// KRE → pipeline: the bundle is accepted.
    PolicyAccepted {
        /// Its version.
        version: u64,
        /// SHA-384 of its body.
        digest: [u8; 48],
        /// When it is fully in force (ms since epoch); the push time when it only tightens.
        activates_at_ms: u64,
    },
    /// Parent → KRE: send audit entries after `after_seq`.
    AuditPull {
        /// The last sequence number the parent has stored (0: none).
        after_seq: u64,
        /// Most entries wanted.
        max: u16,
    },
    /// Parent → KRE: as [`Message::AuditPull`], but when no entry follows `after_seq` the KRE
    /// answers once one does, or after `wait_ms` (at most [`MAX_AUDIT_WAIT_MS`]) with an empty
    /// batch: the parent's follower waits here, so that a step waiting for its entry to be
    /// stored is stored at once.
    AuditWait {
        /// The last sequence number the parent has stored (0: none).
        after_seq: u64,
        /// Most entries wanted.
        max: u16,
        /// Longest wait for a new entry, ms.
        wait_ms: u16,
    },
    /// Pipeline (through the parent) → KRE: answer once the sealed state the parent committed
    /// carries policy bundle `(version, digest)`, or after `wait_ms` (at most
    /// [`MAX_DURABLE_WAIT_MS`]) with `policy_not_durable`.
    PolicyDurableWait {
        /// The bundle's version.
        version: u64,
        /// The bundle's digest.
        digest: [u8; 48],
        /// Longest wait, ms.
        wait_ms: u16,
    },
    /// KRE → pipeline: the bundle is durable; the receipt (`audit::PolicyReceipt`, signed by the
    /// KRE's attested audit key) names the committed generation that carries it.
    PolicyDurable {
        /// The encoded durability receipt.
        receipt: Vec<u8>,
    },
    /// KRE → parent: audit entries (canonical bytes, `docs/audit.md`) and, when the batch
    /// reaches the head of the chain, a checkpoint signed now.
    AuditBatch {
        /// Entries in sequence order.
        entries: Vec<Vec<u8>>,
        /// A checkpoint over the last entry of the batch (empty when the batch is not the head).
        checkpoint: Vec<u8>,
    },
    /// Parent → KRE: entries up to `up_to_seq` are durably stored.
    AuditAck {
        /// Highest stored sequence number.
        up_to_seq: u64,
    },
    /// KRE → parent: acknowledgement applied.
    AuditAcked {
        /// Entries acknowledged up to here.
        up_to_seq: u64,
        /// Entries still buffered.
        buffered: u32,
    },
    /// Anyone → KRE: report status.
    Status,
    /// KRE → requester: status as a JSON object (`docs/audit.md`, `docs/protocol.md`).
    StatusReport {
        /// UTF-8 JSON.
        json: String,
    },
    /// Parent → KRE: report the durable state; carries the state to store, if any.
    StatePoll,
    /// KRE → parent: the durable state.
    StateReport(Box<StateReport>),
    /// Parent → KRE (awaiting state, no stored state exists): create the state (genesis).
    StateGenesis,
    /// Parent → KRE (awaiting state): the stored state, to unseal.
    StateLoad {
        /// The sealed blob.
        blob: Vec<u8>,
        /// The shares file.
        shares: Vec<u8>,
        /// The genesis attestation.
        genesis_attestation: Vec<u8>,
        /// Ask the custodians for a cold start: a member KRE of a cluster then serves the
        /// unsealed state without a serving member's confirmation (`docs/cluster.md`). The
        /// unseal offer states it, and a custodian gives its share to it only when told to.
        cold_start: bool,
    },
    /// Parent → KRE (awaiting state): start a join; the answer is this KRE's JoinRequest frame
    /// (the member family, `docs/cluster.md`), for the parent to carry to a serving member.
    /// The JoinFinish must follow on the same connection.
    JoinStart,
    /// Parent → KRE, after its JoinStart on the same connection: the serving member's answer
    /// and the stored state of the generation it vouched for. Answered with a StateReport.
    JoinFinish {
        /// The serving member's answer frame body (a JoinOffer, or its Denied).
        offer: Vec<u8>,
        /// The stored sealed blob of the offered generation.
        blob: Vec<u8>,
        /// The shares file stored with it.
        shares: Vec<u8>,
        /// The genesis attestation stored with it.
        genesis_attestation: Vec<u8>,
    },
    /// Parent → KRE: the exported generation is stored durably and was read back.
    StateCommit {
        /// Its generation.
        generation: u64,
        /// SHA-384 of the blob as stored and read back.
        blob_sha384: [u8; 48],
    },
    /// Parent → KRE (serving): a newer generation another member committed to the shared
    /// store, to adopt (`docs/cluster.md`). Answered with a StateReport.
    StateAdopt {
        /// The sealed blob as stored.
        blob: Vec<u8>,
    },
    /// KRE → parent: the generation is now in use.
    StateCommitted {
        /// The generation.
        generation: u64,
    },
    /// Custodian → KRE: start an unseal step with a fresh nonce.
    UnsealHello {
        /// The custodian's nonce (the KRE's attestation carries it).
        client_nonce: [u8; NONCE_LEN],
    },
    /// KRE → custodian: the KRE's attestation (`public_key` = K, `user_data` binding the
    /// session) and what the custodian needs to check and act.
    UnsealOffer {
        /// The KRE's attestation document.
        attestation: Vec<u8>,
        /// The session nonce.
        unseal_nonce: [u8; NONCE_LEN],
        /// The generation being unsealed.
        generation: u64,
        /// The shares file.
        shares: Vec<u8>,
        /// The genesis attestation over the shares file.
        genesis_attestation: Vec<u8>,
        /// Empty for an unseal; for a reshare, the new custodian set (`vault::encode_set`)
        /// that this custodian's share would authorize.
        reshare_to: Vec<u8>,
        /// SHA-384 of the exact sealed blob being unsealed (for a reshare: the committed one),
        /// bound by the attestation's `user_data`; custodians record it with the generation.
        blob_sha384: [u8; 48],
        /// A cold start: the KRE will serve without a member's confirmation (bound by the
        /// attestation's `user_data`).
        cold_start: bool,
    },
    /// Operator → serving KRE: reshare the state key to a new custodian set; a quorum of the
    /// current custodians authorizes it by proving their shares (UnsealHello/UnsealShare).
    ReshareStart {
        /// The new set (`vault::encode_set`).
        set: Vec<u8>,
    },
    /// Custodian → KRE: its share, re-encrypted to K.
    UnsealShare {
        /// `custody::UnsealShare::encode`.
        share: Vec<u8>,
    },
    /// KRE → custodian: the share was accepted.
    UnsealProgress {
        /// Shares accepted so far (equal to `need` once unsealed).
        have: u8,
        /// M.
        need: u8,
        /// Whether the KRE now serves.
        serving: bool,
        /// The generation.
        generation: u64,
    },
    /// KRE → client: refusal, with the check that failed.
    Denied {
        /// Machine-readable reason.
        code: DenyCode,
        /// Human-readable detail (never secret).
        reason: String,
    },
}

impl Message {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte()).unwrap_or("?")
    }
}

/// An id in a frame: text that is not UTF-8 is [`WireError::BadText`], text that is not an
/// id [`WireError::BadId`].
fn id(r: &mut Reader<'_>, field: &'static str) -> Result<Id, WireError> {
    Ok(Id::new(r.str8(field)?)?)
}

fn check_key_ids(ids: &[Id]) -> Result<(), WireError> {
    if ids.is_empty() || ids.len() > MAX_KEYS {
        return Err(WireError::BadKeyCount(ids.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    if !ids.iter().all(|k| seen.insert(k)) {
        return Err(WireError::DuplicateKeyId);
    }
    Ok(())
}

impl Message {
    /// Encodes the message as a complete frame (length prefix included).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut w = frame::body(self.type_byte());
        match self {
            Message::Hello { client_nonce } => {
                w.bytes(client_nonce);
            }
            Message::Challenge { server_nonce, kre_attestation } => {
                w.bytes(server_nonce);
                w.bytes16("kre_attestation", kre_attestation)?;
            }
            Message::Release { cluster_id, key_ids, attestation } => {
                check_key_ids(key_ids)?;
                w.id(cluster_id);
                w.u8(u8::try_from(key_ids.len()).map_err(|_| WireError::TooLong)?);
                for k in key_ids {
                    w.id(k);
                }
                w.bytes16("attestation", attestation)?;
            }
            Message::Released { ephemeral_point, keys, receipt } => {
                if keys.len() > MAX_RELEASED {
                    return Err(WireError::BadKeyCount(keys.len()));
                }
                w.bytes(ephemeral_point);
                w.u8(u8::try_from(keys.len()).map_err(|_| WireError::TooLong)?);
                for k in keys {
                    w.id(&k.key_id);
                    w.bytes(&k.version.to_be_bytes());
                    w.bytes16("sealed", &k.sealed)?;
                }
                w.bytes(&receipt.to_bytes());
            }
            Message::PolicyPush { bundle } => {
                w.bytes16("bundle", bundle)?;
            }
            Message::PolicyAccepted { version, digest, activates_at_ms } => {
                w.bytes(&version.to_be_bytes());
                w.bytes(digest);
                w.bytes(&activates_at_ms.to_be_bytes());
            }
            Message::AuditPull { after_seq, max } => {
                w.bytes(&after_seq.to_be_bytes());
                w.bytes(&max.to_be_bytes());
            }
            Message::AuditWait { after_seq, max, wait_ms } => {
                w.bytes(&after_seq.to_be_bytes());
                w.bytes(&max.to_be_bytes());
                w.bytes(&wait_ms.to_be_bytes());
            }
            Message::PolicyDurableWait { version, digest, wait_ms } => {
                w.bytes(&version.to_be_bytes());
                w.bytes(digest);
                w.bytes(&wait_ms.to_be_bytes());
            }
            Message::PolicyDurable { receipt } => w.bytes16("receipt", receipt)?,
            Message::AuditBatch { entries, checkpoint } => {
                if entries.len() > MAX_AUDIT_BATCH {
                    return Err(WireError::TooLong);
                }
                w.bytes(&u16::try_from(entries.len()).map_err(|_| WireError::TooLong)?.to_be_bytes());
                for e in entries {
                    w.bytes16("entries", e)?;
                }
                w.bytes16("checkpoint", checkpoint)?;
            }
            Message::AuditAck { up_to_seq } => {
                w.bytes(&up_to_seq.to_be_bytes());
            }
            Message::AuditAcked { up_to_seq, buffered } => {
                w.bytes(&up_to_seq.to_be_bytes());
                w.bytes(&buffered.to_be_bytes());
            }
            Message::Status => {}
            Message::StatusReport { json } => {
                w.bytes16("json", json.as_bytes())?;
            }
            Message::StatePoll => {}
            Message::StateReport(r) => {
                w.u8(r.phase);
                w.bytes(&r.committed_generation.to_be_bytes());
                w.bytes(&r.unsealing_generation.to_be_bytes());
                w.u8(r.shares_accepted);
                w.u8(r.threshold);
                w.bytes(&r.set_digest);
                w.bytes(&r.export_generation.to_be_bytes());
                w.bytes16("blob", &r.blob)?;
                w.bytes16("shares", &r.shares)?;
                w.bytes16("genesis_attestation", &r.genesis_attestation)?;
            }
            Message::StateGenesis | Message::JoinStart => {}
            Message::JoinFinish { offer, blob, shares, genesis_attestation } => {
                w.bytes16("offer", offer)?;
                w.bytes16("blob", blob)?;
                w.bytes16("shares", shares)?;
                w.bytes16("genesis_attestation", genesis_attestation)?;
            }
            Message::StateLoad { blob, shares, genesis_attestation, cold_start } => {
                w.bytes16("blob", blob)?;
                w.bytes16("shares", shares)?;
                w.bytes16("genesis_attestation", genesis_attestation)?;
                w.flag(*cold_start);
            }
            Message::StateCommit { generation, blob_sha384 } => {
                w.bytes(&generation.to_be_bytes());
                w.bytes(blob_sha384);
            }
            Message::StateCommitted { generation } => {
                w.bytes(&generation.to_be_bytes());
            }
            Message::StateAdopt { blob } => {
                w.bytes16("blob", blob)?;
            }
            Message::UnsealHello { client_nonce } => {
                w.bytes(client_nonce);
            }
            Message::UnsealOffer {
                attestation,
                unseal_nonce,
                generation,
                shares,
                genesis_attestation,
                reshare_to,
                blob_sha384,
                cold_start,
            } => {
                w.bytes16("attestation", attestation)?;
                w.bytes(unseal_nonce);
                w.bytes(&generation.to_be_bytes());
                w.bytes16("shares", shares)?;
                w.bytes16("genesis_attestation", genesis_attestation)?;
                w.bytes16("reshare_to", reshare_to)?;
                w.bytes(blob_sha384);
                w.flag(*cold_start);
            }
            Message::ReshareStart { set } => {
                w.bytes16("set", set)?;
            }
            Message::UnsealShare { share } => {
                if share.len() != UNSEAL_SHARE_LEN {
                    return Err(WireError::TooLong);
                }
                w.bytes(share);
            }
            Message::UnsealProgress { have, need, serving, generation } => {
                w.u8(*have);
                w.u8(*need);
                w.u8(u8::from(*serving));
                w.bytes(&generation.to_be_bytes());
            }
            Message::Denied { code, reason } => {
                w.bytes(&code.to_u16().to_be_bytes());
                let mut r = reason.as_str();
                while r.len() > MAX_REASON {
                    // Truncate on a character boundary.
                    let mut cut = MAX_REASON;
                    while !r.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    r = &r[..cut];
                }
                w.bytes16("reason", r.as_bytes())?;
            }
        }
        frame::seal(w.into_bytes())
    }

    /// Decodes a frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let (t, mut r) = frame::open(body)?;
        let m = match t {
            ty::HELLO => Message::Hello { client_nonce: r.array("client_nonce")? },
            ty::CHALLENGE => Message::Challenge {
                server_nonce: r.array("server_nonce")?,
                kre_attestation: r.bytes16("kre_attestation")?.to_vec(),
            },
            ty::RELEASE => {
                let cluster_id = id(&mut r, "cluster_id")?;
                let n = usize::from(r.u8("key count")?);
                if n == 0 || n > MAX_KEYS {
                    return Err(WireError::BadKeyCount(n));
                }
                let key_ids = (0..n).map(|_| id(&mut r, "key_id")).collect::<Result<Vec<_>, _>>()?;
                check_key_ids(&key_ids)?;
                Message::Release { cluster_id, key_ids, attestation: r.bytes16("attestation")?.to_vec() }
            }
            ty::RELEASED => {
                let ephemeral_point = r.array("ephemeral_point")?;
                let n = usize::from(r.u8("key count")?);
                if n > MAX_RELEASED {
                    return Err(WireError::BadKeyCount(n));
                }
                let keys = (0..n)
                    .map(|_| {
                        Ok(WrappedKey {
                            key_id: id(&mut r, "key_id")?,
                            version: r.u32("version")?,
                            sealed: r.bytes16("sealed")?.to_vec(),
                        })
                    })
                    .collect::<Result<Vec<_>, WireError>>()?;
                let receipt = Receipt::decode(r.take(RECEIPT_LEN, "receipt")?).map_err(|_| WireError::BadReceipt)?;
                Message::Released { ephemeral_point, keys, receipt: Box::new(receipt) }
            }
            ty::POLICY_PUSH => Message::PolicyPush { bundle: r.bytes16("bundle")?.to_vec() },
            ty::POLICY_ACCEPTED => Message::PolicyAccepted {
                version: r.u64("version")?,
                digest: r.array("digest")?,
                activates_at_ms: r.u64("activates_at_ms")?,
            },
            ty::AUDIT_PULL => Message::AuditPull { after_seq: r.u64("after_seq")?, max: r.u16("max")? },
            ty::AUDIT_WAIT => {
                Message::AuditWait { after_seq: r.u64("after_seq")?, max: r.u16("max")?, wait_ms: r.u16("wait_ms")? }
            }
            ty::POLICY_DURABLE_WAIT => Message::PolicyDurableWait {
                version: r.u64("version")?,
                digest: r.array("digest")?,
                wait_ms: r.u16("wait_ms")?,
            },
            ty::POLICY_DURABLE => Message::PolicyDurable { receipt: r.bytes16("receipt")?.to_vec() },
            ty::AUDIT_BATCH => {
                let n = usize::from(r.u16("entry count")?);
                if n > MAX_AUDIT_BATCH {
                    return Err(WireError::TooLong);
                }
                let entries =
                    (0..n).map(|_| r.bytes16("entries").map(<[u8]>::to_vec)).collect::<Result<Vec<_>, _>>()?;
                Message::AuditBatch { entries, checkpoint: r.bytes16("checkpoint")?.to_vec() }
            }
            ty::AUDIT_ACK => Message::AuditAck { up_to_seq: r.u64("up_to_seq")? },
            ty::AUDIT_ACKED => Message::AuditAcked { up_to_seq: r.u64("up_to_seq")?, buffered: r.u32("buffered")? },
            ty::STATUS => Message::Status,
            ty::STATUS_REPORT => Message::StatusReport {
                json: std::str::from_utf8(r.bytes16("json")?).map_err(|_| WireError::BadText)?.to_owned(),
            },
            ty::STATE_POLL => Message::StatePoll,
            ty::STATE_REPORT => Message::StateReport(Box::new(StateReport {
                phase: r.u8("phase")?,
                committed_generation: r.u64("committed_generation")?,
                unsealing_generation: r.u64("unsealing_generation")?,
                shares_accepted: r.u8("shares_accepted")?,
                threshold: r.u8("threshold")?,
                set_digest: r.array("set_digest")?,
                export_generation: r.u64("export_generation")?,
                blob: r.bytes16("blob")?.to_vec(),
                shares: r.bytes16("shares")?.to_vec(),
                genesis_attestation: r.bytes16("genesis_attestation")?.to_vec(),
            })),
            ty::STATE_GENESIS => Message::StateGenesis,
            ty::JOIN_START => Message::JoinStart,
            ty::JOIN_FINISH => Message::JoinFinish {
                offer: r.bytes16("offer")?.to_vec(),
                blob: r.bytes16("blob")?.to_vec(),
                shares: r.bytes16("shares")?.to_vec(),
                genesis_attestation: r.bytes16("genesis_attestation")?.to_vec(),
            },
            ty::STATE_LOAD => Message::StateLoad {
                blob: r.bytes16("blob")?.to_vec(),
                shares: r.bytes16("shares")?.to_vec(),
                genesis_attestation: r.bytes16("genesis_attestation")?.to_vec(),
                cold_start: r.flag("cold_start")?,
            },
            ty::STATE_COMMIT => {
                Message::StateCommit { generation: r.u64("generation")?, blob_sha384: r.array("blob_sha384")? }
            }
            ty::STATE_COMMITTED => Message::StateCommitted { generation: r.u64("generation")? },
            ty::STATE_ADOPT => Message::StateAdopt { blob: r.bytes16("blob")?.to_vec() },
            ty::UNSEAL_HELLO => Message::UnsealHello { client_nonce: r.array("client_nonce")? },
            ty::UNSEAL_OFFER => Message::UnsealOffer {
                attestation: r.bytes16("attestation")?.to_vec(),
                unseal_nonce: r.array("unseal_nonce")?,
                generation: r.u64("generation")?,
                shares: r.bytes16("shares")?.to_vec(),
                genesis_attestation: r.bytes16("genesis_attestation")?.to_vec(),
                reshare_to: r.bytes16("reshare_to")?.to_vec(),
                blob_sha384: r.array("blob_sha384")?,
                cold_start: r.flag("cold_start")?,
            },
            ty::RESHARE_START => Message::ReshareStart { set: r.bytes16("set")?.to_vec() },
            ty::UNSEAL_SHARE => Message::UnsealShare { share: r.take(UNSEAL_SHARE_LEN, "share")?.to_vec() },
            ty::UNSEAL_PROGRESS => {
                let (have, need) = (r.u8("have")?, r.u8("need")?);
                let serving = match r.u8("serving")? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadFlag),
                };
                Message::UnsealProgress { have, need, serving, generation: r.u64("generation")? }
            }
            ty::DENIED => {
                let code = DenyCode::from_u16(r.u16("code")?);
                let reason = r.bytes16("reason")?;
                if reason.len() > MAX_REASON {
                    return Err(WireError::TooLong);
                }
                let reason = std::str::from_utf8(reason).map_err(|_| WireError::BadText)?.to_owned();
                Message::Denied { code, reason }
            }
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_id as id;
    use crate::wire::frame_len;

    /// A structurally valid receipt (the codec does not check signatures).
    fn receipt() -> Receipt {
        Receipt::assemble([6; 48], 3, [7; 48], [8; 48], [4; POINT_LEN], [9; 96]).expect("receipt")
    }

    /// An unseal offer whose byte fields have these lengths (a non-empty `reshare_to`: a reshare).
    fn unseal_offer(attestation: usize, shares: usize, genesis: usize, reshare_to: usize) -> Message {
        Message::UnsealOffer {
            attestation: vec![1; attestation],
            unseal_nonce: [2; 32],
            generation: 9,
            shares: vec![3; shares],
            genesis_attestation: vec![4; genesis],
            reshare_to: vec![5; reshare_to],
            blob_sha384: [6; 48],
            cold_start: reshare_to == 0,
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello { client_nonce: [1; 32] },
            Message::Challenge { server_nonce: [2; 32], kre_attestation: vec![3; 4000] },
            Message::Release {
                cluster_id: id("prod-1"),
                key_ids: vec![id("etcd"), id("etcd.v2")],
                attestation: vec![4; 4500],
            },
            Message::Released {
                ephemeral_point: [4; 97],
                keys: vec![WrappedKey { key_id: id("etcd"), version: 7, sealed: vec![5; 48] }],
                receipt: Box::new(receipt()),
            },
            Message::Denied { code: DenyCode::ImageNotAllowed, reason: "PCR0 differs".into() },
            Message::PolicyPush { bundle: vec![9; 3000] },
            Message::PolicyAccepted { version: 7, digest: [8; 48], activates_at_ms: 1_795_478_400_000 },
            Message::AuditPull { after_seq: 9, max: 100 },
            Message::AuditWait { after_seq: 9, max: 100, wait_ms: 1000 },
            Message::PolicyDurableWait { version: 3, digest: [5; 48], wait_ms: 1000 },
            Message::PolicyDurable { receipt: vec![6; 5000] },
            Message::AuditBatch { entries: vec![vec![1; 300], vec![2; 10]], checkpoint: vec![3; 5000] },
            Message::AuditBatch { entries: vec![], checkpoint: vec![] },
            Message::AuditAck { up_to_seq: 12 },
            Message::AuditAcked { up_to_seq: 12, buffered: 3 },
            Message::Status,
            Message::StatusReport { json: "{}".into() },
            Message::StatePoll,
            Message::StateReport(Box::new(StateReport {
                phase: 3,
                committed_generation: 4,
                unsealing_generation: 0,
                shares_accepted: 0,
                threshold: 2,
                set_digest: [6; 48],
                export_generation: 5,
                blob: vec![1; 900],
                shares: vec![2; 800],
                genesis_attestation: vec![3; 4000],
            })),
            Message::StateGenesis,
            Message::StateLoad {
                blob: vec![1; 40],
                shares: vec![2; 30],
                genesis_attestation: vec![3; 20],
                cold_start: false,
            },
            Message::StateLoad {
                blob: vec![1; 4],
                shares: vec![2; 3],
                genesis_attestation: vec![3; 2],
                cold_start: true,
            },
            Message::JoinStart,
            Message::JoinFinish {
                offer: vec![1; 500],
                blob: vec![2; 40],
                shares: vec![3; 30],
                genesis_attestation: vec![4; 20],
            },
            Message::StateCommit { generation: 5, blob_sha384: [7; 48] },
            Message::StateCommitted { generation: 5 },
            Message::StateAdopt { blob: vec![4; 50] },
            Message::UnsealHello { client_nonce: [8; 32] },
            unseal_offer(4600, 700, 4600, 0),
            unseal_offer(10, 7, 4, 99),
            Message::ReshareStart { set: vec![2, 1, 4] },
            Message::UnsealShare { share: vec![5; UNSEAL_SHARE_LEN] },
            Message::UnsealProgress { have: 1, need: 2, serving: false, generation: 9 },
            Message::UnsealProgress { have: 2, need: 2, serving: true, generation: 9 },
        ]
    }

    /// A Released carries exactly one well-formed receipt at its end: none, a short one, a bad
    /// version, sequence 0 or a compressed key are refused.
    #[test]
    fn released_needs_a_well_formed_receipt() {
        let m = Message::Released {
            ephemeral_point: [4; POINT_LEN],
            keys: vec![WrappedKey { key_id: id("k"), version: 1, sealed: vec![5; 48] }],
            receipt: Box::new(receipt()),
        };
        let f = m.encode().expect("encode");
        let body = &f[4..];
        let at = body.len() - RECEIPT_LEN;
        assert_eq!(&body[at..], &receipt().to_bytes()[..]);
        assert_eq!(Message::decode(&body[..at]), Err(WireError::Truncated), "no receipt");
        for (offset, value) in [(0, 2u8), (1 + 48 + 7, 0), (crate::audit::RECEIPT_BODY_LEN, 2)] {
            let mut bad = body.to_vec();
            if offset == 1 + 48 + 7 {
                bad[at + 1 + 48..at + 1 + 48 + 8].fill(value);
            } else {
                bad[at + offset] = value;
            }
            assert_eq!(Message::decode(&bad), Err(WireError::BadReceipt), "receipt byte {offset}");
        }
    }

    #[test]
    fn state_messages_refuse_bad_flags_and_share_lengths() {
        assert_eq!(Message::decode(&[1, 23, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 9]), Err(WireError::BadFlag));
        assert_eq!(Message::UnsealShare { share: vec![0; 10] }.encode(), Err(WireError::TooLong));
        assert_eq!(Message::decode(&[1, 22, 0, 0]), Err(WireError::Truncated));
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let f = m.encode().expect("encode");
            let n = frame_len(f[..4].try_into().expect("prefix")).expect("len");
            assert_eq!(n, f.len() - 4);
            assert_eq!(Message::decode(&f[4..]).expect("decode"), m);
        }
    }

    #[test]
    fn every_truncation_and_extension_fails() {
        for m in samples() {
            let f = m.encode().expect("encode");
            let body = &f[4..];
            for len in 0..body.len() {
                assert!(Message::decode(&body[..len]).is_err(), "{} truncated to {len}", m.name());
            }
            let mut longer = body.to_vec();
            longer.push(0);
            assert_eq!(Message::decode(&longer), Err(WireError::TrailingBytes), "{}", m.name());
        }
    }

    #[test]
    fn malformed_frames_have_precise_errors() {
        assert_eq!(Message::decode(&[2, 1]), Err(WireError::UnsupportedVersion(2)));
        assert_eq!(Message::decode(&[1, 99]), Err(WireError::UnknownType(99)));
        assert_eq!(Message::decode(&[1]), Err(WireError::BadLength(1)));
        assert_eq!(frame_len([0, 1, 0, 1]), Err(WireError::BadLength(65537)));
        assert_eq!(frame_len([0, 0, 0, 1]), Err(WireError::BadLength(1)));
        assert_eq!(frame_len([0xff; 4]), Err(WireError::BadLength(usize::try_from(u32::MAX).expect("64-bit"))));
        // Release with zero keys, 17 keys, a bad id, a duplicate id.
        let mut zero = vec![1, 3, 1, b'c', 0];
        zero.extend_from_slice(&[0, 0]);
        assert_eq!(Message::decode(&zero), Err(WireError::BadKeyCount(0)));
        let seventeen = vec![1, 3, 1, b'c', 17];
        assert_eq!(Message::decode(&seventeen), Err(WireError::BadKeyCount(17)));
        let bad_id = vec![1, 3, 2, b'c', b'/', 1, 1, b'k', 0, 0];
        assert_eq!(Message::decode(&bad_id), Err(WireError::BadId));
        let dup = vec![1, 3, 1, b'c', 2, 1, b'k', 1, b'k', 0, 0];
        assert_eq!(Message::decode(&dup), Err(WireError::DuplicateKeyId));
        let bad_utf8 = vec![1, 5, 0, 1, 0, 1, 0xff];
        assert_eq!(Message::decode(&bad_utf8), Err(WireError::BadText));
    }

    #[test]
    fn ids_are_validated() {
        assert!(Id::new("a").is_ok());
        assert!(Id::new(&"a".repeat(64)).is_ok());
        assert_eq!(Id::new("").map_err(WireError::from), Err(WireError::BadId));
        assert_eq!(Id::new(&"a".repeat(65)).map_err(WireError::from), Err(WireError::BadId));
        assert_eq!(Id::new("a b").map_err(WireError::from), Err(WireError::BadId));
        assert_eq!(Id::new("ä").map_err(WireError::from), Err(WireError::BadId));
    }

    #[test]
    fn deny_codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for c in DenyCode::ALL {
            assert_eq!(DenyCode::from_u16(c.to_u16()), *c);
            assert!(seen.insert(c.to_u16()));
        }
        assert_eq!(DenyCode::from_u16(999), DenyCode::Unknown(999));
    }

    #[test]
    fn long_reasons_are_truncated_on_a_char_boundary() {
        let m = Message::Denied { code: DenyCode::Internal, reason: "é".repeat(1000) };
        let f = m.encode().expect("encode");
        match Message::decode(&f[4..]).expect("decode") {
            Message::Denied { reason, .. } => assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn release_key_counts_are_bounded_on_encode_as_on_decode() {
        let ids = |n: usize| (0..n).map(|i| id(&format!("k{i}"))).collect::<Vec<_>>();
        let release = |n| Message::Release { cluster_id: id("c"), key_ids: ids(n), attestation: vec![1] };
        assert_eq!(release(0).encode(), Err(WireError::BadKeyCount(0)));
        assert_eq!(release(17).encode(), Err(WireError::BadKeyCount(17)));
        let sixteen = release(MAX_KEYS).encode().expect("16 keys");
        assert_eq!(Message::decode(&sixteen[4..]), Ok(release(MAX_KEYS)));
        let dup = Message::Release { cluster_id: id("c"), key_ids: vec![id("k"), id("k")], attestation: vec![] };
        assert_eq!(dup.encode(), Err(WireError::DuplicateKeyId));

        // A release answers up to 16 keys with up to 4 versions each: 64 wrapped keys.
        let released = |n: usize| Message::Released {
            ephemeral_point: [4; POINT_LEN],
            keys: (0..n)
                .map(|i| WrappedKey {
                    key_id: id(&format!("k{}", i / 4)),
                    version: u32::try_from(4 - i % 4).expect("small"),
                    sealed: vec![5; 48],
                })
                .collect(),
            receipt: Box::new(receipt()),
        };
        assert_eq!(MAX_RELEASED, 64);
        let full = released(MAX_RELEASED).encode().expect("64 wrapped keys");
        assert_eq!(Message::decode(&full[4..]), Ok(released(MAX_RELEASED)));
        let mut over = full[4..].to_vec();
        over[2 + POINT_LEN] = 65;
        assert_eq!(Message::decode(&over), Err(WireError::BadKeyCount(65)));
        assert_eq!(released(MAX_RELEASED + 1).encode(), Err(WireError::BadKeyCount(65)));
    }

    #[test]
    fn names_and_deny_code_texts_are_the_stable_ones() {
        for m in samples() {
            let debug = format!("{m:?}");
            assert!(debug.starts_with(m.name()) && !m.name().is_empty(), "{} vs {debug}", m.name());
        }
        for c in DenyCode::ALL {
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!(DenyCode::PolicyStale.to_string(), "policy_stale");
        assert_eq!(DenyCode::Unknown(999).to_string(), "unknown(999)");
    }

    #[test]
    fn frames_of_exactly_the_limits_pass_and_one_more_fails() {
        // A body of exactly MAX_FRAME bytes: version, type, length, payload.
        let push = |n: usize| Message::PolicyPush { bundle: vec![7; n] };
        let max = push(MAX_FRAME - 4).encode().expect("a frame of exactly the limit");
        assert_eq!(max.len(), 4 + MAX_FRAME);
        assert_eq!(Message::decode(&max[4..]), Ok(push(MAX_FRAME - 4)));
        assert_eq!(push(MAX_FRAME - 3).encode(), Err(WireError::BadLength(MAX_FRAME + 1)));
        let mut over = max[4..].to_vec();
        over.push(0);
        assert_eq!(Message::decode(&over), Err(WireError::BadLength(MAX_FRAME + 1)));

        // An audit batch of 1024 entries, not 1025.
        let batch = |n: usize| Message::AuditBatch { entries: vec![vec![1]; n], checkpoint: vec![] };
        let full = batch(MAX_AUDIT_BATCH).encode().expect("1024 entries");
        assert_eq!(Message::decode(&full[4..]), Ok(batch(MAX_AUDIT_BATCH)));
        assert_eq!(batch(MAX_AUDIT_BATCH + 1).encode(), Err(WireError::TooLong));
        let mut over = full[4..].to_vec();
        over[2..4].copy_from_slice(&1025u16.to_be_bytes());
        over.extend_from_slice(&[0, 1, 1]);
        assert_eq!(Message::decode(&over), Err(WireError::TooLong));
    }

    #[test]
    fn reasons_of_exactly_the_limit_are_kept_and_longer_ones_cut_before_a_split_character() {
        let denied = |reason: String| {
            let f = Message::Denied { code: DenyCode::Internal, reason }.encode().expect("encode");
            match Message::decode(&f[4..]).expect("decode") {
                Message::Denied { reason, .. } => reason,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(denied("r".repeat(MAX_REASON)), "r".repeat(MAX_REASON));
        // "a" then two-byte characters: byte 1024 falls inside one, so the cut is at 1023.
        let odd = format!("a{}", "é".repeat(600));
        assert_eq!(denied(odd.clone()), odd[..MAX_REASON - 1]);
    }
}
