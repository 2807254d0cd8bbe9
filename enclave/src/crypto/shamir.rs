//! Shamir secret sharing of a 32-byte secret (the KRE's state key) over GF(2^8).
//!
//! What this module decides: how the state key is split into `N` shares of which any `M`
//! reconstruct it, and which share sets are refused. It trusts nothing: shares are checked
//! for shape (x ≠ 0, distinct x, enough of them), not for authenticity — that is the job of
//! the custodian envelopes ([`crate::state::custody`]) and, in the end, of the AEAD of the sealed
//! state ([`crate::state::sealed`]): a wrong share yields a wrong key, and a wrong key fails to open
//! the state.
//!
//! ```text
//! field     GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1 (0x11b)
//! split     for each byte i of the secret, f_i(x) = s_i + a_{1,i} x + … + a_{M-1,i} x^{M-1},
//!           the coefficients drawn in one call of the caller's RNG (coefficient j, byte i at
//!           offset (j-1)·32 + i); share k (k = 1..=N) is (x = k, y_i = f_i(k))
//! combine   s_i = Σ_k y_{k,i} · Π_{j≠k} x_j / (x_j + x_k)   (Lagrange at 0, over the first M shares)
//! ```
//!
//! Arithmetic is branch-free and table-free on secret values: multiplication is
//! shift-and-xor with masks, inversion is `a^254` by a fixed chain of multiplications (the
//! inverted values here are only the public x coordinates, but the same code serves both).
//! Every intermediate holding secret material (coefficients, accumulators) is zeroized.
//!
//! Why hand-written: the well-kept Rust crate for this, `vsss-rs` (audited, v6), is generic
//! over its own field/group traits and rand 0.10 RNGs while the workspace is on rand_core 0.6
//! and an injected `FnMut(&mut [u8])` fill; it would bring a second elliptic-curve stack into
//! the enclave image for ~100 lines of arithmetic, and its share types are not the
//! project's zeroizing, redacted [`Secret`]. Smaller crates (`sharks`, `shamirsecretsharing`)
//! are unmaintained or use log/exp tables indexed by secret bytes. The code below is small
//! enough to review in full and is tested against hand-derived vectors and by property.

use keygate_attestation::secret::Secret;
use zeroize::Zeroizing;

/// Length of the shared secret (and of each share's `y`).
pub const SECRET_LEN: usize = 32;

/// One share: the point `x` (1..=255, public) and the 32 polynomial values at `x` (secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The evaluation point, never 0 (0 is the secret itself).
    pub x: u8,
    /// The 32 values `f_i(x)`; secret, zeroized on drop, redacted in `Debug`.
    pub y: Secret<SECRET_LEN>,
}

/// Why a split or a combination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    /// A threshold of 0 shares protects nothing.
    #[error("threshold must be at least 1")]
    ZeroThreshold,
    /// More shares required than there are.
    #[error("threshold {threshold} exceeds the number of shares {shares}")]
    ThresholdAboveShares {
        /// Required shares.
        threshold: u8,
        /// Shares made.
        shares: u8,
    },
    /// A share with `x = 0` would be the secret itself; never valid.
    #[error("share with x = 0")]
    ZeroX,
    /// Two shares with the same `x`.
    #[error("duplicate share x = {x}")]
    DuplicateX {
        /// The repeated point.
        x: u8,
    },
    /// Fewer shares than the threshold.
    #[error("{got} shares given, {threshold} needed")]
    TooFewShares {
        /// Shares given.
        got: usize,
        /// Shares needed.
        threshold: u8,
    },
}

/// `a · b` in GF(2^8) mod 0x11b, without branches or tables.
pub(crate) fn gf_mul(a: u8, b: u8) -> u8 {
    let mut a = a;
    let mut b = b;
    let mut p = 0u8;
    for _ in 0..8 {
        // mask = 0xff if the low bit of b is set, else 0x00.
        p ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// `a^-1 = a^254` in GF(2^8) (0 maps to 0), by a fixed sequence of multiplications.
pub(crate) fn gf_inv(a: u8) -> u8 {
    // 254 = 2 + 4 + … + 128: square seven times, multiplying each square in.
    let mut sq = a;
    let mut r = 1u8;
    for _ in 0..7 {
        sq = gf_mul(sq, sq);
        r = gf_mul(r, sq);
    }
    r
}

/// Splits `secret` into `shares` shares of which any `threshold` reconstruct it. `rng` fills
/// the random coefficients (one call of `(threshold - 1) · 32` bytes).
pub fn split(
    secret: &Secret<SECRET_LEN>,
    threshold: u8,
    shares: u8,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::ZeroThreshold);
    }
    if threshold > shares {
        return Err(ShamirError::ThresholdAboveShares { threshold, shares });
    }
    let degree = usize::from(threshold - 1);
    // coeffs[0..32] = the secret, then coefficient j at [j·32 .. (j+1)·32].
    let mut coeffs = Zeroizing::new(vec![0u8; (degree + 1) * SECRET_LEN]);
    coeffs[..SECRET_LEN].copy_from_slice(secret.expose());
    rng(&mut coeffs[SECRET_LEN..]);
    let mut out = Vec::with_capacity(usize::from(shares));
    for x in 1..=shares {
        let mut y = Zeroizing::new([0u8; SECRET_LEN]);
        for (i, yi) in y.iter_mut().enumerate() {
            // Horner: ((a_d x + a_{d-1}) x + …) x + a_0.
            let mut acc = 0u8;
            for j in (0..=degree).rev() {
                acc = gf_mul(acc, x) ^ coeffs[j * SECRET_LEN + i];
            }
            *yi = acc;
        }
        out.push(Share { x, y: Secret::new(*y) });
    }
    Ok(out)
}

/// Reconstructs the secret from at least `threshold` shares (the first `threshold` are used;
/// all are checked for `x ≠ 0` and distinct `x`).
///
/// A share set that is well formed but wrong (a share of another split, a corrupted share)
/// yields a wrong secret: authenticity is checked by the caller (AEAD of the sealed state).
pub fn combine(shares: &[Share], threshold: u8) -> Result<Secret<SECRET_LEN>, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::ZeroThreshold);
    }
    if shares.len() < usize::from(threshold) {
        return Err(ShamirError::TooFewShares { got: shares.len(), threshold });
    }
    let mut seen = [false; 256];
    for s in shares {
        if s.x == 0 {
            return Err(ShamirError::ZeroX);
        }
        let slot = &mut seen[usize::from(s.x)];
        if *slot {
            return Err(ShamirError::DuplicateX { x: s.x });
        }
        *slot = true;
    }
    let used = &shares[..usize::from(threshold)];
    let mut acc = Zeroizing::new([0u8; SECRET_LEN]);
    for (k, sk) in used.iter().enumerate() {
        // Lagrange basis at 0 (public: depends only on the x coordinates).
        let mut num = 1u8;
        let mut den = 1u8;
        for (j, sj) in used.iter().enumerate() {
            if j != k {
                num = gf_mul(num, sj.x);
                den = gf_mul(den, sj.x ^ sk.x);
            }
        }
        let l = gf_mul(num, gf_inv(den));
        for (a, y) in acc.iter_mut().zip(sk.y.expose()) {
            *a ^= gf_mul(*y, l);
        }
    }
    Ok(Secret::new(*acc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::test_rng;
    use proptest::prelude::*;

    fn secret(seed: u8) -> Secret<32> {
        let mut rng = test_rng(seed);
        Secret::generate(|b| rng(b))
    }

    /// Every subset of `items` of size `k`.
    fn subsets<T: Clone>(items: &[T], k: usize) -> Vec<Vec<T>> {
        if k == 0 {
            return vec![vec![]];
        }
        if items.len() < k {
            return vec![];
        }
        let mut with: Vec<Vec<T>> = subsets(&items[1..], k - 1)
            .into_iter()
            .map(|mut s| {
                s.insert(0, items[0].clone());
                s
            })
            .collect();
        with.extend(subsets(&items[1..], k));
        with
    }

    #[test]
    fn field_known_answers() {
        // FIPS-197 §4.2: {57}·{83} = {c1}, {57}·{13} = {fe}; §5.1.1: {53}^-1 = {ca}.
        assert_eq!(gf_mul(0x57, 0x83), 0xc1);
        assert_eq!(gf_mul(0x57, 0x13), 0xfe);
        assert_eq!(gf_mul(0x53, 0xca), 0x01);
        assert_eq!(gf_inv(0x53), 0xca);
        assert_eq!(gf_inv(0x01), 0x01);
        assert_eq!(gf_inv(0x00), 0x00);
    }

    #[test]
    fn field_axioms_exhaustively() {
        for a in 0..=255u8 {
            assert_eq!(gf_mul(a, 1), a);
            assert_eq!(gf_mul(a, 0), 0);
            if a != 0 {
                assert_eq!(gf_mul(a, gf_inv(a)), 1, "inverse of {a:#04x}");
            }
            for b in 0..=255u8 {
                assert_eq!(gf_mul(a, b), gf_mul(b, a));
            }
        }
        // Distributivity on a sample.
        for (a, b, c) in [(0x57u8, 0x83u8, 0x13u8), (0xff, 0x02, 0x80), (0x1b, 0xaa, 0x55)] {
            assert_eq!(gf_mul(a, b ^ c), gf_mul(a, b) ^ gf_mul(a, c));
        }
    }

    #[test]
    fn known_answer_two_of_three() {
        // Secret bytes all 0x53, a_1 bytes all 0xca. By hand:
        //   {ca}·2 = {194} mod {11b} = {8f};  {ca}·3 = {8f} ^ {ca} = {45}
        //   y(1) = 53 ^ ca = 99;  y(2) = 53 ^ 8f = dc;  y(3) = 53 ^ 45 = 16.
        let s = Secret::new([0x53; 32]);
        let shares = split(&s, 2, 3, &mut |b: &mut [u8]| b.fill(0xca)).expect("split");
        let ys: Vec<u8> = shares.iter().map(|s| s.y.expose()[0]).collect();
        assert_eq!(ys, [0x99, 0xdc, 0x16]);
        assert!(shares.iter().all(|s| s.y.expose().iter().all(|b| *b == s.y.expose()[0])));
        assert_eq!(shares.iter().map(|s| s.x).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(combine(&shares[1..], 2).expect("combine"), s);
    }

    #[test]
    fn known_answer_three_of_three() {
        // f(x) = 01 + 02·x + 03·x^2 (every byte). By hand:
        //   f(1) = 01 ^ 02 ^ 03 = 00
        //   f(2) = 01 ^ 04 ^ 03·04 = 01 ^ 04 ^ 0c = 09
        //   f(3) = 01 ^ 02·03 ^ 03·(03·03) = 01 ^ 06 ^ 03·05 = 01 ^ 06 ^ 0f = 08
        let s = Secret::new([0x01; 32]);
        let mut rng = |b: &mut [u8]| {
            b[..32].fill(0x02);
            b[32..].fill(0x03);
        };
        let shares = split(&s, 3, 3, &mut rng).expect("split");
        let ys: Vec<u8> = shares.iter().map(|s| s.y.expose()[31]).collect();
        assert_eq!(ys, [0x00, 0x09, 0x08]);
        assert_eq!(combine(&shares, 3).expect("combine"), s);
        // Hand-made shares, in any order, give the secret back.
        let hand = [(3u8, 0x08u8), (1, 0x00), (2, 0x09)].map(|(x, y)| Share { x, y: Secret::new([y; 32]) });
        assert_eq!(combine(&hand, 3).expect("combine"), s);
    }

    #[test]
    fn every_subset_of_a_three_of_five_split_reconstructs() {
        let s = secret(7);
        let shares = split(&s, 3, 5, &mut test_rng(1)).expect("split");
        let sets = subsets(&shares, 3);
        assert_eq!(sets.len(), 10);
        for set in &sets {
            assert_eq!(combine(set, 3).expect("combine"), s);
            // Order does not matter.
            let rev: Vec<Share> = set.iter().rev().cloned().collect();
            assert_eq!(combine(&rev, 3).expect("combine"), s);
        }
        // Four and five shares also reconstruct.
        for set in subsets(&shares, 4).iter().chain(subsets(&shares, 5).iter()) {
            assert_eq!(combine(set, 3).expect("combine"), s);
        }
    }

    #[test]
    fn fewer_than_threshold_shares_do_not_give_the_secret() {
        let s = secret(9);
        let shares = split(&s, 3, 5, &mut test_rng(2)).expect("split");
        for set in subsets(&shares, 2) {
            assert_eq!(combine(&set, 3), Err(ShamirError::TooFewShares { got: 2, threshold: 3 }));
            // Interpolating 2 shares as if the threshold were 2 gives some other value.
            assert_ne!(combine(&set, 2).expect("combine"), s);
        }
    }

    #[test]
    fn threshold_one_and_full_size_splits() {
        let s = secret(3);
        let one = split(&s, 1, 4, &mut test_rng(0)).expect("split");
        assert!(one.iter().all(|sh| sh.y == s));
        let big = split(&s, 255, 255, &mut test_rng(5)).expect("split");
        assert_eq!(big.len(), 255);
        assert_eq!(big.last().map(|s| s.x), Some(255));
        assert_eq!(combine(&big, 255).expect("combine"), s);
    }

    #[test]
    fn refused_parameters_and_share_sets() {
        let s = secret(4);
        let mut rng = test_rng(0);
        assert_eq!(split(&s, 0, 3, &mut rng), Err(ShamirError::ZeroThreshold));
        assert_eq!(split(&s, 4, 3, &mut rng), Err(ShamirError::ThresholdAboveShares { threshold: 4, shares: 3 }));
        assert_eq!(split(&s, 1, 0, &mut rng), Err(ShamirError::ThresholdAboveShares { threshold: 1, shares: 0 }));
        let shares = split(&s, 2, 3, &mut rng).expect("split");
        assert_eq!(combine(&shares, 0), Err(ShamirError::ZeroThreshold));
        assert_eq!(combine(&[], 1), Err(ShamirError::TooFewShares { got: 0, threshold: 1 }));
        let dup = [shares[0].clone(), shares[0].clone()];
        assert_eq!(combine(&dup, 2), Err(ShamirError::DuplicateX { x: 1 }));
        // A duplicate beyond the first `threshold` shares is refused too.
        let dup_late = [shares[0].clone(), shares[1].clone(), shares[1].clone()];
        assert_eq!(combine(&dup_late, 2), Err(ShamirError::DuplicateX { x: 2 }));
        let zero = [Share { x: 0, y: shares[0].y.clone() }, shares[1].clone()];
        assert_eq!(combine(&zero, 2), Err(ShamirError::ZeroX));
    }

    #[test]
    fn a_corrupted_share_gives_a_different_secret() {
        let s = secret(6);
        let mut shares = split(&s, 2, 2, &mut test_rng(8)).expect("split");
        let mut y = *shares[1].y.expose();
        y[17] ^= 0x01;
        shares[1].y = Secret::new(y);
        assert_ne!(combine(&shares, 2).expect("combine"), s);
    }

    #[test]
    fn debug_does_not_show_the_share() {
        let share = Share { x: 7, y: Secret::new([0xab; 32]) };
        let d = format!("{share:?}");
        assert!(d.contains("redacted") && d.contains('7'));
        assert!(!d.contains("171") && !d.to_lowercase().contains("ab, "));
    }

    proptest! {
        #[test]
        fn any_threshold_subset_reconstructs(
            secret_bytes in proptest::array::uniform32(any::<u8>()),
            (n, t) in (1u8..=12).prop_flat_map(|n| (Just(n), 1..=n)),
            seed in any::<u8>(),
            pick_seed in any::<u64>(),
        ) {
            let s = Secret::new(secret_bytes);
            let shares = split(&s, t, n, &mut test_rng(seed)).expect("split");
            prop_assert_eq!(shares.len(), usize::from(n));
            // A pseudo-random subset of size t, in a pseudo-random order.
            let mut pool = shares.clone();
            let mut picked = Vec::new();
            let mut r = pick_seed;
            for _ in 0..t {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let i = usize::try_from(r >> 33).unwrap_or(0) % pool.len();
                picked.push(pool.swap_remove(i));
            }
            prop_assert_eq!(combine(&picked, t).expect("combine"), s.clone());
            if t > 1 {
                prop_assert_ne!(combine(&picked[1..], t - 1).expect("combine"), s);
            }
        }
    }
}
