//! PCR measurement, as the Nitro hypervisor and AWS's `eif_hasher` compute it.
//!
//! Every PCR starts as 48 zero bytes and is extended once:
//! `PCR = SHA-384(0^48 || SHA-384(measured bytes))`. The measured bytes are the
//! concatenation of section *data* (no section headers) in file order:
//!
//! | PCR | measured bytes |
//! |---|---|
//! | 0 | kernel ‖ cmdline ‖ every ramdisk |
//! | 1 | kernel ‖ cmdline ‖ first ramdisk |
//! | 2 | second and later ramdisks (SHA-384 of nothing if there is only one) |
//! | 8 | DER of the signing certificate (signed images only) |
//!
//! AWS's `EifHasher` is used "without cache" by both `eif_build` and nitro-cli, which
//! makes it a plain streaming SHA-384, so this module is one too.

use sha2::{Digest, Sha384};

/// Length of a SHA-384 PCR value.
pub const PCR_LEN: usize = 48;

/// A streaming PCR computation: feed bytes, then extend a zero PCR with their digest.
#[derive(Clone, Debug, Default)]
pub struct PcrHasher(Sha384);

impl PcrHasher {
    /// A hasher over no bytes yet.
    pub fn new() -> Self {
        PcrHasher(Sha384::new())
    }

    /// Feed measured bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// `SHA-384(0^48 || SHA-384(all bytes fed))`.
    pub fn finish(self) -> [u8; PCR_LEN] {
        extend_zero(&self.0.finalize())
    }
}

/// Extend an all-zero PCR with `digest`.
fn extend_zero(digest: &[u8]) -> [u8; PCR_LEN] {
    let mut h = Sha384::new();
    h.update([0u8; PCR_LEN]);
    h.update(digest);
    let out = h.finalize();
    let mut pcr = [0u8; PCR_LEN];
    pcr.copy_from_slice(&out);
    pcr
}

/// PCR8 for a signing certificate given as DER: the value `nitro-cli pcr
/// --signing-certificate` prints and a signed enclave reports.
pub fn pcr8_from_certificate_der(der: &[u8]) -> [u8; PCR_LEN] {
    let mut h = PcrHasher::new();
    h.update(der);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_of_nothing_is_the_extend_of_the_empty_digest() {
        // SHA-384("") extended into a zero PCR, computed independently.
        let empty = Sha384::digest(b"");
        let mut h = Sha384::new();
        h.update([0u8; 48]);
        h.update(empty);
        assert_eq!(&PcrHasher::new().finish()[..], &h.finalize()[..]);
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i.to_le_bytes()[0] ^ 0x5a).collect();
        let mut one = PcrHasher::new();
        one.update(&data);
        let mut many = PcrHasher::new();
        for chunk in data.chunks(777) {
            many.update(chunk);
        }
        assert_eq!(one.finish(), many.finish());
    }
}
