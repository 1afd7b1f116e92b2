//! Self-managed serving certificates: a CA and a serving certificate (rcgen), kept in a Secret so
//! every replica (admission and verification alike) serves the same one for the Service's DNS
//! names, the CA injected into our webhook configurations (when admission runs) and published in
//! a ConfigMap for verification clients, and the serving certificate renewed from the same CA
//! before it expires — swapped into the running server without a restart, so neither the API
//! server nor a client sees a failed handshake.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::sync::watch;
use tokio_rustls::rustls::sign::CertifiedKey;
use tracing::{info, warn};

pub use crate::verify::tls::SwappableCert;

const CA_CN: &str = "apitoken-operator-webhook-ca";
const NOT_AFTER_KEY: &str = "tls.not-after";

/// Where the certificates live and what they cover.
#[derive(Debug, Clone)]
pub struct CertSettings {
    pub namespace: String,
    pub secret_name: String,
    pub dns_names: Vec<String>,
    pub validity: SignedDuration,
    /// Names of the Validating/MutatingWebhookConfigurations whose caBundle we keep current;
    /// `None` (no admission here): webhook configurations are never read or written.
    pub webhook_config: Option<String>,
}

/// PEM material of one generation.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_crt: String,
    pub ca_key: String,
    pub tls_crt: String,
    pub tls_key: String,
    pub not_after: Timestamp,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn to_offset(t: Timestamp) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second()).context("certificate time out of range")
}

/// A new CA (ten years) and serving certificate.
pub fn generate(settings: &CertSettings, now: Timestamp) -> anyhow::Result<Material> {
    let ca_key = KeyPair::generate()?;
    let mut params = ca_params()?;
    params.not_before = to_offset(now - SignedDuration::from_hours(1))?;
    params.not_after = to_offset(now + SignedDuration::from_hours(24 * 3650))?;
    let ca = params.self_signed(&ca_key)?;
    renew_serving(&ca.pem(), &ca_key.serialize_pem(), settings, now)
}

/// A new serving certificate from the existing CA.
pub fn renew_serving(
    ca_crt: &str,
    ca_key_pem: &str,
    settings: &CertSettings,
    now: Timestamp,
) -> anyhow::Result<Material> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the stored CA key is not valid PEM")?;
    let issuer = Issuer::new(ca_params()?, &ca_key);
    let mut names = settings.dns_names.clone();
    names.push("127.0.0.1".into());
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name.push(DnType::CommonName, "apitoken-operator");
    leaf.not_before = to_offset(now - SignedDuration::from_mins(5))?;
    let not_after =
        Timestamp::from_second((now + settings.validity).as_second()).context("validity out of range")?;
    leaf.not_after = to_offset(not_after)?;
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(Material {
        ca_crt: ca_crt.to_string(),
        ca_key: ca_key_pem.to_string(),
        tls_crt: cert.pem(),
        tls_key: key.serialize_pem(),
        not_after,
    })
}

/// Renew when less than a third of the validity is left.
pub fn renew_at(m: &Material, validity: SignedDuration) -> Timestamp {
    m.not_after - SignedDuration::from_secs(validity.as_secs() / 3)
}

/// The serving certificate and key of `m`, ready for rustls.
pub fn certified_key(m: &Material) -> anyhow::Result<Arc<CertifiedKey>> {
    crate::verify::tls::certified_key(m.tls_crt.as_bytes(), m.tls_key.as_bytes())
        .context("the serving certificate in the Secret")
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn from_secret(s: &Secret) -> Option<Material> {
    Some(Material {
        ca_crt: text(s, "ca.crt")?,
        ca_key: text(s, "ca.key")?,
        tls_crt: text(s, "tls.crt")?,
        tls_key: text(s, "tls.key")?,
        not_after: text(s, NOT_AFTER_KEY)?.parse().ok()?,
    })
}

fn to_secret(settings: &CertSettings, m: &Material, resource_version: Option<String>) -> Secret {
    let mut data = std::collections::BTreeMap::new();
    for (k, v) in [
        ("ca.crt", &m.ca_crt),
        ("ca.key", &m.ca_key),
        ("tls.crt", &m.tls_crt),
        ("tls.key", &m.tls_key),
        (NOT_AFTER_KEY, &m.not_after.to_string()),
    ] {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(
                [("app.kubernetes.io/managed-by".to_string(), "apitoken-operator".to_string())].into(),
            ),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads the Secret; creates it (cold start) or renews the serving certificate when due. With
/// several replicas the first writer wins and the others adopt its material.
pub async fn ensure(client: &Client, settings: &CertSettings, now: Timestamp) -> anyhow::Result<Material> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    for _ in 0..5 {
        let existing =
            secrets.get_opt(&settings.secret_name).await.context("reading the webhook certificate Secret")?;
        let (material, write) = match existing.as_ref().and_then(|s| from_secret(s).map(|m| (s, m))) {
            Some((_, m)) if now < renew_at(&m, settings.validity) => return Ok(m),
            Some((s, m)) => (
                renew_serving(&m.ca_crt, &m.ca_key, settings, now)?,
                Some(s.metadata.resource_version.clone()),
            ),
            None => {
                (generate(settings, now)?, existing.as_ref().map(|s| s.metadata.resource_version.clone()))
            }
        };
        let pp = PostParams { field_manager: Some("apitoken-operator".into()), ..PostParams::default() };
        let result = match write {
            None => secrets.create(&pp, &to_secret(settings, &material, None)).await.map(|_| ()),
            Some(rv) => secrets
                .replace(&settings.secret_name, &pp, &to_secret(settings, &material, rv))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                info!(secret = settings.secret_name, not_after = %material.not_after, "webhook serving certificate written");
                return Ok(material);
            }
            // Another replica wrote first: read again and adopt.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("writing the webhook certificate Secret"),
        }
    }
    anyhow::bail!("the webhook certificate Secret kept changing under us")
}

/// Puts the CA into every webhook of our Validating/MutatingWebhookConfigurations (none without
/// admission).
pub async fn inject_ca_bundle(client: &Client, settings: &CertSettings, ca_pem: &str) -> anyhow::Result<()> {
    let Some(name) = settings.webhook_config.as_deref() else { return Ok(()) };
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    inject_into::<ValidatingWebhookConfiguration>(client, name, &bundle, |c| {
        c.webhooks.iter_mut().flatten().map(|w| &mut w.client_config).collect()
    })
    .await?;
    inject_into::<MutatingWebhookConfiguration>(client, name, &bundle, |c| {
        c.webhooks.iter_mut().flatten().map(|w| &mut w.client_config).collect()
    })
    .await
}

async fn inject_into<K>(
    client: &Client,
    name: &str,
    bundle: &ByteString,
    configs: impl Fn(&mut K) -> Vec<&mut WebhookClientConfig>,
) -> anyhow::Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let Some(mut c) = api.get_opt(name).await? else { return Ok(()) };
    let mut changed = false;
    for cc in configs(&mut c) {
        if cc.ca_bundle.as_ref() != Some(bundle) {
            cc.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        let pp = PostParams { field_manager: Some("apitoken-operator".into()), ..PostParams::default() };
        api.replace(name, &pp, &c).await?;
        info!(name, kind = K::kind(&()).as_ref(), "caBundle injected");
    }
    Ok(())
}

/// Keeps the certificate current: renews when due, adopts another replica's renewal, re-injects
/// the CA bundle (someone may re-apply the webhook configuration without it), hands a new CA to
/// `ca` (the ConfigMap publisher). Runs forever.
pub async fn keep_current(
    client: Client,
    settings: CertSettings,
    serving: Arc<SwappableCert>,
    mut current: Material,
    ca: watch::Sender<Option<String>>,
) {
    loop {
        let now = Timestamp::now();
        let due = renew_at(&current, settings.validity);
        let wait = now.duration_until(due).as_secs_f64().clamp(1.0, 30.0);
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        match ensure(&client, &settings, Timestamp::now()).await {
            Ok(m) => {
                if m != current {
                    match certified_key(&m) {
                        Ok(key) => serving.set(key),
                        Err(e) => {
                            warn!(
                                error = format!("{e:#}"),
                                "cannot load the renewed serving certificate; keeping the current one"
                            );
                            continue;
                        }
                    }
                    info!(not_after = %m.not_after, "serving the renewed webhook certificate");
                    ca.send_if_modified(|old| {
                        let changed = old.as_deref() != Some(m.ca_crt.as_str());
                        if changed {
                            *old = Some(m.ca_crt.clone());
                        }
                        changed
                    });
                    current = m;
                }
                if let Err(e) = inject_ca_bundle(&client, &settings, &current.ca_crt).await {
                    warn!(error = %e, "injecting the webhook caBundle failed; retrying");
                }
            }
            Err(e) => warn!(error = %e, "renewing the webhook certificate failed; retrying"),
        }
    }
}

/// The ConfigMap that publishes the CA certificate (never its key) for clients of `--listen`.
pub fn ca_configmap(namespace: &str, name: &str, ca_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [("app.kubernetes.io/managed-by".to_string(), "apitoken-operator".to_string())].into(),
            ),
            annotations: Some(
                [(
                    "apitoken.dev/description".to_string(),
                    "CA certificate that signs the apitoken-operator serving certificate: trust ca.crt to verify the verification service (TLS) by its Service DNS name".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        data: Some([("ca.crt".to_string(), ca_pem.to_string())].into()),
        ..ConfigMap::default()
    }
}

/// Writes the ConfigMap when it is missing or differs; `Ok(false)`: it was current.
async fn publish_once(
    api: &Api<ConfigMap>,
    namespace: &str,
    name: &str,
    ca_pem: &str,
) -> Result<bool, kube::Error> {
    let pp = PostParams { field_manager: Some("apitoken-operator".into()), ..PostParams::default() };
    match api.get_opt(name).await? {
        Some(cm) if cm.data.as_ref().and_then(|d| d.get("ca.crt")).map(String::as_str) == Some(ca_pem) => {
            Ok(false)
        }
        Some(cm) => {
            let mut want = ca_configmap(namespace, name, ca_pem);
            want.metadata.resource_version = cm.metadata.resource_version;
            api.replace(name, &pp, &want).await?;
            Ok(true)
        }
        None => match api.create(&pp, &ca_configmap(namespace, name, ca_pem)).await {
            Ok(_) => Ok(true),
            // Another replica created it: compare again next round.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// Keeps the ConfigMap `name` in `namespace` holding the CA from `ca` (checked again every 30 s:
/// someone may delete or edit it). Runs forever.
pub async fn publish_ca(
    client: Client,
    namespace: String,
    name: String,
    mut ca: watch::Receiver<Option<String>>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut failing = false;
    loop {
        let pem = ca.borrow_and_update().clone();
        if let Some(pem) = pem {
            match publish_once(&api, &namespace, &name, &pem).await {
                Ok(written) => {
                    if written || failing {
                        info!(
                            configmap = format!("{namespace}/{name}"),
                            "CA certificate published (key ca.crt)"
                        );
                    }
                    failing = false;
                }
                Err(e) => {
                    warn!(configmap = format!("{namespace}/{name}"), error = %e, "publishing the CA certificate failed (may the operator get, create and update this ConfigMap?); retrying");
                    failing = true;
                }
            }
        }
        let wait = if failing { 5 } else { 30 };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait)) => {},
            changed = ca.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CertSettings {
        CertSettings {
            namespace: "ns".into(),
            secret_name: "tls".into(),
            dns_names: vec!["apitoken-operator.ns.svc".into(), "localhost".into()],
            validity: SignedDuration::from_hours(24 * 90),
            webhook_config: Some("apitoken-operator".into()),
        }
    }

    #[test]
    fn generates_a_ca_and_renews_from_the_same_ca() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let first = generate(&settings(), now).unwrap();
        assert!(first.ca_crt.contains("BEGIN CERTIFICATE") && first.tls_key.contains("PRIVATE KEY"));
        assert_eq!(first.not_after, now + SignedDuration::from_hours(24 * 90));
        assert_eq!(renew_at(&first, settings().validity), now + SignedDuration::from_hours(24 * 60));
        let renewed = renew_serving(
            &first.ca_crt,
            &first.ca_key,
            &settings(),
            now + SignedDuration::from_hours(24 * 61),
        )
        .unwrap();
        assert_eq!(renewed.ca_crt, first.ca_crt, "same CA: the caBundle does not change");
        assert_ne!(renewed.tls_crt, first.tls_crt);
        assert!(format!("{renewed:?}").find("PRIVATE").is_none(), "Debug hides keys");
        SwappableCert::new(certified_key(&first).unwrap()).set(certified_key(&renewed).unwrap());
    }
}
