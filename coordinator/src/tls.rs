//! The coordinator's listener: mutual TLS, or plaintext when the command line said
//! `--insecure`.
//!
//! With TLS the coordinator presents `[server.tls] cert` and accepts only clients whose
//! certificate the federation's CA (`[server.tls] ca`) signed; a client without one never
//! gets past the handshake. Who the client is, and what it may call, is decided per request by
//! [`crate::access`] from the verified certificate.
//!
//! The handshakes run here rather than inside tonic so that a refused client is logged with
//! its address and the reason in plain words: an operator setting up a federation sees at once
//! that a node presents a certificate of another CA, or none, or speaks plaintext. Each
//! handshake runs in its own task and must finish within [`HANDSHAKE_TIMEOUT`], so a slow or
//! silent client holds up no one.
//!
//! A client that opens with the plaintext HTTP/2 preface (a node or operator run with
//! `--insecure`) would otherwise only see its connection closed. It is answered in its own
//! protocol instead: an HTTP/2 `GOAWAY` with `INADEQUATE_SECURITY` (RFC 9113, section 7) whose
//! debug data, [`athanor_tls::explain::PLAINTEXT_REFUSED`], the client prints in its error.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use athanor_tls::files::{Certificates, PrivateKey};
use athanor_tls::validity;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::Error;
use crate::access::Access;
use crate::config::{ServerSection, ServerTlsSection};

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// How the coordinator serves.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Mutual TLS, with who may call what decided by `access`.
    MutualTls {
        /// The rustls configuration: the coordinator's certificate, the federation's CA.
        config: Arc<rustls::ServerConfig>,
        /// Who may call what.
        access: Access,
    },
    /// Plaintext, chosen with `--insecure`: no one is authenticated, and any peer that
    /// reaches the port can join as any node and drive the admin service.
    InsecurePlaintext,
}

impl Transport {
    /// The transport `[server]` describes, or plaintext when `insecure` (the command line's
    /// `--insecure`). Loads the TLS files and checks both certificates' lifetimes, warning
    /// about one that expires within 30 days.
    ///
    /// # Errors
    /// [`Error::Tls`] when `[server.tls]` is missing without `insecure`, a file is missing
    /// or unusable, a certificate has expired, or the key does not match the certificate.
    pub fn from_config(server: &ServerSection, insecure: bool) -> Result<Self, Error> {
        if insecure {
            return Ok(Transport::InsecurePlaintext);
        }
        let Some(files) = &server.tls else {
            return Err(Error::Tls(
                "[server.tls] is not set, and the coordinator serves mutual TLS unless started \
                 with --insecure. Create the federation's certificates with `athanor-coordinator \
                 certs init --federation NAME --out DIR` and add the [server.tls] section it \
                 prints (ca, cert, key), or pass --insecure to serve plaintext for a test"
                    .to_string(),
            ));
        };
        let (config, warnings) = server_config(files, OffsetDateTime::now_utc())?;
        for warning in warnings {
            warn!("{warning}");
        }
        let access = Access::new(server.allowed_nodes.clone(), server.revoked_nodes.clone());
        Ok(Transport::MutualTls {
            config: Arc::new(config),
            access,
        })
    }
}

/// Builds the rustls configuration from the files of `[server.tls]`.
fn server_config(
    files: &ServerTlsSection,
    now: OffsetDateTime,
) -> Result<(rustls::ServerConfig, Vec<String>), Error> {
    let tls_error = |e: athanor_tls::Error| Error::Tls(format!("[server.tls]: {e}"));
    let ca = Certificates::read(&files.ca).map_err(tls_error)?;
    let chain = Certificates::read(&files.cert).map_err(tls_error)?;
    let key = PrivateKey::read(&files.key).map_err(tls_error)?;

    let mut warnings = Vec::new();
    let renew = "issue a new one with `athanor-coordinator certs issue --ca-dir DIR \
                 --coordinator-name HOST ...` and restart";
    let ca_renew = "create a new CA with `athanor-coordinator certs init` and reissue every \
                    certificate";
    warnings.extend(
        validity::check("the federation's CA", ca.path(), ca.first(), now, ca_renew)
            .map_err(tls_error)?,
    );
    warnings.extend(
        validity::check(
            "the coordinator's certificate",
            chain.path(),
            chain.first(),
            now,
            renew,
        )
        .map_err(tls_error)?,
    );
    if let Some(mode) = key.loose_permissions() {
        warnings.push(format!(
            "{} can be read by others than its owner (mode {mode:o}); chmod 600 it",
            key.path().display()
        ));
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for certificate in ca.der() {
        roots
            .add(certificate.clone())
            .map_err(|e| Error::Tls(format!("[server.tls] ca {}: {e}", ca.path().display())))?;
    }
    // Client certificates are mandatory: the builder's default.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Tls(format!("[server.tls] ca {}: {e}", ca.path().display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.der().to_vec(), key.der())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => Error::Tls(format!(
                "[server.tls] key {} is not the key of cert {}",
                key.path().display(),
                chain.path().display()
            )),
            other => Error::Tls(format!("[server.tls] cert and key: {other}")),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, warnings))
}

/// The TLS connections of `listener`: every accepted TCP connection is handshaken in its own
/// task, and those that succeed are handed on; those that fail are logged with the reason.
/// Stops accepting when the returned stream is dropped.
pub fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let acceptor = TlsAcceptor::from(config);
    let (accepted, stream) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = accepted.closed() => return,
                connection = listener.accept() => match connection {
                    Ok(connection) => connection,
                    Err(e) => {
                        // Per-connection failures (reset before accept, out of descriptors);
                        // the listener itself stays usable.
                        debug!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                if let Some(tls) = handshake(acceptor, tcp, peer).await {
                    // A send fails only when the server has stopped; the connection is dropped.
                    let _ = accepted.send(Ok(tls)).await;
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

/// Runs one handshake; logs and drops the connection when it fails.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let attempt = async {
        if opens_with_http2_preface(&tcp).await {
            answer_plaintext(tcp).await;
            return Err(
                "the client speaks plaintext HTTP/2 (a node or operator run with --insecure?); \
                 it was told to use TLS"
                    .to_string(),
            );
        }
        acceptor.accept(tcp).await.map_err(|e| {
            let reason = athanor_tls::explain::refused_client(&e);
            format!("{reason} ({e})")
        })
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(reason)) => {
            warn!(%peer, %reason, "refused a connection");
            None
        }
        Err(_) => {
            warn!(
                %peer,
                timeout = ?HANDSHAKE_TIMEOUT,
                "refused a connection: the TLS handshake did not finish in time"
            );
            None
        }
    }
}

/// The first bytes of a plaintext HTTP/2 connection (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client's first bytes are the plaintext HTTP/2 preface rather than a TLS
/// ClientHello. Waits for the whole preface only when it starts like one; a TLS client's first
/// byte (22, a handshake record) settles it at once.
async fn opens_with_http2_preface(tcp: &TcpStream) -> bool {
    let mut buffer = [0u8; HTTP2_PREFACE.len()];
    loop {
        let Ok(seen) = tcp.peek(&mut buffer).await else {
            return false;
        };
        if seen == 0 || buffer[..seen] != HTTP2_PREFACE[..seen] {
            return false;
        }
        if seen == HTTP2_PREFACE.len() {
            return true;
        }
        // Part of the preface has arrived; the rest is on its way.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Tells a plaintext HTTP/2 client, in HTTP/2, that this coordinator serves TLS only: an empty
/// SETTINGS frame (the server's preface), then GOAWAY with `INADEQUATE_SECURITY` and an
/// explanation as debug data.
///
/// The answer waits for the client's first request: a GOAWAY that arrives before the request
/// is sent makes the client drop the request as merely "cancelled", losing the explanation,
/// while one that refuses the request is reported with it. Afterwards the client's bytes are
/// read until it hangs up, so that closing does not reset the connection before the client has
/// read the answer.
async fn answer_plaintext(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), first_request(&mut tcp)).await;

    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const INADEQUATE_SECURITY: u32 = 0xc;
    let frame = |kind: u8, payload: &[u8]| {
        // 24-bit length, type, flags, stream 0.
        let length = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, 0, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        frame
    };
    let mut goaway = Vec::new();
    goaway.extend_from_slice(&0u32.to_be_bytes()); // last stream id: none was processed
    goaway.extend_from_slice(&INADEQUATE_SECURITY.to_be_bytes());
    goaway.extend_from_slice(athanor_tls::explain::PLAINTEXT_REFUSED.as_bytes());
    let mut answer = frame(SETTINGS, &[]);
    answer.extend(frame(GOAWAY, &goaway));

    // Write errors mean the client is gone already: nothing left to tell it.
    if tcp.write_all(&answer).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let drained = async { while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
}

/// Reads the client's preface and frames until its first HEADERS frame (a request), or until
/// it hangs up.
async fn first_request(tcp: &mut TcpStream) -> io::Result<()> {
    const HEADERS: u8 = 0x1;
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    tcp.read_exact(&mut preface).await?;
    loop {
        let mut header = [0u8; 9];
        tcp.read_exact(&mut header).await?;
        let length = u64::from(u32::from_be_bytes([0, header[0], header[1], header[2]]));
        tokio::io::copy(&mut (&mut *tcp).take(length), &mut tokio::io::sink()).await?;
        if header[3] == HEADERS {
            return Ok(());
        }
    }
}
