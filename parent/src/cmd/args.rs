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

/// A point in time (Unix milliseconds) as every human message prints it: RFC 3339 in UTC
/// with milliseconds (`keygate_attestation::time`).
pub(crate) fn format_time_ms(ms: u64) -> String {
    keygate_attestation::time::UnixMillis(ms).to_string()
}

/// A point in time (Unix seconds) as RFC 3339 in UTC.
pub(crate) fn format_time_s(s: i64) -> String {
    keygate_attestation::time::UnixSeconds(s).to_string()
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

    /// Words in a flag's name that say its value is a span of time (its help saying
    /// "seconds" or "milliseconds" does too).
    const TIME_WORDS: &[&str] =
        &["timeout", "seconds", "secs", "interval", "follow", "max-age", "skew", "delay", "lease", "grace", "every"];

    /// Every `(path, argument)` under `cmd`.
    fn all_args(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            out.push((path.to_owned(), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            all_args(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    fn is_duration(arg: &clap::Arg) -> bool {
        arg.get_value_parser().type_id() == std::any::TypeId::of::<Duration>()
    }

    /// Every flag that takes a span of time reads it with [`parse_duration`]: the same syntax,
    /// bare seconds included, and the same bound. `keygate parent` takes its values as text and
    /// parses them with [`parse_duration`] beside the environment's and the file's (its
    /// config tests); `keygate bench` measures for `--seconds` (fractions of a second).
    #[test]
    fn times_print_as_rfc_3339_in_utc() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(1_795_478_400_123), "2026-11-24T00:00:00.123Z");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time_s(1_795_478_400), "2026-11-24T00:00:00Z");
        // What is printed parses back.
        assert_eq!(parse_time(&format_time_s(1_795_478_400)), Ok(1_795_478_400));
    }

    #[test]
    fn every_duration_flag_in_the_cli_uses_the_shared_parser() {
        use clap::CommandFactory;
        let mut root = crate::Cli::command();
        root.build();
        let mut args = Vec::new();
        all_args(&root, "keygate", &mut args);
        let mut durations = 0;
        let mut wrong = Vec::new();
        for (path, arg) in &args {
            let Some(long) = arg.get_long() else { continue };
            let name = format!("{path} --{long}");
            let help = arg.get_help().map(|h| h.to_string().to_lowercase()).unwrap_or_default();
            let help = help.replace("unix seconds", "");
            let timely = TIME_WORDS.iter().any(|w| long.contains(w))
                || ["seconds", "millisecond"].iter().any(|w| help.contains(w))
                || arg
                    .get_value_names()
                    .is_some_and(|v| v.iter().any(|n| ["DURATION", "SECONDS", "MS"].contains(&n.as_str())));
            let takes_value = arg.get_action().takes_values();
            let exempt = path.starts_with("keygate parent") || path.starts_with("keygate bench");
            if !is_duration(arg) {
                if timely && takes_value && !exempt {
                    wrong.push(format!("{name}: takes a time but is not a duration"));
                }
                continue;
            }
            durations += 1;
            // Parsed alone, the flag's value is checked before any missing required argument:
            // the shared parser's own refusal proves which parser reads it.
            let sub = path
                .split(' ')
                .skip(1)
                .fold(root.clone(), |c, n| c.find_subcommand(n).cloned().unwrap_or_else(|| panic!("{path}")));
            let refusal = |v: &str| {
                sub.clone()
                    .try_get_matches_from(["keygate", &format!("--{long}={v}")])
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            };
            if !refusal("101y").contains("longer than any flag takes") {
                wrong.push(format!("{name}: does not use args::parse_duration ({})", refusal("101y")));
            }
            for ok in ["90", "1h 30m", "250ms"] {
                let e = refusal(ok);
                if e.contains("is not a duration") || e.contains("longer than") {
                    wrong.push(format!("{name}: refuses `{ok}`: {e}"));
                }
            }
            if arg.get_value_names().is_none_or(|v| v.iter().all(|n| n != "DURATION")) {
                wrong.push(format!("{name}: its value is not named DURATION"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        assert!(durations >= 12, "only {durations} duration flags found: the walk misses some");
    }

    #[test]
    fn the_converted_flags_take_bare_seconds_and_terms() {
        use clap::Parser;
        let parse = |argv: &[&str]| crate::Cli::try_parse_from(argv).map(|c| format!("{:?}", c.command));
        let proxy = ["keygate", "proxy", "--listen", "tcp:localhost:1", "--to", "unix:/k.sock"];
        let with = |extra: &[&str]| parse(&[&proxy[..], extra].concat());
        let dbg = with(&["--first-frame-timeout", "2", "--connect-timeout", "1500ms", "--max-lifetime", "1h 30m"])
            .expect("proxy");
        assert!(dbg.contains("first_frame_timeout: 2s"), "{dbg}");
        assert!(dbg.contains("connect_timeout: 1.5s"), "{dbg}");
        assert!(dbg.contains("max_lifetime: 5400s"), "{dbg}");
        assert!(dbg.contains("TcpHost"), "a DNS name is taken as it is: {dbg}");
        let dbg = with(&[]).expect("defaults");
        assert!(dbg.contains("first_frame_timeout: 5s") && dbg.contains("max_lifetime: 60s"), "{dbg}");
        for bad in ["5 seconds please", "-1", "1.5"] {
            assert!(with(&["--connect-timeout", bad]).is_err(), "{bad}");
        }
        let dbg =
            parse(&["keygate", "audit", "pull", "--kre", "unix:/k", "--dir", "/d", "--follow", "500ms"]).expect("pull");
        assert!(dbg.contains("follow: Some(500ms)"), "{dbg}");
        let dbg = parse(&["keygate", "state", "sync", "--kre", "unix:/k", "--state-dir", "/d", "--follow", "5"])
            .expect("sync");
        assert!(dbg.contains("follow: Some(5s)"), "{dbg}");
        let dbg = parse(&["keygate", "attestation", "verify", "d.cbor", "--max-age", "10m", "--clock-skew", "0"])
            .expect("verify");
        assert!(dbg.contains("max_age: 600s") && dbg.contains("clock_skew: 0ns"), "{dbg}");
        let dbg = parse(&["keygate", "attestation", "verify", "d.cbor"]).expect("verify defaults");
        assert!(dbg.contains("max_age: 300s") && dbg.contains("clock_skew: 30s"), "{dbg}");
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
