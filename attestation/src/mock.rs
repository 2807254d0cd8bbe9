//! The mock NSM and its test PKI (feature `mock`).
//!
//! Documents are produced in the real format (untagged COSE_Sign1, ES384, CBOR payload with
//! the real field names and null optional fields, a cabundle root → regional → zonal →
//! instance and a leaf) and signed by a P-384 PKI shaped like AWS's, derived
//! deterministically from a seed: the same seed, time and request give byte-identical
//! documents (RFC 6979 signatures). The only difference from real documents is the root:
//! mock documents verify only against the mock root, never against the AWS root.
//!
//! Certificates are written with a small DER encoder in this module rather than a
//! certificate-generation crate because the adversarial tests need certificates that such
//! crates refuse to produce (a leaf marked CA, a CA without keyCertSign, a wrong curve
//! OID, an unknown critical extension) and because signatures must be deterministic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hkdf::Hkdf;
use p384::ecdsa::signature::Signer;
use p384::ecdsa::{DerSignature, Signature, SigningKey};
use sha2::{Digest, Sha384};

use crate::chain::{pem_encode, TrustAnchor};
use crate::cose;
use crate::crypto::{Crypto, P384SigningKey};
use crate::document::DocumentKind;
use crate::nsm::{check_request, AttestRequest, Nsm, NsmError, PcrDescription};
use crate::secret::Secret;
use crate::verify::UnixMillis;

/// One hour in seconds.
const HOUR: i64 = 3600;
/// One day in seconds.
const DAY: i64 = 24 * HOUR;
/// The mock root's validity, the same window as the AWS root (2019-10-28 → 2049-10-28).
const ROOT_NOT_BEFORE: i64 = 1_572_269_285;
const ROOT_NOT_AFTER: i64 = 2_519_044_085;

/// OIDs used by the mock certificates.
pub mod oid {
    /// ecdsa-with-SHA384
    pub const ECDSA_SHA384: &[u64] = &[1, 2, 840, 10045, 4, 3, 3];
    /// ecdsa-with-SHA256
    pub const ECDSA_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
    /// id-ecPublicKey
    pub const EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
    /// secp384r1
    pub const SECP384R1: &[u64] = &[1, 3, 132, 0, 34];
    /// prime256v1
    pub const PRIME256V1: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
    /// basicConstraints
    pub const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
    /// keyUsage
    pub const KEY_USAGE: &[u64] = &[2, 5, 29, 15];
    /// A private-arc extension nobody understands (for the unhandled-critical test).
    pub const UNKNOWN_EXTENSION: &[u64] = &[1, 3, 6, 1, 4, 1, 55555, 1];
    /// countryName
    pub const C: &[u64] = &[2, 5, 4, 6];
    /// organizationName
    pub const O: &[u64] = &[2, 5, 4, 10];
    /// organizationalUnitName
    pub const OU: &[u64] = &[2, 5, 4, 11];
    /// commonName
    pub const CN: &[u64] = &[2, 5, 4, 3];
}

/// A minimal DER writer: enough for X.509 certificates.
mod der {
    pub(super) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(u8::try_from(len).unwrap_or(0));
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | u8::try_from(bytes.len() - skip).unwrap_or(0));
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }
    pub(super) fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }
    pub(super) fn set(parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x31, &parts.concat())
    }
    pub(super) fn uint(bytes: &[u8]) -> Vec<u8> {
        let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|&b| b == 0).collect();
        let mut c = Vec::new();
        if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
            c.push(0);
        }
        c.extend_from_slice(&trimmed);
        tlv(0x02, &c)
    }
    pub(super) fn oid(arcs: &[u64]) -> Vec<u8> {
        let mut c = Vec::new();
        let first = arcs.first().copied().unwrap_or(0) * 40 + arcs.get(1).copied().unwrap_or(0);
        for a in std::iter::once(first).chain(arcs.iter().skip(2).copied()) {
            let mut groups = vec![u8::try_from(a & 0x7f).unwrap_or(0)];
            let mut v = a >> 7;
            while v > 0 {
                groups.push(0x80 | u8::try_from(v & 0x7f).unwrap_or(0));
                v >>= 7;
            }
            groups.reverse();
            c.extend_from_slice(&groups);
        }
        tlv(0x06, &c)
    }
    pub(super) fn bit_string(unused: u8, bytes: &[u8]) -> Vec<u8> {
        let mut c = vec![unused];
        c.extend_from_slice(bytes);
        tlv(0x03, &c)
    }
    pub(super) fn octets(bytes: &[u8]) -> Vec<u8> {
        tlv(0x04, bytes)
    }
    pub(super) fn boolean(v: bool) -> Vec<u8> {
        tlv(0x01, &[if v { 0xff } else { 0 }])
    }
    pub(super) fn utf8(s: &str) -> Vec<u8> {
        tlv(0x0c, s.as_bytes())
    }
    pub(super) fn printable(s: &str) -> Vec<u8> {
        tlv(0x13, s.as_bytes())
    }
    pub(super) fn explicit(n: u8, inner: &[u8]) -> Vec<u8> {
        tlv(0xa0 | n, inner)
    }
    /// UTCTime before 2050, GeneralizedTime after (RFC 5280 §4.1.2.5).
    pub(super) fn time(unix: i64) -> Vec<u8> {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (hh, mm, ss) = (secs / 3600, secs % 3600 / 60, secs % 60);
        if (1950..2050).contains(&y) {
            tlv(0x17, format!("{:02}{m:02}{d:02}{hh:02}{mm:02}{ss:02}Z", y % 100).as_bytes())
        } else {
            tlv(0x18, format!("{y:04}{m:02}{d:02}{hh:02}{mm:02}{ss:02}Z").as_bytes())
        }
    }
    /// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
    fn civil_from_days(z: i64) -> (i64, i64, i64) {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        (if m <= 2 { y + 1 } else { y }, m, d)
    }
}

/// Derives a P-384 signing key from `seed` and `label` (HKDF-SHA384; deterministic).
pub fn derive_key(seed: &[u8], label: &str) -> SigningKey {
    let hk = Hkdf::<Sha384>::new(Some(b"keygate-mock-pki-v1"), seed);
    for counter in 0u32.. {
        let mut okm = [0u8; 48];
        let info = [label.as_bytes(), &counter.to_be_bytes()].concat();
        if hk.expand(&info, &mut okm).is_ok() {
            if let Ok(k) = SigningKey::from_slice(&okm) {
                return k;
            }
        }
    }
    unreachable!("a valid scalar is found within a few tries")
}

/// The uncompressed SEC1 point of a key.
pub fn public_point(key: &SigningKey) -> Vec<u8> {
    key.verifying_key().to_encoded_point(false).as_bytes().to_vec()
}

/// Everything that goes into one certificate. Tests tweak these to build bad chains.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Subject name attributes (OID arcs, value).
    pub subject: Vec<(&'static [u64], String)>,
    /// Serial number bytes.
    pub serial: Vec<u8>,
    /// Not before, Unix seconds.
    pub not_before: i64,
    /// Not after, Unix seconds.
    pub not_after: i64,
    /// `Some(path_len)` for a CA (basicConstraints cA=TRUE), `None` for an end entity.
    pub ca: Option<Option<u32>>,
    /// Include keyUsage keyCertSign (CAs) — or digitalSignature (leaf) when false.
    pub key_cert_sign: bool,
    /// Signature algorithm OID written in the certificate (both places, unless
    /// `tbs_sig_alg` overrides the one inside tbsCertificate).
    pub sig_alg: &'static [u64],
    /// A different signature algorithm OID inside tbsCertificate only (an inconsistent
    /// certificate, RFC 5280 §4.1.1.2 requires both to match).
    pub tbs_sig_alg: Option<&'static [u64]>,
    /// Named curve OID in the SubjectPublicKeyInfo.
    pub curve: &'static [u64],
    /// Add an unknown extension marked critical.
    pub unknown_critical_extension: bool,
    /// Override the issuer name (otherwise the issuer's subject).
    pub issuer_override: Option<Vec<u8>>,
}

impl CertSpec {
    fn new(cn: String, not_before: i64, not_after: i64, ca: Option<Option<u32>>) -> Self {
        let serial = Sha384::digest(cn.as_bytes())[..16].to_vec();
        Self {
            subject: vec![
                (oid::C, "US".to_owned()),
                (oid::O, "Amazon".to_owned()),
                (oid::OU, "AWS".to_owned()),
                (oid::CN, cn),
            ],
            serial,
            not_before,
            not_after,
            key_cert_sign: ca.is_some(),
            ca,
            sig_alg: oid::ECDSA_SHA384,
            tbs_sig_alg: None,
            curve: oid::SECP384R1,
            unknown_critical_extension: false,
            issuer_override: None,
        }
    }

    /// The DER `Name` of the subject.
    pub fn subject_der(&self) -> Vec<u8> {
        let rdns: Vec<Vec<u8>> = self
            .subject
            .iter()
            .map(|(o, v)| {
                let value = if *o == oid::C { der::printable(v) } else { der::utf8(v) };
                der::set(&[der::seq(&[der::oid(o), value])])
            })
            .collect();
        der::seq(&rdns)
    }

    /// Issues the certificate for `subject_key`, signed by `issuer_key` with issuer name `issuer`.
    pub fn issue(&self, subject_key: &SigningKey, issuer: &[u8], issuer_key: &SigningKey) -> Vec<u8> {
        let alg = der::seq(&[der::oid(self.sig_alg)]);
        let tbs_alg = der::seq(&[der::oid(self.tbs_sig_alg.unwrap_or(self.sig_alg))]);
        let spki = der::seq(&[
            der::seq(&[der::oid(oid::EC_PUBLIC_KEY), der::oid(self.curve)]),
            der::bit_string(0, &public_point(subject_key)),
        ]);
        let mut exts = Vec::new();
        let bc = match self.ca {
            Some(Some(p)) => der::seq(&[der::boolean(true), der::uint(&p.to_be_bytes())]),
            Some(None) => der::seq(&[der::boolean(true)]),
            None => der::seq(&[]),
        };
        exts.push(der::seq(&[der::oid(oid::BASIC_CONSTRAINTS), der::boolean(true), der::octets(&bc)]));
        // keyCertSign|cRLSign (0x06, 1 unused bit) for CAs; digitalSignature (0x80, 7 unused) otherwise.
        let ku = if self.key_cert_sign { der::bit_string(1, &[0x06]) } else { der::bit_string(7, &[0x80]) };
        exts.push(der::seq(&[der::oid(oid::KEY_USAGE), der::boolean(true), der::octets(&ku)]));
        if self.unknown_critical_extension {
            exts.push(der::seq(&[
                der::oid(oid::UNKNOWN_EXTENSION),
                der::boolean(true),
                der::octets(&der::tlv(0x05, &[])),
            ]));
        }
        let issuer = self.issuer_override.clone().unwrap_or_else(|| issuer.to_vec());
        let tbs = der::seq(&[
            der::explicit(0, &der::uint(&[2])),
            der::uint(&self.serial),
            tbs_alg,
            issuer,
            der::seq(&[der::time(self.not_before), der::time(self.not_after)]),
            self.subject_der(),
            spki,
            der::explicit(3, &der::seq(&exts)),
        ]);
        let sig: DerSignature = issuer_key.sign(&tbs);
        der::seq(&[tbs, alg, der::bit_string(0, sig.as_bytes())])
    }
}

/// A certificate chain for one document: cabundle (root first) and the leaf with its key.
#[derive(Debug, Clone)]
pub struct Chain {
    /// root, regional, zonal, instance.
    pub cabundle: Vec<Vec<u8>>,
    /// The leaf certificate.
    pub leaf: Vec<u8>,
    /// The leaf's private key, which signs the document.
    pub leaf_key: SigningKey,
}

/// The mock PKI: root → regional → zonal → instance → leaf, deterministic from a seed.
#[derive(Debug, Clone)]
pub struct MockPki {
    seed: Vec<u8>,
    keys: [SigningKey; 4],
    specs: [CertSpec; 4],
    /// The DER of root, regional, zonal, instance (as issued from `specs`).
    certs: Vec<Vec<u8>>,
    region_tag: String,
}

/// Level names, root first.
pub const LEVELS: [&str; 5] = ["root", "regional", "zonal", "instance", "leaf"];

impl MockPki {
    /// The PKI as it stands at `now_ms`: intermediate windows follow AWS's shape (regional
    /// about four weeks, zonal a few days, instance 24 hours, aligned to the hour).
    pub fn from_seed(seed: &[u8], now_ms: UnixMillis) -> Self {
        Self::with_tweak(seed, now_ms, &|_, _| {})
    }

    /// As [`Self::from_seed`], but `tweak(level, spec)` may alter each CA certificate
    /// (level 0 = root … 3 = instance) before it is issued.
    pub fn with_tweak(seed: &[u8], now_ms: UnixMillis, tweak: &dyn Fn(usize, &mut CertSpec)) -> Self {
        let now = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let hour = now - now.rem_euclid(HOUR);
        let day = now - now.rem_euclid(DAY);
        let tag = hex::encode(&Sha384::digest(seed)[..8]);
        let keys = [
            derive_key(seed, "root"),
            derive_key(seed, "regional"),
            derive_key(seed, "zonal"),
            derive_key(seed, "instance"),
        ];
        let mut specs = [
            CertSpec::new("mock.nitro-enclaves.keygate".to_owned(), ROOT_NOT_BEFORE, ROOT_NOT_AFTER, Some(None)),
            CertSpec::new(format!("{tag}.us-east-1.mock.nitro-enclaves"), day - 7 * DAY, day + 21 * DAY, Some(Some(2))),
            CertSpec::new(
                format!("{tag}.zonal.us-east-1.mock.nitro-enclaves"),
                day - DAY,
                day + 3 * DAY,
                Some(Some(1)),
            ),
            CertSpec::new(format!("i-{tag}.us-east-1.mock.nitro-enclaves"), hour, hour + DAY, Some(Some(0))),
        ];
        specs[0].subject[1].1 = "keygate".to_owned();
        specs[0].subject[2].1 = "mock".to_owned();
        for (i, s) in specs.iter_mut().enumerate() {
            tweak(i, s);
        }
        let mut certs = Vec::with_capacity(4);
        for i in 0..4 {
            let issuer = if i == 0 { 0 } else { i - 1 };
            certs.push(specs[i].issue(&keys[i], &specs[issuer].subject_der(), &keys[issuer]));
        }
        Self { seed: seed.to_vec(), keys, specs, certs, region_tag: tag }
    }

    /// The mock root as a trust anchor.
    pub fn root_anchor(&self) -> TrustAnchor {
        // The untweaked root is always a valid anchor; a tweaked one is taken as it is, so that
        // verification reports exactly what is wrong with it.
        TrustAnchor::from_der(&self.certs[0]).unwrap_or_else(|_| TrustAnchor::from_der_unchecked(&self.certs[0]))
    }

    /// The mock root certificate as PEM.
    pub fn root_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.certs[0])
    }

    /// root, regional, zonal, instance.
    pub fn cabundle(&self) -> Vec<Vec<u8>> {
        self.certs.clone()
    }

    /// A module id in the real format (`i-<17 hex>-enc<17 hex>`), from the seed.
    pub fn module_id(&self) -> String {
        self.module_id_for("")
    }

    /// The module id of a named instance under this PKI.
    pub fn module_id_for(&self, instance: &str) -> String {
        let h = hex::encode(Sha384::digest([self.seed.as_slice(), b"module", instance.as_bytes()].concat()));
        format!("i-{}-enc{}", &h[..17], &h[17..34])
    }

    /// The leaf spec for a document at `timestamp_ms`: valid from 3 s before it for 3 hours.
    pub fn leaf_spec(&self, timestamp_ms: UnixMillis) -> CertSpec {
        let ts = i64::try_from(timestamp_ms / 1000).unwrap_or(i64::MAX);
        CertSpec::new(format!("i-{}-enc.leaf.mock.nitro-enclaves", self.region_tag), ts - 3, ts + 3 * HOUR, None)
    }

    /// A chain for a document at `timestamp_ms`, with the leaf as `leaf_spec` describes.
    pub fn chain_with_leaf(&self, timestamp_ms: UnixMillis, leaf: &CertSpec) -> Chain {
        let leaf_key = derive_key(&self.seed, &format!("leaf-{}", timestamp_ms / 1000));
        let leaf_der = leaf.issue(&leaf_key, &self.specs[3].subject_der(), &self.keys[3]);
        Chain { cabundle: self.certs.clone(), leaf: leaf_der, leaf_key }
    }

    /// The DER subject name of the instance CA (the leaf's issuer).
    pub fn instance_subject(&self) -> Vec<u8> {
        self.specs[3].subject_der()
    }

    /// Re-issues CA certificate `level` (1..=3) for another subject key, signed by its
    /// proper issuer: a valid certificate whose key did not sign the level below.
    pub fn reissue(&self, level: usize, subject_key: &SigningKey) -> Option<Vec<u8>> {
        let issuer = level.checked_sub(1)?;
        let spec = self.specs.get(level)?;
        Some(spec.issue(subject_key, &self.specs[issuer].subject_der(), &self.keys[issuer]))
    }

    /// The normal chain for a document at `timestamp_ms`.
    pub fn chain(&self, timestamp_ms: UnixMillis) -> Chain {
        self.chain_with_leaf(timestamp_ms, &self.leaf_spec(timestamp_ms))
    }
}

/// The fields of a mock document's payload, before signing. Tests change any of them.
#[derive(Debug, Clone)]
pub struct MockDocument {
    /// `module_id`.
    pub module_id: String,
    /// `digest`.
    pub digest: String,
    /// `timestamp` (ms).
    pub timestamp_ms: u64,
    /// `pcrs` or `nitrotpm_pcrs`.
    pub kind: DocumentKind,
    /// PCR values.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// `certificate`.
    pub certificate: Vec<u8>,
    /// `cabundle`.
    pub cabundle: Vec<Vec<u8>>,
    /// `public_key` (null when `None`).
    pub public_key: Option<Vec<u8>>,
    /// `user_data` (null when `None`).
    pub user_data: Option<Vec<u8>>,
    /// `nonce` (null when `None`).
    pub nonce: Option<Vec<u8>>,
}

impl MockDocument {
    /// The payload as a CBOR map, in the order real documents use.
    pub fn payload_map(&self) -> Vec<(ciborium::Value, ciborium::Value)> {
        use ciborium::Value as V;
        let opt = |v: &Option<Vec<u8>>| v.clone().map_or(V::Null, V::Bytes);
        let pcrs = self.pcrs.iter().map(|(i, v)| (V::Integer((*i).into()), V::Bytes(v.clone()))).collect();
        let pcr_key = match self.kind {
            DocumentKind::Enclave => "pcrs",
            DocumentKind::NitroTpm => "nitrotpm_pcrs",
        };
        vec![
            (V::Text("module_id".into()), V::Text(self.module_id.clone())),
            (V::Text("digest".into()), V::Text(self.digest.clone())),
            (V::Text("timestamp".into()), V::Integer(self.timestamp_ms.into())),
            (V::Text(pcr_key.into()), V::Map(pcrs)),
            (V::Text("certificate".into()), V::Bytes(self.certificate.clone())),
            (V::Text("cabundle".into()), V::Array(self.cabundle.iter().cloned().map(V::Bytes).collect())),
            (V::Text("public_key".into()), opt(&self.public_key)),
            (V::Text("user_data".into()), opt(&self.user_data)),
            (V::Text("nonce".into()), opt(&self.nonce)),
        ]
    }

    /// The payload bytes.
    pub fn payload(&self) -> Vec<u8> {
        encode_value(&ciborium::Value::Map(self.payload_map()))
    }
}

/// Encodes a CBOR value (ciborium's canonical definite-length form).
pub fn encode_value(v: &ciborium::Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = ciborium::ser::into_writer(v, &mut out);
    out
}

/// Signs `payload` as an untagged COSE_Sign1 with `protected` header bytes.
pub fn sign_cose(protected: &[u8], payload: &[u8], key: &SigningKey) -> Vec<u8> {
    let sig: Signature = key.sign(&cose::sig_structure(protected, payload));
    cose::encode_sign1(protected, payload, &sig.to_bytes())
}

/// A clock for the mock NSM.
pub type Clock = Arc<dyn Fn() -> UnixMillis + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    })
}

/// A mock NSM: documents in the real format from the mock PKI.
pub struct MockNsm {
    seed: Vec<u8>,
    kind: DocumentKind,
    pcrs: BTreeMap<u8, Vec<u8>>,
    clock: Clock,
    /// The PKI for the current hour (rebuilt when the hour changes).
    pki: Mutex<Option<(u64, MockPki)>>,
    /// The leaf chain of the current second (a real NSM's leaf certificate also serves many
    /// documents); reissuing it per document made the mock as slow as three signatures.
    leaf: Mutex<Option<(u64, Chain)>>,
    /// With [`MockNsm::with_fast_signing`]: the backend whose P-384 signs documents, and the
    /// current leaf's key in that backend (made once per leaf).
    fast: Option<&'static dyn Crypto>,
    fast_key: Mutex<Option<(u64, Arc<dyn P384SigningKey>)>>,
    counter: Mutex<u64>,
    instance: String,
}

impl std::fmt::Debug for MockNsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockNsm").field("kind", &self.kind).field("pcrs", &self.pcrs.len()).finish_non_exhaustive()
    }
}

/// The value `cell` caches for `key` (an hour, a second), made and cached anew when it holds
/// another key. A poisoned cache is still used: it only ever holds complete values.
fn cached<T: Clone>(cell: &Mutex<Option<(u64, T)>>, key: u64, make: impl FnOnce() -> T) -> T {
    let mut guard = match cell.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    match guard.as_ref() {
        Some((k, v)) if *k == key => v.clone(),
        _ => {
            let v = make();
            *guard = Some((key, v.clone()));
            v
        }
    }
}

/// Number of PCRs a mock enclave document carries (as real NSM documents do).
pub const ENCLAVE_PCRS: u8 = 16;
/// Number of PCRs a mock NitroTPM document carries (0–23, as real NitroTPM documents do).
pub const TPM_PCRS: u8 = 24;
/// The NitroTPM PCRs that hold all-ones bytes (0xFF) in real documents: the TPM's
/// dynamic-launch PCRs, which a TPM resets to all ones.
pub const TPM_ONES_PCRS: [u8; 6] = [17, 18, 19, 20, 21, 22];

impl MockNsm {
    /// A mock NSM for an enclave whose PCRs are `pcrs` (others zero, 48 bytes each).
    pub fn new(seed: &[u8], pcrs: BTreeMap<u8, Vec<u8>>, clock: Clock) -> Self {
        Self::with_kind(seed, DocumentKind::Enclave, pcrs, clock)
    }

    /// A mock NSM of either document kind. PCRs not in `given` are 48 bytes of zeros, except
    /// that a NitroTPM document's [`TPM_ONES_PCRS`] are all 0xFF, as real ones are.
    pub fn with_kind(seed: &[u8], kind: DocumentKind, given: BTreeMap<u8, Vec<u8>>, clock: Clock) -> Self {
        let (n, ones) = match kind {
            DocumentKind::Enclave => (ENCLAVE_PCRS, None),
            DocumentKind::NitroTpm => (TPM_PCRS, Some(TPM_ONES_PCRS)),
        };
        let fill = |i: u8| if ones.as_ref().is_some_and(|r| r.contains(&i)) { 0xFF } else { 0 };
        let mut pcrs: BTreeMap<u8, Vec<u8>> = (0..n).map(|i| (i, vec![fill(i); 48])).collect();
        pcrs.extend(given);
        Self {
            seed: seed.to_vec(),
            kind,
            pcrs,
            clock,
            pki: Mutex::new(None),
            leaf: Mutex::new(None),
            fast: None,
            fast_key: Mutex::new(None),
            counter: Mutex::new(0),
            instance: String::new(),
        }
    }

    /// Signs documents with `crypto`'s P-384 (aws-lc-rs signs several times faster than the
    /// pure-Rust RFC 6979 signer) instead of deterministically: the same request no longer
    /// gives byte-identical documents. For load generators and benchmarks, where the mock
    /// stands in for a device whose signing costs the enclave nothing.
    pub fn with_fast_signing(mut self, crypto: &'static dyn Crypto) -> Self {
        self.fast = Some(crypto);
        self
    }

    /// The fast signer's key for the leaf of `second`, made once per leaf.
    fn fast_key(&self, crypto: &dyn Crypto, second: u64, chain: &Chain) -> Result<Arc<dyn P384SigningKey>, NsmError> {
        let mut guard = match self.fast_key.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((s, k)) = guard.as_ref() {
            if *s == second {
                return Ok(k.clone());
            }
        }
        let scalar = Secret::new(chain.leaf_key.to_bytes().into());
        let key: Arc<dyn P384SigningKey> =
            Arc::from(crypto.p384_signing_key(&scalar).map_err(|e| NsmError::Mock(e.to_string()))?);
        *guard = Some((second, key.clone()));
        Ok(key)
    }

    /// Names this instance: documents from the same PKI get a distinct `module_id` per name
    /// (as different enclaves under one AWS PKI do).
    pub fn with_instance(mut self, name: &str) -> Self {
        self.instance = name.to_owned();
        self
    }

    /// Runs this enclave on the parent instance `instance_id` (`i-…`), optionally with the IAM
    /// role `role_arn`: PCR4 (and PCR3) take the values a Nitro hypervisor measures for them
    /// ([`crate::members::parent_instance_pcr4`], [`crate::members::parent_role_pcr3`]:
    /// SHA-384 of 48 zero bytes ‖ the UTF-8 id). Without it both stay as given (zero by
    /// default), as before.
    pub fn with_parent(mut self, instance_id: &str, role_arn: Option<&str>) -> Self {
        self.pcrs.insert(4, crate::members::parent_instance_pcr4(instance_id).to_vec());
        if let Some(role) = role_arn {
            self.pcrs.insert(3, crate::members::parent_role_pcr3(role).to_vec());
        }
        self
    }

    /// The PKI in force at `now_ms`.
    pub fn pki_at(&self, now_ms: UnixMillis) -> MockPki {
        cached(&self.pki, now_ms / 3_600_000, || MockPki::from_seed(&self.seed, now_ms))
    }

    /// The mock root.
    pub fn root_anchor(&self) -> TrustAnchor {
        MockPki::from_seed(&self.seed, (self.clock)()).root_anchor()
    }

    /// The PCR values this mock reports.
    pub fn pcrs(&self) -> &BTreeMap<u8, Vec<u8>> {
        &self.pcrs
    }

    /// The unsigned document this mock would produce at `timestamp_ms` for `req`.
    pub fn document(&self, timestamp_ms: UnixMillis, req: &AttestRequest) -> (MockDocument, Chain) {
        let pki = self.pki_at(timestamp_ms);
        let second = timestamp_ms / 1000;
        let chain = cached(&self.leaf, second, || pki.chain(timestamp_ms));
        let doc = MockDocument {
            module_id: pki.module_id_for(&self.instance),
            digest: "SHA384".to_owned(),
            timestamp_ms,
            kind: self.kind,
            pcrs: self.pcrs.clone(),
            certificate: chain.leaf.clone(),
            cabundle: chain.cabundle.clone(),
            public_key: req.public_key.clone(),
            user_data: req.user_data.clone(),
            nonce: req.nonce.clone(),
        };
        (doc, chain)
    }
}

impl Nsm for MockNsm {
    fn kind(&self) -> &'static str {
        "mock"
    }

    fn attest(&self, req: &AttestRequest) -> Result<Vec<u8>, NsmError> {
        check_request(req)?;
        let now = (self.clock)();
        let (doc, chain) = self.document(now, req);
        let Some(crypto) = self.fast else {
            return Ok(sign_cose(&cose::PROTECTED_ES384, &doc.payload(), &chain.leaf_key));
        };
        let payload = doc.payload();
        let key = self.fast_key(crypto, now / 1000, &chain)?;
        let sig = key
            .sign(&cose::sig_structure(&cose::PROTECTED_ES384, &payload))
            .map_err(|e| NsmError::Mock(e.to_string()))?;
        Ok(cose::encode_sign1(&cose::PROTECTED_ES384, &payload, &sig))
    }

    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        let i = u8::try_from(index).map_err(|_| NsmError::Mock(format!("no PCR {index}")))?;
        let data = self.pcrs.get(&i).cloned().ok_or_else(|| NsmError::Mock(format!("no PCR {index}")))?;
        Ok(PcrDescription { lock: true, data })
    }

    fn random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        // Real randomness: the mock stands in for attestation, not for the RNG.
        use rand_core::RngCore;
        rand_core::OsRng.try_fill_bytes(buf).map_err(|e| NsmError::Mock(e.to_string()))?;
        if let Ok(mut c) = self.counter.lock() {
            *c += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Verifier, VerifyError, VerifyOptions};

    const T: u64 = 1_795_478_400_000; // 2026-11-24T00:00:00Z

    #[test]
    fn der_time_encodings() {
        assert_eq!(der::time(0), der::tlv(0x17, b"700101000000Z"));
        assert_eq!(der::time(1_795_478_400), der::tlv(0x17, b"261124000000Z"));
        assert_eq!(der::time(2_524_608_000), der::tlv(0x18, b"20500101000000Z"));
        assert_eq!(der::time(951_782_400), der::tlv(0x17, b"000229000000Z"));
    }

    #[test]
    fn der_oid_encoding() {
        assert_eq!(der::oid(oid::ECDSA_SHA384), vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]);
        assert_eq!(der::oid(oid::SECP384R1), vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]);
    }

    #[test]
    fn fast_signed_documents_verify_with_every_backend_and_are_randomized() {
        for signer in crate::crypto::all_backends() {
            let pcrs = BTreeMap::from([(0, vec![1u8; 48])]);
            let nsm = MockNsm::new(b"seed", pcrs.clone(), Arc::new(|| T)).with_fast_signing(signer);
            let req = AttestRequest { nonce: Some(vec![9; 32]), ..Default::default() };
            let a = nsm.attest(&req).expect("doc");
            let b = nsm.attest(&req).expect("doc");
            for verifier in crate::crypto::all_backends() {
                let v = Verifier::with_crypto(nsm.root_anchor(), verifier);
                if let Err(e) = v.verify(&a, &VerifyOptions::at(T)) {
                    panic!("{} signed, {} verified: {e}", signer.name(), verifier.name());
                }
                let mut bad = a.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(v.verify(&bad, &VerifyOptions::at(T)).is_err());
            }
            // The same payload as the deterministic signer's; aws-lc-rs signatures are
            // randomized (RustCrypto's stay RFC 6979).
            let sig_len = crate::crypto::P384_SIG_LEN;
            let det = MockNsm::new(b"seed", pcrs, Arc::new(|| T)).attest(&req).expect("doc");
            assert!(a[..a.len() - sig_len] == b[..b.len() - sig_len]);
            assert!(det[..det.len() - sig_len] == a[..a.len() - sig_len]);
            assert_eq!(a == b, signer.name() == "rustcrypto", "{}", signer.name());
        }
    }

    #[test]
    fn deterministic_from_seed() {
        let clock: Clock = Arc::new(|| T);
        let a = MockNsm::new(b"s", BTreeMap::new(), clock.clone()).attest(&AttestRequest::default());
        let b = MockNsm::new(b"s", BTreeMap::new(), clock.clone()).attest(&AttestRequest::default());
        let c = MockNsm::new(b"t", BTreeMap::new(), clock).attest(&AttestRequest::default());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn mock_documents_verify_against_the_mock_root_only() {
        let pcrs = BTreeMap::from([(0, vec![1u8; 48])]);
        let nsm = MockNsm::new(b"seed", pcrs, Arc::new(|| T));
        let doc = nsm.attest(&AttestRequest { nonce: Some(vec![9; 32]), ..Default::default() }).expect("doc");
        let ok = Verifier::new(nsm.root_anchor()).verify(&doc, &VerifyOptions::at(T)).expect("verifies");
        assert_eq!(ok.nonce(), Some(&[9u8; 32][..]));
        assert_eq!(ok.pcrs().len(), 16);
        let aws = Verifier::new(TrustAnchor::aws_nitro().expect("aws"));
        assert!(matches!(aws.verify(&doc, &VerifyOptions::at(T)), Err(VerifyError::RootMismatch { .. })));
    }

    #[test]
    fn attests_each_caller_field_up_to_the_nsm_maximum_and_refuses_one_more() {
        // What the NSM signs (docs/attestation.md), not the verifier's constants.
        const NSM_MAX: usize = 1024;
        let nsm = MockNsm::new(b"seed", BTreeMap::from([(0, vec![1u8; 48])]), Arc::new(|| T));
        let max = AttestRequest {
            user_data: Some(vec![1; NSM_MAX]),
            nonce: Some(vec![2; NSM_MAX]),
            public_key: Some(vec![3; NSM_MAX]),
        };
        let doc = nsm.attest(&max).expect("1024 bytes each");
        let att = Verifier::new(nsm.root_anchor()).verify(&doc, &VerifyOptions::at(T)).expect("verifies");
        assert_eq!(att.public_key().map(<[u8]>::len), Some(1024));
        let empty_key = AttestRequest { public_key: Some(vec![]), ..Default::default() };
        let doc = nsm.attest(&empty_key).expect("empty public_key");
        let att = Verifier::new(nsm.root_anchor()).verify(&doc, &VerifyOptions::at(T)).expect("verifies");
        assert_eq!(att.public_key(), Some(&[][..]));
        let over = |f: fn(&mut AttestRequest)| {
            let mut r = max.clone();
            f(&mut r);
            nsm.attest(&r).map(|_| ())
        };
        assert_eq!(over(|r| r.user_data = Some(vec![0; 1025])), Err(NsmError::TooLarge("user_data")));
        assert_eq!(over(|r| r.nonce = Some(vec![0; 1025])), Err(NsmError::TooLarge("nonce")));
        assert_eq!(over(|r| r.public_key = Some(vec![0; 1025])), Err(NsmError::TooLarge("public_key")));
    }

    #[test]
    fn a_parent_instance_sets_pcr4_and_a_role_pcr3_and_nothing_else() {
        let plain = MockNsm::new(b"seed", BTreeMap::new(), Arc::new(|| T));
        let parented = MockNsm::new(b"seed", BTreeMap::new(), Arc::new(|| T)).with_parent("i-0abc", None);
        let both =
            MockNsm::new(b"seed", BTreeMap::new(), Arc::new(|| T)).with_parent("i-0abc", Some("arn:aws:iam::1:role/r"));
        assert_eq!(plain.pcrs().get(&4), Some(&vec![0u8; 48]), "default unchanged");
        assert_eq!(parented.pcrs().get(&4), Some(&crate::members::parent_instance_pcr4("i-0abc").to_vec()));
        assert_eq!(parented.pcrs().get(&3), Some(&vec![0u8; 48]));
        assert_eq!(both.pcrs().get(&3), Some(&crate::members::parent_role_pcr3("arn:aws:iam::1:role/r").to_vec()));
        let differs: Vec<u8> = (0..16).filter(|i| plain.pcrs().get(i) != both.pcrs().get(i)).collect();
        assert_eq!(differs, vec![3, 4]);
    }

    #[test]
    fn nitrotpm_documents_have_the_real_pcr_shape() {
        let nsm = MockNsm::with_kind(b"seed", DocumentKind::NitroTpm, BTreeMap::new(), Arc::new(|| T));
        assert_eq!(nsm.pcrs().len(), 24);
        assert!(nsm.pcrs().iter().all(|(i, v)| *v == [if (17..=22).contains(i) { 0xFF } else { 0 }; 48]));
        let enclave = MockNsm::new(b"seed", BTreeMap::new(), Arc::new(|| T));
        assert!(enclave.pcrs().values().all(|v| *v == [0; 48]), "enclave PCRs unchanged");
    }

    #[test]
    fn documents_stay_valid_across_hours() {
        for hours in [0u64, 1, 23, 24, 25, 24 * 30] {
            let t = T + hours * 3_600_000 + 1_234_567;
            let nsm = MockNsm::new(b"seed", BTreeMap::from([(0, vec![1u8; 48])]), Arc::new(move || t));
            let doc = nsm.attest(&AttestRequest::default()).expect("doc");
            Verifier::new(nsm.root_anchor())
                .verify(&doc, &VerifyOptions::at(t))
                .unwrap_or_else(|e| panic!("+{hours}h: {e}"));
        }
    }
}
