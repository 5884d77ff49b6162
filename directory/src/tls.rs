//! HTTPS: the certificate and key of `BAKER_TLS_CERT` and `BAKER_TLS_KEY`, reloaded when their
//! files change.
//!
//! Every new connection is accepted with the certificate current at that moment; connections
//! already open (watch streams that live for hours) keep the session they made, so renewing a
//! certificate drops nothing. A reload that fails (a half-written file, a key that does not
//! match) is logged and changes nothing: the previous certificate stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no PEM {kind}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("the key {key} does not go with the certificate {cert}, or cannot be used: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The files a directory serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// `BAKER_TLS_CERT`: the certificate chain, the directory's own first.
    pub cert: PathBuf,
    /// `BAKER_TLS_KEY`: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Files {
    /// A server configuration of the files as they are now.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        fn read_err(
            what: &'static str,
            path: &Path,
        ) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError {
            let path = path.to_owned();
            move |e| TlsError::Read {
                what,
                path,
                reason: e.to_string(),
            }
        }
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .map_err(read_err("the certificate", &self.cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err("the certificate", &self.cert))?;
        if certs.is_empty() {
            return Err(TlsError::Empty {
                what: "the certificate",
                path: self.cert.clone(),
                kind: "certificate (-----BEGIN CERTIFICATE-----)",
            });
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
                what: "the key",
                path: self.key.clone(),
                kind: "private key (-----BEGIN PRIVATE KEY-----)",
            },
            e => read_err("the key", &self.key)(e),
        })?;
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// When each file last changed, and its size: what a reload looks at.
    fn stamp(&self) -> Option<[(SystemTime, u64); 2]> {
        let of = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        Some([of(&self.cert)?, of(&self.key)?])
    }
}

/// The acceptor new connections use: the files' latest good configuration.
#[derive(Debug)]
pub struct Reloading {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
}

impl Reloading {
    /// Loads `files`; an error here stops the directory from starting.
    pub fn new(files: Files) -> Result<Arc<Reloading>, TlsError> {
        let config = files.load()?;
        Ok(Arc::new(Reloading {
            files,
            current: RwLock::new(config),
        }))
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }

    /// Looks at the files every [`RELOAD_INTERVAL`] until `shutdown`, and serves what they
    /// hold once they changed and load.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut seen = self.files.stamp();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
            }
            // Unchanged (since the last load, good or failed): nothing to do until it changes.
            let now = self.files.stamp();
            if now == seen {
                continue;
            }
            seen = now;
            match self.files.load() {
                Ok(config) => {
                    *self
                        .current
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        "reloaded the TLS certificate and key: new connections use them"
                    );
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot reload the TLS certificate: {e}; still serving the previous one"
                    );
                }
            }
        }
    }
}
