//! Admission webhooks (design §6): the mutating one records the creator; the validating one
//! enforces the scope ceiling (one SubjectAccessReview per scope for the requesting user), every
//! ApiTokenPolicy and the quotas, and refuses with every violation in one message. Policy never
//! blocks an update that grants nothing (metadata only, or revoking): revocation only takes
//! rights away. A third webhook refuses ApiTokenPolicies that could not be applied.

pub mod certs;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::api::{ApiToken, ApiTokenPolicy};
use crate::core::desired::{SpecInput, Violation};
use crate::core::policy::{self, Ask};
use crate::core::scope::Scope;
use crate::policy_view::{self, CREATED_BY_ANNOTATION, PolicyView};

/// The API group scopes are checked in (design §6).
pub const SCOPES_GROUP: &str = "scopes.apitoken.dev";
/// SubjectAccessReviews in flight per admission request.
const SAR_CONCURRENCY: usize = 8;
/// Whole budget for the SubjectAccessReviews of one request (the webhook timeout is 10s).
const SAR_BUDGET: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AdmissionState {
    pub client: Client,
    pub policies: PolicyView,
    /// The operator's own username: the only one allowed to change `apitoken.dev/created-by`.
    pub operator_user: Option<String>,
}

pub fn router(state: AdmissionState) -> Router {
    Router::new()
        .route("/admission/mutate", post(mutate))
        .route("/admission/validate", post(validate))
        .route("/admission/validate-policy", post(validate_policy))
        .with_state(Arc::new(state))
}

fn parse<K: kube::Resource + serde::de::DeserializeOwned>(
    body: &Bytes,
    kind: &str,
) -> Result<AdmissionRequest<K>, Box<Response>> {
    let bad = |m: String| Box::new((StatusCode::BAD_REQUEST, m).into_response());
    let review: AdmissionReview<K> = serde_json::from_slice(body).map_err(|e| {
        bad(format!("not an AdmissionReview for {kind} (line {}, column {})", e.line(), e.column()))
    })?;
    review.try_into().map_err(|_| bad("the AdmissionReview has no request".into()))
}

fn respond(resp: AdmissionResponse) -> Response {
    axum::Json(resp.into_review()).into_response()
}

async fn mutate(body: Bytes) -> Response {
    let req = match parse::<ApiToken>(&body, "ApiToken") {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let resp = AdmissionResponse::from(&req);
    if req.operation != Operation::Create {
        return respond(resp);
    }
    let Some(obj) = &req.object else { return respond(resp) };
    let user = req.user_info.username.clone().unwrap_or_default();
    // Overwrites whatever the client wrote: the creator is not forgeable.
    let patch = if obj.metadata.annotations.is_some() {
        json!([{"op": "add", "path": "/metadata/annotations/apitoken.dev~1created-by", "value": user}])
    } else {
        json!([{"op": "add", "path": "/metadata/annotations", "value": {CREATED_BY_ANNOTATION: user}}])
    };
    let resp = match serde_json::from_value::<json_patch::Patch>(patch).map(|p| resp.clone().with_patch(p)) {
        Ok(Ok(r)) => r,
        _ => resp.deny("internal error building the created-by patch"),
    };
    respond(resp)
}

async fn validate(State(state): State<Arc<AdmissionState>>, body: Bytes) -> Response {
    let req = match parse::<ApiToken>(&body, "ApiToken") {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let resp = AdmissionResponse::from(&req);
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return respond(resp);
    }
    let Some(obj) = req.object.as_ref() else { return respond(resp) };
    let violations = review(&state, &req, obj).await;
    if violations.is_empty() {
        respond(resp)
    } else {
        let message = format!("ApiToken {} refused: {}", obj.name_any(), policy::describe(&violations));
        info!(
            namespace = req.namespace.as_deref().unwrap_or(""),
            name = obj.name_any(),
            user = req.user_info.username.as_deref().unwrap_or(""),
            "admission denied: {message}"
        );
        respond(resp.deny(message))
    }
}

async fn review(state: &AdmissionState, req: &AdmissionRequest<ApiToken>, obj: &ApiToken) -> Vec<Violation> {
    let mut v = Vec::new();
    let user = req.user_info.username.clone().unwrap_or_default();
    let namespace = req.namespace.clone().or_else(|| obj.namespace()).unwrap_or_default();
    let created = obj.annotations().get(CREATED_BY_ANNOTATION).cloned();
    let old = req.old_object.as_ref();
    let is_operator = state.operator_user.as_deref() == Some(user.as_str());

    // The creator record.
    match req.operation {
        Operation::Create if created.as_deref() != Some(user.as_str()) => v.push(Violation {
            field: "metadata.annotations[apitoken.dev/created-by]",
            message: format!(
                "is set by the operator to the requesting user ({user}); do not set it yourself"
            ),
        }),
        Operation::Update
            if !is_operator
                && old.map(|o| o.annotations().get(CREATED_BY_ANNOTATION).cloned())
                    != Some(created.clone()) =>
        {
            v.push(Violation {
                field: "metadata.annotations[apitoken.dev/created-by]",
                message: "records who created the token and cannot be changed".into(),
            });
        }
        _ => {}
    }

    if !may_grant(req.operation.clone(), old, obj) {
        return v;
    }

    // Policies and quotas.
    let creator = created.clone().unwrap_or_else(|| user.clone());
    let becomes_active =
        !obj.spec.revoked && (req.operation == Operation::Create || old.is_some_and(|o| o.spec.revoked));
    let spec = &obj.spec;
    let input = SpecInput {
        lifetime: spec.lifetime.as_deref(),
        renew_before: spec.rotation.renew_before.as_deref(),
        grace_period: spec.rotation.grace_period.as_deref(),
        rotation_enabled: spec.rotation.enabled,
        trigger: spec.rotation.trigger.as_deref(),
        rotate_annotation: None,
        revoked: spec.revoked,
        scopes: &spec.scopes,
        prefix: spec.prefix.as_deref(),
    };
    let name = obj.name_any();
    let (policies, counts) =
        match state.policies.for_token(&namespace, Some(&creator), Some(&name), Some(obj.labels())) {
            Ok(pc) => pc,
            Err(e) => {
                v.push(Violation { field: "ApiTokenPolicy", message: e });
                return v;
            }
        };
    let ask = Ask {
        spec: input,
        permission_sets: &spec.permission_sets,
        audiences: &spec.audiences,
        creator: Some(&creator),
        counts_against_quota: becomes_active,
    };
    if let Err(mut e) = policy::evaluate(&ask, &policies, &counts) {
        v.append(&mut e);
    }

    // The ceiling: every scope the request adds must be held by the requesting user.
    let wanted = policy::effective_scopes(&spec.scopes, &spec.permission_sets, &policies);
    let had = old
        .map(|o| policy::effective_scopes(&o.spec.scopes, &o.spec.permission_sets, &policies))
        .unwrap_or_default();
    let added: Vec<String> = wanted.into_iter().filter(|s| !had.contains(s)).collect();
    v.append(&mut ceiling(state, req, &namespace, &added).await);
    v
}

/// Could this request grant anything? A create does; an update only when its spec changes in
/// some other way than `revoked: false -> true`. Metadata (the rotate annotation, labels,
/// finalizers) and revocation are never refused by policy or quota: a token a tightened policy
/// made non-compliant must stay revocable and rotatable (the controller decides about rotation).
fn may_grant(operation: Operation, old: Option<&ApiToken>, new: &ApiToken) -> bool {
    match (operation, old) {
        (Operation::Update, Some(old)) => {
            let mut revoked_old = old.spec.clone();
            revoked_old.revoked = true;
            old.spec != new.spec && !(new.spec.revoked && revoked_old == new.spec)
        }
        _ => true,
    }
}

async fn validate_policy(body: Bytes) -> Response {
    let req = match parse::<ApiTokenPolicy>(&body, "ApiTokenPolicy") {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let resp = AdmissionResponse::from(&req);
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return respond(resp);
    }
    let Some(obj) = req.object.as_ref() else { return respond(resp) };
    let problems = policy_view::problems(obj);
    if problems.is_empty() {
        return respond(resp);
    }
    let message = format!(
        "ApiTokenPolicy {} refused: {} (a policy that cannot be applied would refuse every token it selects)",
        obj.name_any(),
        problems.join("; ")
    );
    info!(
        name = obj.name_any(),
        user = req.user_info.username.as_deref().unwrap_or(""),
        "admission denied: {message}"
    );
    respond(resp.deny(message))
}

/// The SubjectAccessReview asking whether `user` may do `attributes`.
pub fn access_review(
    user: &k8s_openapi::api::authentication::v1::UserInfo,
    attributes: ResourceAttributes,
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// One SubjectAccessReview per added scope, in parallel and bounded; any doubt refuses.
async fn ceiling(
    state: &AdmissionState,
    req: &AdmissionRequest<ApiToken>,
    namespace: &str,
    scopes: &[String],
) -> Vec<Violation> {
    let sars: Api<SubjectAccessReview> = Api::all(state.client.clone());
    let user = &req.user_info;
    let parsed: Vec<(String, Scope)> =
        scopes.iter().filter_map(|s| s.parse::<Scope>().ok().map(|p| (s.clone(), p))).collect();
    let checks = futures::stream::iter(parsed)
        .map(|(text, scope)| {
            let sars = sars.clone();
            let namespace = namespace.to_string();
            let sar = access_review(
                user,
                ResourceAttributes {
                    group: Some(SCOPES_GROUP.into()),
                    resource: Some(scope.resource.clone()),
                    name: scope.name.clone(),
                    verb: Some(scope.verb.clone()),
                    namespace: Some(namespace),
                    ..ResourceAttributes::default()
                },
            );
            async move { (text, scope, sars.create(&PostParams::default(), &sar).await) }
        })
        .buffer_unordered(SAR_CONCURRENCY)
        .collect::<Vec<_>>();
    let Ok(results) = tokio::time::timeout(SAR_BUDGET, checks).await else {
        return vec![Violation {
            field: "spec.scopes",
            message: "the API server did not answer the permission checks in time; try again".into(),
        }];
    };
    let username = user.username.as_deref().unwrap_or("the requesting user");
    let mut v = Vec::new();
    let mut results = results;
    results.sort_by(|a, b| a.0.cmp(&b.0));
    for (text, scope, result) in results {
        match result {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => v.push(Violation {
                field: "spec.scopes",
                message: format!(
                    "{username} may not grant {text}: it needs RBAC verb '{}' on resource '{}'{} in API group {SCOPES_GROUP} in namespace {namespace}",
                    scope.verb,
                    scope.resource,
                    scope.name.as_ref().map(|n| format!(" (name '{n}')")).unwrap_or_default()
                ),
            }),
            Err(e) => {
                warn!(error = %e, "SubjectAccessReview failed");
                v.push(Violation { field: "spec.scopes", message: format!("could not check {text}: {e}") });
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiTokenSpec;

    fn token(f: impl FnOnce(&mut ApiToken)) -> ApiToken {
        let mut at = ApiToken::new(
            "t",
            ApiTokenSpec { scopes: vec!["metrics:read".into()], ..ApiTokenSpec::default() },
        );
        f(&mut at);
        at
    }

    #[test]
    fn only_a_spec_change_that_could_grant_is_reviewed_by_policy() {
        let old = token(|_| {});
        let upd = |new: &ApiToken| may_grant(Operation::Update, Some(&old), new);
        assert!(may_grant(Operation::Create, None, &old));
        // Metadata only: the rotate annotation, labels, finalizers.
        assert!(!upd(&token(|t| {
            t.annotations_mut().insert("apitoken.dev/rotate".into(), "now".into());
            t.labels_mut().insert("team".into(), "a".into());
            t.finalizers_mut().push("x".into());
        })));
        // Revoking.
        assert!(!upd(&token(|t| t.spec.revoked = true)));
        // Revoking plus any other change, an edit, or un-revoking: reviewed.
        assert!(upd(&token(|t| {
            t.spec.revoked = true;
            t.spec.lifetime = Some("400d".into());
        })));
        assert!(upd(&token(|t| t.spec.rotation.trigger = Some("2".into()))));
        let revoked = token(|t| t.spec.revoked = true);
        assert!(may_grant(Operation::Update, Some(&revoked), &old));
        // An update without the old object is reviewed.
        assert!(may_grant(Operation::Update, None, &old));
    }
}
