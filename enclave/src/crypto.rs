//! Keys and the arithmetic over them: KEKs and data keys, data-key derivation, wrapping a
//! data key to an attested public key (and the wrapped-key type), and Shamir's secret
//! sharing of the state key.
//!
//! What this layer decides: how a data key derives from its KEK, how it is wrapped so that
//! only the attested requester opens it, and how the state key splits and recombines. What it
//! trusts: the crypto backend of `keygate-attestation` and the caller's randomness. Spec:
//! `docs/protocol.md` ("Data keys", "Wrapping") and `docs/durability.md` (custody); every
//! label and transcript they use is in [`crate::binding`].

pub mod forward;
pub mod keys;
pub mod shamir;

/// The deterministic fill the crate's unit tests draw keys, nonces and shares from
/// (splitmix64; tests only — the server uses the OS RNG).
#[cfg(test)]
pub(crate) fn test_rng(seed: u8) -> impl FnMut(&mut [u8]) {
    let mut n = u64::from(seed);
    move |b: &mut [u8]| {
        for x in b.iter_mut() {
            n = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = n;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *x = (z ^ (z >> 31)).to_le_bytes()[0];
        }
    }
}
