//! The ring `Z_{2^b}` in which masked vectors live and are summed.
//!
//! Elements are stored in `u32` with `1 <= b <= 32`. Because `2^b` divides `2^32`, wrapping
//! `u32` arithmetic followed by keeping the low `b` bits is arithmetic modulo `2^b`; masks and
//! sums can therefore be accumulated with plain wrapping adds and reduced once at the end.

use serde::{Deserialize, Serialize};

use super::SecAggError;

/// Elements summed per range check in [`Ring::accumulate`]: 8 KiB, so a chunk is still in the
/// L1 cache when it is added.
const ACCUMULATE_CHUNK: usize = 2048;

/// `Z_{2^bits}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    bits: u32,
}

impl Ring {
    /// The ring of `bits`-bit integers.
    ///
    /// # Errors
    /// [`SecAggError::InvalidConfig`] unless `1 <= bits <= 32`.
    pub fn new(bits: u32) -> Result<Ring, SecAggError> {
        if !(1..=32).contains(&bits) {
            return Err(SecAggError::InvalidConfig {
                name: "ring_bits",
                expected: "1 to 32",
                got: bits.to_string(),
            });
        }
        Ok(Ring { bits })
    }

    /// `b`.
    pub fn bits(self) -> u32 {
        self.bits
    }

    /// `2^b - 1`: the bits an element may have set.
    pub fn mask(self) -> u32 {
        u32::MAX >> (32 - self.bits)
    }

    /// Checks that every value is an element of the ring.
    ///
    /// # Errors
    /// [`SecAggError::OutsideRing`] for the first value at or above `2^b`.
    pub fn check(self, values: &[u32]) -> Result<(), SecAggError> {
        let high = !self.mask();
        match values.iter().position(|v| v & high != 0) {
            None => Ok(()),
            Some(index) => Err(SecAggError::OutsideRing {
                index,
                value: values[index],
                bits: self.bits,
            }),
        }
    }

    /// Reduces every value modulo `2^b`.
    pub fn reduce(self, values: &mut [u32]) {
        let mask = self.mask();
        values.iter_mut().for_each(|v| *v &= mask);
    }

    /// `acc += values` in the ring, after checking that every value is a ring element; on an
    /// error `acc` is left as it was. `acc` must already hold ring elements.
    ///
    /// # Errors
    /// [`SecAggError::BadLength`] if the lengths differ, [`SecAggError::OutsideRing`] for the
    /// first value at or above `2^b`.
    pub fn accumulate(self, acc: &mut [u32], values: &[u32]) -> Result<(), SecAggError> {
        if acc.len() != values.len() {
            return Err(SecAggError::BadLength {
                what: "ring vector",
                expected: acc.len(),
                got: values.len(),
            });
        }

        // Check and add one cache-sized chunk at a time, so each chunk is read from memory
        // once; a bad chunk undoes the chunks already added.
        let mask = self.mask();
        let high = !mask;
        let chunks = acc
            .chunks_mut(ACCUMULATE_CHUNK)
            .zip(values.chunks(ACCUMULATE_CHUNK));
        for (done, (acc_chunk, chunk)) in chunks.enumerate() {
            let or = chunk.iter().fold(0, |or, v| or | v);
            if or & high != 0 {
                let added = done * ACCUMULATE_CHUNK;
                for (a, v) in acc[..added].iter_mut().zip(&values[..added]) {
                    *a = a.wrapping_sub(*v) & mask;
                }
                return self.check(values);
            }
            for (a, v) in acc_chunk.iter_mut().zip(chunk) {
                *a = a.wrapping_add(*v) & mask;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_wraps_modulo_the_ring() {
        let ring = Ring::new(4).unwrap();
        let mut acc = vec![15, 3];
        ring.accumulate(&mut acc, &[2, 15]).unwrap();
        assert_eq!(acc, vec![1, 2]);
    }

    #[test]
    fn accumulate_leaves_the_sum_untouched_on_a_bad_value() {
        let ring = Ring::new(8).unwrap();
        let mut acc = vec![7; 5000];
        let mut values = vec![1; 5000];
        values[4500] = 256;
        let err = ring.accumulate(&mut acc, &values).unwrap_err();
        assert_eq!(
            err,
            SecAggError::OutsideRing {
                index: 4500,
                value: 256,
                bits: 8
            }
        );
        assert!(acc.iter().all(|&a| a == 7));
    }

    #[test]
    fn full_width_ring_has_all_bits() {
        assert_eq!(Ring::new(32).unwrap().mask(), u32::MAX);
        assert!(Ring::new(0).is_err());
        assert!(Ring::new(33).is_err());
    }
}
