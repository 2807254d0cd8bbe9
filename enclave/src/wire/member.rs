//! The member channel's messages: a joining member asks a serving member for the state key
//! (`docs/cluster.md`). Their own family of type bytes (40, 41), in the same frame format as
//! every other message; a refusal is the common `Denied` (type 5). Decides the bytes and
//! limits of the two messages; trusts nothing (every frame is untrusted input).
//!
//! ```text
//! JoinRequest = attestation:bytes16                       ; J's document: nonce, public_key J
//! JoinOffer   = attestation:bytes16 generation:u64 blob_sha384:48
//!               policy_version:u64 policy_digest:48 sealed_key:48
//! ```

use super::frame::{self, WireError};
use super::messages::{ty, Message};

/// Type byte of a JoinRequest (joining member → serving member).
pub const JOIN_REQUEST: u8 = 40;
/// Type byte of a JoinOffer (serving member → joining member).
pub const JOIN_OFFER: u8 = 41;
/// Length of the encrypted state key: 32 bytes and the 16-byte AES-GCM tag.
pub const SEALED_STATE_KEY_LEN: usize = 48;
/// Largest attestation document in a member message.
pub const MAX_MEMBER_ATTESTATION: usize = keygate_attestation::cose::MAX_DOCUMENT;

/// The largest body of a member request of type `t` (`None` for another type).
pub fn max_member_request_body(t: u8) -> Option<usize> {
    (t == JOIN_REQUEST).then_some(2 + 2 + MAX_MEMBER_ATTESTATION)
}

/// A serving member's offer: its committed state and the state key encrypted to the joiner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOffer {
    /// The serving member's attestation (`nonce` = the joiner's nonce, `user_data` = the join
    /// transcript, `public_key` = its ephemeral key S).
    pub attestation: Vec<u8>,
    /// Its committed generation.
    pub generation: u64,
    /// SHA-384 of that generation's blob.
    pub blob_sha384: [u8; 48],
    /// The policy version that generation carries (0: none).
    pub policy_version: u64,
    /// Its digest (zeros: none).
    pub policy_digest: [u8; 48],
    /// The state key, AES-256-GCM under the join key (ciphertext ‖ tag).
    pub sealed_key: [u8; SEALED_STATE_KEY_LEN],
}

/// The messages of the member channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberMessage {
    /// Joining member → serving member: its fresh attestation (`nonce` = the join nonce,
    /// `public_key` = its ephemeral key J, `user_data` = `binding::join_request_user_data`).
    JoinRequest {
        /// The document.
        attestation: Vec<u8>,
    },
    /// Serving member → joining member.
    JoinOffer(Box<JoinOffer>),
    /// A refusal (the common `Denied` frame).
    Denied(Message),
}

fn attestation(b: &[u8]) -> Result<&[u8], WireError> {
    if b.len() > MAX_MEMBER_ATTESTATION {
        return Err(WireError::TooLong);
    }
    Ok(b)
}

impl MemberMessage {
    /// Encodes the message as a complete frame.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        match self {
            MemberMessage::JoinRequest { attestation: a } => {
                let mut w = frame::body(JOIN_REQUEST);
                w.bytes16("attestation", attestation(a)?)?;
                frame::seal(w.into_bytes())
            }
            MemberMessage::JoinOffer(o) => {
                let mut w = frame::body(JOIN_OFFER);
                w.bytes16("attestation", attestation(&o.attestation)?)?;
                w.u64(o.generation);
                w.bytes(&o.blob_sha384);
                w.u64(o.policy_version);
                w.bytes(&o.policy_digest);
                w.bytes(&o.sealed_key);
                frame::seal(w.into_bytes())
            }
            MemberMessage::Denied(m @ Message::Denied { .. }) => m.encode(),
            MemberMessage::Denied(_) => Err(WireError::UnknownType(0)),
        }
    }

    /// Decodes a frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let (t, mut r) = frame::open(body)?;
        let m = match t {
            JOIN_REQUEST => {
                MemberMessage::JoinRequest { attestation: attestation(r.bytes16("attestation")?)?.to_vec() }
            }
            JOIN_OFFER => MemberMessage::JoinOffer(Box::new(JoinOffer {
                attestation: attestation(r.bytes16("attestation")?)?.to_vec(),
                generation: r.u64("generation")?,
                blob_sha384: r.array("blob_sha384")?,
                policy_version: r.u64("policy_version")?,
                policy_digest: r.array("policy_digest")?,
                sealed_key: r.array("sealed_key")?,
            })),
            ty::DENIED => return Message::decode(body).map(MemberMessage::Denied),
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DenyCode;

    fn samples() -> Vec<MemberMessage> {
        vec![
            MemberMessage::JoinRequest { attestation: vec![1; 300] },
            MemberMessage::JoinOffer(Box::new(JoinOffer {
                attestation: vec![2; 400],
                generation: 7,
                blob_sha384: [3; 48],
                policy_version: 4,
                policy_digest: [5; 48],
                sealed_key: [6; 48],
            })),
            MemberMessage::Denied(Message::Denied { code: DenyCode::ImageNotAllowed, reason: "no".into() }),
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_or_extension_fails() {
        for m in samples() {
            let f = m.encode().expect("encode");
            let body = &f[4..];
            assert_eq!(MemberMessage::decode(body), Ok(m.clone()));
            for cut in 2..body.len() {
                assert!(MemberMessage::decode(&body[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = body.to_vec();
            longer.push(0);
            assert_eq!(MemberMessage::decode(&longer), Err(WireError::TrailingBytes));
        }
    }

    #[test]
    fn limits_and_other_types_are_refused() {
        let over = MemberMessage::JoinRequest { attestation: vec![0; MAX_MEMBER_ATTESTATION + 1] };
        assert_eq!(over.encode(), Err(WireError::TooLong));
        let at = MemberMessage::JoinRequest { attestation: vec![0; MAX_MEMBER_ATTESTATION] };
        let f = at.encode().expect("at the limit");
        assert_eq!(f.len() - 4, max_member_request_body(JOIN_REQUEST).expect("a request"));
        assert_eq!(max_member_request_body(JOIN_OFFER), None);
        let hello = Message::Hello { client_nonce: [0; 32] }.encode().expect("hello");
        assert_eq!(MemberMessage::decode(&hello[4..]), Err(WireError::UnknownType(ty::HELLO)));
        assert_eq!(MemberMessage::Denied(Message::Status).encode(), Err(WireError::UnknownType(0)));
        // The member types are no type of the other channels.
        assert_eq!(crate::wire::type_name(JOIN_REQUEST), None);
        assert_eq!(crate::wire::type_name(JOIN_OFFER), None);
    }
}
