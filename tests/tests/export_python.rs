//! `athanor-coordinator versions export` writes files that Python's NumPy and `safetensors`
//! packages read back bit for bit: the real binary exports a version from a store directory in
//! both formats, and Python prints the float32 bytes it loaded as hex.
//!
//! Needs `python3` with `numpy` and `safetensors` (`pip install numpy safetensors`). Without
//! `python3` the test says so and passes; with `python3` but without the packages it fails, so
//! that a missing package is never mistaken for a passing test.

mod support;

use std::path::Path;
use std::process::Command;

use athanor_coordinator::store::{ManifestDraft, ModelStore};
use athanor_core::model::{Architecture, ModelSpec};
use serde_json::Value;
use support::binaries;

/// Loads the `.npy` file (argv[1]) with NumPy and the `.safetensors` file (argv[2]) with
/// `safetensors.numpy`, and prints one JSON object: each array's dtype, shape and
/// little-endian float32 bytes as hex.
const PYTHON_READER: &str = r#"
import json, sys
import numpy
from safetensors.numpy import load_file

def describe(array):
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "hex": array.astype("<f4").tobytes().hex(),
    }

flat = numpy.load(sys.argv[1])
tensors = load_file(sys.argv[2])
print(json.dumps({
    "npy": describe(flat),
    "safetensors": {name: describe(array) for name, array in tensors.items()},
}))
"#;

const SPEC: ModelSpec = ModelSpec {
    architecture: Architecture::Mlp { hidden: 3 },
    features: 4,
    classes: 2,
};

/// Parameters with awkward bit patterns (signed zeros, subnormals, extremes) followed by
/// ordinary values, so an export or a reader that is not bit-exact shows.
fn params(salt: f32) -> Vec<f32> {
    let special = [
        -0.0,
        0.0,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::EPSILON,
        1.0 / 3.0,
    ];
    (0..SPEC.num_params())
        .map(|i| special.get(i).copied().unwrap_or(salt + i as f32 * -0.37))
        .collect()
}

fn le_hex(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    hex::encode(bytes)
}

/// Whether `python3` can run; `None` when it is not installed.
fn python_imports_ok() -> Option<std::process::Output> {
    let output = Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output();
    match output {
        Ok(output) => Some(output),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => panic!("running python3: {err}"),
    }
}

/// Runs `athanor-coordinator versions export VERSION` from `store` into `out` and returns its
/// JSON report.
fn export(store: &Path, version: u64, format: &str, out: &Path) -> Value {
    let output = Command::new(&binaries().coordinator)
        .args([
            "versions",
            "export",
            &version.to_string(),
            "--format",
            format,
        ])
        .arg("--out")
        .arg(out)
        .arg("--store")
        .arg(store)
        .arg("--json")
        .output()
        .expect("run athanor-coordinator");
    assert!(
        output.status.success(),
        "export --format {format} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("export --json prints one JSON object")
}

#[test]
fn numpy_and_safetensors_read_the_exported_parameters_bit_for_bit() {
    // Python is optional on developer machines; CI installs it with both packages.
    let Some(imports) = python_imports_ok() else {
        eprintln!("SKIPPED: python3 is not installed, so the export is not checked from Python");
        return;
    };
    assert!(
        imports.status.success(),
        "python3 cannot import numpy and safetensors; run `python3 -m pip install numpy \
         safetensors`:\n{}",
        String::from_utf8_lossy(&imports.stderr)
    );

    // A store with two versions; version 1 is exported, so the number is honoured.
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = ModelStore::open(&store_dir).unwrap();
    store
        .publish(ManifestDraft::initial(SPEC, Some(7), "0.1.0"), &params(0.5))
        .unwrap();
    let mut draft = ManifestDraft::initial(SPEC, Some(7), "0.1.0");
    draft.parent = Some(0);
    draft.round = 1;
    draft.strategy = "fedavg".to_owned();
    draft.contributors = 1;
    let published = params(-2.25);
    store.publish(draft, &published).unwrap();
    drop(store);

    // Export in both formats with the real binary.
    let npy = dir.path().join("model.npy");
    let safetensors = dir.path().join("model.safetensors");
    let npy_report = export(&store_dir, 1, "npy", &npy);
    let st_report = export(&store_dir, 1, "safetensors", &safetensors);
    assert_eq!(npy_report["version"], 1);
    assert_eq!(npy_report["num_params"], published.len());
    assert_eq!(npy_report["tensors"], st_report["tensors"]);

    // Read both back in Python.
    let output = Command::new("python3")
        .args(["-c", PYTHON_READER])
        .arg(&npy)
        .arg(&safetensors)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "python3 could not read the exports:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Value = serde_json::from_slice(&output.stdout).expect("python prints JSON");

    // The .npy file is the flat parameter vector.
    let flat = &read["npy"];
    assert_eq!(flat["dtype"], "<f4");
    assert_eq!(flat["shape"], serde_json::json!([published.len()]));
    assert_eq!(flat["hex"], le_hex(&published));

    // The .safetensors file holds each tensor the export lists, at its offset in that vector.
    let tensors = st_report["tensors"]
        .as_array()
        .expect("tensors is an array");
    let loaded = read["safetensors"].as_object().expect("a dict of tensors");
    assert_eq!(loaded.len(), tensors.len(), "tensors: {loaded:?}");
    let mut covered = 0;
    for tensor in tensors {
        let name = tensor["name"].as_str().expect("tensor name");
        let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone()).unwrap();
        let offset = tensor["offset"].as_u64().expect("tensor offset") as usize;
        let len: usize = shape.iter().product();
        let array = &loaded[name];
        assert_eq!(array["dtype"], "<f4", "{name}");
        assert_eq!(array["shape"], tensor["shape"], "{name}");
        assert_eq!(
            array["hex"],
            le_hex(&published[offset..offset + len]),
            "{name}"
        );
        covered += len;
    }
    assert_eq!(covered, published.len());
}
