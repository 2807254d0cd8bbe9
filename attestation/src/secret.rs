//! Secret bytes: zeroized on drop, redacted in `Debug`, no `Display`, no `Serialize`, one
//! greppable accessor (`expose`), constant-time equality.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A fixed-size secret (keys, shared secrets, seeds).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret<const N: usize>([u8; N]);

impl<const N: usize> Secret<N> {
    /// Wraps `bytes`; the caller's copy should be zeroized by the caller.
    pub fn new(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    /// Copies from a slice of exactly `N` bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut s = Self([0u8; N]);
        if bytes.len() != N {
            return None;
        }
        s.0.copy_from_slice(bytes);
        Some(s)
    }

    /// A secret filled by `fill` (e.g. an RNG).
    pub fn generate(fill: impl FnOnce(&mut [u8])) -> Self {
        let mut s = Self([0u8; N]);
        fill(&mut s.0);
        s
    }

    /// The secret bytes. Every read of a secret goes through here.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret<{N}>(redacted)")
    }
}

impl<const N: usize> PartialEq for Secret<N> {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl<const N: usize> Eq for Secret<N> {}

/// A variable-length secret (decrypted plaintexts).
#[derive(Clone, Default)]
pub struct SecretVec(Zeroizing<Vec<u8>>);

impl SecretVec {
    /// Wraps `v`.
    pub fn new(v: Vec<u8>) -> Self {
        Self(Zeroizing::new(v))
    }
    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretVec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretVec({} bytes, redacted)", self.0.len())
    }
}

impl PartialEq for SecretVec {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }
}
impl Eq for SecretVec {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new([0x41u8; 32]);
        assert_eq!(format!("{s:?}"), "Secret<32>(redacted)");
        let v = SecretVec::new(vec![0x41; 5]);
        assert!(!format!("{v:?}").contains("65"));
        assert!(!format!("{v:?}").contains('A'));
    }

    #[test]
    fn equality_and_from_slice() {
        assert_eq!(Secret::<4>::from_slice(&[1, 2, 3, 4]), Some(Secret::new([1, 2, 3, 4])));
        assert!(Secret::<4>::from_slice(&[1, 2, 3]).is_none());
        assert_ne!(Secret::new([1u8; 4]), Secret::new([2u8; 4]));
    }
}
