//! Fuzz target: policy bundle, body and signature parsing, and applying a bundle to a
//! policy state, must never panic or allocate without bound.
#![no_main]

use keygate_attestation::bundle::{self, PolicyState};
use keygate_attestation::crypto::default_backend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let c = default_backend();
    let _ = bundle::decode_body(data, c);
    let _ = bundle::decode_signature(data, b"body");
    if let Ok(mut state) = PolicyState::trusting(data, c) {
        let _ = state.effective(0);
        let _ = state.apply(data, 1_795_478_400_000, c);
    }
});
