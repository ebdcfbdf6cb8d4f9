//! Dialing a coordinator: mutual TLS from a side's certificate files, or plaintext when the
//! command line said `--insecure`.
//!
//! The address's scheme must agree with that choice (`https://` for TLS, `http://` for
//! plaintext), so that an address never suggests a protection the connection does not have;
//! a mismatch is an error that says which to write. With TLS, only the federation's CA is
//! trusted (never the system's roots), and the coordinator's certificate must cover the host
//! dialed, or `server_name` when one is set.
//!
//! Under TLS 1.3 a client finishes its side of the handshake before the coordinator has
//! checked the client's certificate, so a refusal arrives as an alert after the client has
//! started its first request, and the HTTP/2 client sometimes reports only that the connection
//! closed. [`ClientTls::diagnose`] then dials once more, outside gRPC, just to read the
//! coordinator's answer.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::explain::{self, Dialed, Settings};
use crate::files::{Certificates, PrivateKey};
use crate::identity::{Identity, IdentityError};
use crate::{Error, validity};

/// How a client reaches the coordinator.
#[derive(Debug, Clone)]
pub enum ClientSecurity {
    /// Mutual TLS with the federation's CA and this side's certificate.
    MutualTls(Box<ClientTls>),
    /// Plaintext HTTP/2, chosen with `--insecure`: the coordinator is not authenticated and
    /// anyone on the path can read and change the traffic.
    InsecurePlaintext,
}

/// A client's TLS material, loaded and parsed.
#[derive(Debug, Clone)]
pub struct ClientTls {
    ca: Certificates,
    identity: Option<(Certificates, PrivateKey)>,
    server_name: Option<String>,
}

impl ClientTls {
    /// Loads the CA certificate at `ca` and, when given, this side's certificate and key.
    /// `server_name` is the name the coordinator's certificate must cover, when it is not the
    /// host of the address dialed.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Pem`] naming the file at fault.
    pub fn load(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> Result<Self, Error> {
        let ca = Certificates::read(ca)?;
        let identity = match identity {
            Some((cert, key)) => Some((Certificates::read(cert)?, PrivateKey::read(key)?)),
            None => None,
        };
        Ok(ClientTls {
            ca,
            identity,
            server_name,
        })
    }

    /// The federation's CA certificate.
    pub fn ca(&self) -> &Certificates {
        &self.ca
    }

    /// This side's certificate, if it has one.
    pub fn certificate(&self) -> Option<&Certificates> {
        self.identity.as_ref().map(|(cert, _)| cert)
    }

    /// This side's private key, if it has one.
    pub fn key(&self) -> Option<&PrivateKey> {
        self.identity.as_ref().map(|(_, key)| key)
    }

    /// Who this side's certificate says it is; `None` without a certificate.
    pub fn identity(&self) -> Option<Result<Identity, IdentityError>> {
        self.certificate()
            .map(|cert| Identity::of_certificate(cert.first()))
    }

    /// Checks the CA and this side's certificate as of `now` (see [`validity::check`]);
    /// `renew` says how to get a new certificate. Returns the warnings to log.
    ///
    /// # Errors
    /// [`Error::Certificate`] when either has expired or is not valid yet.
    pub fn check_validity(&self, now: OffsetDateTime, renew: &str) -> Result<Vec<String>, Error> {
        let mut warnings = Vec::new();
        let ca_renew = "the federation's operator must create a new CA and reissue every \
                        certificate (`athanor-coordinator certs init`)";
        warnings.extend(validity::check(
            "the federation's CA",
            self.ca.path(),
            self.ca.first(),
            now,
            ca_renew,
        )?);
        if let Some(cert) = self.certificate() {
            warnings.extend(validity::check(
                "this side's certificate",
                cert.path(),
                cert.first(),
                now,
                renew,
            )?);
        }
        Ok(warnings)
    }

    /// Why the coordinator at `address` refuses this side, found by dialing it once with a
    /// plain TLS connection and reading its first answer; `None` when it accepts this side (or
    /// cannot be reached, which the caller's error already says). Blocks for at most a few
    /// seconds: call it from a blocking context.
    pub fn diagnose(&self, address: &str, settings: Settings<'_>) -> Option<String> {
        const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
        let uri: tonic::codegen::http::Uri = address.parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string()).ok()?;
        let target = (host, uri.port_u16().unwrap_or(443))
            .to_socket_addrs()
            .ok()?
            .next()?;

        let config = Arc::new(self.rustls_config().ok()?);
        let mut connection = rustls::ClientConnection::new(config, server_name).ok()?;
        let mut tcp = TcpStream::connect_timeout(&target, PROBE_TIMEOUT).ok()?;
        tcp.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
        tcp.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
        // The read completes the handshake, then waits for the coordinator's first bytes: its
        // HTTP/2 settings if it accepted this side, an alert if it did not.
        let mut first = [0u8; 1];
        match rustls::Stream::new(&mut connection, &mut tcp).read(&mut first) {
            Ok(0) => Some(
                "the coordinator closed the connection right after the TLS handshake without \
                 saying why: it probably refused this side's certificate (its log says why)"
                    .to_string(),
            ),
            Ok(_) => None,
            Err(e) => explain::explain(&e, settings),
        }
    }

    /// The rustls configuration tonic builds from the same files, for [`Self::diagnose`].
    fn rustls_config(&self) -> Result<rustls::ClientConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(self.ca.der().iter().cloned());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => builder.with_client_auth_cert(cert.der().to_vec(), key.der())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    fn tonic_config(&self) -> ClientTlsConfig {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca.pem()));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert.pem(), key.pem()));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

impl ClientSecurity {
    /// An endpoint for `address`, secured as chosen. Timeouts and the like are the caller's.
    ///
    /// # Errors
    /// [`Error::Address`] when the address is not a URL or its scheme does not match the
    /// choice; [`Error::Transport`] when tonic refuses the TLS material.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, Error> {
        let refuse = |message: String| Error::Address {
            address: address.to_string(),
            message,
        };
        let rest = address
            .strip_prefix("https://")
            .map(|rest| (true, rest))
            .or_else(|| address.strip_prefix("http://").map(|rest| (false, rest)));
        let Some((https, rest)) = rest else {
            return Err(refuse(format!(
                "must start with {}",
                match self {
                    ClientSecurity::MutualTls(_) => "https://",
                    ClientSecurity::InsecurePlaintext => "http://",
                }
            )));
        };
        match (self, https) {
            (ClientSecurity::MutualTls(_), false) => {
                return Err(refuse(format!(
                    "http:// dials plaintext, but connections use mutual TLS unless --insecure \
                     is given: write https://{rest}, or pass --insecure for a coordinator \
                     started with --insecure"
                )));
            }
            (ClientSecurity::InsecurePlaintext, true) => {
                return Err(refuse(format!(
                    "https:// asks for TLS, but --insecure dials plaintext: write \
                     http://{rest}, or drop --insecure to dial with mutual TLS"
                )));
            }
            _ => {}
        }

        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| refuse(format!("not a valid URL ({e})")))?;
        match self {
            ClientSecurity::MutualTls(tls) => Ok(endpoint.tls_config(tls.tonic_config())?),
            ClientSecurity::InsecurePlaintext => Ok(endpoint),
        }
    }

    /// How connections made from this choice are dialed, for [`crate::explain`].
    pub fn dialed(&self) -> Dialed {
        match self {
            ClientSecurity::MutualTls(_) => Dialed::Tls,
            ClientSecurity::InsecurePlaintext => Dialed::Plaintext,
        }
    }
}
