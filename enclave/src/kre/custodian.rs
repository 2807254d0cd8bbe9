//! The custodian channel's connection: UnsealHello → UnsealOffer (the KRE's attestation over
//! this session), then UnsealShare → UnsealProgress; or ReshareStart → StateReport. A share
//! counts only for the offer sent on its own connection. Trusts the sealed-state service's
//! checks of each share; spec: docs/durability.md ("Unseal", "Reshare").

use crate::wire::{ty, Message};

use super::error::{Denial, Error};
use super::parent::report_step;
use super::{encode, Env, Event, Kre, Step};

/// The state of a custodian connection, named for what it waits for.
#[derive(Debug)]
pub(super) enum CustodianConnection {
    /// UnsealHello or ReshareStart.
    ExpectHello,
    /// The share for the offer sent on this connection.
    ExpectUnsealShare {
        attestation_sha384: [u8; 48],
    },
    Done,
}

impl CustodianConnection {
    /// Whether the connection takes a request of type `t` now.
    pub(super) fn expects(&self, t: u8) -> bool {
        match self {
            Self::ExpectHello => matches!(t, ty::UNSEAL_HELLO | ty::RESHARE_START),
            Self::ExpectUnsealShare { .. } => t == ty::UNSEAL_SHARE,
            Self::Done => false,
        }
    }

    /// What the connection waits for (`None`: finished).
    pub(super) fn expected(&self) -> Option<&'static str> {
        match self {
            Self::ExpectHello => Some("Hello"),
            Self::ExpectUnsealShare { .. } => Some("UnsealShare"),
            Self::Done => None,
        }
    }

    /// The audit step a refusal in this state is about (`None`: before any request).
    pub(super) fn step(&self) -> Option<&'static str> {
        matches!(self, Self::ExpectUnsealShare { .. }).then_some("unseal-share")
    }

    /// Handles a decoded request this connection takes.
    pub(super) fn on_message(&mut self, kre: &Kre, msg: Message, env: &mut Env<'_>) -> Result<Step, Denial> {
        match (std::mem::replace(self, Self::Done), msg) {
            (Self::ExpectHello, Message::ReshareStart { set }) => {
                kre.sealed("reshare")?.reshare_start(&kre.audit, &set, &kre.policy.approvers(), env.now_ms)?;
                report_step(kre.state_report()?, "reshare")
            }
            (Self::ExpectHello, Message::UnsealHello { client_nonce }) => {
                let (msg, attestation_sha384) = kre.sealed("unseal-offer")?.offer(client_nonce)?;
                let reply = encode(msg, "unseal offer")?;
                *self = Self::ExpectUnsealShare { attestation_sha384 };
                Ok(Step { reply, close: false, event: Event::UnsealOffered })
            }
            (Self::ExpectUnsealShare { attestation_sha384 }, Message::UnsealShare { share }) => {
                let p = kre.sealed("unseal-share")?.share(&kre.audit, attestation_sha384, &share, env.now_ms)?;
                if p.unsealed {
                    kre.after_unseal(env.now_ms);
                }
                let (have, need, serving) = (p.have, p.need, p.done);
                let reply =
                    encode(Message::UnsealProgress { have, need, serving, generation: p.generation }, "progress")?;
                Ok(Step { reply, close: true, event: Event::UnsealShareAccepted { have, need, serving } })
            }
            (_, m) => Err(Error::NoHandler(m.name()).into()),
        }
    }
}
