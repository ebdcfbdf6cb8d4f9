//! `athanor-coordinator certs`: the federation operator's commands for creating the CA and
//! issuing certificates, printing what was written and what to do next. The work is done by
//! [`athanor_coordinator::certs`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use athanor_coordinator::certs::{
    self, DEFAULT_COORDINATOR_ADDRESS, DEFAULT_DAYS, InitRequest, IssueRequest, Subject, Written,
    names,
};
use athanor_tls::validity::moment;
use clap::{ArgGroup, Subcommand};

/// `certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a federation's CA, the coordinator's certificate and a first operator's, in a
    /// new directory. Refuses to overwrite any file.
    Init {
        /// The federation's name, written into its CA.
        #[arg(long, value_name = "NAME")]
        federation: String,
        /// Directory to write into; created owner-only if missing. Its ca.key can issue any
        /// identity: keep it off the coordinator's machine once nodes are issued.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A DNS name or IP address nodes dial the coordinator by; repeat for several
        /// [default: localhost, 127.0.0.1 and ::1].
        #[arg(long = "coordinator-name", value_name = "HOST")]
        coordinator_names: Vec<String>,
        /// Name of the first operator, for the admin commands.
        #[arg(long, value_name = "NAME", default_value = "admin")]
        operator: String,
        /// Days the coordinator's and the operator's certificates are valid.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_DAYS)]
        days: u32,
    },
    /// Sign one more certificate with the federation's CA: a node's (with a config template),
    /// an operator's, or the coordinator's (other names, or a renewal). Refuses to overwrite
    /// any file.
    #[command(group(ArgGroup::new("subject").required(true).args(["node", "operator", "coordinator_names"])))]
    Issue {
        /// The directory `certs init` wrote (ca.crt and ca.key).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Issue for this node id (1 to 128 characters of A-Z a-z 0-9 . _ -).
        #[arg(long, value_name = "ID")]
        node: Option<String>,
        /// Issue for this operator.
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// Issue the coordinator's certificate for this DNS name or IP address; repeat for
        /// several.
        #[arg(long = "coordinator-name", value_name = "HOST")]
        coordinator_names: Vec<String>,
        /// Directory to write into; created owner-only if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The coordinator's URL, written into a node's node.toml.
        #[arg(long, value_name = "URL", default_value = DEFAULT_COORDINATOR_ADDRESS)]
        coordinator_address: String,
        /// Days the certificate is valid (never past the CA's own end).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_DAYS)]
        days: u32,
    },
}

/// Runs a `certs` subcommand.
///
/// # Errors
/// Anything [`certs::init`] or [`certs::issue`] refuses.
pub fn run(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Init {
            federation,
            out,
            coordinator_names,
            operator,
            days,
        } => {
            let request = InitRequest {
                federation: federation.clone(),
                out,
                coordinator_names,
                operator: operator.clone(),
                days,
            };
            let written = certs::init(&request).context("creating the federation's CA")?;
            print!("{}", describe_init(&federation, &operator, &written));
            Ok(())
        }
        CertsCommand::Issue {
            ca_dir,
            node,
            operator,
            coordinator_names,
            out,
            coordinator_address,
            days,
        } => {
            let subject = match (node, operator) {
                (Some(id), _) => Subject::Node(id),
                (None, Some(name)) => Subject::Operator(name),
                (None, None) => Subject::Coordinator(coordinator_names),
            };
            let request = IssueRequest {
                ca_dir: ca_dir.clone(),
                subject: subject.clone(),
                out,
                coordinator_address,
                days,
            };
            let written = certs::issue(&request).context("issuing a certificate")?;
            print!("{}", describe_issue(&subject, &ca_dir, &written));
            Ok(())
        }
    }
}

fn describe_init(federation: &str, operator: &str, written: &Written) -> String {
    let dir = &written.dir;
    format!(
        "created the CA of federation {federation:?} in {dir}:\n\
         {files}\n\
         certificates valid until {until}; the CA for {ca_years} years.\n\
         ca.key can issue any identity in the federation: keep it offline once nodes are issued.\n\
         \n\
         Add to the coordinator's configuration:\n\
         \n\
         [server.tls]\n\
         ca = \"{ca}\"\n\
         cert = \"{cert}\"\n\
         key = \"{key}\"\n\
         \n\
         Issue each node's certificate and config template with\n\
         \n  athanor-coordinator certs issue --ca-dir {dir} --node NODE_ID --out DIR\n\
         \n\
         and run the admin commands as operator {operator:?} with --tls-dir {dir}.\n",
        dir = dir.display(),
        files = list(&written.files),
        until = moment(written.not_after),
        ca_years = certs::CA_DAYS / 365,
        ca = dir.join(names::CA_CERT).display(),
        cert = dir.join(names::COORDINATOR_CERT).display(),
        key = dir.join(names::COORDINATOR_KEY).display(),
    )
}

fn describe_issue(subject: &Subject, ca_dir: &Path, written: &Written) -> String {
    let dir = &written.dir;
    let next = match subject {
        Subject::Node(id) => format!(
            "Give the directory to node {id}'s organization (over a channel you trust: it holds \
             the node's key).\nThey fill in [data] and [privacy] in {config} and run\n\
             \n  athanor-node run --config {config}\n",
            config = dir.join(names::NODE_CONFIG).display()
        ),
        Subject::Operator(name) => format!(
            "Operator {name} runs the admin commands with --tls-dir {}.\n",
            dir.display()
        ),
        Subject::Coordinator(_) => format!(
            "Point [server.tls] cert and key at the new files and restart the coordinator.\n\
             (The CA stays the one in {}.)\n",
            ca_dir.display()
        ),
    };
    format!(
        "issued in {}:\n{}\nvalid until {}.\n{next}",
        dir.display(),
        list(&written.files),
        moment(written.not_after),
    )
}

fn list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|file| {
            let name = file.file_name().map_or_else(
                || file.display().to_string(),
                |name| name.to_string_lossy().into_owned(),
            );
            let note = if name.ends_with(".key") {
                "  (private key, owner-only)"
            } else {
                ""
            };
            format!("  {name}{note}\n")
        })
        .collect()
}
