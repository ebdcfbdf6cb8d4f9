//! The mask generator: ChaCha20 keystream words added to or subtracted from a vector.
//!
//! Word `k` of the stream for a 32-byte seed is the little-endian `u32` at bytes `4k..4k+4`
//! of the ChaCha20 keystream with that key, a zero nonce and a block counter starting at
//! zero (as `rand_chacha::ChaCha20Rng::from_seed` produces it). Words are taken raw and reduced
//! into the ring by keeping their low `b` bits, which preserves uniformity because `2^b`
//! divides `2^32`. No range-sampling helper is involved: their output may change between
//! versions of `rand`, and every node and the coordinator must expand a seed identically.
//! The tests pin the first words for fixed seeds so an upgrade that changes them is caught.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use zeroize::{Zeroize, Zeroizing};

/// Words generated per stream before moving to the next: 4 KiB, so the slice of the target
/// being masked stays in the L1 cache while every stream is applied to it.
const BLOCK_WORDS: usize = 1024;

/// Whether a stream is added to or subtracted from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// `target += stream`.
    Add,
    /// `target -= stream`.
    Subtract,
}

/// The first `count` words of the mask stream for `seed` (not reduced into any ring).
///
/// ```
/// use athanor_core::secagg::mask::keystream_words;
///
/// // ChaCha20 with an all-zero key and nonce: the first keystream bytes are 76 b8 e0 ad ...
/// assert_eq!(keystream_words(&[0; 32], 1), vec![0xade0_b876]);
/// ```
pub fn keystream_words(seed: &[u8; 32], count: usize) -> Vec<u32> {
    let mut target = vec![0; count];
    let mut streams = MaskStreams::default();
    streams.push(seed, Sign::Add);
    streams.apply(&mut target);
    target
}

/// Least number of elements per thread worth starting a thread for.
const MIN_WORDS_PER_THREAD: usize = 1 << 16;

/// A set of mask streams to apply to one vector together. Seeds are zeroized on drop.
#[derive(Default)]
pub struct MaskStreams {
    streams: Vec<(Zeroizing<[u8; 32]>, Sign)>,
}

impl std::fmt::Debug for MaskStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskStreams")
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl MaskStreams {
    /// Adds the stream of `seed` with the given sign.
    pub fn push(&mut self, seed: &[u8; 32], sign: Sign) {
        self.streams.push((Zeroizing::new(*seed), sign));
    }

    /// Number of streams.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether there are no streams.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// `target[k] ±= word k of each stream`, wrapping modulo `2^32` (callers reduce into
    /// their ring afterwards). Long vectors are split among the available cores; each thread
    /// starts every stream at its slice's offset, so the result does not depend on the split.
    pub fn apply(self, target: &mut [u32]) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.min(target.len() / MIN_WORDS_PER_THREAD).max(1);
        self.apply_with_threads(target, threads);
    }

    fn apply_with_threads(self, target: &mut [u32], threads: usize) {
        if threads <= 1 {
            apply_slice(&self.streams, target, 0);
            return;
        }
        let per_thread = target.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (index, slice) in target.chunks_mut(per_thread).enumerate() {
                let streams = &self.streams;
                scope.spawn(move || apply_slice(streams, slice, index * per_thread));
            }
        });
    }
}

/// Applies every stream to `target`, which starts at word `offset` of the streams.
fn apply_slice(streams: &[(Zeroizing<[u8; 32]>, Sign)], target: &mut [u32], offset: usize) {
    let mut generators: Vec<(ChaCha20Rng, Sign)> = streams
        .iter()
        .map(|(seed, sign)| {
            let mut rng = ChaCha20Rng::from_seed(**seed);
            rng.set_word_pos(offset as u128);
            (rng, *sign)
        })
        .collect();

    let mut bytes = [0_u8; BLOCK_WORDS * 4];
    for block in target.chunks_mut(BLOCK_WORDS) {
        for (rng, sign) in &mut generators {
            let bytes = &mut bytes[..block.len() * 4];
            rng.fill_bytes(bytes);
            let words = bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            match sign {
                Sign::Add => block
                    .iter_mut()
                    .zip(words)
                    .for_each(|(t, w)| *t = t.wrapping_add(w)),
                Sign::Subtract => block
                    .iter_mut()
                    .zip(words)
                    .for_each(|(t, w)| *t = t.wrapping_sub(w)),
            }
        }
    }

    // TODO: rand_chacha's generator does not zeroize its key or its buffered keystream on
    // drop; a generator that did (or the chacha20 crate's zeroize feature) would close that.
    bytes.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_application_matches_a_single_pass() {
        let len = 3 * MIN_WORDS_PER_THREAD + 17;
        let streams = || {
            let mut streams = MaskStreams::default();
            streams.push(&[1; 32], Sign::Add);
            streams.push(&[2; 32], Sign::Subtract);
            streams
        };
        let mut single = vec![5; len];
        streams().apply_with_threads(&mut single, 1);
        let mut split = vec![5; len];
        streams().apply_with_threads(&mut split, 3);
        assert_eq!(single, split);
    }
}
