//! The demo's attestation part: real AWS Nitro documents verified against the pinned AWS root
//! (and refused when expired, debug-mode or tampered), then mock NSM documents, which verify
//! against the mock root and never against AWS's.

use std::sync::Arc;

use keygate_attestation::mock::MockNsm;
use keygate_attestation::{AttestRequest, Nsm, TrustAnchor, Verifier, VerifyError, VerifyOptions};

use super::tour::{Misbehaved, Outcome, Tour};
use crate::cmd::attestation::now_ms;
use crate::error::CliError;

/// A real AWS Nitro attestation document (production enclave, us-east-1).
const REAL_DOC: &[u8] = include_bytes!("../../../attestation/tests/vectors/doc-1.cbor");
const REAL_DOC_TIME_MS: u64 = 1_732_983_769_000;
/// A real debug-mode document.
const REAL_DEBUG_DOC: &[u8] = include_bytes!("../../../attestation/tests/vectors/doc-4.cbor");
const REAL_DEBUG_TIME_MS: u64 = 1_694_102_162_000;

fn expect_refusal(
    r: Result<keygate_attestation::VerifiedAttestation, VerifyError>,
    ok: fn(&VerifyError) -> bool,
) -> Outcome {
    match r {
        Err(e) if ok(&e) => Ok(format!("refused: {e}")),
        Err(e) => Err(format!("refused for the wrong reason: {e}").into()),
        Ok(_) => Err("accepted, but must be refused".into()),
    }
}

pub(crate) fn attestation_tour(tour: &mut Tour) -> Result<(), CliError> {
    tour.section("Attestation: real AWS Nitro documents");
    let aws = Verifier::new(TrustAnchor::aws_nitro().map_err(|e| CliError::input(e.to_string()))?);
    tour.step(
        "a real enclave document verifies against the pinned AWS root, as of its own time",
        aws.verify(REAL_DOC, &VerifyOptions::at(REAL_DOC_TIME_MS))
            .map(|a| format!("module {}, PCR0 {}…", a.module_id(), hex::encode(&a.pcr(0).unwrap_or_default()[..8])))
            .map_err(Misbehaved::because),
    );
    tour.step(
        "the same document is refused today: its certificates have expired",
        expect_refusal(aws.verify(REAL_DOC, &VerifyOptions::at(now_ms())), |e| {
            matches!(e, VerifyError::CertificateExpired { .. })
        }),
    );
    tour.step(
        "a real debug-mode document (PCR0-2 zero) is refused",
        expect_refusal(aws.verify(REAL_DEBUG_DOC, &VerifyOptions::at(REAL_DEBUG_TIME_MS)), |e| {
            matches!(e, VerifyError::DebugMode)
        }),
    );
    let mut tampered = REAL_DOC.to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    tour.step(
        "one flipped bit in its signature is refused",
        expect_refusal(aws.verify(&tampered, &VerifyOptions::at(REAL_DOC_TIME_MS)), |e| {
            matches!(e, VerifyError::BadSignature)
        }),
    );

    tour.section("Attestation: the mock NSM");
    let now = now_ms();
    let pcrs = [(0u8, vec![0x11; 48]), (1, vec![0x22; 48]), (2, vec![0x33; 48])].into_iter().collect();
    let nsm = MockNsm::new(b"demo", pcrs, Arc::new(move || now));
    let doc = nsm
        .attest(&AttestRequest { nonce: Some(b"demo nonce".to_vec()), ..Default::default() })
        .map_err(|e| CliError::input(e.to_string()))?;
    tour.step(
        "a mock document verifies against the mock root",
        Verifier::new(nsm.root_anchor())
            .verify(&doc, &VerifyOptions::at(now))
            .map(|a| format!("{} bytes, module {}, same structure as a real document", doc.len(), a.module_id()))
            .map_err(Misbehaved::because),
    );
    tour.step(
        "a mock document never verifies against the AWS root",
        expect_refusal(aws.verify(&doc, &VerifyOptions::at(now)), |e| matches!(e, VerifyError::RootMismatch { .. })),
    );
    Ok(())
}
