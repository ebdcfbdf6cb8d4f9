//! What the service tests share: a coordinator served by the real server function on an
//! ephemeral loopback port, gRPC clients for it, helpers that play a node, and a capture of
//! the log lines so tests can check that refusals say why.
//!
//! The model is a logistic regression of 3 features and 2 classes ([`NUM_PARAMS`]
//! parameters), small enough that every update fits in one chunk.

#![allow(dead_code, reason = "each test file uses its own part of the support")]

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use athanor_coordinator::{Coordinator, CoordinatorConfig, Error};
use athanor_proto::v1::admin_client::AdminClient;
use athanor_proto::v1::federation_client::FederationClient;
use athanor_proto::v1::{self as pb};
use athanor_proto::{CHUNK_BYTES, PROTOCOL_VERSION};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

/// Parameters of the test model: 3 * 2 weights and 2 biases.
pub const NUM_PARAMS: usize = 8;

/// Longest wait for anything that should happen at once; only reached when a test fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A federation of two nodes that never finishes on its own within a test.
pub const CONFIG: &str = r#"
    [federation]
    name = "service-tests"
    [server]
    listen = "127.0.0.1:0"
    [store]
    dir = "replaced by the test"
    [model]
    architecture = "logistic_regression"
    features = 3
    classes = 2
    init_seed = 7
    [rounds]
    total = 50
    min_nodes = 2
    deadline_secs = 60
    cohort_seed = 5
    [training]
    learning_rate = 0.1
    local_epochs = 1.0
    expected_batch_size = 8
    [privacy]
    dp = "on"
    clip_norm = 1.0
    noise_multiplier = 1.0
    [aggregation]
    mode = "plain"
"#;

/// A coordinator serving on `127.0.0.1:<ephemeral>` with its round driver running.
#[derive(Debug)]
pub struct Served {
    /// The coordinator behind the server, for checks the wire does not expose.
    pub coordinator: Coordinator,
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// The store's directory (deleted when dropped).
    pub store_dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), Error>>>,
}

impl Served {
    /// Serves a coordinator configured by [`CONFIG`] as changed by `adjust`.
    pub async fn start(adjust: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        Self::start_from(CONFIG, adjust).await
    }

    /// Serves a coordinator configured by `text` (whose store directory is replaced by a new
    /// temporary one) as changed by `adjust`.
    pub async fn start_from(text: &str, adjust: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        capture_logs();
        let store_dir = TempDir::new().expect("temporary directory");
        let mut config = CoordinatorConfig::parse(text, Path::new("service-tests.toml"))
            .expect("test config is valid");
        config.store.dir = store_dir.path().to_path_buf();
        adjust(&mut config);
        config.check().expect("adjusted test config is valid");
        let coordinator = Coordinator::open(config).expect("coordinator opens a new store");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral loopback port");
        let address = format!("http://{}", listener.local_addr().expect("bound address"));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(athanor_coordinator::server::serve(
            coordinator.clone(),
            incoming,
            async {
                let _ = stopped.await;
            },
        ));
        Served {
            coordinator,
            address,
            store_dir,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// A node's client, with the chunk limits nodes use.
    pub async fn federation(&self) -> FederationClient<Channel> {
        let limit = CHUNK_BYTES * 4;
        FederationClient::connect(self.address.clone())
            .await
            .expect("connect to the test coordinator")
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    /// An operator's client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(self.address.clone())
            .await
            .expect("connect to the test coordinator")
    }

    /// Stops the server and waits until it has returned.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let served = within(server, "the server to stop").await;
            served
                .expect("server task did not panic")
                .expect("server stopped cleanly");
        }
    }
}

/// Joins as `node` and returns the session token.
pub async fn join(client: &mut FederationClient<Channel>, node: &str) -> String {
    join_as(client, node, false).await
}

/// Joins as a watch-only session of `node` and returns the session token.
pub async fn join_observer(client: &mut FederationClient<Channel>, node: &str) -> String {
    join_as(client, node, true).await
}

async fn join_as(client: &mut FederationClient<Channel>, node: &str, observer: bool) -> String {
    client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            node_id: node.to_string(),
            dataset: Some(pb::DatasetFingerprint {
                sha256: format!("{node}-data"),
                rows: 10,
            }),
            software_version: "test".to_string(),
            observer,
        })
        .await
        .expect("join accepted")
        .into_inner()
        .session
}

/// Long-polls until the session is given a task.
pub async fn task(client: &mut FederationClient<Channel>, session: &str) -> pb::Task {
    let poll = async {
        loop {
            let answer = client
                .wait_for_task(pb::WaitForTaskRequest {
                    session: session.to_string(),
                })
                .await
                .expect("poll answered")
                .into_inner();
            match answer.outcome {
                Some(pb::wait_for_task_response::Outcome::Task(task)) => return task,
                Some(pb::wait_for_task_response::Outcome::Idle(_)) => {}
                other => panic!("expected a task, got {other:?}"),
            }
        }
    };
    within(poll, "a task").await
}

/// The header of an honest update for `task`, of weight 1.
pub fn header(session: &str, task: &pb::Task) -> pb::UpdateHeader {
    pb::UpdateHeader {
        secure: None,
        session: session.to_string(),
        round: task.round,
        model_version: task.model_version,
        num_examples: 1,
        num_params: NUM_PARAMS as u64,
        report: Some(pb::TrainingReport {
            steps: 3,
            train_loss: 0.5,
            privacy: Some(pb::ExamplePrivacy {
                dp: true,
                epsilon: 1.0,
                delta: 1e-5,
            }),
        }),
    }
}

pub fn header_chunk(header: pb::UpdateHeader) -> pb::UpdateChunk {
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    }
}

pub fn data_chunk(values: &[f32]) -> pb::UpdateChunk {
    bytes_chunk(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

pub fn bytes_chunk(bytes: Vec<u8>) -> pb::UpdateChunk {
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(bytes)),
    }
}

/// Sends an update stream made of `chunks`.
pub async fn submit(
    client: &mut FederationClient<Channel>,
    chunks: Vec<pb::UpdateChunk>,
) -> Result<(), Status> {
    let response = client.submit_update(tokio_stream::iter(chunks)).await?;
    assert!(response.into_inner().accepted);
    Ok(())
}

/// An honest update of `value` in every coordinate for `task`.
pub async fn submit_honest(
    client: &mut FederationClient<Channel>,
    session: &str,
    task: &pb::Task,
    value: f32,
) {
    let chunks = vec![
        header_chunk(header(session, task)),
        data_chunk(&[value; NUM_PARAMS]),
    ];
    submit(client, chunks)
        .await
        .expect("honest update accepted");
}

/// Awaits `future`, failing the test with `what` after [`STEP_TIMEOUT`].
pub async fn within<F: Future>(future: F, what: &str) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {STEP_TIMEOUT:?}"))
}

/// Everything logged so far by this test binary (all tests share one subscriber).
pub fn logs() -> String {
    let buffer = log_buffer().lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&buffer).into_owned()
}

/// Waits until the logs contain `text`: a refusal is logged just before its status is sent,
/// so it may land a moment after the client sees the status.
pub async fn logged(text: &str) {
    let wait = async {
        while !logs().contains(text) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("nothing logged {text:?}; the logs:\n{}", logs()));
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(Arc::default)
}

/// Installs the capturing subscriber once per test binary.
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let writer = || LogWriter(Arc::clone(log_buffer()));
        let _ = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .with_env_filter("info")
            .try_init();
    });
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buffer = self.0.lock().unwrap_or_else(|p| p.into_inner());
        buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
