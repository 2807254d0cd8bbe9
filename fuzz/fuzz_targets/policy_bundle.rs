//! Fuzz target: policy bundle, body, signature and timestamp parsing, applying a bundle to a
//! policy state, and checking a timestamp against it, must never panic or allocate without
//! bound.
#![no_main]

use keygate_attestation::bundle::{self, PolicyState};
use keygate_attestation::crypto::default_backend;
use keygate_attestation::freshness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let c = default_backend();
    let _ = bundle::decode_body(data, c);
    let _ = bundle::decode_signature(data, b"body");
    let stamp = freshness::decode(data).ok();
    let _ = freshness::is_timestamp(data);
    if let Ok(mut state) = PolicyState::trusting(data, c) {
        let _ = state.effective(0);
        let _ = state.apply(data, 1_795_478_400_000, c);
        let f = state.freshness_in_force(1_795_478_400_000);
        if let Some(t) = &stamp {
            let _ = freshness::verify(c, f.as_ref(), t, 1_795_478_400_000, 1000);
            let _ = freshness::check(f.as_ref(), Some(t), (1, [0; 48]), 1_795_478_400_000);
        }
    }
});
