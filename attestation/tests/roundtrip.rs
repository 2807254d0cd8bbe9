//! Property test: whatever a mock NSM is asked to attest verifies, on every backend, with
//! every field intact; and a document never verifies at a time outside its leaf's window.

use std::collections::BTreeMap;
use std::sync::Arc;

use keygate_attestation::crypto::all_backends;
use keygate_attestation::mock::MockNsm;
use keygate_attestation::{AttestRequest, DocumentKind, Nsm, Verifier, VerifyError, VerifyOptions};
use proptest::prelude::*;

fn pcr_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(32usize), Just(48), Just(64)].prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mock_then_verify_round_trips(
        seed in proptest::collection::vec(any::<u8>(), 1..32),
        // 2020-01-01 .. 2040-01-01
        t in 1_577_836_800_000u64..2_208_988_800_000,
        pcrs in proptest::collection::btree_map(0u8..16, pcr_value(), 0..6),
        // Every length the NSM signs: 0..=1024 bytes each (an empty public_key included).
        nonce in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=1024)),
        user_data in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=1024)),
        public_key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=1024)),
        tpm in any::<bool>(),
    ) {
        let kind = if tpm { DocumentKind::NitroTpm } else { DocumentKind::Enclave };
        let nsm = MockNsm::with_kind(&seed, kind, pcrs.clone(), Arc::new(move || t));
        let req = AttestRequest { nonce: nonce.clone(), user_data: user_data.clone(), public_key: public_key.clone() };
        let doc = nsm.attest(&req).expect("attest");
        let mut opts = VerifyOptions::at(t);
        opts.allow_debug = true;
        let mut results = Vec::new();
        for b in all_backends() {
            let att = Verifier::with_crypto(nsm.root_anchor(), b).verify(&doc, &opts).expect("verifies");
            prop_assert_eq!(att.kind(), kind);
            prop_assert_eq!(att.nonce(), nonce.as_deref());
            prop_assert_eq!(att.user_data(), user_data.as_deref());
            prop_assert_eq!(att.public_key(), public_key.as_deref());
            prop_assert_eq!(att.timestamp_ms(), t);
            for (i, v) in &pcrs {
                prop_assert_eq!(att.pcr(*i), Some(v.as_slice()));
            }
            results.push(att);
        }
        prop_assert!(results.windows(2).all(|w| w[0] == w[1]), "backends disagree");

        // Four hours later the leaf (3 h) has expired, whatever the age limit.
        let mut late = VerifyOptions::at(t + 4 * 3_600_000);
        late.max_age = std::time::Duration::from_secs(24 * 3600);
        late.allow_debug = true;
        let err = Verifier::new(nsm.root_anchor()).verify(&doc, &late).expect_err("expired");
        let expired = matches!(err, VerifyError::CertificateExpired { .. });
        prop_assert!(expired, "{:?}", err);
    }

    #[test]
    fn backends_agree_on_corrupted_documents(flip in 0usize..4000, bit in 0u8..8) {
        let t = 1_795_478_400_000u64;
        let nsm = MockNsm::new(b"corrupt", BTreeMap::from([(0, vec![1; 48])]), Arc::new(move || t));
        let mut doc = nsm.attest(&AttestRequest::default()).expect("attest");
        let at = flip % doc.len();
        doc[at] ^= 1 << bit;
        let results: Vec<_> = all_backends()
            .into_iter()
            .map(|b| Verifier::with_crypto(nsm.root_anchor(), b).verify(&doc, &VerifyOptions::at(t)).map(|_| ()))
            .collect();
        prop_assert!(results.iter().all(|r| r.is_err()), "flip at {} bit {} accepted", at, bit);
        prop_assert!(results.windows(2).all(|w| w[0] == w[1]), "backends disagree: {:?}", results);
    }
}
