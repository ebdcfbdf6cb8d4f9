//! How the node reaches its coordinator: mutual TLS from `[tls]`, or plaintext when run with
//! `--insecure`.
//!
//! Everything is checked when the node starts, before its data is loaded or anyone is dialed:
//! the TLS files must be readable, the CA and this node's certificate must not have expired
//! (one expiring within 30 days is warned about), and the certificate must name this node,
//! `[node] id`, since the coordinator takes the node's id from it. Once running, a refused
//! connection is logged with the reason in plain words ([`crate::Error::Rpc`]).

use std::path::Path;
use std::time::Duration;

use athanor_tls::explain::{Dialed, Settings};
use athanor_tls::{ClientSecurity, ClientTls, Identity};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tracing::warn;

use crate::Error;
use crate::config::NodeConfig;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the node's TLS settings are, for explanations of failed connections.
pub(crate) fn settings(dialed: Dialed) -> Settings<'static> {
    Settings {
        dialed,
        ca: "[tls] ca",
        identity: "[tls] cert and key",
    }
}

/// The node's transport security: plaintext when `insecure` (the command line's
/// `--insecure`), mutual TLS from `[tls]` otherwise.
///
/// # Errors
/// [`Error::Tls`] when `[tls]` is missing without `insecure`, a file is unusable, a
/// certificate has expired, or the certificate names another node.
pub fn security(config: &NodeConfig, insecure: bool) -> Result<ClientSecurity, Error> {
    if insecure {
        warn!(
            address = %config.coordinator.address,
            "dialing the coordinator WITHOUT TLS (--insecure): nobody checks who answers, and \
             anyone on the path can read and change this node's updates. For tests only"
        );
        return Ok(ClientSecurity::InsecurePlaintext);
    }
    let Some(section) = &config.tls else {
        return Err(Error::Tls(
            "the node dials its coordinator with mutual TLS unless run with --insecure, and \
             this config has no [tls] section: ask the federation's operator for this node's \
             files (`athanor-coordinator certs issue --node ID` writes ca.crt, node.crt, \
             node.key and a node.toml with [tls] filled in), or pass --insecure to dial \
             plaintext in a test"
                .into(),
        ));
    };

    let identity = section.cert.as_deref().zip(section.key.as_deref());
    let tls = ClientTls::load(&section.ca, identity, section.server_name.clone())
        .map_err(|e| Error::Tls(format!("[tls]: {e}")))?;
    let renew = "ask the federation's operator for a new one (`athanor-coordinator certs issue \
                 --node ID`)";
    let warnings = tls
        .check_validity(OffsetDateTime::now_utc(), renew)
        .map_err(|e| Error::Tls(format!("[tls]: {e}")))?;
    for warning in warnings {
        warn!("{warning}");
    }
    check_identity(&tls, &config.node.id)?;
    Ok(ClientSecurity::MutualTls(Box::new(tls)))
}

/// Checks that this node's certificate names `[node] id`; warns when there is none.
fn check_identity(tls: &ClientTls, id: &str) -> Result<(), Error> {
    let (Some(certificate), Some(key)) = (tls.certificate(), tls.key()) else {
        warn!(
            "[tls] has no cert and key: this node cannot prove who it is, and coordinators \
             refuse it; set them to the files `athanor-coordinator certs issue --node ID` wrote"
        );
        return Ok(());
    };
    if let Some(mode) = key.loose_permissions() {
        warn!(
            key = %key.path().display(),
            mode = format!("{mode:o}"),
            "the node's private key can be read by others than its owner; chmod 600 it"
        );
    }
    let refuse = |path: &Path, message: String| {
        Error::Tls(format!("[tls] cert {}: {message}", path.display()))
    };
    match Identity::of_certificate(certificate.first()) {
        Ok(Identity::Node(certified)) if certified == id => Ok(()),
        Ok(Identity::Node(certified)) => Err(refuse(
            certificate.path(),
            format!(
                "is node {certified}'s certificate, but [node] id is {id:?}: use this node's \
                 own certificate, or set [node] id = \"{certified}\""
            ),
        )),
        Ok(Identity::Operator(name)) => Err(refuse(
            certificate.path(),
            format!(
                "is operator {name}'s certificate, not a node's: use the node.crt and node.key \
                 of `athanor-coordinator certs issue --node {id}`"
            ),
        )),
        Err(e) => Err(refuse(certificate.path(), e.to_string())),
    }
}

/// `error` in words, with the reason the coordinator refused this node first when the error
/// does not say it and `tls` can find it out (see [`ClientTls::diagnose`]).
pub async fn why(tls: Option<&ClientTls>, error: &Error) -> String {
    let Error::Rpc {
        address, status, ..
    } = error
    else {
        return error.to_string();
    };
    let explained = athanor_tls::explain::explain(status.as_ref(), settings(Dialed::Tls));
    let Some(tls) = tls.filter(|_| explained.is_none()) else {
        return error.to_string();
    };
    let (tls, address) = (tls.clone(), address.clone());
    let probe = tokio::task::spawn_blocking(move || tls.diagnose(&address, settings(Dialed::Tls)));
    match probe.await {
        Ok(Some(reason)) => format!("{reason} ({error})"),
        _ => error.to_string(),
    }
}

/// A channel to the coordinator at `[coordinator] address`, secured by `security`. It
/// connects lazily: the first call dials, and its error says why it failed.
///
/// # Errors
/// [`Error::Tls`] when the address is not a URL or its scheme does not match `security`
/// (`https://` for TLS, `http://` with `--insecure`).
pub fn channel(config: &NodeConfig, security: &ClientSecurity) -> Result<Channel, Error> {
    let endpoint = security
        .endpoint(&config.coordinator.address)
        .map_err(|e| Error::Tls(format!("[coordinator] {e}")))?;
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        [node]
        id = "clinic-a"
        [coordinator]
        address = "https://127.0.0.1:50051"
        [data]
        path = "d.csv"
        schema = "s.toml"
        [privacy]
        epsilon = 1.0
    "#;

    fn parse(text: &str) -> Result<NodeConfig, Error> {
        NodeConfig::parse(text, Path::new("node.toml"))
    }

    #[test]
    fn without_tls_files_or_insecure_the_node_says_how_to_get_them() {
        let config = parse(CONFIG).unwrap();
        let err = security(&config, false).unwrap_err().to_string();
        assert!(
            err.contains("no [tls] section") && err.contains("certs issue --node"),
            "{err}"
        );
        assert!(matches!(
            security(&config, true),
            Ok(ClientSecurity::InsecurePlaintext)
        ));
    }

    #[test]
    fn a_cert_without_its_key_is_a_config_error() {
        let text = format!("{CONFIG}\n[tls]\nca = \"ca.crt\"\ncert = \"node.crt\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("[tls] cert and key go together"), "{err}");
    }

    #[test]
    fn insecure_with_an_https_address_says_which_scheme_to_write() {
        let config = parse(CONFIG).unwrap();
        let err = channel(&config, &ClientSecurity::InsecurePlaintext)
            .unwrap_err()
            .to_string();
        assert!(err.contains("write http://127.0.0.1:50051"), "{err}");
    }
}
