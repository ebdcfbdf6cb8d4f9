//! Shamir secret sharing (Shamir 1979, "How to share a secret") of 32-byte secrets.
//!
//! A secret is cut into five little-endian chunks (four of 7 bytes, one of 4), each below
//! `2^56` and so an element of the prime field `GF(2^61 - 1)`. Chunk `c` is the constant
//! term of a polynomial `f_c` of degree `t - 1` whose other coefficients are uniform field
//! elements (rejection-sampled from raw generator words); the share for evaluation point `x`
//! is `(x, f_0(x), ..., f_4(x))`. Any `t` shares give the secret back by Lagrange interpolation
//! at 0; `t - 1` or fewer are jointly uniform and say nothing about it.
//!
//! Interpolating too few shares does not fail by itself: it yields some other value. So
//! [`combine`] refuses fewer than `t` shares outright, and checks the result against a check
//! value the caller supplies (a commitment or a public key), so a reconstruction from wrong
//! or too few shares is an error, never a wrong secret.

use std::fmt;

use rand::CryptoRng;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::SecAggError;
use super::field::{self, P};
use super::messages::NodeId;

/// Field elements per secret.
pub const CHUNKS: usize = 5;

/// Bytes of an encoded [`Share`]: `x` then the five `y` values, little-endian `u64`s.
pub const SHARE_LEN: usize = 8 * (1 + CHUNKS);

/// Bytes of each chunk of the secret; the last takes the remaining 4.
const CHUNK_BYTES: usize = 7;

/// A 32-byte secret: a private key or a mask seed. Zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret([u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Secret {
    /// Wraps secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    /// 32 bytes from a cryptographically secure generator.
    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Secret {
        let mut bytes = [0; 32];
        rng.fill_bytes(&mut bytes);
        Secret(bytes)
    }

    /// The secret bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn chunks(&self) -> Zeroizing<[u64; CHUNKS]> {
        let mut chunks = Zeroizing::new([0; CHUNKS]);
        for (chunk, bytes) in chunks.iter_mut().zip(self.0.chunks(CHUNK_BYTES)) {
            let mut word = [0; 8];
            word[..bytes.len()].copy_from_slice(bytes);
            *chunk = u64::from_le_bytes(word);
            word.zeroize();
        }
        chunks
    }

    /// The secret whose chunks these are, if every chunk fits its width.
    fn from_chunks(chunks: &[u64; CHUNKS]) -> Option<Secret> {
        let mut secret = Secret([0; 32]);
        for (chunk, bytes) in chunks.iter().zip(secret.0.chunks_mut(CHUNK_BYTES)) {
            if *chunk >> (8 * bytes.len()) != 0 {
                return None;
            }
            bytes.copy_from_slice(&chunk.to_le_bytes()[..bytes.len()]);
        }
        Some(secret)
    }
}

/// One evaluation point of the sharing polynomials. Zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Share {
    x: u64,
    ys: [u64; CHUNKS],
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("x", &self.x)
            .field("ys", &"[redacted]")
            .finish()
    }
}

impl Share {
    /// The evaluation point.
    pub fn x(&self) -> u64 {
        self.x
    }

    /// `x` then the `y` values, as little-endian `u64`s ([`SHARE_LEN`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(SHARE_LEN);
        bytes.extend_from_slice(&self.x.to_le_bytes());
        for y in &self.ys {
            bytes.extend_from_slice(&y.to_le_bytes());
        }
        bytes
    }

    /// Decodes a share of `owner`'s secret from [`Share::to_bytes`]'s format.
    ///
    /// # Errors
    /// [`SecAggError::InvalidShare`] if the length is not [`SHARE_LEN`], `x` is zero or not a
    /// field element, or a `y` is not a field element.
    pub fn from_bytes(bytes: &[u8], owner: NodeId) -> Result<Share, SecAggError> {
        let invalid = |problem| SecAggError::InvalidShare { owner, problem };
        if bytes.len() != SHARE_LEN {
            return Err(invalid("wrong length"));
        }

        let mut words = bytes.chunks_exact(8).map(|w| {
            let mut word = [0; 8];
            word.copy_from_slice(w);
            u64::from_le_bytes(word)
        });
        // Six words exist: the length was checked above.
        let x = words.next().unwrap_or(0);
        if x == 0 || x >= P {
            return Err(invalid("evaluation point outside 1..p"));
        }
        let mut share = Share { x, ys: [0; CHUNKS] };
        for (y, word) in share.ys.iter_mut().zip(words) {
            if word >= P {
                return Err(invalid("value outside the field"));
            }
            *y = word;
        }
        Ok(share)
    }
}

/// Splits `secret` into one share per evaluation point of `xs`, any `threshold` of which
/// reconstruct it.
///
/// # Errors
/// [`SecAggError::InvalidConfig`] unless `1 <= threshold <= xs.len()` and the points are
/// distinct, non-zero field elements.
///
/// ```
/// use athanor_core::secagg::shamir::{combine, split, Secret};
/// use rand::SeedableRng;
///
/// let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
/// let secret = Secret::from_bytes([7; 32]);
/// let shares = split(&secret, 3, &[1, 2, 3, 4, 5], &mut rng)?;
/// let back = combine(&shares[2..], 3, |s| s.as_bytes() == &[7; 32])?;
/// assert_eq!(back, secret);
/// assert!(combine(&shares[..2], 3, |_| true).is_err());
/// # Ok::<(), athanor_core::secagg::SecAggError>(())
/// ```
pub fn split<R: CryptoRng + ?Sized>(
    secret: &Secret,
    threshold: usize,
    xs: &[u64],
    rng: &mut R,
) -> Result<Vec<Share>, SecAggError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(SecAggError::InvalidConfig {
            name: "threshold",
            expected: "between 1 and the number of shares",
            got: format!("{threshold} of {}", xs.len()),
        });
    }
    if !distinct_points(xs) {
        return Err(SecAggError::InvalidConfig {
            name: "share points",
            expected: "distinct non-zero field elements",
            got: format!("{xs:?}"),
        });
    }

    // Row c holds f_c's coefficients, constant term first.
    let chunks = secret.chunks();
    let mut coefficients = Zeroizing::new(vec![[0_u64; CHUNKS]; threshold]);
    coefficients[0] = *chunks;
    for row in coefficients.iter_mut().skip(1) {
        row.iter_mut().for_each(|c| *c = field::random(rng));
    }

    let shares = xs
        .iter()
        .map(|&x| {
            let mut share = Share { x, ys: [0; CHUNKS] };
            for (c, y) in share.ys.iter_mut().enumerate() {
                // Horner's rule from the highest coefficient down.
                *y = coefficients
                    .iter()
                    .rev()
                    .fold(0, |acc, row| field::add(field::mul(acc, x), row[c]));
            }
            share
        })
        .collect();
    Ok(shares)
}

/// Reconstructs a secret from at least `threshold` shares and checks it with `verify`.
///
/// Interpolates the first `threshold` shares at 0 with Lagrange's formula
/// `f(0) = sum_j y_j prod_{m != j} x_m / (x_m - x_j)`.
///
/// # Errors
/// [`SecAggError::TooFewShares`] with fewer than `threshold` shares (or a zero threshold),
/// [`SecAggError::Malformed`] if two of the shares used have the same point, and
/// [`SecAggError::ReconstructionMismatch`] if the interpolated value is not a secret
/// (a chunk too wide) or `verify` rejects it.
pub fn combine(
    shares: &[Share],
    threshold: usize,
    verify: impl FnOnce(&Secret) -> bool,
) -> Result<Secret, SecAggError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(SecAggError::TooFewShares {
            got: shares.len(),
            need: threshold.max(1),
        });
    }
    let shares = &shares[..threshold];
    let xs: Vec<u64> = shares.iter().map(Share::x).collect();
    if !distinct_points(&xs) {
        return Err(SecAggError::Malformed {
            what: "share set",
            problem: "two shares have the same evaluation point",
        });
    }

    let mut chunks = Zeroizing::new([0_u64; CHUNKS]);
    for (j, share) in shares.iter().enumerate() {
        let lagrange = lagrange_at_zero(&xs, j);
        for (chunk, y) in chunks.iter_mut().zip(&share.ys) {
            *chunk = field::add(*chunk, field::mul(*y, lagrange));
        }
    }

    let secret = Secret::from_chunks(&chunks).ok_or(SecAggError::ReconstructionMismatch)?;
    if !verify(&secret) {
        return Err(SecAggError::ReconstructionMismatch);
    }
    Ok(secret)
}

/// `prod_{m != j} x_m / (x_m - x_j)`.
fn lagrange_at_zero(xs: &[u64], j: usize) -> u64 {
    let mut numerator = 1;
    let mut denominator = 1;
    for (m, &x) in xs.iter().enumerate() {
        if m != j {
            numerator = field::mul(numerator, x);
            denominator = field::mul(denominator, field::sub(x, xs[j]));
        }
    }
    field::mul(numerator, field::inverse(denominator))
}

fn distinct_points(xs: &[u64]) -> bool {
    let mut sorted = xs.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).all(|w| w[0] != w[1]) && sorted.iter().all(|&x| x != 0 && x < P)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn any_threshold_subset_reconstructs() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let secret = Secret::random(&mut rng);
        let shares = split(&secret, 4, &[1, 2, 3, 4, 5, 6, 7], &mut rng).unwrap();
        for start in 0..4 {
            let subset = &shares[start..start + 4];
            let back = combine(subset, 4, |s| s == &secret).unwrap();
            assert_eq!(back, secret);
        }
    }

    #[test]
    fn share_bytes_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let shares = split(&Secret::random(&mut rng), 2, &[9, 10], &mut rng).unwrap();
        let bytes = shares[0].to_bytes();
        assert_eq!(Share::from_bytes(&bytes, NodeId(1)).unwrap(), shares[0]);
    }

    #[test]
    fn duplicate_points_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let secret = Secret::random(&mut rng);
        assert!(split(&secret, 2, &[3, 3], &mut rng).is_err());
        let shares = split(&secret, 2, &[3, 4], &mut rng).unwrap();
        let twice = [shares[0].clone(), shares[0].clone()];
        assert!(matches!(
            combine(&twice, 2, |_| true),
            Err(SecAggError::Malformed { .. })
        ));
    }
}
