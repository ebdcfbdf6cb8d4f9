//! `athanor-coordinator`: runs a federation's coordinator and answers questions about its
//! model store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use athanor_coordinator::CoordinatorConfig;
use athanor_coordinator::store::{ModelStore, VersionStatus};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The Athanor coordinator: runs rounds of federated training and publishes model versions.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve nodes and operators and run rounds until the configured number is published.
    Serve {
        /// Coordinator configuration file (TOML); see the README's configuration reference.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Inspect published model versions.
    Versions {
        #[command(subcommand)]
        command: VersionsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum VersionsCommand {
    /// List every version in the store, oldest first, with its status.
    List {
        /// Coordinator configuration file whose [store] dir to read.
        #[arg(long, value_name = "FILE", conflicts_with = "store")]
        config: Option<PathBuf>,
        /// Model store directory to read directly.
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
        /// Print one JSON manifest per line instead of a table.
        #[arg(long)]
        json: bool,
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
        Command::Serve { config } => serve(config),
        Command::Versions {
            command:
                VersionsCommand::List {
                    config,
                    store,
                    json,
                },
        } => {
            let dir = match (config, store) {
                (Some(config), _) => {
                    CoordinatorConfig::load(&config)
                        .with_context(|| format!("loading {}", config.display()))?
                        .store
                        .dir
                }
                (None, Some(store)) => store,
                (None, None) => anyhow::bail!("pass --config FILE or --store DIR"),
            };
            list_versions(dir, json)
        }
    }
}

fn serve(path: PathBuf) -> Result<()> {
    let config = CoordinatorConfig::load(&path)
        .with_context(|| format!("loading coordinator config {}", path.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        athanor_coordinator::server::run(
            config,
            |address| println!("listening on {address}"),
            shutdown_signal(),
        )
        .await
        .context("coordinator failed")
    })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn list_versions(dir: PathBuf, json: bool) -> Result<()> {
    anyhow::ensure!(
        dir.join("versions").is_dir(),
        "{} is not a model store (no versions/ directory)",
        dir.display()
    );
    let store =
        ModelStore::open(&dir).with_context(|| format!("opening model store {}", dir.display()))?;
    let entries = store.list();
    if json {
        for entry in &entries {
            let line = match &entry.status {
                VersionStatus::Valid(manifest) => serde_json::to_string(manifest)?,
                VersionStatus::Damaged(error) => serde_json::json!({
                    "version": entry.version,
                    "damaged": error.to_string(),
                })
                .to_string(),
            };
            println!("{line}");
        }
        return Ok(());
    }

    println!(
        "{:>7}  {:>6}  {:>5}  {:>12}  {:>10}  {:<20}  sha256",
        "version", "parent", "round", "contributors", "epsilon", "created"
    );
    for entry in &entries {
        match &entry.status {
            VersionStatus::Valid(m) => {
                let parent = m.parent.map_or("-".to_string(), |p| p.to_string());
                let epsilon = match m.example_privacy.max_epsilon {
                    athanor_coordinator::store::Epsilon::Finite(e) => format!("{e:.3}"),
                    athanor_coordinator::store::Epsilon::Unbounded => "inf (no DP)".into(),
                };
                println!(
                    "{:>7}  {:>6}  {:>5}  {:>12}  {:>10}  {:<20}  {}",
                    m.version,
                    parent,
                    m.round,
                    m.contributors,
                    epsilon,
                    m.created_at,
                    &m.weights_sha256[..16.min(m.weights_sha256.len())]
                );
            }
            VersionStatus::Damaged(error) => {
                println!("{:>7}  DAMAGED: {error}", entry.version);
            }
        }
    }
    Ok(())
}
