//! Adversarial table: every check of the verifier, each case crafted to violate exactly one,
//! with the exact error it must produce — on every crypto backend.

// The table reads best as one push per case, grouped under comments.
#![allow(clippy::vec_init_then_push)]

use std::collections::BTreeMap;
use std::time::Duration;

use ciborium::Value as V;
use keygate_attestation::cbor::{CborError, CborErrorKind};
use keygate_attestation::cose::PROTECTED_ES384;
use keygate_attestation::crypto::all_backends;
use keygate_attestation::mock::{self, encode_value, oid, sign_cose, CertSpec, Chain, MockDocument, MockPki};
use keygate_attestation::{CertAt, DocumentKind, TrustAnchor, UnknownFields, Verifier, VerifyError, VerifyOptions};
use p384::ecdsa::SigningKey;

/// 2026-11-24T05:00:01.234Z
const T: u64 = 1_795_478_400_000 + 5 * 3_600_000 + 1234;
const SEED: &[u8] = b"adversarial";
/// The most `user_data`, `nonce` and `public_key` bytes the NSM signs (docs/attestation.md),
/// written out rather than taken from the verifier's constants so that a wrong constant fails.
const NSM_MAX: usize = 1024;

fn pcrs() -> BTreeMap<u8, Vec<u8>> {
    (0u8..16).map(|i| (i, if i < 3 { vec![i + 1; 48] } else { vec![0; 48] })).collect()
}

/// PCRs as a real NitroTPM document carries them: 0-23, SHA-384 (48 bytes), 17-22 all 0xFF.
fn nitrotpm_pcrs() -> BTreeMap<u8, Vec<u8>> {
    (0u8..24).map(|i| (i, if mock::TPM_ONES_PCRS.contains(&i) { vec![0xFF; 48] } else { vec![i + 1; 48] })).collect()
}

fn doc_for(pki: &MockPki, chain: &Chain) -> MockDocument {
    MockDocument {
        module_id: pki.module_id(),
        digest: "SHA384".into(),
        timestamp_ms: T,
        kind: DocumentKind::Enclave,
        pcrs: pcrs(),
        certificate: chain.leaf.clone(),
        cabundle: chain.cabundle.clone(),
        public_key: Some(vec![4; 97]),
        user_data: Some(b"user".to_vec()),
        nonce: Some(vec![7; 32]),
    }
}

struct Fx {
    pki: MockPki,
    chain: Chain,
    doc: MockDocument,
}

impl Fx {
    fn new() -> Self {
        Self::tweaked(&|_, _| {}, &|_| {})
    }

    fn tweaked(ca: &dyn Fn(usize, &mut CertSpec), leaf: &dyn Fn(&mut CertSpec)) -> Self {
        let pki = MockPki::with_tweak(SEED, T, ca);
        let mut spec = pki.leaf_spec(T);
        leaf(&mut spec);
        let chain = pki.chain_with_leaf(T, &spec);
        let doc = doc_for(&pki, &chain);
        Self { pki, chain, doc }
    }

    fn anchor(&self) -> TrustAnchor {
        TrustAnchor::from_der(&self.chain.cabundle[0]).expect("anchor")
    }

    fn signed(&self) -> Vec<u8> {
        sign_cose(&PROTECTED_ES384, &self.doc.payload(), &self.chain.leaf_key)
    }

    fn signed_map(&self, map: Vec<(V, V)>) -> Vec<u8> {
        sign_cose(&PROTECTED_ES384, &encode_value(&V::Map(map)), &self.chain.leaf_key)
    }

    /// The payload map with `f` applied.
    fn with_map(&self, f: impl FnOnce(&mut Vec<(V, V)>)) -> Vec<u8> {
        let mut m = self.doc.payload_map();
        f(&mut m);
        self.signed_map(m)
    }

    fn with_doc(&self, f: impl FnOnce(&mut MockDocument)) -> Vec<u8> {
        let mut d = self.doc.clone();
        f(&mut d);
        sign_cose(&PROTECTED_ES384, &d.payload(), &self.chain.leaf_key)
    }

    fn with_field(&self, name: &str, value: V) -> Vec<u8> {
        self.with_map(|m| {
            for (k, v) in m.iter_mut() {
                if k.as_text() == Some(name) {
                    *v = value.clone();
                }
            }
        })
    }
}

/// A raw COSE_Sign1 array built from parts, signed over `protected` and `payload`.
fn cose_parts(protected: Vec<u8>, unprotected: V, payload: V, key: &SigningKey, sig_len: Option<usize>) -> Vec<u8> {
    use p384::ecdsa::signature::Signer;
    let payload_bytes = match &payload {
        V::Bytes(b) => b.clone(),
        _ => Vec::new(),
    };
    let sig: p384::ecdsa::Signature = key.sign(&keygate_attestation::cose::sig_structure(&protected, &payload_bytes));
    let mut sig = sig.to_bytes().to_vec();
    if let Some(n) = sig_len {
        sig.resize(n, 0);
    }
    encode_value(&V::Array(vec![V::Bytes(protected), unprotected, payload, V::Bytes(sig)]))
}

fn opts() -> VerifyOptions {
    VerifyOptions::at(T)
}

struct Case {
    name: &'static str,
    doc: Vec<u8>,
    anchor: TrustAnchor,
    opts: VerifyOptions,
    expect: Result<(), VerifyError>,
}

fn case(name: &'static str, fx: &Fx, doc: Vec<u8>, expect: VerifyError) -> Case {
    Case { name, doc, anchor: fx.anchor(), opts: opts(), expect: Err(expect) }
}

fn cases() -> Vec<Case> {
    let fx = Fx::new();
    let key = &fx.chain.leaf_key;
    let payload = V::Bytes(fx.doc.payload());
    let mut v = Vec::new();

    v.push(Case { name: "baseline verifies", doc: fx.signed(), anchor: fx.anchor(), opts: opts(), expect: Ok(()) });
    v.push(Case {
        name: "tagged COSE_Sign1 (18) verifies",
        doc: encode_value(&V::Tag(18, Box::new(ciborium::de::from_reader(fx.signed().as_slice()).expect("cbor")))),
        anchor: fx.anchor(),
        opts: opts(),
        expect: Ok(()),
    });

    // ---- COSE envelope ----
    // The good payload signed under these protected and unprotected headers.
    let envelope = |name, protected: &[u8], unprotected, expect| {
        case(name, &fx, cose_parts(protected.to_vec(), V::Map(unprotected), payload.clone(), key, None), expect)
    };
    v.push(envelope(
        "alg ES256 in protected header",
        &[0xa1, 0x01, 0x26],
        vec![],
        VerifyError::UnsupportedAlgorithm(-7),
    ));
    // Protected headers other than exactly `{1: -35}`, and what the verifier says of each.
    for (name, protected, reason) in [
        ("extra field in protected header", &[0xa2, 0x01, 0x38, 0x22, 0x04, 0x41, 0x00][..], "fields other than alg"),
        ("zero-length protected header", &[], "not well-formed CBOR"),
        ("duplicate alg in protected header", &[0xa2, 0x01, 0x38, 0x22, 0x01, 0x38, 0x22], "duplicate alg"),
    ] {
        v.push(envelope(name, protected, vec![], VerifyError::ProtectedHeader(reason)));
    }
    v.push(envelope(
        "alg only in the unprotected header",
        &[0xa0],
        vec![(V::Integer(1.into()), V::Integer((-35).into()))],
        VerifyError::ProtectedHeader("no alg"),
    ));
    v.push(envelope(
        "unprotected header carries a kid",
        &PROTECTED_ES384,
        vec![(V::Integer(4.into()), V::Bytes(vec![1]))],
        VerifyError::UnprotectedHeaderNotEmpty,
    ));
    v.push(case(
        "detached payload (nil)",
        &fx,
        cose_parts(PROTECTED_ES384.to_vec(), V::Map(vec![]), V::Null, key, None),
        VerifyError::PayloadNotBytes,
    ));
    v.push(case(
        "64-byte signature",
        &fx,
        cose_parts(PROTECTED_ES384.to_vec(), V::Map(vec![]), payload.clone(), key, Some(64)),
        VerifyError::SignatureLength(64),
    ));
    v.push(case(
        "COSE_Sign tag 98 instead of 18",
        &fx,
        encode_value(&V::Tag(98, Box::new(ciborium::de::from_reader(fx.signed().as_slice()).expect("cbor")))),
        VerifyError::UnexpectedTag(98),
    ));
    v.push(case(
        "array of three",
        &fx,
        encode_value(&V::Array(vec![V::Bytes(PROTECTED_ES384.to_vec()), V::Map(vec![]), payload.clone()])),
        VerifyError::NotCoseSign1,
    ));
    let mut trailing = fx.signed();
    trailing.push(0);
    let at = trailing.len() - 1;
    v.push(case(
        "trailing byte after the envelope",
        &fx,
        trailing,
        VerifyError::EnvelopeCbor(CborError { kind: CborErrorKind::TrailingBytes, offset: at }),
    ));
    v.push(case(
        "document over 20 KiB",
        &fx,
        vec![0x84; 20 * 1024 + 1],
        VerifyError::DocumentTooLarge { len: 20 * 1024 + 1, max: 20 * 1024 },
    ));
    v.push(case(
        "payload over 16 KiB",
        &fx,
        fx.with_field("user_data", V::Bytes(vec![0; 14 * 1024])),
        // `len` depends on the encoding; the table compares this variant by `max` only.
        VerifyError::PayloadTooLarge { len: 0, max: 16 * 1024 },
    ));

    // ---- payload ----
    v.push(case(
        "payload is an array",
        &fx,
        sign_cose(&PROTECTED_ES384, &encode_value(&V::Array(vec![])), key),
        VerifyError::PayloadNotMap,
    ));
    v.push(case(
        "duplicate module_id",
        &fx,
        fx.with_map(|m| m.push((V::Text("module_id".into()), V::Text("i-evil".into())))),
        VerifyError::DuplicateField("module_id".into()),
    ));
    v.push(case(
        "unknown field refused by default",
        &fx,
        fx.with_map(|m| m.push((V::Text("future_field".into()), V::Integer(1.into())))),
        VerifyError::UnknownField("future_field".into()),
    ));
    v.push(case(
        "missing module_id",
        &fx,
        fx.with_map(|m| m.retain(|(k, _)| k.as_text() != Some("module_id"))),
        VerifyError::MissingField("module_id"),
    ));
    v.push(case("null timestamp", &fx, fx.with_field("timestamp", V::Null), VerifyError::MissingField("timestamp")));
    v.push(case(
        "empty module_id",
        &fx,
        fx.with_doc(|d| d.module_id.clear()),
        VerifyError::FieldSize { field: "module_id", len: 0, min: 1, max: usize::MAX },
    ));
    v.push(case(
        "digest SHA256",
        &fx,
        fx.with_doc(|d| d.digest = "SHA256".into()),
        VerifyError::UnsupportedDigest("SHA256".into()),
    ));
    v.push(case("timestamp 0", &fx, fx.with_doc(|d| d.timestamp_ms = 0), VerifyError::ZeroTimestamp));
    v.push(case(
        "timestamp as text",
        &fx,
        fx.with_field("timestamp", V::Text("now".into())),
        VerifyError::FieldType { field: "timestamp", expected: "unsigned integer" },
    ));
    v.push(case(
        "PCR of 47 bytes",
        &fx,
        fx.with_doc(|d| {
            d.pcrs.insert(5, vec![1; 47]);
        }),
        VerifyError::PcrLength { index: 5, len: 47 },
    ));
    v.push(case(
        "PCR index 32",
        &fx,
        fx.with_doc(|d| {
            d.pcrs.remove(&15);
            d.pcrs.insert(32, vec![1; 48]);
        }),
        VerifyError::PcrIndex(32),
    ));
    v.push(case("no PCRs", &fx, fx.with_doc(|d| d.pcrs.clear()), VerifyError::PcrCount { count: 0 }));
    v.push(case(
        "33 PCR entries",
        &fx,
        fx.with_field("pcrs", V::Map((0..33).map(|i| (V::Integer((i % 32).into()), V::Bytes(vec![1; 48]))).collect())),
        VerifyError::PcrCount { count: 33 },
    ));
    v.push(case(
        "duplicate PCR index",
        &fx,
        fx.with_field(
            "pcrs",
            V::Map(vec![(V::Integer(0.into()), V::Bytes(vec![1; 48])), (V::Integer(0.into()), V::Bytes(vec![2; 48]))]),
        ),
        VerifyError::DuplicatePcr(0),
    ));
    // user_data, nonce and public_key: exactly what the NSM signs (0..=1024 bytes each, an
    // empty public_key included), and one byte more refused.
    v.push(Case {
        name: "user_data, nonce and public_key of 1024 bytes each verify",
        doc: fx.with_doc(|d| {
            d.user_data = Some(vec![1; NSM_MAX]);
            d.nonce = Some(vec![2; NSM_MAX]);
            d.public_key = Some(vec![3; NSM_MAX]);
        }),
        anchor: fx.anchor(),
        opts: opts(),
        expect: Ok(()),
    });
    v.push(Case {
        name: "empty public_key verifies",
        doc: fx.with_doc(|d| d.public_key = Some(vec![])),
        anchor: fx.anchor(),
        opts: opts(),
        expect: Ok(()),
    });
    v.push(case(
        "user_data of 1025 bytes",
        &fx,
        fx.with_doc(|d| d.user_data = Some(vec![0; 1025])),
        VerifyError::FieldSize { field: "user_data", len: 1025, min: 0, max: 1024 },
    ));
    v.push(case(
        "nonce of 1025 bytes",
        &fx,
        fx.with_doc(|d| d.nonce = Some(vec![0; 1025])),
        VerifyError::FieldSize { field: "nonce", len: 1025, min: 0, max: 1024 },
    ));
    v.push(case(
        "public_key of 1025 bytes",
        &fx,
        fx.with_doc(|d| d.public_key = Some(vec![0; 1025])),
        VerifyError::FieldSize { field: "public_key", len: 1025, min: 0, max: 1024 },
    ));
    // NitroTPM as AWS signs it: PCRs 0-23 of 48 bytes with 17-22 all 0xFF, a 65- or 91-byte
    // public_key, a 10-byte nonce.
    for (name, key_len) in
        [("NitroTPM shape, 65-byte public_key, verifies", 65), ("NitroTPM shape, 91-byte public_key, verifies", 91)]
    {
        v.push(Case {
            name,
            doc: fx.with_doc(|d| {
                d.kind = DocumentKind::NitroTpm;
                d.pcrs = nitrotpm_pcrs();
                d.public_key = Some(vec![4; key_len]);
                d.nonce = Some(vec![5; 10]);
            }),
            anchor: fx.anchor(),
            opts: opts(),
            expect: Ok(()),
        });
    }
    v.push(case(
        "certificate of 1025 bytes",
        &fx,
        fx.with_doc(|d| d.certificate = vec![0x30; 1025]),
        VerifyError::FieldSize { field: "certificate", len: 1025, min: 1, max: 1024 },
    ));
    v.push(case(
        "empty cabundle entry",
        &fx,
        fx.with_doc(|d| d.cabundle.push(vec![])),
        VerifyError::FieldSize { field: "cabundle", len: 0, min: 1, max: 1024 },
    ));
    v.push(case("empty cabundle", &fx, fx.with_doc(|d| d.cabundle.clear()), VerifyError::EmptyCabundle));
    v.push(case(
        "both pcrs and nitrotpm_pcrs",
        &fx,
        fx.with_map(|m| {
            m.push((V::Text("nitrotpm_pcrs".into()), V::Map(vec![(V::Integer(0.into()), V::Bytes(vec![1; 48]))])))
        }),
        VerifyError::AmbiguousKind,
    ));

    // ---- chain ----
    let root_sha = |d: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(d))
    };
    v.push(case(
        "cabundle reordered",
        &fx,
        fx.with_doc(|d| d.cabundle.swap(0, 1)),
        VerifyError::RootMismatch { found: root_sha(&fx.chain.cabundle[1]) },
    ));
    v.push(case(
        "cabundle missing the root",
        &fx,
        fx.with_doc(|d| _ = d.cabundle.remove(0)),
        VerifyError::RootMismatch { found: root_sha(&fx.chain.cabundle[1]) },
    ));
    v.push(case(
        "cabundle missing an intermediate",
        &fx,
        fx.with_doc(|d| _ = d.cabundle.remove(1)),
        VerifyError::IssuerMismatch { at: CertAt::Cabundle(1) },
    ));
    // The cabundle with `n` more copies of the instance CA certificate after it.
    let with_instance_ca_repeated = |n| {
        fx.with_doc(|d| {
            let extra = d.cabundle[3].clone();
            d.cabundle.extend(std::iter::repeat_n(extra, n));
        })
    };
    v.push(case("chain too long", &fx, with_instance_ca_repeated(5), VerifyError::ChainTooLong { len: 10, max: 8 }));
    v.push(case(
        "a chain of exactly eight is not too long (it fails on a later check instead)",
        &fx,
        with_instance_ca_repeated(3),
        VerifyError::PathLenExceeded { at: CertAt::Cabundle(1), path_len: 2, below: 5 },
    ));
    v.push(case(
        "cabundle entry is not a certificate",
        &fx,
        fx.with_doc(|d| d.cabundle[2] = vec![0x30, 0x00]),
        VerifyError::CertificateParse { at: CertAt::Cabundle(2) },
    ));

    let t = i64::try_from(T / 1000).expect("time");
    // The good chain with CA certificate `level` (0 root … 3 instance) changed by `f`, refused
    // with the error `expect` gives for that certificate.
    let ca_case =
        |name: &'static str, level: usize, f: &dyn Fn(&mut CertSpec), expect: &dyn Fn(CertAt) -> VerifyError| {
            let fx = Fx::tweaked(
                &|l, s| {
                    if l == level {
                        f(s)
                    }
                },
                &|_| {},
            );
            let doc = fx.signed();
            case(name, &fx, doc, expect(CertAt::Cabundle(level)))
        };
    let leaf_case = |name: &'static str, f: fn(&mut CertSpec), expect: VerifyError| {
        let fx = Fx::tweaked(&|_, _| {}, &f);
        let doc = fx.signed();
        case(name, &fx, doc, expect)
    };
    v.push(ca_case("zonal without CA flag", 2, &|s| s.ca = None, &|at| VerifyError::NotACa { at }));
    v.push(ca_case("regional without keyCertSign", 1, &|s| s.key_cert_sign = false, &|at| {
        VerifyError::MissingKeyCertSign { at }
    }));
    v.push(ca_case("regional pathLen 0 with two CAs below", 1, &|s| s.ca = Some(Some(0)), &|at| {
        VerifyError::PathLenExceeded { at, path_len: 0, below: 2 }
    }));
    v.push(ca_case("instance signed with ecdsa-with-SHA256", 3, &|s| s.sig_alg = oid::ECDSA_SHA256, &|at| {
        VerifyError::UnsupportedSignatureAlgorithm { at }
    }));
    v.push(ca_case(
        "instance: outer algorithm SHA-256, tbsCertificate SHA-384 (inconsistent)",
        3,
        &|s| {
            s.sig_alg = oid::ECDSA_SHA256;
            s.tbs_sig_alg = Some(oid::ECDSA_SHA384);
        },
        &|at| VerifyError::UnsupportedSignatureAlgorithm { at },
    ));
    v.push(ca_case(
        "regional: outer algorithm SHA-384, tbsCertificate SHA-256 (inconsistent)",
        1,
        &|s| s.tbs_sig_alg = Some(oid::ECDSA_SHA256),
        &|at| VerifyError::UnsupportedSignatureAlgorithm { at },
    ));
    v.push(ca_case("zonal key on the wrong curve", 2, &|s| s.curve = oid::PRIME256V1, &|at| {
        VerifyError::UnsupportedPublicKey { at }
    }));
    v.push(ca_case("unknown critical extension", 1, &|s| s.unknown_critical_extension = true, &|at| {
        VerifyError::UnhandledCriticalExtension { at, oid: "1.3.6.1.4.1.55555.1".into() }
    }));
    // Each CA certificate in turn expired, then not yet valid.
    let expired = ["expired root", "expired regional", "expired zonal", "expired instance"];
    let future = ["future root", "future regional", "future zonal", "future instance"];
    let expire = |s: &mut CertSpec| {
        s.not_after = t - 10;
        s.not_before = s.not_before.min(t - 100);
    };
    let expired_at = |at| VerifyError::CertificateExpired { at, not_after: t - 10, time: t };
    let future_at = |at| VerifyError::CertificateNotYetValid { at, not_before: t + 10, time: t };
    for level in 0..4 {
        v.push(ca_case(expired[level], level, &expire, &expired_at));
        v.push(ca_case(future[level], level, &|s| s.not_before = t + 10, &future_at));
    }
    v.push(leaf_case("expired leaf", |s| s.not_after = s.not_before + 1, {
        let nb = t - 3;
        VerifyError::CertificateExpired { at: CertAt::Leaf, not_after: nb + 1, time: t }
    }));
    v.push(leaf_case(
        "leaf not yet valid",
        |s| s.not_before += 100,
        VerifyError::CertificateNotYetValid { at: CertAt::Leaf, not_before: t - 3 + 100, time: t },
    ));
    v.push(leaf_case("leaf is a CA", |s| s.ca = Some(None), VerifyError::LeafIsCa));
    v.push(leaf_case(
        "leaf issuer name differs",
        |s| s.issuer_override = Some(vec![0x30, 0x00]),
        VerifyError::IssuerMismatch { at: CertAt::Leaf },
    ));

    // A leaf with the right issuer name, signed by a key that is not the instance CA's.
    let forged_leaf =
        fx.pki.leaf_spec(T).issue(&fx.chain.leaf_key, &fx.pki.instance_subject(), &mock::derive_key(b"x", "instance"));
    v.push(case(
        "leaf signed by a foreign instance key",
        &fx,
        fx.with_doc(|d| d.certificate = forged_leaf),
        VerifyError::BadCertificateSignature { at: CertAt::Leaf },
    ));
    // A valid zonal certificate (signed by the regional CA) for another key: the instance
    // certificate below it no longer verifies.
    let swapped = fx.pki.reissue(2, &mock::derive_key(b"x", "zonal")).expect("level 2");
    v.push(case(
        "zonal certificate swapped for one with another key",
        &fx,
        fx.with_doc(|d| d.cabundle[2] = swapped),
        VerifyError::BadCertificateSignature { at: CertAt::Cabundle(3) },
    ));
    v.push(case(
        "document signed by a key other than the leaf's",
        &fx,
        sign_cose(&PROTECTED_ES384, &fx.doc.payload(), &mock::derive_key(b"x", "y")),
        VerifyError::BadSignature,
    ));

    // ---- time, mode, kind ----
    let mut old = opts();
    old.time = keygate_attestation::VerifyTime::Now(T + 301_000);
    v.push(Case {
        name: "document too old",
        doc: fx.signed(),
        anchor: fx.anchor(),
        opts: old,
        expect: Err(VerifyError::DocumentTooOld { timestamp_ms: T, now_ms: T + 301_000, max_age_ms: 300_000 }),
    });
    v.push(case(
        "document from the future",
        &fx,
        fx.with_doc(|d| d.timestamp_ms = T + 31_000),
        VerifyError::DocumentFromFuture { timestamp_ms: T + 31_000, now_ms: T, skew_ms: 30_000 },
    ));
    v.push(case(
        "debug mode refused",
        &fx,
        fx.with_doc(|d| d.pcrs = (0..16).map(|i| (i, vec![0; 48])).collect()),
        VerifyError::DebugMode,
    ));
    let mut want_enclave = opts();
    want_enclave.require_kind = Some(DocumentKind::Enclave);
    v.push(Case {
        name: "NitroTPM document where an enclave is required",
        doc: fx.with_doc(|d| d.kind = DocumentKind::NitroTpm),
        anchor: fx.anchor(),
        opts: want_enclave,
        expect: Err(VerifyError::WrongKind { expected: DocumentKind::Enclave, found: DocumentKind::NitroTpm }),
    });
    let mut want_tpm = opts();
    want_tpm.require_kind = Some(DocumentKind::NitroTpm);
    v.push(Case {
        name: "enclave document where NitroTPM is required",
        doc: fx.signed(),
        anchor: fx.anchor(),
        opts: want_tpm,
        expect: Err(VerifyError::WrongKind { expected: DocumentKind::NitroTpm, found: DocumentKind::Enclave }),
    });
    v.push(Case {
        name: "mock document against the AWS root",
        doc: fx.signed(),
        anchor: TrustAnchor::aws_nitro().expect("aws"),
        opts: opts(),
        expect: Err(VerifyError::RootMismatch { found: root_sha(&fx.chain.cabundle[0]) }),
    });
    v
}

#[test]
fn adversarial_table_on_every_backend() {
    let table = cases();
    assert!(table.len() >= 60, "table has {} cases", table.len());
    let mut failures = Vec::new();
    for b in all_backends() {
        for c in &table {
            let got = Verifier::with_crypto(c.anchor.clone(), b).verify(&c.doc, &c.opts).map(|_| ());
            // The payload-size case's exact length depends on the encoding; compare the variant.
            let ok = match (&c.expect, &got) {
                (Err(VerifyError::PayloadTooLarge { max, .. }), Err(VerifyError::PayloadTooLarge { max: m, .. })) => {
                    max == m
                }
                _ => got == c.expect,
            };
            if !ok {
                failures.push(format!("{} [{}]: expected {:?}, got {:?}", c.name, b.name(), c.expect, got));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn unknown_fields_can_be_tolerated_and_are_reported() {
    let fx = Fx::new();
    let doc = fx.with_map(|m| m.push((V::Text("future_field".into()), V::Integer(1.into()))));
    let mut o = opts();
    o.unknown_fields = UnknownFields::TolerateAndReport;
    let att = Verifier::new(fx.anchor()).verify(&doc, &o).expect("tolerated");
    assert_eq!(att.unknown_fields(), ["future_field".to_owned()]);
}

#[test]
fn nitrotpm_documents_verify_and_say_so() {
    let fx = Fx::new();
    let doc = fx.with_doc(|d| d.kind = DocumentKind::NitroTpm);
    let att = Verifier::new(fx.anchor()).verify(&doc, &opts()).expect("tpm doc");
    assert_eq!(att.kind(), DocumentKind::NitroTpm);
    assert_eq!(att.pcr(0), Some(&[1u8; 48][..]));
}

#[test]
fn nsm_shapes_verify_with_their_fields_as_signed() {
    let fx = Fx::new();
    let v = Verifier::new(fx.anchor());
    let empty = v.verify(&fx.with_doc(|d| d.public_key = Some(vec![])), &opts()).expect("empty public_key");
    assert_eq!(empty.public_key(), Some(&[][..]), "present but empty, not absent");
    let null = v.verify(&fx.with_doc(|d| d.public_key = None), &opts()).expect("null public_key");
    assert_eq!(null.public_key(), None);
    let max = fx.with_doc(|d| {
        d.user_data = Some(vec![1; NSM_MAX]);
        d.nonce = Some(vec![2; NSM_MAX]);
        d.public_key = Some(vec![3; NSM_MAX]);
    });
    let att = v.verify(&max, &opts()).expect("1024 bytes each");
    assert_eq!((att.user_data(), att.nonce()), (Some(&[1u8; 1024][..]), Some(&[2u8; 1024][..])));
    assert_eq!(att.public_key(), Some(&[3u8; 1024][..]));
    let tpm = fx.with_doc(|d| {
        d.kind = DocumentKind::NitroTpm;
        d.pcrs = nitrotpm_pcrs();
        d.public_key = Some(vec![4; 91]);
        d.nonce = Some(vec![5; 10]);
    });
    let att = v.verify(&tpm, &opts()).expect("NitroTPM shape");
    assert_eq!((att.kind(), att.pcrs().len()), (DocumentKind::NitroTpm, 24));
    assert!(mock::TPM_ONES_PCRS.iter().all(|&i| att.pcr(i) == Some(&[0xFF; 48][..])));
    assert_eq!((att.public_key().map(<[u8]>::len), att.nonce()), (Some(91), Some(&[5u8; 10][..])));
}

#[test]
fn debug_allowed_when_asked() {
    let fx = Fx::new();
    let doc = fx.with_doc(|d| d.pcrs = (0..16).map(|i| (i, vec![0; 48])).collect());
    let mut o = opts();
    o.allow_debug = true;
    assert!(Verifier::new(fx.anchor()).verify(&doc, &o).expect("debug allowed").is_debug());
}

#[test]
fn indefinite_length_payload_is_verified_as_received() {
    // Re-encode the payload map with an indefinite-length header, sign those exact bytes.
    let fx = Fx::new();
    let definite = fx.doc.payload();
    let mut indefinite = vec![0xbf];
    indefinite.extend_from_slice(&definite[1..]);
    indefinite.push(0xff);
    let doc = sign_cose(&PROTECTED_ES384, &indefinite, &fx.chain.leaf_key);
    let att = Verifier::new(fx.anchor()).verify(&doc, &opts()).expect("indefinite map");
    assert_eq!(att.nonce(), Some(&[7u8; 32][..]));
}

#[test]
fn chain_cache_skips_intermediate_signatures_but_still_checks_expiry() {
    let fx = Fx::new();
    let v = Verifier::new(fx.anchor());
    v.verify(&fx.signed(), &opts()).expect("first");
    assert_eq!(v.cache().len(), 3, "regional, zonal, instance signatures cached");
    v.verify(&fx.signed(), &opts()).expect("second, from cache");
    assert_eq!(v.cache().len(), 3);
    // Same certificates, verification time after the instance certificate expired.
    let mut late = opts();
    late.time = keygate_attestation::VerifyTime::Now(T + 30 * 3_600_000);
    late.max_age = Duration::from_secs(40 * 3600);
    let err = v.verify(&fx.signed(), &late).expect_err("expired despite cache");
    assert!(matches!(err, VerifyError::CertificateExpired { .. }), "{err}");
}

#[test]
fn limits_hold_at_their_boundaries() {
    use keygate_attestation::document::{parse_payload, MAX_PAYLOAD};
    let fx = Fx::new();
    let v = Verifier::new(fx.anchor());
    // 32 PCRs is the most a document may carry; 33 is refused by count.
    let doc = fx.with_doc(|d| d.pcrs = (0u8..32).map(|i| (i, vec![i.wrapping_add(1); 48])).collect());
    let att = v.verify(&doc, &opts()).expect("32 PCRs");
    assert_eq!(att.pcrs().len(), 32);
    let doc = fx.with_doc(|d| d.pcrs = (0u8..33).map(|i| (i, vec![1; 48])).collect());
    assert!(matches!(v.verify(&doc, &opts()), Err(VerifyError::PcrCount { count: 33 })));
    // A payload of exactly 16 KiB is not refused for its size (this one is not a map).
    let e = parse_payload(&vec![0x40; MAX_PAYLOAD], UnknownFields::Refuse).expect_err("not a document");
    assert!(!matches!(e, VerifyError::PayloadTooLarge { .. }), "{e}");
    let e = parse_payload(&vec![0x40; MAX_PAYLOAD + 1], UnknownFields::Refuse).expect_err("too large");
    assert!(matches!(e, VerifyError::PayloadTooLarge { len, max } if len == MAX_PAYLOAD + 1 && max == MAX_PAYLOAD));
    // The parsed payload keeps the chain and the timestamp as sent.
    let p = parse_payload(&fx.doc.payload(), UnknownFields::Refuse).expect("parse");
    assert_eq!((p.cabundle(), p.timestamp_ms()), (fx.doc.cabundle.as_slice(), fx.doc.timestamp_ms));
    assert_eq!(p.certificate(), fx.doc.certificate.as_slice());
    // Kind names (CLI, JSON, policies).
    assert_eq!(
        (DocumentKind::Enclave.as_str(), DocumentKind::NitroTpm.to_string()),
        ("enclave", "nitrotpm".to_owned())
    );
}

#[test]
fn the_chain_cache_counts_its_hits() {
    let fx = Fx::new();
    let v = Verifier::new(fx.anchor());
    assert!(v.cache().is_empty());
    v.verify(&fx.signed(), &opts()).expect("first");
    assert!(!v.cache().is_empty());
    assert_eq!(v.cache().hits(), 0);
    v.verify(&fx.signed(), &opts()).expect("second");
    assert_eq!(v.cache().hits(), 3, "regional, zonal and instance signatures came from the cache");
    let mut no = opts();
    no.use_cache = false;
    v.verify(&fx.signed(), &no).expect("without the cache");
    assert_eq!(v.cache().hits(), 3, "not consulted when disabled");
}

#[test]
fn age_and_skew_limits_are_inclusive_and_the_verified_value_reports_its_inputs() {
    use sha2::Digest;
    let fx = Fx::new();
    let v = Verifier::new(fx.anchor());
    let doc = fx.signed();
    let ts = fx.doc.timestamp_ms;
    let at_with = |doc: &[u8], now: u64| {
        let mut o = opts();
        o.time = keygate_attestation::VerifyTime::Now(now);
        o.max_age = Duration::from_secs(60);
        o.clock_skew = Duration::from_secs(30);
        v.verify(doc, &o)
    };
    let at = |now: u64| at_with(&doc, now);
    // A document stamped ahead of the verifier's clock (the certificates already valid).
    let ahead = |ms: u64| fx.with_doc(|d| d.timestamp_ms = ts + ms);
    assert!(at_with(&ahead(30_000), ts).is_ok(), "exactly the allowed skew ahead");
    assert!(matches!(at_with(&ahead(30_001), ts), Err(VerifyError::DocumentFromFuture { .. })));
    assert!(at(ts + 60_000).is_ok(), "exactly the maximum age");
    assert!(matches!(at(ts + 60_001), Err(VerifyError::DocumentTooOld { .. })));
    let att = at(ts).expect("verifies");
    assert_eq!(att.document_sha384(), <[u8; 48]>::from(sha2::Sha384::digest(&doc)));
    assert_eq!(att.root_sha256(), fx.anchor().fingerprint());
    let (_, leaf_not_after) = att.leaf_validity();
    assert_eq!(att.chain_not_after(), leaf_not_after, "the mock leaf expires first");
}
