//! PCR expectations: "this PCR must have exactly this value".
//!
//! Used by `--expect-pcr N=HEX` (CLI), by a control plane checking the KRE's own PCRs, and by
//! policy evaluation. Takes a [`VerifiedAttestation`], so an unverified document cannot be
//! matched.

use std::fmt;
use std::str::FromStr;

use crate::verify::VerifiedAttestation;

/// One expected PCR value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PcrExpectation {
    /// PCR index, below 32.
    pub index: u8,
    /// Expected value (32, 48 or 64 bytes).
    pub value: Vec<u8>,
}

/// Why `N=HEX` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PcrParseError {
    /// No `=`.
    #[error("expected N=HEX")]
    Syntax,
    /// Index not a number below 32.
    #[error("PCR index must be a number below 32")]
    Index,
    /// Value not hex.
    #[error("PCR value is not hex")]
    Hex,
    /// Value not 32, 48 or 64 bytes.
    #[error("PCR value must be 32, 48 or 64 bytes, got {0}")]
    Length(usize),
}

impl FromStr for PcrExpectation {
    type Err = PcrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, v) = s.split_once('=').ok_or(PcrParseError::Syntax)?;
        let index: u8 = i.trim().parse().map_err(|_| PcrParseError::Index)?;
        if index >= 32 {
            return Err(PcrParseError::Index);
        }
        let value = hex::decode(v.trim()).map_err(|_| PcrParseError::Hex)?;
        if ![32, 48, 64].contains(&value.len()) {
            return Err(PcrParseError::Length(value.len()));
        }
        Ok(Self { index, value })
    }
}

impl fmt::Display for PcrExpectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.index, hex::encode(&self.value))
    }
}

/// A PCR that did not have its expected value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PCR{index} mismatch: expected {expected}, found {found}")]
pub struct PcrMismatch {
    /// The PCR index.
    pub index: u8,
    /// Expected value, hex.
    pub expected: String,
    /// Actual value, hex, or "absent".
    pub found: String,
}

/// Checks every expectation; the first mismatch (lowest index first) is the error.
pub fn check(att: &VerifiedAttestation, expected: &[PcrExpectation]) -> Result<(), PcrMismatch> {
    let mut sorted: Vec<&PcrExpectation> = expected.iter().collect();
    sorted.sort();
    for e in sorted {
        let found = att.pcr(e.index);
        if found != Some(e.value.as_slice()) {
            return Err(PcrMismatch {
                index: e.index,
                expected: hex::encode(&e.value),
                found: found.map_or_else(|| "absent".to_owned(), hex::encode),
            });
        }
    }
    Ok(())
}

/// Checks a set of accepted images, each a list of expectations: passes when every
/// expectation of any one image holds (during an upgrade a client accepts the old image and
/// the new). No image at all expects nothing, as [`check`] with no expectation. The error is
/// the first image's mismatch, so that a refusal names what the caller expected first.
pub fn check_any<'a>(
    att: &VerifiedAttestation,
    images: impl IntoIterator<Item = &'a [PcrExpectation]>,
) -> Result<(), PcrMismatch> {
    let mut first = None;
    for image in images {
        match check(att, image) {
            Ok(()) => return Ok(()),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_it_parses() {
        let e: PcrExpectation = format!("3={}", "ab".repeat(48)).parse().expect("parse");
        assert_eq!(e.to_string(), format!("3={}", "ab".repeat(48)));
    }

    #[cfg(feature = "mock")]
    #[test]
    fn check_reports_the_first_mismatch_by_index() {
        use crate::mock::MockNsm;
        use crate::{AttestRequest, Nsm, Verifier, VerifyOptions};
        let t = 1_795_478_400_000;
        let pcrs = (0u8..3).map(|i| (i, vec![i + 1; 48])).collect();
        let nsm = MockNsm::new(b"pcr", pcrs, std::sync::Arc::new(move || t));
        let doc = nsm.attest(&AttestRequest::default()).expect("doc");
        let att = Verifier::new(nsm.root_anchor()).verify(&doc, &VerifyOptions::at(t)).expect("verify");
        let exp = |i: u8, b: u8| PcrExpectation { index: i, value: vec![b; 48] };
        assert_eq!(check(&att, &[exp(0, 1), exp(1, 2), exp(2, 3)]), Ok(()));
        assert_eq!(check(&att, &[]), Ok(()));
        let err = check(&att, &[exp(2, 9), exp(1, 9)]).expect_err("mismatch");
        assert_eq!(err.index, 1, "lowest index first");
        assert_eq!(err.found, hex::encode([2u8; 48]));
        let absent = check(&att, &[exp(20, 1)]).expect_err("absent");
        assert_eq!(absent.found, "absent");

        // Any one image's expectations, all of them; never a mix of two images.
        let old = [exp(0, 7), exp(1, 2)];
        let new = [exp(0, 1), exp(1, 2), exp(2, 3)];
        assert_eq!(check_any(&att, [&old[..], &new[..]]), Ok(()));
        assert_eq!(check_any(&att, [&new[..], &old[..]]), Ok(()));
        let mixed = [exp(0, 1), exp(1, 9)];
        let err = check_any(&att, [&old[..], &mixed[..]]).expect_err("neither image");
        assert_eq!((err.index, err.expected), (0, hex::encode([7u8; 48])), "the first image's mismatch");
        assert_eq!(check_any(&att, std::iter::empty()), Ok(()));
    }

    #[test]
    fn parses_and_refuses() {
        let h = "ab".repeat(48);
        assert_eq!(format!("3={h}").parse::<PcrExpectation>().map(|e| e.index), Ok(3));
        assert_eq!("3".parse::<PcrExpectation>(), Err(PcrParseError::Syntax));
        assert_eq!(format!("32={h}").parse::<PcrExpectation>(), Err(PcrParseError::Index));
        assert_eq!(format!("x={h}").parse::<PcrExpectation>(), Err(PcrParseError::Index));
        assert_eq!("1=zz".parse::<PcrExpectation>(), Err(PcrParseError::Hex));
        assert_eq!("1=abcd".parse::<PcrExpectation>(), Err(PcrParseError::Length(2)));
    }
}
