//! The Athanor node: runs next to an organization's data, trains locally with DP-SGD and
//! sends only clipped, noised updates to the coordinator.
//!
//! - [`config`]: the node's TOML configuration: privacy budget and floor;
//! - [`data`]: loading and validating local CSV data against a schema of public bounds;
//! - [`ledger`]: the file on disk that records every round's privacy spending;
//! - [`budget`]: the check that keeps every round within the operator's budget;
//! - [`transport`]: reaching the coordinator over mutual TLS, or plaintext with `--insecure`;
//! - [`client`]: the wire protocol, seen from the node;
//! - [`worker`]: the main loop (join, poll, check, train, record, submit);
//! - [`fetch`]: saving a published model version to a file, with a watch-only session;
//! - [`calculator`]: the `privacy` command-line calculator, shared with the simulator.

#![warn(missing_docs)]

pub mod budget;
pub mod calculator;
pub mod client;
pub mod config;
pub mod data;
pub mod fetch;
pub mod ledger;
pub mod transport;
pub mod worker;

use std::path::PathBuf;

pub use config::NodeConfig;
pub use worker::{Node, Randomness, RunSummary};

/// Errors of the node library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
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
    /// The local data or its schema is invalid.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// A call to the coordinator failed.
    #[error(
        "{call} to coordinator at {address} failed: {}",
        describe(status, address)
    )]
    Rpc {
        /// The coordinator's address.
        address: String,
        /// The RPC.
        call: &'static str,
        /// What the transport or the coordinator said.
        status: Box<tonic::Status>,
    },
    /// The coordinator sent something this node cannot use.
    #[error("coordinator sent an unusable message: {0}")]
    Protocol(String),
    /// Local training failed.
    #[error("training: {0}")]
    Training(#[from] athanor_core::model::ModelError),
    /// Privacy accounting failed.
    #[error("privacy accounting: {0}")]
    Accountant(#[from] athanor_core::accountant::AccountantError),
    /// The privacy ledger cannot be read or written; the node does not train without it.
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    /// A file could not be written, or exists and may not be replaced.
    #[error(transparent)]
    Write(#[from] athanor_core::export::WriteError),
    /// Transport security cannot be set up: `[tls]` missing, a file unusable or expired, or a
    /// certificate naming another node.
    #[error("transport security: {0}")]
    Tls(String),
}

/// A status in words a node operator can act on: what went wrong and what to change, when the
/// failure is one [`athanor_tls::explain`] recognises, then what the transport said.
fn describe(status: &tonic::Status, address: &str) -> String {
    use std::error::Error as _;
    let dialed = if address.starts_with("https://") {
        athanor_tls::explain::Dialed::Tls
    } else {
        athanor_tls::explain::Dialed::Plaintext
    };
    let explained = athanor_tls::explain::explain(status, transport::settings(dialed));
    let mut text = match status.code() {
        tonic::Code::Unavailable => format!("coordinator unreachable ({})", status.message()),
        code => format!("{code:?}: {}", status.message()),
    };
    let mut source = status.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    match explained {
        Some(why) => format!("{why} ({text})"),
        None => text,
    }
}
