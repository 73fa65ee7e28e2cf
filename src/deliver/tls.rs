//! Outbound STARTTLS: the two rustls client configs a delivery may use — one that
//! verifies the server's certificate against `routing.tls_ca_file` (else the
//! system's roots) for `tls = "required"`, and one that accepts any certificate for
//! opportunistic TLS (Postfix's `may`: encryption against passive listeners only)
//! — and the name a certificate is checked against.

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the system's CA bundle is looked for when no `tls_ca_file` is set
/// (`SSL_CERT_FILE` first, as OpenSSL does).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The client side of outbound STARTTLS.
#[derive(Clone)]
pub struct TlsClient {
    verified: Arc<ClientConfig>,
    unverified: Arc<ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsClient {
    /// Reads the CA certificates (`ca_file`, else the system bundle; an unreadable
    /// `ca_file` is an error naming it, a missing system bundle leaves `required`
    /// servers unverifiable).
    pub fn new(ca_file: Option<&Path>) -> Result<TlsClient> {
        let mut roots = RootCertStore::empty();
        let file: Option<PathBuf> = match ca_file {
            Some(f) => Some(f.to_path_buf()),
            None => std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .into_iter()
                .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
                .find(|p| p.is_file()),
        };
        if let Some(file) = &file {
            let what = || format!("routing.tls_ca_file {}", file.display());
            let mut reader = std::io::BufReader::new(std::fs::File::open(file).with_context(what)?);
            let certs = rustls_pemfile::certs(&mut reader)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{}: not PEM certificates", what()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 && ca_file.is_some() {
                return Err(anyhow!("{}: no usable CA certificate in the file", what()));
            }
        }
        let verified = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let unverified = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth();
        Ok(TlsClient {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
        })
    }

    /// The config for a verified (`true`) or opportunistic handshake.
    pub fn config(&self, verify: bool) -> Arc<ClientConfig> {
        if verify {
            self.verified.clone()
        } else {
            self.unverified.clone()
        }
    }
}

/// The name to verify: `tls_name`, else the host of the server's `host:port`
/// address (an IP address is checked against the certificate's IP names).
pub fn server_name(address: &str, tls_name: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match tls_name {
        Some(n) => n.trim(),
        None => {
            let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
            host.trim_start_matches('[').trim_end_matches(']')
        }
    };
    ServerName::try_from(host.to_string()).map_err(|e| format!("TLS name {host:?}: {e}"))
}

/// "TLSv1.3" and the like, for the delivery log line.
pub fn version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        other => format!("{other:?}"),
    }
}

/// Accepts any certificate (opportunistic TLS) but still checks the handshake's
/// signatures, so that the session keys are the server's.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_tls_name_else_the_host_of_the_address() {
        let n = server_name("mx.example:25", None).unwrap();
        assert_eq!(n.to_str(), "mx.example");
        let n = server_name("127.0.0.1:2525", Some("mbox.test")).unwrap();
        assert_eq!(n.to_str(), "mbox.test");
        let n = server_name("[::1]:25", None).unwrap();
        assert!(matches!(n, ServerName::IpAddress(_)));
        assert!(server_name("x:25", Some("bad name!")).is_err());
    }

    #[test]
    fn an_unreadable_ca_file_is_an_error_naming_it() {
        let e = TlsClient::new(Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
    }
}
