//! `athanor-node`: runs an organization's node next to its data.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use athanor_node::{Node, NodeConfig, Randomness};
use clap::{Parser, Subcommand};
use tonic::transport::Endpoint;
use tracing_subscriber::EnvFilter;

/// An Athanor node: trains on local data with DP-SGD and sends only clipped, noised updates to
/// the coordinator. The node only ever dials out.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the coordinator and train in every round this node is selected for, until the
    /// federation finishes.
    Run {
        /// Node configuration file (TOML): coordinator address, data path, schema, privacy
        /// floor. See the README's configuration reference.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load and validate the configured data without contacting anyone, and print a summary.
    Check {
        /// Node configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => run_node(config),
        Command::Check { config } => {
            let config = load(&config)?;
            let node = Node::load(config, Randomness::OperatingSystem)
                .context("loading the node's data")?;
            println!("{}", node.describe_data());
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<NodeConfig> {
    NodeConfig::load(path).with_context(|| format!("loading node config {}", path.display()))
}

fn run_node(path: PathBuf) -> Result<()> {
    let config = load(&path)?;
    let address = config.coordinator.address.clone();
    let node = Node::load(config, Randomness::OperatingSystem)
        .context("loading the node's data; the node does not start on bad data")?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let channel = Endpoint::from_shared(address.clone())
            .with_context(|| format!("coordinator address {address:?} is not a valid URL"))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .connect_lazy();
        let summary = node
            .run(channel, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("node failed")?;
        println!(
            "node finished: {} rounds trained, {} declined, epsilon {} ({})",
            summary.rounds_trained, summary.rounds_declined, summary.epsilon, summary.reason
        );
        Ok(())
    })
}
