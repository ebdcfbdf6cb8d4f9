//! The PEM files a side of a connection loads: certificates (the federation's CA, or a
//! side's own certificate chain) and private keys.
//!
//! Files are read once, when a process starts, and parsed at once, so that a wrong path or a
//! file of the wrong kind is an error naming the file before any socket is opened. Private
//! keys are kept zeroized on drop and never printed.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::Error;

/// One or more certificates read from a PEM file, the first being the leaf (or the CA).
#[derive(Clone)]
pub struct Certificates {
    path: PathBuf,
    pem: Vec<u8>,
    der: Vec<CertificateDer<'static>>,
}

impl Certificates {
    /// Reads every certificate in the PEM file at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Pem`] when it holds no
    /// certificate or a malformed one.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let pem = read(path)?;
        let der = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Pem {
                path: path.to_path_buf(),
                message: format!("not a readable PEM certificate file ({e})"),
            })?;
        if der.is_empty() {
            return Err(Error::Pem {
                path: path.to_path_buf(),
                message: "holds no certificate (expected a \"BEGIN CERTIFICATE\" block)".into(),
            });
        }
        Ok(Certificates {
            path: path.to_path_buf(),
            pem,
            der,
        })
    }

    /// The file the certificates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's text, as tonic takes it.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// Every certificate in the file, in order.
    pub fn der(&self) -> &[CertificateDer<'static>] {
        &self.der
    }

    /// The first certificate: a side's own (leaf) certificate, or the CA.
    pub fn first(&self) -> &CertificateDer<'static> {
        // `read` refuses a file without certificates, so there is a first one.
        &self.der[0]
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("path", &self.path)
            .field("count", &self.der.len())
            .finish()
    }
}

/// A private key read from a PEM file (PKCS#8, SEC1 or PKCS#1).
///
/// The file's text is zeroized when dropped; the DER form is rustls's own type, which is
/// not, and neither are the copies rustls and tonic keep inside their configurations.
pub struct PrivateKey {
    path: PathBuf,
    pem: Zeroizing<Vec<u8>>,
    der: PrivateKeyDer<'static>,
}

impl PrivateKey {
    /// Reads and checks the private key in the PEM file at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Pem`] when it holds no key.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let pem = Zeroizing::new(read(path)?);
        let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::Pem {
            path: path.to_path_buf(),
            message: format!(
                "holds no private key ({e}); expected a \"BEGIN PRIVATE KEY\" block as \
                 written by `athanor-coordinator certs`"
            ),
        })?;
        Ok(PrivateKey {
            path: path.to_path_buf(),
            pem,
            der,
        })
    }

    /// The file the key came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's text, as tonic takes it.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// The key in DER, as rustls takes it.
    pub fn der(&self) -> PrivateKeyDer<'static> {
        self.der.clone_key()
    }

    /// The file's permission bits when others than its owner may read or write it, which the
    /// caller should warn about; `None` when they are owner-only or cannot be read.
    pub fn loose_permissions(&self) -> Option<u32> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&self.path).ok()?.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then_some(mode)
        }
        #[cfg(not(unix))]
        None
    }
}

impl Clone for PrivateKey {
    fn clone(&self) -> Self {
        PrivateKey {
            path: self.path.clone(),
            pem: self.pem.clone(),
            der: self.der.clone_key(),
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_refused_where_a_certificate_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.join("key.pem");
        std::fs::write(&path, key.serialize_pem()).unwrap();
        let err = Certificates::read(&path).unwrap_err().to_string();
        assert!(err.contains("holds no certificate"), "{err}");
    }

    #[test]
    fn a_certificate_file_is_refused_where_a_key_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let path = dir.join("cert.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        let err = PrivateKey::read(&path).unwrap_err().to_string();
        assert!(err.contains("holds no private key"), "{err}");
        assert!(Certificates::read(&path).is_ok());
    }

    #[test]
    fn a_key_prints_its_path_and_nothing_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.join("key.pem");
        std::fs::write(&path, key.serialize_pem()).unwrap();
        let printed = format!("{:?}", PrivateKey::read(&path).unwrap());
        assert!(
            printed.contains("key.pem") && !printed.contains("BEGIN"),
            "{printed}"
        );
    }
}
