//! What Athanor's node and coordinator share.
//!
//! This crate is synchronous and free of networking: models and their flat parameter layout,
//! DP-SGD, privacy accounting, the configuration types both sides agree on, and the model file
//! formats both sides write ([`export`]).

#![warn(missing_docs)]

pub mod accountant;
pub mod audit;
pub mod dpsgd;
pub mod export;
pub mod model;
pub mod noise;
pub mod params;
pub mod plan;
pub mod secagg;
