//! Who may call what, decided from the client's verified certificate.
//!
//! Under mutual TLS every request carries the certificate its connection was verified with
//! (the handshake in [`crate::tls`] already checked that the federation's CA signed it).
//! [`NodeGate`] guards the node-facing service: the certificate must name a node
//! (`urn:athanor:node:<id>`, see [`athanor_tls::identity`]), that node must be on
//! `[server] allowed_nodes` when the list is set, and must not be on `revoked_nodes`. The node
//! id is then put into the request as a [`VerifiedNode`], and a join that claims another id is
//! refused ([`check_claim`]). Every later call names its session by a token, and the token is
//! bound to the node that joined: a call whose certificate names another node than the
//! session's is refused ([`Caller::check_owner`]), so a token copied from one node is useless
//! on another node's connection. [`OperatorGate`] guards the admin service: the certificate
//! must name an operator, so a node's certificate cannot pause rounds or export models.
//!
//! Refusals are `PERMISSION_DENIED` with a message that says what to change, and are logged
//! at `warn`. Without TLS (`--insecure`) nothing is verified and no gate is installed.
//!
//! The lists are read when the coordinator starts; changing them takes a restart. A revoked
//! node whose connection is already open is refused at its next call.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use athanor_proto::v1 as pb;
use athanor_tls::Identity;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::warn;

/// The allow-list and the revocation list of `[server]`.
#[derive(Debug, Clone)]
pub struct Access {
    policy: Arc<Policy>,
}

#[derive(Debug)]
struct Policy {
    /// Node ids allowed to join; `None` allows every node the CA certified.
    allowed: Option<BTreeSet<String>>,
    /// Node ids refused whatever their certificate.
    revoked: BTreeSet<String>,
}

/// The node id a request's certificate proves, put into the request by [`NodeGate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNode(pub String);

impl Access {
    /// Access as `[server] allowed_nodes` (absent: every certified node) and `revoked_nodes`
    /// describe it. A node on both lists is refused.
    pub fn new(allowed: Option<Vec<String>>, revoked: Vec<String>) -> Self {
        Access {
            policy: Arc::new(Policy {
                allowed: allowed.map(|ids| ids.into_iter().collect()),
                revoked: revoked.into_iter().collect(),
            }),
        }
    }

    /// The gate of the node-facing service.
    pub fn nodes(&self) -> NodeGate {
        NodeGate {
            policy: Arc::clone(&self.policy),
        }
    }

    /// The gate of the admin service.
    pub fn operators(&self) -> OperatorGate {
        OperatorGate
    }
}

/// Admits requests from certified nodes that are allowed and not revoked.
#[derive(Debug, Clone)]
pub struct NodeGate {
    policy: Arc<Policy>,
}

impl Interceptor for NodeGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let id = match identity(&request)? {
            Identity::Node(id) => id,
            Identity::Operator(name) => {
                return Err(refuse(
                    &request,
                    format!(
                        "this certificate is for operator {name}, not a node: a node connects \
                         with the certificate `athanor-coordinator certs issue --node ID` made \
                         for it"
                    ),
                ));
            }
        };
        if self.policy.revoked.contains(&id) {
            return Err(refuse(
                &request,
                format!(
                    "node {id} is revoked: this coordinator refuses its certificate ([server] \
                     revoked_nodes); ask the federation's operator"
                ),
            ));
        }
        if let Some(allowed) = &self.policy.allowed
            && !allowed.contains(&id)
        {
            return Err(refuse(
                &request,
                format!(
                    "node {id} is not on this coordinator's allow-list ([server] \
                     allowed_nodes); ask the federation's operator to add it"
                ),
            ));
        }
        request.extensions_mut().insert(VerifiedNode(id));
        Ok(request)
    }
}

/// Admits requests from certified operators only.
#[derive(Debug, Clone, Copy)]
pub struct OperatorGate;

impl Interceptor for OperatorGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match identity(&request)? {
            Identity::Operator(_) => Ok(request),
            Identity::Node(id) => Err(refuse(
                &request,
                format!(
                    "the admin service is for operators, and this certificate is for node \
                     {id}: use an operator's certificate (the operator.crt and operator.key \
                     of `athanor-coordinator certs init`, or of `certs issue --operator`)"
                ),
            )),
        }
    }
}

/// Refuses a join whose claimed node id differs from the one its certificate proves. Passes
/// every join on a connection without a verified certificate (plaintext, or in-process).
///
/// # Errors
/// `PERMISSION_DENIED` naming both ids.
pub fn check_claim(request: &Request<pb::JoinRequest>) -> Result<(), Status> {
    let Some(VerifiedNode(certified)) = request.extensions().get::<VerifiedNode>() else {
        return Ok(());
    };
    let claimed = &request.get_ref().node_id;
    if claimed == certified {
        return Ok(());
    }
    Err(refuse(
        request,
        format!(
            "this connection's certificate is for node {certified}, but the join claims to be \
             {claimed:?}: set [node] id = \"{certified}\", or use {claimed}'s certificate"
        ),
    ))
}

/// Who made a request, as far as its connection proves it, kept apart from the request so that
/// a session named inside the message (or in a later message of a stream) can be checked
/// against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node the connection's certificate names; `None` without a verified certificate.
    certified: Option<String>,
    /// The peer's address, for the log.
    peer: Option<SocketAddr>,
}

impl Caller {
    /// The caller of `request`.
    pub fn of<T>(request: &Request<T>) -> Self {
        Caller {
            certified: request
                .extensions()
                .get::<VerifiedNode>()
                .map(|VerifiedNode(id)| id.clone()),
            peer: request.remote_addr(),
        }
    }

    /// Refuses a call made with the session of node `owner` when this connection's
    /// certificate names another node. Passes every call on a connection without a verified
    /// certificate (plaintext, or in-process), where no identity is proven.
    ///
    /// # Errors
    /// `PERMISSION_DENIED`, naming the caller's certified id but not the session's owner.
    pub fn check_owner(&self, owner: &str) -> Result<(), Status> {
        let Some(certified) = &self.certified else {
            return Ok(());
        };
        if certified == owner {
            return Ok(());
        }
        let peer = self
            .peer
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        warn!(
            %peer,
            certified = %certified,
            session_node = %owner,
            "request refused: a session used on another node's certificate"
        );
        Err(Status::permission_denied(format!(
            "this session was opened by another node than {certified}, the node this \
             connection's certificate names: a session is only valid on the certificate that \
             joined with it; join again"
        )))
    }
}

/// The identity of the certificate the request's connection was verified with.
fn identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    let Some(certificates) = request.peer_certs() else {
        return Err(Status::unauthenticated(
            "no verified client certificate on this connection",
        ));
    };
    let Some(leaf) = certificates.first() else {
        return Err(Status::unauthenticated(
            "the client presented an empty certificate chain",
        ));
    };
    Identity::of_certificate(leaf)
        .map_err(|e| refuse(request, format!("the client certificate {e}")))
}

/// Logs a refusal and turns it into the status the client sees.
fn refuse<T>(request: &Request<T>, message: String) -> Status {
    let peer = request
        .remote_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.to_string());
    warn!(%peer, reason = %message, "request refused");
    Status::permission_denied(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(claimed: &str, certified: Option<&str>) -> Request<pb::JoinRequest> {
        let mut request = Request::new(pb::JoinRequest {
            node_id: claimed.to_string(),
            ..Default::default()
        });
        if let Some(id) = certified {
            request
                .extensions_mut()
                .insert(VerifiedNode(id.to_string()));
        }
        request
    }

    #[test]
    fn a_join_claiming_another_node_than_its_certificate_is_refused() {
        let status = check_claim(&join("clinic-b", Some("clinic-a"))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status
                .message()
                .contains("certificate is for node clinic-a")
                && status.message().contains("\"clinic-b\""),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_join_claiming_its_certified_id_or_on_a_trusted_connection_passes() {
        assert!(check_claim(&join("clinic-a", Some("clinic-a"))).is_ok());
        assert!(check_claim(&join("anyone", None)).is_ok());
    }

    #[test]
    fn a_session_is_refused_on_another_nodes_certificate_only() {
        let caller = |certified: Option<&str>| Caller::of(&join("anyone", certified));
        let status = caller(Some("clinic-b"))
            .check_owner("clinic-a")
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("than clinic-b"),
            "{}",
            status.message()
        );
        assert!(
            !status.message().contains("clinic-a"),
            "{}",
            status.message()
        );
        assert!(caller(Some("clinic-a")).check_owner("clinic-a").is_ok());
        assert!(caller(None).check_owner("clinic-a").is_ok());
    }

    #[test]
    fn a_request_without_a_verified_certificate_passes_no_gate() {
        let access = Access::new(None, vec![]);
        let status = access.nodes().call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let status = access.operators().call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }
}
