//! COSE signature verification per second on the same document: AWS's
//! `aws-nitro-enclaves-cose` (parse with serde_cbor + OpenSSL verify) and keygate's
//! (`cose::parse` + aws-lc-rs / RustCrypto verify), plus keygate's full verification
//! (chain + limits) for scale. AWS's crate verifies only the COSE signature: no chain.
#![forbid(unsafe_code)]

use std::time::Instant;

use aws_nitro_enclaves_cose::crypto::Openssl;
use aws_nitro_enclaves_cose::CoseSign1;
use keygate_attestation::crypto::all_backends;
use keygate_attestation::{cose, document, TrustAnchor, UnknownFields, Verifier, VerifyOptions};

const DOC: &[u8] = include_bytes!("../../../attestation/tests/vectors/doc-1.cbor");
const AT_MS: u64 = 1_732_983_769_000;

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
    let anchor = TrustAnchor::aws_nitro().expect("root");
    for b in all_backends() {
        let warm = Verifier::with_crypto(anchor.clone(), b);
        let o = VerifyOptions::at(AT_MS);
        let r = rate(|| warm.verify(DOC, &o).is_ok());
        println!("| keygate Verifier ({}), chain cache warm | everything: limits, chain (leaf signature), COSE, time | {r:.0} |", b.name());
    }
}
