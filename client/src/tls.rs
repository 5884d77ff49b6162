//! Trust for `https://` directories: the CA bundle that `BAKER_CA` (or the CLI's `--ca`) names,
//! or else the system's roots; and, when a directory's certificate does not verify, a reason a
//! person can act on.

use std::path::{Path, PathBuf};

/// What is wrong with a CA bundle.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the CA bundle {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA bundle {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    Empty { path: PathBuf },
    #[error("the CA bundle {path} is not valid PEM: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The certificates of the PEM bundle at `path`: at least one.
pub fn read_bundle(path: &Path) -> Result<Vec<reqwest::Certificate>, TrustError> {
    let pem = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(TrustError::Empty {
            path: path.to_owned(),
        });
    }
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TrustError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TrustError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// `BAKER_CA` as a configuration reads it: the path of a bundle that can be read and holds a
/// certificate (checked at start, so that a wrong path is a configuration error).
pub fn parse_bundle_path(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    read_bundle(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

/// A reqwest client builder that trusts only the certificates in `ca` when given, the system's
/// roots otherwise. Every reqwest client of Baker's binaries comes from here: an image built
/// from scratch has no system roots, and a client without any still serves `http://` (an
/// `https://` server is then refused as signed by no trusted CA).
pub fn builder(ca: Option<&Path>) -> Result<reqwest::ClientBuilder, TrustError> {
    let roots = match ca {
        Some(path) => read_bundle(path)?,
        None => system_roots().to_vec(),
    };
    Ok(reqwest::Client::builder().tls_certs_only(roots))
}

/// The system's CA certificates (`/etc/ssl/certs`, `SSL_CERT_FILE`, ...), read once; none
/// where there are none.
fn system_roots() -> &'static [reqwest::Certificate] {
    static ROOTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        rustls_native_certs::load_native_certs()
            .certs
            .iter()
            .filter_map(|der| reqwest::Certificate::from_der(der).ok())
            .collect()
    })
}

/// Why `err` happened, when the cause is a certificate that did not verify (or a handshake
/// that failed); `None` for every other failure. `trusted` says where the trust came from
/// (`BAKER_CA (/etc/baker/ca.pem)`, or the system's roots).
pub fn untrusted_reason(err: &(dyn std::error::Error + 'static), trusted: &str) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        // An io::Error's source is its inner error's source: look at the inner errors
        // themselves (the TLS error is an io::Error in an io::Error).
        let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(i) = inner {
            if let Some(tls) = i.downcast_ref::<rustls::Error>() {
                return Some(explain(tls, trusted));
            }
            inner = i
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|r| r as &(dyn std::error::Error + 'static));
        }
        cause = e.source();
    }
    None
}

fn explain(err: &rustls::Error, trusted: &str) -> String {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(c) => {
            let why = match c {
                C::UnknownIssuer => format!("it is not signed by a CA that {trusted} holds"),
                C::Expired | C::ExpiredContext { .. } => "it has expired".to_owned(),
                C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".to_owned(),
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "it does not name this host".to_owned()
                }
                C::Revoked => "it was revoked".to_owned(),
                C::BadSignature => "its signature is not valid".to_owned(),
                _ => "it was not accepted".to_owned(),
            };
            format!("{why} ({err})")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "the TLS handshake failed: the server may not speak TLS (an http:// directory?) \
             ({err})"
        ),
        _ => format!("the TLS handshake failed ({err})"),
    }
}

/// How the trust of a client is told in messages.
pub fn describe(ca: Option<&Path>) -> String {
    match ca {
        Some(p) => format!("BAKER_CA ({})", p.display()),
        None => "the system's roots".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("baker-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_bundle(&empty).unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let missing = dir.join("missing.pem");
        let e = read_bundle(&missing).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read the CA bundle {}", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn explains_what_the_user_can_fix() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let why = untrusted_reason(&unknown, "BAKER_CA (/ca.pem)").unwrap();
        assert!(
            why.starts_with("it is not signed by a CA that BAKER_CA (/ca.pem) holds"),
            "{why}"
        );
        // As hyper's connector hands it over: an io::Error in an io::Error.
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        ));
        assert!(untrusted_reason(&wrapped, "x")
            .unwrap()
            .starts_with("it has expired"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(untrusted_reason(&refused, "x"), None);
    }
}
