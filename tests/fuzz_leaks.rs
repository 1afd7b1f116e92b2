//! Property-based fuzzing of the leak-report endpoint, in process (no cluster): bodies and headers
//! a reporter controls, signed with a key the endpoint trusts (so parsing and lookup are reached)
//! or not. Whatever arrives, the answer is 200 (the feedback array), 400, 401 or 413: never a 5xx
//! or a panic, and never a token it was given. Bounded: a fixed number of cases per property.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use apitoken_operator::core::token;
use apitoken_operator::metrics::Metrics;
use apitoken_operator::verify::http::App;
use apitoken_operator::verify::index::Index;
use apitoken_operator::verify::leak_report::KeysFile;
use apitoken_operator::verify::leaks::{GITHUB_PATH, KUBERNETES_PATH, LeakState, router};
use apitoken_operator::verify::limiter::FailureLimiter;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use proptest::prelude::*;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use support::fuzz_cases;

const KEY_ID: &str = "abcdef0123456789";

struct Fixture {
    rt: tokio::runtime::Runtime,
    app: App,
    signer: EcdsaKeyPair,
}

/// The endpoint with one trusted key, an empty index (no report can reach the API), and a client
/// for an address nobody listens on; failure limits out of the way.
fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| build(1_000_000, 1_000_000))
}

fn build(per_second: u32, burst: u32) -> Fixture {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("apitoken-fuzz-leaks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("keys-{}.json", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let doc = serde_json::json!({"public_keys": [{"key_identifier": KEY_ID, "key": key.public_key_pem(), "is_current": true}]});
        std::fs::write(&file, doc.to_string()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let app = rt.block_on(async {
            let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
            // Listed (empty): ready to answer.
            let index = Index::default();
            index.apply_list([]);
            App::from(router(LeakState::new(
                index,
                kube::Client::try_from(config).unwrap(),
                Some(Arc::new(KeysFile::load(&file).unwrap())),
                Arc::new(FailureLimiter::new(per_second, burst)),
                Arc::new(Metrics::default()),
            )))
        });
        Fixture { rt, app, signer }
    }
}

fn sign(body: &[u8]) -> String {
    let sig = fixture().signer.sign(&SystemRandom::new(), body).unwrap();
    base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
}

/// Status and body of one report.
fn post(body: Vec<u8>, key_id: &[u8], signature: &[u8]) -> (StatusCode, String) {
    let (status, _, body) = post_to(fixture(), body, key_id, signature);
    (status, body)
}

/// Status, headers and body of one report to `f`'s endpoint.
fn post_to(
    f: &Fixture,
    body: Vec<u8>,
    key_id: &[u8],
    signature: &[u8],
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::post(GITHUB_PATH).header("content-type", "application/json");
    if let Ok(v) = axum::http::HeaderValue::from_bytes(key_id) {
        req = req.header("github-public-key-identifier", v);
    }
    if let Ok(v) = axum::http::HeaderValue::from_bytes(signature) {
        req = req.header("github-public-key-signature", v);
    }
    send(f, req.body(Body::from(body)).unwrap())
}

/// Status, headers and body of `req` to `f`'s endpoints.
fn send(f: &Fixture, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    f.rt.block_on(async {
        let resp = f.app.call(req, peer).await;
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&bytes).into_owned())
    })
}

/// A token-shaped string: real (unknown to the index), with a typo, or any prefix and body.
fn tokenish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|seed| {
            use rand::SeedableRng;
            token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(seed))
                .plaintext
                .expose()
                .to_string()
        }),
        (any::<u64>(), 7usize..60).prop_map(|(seed, at)| {
            use rand::SeedableRng;
            let mut t = token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(seed))
                .plaintext
                .expose()
                .to_string()
                .into_bytes();
            t[at] = if t[at] == b'a' { b'b' } else { b'a' };
            String::from_utf8(t).unwrap()
        }),
        "[a-z][a-z0-9_]{1,15}_[0-9A-Za-z]{54}",
        ".{0,300}",
    ]
}

/// JSON-ish report bodies built around `tokens`: well formed, with odd fields, or broken.
fn report() -> impl Strategy<Value = (Vec<u8>, Vec<String>)> {
    let entry = (tokenish(), prop::option::of(".{0,40}"), prop::option::of(".{0,3000}"), any::<bool>());
    (proptest::collection::vec(entry, 0..6), 0usize..6, any::<u8>()).prop_map(|(entries, cut, junk)| {
        let tokens: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
        let values: Vec<serde_json::Value> = entries
            .into_iter()
            .map(|(t, ty, url, as_number)| {
                if as_number {
                    serde_json::json!({"token": t, "type": 7, "url": url})
                } else {
                    serde_json::json!({"token": t, "type": ty, "url": url, "source": "content"})
                }
            })
            .collect();
        let mut body = serde_json::Value::Array(values).to_string().into_bytes();
        // Sometimes broken JSON (or not UTF-8): cut short, or a stray byte.
        match cut {
            0 => body.truncate(body.len() / 2),
            1 => body.insert(body.len() / 2, junk),
            _ => {}
        }
        (body, tokens)
    })
}

fn no_echo(answer: &str, tokens: &[String]) -> bool {
    tokens.iter().filter(|t| t.len() >= 20).all(|t| !answer.contains(t.as_str()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases(256)))]

    #[test]
    fn signed_reports_are_answered_200_or_400_and_never_echo((body, tokens) in report()) {
        let signature = sign(&body);
        let (status, answer) = post(body, KEY_ID.as_bytes(), signature.as_bytes());
        prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE, "{status} {answer}");
        prop_assert!(no_echo(&answer, &tokens), "{answer}");
        if status == StatusCode::OK {
            // None of these is in the index: all false positives, one entry each.
            let feedback: serde_json::Value = serde_json::from_str(&answer).unwrap();
            let entries = feedback.as_array().unwrap();
            prop_assert!(entries.iter().all(|e| e["label"] == "false_positive"));
        }
    }

    #[test]
    fn unsigned_or_badly_signed_reports_are_401((body, tokens) in report(), key_id in proptest::collection::vec(any::<u8>(), 0..80), signature in proptest::collection::vec(any::<u8>(), 0..120)) {
        let (status, answer) = post(body, &key_id, &signature);
        prop_assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::PAYLOAD_TOO_LARGE, "{status} {answer}");
        prop_assert!(no_echo(&answer, &tokens), "{answer}");
    }
}

/// Status and body of one in-cluster report with `authorization` (if it is a header value).
fn post_kubernetes(body: Vec<u8>, authorization: &[u8]) -> (StatusCode, String) {
    let f = fixture();
    let mut req = Request::post(KUBERNETES_PATH);
    if let Ok(v) = axum::http::HeaderValue::from_bytes(authorization) {
        req = req.header("authorization", v);
    }
    let (status, _, answer) = send(f, req.body(Body::from(body)).unwrap());
    (status, answer)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases(256)))]

    /// Without a bearer token nothing reaches the API server: 401 (or 413), whatever the body.
    #[test]
    fn in_cluster_reports_without_a_bearer_token_are_401((body, tokens) in report(), authorization in proptest::collection::vec(any::<u8>(), 0..80)) {
        let text = String::from_utf8_lossy(&authorization);
        let bearer = text.split_once(' ').is_some_and(|(scheme, rest)| scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty());
        prop_assume!(!bearer);
        let (status, answer) = post_kubernetes(body, &authorization);
        prop_assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::PAYLOAD_TOO_LARGE, "{status} {answer}");
        prop_assert!(no_echo(&answer, &tokens), "{answer}");
    }
}

#[test]
fn an_oversized_report_is_413_before_any_signature_check() {
    let body = vec![b' '; 70 * 1024];
    let (status, _) = post(body, KEY_ID.as_bytes(), b"x");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[test]
fn a_flood_of_badly_signed_reports_is_rate_limited_and_never_holds_up_a_signed_one() {
    let f = build(1, 3);
    let body = b"[]".to_vec();
    let good = {
        let sig = f.signer.sign(&SystemRandom::new(), &body).unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    };
    // Signed reports never count as failures.
    for _ in 0..10 {
        assert_eq!(post_to(&f, body.clone(), KEY_ID.as_bytes(), good.as_bytes()).0, StatusCode::OK);
    }
    let codes: Vec<StatusCode> =
        (0..4).map(|_| post_to(&f, body.clone(), KEY_ID.as_bytes(), b"AAAA").0).collect();
    assert_eq!(&codes[..3], [StatusCode::UNAUTHORIZED; 3]);
    let (status, headers, answer) = post_to(&f, body.clone(), KEY_ID.as_bytes(), b"AAAA");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{codes:?} then {answer}");
    assert!(headers.contains_key("retry-after"));
    // The flood does not hold up a correctly signed report from the same address.
    assert_eq!(post_to(&f, body, KEY_ID.as_bytes(), good.as_bytes()).0, StatusCode::OK);
}
