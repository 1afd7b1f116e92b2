//! Property-based fuzzing of everything a client controls, in process (no cluster): the JSON
//! verify body, the Authorization header and query of forward-auth, and TokenReview bodies
//! (AdmissionReview bodies: tests/fuzz_admission.rs). Whatever arrives, the answer is a 2xx or 4xx, never a 5xx or a panic,
//! and no response echoes a token it was given. Forward-auth is narrower still: only 200, 401 or
//! 403, because nginx `auth_request` turns any other answer into a 500 for the end user.
//! Bounded: a fixed number of cases per property.

mod support;

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
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use support::fuzz_cases;

/// A token the index knows (scope `metrics:read`), so forward-auth can also answer 200 and 403.
fn known_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        use rand::SeedableRng;
        let t = token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(42));
        t.plaintext.expose().to_string()
    })
}

fn app_limited(per_second: u32, burst: u32) -> App {
    let index = Index::default();
    let at: ApiToken = serde_json::from_value(serde_json::json!({
        "apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
        "metadata": {"name": "reader", "namespace": "fuzz"},
        "spec": {"scopes": ["metrics:read"]},
        "status": {"phase": "Active", "tokenHash": token::hash(known_token()), "effectiveScopes": ["metrics:read"]},
    }))
    .unwrap();
    index.upsert(&at);
    router(AppState {
        index,
        metrics: Arc::new(Metrics::default()),
        limiter: Arc::new(FailureLimiter::new(per_second, burst)),
        last_used: LastUsed::disabled(),
    })
}

fn app() -> App {
    app_limited(1_000_000, 1_000_000)
}

/// Status, headers and body of one request to `app`.
fn call_on(app: &App, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let resp = app.call(req, SocketAddr::from(([127, 0, 0, 1], 9))).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    })
}

fn call(req: Request<Body>) -> (StatusCode, String) {
    let (status, _, body) = call_on(&app(), req);
    (status, body)
}

fn client_error_or_success(status: StatusCode) -> bool {
    status.is_success() || status.is_client_error()
}

/// Header bytes as a client can send them: visible ASCII, spaces, tabs and obs-text (>= 0x80).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..80)
}

/// Authorization headers: anything, and near-misses of `Bearer <token>` (scheme in any case,
/// other schemes, no token, several spaces, the known token, unknown and junk tokens).
fn authorization() -> impl Strategy<Value = Vec<u8>> {
    let scheme = prop_oneof![
        "(B|b)(E|e)(A|a)(R|r)(E|e)(R|r)",
        Just("Basic".to_string()),
        Just("Token".to_string()),
        "[A-Za-z]{0,8}",
    ];
    let credential = prop_oneof![
        Just(known_token().to_string()),
        Just(format!("{}  ", known_token())),
        Just("apitok_0000000000000000000000000000000000000000000000000000AAAAAA".to_string()),
        Just("dXNlcjpwYXNz".to_string()),
        "[A-Za-z0-9_=+/.~-]{8,70}",
        Just(String::new()),
    ];
    prop_oneof![
        header_bytes(),
        (scheme, " {0,4}", credential).prop_map(|(s, sp, c)| format!("{s}{sp}{c}").into_bytes()),
    ]
}

/// Query strings: well-formed scopes and audiences, bad scopes, bad percent-escapes.
fn query() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("metrics:read".to_string()),
        Just("metrics:write".to_string()),
        Just("Bad%20Scope".to_string()),
        Just("%FF".to_string()),
        Just("%C3%28".to_string()),
        "[a-z:/*.,+ %0-9A-F]{0,20}",
    ];
    prop_oneof![
        "[a-z=&%:/*.0-9]{0,40}",
        proptest::collection::vec((prop_oneof![Just("scope"), Just("audience"), Just("x")], value), 0..4)
            .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")),
    ]
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
    fn forward_auth_answers_only_200_401_or_403(
        auth in proptest::option::of(authorization()),
        query in query(),
        scopes in proptest::option::of(header_bytes()),
        audience in proptest::option::of(header_bytes()),
    ) {
        let Ok(mut req) = Request::get(format!("/v1/auth?{query}")).body(Body::empty()) else {
            return Err(TestCaseError::reject("not a URI"));
        };
        for (name, value) in [("authorization", &auth), ("x-required-scopes", &scopes), ("x-token-audience", &audience)] {
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_bytes(v).ok()) {
                req.headers_mut().append(name, v);
            }
        }
        let (status, headers, body) = call_on(&app(), req);
        prop_assert!(
            [StatusCode::OK, StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&status),
            "{status}: {body}"
        );
        if status != StatusCode::OK {
            prop_assert!(headers.contains_key("www-authenticate"), "{status} without a challenge: {body}");
        }
        // Whatever follows the scheme is the credential: it is not repeated anywhere in the answer.
        if let Some(credential) = auth.as_deref().and_then(|a| a.splitn(2, |b| *b == b' ').nth(1)) {
            let credential = String::from_utf8_lossy(credential);
            let credential = credential.trim();
            if credential.len() >= 8 {
                prop_assert!(!body.contains(credential), "the body echoes the credential: {body}");
                for v in headers.values() {
                    prop_assert!(!String::from_utf8_lossy(v.as_bytes()).contains(credential), "a header echoes the credential");
                }
            }
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive(upper in proptest::collection::vec(any::<bool>(), 6), spaces in 1usize..5, scope in prop_oneof![Just("metrics:read"), Just("metrics:write")]) {
        let scheme: String = "bearer".chars().zip(upper).map(|(c, u)| if u { c.to_ascii_uppercase() } else { c }).collect();
        let header = format!("{scheme}{}{}", " ".repeat(spaces), known_token());
        let req = Request::get(format!("/v1/auth?scope={scope}")).header("authorization", header).body(Body::empty()).unwrap();
        let (status, _, body) = call_on(&app(), req);
        let want = if scope == "metrics:read" { StatusCode::OK } else { StatusCode::FORBIDDEN };
        prop_assert_eq!(status, want, "{}", body);
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

/// `GET /v1/auth?{query}` with `headers` (raw bytes, so obs-text can be sent).
fn auth_request(query: &str, headers: &[(&str, &[u8])]) -> Request<Body> {
    let mut req = Request::get(format!("/v1/auth?{query}")).body(Body::empty()).unwrap();
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    req
}

/// Query, headers, expected status, RFC 6750 error code in the challenge, reason in the body.
type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, u16, Option<&'a str>, &'a str);

/// The refusals of issue 10 one by one: 401 or 403 (never 400), a challenge with the RFC 6750
/// error code (none for a missing or foreign scheme, RFC 6750 §3.1) and a body that says why.
#[test]
fn forward_auth_refusals_are_401_or_403_and_say_why() {
    let known = format!("Bearer {}", known_token());
    let unknown = {
        use rand::SeedableRng;
        let t = token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(43));
        format!("Bearer {}", t.plaintext.expose())
    };
    let malformed = "Bearer apitok_0000000000000000000000000000000000000000000000000000AAAAAA";
    let cases: Vec<Case> = vec![
        ("", vec![], 401, None, "missing_token"),
        ("", vec![("authorization", b"Bearer")], 401, Some("invalid_request"), "invalid_request"),
        ("", vec![("authorization", b"Bearer    ")], 401, Some("invalid_request"), "invalid_request"),
        ("", vec![("authorization", b"Basic dXNlcjpwYXNz")], 401, None, "unsupported_scheme"),
        ("", vec![("authorization", b"Bearer \xff\xfe")], 401, Some("invalid_request"), "invalid_request"),
        (
            "",
            vec![("authorization", known.as_bytes()), ("authorization", known.as_bytes())],
            401,
            Some("invalid_request"),
            "invalid_request",
        ),
        ("", vec![("authorization", unknown.as_bytes())], 401, Some("invalid_token"), "unknown"),
        ("", vec![("authorization", malformed.as_bytes())], 401, Some("invalid_token"), "malformed"),
        ("", vec![("authorization", b"")], 401, None, "missing_token"),
        ("", vec![("authorization", b"Bearer apitok_a b")], 401, Some("invalid_token"), "malformed"),
        (
            "scope=Bad%20Scope",
            vec![("authorization", known.as_bytes())],
            401,
            Some("invalid_request"),
            "invalid_request",
        ),
        (
            "scope=%FF",
            vec![("authorization", known.as_bytes())],
            401,
            Some("invalid_request"),
            "invalid_request",
        ),
        (
            "",
            vec![("authorization", known.as_bytes()), ("x-required-scopes", b"Bad Scope")],
            401,
            Some("invalid_request"),
            "invalid_request",
        ),
        (
            "",
            vec![("authorization", known.as_bytes()), ("x-required-scopes", b"metrics:read \xff")],
            401,
            Some("invalid_request"),
            "invalid_request",
        ),
        (
            "",
            vec![("authorization", known.as_bytes()), ("x-token-audience", b"t\xe9nant")],
            401,
            Some("invalid_request"),
            "invalid_request",
        ),
        (
            "scope=metrics:write",
            vec![("authorization", known.as_bytes())],
            403,
            Some("insufficient_scope"),
            "missing_scope",
        ),
        (
            "",
            vec![
                ("authorization", known.as_bytes()),
                ("x-required-scopes", b"metrics:read"),
                ("x-required-scopes", b"metrics:write"),
            ],
            403,
            Some("insufficient_scope"),
            "missing_scope",
        ),
    ];
    for (query, headers, code, error, reason) in cases {
        let what = format!("{query:?} {headers:?}");
        let (status, h, body) = call_on(&app(), auth_request(query, &headers));
        assert_eq!(status.as_u16(), code, "{what}: {body}");
        let challenge =
            h.get("www-authenticate").unwrap_or_else(|| panic!("{what}: no challenge")).to_str().unwrap();
        assert!(challenge.starts_with("Bearer realm=\"apitoken\""), "{what}: {challenge}");
        match error {
            Some(e) => assert!(challenge.contains(&format!("error=\"{e}\"")), "{what}: {challenge}"),
            None => assert!(!challenge.contains("error="), "{what}: {challenge}"),
        }
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["reason"], reason, "{what}: {body}");
        assert!(!body["message"].as_str().unwrap_or_default().is_empty(), "{what}: {body}");
        assert!(!body.to_string().contains(known_token()), "{what}: the body echoes the token");
    }
}

#[test]
fn the_scheme_is_case_insensitive_and_may_be_followed_by_several_spaces() {
    for scheme in ["Bearer ", "bearer ", "BEARER ", "BeArEr ", "Bearer    "] {
        let header = format!("{scheme}{}", known_token());
        let (status, h, body) =
            call_on(&app(), auth_request("scope=metrics:read", &[("authorization", header.as_bytes())]));
        assert_eq!(status, StatusCode::OK, "{scheme:?}: {body}");
        assert_eq!(h["x-token-name"], "reader");
    }
}

/// A client over its failure quota: forward-auth says 401 (nginx passes nothing else on) with
/// `Retry-After`; /v1/verify and TokenReview keep 429.
#[test]
fn a_rate_limited_client_gets_401_with_retry_after_from_forward_auth() {
    let app = app_limited(1, 1);
    let unknown: &[u8] = b"Bearer apitok_0000000000000000000000000000000000000000000000000000AAAAAA";
    let limited = (0..10)
        .map(|_| call_on(&app, auth_request("", &[("authorization", unknown)])))
        .find(|(_, h, _)| h.contains_key("retry-after"))
        .expect("blocked within 10 failures");
    let (status, h, body) = limited;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let challenge = h["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["reason"], "rate_limited");
    let (status, h, _) =
        call_on(&app, Request::post("/v1/verify").body(Body::from(r#"{"token": "apitok_x"}"#)).unwrap());
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.contains_key("retry-after"));
}
