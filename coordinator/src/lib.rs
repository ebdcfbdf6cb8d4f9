//! The Athanor coordinator: runs rounds of federated training, aggregates the nodes' updates,
//! publishes immutable model versions and answers operators.
//!
//! - [`config`]: the TOML configuration, validated when loaded;
//! - [`round`]: the round state machine shared by the gRPC services and the round driver;
//! - [`strategy`]: aggregation (FedAvg);
//! - [`store`]: the on-disk model store;
//! - [`pause`]: the operator's pause, kept in the store directory across restarts;
//! - [`export`]: a version's weights as a safetensors or `.npy` file for other tools;
//! - [`service`]: the node-facing and admin gRPC services over [`round::Coordinator`];
//! - [`tls`]: the listener's mutual TLS (or `--insecure` plaintext);
//! - [`access`]: who may call what, from the client's verified certificate;
//! - [`certs`]: provisioning the federation's CA and certificates (`certs init`, `issue`);
//! - [`server`]: wiring it all to a listener, for the binary and the simulator.

#![warn(missing_docs)]

pub mod access;
pub mod certs;
pub mod config;
pub mod export;
pub mod node_privacy;
pub mod pause;
pub mod round;
pub mod secure;
pub mod server;
pub mod service;
pub mod store;
pub mod strategy;
pub mod tls;

use std::path::PathBuf;

pub use config::CoordinatorConfig;
pub use round::Coordinator;

/// Errors of the coordinator library.
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
    /// The configuration file is invalid.
    #[error("invalid configuration {}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the section and key.
        message: String,
    },
    /// The model store failed.
    #[error("model store: {0}")]
    Store(#[from] store::StoreError),
    /// A caller named a session the coordinator does not know (never joined, or replaced by a
    /// newer join of the same node).
    #[error("unknown session; join again")]
    UnknownSession,
    /// A watch-only session asked for something only a training session may do (a task, an
    /// update, a decline).
    #[error(
        "this session is watch-only (joined as an observer): it may fetch models, and takes no \
         part in rounds"
    )]
    WatchOnly,
    /// A node speaks another protocol version.
    #[error("protocol version {got} is not supported; this coordinator speaks {expected}")]
    ProtocolVersion {
        /// The coordinator's version.
        expected: u32,
        /// The node's version.
        got: u32,
    },
    /// A request is malformed (bad field, wrong length, non-finite value).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A request does not fit the round now open (another round, not in the cohort, twice).
    #[error("{0}")]
    WrongRound(String),
    /// The requested version does not exist.
    #[error("version {0} not found")]
    VersionNotFound(u64),
    /// The listener could not be set up or failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Transport security could not be set up: missing or unusable certificate files.
    #[error("transport security: {0}")]
    Tls(String),
    /// The coordinator is shutting down.
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// The federation stopped before publishing every round it was configured for.
    #[error("the federation gave up: {0}")]
    GaveUp(String),
}
