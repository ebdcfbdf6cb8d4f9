//! Failed handshakes against a real tonic server on loopback, and the words
//! [`athanor_tls::explain`] and [`ClientTls::diagnose`] find for them.
//!
//! A federation's CA signs the server's and a node's certificates; another CA signs a
//! stranger's. Each test dials the server the way a misconfigured node would and checks the
//! explanation. Refusals of the client's own certificate arrive after a TLS 1.3 client's
//! handshake, where the HTTP/2 client may lose them, so those are checked through `diagnose`,
//! which reads them deterministically.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use athanor_proto::v1::federation_client::FederationClient;
use athanor_tls::explain::{self, Dialed, Settings};
use athanor_tls::{ClientSecurity, ClientTls};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};
use tempfile::TempDir;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

const SETTINGS: Settings<'static> = Settings {
    dialed: Dialed::Tls,
    ca: "[tls] ca",
    identity: "[tls] cert and key",
};

/// A CA, with the files of the certificates it issued written into a directory.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        Ca { params, key, dir }
    }

    /// Issues a certificate named `file` (`.crt` and `.key`), for a server covering `names` or
    /// a client naming node `a`, valid now or expired since 2021.
    fn issue(&self, file: &str, names: &[&str], server: bool, expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if !server {
            let uri = "urn:athanor:node:a".to_string().try_into().unwrap();
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
            .unwrap();
        std::fs::write(self.dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// The federation's CA, another CA, and a TLS server with the federation's certificate.
struct World {
    _dir: TempDir,
    home: Ca,
    away: Ca,
    server: SocketAddr,
}

async fn world() -> World {
    let dir = TempDir::new().unwrap();
    let home = Ca::new(dir.path(), "home");
    let away = Ca::new(dir.path(), "away");
    let (cert, key) = home.issue("server", &["localhost", "127.0.0.1"], true, false);
    home.issue("node", &[], false, false);
    home.issue("expired-node", &[], false, true);
    away.issue("node", &[], false, false);
    let ca = std::fs::read_to_string(home.path("ca.crt")).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca));
    let server = serve(Some(tls)).await;
    World {
        _dir: dir,
        home,
        away,
        server,
    }
}

/// A server with no services (every call that gets through is UNIMPLEMENTED).
async fn serve(tls: Option<ServerTlsConfig>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let router = builder.add_routes(tonic::service::Routes::default());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(router.serve_with_incoming(incoming));
    address
}

/// Client files: the CA to trust and the certificate to present (`None`: none).
fn client(ca: &Path, identity: Option<(PathBuf, PathBuf)>, server_name: Option<&str>) -> ClientTls {
    let identity = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    ClientTls::load(ca, identity, server_name.map(str::to_string)).unwrap()
}

/// Calls the server at `address` once and returns the explanation of the failure.
async fn explained(security: ClientSecurity, address: &str) -> Option<String> {
    let channel = security
        .endpoint(address)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let status = FederationClient::new(channel)
        .join(athanor_proto::v1::JoinRequest::default())
        .await
        .expect_err("the call fails");
    explain::explain(
        &status,
        Settings {
            dialed: security.dialed(),
            ..SETTINGS
        },
    )
}

fn contains(found: Option<String>, expected: &str) {
    let found = found.unwrap_or_else(|| panic!("no explanation; expected {expected:?}"));
    assert!(found.contains(expected), "{found}");
}

#[tokio::test]
async fn a_coordinator_of_another_federation_is_named_as_such() {
    let w = world().await;
    let node = (w.away.path("node.crt"), w.away.path("node.key"));
    let tls = client(&w.away.path("ca.crt"), Some(node), None);
    let address = format!("https://127.0.0.1:{}", w.server.port());
    let found = explained(ClientSecurity::MutualTls(Box::new(tls)), &address).await;
    contains(
        found,
        "the coordinator's certificate is not signed by the CA this side trusts ([tls] ca)",
    );
}

#[tokio::test]
async fn a_certificate_the_coordinator_refuses_is_diagnosed() {
    let w = world().await;
    let address = format!("https://127.0.0.1:{}", w.server.port());
    let ca = w.home.path("ca.crt");
    for (identity, expected) in [
        (
            Some((w.away.path("node.crt"), w.away.path("node.key"))),
            "the coordinator does not trust this side's certificate ([tls] cert and key)",
        ),
        (
            None,
            "the coordinator requires a client certificate and this side presented none",
        ),
        (
            Some((
                w.home.path("expired-node.crt"),
                w.home.path("expired-node.key"),
            )),
            "refused this side's certificate ([tls] cert and key) as expired",
        ),
    ] {
        let tls = client(&ca, identity, None);
        let probe = address.clone();
        let found = tokio::task::spawn_blocking(move || tls.diagnose(&probe, SETTINGS))
            .await
            .unwrap();
        contains(found, expected);
    }

    // A good certificate gets an answer, so there is nothing to diagnose.
    let node = (w.home.path("node.crt"), w.home.path("node.key"));
    let tls = client(&ca, Some(node), None);
    let found = tokio::task::spawn_blocking(move || tls.diagnose(&address, SETTINGS))
        .await
        .unwrap();
    assert_eq!(found, None);
}

#[tokio::test]
async fn a_name_the_certificate_does_not_cover_is_named_with_those_it_does() {
    let w = world().await;
    let node = (w.home.path("node.crt"), w.home.path("node.key"));
    let tls = client(&w.home.path("ca.crt"), Some(node), Some("coord.example"));
    let address = format!("https://127.0.0.1:{}", w.server.port());
    let found = explained(ClientSecurity::MutualTls(Box::new(tls)), &address).await;
    contains(
        found,
        "does not cover the host dialed (coord.example); it covers localhost, 127.0.0.1",
    );
}

#[tokio::test]
async fn a_coordinator_that_speaks_plaintext_is_named_as_such() {
    let w = world().await;
    let plaintext = serve(None).await;
    let node = (w.home.path("node.crt"), w.home.path("node.key"));
    let tls = client(&w.home.path("ca.crt"), Some(node), None);
    let address = format!("https://127.0.0.1:{}", plaintext.port());
    let found = explained(ClientSecurity::MutualTls(Box::new(tls)), &address).await;
    contains(found, "the coordinator did not answer in TLS");
}

#[tokio::test]
async fn an_expired_coordinator_certificate_says_when_it_expired() {
    let dir = TempDir::new().unwrap();
    let home = Ca::new(dir.path(), "home");
    let (cert, key) = home.issue("server", &["127.0.0.1"], true, true);
    home.issue("node", &[], false, false);
    let ca = std::fs::read_to_string(home.path("ca.crt")).unwrap();
    let server = serve(Some(
        ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca)),
    ))
    .await;
    let node = (home.path("node.crt"), home.path("node.key"));
    let tls = client(&home.path("ca.crt"), Some(node), None);
    let address = format!("https://127.0.0.1:{}", server.port());
    let found = explained(ClientSecurity::MutualTls(Box::new(tls)), &address).await;
    contains(
        found,
        "the coordinator's certificate expired on 2021-01-01 00:00 UTC",
    );
}

#[tokio::test]
async fn nothing_listening_is_told_apart_from_a_refusal() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let found = explained(
        ClientSecurity::InsecurePlaintext,
        &format!("http://{closed}"),
    )
    .await;
    contains(found, "nothing accepts connections at that address");
}
