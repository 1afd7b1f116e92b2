//! Prompt Secret removal when an ApiToken is deleted. The Secret's ownerReference makes the
//! garbage collector remove it too, but the collector may take a while (it learns about a newly
//! installed CRD only at its next discovery resync); this removes it as soon as the delete is seen.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use super::secret::{MANAGED_BY, MANAGED_BY_LABEL, NAME_LABEL};
use crate::api::ApiToken;

pub async fn remove_secrets_of_deleted_tokens(
    client: Client,
    namespace: Option<String>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let tokens: Api<PartialObjectMeta<ApiToken>> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut events = watcher(tokens, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::Delete(meta)) = &event {
            metrics.forget_token(&(meta.namespace().unwrap_or_default(), meta.name_any()));
        }
        if let Ok(watcher::Event::Delete(meta)) = event
            && let (Some(ns), Some(uid)) = (meta.namespace(), meta.uid())
            && let Err(e) = remove_owned(&client, &ns, &meta.name_any(), &uid).await
        {
            warn!(namespace = ns, name = meta.name_any(), error = %e, "removing the Secret of a deleted ApiToken failed; the garbage collector will");
        }
    }
}

async fn remove_owned(client: &Client, ns: &str, name: &str, uid: &str) -> Result<(), kube::Error> {
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), ns);
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY},{NAME_LABEL}={name}");
    let plain: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list_metadata(&ListParams::default().labels(&selector)).await? {
        let owned = s.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == uid);
        if owned {
            let dp = DeleteParams {
                preconditions: Some(Preconditions { uid: s.uid(), resource_version: None }),
                ..DeleteParams::background()
            };
            match plain.delete(&s.name_any(), &dp).await {
                Ok(_) => info!(
                    namespace = ns,
                    secret = s.name_any(),
                    "removed the Secret of deleted ApiToken {name}"
                ),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
