//! `athanor-node`: runs an organization's node next to its data.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use athanor_core::export::{ExportFormat, WriteError};
use athanor_node::budget::Summary;
use athanor_node::calculator::PrivacyCommand;
use athanor_node::client::CoordinatorClient;
use athanor_node::fetch::FetchRequest;
use athanor_node::ledger::Ledger;
use athanor_node::{Node, NodeConfig, Randomness, transport};
use athanor_tls::ClientSecurity;
use clap::{Parser, Subcommand, ValueEnum};
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
        /// Node configuration file (TOML): coordinator address, TLS files, data path, schema,
        /// privacy floor. See the README's configuration reference.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Dial the coordinator in plaintext (an http:// address), ignoring [tls]: nobody
        /// checks who answers, and anyone on the path can read and change this node's
        /// updates. For tests on a trusted machine only; warns at every start.
        #[arg(long)]
        insecure: bool,
    },
    /// Load and validate the configured data and privacy ledger without contacting anyone,
    /// and print a summary. Creates an empty ledger if there is none, as `run` would.
    Check {
        /// Node configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the privacy ledger: rounds recorded, epsilon spent, budget and what remains.
    /// Reads the ledger without changing it.
    Budget {
        /// Node configuration file (TOML); its [privacy] section names the budget, the
        /// accountant and the ledger.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Privacy calculator: the epsilon of a DP-SGD run, or the noise a target epsilon needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// Save a published model version to a file. Joins with a watch-only session, which never
    /// takes part in a round, so it may run next to this node's `run`; loads no data and
    /// spends no privacy.
    Fetch {
        /// Node configuration file (TOML), as for `run`: its coordinator address, TLS files
        /// and node id are used.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The version to fetch [default: the latest published].
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        /// The file to write, atomically (temporary file, then rename) [default:
        /// model-vN.safetensors or model-vN.npy in the current directory].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// File format: the coordinator's own safetensors weights file, byte for byte, or the
        /// flat parameter vector as one .npy array of little-endian float32.
        #[arg(long, value_enum, default_value_t = Format::Safetensors)]
        format: Format,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
        /// Dial the coordinator in plaintext (an http:// address), ignoring [tls], as for
        /// `run`. For tests on a trusted machine only.
        #[arg(long)]
        insecure: bool,
    },
}

/// The formats `fetch` writes, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The stored safetensors weights file, byte for byte.
    Safetensors,
    /// The flat parameter vector as one `.npy` array.
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
    match cli.command {
        Command::Run { config, insecure } => run_node(config, insecure),
        Command::Check { config } => {
            let config = load(&config)?;
            let budget = config.privacy.budget();
            let node = Node::load(config, Randomness::OperatingSystem)
                .context("loading the node's data and privacy ledger")?;
            println!("{}", node.describe_data());
            let spent = node.spent().context("composing the privacy ledger")?;
            println!(
                "privacy ledger {}: {} entries, epsilon {:.4} of a budget of {} at delta {:e}",
                node.ledger().path().display(),
                node.ledger().entries().len(),
                spent.epsilon,
                budget.epsilon,
                budget.delta
            );
            Ok(())
        }
        Command::Budget { config, json } => show_budget(&config, json),
        Command::Privacy(query) => {
            println!("{}", query.run()?);
            Ok(())
        }
        Command::Fetch {
            config,
            version,
            out,
            format,
            force,
            insecure,
        } => {
            let format = match format {
                Format::Safetensors => ExportFormat::Safetensors,
                Format::Npy => ExportFormat::Npy,
            };
            let request = FetchRequest {
                version,
                format,
                out,
                overwrite: force,
            };
            fetch(&config, &request, insecure)
        }
    }
}

fn fetch(path: &Path, request: &FetchRequest, insecure: bool) -> Result<()> {
    let config = load(path)?;
    let security = transport::security(&config, insecure)
        .with_context(|| format!("setting up the connection configured in {}", path.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let channel = {
        let _entered = runtime.enter();
        transport::channel(&config, &security).with_context(|| {
            format!("setting up the connection configured in {}", path.display())
        })?
    };
    let mut client = CoordinatorClient::new(channel, config.coordinator.address.clone());
    let tls = match security {
        ClientSecurity::MutualTls(tls) => Some(*tls),
        ClientSecurity::InsecurePlaintext => None,
    };
    let wanted = request
        .version
        .map_or("the latest version".to_string(), |v| format!("version {v}"));

    runtime.block_on(async move {
        let fetched = match athanor_node::fetch::fetch(&mut client, &config.node.id, request).await
        {
            Ok(fetched) => fetched,
            Err(error @ athanor_node::Error::Write(WriteError::Exists { .. })) => {
                anyhow::bail!(
                    "fetching {wanted}: {error}; choose another --out or pass --force to replace it"
                );
            }
            Err(error) => {
                let why = transport::why(tls.as_ref(), &error).await;
                anyhow::bail!("fetching {wanted}: {why}");
            }
        };
        println!(
            "fetched version {} as {} to {} ({} bytes, {} float32 parameters, sha256 {})",
            fetched.version,
            fetched.format.name(),
            fetched.path.display(),
            fetched.bytes,
            fetched.num_params,
            fetched.sha256
        );
        Ok(())
    })
}

fn show_budget(path: &Path, json: bool) -> Result<()> {
    let config = load(path)?;
    let budget = config.privacy.budget();
    let contents = Ledger::read(config.ledger_path())?;
    let summary = budget
        .summary(&contents)
        .context("composing the privacy ledger")?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", describe(&summary));
    }
    Ok(())
}

/// The ledger summary as aligned lines of text.
fn describe(s: &Summary) -> String {
    let epsilon = |e: f64| {
        if e.is_finite() {
            format!("{e:.4}")
        } else {
            "unbounded".to_string()
        }
    };
    let created = if s.exists { "" } else { " (not created yet)" };
    let order = s
        .order
        .map_or(String::new(), |o| format!(", best order {o}"));
    let mut text = format!(
        "ledger      {}{created}\n\
         entries     {} ({} rounds, {} steps)\n\
         spent       epsilon {} at delta {:e} ({}{order})\n\
         budget      epsilon {}\n\
         remaining   epsilon {}\n",
        s.ledger.display(),
        s.entries,
        s.rounds,
        s.steps,
        epsilon(s.spent),
        s.delta,
        athanor_node::budget::name(s.accountant),
        epsilon(s.budget),
        epsilon(s.remaining),
    );
    if s.trained_without_dp {
        text.push_str("note        a round was trained without DP: the budget is spent\n");
    }
    if let Some(line) = s.torn_last_line {
        text.push_str(&format!(
            "note        line {line} was cut short by an interrupted write and does not count; \
             the node drops it when it next starts\n"
        ));
    }
    text
}

fn load(path: &Path) -> Result<NodeConfig> {
    NodeConfig::load(path).with_context(|| format!("loading node config {}", path.display()))
}

fn run_node(path: PathBuf, insecure: bool) -> Result<()> {
    let config = load(&path)?;
    let security = transport::security(&config, insecure)
        .with_context(|| format!("setting up the connection configured in {}", path.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // The channel needs the runtime; it dials nobody until the node's first call.
    let channel = {
        let _entered = runtime.enter();
        transport::channel(&config, &security).with_context(|| {
            format!("setting up the connection configured in {}", path.display())
        })?
    };
    let randomness = match config.node.insecure_seed {
        Some(seed) => {
            tracing::warn!(
                seed,
                "[node] insecure_seed is set: the DP noise and the secure-aggregation masks are \
                 predictable by anyone who knows it; use it for tests only"
            );
            Randomness::InsecureFixedSeed(seed)
        }
        None => Randomness::OperatingSystem,
    };
    let mut node = Node::load(config, randomness).context(
        "loading the node's data and privacy ledger; the node does not start if either is bad",
    )?;
    if let ClientSecurity::MutualTls(tls) = security {
        node.diagnose_refusals_with(*tls);
    }

    runtime.block_on(async move {
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
