//! Whom the `https://` sinks trust: the system's CA certificates
//! (`rustls-native-certs`: the OS store, or `SSL_CERT_FILE`/`SSL_CERT_DIR`)
//! plus an optional extra PEM bundle (`--ca-file`), e.g. an internal CA.
//!
//! One [`Trust`] feeds both TLS stacks: the hyper client (webhook,
//! OTLP/HTTP) through `hyper-rustls`, and tonic (OTLP/gRPC) as a rustls
//! server-certificate verifier. Crypto is rustls' `ring` provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// The trust configuration cannot be built. Terminal: a configuration
/// mistake reported at startup (the process exits non-zero); retrying
/// cannot fix it.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// `--ca-file` is unreadable, not PEM, holds no certificate, or holds
    /// a certificate that cannot be a trust anchor.
    #[error("CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    /// An `https://` sink is configured but there is nothing to trust: the
    /// system has no CA certificates and no `--ca-file` was given.
    #[error(
        "no trusted CA certificates: the system store is empty{system} and no --ca-file (TIDEWATCH_EXPORT_CA_FILE) was given"
    )]
    NoRoots { system: String },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The roots `https://` sinks verify server certificates against.
#[derive(Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    /// Why the system store gave nothing, for [`TrustError::NoRoots`].
    system_errors: Vec<String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Trust {
    /// The system roots plus every certificate in `ca_file` (PEM).
    pub fn load(ca_file: Option<&Path>) -> Result<Trust, TrustError> {
        let native = rustls_native_certs::load_native_certs();
        let system_errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
        for error in &system_errors {
            tracing::warn!(%error, "loading the system CA certificates");
        }
        let ca = ca_file.map(|path| (path, std::fs::read(path)));
        Trust::from_parts(native.certs, system_errors, ca)
    }

    /// `ca`: the CA file's path and what reading it gave.
    fn from_parts(
        system: Vec<CertificateDer<'static>>,
        system_errors: Vec<String>,
        ca: Option<(&Path, std::io::Result<Vec<u8>>)>,
    ) -> Result<Trust, TrustError> {
        let mut roots = RootCertStore::empty();
        // A broken certificate in the OS store is skipped, as browsers do.
        let (_, ignored) = roots.add_parsable_certificates(system);
        if ignored > 0 {
            tracing::debug!(ignored, "unparsable system CA certificates skipped");
        }
        if let Some((path, contents)) = ca {
            let bad = |reason: String| TrustError::CaFile {
                path: path.to_path_buf(),
                reason,
            };
            let pem = contents.map_err(|e| bad(e.to_string()))?;
            let mut count = 0;
            for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
                let cert =
                    cert.map_err(|e| bad(format!("certificate {}: not valid PEM: {e}", i + 1)))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("certificate {}: {e}", i + 1)))?;
                count += 1;
            }
            if count == 0 {
                return Err(bad(
                    "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
                ));
            }
        }
        Ok(Trust {
            roots: Arc::new(roots),
            system_errors,
        })
    }

    fn check_roots(&self) -> Result<(), TrustError> {
        if self.roots.is_empty() {
            let system = if self.system_errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.system_errors.join("; "))
            };
            return Err(TrustError::NoRoots { system });
        }
        Ok(())
    }

    /// No roots: enough for sinks that only speak plain `http://`.
    pub fn empty() -> Trust {
        Trust {
            roots: Arc::new(RootCertStore::empty()),
            system_errors: Vec::new(),
        }
    }

    /// A rustls client configuration (no ALPN: hyper-rustls sets it).
    pub fn client_config(&self) -> Result<ClientConfig, TrustError> {
        self.check_roots()?;
        self.client_config_unchecked()
    }

    /// [`Trust::client_config`] without requiring roots, for a connector
    /// that is only ever used for `http://` (its TLS side stays unused).
    pub fn client_config_unchecked(&self) -> Result<ClientConfig, TrustError> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Setup(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth())
    }

    /// The same trust as a verifier, for tonic.
    pub fn verifier(&self) -> Result<Arc<dyn ServerCertVerifier>, TrustError> {
        self.check_roots()?;
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TrustError::Setup(e.to_string()))?;
        Ok(verifier)
    }
}

/// The TLS failure behind a connection error, if that is what it was.
///
/// Walks the `source()` chain; `std::io::Error` hides its payload from
/// `source()`, so it is unwrapped by hand (tokio-rustls reports handshake
/// failures as an `io::Error` carrying the `rustls::Error`).
pub fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| tls_failure(inner))
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// A readable reason for a TLS failure, with a hint for the usual mistake.
pub fn describe_tls(error: &rustls::Error) -> String {
    use rustls::CertificateError;
    match error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "{error} (the server's certificate is not signed by a trusted CA: add the CA with --ca-file / TIDEWATCH_EXPORT_CA_FILE)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("{error} (the certificate does not name the host in the URL)"),
        rustls::Error::InvalidMessage(_) => {
            format!("{error} (is the server speaking TLS? use http:// for a plain endpoint)")
        }
        _ => error.to_string(),
    }
}

/// Every message in an error's `source()` chain, joined with `: `
/// (skipping a message its parent already shows).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        next = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("cert").pem()
    }

    fn load(contents: std::io::Result<Vec<u8>>) -> Result<Trust, TrustError> {
        Trust::from_parts(
            Vec::new(),
            Vec::new(),
            Some((Path::new("/etc/ca.pem"), contents)),
        )
    }

    #[test]
    fn a_ca_file_is_trusted() {
        let trust = load(Ok(ca_pem().into_bytes())).expect("trust");
        assert_eq!(trust.roots.len(), 1);
        assert!(trust.client_config().is_ok());
        assert!(trust.verifier().is_ok());
    }

    #[test]
    fn bad_ca_files_are_config_errors_naming_the_file() {
        let missing = load(Err(std::io::Error::from(std::io::ErrorKind::NotFound)))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            missing.starts_with("CA file /etc/ca.pem: ") && missing.contains("not found"),
            "{missing}"
        );

        let not_pem = load(Ok(b"hello".to_vec()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(not_pem.contains("no PEM certificate"), "{not_pem}");

        let broken = ca_pem().replace("\n-----END CERTIFICATE-----", "");
        let broken = load(Ok(broken.into_bytes()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(broken.contains("certificate 1: not valid PEM"), "{broken}");

        let garbage = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let garbage = load(Ok(garbage.as_bytes().to_vec()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(garbage.contains("certificate 1: "), "{garbage}");
    }

    #[test]
    fn nothing_to_trust_is_a_config_error() {
        let trust =
            Trust::from_parts(Vec::new(), vec!["no CA bundle".into()], None).expect("no CA file");
        let error = trust
            .client_config()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("no trusted CA certificates") && error.contains("(no CA bundle)"),
            "{error}"
        );
        assert!(matches!(trust.verifier(), Err(TrustError::NoRoots { .. })));
    }

    #[test]
    fn tls_failures_are_found_through_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let found = tls_failure(&io).map(describe_tls).unwrap_or_default();
        assert!(
            found.starts_with("invalid peer certificate: UnknownIssuer")
                && found.contains("--ca-file"),
            "{found}"
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(tls_failure(&refused).is_none());
    }
}
