//! End-to-end tests live in the `tests/` folder of this crate; the library itself is empty.
