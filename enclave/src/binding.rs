//! Every domain-separated digest, transcript hash and key-derivation label of keygate, in
//! one place: the exact bytes each one covers.
//!
//! What this module decides: the domain tag and the byte order of every value that binds
//! one thing to another — a request to an attestation (`user_data`), a handshake to the
//! wrapped keys, an unseal session to a share, a KRE image to an audit chain. A tag is never
//! reused for two purposes, so a digest made for one cannot be replayed as another. What it
//! trusts: nothing; these are pure functions of their arguments. The spec is
//! `docs/protocol.md` (release handshake, custody and unseal) and `docs/audit.md` (entries,
//! checkpoints, receipts), which point here for the byte layouts.
//!
//! Notation: `‖` is concatenation, `str8(s)` is `len:u8 ‖ s`, `u64be` a big-endian `u64`.

use sha2::{Digest, Sha384};

use crate::codec::{Id, Writer};

/// Salt of the data-key derivation (HKDF-SHA384, [`data_key_info`]).
pub const DATA_KEY: &[u8] = b"keygate/v1/data-key";
/// Prefix of the wrapping key's HKDF info ([`wrap_info`]).
pub const WRAP: &[u8] = b"keygate/v1/wrap";
/// Salt of the sealed-state subkey of formats 1 to 3 (HKDF-SHA384, [`sealed_state_info`]).
pub const SEALED_STATE: &[u8] = b"keygate/v1/sealed-state";
/// Salt of the sealed-state subkey from format 4 on (HKDF-SHA384, [`sealed_state_info_salted`]):
/// a changed derivation, so a new label.
pub const SEALED_STATE_SALTED: &[u8] = b"keygate/v2/sealed-state";
/// Prefix of a share envelope's HKDF info ([`share_envelope_info`]).
pub const SHARE_ENVELOPE: &[u8] = b"keygate/v1/share-envelope";
/// Domain label of a share commitment in the shares file ([`share_commitment`]).
pub const SHARE_COMMITMENT: &[u8] = b"keygate/v1/share-commitment";
/// HKDF info of the key a custodian re-encrypts its share under (salt: [`UnsealTranscript::hash`]).
pub const UNSEAL_SHARE: &[u8] = b"keygate/v1/unseal-share";
/// Domain label of an audit entry's digest ([`entry_digest`]).
pub const ENTRY_DOMAIN: &[u8] = b"keygate/v1/audit-entry";
/// Domain label of the audit chain id ([`chain_id_of`]), which is also the `user_data` of
/// the document binding the checkpoint key.
pub const CHAIN_DOMAIN: &[u8] = b"keygate/v1/audit-chain";
/// Domain label of a checkpoint signature: the signed message is
/// `CHECKPOINT_DOMAIN ‖ signed body` (`docs/audit.md`).
pub const CHECKPOINT_DOMAIN: &[u8] = b"keygate/v1/audit-checkpoint";
/// Domain label of a release receipt signature: `RECEIPT_DOMAIN ‖ receipt body`.
pub const RECEIPT_DOMAIN: &[u8] = b"keygate/v1/audit-receipt";
/// Domain label of a policy receipt signature: `POLICY_RECEIPT_DOMAIN ‖ receipt body`.
pub const POLICY_RECEIPT_DOMAIN: &[u8] = b"keygate/v1/policy-durable";

fn sha384(parts: &[&[u8]]) -> [u8; 48] {
    let mut h = Sha384::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The digest a client puts in its attestation's `user_data`, binding the request:
/// `SHA-384("keygate/v1/release-request" ‖ str8(cluster_id) ‖ u8(n) ‖ str8(key_id)×n)`.
pub fn request_digest(cluster_id: &Id, key_ids: &[Id]) -> [u8; 48] {
    let mut w = Writer::from_vec(b"keygate/v1/release-request".to_vec());
    w.id(cluster_id);
    w.u8(u8::try_from(key_ids.len()).unwrap_or(u8::MAX));
    for k in key_ids {
        w.id(k);
    }
    sha384(&[&w.into_bytes()])
}

/// `user_data` of the KRE's attestation in a Challenge, binding it to this connection:
/// `SHA-384("keygate/v1/kre-challenge" ‖ server_nonce)`.
pub fn kre_user_data(server_nonce: &[u8; 32]) -> [u8; 48] {
    sha384(&[b"keygate/v1/kre-challenge", server_nonce])
}

/// The release transcript `T`, the salt of every wrapping key and the start of its AAD:
/// `SHA-384("keygate/v1/transcript" ‖ client_nonce ‖ server_nonce ‖ SHA-384(kre_attestation)
/// ‖ SHA-384(client_attestation) ‖ request_digest ‖ ephemeral_point)`.
pub fn transcript(
    client_nonce: &[u8; 32],
    server_nonce: &[u8; 32],
    kre_attestation_sha384: &[u8; 48],
    client_attestation_sha384: &[u8; 48],
    request_digest: &[u8; 48],
    ephemeral_point: &[u8],
) -> [u8; 48] {
    sha384(&[
        b"keygate/v1/transcript",
        client_nonce,
        server_nonce,
        kre_attestation_sha384,
        client_attestation_sha384,
        request_digest,
        ephemeral_point,
    ])
}

/// HKDF info of a data key (salt [`DATA_KEY`], ikm the KEK):
/// `str8(cluster) ‖ str8(key_id) ‖ u32be(version)`.
pub fn data_key_info(cluster: &Id, key_id: &Id, version: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.id(cluster);
    w.id(key_id);
    w.u32(version);
    w.into_bytes()
}

/// `prefix ‖ str8(key_id) ‖ u32be(version)`: with `prefix` = [`WRAP`], the HKDF info of a
/// wrapping key (salt `T`, ikm the ECDH secret); with an empty prefix, the part of the
/// wrap's AAD after `T`.
pub fn wrap_info(prefix: &[u8], key_id: &Id, version: u32) -> Vec<u8> {
    let mut w = Writer::from_vec(prefix.to_vec());
    w.id(key_id);
    w.u32(version);
    w.into_bytes()
}

/// HKDF info of the sealed-state subkey (salt [`SEALED_STATE`], ikm the state key):
/// `u64be(generation) ‖ custodian_set_digest`.
pub fn sealed_state_info(generation: u64, custodian_set_digest: &[u8; 48]) -> [u8; 56] {
    let mut info = [0u8; 56];
    info[..8].copy_from_slice(&generation.to_be_bytes());
    info[8..].copy_from_slice(custodian_set_digest);
    info
}

/// HKDF info of the sealed-state subkey from format 4 on (salt [`SEALED_STATE_SALTED`], ikm the state
/// key): `u64be(generation) ‖ custodian_set_digest ‖ seal_salt`, where `seal_salt` is 32 fresh
/// random bytes in the blob's header, so that every seal (even two of one generation) has its
/// own AES-GCM key.
pub fn sealed_state_info_salted(generation: u64, custodian_set_digest: &[u8; 48], seal_salt: &[u8; 32]) -> [u8; 88] {
    let mut info = [0u8; 88];
    info[..56].copy_from_slice(&sealed_state_info(generation, custodian_set_digest));
    info[56..].copy_from_slice(seal_salt);
    info
}

/// The canonical digest of a custodian set (in the sealed state header and every envelope):
/// `SHA-384("keygate/v1/custodian-set" ‖ u8(threshold) ‖ u8(n) ‖ key×n)`, keys uncompressed
/// P-384 points in set order.
pub fn custodian_set_digest<K: AsRef<[u8]>>(threshold: u8, count: u8, keys: &[K]) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(b"keygate/v1/custodian-set");
    h.update([threshold, count]);
    for k in keys {
        h.update(k);
    }
    h.finalize().into()
}

/// HKDF info of a share envelope's key:
/// `"keygate/v1/share-envelope" ‖ set_digest ‖ u8(x) ‖ custodian ‖ ephemeral`.
pub fn share_envelope_info(set_digest: &[u8; 48], x: u8, custodian: &[u8], ephemeral: &[u8]) -> Vec<u8> {
    [SHARE_ENVELOPE, set_digest, &[x], custodian, ephemeral].concat()
}

/// The commitment to share `x` that the shares file records (format 2):
/// `SHA-384("keygate/v1/share-commitment" ‖ set_digest ‖ u8(x) ‖ y)`, `y` the share's 32 bytes.
/// The KRE refuses an unseal share whose `y` does not hash to its index's commitment.
pub fn share_commitment(set_digest: &[u8; 48], x: u8, y: &[u8; 32]) -> [u8; 48] {
    sha384(&[SHARE_COMMITMENT, set_digest, &[x], y])
}

/// What a re-encrypted unseal share is bound to.
#[derive(Debug, Clone, Copy)]
pub struct UnsealTranscript<'a> {
    /// SHA-384 of the KRE's unseal attestation document.
    pub kre_attestation_sha384: &'a [u8; 48],
    /// The KRE's unseal nonce.
    pub unseal_nonce: &'a [u8; 32],
    /// The KRE's ephemeral key K.
    pub kre_public: &'a [u8],
    /// The digest of the custodian set.
    pub set_digest: &'a [u8; 48],
    /// The generation being unsealed.
    pub generation: u64,
    /// SHA-384 of the exact sealed blob being unsealed (a generation alone does not name one).
    pub blob_sha384: &'a [u8; 48],
    /// The share index.
    pub x: u8,
    /// The custodian's key C_x.
    pub custodian: &'a [u8],
    /// The custodian's fresh ephemeral key E.
    pub ephemeral: &'a [u8],
}

impl UnsealTranscript<'_> {
    /// `SHA-384("keygate/v2/unseal" ‖ SHA-384(kre_attestation) ‖ unseal_nonce ‖ K ‖ set_digest
    /// ‖ u64be(generation) ‖ SHA-384(blob) ‖ u8(x) ‖ C_x ‖ E)`: the HKDF salt of the
    /// re-encrypted share.
    pub fn hash(&self) -> [u8; 48] {
        sha384(&[
            b"keygate/v2/unseal",
            self.kre_attestation_sha384,
            self.unseal_nonce,
            self.kre_public,
            self.set_digest,
            &self.generation.to_be_bytes(),
            self.blob_sha384,
            &[self.x],
            self.custodian,
            self.ephemeral,
        ])
    }
}

/// `user_data` of the KRE's unseal attestation:
/// `SHA-384("keygate/v2/unseal-offer" ‖ unseal_nonce ‖ u64be generation ‖ SHA-384(blob) ‖ set_digest
/// ‖ SHA-384(shares file))`. Its `public_key` is `K`. The blob's digest names the exact sealed
/// state: two blobs of one generation (a fork) have different digests.
pub fn unseal_user_data(
    unseal_nonce: &[u8; 32],
    generation: u64,
    blob_sha384: &[u8; 48],
    set_digest: &[u8; 48],
    shares_sha384: &[u8; 48],
) -> [u8; 48] {
    offer_hash(b"keygate/v2/unseal-offer", unseal_nonce, generation, blob_sha384, set_digest, shares_sha384, &[])
}

/// `SHA-384(label ‖ nonce ‖ u64be generation ‖ SHA-384(blob) ‖ set_digest ‖ SHA-384(shares) ‖
/// extra)`: the shape of every unseal-offer binding.
fn offer_hash(
    label: &[u8],
    nonce: &[u8; 32],
    generation: u64,
    blob_sha384: &[u8; 48],
    set_digest: &[u8; 48],
    shares_sha384: &[u8; 48],
    extra: &[u8],
) -> [u8; 48] {
    sha384(&[label, nonce, &generation.to_be_bytes(), blob_sha384, set_digest, shares_sha384, extra])
}

/// `user_data` of the KRE's reshare attestation: as [`unseal_user_data`], with the new set:
/// `SHA-384("keygate/v2/reshare-offer" ‖ nonce ‖ u64be generation ‖ SHA-384(blob) ‖ set_digest
/// ‖ SHA-384(shares) ‖ new_set_digest)`, the blob being the committed one.
pub fn reshare_user_data(
    nonce: &[u8; 32],
    generation: u64,
    blob_sha384: &[u8; 48],
    set_digest: &[u8; 48],
    shares_sha384: &[u8; 48],
    new_set_digest: &[u8; 48],
) -> [u8; 48] {
    offer_hash(b"keygate/v2/reshare-offer", nonce, generation, blob_sha384, set_digest, shares_sha384, new_set_digest)
}

/// `user_data` of an unseal offer: [`unseal_user_data`], or [`reshare_user_data`] when the
/// offer reshares to the set with digest `new_set_digest`, or for a cold start the
/// [`unseal_user_data`] hash under the label `keygate/v2/cold-start-unseal-offer`. The KRE makes
/// it; a custodian checks it.
pub fn offer_user_data(
    nonce: &[u8; 32],
    generation: u64,
    blob_sha384: &[u8; 48],
    set_digest: &[u8; 48],
    shares_sha384: &[u8; 48],
    new_set_digest: Option<&[u8; 48]>,
    cold_start: bool,
) -> [u8; 48] {
    match (new_set_digest, cold_start) {
        (None, false) => unseal_user_data(nonce, generation, blob_sha384, set_digest, shares_sha384),
        // A cold start (a member KRE that will serve without a serving member's confirmation,
        // `docs/cluster.md`) under its own label, so a share whose transcript covers the
        // attestation consents to exactly that.
        (None, true) => {
            let label = b"keygate/v2/cold-start-unseal-offer";
            offer_hash(label, nonce, generation, blob_sha384, set_digest, shares_sha384, &[])
        }
        (Some(new), _) => reshare_user_data(nonce, generation, blob_sha384, set_digest, shares_sha384, new),
    }
}

/// `user_data` of the genesis attestation that travels with the shares file:
/// `SHA-384("keygate/v1/genesis" ‖ shares file)`. It shows custodians that the shares were
/// made inside a genuine KRE (so nobody outside knows the state key).
pub fn genesis_user_data(shares_file: &[u8]) -> [u8; 48] {
    sha384(&[b"keygate/v1/genesis", shares_file])
}

/// `SHA-384(ENTRY_DOMAIN ‖ bytes)`: the digest of an encoded audit entry, which the next
/// entry records as `prev` and a checkpoint signs as `head`.
pub fn entry_digest(bytes: &[u8]) -> [u8; 48] {
    sha384(&[ENTRY_DOMAIN, bytes])
}

/// The chain id of a checkpoint key: `SHA-384(CHAIN_DOMAIN ‖ point)`. Entry 1 records it as
/// `prev`, every entry as `chain_id`, and the binding document as `user_data`.
pub fn chain_id_of(point: &[u8]) -> [u8; 48] {
    sha384(&[CHAIN_DOMAIN, point])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_id as id;

    /// SHA-384 over `parts`, written here apart from the code under test.
    pub(super) fn h(parts: &[&[u8]]) -> [u8; 48] {
        let mut d = Sha384::new();
        for p in parts {
            d.update(p);
        }
        d.finalize().into()
    }

    #[test]
    fn request_and_challenge_digests_cover_the_documented_bytes() {
        let c = id("prod");
        let k = [id("a"), id("bc")];
        assert_eq!(request_digest(&c, &k), h(&[b"keygate/v1/release-request", b"\x04prod\x02\x01a\x02bc"]));
        assert_eq!(kre_user_data(&[7; 32]), h(&[b"keygate/v1/kre-challenge", &[7; 32]]));
        assert_eq!(
            transcript(&[1; 32], &[2; 32], &[3; 48], &[4; 48], &[5; 48], &[6; 97]),
            h(&[b"keygate/v1/transcript", &[1; 32], &[2; 32], &[3; 48], &[4; 48], &[5; 48], &[6; 97]])
        );
    }

    #[test]
    fn kdf_inputs_are_the_documented_bytes() {
        let c = id("c");
        let k = id("kk");
        assert_eq!(data_key_info(&c, &k, 3), b"\x01c\x02kk\x00\x00\x00\x03".to_vec());
        assert_eq!(wrap_info(WRAP, &k, 1), [WRAP, b"\x02kk\x00\x00\x00\x01"].concat());
        assert_eq!(sealed_state_info(1, &[9; 48])[..8], [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_ne!(SEALED_STATE_SALTED, SEALED_STATE, "a changed derivation, a new label");
        let salted = sealed_state_info_salted(1, &[9; 48], &[8; 32]);
        assert_eq!(salted[..56], sealed_state_info(1, &[9; 48]));
        assert_eq!(salted[56..], [8; 32]);
        assert_eq!(
            share_commitment(&[1; 48], 2, &[3; 32]),
            h(&[b"keygate/v1/share-commitment", &[1; 48], &[2], &[3; 32]])
        );
        assert_ne!(share_commitment(&[1; 48], 3, &[3; 32]), share_commitment(&[1; 48], 2, &[3; 32]));
        assert_eq!(share_envelope_info(&[1; 48], 2, &[3], &[4]), [SHARE_ENVELOPE, &[1; 48], &[2, 3, 4]].concat());
        assert_eq!(
            custodian_set_digest(1, 2, &[[5u8; 97], [6; 97]]),
            h(&[b"keygate/v1/custodian-set", &[1, 2], &[5; 97], &[6; 97]])
        );
    }

    #[test]
    fn session_bindings_are_the_documented_hashes() {
        let (n, g, b, sd, sh, nd) = ([1u8; 32], 7u64, [5u8; 48], [2u8; 48], [3u8; 48], [4u8; 48]);
        assert_eq!(
            unseal_user_data(&n, g, &b, &sd, &sh),
            h(&[b"keygate/v2/unseal-offer", &n, &g.to_be_bytes(), &b, &sd, &sh])
        );
        assert_eq!(
            offer_user_data(&n, g, &b, &sd, &sh, None, true),
            h(&[b"keygate/v2/cold-start-unseal-offer", &n, &g.to_be_bytes(), &b, &sd, &sh])
        );
        assert_eq!(
            reshare_user_data(&n, g, &b, &sd, &sh, &nd),
            h(&[b"keygate/v2/reshare-offer", &n, &g.to_be_bytes(), &b, &sd, &sh, &nd])
        );
        assert_eq!(genesis_user_data(b"shares"), h(&[b"keygate/v1/genesis", b"shares"]));
        assert_ne!(unseal_user_data(&n, g + 1, &b, &sd, &sh), unseal_user_data(&n, g, &b, &sd, &sh));
        // Two blobs of one generation (a fork) are two different offers.
        assert_ne!(unseal_user_data(&n, g, &[6; 48], &sd, &sh), unseal_user_data(&n, g, &b, &sd, &sh));
        assert_eq!(offer_user_data(&n, g, &b, &sd, &sh, None, false), unseal_user_data(&n, g, &b, &sd, &sh));
        assert_eq!(offer_user_data(&n, g, &b, &sd, &sh, Some(&nd), false), reshare_user_data(&n, g, &b, &sd, &sh, &nd));
        // A cold start is its own statement: a share for a plain unseal does not consent to it.
        assert_ne!(offer_user_data(&n, g, &b, &sd, &sh, None, true), unseal_user_data(&n, g, &b, &sd, &sh));
        let t = |blob: &[u8; 48]| {
            UnsealTranscript {
                kre_attestation_sha384: &[1; 48],
                unseal_nonce: &n,
                kre_public: &[2; 97],
                set_digest: &sd,
                generation: g,
                blob_sha384: blob,
                x: 1,
                custodian: &[3; 97],
                ephemeral: &[4; 97],
            }
            .hash()
        };
        assert_eq!(
            t(&b),
            h(&[b"keygate/v2/unseal", &[1; 48], &n, &[2; 97], &sd, &g.to_be_bytes(), &b, &[1], &[3; 97], &[4; 97]])
        );
        assert_ne!(t(&b), t(&[6; 48]));
    }

    #[test]
    fn audit_digests_are_domain_separated() {
        assert_eq!(entry_digest(b"e"), h(&[b"keygate/v1/audit-entry", b"e"]));
        assert_eq!(chain_id_of(b"p"), h(&[b"keygate/v1/audit-chain", b"p"]));
        assert_ne!(entry_digest(b"p"), chain_id_of(b"p"));
    }

    #[test]
    fn request_digest_binds_every_field() {
        let a = request_digest(&id("c"), &[id("k1"), id("k2")]);
        assert_ne!(a, request_digest(&id("d"), &[id("k1"), id("k2")]));
        assert_ne!(a, request_digest(&id("c"), &[id("k2"), id("k1")]));
        assert_ne!(a, request_digest(&id("c"), &[id("k1")]));
        // Length prefixes prevent ambiguity between ("ck", "1") and ("c", "k1").
        assert_ne!(request_digest(&id("ck"), &[id("1")]), request_digest(&id("c"), &[id("k1")]));
    }
}

/// HKDF info of the key a serving member encrypts the state key under for a joining member
/// (salt: [`JoinTranscript::hash`], ikm: ECDH of the two members' ephemeral keys).
pub const JOIN_STATE_KEY: &[u8] = b"keygate/v1/join-state-key";

/// `user_data` of a joining member's attestation: `SHA-384("keygate/v1/join-request" ‖
/// nonce ‖ J)`, with `J` its ephemeral P-384 key (also the document's `public_key`) and
/// `nonce` the join nonce (also the document's `nonce`).
pub fn join_request_user_data(nonce: &[u8; 32], joiner_public: &[u8]) -> [u8; 48] {
    sha384(&[b"keygate/v1/join-request", nonce, joiner_public])
}

/// What a forwarded state key is bound to (`docs/cluster.md`).
#[derive(Debug, Clone, Copy)]
pub struct JoinTranscript<'a> {
    /// SHA-384 of the joining member's attestation document.
    pub joiner_attestation_sha384: &'a [u8; 48],
    /// The joiner's nonce.
    pub nonce: &'a [u8; 32],
    /// The joiner's ephemeral key J.
    pub joiner_public: &'a [u8],
    /// The serving member's ephemeral key S.
    pub server_public: &'a [u8],
    /// The serving member's committed generation.
    pub generation: u64,
    /// SHA-384 of the blob of that generation.
    pub blob_sha384: &'a [u8; 48],
    /// The policy head that generation carries: its version (0: none).
    pub policy_version: u64,
    /// Its digest (zeros: none).
    pub policy_digest: &'a [u8; 48],
}

impl JoinTranscript<'_> {
    /// `SHA-384("keygate/v1/join" ‖ SHA-384(joiner_attestation) ‖ nonce ‖ J ‖ S ‖
    /// u64be(generation) ‖ blob_sha384 ‖ u64be(policy_version) ‖ policy_digest)`: the
    /// `user_data` of the serving member's attestation, and the HKDF salt and AEAD AAD of the
    /// forwarded state key.
    pub fn hash(&self) -> [u8; 48] {
        sha384(&[
            b"keygate/v1/join",
            self.joiner_attestation_sha384,
            self.nonce,
            self.joiner_public,
            self.server_public,
            &self.generation.to_be_bytes(),
            self.blob_sha384,
            &self.policy_version.to_be_bytes(),
            self.policy_digest,
        ])
    }
}

#[cfg(test)]
mod join_tests {
    use super::tests::h;
    use super::*;

    #[test]
    fn join_bindings_are_the_documented_hashes() {
        let (n, j, sp, b, d) = ([1u8; 32], [2u8; 97], [3u8; 97], [4u8; 48], [5u8; 48]);
        assert_eq!(join_request_user_data(&n, &j), h(&[b"keygate/v1/join-request", &n, &j]));
        let t = JoinTranscript {
            joiner_attestation_sha384: &[6; 48],
            nonce: &n,
            joiner_public: &j,
            server_public: &sp,
            generation: 7,
            blob_sha384: &b,
            policy_version: 8,
            policy_digest: &d,
        };
        assert_eq!(
            t.hash(),
            h(&[b"keygate/v1/join", &[6; 48], &n, &j, &sp, &7u64.to_be_bytes(), &b, &8u64.to_be_bytes(), &d])
        );
        assert_ne!(JoinTranscript { generation: 6, ..t }.hash(), t.hash());
        assert_ne!(join_request_user_data(&n, &j), unseal_user_data(&n, 0, &[0; 48], &[0; 48], &[0; 48]));
    }
}
