//! Release policy: which images may receive which cluster's keys, and the one function that
//! decides it. The startup policy file and (later) the pipeline-signed bundle both feed
//! [`ReleasePolicy`]; [`evaluate`] is the only place the decision is made.
//!
//! [`ReleasePolicy::validate`] decides which rules are meaningful. Every rule names the one
//! document kind it matches. An enclave rule pins the image measurement (PCR0, PCR1, PCR2)
//! or the signing certificate (PCR8): the NSM locks those PCRs, so nothing in the enclave
//! can change them. A NitroTPM rule must pin what measured boot extends before any
//! instance software runs: the boot image and its command line (PCR4 and PCR12, standard
//! boot) or the UEFI Secure Boot policy (PCR7). Every other NitroTPM PCR, PCR8 included,
//! is either a constant or one root can extend after boot to a value of its choosing (an
//! enclave's PCR8 is one extend of a zero PCR), so a rule pinning only those would match
//! any instance under the same Nitro root. Specified in `docs/policy.md`.

use std::collections::BTreeMap;
use std::fmt;

use crate::document::DocumentKind;
use crate::verify::{UnixMillis, VerifiedAttestation};

/// One allowed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRule {
    /// A name for logs and denials (e.g. the pipeline build id).
    pub name: String,
    /// PCRs that must match exactly: for an enclave rule PCR0, PCR1 and PCR2, or PCR8
    /// (signer-based trust); for a NitroTPM rule PCR4 and PCR12, or PCR7 (see
    /// [`ReleasePolicy::validate`]).
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// Only documents of this kind match. Policy files and bundles written before every
    /// rule named its kind mean [`DocumentKind::Enclave`], never "any kind".
    pub kind: DocumentKind,
    /// The rule stops matching after this time (ms since epoch).
    pub not_after_ms: Option<UnixMillis>,
    /// The rule matches only from this time (ms since epoch). Never part of a policy
    /// document: set on rules that a pending signed bundle adds, until its activation.
    pub not_before_ms: Option<UnixMillis>,
}

/// The enclave image measurement (EIF, kernel, application): an enclave rule pins all three
/// or [`ENCLAVE_SIGNER_PCR`].
pub const ENCLAVE_IMAGE_PCRS: [u8; 3] = [0, 1, 2];
/// The enclave signing certificate's measurement. Trustworthy only in an enclave document:
/// a NitroTPM instance's root can extend its PCR8 to the same value.
pub const ENCLAVE_SIGNER_PCR: u8 = 8;
/// NitroTPM standard boot: the boot image (the attestable AMI's UKI, PCR4) and the command
/// line passed to it (PCR12), as `nitro-tpm-pcr-compute` computes them. A NitroTPM rule pins
/// both, or [`NITROTPM_SECURE_BOOT_PCR`].
pub const NITROTPM_BOOT_PCRS: [u8; 2] = [4, 12];
/// NitroTPM with UEFI Secure Boot: the Secure Boot policy (PK, KEK, db and the authorities
/// that verified each boot binary).
pub const NITROTPM_SECURE_BOOT_PCR: u8 = 7;

/// Highest KEK version a policy may name for a cluster (the sealed state holds at most
/// 1024 versions per cluster).
pub const MAX_KEK_VERSION: u32 = 1024;

/// A cluster's allowed images and its KEK schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRule {
    /// Any of these may receive the cluster's keys.
    pub images: Vec<ImageRule>,
    /// The KEK version that is current (wraps/derives new keys): 1 ≤ `kek_version` ≤
    /// [`MAX_KEK_VERSION`]. Raising it rotates the cluster's KEK; it never decreases.
    pub kek_version: u32,
    /// Versions below this are retired: never released again. 0 (or 1) retires nothing;
    /// at most `kek_version`.
    pub kek_retire_below: u32,
}

impl Default for ClusterRule {
    fn default() -> Self {
        Self { images: Vec::new(), kek_version: 1, kek_retire_below: 0 }
    }
}

impl ClusterRule {
    /// A cluster with these images and the default KEK schedule (version 1, nothing retired).
    pub fn new(images: Vec<ImageRule>) -> Self {
        Self { images, ..Self::default() }
    }

    /// Whether the KEK schedule is the default one (version 1, nothing retired).
    pub fn has_default_schedule(&self) -> bool {
        self.kek_version == 1 && self.kek_retire_below == 0
    }

    /// Whether KEK version `version` may still be released under this rule.
    pub fn releases_version(&self, version: u32) -> bool {
        version >= self.kek_retire_below
    }
}

/// The whole policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleasePolicy {
    /// Per-cluster rules.
    pub clusters: BTreeMap<String, ClusterRule>,
    /// Accept debug-mode documents (never in production).
    pub allow_debug: bool,
}

/// Why a policy is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// An enclave rule pins neither PCR0+1+2 nor PCR8: it would match too much.
    #[error("image `{image}` of cluster `{cluster}` must pin PCR0, PCR1 and PCR2, or PCR8")]
    Underspecified { cluster: String, image: String },
    /// A NitroTPM rule relies on PCR8 (the enclave signing certificate) without the boot
    /// PCRs: root on any NitroTPM instance can extend its PCR8 to that value.
    #[error("image `{image}` of cluster `{cluster}`: a PCR8 (signing certificate) rule must be of kind enclave; a NitroTPM instance can extend its PCR8 to any enclave's value")]
    SignerRuleNotEnclave { cluster: String, image: String },
    /// A NitroTPM rule pins neither PCR4+PCR12 (standard boot) nor PCR7 (Secure Boot): what
    /// it pins is constant or extendable by software after boot.
    #[error("image `{image}` of cluster `{cluster}`: a nitrotpm rule must pin PCR4 and PCR12 (boot image and command line), or PCR7 (Secure Boot policy)")]
    NitroTpmBootUnpinned { cluster: String, image: String },
    /// A PCR value is not 32, 48 or 64 bytes, or its index is not below 32.
    #[error("image `{image}` of cluster `{cluster}`: PCR{index} is not a valid measurement")]
    BadPcr { cluster: String, image: String, index: u8 },
    /// A cluster has no images.
    #[error("cluster `{0}` allows no image")]
    EmptyCluster(String),
    /// A KEK schedule outside 1 ≤ version ≤ 1024, retire_below ≤ version.
    #[error("cluster `{cluster}`: KEK version {version} with versions below {retire_below} retired is invalid (need 1 <= version <= {MAX_KEK_VERSION} and retire_below <= version)")]
    BadKekSchedule { cluster: String, version: u32, retire_below: u32 },
}

impl ReleasePolicy {
    /// Checks that every rule is meaningful: PCR indices and lengths, a KEK schedule in
    /// range, and for each image rule the PCRs its document kind needs (see the module doc).
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (cluster, rule) in &self.clusters {
            if rule.images.is_empty() {
                return Err(PolicyError::EmptyCluster(cluster.clone()));
            }
            if rule.kek_version == 0 || rule.kek_version > MAX_KEK_VERSION || rule.kek_retire_below > rule.kek_version {
                return Err(PolicyError::BadKekSchedule {
                    cluster: cluster.clone(),
                    version: rule.kek_version,
                    retire_below: rule.kek_retire_below,
                });
            }
            for image in &rule.images {
                for (i, v) in &image.pcrs {
                    if *i >= 32 || ![32, 48, 64].contains(&v.len()) {
                        return Err(PolicyError::BadPcr {
                            cluster: cluster.clone(),
                            image: image.name.clone(),
                            index: *i,
                        });
                    }
                }
                let has = |i: &u8| image.pcrs.contains_key(i);
                let kind = image.kind;
                let (cluster, image) = (cluster.clone(), image.name.clone());
                match kind {
                    DocumentKind::Enclave => {
                        if !(ENCLAVE_IMAGE_PCRS.iter().all(has) || has(&ENCLAVE_SIGNER_PCR)) {
                            return Err(PolicyError::Underspecified { cluster, image });
                        }
                    }
                    DocumentKind::NitroTpm => {
                        if !(NITROTPM_BOOT_PCRS.iter().all(has) || has(&NITROTPM_SECURE_BOOT_PCR)) {
                            return Err(if has(&ENCLAVE_SIGNER_PCR) {
                                PolicyError::SignerRuleNotEnclave { cluster, image }
                            } else {
                                PolicyError::NitroTpmBootUnpinned { cluster, image }
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyDenial {
    /// The cluster is not in the policy.
    #[error("cluster `{0}` is not in the policy")]
    UnknownCluster(String),
    /// A debug-mode document and the policy does not allow debug.
    #[error("debug-mode documents are not allowed by the policy")]
    DebugMode,
    /// No allowed image matches.
    #[error("no image allowed for cluster `{cluster}` matches: {detail}")]
    NoMatchingImage { cluster: String, detail: MismatchDetail },
}

/// The closest image rule and why it did not match, for the denial message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MismatchDetail {
    /// The nearest rule differs at this PCR.
    Pcr { image: String, index: u8 },
    /// Every rule whose PCRs match names the other document kind.
    Kind { image: String, required: DocumentKind, found: DocumentKind },
    /// Every rule whose PCRs match has passed its not-after time.
    Expired { image: String, not_after_ms: UnixMillis },
    /// The matching rule was added by a signed bundle whose activation delay has not passed.
    NotYetActive { image: String, activates_at_ms: UnixMillis },
}

impl fmt::Display for MismatchDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MismatchDetail::Pcr { image, index } => write!(f, "PCR{index} differs (closest image `{image}`)"),
            MismatchDetail::Kind { image, required, found } => {
                write!(f, "image `{image}` requires a {required} document, got {found}")
            }
            MismatchDetail::Expired { image, not_after_ms } => {
                write!(f, "image `{image}` expired at {not_after_ms} ms")
            }
            MismatchDetail::NotYetActive { image, activates_at_ms } => {
                write!(f, "image `{image}` is allowed only from {activates_at_ms} ms (activation delay)")
            }
        }
    }
}

/// Decides whether `att` may receive keys of `cluster` at `now_ms`; returns the matching
/// image rule.
pub fn evaluate<'p>(
    policy: &'p ReleasePolicy,
    att: &VerifiedAttestation,
    cluster: &str,
    now_ms: UnixMillis,
) -> Result<&'p ImageRule, PolicyDenial> {
    let rule = policy.clusters.get(cluster).ok_or_else(|| PolicyDenial::UnknownCluster(cluster.to_owned()))?;
    if att.is_debug() && !policy.allow_debug {
        return Err(PolicyDenial::DebugMode);
    }
    // The closest miss: the rule whose first mismatching PCR index is highest (most PCRs
    // in order matched); kind and expiry misses rank above any PCR mismatch.
    let mut best: Option<(u16, MismatchDetail)> = None;
    for image in &rule.images {
        let mismatch = image.pcrs.iter().find(|(i, v)| att.pcr(**i) != Some(v.as_slice())).map(|(i, _)| *i);
        let miss = match mismatch {
            Some(index) => (u16::from(index), MismatchDetail::Pcr { image: image.name.clone(), index }),
            None => match (image.kind, image.not_after_ms, image.not_before_ms) {
                (required, _, _) if required != att.kind() => {
                    (1000, MismatchDetail::Kind { image: image.name.clone(), required, found: att.kind() })
                }
                (_, Some(not_after_ms), _) if now_ms > not_after_ms => {
                    (1001, MismatchDetail::Expired { image: image.name.clone(), not_after_ms })
                }
                (_, _, Some(activates_at_ms)) if now_ms < activates_at_ms => {
                    (1002, MismatchDetail::NotYetActive { image: image.name.clone(), activates_at_ms })
                }
                _ => return Ok(image),
            },
        };
        if best.as_ref().is_none_or(|(score, _)| miss.0 > *score) {
            best = Some(miss);
        }
    }
    let detail = best.map(|(_, d)| d).ok_or_else(|| PolicyDenial::UnknownCluster(cluster.to_owned()))?;
    Err(PolicyDenial::NoMatchingImage { cluster: cluster.to_owned(), detail })
}

#[cfg(all(test, feature = "mock"))]
mod tests {
    use super::*;
    use crate::mock::MockNsm;
    use crate::{AttestRequest, Nsm, Verifier, VerifyOptions};
    use std::sync::Arc;

    const T: u64 = 1_795_478_400_000;

    fn att(pcrs: &[(u8, u8)], kind: DocumentKind) -> VerifiedAttestation {
        let pcrs = pcrs.iter().map(|(i, b)| (*i, vec![*b; 48])).collect();
        let nsm = MockNsm::with_kind(b"policy", kind, pcrs, Arc::new(|| T));
        let doc = nsm.attest(&AttestRequest::default()).expect("doc");
        let mut o = VerifyOptions::at(T);
        o.allow_debug = true;
        Verifier::new(nsm.root_anchor()).verify(&doc, &o).expect("verify")
    }

    fn image(name: &str, pcrs: &[(u8, u8)]) -> ImageRule {
        ImageRule {
            name: name.into(),
            pcrs: pcrs.iter().map(|(i, b)| (*i, vec![*b; 48])).collect(),
            kind: DocumentKind::Enclave,
            not_after_ms: None,
            not_before_ms: None,
        }
    }

    fn tpm_image(name: &str, pcrs: &[(u8, u8)]) -> ImageRule {
        ImageRule { kind: DocumentKind::NitroTpm, ..image(name, pcrs) }
    }

    /// A NitroTPM instance's PCRs: firmware constants (PCR0-2), the boot image (PCR4), the
    /// Secure Boot policy (PCR7), the command line (PCR12).
    const TPM_BOOT: [(u8, u8); 6] = [(0, 0x30), (1, 0x31), (2, 0x32), (4, 0x44), (7, 0x77), (12, 0xcc)];

    fn policy(images: Vec<ImageRule>) -> ReleasePolicy {
        ReleasePolicy { clusters: BTreeMap::from([("c".to_owned(), ClusterRule::new(images))]), allow_debug: false }
    }

    #[test]
    fn matching_and_each_denial() {
        let good = att(&[(0, 1), (1, 2), (2, 3)], DocumentKind::Enclave);
        let p = policy(vec![image("old", &[(0, 9), (1, 2), (2, 3)]), image("new", &[(0, 1), (1, 2), (2, 3)])]);
        assert_eq!(evaluate(&p, &good, "c", T).map(|i| i.name.as_str()), Ok("new"));
        assert_eq!(evaluate(&p, &good, "x", T), Err(PolicyDenial::UnknownCluster("x".into())));

        let wrong2 = att(&[(0, 1), (1, 2), (2, 4)], DocumentKind::Enclave);
        assert_eq!(
            evaluate(&p, &wrong2, "c", T),
            Err(PolicyDenial::NoMatchingImage {
                cluster: "c".into(),
                detail: MismatchDetail::Pcr { image: "new".into(), index: 2 }
            })
        );

        let debug = att(&[], DocumentKind::Enclave);
        assert_eq!(evaluate(&p, &debug, "c", T), Err(PolicyDenial::DebugMode));

        // The rules of `p` name no kind in their source: they are enclave rules, and a
        // NitroTPM document with the same PCRs matches none of them.
        let tpm = att(&[(0, 1), (1, 2), (2, 3)], DocumentKind::NitroTpm);
        assert_eq!(
            evaluate(&p, &tpm, "c", T),
            Err(PolicyDenial::NoMatchingImage {
                cluster: "c".into(),
                detail: MismatchDetail::Kind {
                    image: "new".into(),
                    required: DocumentKind::Enclave,
                    found: DocumentKind::NitroTpm
                }
            })
        );

        let mut expiring = p.clone();
        expiring.clusters.get_mut("c").expect("c").images[1].not_after_ms = Some(T);
        assert!(evaluate(&expiring, &good, "c", T).is_ok());
        assert!(matches!(
            evaluate(&expiring, &good, "c", T + 1),
            Err(PolicyDenial::NoMatchingImage { detail: MismatchDetail::Expired { .. }, .. })
        ));
    }

    #[test]
    fn activation_time_and_messages() {
        let good = att(&[(0, 1), (1, 2), (2, 3)], DocumentKind::Enclave);
        let mut pending = image("new", &[(0, 1), (1, 2), (2, 3)]);
        pending.not_before_ms = Some(T);
        let p = policy(vec![pending]);
        assert!(evaluate(&p, &good, "c", T).is_ok(), "active from its activation time exactly");
        assert!(evaluate(&p, &good, "c", T + 5).is_ok());
        let early = evaluate(&p, &good, "c", T - 1).expect_err("before activation");
        assert_eq!(
            early.to_string(),
            format!(
                "no image allowed for cluster `c` matches: image `new` is allowed only from {T} ms (activation delay)"
            )
        );
        let wrong = att(&[(0, 1), (1, 2), (2, 4)], DocumentKind::Enclave);
        let e = evaluate(&policy(vec![image("x", &[(0, 1), (1, 2), (2, 3)])]), &wrong, "c", T).expect_err("mismatch");
        assert_eq!(e.to_string(), "no image allowed for cluster `c` matches: PCR2 differs (closest image `x`)");
        // Ties keep the first rule in policy order.
        let two = policy(vec![image("first", &[(0, 9), (1, 2), (2, 3)]), image("second", &[(0, 8), (1, 2), (2, 3)])]);
        let e = evaluate(&two, &good, "c", T).expect_err("both differ at PCR0");
        assert!(e.to_string().ends_with("PCR0 differs (closest image `first`)"), "{e}");
    }

    #[test]
    fn pcr8_alone_is_enough_and_underspecified_rules_are_refused() {
        let signed = att(&[(0, 1), (1, 2), (2, 3), (8, 8)], DocumentKind::Enclave);
        let p = policy(vec![image("signer", &[(8, 8)])]);
        p.validate().expect("valid");
        assert!(evaluate(&p, &signed, "c", T).is_ok());
        assert!(matches!(policy(vec![]).validate(), Err(PolicyError::EmptyCluster(_))));
        let schedule = |version: u32, retire_below: u32| {
            let mut p = policy(vec![image("signer", &[(8, 8)])]);
            let rule = p.clusters.get_mut("c").expect("c");
            rule.kek_version = version;
            rule.kek_retire_below = retire_below;
            p.validate()
        };
        assert!(schedule(1, 0).is_ok() && schedule(2, 2).is_ok() && schedule(MAX_KEK_VERSION, 7).is_ok());
        for (v, r) in [(0, 0), (2, 3), (MAX_KEK_VERSION + 1, 0)] {
            assert_eq!(
                schedule(v, r),
                Err(PolicyError::BadKekSchedule { cluster: "c".into(), version: v, retire_below: r }),
                "{v} {r}"
            );
        }
        let mut bad = image("bad", &[(0, 1), (1, 1), (2, 1)]);
        bad.pcrs.insert(3, vec![0; 5]);
        assert!(matches!(policy(vec![bad]).validate(), Err(PolicyError::BadPcr { index: 3, .. })));
    }

    /// A validation row: what, the rule's kind, its PCRs, the expected outcome.
    type Row<'a> = (&'a str, DocumentKind, &'a [(u8, u8)], Result<(), PolicyError>);

    /// Which PCR sets each document kind accepts, each refusal with its exact variant.
    #[test]
    fn validation_table() {
        let runtime: Vec<(u8, u8)> = (16..=23).map(|i| (i, i)).collect();
        let pcr8_and_runtime: Vec<(u8, u8)> = [(8, 8)].into_iter().chain(runtime.iter().copied()).collect();
        let os_and_runtime: Vec<(u8, u8)> = (9..=23).filter(|i| *i != 12).map(|i| (i, i)).collect();
        let under = || Err(PolicyError::Underspecified { cluster: "c".into(), image: "i".into() });
        let signer = || Err(PolicyError::SignerRuleNotEnclave { cluster: "c".into(), image: "i".into() });
        let unpinned = || Err(PolicyError::NitroTpmBootUnpinned { cluster: "c".into(), image: "i".into() });
        #[rustfmt::skip]
        let rows: Vec<Row<'_>> = vec![
            ("enclave: PCR0-2", DocumentKind::Enclave, &[(0, 1), (1, 1), (2, 1)], Ok(())),
            ("enclave: PCR8 alone (signer)", DocumentKind::Enclave, &[(8, 8)], Ok(())),
            ("enclave: PCR0 alone", DocumentKind::Enclave, &[(0, 1)], under()),
            ("enclave: PCR0+1", DocumentKind::Enclave, &[(0, 1), (1, 1)], under()),
            ("enclave: PCR1+2", DocumentKind::Enclave, &[(1, 1), (2, 1)], under()),
            ("enclave: PCR0+2", DocumentKind::Enclave, &[(0, 1), (2, 1)], under()),
            ("enclave: the NitroTPM boot PCRs", DocumentKind::Enclave, &[(4, 4), (7, 7), (12, 12)], under()),
            ("nitrotpm: PCR8 alone", DocumentKind::NitroTpm, &[(8, 8)], signer()),
            ("nitrotpm: PCR0-2 and PCR8", DocumentKind::NitroTpm, &[(0, 1), (1, 1), (2, 1), (8, 8)], signer()),
            ("nitrotpm: PCR8 and PCR16-23", DocumentKind::NitroTpm, &pcr8_and_runtime, signer()),
            ("nitrotpm: PCR8 and PCR4 without PCR12", DocumentKind::NitroTpm, &[(4, 4), (8, 8)], signer()),
            ("nitrotpm: PCR16-23", DocumentKind::NitroTpm, &runtime, unpinned()),
            ("nitrotpm: PCR9-11, 13-23", DocumentKind::NitroTpm, &os_and_runtime, unpinned()),
            ("nitrotpm: PCR0-2 (firmware constants)", DocumentKind::NitroTpm, &[(0, 1), (1, 1), (2, 1)], unpinned()),
            ("nitrotpm: PCR4 without the command line", DocumentKind::NitroTpm, &[(4, 4)], unpinned()),
            ("nitrotpm: PCR12 without the boot image", DocumentKind::NitroTpm, &[(12, 12)], unpinned()),
            ("nitrotpm: PCR4+12 (standard boot)", DocumentKind::NitroTpm, &[(4, 4), (12, 12)], Ok(())),
            ("nitrotpm: PCR7 (Secure Boot)", DocumentKind::NitroTpm, &[(7, 7)], Ok(())),
            ("nitrotpm: PCR4+7+12 and PCR8", DocumentKind::NitroTpm, &[(4, 4), (7, 7), (8, 8), (12, 12)], Ok(())),
        ];
        for (what, kind, pcrs, want) in rows {
            let rule = ImageRule { kind, ..image("i", pcrs) };
            assert_eq!(policy(vec![rule]).validate(), want, "{what}");
        }
    }

    /// The finding: root on a NitroTPM instance extends its PCR8 to an enclave signer rule's
    /// value. The rule is an enclave rule, so the document is refused.
    #[test]
    fn a_nitrotpm_document_with_an_enclave_signers_pcr8_is_refused() {
        let p = policy(vec![image("signer", &[(8, 8)])]);
        p.validate().expect("valid");
        let forged = att(&[(0, 1), (1, 2), (2, 3), (8, 8)], DocumentKind::NitroTpm);
        assert_eq!(
            evaluate(&p, &forged, "c", T),
            Err(PolicyDenial::NoMatchingImage {
                cluster: "c".into(),
                detail: MismatchDetail::Kind {
                    image: "signer".into(),
                    required: DocumentKind::Enclave,
                    found: DocumentKind::NitroTpm
                }
            })
        );
    }

    /// A NitroTPM rule pinning the boot PCRs matches the instance; an enclave document with
    /// the same PCRs does not match it.
    #[test]
    fn a_nitrotpm_rule_matches_only_nitrotpm_documents() {
        let p = policy(vec![tpm_image("ami", &TPM_BOOT[3..])]);
        p.validate().expect("valid");
        let instance = att(&TPM_BOOT, DocumentKind::NitroTpm);
        assert_eq!(evaluate(&p, &instance, "c", T).map(|i| i.name.as_str()), Ok("ami"));
        let other_uki =
            att(&[(0, 0x30), (1, 0x31), (2, 0x32), (4, 0x45), (7, 0x77), (12, 0xcc)], DocumentKind::NitroTpm);
        assert!(matches!(
            evaluate(&p, &other_uki, "c", T),
            Err(PolicyDenial::NoMatchingImage { detail: MismatchDetail::Pcr { index: 4, .. }, .. })
        ));
        let enclave = att(&TPM_BOOT, DocumentKind::Enclave);
        assert_eq!(
            evaluate(&p, &enclave, "c", T),
            Err(PolicyDenial::NoMatchingImage {
                cluster: "c".into(),
                detail: MismatchDetail::Kind {
                    image: "ami".into(),
                    required: DocumentKind::NitroTpm,
                    found: DocumentKind::Enclave
                }
            })
        );
    }
}
