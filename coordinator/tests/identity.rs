//! Under mutual TLS a session is bound to the certificate that joined with it: a token used on
//! another node's connection is refused on every call that names a session, and does nothing
//! to the round. Certificates are made with the coordinator's own `certs` functions; the real
//! server serves them on a loopback port.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use athanor_coordinator::certs::{self, InitRequest, IssueRequest, Subject};
use athanor_coordinator::tls::Transport;
use athanor_coordinator::{CoordinatorConfig, Error, server};
use athanor_proto::PROTOCOL_VERSION;
use athanor_proto::v1::federation_client::FederationClient;
use athanor_proto::v1::{self as pb};
use athanor_tls::{ClientSecurity, ClientTls};
use support::{CONFIG, NUM_PARAMS, data_chunk, header, header_chunk, join, submit, task, within};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

/// A coordinator serving mutual TLS, with certificates for nodes `clinic-a` and `clinic-b`.
struct TlsFederation {
    dir: TempDir,
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), Error>>,
}

impl TlsFederation {
    async fn start() -> Self {
        let dir = TempDir::new().expect("temporary directory");
        let ca = dir.path().join("ca");
        certs::init(&InitRequest {
            federation: "identity-tests".into(),
            out: ca.clone(),
            coordinator_names: vec!["127.0.0.1".into()],
            operator: "admin".into(),
            days: 30,
        })
        .expect("certs init");
        for node in ["clinic-a", "clinic-b"] {
            certs::issue(&IssueRequest {
                ca_dir: ca.clone(),
                subject: Subject::Node(node.into()),
                out: dir.path().join(node),
                coordinator_address: "https://127.0.0.1:50051".into(),
                days: 30,
            })
            .expect("certs issue");
        }

        let file = |name: &str| ca.join(name).display().to_string();
        let text = format!(
            "{CONFIG}\n[server.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            file(certs::names::CA_CERT),
            file(certs::names::COORDINATOR_CERT),
            file(certs::names::COORDINATOR_KEY),
        );
        let mut config = CoordinatorConfig::parse(&text, Path::new("identity-tests.toml"))
            .expect("test config is valid");
        config.store.dir = dir.path().join("store");
        let transport = Transport::from_config(&config.server, false).expect("mutual TLS");

        let (listening, address) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::run(
            config,
            transport,
            move |address| {
                let _ = listening.send(address);
            },
            async {
                let _ = stopped.await;
            },
        ));
        let address = within(address, "the server to listen")
            .await
            .expect("the server reports its address");
        TlsFederation {
            dir,
            address,
            stop,
            server,
        }
    }

    /// A client presenting `node`'s certificate.
    async fn client(&self, node: &str) -> FederationClient<Channel> {
        let bundle: PathBuf = self.dir.path().join(node);
        let tls = ClientTls::load(
            &bundle.join(certs::names::CA_CERT),
            Some((
                &bundle.join(certs::names::NODE_CERT),
                &bundle.join(certs::names::NODE_KEY),
            )),
            None,
        )
        .expect("the node's TLS files");
        let endpoint = ClientSecurity::MutualTls(Box::new(tls))
            .endpoint(&format!("https://{}", self.address))
            .expect("an https endpoint");
        let channel = within(endpoint.connect(), "a TLS connection")
            .await
            .expect("the handshake succeeds");
        FederationClient::new(channel)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        within(self.server, "the server to stop")
            .await
            .expect("server task did not panic")
            .expect("server stopped cleanly");
    }
}

/// Joins as a watch-only session of `node`.
async fn observe(
    client: &mut FederationClient<Channel>,
    node: &str,
) -> Result<String, tonic::Status> {
    let joined = client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            node_id: node.into(),
            observer: true,
            ..Default::default()
        })
        .await?;
    Ok(joined.into_inner().session)
}

/// Fetches the latest model with `session` and returns its version.
async fn fetch(
    client: &mut FederationClient<Channel>,
    session: &str,
) -> Result<u64, tonic::Status> {
    let mut stream = client
        .fetch_model(pb::FetchModelRequest {
            session: session.into(),
            version: None,
        })
        .await?
        .into_inner();
    let mut version = None;
    while let Some(chunk) = stream.message().await? {
        if let Some(pb::model_chunk::Part::Header(header)) = chunk.part {
            version = Some(header.version);
        }
    }
    Ok(version.expect("model header"))
}

fn denied(what: &str, result: Result<impl std::fmt::Debug, tonic::Status>) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    assert!(
        status.message().contains("than clinic-b"),
        "{what}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_used_on_another_nodes_certificate_is_refused_on_every_call() {
    let federation = TlsFederation::start().await;
    let mut a = federation.client("clinic-a").await;
    let mut b = federation.client("clinic-b").await;
    let a_session = join(&mut a, "clinic-a").await;
    let b_session = join(&mut b, "clinic-b").await;
    let a_task = task(&mut a, &a_session).await;
    let b_task = task(&mut b, &b_session).await;

    // clinic-b holds clinic-a's token: every call that names it is refused.
    let poll = b
        .wait_for_task(pb::WaitForTaskRequest {
            session: a_session.clone(),
        })
        .await;
    denied("a poll with a stolen session", poll);
    denied(
        "a fetch with a stolen session",
        fetch(&mut b, &a_session).await,
    );
    let decline = b
        .decline_task(pb::DeclineTaskRequest {
            session: a_session.clone(),
            round: a_task.round,
            reason: "not mine to decline".into(),
            leaving: true,
        })
        .await;
    denied("a decline with a stolen session", decline);
    let send = b
        .sec_agg_send(pb::SecAggSendRequest {
            session: a_session.clone(),
            round: a_task.round,
            message: None,
        })
        .await;
    denied("a secure-aggregation message with a stolen session", send);
    let receive = b
        .sec_agg_receive(pb::SecAggReceiveRequest {
            session: a_session.clone(),
            round: a_task.round,
            stage: 1,
        })
        .await;
    denied("a secure-aggregation poll with a stolen session", receive);
    let forged = vec![
        header_chunk(header(&a_session, &a_task)),
        data_chunk(&[9.0; NUM_PARAMS]),
    ];
    denied(
        "an update with a stolen session",
        submit(&mut b, forged).await,
    );

    // So is a watch-only session, and so is joining as an observer under another id.
    let mut a_watcher = federation.client("clinic-a").await;
    let a_watching = observe(&mut a_watcher, "clinic-a")
        .await
        .expect("clinic-a's certificate opens a watch-only session of clinic-a");
    assert_eq!(fetch(&mut a_watcher, &a_watching).await.expect("fetch"), 0);
    denied(
        "a fetch with a stolen watch-only session",
        fetch(&mut b, &a_watching).await,
    );
    let claim = observe(&mut b, "clinic-a")
        .await
        .expect_err("a false claim");
    assert_eq!(claim.code(), Code::PermissionDenied, "{claim:?}");

    // None of it touched the round: clinic-a, still in it (neither the forged decline nor its
    // own watch-only session displaced it), submits as usual, and the round publishes.
    for (client, session, task) in [(&mut a, &a_session, &a_task), (&mut b, &b_session, &b_task)] {
        let chunks = vec![
            header_chunk(header(session, task)),
            data_chunk(&[0.5; NUM_PARAMS]),
        ];
        submit(client, chunks).await.expect("an honest update");
    }
    let next = task(&mut a, &a_session).await;
    assert_eq!((next.round, next.model_version), (2, 1));
    federation.stop().await;
}
