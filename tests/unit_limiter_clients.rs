//! Who the failure limit counts against, in process (no cluster): behind a trusted proxy each
//! forwarded-for client on its own; a spoofed X-Forwarded-For from anyone else is ignored;
//! TokenReview (whose caller is the API server for everyone) per presented token; and a valid
//! token is answered even for a blocked client.

use std::net::SocketAddr;
use std::sync::Arc;

use apitoken_operator::api::ApiToken;
use apitoken_operator::core::token;
use apitoken_operator::metrics::Metrics;
use apitoken_operator::verify::http::{App, AppState, router};
use apitoken_operator::verify::index::Index;
use apitoken_operator::verify::last_used::LastUsed;
use apitoken_operator::verify::limiter::FailureLimiter;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use rand::SeedableRng;
use serde_json::{Value, json};

const PROXY: [u8; 4] = [10, 0, 0, 7];

fn token(seed: u64) -> String {
    token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(seed)).plaintext.expose().to_string()
}

/// Burst 3, refilling once a second: the fourth failure in a row blocks, the fifth is refused.
fn app() -> (App, String) {
    let good = token(1);
    let index = Index::default();
    let at: ApiToken = serde_json::from_value(json!({
        "apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
        "metadata": {"name": "good", "namespace": "limits"},
        "spec": {},
        "status": {"phase": "Active", "tokenHash": token::hash(&good)},
    }))
    .unwrap();
    index.upsert(&at);
    let limiter = FailureLimiter::new(1, 3).with_trusted_proxies(vec!["10.0.0.0/24".parse().unwrap()]);
    let app = router(AppState {
        index,
        metrics: Arc::new(Metrics::default()),
        limiter: Arc::new(limiter),
        last_used: LastUsed::disabled(),
    });
    (app, good)
}

async fn call(app: &App, peer: [u8; 4], headers: &[(&str, &str)], path: &str, body: Value) -> (u16, Value) {
    let mut req = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_string())).unwrap();
    let resp = app.call(req, SocketAddr::from((peer, 40000))).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn verify(app: &App, peer: [u8; 4], xff: Option<&str>, token: &str) -> u16 {
    let headers: Vec<(&str, &str)> = xff.map(|x| ("x-forwarded-for", x)).into_iter().collect();
    call(app, peer, &headers, "/v1/verify", json!({"token": token})).await.0
}

/// Failures from `peer` (as forwarded for `xff`) until the first 429; panics if none comes.
async fn flood(app: &App, peer: [u8; 4], xff: impl Fn(usize) -> Option<String>) -> usize {
    let bad = token(99);
    for i in 0..10 {
        match verify(app, peer, xff(i).as_deref(), &bad).await {
            429 => return i,
            401 => {}
            other => panic!("unexpected {other}"),
        }
    }
    panic!("never limited within 10 failures");
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_limited_separately() {
    let (app, good) = app();
    let n = flood(&app, PROXY, |_| Some("203.0.113.1".into())).await;
    assert_eq!(n, 4, "the burst is 3");
    let bad = token(98);
    // The client in front of the same proxy, and the left part of a chain it could have forged,
    // do not matter: another client is counted on its own.
    assert_eq!(verify(&app, PROXY, Some("203.0.113.2"), &bad).await, 401);
    assert_eq!(verify(&app, PROXY, Some("203.0.113.1, 203.0.113.2"), &bad).await, 401);
    assert_eq!(verify(&app, PROXY, Some("203.0.113.1"), &bad).await, 429, "still blocked");
    // A valid token is answered even for the blocked client.
    assert_eq!(verify(&app, PROXY, Some("203.0.113.1"), &good).await, 200);
    // Forward-auth counts the same client.
    let (code, body) = call(
        &app,
        PROXY,
        &[("x-forwarded-for", "203.0.113.1"), ("authorization", &format!("Bearer {bad}"))],
        "/v1/auth",
        Value::Null,
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (401, Some("rate_limited")));
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let (app, good) = app();
    let attacker = [198, 51, 100, 7];
    // A new forged address on every request: still one client, the peer.
    let n = flood(&app, attacker, |i| Some(format!("203.0.113.{i}"))).await;
    assert_eq!(n, 4);
    assert_eq!(verify(&app, attacker, Some("192.0.2.200"), &token(97)).await, 429);
    // ... and forging a victim's address blocks nobody but the attacker.
    assert_eq!(verify(&app, PROXY, Some("192.0.2.200"), &token(97)).await, 401);
    assert_eq!(verify(&app, [198, 51, 100, 8], None, &token(97)).await, 401);
    assert_eq!(verify(&app, attacker, None, &good).await, 200, "valid traffic is never limited");
}

#[tokio::test]
async fn token_reviews_are_limited_per_presented_token() {
    let (app, good) = app();
    let review = |t: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": t}});
    let path = "/apis/authentication.k8s.io/v1/tokenreviews";
    let apiserver = [127, 0, 0, 1];
    let bad = token(96);
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(call(&app, apiserver, &[], path, review(&bad)).await.0);
    }
    assert_eq!(codes, [200, 200, 200, 200, 429, 429], "the same bad token, from the API server");
    // Every other token through the same API server is unaffected.
    let (code, body) = call(&app, apiserver, &[], path, review(&token(95))).await;
    assert_eq!((code, &body["status"]["authenticated"]), (200, &json!(false)));
    let (code, body) = call(&app, apiserver, &[], path, review(&good)).await;
    assert_eq!((code, &body["status"]["authenticated"]), (200, &json!(true)));
    // The JSON and forward-auth endpoints from the same address were not touched.
    assert_eq!(verify(&app, apiserver, None, &token(94)).await, 401);
}
