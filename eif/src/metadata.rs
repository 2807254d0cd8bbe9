//! The metadata section (EIF v4): a JSON document describing the build. It is not
//! measured into any PCR, but it is covered by the CRC, so a reproducible image needs
//! a reproducible build time — hence [`BuildTime`], which is always given, never
//! read from the clock here.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::EifError;

/// The metadata document, field for field as AWS's `EifIdentityInfo` serialises it
/// (serde_json, fields in this order, no whitespace).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Image name (`eif_build` defaults it to the kernel's file name).
    #[serde(rename = "ImageName")]
    pub image_name: String,
    /// Image version (`eif_build` defaults it to `1.0`).
    #[serde(rename = "ImageVersion")]
    pub image_version: String,
    /// Build facts.
    #[serde(rename = "BuildMetadata")]
    pub build: BuildInfo,
    /// `docker inspect` output for images nitro-cli built from Docker; `null` otherwise.
    #[serde(rename = "DockerInfo")]
    pub docker_info: serde_json::Value,
    /// User-supplied JSON; `null` if none.
    #[serde(rename = "CustomMetadata")]
    pub custom: serde_json::Value,
}

/// The `BuildMetadata` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// RFC 3339 build time.
    #[serde(rename = "BuildTime")]
    pub build_time: String,
    /// Name of the tool that built the image.
    #[serde(rename = "BuildTool")]
    pub build_tool: String,
    /// Its version.
    #[serde(rename = "BuildToolVersion")]
    pub build_tool_version: String,
    /// Operating system, from the kernel config.
    #[serde(rename = "OperatingSystem")]
    pub operating_system: String,
    /// Kernel version, from the kernel config.
    #[serde(rename = "KernelVersion")]
    pub kernel_version: String,
}

impl Metadata {
    pub(crate) fn to_json(&self) -> Result<Vec<u8>, EifError> {
        serde_json::to_vec(self).map_err(EifError::InvalidMetadata)
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self, EifError> {
        serde_json::from_slice(bytes).map_err(EifError::InvalidMetadata)
    }
}

/// A build time: fixed by the caller (`--build-time`, `SOURCE_DATE_EPOCH`), so that
/// two builds of the same inputs give the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildTime(OffsetDateTime);

impl Default for BuildTime {
    /// The Unix epoch: the build time when none is given.
    fn default() -> Self {
        BuildTime(OffsetDateTime::UNIX_EPOCH)
    }
}

impl BuildTime {
    /// Parse an RFC 3339 timestamp (any offset; stored in UTC).
    pub fn from_rfc3339(s: &str) -> Result<Self, EifError> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| EifError::BuildTime { reason: format!("`{s}` is not RFC 3339: {e}") })?;
        Self::checked(t.to_offset(time::UtcOffset::UTC))
    }

    /// From Unix seconds, as `SOURCE_DATE_EPOCH` gives them.
    pub fn from_unix_seconds(secs: i64) -> Result<Self, EifError> {
        let t = OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|e| EifError::BuildTime { reason: format!("{secs} is out of range: {e}") })?;
        Self::checked(t)
    }

    /// From a `SOURCE_DATE_EPOCH` value (decimal Unix seconds).
    pub fn from_source_date_epoch(value: &str) -> Result<Self, EifError> {
        let secs: i64 = value
            .trim()
            .parse()
            .map_err(|_| EifError::BuildTime { reason: format!("SOURCE_DATE_EPOCH `{value}` is not an integer") })?;
        Self::from_unix_seconds(secs)
    }

    fn checked(t: OffsetDateTime) -> Result<Self, EifError> {
        if !(0..=9999).contains(&t.year()) {
            return Err(EifError::BuildTime { reason: "year outside 0000..=9999".to_owned() });
        }
        Ok(BuildTime(t))
    }

    /// Unix seconds.
    pub fn unix_seconds(&self) -> i64 {
        self.0.unix_timestamp()
    }

    /// The form `chrono`'s `DateTime<Utc>::to_rfc3339()` gives, which is what
    /// `eif_build` writes when it takes the time from the clock:
    /// `YYYY-MM-DDTHH:MM:SS[.fraction]+00:00`, the fraction in 3, 6 or 9 digits and
    /// only if non-zero.
    pub fn to_rfc3339(&self) -> String {
        let t = self.0;
        let nanos = t.nanosecond();
        let fraction = if nanos == 0 {
            String::new()
        } else if nanos % 1_000_000 == 0 {
            format!(".{:03}", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            format!(".{:06}", nanos / 1_000)
        } else {
            format!(".{nanos:09}")
        };
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}+00:00",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            fraction
        )
    }
}

/// OS name and kernel version from a kernel `.config`, read the way `eif_build
/// --kernel_config` reads them: the third line (`# Linux/x86_64 6.1.0 Kernel
/// Configuration`) split on space, `/` and `-`; words 1 and 3, `Unknown` if absent.
pub fn os_and_kernel_from_config(config: &[u8]) -> Result<(String, String), EifError> {
    let mut lines = config.split(|b| *b == b'\n');
    let third = match (lines.next(), lines.next(), lines.next()) {
        (Some(_), Some(_), Some(third)) => third,
        _ => return Err(EifError::KernelConfig { reason: "fewer than three lines" }),
    };
    // `BufRead::lines` also drops a `\r` before the `\n`.
    let third = third.strip_suffix(b"\r").unwrap_or(third);
    if third.is_empty() && config.ends_with(b"\n") && lines.next().is_none() {
        // "a\nb\n" has two lines, not three with an empty last one.
        return Err(EifError::KernelConfig { reason: "fewer than three lines" });
    }
    let third = std::str::from_utf8(third).map_err(|_| EifError::KernelConfig { reason: "third line is not UTF-8" })?;
    let words: Vec<&str> = third.split([' ', '/', '-']).collect();
    let pick = |i: usize| words.get(i).copied().unwrap_or("Unknown").to_owned();
    Ok((pick(1), pick(3)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The metadata of a test image: version 1.0, built by keygate 0.1.0 on Linux 6.1.0.
    pub(crate) fn sample(image_name: &str, build_time: &str) -> Metadata {
        Metadata {
            image_name: image_name.into(),
            image_version: "1.0".into(),
            build: BuildInfo {
                build_time: build_time.into(),
                build_tool: "keygate".into(),
                build_tool_version: "0.1.0".into(),
                operating_system: "Linux".into(),
                kernel_version: "6.1.0".into(),
            },
            docker_info: serde_json::Value::Null,
            custom: serde_json::Value::Null,
        }
    }

    #[test]
    fn metadata_serialises_in_the_reference_field_order() {
        let m = sample("bzImage", "2024-01-01T00:00:00+00:00");
        let json = String::from_utf8(m.to_json().expect("json")).expect("utf8");
        assert_eq!(
            json,
            r#"{"ImageName":"bzImage","ImageVersion":"1.0","BuildMetadata":{"BuildTime":"2024-01-01T00:00:00+00:00","BuildTool":"keygate","BuildToolVersion":"0.1.0","OperatingSystem":"Linux","KernelVersion":"6.1.0"},"DockerInfo":null,"CustomMetadata":null}"#
        );
        assert_eq!(Metadata::from_json(json.as_bytes()).expect("parse"), m);
    }

    #[test]
    fn build_time_formats_like_chrono() {
        let t = BuildTime::from_rfc3339("2024-03-01T12:34:56Z").expect("parse");
        assert_eq!(t.to_rfc3339(), "2024-03-01T12:34:56+00:00");
        let t = BuildTime::from_rfc3339("2024-03-01T14:34:56.5+02:00").expect("parse");
        assert_eq!(t.to_rfc3339(), "2024-03-01T12:34:56.500+00:00");
        let t = BuildTime::from_source_date_epoch("1700000000").expect("parse");
        assert_eq!(t.to_rfc3339(), "2023-11-14T22:13:20+00:00");
        assert_eq!(BuildTime::default().to_rfc3339(), "1970-01-01T00:00:00+00:00");
        assert!(matches!(BuildTime::from_rfc3339("yesterday"), Err(EifError::BuildTime { .. })));
        assert!(matches!(BuildTime::from_source_date_epoch("12x"), Err(EifError::BuildTime { .. })));
    }

    #[test]
    fn kernel_config_third_line() {
        let cfg = b"#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 4.14.177-104.253.amzn2.x86_64 Kernel Configuration\n#\n";
        assert_eq!(os_and_kernel_from_config(cfg).expect("cfg"), ("Linux".to_owned(), "4.14.177".to_owned()));
        let cfg = b"a\nb\nshort";
        assert_eq!(os_and_kernel_from_config(cfg).expect("cfg"), ("Unknown".to_owned(), "Unknown".to_owned()));
        assert!(matches!(os_and_kernel_from_config(b"a\nb\n"), Err(EifError::KernelConfig { .. })));
        assert!(matches!(os_and_kernel_from_config(b"a\nb"), Err(EifError::KernelConfig { .. })));
    }
}
