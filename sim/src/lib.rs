//! Athanor's simulator: one coordinator and many virtual nodes in one process.
//!
//! The nodes and the coordinator are the production ones ([`athanor_node::Node`],
//! [`athanor_coordinator::server::serve`]) talking gRPC over in-memory pipes
//! ([`transport`]); only the data partitioning ([`partition`]) and the reporting ([`run`])
//! are the simulator's own.

#![warn(missing_docs)]

pub mod config;
pub mod partition;
pub mod run;
pub mod transport;

use std::path::PathBuf;

pub use config::SimConfig;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid configuration {}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The output directory already holds a model store or node ledgers from another run.
    #[error("{} already holds results of another run; choose a new --out directory", .0.display())]
    OutputExists(PathBuf),
    /// The data does not fit the configured model.
    #[error("{0}")]
    Mismatch(String),
    /// The dataset cannot be partitioned as asked.
    #[error("partitioning: {0}")]
    Partition(#[from] partition::PartitionError),
    /// Loading data or running a node failed.
    #[error(transparent)]
    Node(#[from] athanor_node::Error),
    /// The coordinator failed.
    #[error(transparent)]
    Coordinator(#[from] athanor_coordinator::Error),
    /// A background task failed.
    #[error("task failed: {0}")]
    Task(String),
}

impl From<athanor_node::data::DataError> for Error {
    fn from(e: athanor_node::data::DataError) -> Self {
        Error::Node(e.into())
    }
}

impl From<athanor_coordinator::store::StoreError> for Error {
    fn from(e: athanor_coordinator::store::StoreError) -> Self {
        Error::Coordinator(e.into())
    }
}
