//! Known-answer tests on real AWS Nitro attestation documents (copied from
//! `../shared/vectors/nitro/`; see `tests/vectors/README.md`).

use keygate_attestation::crypto::all_backends;
use keygate_attestation::{CertAt, DocumentKind, TrustAnchor, Verifier, VerifyError, VerifyOptions};

struct Vector {
    name: &'static str,
    bytes: &'static [u8],
    /// A time inside the leaf certificate's validity window (ms).
    at_ms: u64,
    debug: bool,
    pcr0: &'static str,
}

const VECTORS: [Vector; 3] = [
    Vector {
        name: "doc-1",
        bytes: include_bytes!("vectors/doc-1.cbor"),
        at_ms: 1_732_983_768_387 + 1000,
        debug: false,
        pcr0: "ec74bfbe7f7445a6c7610e152935e028276f638042b74797b119648e13f7a3675796b721034c320f140ea001b41aeae2",
    },
    Vector {
        name: "doc-3",
        bytes: include_bytes!("vectors/doc-3.cbor"),
        at_ms: 1_722_457_107_047 + 1000,
        debug: false,
        pcr0: "a6cdfede5b1e7950de33218995add7d8f1f6e059c9cccd204316e69feaa2ce54f6f9ff6f5992db0f1ca6135f9b095b85",
    },
    Vector {
        name: "doc-4",
        bytes: include_bytes!("vectors/doc-4.cbor"),
        at_ms: 1_694_102_161_556 + 1000,
        debug: true,
        pcr0: "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    },
];

/// 2026-11-24, well after every vector's leaf expired.
const TODAY_MS: u64 = 1_795_478_400_000;

fn aws() -> Verifier {
    Verifier::new(TrustAnchor::aws_nitro().expect("root"))
}

fn opts(at_ms: u64, debug: bool) -> VerifyOptions {
    let mut o = VerifyOptions::at(at_ms);
    o.allow_debug = debug;
    o
}

#[test]
fn real_documents_verify_at_their_time_on_every_backend() {
    for b in all_backends() {
        let v = Verifier::with_crypto(TrustAnchor::aws_nitro().expect("root"), b);
        for vec in &VECTORS {
            let att = v
                .verify(vec.bytes, &opts(vec.at_ms, vec.debug))
                .unwrap_or_else(|e| panic!("{} on {}: {e}", vec.name, b.name()));
            assert_eq!(att.kind(), DocumentKind::Enclave);
            assert_eq!(att.pcrs().len(), 16, "{}", vec.name);
            assert_eq!(hex::encode(att.pcr(0).expect("pcr0")), vec.pcr0, "{}", vec.name);
            assert_eq!(att.is_debug(), vec.debug);
            assert_eq!(att.digest(), "SHA384");
            assert!(att.module_id().starts_with("i-"), "{}", att.module_id());
        }
    }
}

#[test]
fn real_documents_verify_at_document_time() {
    for vec in &VECTORS {
        let mut o = VerifyOptions::at_document_time();
        o.allow_debug = vec.debug;
        aws().verify(vec.bytes, &o).unwrap_or_else(|e| panic!("{}: {e}", vec.name));
    }
}

#[test]
fn real_documents_fields_match_the_published_table() {
    let v = aws();
    let d1 = v.verify(VECTORS[0].bytes, &opts(VECTORS[0].at_ms, false)).expect("doc-1");
    assert_eq!((d1.public_key().map(<[u8]>::len), d1.user_data(), d1.nonce()), (Some(65), None, None));
    let d3 = v.verify(VECTORS[1].bytes, &opts(VECTORS[1].at_ms, false)).expect("doc-3");
    assert_eq!(
        (d3.public_key().map(<[u8]>::len), d3.user_data().map(<[u8]>::len), d3.nonce().map(<[u8]>::len)),
        (Some(5), Some(68), Some(20))
    );
    let d4 = v.verify(VECTORS[2].bytes, &opts(VECTORS[2].at_ms, true)).expect("doc-4");
    assert_eq!(
        (d4.public_key(), d4.user_data().map(<[u8]>::len), d4.nonce().map(<[u8]>::len)),
        (None, Some(91), Some(256))
    );
    assert_eq!(d1.leaf_validity(), (1_732_983_765, 1_732_994_568));
    assert_eq!(d1.chain_not_after(), 1_732_994_568, "the leaf expires first");
}

#[test]
fn real_documents_fail_today_with_an_expiry_error() {
    for vec in &VECTORS {
        let err = aws().verify(vec.bytes, &opts(TODAY_MS, true)).expect_err(vec.name);
        assert!(matches!(err, VerifyError::CertificateExpired { .. }), "{}: {err}", vec.name);
    }
}

#[test]
fn real_documents_fail_with_a_wrong_root() {
    let other = keygate_attestation::mock::MockPki::from_seed(b"not-aws", TODAY_MS).root_anchor();
    let v = Verifier::new(other);
    for vec in &VECTORS {
        let err = v.verify(vec.bytes, &opts(vec.at_ms, true)).expect_err(vec.name);
        assert!(matches!(err, VerifyError::RootMismatch { .. }), "{}: {err}", vec.name);
    }
}

#[test]
fn debug_document_is_refused_unless_allowed() {
    let vec = &VECTORS[2];
    assert_eq!(aws().verify(vec.bytes, &opts(vec.at_ms, false)), Err(VerifyError::DebugMode));
    assert!(aws().verify(vec.bytes, &opts(vec.at_ms, true)).is_ok());
}

#[test]
fn every_truncation_fails() {
    let v = aws();
    for vec in &VECTORS {
        for len in 0..vec.bytes.len() {
            assert!(v.verify(&vec.bytes[..len], &opts(vec.at_ms, true)).is_err(), "{} truncated to {len}", vec.name);
        }
    }
}

#[test]
fn document_too_old_and_from_the_future() {
    let vec = &VECTORS[0];
    let ts = 1_732_983_768_387u64;
    let err = aws().verify(vec.bytes, &opts(ts + 301_000, false)).expect_err("old");
    assert!(matches!(err, VerifyError::DocumentTooOld { .. }), "{err}");
    // Cert valid from 1732983765 s; a "now" 40 s before the timestamp is inside the leaf window
    // only if the leaf starts earlier; it does not, so use skew bounds via a wider skew check.
    let mut o = opts(ts - 31_000, false);
    o.clock_skew = std::time::Duration::from_secs(30);
    let err = aws().verify(vec.bytes, &o).expect_err("future");
    assert!(
        matches!(
            err,
            VerifyError::DocumentFromFuture { .. } | VerifyError::CertificateNotYetValid { at: CertAt::Leaf, .. }
        ),
        "{err}"
    );
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> usize {
    hay[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from).expect("region present")
}

fn flipped(doc: &[u8], at: usize, bit: u8) -> Vec<u8> {
    let mut d = doc.to_vec();
    d[at] ^= 1 << bit;
    d
}

/// A single-bit flip in each region of each real document fails, naming the right cause.
#[test]
fn single_bit_flips_in_each_region_name_the_cause() {
    use keygate_attestation::{cose, document};
    let v = aws();
    for vec in &VECTORS {
        let o = opts(vec.at_ms, true);
        let check = |what: &str, doc: Vec<u8>, ok: &dyn Fn(&VerifyError) -> bool| {
            let err = v.verify(&doc, &o).expect_err(what);
            assert!(ok(&err), "{} {what}: {err:?}", vec.name);
        };
        // Protected header: the 4 bytes after the 0x44 head.
        assert_eq!(&vec.bytes[1..6], &[0x44, 0xa1, 0x01, 0x38, 0x22]);
        for at in 2..6 {
            for bit in 0..8 {
                check("protected header", flipped(vec.bytes, at, bit), &|e| {
                    matches!(e, VerifyError::ProtectedHeader(_) | VerifyError::UnsupportedAlgorithm(_))
                });
            }
        }
        let sign1 = cose::parse(vec.bytes).expect("parse");
        let parsed = document::parse_payload(&sign1.payload, Default::default()).expect("payload");
        // Payload: a bit of module_id's text.
        let m = find(vec.bytes, b"i-0", 0);
        check("module_id", flipped(vec.bytes, m + 5, 0), &|e| *e == VerifyError::BadSignature);
        // Each PCR value: entries `index, 0x58 0x30, 48 bytes` after the "pcrs" key.
        let mut pos = find(vec.bytes, b"pcrs", 0);
        for i in 0u8..16 {
            pos = find(vec.bytes, &[i, 0x58, 0x30], pos) + 3;
            check("PCR value", flipped(vec.bytes, pos + 20, 3), &|e| *e == VerifyError::BadSignature);
        }
        // Each certificate: a bit of its serial number, and of its signature's last byte.
        let mut certs: Vec<(CertAt, &[u8])> =
            parsed.cabundle().iter().enumerate().map(|(i, c)| (CertAt::Cabundle(i), c.as_slice())).collect();
        certs.push((CertAt::Leaf, parsed.certificate()));
        for (at, der) in certs {
            let start = find(vec.bytes, der, 0);
            assert_eq!(&der[8..13], &[0xa0, 0x03, 0x02, 0x01, 0x02], "v3 certificate layout");
            for offset in [16, der.len() - 1] {
                let doc = flipped(vec.bytes, start + offset, 0);
                if at == CertAt::Cabundle(0) {
                    check("root", doc, &|e| matches!(e, VerifyError::RootMismatch { .. }));
                } else {
                    check("certificate", doc, &|e| *e == VerifyError::BadCertificateSignature { at });
                }
            }
        }
        // The COSE signature: every byte.
        let sig_start = vec.bytes.len() - 96;
        for at in sig_start..vec.bytes.len() {
            check("signature", flipped(vec.bytes, at, 5), &|e| *e == VerifyError::BadSignature);
        }
    }
}

/// One shape of document the NSM signs, produced by the mock NSM through `Nsm::attest` (the
/// same request path as the hardware NSM), with the fields the verifier must report.
struct Shape {
    name: &'static str,
    kind: DocumentKind,
    /// PCRs set on top of the mock's defaults (NitroTPM: 0–23, 17–22 all 0xFF).
    pcrs: Vec<(u8, Vec<u8>)>,
    req: keygate_attestation::AttestRequest,
    pcr_count: usize,
}

fn shapes() -> Vec<Shape> {
    // What the NSM signs (docs/attestation.md), not the verifier's constants.
    const NSM_MAX: usize = 1024;
    use keygate_attestation::AttestRequest;
    let image = || (0u8..3).map(|i| (i, vec![0xA0 + i; 48])).collect::<Vec<_>>();
    vec![
        Shape {
            name: "enclave, user_data, nonce and public_key of 1024 bytes each",
            kind: DocumentKind::Enclave,
            pcrs: image(),
            req: AttestRequest {
                user_data: Some(vec![1; NSM_MAX]),
                nonce: Some(vec![2; NSM_MAX]),
                public_key: Some(vec![3; NSM_MAX]),
            },
            pcr_count: 16,
        },
        Shape {
            name: "enclave, empty public_key",
            kind: DocumentKind::Enclave,
            pcrs: image(),
            req: AttestRequest { public_key: Some(vec![]), nonce: Some(vec![2; 32]), ..Default::default() },
            pcr_count: 16,
        },
        Shape {
            name: "NitroTPM, 65-byte public_key, 10-byte nonce",
            kind: DocumentKind::NitroTpm,
            pcrs: image(),
            req: AttestRequest { public_key: Some(vec![4; 65]), nonce: Some(vec![5; 10]), ..Default::default() },
            pcr_count: 24,
        },
        Shape {
            name: "NitroTPM, 91-byte public_key, 10-byte nonce",
            kind: DocumentKind::NitroTpm,
            pcrs: image(),
            req: AttestRequest { public_key: Some(vec![4; 91]), nonce: Some(vec![5; 10]), ..Default::default() },
            pcr_count: 24,
        },
    ]
}

#[test]
fn every_shape_the_nsm_signs_verifies_with_its_fields_on_every_backend() {
    use keygate_attestation::mock::{MockNsm, TPM_ONES_PCRS};
    use keygate_attestation::Nsm;
    for s in shapes() {
        let nsm =
            MockNsm::with_kind(b"shapes", s.kind, s.pcrs.iter().cloned().collect(), std::sync::Arc::new(|| TODAY_MS));
        let doc = nsm.attest(&s.req).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        for b in all_backends() {
            let att = Verifier::with_crypto(nsm.root_anchor(), b)
                .verify(&doc, &VerifyOptions::at(TODAY_MS))
                .unwrap_or_else(|e| panic!("{} on {}: {e}", s.name, b.name()));
            assert_eq!(att.kind(), s.kind, "{}", s.name);
            assert_eq!(att.pcrs().len(), s.pcr_count, "{}", s.name);
            assert_eq!(
                (att.user_data(), att.nonce(), att.public_key()),
                (s.req.user_data.as_deref(), s.req.nonce.as_deref(), s.req.public_key.as_deref()),
                "{}",
                s.name
            );
            if s.kind == DocumentKind::NitroTpm {
                let ones: Vec<u8> =
                    att.pcrs().iter().filter(|(_, v)| v.iter().all(|&b| b == 0xFF)).map(|(i, _)| *i).collect();
                assert_eq!(ones, TPM_ONES_PCRS.to_vec(), "{}", s.name);
            }
        }
    }
}
