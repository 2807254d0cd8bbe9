//! The startup policy file (JSON): per cluster, the allowed images. It feeds the same
//! [`ReleasePolicy`] (and the same decision function) that the pipeline-signed policy will.
//!
//! ```json
//! {
//!   "allow_debug": false,
//!   "clusters": {
//!     "prod-1": { "images": [
//!       { "name": "cp-2026.11.3", "kind": "enclave", "pcrs": { "0": "<hex>", "1": "<hex>", "2": "<hex>" },
//!         "not_after": 1798000000 }
//!     ], "kek_version": 2, "kek_retire_below": 1 }
//!   }
//! }
//! ```
//!
//! `kek_version` (default 1) is the cluster's current KEK version; versions below
//! `kek_retire_below` (default 0) are never released. An image without `"kind"` is an
//! `enclave` rule (never "any kind"); a `nitrotpm` rule must pin the boot PCRs
//! (`ReleasePolicy::validate`).

use std::collections::BTreeMap;

use keygate_attestation::policy::{ClusterRule, ImageRule, ReleasePolicy};
use keygate_attestation::DocumentKind;
use serde::Deserialize;

/// Largest policy file read.
pub const MAX_POLICY_FILE: usize = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    allow_debug: bool,
    clusters: BTreeMap<String, Cluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cluster {
    images: Vec<Image>,
    #[serde(default = "one")]
    kek_version: u32,
    #[serde(default)]
    kek_retire_below: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    pcrs: BTreeMap<String, String>,
    /// Unix seconds.
    #[serde(default)]
    not_after: Option<u64>,
}

/// Why a policy file is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFileError {
    /// Over [`MAX_POLICY_FILE`].
    #[error("policy file larger than {MAX_POLICY_FILE} bytes")]
    TooLarge,
    /// Not valid JSON of the expected shape.
    #[error("policy file: {0}")]
    Json(#[from] serde_json::Error),
    /// A PCR index or value is not valid.
    #[error("policy file: image `{image}`: PCR `{index}`: {why}")]
    Pcr { image: String, index: String, why: &'static str },
    /// Unknown document kind.
    #[error("policy file: image `{0}`: kind must be `enclave` or `nitrotpm`")]
    Kind(String),
    /// The rules are not meaningful.
    #[error("{0}")]
    Invalid(#[from] keygate_attestation::policy::PolicyError),
}

/// Parses and validates a policy file.
pub fn parse(bytes: &[u8]) -> Result<ReleasePolicy, PolicyFileError> {
    if bytes.len() > MAX_POLICY_FILE {
        return Err(PolicyFileError::TooLarge);
    }
    let f: File = serde_json::from_slice(bytes)?;
    let mut clusters = BTreeMap::new();
    for (name, c) in f.clusters {
        let mut images = Vec::new();
        for i in c.images {
            let mut pcrs = BTreeMap::new();
            for (index, value) in &i.pcrs {
                let bad = |why| PolicyFileError::Pcr { image: i.name.clone(), index: index.clone(), why };
                let n: u8 = index.parse().map_err(|_| bad("index is not a number below 32"))?;
                let v = hex::decode(value).map_err(|_| bad("value is not hex"))?;
                pcrs.insert(n, v);
            }
            let kind = match i.kind.as_deref() {
                None | Some("enclave") => DocumentKind::Enclave,
                Some("nitrotpm") => DocumentKind::NitroTpm,
                Some(_) => return Err(PolicyFileError::Kind(i.name)),
            };
            images.push(ImageRule {
                name: i.name,
                pcrs,
                kind,
                not_after_ms: i.not_after.map(|s| s.saturating_mul(1000)),
                not_before_ms: None,
            });
        }
        clusters.insert(name, ClusterRule { images, kek_version: c.kek_version, kek_retire_below: c.kek_retire_below });
    }
    let policy = ReleasePolicy { clusters, allow_debug: f.allow_debug };
    policy.validate()?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_attestation::policy::PolicyError;

    fn h(b: u8) -> String {
        hex::encode([b; 48])
    }

    #[test]
    fn parses_a_policy() {
        let json = format!(
            r#"{{"clusters": {{"c": {{"images": [{{"name": "i", "kind": "enclave", "pcrs": {{"0": "{}", "1": "{}", "2": "{}"}}, "not_after": 5}}]}}}}}}"#,
            h(1),
            h(2),
            h(3)
        );
        let p = parse(json.as_bytes()).expect("policy");
        let img = &p.clusters["c"].images[0];
        assert_eq!(img.pcrs[&0], vec![1; 48]);
        assert_eq!(img.kind, DocumentKind::Enclave);
        assert_eq!(img.not_after_ms, Some(5000));
        assert!(!p.allow_debug);
        assert_eq!((p.clusters["c"].kek_version, p.clusters["c"].kek_retire_below), (1, 0));
    }

    #[test]
    fn an_image_without_a_kind_is_an_enclave_rule() {
        let file = |kind: &str, pcrs: &str| {
            format!(r#"{{"clusters": {{"c": {{"images": [{{"name": "i"{kind}, "pcrs": {{{pcrs}}}}}]}}}}}}"#)
        };
        let pcr8 = format!(r#""8": "{}""#, h(1));
        let p = parse(file("", &pcr8).as_bytes()).expect("policy");
        assert_eq!(p.clusters["c"].images[0].kind, DocumentKind::Enclave);
        let boot = format!(r#""4": "{}", "12": "{}""#, h(4), h(12));
        let p = parse(file(r#", "kind": "nitrotpm""#, &boot).as_bytes()).expect("policy");
        assert_eq!(p.clusters["c"].images[0].kind, DocumentKind::NitroTpm);
    }

    #[test]
    fn parses_a_kek_schedule_and_refuses_a_bad_one() {
        let file = |schedule: &str| {
            format!(
                r#"{{"clusters": {{"c": {{"images": [{{"name": "i", "pcrs": {{"8": "{}"}}}}]{schedule}}}}}}}"#,
                h(1)
            )
        };
        let p = parse(file(r#", "kek_version": 3, "kek_retire_below": 2"#).as_bytes()).expect("policy");
        assert_eq!((p.clusters["c"].kek_version, p.clusters["c"].kek_retire_below), (3, 2));
        for bad in [r#", "kek_version": 0"#, r#", "kek_version": 2, "kek_retire_below": 3"#, r#", "kek_version": 5000"#]
        {
            assert!(matches!(parse(file(bad).as_bytes()), Err(PolicyFileError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_files() {
        assert!(matches!(parse(b"{"), Err(PolicyFileError::Json(_))));
        assert!(matches!(parse(br#"{"clusters": {}, "extra": 1}"#), Err(PolicyFileError::Json(_))));
        let loose = format!(r#"{{"clusters": {{"c": {{"images": [{{"name": "i", "pcrs": {{"0": "{}"}}}}]}}}}}}"#, h(1));
        assert!(matches!(parse(loose.as_bytes()), Err(PolicyFileError::Invalid(_))));
        let bad_hex = r#"{"clusters": {"c": {"images": [{"name": "i", "pcrs": {"0": "zz"}}]}}}"#;
        assert!(matches!(parse(bad_hex.as_bytes()), Err(PolicyFileError::Pcr { .. })));
        let bad_kind = format!(
            r#"{{"clusters": {{"c": {{"images": [{{"name": "i", "kind": "vm", "pcrs": {{"8": "{}"}}}}]}}}}}}"#,
            h(1)
        );
        assert!(matches!(parse(bad_kind.as_bytes()), Err(PolicyFileError::Kind(_))));
        let pcr8_tpm = format!(
            r#"{{"clusters": {{"c": {{"images": [{{"name": "i", "kind": "nitrotpm", "pcrs": {{"8": "{}"}}}}]}}}}}}"#,
            h(1)
        );
        assert!(matches!(
            parse(pcr8_tpm.as_bytes()),
            Err(PolicyFileError::Invalid(PolicyError::SignerRuleNotEnclave { .. }))
        ));
        assert!(matches!(parse(&vec![b' '; MAX_POLICY_FILE + 1]), Err(PolicyFileError::TooLarge)));
    }
}
