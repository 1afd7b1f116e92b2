//! TLS for `--listen`: the given certificate files, or a self-signed certificate made at start-up
//! (replaced by the managed webhook certificate in the admission issue).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A server configuration whose certificate comes from `resolver` (swappable at run time).
pub fn server_config_with_resolver(
    resolver: Arc<dyn tokio_rustls::rustls::server::ResolvesServerCert>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub fn server_config(files: Option<(&Path, &Path)>) -> anyhow::Result<Arc<ServerConfig>> {
    let (certs, key) = match files {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading --tls-cert {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing --tls-cert {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading --tls-key {}", key.display()))?;
            (certs, key)
        }
        None => {
            let names =
                vec!["localhost".to_string(), "127.0.0.1".to_string(), "apitoken-operator".to_string()];
            let generated =
                rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
            let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
                .map_err(|e| anyhow::anyhow!("encoding the generated key: {e}"))?;
            (vec![generated.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not form a valid pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
