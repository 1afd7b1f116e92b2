//! Prompt Secret removal when an ApiToken is deleted. The Secret's ownerReference makes the
//! garbage collector remove it too, but the collector may take a while (it learns about a newly
//! installed CRD only at its next discovery resync); this removes it as soon as the delete is seen.
//!
//! A delete that happens while the operator is down or cut off arrives as no event at all: the
//! next list simply lacks the object. So after every (re-)list the managed Secrets are swept for
//! owners that no longer exist.

use std::collections::HashSet;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use super::secret::{MANAGED_BY, MANAGED_BY_LABEL, NAME_LABEL};
use crate::api::ApiToken;
use crate::token_feed::TokenFeed;

/// Secrets per page when sweeping.
const SWEEP_PAGE: u32 = 500;

/// What the cleanup needs of an ApiToken event.
enum Seen {
    ListStarts,
    Listed(String),
    ListDone,
    Deleted { namespace: String, name: String, uid: Option<String> },
}

fn pick(event: &watcher::Event<ApiToken>) -> Option<Seen> {
    match event {
        watcher::Event::Init => Some(Seen::ListStarts),
        watcher::Event::InitApply(at) => at.uid().map(Seen::Listed),
        watcher::Event::InitDone => Some(Seen::ListDone),
        watcher::Event::Delete(at) => Some(Seen::Deleted {
            namespace: at.namespace().unwrap_or_default(),
            name: at.name_any(),
            uid: at.uid(),
        }),
        watcher::Event::Apply(_) => None,
    }
}

pub async fn remove_secrets_of_deleted_tokens(
    client: Client,
    namespace: Option<String>,
    feed: TokenFeed,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    wakeups: std::sync::Arc<super::wakeups::Wakeups>,
) {
    // UIDs of the ApiTokens seen by the list in progress.
    let mut listed: HashSet<String> = HashSet::new();
    let mut events = std::pin::pin!(feed.subscribe(pick));
    while let Some(event) = events.next().await {
        match event {
            Seen::ListStarts => listed.clear(),
            Seen::Listed(uid) => {
                listed.insert(uid);
            }
            Seen::ListDone => {
                if let Err(e) = sweep(&client, namespace.as_deref(), &listed).await {
                    warn!(error = %e, "sweeping Secrets of deleted ApiTokens failed; the garbage collector will");
                }
                listed = HashSet::new();
            }
            Seen::Deleted { namespace: ns, name, uid } => {
                let key = (ns, name);
                metrics.forget_token(&key);
                wakeups.cancel(&key);
                let (ns, name) = key;
                if let Some(uid) = uid
                    && let Err(e) = remove_owned(&client, &ns, &name, &uid).await
                {
                    warn!(namespace = ns, name, error = %e, "removing the Secret of a deleted ApiToken failed; the garbage collector will");
                }
            }
        }
    }
}

/// The ApiToken that controls `secret`: (name, uid).
fn controller_of(secret: &PartialObjectMeta<Secret>) -> Option<(String, String)> {
    secret
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "ApiToken")
        .map(|o| (o.name.clone(), o.uid.clone()))
}

/// Removes managed Secrets whose ApiToken is gone. An owner missing from `listed` is looked up
/// once more before anything is removed: it may have been created after the list.
async fn sweep(
    client: &Client,
    namespace: Option<&str>,
    listed: &HashSet<String>,
) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    // In pages: one list of every managed Secret's metadata was most of the operator's peak
    // memory at 10,000 tokens (heaptrack).
    let mut page = ListParams::default().labels(&selector).limit(SWEEP_PAGE);
    loop {
        let list = secrets.list_metadata(&page).await?;
        for s in &list.items {
            let (Some((owner, uid)), Some(ns)) = (controller_of(s), s.namespace()) else { continue };
            if listed.contains(&uid) {
                continue;
            }
            let tokens: Api<ApiToken> = Api::namespaced(client.clone(), &ns);
            if tokens.get_metadata_opt(&owner).await?.is_some_and(|t| t.uid() == Some(uid.clone())) {
                continue;
            }
            delete_secret(client, &ns, s, &owner).await?;
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(next) => page = page.continue_token(&next),
            None => return Ok(()),
        }
    }
}

async fn remove_owned(client: &Client, ns: &str, name: &str, uid: &str) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY},{NAME_LABEL}={name}");
    for s in secrets.list_metadata(&ListParams::default().labels(&selector)).await? {
        if controller_of(&s).is_some_and(|(_, owner)| owner == uid) {
            delete_secret(client, ns, &s, name).await?;
        }
    }
    Ok(())
}

/// Deletes exactly this Secret as it was listed (UID and resourceVersion preconditions: a Secret
/// rewritten since, e.g. for a new ApiToken of the same name, stays); already gone is fine.
async fn delete_secret(
    client: &Client,
    ns: &str,
    s: &PartialObjectMeta<Secret>,
    owner: &str,
) -> Result<(), kube::Error> {
    let plain: Api<Secret> = Api::namespaced(client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: s.uid(), resource_version: s.resource_version() }),
        ..DeleteParams::background()
    };
    match plain.delete(&s.name_any(), &dp).await {
        Ok(_) => {
            info!(namespace = ns, secret = s.name_any(), "removed the Secret of deleted ApiToken {owner}");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
