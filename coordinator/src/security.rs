//! The command line's transport-security flags, shared by every subcommand: `--insecure`, and
//! `--tls-dir` for the commands that talk to a running coordinator.
//!
//! `serve` serves mutual TLS from its config's `[server.tls]`, or plaintext with `--insecure`.
//! The admin commands connect with mutual TLS using the operator's files in `--tls-dir` (or
//! `$ATHANOR_TLS_DIR`): `ca.crt`, `operator.crt` and `operator.key`, as `certs init` writes
//! them; with `--insecure` they connect in plaintext, to a coordinator started with it. The
//! flags are recorded once, when the command line is parsed ([`install`]), and [`endpoint`]
//! applies them wherever the admin client connects, so no command can forget them.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use athanor_coordinator::CoordinatorConfig;
use athanor_coordinator::certs::names;
use athanor_coordinator::tls::Transport;
use athanor_tls::explain::{self, Settings};
use athanor_tls::{ClientSecurity, ClientTls};
use clap::Args;
use tonic::transport::Endpoint;
use tracing::warn;

/// `--insecure` and `--tls-dir`, accepted by every subcommand.
#[derive(Debug, Clone, Default, Args)]
pub struct SecurityArgs {
    /// Serve, or connect to the coordinator, in plaintext without TLS. Nothing is
    /// authenticated or encrypted, so any peer can pose as any node or operator: for tests on
    /// a trusted machine only. Warns every time it is used.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Directory of the operator's TLS files, ca.crt, operator.crt and operator.key (as `certs
    /// init` or `certs issue --operator` write them), for the commands that talk to a running
    /// coordinator.
    #[arg(long, global = true, value_name = "DIR", env = "ATHANOR_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
}

static CHOSEN: OnceLock<SecurityArgs> = OnceLock::new();

/// Records the flags for [`endpoint`]; the first call wins.
pub fn install(args: &SecurityArgs) {
    let _ = CHOSEN.set(args.clone());
}

/// How `serve` secures its listener, from the config and the flags.
///
/// # Errors
/// When `[server.tls]` is missing without `--insecure`, or its files are unusable.
pub fn serve_transport(config: &CoordinatorConfig, args: &SecurityArgs) -> Result<Transport> {
    Transport::from_config(&config.server, args.insecure).context("setting up mutual TLS")
}

/// An endpoint for the admin service at `address`, secured as the flags say.
///
/// # Errors
/// When neither `--tls-dir` nor `--insecure` is given, the operator's files are unusable or
/// expired, or the address's scheme does not match (`https://` for TLS, `http://` without).
pub fn endpoint(address: &str) -> Result<Endpoint> {
    let args = CHOSEN.get().cloned().unwrap_or_default();
    let security = if args.insecure {
        warn!(
            %address,
            "connecting WITHOUT TLS (--insecure): the coordinator is not authenticated and the \
             traffic is readable by anyone on the path"
        );
        ClientSecurity::InsecurePlaintext
    } else {
        let Some(dir) = args.tls_dir else {
            bail!(
                "the admin service needs mutual TLS: pass --tls-dir DIR (or set \
                 ATHANOR_TLS_DIR), the directory holding ca.crt, operator.crt and operator.key \
                 that `athanor-coordinator certs init` wrote; or pass --insecure for a \
                 coordinator started with --insecure"
            );
        };
        let cert = dir.join(names::OPERATOR_CERT);
        let key = dir.join(names::OPERATOR_KEY);
        let tls = ClientTls::load(&dir.join(names::CA_CERT), Some((&cert, &key)), None)
            .with_context(|| format!("loading the operator's TLS files from {}", dir.display()))?;
        let renew = "issue a new one with `athanor-coordinator certs issue --ca-dir DIR \
                     --operator NAME`";
        for warning in tls.check_validity(time::OffsetDateTime::now_utc(), renew)? {
            warn!("{warning}");
        }
        ClientSecurity::MutualTls(Box::new(tls))
    };
    Ok(security.endpoint(address)?)
}

/// Why an admin call to `address` failed, in words, when the failure was the connection's
/// (see [`athanor_tls::explain`]). When the transport does not say, dials once more to read
/// the coordinator's refusal ([`ClientTls::diagnose`]); that blocks for a few seconds at most,
/// on a command that has failed anyway.
pub fn explain(status: &tonic::Status, address: &str) -> Option<String> {
    let args = CHOSEN.get().cloned().unwrap_or_default();
    let settings = Settings {
        dialed: if args.insecure {
            explain::Dialed::Plaintext
        } else {
            explain::Dialed::Tls
        },
        ca: "ca.crt in --tls-dir",
        identity: "operator.crt and operator.key in --tls-dir",
    };
    if let Some(explained) = explain::explain(status, settings) {
        return Some(explained);
    }
    let dir = args
        .tls_dir
        .filter(|_| !args.insecure && is_transport_failure(status))?;
    let cert = dir.join(names::OPERATOR_CERT);
    let key = dir.join(names::OPERATOR_KEY);
    let tls = ClientTls::load(&dir.join(names::CA_CERT), Some((&cert, &key)), None).ok()?;
    tls.diagnose(address, settings)
}

/// Whether a status came from the connection rather than from the coordinator.
fn is_transport_failure(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}
