//! Saving a published model version to a local file: `athanor-node fetch`.
//!
//! The node joins with a watch-only session: it proves who it is exactly as `run` does (under
//! mutual TLS the coordinator takes its id from the certificate and refuses a claim of another
//! id), but the session never counts towards `min_nodes`, is never drawn into a round, and does
//! not replace a training session of the same node, so an operator may fetch with the node's
//! own configuration while the node trains. No data is loaded and the privacy ledger is not
//! touched: fetching a published model spends no privacy.
//!
//! The parameters are checked against the SHA-256 the coordinator sends with them
//! ([`CoordinatorClient::fetch_model`]); the file is then built with athanor-core's writers
//! ([`athanor_core::export`]). Rebuilt as safetensors, the parameters must give the very file
//! the coordinator's store holds, whose hash the coordinator sends too: that check ties the
//! file to the version's manifest whatever format is written. The file is written atomically
//! (temporary file, flush, rename) and an existing one is only replaced when asked.

use std::path::PathBuf;

use athanor_core::export::{self, ExportFormat, Overwrite};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::Error;
use crate::client::CoordinatorClient;

/// What to fetch and where to put it.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The version; the latest published when `None`.
    pub version: Option<u64>,
    /// The file format.
    pub format: ExportFormat,
    /// The file to write; `model-vN.<format>` in the current directory when `None`.
    pub out: Option<PathBuf>,
    /// Whether an existing file may be replaced.
    pub overwrite: bool,
}

/// What a fetch wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The version fetched.
    pub version: u64,
    /// The format written.
    pub format: ExportFormat,
    /// The file written.
    pub path: PathBuf,
    /// Its length in bytes.
    pub bytes: u64,
    /// SHA-256 of the file written.
    pub sha256: String,
    /// Length of the flat parameter vector.
    pub num_params: usize,
}

/// Fetches a version as node `node_id` and writes it as `request` says.
///
/// # Errors
/// [`Error::Rpc`] when the coordinator cannot be reached or refuses (an unknown version is
/// `NOT_FOUND`); [`Error::Protocol`] when what it sends does not check out;
/// [`Error::Write`] when the file exists and may not be replaced, or cannot be written (the
/// target is then untouched).
pub async fn fetch(
    client: &mut CoordinatorClient,
    node_id: &str,
    request: &FetchRequest,
) -> Result<Fetched, Error> {
    let overwrite = if request.overwrite {
        Overwrite::Allow
    } else {
        Overwrite::Refuse
    };
    // Refuse before downloading anything when the answer is already known.
    if let Some(out) = &request.out
        && overwrite == Overwrite::Refuse
        && out.exists()
    {
        return Err(export::WriteError::Exists { path: out.clone() }.into());
    }

    let session = client.join_observer(node_id).await?;
    let model = client
        .fetch_model(&session.token, request.version, &session.spec)
        .await?;
    let version = model.version;

    // The store's file, rebuilt, must be the one the coordinator holds.
    let weights = export::safetensors_file(version, &session.spec, &model.params);
    let weights_sha256 = hex::encode(Sha256::digest(&weights));
    match &model.weights_sha256 {
        Some(expected) if *expected != weights_sha256 => {
            return Err(Error::Protocol(format!(
                "model version {version} rebuilt as safetensors has sha256 {weights_sha256}, but \
                 the coordinator's store records {expected}"
            )));
        }
        Some(_) => {}
        None => info!(
            version,
            "the coordinator does not send the stored file's hash (an older coordinator); only \
             the parameters' hash was checked"
        ),
    }

    let contents = match request.format {
        ExportFormat::Safetensors => weights,
        ExportFormat::Npy => export::npy_f32(&model.params),
    };
    let path = request.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("model-v{version}.{}", request.format.extension()))
    });
    export::write_atomically(&path, &contents, overwrite)?;
    info!(version, path = %path.display(), bytes = contents.len(), "model version saved");

    Ok(Fetched {
        version,
        format: request.format,
        path,
        bytes: contents.len() as u64,
        sha256: hex::encode(Sha256::digest(&contents)),
        num_params: model.params.len(),
    })
}

#[cfg(test)]
mod tests {
    use tonic::transport::Endpoint;

    use super::*;

    #[tokio::test]
    async fn an_existing_file_is_refused_before_the_coordinator_is_dialed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        std::fs::write(&out, b"kept").unwrap();
        // A lazy channel to a loopback port nobody serves: dialing it would fail with an RPC
        // error, not the refusal expected.
        let channel = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let mut client = CoordinatorClient::new(channel, "http://127.0.0.1:9");
        let request = FetchRequest {
            version: Some(1),
            format: ExportFormat::Safetensors,
            out: Some(out.clone()),
            overwrite: false,
        };

        let error = fetch(&mut client, "clinic-a", &request).await.unwrap_err();
        assert!(
            matches!(error, Error::Write(export::WriteError::Exists { .. })),
            "{error}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"kept");
    }
}
