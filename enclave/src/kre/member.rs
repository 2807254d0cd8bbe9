//! The member channel's connection and a joining member's parent-channel steps
//! (`docs/cluster.md`). On the member listener: one JoinRequest, answered by
//! [`Kre::answer_join`] with a JoinOffer (recorded in the audit trail before it is sent) or a
//! Denied. On the parent listener of a member awaiting its state: JoinStart → this KRE's
//! JoinRequest frame, then, on the same connection, JoinFinish (the serving member's answer
//! with the stored blob and custody) → the joiner's checks
//! ([`crate::kre::joiner::JoinSession::on_offer`]) and [`crate::state::vault::Vault::join`].
//!
//! The join session (the ephemeral key J and the nonce) lives only in the parent connection
//! that started it: an answer carried on another connection, or after the connection closed,
//! has no session to open it. Trusts the decisions of `kre::join` and `kre::joiner`, the
//! policy this KRE knows (its member list) and the NSM; the parent only carries frames.

use crate::kre::joiner::{Floor, JoinSession, MemberExpect};
use crate::state::vault::{Custody, Phase, UnsealMode};
use crate::wire::JOIN_REQUEST;

use super::error::{Denial, Error};
use super::join::own_image;
use super::{Env, Event, Kre, Step};

/// The state of a member connection, named for what it waits for.
#[derive(Debug)]
pub(super) enum MemberConnection {
    /// A JoinRequest.
    ExpectJoinRequest,
    Done,
}

impl MemberConnection {
    /// Whether the connection takes a request of type `t` now.
    pub(super) fn expects(&self, t: u8) -> bool {
        matches!(self, Self::ExpectJoinRequest) && t == JOIN_REQUEST
    }

    /// What the connection waits for (`None`: finished).
    pub(super) fn expected(&self) -> Option<&'static str> {
        match self {
            Self::ExpectJoinRequest => Some("JoinRequest"),
            Self::Done => None,
        }
    }

    /// Answers the JoinRequest frame `body`: the offer, recorded before it is sent.
    pub(super) fn on_frame(&mut self, kre: &Kre, body: &[u8], env: &mut Env<'_>) -> Result<Step, Denial> {
        if matches!(std::mem::replace(self, Self::Done), Self::Done) {
            return Err(Error::Finished("JoinRequest").into());
        }
        let answer =
            kre.answer_join(body, None, env).map_err(|r| Denial::state("join-answer", Error::Join(Box::new(r))))?;
        let detail = format!(
            "generation {} forwarded to member `{}` (module id {}, PCR4 {})",
            answer.generation, answer.member, answer.module_id, answer.pcr4
        );
        kre.sealed("join-answer")?.record_forward(&kre.audit, detail, env.now_ms)?;
        Ok(Step {
            reply: answer.frame,
            close: true,
            event: Event::State { step: "join-forward", generation: answer.generation },
        })
    }
}

/// The refusal of a joiner's step.
fn joiner(e: crate::kre::joiner::JoinError) -> Denial {
    Denial::state("join", Error::Joiner(e))
}

impl Kre {
    /// How an unseal of the state the parent hands over ends: a KRE whose policy names other
    /// members waits for a serving member's confirmation ([`UnsealMode::AwaitMember`]) unless
    /// the parent asks the custodians for a cold start; a single KRE serves at once. Decided
    /// from the members in force when the state is loaded.
    pub(super) fn unseal_mode(&self, cold_start: bool, now_ms: u64) -> UnsealMode {
        match (self.policy.members(now_ms).len() > 1, cold_start) {
            (false, _) => UnsealMode::Plain,
            (true, false) => UnsealMode::AwaitMember,
            (true, true) => UnsealMode::ColdStart,
        }
    }

    /// A plain unseal is decided again once the replayed policy reaches the head the unsealed
    /// state recorded ([`Vault::settle_plain_unseal`]): if that policy names several members,
    /// the KRE waits for a serving member's confirmation. Called before a release and a
    /// forward; a no-op unless a plain unseal is pending. Locks: vault, released; the policy;
    /// then the vault again.
    pub(super) fn settle_unseal(&self, now_ms: u64) {
        let Some(state) = &self.state else { return };
        let floor = {
            let v = state.vault();
            if !v.plain_unseal_pending() {
                return;
            }
            v.policy_floor()
        };
        if floor.is_some_and(|f| self.policy.check_floor(f).is_err()) {
            return;
        }
        let members = self.policy.members(now_ms).len();
        if state.vault().settle_plain_unseal(members) {
            tracing::warn!(
                members,
                "unsealed as a single KRE, but the policy the sealed state recorded names several members: \
                 waiting for a serving member's confirmation"
            );
        }
    }

    /// JoinStart: a fresh join session and this KRE's JoinRequest frame (its attestation binds
    /// the session's nonce and key). Refused unless this KRE has custodians and does not serve
    /// (awaiting its state, unsealing, or confirming an unseal).
    pub(super) fn join_start(&self, env: &mut Env<'_>) -> Result<(JoinSession, Vec<u8>), Denial> {
        if self.sealed("join")?.phase() == Phase::Serving {
            return Err(Denial::state("join", Error::JoinWhileServing));
        }
        let mut session = JoinSession::start(self.crypto, &mut *env.rng).map_err(joiner)?;
        let attestation =
            self.nsm.attest(&session.attest_request()).map_err(|e| Denial::state("join", Error::KreAttestation(e)))?;
        let frame = session.request(attestation).map_err(joiner)?;
        Ok((session, frame))
    }

    /// JoinFinish: checks the serving member's answer `offer` (a frame body) against this
    /// session, the members of the policy this KRE knows, its own image and its floor (its
    /// committed generation and policy head), then serves the vouched generation from `blob`
    /// and `custody` — or, confirming an unseal, takes it as the confirmation (the same state
    /// key; the unsealed generation, or a newer one adopted). Returns the generation now served.
    pub(super) fn join_finish(
        &self,
        session: &JoinSession,
        offer: &[u8],
        blob: Vec<u8>,
        custody: Custody,
        env: &mut Env<'_>,
    ) -> Result<u64, Denial> {
        let state = self.sealed("join")?;
        let members = self.policy.members(env.now_ms);
        let images: Vec<_> =
            own_image(|i| self.nsm.describe_pcr(u16::from(i)).ok().map(|d| d.data)).into_iter().collect();
        let expect = MemberExpect {
            verifier: &self.verifier,
            now_ms: env.now_ms,
            max_doc_age: self.config.max_doc_age,
            clock_skew: self.config.clock_skew,
            images: &images,
            members: &members,
        };
        let mut floor = Floor { generation: state.vault().committed_generation(), policy: self.policy_head() };
        let forwarded = session.on_offer(offer, &expect, &mut floor, self.crypto).map_err(joiner)?;
        let generation = if state.phase() == Phase::Confirming {
            state.confirm(&self.audit, forwarded, &blob, env.now_ms)?
        } else {
            state.join(&self.audit, forwarded, blob, custody, env.now_ms)?
        };
        self.after_unseal(env.now_ms);
        Ok(generation)
    }
}
