//! The members of a KRE cluster, as a signed policy bundle names them (`docs/cluster.md`).
//!
//! What this module decides: what a member is (a name and the identity PCRs of its parent
//! instance: PCR4 required, PCR3 optional), when a member list is valid (bounded, unique
//! names, unique PCR4s), whether a verified attestation is a member's, and how the identity
//! PCRs derive from a parent instance id and an IAM role ARN. What it trusts: nothing; a
//! list is only as good as the bundle that carries it (M-of-N approvers, `bundle`).
//!
//! Why PCR4 and PCR3: every member runs the same enclave image, so PCR0..2 cannot tell one
//! member from a copy of the image started anywhere else. On Nitro, PCR4 measures the parent
//! instance id and PCR3 the IAM role ARN of the parent instance; the hypervisor sets them,
//! so a parent cannot fake them.

use sha2::{Digest, Sha384};

use crate::pcr::{self, PcrExpectation, PcrMismatch};
use crate::verify::VerifiedAttestation;

/// Most members in one list.
pub const MAX_MEMBERS: usize = 64;
/// Longest member name.
pub const MAX_MEMBER_NAME: usize = 128;
/// Length of a member's PCR values (SHA-384 PCRs).
pub const MEMBER_PCR_LEN: usize = 48;

/// One member KRE of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// A label for logs and the audit trail (1-128 bytes of `[A-Za-z0-9._-]`).
    pub name: String,
    /// PCR4 of the member's enclave: the measurement of its parent instance id.
    pub pcr4: [u8; MEMBER_PCR_LEN],
    /// PCR3 of the member's enclave, when pinned: the measurement of its parent's IAM role.
    pub pcr3: Option<[u8; MEMBER_PCR_LEN]>,
}

/// Why a member list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    /// More than [`MAX_MEMBERS`] members.
    #[error("{0} members; at most {MAX_MEMBERS}")]
    TooMany(usize),
    /// A name that is empty, too long or has other characters than `[A-Za-z0-9._-]`.
    #[error("member name `{0}` must be 1-128 characters of [A-Za-z0-9._-]")]
    BadName(String),
    /// Two members with one name.
    #[error("member name `{0}` appears twice")]
    DuplicateName(String),
    /// Two members with one PCR4 (one parent instance cannot be two members).
    #[error("members `{0}` and `{1}` have the same PCR4")]
    DuplicatePcr4(String, String),
    /// A PCR value of another length than 48 bytes.
    #[error("member `{name}`: PCR{index} must be 48 bytes, got {len}")]
    BadPcrLength {
        /// The member.
        name: String,
        /// 3 or 4.
        index: u8,
        /// The length found.
        len: usize,
    },
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MEMBER_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a member list: at most [`MAX_MEMBERS`], valid names, unique names and PCR4s.
pub fn validate(members: &[Member]) -> Result<(), MemberError> {
    if members.len() > MAX_MEMBERS {
        return Err(MemberError::TooMany(members.len()));
    }
    for (i, m) in members.iter().enumerate() {
        if !name_ok(&m.name) {
            return Err(MemberError::BadName(m.name.clone()));
        }
        for earlier in &members[..i] {
            if earlier.name == m.name {
                return Err(MemberError::DuplicateName(m.name.clone()));
            }
            if earlier.pcr4 == m.pcr4 {
                return Err(MemberError::DuplicatePcr4(earlier.name.clone(), m.name.clone()));
            }
        }
    }
    Ok(())
}

/// A 48-byte PCR value of member `name`, or the typed refusal of another length.
pub fn pcr_value(name: &str, index: u8, bytes: &[u8]) -> Result<[u8; MEMBER_PCR_LEN], MemberError> {
    bytes.try_into().map_err(|_| MemberError::BadPcrLength { name: name.to_owned(), index, len: bytes.len() })
}

/// The member whose identity PCRs `att` carries: its PCR4 is the member's, and so is its PCR3
/// when the member pins one. `None` for an enclave that is no member.
pub fn member_of<'a>(members: &'a [Member], att: &VerifiedAttestation) -> Option<&'a Member> {
    let pcr4 = att.pcr(4)?;
    members.iter().find(|m| m.pcr4.as_slice() == pcr4 && m.pcr3.is_none_or(|p3| att.pcr(3) == Some(p3.as_slice())))
}

/// Why a verified attestation is not one of a cluster member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotAMember {
    /// No KRE image is expected: any enclave would pass the image check.
    #[error("no KRE image expected: refusing to trust an unidentified enclave")]
    NoImages,
    /// The enclave runs none of the KRE images.
    #[error("not a KRE image: {0}")]
    Image(PcrMismatch),
    /// A KRE image, but its parent instance (PCR4, with PCR3 where pinned) is no member.
    #[error("a KRE image on a parent that is no member (PCR4 {pcr4})")]
    NotListed {
        /// Its PCR4, hex ("absent" when missing).
        pcr4: String,
    },
}

/// Checks that `att` is a member KRE: it runs one of the KRE `images` (every PCR of one image,
/// never a mix) and its identity PCRs are those of one of `members` ([`member_of`]).
pub fn check<'a>(
    att: &VerifiedAttestation,
    images: &[Vec<PcrExpectation>],
    members: &'a [Member],
) -> Result<&'a Member, NotAMember> {
    if images.is_empty() || images.iter().any(Vec::is_empty) {
        return Err(NotAMember::NoImages);
    }
    pcr::check_any(att, images.iter().map(Vec::as_slice)).map_err(NotAMember::Image)?;
    member_of(members, att)
        .ok_or_else(|| NotAMember::NotListed { pcr4: att.pcr(4).map_or_else(|| "absent".to_owned(), hex::encode) })
}

/// The value of a SHA-384 PCR that starts at zero and is extended once with `data`:
/// `SHA-384(48 zero bytes ‖ data)`.
pub fn extend_from_zero(data: &[u8]) -> [u8; MEMBER_PCR_LEN] {
    let mut h = Sha384::new();
    h.update([0u8; MEMBER_PCR_LEN]);
    h.update(data);
    h.finalize().into()
}

/// PCR4 of an enclave whose parent instance has id `instance_id` (`i-…`): the zero PCR
/// extended with the id's UTF-8 bytes, as AWS documents the value to expect.
pub fn parent_instance_pcr4(instance_id: &str) -> [u8; MEMBER_PCR_LEN] {
    extend_from_zero(instance_id.as_bytes())
}

/// PCR3 of an enclave whose parent instance has the IAM role `role_arn`: the zero PCR extended
/// with the ARN's UTF-8 bytes.
pub fn parent_role_pcr3(role_arn: &str) -> [u8; MEMBER_PCR_LEN] {
    extend_from_zero(role_arn.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, p4: u8) -> Member {
        Member { name: name.to_owned(), pcr4: [p4; 48], pcr3: None }
    }

    #[test]
    fn lists_are_bounded_named_and_unique() {
        assert_eq!(validate(&[]), Ok(()));
        assert_eq!(validate(&[m("a", 1), m("b", 2)]), Ok(()));
        assert_eq!(validate(&[m("a", 1), m("a", 2)]), Err(MemberError::DuplicateName("a".into())));
        assert_eq!(validate(&[m("a", 1), m("b", 1)]), Err(MemberError::DuplicatePcr4("a".into(), "b".into())));
        for bad in ["", "a b", "a/b", &"x".repeat(129)] {
            assert_eq!(validate(&[m(bad, 1)]), Err(MemberError::BadName(bad.to_owned())));
        }
        assert_eq!(validate(&[m(&"x".repeat(128), 1)]), Ok(()));
        let full: Vec<Member> = (0..64u8).map(|i| m(&format!("m{i}"), i)).collect();
        assert_eq!(validate(&full), Ok(()));
        let over: Vec<Member> = (0..65u8).map(|i| m(&format!("m{i}"), i)).collect();
        assert_eq!(validate(&over), Err(MemberError::TooMany(65)));
        assert_eq!(pcr_value("a", 4, &[0; 32]), Err(MemberError::BadPcrLength { name: "a".into(), index: 4, len: 32 }));
    }

    #[test]
    fn identity_pcrs_extend_a_zero_pcr_with_the_id() {
        let id = "i-1234567890abcdef0";
        let mut h = Sha384::new();
        h.update([0u8; 48]);
        h.update(id.as_bytes());
        let want: [u8; 48] = h.finalize().into();
        assert_eq!(parent_instance_pcr4(id), want);
        assert_ne!(parent_instance_pcr4("i-0"), parent_instance_pcr4("i-1"));
        assert_eq!(parent_role_pcr3("arn:aws:iam::1:role/kre"), extend_from_zero(b"arn:aws:iam::1:role/kre"));
    }
}
