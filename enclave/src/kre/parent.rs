//! The parent channel's connection: one request, one answer. The parent collects and
//! acknowledges the audit trail, asks for status and durability receipts, pushes policy
//! bundles (as the pipeline's courier) and drives the sealed state (poll, genesis, load,
//! commit, adopt). Decides nothing about releases; trusts nothing the parent says beyond what the
//! policy book, the sealed-state service and the audit log check. Spec: docs/protocol.md,
//! docs/audit.md, docs/durability.md.

use crate::state::vault::Custody;
use crate::wire::{self, Channel, Id, Message, StateReport};

use super::error::KekError;
use super::error::{Denial, Error, Stage};
use super::state::empty_report;
use super::{encode, Env, Event, Kre, Step};

/// The state of a parent connection, named for what it waits for.
#[derive(Debug)]
pub(super) enum ParentConnection {
    /// Any request of the parent channel.
    ExpectRequest,
    /// The JoinFinish of the join this connection started (its session).
    ExpectJoinFinish(Box<crate::kre::joiner::JoinSession>),
    Done,
}

impl ParentConnection {
    /// Whether the connection takes a request of type `t` now.
    pub(super) fn expects(&self, t: u8) -> bool {
        match self {
            Self::ExpectRequest => Channel::of_request_type(t) == Some(Channel::Parent) && t != wire::ty::JOIN_FINISH,
            Self::ExpectJoinFinish(_) => t == wire::ty::JOIN_FINISH,
            Self::Done => false,
        }
    }

    /// What the connection waits for, as refusals name it (`None`: finished).
    pub(super) fn expected(&self) -> Option<&'static str> {
        match self {
            // Named as on every channel: the connection's first frame.
            Self::ExpectRequest => Some("Hello"),
            Self::ExpectJoinFinish(_) => Some("JoinFinish"),
            Self::Done => None,
        }
    }

    /// Handles a decoded request this connection takes.
    pub(super) fn on_message(&mut self, kre: &Kre, msg: Message, env: &mut Env<'_>) -> Result<Step, Denial> {
        let msg = match (std::mem::replace(self, Self::Done), msg) {
            (Self::ExpectRequest, Message::JoinStart) => {
                let (session, reply) = kre.join_start(env)?;
                *self = Self::ExpectJoinFinish(Box::new(session));
                return Ok(Step { reply, close: false, event: Event::State { step: "join-request", generation: 0 } });
            }
            (Self::ExpectJoinFinish(session), Message::JoinFinish { offer, blob, shares, genesis_attestation }) => {
                kre.join_finish(&session, &offer, blob, Custody { shares, genesis_attestation }, env)?;
                return report_step(kre.state_report()?, "join");
            }
            (Self::ExpectRequest, msg) => msg,
            (_, msg) => return Err(Error::NoHandler(msg.name()).into()),
        };
        let now_ms = env.now_ms;
        match msg {
            // A one-shot pull brings the trail up to date (the anonymous aggregate is written
            // now); the follower's continuous rounds leave it to its period, or it would write
            // one aggregate a round.
            Message::AuditPull { after_seq, max } => audit_pull(kre, after_seq, max, now_ms, true),
            Message::AuditWait { after_seq, max, .. } => audit_pull(kre, after_seq, max, now_ms, false),
            Message::AuditAck { up_to_seq } => audit_ack(kre, up_to_seq),
            Message::PolicyDurableWait { version, digest, .. } => policy_durable(kre, version, &digest, now_ms),
            Message::Status => Ok(Step {
                reply: encode(Message::StatusReport { json: kre.status_json_at(Some(now_ms)) }, "status")?,
                close: true,
                event: Event::StatusReported,
            }),
            Message::StatePoll => report_step(kre.state_report()?, "poll"),
            Message::StateGenesis => report_step(state_genesis(kre, now_ms)?, "genesis"),
            Message::StateLoad { blob, shares, genesis_attestation, cold_start } => {
                let mode = kre.unseal_mode(cold_start, now_ms);
                kre.sealed("load")?.load(&kre.audit, blob, Custody { shares, genesis_attestation }, mode, now_ms)?;
                report_step(kre.state_report()?, "load")
            }
            Message::StateCommit { generation, blob_sha384 } => {
                let generation = kre.sealed("commit")?.commit(&kre.audit, generation, &blob_sha384, now_ms)?;
                kre.refresh_durable_policy();
                Ok(Step {
                    reply: encode(Message::StateCommitted { generation }, "commit")?,
                    close: true,
                    event: Event::State { step: "commit", generation },
                })
            }
            Message::StateAdopt { blob } => {
                kre.sealed("adopt")?.adopt(&kre.audit, &blob, now_ms)?;
                // As after an unseal: bundles this member accepted beyond the adopted head,
                // and KEKs its policy names that the adopted state lacks, go to the next export.
                kre.after_unseal(now_ms);
                report_step(kre.state_report()?, "adopt")
            }
            Message::PolicyPush { bundle } if keygate_attestation::freshness::is_timestamp(&bundle) => {
                // A pipeline timestamp rides the same courier as bundles; the answer names the
                // timestamp held afterwards and, as `activates_at_ms`, when it stops counting.
                let t = kre.take_timestamp(&bundle, now_ms)?;
                let (version, digest) = (t.version, t.digest);
                let activates_at_ms = kre.fresh_until(&t, now_ms);
                Ok(Step {
                    reply: encode(Message::PolicyAccepted { version, digest, activates_at_ms }, "timestamp accepted")?,
                    close: true,
                    event: Event::PolicyTimestamp { version, issued_ms: t.issued_ms },
                })
            }
            Message::PolicyPush { bundle } => {
                let r = kre.push_policy(&bundle, now_ms)?;
                let (version, digest, activates_at_ms) = (r.version, r.digest, r.activates_at_ms);
                Ok(Step {
                    reply: encode(Message::PolicyAccepted { version, digest, activates_at_ms }, "policy accepted")?,
                    close: true,
                    event: Event::PolicyAccepted { version, digest, activates_at_ms },
                })
            }
            m => Err(Error::NoHandler(m.name()).into()),
        }
    }
}

/// Genesis: a fresh KRE with no stored state creates it (exported, not yet in use). Clusters
/// whose policy names a later KEK version get it in the next generation (exported once this
/// one is committed).
fn state_genesis(kre: &Kre, now_ms: u64) -> Result<StateReport, Denial> {
    let state = kre.sealed("genesis")?;
    let ids: Vec<Id> = kre.policy.clusters().iter().filter_map(|c| Id::new(c).ok()).collect();
    state.genesis(&kre.audit, &ids, kre.policy_head(), &kre.policy.approvers(), now_ms)?;
    kre.ensure_keks(&kre.policy.schedule(), &[]).map(drop).map_err(|e| keks_denial("genesis", e))?;
    kre.state_report()
}

/// The refusal of a step whose KEKs could not be made (or recorded).
fn keks_denial(step: &'static str, e: KekError) -> Denial {
    Denial::state(step, Error::StateKeks(e))
}

/// Entries after `after_seq` (as many as fit one frame) and, when they reach the head of the
/// chain, a checkpoint over the last one.
fn audit_pull(kre: &Kre, after_seq: u64, max: u16, now_ms: u64, flush: bool) -> Result<Step, Denial> {
    kre.audit.flush_anonymous(now_ms, flush);
    let mut log = kre.audit();
    let wanted = usize::from(max).clamp(1, wire::MAX_AUDIT_BATCH);
    let mut entries = Vec::new();
    let mut size = 0usize;
    let mut last = after_seq;
    for e in log.entries_after(after_seq, wanted) {
        let b = e.bytes();
        // Leave room for the checkpoint (at most 21 KiB) in the 64 KiB frame.
        if size + b.len() + 2 > 40 * 1024 {
            break;
        }
        size += b.len() + 2;
        last = e.seq();
        entries.push(b.to_vec());
    }
    let head = log.status().last_seq;
    // A one-shot pull (`flush`) always ends with a checkpoint at the head; a follower's at
    // most once per FOLLOWER_CHECKPOINT_EVERY_MS (the receipts sign each release meanwhile).
    let due = flush || log.checkpoint_due(now_ms, crate::audit::FOLLOWER_CHECKPOINT_EVERY_MS);
    let checkpoint = if last == head && head > 0 && due {
        log.checkpoint(now_ms).map(|c| c.bytes().to_vec()).map_err(Error::Checkpoint)?
    } else {
        Vec::new()
    };
    let n = entries.len();
    let reply = encode(Message::AuditBatch { entries, checkpoint }, "audit batch")?;
    Ok(Step { reply, close: true, event: Event::AuditPulled { entries: n } })
}

/// The parent has stored entries up to `up_to_seq`: free them from the buffer.
fn audit_ack(kre: &Kre, up_to_seq: u64) -> Result<Step, Denial> {
    let mut log = kre.audit();
    log.ack(up_to_seq).map_err(Error::Ack)?;
    let buffered = u32::try_from(log.status().buffered).unwrap_or(u32::MAX);
    let reply = encode(Message::AuditAcked { up_to_seq, buffered }, "audit ack")?;
    Ok(Step { reply, close: true, event: Event::AuditAcked { up_to_seq } })
}

/// Whether the committed sealed state carries bundle `(version, digest)`: the durability
/// receipt when it does, `policy_not_durable` with what is committed when not yet.
fn policy_durable(kre: &Kre, version: u64, digest: &[u8; 48], now_ms: u64) -> Result<Step, Denial> {
    let deny = |e| Denial::at(Stage::Policy { version: Some(version), digest: Some(*digest) }, e);
    let state = kre.state.as_ref().ok_or_else(|| deny(Error::NoDurability))?;
    if !kre.policy.accepted(version, digest) {
        return Err(deny(Error::NotAccepted(version)));
    }
    let Some((generation, head)) = state.committed_policy() else {
        return Err(deny(Error::NothingCommitted));
    };
    let committed = head.map(|(v, _)| v);
    if committed.is_none_or(|cv| cv < version) {
        return Err(deny(Error::PolicyNotDurable { version, generation, committed }));
    }
    let signer = kre.audit().signer_handle();
    let receipt = signer
        .sign_policy_receipt(generation, version, *digest, now_ms)
        .map_err(|e| deny(Error::DurabilityReceipt(e)))?;
    let reply = Message::PolicyDurable { receipt: receipt.to_bytes() }
        .encode()
        .map_err(|source| deny(Error::Encode { what: "durability receipt", source }))?;
    Ok(Step { reply, close: true, event: Event::PolicyDurable { version, generation } })
}

/// A StateReport answer.
pub(super) fn report_step(r: StateReport, step: &'static str) -> Result<Step, Denial> {
    let generation = if r.export_generation > 0 { r.export_generation } else { r.committed_generation };
    let reply = encode(Message::StateReport(Box::new(r)), "state report")?;
    Ok(Step { reply, close: true, event: Event::State { step, generation } })
}

impl Kre {
    /// The durable-state report (an empty one without custodians).
    pub(super) fn state_report(&self) -> Result<StateReport, Denial> {
        match &self.state {
            Some(s) => s.report(&self.audit),
            None => Ok(empty_report()),
        }
    }
}
