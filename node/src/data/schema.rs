//! Dataset schemas, written in TOML by the operator and validated when loaded.
//!
//! A schema names the label column, the number of classes and the feature columns, each with
//! the public bounds its values are clamped to and scaled from. Every check that does not need
//! the data file happens here, so the loader only ever works with a valid [`Schema`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::DataError;

/// The most feature columns a schema may declare, after expanding ranges.
///
/// Far above any tabular or image dataset the node is meant for; it keeps a typo such as
/// `px{0..7830000}` from allocating millions of names.
const MAX_FEATURES: usize = 1 << 20;

/// A validated dataset schema.
///
/// The TOML format:
///
/// ```toml
/// label = "label"           # optional, this is the default
/// classes = 10              # labels are the integers 0..classes-1
/// extra_columns = "reject"  # optional: "reject" (default) or "ignore"
///
/// [features]
/// # An ordered list of column names, where `name{a..b}` stands for `namea` up to and
/// # including `nameb`; or the string "all" for every column except the label, in file order.
/// columns = ["px{0..783}"]
/// default_bounds = [0, 255]  # bounds of every feature without an entry below
///
/// [features.bounds]          # optional per-feature bounds
/// px0 = [0, 255]
/// ```
///
/// Every feature needs bounds, from `default_bounds` or its own entry; with `columns = "all"`,
/// `default_bounds` is required.
///
/// With an explicit list, the features come in the order of the list whatever the order of the
/// columns in the file, so nodes whose files order columns differently still agree on the
/// feature layout. With `"all"`, they come in file order: every node's file must then order its
/// columns the same way, which the loader cannot check.
///
/// Bounds are public knowledge declared here, never computed from a node's data: a minimum or
/// maximum of the local data would reveal individual records through the scaling and would
/// give each node a different scale.
#[derive(Debug, Clone)]
pub struct Schema {
    /// Where the schema came from, for error messages.
    origin: PathBuf,
    /// Name of the label column.
    label: String,
    /// Number of classes; labels lie in `0..classes`.
    classes: u32,
    /// Which columns are features and their bounds.
    features: Features,
    /// What to do with columns that are neither the label nor a feature.
    extra_columns: ExtraColumns,
}

/// The feature columns of a schema.
#[derive(Debug, Clone)]
pub(super) enum Features {
    /// An explicit ordered list of feature columns and their bounds.
    Listed(Vec<(String, Bounds)>),
    /// Every column except the label, in file order.
    All {
        /// Bounds of columns without an override.
        default: Bounds,
        /// Bounds of named columns, each of which must be present in the file.
        overrides: BTreeMap<String, Bounds>,
    },
}

/// What the loader does with a column that is neither the label nor a feature (only possible
/// with a listed feature set: with `columns = "all"` every column is the label or a feature).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtraColumns {
    /// Refuse the file: an unexpected column often means the wrong file or a misspelt name.
    #[default]
    Reject,
    /// Skip the column without reading its cells.
    Ignore,
}

/// Public bounds `[lo, hi]` of one feature, with `lo < hi`, both finite, and whether the
/// feature is scaled logarithmically.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Schema {
    /// Reads and validates a schema file.
    ///
    /// # Errors
    ///
    /// [`DataError::SchemaRead`] if the file cannot be read, [`DataError::SchemaSyntax`] if it is
    /// not TOML of the expected shape, [`DataError::SchemaInvalid`] if a value is invalid.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| DataError::SchemaRead {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates a schema from TOML text; `origin` names it in error messages.
    ///
    /// # Errors
    ///
    /// As [`Schema::load`], except for reading.
    pub fn from_toml_str(text: &str, origin: impl AsRef<Path>) -> Result<Self, DataError> {
        let origin = origin.as_ref();
        let spec: SchemaSpec = toml::from_str(text).map_err(|err| DataError::SchemaSyntax {
            path: origin.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, reason: String| DataError::SchemaInvalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            reason,
        };

        let label = spec.label.trim();
        if label.is_empty() || label != spec.label {
            let reason = "must be a non-empty name without surrounding spaces".to_owned();
            return Err(invalid("label", reason));
        }
        if spec.classes < 2 {
            let reason = format!("must be at least 2, got {}", spec.classes);
            return Err(invalid("classes", reason));
        }

        let default = match spec.features.default_bounds {
            Some([lo, hi]) => Some(
                Bounds::new(lo, hi)
                    .map_err(|reason| invalid("features.default_bounds", reason.to_owned()))?,
            ),
            None => None,
        };
        let mut overrides = BTreeMap::new();
        for (name, [lo, hi]) in spec.features.bounds {
            let key = format!("features.bounds.{name}");
            if name == label {
                return Err(invalid(
                    &key,
                    "the label column cannot have bounds".to_owned(),
                ));
            }
            let bounds = Bounds::new(lo, hi).map_err(|reason| invalid(&key, reason.to_owned()))?;
            overrides.insert(name, bounds);
        }

        let features = match spec.features.columns {
            toml::Value::String(keyword) if keyword == "all" => {
                if !spec.features.log_scale.is_empty() {
                    let reason = "needs an explicit `features.columns` list".to_owned();
                    return Err(invalid("features.log_scale", reason));
                }
                let Some(default) = default else {
                    let reason = "is required when `features.columns` is \"all\"".to_owned();
                    return Err(invalid("features.default_bounds", reason));
                };
                Features::All { default, overrides }
            }
            toml::Value::Array(items) => {
                let names = expand_columns(&items, label).map_err(|(key, r)| invalid(&key, r))?;
                let mut columns = assign_bounds(names, default, overrides)
                    .map_err(|(key, r)| invalid(&key, r))?;
                for name in &spec.features.log_scale {
                    let Some((_, bounds)) = columns.iter_mut().find(|(n, _)| n == name) else {
                        let reason = format!("{name:?} is not in `features.columns`");
                        return Err(invalid("features.log_scale", reason));
                    };
                    *bounds = bounds.logarithmic();
                }
                Features::Listed(columns)
            }
            _ => {
                let reason = "must be \"all\" or a list of column names".to_owned();
                return Err(invalid("features.columns", reason));
            }
        };

        Ok(Self {
            origin: origin.to_owned(),
            label: spec.label,
            classes: spec.classes,
            features,
            extra_columns: spec.extra_columns,
        })
    }

    /// Where the schema came from (its file, or the origin given to [`Schema::from_toml_str`]).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Name of the label column.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Number of classes; labels lie in `0..classes`.
    pub fn classes(&self) -> u32 {
        self.classes
    }

    /// What the loader does with columns that are neither the label nor a feature.
    pub fn extra_columns(&self) -> ExtraColumns {
        self.extra_columns
    }

    /// Number of features, when the schema lists them (`None` with `columns = "all"`, where
    /// the file decides).
    pub fn feature_count(&self) -> Option<usize> {
        match &self.features {
            Features::Listed(columns) => Some(columns.len()),
            Features::All { .. } => None,
        }
    }

    pub(super) fn features(&self) -> &Features {
        &self.features
    }
}

/// Expands the entries of `features.columns` into names, rejecting duplicates and the label.
fn expand_columns(items: &[toml::Value], label: &str) -> Result<Vec<String>, (String, String)> {
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let key = format!("features.columns[{i}]");
        let Some(entry) = item.as_str() else {
            return Err((key, "must be a column name (a string)".to_owned()));
        };
        let before = names.len();
        expand_entry(entry, &mut names).map_err(|reason| (key.clone(), reason))?;
        if names.len() > MAX_FEATURES {
            return Err((key, format!("more than {MAX_FEATURES} feature columns")));
        }
        for name in &names[before..] {
            if name == label {
                return Err((key, format!("`{name}` is the label column")));
            }
            if !seen.insert(name.clone()) {
                return Err((key, format!("`{name}` is listed twice")));
            }
        }
    }
    if names.is_empty() {
        return Err(("features.columns".to_owned(), "lists no column".to_owned()));
    }
    Ok(names)
}

/// Appends the names one entry stands for: itself, or `prefix{a..b}suffix` expanded.
fn expand_entry(entry: &str, names: &mut Vec<String>) -> Result<(), String> {
    if entry.is_empty() || entry.trim() != entry {
        return Err("must be a non-empty name without surrounding spaces".to_owned());
    }
    let Some((prefix, rest)) = entry.split_once('{') else {
        if entry.contains('}') {
            return Err(format!("`{entry}` has `}}` without `{{`"));
        }
        names.push(entry.to_owned());
        return Ok(());
    };
    let malformed = || format!("`{entry}` is not of the form `name{{first..last}}`");
    let (range, suffix) = rest.split_once('}').ok_or_else(malformed)?;
    if suffix.contains(['{', '}']) || prefix.contains('}') {
        return Err(malformed());
    }
    let (first, last) = range.split_once("..").ok_or_else(malformed)?;
    let parse = |digits: &str| {
        // Digits only: `u32::from_str` would also take a sign, which a range has no use for.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        digits.parse::<u32>().map_err(|_| malformed())
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first > last {
        return Err(format!("`{entry}` has its first index above its last"));
    }
    if (last - first) as usize >= MAX_FEATURES {
        return Err(format!(
            "`{entry}` stands for more than {MAX_FEATURES} columns"
        ));
    }
    names.extend((first..=last).map(|n| format!("{prefix}{n}{suffix}")));
    Ok(())
}

/// Pairs each listed feature with its bounds: its own entry, else the default.
fn assign_bounds(
    names: Vec<String>,
    default: Option<Bounds>,
    mut overrides: BTreeMap<String, Bounds>,
) -> Result<Vec<(String, Bounds)>, (String, String)> {
    let mut columns = Vec::with_capacity(names.len());
    for name in names {
        let bounds = match overrides.remove(&name).or(default) {
            Some(bounds) => bounds,
            None => {
                let key = format!("features.bounds.{name}");
                let reason = "is missing and there is no `features.default_bounds`".to_owned();
                return Err((key, reason));
            }
        };
        columns.push((name, bounds));
    }
    // Whatever is left names no listed feature: most likely a misspelling.
    if let Some(name) = overrides.keys().next() {
        let reason = "names a column that is not in `features.columns`".to_owned();
        return Err((format!("features.bounds.{name}"), reason));
    }
    Ok(columns)
}

impl Bounds {
    /// Bounds `[lo, hi]`.
    ///
    /// # Errors
    ///
    /// A reason, if either bound is not finite, `lo >= hi`, or `hi - lo` overflows.
    pub fn new(lo: f64, hi: f64) -> Result<Self, &'static str> {
        if !lo.is_finite() || !hi.is_finite() {
            return Err("bounds must be finite numbers");
        }
        if lo >= hi {
            return Err("the lower bound must be below the upper bound");
        }
        if !(hi - lo).is_finite() {
            return Err("the bounds are too far apart to scale between");
        }
        Ok(Self { lo, hi, log: false })
    }

    /// The same bounds with logarithmic scaling: `ln(1 + x - lo) / ln(1 + hi - lo)` after
    /// clamping. For heavy-tailed counts and amounts (capital gains, visits), where linear
    /// scaling to a public maximum squeezes almost every value next to 0.
    ///
    /// ```
    /// use athanor_node::data::Bounds;
    ///
    /// let gain = Bounds::new(0.0, 99999.0).unwrap().logarithmic();
    /// assert_eq!(gain.scale(0.0), 0.0);
    /// assert_eq!(gain.scale(99999.0), 1.0);
    /// assert!((gain.scale(5000.0) - 0.74).abs() < 0.01);
    /// ```
    pub fn logarithmic(self) -> Self {
        Self { log: true, ..self }
    }

    /// Whether values are scaled logarithmically.
    pub fn is_logarithmic(&self) -> bool {
        self.log
    }

    /// The lower bound.
    pub fn lo(&self) -> f64 {
        self.lo
    }

    /// The upper bound.
    pub fn hi(&self) -> f64 {
        self.hi
    }

    /// Clamps `x` to the bounds and scales it to `[0, 1]`:
    /// `(min(max(x, lo), hi) - lo) / (hi - lo)`.
    ///
    /// Computed in `f64`, so `lo` maps to exactly 0 and `hi` to exactly 1, and rounded once to
    /// `f32`. `x` must not be NaN (the loader rejects NaN cells before scaling).
    ///
    /// ```
    /// use athanor_node::data::Bounds;
    ///
    /// let age = Bounds::new(17.0, 90.0).unwrap();
    /// assert_eq!(age.scale(17.0), 0.0);
    /// assert_eq!(age.scale(53.5), 0.5);
    /// assert_eq!(age.scale(120.0), 1.0);
    /// assert_eq!(age.scale(3.0), 0.0);
    /// ```
    pub fn scale(&self, x: f64) -> f32 {
        let shifted = x.clamp(self.lo, self.hi) - self.lo;
        if self.log {
            return (shifted.ln_1p() / (self.hi - self.lo).ln_1p()) as f32;
        }
        (shifted / (self.hi - self.lo)) as f32
    }
}

impl fmt::Display for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.lo, self.hi)?;
        if self.log {
            f.write_str(" (log)")?;
        }
        Ok(())
    }
}

/// The schema file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaSpec {
    #[serde(default = "default_label")]
    label: String,
    classes: u32,
    #[serde(default)]
    extra_columns: ExtraColumns,
    features: FeaturesSpec,
}

/// The `[features]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturesSpec {
    /// `"all"` or a list of names; read as a raw value so a wrong shape gets a clear message.
    columns: toml::Value,
    #[serde(default)]
    default_bounds: Option<[f64; 2]>,
    #[serde(default)]
    bounds: BTreeMap<String, [f64; 2]>,
    /// Listed features scaled logarithmically.
    #[serde(default)]
    log_scale: Vec<String>,
}

fn default_label() -> String {
    "label".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(entry: &str) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        expand_entry(entry, &mut names).map(|()| names)
    }

    #[test]
    fn range_entries_expand_inclusively_with_prefix_and_suffix() {
        assert_eq!(names("px{0..2}").unwrap(), ["px0", "px1", "px2"]);
        assert_eq!(names("f{7..7}_x").unwrap(), ["f7_x"]);
        assert_eq!(names("age").unwrap(), ["age"]);
    }

    #[test]
    fn malformed_range_entries_are_rejected() {
        for entry in [
            "px{0..}",
            "px{..3}",
            "px{3..1}",
            "px{0..2",
            "px}",
            "px{-1..2}",
            "a{0..1}{0..1}",
            " px",
        ] {
            assert!(names(entry).is_err(), "{entry} was accepted");
        }
    }

    #[test]
    fn bounds_reject_empty_reversed_and_infinite_intervals() {
        assert!(Bounds::new(1.0, 1.0).is_err());
        assert!(Bounds::new(2.0, 1.0).is_err());
        assert!(Bounds::new(f64::NAN, 1.0).is_err());
        assert!(Bounds::new(0.0, f64::INFINITY).is_err());
        assert!(Bounds::new(-f64::MAX, f64::MAX).is_err());
    }
}
