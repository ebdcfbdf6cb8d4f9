//! Arithmetic in the prime field `GF(p)`, `p = 2^61 - 1`, for Shamir sharing.
//!
//! A Mersenne prime makes reduction two shifts and adds: for `x < 2^122`,
//! `x = hi 2^61 + lo = hi + lo (mod p)`. Elements are `u64` values below `p`.

use rand::CryptoRng;

/// `p = 2^61 - 1`.
pub const P: u64 = (1 << 61) - 1;

/// `a + b mod p`, for `a, b < p`.
pub fn add(a: u64, b: u64) -> u64 {
    let sum = a + b;
    if sum >= P { sum - P } else { sum }
}

/// `a - b mod p`, for `a, b < p`.
pub fn sub(a: u64, b: u64) -> u64 {
    add(a, P - b)
}

/// `a * b mod p`, for `a, b < p`.
pub fn mul(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);

    // product < 2^122: the first fold is below 2^62, the second below p + 2.
    let folded = (product as u64 & P) + (product >> 61) as u64;
    let folded = (folded & P) + (folded >> 61);
    if folded >= P { folded - P } else { folded }
}

/// `a^-1 mod p` by Fermat's little theorem, `a^(p-2)`. `inverse(0)` is 0; callers never ask.
pub fn inverse(a: u64) -> u64 {
    let mut result = 1;
    let mut base = a;
    let mut exponent = P - 2;
    while exponent > 0 {
        if exponent & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        exponent >>= 1;
    }
    result
}

/// A uniformly random element: 61 random bits, redrawn in the one case (all ones) that is
/// not below `p`.
pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let candidate = rng.next_u64() >> 3;
        if candidate < P {
            return candidate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplication_matches_u128_reference() {
        let cases = [
            (0, 5),
            (1, P - 1),
            (P - 1, P - 1),
            (1 << 60, 3),
            (123_456_789, 987_654_321),
        ];
        for (a, b) in cases {
            let expected = (u128::from(a) * u128::from(b) % u128::from(P)) as u64;
            assert_eq!(mul(a, b), expected, "{a} * {b}");
        }
    }

    #[test]
    fn inverse_inverts() {
        for a in [1, 2, 3, P - 1, 1 << 40, 0x1234_5678_9abc] {
            assert_eq!(mul(a, inverse(a)), 1, "{a}");
        }
    }

    #[test]
    fn subtraction_wraps() {
        assert_eq!(sub(0, 1), P - 1);
        assert_eq!(add(P - 1, 1), 0);
    }
}
