//! Attestation-document verifications per second on the same real document (doc-1, verified at
//! its own time): AWS's `aws-nitro-enclaves-cose` (serde_cbor + OpenSSL; COSE signature only),
//! `nsm-nitro-enclave-utils` (a complete peer verifier: the certificate chain to the AWS root at a
//! caller-given time with rustls-webpki, then the COSE signature with RustCrypto p384), and
//! keygate's own (`cose::parse` + aws-lc-rs / RustCrypto, and the full `Verifier`, cold and warm).
#![forbid(unsafe_code)]

use std::time::Instant;

use aws_nitro_enclaves_cose::crypto::Openssl;
use aws_nitro_enclaves_cose::CoseSign1;
use keygate_attestation::crypto::all_backends;
use keygate_attestation::{cose, document, TrustAnchor, UnknownFields, Verifier, VerifyOptions};
use nsm_nitro_enclave_utils::api::nsm::AttestationDoc;
use nsm_nitro_enclave_utils::time::Time;
use nsm_nitro_enclave_utils::verify::{AttestationDocVerifierExt, VerifyError};

const DOC: &[u8] = include_bytes!("../../../attestation/tests/vectors/doc-1.cbor");
const AT_MS: u64 = 1_732_983_769_000;
/// SHA-256 of the AWS Nitro Enclaves root certificate's DER, as AWS publishes it.
const AWS_ROOT_SHA256: &str = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

/// nsm-nitro-enclave-utils' complete verification of `doc`: chain to `root` at `at_ms`
/// (rustls-webpki), then the COSE signature with the leaf key (p384).
fn peer_verify(doc: &[u8], root: &[u8], at_ms: u64) -> Result<AttestationDoc, VerifyError> {
    AttestationDoc::from_cose(doc, root, Time::new(Box::new(move || at_ms)))
}

fn outcome(r: &Result<AttestationDoc, VerifyError>) -> String {
    match r {
        Ok(d) => format!("ACCEPTED (module_id {}, timestamp {} ms)", d.module_id, d.timestamp),
        Err(e) => {
            // The crate's error keeps its cause private (and may carry a backtrace): show the
            // cause from its Debug form.
            let debug = format!("{e:?}");
            let cause =
                debug.split_once("_source: ").map_or(debug.as_str(), |(_, c)| c.strip_suffix(" }").unwrap_or(c));
            format!("REFUSED ({:?}: {cause})", e.kind())
        }
    }
}

fn rate(mut f: impl FnMut() -> bool) -> f64 {
    assert!(f(), "the operation must succeed");
    let mut samples: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut n = 0u32;
            while start.elapsed().as_secs_f64() < 1.0 {
                assert!(f());
                n += 1;
            }
            f64::from(n) / start.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[2]
}

fn main() {
    let sign1 = cose::parse(DOC).expect("cose");
    let parsed = document::parse_payload(&sign1.payload, UnknownFields::Refuse).expect("payload");
    let leaf = openssl::x509::X509::from_der(parsed.certificate()).expect("leaf");
    let key = leaf.public_key().expect("key");
    let anchor = TrustAnchor::aws_nitro().expect("root");
    let root = anchor.der().to_vec();
    let root_sha256: String = openssl::sha::sha256(&root).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(root_sha256, AWS_ROOT_SHA256, "the root given to the peer must be AWS's");

    // Sanity: the peer verifier must accept doc-1 at its own time and refuse the same document
    // with one byte of its COSE signature flipped (and, at today's date, its expired chain), so
    // that its row below cannot be a no-op.
    assert!(DOC.ends_with(&sign1.signature), "the signature is the envelope's last item");
    let mut tampered = DOC.to_vec();
    let at = DOC.len() - sign1.signature.len() / 2; // first byte of s in r || s
    tampered[at] ^= 0x01;
    let now_ms =
        u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis())
            .expect("ms");
    let good = peer_verify(DOC, &root, AT_MS);
    let bad = peer_verify(&tampered, &root, AT_MS);
    let late = peer_verify(DOC, &root, now_ms);
    println!("sanity: nsm-nitro-enclave-utils, doc-1 at {AT_MS} ms: {}", outcome(&good));
    println!(
        "sanity: nsm-nitro-enclave-utils, doc-1 with COSE signature byte {at} of {} flipped, at {AT_MS} ms: {}",
        DOC.len(),
        outcome(&bad)
    );
    println!("sanity: nsm-nitro-enclave-utils, doc-1 at the wall clock ({now_ms} ms): {}", outcome(&late));
    let keygate_bad = Verifier::new(anchor.clone()).verify(&tampered, &VerifyOptions::at(AT_MS));
    println!(
        "sanity: keygate Verifier, the same flipped copy: {}",
        keygate_bad.as_ref().map_or_else(|e| format!("REFUSED ({e})"), |_| "ACCEPTED".into())
    );
    assert!(good.is_ok() && bad.is_err() && late.is_err() && keygate_bad.is_err(), "sanity failed");
    println!();

    println!("| verifier | what it checks | verifications/s (median of 5 × 1 s) |");
    println!("|---|---|---|");
    let aws = rate(|| {
        let doc = CoseSign1::from_bytes(DOC).expect("aws parse");
        doc.verify_signature::<Openssl>(&key).expect("aws verify")
    });
    println!("| aws-nitro-enclaves-cose 0.6 (OpenSSL) | COSE signature only | {aws:.0} |");
    let point = {
        let ec = key.ec_key().expect("ec");
        let mut ctx = openssl::bn::BigNumContext::new().expect("ctx");
        ec.public_key().to_bytes(ec.group(), openssl::ec::PointConversionForm::UNCOMPRESSED, &mut ctx).expect("point")
    };
    for b in all_backends() {
        let r = rate(|| {
            let s = cose::parse(DOC).expect("parse");
            b.verify_p384_sha384_fixed(&point, &cose::sig_structure(s.protected, &s.payload), &s.signature).is_ok()
        });
        println!("| keygate cose::parse + {} | COSE signature only | {r:.0} |", b.name());
    }
    let peer = rate(|| peer_verify(DOC, &root, AT_MS).is_ok());
    println!(
        "| nsm-nitro-enclave-utils 0.1.3 (chain: rustls-webpki 0.103 + ring; COSE: RustCrypto p384), time given | chain to the caller-given AWS root (4 certificate signatures, each certificate's validity at the given time, CA constraints), COSE signature; payload decoded, but no AWS field limits; no chain cache | {peer:.0} |"
    );
    for b in all_backends() {
        let o = VerifyOptions::at(AT_MS);
        let r = rate(|| Verifier::with_crypto(anchor.clone(), b).verify(DOC, &o).is_ok());
        println!("| keygate Verifier ({}), cold (new Verifier per document) | everything: limits, chain (4 certificate signatures), COSE, time | {r:.0} |", b.name());
    }
    for b in all_backends() {
        let warm = Verifier::with_crypto(anchor.clone(), b);
        let o = VerifyOptions::at(AT_MS);
        let r = rate(|| warm.verify(DOC, &o).is_ok());
        println!("| keygate Verifier ({}), chain cache warm | everything: limits, chain (leaf signature), COSE, time | {r:.0} |", b.name());
    }
}
