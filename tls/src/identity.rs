//! Who a certificate names.
//!
//! Every certificate the federation's CA issues to a client carries exactly one identity, as
//! a URI in its subject alternative names: `urn:athanor:node:<id>` for a node,
//! `urn:athanor:operator:<name>` for an operator of the admin service. The coordinator's own
//! certificate carries DNS names and IP addresses instead, and no identity. Names are 1 to 128
//! characters of `[A-Za-z0-9._-]`, the same rule the node's config and the coordinator's join
//! apply to node ids, so a name that fits one fits all.
//!
//! The role is part of the identity so that a node's certificate cannot drive the admin
//! service, and an operator's cannot join as a node.

use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// Prefix of a node's identity URI.
const NODE_PREFIX: &str = "urn:athanor:node:";

/// Prefix of an operator's identity URI.
const OPERATOR_PREFIX: &str = "urn:athanor:operator:";

/// Longest node id or operator name.
pub const MAX_NAME_LEN: usize = 128;

/// An identity a client certificate proves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A node, by its id in the federation.
    Node(String),
    /// An operator of the admin service, by name.
    Operator(String),
}

/// Why a certificate names no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The bytes are not an X.509 certificate.
    #[error("not a readable X.509 certificate")]
    Unreadable,
    /// No `urn:athanor:` URI among the subject alternative names.
    #[error(
        "names no Athanor node or operator (no urn:athanor: URI among its subject alternative \
         names); issue one with `athanor-coordinator certs issue`"
    )]
    Missing,
    /// More than one identity URI.
    #[error("names more than one Athanor identity ({0})")]
    Ambiguous(String),
    /// An identity URI of an unknown role, or with a name outside the allowed characters.
    #[error("names {0:?}, which is not a valid Athanor node or operator identity")]
    Invalid(String),
}

impl Identity {
    /// A node's identity, if `id` is a valid node id.
    ///
    /// # Errors
    /// A message naming the rule `id` breaks.
    pub fn node(id: &str) -> Result<Self, String> {
        check_name("node id", id)?;
        Ok(Identity::Node(id.to_string()))
    }

    /// An operator's identity, if `name` is a valid name.
    ///
    /// # Errors
    /// A message naming the rule `name` breaks.
    pub fn operator(name: &str) -> Result<Self, String> {
        check_name("operator name", name)?;
        Ok(Identity::Operator(name.to_string()))
    }

    /// The URI written into the certificate's subject alternative names.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{NODE_PREFIX}{id}"),
            Identity::Operator(name) => format!("{OPERATOR_PREFIX}{name}"),
        }
    }

    /// The identity a certificate carries. Says nothing about who signed it: call this only on
    /// a certificate the TLS handshake has verified against the federation's CA.
    ///
    /// # Errors
    /// [`IdentityError`] when the certificate carries no identity, several, or a malformed one.
    pub fn of_certificate(certificate: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
            .map_err(|_| IdentityError::Unreadable)?;
        let names = parsed
            .subject_alternative_name()
            .map_err(|_| IdentityError::Unreadable)?
            .map(|extension| extension.value.general_names.clone())
            .unwrap_or_default();
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("urn:athanor:") => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::Missing),
            [uri] => Self::from_uri(uri).ok_or_else(|| IdentityError::Invalid(uri.to_string())),
            several => Err(IdentityError::Ambiguous(several.join(", "))),
        }
    }

    fn from_uri(uri: &str) -> Option<Self> {
        if let Some(id) = uri.strip_prefix(NODE_PREFIX) {
            return Self::node(id).ok();
        }
        uri.strip_prefix(OPERATOR_PREFIX)
            .and_then(|name| Self::operator(name).ok())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

/// Checks a node id or operator name: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// A message starting with `what`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._-]"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.to_string().try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_node_certificate_names_its_node() {
        let node = Identity::node("clinic-a").unwrap();
        let found = Identity::of_certificate(&certificate(&[&node.uri()])).unwrap();
        assert_eq!(found, node);
        assert_eq!(node.uri(), "urn:athanor:node:clinic-a");
    }

    #[test]
    fn an_operator_certificate_names_an_operator_not_a_node() {
        let operator = Identity::operator("ops").unwrap();
        let found = Identity::of_certificate(&certificate(&[&operator.uri()])).unwrap();
        assert_eq!(found, Identity::Operator("ops".into()));
    }

    #[test]
    fn a_server_certificate_names_no_identity() {
        let err = Identity::of_certificate(&certificate(&[])).unwrap_err();
        assert_eq!(err, IdentityError::Missing);
    }

    #[test]
    fn two_identities_in_one_certificate_are_refused() {
        let err =
            Identity::of_certificate(&certificate(&["urn:athanor:node:a", "urn:athanor:node:b"]))
                .unwrap_err();
        assert!(matches!(err, IdentityError::Ambiguous(_)), "{err}");
    }

    #[test]
    fn a_malformed_node_id_is_refused() {
        let err = Identity::of_certificate(&certificate(&["urn:athanor:node:a/b"])).unwrap_err();
        assert!(matches!(err, IdentityError::Invalid(_)), "{err}");
        let err = Identity::of_certificate(&certificate(&["urn:athanor:admin:x"])).unwrap_err();
        assert!(matches!(err, IdentityError::Invalid(_)), "{err}");
    }

    #[test]
    fn names_follow_the_node_id_rule() {
        assert!(check_name("node id", "site_1.eu-west").is_ok());
        assert!(check_name("node id", "").is_err());
        assert!(check_name("node id", "a b").is_err());
        assert!(check_name("node id", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
