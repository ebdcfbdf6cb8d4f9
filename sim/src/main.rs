//! `athanor-sim`: a whole federation in one process, on one dataset.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use athanor_node::calculator::PrivacyCommand;
use athanor_sim::SimConfig;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The Athanor simulator: runs the real coordinator and many virtual nodes in one process,
/// to study accuracy against privacy before a federation is deployed.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a simulated federation and write rounds.csv, summary.json, the model store and
    /// every virtual node's privacy ledger (ledgers/).
    Run {
        /// Simulation configuration file (TOML); see examples/ and the README.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Output directory (created if missing; must not already hold a store or ledgers).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Privacy calculator: the epsilon of a DP-SGD run, or the noise a target epsilon needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
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
    match cli.command {
        Command::Run { config, out } => {
            let config = SimConfig::load(&config)
                .with_context(|| format!("loading simulation config {}", config.display()))?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let summary = runtime
                .block_on(athanor_sim::run::run(config, &out))
                .context("simulation failed")?;
            let epsilon = summary
                .epsilon
                .map_or("inf (DP off)".to_string(), |e| format!("{e:.4}"));
            println!(
                "done: {} rounds, final accuracy {:.4}, epsilon {} at delta {:e}, {} versions in {} ({:.1}s)",
                summary.rounds,
                summary.final_accuracy,
                epsilon,
                summary.delta,
                summary.versions_published,
                summary.store.display(),
                summary.seconds
            );
            Ok(())
        }
        Command::Privacy(query) => {
            println!("{}", query.run()?);
            Ok(())
        }
    }
}
