//! Flat parameter vectors as bytes.
//!
//! Models and updates cross the wire as little-endian `f32` bytes. Decoding checks the length
//! and that every value is finite, so a NaN or infinity sent by a faulty or hostile peer is
//! refused at the boundary and never reaches an average.

use thiserror::Error;

/// Bytes that do not decode to a usable parameter vector.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum ParamsError {
    /// The byte count is not what the model needs.
    #[error("expected {expected} parameters ({} bytes), got {got} bytes", expected * 4)]
    Length {
        /// Parameters expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("parameter {index} is not finite")]
    NonFinite {
        /// Position of the first bad value.
        index: usize,
    },
}

/// Encodes parameters as little-endian `f32` bytes.
pub fn to_le_bytes(params: &[f32]) -> Vec<u8> {
    params.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes exactly `expected` little-endian `f32` values, all finite.
///
/// # Errors
/// [`ParamsError::Length`] when `bytes` is not `4 * expected` long, [`ParamsError::NonFinite`]
/// for the first NaN or infinite value.
///
/// ```
/// use athanor_core::params::{from_le_bytes, to_le_bytes};
/// let bytes = to_le_bytes(&[1.0, -2.5]);
/// assert_eq!(from_le_bytes(&bytes, 2).unwrap(), vec![1.0, -2.5]);
/// assert!(from_le_bytes(&bytes, 3).is_err());
/// ```
pub fn from_le_bytes(bytes: &[u8], expected: usize) -> Result<Vec<f32>, ParamsError> {
    if bytes.len() != expected.saturating_mul(4) {
        return Err(ParamsError::Length {
            expected,
            got: bytes.len(),
        });
    }

    let mut params = Vec::with_capacity(expected);
    for (index, word) in bytes.chunks_exact(4).enumerate() {
        let value = f32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        if !value.is_finite() {
            return Err(ParamsError::NonFinite { index });
        }
        params.push(value);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_nan_and_reports_its_position() {
        let bytes = to_le_bytes(&[0.0, 1.0, f32::NAN]);
        assert_eq!(
            from_le_bytes(&bytes, 3),
            Err(ParamsError::NonFinite { index: 2 })
        );
    }

    #[test]
    fn rejects_a_trailing_partial_value() {
        let mut bytes = to_le_bytes(&[1.0]);
        bytes.push(0);
        assert!(matches!(
            from_le_bytes(&bytes, 1),
            Err(ParamsError::Length { .. })
        ));
    }
}
