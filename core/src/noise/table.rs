//! The base sampler: an alias table for a truncated discrete Gaussian, sampled with integer
//! comparisons only.
//!
//! # Distribution
//!
//! For a width `s` (`s` in [`MIN_BASE_SIGMA`, `MAX_BASE_SIGMA`]) the table holds the discrete
//! Gaussian `D(x) = exp(-x^2 / (2 s^2)) / Z` restricted to `|x| <= T`, `T = ceil(12.5 s)`, and
//! renormalized over that range. Each probability is rounded to an integer multiple of 2^-127,
//! with the rounding remainder given out one unit at a time from the centre, so that the
//! probabilities sum to exactly 1. [`BaseTable::distance_bound`] bounds the statistical distance
//! from the untruncated `D`:
//!
//! - the dropped tails, `P(|x| > T) <= 2 (s^2 / T) exp(-T^2 / (2 s^2)) / Z`, below 2^-116 for
//!   every allowed width (12.5 standard deviations: `exp(-78.1)`);
//! - the rounding, less than one unit of 2^-127 per outcome, so below `(2T + 1) 2^-128`: 2^-114
//!   for width 640 and 2^-112 for width 2620 (the standard tables), 2^-111 for the widest.
//!
//! # Alias method with lazily drawn precision
//!
//! Walker's alias method (Vose 1991, "A linear algorithm for generating random numbers with a
//! given distribution"): the `n = 2^m` slots (`m` the least with `2^m >= 2T + 1`; outcomes past
//! `2T` have probability 0) each own one outcome and name an alias. A sample picks a slot with
//! `m` uniform bits and a uniform `u` in `[0, 2^P)`, `P = 127 - m`; it returns the slot's own
//! outcome if `u < t` (the slot's threshold) and its alias otherwise. The thresholds come from
//! integer arithmetic on the integer weights (Vose's construction, exact because every weight is
//! an integer multiple of `2^-127` and a slot's capacity is `2^P` of them), so the table realizes
//! the rounded probabilities exactly.
//!
//! `u` is never drawn in full unless needed: the sampler compares only its top `b` bits (the
//! *prefix*) with the top `b` bits of `t`. If they differ the comparison is settled; if they are
//! equal, which happens with probability `2^-b`, the remaining `P - b` bits are drawn from the
//! generator and the full comparison decides. The outcome is the same as comparing a fully drawn
//! `u`, so the lazy draw changes the cost, not the distribution. A sample thus takes an
//! `(m + b)`-bit *chunk* of a random word in the common case (slot in the low `m` bits, prefix
//! above); [`super::DiscreteGaussian`] packs them densely into the generator's words. Each slot
//! stores one `u32`, its alias in the low `m` bits and `t`'s prefix above. Replacing the alias by
//! the slot's own index gives the slot's *limit*, laid out like a chunk that picks the slot, so
//! that one integer comparison of the chunk with the limit gives both answers: below keeps the
//! slot's outcome, equal is a tie.

use rand::CryptoRng;

use super::fixed::Fixed;

/// The narrowest base width accepted: a narrower table would hold a handful of outcomes, which
/// nothing here needs.
pub const MIN_BASE_SIGMA: f64 = 1.0;

/// The widest base width accepted: `2T + 1` outcomes must fit in 2^17 slots.
pub const MAX_BASE_SIGMA: f64 = 5240.0;

/// The tail cut, in widths: outcomes beyond `ceil(TAIL_CUT * s)` are dropped.
const TAIL_CUT: f64 = 12.5;

/// Total bits of the integer weights (probabilities in units of 2^-127). `n * 2^P` must fit in a
/// `u128`: `2^m * 2^(127 - m) = 2^127`.
const WEIGHT_BITS: u32 = 127;

/// An exact alias table for a truncated discrete Gaussian; see the module docs.
pub(super) struct BaseTable {
    sigma: f64,
    /// `T`: outcome `x` in `-T..=T` is stored at index `x + T`.
    tail: i64,
    /// `m`: slots are indexed by `m` bits.
    slot_bits: u32,
    /// `b`: bits of each threshold compared before drawing more.
    prefix_bits: u32,
    /// Per slot: its alias in the low `m` bits and the top `b` bits of its threshold above (the
    /// all-ones prefix for a slot that always keeps its outcome).
    entries: Vec<u32>,
    /// Per slot: the full threshold `t` in `0..=2^P`, for the rare comparisons the prefix leaves
    /// open.
    thresholds: Vec<u128>,
    /// Bound on the statistical distance from the untruncated discrete Gaussian.
    distance: f64,
}

impl BaseTable {
    /// Slot-index bits `m` of the table for width `sigma` (at most 17).
    pub(super) fn slot_bits_for(sigma: f64) -> u32 {
        let outcomes = 2 * tail_for(sigma) + 1;
        outcomes.next_power_of_two().trailing_zeros()
    }

    /// Builds the table for width `sigma`, comparing `prefix_bits` threshold bits before
    /// drawing more. The caller has checked `sigma` against [`MIN_BASE_SIGMA`] and
    /// [`MAX_BASE_SIGMA`].
    ///
    /// # Panics
    /// Unless `1 <= prefix_bits` and `m + prefix_bits <= 32`.
    pub(super) fn new(sigma: f64, prefix_bits: u32) -> BaseTable {
        let tail = tail_for(sigma);
        let slot_bits = Self::slot_bits_for(sigma);
        assert!(
            prefix_bits >= 1 && slot_bits + prefix_bits <= 32,
            "a chunk must fit a u32"
        );

        let (weights, mass_in_table) = weights(sigma, tail, 1 << slot_bits);
        let (aliases, thresholds) = vose(weights, WEIGHT_BITS - slot_bits);

        // The prefix of a threshold `t` in `0..=2^P` is `t >> (P - b)`, clamped so that a full
        // slot (t = 2^P) gets the all-ones prefix: a tie there draws more bits and keeps the
        // slot's own outcome, as it must.
        let rest_bits = WEIGHT_BITS - slot_bits - prefix_bits;
        let prefix_max = (1_u128 << prefix_bits) - 1;
        let entries = aliases
            .iter()
            .zip(&thresholds)
            .map(|(&alias, &t)| {
                let prefix = (t >> rest_bits).min(prefix_max) as u32;
                (prefix << slot_bits) | alias
            })
            .collect();

        let tail_mass = 2.0 * sigma * sigma / tail as f64
            * (-(tail as f64).powi(2) / (2.0 * sigma * sigma)).exp()
            / mass_in_table;
        let rounding = (2 * tail + 1) as f64 * 2_f64.powi(-(WEIGHT_BITS as i32) - 1);
        BaseTable {
            sigma,
            tail: tail as i64,
            slot_bits,
            prefix_bits,
            entries,
            thresholds,
            // 2^-150 covers setup's own fixed-point rounding (see `fixed`).
            distance: tail_mass + rounding + 2_f64.powi(-150),
        }
    }

    pub(super) fn sigma(&self) -> f64 {
        self.sigma
    }

    pub(super) fn tail(&self) -> i64 {
        self.tail
    }

    /// `m + b`: the bits of a chunk.
    pub(super) fn chunk_bits(&self) -> u32 {
        self.slot_bits + self.prefix_bits
    }

    pub(super) fn distance_bound(&self) -> f64 {
        self.distance
    }

    /// What sampling reads, copied out so that a hot loop keeps it in registers.
    pub(super) fn view(&self) -> BaseView<'_> {
        BaseView {
            entries: &self.entries,
            thresholds: &self.thresholds,
            slot_bits: self.slot_bits,
            prefix_bits: self.prefix_bits,
        }
    }
}

/// What sampling from a [`BaseTable`] reads.
#[derive(Clone, Copy)]
pub(super) struct BaseView<'a> {
    /// `2^m` entries.
    entries: &'a [u32],
    thresholds: &'a [u128],
    slot_bits: u32,
    prefix_bits: u32,
}

impl BaseView<'_> {
    /// The outcome index (`x + T`) that `chunk` (a value below `2^(m + b)`) picks, and whether
    /// the prefix comparison tied, in which case the index is meaningless and the caller must
    /// take [`BaseView::index_exact`] on the same chunk.
    ///
    /// No branch and no generator: hot loops run this for every sample and leave the rare ties
    /// to a cold path.
    #[inline(always)]
    pub(super) fn index_or_tie(self, chunk: u32) -> (u32, bool) {
        // `entries.len() - 1` is the slot mask (the length is 2^m); masking with it also tells
        // the compiler that the index is in bounds.
        let slot_mask = self.entries.len() - 1;
        let slot = chunk as usize & slot_mask;
        let entry = self.entries[slot];
        let alias = entry & slot_mask as u32;
        let limit = (entry & !(slot_mask as u32)) | slot as u32;

        // `chunk < limit` is a coin flip the branch predictor cannot learn; this compiles to a
        // conditional move.
        let index = if chunk < limit { slot as u32 } else { alias };
        (index, chunk == limit)
    }

    /// The outcome index that `chunk` picks, settling a tie by drawing the other `P - b` bits
    /// of `u` from two fresh words of `rng`.
    pub(super) fn index_exact<R: CryptoRng + ?Sized>(self, chunk: u32, rng: &mut R) -> u32 {
        let (index, tied) = self.index_or_tie(chunk);
        if !tied {
            return index;
        }

        let slot = chunk as usize & (self.entries.len() - 1);
        let drawn = u128::from(chunk >> self.slot_bits);
        let rest_bits = WEIGHT_BITS - self.slot_bits - self.prefix_bits;
        let fresh = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        let u = (drawn << rest_bits) | (fresh >> (128 - rest_bits));
        if u < self.thresholds[slot] {
            slot as u32
        } else {
            self.entries[slot] & ((1 << self.slot_bits) - 1)
        }
    }
}

/// `T = ceil(12.5 sigma)`.
fn tail_for(sigma: f64) -> u64 {
    (TAIL_CUT * sigma).ceil() as u64
}

/// The integer weights `W_i`, `sum W_i = 2^127`, of outcomes `i - T` for `i` in `0..slots`
/// (zero past `2T`), and the table's unnormalized mass `sum_{|x| <= T} exp(-x^2 / (2 s^2))` as
/// an `f64` for the tail bound.
fn weights(sigma: f64, tail: u64, slots: usize) -> (Vec<u128>, f64) {
    // rho(x) = q^(x^2) with q = exp(-1 / (2 s^2)), by rho(x + 1) = rho(x) q^(2x + 1).
    let sigma_squared = Fixed::from_f64(sigma).mul(Fixed::from_f64(sigma));
    let q = sigma_squared.add(sigma_squared).recip().exp().recip();
    let q_squared = q.mul(q);
    let mut rho = Vec::with_capacity(tail as usize + 1);
    let (mut current, mut step) = (Fixed::from_int(1), q);
    for _ in 0..=tail {
        rho.push(current);
        current = current.mul(step);
        step = step.mul(q_squared);
    }

    // Z_T = rho(0) + 2 sum_{x=1..T} rho(x), then W = floor(rho(|x|) / Z_T * 2^127).
    let half_mass = rho[1..].iter().fold(Fixed::ZERO, |sum, &r| sum.add(r));
    let mass = rho[0].add(half_mass).add(half_mass);
    let inverse_mass = mass.recip();
    let mut weights: Vec<u128> = (0..slots)
        .map(|i| {
            let x = (i as i64 - tail as i64).unsigned_abs() as usize;
            rho.get(x)
                .map_or(0, |r| r.mul(inverse_mass).floor_scaled(WEIGHT_BITS))
        })
        .collect();

    // Rounding down left a deficit of fewer units than there are outcomes (each floor loses
    // less than one); give one unit each to the outcomes nearest the centre.
    let total: u128 = weights.iter().sum();
    let deficit = (1_u128 << WEIGHT_BITS)
        .checked_sub(total)
        .expect("rounded-down weights cannot exceed one");
    assert!(
        deficit <= u128::from(2 * tail + 1),
        "weights lost more than rounding"
    );
    let centre = tail as usize;
    for k in 0..deficit as usize {
        // centre, centre - 1, centre + 1, centre - 2, ...
        let offset = k.div_ceil(2);
        let index = if k % 2 == 1 {
            centre - offset
        } else {
            centre + offset
        };
        weights[index] += 1;
    }
    (weights, mass.to_f64())
}

/// Vose's alias construction on integer weights summing to `slots * 2^capacity_bits`: per slot,
/// its alias and its threshold `t` (keep the slot's own outcome with probability
/// `t / 2^capacity_bits`). Exact: every step is integer arithmetic.
fn vose(mut weights: Vec<u128>, capacity_bits: u32) -> (Vec<u32>, Vec<u128>) {
    let capacity = 1_u128 << capacity_bits;
    let slots = weights.len();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) =
        (0..slots).partition(|&i| weights[i] < capacity);
    let mut aliases: Vec<u32> = (0..slots).map(|slot| slot as u32).collect();
    let mut thresholds = vec![capacity; slots];

    // Fill each under-full slot with its own weight and top it up from an over-full one.
    while let Some(&donor) = large.last() {
        let Some(slot) = small.pop() else { break };
        thresholds[slot] = weights[slot];
        aliases[slot] = donor as u32;
        weights[donor] -= capacity - weights[slot];
        if weights[donor] < capacity {
            large.pop();
            small.push(donor);
        }
    }

    // The weights sum to exactly `slots * capacity`, so whatever is left is exactly full and
    // keeps its own outcome (threshold 2^P, alias itself, set above).
    assert!(
        small.is_empty(),
        "alias construction left an under-full slot"
    );
    assert!(
        large.iter().all(|&i| weights[i] == capacity),
        "alias construction left an over-full slot"
    );
    (aliases, thresholds)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn weights_sum_to_one_and_match_high_precision_references() {
        let (weights, mass) = weights(320.0, 4000, 8192);
        assert_eq!(weights.iter().sum::<u128>(), 1 << 127);
        assert!((mass - 802.121_047_881_920_2).abs() < 1e-9, "{mass}");

        // floor(D(x) * 2^127) for x = 0 and 1000, computed independently with 400-bit
        // arithmetic; the centre may have gained one unit of the rounding deficit.
        let at_centre = 0x28da0852ed23b414e611fa19ac45b1_u128;
        let at_1000 = 0x4f3a07c4bc7712fd9ed5489571ae_u128;
        assert!(weights[4000].abs_diff(at_centre) <= 2);
        assert!(weights[5000].abs_diff(at_1000) <= 1);
        assert_eq!(weights[3000], weights[5000], "symmetric");
        assert!(weights[8001..].iter().all(|&w| w == 0), "padding");
    }

    #[test]
    fn alias_table_realizes_the_weights_exactly() {
        let weights: Vec<u128> = vec![1, 7, 0, 8];
        let (aliases, thresholds) = vose(weights.clone(), 2);
        let mut realized = vec![0; 4];
        for slot in 0..4 {
            realized[slot] += thresholds[slot];
            realized[aliases[slot] as usize] += 4 - thresholds[slot];
        }
        assert_eq!(realized, weights);
    }

    #[test]
    fn tie_resolution_keeps_the_own_outcome_at_the_threshold_rate() {
        // Find a slot whose threshold lies strictly inside its prefix interval, then sample with
        // the chunk that ties there many times: the own outcome must come up at the rate the
        // bits below the prefix give. The count is binomial; 5 standard deviations of slack.
        let table = BaseTable::new(3.0, 8);
        let view = table.view();
        let rest_bits = WEIGHT_BITS - table.slot_bits - table.prefix_bits;
        let slot_mask = (1 << table.slot_bits) - 1;
        let slot = (0..table.thresholds.len())
            .find(|&s| {
                let fraction = table.thresholds[s] & ((1 << rest_bits) - 1);
                (table.entries[s] & slot_mask) as usize != s
                    && fraction > (1 << (rest_bits - 3))
                    && fraction < (7 << (rest_bits - 3))
            })
            .expect("some slot has a threshold away from its prefix boundaries");
        let t = table.thresholds[slot];
        let chunk = slot as u32 | ((t >> rest_bits) as u32) << table.slot_bits;
        assert!(view.index_or_tie(chunk).1, "the chunk ties");
        let p = (t & ((1 << rest_bits) - 1)) as f64 / 2_f64.powi(rest_bits as i32);

        let mut rng = ChaCha20Rng::seed_from_u64(41);
        let trials = 100_000;
        let kept = (0..trials)
            .filter(|_| view.index_exact(chunk, &mut rng) == slot as u32)
            .count() as f64;
        let sd = (trials as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (kept - trials as f64 * p).abs() < 5.0 * sd,
            "kept {kept}, p {p}"
        );
    }

    #[test]
    fn distance_bound_is_below_two_to_the_minus_110_for_every_width() {
        for sigma in [MIN_BASE_SIGMA, 3.0, 320.0, MAX_BASE_SIGMA] {
            let table = BaseTable::new(sigma, 8);
            assert!(table.distance_bound() < 2_f64.powi(-110), "{sigma}");
            assert!(table.slot_bits <= 17);
        }
        assert!(BaseTable::new(320.0, 8).distance_bound() < 2_f64.powi(-114));
    }
}
