//! Command-line values several verbs share. Durations have one syntax for every flag that
//! takes one (`kms-plugin --lease`, `policy init --activation-delay`, `policy push
//! --durable-within`, …): a bare number of seconds (`90`, `0`), or humantime's terms
//! (`250ms`, `90s`, `5m`, `1h 30m`, `2d`). It decides the syntax and an upper bound that holds
//! for every flag (a flag's own range is its verb's to check); it trusts humantime to read the
//! terms. Points in time likewise: Unix seconds (`1764583200`) or RFC 3339 in UTC
//! (`2025-12-01T10:00:00Z`), read by humantime.

use std::time::{Duration, UNIX_EPOCH};

/// The longest duration any flag takes: 100 years (Julian), far beyond every flag's own limit,
/// so a typo of a few digits too many is refused rather than read as forever.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Why a command-line value is not a duration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("`{value}` is not a duration (e.g. 90, 250ms, 30s, 5m, 1h 30m, 2d): {reason}")]
    Syntax { value: String, reason: humantime::DurationError },
    #[error("`{0}` is not a duration: a bare number is whole seconds (e.g. 90)")]
    BadSeconds(String),
    #[error("`{0}` is longer than any flag takes (at most 100 years)")]
    TooLong(String),
}

/// Parses a duration: a bare number of seconds, or humantime's `NUMBER UNIT` terms.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(t.parse().map_err(|_| DurationError::BadSeconds(s.to_owned()))?)
    } else {
        humantime::parse_duration(t).map_err(|reason| DurationError::Syntax { value: s.to_owned(), reason })?
    };
    if d > MAX_DURATION {
        return Err(DurationError::TooLong(s.to_owned()));
    }
    Ok(d)
}

/// Why a command-line value is not a point in time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum TimeError {
    #[error("`{value}` is not a time (Unix seconds, e.g. 1764583200, or RFC 3339 in UTC, e.g. 2025-12-01T10:00:00Z): {reason}")]
    Syntax { value: String, reason: humantime::TimestampError },
    #[error("`{0}` is not a time: a bare number is whole Unix seconds")]
    BadSeconds(String),
    #[error("`{0}` is before 1970")]
    BeforeEpoch(String),
}

/// Parses a point in time as Unix seconds: a bare number of seconds, or an RFC 3339 time in
/// UTC (fractions of a second are dropped).
pub(crate) fn parse_time(s: &str) -> Result<u64, TimeError> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| TimeError::BadSeconds(s.to_owned()));
    }
    let at = humantime::parse_rfc3339(t).map_err(|reason| TimeError::Syntax { value: s.to_owned(), reason })?;
    at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).map_err(|_| TimeError::BeforeEpoch(s.to_owned()))
}

/// One KRE image a client accepts: all of its PCRs, `N=HEX,N=HEX,...` (`--expect-kre-image`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KreImage(pub(crate) Vec<keygate_attestation::PcrExpectation>);

/// Why a value is not a KRE image.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum KreImageError {
    #[error("`{0}`: an image is its PCRs as N=HEX,N=HEX,... (at least one)")]
    Empty(String),
    #[error("`{value}`: {reason}")]
    Pcr { value: String, reason: keygate_attestation::pcr::PcrParseError },
    #[error("`{value}`: PCR{index} given twice")]
    Duplicate { value: String, index: u8 },
}

impl std::str::FromStr for KreImage {
    type Err = KreImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pcrs: Vec<keygate_attestation::PcrExpectation> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let e: keygate_attestation::PcrExpectation =
                part.parse().map_err(|reason| KreImageError::Pcr { value: s.to_owned(), reason })?;
            if pcrs.iter().any(|p| p.index == e.index) {
                return Err(KreImageError::Duplicate { value: s.to_owned(), index: e.index });
            }
            pcrs.push(e);
        }
        if pcrs.is_empty() {
            return Err(KreImageError::Empty(s.to_owned()));
        }
        Ok(KreImage(pcrs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn accepts_bare_seconds_and_humantime_terms() {
        let cases = [
            // What the old per-verb parsers took, so every documented example still parses.
            ("0", S(0)),
            ("2", S(2)),
            ("86400", S(86_400)),
            ("0s", S(0)),
            ("2s", S(2)),
            ("90s", S(90)),
            ("500ms", Duration::from_millis(500)),
            ("10m", S(600)),
            ("30m", S(1_800)),
            ("1h", S(3_600)),
            ("1d", S(86_400)),
            ("2d", S(172_800)),
            (" 5m ", S(300)),
            // humantime's terms.
            ("250ms", Duration::from_millis(250)),
            ("1h 30m", S(5_400)),
            ("1h30m", S(5_400)),
            ("5min", S(300)),
            ("2 days", S(172_800)),
            ("1.5s", Duration::from_millis(1_500)),
            ("100y", MAX_DURATION),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_duration_with_a_typed_error() {
        for bad in ["", " ", "s", "-1s", "ten", "1x", "1.5", "5 m m", "1h -2m"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(matches!(err, DurationError::Syntax { .. }), "{bad:?}: {err:?}");
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
        assert_eq!(
            parse_duration("99999999999999999999"),
            Err(DurationError::BadSeconds("99999999999999999999".into()))
        );
        for long in ["9999999999s", "9999999999", "101y", "100y 1s"] {
            assert_eq!(parse_duration(long), Err(DurationError::TooLong(long.into())), "{long:?}");
        }
    }

    #[test]
    fn times_are_unix_seconds_or_rfc3339_in_utc() {
        for (s, want) in [
            ("0", 0),
            ("1764583200", 1_764_583_200),
            ("2025-12-01T10:00:00Z", 1_764_583_200),
            ("2025-12-01T10:00:00.999Z", 1_764_583_200),
            ("1970-01-01T00:00:00Z", 0),
        ] {
            assert_eq!(parse_time(s), Ok(want), "{s}");
        }
        for bad in ["", "yesterday", "2025-12-01", "2025-12-01T10:00:00", "2025-13-01T10:00:00Z", "-5", "1.5"] {
            let err = parse_time(bad).expect_err(bad);
            assert!(matches!(err, TimeError::Syntax { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains("RFC 3339"), "{err}");
        }
        assert_eq!(parse_time("99999999999999999999999"), Err(TimeError::BadSeconds("99999999999999999999999".into())));
    }

    #[test]
    fn a_kre_image_is_all_of_its_pcrs() {
        let (a, b) = ("ab".repeat(48), "cd".repeat(48));
        let img: KreImage = format!("0={a}, 1={b},2={a}").parse().expect("image");
        assert_eq!(img.0.iter().map(|e| e.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(matches!("".parse::<KreImage>(), Err(KreImageError::Empty(_))));
        assert!(matches!(",".parse::<KreImage>(), Err(KreImageError::Empty(_))));
        assert!(matches!(format!("0={a},0={b}").parse::<KreImage>(), Err(KreImageError::Duplicate { index: 0, .. })));
        assert!(matches!(format!("0={a},1=zz").parse::<KreImage>(), Err(KreImageError::Pcr { .. })));
    }
}
