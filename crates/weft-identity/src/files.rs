//! Certificates that another agent keeps on disk (cert-manager's CSI driver, istio-csr, a mounted
//! Secret): the proxy reads the chain, the key and the roots, checks them as it checks a certificate
//! from the CA, and reads them again whenever they change.
//!
//! Files are compared once a second. A change that does not make a usable certificate (a write half
//! done, a key that is not the certificate's, a chain the roots do not sign, someone else's identity)
//! is reported once, naming the file and the problem, and the certificate in use stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::tls::{TlsMaterial, pem_certificate};
use crate::{Credentials, SpiffeId, StoreEvents};

/// How often the files are compared with what was last read.
const POLL: Duration = Duration::from_secs(1);

/// Where the workload's certificate lives on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateFiles {
    /// The workload certificate, leaf first, then any intermediates.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key_file: PathBuf,
    /// The roots peers' certificates are verified against, all trusted (a root rotation lists two).
    pub roots_file: PathBuf,
}

/// What the three files held when last read.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    roots: Vec<u8>,
}

impl CertificateFiles {
    fn read(&self) -> Result<Contents, String> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        Ok(Contents {
            cert: read(&self.cert_file)?,
            key: read(&self.key_file)?,
            roots: read(&self.roots_file)?,
        })
    }

    /// The TLS material the files make for `id`, or what is wrong with them, naming the file.
    pub fn load(&self, id: &SpiffeId) -> Result<TlsMaterial, String> {
        self.build(id, &self.read()?)
    }

    fn build(&self, id: &SpiffeId, contents: &Contents) -> Result<TlsMaterial, String> {
        let certificates = |path: &Path, pem: &[u8]| -> Result<Vec<String>, String> {
            let ders = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if ders.is_empty() {
                return Err(format!("{}: holds no PEM certificate", path.display()));
            }
            Ok(ders.iter().map(|der| pem_certificate(der)).collect())
        };
        let mut chain = certificates(&self.cert_file, &contents.cert)?;
        let roots = certificates(&self.roots_file, &contents.roots)?;
        // A chain file that ends in its root (istio-csr writes them so) keeps it among the roots only.
        chain.retain(|pem| !roots.contains(pem));
        if chain.is_empty() {
            return Err(format!(
                "{}: holds only roots, no workload certificate",
                self.cert_file.display()
            ));
        }
        let key = String::from_utf8(contents.key.clone())
            .map_err(|_| format!("{}: is not PEM text", self.key_file.display()))?;
        chain.push(roots[0].clone());
        let credentials = Credentials::new(id.clone(), chain, key)
            .map_err(|e| format!("{}: {e}", self.cert_file.display()))?;
        let material = TlsMaterial::new(Arc::new(credentials), &roots[1..])
            .map_err(|e| format!("{} or {}: {e}", self.cert_file.display(), self.key_file.display()))?;
        // Building the server side checks that the key is the certificate's.
        material
            .server_config()
            .map_err(|e| format!("{}: {e}", self.key_file.display()))?;
        material.verify_own_chain().map_err(|e| {
            format!(
                "{} against {}: {e}",
                self.cert_file.display(),
                self.roots_file.display()
            )
        })?;
        Ok(material)
    }
}

/// Reads the files now and again whenever they change, publishing each usable certificate; runs until
/// `stop` is cancelled. Until the first usable one, the receiver holds `None`.
pub fn watch_files(
    id: SpiffeId,
    files: CertificateFiles,
    events: StoreEvents,
    stop: CancellationToken,
) -> watch::Receiver<Option<TlsMaterial>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut seen: Option<Contents> = None;
        let mut reported: Option<String> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let outcome = match files.read() {
                Ok(contents) if seen.as_ref() == Some(&contents) => continue,
                Ok(contents) => {
                    let built = files.build(&id, &contents);
                    seen = Some(contents);
                    built
                }
                Err(reason) => Err(reason),
            };
            match outcome {
                Ok(material) => {
                    reported = None;
                    let credentials = &material.credentials;
                    tracing::info!(
                        id = %credentials.id,
                        serial = %credentials.serial,
                        lifetime = ?credentials.lifetime(),
                        "workload certificate loaded from files"
                    );
                    (events.renewed)(credentials);
                    tx.send_replace(Some(material));
                }
                // The same problem every second (a file that is not there yet) is told once.
                Err(reason) if reported.as_ref() == Some(&reason) => {}
                Err(reason) => {
                    let in_use = tx.borrow().as_ref().is_some_and(|m| !m.credentials.is_expired());
                    tracing::warn!(%reason, keeping_valid_certificate = in_use, "cannot use the certificate files");
                    (events.failed)(&reason);
                    reported = Some(reason);
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests;
