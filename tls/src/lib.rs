//! Transport security shared by the node, the coordinator and the operator's CLI.
//!
//! Every connection to a coordinator, from a node or from an operator, is mutual TLS by
//! default: each side proves who it is with a certificate signed by the federation's own CA,
//! and trusts no other issuer. A node's identity is its certificate; the coordinator reads the
//! node id from it rather than trusting what the node claims. Plaintext exists only for tests
//! and trusted networks, chosen with `--insecure` on the command line, never by a config file.
//!
//! - [`files`]: the PEM files a side loads (the CA, its certificate, its key);
//! - [`identity`]: who a certificate names (a node or an operator), written as a URI in its
//!   subject alternative names;
//! - [`validity`]: expiry checks when a process starts, with a warning 30 days ahead;
//! - [`client`]: endpoints for dialing a coordinator, with mutual TLS or explicitly without;
//! - [`explain`]: failed connections in words that say what to fix, found by walking the
//!   error's chain of causes down to rustls and the operating system.
//!
//! Creating the CA and issuing certificates is the coordinator's `certs` command; the
//! coordinator's own listener is in its `tls` module. Everything here uses rustls with the
//! *ring* provider, like tonic's `tls-ring`: mixing in aws-lc-rs would make rustls unable to
//! pick a provider at run time.

#![warn(missing_docs)]

pub mod client;
pub mod explain;
pub mod files;
pub mod identity;
pub mod validity;

use std::path::PathBuf;

pub use client::{ClientSecurity, ClientTls};
pub use identity::Identity;

/// Errors of the transport-security library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    ///
    /// The cause is part of the message rather than a chained source: callers fold these
    /// errors into their own messages with `{e}`, and a chained source would then be printed
    /// twice by reporters that walk the chain.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A PEM file holds nothing usable of the kind expected.
    #[error("{}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing or malformed, and how to get a good file.
        message: String,
    },
    /// A certificate cannot be used: expired, not yet valid, or naming no Athanor identity.
    #[error("{}: {message}", path.display())]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong and what to do about it.
        message: String,
    },
    /// An address that cannot be dialed the way this process was told to dial.
    #[error("coordinator address {address:?}: {message}")]
    Address {
        /// The address as written.
        address: String,
        /// What is wrong and how to write it.
        message: String,
    },
    /// The TLS settings were refused when the connection was set up.
    #[error("TLS settings: {0}")]
    Transport(#[from] tonic::transport::Error),
}
