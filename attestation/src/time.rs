//! Points in time as people read them: a Unix time shown as RFC 3339 in UTC
//! (`2026-11-24T00:00:00Z`, or with milliseconds), for every message keygate prints. It decides
//! nothing; outside what RFC 3339's four-digit years can write (before 1970 for the unsigned
//! forms, from the year 10000) it shows the bare number, marked as such.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

/// The first second RFC 3339's four-digit years cannot write (10000-01-01T00:00:00Z).
const YEAR_10000_S: u64 = 253_402_300_800;

/// Unix seconds (a certificate's may be negative), shown as RFC 3339 in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixSeconds(pub i64);

/// Unix milliseconds, shown as RFC 3339 in UTC with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixMillis(pub u64);

impl fmt::Display for UnixSeconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match u64::try_from(self.0) {
            Ok(s) if s < YEAR_10000_S => {
                write!(f, "{}", humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)))
            }
            _ => write!(f, "{} (Unix s)", self.0),
        }
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 / 1000 >= YEAR_10000_S {
            return write!(f, "{} (Unix ms)", self.0);
        }
        write!(f, "{}", humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_3339_in_utc_and_the_bare_number_outside_its_range() {
        assert_eq!(UnixMillis(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(UnixMillis(1_795_478_400_123).to_string(), "2026-11-24T00:00:00.123Z");
        assert_eq!(UnixMillis(951_782_400_000).to_string(), "2000-02-29T00:00:00.000Z");
        assert_eq!(UnixMillis(u64::MAX).to_string(), format!("{} (Unix ms)", u64::MAX));
        assert_eq!(UnixSeconds(1_795_478_400).to_string(), "2026-11-24T00:00:00Z");
        assert_eq!(UnixSeconds(253_402_300_799).to_string(), "9999-12-31T23:59:59Z");
        assert_eq!(UnixSeconds(-1).to_string(), "-1 (Unix s)");
        assert_eq!(UnixSeconds(i64::MAX).to_string(), format!("{} (Unix s)", i64::MAX));
    }
}
