//! Wiring the services to a listener.
//!
//! [`run`] is what the binary calls: open the store, bind, serve both services and drive
//! rounds until the federation finishes or `shutdown` resolves. [`serve`] takes any stream
//! of connections, so the simulator can hand it in-memory ones and run the very same server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use athanor_proto::v1::admin_server::AdminServer;
use athanor_proto::v1::federation_server::FederationServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::transport::Server;
use tonic::transport::server::Connected;
use tracing::info;

use crate::service::{AdminService, FederationService};
use crate::{Coordinator, CoordinatorConfig, Error};

/// How long the server keeps answering after the last round, so polling nodes learn that the
/// federation has finished instead of finding the port closed.
pub const LINGER: Duration = Duration::from_secs(3);

/// Runs a coordinator on the configured address until the federation finishes or `shutdown`
/// resolves. `on_listening` is told the bound address (useful with port 0).
///
/// # Errors
/// Config, store, bind and transport errors.
pub async fn run(
    config: CoordinatorConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listen = config.server.listen;
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
    info!(address = %local, federation = coordinator.federation(), "listening");
    on_listening(local);

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    serve(coordinator, incoming, shutdown).await
}

/// Serves `coordinator` on the connections of `incoming` and drives its rounds. Returns once
/// the federation has finished (after [`LINGER`]) or `shutdown` resolved.
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
    let server = Server::builder()
        .add_service(federation)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, wait_for(stopped.clone()));
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
