//! STARTTLS: the rustls server config from PEM files named in the config.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("smtp.tls_cert {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("smtp.tls_cert {}: not PEM certificates", cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "smtp.tls_cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("smtp.tls_key {}", key.display()))?,
    ))
    .with_context(|| format!("smtp.tls_key {}: not PEM", key.display()))?
    .ok_or_else(|| anyhow!("smtp.tls_key {}: no private key in the file", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("smtp.tls_cert / smtp.tls_key do not form a usable pair")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
