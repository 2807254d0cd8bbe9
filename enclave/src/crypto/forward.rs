//! Forwarding the state key from a serving member to a joining one (`docs/cluster.md`).
//!
//! What it decides: how the state key is encrypted to the joiner's attested ephemeral key.
//! With the serving member's fresh key pair (s, S), the joiner's attested key J and the join
//! transcript T ([`crate::binding::JoinTranscript::hash`]):
//!
//! ```text
//! key ‖ nonce = HKDF-SHA384(salt = T, ikm = ECDH(s, J), info = "keygate/v1/join-state-key", L = 44)
//! sealed      = AES-256-GCM(key, nonce, aad = T, state_key)         ; 32 + 16 bytes
//! ```
//!
//! The same construction as a custodian's unseal share (custody), with the two members'
//! ephemeral keys. What it trusts: the crypto backend, and that the caller verified the
//! attestations that carry S and J and bind T.

use keygate_attestation::crypto::{Crypto, CryptoError, P384Scalar};
use keygate_attestation::secret::Secret;
use zeroize::Zeroizing;

use crate::binding::JOIN_STATE_KEY;

/// Length of the sealed state key (ciphertext ‖ tag).
pub const SEALED_LEN: usize = 48;

fn key_nonce(crypto: &dyn Crypto, t: &[u8; 48], z: &[u8]) -> Result<(Secret<32>, [u8; 12]), CryptoError> {
    let mut okm = Zeroizing::new([0u8; 44]);
    crypto.hkdf_sha384(t, z, JOIN_STATE_KEY, &mut okm[..])?;
    let key = Secret::from_slice(&okm[..32]).ok_or(CryptoError::Kdf)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    Ok((key, nonce))
}

/// The serving member's side: `state_key` sealed to the joiner's key `joiner_public` under
/// transcript `t`, with the serving member's ephemeral scalar `s`.
pub fn seal_state_key(
    crypto: &dyn Crypto,
    s: &P384Scalar,
    joiner_public: &[u8],
    t: &[u8; 48],
    state_key: &Secret<32>,
) -> Result<[u8; SEALED_LEN], CryptoError> {
    let z = crypto.ecdh_p384(s, joiner_public)?;
    let (key, nonce) = key_nonce(crypto, t, z.expose())?;
    let sealed = crypto.aes256gcm_seal(&key, &nonce, t, state_key.expose())?;
    sealed.try_into().map_err(|_| CryptoError::Decrypt)
}

/// The joiner's side: opens what [`seal_state_key`] made, with the joiner's ephemeral scalar
/// `j` and the serving member's attested key `server_public`.
pub fn open_state_key(
    crypto: &dyn Crypto,
    j: &P384Scalar,
    server_public: &[u8],
    t: &[u8; 48],
    sealed: &[u8; SEALED_LEN],
) -> Result<Secret<32>, CryptoError> {
    let z = crypto.ecdh_p384(j, server_public)?;
    let (key, nonce) = key_nonce(crypto, t, z.expose())?;
    let plain = crypto.aes256gcm_open(&key, &nonce, t, sealed)?;
    Secret::from_slice(plain.expose()).ok_or(CryptoError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_rng;
    use keygate_attestation::crypto::{all_backends, p384_scalar_from};

    #[test]
    fn only_the_joiner_under_the_same_transcript_opens_it() {
        for c in all_backends() {
            let mut rng = test_rng(1);
            let (s, sp) = p384_scalar_from(c, &mut rng).expect("s");
            let (j, jp) = p384_scalar_from(c, &mut rng).expect("j");
            let (other, _) = p384_scalar_from(c, &mut rng).expect("other");
            let key = Secret::new([7u8; 32]);
            let sealed = seal_state_key(c, &s, &jp, &[1; 48], &key).expect("seal");
            assert_eq!(open_state_key(c, &j, &sp, &[1; 48], &sealed).expect("open").expose(), key.expose());
            assert!(open_state_key(c, &j, &sp, &[2; 48], &sealed).is_err(), "another transcript");
            assert!(open_state_key(c, &other, &sp, &[1; 48], &sealed).is_err(), "another joiner");
            let mut bad = sealed;
            bad[0] ^= 1;
            assert!(open_state_key(c, &j, &sp, &[1; 48], &bad).is_err(), "tampered");
        }
    }
}
