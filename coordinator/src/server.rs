//! Wiring the services to a listener.
//!
//! [`run`] is what the binary calls: open the store, bind, serve both services over mutual
//! TLS (or plaintext, when the command line said `--insecure`) and drive rounds until the
//! federation finishes or `shutdown` resolves. Under TLS each service sits behind its gate
//! from [`crate::access`]: nodes reach the node-facing service, operators the admin service.
//! [`serve`] takes any stream of connections and serves them as they are, so the simulator
//! can hand it in-memory ones and run the very same server; it authenticates no one.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use athanor_proto::v1::admin_server::AdminServer;
use athanor_proto::v1::federation_server::FederationServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::Connected;
use tracing::{info, warn};

use crate::access::Access;
use crate::service::{AdminService, FederationService};
use crate::tls::{self, Transport};
use crate::{Coordinator, CoordinatorConfig, Error};

/// How long the server keeps answering after the last round, so polling nodes learn that the
/// federation has finished instead of finding the port closed.
pub const LINGER: Duration = Duration::from_secs(3);

/// Runs a coordinator on the configured address, secured by `transport` (see
/// [`Transport::from_config`]), until the federation finishes or `shutdown` resolves.
/// `on_listening` is told the bound address (useful with port 0).
///
/// # Errors
/// Config, store, bind and transport errors.
pub async fn run(
    config: CoordinatorConfig,
    transport: Transport,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listen = config.server.listen;
    let access_lists =
        config.server.allowed_nodes.is_some() || !config.server.revoked_nodes.is_empty();
    let coordinator = tokio::task::spawn_blocking(move || Coordinator::open(config))
        .await
        .map_err(|e| Error::InvalidRequest(format!("opening the store panicked: {e}")))??;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Io {
            path: listen.to_string().into(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        path: listen.to_string().into(),
        source,
    })?;
    match transport {
        Transport::MutualTls { config, access } => {
            info!(address = %local, federation = coordinator.federation(), "listening (mutual TLS)");
            on_listening(local);
            let incoming = tls::accept(listener, config);
            serve_with(coordinator, incoming, Some(access), shutdown).await
        }
        Transport::InsecurePlaintext => {
            warn!(
                address = %local,
                "serving WITHOUT TLS (--insecure): nothing is authenticated or encrypted; any \
                 peer that reaches this address can join as any node, read the models and \
                 drive the admin service. For tests on a trusted machine only"
            );
            if access_lists {
                warn!(
                    "[server] allowed_nodes and revoked_nodes are not enforced without TLS: \
                     there is no verified node id to check them against"
                );
            }
            info!(address = %local, federation = coordinator.federation(), "listening");
            on_listening(local);
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            serve(coordinator, incoming, shutdown).await
        }
    }
}

/// Serves `coordinator` on the connections of `incoming` and drives its rounds. Returns once
/// the federation has finished (after [`LINGER`]) or `shutdown` resolved.
///
/// Every caller is served as it comes: the connections are expected to be trusted already
/// (in-memory, in the simulator and tests) or knowingly plaintext (`--insecure`).
///
/// # Errors
/// Store errors from the round driver, transport errors from the server.
pub async fn serve<I, IO, IE>(
    coordinator: Coordinator,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    serve_with(coordinator, incoming, None, shutdown).await
}

/// [`serve`], with each service behind its gate when `access` is given.
async fn serve_with<I, IO, IE>(
    coordinator: Coordinator,
    incoming: I,
    access: Option<Access>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error>
where
    I: Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let (stop, stopped) = watch::channel(false);
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_on_signal.send(true);
    });

    let max_bytes = athanor_proto::CHUNK_BYTES * 2;
    let federation = FederationServer::new(FederationService::new(coordinator.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let admin = AdminServer::new(AdminService::new(coordinator.clone()));
    let streams = coordinator
        .config()
        .server
        .max_streams_per_connection
        .max(1);
    let mut builder = Server::builder()
        .max_concurrent_streams(streams)
        .concurrency_limit_per_connection(streams as usize);
    let router = match access {
        Some(access) => builder
            .add_service(InterceptedService::new(federation, access.nodes()))
            .add_service(InterceptedService::new(admin, access.operators())),
        None => builder.add_service(federation).add_service(admin),
    };
    let server = router.serve_with_incoming_shutdown(incoming, wait_for(stopped.clone()));
    let server = tokio::spawn(server);

    let driven = coordinator.drive(wait_for(stopped.clone())).await;
    if !*stopped.borrow() {
        tokio::select! {
            () = tokio::time::sleep(LINGER) => {}
            () = wait_for(stopped.clone()) => {}
        }
    }
    let _ = stop.send(true);

    let served = server
        .await
        .map_err(|e| Error::InvalidRequest(format!("server task failed: {e}")))?;
    driven?;
    served?;
    info!("coordinator stopped");
    Ok(())
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    // An error means every sender is gone, which also means stop.
    let _ = stopped.wait_for(|&stop| stop).await;
}
