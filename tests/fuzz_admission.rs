//! Property-based fuzzing of the admission webhooks, in process: AdmissionReview bodies with
//! arbitrary ApiToken objects (odd scopes, lifetimes, durations, prefixes, names) and
//! ApiTokenPolicy objects (odd durations, selectors, permission sets, quotas), arbitrary
//! operations and users, and plain junk. Whatever arrives the answer is a 2xx or 4xx, never a 5xx
//! or a panic; a 200 is an AdmissionReview answering the request's uid. Bounded: a fixed number
//! of cases per property.
//!
//! The webhooks' SubjectAccessReviews go to a stand-in API server that allows everything: this
//! proves robustness against input, not the ceiling (tests/e2e_policy.rs proves that against the
//! real API server).

mod support;

use std::net::SocketAddr;

use apitoken_operator::admission::{AdmissionState, router};
use apitoken_operator::policy_view::PolicyView;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use support::fuzz_cases;
use tower::ServiceExt;

/// Answers every call: SubjectAccessReviews allowed, lists empty.
async fn stand_in_api(req: Request<kube::client::Body>) -> Result<Response<Body>, std::convert::Infallible> {
    let body = if req.uri().path().ends_with("subjectaccessreviews") {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {}, "status": {"allowed": true}})
    } else {
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []})
    };
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap())
}

fn call(path: &str, body: String) -> (StatusCode, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = kube::Client::new(tower::service_fn(stand_in_api), "default");
        let (policies, _driven_elsewhere) = PolicyView::start(&client);
        let app = router(AdmissionState { client, policies, operator_user: Some("system:operator".into()) });
        let mut req =
            Request::post(path).header("content-type", "application/json").body(Body::from(body)).unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

/// Strings a person (or an attacker) might put in a field.
fn field() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        "[a-z0-9:/*._ -]{0,24}".prop_map(Value::from),
        "[0-9]{0,6}(s|m|h|d|w|y|ms|us|ns|never|)".prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ]
}

fn api_token() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(field(), 0..4),
        field(),
        (field(), field(), field(), field()),
        proptest::collection::vec(field(), 0..3),
        (field(), field(), field()),
        proptest::option::of("[a-z0-9.-]{0,70}"),
    )
        .prop_map(|(scopes, lifetime, (enabled, renew, grace, trigger), audiences, (prefix, revoked, created), name)| {
            json!({
                "apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
                "metadata": {"name": name, "namespace": "team-a", "annotations": {"apitoken.dev/created-by": created}},
                "spec": {
                    "scopes": scopes, "lifetime": lifetime, "audiences": audiences, "prefix": prefix, "revoked": revoked,
                    "rotation": {"enabled": enabled, "renewBefore": renew, "gracePeriod": grace, "trigger": trigger},
                },
            })
        })
}

fn api_token_policy() -> impl Strategy<Value = Value> {
    (
        (field(), field(), field(), field()),
        proptest::collection::vec((field(), field(), proptest::collection::vec(field(), 0..3)), 0..3),
        proptest::collection::btree_map("[a-zA-Z0-9 .-]{0,12}", proptest::collection::vec(field(), 0..3), 0..3),
        (field(), field(), field(), field()),
        proptest::option::of("[a-z0-9.-]{0,70}"),
    )
        .prop_map(|((default, max, never, grace), exprs, sets, (per_ns, per_creator, label, label_max), name)| {
            let exprs: Vec<Value> =
                exprs.into_iter().map(|(k, op, values)| json!({"key": k, "operator": op, "values": values})).collect();
            json!({
                "apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiTokenPolicy",
                "metadata": {"name": name},
                "spec": {
                    "namespaceSelector": {"matchExpressions": exprs, "matchLabels": {"tier": default}},
                    "permissionSets": sets,
                    "lifetime": {"default": default, "max": max, "allowNever": never},
                    "rotation": {"maxGracePeriod": grace},
                    "maxActiveTokens": {"perNamespace": per_ns, "perCreator": per_creator, "perLabel": {"label": label, "max": label_max}},
                },
            })
        })
}

fn review(object: &Value, old: Option<&Value>, operation: &str, user: &str) -> String {
    let (kind, resource) = match object["kind"].as_str() {
        Some("ApiTokenPolicy") => ("ApiTokenPolicy", "apitokenpolicies"),
        _ => ("ApiToken", "apitokens"),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7f0b2a4c-0000-4000-8000-000000000001",
            "kind": {"group": "apitoken.dev", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "apitoken.dev", "version": "v1alpha1", "resource": resource},
            "namespace": "team-a", "operation": operation,
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": object, "oldObject": old, "dryRun": false,
        }
    })
    .to_string()
}

fn check(status: StatusCode, text: &str) -> Result<(), TestCaseError> {
    prop_assert!(status.is_success() || status.is_client_error(), "{status}: {text}");
    if status.is_success() {
        let v: Value = serde_json::from_str(text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(
            v["response"]["uid"].as_str(),
            Some("7f0b2a4c-0000-4000-8000-000000000001"),
            "{}",
            text
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(300), ..ProptestConfig::default() })]

    #[test]
    fn webhooks_never_fail_on_an_arbitrary_api_token(
        obj in api_token(),
        old in proptest::option::of(api_token()),
        operation in prop_oneof![Just("CREATE".to_string()), Just("UPDATE".to_string()), Just("DELETE".to_string()), Just("CONNECT".to_string()), "[A-Z]{0,8}"],
        user in prop_oneof![Just("alice".to_string()), Just("system:operator".to_string()), ".{0,20}"],
    ) {
        let body = review(&obj, old.as_ref(), &operation, &user);
        for path in ["/admission/validate", "/admission/mutate", "/admission/validate-policy"] {
            let (status, text) = call(path, body.clone());
            check(status, &text)?;
        }
    }

    #[test]
    fn webhooks_never_fail_on_an_arbitrary_api_token_policy(
        obj in api_token_policy(),
        old in proptest::option::of(api_token_policy()),
        operation in prop_oneof![Just("CREATE".to_string()), Just("UPDATE".to_string()), Just("DELETE".to_string()), "[A-Z]{0,8}"],
    ) {
        let body = review(&obj, old.as_ref(), &operation, "alice");
        for path in ["/admission/validate-policy", "/admission/validate", "/admission/mutate"] {
            let (status, text) = call(path, body.clone());
            check(status, &text)?;
        }
    }

    #[test]
    fn webhooks_never_fail_on_junk(body in prop_oneof![".{0,200}", "[\\[\\]{}\":,0-9a-zA-Z ]{0,80}"]) {
        for path in ["/admission/validate", "/admission/mutate", "/admission/validate-policy"] {
            let (status, text) = call(path, body.clone());
            check(status, &text)?;
        }
    }
}

#[test]
fn the_stand_in_really_answers_and_a_valid_token_is_allowed() {
    // Guards the harness: a well-formed request reaches the review and is allowed.
    let obj = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
        "metadata": {"name": "ok", "namespace": "team-a", "annotations": {"apitoken.dev/created-by": "alice"}},
        "spec": {"scopes": ["metrics:read"]}});
    let (status, text) = call("/admission/validate", review(&obj, None, "CREATE", "alice"));
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["response"]["allowed"], true, "{text}");
}

#[test]
fn the_policy_webhook_refuses_a_policy_that_cannot_be_applied_and_allows_a_valid_one() {
    let policy = |spec: Value| json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiTokenPolicy", "metadata": {"name": "org"}, "spec": spec});
    let answer = |spec: Value| {
        let (status, text) =
            call("/admission/validate-policy", review(&policy(spec), None, "CREATE", "alice"));
        assert_eq!(status, StatusCode::OK, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()["response"].clone()
    };
    let ok =
        answer(json!({"lifetime": {"max": "30d"}, "namespaceSelector": {"matchLabels": {"tier": "prod"}}}));
    assert_eq!(ok["allowed"], true, "{ok}");
    let refused = answer(json!({
        "lifetime": {"max": "0d"},
        "namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "Equals", "values": ["prod"]}]},
    }));
    assert_eq!(refused["allowed"], false, "{refused}");
    let message = refused["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("ApiTokenPolicy org refused: ")
            && message.contains("lifetime.max: '0d' must be longer than zero")
            && message.contains("matchExpressions[0].operator: 'Equals' is not an operator"),
        "{message}"
    );
}
