//! Fuzz target: the wire codec (both message families) and the KRE's per-connection state machine. Any sequence of
//! frames must produce a reply (never a panic), and a connection ends after a denial.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use keygate_attestation::mock::MockNsm;
use keygate_attestation::policy::{ClusterRule, ImageRule, ReleasePolicy};
use keygate_attestation::Verifier;
use keygate_enclave::kre::{Connection, Env, Kre, KreConfig};
use keygate_enclave::wire::{Channel, MemberMessage, Message};
use libfuzzer_sys::fuzz_target;

const T: u64 = 1_795_478_400_000;

fn kre() -> &'static Kre {
    static K: OnceLock<Kre> = OnceLock::new();
    K.get_or_init(|| {
        let nsm = MockNsm::new(b"fuzz", BTreeMap::new(), Arc::new(|| T));
        let image = ImageRule {
            name: "i".into(),
            pcrs: (0..3).map(|i| (i, vec![1; 48])).collect(),
            kind: keygate_attestation::DocumentKind::Enclave,
            not_after_ms: None,
            not_before_ms: None,
        };
        let policy = ReleasePolicy {
            clusters: BTreeMap::from([("c".into(), ClusterRule { images: vec![image], ..Default::default() })]),
            allow_debug: false,
        };
        Kre::new(KreConfig::default(), Verifier::new(nsm.root_anchor()), policy, Arc::new(nsm)).expect("kre")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode(data);
    // The member channel's own family (join request and offer): decoded, and re-encoded
    // to the same bytes when it decodes.
    if let Ok(m) = MemberMessage::decode(data) {
        let again = m.encode().expect("a decoded member message encodes");
        assert_eq!(MemberMessage::decode(&again[4..]).ok().map(|m| m.encode().ok()), Some(Some(again.clone())));
    }
    // The first byte picks the channel; the rest is split into frames at 0xff bytes and fed
    // to one connection.
    let Some((&pick, data)) = data.split_first() else { return };
    let channel = Channel::ALL[usize::from(pick) % Channel::ALL.len()];
    let mut conn = Connection::new(channel);
    let mut rng = |b: &mut [u8]| b.fill(7);
    for body in data.split(|b| *b == 0xff).take(4) {
        let step = conn.on_frame(kre(), body, &mut Env { now_ms: T, rng: &mut rng });
        assert!(!step.reply.is_empty());
        if step.close {
            assert!(conn.is_done());
            break;
        }
    }
    conn.abandon(kre());
});
