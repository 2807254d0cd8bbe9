//! One client connection on the listener of one channel: the header checks every channel
//! shares (version, known type, the listener's channel, what the connection waits for) and
//! the dispatch to that channel's state machine. A frame of another channel is refused with
//! `wrong_channel` from its two header bytes, before its body is read. Spec: docs/protocol.md.

use crate::wire::{self, Channel, Message, Unreadable, WireError};

use super::custodian::CustodianConnection;
use super::error::{Denial, Error, Stage};
use super::member::MemberConnection;
use super::parent::ParentConnection;
use super::release::ReleaseConnection;
use super::{Env, Event, Kre, Step};

/// One client connection's protocol state, on the listener of one channel.
#[derive(Debug)]
pub struct Connection {
    channel: Channel,
    machine: Machine,
}

/// The channel's state machine.
#[derive(Debug)]
enum Machine {
    Release(ReleaseConnection),
    Parent(ParentConnection),
    Custodian(CustodianConnection),
    Member(MemberConnection),
}

impl Machine {
    fn expects(&self, t: u8) -> bool {
        match self {
            Self::Release(m) => m.expects(t),
            Self::Parent(m) => m.expects(t),
            Self::Custodian(m) => m.expects(t),
            Self::Member(m) => m.expects(t),
        }
    }

    /// What the connection waits for, and the stage a refusal of another frame is recorded at.
    fn expected(&self) -> (Option<&'static str>, Stage) {
        match self {
            Self::Release(m) => (m.expected(), Stage::Challenge),
            Self::Parent(m) => (m.expected(), Stage::Challenge),
            Self::Custodian(m) => (m.expected(), m.step().map_or(Stage::Challenge, |step| Stage::State { step })),
            Self::Member(m) => (m.expected(), Stage::Challenge),
        }
    }

    /// Finishes the connection (releasing a release connection's challenge).
    fn abandon(&mut self, kre: &Kre) {
        match self {
            Self::Release(m) => m.abandon(kre),
            Self::Parent(m) => *m = ParentConnection::Done,
            Self::Custodian(m) => *m = CustodianConnection::Done,
            Self::Member(m) => *m = MemberConnection::Done,
        }
    }

    /// Finishes the connection without releasing anything.
    fn finish(&mut self) {
        match self {
            Self::Release(m) => *m = ReleaseConnection::Done,
            Self::Parent(m) => *m = ParentConnection::Done,
            Self::Custodian(m) => *m = CustodianConnection::Done,
            Self::Member(m) => *m = MemberConnection::Done,
        }
    }

    fn is_done(&self) -> bool {
        matches!(
            self,
            Self::Release(ReleaseConnection::Done)
                | Self::Parent(ParentConnection::Done)
                | Self::Custodian(CustodianConnection::Done)
                | Self::Member(MemberConnection::Done)
        )
    }

    fn on_message(&mut self, kre: &Kre, msg: Message, env: &mut Env<'_>) -> Result<Step, Denial> {
        match self {
            Self::Release(m) => m.on_message(kre, msg, env),
            Self::Parent(m) => m.on_message(kre, msg, env),
            Self::Custodian(m) => m.on_message(kre, msg, env),
            // The member family is decoded by its own state machine (`on_frame`).
            Self::Member(_) => Err(Error::NoHandler(msg.name()).into()),
        }
    }
}

impl Connection {
    /// A connection on `channel`'s listener, waiting for its first frame. Only request frames
    /// of that channel are served; any other is refused with `wrong_channel`.
    pub fn new(channel: Channel) -> Self {
        let machine = match channel {
            Channel::Release => Machine::Release(ReleaseConnection::ExpectHello),
            Channel::Parent => Machine::Parent(ParentConnection::ExpectRequest),
            Channel::Custodian => Machine::Custodian(CustodianConnection::ExpectHello),
            Channel::Member => Machine::Member(MemberConnection::ExpectJoinRequest),
        };
        Self { channel, machine }
    }

    /// The channel this connection came in on.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// Whether the connection has finished (a Released or Denied was produced).
    pub fn is_done(&self) -> bool {
        self.machine.is_done()
    }

    /// The refusal of a frame from its two header bytes alone (version and type), or `None`
    /// when this connection takes that frame now. Nothing after the header is needed to refuse
    /// a frame of another channel or one the connection does not wait for.
    fn refusal_of_header(&self, version: u8, t: u8) -> Option<Denial> {
        if version != wire::VERSION {
            return Some(Error::UnsupportedVersion(version).into());
        }
        let Some(name) = wire::type_name(t).or((t == wire::JOIN_REQUEST).then_some("JoinRequest")) else {
            return Some(Error::Malformed(WireError::UnknownType(t)).into());
        };
        if let Some(belongs) = Channel::of_request_type(t).filter(|c| *c != self.channel) {
            return Some(Error::WrongChannel { name, belongs, listener: self.channel }.into());
        }
        if self.machine.expects(t) {
            return None;
        }
        Some(match self.machine.expected() {
            (Some(expected), stage) => Denial::at(stage, Error::Unexpected { expected, got: name }),
            (None, stage) => Denial::at(stage, Error::Finished(name)),
        })
    }

    /// The most body bytes a frame with this header may declare on this connection now, or
    /// `None` when the frame is refused from its header ([`Connection::on_frame`] with the two
    /// header bytes gives the refusal). The server checks this before it allocates or waits
    /// for a body: a release-port client can make the KRE hold at most a Hello's 34 bytes
    /// until it has been issued a challenge.
    pub fn admit(&self, version: u8, t: u8) -> Option<usize> {
        if self.refusal_of_header(version, t).is_some() {
            return None;
        }
        wire::max_request_body(t).or_else(|| wire::max_member_request_body(t))
    }

    /// Handles one frame body (the bytes after the length prefix).
    pub fn on_frame(&mut self, kre: &Kre, body: &[u8], env: &mut Env<'_>) -> Step {
        let header_refusal = match body {
            [version, t, ..] => self.refusal_of_header(*version, *t),
            _ => None,
        };
        let result = match header_refusal {
            Some(d) => {
                self.machine.abandon(kre);
                Err(d)
            }
            None if matches!(self.machine, Machine::Member(_)) => match &mut self.machine {
                Machine::Member(m) => m.on_frame(kre, body, env),
                _ => Err(Error::NoHandler("JoinRequest").into()),
            },
            None => match Message::decode(body) {
                Err(WireError::UnsupportedVersion(v)) => Err(Error::UnsupportedVersion(v).into()),
                Err(e @ (WireError::BadId | WireError::BadKeyCount(_) | WireError::DuplicateKeyId)) => {
                    Err(Error::InvalidRequest(e).into())
                }
                Err(e) => Err(Error::Malformed(e).into()),
                Ok(msg) => self.machine.on_message(kre, msg, env),
            },
        };
        match result {
            Ok(step) => step,
            Err(d) => self.refuse(kre, d, env.now_ms),
        }
    }

    /// A Denied for a frame that could not even be read (bad length prefix, timeout, busy).
    pub fn deny(&mut self, kre: &Kre, why: Unreadable, now_ms: u64) -> Step {
        self.machine.abandon(kre);
        self.refuse(kre, Error::Transport(why).into(), now_ms)
    }

    /// Releases this connection's challenge (the connection closed early).
    pub fn abandon(&mut self, kre: &Kre) {
        self.machine.abandon(kre);
    }

    /// Finishes the connection with refusal `d`: recorded, and the Denied to send.
    fn refuse(&mut self, kre: &Kre, d: Denial, now_ms: u64) -> Step {
        self.machine.finish();
        kre.audit.record_denial(&d, now_ms);
        let (code, reason) = (d.code(), d.error.to_string());
        let reply = Message::Denied { code, reason: reason.clone() }.encode().unwrap_or_default();
        let module_id = d.requester.map(|r| r.module_id);
        Step { reply, close: true, event: Event::Denied { code, reason, cluster: d.cluster, module_id } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ty, DenyCode};

    fn code(c: &Connection, version: u8, t: u8) -> Option<DenyCode> {
        c.refusal_of_header(version, t).map(|d| d.code())
    }

    #[test]
    fn each_channel_refuses_from_the_header_what_it_does_not_take_now() {
        let r = Connection::new(Channel::Release);
        assert_eq!(code(&r, wire::VERSION, ty::HELLO), None);
        assert_eq!(code(&r, 9, ty::HELLO), Some(DenyCode::UnsupportedVersion));
        assert_eq!(code(&r, wire::VERSION, 0xee), Some(DenyCode::Malformed));
        assert_eq!(code(&r, wire::VERSION, ty::RELEASE), Some(DenyCode::UnexpectedMessage));
        assert_eq!(code(&r, wire::VERSION, ty::STATUS), Some(DenyCode::WrongChannel));
        let p = Connection::new(Channel::Parent);
        for t in [ty::STATUS, ty::AUDIT_PULL, ty::POLICY_PUSH, ty::STATE_COMMIT] {
            assert_eq!(code(&p, wire::VERSION, t), None);
        }
        assert_eq!(code(&p, wire::VERSION, ty::HELLO), Some(DenyCode::WrongChannel));
        assert_eq!(code(&p, wire::VERSION, ty::CHALLENGE), Some(DenyCode::UnexpectedMessage));
        let mut c = Connection::new(Channel::Custodian);
        assert_eq!(code(&c, wire::VERSION, ty::UNSEAL_HELLO), None);
        assert_eq!(code(&c, wire::VERSION, ty::UNSEAL_SHARE), Some(DenyCode::UnexpectedMessage));
        c.machine = Machine::Custodian(CustodianConnection::ExpectUnsealShare { attestation_sha384: [0; 48] });
        let d = c.refusal_of_header(wire::VERSION, ty::UNSEAL_HELLO).expect("refused");
        assert!(matches!(d.stage, Stage::State { step: "unseal-share" }));
        assert_eq!(d.error.to_string(), "expected UnsealShare, got UnsealHello");
        c.machine.finish();
        assert!(c.is_done());
        assert_eq!(code(&c, wire::VERSION, ty::UNSEAL_SHARE), Some(DenyCode::UnexpectedMessage));
    }
}
