//! An in-memory network between the simulator's nodes and its coordinator.
//!
//! Every virtual node gets a real tonic [`Channel`]; each connection it opens is a
//! `tokio::io::duplex` pipe whose other end is handed to the coordinator's real tonic server.
//! So the simulated nodes and coordinator exchange the same HTTP/2 gRPC messages as separate
//! processes would, with no sockets and no ports.

use std::io;

use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

/// Buffer of each in-memory pipe, per direction.
const PIPE_BYTES: usize = 1 << 20;

/// The client side of the in-memory network.
#[derive(Debug, Clone)]
pub struct InMemoryNetwork {
    connections: mpsc::Sender<DuplexStream>,
}

/// The server side: the stream of connections to hand to the coordinator's server.
pub type Incoming = tokio_stream::adapters::Map<
    ReceiverStream<DuplexStream>,
    fn(DuplexStream) -> Result<DuplexStream, io::Error>,
>;

/// Creates a network; the coordinator serves `Incoming`, nodes call [`InMemoryNetwork::channel`].
pub fn network() -> (InMemoryNetwork, Incoming) {
    use tokio_stream::StreamExt;
    let (connections, accepted) = mpsc::channel(64);
    let incoming = ReceiverStream::new(accepted).map(Ok as fn(_) -> _);
    (InMemoryNetwork { connections }, incoming)
}

impl InMemoryNetwork {
    /// A channel that connects through this network (lazily, and again after a failure).
    pub fn channel(&self) -> Channel {
        let connections = self.connections.clone();
        Endpoint::from_static("http://in-memory.invalid").connect_with_connector_lazy(service_fn(
            move |_: Uri| {
                let connections = connections.clone();
                async move {
                    let (client, server) = tokio::io::duplex(PIPE_BYTES);
                    connections.send(server).await.map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            "simulated coordinator stopped",
                        )
                    })?;
                    Ok::<_, io::Error>(TokioIo::new(client))
                }
            },
        ))
    }
}
