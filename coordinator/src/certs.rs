//! Provisioning a federation's certificates: its CA, the coordinator's certificate, and one
//! per node and per operator.
//!
//! [`init`] creates a federation: a new CA, the coordinator's certificate for the names nodes
//! will dial, and a first operator's certificate for the admin commands. [`issue`] signs one
//! more certificate with that CA, for a node, an operator, or the coordinator (new names, or a
//! renewal). What each writes:
//!
//! | file | by | holds |
//! |---|---|---|
//! | `ca.crt` | `init`; copied by `issue` | the federation's CA: every side trusts it and no other |
//! | `ca.key` | `init` | the CA's key: whoever holds it can mint any identity; keep it offline |
//! | `coordinator.crt`, `.key` | `init`, `issue --coordinator-name` | the server's certificate, for DNS names and IPs |
//! | `operator.crt`, `.key` | `init`, `issue --operator` | an operator's certificate (`urn:athanor:operator:NAME`) |
//! | `node.crt`, `.key`, `node.toml` | `issue --node` | a node's certificate (`urn:athanor:node:ID`) and a config template |
//!
//! Keys are ECDSA P-256. Each key file is created with mode 0600 from the start, never
//! widened and narrowed afterwards, and no file is ever overwritten: a command that would
//! overwrite one is refused before it writes anything. Certificates start an hour in the past,
//! so a node whose clock is a little behind accepts them, and never outlive the CA.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use athanor_tls::Identity;
use athanor_tls::validity::Validity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Days a coordinator, node or operator certificate is valid unless told otherwise.
pub const DEFAULT_DAYS: u32 = 365;

/// Days a federation's CA is valid.
pub const CA_DAYS: u32 = 3650;

/// Names the coordinator's certificate covers unless told otherwise: this machine.
pub const DEFAULT_COORDINATOR_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Where `issue --node` points the node unless told otherwise.
pub const DEFAULT_COORDINATOR_ADDRESS: &str = "https://127.0.0.1:50051";

/// How far in the past certificates start, for clocks that run a little behind.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// File names, shared with the configuration templates and the operator's `--tls-dir`.
pub mod names {
    /// The federation's CA certificate.
    pub const CA_CERT: &str = "ca.crt";
    /// The CA's private key.
    pub const CA_KEY: &str = "ca.key";
    /// The coordinator's certificate.
    pub const COORDINATOR_CERT: &str = "coordinator.crt";
    /// The coordinator's private key.
    pub const COORDINATOR_KEY: &str = "coordinator.key";
    /// An operator's certificate.
    pub const OPERATOR_CERT: &str = "operator.crt";
    /// An operator's private key.
    pub const OPERATOR_KEY: &str = "operator.key";
    /// A node's certificate.
    pub const NODE_CERT: &str = "node.crt";
    /// A node's private key.
    pub const NODE_KEY: &str = "node.key";
    /// A node's configuration template.
    pub const NODE_CONFIG: &str = "node.toml";
}

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// A file to be written exists already.
    #[error(
        "{} exists; certificates and keys are never overwritten: move it away, or choose \
         another --out",
        path.display()
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A name, address or number given on the command line is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The CA directory does not hold a usable CA.
    #[error("CA in {}: {message}", dir.display())]
    Ca {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Generating a key or signing a certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What `init` is asked to create.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// The federation's name, written into the CA's distinguished name.
    pub federation: String,
    /// Directory to write into (created if missing, owner-only).
    pub out: PathBuf,
    /// DNS names and IP addresses the coordinator's certificate covers.
    pub coordinator_names: Vec<String>,
    /// The first operator's name.
    pub operator: String,
    /// Days the coordinator's and operator's certificates are valid.
    pub days: u32,
}

/// Whom `issue` signs a certificate for.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A node, by id.
    Node(String),
    /// An operator, by name.
    Operator(String),
    /// The coordinator, for these DNS names and IP addresses.
    Coordinator(Vec<String>),
}

/// What `issue` is asked to sign.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The directory `init` wrote (`ca.crt`, `ca.key`).
    pub ca_dir: PathBuf,
    /// Whom for.
    pub subject: Subject,
    /// Directory to write into (created if missing, owner-only).
    pub out: PathBuf,
    /// The coordinator's URL, written into a node's config template.
    pub coordinator_address: String,
    /// Days the certificate is valid (cut to the CA's own end).
    pub days: u32,
}

/// What a command wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The directory written into, absolute.
    pub dir: PathBuf,
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// When the issued (or, for `init`, the coordinator's) certificate expires.
    pub not_after: OffsetDateTime,
}

/// A file about to be written.
struct Output {
    path: PathBuf,
    contents: Vec<u8>,
    secret: bool,
}

/// Creates a federation's CA, the coordinator's certificate and a first operator's.
///
/// # Errors
/// [`CertsError::Invalid`] for a bad name, [`CertsError::Exists`] when a file to be written
/// exists (nothing is written then), [`CertsError::Io`] when writing fails.
pub fn init(request: &InitRequest) -> Result<Written, CertsError> {
    let federation = request.federation.trim();
    if federation.is_empty() || federation.chars().any(char::is_control) {
        return Err(CertsError::Invalid(
            "--federation must be a non-empty name without control characters".into(),
        ));
    }
    let operator = Identity::operator(&request.operator).map_err(CertsError::Invalid)?;
    let names = server_names(&request.coordinator_names)?;
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = distinguished_name(&format!("Athanor CA of {federation}"), federation);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - CLOCK_SKEW;
    ca.not_after = now + Duration::days(i64::from(CA_DAYS));
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let not_after = now + Duration::days(i64::from(request.days.max(1)));
    let not_after = not_after.min(ca.not_after);
    let coordinator = leaf(
        federation,
        "coordinator",
        names,
        Role::Server,
        now,
        not_after,
    )?;
    let operator = leaf(
        federation,
        &request.operator,
        vec![],
        Role::Client(&operator),
        now,
        not_after,
    )?;
    let coordinator_cert = coordinator.params.signed_by(&coordinator.key, &issuer)?;
    let operator_cert = operator.params.signed_by(&operator.key, &issuer)?;

    let out = &request.out;
    let outputs = vec![
        public(out.join(names::CA_CERT), ca_cert.pem()),
        secret(out.join(names::CA_KEY), ca_key.serialize_pem()),
        public(out.join(names::COORDINATOR_CERT), coordinator_cert.pem()),
        secret(
            out.join(names::COORDINATOR_KEY),
            coordinator.key.serialize_pem(),
        ),
        public(out.join(names::OPERATOR_CERT), operator_cert.pem()),
        secret(out.join(names::OPERATOR_KEY), operator.key.serialize_pem()),
    ];
    write_all(out, outputs, not_after)
}

/// Signs a certificate for a node, an operator or the coordinator with the CA in
/// `request.ca_dir`, and writes it with its key, a copy of the CA certificate and, for a node,
/// a configuration template.
///
/// # Errors
/// [`CertsError::Ca`] when the CA cannot be read, [`CertsError::Invalid`] for a bad name or
/// address, [`CertsError::Exists`] when a file to be written exists (nothing is written then),
/// [`CertsError::Io`] when writing fails.
pub fn issue(request: &IssueRequest) -> Result<Written, CertsError> {
    let ca = CaFiles::read(&request.ca_dir)?;
    let now = OffsetDateTime::now_utc();
    let not_after = (now + Duration::days(i64::from(request.days.max(1)))).min(ca.not_after);
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca.key).map_err(|e| CertsError::Ca {
        dir: request.ca_dir.clone(),
        message: format!("{} is not a usable CA certificate ({e})", names::CA_CERT),
    })?;

    let out = &request.out;
    let mut outputs = vec![public(out.join(names::CA_CERT), ca.cert_pem.clone())];
    match &request.subject {
        Subject::Node(id) => {
            let identity = Identity::node(id).map_err(CertsError::Invalid)?;
            let address = template_address(&request.coordinator_address)?;
            let node = leaf(
                &ca.federation,
                id,
                vec![],
                Role::Client(&identity),
                now,
                not_after,
            )?;
            let cert = node.params.signed_by(&node.key, &issuer)?;
            outputs.push(public(out.join(names::NODE_CERT), cert.pem()));
            outputs.push(secret(out.join(names::NODE_KEY), node.key.serialize_pem()));
            outputs.push(public(
                out.join(names::NODE_CONFIG),
                node_template(&ca.federation, id, &address),
            ));
        }
        Subject::Operator(name) => {
            let identity = Identity::operator(name).map_err(CertsError::Invalid)?;
            let operator = leaf(
                &ca.federation,
                name,
                vec![],
                Role::Client(&identity),
                now,
                not_after,
            )?;
            let cert = operator.params.signed_by(&operator.key, &issuer)?;
            outputs.push(public(out.join(names::OPERATOR_CERT), cert.pem()));
            outputs.push(secret(
                out.join(names::OPERATOR_KEY),
                operator.key.serialize_pem(),
            ));
        }
        Subject::Coordinator(hosts) => {
            let names = server_names(hosts)?;
            let server = leaf(
                &ca.federation,
                "coordinator",
                names,
                Role::Server,
                now,
                not_after,
            )?;
            let cert = server.params.signed_by(&server.key, &issuer)?;
            outputs.push(public(out.join(names::COORDINATOR_CERT), cert.pem()));
            outputs.push(secret(
                out.join(names::COORDINATOR_KEY),
                server.key.serialize_pem(),
            ));
        }
    }
    write_all(out, outputs, not_after)
}

/// The CA as `init` left it.
struct CaFiles {
    cert_pem: String,
    key: KeyPair,
    federation: String,
    not_after: OffsetDateTime,
}

impl CaFiles {
    fn read(dir: &Path) -> Result<Self, CertsError> {
        let ca_error = |message: String| CertsError::Ca {
            dir: dir.to_path_buf(),
            message,
        };
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| {
                ca_error(format!(
                    "cannot read {name} ({e}); --ca-dir must be the directory `athanor-coordinator \
                     certs init` wrote"
                ))
            })
        };
        let cert_pem = read(names::CA_CERT)?;
        let key_pem = zeroize::Zeroizing::new(read(names::CA_KEY)?);
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| ca_error(format!("{} is not a private key ({e})", names::CA_KEY)))?;

        let certificates = athanor_tls::files::Certificates::read(&dir.join(names::CA_CERT))
            .map_err(|e| ca_error(e.to_string()))?;
        let der = certificates.first();
        let validity = Validity::of(der)
            .ok_or_else(|| ca_error(format!("{} is not an X.509 certificate", names::CA_CERT)))?;
        if validity.not_after <= OffsetDateTime::now_utc() {
            return Err(ca_error(format!(
                "the CA expired on {}; create a new one with `certs init`",
                athanor_tls::validity::moment(validity.not_after)
            )));
        }
        let federation = organization(der).unwrap_or_else(|| "unnamed".to_string());
        Ok(CaFiles {
            cert_pem,
            key,
            federation,
            not_after: validity.not_after,
        })
    }
}

/// The organization named in a CA certificate's subject: the federation's name.
fn organization(der: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    let organization = parsed.subject().iter_organization().next()?;
    organization.as_str().ok().map(str::to_string)
}

/// What a leaf certificate is for.
enum Role<'a> {
    /// The coordinator, a TLS server.
    Server,
    /// A node or an operator, a TLS client with this identity.
    Client(&'a Identity),
}

/// A leaf certificate's parameters and its fresh key.
struct Leaf {
    params: CertificateParams,
    key: KeyPair,
}

fn leaf(
    federation: &str,
    common_name: &str,
    names: Vec<SanType>,
    role: Role<'_>,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Leaf, CertsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name, federation);
    params.subject_alt_names = names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = not_after;
    match role {
        Role::Server => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Role::Client(identity) => {
            let uri = identity.uri().try_into().map_err(|e| {
                CertsError::Invalid(format!("identity {identity} cannot be written ({e})"))
            })?;
            params.subject_alt_names.push(SanType::URI(uri));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    Ok(Leaf {
        params,
        key: KeyPair::generate()?,
    })
}

fn distinguished_name(common_name: &str, federation: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, federation);
    name
}

/// The coordinator's names as subject alternative names: IP addresses as such, everything
/// else as DNS names, which must be valid ones.
fn server_names(names: &[String]) -> Result<Vec<SanType>, CertsError> {
    let defaults: Vec<String> = DEFAULT_COORDINATOR_NAMES.map(String::from).to_vec();
    let names = if names.is_empty() { &defaults } else { names };
    names
        .iter()
        .map(|name| {
            if let Ok(ip) = name.parse::<IpAddr>() {
                return Ok(SanType::IpAddress(ip));
            }
            if rustls::pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(CertsError::Invalid(format!(
                    "--coordinator-name {name:?} is neither a DNS name nor an IP address"
                )));
            }
            let dns = name
                .clone()
                .try_into()
                .map_err(|e| CertsError::Invalid(format!("--coordinator-name {name:?}: {e}")))?;
            Ok(SanType::DnsName(dns))
        })
        .collect()
}

/// Checks the coordinator address written into a node's template.
fn template_address(address: &str) -> Result<String, CertsError> {
    let valid = address.starts_with("https://")
        && address.len() > "https://".len()
        && !address
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\');
    if valid {
        Ok(address.to_string())
    } else {
        Err(CertsError::Invalid(format!(
            "--coordinator-address {address:?} must be an https:// URL, such as \
             {DEFAULT_COORDINATOR_ADDRESS}"
        )))
    }
}

/// A node's configuration with its identity and TLS files filled in, and the data and budget
/// left for its operator to write down (the node refuses to start until they are).
fn node_template(federation: &str, id: &str, address: &str) -> String {
    format!(
        r#"# Node {id} of federation "{federation}", written by `athanor-coordinator certs issue`.
# The [tls] files are the ones beside this file. Fill in [data] and [privacy] before running:
#
#   athanor-node run --config node.toml

[node]
id = "{id}"

[coordinator]
address = "{address}"

[tls]
# The federation's CA: the only issuer this node trusts for the coordinator's certificate.
ca = "{ca}"
# This node's identity: its certificate names it (urn:athanor:node:{id}) and the key proves it.
cert = "{cert}"
key = "{key}"

[data]
# FILL IN: this organization's data file (CSV or gzip CSV) and its schema.
path = "FILL-IN-data.csv"
schema = "FILL-IN-schema.toml"

[privacy]
# FILL IN: the total example-level epsilon this data may ever spend, over every round and
# every run. There is no default; the node refuses to start until it is positive.
epsilon = 0.0
delta = 1e-5
"#,
        ca = names::CA_CERT,
        cert = names::NODE_CERT,
        key = names::NODE_KEY,
    )
}

fn public(path: PathBuf, contents: impl Into<Vec<u8>>) -> Output {
    Output {
        path,
        contents: contents.into(),
        secret: false,
    }
}

fn secret(path: PathBuf, contents: impl Into<Vec<u8>>) -> Output {
    Output {
        path,
        contents: contents.into(),
        secret: true,
    }
}

/// Writes every output, after checking that none exists; an existing public file with the
/// same contents (the CA certificate, issuing into the CA's own directory) is left as it is.
fn write_all(
    dir: &Path,
    outputs: Vec<Output>,
    not_after: OffsetDateTime,
) -> Result<Written, CertsError> {
    let mut pending = Vec::new();
    for output in outputs {
        match std::fs::read(&output.path) {
            Ok(existing) if !output.secret && existing == output.contents => {}
            Ok(_) => return Err(CertsError::Exists { path: output.path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => pending.push(output),
            Err(source) => {
                return Err(CertsError::Io {
                    path: output.path,
                    source,
                });
            }
        }
    }

    create_private_dir(dir)?;
    let mut files = Vec::new();
    for output in pending {
        write_new(&output.path, &output.contents, output.secret)?;
        files.push(output.path);
    }
    let dir = std::fs::canonicalize(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(Written {
        dir,
        files,
        not_after,
    })
}

/// Creates `dir` and its missing parents, owner-only: it holds private keys.
fn create_private_dir(dir: &Path) -> Result<(), CertsError> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates `path`, which must not exist, with owner-only permissions for a secret, and writes
/// and syncs `contents`. The mode is set when the file is created, so a key is never readable
/// by others, not even for an instant.
pub fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), CertsError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if secret { 0o600 } else { 0o644 });
    let io_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertsError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            CertsError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_in(dir: &Path) -> Written {
        init(&InitRequest {
            federation: "test-federation".into(),
            out: dir.to_path_buf(),
            coordinator_names: vec![],
            operator: "ops".into(),
            days: DEFAULT_DAYS,
        })
        .expect("init succeeds in an empty directory")
    }

    fn issue_node(ca_dir: &Path, out: &Path, id: &str) -> Result<Written, CertsError> {
        issue(&IssueRequest {
            ca_dir: ca_dir.to_path_buf(),
            subject: Subject::Node(id.into()),
            out: out.to_path_buf(),
            coordinator_address: DEFAULT_COORDINATOR_ADDRESS.into(),
            days: 30,
        })
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_owner_only_and_certificates_are_not_secret() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_in(&ca);
        issue_node(&ca, &dir.path().join("n"), "clinic-a").unwrap();
        for key in [
            ca.join(names::CA_KEY),
            ca.join(names::COORDINATOR_KEY),
            ca.join(names::OPERATOR_KEY),
            dir.path().join("n").join(names::NODE_KEY),
        ] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
        assert_eq!(mode(&ca), 0o700, "the CA directory");
        assert_eq!(mode(&ca.join(names::CA_CERT)) & 0o600, 0o600);
    }

    #[test]
    fn init_refuses_to_overwrite_and_writes_nothing_then() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join(names::OPERATOR_KEY);
        std::fs::write(&existing, "precious").unwrap();
        let err = init(&InitRequest {
            federation: "f".into(),
            out: dir.path().to_path_buf(),
            coordinator_names: vec![],
            operator: "ops".into(),
            days: 1,
        })
        .unwrap_err();
        assert!(
            matches!(&err, CertsError::Exists { path } if path == &existing),
            "{err}"
        );
        assert!(err.to_string().contains("never overwritten"), "{err}");
        assert_eq!(std::fs::read_to_string(&existing).unwrap(), "precious");
        assert!(
            !dir.path().join(names::CA_KEY).exists(),
            "init wrote part of its files"
        );
    }

    #[test]
    fn issuing_the_same_node_twice_into_one_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        let out = dir.path().join("clinic-a");
        issue_node(dir.path(), &out, "clinic-a").unwrap();
        let before = std::fs::read(out.join(names::NODE_KEY)).unwrap();
        let err = issue_node(dir.path(), &out, "clinic-a").unwrap_err();
        assert!(matches!(err, CertsError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(out.join(names::NODE_KEY)).unwrap(), before);
    }

    #[test]
    fn write_new_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new(&path, b"one", true).unwrap();
        let err = write_new(&path, b"two", true).unwrap_err();
        assert!(matches!(err, CertsError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }

    #[test]
    fn a_node_certificate_names_the_node_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        let out = dir.path().join("n");
        issue_node(dir.path(), &out, "clinic-a").unwrap();

        let cert = athanor_tls::files::Certificates::read(&out.join(names::NODE_CERT)).unwrap();
        assert_eq!(
            Identity::of_certificate(cert.first()).unwrap(),
            Identity::Node("clinic-a".into())
        );
        let ca = athanor_tls::files::Certificates::read(&out.join(names::CA_CERT)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.first().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(cert.first(), &[], rustls::pki_types::UnixTime::now())
            .expect("the CA's own verifier accepts the node's certificate");

        let template = std::fs::read_to_string(out.join(names::NODE_CONFIG)).unwrap();
        assert!(template.contains("id = \"clinic-a\"") && template.contains("cert = \"node.crt\""));
    }

    #[test]
    fn a_bad_node_id_or_coordinator_name_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        init_in(dir.path());
        let out = dir.path().join("n");
        let err = issue_node(dir.path(), &out, "a b").unwrap_err();
        assert!(err.to_string().contains("[A-Za-z0-9._-]"), "{err}");
        let err = server_names(&["not a host".to_string()]).unwrap_err();
        assert!(
            err.to_string().contains("neither a DNS name nor an IP"),
            "{err}"
        );
    }
}
