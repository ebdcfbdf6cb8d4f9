//! Failed connections to a coordinator, explained in words that say what to fix.
//!
//! What a failed handshake leaves behind is a chain of causes: a gRPC status, a transport
//! error, hyper's, then an I/O error wrapping the rustls error that says what happened
//! (`UnknownIssuer`, an alert the coordinator sent, ...). [`explain`] walks that chain and
//! recognises the failures a person meets when setting up a federation:
//!
//! | seen | meaning |
//! |---|---|
//! | rustls `InvalidCertificate(UnknownIssuer / BadSignature)` | the coordinator's certificate comes from another CA |
//! | rustls `InvalidCertificate(Expired)` | the coordinator's certificate has expired |
//! | rustls `InvalidCertificate(NotValidForName)` | it does not cover the host dialed |
//! | alert `unknown_ca` / `decrypt_error` received | the coordinator does not trust this side's certificate |
//! | alert `certificate_expired` received | it found this side's certificate expired |
//! | alert `certificate_required` received | this side presented no certificate |
//! | rustls `InvalidMessage`, or end of stream in the handshake | the coordinator does not speak TLS |
//! | [`PLAINTEXT_REFUSED`], or a hang-up, when dialing plaintext | the coordinator speaks TLS |
//! | connection refused | nothing listens there |
//!
//! Anything else yields `None`, and the caller shows the chain as it is. Explanations never
//! replace the chain: callers print both, so nothing the libraries said is lost.
//!
//! [`refused_client`] does the same on the coordinator's side, for its log of refused
//! handshakes.

use std::error::Error as StdError;
use std::io;

use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError};

/// What an Athanor coordinator tells a client that dialed it in plaintext, as the debug data
/// of an HTTP/2 `GOAWAY`: the client's HTTP/2 library prints it in its error, and [`explain`]
/// recognises it there.
pub const PLAINTEXT_REFUSED: &str = "this coordinator serves mutual TLS only: dial it with \
                                     https:// and this side's TLS files, without --insecure";

/// How the failed connection was dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialed {
    /// With TLS (`https://`).
    Tls,
    /// In plaintext (`http://`, with `--insecure`).
    Plaintext,
}

/// Where the side that failed to connect keeps its TLS settings, so an explanation can name
/// the setting to change.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// How it dialed.
    pub dialed: Dialed,
    /// Where its CA certificate is set, e.g. `[tls] ca`.
    pub ca: &'a str,
    /// Where its own certificate and key are set, e.g. `[tls] cert and key`.
    pub identity: &'a str,
}

/// A plain-words explanation of `error`, if its chain of causes shows a failure this module
/// recognises (see the module's table); `None` otherwise.
pub fn explain(error: &(dyn StdError + 'static), settings: Settings<'_>) -> Option<String> {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(found) = recognise(error, settings) {
            return Some(found);
        }
        cause = error.source();
    }
    None
}

/// One link of the chain. An I/O error hides what it wraps from `source()` (it returns the
/// wrapped error's own source), so the wrapped error is looked at here too.
fn recognise(error: &(dyn StdError + 'static), settings: Settings<'_>) -> Option<String> {
    if settings.dialed == Dialed::Plaintext && error.to_string().contains(PLAINTEXT_REFUSED) {
        return Some(plaintext_refused(settings));
    }
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return rustls_error(tls, settings);
    }
    let io = error.downcast_ref::<io::Error>()?;
    if let Some(inner) = io.get_ref() {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return rustls_error(tls, settings);
        }
        // An alert that arrives after the handshake (TLS 1.3 clients finish theirs before the
        // coordinator has checked their certificate) reaches us as text: tokio-rustls turns
        // the rustls error into an I/O error holding only its message.
        let text = inner.to_string();
        if let Some(name) = text.strip_prefix("received fatal alert: ") {
            let alert = ALERTS
                .iter()
                .find(|alert| format!("{alert:?}") == name.trim());
            if let Some(found) = alert.and_then(|&alert| alert_received(alert, settings.identity)) {
                return Some(found);
            }
        }
    }
    io_error(io, settings)
}

/// The alerts [`alert_received`] explains, to recognise them by name in a message.
const ALERTS: [AlertDescription; 8] = [
    AlertDescription::CertificateRequired,
    AlertDescription::UnknownCA,
    AlertDescription::DecryptError,
    AlertDescription::CertificateExpired,
    AlertDescription::BadCertificate,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateUnknown,
    AlertDescription::AccessDenied,
];

fn rustls_error(error: &rustls::Error, settings: Settings<'_>) -> Option<String> {
    match error {
        rustls::Error::InvalidCertificate(certificate) => {
            server_certificate(certificate, settings.ca)
        }
        rustls::Error::AlertReceived(alert) => alert_received(*alert, settings.identity),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Some(not_tls())
        }
        _ => None,
    }
}

/// The coordinator's certificate failed this side's checks.
fn server_certificate(error: &CertificateError, ca: &str) -> Option<String> {
    Some(match error {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
            "the coordinator's certificate is not signed by the CA this side trusts ({ca}): \
             they belong to different federations, or the federation's CA was created anew; \
             get the federation's current ca.crt from its operator"
        ),
        CertificateError::Expired => "the coordinator's certificate has expired: its operator \
                                      must issue a new one (`athanor-coordinator certs issue \
                                      --coordinator-name ...`) and restart it"
            .to_string(),
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "the coordinator's certificate expired on {}: its operator must issue a new one \
             (`athanor-coordinator certs issue --coordinator-name ...`) and restart it",
            moment(*not_after)
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the coordinator's certificate is not valid yet: check the clocks of this machine \
             and of the coordinator"
                .to_string()
        }
        CertificateError::NotValidForName => "the coordinator's certificate does not cover \
                                               the host in the address dialed: dial a name it \
                                               covers, or have it reissued for this one"
            .to_string(),
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "the coordinator's certificate does not cover the host dialed ({}); it covers {}: \
             dial one of those, or have the federation's operator reissue it with \
             `athanor-coordinator certs issue --coordinator-name {}`",
            expected.to_str(),
            if presented.is_empty() {
                "no name at all".to_string()
            } else {
                presented
                    .iter()
                    .map(|name| bare_name(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            expected.to_str()
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the coordinator presented a certificate that is not a server's (a node's or an \
             operator's?): start it with the certificate `certs init` made for it"
                .to_string()
        }
        _ => return None,
    })
}

/// The coordinator refused this side during the handshake and said why in an alert.
fn alert_received(alert: AlertDescription, identity: &str) -> Option<String> {
    Some(match alert {
        AlertDescription::CertificateRequired => format!(
            "the coordinator requires a client certificate and this side presented none: set \
             {identity} to the files `athanor-coordinator certs issue` wrote"
        ),
        AlertDescription::UnknownCA | AlertDescription::DecryptError => format!(
            "the coordinator does not trust this side's certificate ({identity}): it was not \
             issued by the federation's CA; use the files `athanor-coordinator certs issue` \
             made with this federation's CA"
        ),
        AlertDescription::CertificateExpired => format!(
            "the coordinator refused this side's certificate ({identity}) as expired or not \
             yet valid: ask the federation's operator for a new one, or check this machine's \
             clock"
        ),
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::AccessDenied => format!(
            "the coordinator refused this side's certificate ({identity}, alert {alert:?}): \
             is it the certificate issued for this side, not the coordinator's or another \
             role's?"
        ),
        _ => return None,
    })
}

fn io_error(error: &io::Error, settings: Settings<'_>) -> Option<String> {
    use io::ErrorKind::{BrokenPipe, ConnectionRefused, ConnectionReset, UnexpectedEof};
    match (error.kind(), settings.dialed) {
        (ConnectionRefused, _) => Some(
            "nothing accepts connections at that address: is the coordinator running, and on \
             this port?"
                .to_string(),
        ),
        (UnexpectedEof | ConnectionReset | BrokenPipe, Dialed::Tls) => Some(
            "the coordinator closed the connection during the TLS handshake: it may be \
             serving plaintext (started with --insecure), or it refused this side's \
             certificate"
                .to_string(),
        ),
        (UnexpectedEof | ConnectionReset | BrokenPipe, Dialed::Plaintext) => {
            Some(plaintext_refused(settings))
        }
        _ => None,
    }
}

/// A plaintext client met a coordinator that serves TLS.
fn plaintext_refused(settings: Settings<'_>) -> String {
    format!(
        "the coordinator serves mutual TLS and this side dialed plaintext (--insecure): drop \
         --insecure, write the address with https:// and give this side its TLS files ({}; {})",
        settings.ca, settings.identity
    )
}

/// A name rustls lists as presented, without its type: `DnsName("localhost")` is `localhost`
/// and `IpAddress(127.0.0.1)` is `127.0.0.1`.
fn bare_name(presented: &str) -> &str {
    let inner = presented
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(presented);
    inner.trim_matches('"')
}

/// Why the coordinator refused a client's handshake, in words for the coordinator's log.
/// `error` is what the TLS acceptor returned; anything unrecognised is described as a failed
/// handshake, and the caller logs the error itself beside it.
pub fn refused_client(error: &io::Error) -> String {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(tls) = tls else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                "the client hung up during the TLS handshake (it may not trust this \
                 coordinator's certificate; its own log says why)"
                    .to_string()
            }
            _ => "the TLS handshake failed".to_string(),
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "the client presented no certificate; every \
            node and operator needs one from `athanor-coordinator certs issue`"
            .to_string(),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "the client's certificate is not signed by this federation's CA".to_string(),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the client's certificate has expired".to_string(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "the client's certificate is not valid yet (check the clocks)".to_string(),
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "the client presented a certificate that is not a client's (the coordinator's own?)"
            .to_string(),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the client does not speak TLS (a node or operator started with --insecure?)"
                .to_string()
        }
        rustls::Error::AlertReceived(alert) => format!(
            "the client refused this coordinator's certificate (alert {alert:?}); its own log \
             says why"
        ),
        rustls::Error::PeerIncompatible(_) => {
            "the client supports no TLS version or cipher suite in common".to_string()
        }
        _ => "the TLS handshake failed".to_string(),
    }
}

/// A TLS client got an answer that is not TLS.
fn not_tls() -> String {
    "the coordinator did not answer in TLS: it was probably started with --insecure and \
     serves plaintext; serve it with TLS, or dial it with --insecure and http://"
        .to_string()
}

fn moment(at: UnixTime) -> String {
    let seconds = i64::try_from(at.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .map(crate::validity::moment)
        .unwrap_or_else(|_| format!("{seconds} seconds after 1970"))
}

/// Every link of `error`'s chain of causes in debug form, including what I/O errors wrap.
/// For diagnosing a failure [`explain`] does not recognise.
pub fn chain(error: &(dyn StdError + 'static)) -> Vec<String> {
    let mut links = Vec::new();
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(error) = cause {
        links.push(format!("{error:?}"));
        if let Some(inner) = error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            links.push(format!("  wraps {inner:?}"));
        }
        cause = error.source();
    }
    links
}
