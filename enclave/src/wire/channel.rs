//! The channels: which audience may send which request frame (`docs/protocol.md`,
//! "Channels"). The server binds each channel to its own listener.

use std::fmt;

use super::messages::{ty, Message};

/// The audiences of the KRE, each served on its own listener with its own closed set of
/// request frames (docs/protocol.md, "Channels"). A frame of another channel is refused with
/// `wrong_channel`: an anonymous client of the release port can never reach the parent's
/// state and audit steps or the custodians' unseal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Control-plane instances: Hello, Release. The only channel the proxy exposes by default.
    Release,
    /// The parent's daemon: state steps, audit pull and ack, status, policy pushes (signed by
    /// the approvers; the parent only delivers them). Never proxied.
    Parent,
    /// Custodians: unseal and reshare. Proxied only where the operator opts in, on its own port.
    Custodian,
    /// Other member KREs: JoinRequest (`docs/cluster.md`). Proxied only where the operator
    /// opts in, on its own port.
    Member,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 4] = [Channel::Release, Channel::Parent, Channel::Custodian, Channel::Member];

    /// The channel whose client sends the request frame of type `ty` (the body's second byte);
    /// `None` for a frame only the KRE sends, or an unknown type.
    pub fn of_request_type(t: u8) -> Option<Channel> {
        match t {
            ty::HELLO | ty::RELEASE => Some(Channel::Release),
            ty::POLICY_PUSH
            | ty::POLICY_DURABLE_WAIT
            | ty::AUDIT_PULL
            | ty::AUDIT_WAIT
            | ty::AUDIT_ACK
            | ty::STATUS
            | ty::STATE_POLL
            | ty::STATE_GENESIS
            | ty::STATE_LOAD
            | ty::STATE_COMMIT
            | ty::JOIN_START
            | ty::JOIN_FINISH
            | ty::STATE_ADOPT => Some(Channel::Parent),
            ty::UNSEAL_HELLO | ty::UNSEAL_SHARE | ty::RESHARE_START => Some(Channel::Custodian),
            super::member::JOIN_REQUEST => Some(Channel::Member),
            _ => None,
        }
    }

    /// A stable lower-case name (flags, logs, docs).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Release => "release",
            Channel::Parent => "parent",
            Channel::Custodian => "custodian",
            Channel::Member => "member",
        }
    }
}

impl Message {
    /// The channel of a request message (`None` for what only the KRE sends).
    pub fn channel(&self) -> Option<Channel> {
        Channel::of_request_type(self.type_byte())
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel name that is none of [`Channel::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown channel `{0}` (release, parent, custodian or member)")]
pub struct UnknownChannel(pub String);

impl std::str::FromStr for Channel {
    type Err = UnknownChannel;
    fn from_str(s: &str) -> Result<Self, UnknownChannel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| UnknownChannel(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_others_are_refused_with_the_list() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>(), Ok(c));
        }
        let e = "admin".parse::<Channel>().expect_err("unknown");
        assert_eq!(e.to_string(), "unknown channel `admin` (release, parent, custodian or member)");
    }
}
