//! Fixed-point arithmetic for building the sampler's tables.
//!
//! The base tables of [`super::table`] hold probabilities to 2^-127, far finer than `f64`
//! (53 significant bits) can compute them. This module works with 192 fraction bits instead, so
//! that setup's own rounding (a few units of 2^-192 per operation, a few thousand operations per
//! table) stays below 2^-170, far under the tables' resolution. It only ever runs while a table
//! is built; nothing here is on the sampling path.

use std::cmp::Ordering;

/// Bits after the binary point.
const FRACTION_BITS: i32 = 192;

/// An unsigned number `n / 2^192`, with `n` a 256-bit integer in little-endian limbs: 64
/// integer bits and 192 fraction bits.
///
/// Every operation truncates (rounds toward zero), losing less than 2^-192. Overflow past 2^64
/// and negative results are programming errors at setup and panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fixed([u64; 4]);

impl Fixed {
    pub(super) const ZERO: Fixed = Fixed([0; 4]);

    /// The integer `n`.
    pub(super) const fn from_int(n: u64) -> Fixed {
        Fixed([0, 0, 0, n])
    }

    /// `x` rounded down to a multiple of 2^-192.
    ///
    /// # Panics
    /// If `x` is negative, not finite, or at least 2^64.
    pub(super) fn from_f64(x: f64) -> Fixed {
        assert!(
            x.is_finite() && (0.0..18_446_744_073_709_551_616.0).contains(&x),
            "fixed-point value out of range: {x}"
        );
        if x == 0.0 {
            return Fixed::ZERO;
        }

        // x = mantissa * 2^exponent exactly.
        let bits = x.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as i32;
        let fraction = bits & ((1 << 52) - 1);
        let (mantissa, exponent) = match biased {
            0 => (fraction, -1074),
            _ => (fraction | (1 << 52), biased - 1075),
        };

        // Place the mantissa's lowest bit at bit `shift` of the 256-bit integer.
        let shift = exponent + FRACTION_BITS;
        if shift < 0 {
            let mantissa = mantissa.checked_shr(shift.unsigned_abs()).unwrap_or(0);
            return Fixed([mantissa, 0, 0, 0]);
        }
        let (limb, offset) = ((shift / 64) as usize, (shift % 64) as u32);
        let mut limbs = [0; 4];
        limbs[limb] = mantissa << offset;
        if offset > 0 && limb + 1 < 4 {
            limbs[limb + 1] = mantissa >> (64 - offset);
        }
        Fixed(limbs)
    }

    /// The nearest `f64` below or at `self`, up to the rounding of each limb's conversion.
    pub(super) fn to_f64(self) -> f64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, &limb)| limb as f64 * 2_f64.powi(64 * i as i32 - FRACTION_BITS))
            .sum()
    }

    pub(super) fn add(self, rhs: Fixed) -> Fixed {
        let mut limbs = [0; 4];
        let mut carry = false;
        for (i, limb) in limbs.iter_mut().enumerate() {
            let (sum, overflow_a) = self.0[i].overflowing_add(rhs.0[i]);
            let (sum, overflow_b) = sum.overflowing_add(u64::from(carry));
            *limb = sum;
            carry = overflow_a || overflow_b;
        }
        assert!(!carry, "fixed-point addition overflowed");
        Fixed(limbs)
    }

    pub(super) fn sub(self, rhs: Fixed) -> Fixed {
        let mut limbs = [0; 4];
        let mut borrow = false;
        for (i, limb) in limbs.iter_mut().enumerate() {
            let (difference, underflow_a) = self.0[i].overflowing_sub(rhs.0[i]);
            let (difference, underflow_b) = difference.overflowing_sub(u64::from(borrow));
            *limb = difference;
            borrow = underflow_a || underflow_b;
        }
        assert!(!borrow, "fixed-point subtraction went negative");
        Fixed(limbs)
    }

    /// The product, truncated.
    pub(super) fn mul(self, rhs: Fixed) -> Fixed {
        // Schoolbook 256 x 256 -> 512 bits; the product of two numbers scaled by 2^192 is scaled
        // by 2^384, so the result is the middle four limbs.
        let mut wide = [0_u64; 8];
        for (i, &a) in self.0.iter().enumerate() {
            let mut carry = 0_u128;
            for (j, &b) in rhs.0.iter().enumerate() {
                let t = u128::from(a) * u128::from(b) + u128::from(wide[i + j]) + carry;
                wide[i + j] = t as u64;
                carry = t >> 64;
            }
            wide[i + 4] = carry as u64;
        }
        assert!(wide[7] == 0, "fixed-point multiplication overflowed");
        Fixed([wide[3], wide[4], wide[5], wide[6]])
    }

    /// The quotient by a positive integer, truncated.
    pub(super) fn div_int(self, divisor: u64) -> Fixed {
        assert!(divisor > 0, "fixed-point division by zero");
        let mut limbs = [0; 4];
        let mut remainder = 0_u128;
        for i in (0..4).rev() {
            let current = (remainder << 64) | u128::from(self.0[i]);
            limbs[i] = (current / u128::from(divisor)) as u64;
            remainder = current % u128::from(divisor);
        }
        Fixed(limbs)
    }

    /// `1 / self` by Newton's iteration `r <- r (2 - self r)` from an `f64` estimate.
    ///
    /// The estimate is good to about 2^-52 and each step squares the relative error, so four
    /// steps reach the 192-bit resolution; the result is within a few units of 2^-192 of the
    /// true reciprocal for the arguments used here (between 2^-64 and 2^20).
    pub(super) fn recip(self) -> Fixed {
        let mut r = Fixed::from_f64(1.0 / self.to_f64());
        for _ in 0..4 {
            let two_minus_error = Fixed::from_int(2).sub(self.mul(r));
            r = r.mul(two_minus_error);
        }
        r
    }

    /// `e^self` by its Taylor series, for `self` at most 1 (the series then converges in about
    /// 50 terms to the 192-bit resolution).
    pub(super) fn exp(self) -> Fixed {
        assert!(self <= Fixed::from_int(1), "exp argument above 1");
        let mut sum = Fixed::from_int(1);
        let mut term = Fixed::from_int(1);
        for n in 1.. {
            term = term.mul(self).div_int(n);
            if term == Fixed::ZERO {
                break;
            }
            sum = sum.add(term);
        }
        sum
    }

    /// `floor(self * 2^bits)`, for `bits` at most 192 and a result below 2^128.
    ///
    /// # Panics
    /// If the result does not fit in 128 bits.
    pub(super) fn floor_scaled(self, bits: u32) -> u128 {
        assert!(bits <= 192, "scale beyond the fraction bits");
        let shift = 192 - bits;
        let (whole, part) = ((shift / 64) as usize, shift % 64);
        let mut limbs = [0_u64; 4];
        for (i, limb) in limbs.iter_mut().enumerate() {
            let low = self.0.get(i + whole).copied().unwrap_or(0);
            let high = self.0.get(i + whole + 1).copied().unwrap_or(0);
            *limb = match part {
                0 => low,
                _ => (low >> part) | (high << (64 - part)),
            };
        }
        assert!(
            limbs[2] == 0 && limbs[3] == 0,
            "scaled value exceeds 128 bits"
        );
        u128::from(limbs[0]) | (u128::from(limbs[1]) << 64)
    }
}

impl PartialOrd for Fixed {
    fn partial_cmp(&self, other: &Fixed) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Fixed {
    fn cmp(&self, other: &Fixed) -> Ordering {
        self.0.iter().rev().cmp(other.0.iter().rev())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values: floor(x * 2^127), computed independently with 400-bit arithmetic.
    const EXP_MINUS_ONE: u128 = 0x2f16ac6c59de6f8d5d6f63c1482a7c86;
    const EXP_HALF_MINUS_ONE: u128 = 0x53094c70f034de4b96ff7d5b6f99fcd8;
    const ONE_THIRD: u128 = 0x2aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa;

    fn close(got: u128, expected: u128) -> bool {
        got.abs_diff(expected) <= 1
    }

    #[test]
    fn exponential_and_reciprocal_match_high_precision_references() {
        let e = Fixed::from_int(1).exp();
        assert!(close(e.recip().floor_scaled(127), EXP_MINUS_ONE));

        let half = Fixed::from_int(1).div_int(2);
        let exp_half_minus_one = half.exp().sub(Fixed::from_int(1));
        assert!(close(
            exp_half_minus_one.floor_scaled(127),
            EXP_HALF_MINUS_ONE
        ));

        assert!(close(
            Fixed::from_int(3).recip().floor_scaled(127),
            ONE_THIRD
        ));
        assert!(close(
            Fixed::from_int(1).div_int(3).floor_scaled(127),
            ONE_THIRD
        ));
    }

    #[test]
    fn conversions_from_f64_are_exact_for_dyadic_values() {
        assert_eq!(Fixed::from_f64(3.0), Fixed::from_int(3));
        assert_eq!(Fixed::from_f64(0.75).floor_scaled(2), 3, "0.75 = 3 / 4");
        assert_eq!(Fixed::from_f64(2_f64.powi(-192)).floor_scaled(192), 1);
        assert_eq!(Fixed::from_f64(2_f64.powi(-200)), Fixed::ZERO);
        assert_eq!(Fixed::from_f64(320.0).to_f64(), 320.0);
        let x = 0.1_f64;
        assert_eq!(Fixed::from_f64(x).to_f64(), x);
    }

    #[test]
    fn ordering_follows_the_value_not_the_limb_order() {
        let small = Fixed::from_f64(0.5);
        let large = Fixed::from_int(1);
        assert!(small < large);
        assert!(Fixed::from_f64(2_f64.powi(-150)) < Fixed::from_f64(2_f64.powi(-100)));
    }
}
