//! The verification endpoints of design §7: JSON verify, forward-auth, TokenReview.
//!
//! Every request is answered from the in-memory index; nothing here calls the API server.
//! Error bodies say why, never echo the token, and malformed input is a 4xx, never a 500.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use serde::Deserialize;
use serde_json::json;
use tower_http::timeout::TimeoutLayer;

use super::decision::{Denial, Granted, Request, decide};
use super::index::Index;
use super::last_used::LastUsed;
use super::limiter::{ClientKey, FailureLimiter};
use crate::core::scope::Scope;
use crate::metrics::{EndpointLabels, Metrics, VerifyLabels};

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub index: Index,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<FailureLimiter>,
    pub last_used: LastUsed,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/auth", any(auth))
        .route("/apis/authentication.k8s.io/v1/tokenreviews", post(token_review))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(10)))
        .with_state(state)
}

/// `/metrics`, `/healthz`, `/readyz` (ready once the index has synced, when there is one, and
/// until `draining` is set: on SIGTERM, so endpoints stop sending traffic before the listener
/// closes).
pub fn operations_router(
    index: Option<Index>,
    metrics: Arc<Metrics>,
    draining: Arc<std::sync::atomic::AtomicBool>,
) -> Router {
    let ready_index = index.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let index = index.clone();
                async move {
                    if let Some(index) = index {
                        metrics.index_hashes.set(i64::try_from(index.len()).unwrap_or(i64::MAX));
                    }
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if draining.load(std::sync::atomic::Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                } else if ready_index.as_ref().is_none_or(Index::is_ready) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "the token index has not synced yet")
                }
            }),
        )
}

const RATE_LIMITED: &str = "too many failed verifications from this client; retry later";

/// Seconds to wait (at least 1), for `Retry-After`.
fn retry_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl AppState {
    /// 429 for a client that is over its failure quota (forward-auth answers 401 instead).
    fn limited(&self, wait: Duration) -> Response {
        self.metrics.rate_limited.inc();
        let body = json!({"valid": false, "reason": "rate_limited", "message": RATE_LIMITED});
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_secs(wait).to_string())],
            axum::Json(body),
        )
            .into_response()
    }

    /// The decision for `req`. A failure counts against `client`, unless it is already blocked
    /// (`blocked`), which does not extend its wait.
    fn decide(
        &self,
        endpoint: &'static str,
        client: &ClientKey,
        blocked: bool,
        req: &Request<'_>,
    ) -> Result<Granted, Denial> {
        let start = Instant::now();
        let result = decide(req, |d| self.index.get(d), Timestamp::now());
        let label = match &result {
            Ok(_) => "valid",
            Err(d) => d.reason(),
        };
        self.metrics.verifications.get_or_create(&VerifyLabels { endpoint, result: label }).inc();
        self.metrics
            .verify_latency
            .get_or_create(&EndpointLabels { endpoint })
            .observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(g) => self.last_used.record(&g.entry.meta),
            Err(d) if d.status() == 401 && !blocked => self.limiter.failed(client),
            Err(_) => {}
        }
        result
    }
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"valid": false, "reason": "bad_request", "message": message})),
    )
        .into_response()
}

/// A JSON error described by position and kind only: serde's own text may quote input values.
fn json_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "is not valid JSON",
        serde_json::error::Category::Data => "does not have the expected fields and types",
        serde_json::error::Category::Io => "could not be read",
    };
    format!("the request body {kind} (line {}, column {})", e.line(), e.column())
}

fn parse_scopes<'a>(raw: impl Iterator<Item = &'a str>) -> Result<Vec<Scope>, String> {
    let mut out = Vec::new();
    for (i, s) in raw.flat_map(|s| s.split([' ', ',']).filter(|s| !s.is_empty())).enumerate() {
        // The value is not echoed: a client might have put a secret in the wrong place.
        out.push(s.parse().map_err(|_| format!("required scope #{} is not resource[/name]:verb", i + 1))?);
    }
    Ok(out)
}

fn denial_body(d: &Denial) -> serde_json::Value {
    let mut body = json!({"valid": false, "reason": d.reason(), "message": d.message()});
    if let Denial::MissingScope(missing) = d {
        body["missingScopes"] = json!(missing);
    }
    body
}

fn granted_body(g: &Granted) -> serde_json::Value {
    let m = &g.entry.meta;
    json!({
        "valid": true,
        "namespace": m.namespace,
        "name": m.name,
        "tokenId": g.token_id,
        "scopes": m.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "audiences": m.audiences,
        "expiresAt": g.entry.valid_until.map(|t| t.to_string()),
        "previous": g.entry.previous,
    })
}

#[derive(Deserialize)]
struct VerifyBody {
    token: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    audience: Option<String>,
}

/// While the client is blocked, everything but a usable token is refused as rate limited:
/// valid traffic is never limited.
async fn verify(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = s.limiter.client(peer.ip(), &headers);
    let blocked = s.limiter.blocked(&client);
    let refuse = |r: Response| blocked.map_or(r, |wait| s.limited(wait));
    let req: VerifyBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(bad_request(&json_error(&e))),
    };
    let scopes = match parse_scopes(req.scopes.iter().map(String::as_str)) {
        Ok(s) => s,
        Err(m) => return refuse(bad_request(&m)),
    };
    let audiences: Vec<&str> = req.audience.as_deref().into_iter().collect();
    let request = Request { token: &req.token, scopes: &scopes, audiences: &audiences };
    match s.decide("verify", &client, blocked.is_some(), &request) {
        Ok(g) => (StatusCode::OK, axum::Json(granted_body(&g))).into_response(),
        Err(d) if d.status() == 401 => refuse((status(&d), axum::Json(denial_body(&d))).into_response()),
        Err(d) => (status(&d), axum::Json(denial_body(&d))).into_response(),
    }
}

fn status(d: &Denial) -> StatusCode {
    if d.status() == 403 { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED }
}

/// RFC 6750 challenge; `description` and `scope` are our own words, never client input. Characters
/// RFC 6750 does not allow in these values (quotes, backslashes, non-ASCII) are left out.
fn challenge(error: Option<&str>, description: Option<&str>, scope: Option<&str>) -> HeaderValue {
    let mut v = String::from("Bearer realm=\"apitoken\"");
    for (key, value) in [("error", error), ("error_description", description), ("scope", scope)] {
        if let Some(value) = value {
            v.push_str(", ");
            v.push_str(key);
            v.push_str("=\"");
            v.extend(value.chars().filter(|c| matches!(c, ' '..='~') && !matches!(c, '"' | '\\')));
            v.push('"');
        }
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"apitoken\""))
}

/// A forward-auth refusal. nginx `auth_request` passes on 401 and 403 only and turns any other
/// status into a 500 for the end user, so `/v1/auth` answers nothing else: a malformed request,
/// 400 in RFC 6750, is a 401 with `error="invalid_request"` here.
fn auth_refusal(forbidden: bool, challenge: HeaderValue, body: serde_json::Value) -> Response {
    let status = if forbidden { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
    (status, [(header::WWW_AUTHENTICATE, challenge)], axum::Json(body)).into_response()
}

/// 401 `invalid_request`: `message` (our own words, ASCII) says what is wrong with the request.
fn invalid_request(message: &str) -> Response {
    auth_refusal(
        false,
        challenge(Some("invalid_request"), Some(message), None),
        json!({"valid": false, "reason": "invalid_request", "message": message}),
    )
}

/// Why the Authorization header yields no Bearer token.
enum NoBearer {
    Missing,
    OtherScheme,
    Invalid(&'static str),
}

impl NoBearer {
    fn refusal(&self) -> Response {
        // RFC 6750 3.1: a request without credentials (or with another scheme) gets the challenge
        // alone, no error code; the body says what to send.
        let plain = |reason: &str, message: &str| {
            auth_refusal(
                false,
                challenge(None, None, None),
                json!({"valid": false, "reason": reason, "message": message}),
            )
        };
        match self {
            NoBearer::Missing => plain("missing_token", "send Authorization: Bearer <token>"),
            NoBearer::OtherScheme => plain(
                "unsupported_scheme",
                "the Authorization scheme is not Bearer; send Authorization: Bearer <token>",
            ),
            NoBearer::Invalid(message) => invalid_request(message),
        }
    }
}

/// The token of `Authorization: Bearer <token>`. RFC 7235: the scheme is case-insensitive and
/// separated from the credentials by one or more spaces.
fn bearer_token(headers: &HeaderMap) -> Result<&str, NoBearer> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().map(HeaderValue::as_bytes).unwrap_or_default();
    if values.next().is_some() {
        return Err(NoBearer::Invalid("send one Authorization header, not several"));
    }
    if value.is_empty() {
        return Err(NoBearer::Missing);
    }
    let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(NoBearer::OtherScheme);
    }
    let Some(rest) = std::str::from_utf8(rest).ok().filter(|r| r.is_ascii()) else {
        return Err(NoBearer::Invalid("the Authorization header has bytes outside ASCII"));
    };
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() {
        return Err(NoBearer::Invalid("the Bearer token is empty; send Authorization: Bearer <token>"));
    }
    Ok(token)
}

async fn auth(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let client = s.limiter.client(peer.ip(), &headers);
    let blocked = s.limiter.blocked(&client);
    // 429 would be the code, but nginx makes a 500 of it. 401 invalid_token (the credentials
    // are refused for now) with Retry-After, rather than 403, which here means "a valid token
    // lacking a scope or audience" and would send people looking for a permission problem.
    let refuse = |r: Response| {
        let Some(wait) = blocked else { return r };
        s.metrics.rate_limited.inc();
        let mut resp = auth_refusal(
            false,
            challenge(Some("invalid_token"), Some(RATE_LIMITED), None),
            json!({"valid": false, "reason": "rate_limited", "message": RATE_LIMITED}),
        );
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(wait)));
        resp
    };
    let params: Vec<(String, String)> = match serde_urlencoded::from_str(query.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(_) => {
            return refuse(invalid_request(
                "the query string is not valid URL encoding (expected scope=...&audience=...)",
            ));
        }
    };
    // Unreadable requirement headers refuse rather than being skipped: skipping would grant more.
    let mut header_scopes = Vec::new();
    for v in headers.get_all("x-required-scopes") {
        match v.to_str() {
            Ok(v) => header_scopes.push(v),
            Err(_) => return refuse(invalid_request("the X-Required-Scopes header has bytes outside ASCII")),
        }
    }
    let raw_scopes =
        params.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.as_str()).chain(header_scopes);
    let scopes = match parse_scopes(raw_scopes) {
        Ok(s) => s,
        Err(m) => return refuse(invalid_request(&m)),
    };
    let header_audience = match headers.get("x-token-audience").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return refuse(invalid_request("the X-Token-Audience header has bytes outside ASCII"));
        }
    };
    let audience = params.iter().find(|(k, _)| k == "audience").map(|(_, v)| v.as_str()).or(header_audience);
    let token = match bearer_token(&headers) {
        Ok(t) => t,
        Err(no) => return refuse(no.refusal()),
    };
    let audiences: Vec<&str> = audience.into_iter().collect();
    let request = Request { token, scopes: &scopes, audiences: &audiences };
    match s.decide("auth", &client, blocked.is_some(), &request) {
        Ok(g) => {
            let m = &g.entry.meta;
            let mut resp = (StatusCode::OK, "ok").into_response();
            let h = resp.headers_mut();
            for (name, value) in [
                ("x-token-id", g.token_id.as_str()),
                ("x-token-name", m.name.as_str()),
                ("x-token-namespace", m.namespace.as_str()),
                ("x-token-scopes", m.scopes_joined.as_str()),
            ] {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            }
            resp
        }
        Err(d) => {
            let h = match &d {
                Denial::MissingScope(missing) => {
                    challenge(Some("insufficient_scope"), Some("missing scope"), Some(&missing.join(" ")))
                }
                Denial::AudienceMismatch => {
                    challenge(Some("insufficient_scope"), Some("audience mismatch"), None)
                }
                other => challenge(Some("invalid_token"), Some(other.reason()), None),
            };
            let refusal = auth_refusal(d.status() == 403, h, denial_body(&d));
            if d.status() == 403 { refusal } else { refuse(refusal) }
        }
    }
}

/// The caller is usually the API server, on behalf of every user of the cluster: failures count
/// against the presented token's id, so one client's bad tokens lock out nobody else.
async fn token_review(State(s): State<AppState>, body: Bytes) -> Response {
    let review: TokenReview = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&json_error(&e)),
    };
    let token = review.spec.token.as_deref().unwrap_or("");
    let client = ClientKey::for_token(token);
    let blocked = s.limiter.blocked(&client);
    let wanted = review.spec.audiences.clone().unwrap_or_default();
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let request = Request { token, scopes: &[], audiences: &wanted };
    let status = match s.decide("tokenreview", &client, blocked.is_some(), &request) {
        Ok(g) => {
            let m = &g.entry.meta;
            let mut extra = std::collections::BTreeMap::new();
            extra.insert(
                "apitoken.dev/scopes".to_string(),
                m.scopes.iter().map(ToString::to_string).collect(),
            );
            extra.insert("apitoken.dev/token-id".to_string(), vec![g.token_id.clone()]);
            if !m.audiences.is_empty() {
                extra.insert("apitoken.dev/audiences".to_string(), m.audiences.clone());
            }
            TokenReviewStatus {
                authenticated: Some(true),
                user: Some(UserInfo {
                    username: Some(format!("apitoken:{}:{}", m.namespace, m.name)),
                    uid: Some(format!("apitoken:{}:{}:{}", m.namespace, m.name, g.token_id)),
                    groups: Some(vec![
                        "apitoken:authenticated".into(),
                        format!("apitoken:namespace:{}", m.namespace),
                    ]),
                    extra: Some(extra),
                }),
                // Empty for an unbound token: valid for whatever audience the caller implies.
                audiences: (!g.audiences.is_empty()).then(|| g.audiences.clone()),
                error: None,
            }
        }
        Err(d) if let Some(wait) = blocked.filter(|_| d.status() == 401) => return s.limited(wait),
        Err(d) => TokenReviewStatus {
            authenticated: Some(false),
            error: Some(format!("{}: {}", d.reason(), d.message())),
            ..TokenReviewStatus::default()
        },
    };
    // The spec (with the token) is not echoed back.
    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status});
    (StatusCode::OK, axum::Json(body)).into_response()
}
