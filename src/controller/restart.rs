//! Rolling `restartTargets` after a rotation: their pod template carries the current token id,
//! so a new id rolls the workload. Converges on every reconcile, so it survives restarts.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use super::{Context, MANAGER, publish};
use crate::api::{ApiToken, RestartKind};

pub const TOKEN_ID_ANNOTATION: &str = "apitoken.dev/token-id";

pub async fn converge(ctx: &Context, obj: &ApiToken, ns: &str, token_id: &str) {
    for target in &obj.spec.restart_targets {
        let result = match target.kind {
            RestartKind::Deployment => bump::<Deployment>(ctx, ns, &target.name, token_id).await,
            RestartKind::StatefulSet => bump::<StatefulSet>(ctx, ns, &target.name, token_id).await,
            RestartKind::DaemonSet => bump::<DaemonSet>(ctx, ns, &target.name, token_id).await,
        };
        match result {
            Ok(true) => {
                info!(kind = ?target.kind, name = target.name, "restart target rolled");
                let note = format!("rolled {:?} {} to pick up token {token_id}", target.kind, target.name);
                publish(ctx, obj, EventType::Normal, "RestartTriggered", note).await;
            }
            Ok(false) => {}
            Err(e) => {
                warn!(kind = ?target.kind, name = target.name, error = %e, "cannot roll restart target");
                let note = format!("cannot roll {:?} {}: {e}", target.kind, target.name);
                publish(ctx, obj, EventType::Warning, "RestartFailed", note).await;
            }
        }
    }
}

/// Sets the annotation when it differs; `Ok(true)` when it patched.
async fn bump<K>(ctx: &Context, ns: &str, name: &str, token_id: &str) -> Result<bool, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let current = serde_json::to_value(api.get(name).await?).unwrap_or_default();
    // Every workload kind keeps its pod template at the same path.
    let pointer = "/spec/template/metadata/annotations/apitoken.dev~1token-id";
    if current.pointer(pointer).and_then(|v| v.as_str()) == Some(token_id) {
        return Ok(false);
    }
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {TOKEN_ID_ANNOTATION: token_id}}}}});
    let pp = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    api.patch(name, &pp, &Patch::Merge(&patch)).await?;
    Ok(true)
}
