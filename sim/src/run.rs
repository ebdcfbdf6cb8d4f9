//! Running a simulated federation.
//!
//! Loads the dataset once, partitions it, starts the real coordinator server on an in-memory
//! network and one real [`athanor_node::Node`] per share, then follows the published versions:
//! each is evaluated on the held-out test set and written to `rounds.csv` as it arrives. Each
//! node keeps its privacy ledger in `ledgers/` under the output directory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use athanor_coordinator::Coordinator;
use athanor_coordinator::store::{Epsilon, Manifest};
use athanor_core::model::{self, ModelSpec};
use athanor_node::data::{Dataset, Schema};
use athanor_node::worker::Dropouts;
use athanor_node::{Node, Randomness};
use ndarray::ArrayView2;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::Error;
use crate::config::SimConfig;
use crate::partition::partition;
use crate::transport;

/// One published round as evaluated by the simulator.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// Version published.
    pub version: u64,
    /// Accuracy of the global model on the held-out test set.
    pub accuracy: f64,
    /// Mean cross-entropy on the held-out test set.
    pub loss: f64,
    /// Largest example-level epsilon of any node so far (infinite without DP).
    pub epsilon: f64,
    /// Nodes whose updates were aggregated.
    pub contributors: u32,
    /// Seconds since the previous version (or the start).
    pub seconds: f64,
}

/// What `summary.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Rounds published.
    pub rounds: u64,
    /// Accuracy of the last version on the held-out test set.
    pub final_accuracy: f64,
    /// Loss of the last version on the held-out test set.
    pub final_loss: f64,
    /// Largest example-level epsilon of any node (`null` when DP was off: unbounded).
    pub epsilon: Option<f64>,
    /// The delta of that epsilon.
    pub delta: f64,
    /// Whether DP-SGD was on.
    pub dp: bool,
    /// Versions in the store, including the initial one.
    pub versions_published: u64,
    /// Virtual nodes.
    pub nodes: usize,
    /// Training rows per node (min, max).
    pub rows_per_node: (usize, usize),
    /// Held-out test rows.
    pub test_rows: usize,
    /// Wall-clock seconds for the whole run.
    pub seconds: f64,
    /// Where the model store is.
    pub store: PathBuf,
}

/// Runs the simulation described by `config`, writing results under `out`.
///
/// # Errors
/// Data, partition, coordinator and node errors, and I/O on `out`.
pub async fn run(config: SimConfig, out: &Path) -> Result<Summary, Error> {
    let started = Instant::now();
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let store_dir = out.join("store");
    if store_dir.join("versions").exists() {
        return Err(Error::OutputExists(store_dir));
    }
    // Ledgers left by an earlier run would be counted as this run's spending.
    let ledgers = out.join("ledgers");
    if ledgers.exists() {
        return Err(Error::OutputExists(ledgers));
    }

    let (train, test) = load_data(&config).await?;
    let shares = partition(
        train.labels(),
        config.simulation.nodes,
        config.simulation.partition().map_err(Error::Mismatch)?,
        config.simulation.seed,
    )?;
    let sizes: Vec<usize> = shares.iter().map(Vec::len).collect();
    info!(
        nodes = shares.len(),
        min_rows = sizes.iter().min(),
        max_rows = sizes.iter().max(),
        test_rows = test.rows(),
        "data partitioned"
    );

    let coordinator_config = config.coordinator(&store_dir);
    let coordinator = tokio::task::spawn_blocking(move || Coordinator::open(coordinator_config))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let spec = coordinator.spec();
    if spec.features != train.cols() {
        return Err(Error::Mismatch(format!(
            "[model] features = {} but the data has {} feature columns",
            spec.features,
            train.cols()
        )));
    }
    let published = coordinator.subscribe();
    let (network, incoming) = transport::network();
    let mut server = tokio::spawn(athanor_coordinator::server::serve(
        coordinator.clone(),
        incoming,
        std::future::pending(),
    ));

    let mut nodes = Vec::with_capacity(shares.len());
    for (index, rows) in shares.iter().enumerate() {
        let randomness = if config.simulation.reproducible {
            Randomness::InsecureFixedSeed(config.simulation.seed.wrapping_add(1 + index as u64))
        } else {
            Randomness::OperatingSystem
        };
        let share = train.subset(rows);
        let local_test = share.subset(&[]);
        let mut node = Node::new(config.node(index, &ledgers), share, local_test, randomness)?;
        if config.simulation.dropout_rate > 0.0 {
            node.inject_dropouts(Dropouts {
                rate: config.simulation.dropout_rate,
                stage: config.simulation.dropout_stage.stage(),
                rng: ChaCha20Rng::seed_from_u64(
                    config.simulation.seed ^ 0xd20_9047 ^ (index as u64) << 32,
                ),
            });
        }
        let channel = network.channel();
        nodes.push(tokio::spawn(node.run(channel, std::future::pending())));
    }

    let (records, stopped) = follow(
        &coordinator,
        published,
        &mut server,
        &test,
        spec,
        &config,
        out,
    )
    .await?;
    let served = match stopped {
        Some(result) => result,
        None => server.await,
    };
    served.map_err(|e| Error::Task(e.to_string()))??;
    for node in nodes {
        match node.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "a virtual node failed"),
            Err(e) => warn!(error = %e, "a virtual node panicked"),
        }
    }

    let last = records.last();
    let dp = config.privacy.dp == athanor_coordinator::config::DpSwitch::On;
    let epsilon = last.map_or(0.0, |r| r.epsilon);
    let store = coordinator.store();
    let summary = Summary {
        rounds: records.len() as u64,
        final_accuracy: last.map_or(f64::NAN, |r| r.accuracy),
        final_loss: last.map_or(f64::NAN, |r| r.loss),
        epsilon: epsilon.is_finite().then_some(epsilon),
        delta: config.privacy.delta,
        dp,
        versions_published: store.next_version(),
        nodes: shares.len(),
        rows_per_node: (
            sizes.iter().copied().min().unwrap_or(0),
            sizes.iter().copied().max().unwrap_or(0),
        ),
        test_rows: test.rows(),
        seconds: started.elapsed().as_secs_f64(),
        store: store_dir,
    };
    let path = out.join("summary.json");
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::Task(e.to_string()))?;
    std::fs::write(&path, json + "\n").map_err(|source| Error::Io { path, source })?;
    Ok(summary)
}

async fn load_data(config: &SimConfig) -> Result<(Dataset, Dataset), Error> {
    let data = config.data.clone();
    tokio::task::spawn_blocking(move || {
        let schema = Schema::load(&data.schema)?;
        let train = Dataset::load(&data.train, &schema)?;
        match &data.test {
            Some(test) => Ok((train, Dataset::load(test, &schema)?)),
            None => Ok(train.split(data.test_fraction, 0)?),
        }
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
}

/// Evaluates each version as it is published and appends it to `rounds.csv`, until the
/// coordinator stops publishing.
async fn follow(
    coordinator: &Coordinator,
    mut published: broadcast::Receiver<Manifest>,
    server: &mut ServerTask,
    test: &Dataset,
    spec: ModelSpec,
    config: &SimConfig,
    out: &Path,
) -> Result<(Vec<RoundRecord>, Option<ServerResult>), Error> {
    let path = out.join("rounds.csv");
    let file = File::create(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let mut csv = BufWriter::new(file);
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    writeln!(
        csv,
        "round,version,accuracy,loss,epsilon,contributors,seconds"
    )
    .map_err(io)?;

    let total = config.rounds.total;
    let mut records = Vec::new();
    let mut last = Instant::now();
    let mut stopped = None;
    while (records.len() as u64) < total {
        let received = tokio::select! {
            biased;
            received = published.recv() => received,
            result = &mut *server => {
                stopped = Some(result);
                break;
            }
        };
        let manifest = match received {
            Ok(manifest) => manifest,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    skipped = n,
                    "evaluation fell behind; some versions are not in rounds.csv"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        let store = coordinator.store();
        let version = manifest.version;
        let (_, params) = tokio::task::spawn_blocking(move || store.load(version))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        let x = ArrayView2::from_shape((test.rows(), test.cols()), test.features())
            .map_err(|e| Error::Mismatch(e.to_string()))?;
        let evaluation =
            model::evaluate(&spec, &params, x, test.labels()).map_err(athanor_node::Error::from)?;
        let epsilon = match manifest.example_privacy.max_epsilon {
            Epsilon::Finite(e) => e,
            Epsilon::Unbounded => f64::INFINITY,
        };
        let record = RoundRecord {
            round: manifest.round,
            version,
            accuracy: evaluation.accuracy,
            loss: evaluation.loss,
            epsilon,
            contributors: manifest.contributors,
            seconds: last.elapsed().as_secs_f64(),
        };
        last = Instant::now();
        writeln!(
            csv,
            "{},{},{:.6},{:.6},{},{},{:.3}",
            record.round,
            record.version,
            record.accuracy,
            record.loss,
            record.epsilon,
            record.contributors,
            record.seconds
        )
        .map_err(io)?;
        csv.flush().map_err(io)?;
        // Versions count towards the total; round numbers also count abandoned rounds.
        println!(
            "version {:>4}/{total} (round {:>4})  accuracy {:.4}  loss {:.4}  epsilon {:>8.4}  \
             contributors {:>4}  {:>6.2}s",
            record.version,
            record.round,
            record.accuracy,
            record.loss,
            record.epsilon,
            record.contributors,
            record.seconds
        );
        records.push(record);
    }
    Ok((records, stopped))
}

type ServerResult = Result<Result<(), athanor_coordinator::Error>, tokio::task::JoinError>;
type ServerTask = tokio::task::JoinHandle<Result<(), athanor_coordinator::Error>>;
