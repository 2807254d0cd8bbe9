//! `keygate demo`: the tour of the product, on ordinary Linux, with no set-up.
//!
//! Every step states what should happen, does it, and checks that it did; the demo exits 0
//! only if every step behaved as it should.

use std::sync::Arc;

use keygate_attestation::mock::MockNsm;
use keygate_attestation::{AttestRequest, Nsm, TrustAnchor, Verifier, VerifyError, VerifyOptions};

use crate::error::CliError;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {}

/// Collects step outcomes and prints them as it goes.
#[derive(Debug, Default)]
pub(crate) struct Tour {
    passed: usize,
    failed: Vec<String>,
}

impl Tour {
    pub(crate) fn section(&self, title: &str) {
        println!("\n== {title}");
    }

    /// Records a step: `outcome` is Ok(what happened) when the step behaved as it should.
    pub(crate) fn step(&mut self, what: &str, outcome: Result<String, String>) {
        match outcome {
            Ok(detail) => {
                self.passed += 1;
                println!("  ok   {what}\n         {detail}");
            }
            Err(detail) => {
                self.failed.push(what.to_owned());
                println!("  FAIL {what}\n         {detail}");
            }
        }
    }

    pub(crate) fn finish(self) -> Result<(), CliError> {
        println!();
        if self.failed.is_empty() {
            println!("demo: all {} steps behaved as they should", self.passed);
            Ok(())
        } else {
            Err(CliError::refused(format!(
                "demo: {} of {} steps did not behave as they should: {}",
                self.failed.len(),
                self.passed + self.failed.len(),
                self.failed.join("; ")
            )))
        }
    }
}

/// A real AWS Nitro attestation document (production enclave, us-east-1).
const REAL_DOC: &[u8] = include_bytes!("../../../attestation/tests/vectors/doc-1.cbor");
const REAL_DOC_TIME_MS: u64 = 1_732_983_769_000;
/// A real debug-mode document.
const REAL_DEBUG_DOC: &[u8] = include_bytes!("../../../attestation/tests/vectors/doc-4.cbor");
const REAL_DEBUG_TIME_MS: u64 = 1_694_102_162_000;

fn expect_refusal(
    r: Result<keygate_attestation::VerifiedAttestation, VerifyError>,
    ok: fn(&VerifyError) -> bool,
) -> Result<String, String> {
    match r {
        Err(e) if ok(&e) => Ok(format!("refused: {e}")),
        Err(e) => Err(format!("refused for the wrong reason: {e}")),
        Ok(_) => Err("accepted, but must be refused".to_owned()),
    }
}

pub(crate) fn attestation_tour(tour: &mut Tour) -> Result<(), CliError> {
    tour.section("Attestation: real AWS Nitro documents");
    let aws = Verifier::new(TrustAnchor::aws_nitro().map_err(|e| CliError::input(e.to_string()))?);
    tour.step(
        "a real enclave document verifies against the pinned AWS root, as of its own time",
        aws.verify(REAL_DOC, &VerifyOptions::at(REAL_DOC_TIME_MS))
            .map(|a| format!("module {}, PCR0 {}…", a.module_id(), hex::encode(&a.pcr(0).unwrap_or_default()[..8])))
            .map_err(|e| e.to_string()),
    );
    tour.step(
        "the same document is refused today: its certificates have expired",
        expect_refusal(aws.verify(REAL_DOC, &VerifyOptions::at(super::attestation::now_ms())), |e| {
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
    let now = super::attestation::now_ms();
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
            .map_err(|e| e.to_string()),
    );
    tour.step(
        "a mock document never verifies against the AWS root",
        expect_refusal(aws.verify(&doc, &VerifyOptions::at(now)), |e| matches!(e, VerifyError::RootMismatch { .. })),
    );
    Ok(())
}

pub(crate) fn run(_args: DemoArgs) -> Result<(), CliError> {
    println!("keygate demo: attested key release, end to end, on the mock NSM");
    let mut tour = Tour::default();
    attestation_tour(&mut tour)?;
    super::demo_release::key_release_tour(&mut tour)?;
    tour.finish()
}
