//! Throwaway certificate authorities for the HTTPS tests: a CA, and certificates it signs for
//! `127.0.0.1` and `localhost`, written as PEM files in a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and the directory its files are written in.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// `ca.pem`: the CA's certificate, what clients trust (`BAKER_CA`).
    pub ca: PathBuf,
    name: String,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name` (its files are prefixed with it).
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("baker-pki-")
            .tempdir()
            .expect("creating the CA's temporary directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Baker test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params
            .self_signed(&key)
            .expect("signing the CA certificate");
        let ca = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).expect("writing the CA certificate");
        Pki {
            issuer: Issuer::new(params, key),
            dir,
            ca,
            name: name.to_owned(),
        }
    }

    /// A certificate for `127.0.0.1` and `localhost` signed by this CA, valid now, written as
    /// `<file>.pem` and `<file>-key.pem`.
    pub fn server(&self, file: &str) -> Pair {
        self.issue(file, false)
    }

    /// The same, but expired a long time ago.
    pub fn expired_server(&self, file: &str) -> Pair {
        self.issue(file, true)
    }

    /// A new certificate and key for `127.0.0.1` and `localhost` written over `pair`'s files
    /// the way a renewal tool does it: each new file written aside, then renamed into place.
    pub fn renew(&self, pair: &Pair) {
        let (cert, key) = self.make(false);
        let write = |path: &Path, text: &str| {
            let aside = path.with_extension("new");
            std::fs::write(&aside, text).expect("writing a renewed file");
            std::fs::rename(&aside, path).expect("renaming a renewed file into place");
        };
        write(&pair.key, &key);
        write(&pair.cert, &cert);
    }

    fn issue(&self, file: &str, expired: bool) -> Pair {
        let (cert, key) = self.make(expired);
        let pair = Pair {
            cert: self.dir.path().join(format!("{}-{file}.pem", self.name)),
            key: self
                .dir
                .path()
                .join(format!("{}-{file}-key.pem", self.name)),
        };
        std::fs::write(&pair.cert, cert).expect("writing a certificate");
        std::fs::write(&pair.key, key).expect("writing a key");
        pair
    }

    /// A certificate (PEM) and its key (PEM).
    fn make(&self, expired: bool) -> (String, String) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "baker-directory");
        if expired {
            params.not_before = date_time_ymd(2001, 1, 1);
            params.not_after = date_time_ymd(2002, 1, 1);
        }
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A bundle of the CA certificates of `pkis`, written in the first one's directory.
pub fn bundle(pkis: &[&Pki]) -> PathBuf {
    let text: String = pkis
        .iter()
        .map(|p| std::fs::read_to_string(&p.ca).expect("reading a CA certificate"))
        .collect();
    let path = pkis[0].dir().join(format!(
        "bundle-{}.pem",
        pkis.iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join("-")
    ));
    std::fs::write(&path, text).expect("writing a CA bundle");
    path
}
