//! Fuzz target: the sealed-state, shares-file and unseal-share readers must never panic or
//! allocate without bound, whatever the parent hands the KRE.
#![no_main]

use keygate_attestation::crypto::default_backend;
use keygate_attestation::secret::Secret;
use keygate_enclave::custody::{SharesFile, UnsealShare};
use keygate_enclave::sealed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let c = default_backend();
    let _ = sealed::peek_header(data);
    let _ = sealed::open(data, &Secret::new([7u8; 32]), c);
    let _ = SharesFile::decode(c, data);
    let _ = UnsealShare::decode(data);
});
