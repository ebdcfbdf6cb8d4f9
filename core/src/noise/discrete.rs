//! A wide discrete Gaussian over the integers, from two narrower ones.
//!
//! # Convolution
//!
//! With `x` a sample of a *fine* base discrete Gaussian of width `s_f`, `y` one of a *coarse*
//! base discrete Gaussian of width `s_c` (both from the exact tables of [`super::table`]), and
//! an integer multiplier `K`, the sampler returns
//!
//! ```text
//! k = x + K y,    of width S = sqrt(s_f^2 + K^2 s_c^2), about K s_c.
//! ```
//!
//! This is the convolution technique of Micciancio and Walter (2017, "Gaussian sampling over
//! the integers: efficient, generic, constant-time", building on Peikert 2010): `x + K y` is
//! close to a discrete Gaussian as long as the fine term smooths the coarse lattice `K Z`.
//!
//! In this one-dimensional case the bound follows from Poisson summation. Completing the square
//! gives `P(x + K y = n)` proportional to `exp(-n^2 / (2 S^2)) sum_m exp(-(m - c_n)^2 /
//! (2 tau^2))` with `tau^-2 = K^2 / s_f^2 + 1 / s_c^2` and some shift `c_n`, and the inner sum
//! equals `tau sqrt(2 pi) (1 + e_n)` with `|e_n| <= theta = 2 sum_{j >= 1} exp(-2 pi^2 tau^2 j^2)`
//! whatever `c_n` is. Hence every probability is within a factor `(1 + theta) / (1 - theta)` of
//! the discrete Gaussian `D(S)`, and the statistical distance is at most `theta / (1 - theta)`.
//!
//! `K` is the largest integer with `tau >= 2`, so `theta <= 2 exp(-8 pi^2) / (1 - e^(-24 pi^2))`,
//! about 2^-112.9.
//!
//! # Randomness
//!
//! Each sample takes a 48-bit chunk of the generator's output, four samples to three 64-bit
//! words: the fine table reads `m_f + b` of its bits and the coarse one the next `m_c + b`
//! (`m` slot bits and `b` prefix bits each, see [`super::table`]). In the rare case (probability
//! `2^-b` per table) that a prefix comparison ties, two more words settle it.

use std::f64::consts::PI;
use std::fmt;
use std::sync::OnceLock;

use rand::CryptoRng;

use super::NoiseError;
use super::table::{BaseTable, BaseView, MAX_BASE_SIGMA, MIN_BASE_SIGMA};

/// Fine width of [`DiscreteGaussian::standard`]: its `2 * 8000 + 1` outcomes fill a table of
/// 2^14 four-byte entries (64 KiB), and it smooths `K = 319`.
const STANDARD_FINE_SIGMA: f64 = 640.0;

/// Coarse width of [`DiscreteGaussian::standard`]: its `2 * 32750 + 1` outcomes fill 2^16
/// entries (256 KiB). Wider tables would raise `S` further but leave the L2 cache during
/// training more often: with a 2^17-entry table (width 5240) the noise of a DP-SGD step
/// measured a third slower on small models.
const STANDARD_COARSE_SIGMA: f64 = 2620.0;

/// Bits of each sample's chunk: four samples take three 64-bit words.
const CHUNK_BITS: u32 = 48;

/// Fine and coarse chunk widths (`m + b`) of the standard tables: 14 + 9 and 16 + 9.
const STANDARD_WIDTHS: (u32, u32) = (23, 25);

/// Least smoothing width `tau`; see the module docs.
const MIN_TAU: f64 = 2.0;

/// A discrete Gaussian `D(S)` over the integers, `P(k) = exp(-k^2 / (2 S^2)) / Z`, up to a
/// statistical distance of at most [`DiscreteGaussian::distance_bound`]; sampled with integer
/// arithmetic only, from a generator's raw words. See the module docs of [`crate::noise`].
///
/// ```
/// use athanor_core::noise::DiscreteGaussian;
/// use rand::SeedableRng;
///
/// let sampler = DiscreteGaussian::convolved(8.0, 20.0)?;
/// assert_eq!(sampler.multiplier(), 3);
/// assert!((sampler.sigma() - (64.0_f64 + 9.0 * 400.0).sqrt()).abs() < 1e-12);
/// let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
/// let k: i64 = sampler.sample(&mut rng);
/// assert!(k.abs() <= sampler.max_magnitude());
/// # Ok::<(), athanor_core::noise::NoiseError>(())
/// ```
pub struct DiscreteGaussian {
    fine: BaseTable,
    /// `None` for a single table.
    coarse: Option<BaseTable>,
    /// `K` (0 for a single table).
    multiplier: i64,
    /// `T_f + K T_c`, subtracted from the combined outcome indices.
    offset: i64,
    /// `S`.
    sigma: f64,
    distance: f64,
}

impl fmt::Debug for DiscreteGaussian {
    // The tables are large and say nothing a reader needs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscreteGaussian")
            .field("sigma", &self.sigma)
            .field("fine_sigma", &self.fine.sigma())
            .field("coarse_sigma", &self.coarse_sigma())
            .field("multiplier", &self.multiplier)
            .field("distance_bound", &self.distance)
            .finish_non_exhaustive()
    }
}

impl DiscreteGaussian {
    /// The sampler [`super::GaussianNoise`] uses: fine width 640, coarse width 2620, `K = 319`,
    /// so `S` is about 835,780 (2^19.67), within a statistical distance of 2^-111 of `D(S)`.
    /// Built once per process, in a few milliseconds.
    pub fn standard() -> &'static DiscreteGaussian {
        static STANDARD: OnceLock<DiscreteGaussian> = OnceLock::new();
        STANDARD.get_or_init(|| {
            DiscreteGaussian::convolved(STANDARD_FINE_SIGMA, STANDARD_COARSE_SIGMA)
                .expect("the standard widths are valid")
        })
    }

    /// A single table of width `sigma`: `S = sigma`.
    ///
    /// # Errors
    /// [`NoiseError::BaseSigma`] unless `sigma` lies in `[MIN_BASE_SIGMA, MAX_BASE_SIGMA]`
    /// (1 to 5240).
    pub fn new(sigma: f64) -> Result<DiscreteGaussian, NoiseError> {
        check_base_sigma(sigma)?;

        let slot_bits = BaseTable::slot_bits_for(sigma);
        let fine = BaseTable::new(sigma, (CHUNK_BITS - slot_bits).min(32 - slot_bits));
        Ok(DiscreteGaussian {
            multiplier: 0,
            offset: fine.tail(),
            sigma,
            distance: fine.distance_bound(),
            fine,
            coarse: None,
        })
    }

    /// The convolution `x + K y` of a fine table of width `fine_sigma` and a coarse one of
    /// width `coarse_sigma`, with the largest `K` the fine width smooths (module docs).
    ///
    /// # Errors
    /// [`NoiseError::BaseSigma`] unless both widths lie in
    /// `[MIN_BASE_SIGMA, MAX_BASE_SIGMA]` (1 to 5240), and [`NoiseError::Smoothing`] if the
    /// fine width is too narrow to smooth even `K = 1`.
    pub fn convolved(fine_sigma: f64, coarse_sigma: f64) -> Result<DiscreteGaussian, NoiseError> {
        check_base_sigma(fine_sigma)?;
        check_base_sigma(coarse_sigma)?;

        // K: the largest integer with tau^-2 = K^2 / s_f^2 + 1 / s_c^2 <= 1 / MIN_TAU^2.
        let room = 1.0 / (MIN_TAU * MIN_TAU) - 1.0 / (coarse_sigma * coarse_sigma);
        let multiplier = (fine_sigma * room.max(0.0).sqrt()).floor() as i64;
        if multiplier < 1 {
            return Err(NoiseError::Smoothing {
                fine_sigma,
                coarse_sigma,
            });
        }

        // The two tables' chunks share a sample's 48 bits; their prefixes split what the slot
        // bits leave (at least 14 bits, as each table has at most 17 slot bits).
        let slot_bits = [fine_sigma, coarse_sigma].map(BaseTable::slot_bits_for);
        let prefix_bits = (CHUNK_BITS - slot_bits[0] - slot_bits[1]) / 2;
        let [fine, coarse] = [fine_sigma, coarse_sigma].map(|sigma| {
            BaseTable::new(sigma, prefix_bits.min(32 - slot_bits[0].max(slot_bits[1])))
        });

        let k = multiplier as f64;
        let tau_squared =
            1.0 / (k * k / (fine_sigma * fine_sigma) + 1.0 / (coarse_sigma * coarse_sigma));
        // sum_{j >= 1} exp(-a j^2) <= exp(-a) / (1 - exp(-3a)), since j^2 >= 1 + 3 (j - 1); and
        // theta / (1 - theta) <= 1.01 theta for theta below 1e-3, which tau >= 2 guarantees.
        let a = 2.0 * PI * PI * tau_squared;
        let theta = 2.0 * (-a).exp() / (1.0 - (-3.0 * a).exp());
        Ok(DiscreteGaussian {
            multiplier,
            offset: fine.tail() + multiplier * coarse.tail(),
            sigma: (fine_sigma * fine_sigma + k * k * coarse_sigma * coarse_sigma).sqrt(),
            distance: fine.distance_bound() + coarse.distance_bound() + 1.01 * theta,
            fine,
            coarse: Some(coarse),
        })
    }

    /// The width `S`, the standard deviation of the samples (the variance of a discrete
    /// Gaussian differs from `S^2` by a relative `exp(-2 pi^2 S^2)`, nothing here).
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// The fine table's width (the only table's, for a single one).
    pub fn fine_sigma(&self) -> f64 {
        self.fine.sigma()
    }

    /// The coarse table's width, `None` for a single table.
    pub fn coarse_sigma(&self) -> Option<f64> {
        self.coarse.as_ref().map(BaseTable::sigma)
    }

    /// The multiplier `K` of the coarse samples (0 for a single table).
    pub fn multiplier(&self) -> i64 {
        self.multiplier
    }

    /// The largest absolute value a sample can take: `T_f + K T_c`.
    pub fn max_magnitude(&self) -> i64 {
        self.offset
    }

    /// An upper bound on the statistical distance between one sample and `D(S)`: each table's
    /// truncation and rounding plus the convolution's smoothing error.
    pub fn distance_bound(&self) -> f64 {
        self.distance
    }

    /// One sample, from one word of `rng` (rarely a few more).
    pub fn sample<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        let bits = rng.next_u64();
        let fine = self.fine.view();
        let raw = match &self.coarse {
            None => i64::from(fine.index_exact(low_bits(bits, self.fine.chunk_bits()), rng)),
            Some(coarse) => {
                let views = (fine, coarse.view());
                let widths = (self.fine.chunk_bits(), coarse.chunk_bits());
                if widths == STANDARD_WIDTHS {
                    convolve(self, views, StandardWidths, bits, rng)
                } else {
                    convolve(self, views, widths, bits, rng)
                }
            }
        };
        raw - self.offset
    }

    /// Replaces each `v` in `values` by `map(v, k)`, `k` a fresh sample: the hot loop of
    /// [`super::GaussianNoise::add_to`]. The standard tables get chunk widths known at compile
    /// time, which keeps the shifts immediate.
    #[inline]
    pub(super) fn map_each<R, F>(&self, values: &mut [f32], rng: &mut R, map: F)
    where
        R: CryptoRng + ?Sized,
        F: Fn(f32, i64) -> f32,
    {
        let (fine, offset) = (self.fine.view(), self.offset);
        let Some(coarse) = &self.coarse else {
            let width = self.fine.chunk_bits();
            let sample = |bits, rng: &mut R| {
                i64::from(fine.index_exact(low_bits(bits, width), rng)) - offset
            };
            return map_chunks(values, rng, sample, map);
        };

        let views = (fine, coarse.view());
        let widths = (self.fine.chunk_bits(), coarse.chunk_bits());
        if widths == STANDARD_WIDTHS {
            let sample =
                |bits, rng: &mut R| convolve(self, views, StandardWidths, bits, rng) - offset;
            map_chunks(values, rng, sample, map);
        } else {
            let sample = |bits, rng: &mut R| convolve(self, views, widths, bits, rng) - offset;
            map_chunks(values, rng, sample, map);
        }
    }
}

fn check_base_sigma(sigma: f64) -> Result<(), NoiseError> {
    if (MIN_BASE_SIGMA..=MAX_BASE_SIGMA).contains(&sigma) {
        return Ok(());
    }
    Err(NoiseError::BaseSigma {
        got: sigma,
        min: MIN_BASE_SIGMA,
        max: MAX_BASE_SIGMA,
    })
}

/// Replaces each `v` in `values` by `map(v, sample(chunk))`, with a fresh 48-bit chunk of
/// `rng`'s output for each value: words are drawn in batches and split four chunks to three
/// words.
#[inline(always)]
fn map_chunks<R, S, F>(values: &mut [f32], rng: &mut R, sample: S, map: F)
where
    R: CryptoRng + ?Sized,
    S: Fn(u64, &mut R) -> i64,
    F: Fn(f32, i64) -> f32,
{
    const GROUPS: usize = 16;
    let mut bytes = [0_u8; 24 * GROUPS];
    for block in values.chunks_mut(4 * GROUPS) {
        let bytes = &mut bytes[..24 * block.len().div_ceil(4)];
        rng.fill_bytes(bytes);
        for (group, words) in block.chunks_mut(4).zip(bytes.chunks_exact(24)) {
            // `words` holds 24 bytes, so each range is eight bytes long and the conversion to
            // `[u8; 8]` cannot fail.
            let word = |i: usize| {
                u64::from_le_bytes(words[8 * i..8 * i + 8].try_into().expect("eight bytes"))
            };
            for (value, chunk) in group.iter_mut().zip(split(word(0), word(1), word(2))) {
                *value = map(*value, sample(chunk, rng));
            }
        }
    }
}

/// Four 48-bit chunks from three words: bits 0..48 of the chunks are disjoint bits of the
/// words (bits above 48 are left over and must be ignored).
#[inline(always)]
fn split(w0: u64, w1: u64, w2: u64) -> [u64; 4] {
    [
        w0,
        (w0 >> 48) | (w1 << 16),
        (w1 >> 32) | (w2 << 32),
        w2 >> 16,
    ]
}

/// Where the fine and the coarse chunk sit in a sample's bits.
trait Widths: Copy {
    /// `m_f + b`: the fine chunk, in the low bits.
    fn fine(self) -> u32;
    /// `m_c + b`: the coarse chunk, just above.
    fn coarse(self) -> u32;
}

impl Widths for (u32, u32) {
    fn fine(self) -> u32 {
        self.0
    }

    fn coarse(self) -> u32 {
        self.1
    }
}

/// [`STANDARD_WIDTHS`] as compile-time constants.
#[derive(Clone, Copy)]
struct StandardWidths;

impl Widths for StandardWidths {
    fn fine(self) -> u32 {
        STANDARD_WIDTHS.0
    }

    fn coarse(self) -> u32 {
        STANDARD_WIDTHS.1
    }
}

/// The low `width` bits of `bits`.
#[inline(always)]
fn low_bits(bits: u64, width: u32) -> u32 {
    (bits & ((1 << width) - 1)) as u32
}

/// `i_f + K i_c` for the outcome indices (`x + T_f`, `y + T_c`) that the chunks of `bits` pick:
/// the sample plus `T_f + K T_c`. `sampler` is the owner of the views, for the rare ties.
#[inline(always)]
fn convolve<W: Widths, R: CryptoRng + ?Sized>(
    sampler: &DiscreteGaussian,
    (fine, coarse): (BaseView<'_>, BaseView<'_>),
    widths: W,
    bits: u64,
    rng: &mut R,
) -> i64 {
    let fine_chunk = low_bits(bits, widths.fine());
    let coarse_chunk = low_bits(bits >> widths.fine(), widths.coarse());
    let (fine_index, fine_tie) = fine.index_or_tie(fine_chunk);
    let (coarse_index, coarse_tie) = coarse.index_or_tie(coarse_chunk);
    if fine_tie | coarse_tie {
        return convolve_exact(sampler, fine_chunk, coarse_chunk, rng);
    }
    i64::from(fine_index) + sampler.multiplier * i64::from(coarse_index)
}

/// [`convolve`] when a prefix comparison tied: the same chunks, with the ties settled.
///
/// It takes the sampler by reference rather than the views by value: its arguments are then set
/// up in registers on every iteration of the hot loop, not copied to the stack.
#[cold]
#[inline(never)]
fn convolve_exact<R: CryptoRng + ?Sized>(
    sampler: &DiscreteGaussian,
    fine_chunk: u32,
    coarse_chunk: u32,
    rng: &mut R,
) -> i64 {
    let coarse = sampler
        .coarse
        .as_ref()
        .expect("only convolved samplers convolve");
    let fine_index = sampler.fine.view().index_exact(fine_chunk, rng);
    let coarse_index = coarse.view().index_exact(coarse_chunk, rng);
    i64::from(fine_index) + sampler.multiplier * i64::from(coarse_index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_parameters_are_as_documented() {
        let standard = DiscreteGaussian::standard();
        assert_eq!(standard.multiplier(), 319);
        let coarse = standard.coarse.as_ref().expect("convolved");
        assert_eq!(
            (standard.fine.chunk_bits(), coarse.chunk_bits()),
            STANDARD_WIDTHS
        );
        let expected = (640_f64.powi(2) + (319.0 * 2620_f64).powi(2)).sqrt();
        assert!((standard.sigma() / expected - 1.0).abs() < 1e-14);
        assert!((standard.sigma() - 835_780.245).abs() < 1e-3);
        assert!(standard.distance_bound() < 2_f64.powi(-111));
        assert_eq!(standard.max_magnitude(), 8000 + 319 * 32750);
    }

    #[test]
    fn chunk_split_uses_every_bit_of_the_three_words_once() {
        // Each of the 192 bits, set alone, must show up in exactly one chunk's low 48 bits.
        let low48 = (1_u64 << 48) - 1;
        for bit in 0..192 {
            let mut words = [0_u64; 3];
            words[bit / 64] = 1 << (bit % 64);
            let chunks = split(words[0], words[1], words[2]);
            let ones: u32 = chunks.iter().map(|c| (c & low48).count_ones()).sum();
            assert_eq!(ones, 1, "bit {bit}");
        }
    }
}
