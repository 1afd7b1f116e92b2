//! Leak reports (design §7, issue 13): a token found where it should not be is killed at once.
//!
//! [`GITHUB_PATH`] takes GitHub's secret scanning partner alerts (signed, see [`leak_report`]);
//! [`KUBERNETES_PATH`] the same report from anyone Kubernetes authenticates (a bearer token
//! checked with a TokenReview) and authorizes to `create` the virtual resource
//! `leaks.apitoken.dev` (a SubjectAccessReview): an in-house scanner, a CI job,
//! `kubectl apitoken report-leak`.
//! Each reported token that the index holds as usable (current, or previous in its grace
//! period) is first recorded in its ApiToken's `status.leaks` — the record every replica's index
//! and the controller act on, which survives restarts — and then rejected by this replica's
//! index at once; the controller re-issues (or withdraws) and rolls restart targets. The answer
//! is GitHub's feedback array: `true_positive` for a token killed now, `false_positive` for
//! anything else (malformed, wrong checksum, unknown, already dead). Nothing echoes a token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::index::{Digest, Index, parse_digest};
use super::leak_report::{
    self, Feedback, KEY_ID_HEADER, KeysFile, Label, MAX_BODY_BYTES, ReportedToken, SIGNATURE_HEADER,
    SignatureError,
};
use super::limiter::FailureLimiter;
use crate::api::{ApiToken, LeakRecord, MAX_LEAK_RECORDS};
use crate::core::token;
use crate::metrics::{LeakLabels, Metrics};

/// GitHub's secret scanning partner alerts.
pub const GITHUB_PATH: &str = "/v1/leaks/github";
/// Who a GitHub report is recorded as.
pub const GITHUB_REPORTER: &str = "github";
/// Reports from Kubernetes users and ServiceAccounts.
pub const KUBERNETES_PATH: &str = "/v1/leaks";
/// The virtual resource a reporter must be allowed to `create` (RBAC).
pub const LEAKS_GROUP: &str = "apitoken.dev";
pub const LEAKS_RESOURCE: &str = "leaks";
/// The field manager of the leak records.
const MANAGER: &str = "apitoken-operator-leaks";
/// Attempts at recording a leak when the ApiToken changes meanwhile (409).
const RECORD_ATTEMPTS: usize = 5;
/// A request must arrive whole within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct LeakState {
    index: Index,
    client: Client,
    /// GitHub's public keys (`--leak-keys-file`); without them GitHub's reports are not taken.
    github_keys: Option<Arc<KeysFile>>,
    limiter: Arc<FailureLimiter>,
    metrics: Arc<Metrics>,
    /// In-cluster reports being checked at once: each costs the API server a TokenReview and a
    /// SubjectAccessReview made as the operator, so a flood is refused rather than passed on.
    in_flight: Arc<Semaphore>,
    /// When the keys file was last re-read for an unknown key id (at most once a second).
    last_reload: Arc<Mutex<Option<Instant>>>,
}

impl LeakState {
    pub fn new(
        index: Index,
        client: Client,
        github_keys: Option<Arc<KeysFile>>,
        limiter: Arc<FailureLimiter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            index,
            client,
            github_keys,
            limiter,
            metrics,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            last_reload: Arc::default(),
        }
    }

    fn count(&self, reporter: &'static str, result: &'static str) {
        self.metrics.leak_reports.get_or_create(&LeakLabels { reporter, result }).inc();
    }

    /// Re-reads the keys file unless that was done within the last second.
    fn reload_keys(&self, keys: &KeysFile) {
        let mut last = self.last_reload.lock().expect("reload lock");
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            keys.reload();
        }
    }
}

/// In-cluster reports checked at the same time (more: 429).
const MAX_IN_FLIGHT: usize = 8;
/// The longest a report may take to act on (records written); then 503.
const ACT_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a reported location kept in the status (an Event's note holds 1 KiB in all).
const MAX_LOCATION: usize = 512;

/// The leak-report routes.
pub fn router(state: LeakState) -> Router {
    Router::new()
        .route(GITHUB_PATH, post(github))
        .route(KUBERNETES_PATH, post(kubernetes))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // The body must arrive within this; acting on it has its own limit (ACT_TIMEOUT).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .with_state(state)
}

/// `{"error": ..., "message": ...}` for a refused report.
#[derive(Serialize)]
struct Problem<'a> {
    error: &'a str,
    message: &'a str,
}

fn problem(status: StatusCode, error: &str, message: &str) -> Response {
    (status, axum::Json(Problem { error, message })).into_response()
}

/// 429 with Retry-After.
fn too_many(s: &LeakState, reporter: &'static str, wait: Duration, message: &str) -> Response {
    s.count(reporter, "rate_limited");
    let mut resp = problem(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
    resp
}

async fn github(
    State(s): State<LeakState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(keys) = &s.github_keys else {
        return problem(
            StatusCode::NOT_FOUND,
            "not_configured",
            "this operator takes no GitHub leak reports: start it with --leak-keys-file (GitHub's secret scanning public keys)",
        );
    };
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let (key_id, signature) = (value(KEY_ID_HEADER), value(SIGNATURE_HEADER));
    let mut checked = keys.verify(key_id, signature, &body);
    if matches!(checked, Err(SignatureError::UnknownKeyId { .. })) {
        // GitHub may sign with a key added to the file moments ago: look again before refusing.
        s.reload_keys(keys);
        checked = keys.verify(key_id, signature, &body);
    }
    // The signature is checked before the failure limit: a flood of forgeries from the same
    // address (everyone behind one Ingress without --trusted-proxies) never holds up GitHub's
    // signed reports.
    if let Err(e) = checked {
        let client = s.limiter.client(peer.ip(), &headers);
        if let Some(wait) = s.limiter.blocked(&client) {
            return too_many(
                &s,
                GITHUB_REPORTER,
                wait,
                "too many reports with bad signatures from this client",
            );
        }
        s.limiter.failed(&client);
        s.count(GITHUB_REPORTER, "unauthorized");
        warn!(%peer, reason = e.reason(), "leak report refused: {e}");
        return problem(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "the body's signature does not verify with a configured GitHub secret scanning key",
        );
    }
    let report = match leak_report::parse_report(&body) {
        Ok(r) => r,
        Err(e) => {
            s.count(GITHUB_REPORTER, "invalid");
            return problem(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string());
        }
    };
    answer(&s, &report, GITHUB_REPORTER, GITHUB_REPORTER).await
}

/// Metric label of reports from Kubernetes users.
const KUBERNETES_REPORTER: &str = "kubernetes";

async fn kubernetes(
    State(s): State<LeakState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = s.limiter.client(peer.ip(), &headers);
    if let Some(wait) = s.limiter.blocked(&client) {
        return too_many(&s, KUBERNETES_REPORTER, wait, "too many refused reports from this client");
    }
    // Every refusal counts against the client: each check below costs the API server a call.
    let refuse = |result: &'static str, status: StatusCode, error: &str, message: &str| {
        s.limiter.failed(&client);
        s.count(KUBERNETES_REPORTER, result);
        problem(status, error, message)
    };
    let Some(bearer) = bearer(&headers) else {
        return refuse(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send a Kubernetes bearer token (e.g. a ServiceAccount token) in Authorization: Bearer",
        );
    };
    // What costs nothing first: a body that is no report is refused before any API call.
    let report = match leak_report::parse_report(&body) {
        Ok(r) => r,
        Err(e) => return refuse("invalid", StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let Ok(_permit) = s.in_flight.clone().try_acquire_owned() else {
        return too_many(&s, KUBERNETES_REPORTER, Duration::from_secs(1), "too many reports at once; retry");
    };
    let user = match reporter_identity(&s.client, bearer).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            return refuse(
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the bearer token is not valid for this cluster",
            );
        }
        Err(e) => return unavailable(&s, KUBERNETES_REPORTER, &e.to_string()),
    };
    let who = user.username.clone().filter(|u| !u.is_empty()).unwrap_or_else(|| "an unnamed user".into());
    match may_report(&s.client, &user).await {
        Ok(true) => {}
        Ok(false) => {
            let message = format!(
                "{who} may not report leaks: it needs RBAC permission to create {LEAKS_RESOURCE}.{LEAKS_GROUP}"
            );
            return refuse("forbidden", StatusCode::FORBIDDEN, "forbidden", &message);
        }
        Err(e) => return unavailable(&s, KUBERNETES_REPORTER, &e.to_string()),
    }
    answer(&s, &report, KUBERNETES_REPORTER, &who).await
}

/// The credentials after `Bearer ` (any case), if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

/// Who `bearer` belongs to, as the API server's authenticators say (a TokenReview).
async fn reporter_identity(client: &Client, bearer: &str) -> Result<Option<UserInfo>, kube::Error> {
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(bearer.to_string()), ..TokenReviewSpec::default() },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(reviewed.status.filter(|s| s.authenticated == Some(true)).and_then(|s| s.user))
}

/// May `user` create `leaks.apitoken.dev` (a SubjectAccessReview)?
async fn may_report(client: &Client, user: &UserInfo) -> Result<bool, kube::Error> {
    let review = crate::admission::access_review(
        user,
        ResourceAttributes {
            group: Some(LEAKS_GROUP.into()),
            resource: Some(LEAKS_RESOURCE.into()),
            verb: Some("create".into()),
            ..ResourceAttributes::default()
        },
    );
    let reviewed =
        Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}

fn unavailable(s: &LeakState, reporter: &'static str, why: &str) -> Response {
    s.count(reporter, "unavailable");
    warn!(error = why, "a leak report could not be handled");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the report could not be checked or recorded in full (the verification index is loading or the Kubernetes API did not answer); tokens recorded before that are dead already: send the report again",
    )
}

/// Acts on a report that passed its reporter's check and answers with the feedback array.
async fn answer(s: &LeakState, report: &[ReportedToken], reporter: &'static str, who: &str) -> Response {
    if !s.index.is_ready() {
        // Before the first list, "unknown" would be a guess: a real leak answered
        // false_positive would not be sent again.
        return unavailable(s, reporter, "the verification index has not loaded yet");
    }
    match tokio::time::timeout(ACT_TIMEOUT, act(s, report, reporter, who, Timestamp::now())).await {
        Ok(Ok(feedback)) => {
            let mut resp = (StatusCode::OK, leak_report::feedback_body(&feedback)).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Ok(Err(e)) => unavailable(s, reporter, &e.to_string()),
        Err(_) => unavailable(s, reporter, "recording took longer than 30s"),
    }
}

/// An ApiToken's token that the index holds as usable now.
struct Usable {
    digest: Digest,
    hash: String,
    namespace: String,
    name: String,
}

/// The usable token `r` names, if any: well formed (checksum), known, not revoked, not expired
/// and not past its grace period.
fn usable(index: &Index, r: &ReportedToken, now: Timestamp) -> Option<Usable> {
    r.well_formed().ok()?;
    let hash = r.hash();
    let digest = parse_digest(&hash)?;
    let read = index.read();
    let e = read.get(&digest)?;
    let live = !e.meta.revoked && e.valid_until.is_none_or(|until| now < until);
    live.then(|| Usable { digest, hash, namespace: e.meta.namespace().into(), name: e.meta.name().into() })
}

/// Labels each reported token; a usable one is recorded as leaked (by `who`) and rejected here
/// at once. A token reported twice in one report gets the same label both times.
async fn act(
    s: &LeakState,
    report: &[ReportedToken],
    reporter: &'static str,
    who: &str,
    now: Timestamp,
) -> Result<Vec<Feedback>, kube::Error> {
    let mut labelled: HashMap<String, Label> = HashMap::new();
    let mut out = Vec::with_capacity(report.len());
    for r in report {
        let hash = r.hash();
        let label = match labelled.get(&hash) {
            Some(label) => *label,
            None => {
                let recorded = match usable(&s.index, r, now) {
                    Some(u) if record(&s.client, &u, r, who, now).await? => {
                        s.index.reject_leaked(u.digest);
                        info!(
                            namespace = u.namespace,
                            name = u.name,
                            token = %token::display(&r.token),
                            reporter = who,
                            "a token was reported leaked: rejected from now on"
                        );
                        true
                    }
                    _ => false,
                };
                let label = if recorded { Label::TruePositive } else { Label::FalsePositive };
                labelled.insert(hash, label);
                s.count(reporter, label_str(label));
                label
            }
        };
        out.push(r.feedback(label));
    }
    Ok(out)
}

fn label_str(label: Label) -> &'static str {
    match label {
        Label::TruePositive => "true_positive",
        Label::FalsePositive => "false_positive",
    }
}

/// Where the token was found (at most [`MAX_LOCATION`] bytes), unless that text holds the token
/// or any other well-formed token, plain or percent-encoded (a status never does).
fn found_at(r: &ReportedToken) -> Option<String> {
    let url = r.url.as_deref()?;
    if url.contains(r.token.expose()) || holds_a_token(url) || holds_a_token(&percent_decoded(url)) {
        return Some("(withheld: the reported location contains a token)".into());
    }
    if url.len() <= MAX_LOCATION {
        return Some(url.to_string());
    }
    let mut end = MAX_LOCATION;
    while !url.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}…", &url[..end]))
}

/// Does `text` contain a well-formed token (any prefix, checksum right) anywhere?
fn holds_a_token(text: &str) -> bool {
    let bytes = text.as_bytes();
    let body = token::BODY_LEN;
    (0..bytes.len()).filter(|&i| bytes[i] == b'_').any(|underscore| {
        let end = underscore + 1 + body;
        let base62 = bytes.get(underscore + 1..end).is_some_and(|b| b.iter().all(u8::is_ascii_alphanumeric));
        // A prefix is 2 to 16 characters: try each start before the underscore.
        base62
            && (underscore.saturating_sub(16)..underscore.saturating_sub(1))
                .any(|start| text.get(start..end).is_some_and(|t| token::parse(t).is_ok()))
    })
}

/// `%XX` sequences decoded (others left as they are).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends the leak to the ApiToken's `status.leaks` (the last [`MAX_LEAK_RECORDS`]), on the
/// condition that nobody changed the object since it was read; retried on a conflict. `false`
/// when the object no longer holds the token (deleted, re-created, rotated meanwhile): it is
/// dead already.
async fn record(
    client: &Client,
    u: &Usable,
    r: &ReportedToken,
    reporter: &str,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let api: Api<ApiToken> = Api::namespaced(client.clone(), &u.namespace);
    let leak = LeakRecord {
        token_hash: u.hash.clone(),
        display: Some(token::display(&r.token)),
        reported_at: Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
        reporter: reporter.into(),
        url: found_at(r),
    };
    let pp = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    let mut last = None;
    for _ in 0..RECORD_ATTEMPTS {
        let Some(at) = api.get_opt(&u.name).await? else { return Ok(false) };
        let status = at.status.clone().unwrap_or_default();
        let holds =
            [&status.token_hash, &status.previous_token_hash].iter().any(|h| h.as_deref() == Some(&u.hash));
        let mut leaks = status.leaks;
        if leaks.iter().any(|l| l.token_hash == leak.token_hash) {
            // Recorded meanwhile (another report, another replica).
            return Ok(true);
        }
        if !holds {
            return Ok(false);
        }
        leaks.push(leak.clone());
        let excess = leaks.len().saturating_sub(MAX_LEAK_RECORDS);
        leaks.drain(..excess);
        // resourceVersion in a merge patch makes it conditional: 409 if the object moved on.
        let patch = json!({
            "metadata": {"resourceVersion": at.resource_version()},
            "status": {"leaks": leaks},
        });
        match api.patch_status(&u.name, &pp, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => last = Some(kube::Error::Api(e)),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_holding_a_token_is_withheld() {
        use rand::SeedableRng;
        let mint = |seed| token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(seed)).plaintext;
        let (reported, other) = (mint(1), mint(2));
        let at = |url: String| {
            found_at(&ReportedToken {
                token: reported.clone(),
                token_type: None,
                url: Some(url),
                source: None,
            })
        };
        let plain = "https://github.com/acme/app/blob/main/.env";
        assert_eq!(at(plain.into()).as_deref(), Some(plain));
        let glued = format!("key_{}", other.expose());
        let encoded = other.expose().replace('_', "%5F");
        for url in [
            format!("https://example.com/?t={}", reported.expose()),
            format!("https://example.com/x/{}#L3", other.expose()),
            format!("pasted:{}", reported.expose()),
            format!("https://example.com/?{glued}"),
            format!("https://example.com/?t={encoded}"),
        ] {
            let shown = at(url).unwrap();
            assert!(shown.starts_with("(withheld"), "{shown}");
        }
    }

    #[test]
    fn a_long_location_is_cut_at_a_character_boundary() {
        use rand::SeedableRng;
        let token = token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(3)).plaintext;
        let url = format!("https://example.com/{}", "é".repeat(600));
        let kept =
            found_at(&ReportedToken { token, token_type: None, url: Some(url), source: None }).unwrap();
        assert!(kept.len() <= MAX_LOCATION + '…'.len_utf8() && kept.ends_with('…'), "{}", kept.len());
    }
}
