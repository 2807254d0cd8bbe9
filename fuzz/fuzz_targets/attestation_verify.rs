//! Fuzz target: attestation document parsing and verification must never panic, hang or
//! allocate without bound, whatever the input. Runs the full verifier against both the AWS
//! root (at one of the real vectors' times) and a mock root.
#![no_main]

use std::sync::OnceLock;

use keygate_attestation::mock::MockPki;
use keygate_attestation::{TrustAnchor, UnknownFields, Verifier, VerifyOptions};
use libfuzzer_sys::fuzz_target;

const AT_MS: u64 = 1_732_983_769_000;

fn verifiers() -> &'static [Verifier; 2] {
    static V: OnceLock<[Verifier; 2]> = OnceLock::new();
    V.get_or_init(|| {
        let aws = TrustAnchor::aws_nitro().expect("built-in root");
        let mock = MockPki::from_seed(b"fuzz", AT_MS).root_anchor();
        [Verifier::new(aws), Verifier::new(mock)]
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = keygate_attestation::cbor::decode(data);
    for v in verifiers() {
        let mut o = VerifyOptions::at(AT_MS);
        o.allow_debug = true;
        let _ = v.verify(data, &o);
        o.unknown_fields = UnknownFields::TolerateAndReport;
        o.time = keygate_attestation::VerifyTime::DocumentTime;
        let _ = v.verify(data, &o);
    }
});
