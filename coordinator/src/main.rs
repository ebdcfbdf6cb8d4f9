//! `athanor-coordinator`: runs a federation's coordinator, and lets its operator drive and
//! inspect it.
//!
//! `serve` runs the coordinator. Every other subcommand is a client: it talks to a running
//! coordinator's admin service (`--address`), or, for the model store, reads a store directory
//! directly (`--store`, `--config`) without needing a coordinator. What each prints, for people
//! and with `--json` for scripts, is described in [`admin_cli`].

mod admin_cli;
mod certs_cli;
mod security;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use athanor_coordinator::CoordinatorConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::admin_cli::{DEFAULT_ADDRESS, Source};

/// The Athanor coordinator: runs rounds of federated training and publishes model versions.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    security: security::SecurityArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve nodes and operators and run rounds until the configured number is published.
    Serve {
        /// Coordinator configuration file (TOML); see the README's configuration reference.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Create the federation's CA and issue certificates for the coordinator, nodes and
    /// operators.
    Certs {
        #[command(subcommand)]
        command: certs_cli::CertsCommand,
    },
    /// Where a running federation is: round, stage, nodes, versions, pause, node-level budget.
    Status {
        #[command(flatten)]
        remote: Remote,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the nodes of a running coordinator.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Inspect and export published model versions.
    Versions {
        #[command(subcommand)]
        command: VersionsCommand,
    },
    /// Pause or resume the opening of rounds.
    Rounds {
        #[command(subcommand)]
        command: RoundsCommand,
    },
    /// Node-level privacy of the published models: epsilon spent and left of the budget.
    Budget {
        /// URL of a running coordinator's admin service; the default when --config is not
        /// given [default: https://127.0.0.1:50051].
        #[arg(long, value_name = "URL", conflicts_with = "config")]
        address: Option<String>,
        /// Compute it without a coordinator, from this configuration's [node_privacy]
        /// section and the latest manifest in its [store] directory.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Every node that joined: session age, last seen, rounds contributed, dataset fingerprint.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum VersionsCommand {
    /// List every version, oldest first, with its status (damaged versions included).
    List {
        #[command(flatten)]
        source: StoreSource,
        /// Print one JSON object per line (a manifest, or the damaged version and why)
        /// instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one version's manifest.
    Show {
        /// The version number.
        version: u64,
        #[command(flatten)]
        source: StoreSource,
        /// Print the manifest as one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write one version's weights to a file, after checking them against the manifest's hash.
    Export {
        /// The version number.
        version: u64,
        /// File format to write.
        #[arg(long, value_enum)]
        format: Format,
        /// The file to write. Written atomically (temporary file, then rename).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        source: StoreSource,
        /// Print one JSON object describing the file written instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RoundsCommand {
    /// Open no new round until resumed; a round already open runs to its end.
    Pause {
        #[command(flatten)]
        remote: Remote,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Open rounds again after a pause.
    Resume {
        #[command(flatten)]
        remote: Remote,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A running coordinator.
#[derive(Debug, Args)]
struct Remote {
    /// URL of the coordinator's admin service (the address it serves nodes on).
    #[arg(long, value_name = "URL", default_value = DEFAULT_ADDRESS)]
    address: String,
}

/// Where to read versions from: a running coordinator, or a store directory.
#[derive(Debug, Args)]
struct StoreSource {
    /// URL of a running coordinator's admin service; the default when neither --store nor
    /// --config is given [default: https://127.0.0.1:50051].
    #[arg(long, value_name = "URL", conflicts_with_all = ["store", "config"])]
    address: Option<String>,
    /// Read this model store directory directly, without a coordinator. Read-only, so safe
    /// next to a running coordinator.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    store: Option<PathBuf>,
    /// Read the model store named by this coordinator configuration's [store] dir.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Export formats, as spelled on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// The stored safetensors weights file, byte for byte.
    Safetensors,
    /// The flat parameter vector as one `.npy` array of little-endian float32, tensors end to
    /// end in the order the export lists them.
    Npy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    security::install(&cli.security);
    match cli.command {
        Command::Serve { config } => serve(config, &cli.security),
        Command::Certs { command } => certs_cli::run(command),
        Command::Status { remote, json } => block_on(admin_cli::status(&remote.address, json)),
        Command::Nodes {
            command: NodesCommand::List { remote, json },
        } => block_on(admin_cli::list_nodes(&remote.address, json)),
        Command::Versions { command } => versions(command),
        Command::Rounds { command } => match command {
            RoundsCommand::Pause { remote, json } => {
                block_on(admin_cli::pause(&remote.address, json))
            }
            RoundsCommand::Resume { remote, json } => {
                block_on(admin_cli::resume(&remote.address, json))
            }
        },
        Command::Budget {
            address,
            config,
            json,
        } => match config {
            Some(config) => admin_cli::budget_offline(&load_config(&config)?, json),
            None => block_on(admin_cli::budget(
                address.as_deref().unwrap_or(DEFAULT_ADDRESS),
                json,
            )),
        },
    }
}

fn versions(command: VersionsCommand) -> Result<()> {
    match command {
        VersionsCommand::List { source, json } => {
            block_on(admin_cli::list_versions(&resolve(source)?, json))
        }
        VersionsCommand::Show {
            version,
            source,
            json,
        } => block_on(admin_cli::show_version(&resolve(source)?, version, json)),
        VersionsCommand::Export {
            version,
            format,
            out,
            force,
            source,
            json,
        } => {
            let format = match format {
                Format::Safetensors => athanor_coordinator::export::ExportFormat::Safetensors,
                Format::Npy => athanor_coordinator::export::ExportFormat::Npy,
            };
            let request = admin_cli::ExportRequest {
                version,
                format,
                out,
                overwrite: force,
            };
            block_on(admin_cli::export_version(&resolve(source)?, &request, json))
        }
    }
}

/// The store or coordinator a versions command reads.
fn resolve(source: StoreSource) -> Result<Source> {
    Ok(match (source.address, source.store, source.config) {
        (_, Some(store), _) => Source::Store(store),
        (_, None, Some(config)) => Source::Store(load_config(&config)?.store.dir),
        (address, None, None) => {
            Source::Coordinator(address.unwrap_or_else(|| DEFAULT_ADDRESS.to_string()))
        }
    })
}

fn load_config(path: &std::path::Path) -> Result<CoordinatorConfig> {
    CoordinatorConfig::load(path)
        .with_context(|| format!("loading coordinator config {}", path.display()))
}

/// Runs one client command to completion on a single-threaded runtime.
fn block_on(command: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(command)
}

fn serve(path: PathBuf, security: &security::SecurityArgs) -> Result<()> {
    let config = load_config(&path)?;
    let transport = security::serve_transport(&config, security)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        athanor_coordinator::server::run(
            config,
            transport,
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
