//! TLS for `--listen`: a certificate that can be swapped while the server runs, from the
//! self-managed CA (`admission::certs`) or from files (`--tls-cert`/`--tls-key`, e.g. mounted
//! from cert-manager's Secret), which are re-read when they change: cert-manager renews them in
//! place and the API server trusts the new CA from then on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tracing::{info, warn};

fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// A server configuration whose certificate comes from `resolver` (swappable at run time).
pub fn server_config_with_resolver(
    resolver: Arc<dyn tokio_rustls::rustls::server::ResolvesServerCert>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A certificate chain and its key (PEM), checked to belong together.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .context("the certificate is not valid PEM")?;
    anyhow::ensure!(!certs.is_empty(), "the certificate file holds no CERTIFICATE block");
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("the key is not a valid PEM private key")?;
    let key = CertifiedKey::from_der(certs, key, &provider())
        .context("the certificate and key do not form a valid pair")?;
    Ok(Arc::new(key))
}

/// The serving certificate, swappable while the server runs.
#[derive(Debug)]
pub struct SwappableCert(RwLock<Arc<CertifiedKey>>);

impl SwappableCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(key)))
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().expect("cert lock") = key;
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("cert lock").clone())
    }
}

/// `--tls-cert`, `--tls-key` and optionally `--tls-ca`.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

/// What the files held at one moment.
#[derive(Debug, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
}

impl CertFiles {
    fn read(&self) -> anyhow::Result<Contents> {
        Ok(Contents {
            cert: read(&self.cert, "--tls-cert")?,
            key: read(&self.key, "--tls-key")?,
            ca: self.ca.as_deref().map(|ca| read(ca, "--tls-ca")).transpose()?,
        })
    }

    /// Loads the files once (start-up: an error here is fatal and says which file is wrong).
    pub fn load(&self) -> anyhow::Result<(Arc<SwappableCert>, Option<String>)> {
        let c = self.read()?;
        let key = certified_key(&c.cert, &c.key).with_context(|| {
            format!("loading --tls-cert {} and --tls-key {}", self.cert.display(), self.key.display())
        })?;
        Ok((SwappableCert::new(key), ca_text(c.ca.as_deref())?))
    }

    /// Re-reads the files every `every` and swaps the served certificate when they change (and
    /// publishes a changed CA to `ca`). A half-written pair (cert-manager and the kubelet replace
    /// them atomically, other tools may not) keeps the current certificate until it is whole.
    pub async fn keep_current(
        self,
        every: Duration,
        serving: Arc<SwappableCert>,
        ca: watch::Sender<Option<String>>,
    ) {
        let mut current = self.read().ok();
        let mut complained = false;
        loop {
            tokio::time::sleep(every).await;
            let next = match self.read() {
                Ok(c) => c,
                Err(e) => {
                    if !complained {
                        warn!(
                            error = format!("{e:#}"),
                            "cannot re-read the TLS files; serving the current certificate"
                        );
                    }
                    complained = true;
                    continue;
                }
            };
            if current.as_ref() == Some(&next) {
                continue;
            }
            let loaded =
                certified_key(&next.cert, &next.key).and_then(|key| Ok((key, ca_text(next.ca.as_deref())?)));
            match loaded {
                Ok((key, ca_pem)) => {
                    serving.set(key);
                    ca.send_if_modified(|old| {
                        let changed = ca_pem.is_some() && *old != ca_pem;
                        if changed {
                            old.clone_from(&ca_pem);
                        }
                        changed
                    });
                    info!(cert = %self.cert.display(), "the TLS files changed: serving the new certificate");
                    current = Some(next);
                    complained = false;
                }
                Err(e) => {
                    if !complained {
                        warn!(
                            error = format!("{e:#}"),
                            "the changed TLS files cannot be used (yet); serving the current certificate"
                        );
                    }
                    complained = true;
                }
            }
        }
    }
}

fn ca_text(ca: Option<&[u8]>) -> anyhow::Result<Option<String>> {
    let Some(ca) = ca else { return Ok(None) };
    let text = String::from_utf8(ca.to_vec()).ok().filter(|t| t.contains("-----BEGIN CERTIFICATE-----"));
    Ok(Some(text.context("--tls-ca holds no PEM CERTIFICATE")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let g = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (g.cert.pem(), g.signing_key.serialize_pem())
    }

    #[test]
    fn a_mismatched_or_broken_pair_is_refused_with_the_reason() {
        let (cert_a, key_a) = pair("a");
        let (_, key_b) = pair("b");
        assert!(certified_key(cert_a.as_bytes(), key_a.as_bytes()).is_ok());
        let e = format!("{:#}", certified_key(cert_a.as_bytes(), key_b.as_bytes()).unwrap_err());
        assert!(e.contains("do not form a valid pair"), "{e}");
        let e = format!("{:#}", certified_key(b"", key_a.as_bytes()).unwrap_err());
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let e = format!("{:#}", certified_key(cert_a.as_bytes(), b"nope").unwrap_err());
        assert!(e.contains("private key"), "{e}");
    }

    #[tokio::test]
    async fn changed_files_are_served_without_a_restart() {
        let dir = std::env::temp_dir().join(format!("apitoken-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = CertFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: None };
        let (cert_a, key_a) = pair("a");
        std::fs::write(&files.cert, &cert_a).unwrap();
        std::fs::write(&files.key, &key_a).unwrap();
        let (serving, _) = files.load().unwrap();
        let served = |s: &SwappableCert| s.0.read().unwrap().cert[0].clone();
        let first = served(&serving);
        let (tx, _rx) = watch::channel(None);
        let task = tokio::spawn(files.clone().keep_current(Duration::from_millis(20), serving.clone(), tx));
        let (cert_b, key_b) = pair("b");
        // Half-written: the new certificate with the old key is not served.
        std::fs::write(&files.cert, &cert_b).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(served(&serving), first);
        std::fs::write(&files.key, &key_b).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while served(&serving) == first {
            assert!(tokio::time::Instant::now() < deadline, "the new certificate was never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let _ = std::fs::remove_dir_all(dir);
    }
}
