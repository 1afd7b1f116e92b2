//! Property-based fuzzing of everything a client controls, in process (no cluster): the JSON
//! verify body, the Authorization header and query of forward-auth, and TokenReview bodies
//! (AdmissionReview bodies: tests/fuzz_admission.rs). Whatever arrives, the answer is a 2xx or 4xx, never a 5xx or a panic,
//! and no response echoes a token it was given. Bounded: a fixed number of cases per property.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use apitoken_operator::metrics::Metrics;
use apitoken_operator::verify::http::{AppState, router};
use apitoken_operator::verify::index::Index;
use apitoken_operator::verify::last_used::LastUsed;
use apitoken_operator::verify::limiter::FailureLimiter;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use support::fuzz_cases;
use tower::ServiceExt;

fn app() -> axum::Router {
    router(AppState {
        index: Index::default(),
        metrics: Arc::new(Metrics::default()),
        limiter: Arc::new(FailureLimiter::new(1_000_000, 1_000_000)),
        last_used: LastUsed::disabled(),
    })
}

fn call(req: Request<Body>) -> (StatusCode, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut req = req;
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

fn client_error_or_success(status: StatusCode) -> bool {
    status.is_success() || status.is_client_error()
}

/// JSON-ish text: real JSON values and near-misses.
fn jsonish() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        any::<(Option<String>, Option<Vec<String>>, Option<String>)>().prop_map(|(t, s, a)| {
            serde_json::json!({"token": t, "scopes": s, "audience": a}).to_string()
        }),
        "\\{\"token\": ?\"[a-z_0-9A-Z]{0,70}\"(, ?\"scopes\": ?\\[(\"[a-z:/*]{0,12}\",?){0,3}\\])?\\}",
        "[\\[\\]{}\":,0-9a-z ]{0,60}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(400), ..ProptestConfig::default() })]

    #[test]
    fn verify_never_fails_on_input(body in jsonish()) {
        let (status, text) = call(Request::post("/v1/verify").header("content-type", "application/json").body(Body::from(body.clone())).unwrap());
        prop_assert!(client_error_or_success(status), "{status}: {text}");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            && let Some(t) = v.get("token").and_then(|t| t.as_str())
            && t.len() >= 8
        {
            prop_assert!(!text.contains(t), "the response echoes the token");
        }
    }

    #[test]
    fn forward_auth_never_fails_on_headers_or_query(auth in proptest::option::of(".{0,120}"), query in "[a-z=&%:/*.0-9]{0,40}", scopes in proptest::option::of("[a-z :,/*]{0,30}")) {
        let mut req = Request::get(format!("/v1/auth?{query}"));
        if let Some(v) = auth.as_deref().and_then(|a| axum::http::HeaderValue::from_str(a).ok()) {
            req = req.header("authorization", v);
        }
        if let Some(v) = scopes.as_deref().and_then(|s| axum::http::HeaderValue::from_str(s).ok()) {
            req = req.header("x-required-scopes", v);
        }
        let (status, text) = call(req.body(Body::empty()).unwrap());
        prop_assert!(client_error_or_success(status), "{status}: {text}");
    }

    #[test]
    fn token_review_never_fails_on_input(token in ".{0,80}", junk in ".{0,80}", audiences in proptest::collection::vec("[a-z-]{0,10}", 0..3)) {
        for body in [
            serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": audiences}}).to_string(),
            junk.clone(),
        ] {
            let (status, text) = call(Request::post("/apis/authentication.k8s.io/v1/tokenreviews").body(Body::from(body)).unwrap());
            prop_assert!(client_error_or_success(status), "{status}: {text}");
            if token.len() >= 8 {
                prop_assert!(!text.contains(&token));
            }
        }
    }
}

#[test]
fn oversized_bodies_are_413() {
    let (status, _) = call(Request::post("/v1/verify").body(Body::from(vec![b'x'; 64 * 1024])).unwrap());
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}
