//! The verification endpoints of design §7: JSON verify, forward-auth, TokenReview.
//!
//! Every request is answered from the in-memory index; nothing here calls the API server.
//! Error bodies say why, never echo the token, and malformed input is a 4xx, never a 500.
//!
//! The hot path: `GET /v1/auth`, `POST /v1/verify` and `POST .../tokenreviews` are answered by
//! [`App::call`] straight from hyper's request, without axum's per-request machinery (routing,
//! boxed services, extensions, a timer per request). Everything else, these paths with another
//! method included, goes to an axum `Router` holding the same routes, so those answers (404,
//! 405, the admission webhooks) are axum's as before. Metric handles are resolved once and
//! answers are typed and serialized once.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use axum::routing::{any, get, post};
use futures::future::{self, BoxFuture, FutureExt};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use tower::ServiceExt;

use super::decision::{Denial, Granted, Request as Asked, decide};
use super::index::TokenMeta;
use super::index::{Index, Reader};
use super::last_used::LastUsed;
use super::limiter::{ClientKey, FailureLimiter};
use crate::core::scope::ScopeRef;
use crate::metrics::{EndpointLabels, Metrics, VerifyLabels};

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a request body may take to arrive once its headers have.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

const AUTH_PATH: &str = "/v1/auth";
const VERIFY_PATH: &str = "/v1/verify";
const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// What the verification service needs.
#[derive(Clone)]
pub struct AppState {
    pub index: Index,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<FailureLimiter>,
    pub last_used: LastUsed,
}

/// A response body: ours (whole, known length) or one of axum's.
pub type Body = http_body_util::Either<Full<Bytes>, axum::body::Body>;
/// One of our answers.
type Answer = Response<Full<Bytes>>;
/// What [`App::call`] returns: ready at once for forward-auth, a task for a body to read.
pub type CallFuture = future::Either<future::Ready<Response<Body>>, BoxFuture<'static, Response<Body>>>;

/// Everything `verify::serve` serves on one listener: the verification endpoints (when on) and
/// other routes (admission webhooks, metrics, health).
#[derive(Clone)]
pub struct App {
    verifier: Option<Arc<Verifier>>,
    rest: Router,
}

impl From<Router> for App {
    fn from(rest: Router) -> Self {
        Self { verifier: None, rest }
    }
}

/// The verification endpoints.
pub fn router(state: AppState) -> App {
    let verifier = Arc::new(Verifier::new(state));
    let rest = Router::new()
        .route(VERIFY_PATH, post(verify))
        .route(AUTH_PATH, any(auth))
        .route(TOKEN_REVIEW_PATH, post(token_review))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, BODY_TIMEOUT))
        .with_state(verifier.clone());
    App { verifier: Some(verifier), rest }
}

impl App {
    /// Serves `routes` (e.g. the admission webhooks) as well.
    #[must_use]
    pub fn merge(mut self, routes: impl Into<App>) -> Self {
        let routes = routes.into();
        self.rest = self.rest.merge(routes.rest);
        self.verifier = self.verifier.or(routes.verifier);
        self
    }

    /// The answer to `req` from `peer`.
    pub fn call<B>(&self, mut req: Request<B>, peer: SocketAddr) -> CallFuture
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        if let Some(v) = &self.verifier {
            match (req.method(), req.uri().path()) {
                (&Method::GET, AUTH_PATH) => {
                    let answer = v.auth(peer.ip(), req.uri().query(), req.headers());
                    return future::Either::Left(future::ready(answer.map(Body::Left)));
                }
                (&Method::POST, path @ (VERIFY_PATH | TOKEN_REVIEW_PATH)) => {
                    let review = path == TOKEN_REVIEW_PATH;
                    let v = v.clone();
                    return future::Either::Right(
                        async move {
                            let (parts, body) = req.into_parts();
                            let answer = match read_body(body).await {
                                Ok(body) if review => v.token_review(&body),
                                Ok(body) => v.verify(peer.ip(), &parts.headers, &body),
                                Err(refused) => refused,
                            };
                            answer.map(Body::Left)
                        }
                        .boxed(),
                    );
                }
                _ => {}
            }
        }
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = self.rest.clone();
        future::Either::Right(
            async move {
                let Ok(answer) = router.oneshot(req).await;
                answer.map(Body::Right)
            }
            .boxed(),
        )
    }
}

/// The request body, at most [`MAX_BODY`] bytes, within [`BODY_TIMEOUT`]. The refusals are the
/// ones axum's body limit and timeout layers give on the other routes.
async fn read_body<B>(body: B) -> Result<Bytes, Answer>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<axum::BoxError>,
{
    let collect = Limited::new(body, MAX_BODY).collect();
    let mut collect = std::pin::pin!(collect);
    // A small body usually arrives with its headers: then no timer is needed.
    let collected = match futures::poll!(collect.as_mut()) {
        Poll::Ready(r) => r,
        Poll::Pending => match tokio::time::timeout(BODY_TIMEOUT, collect).await {
            Ok(r) => r,
            Err(_) => return Err(empty(StatusCode::REQUEST_TIMEOUT)),
        },
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Failed to buffer the request body: length limit exceeded",
        )),
        Err(_) => Err(text(StatusCode::BAD_REQUEST, "Failed to buffer the request body")),
    }
}

/// `/metrics`, `/healthz`, `/readyz` (ready once the index has synced, when there is one, and
/// until `draining` is set: on SIGTERM, so endpoints stop sending traffic before the listener
/// closes).
pub fn operations_router(index: Option<Index>, metrics: Arc<Metrics>, draining: super::Draining) -> Router {
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

// ---------------------------------------------------------------------------------------------
// Answers

const RATE_LIMITED: &str = "too many failed verifications from this client; retry later";

fn with_body(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Answer {
    // Our own types of strings, numbers and lists: serializing them cannot fail.
    with_body(status, "application/json", serde_json::to_vec(body).unwrap_or_default())
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

fn text(status: StatusCode, body: &'static str) -> Answer {
    with_body(status, TEXT_PLAIN, body)
}

fn empty(status: StatusCode) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// `{"valid": false, ...}`. Fields in the order the answers have always had (alphabetical).
#[derive(Serialize)]
struct Refusal<'a> {
    message: &'a str,
    #[serde(rename = "missingScopes", skip_serializing_if = "Option::is_none")]
    missing_scopes: Option<&'a [String]>,
    reason: &'a str,
    valid: bool,
}

impl<'a> Refusal<'a> {
    fn new(reason: &'a str, message: &'a str) -> Self {
        Self { message, missing_scopes: None, reason, valid: false }
    }
}

/// `{"valid": true, ...}` of `/v1/verify`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GrantedBody<'a> {
    audiences: Audiences<'a>,
    expires_at: Option<Timestamp>,
    name: &'a str,
    namespace: &'a str,
    previous: bool,
    scopes: Scopes<'a>,
    token_id: &'a str,
    valid: bool,
}

/// A token's audiences, as a JSON list.
struct Audiences<'a>(&'a TokenMeta);

impl Serialize for Audiences<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.audiences())
    }
}

/// A token's scopes, as a JSON list.
struct Scopes<'a>(&'a TokenMeta);

impl Serialize for Scopes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.scope_texts())
    }
}

/// The refusal body for `d`, with the missing scopes when that is why; `message` is
/// `d.message()` (owned by the caller, so the body can borrow it).
fn denial_body<'a>(d: &'a Denial, message: &'a str) -> Refusal<'a> {
    let mut body = Refusal::new(d.reason(), message);
    if let Denial::MissingScope(missing) = d {
        body.missing_scopes = Some(missing);
    }
    body
}

fn denial_answer(status: StatusCode, d: &Denial) -> Answer {
    json(status, &denial_body(d, &d.message()))
}

fn bad_request(message: &str) -> Answer {
    json(StatusCode::BAD_REQUEST, &Refusal::new("bad_request", message))
}

/// Seconds to wait (at least 1), for `Retry-After`.
fn retry_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
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

/// The `key=value` pairs of a query, decoded as `form_urlencoded::parse` decodes them (`+` is a
/// space, percent-decoding is lossy). A pair with nothing to decode, the usual case, is borrowed
/// as it is, without the decoder's passes over it.
fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query.split('&').filter(|pair| !pair.is_empty()).map(|pair| {
        if pair.bytes().any(|b| b == b'%' || b == b'+') {
            // A non-empty pair is exactly one item to the decoder.
            form_urlencoded::parse(pair.as_bytes()).next().unwrap_or_default()
        } else {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (Cow::Borrowed(key), Cow::Borrowed(value))
        }
    })
}

/// Required scopes: a request names a few, so they stay on the stack.
type RequiredScopes<'a> = SmallVec<[ScopeRef<'a>; 4]>;

fn parse_scopes<'a>(raw: impl Iterator<Item = &'a str>) -> Result<RequiredScopes<'a>, String> {
    let mut out = RequiredScopes::new();
    for (i, s) in raw.flat_map(|s| s.split([' ', ',']).filter(|s| !s.is_empty())).enumerate() {
        // The value is not echoed: a client might have put a secret in the wrong place.
        out.push(
            ScopeRef::parse(s)
                .map_err(|_| format!("required scope #{} is not resource[/name]:verb", i + 1))?,
        );
    }
    Ok(out)
}

fn status(d: &Denial) -> StatusCode {
    if d.status() == 403 { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED }
}

// ---------------------------------------------------------------------------------------------
// The decision, counted

#[derive(Clone, Copy)]
enum Endpoint {
    Verify,
    Auth,
    TokenReview,
}

impl Endpoint {
    const ALL: [Endpoint; 3] = [Endpoint::Verify, Endpoint::Auth, Endpoint::TokenReview];

    fn label(self) -> &'static str {
        match self {
            Endpoint::Verify => "verify",
            Endpoint::Auth => "auth",
            Endpoint::TokenReview => "tokenreview",
        }
    }
}

/// Every result label a decision can have (`valid` or a [`Denial::reason`]).
const RESULTS: [&str; 8] = [
    "valid",
    "unknown",
    "expired",
    "revoked",
    "missing_scope",
    "audience_mismatch",
    "malformed",
    "checksum_mismatch",
];

/// One endpoint's metric handles: shared with the registry's families, resolved once (a counter
/// on first use, so /metrics lists only results that happened, as before).
struct EndpointMetrics {
    latency: Histogram,
    results: [OnceLock<Counter>; RESULTS.len()],
}

/// Answers verification requests.
pub struct Verifier {
    state: AppState,
    endpoints: [EndpointMetrics; 3],
    /// A forward-auth grant's headers with empty values (see [`Verifier::granted_headers`]).
    granted: HeaderMap,
}

/// The headers of a forward-auth grant after its content type, in the order they are written.
static GRANTED_HEADERS: [&HeaderName; 4] = [&X_TOKEN_ID, &X_TOKEN_NAME, &X_TOKEN_NAMESPACE, &X_TOKEN_SCOPES];

impl Verifier {
    fn new(state: AppState) -> Self {
        let endpoints = Endpoint::ALL.map(|e| EndpointMetrics {
            latency: Histogram::clone(
                &state.metrics.verify_latency.get_or_create(&EndpointLabels { endpoint: e.label() }),
            ),
            results: Default::default(),
        });
        let mut granted = HeaderMap::with_capacity(1 + GRANTED_HEADERS.len());
        granted.insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
        for name in GRANTED_HEADERS {
            granted.insert(name.clone(), HeaderValue::from_static(""));
        }
        Self { state, endpoints, granted }
    }

    /// A forward-auth grant's headers: the content type and `values` under [`GRANTED_HEADERS`].
    /// A copy of `self.granted` with its values filled in: half the work of inserting them one
    /// by one, each insert hashing its name. A value that cannot be a header value is left out.
    fn granted_headers(&self, values: [&str; GRANTED_HEADERS.len()]) -> HeaderMap {
        let values = values.map(HeaderValue::from_str);
        if values.iter().all(Result::is_ok) {
            let mut h = self.granted.clone();
            for (slot, value) in h.values_mut().skip(1).zip(values.into_iter().flatten()) {
                *slot = value;
            }
            return h;
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
        for (name, value) in GRANTED_HEADERS.into_iter().zip(values) {
            if let Ok(value) = value {
                h.insert(name.clone(), value);
            }
        }
        h
    }

    fn count(&self, endpoint: Endpoint, result: &'static str, elapsed: Duration) {
        let m = &self.endpoints[endpoint as usize];
        m.latency.observe(elapsed.as_secs_f64());
        let family = || {
            self.state
                .metrics
                .verifications
                .get_or_create(&VerifyLabels { endpoint: endpoint.label(), result })
        };
        match RESULTS.iter().position(|r| *r == result) {
            Some(i) => m.results[i].get_or_init(|| Counter::clone(&family())).inc(),
            None => family().inc(),
        };
    }

    /// 429 for a client that is over its failure quota (forward-auth answers 401 instead).
    fn limited(&self, wait: Duration) -> Answer {
        self.state.metrics.rate_limited.inc();
        let mut resp = json(StatusCode::TOO_MANY_REQUESTS, &Refusal::new("rate_limited", RATE_LIMITED));
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(wait)));
        resp
    }

    /// The decision for `req`, looked up in `index`. A failure counts against `client`, unless
    /// it is already blocked (`blocked`), which does not extend its wait.
    fn decide<'a>(
        &self,
        endpoint: Endpoint,
        client: &ClientKey,
        blocked: bool,
        req: &Asked<'a>,
        index: &'a Reader<'_>,
    ) -> Result<Granted<'a>, Denial> {
        // quanta reads the TSC: under half the cost of the system clock, read twice per request.
        let start = quanta::Instant::now();
        let now = Timestamp::now();
        let result = decide(req, |d| index.get(d), now);
        let label = match &result {
            Ok(_) => "valid",
            Err(d) => d.reason(),
        };
        self.count(endpoint, label, start.elapsed());
        match &result {
            Ok(g) => self.state.last_used.record(&g.entry.meta, now),
            Err(d) if d.status() == 401 && !blocked => self.state.limiter.failed(client),
            Err(_) => {}
        }
        result
    }

    /// `POST /v1/verify`. While the client is blocked, everything but a usable token is refused
    /// as rate limited: valid traffic is never limited.
    fn verify(&self, peer: IpAddr, headers: &HeaderMap, body: &[u8]) -> Answer {
        let client = self.state.limiter.client(peer, headers);
        let blocked = self.state.limiter.blocked(&client);
        let refuse = |r: Answer| blocked.map_or(r, |wait| self.limited(wait));
        let req: VerifyBody<'_> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return refuse(bad_request(&json_error(&e))),
        };
        let scopes = match parse_scopes(req.scopes.iter().map(|s| s.0.as_ref())) {
            Ok(s) => s,
            Err(m) => return refuse(bad_request(&m)),
        };
        let audience = req.audience.as_ref().map(|a| a.0.as_ref());
        let asked = Asked { token: &req.token.0, scopes: &scopes, audiences: audience.as_slice() };
        let index = self.state.index.read();
        match self.decide(Endpoint::Verify, &client, blocked.is_some(), &asked, &index) {
            Ok(g) => {
                let m = &g.entry.meta;
                let body = GrantedBody {
                    audiences: Audiences(m),
                    expires_at: g.entry.valid_until,
                    name: m.name(),
                    namespace: m.namespace(),
                    previous: g.entry.previous,
                    scopes: Scopes(m),
                    token_id: g.token_id,
                    valid: true,
                };
                json(StatusCode::OK, &body)
            }
            Err(d) if d.status() == 401 => refuse(denial_answer(status(&d), &d)),
            Err(d) => denial_answer(status(&d), &d),
        }
    }

    /// `GET /v1/auth` (forward-auth).
    fn auth(&self, peer: IpAddr, query: Option<&str>, headers: &HeaderMap) -> Answer {
        let client = self.state.limiter.client(peer, headers);
        let blocked = self.state.limiter.blocked(&client);
        // 429 would be the code, but nginx makes a 500 of it. 401 invalid_token (the credentials
        // are refused for now) with Retry-After, rather than 403, which here means "a valid
        // token lacking a scope or audience" and would send people looking for a permission
        // problem.
        let refuse = |r: Answer| {
            let Some(wait) = blocked else { return r };
            self.state.metrics.rate_limited.inc();
            let mut resp = auth_refusal(
                false,
                challenge(Some("invalid_token"), Some(RATE_LIMITED), None),
                &Refusal::new("rate_limited", RATE_LIMITED),
            );
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(wait)));
            resp
        };
        // One pass over the query. Percent-decoding is lossy (bad UTF-8 becomes U+FFFD), so a
        // query never fails to parse; what it decodes to is checked as a scope or matched as an
        // audience.
        let mut raw_scopes: SmallVec<[Cow<'_, str>; 4]> = SmallVec::new();
        let mut audience = None;
        for (key, value) in query_pairs(query.unwrap_or("")) {
            match key.as_ref() {
                "scope" => raw_scopes.push(value),
                "audience" if audience.is_none() => audience = Some(value),
                _ => {}
            }
        }
        // One pass over the headers for the two of ours: cheaper than looking each up, which
        // hashes its name byte by byte.
        let mut required_headers: SmallVec<[&HeaderValue; 2]> = SmallVec::new();
        let mut audience_header = None;
        for (name, value) in headers {
            if *name == X_REQUIRED_SCOPES {
                required_headers.push(value);
            } else if *name == X_TOKEN_AUDIENCE && audience_header.is_none() {
                audience_header = Some(value);
            }
        }
        // Unreadable requirement headers refuse rather than being skipped: skipping would grant more.
        for v in required_headers {
            match v.to_str() {
                Ok(v) => raw_scopes.push(Cow::Borrowed(v)),
                Err(_) => {
                    return refuse(invalid_request("the X-Required-Scopes header has bytes outside ASCII"));
                }
            }
        }
        let scopes = match parse_scopes(raw_scopes.iter().map(AsRef::as_ref)) {
            Ok(s) => s,
            Err(m) => return refuse(invalid_request(&m)),
        };
        let header_audience = match audience_header.map(HeaderValue::to_str) {
            None => None,
            Some(Ok(v)) => Some(Cow::Borrowed(v)),
            Some(Err(_)) => {
                return refuse(invalid_request("the X-Token-Audience header has bytes outside ASCII"));
            }
        };
        let audience = audience.or(header_audience);
        let token = match bearer_token(headers) {
            Ok(t) => t,
            Err(no) => return refuse(no.refusal()),
        };
        let audience = audience.as_deref();
        let asked = Asked { token, scopes: &scopes, audiences: audience.as_slice() };
        let index = self.state.index.read();
        match self.decide(Endpoint::Auth, &client, blocked.is_some(), &asked, &index) {
            Ok(g) => {
                let m = &g.entry.meta;
                let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                *resp.headers_mut() =
                    self.granted_headers([g.token_id, m.name(), m.namespace(), m.scopes_joined()]);
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
                let refusal = auth_refusal(d.status() == 403, h, &denial_body(&d, &d.message()));
                if d.status() == 403 { refusal } else { refuse(refusal) }
            }
        }
    }

    /// `POST .../tokenreviews`. The caller is usually the API server, on behalf of every user of
    /// the cluster: failures count against the presented token's id, so one client's bad tokens
    /// lock out nobody else.
    fn token_review(&self, body: &[u8]) -> Answer {
        let review: TokenReview = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return bad_request(&json_error(&e)),
        };
        let token = review.spec.token.as_deref().unwrap_or("");
        let client = ClientKey::for_token(token);
        let blocked = self.state.limiter.blocked(&client);
        let wanted = review.spec.audiences.clone().unwrap_or_default();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let asked = Asked { token, scopes: &[], audiences: &wanted };
        let index = self.state.index.read();
        let status = match self.decide(Endpoint::TokenReview, &client, blocked.is_some(), &asked, &index) {
            Ok(g) => {
                let m = &g.entry.meta;
                let mut extra = std::collections::BTreeMap::new();
                extra.insert("apitoken.dev/scopes".to_string(), m.scope_texts().map(String::from).collect());
                extra.insert("apitoken.dev/token-id".to_string(), vec![g.token_id.to_string()]);
                if m.audiences().len() > 0 {
                    extra.insert(
                        "apitoken.dev/audiences".to_string(),
                        m.audiences().map(String::from).collect(),
                    );
                }
                TokenReviewStatus {
                    authenticated: Some(true),
                    user: Some(UserInfo {
                        username: Some(format!("apitoken:{}:{}", m.namespace(), m.name())),
                        uid: Some(format!("apitoken:{}:{}:{}", m.namespace(), m.name(), g.token_id)),
                        groups: Some(vec![
                            "apitoken:authenticated".into(),
                            format!("apitoken:namespace:{}", m.namespace()),
                        ]),
                        extra: Some(extra),
                    }),
                    // Empty for an unbound token: valid for whatever audience the caller implies.
                    audiences: (!g.audiences.is_empty())
                        .then(|| g.audiences.iter().map(ToString::to_string).collect()),
                    error: None,
                }
            }
            Err(d) if let Some(wait) = blocked.filter(|_| d.status() == 401) => return self.limited(wait),
            Err(d) => TokenReviewStatus {
                authenticated: Some(false),
                error: Some(format!("{}: {}", d.reason(), d.message())),
                ..TokenReviewStatus::default()
            },
        };
        // The spec (with the token) is not echoed back. Through a JSON value, whose keys are
        // sorted: the answer's field order has always been alphabetical.
        let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status});
        json(StatusCode::OK, &body)
    }
}

// Header names parsed once, not on every lookup or insert.
static X_TOKEN_ID: HeaderName = HeaderName::from_static("x-token-id");
static X_TOKEN_NAME: HeaderName = HeaderName::from_static("x-token-name");
static X_TOKEN_NAMESPACE: HeaderName = HeaderName::from_static("x-token-namespace");
static X_TOKEN_SCOPES: HeaderName = HeaderName::from_static("x-token-scopes");
static X_REQUIRED_SCOPES: HeaderName = HeaderName::from_static("x-required-scopes");
static X_TOKEN_AUDIENCE: HeaderName = HeaderName::from_static("x-token-audience");

/// A JSON string of the request, borrowed from the body unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(V).map(Text)
    }
}

#[derive(Deserialize)]
struct VerifyBody<'a> {
    #[serde(borrow)]
    token: Text<'a>,
    #[serde(default, borrow)]
    scopes: Vec<Text<'a>>,
    #[serde(default, borrow)]
    audience: Option<Text<'a>>,
}

// ---------------------------------------------------------------------------------------------
// Forward-auth details

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
    HeaderValue::try_from(v).unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"apitoken\""))
}

/// A forward-auth refusal. nginx `auth_request` passes on 401 and 403 only and turns any other
/// status into a 500 for the end user, so `/v1/auth` answers nothing else: a malformed request,
/// 400 in RFC 6750, is a 401 with `error="invalid_request"` here.
fn auth_refusal(forbidden: bool, challenge: HeaderValue, body: &Refusal<'_>) -> Answer {
    let status = if forbidden { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
    let mut resp = json(status, body);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    resp
}

/// 401 `invalid_request`: `message` (our own words, ASCII) says what is wrong with the request.
fn invalid_request(message: &str) -> Answer {
    auth_refusal(
        false,
        challenge(Some("invalid_request"), Some(message), None),
        &Refusal::new("invalid_request", message),
    )
}

/// Why the Authorization header yields no Bearer token.
enum NoBearer {
    Missing,
    OtherScheme,
    Invalid(&'static str),
}

impl NoBearer {
    fn refusal(&self) -> Answer {
        // RFC 6750 3.1: a request without credentials (or with another scheme) gets the challenge
        // alone, no error code; the body says what to send.
        let plain = |reason: &str, message: &str| {
            auth_refusal(false, challenge(None, None, None), &Refusal::new(reason, message))
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

// ---------------------------------------------------------------------------------------------
// The same endpoints through axum, for what the hot path leaves to the router (other methods on
// these paths answer as they always have).

async fn verify(
    State(v): State<Arc<Verifier>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    v.verify(peer.ip(), &headers, &body)
}

async fn auth(
    State(v): State<Arc<Verifier>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Answer {
    v.auth(peer.ip(), query.as_deref(), &headers)
}

async fn token_review(State(v): State<Arc<Verifier>>, body: Bytes) -> Answer {
    v.token_review(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fast path decodes every query exactly as the decoder it stands in for.
        #[test]
        fn query_pairs_decode_as_form_urlencoded(query in "([a-z=&+%]|%[0-9a-fA-F]{2}|%[^&]|é|\\PC){0,40}") {
            let ours: Vec<_> = query_pairs(&query).collect();
            let theirs: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn query_pairs_borrow_what_needs_no_decoding() {
        let pairs: Vec<_> = query_pairs("scope=metrics:read&&audience&x=a+b%2Fc").collect();
        assert_eq!(
            pairs,
            [
                (Cow::Borrowed("scope"), Cow::Borrowed("metrics:read")),
                (Cow::Borrowed("audience"), Cow::Borrowed("")),
                (Cow::Borrowed("x"), Cow::Owned("a b/c".to_string())),
            ]
        );
        assert!(matches!(pairs[0].1, Cow::Borrowed(_)));
    }
}
