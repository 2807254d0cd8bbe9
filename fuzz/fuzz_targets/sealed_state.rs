//! Fuzz target: the sealed-state, shares-file and unseal-share readers, the KRE's vault when
//! the parent hands it arbitrary state, and the custodian's check of an unseal offer must
//! never panic or allocate without bound, whatever the parent (or a fake KRE) sends.
#![no_main]

use std::sync::{Arc, OnceLock};

use keygate_attestation::crypto::{default_backend, p384_scalar_from, P384Scalar};
use keygate_attestation::mock::MockNsm;
use keygate_attestation::secret::Secret;
use keygate_attestation::{PcrExpectation, Verifier};
use keygate_enclave::peer::custodian::{self, Expectations};
use keygate_enclave::state::custody::{CustodianSet, SharesFile, UnsealShare};
use keygate_enclave::state::sealed;
use keygate_enclave::state::vault::{Custody, Vault};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    set: CustodianSet,
    scalar: P384Scalar,
    verifier: Verifier,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let c = default_backend();
        let (scalar, point) = p384_scalar_from(c, |b: &mut [u8]| b.fill(7)).expect("key");
        let set = CustodianSet::new(c, 1, vec![point.try_into().expect("point")]).expect("set");
        let nsm = MockNsm::new(b"fuzz", Default::default(), Arc::new(|| 1_795_478_400_000));
        Fixture { set, scalar, verifier: Verifier::new(nsm.root_anchor()) }
    })
}

fuzz_target!(|data: &[u8]| {
    let c = default_backend();
    let f = fixture();
    let _ = sealed::peek_header(data);
    let _ = sealed::open(data, &Secret::new([7u8; 32]), c);
    let _ = SharesFile::decode(c, data);
    let _ = UnsealShare::decode(data);
    // The parent's StateLoad: blob and shares split at the first byte's position.
    let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let mut v = Vault::new(f.set.clone());
    let custody = Custody { shares: data[cut..].to_vec(), genesis_attestation: Vec::new() };
    let _ = v.load(c, data[..cut].to_vec(), custody, &mut |b: &mut [u8]| b.fill(3));
    // A custodian reading an UnsealOffer from a (fake) KRE.
    let expect = [PcrExpectation { index: 0, value: vec![0; 48] }];
    let e = Expectations {
        verifier: &f.verifier,
        now_ms: 1_795_478_400_000,
        kre_pcrs: &expect,
        genesis_pcrs: &expect,
        record: None,
        accept_new_genesis: false,
        approve_reshare: None,
        cold_start: data.len() % 2 == 1,
    };
    let _ = custodian::on_offer(data, &[1; 32], &e, &f.scalar, c, &mut |b: &mut [u8]| b.fill(5));
});
