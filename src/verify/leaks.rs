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
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;
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
    pub index: Index,
    pub client: Client,
    /// GitHub's public keys (`--leak-keys-file`); without them GitHub's reports are not taken.
    pub github_keys: Option<Arc<KeysFile>>,
    pub limiter: Arc<FailureLimiter>,
    pub metrics: Arc<Metrics>,
}

impl LeakState {
    fn count(&self, reporter: &'static str, result: &'static str) {
        self.metrics.leak_reports.get_or_create(&LeakLabels { reporter, result }).inc();
    }
}

/// The leak-report routes.
pub fn router(state: LeakState) -> Router {
    Router::new()
        .route(GITHUB_PATH, post(github))
        .route(KUBERNETES_PATH, post(kubernetes))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, BODY_TIMEOUT))
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

async fn github(
    State(s): State<LeakState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = s.limiter.client(peer.ip(), &headers);
    if let Some(refused) = rate_limited(&s, &client, GITHUB_REPORTER) {
        return refused;
    }
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
        keys.reload();
        checked = keys.verify(key_id, signature, &body);
    }
    if let Err(e) = checked {
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

/// 429 with Retry-After for a client over its failure quota (refused reports count as failed
/// verifications do).
fn rate_limited(
    s: &LeakState,
    client: &super::limiter::ClientKey,
    reporter: &'static str,
) -> Option<Response> {
    let wait = s.limiter.blocked(client)?;
    s.count(reporter, "rate_limited");
    let mut resp = problem(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many refused reports from this client; retry later",
    );
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
    Some(resp)
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
    if let Some(refused) = rate_limited(&s, &client, KUBERNETES_REPORTER) {
        return refused;
    }
    let unauthenticated = |s: &LeakState| {
        s.limiter.failed(&client);
        s.count(KUBERNETES_REPORTER, "unauthorized");
        problem(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send a Kubernetes bearer token (e.g. a ServiceAccount token) in Authorization: Bearer",
        )
    };
    let Some(bearer) = bearer(&headers) else { return unauthenticated(&s) };
    let user = match reporter_identity(&s.client, bearer).await {
        Ok(Some(user)) => user,
        Ok(None) => return unauthenticated(&s),
        Err(e) => return unavailable(&s, KUBERNETES_REPORTER, &e),
    };
    match may_report(&s.client, &user).await {
        Ok(true) => {}
        Ok(false) => {
            s.count(KUBERNETES_REPORTER, "forbidden");
            let message = format!(
                "{} may not report leaks: it needs RBAC permission to create {LEAKS_RESOURCE}.{LEAKS_GROUP}",
                user.username.as_deref().unwrap_or("this user")
            );
            return problem(StatusCode::FORBIDDEN, "forbidden", &message);
        }
        Err(e) => return unavailable(&s, KUBERNETES_REPORTER, &e),
    }
    let report = match leak_report::parse_report(&body) {
        Ok(r) => r,
        Err(e) => {
            s.count(KUBERNETES_REPORTER, "invalid");
            return problem(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string());
        }
    };
    let who = user.username.clone().unwrap_or_default();
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
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(LEAKS_GROUP.into()),
                resource: Some(LEAKS_RESOURCE.into()),
                verb: Some("create".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviewed =
        Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}

fn unavailable(s: &LeakState, reporter: &'static str, e: &kube::Error) -> Response {
    s.count(reporter, "unavailable");
    warn!(error = %e, "a leak report could not be handled");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the Kubernetes API could not be reached to check or record the report; send it again",
    )
}

/// Acts on a report that passed its reporter's check and answers with the feedback array.
async fn answer(s: &LeakState, report: &[ReportedToken], reporter: &'static str, who: &str) -> Response {
    match act(s, report, reporter, who, Timestamp::now()).await {
        Ok(feedback) => {
            let mut resp = (StatusCode::OK, leak_report::feedback_body(&feedback)).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => unavailable(s, reporter, &e),
    }
}

/// An ApiToken's token that the index holds as usable now.
struct Usable {
    digest: Digest,
    namespace: String,
    name: String,
}

/// The usable token `r` names, if any: well formed (checksum), known, not revoked, not expired
/// and not past its grace period.
fn usable(index: &Index, r: &ReportedToken, now: Timestamp) -> Option<Usable> {
    r.well_formed().ok()?;
    let digest = parse_digest(&r.hash())?;
    let read = index.read();
    let e = read.get(&digest)?;
    let live = !e.meta.revoked && e.valid_until.is_none_or(|until| now < until);
    live.then(|| Usable { digest, namespace: e.meta.namespace().into(), name: e.meta.name().into() })
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
                let label = match usable(&s.index, r, now) {
                    None => Label::FalsePositive,
                    Some(u) => {
                        record(&s.client, &u, r, who, now).await?;
                        s.index.reject_leaked(u.digest);
                        info!(
                            namespace = u.namespace,
                            name = u.name,
                            token = %token::display(&r.token),
                            reporter = who,
                            "a token was reported leaked: rejected from now on"
                        );
                        Label::TruePositive
                    }
                };
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

/// Where the token was found, unless that text holds the token or any other well-formed token
/// (a status never does).
fn found_at(r: &ReportedToken) -> Option<String> {
    let url = r.url.as_deref()?;
    let holds_a_token = url.contains(r.token.expose())
        || url
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|word| token::parse(word).is_ok());
    Some(if holds_a_token {
        "(withheld: the reported location contains a token)".into()
    } else {
        url.to_string()
    })
}

/// Appends the leak to the ApiToken's `status.leaks` (the last [`MAX_LEAK_RECORDS`]), on the
/// condition that nobody changed the object since it was read; retried on a conflict.
async fn record(
    client: &Client,
    u: &Usable,
    r: &ReportedToken,
    reporter: &str,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let api: Api<ApiToken> = Api::namespaced(client.clone(), &u.namespace);
    let leak = LeakRecord {
        token_hash: r.hash(),
        display: Some(token::display(&r.token)),
        reported_at: Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
        reporter: reporter.into(),
        url: found_at(r),
    };
    let pp = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    let mut last = None;
    for _ in 0..RECORD_ATTEMPTS {
        let at = api.get(&u.name).await?;
        let mut leaks = at.status.as_ref().map(|s| s.leaks.clone()).unwrap_or_default();
        if leaks.iter().any(|l| l.token_hash == leak.token_hash) {
            return Ok(());
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
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => last = Some(kube::Error::Api(e)),
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
        for url in [
            format!("https://example.com/?t={}", reported.expose()),
            format!("https://example.com/x/{}#L3", other.expose()),
            format!("pasted:{}", reported.expose()),
        ] {
            let shown = at(url).unwrap();
            assert!(shown.starts_with("(withheld"), "{shown}");
        }
    }
}
