//! The ApiToken controller: observe → validate → plan → apply → status.
//!
//! Only this module talks to the API server. Decisions are made by [`crate::core::plan`]; this
//! shell reads the Secret, carries out the one action, and loops on the object the status write
//! returned (so a stale cache never decides anything: status writes carry a resourceVersion
//! precondition and a conflict simply retries).
//!
//! Watch events for versions a reconcile has already read or written (the echo of its own writes,
//! a re-list's unchanged objects) start no reconcile: [`seen`]. What does start one (a new
//! version, a change to an owned Secret, a policy change, a token's wake-up time) names the token
//! in a work queue ([`queue`]); a reconcile takes the watched object from [`arrivals`] or reads it.

mod arrivals;
mod cleanup;
mod error;
mod events;
mod queue;
mod restart;
pub mod secret;
mod seen;
pub mod status;
mod wakeups;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use rand::TryRngCore;
use tracing::{debug, info, instrument, warn};

pub use error::Error;

use crate::api::{ApiToken, ApiTokenStatus, ROTATE_ANNOTATION};
use crate::core::desired::{Limits, SpecInput, Violation, validate};
use crate::core::plan::{self, Action, Current, Desired, Minted};
use crate::core::policy::{self, Ask};
use crate::core::token::{self, Plaintext};
use crate::metrics::{Metrics, TokenKey};
use crate::policy_view::{CREATED_BY_ANNOTATION, PolicyView};
use crate::token_feed::TokenFeed;

/// Field manager for everything the operator writes.
pub const MANAGER: &str = "apitoken-operator";
/// How many plan steps one reconcile may carry out before handing back to the queue.
const MAX_STEPS: usize = 8;
/// Reconciles in flight at once. Unbounded, a re-list of 10,000 tokens started all of them at
/// once: thousands of API connections and a re-list peak of 6x the steady memory (2x at 64).
const MAX_CONCURRENT_RECONCILES: u16 = 64;

pub struct Context {
    pub client: Client,
    pub events: events::Publisher,
    pub policies: PolicyView,
    pub metrics: Arc<Metrics>,
    /// Reconciles asked for at a time.
    wakeups: Arc<wakeups::Wakeups>,
    /// ApiToken and Secret versions already acted on: their watch events start no reconcile.
    seen_tokens: Arc<seen::Versions>,
    seen_secrets: Arc<seen::Versions>,
    /// Whole ApiTokens from the watch, until their reconcile takes them.
    arrivals: Arc<arrivals::Arrivals>,
}

impl Context {
    fn new(
        client: Client,
        policies: PolicyView,
        metrics: Arc<Metrics>,
        wakeups: Arc<wakeups::Wakeups>,
    ) -> Self {
        let instance = std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok());
        let events = events::Publisher::new(client.clone(), MANAGER.into(), instance);
        let (seen_tokens, seen_secrets, arrivals) = (Arc::default(), Arc::default(), Arc::default());
        Self { client, events, policies, metrics, wakeups, seen_tokens, seen_secrets, arrivals }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    feed: TokenFeed,
    policies: PolicyView,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let secrets: Api<PartialObjectMeta<Secret>> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Secrets are watched by metadata only: the operator never holds other tokens in a cache.
    let owned =
        watcher::Config::default().labels(&format!("{}={}", secret::MANAGED_BY_LABEL, secret::MANAGED_BY));
    let wakeups = Arc::new(wakeups::Wakeups::default());
    let ctx = Arc::new(Context::new(client.clone(), policies.clone(), metrics.clone(), wakeups.clone()));
    info!(namespace = namespace.as_deref().unwrap_or("<all>"), "controller started");
    let cleanup = cleanup::remove_secrets_of_deleted_tokens(
        client,
        namespace.clone(),
        feed.clone(),
        metrics,
        wakeups.clone(),
    );
    // Whole objects wait only until their reconcile (arrivals). The echo of our own writes and a
    // re-list's unchanged objects start no reconcile (seen).
    let queue = Arc::new(queue::Queue::default());
    let (arrivals, seen) = (ctx.arrivals.clone(), ctx.seen_tokens.clone());
    let mut news = std::pin::pin!(feed.subscribe(move |e| arrivals::news(e, &arrivals, &seen)));
    let (listed_tx, mut listed) = tokio::sync::watch::channel(false);
    let tokens = async {
        while let Some(n) = news.next().await {
            match n {
                // Unless a reconcile running already took it.
                arrivals::News::Unseen(key) if ctx.arrivals.is_waiting(&key) => queue.push(key),
                arrivals::News::Unseen(_) => {}
                arrivals::News::Listed => {
                    let _ = listed_tx.send(true);
                }
            }
        }
    };
    let mut owned_secrets = std::pin::pin!(
        seen::unseen(
            watcher(secrets, owned).backoff(crate::backoff::Bounded::watches()),
            ctx.seen_secrets.clone()
        )
        .touched_objects()
    );
    let secrets = async {
        while let Some(event) = owned_secrets.next().await {
            match event {
                Ok(s) => owner_keys(&s).for_each(|key| queue.push(key)),
                // As for the policies' watch: a lasting failure (RBAC, say) must be visible.
                Err(e) => warn!(error = %e, "watching the operator's Secrets failed; retrying"),
            }
        }
    };
    // A policy or namespace label change re-evaluates every token.
    let policy_changes = policies.changes().for_each(|()| {
        policies.token_keys().into_iter().for_each(|key| queue.push(key));
        async {}
    });
    let due = wakeups.clone().due().for_each(|key| {
        queue.push(key);
        async {}
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let work = async {
        // As kube's controller waits for its cache: quotas are counted from a whole census.
        tokio::select! {
            () = &mut shutdown => return,
            _ = listed.wait_for(|l| *l) => {}
        }
        let reconcile = |key| reconcile_and_retry(key, ctx.clone());
        queue.work(usize::from(MAX_CONCURRENT_RECONCILES), shutdown.as_mut(), reconcile).await;
    };
    tokio::select! {
        () = work => {},
        () = async { tokio::join!(tokens, secrets, policy_changes, due, cleanup); } => {},
    }
    info!("controller stopped");
}

/// The ApiTokens a Secret's ownerReferences name.
fn owner_keys(secret: &PartialObjectMeta<Secret>) -> impl Iterator<Item = TokenKey> + '_ {
    let ns = secret.namespace().unwrap_or_default();
    secret
        .owner_references()
        .iter()
        .filter(|o| o.kind == ApiToken::kind(&()) && o.api_version == ApiToken::api_version(&()))
        .map(move |o| (ns.clone(), o.name.clone()))
}

/// Reconciles `key`; asks for it again when the reconcile wants to, or after a failure.
async fn reconcile_and_retry(key: TokenKey, ctx: Arc<Context>) {
    let again = match reconcile(&key, &ctx).await {
        Ok(again) => again,
        Err(Error::Conflict) => Some(Duration::from_millis(100)),
        Err(err) => {
            warn!(name = key.1, namespace = key.0, category = err.category(), error = %err, "reconcile failed; retrying");
            Some(Duration::from_secs(5))
        }
    };
    if let Some(after) = again {
        ctx.wakeups.set(key, Timestamp::now() + after);
    }
}

/// Reconciles one token; `Some(after)`: again that much later.
#[instrument(skip_all, fields(namespace = key.0, name = key.1))]
async fn reconcile(key: &TokenKey, ctx: &Context) -> Result<Option<Duration>, Error> {
    let started = std::time::Instant::now();
    let (ns, name) = key;
    // This reconcile consumes the token's pending wake-up, as kube's scheduler would.
    ctx.wakeups.cancel(key);
    let result = match ctx.arrivals.take(key) {
        Some(obj) => Box::pin(reconcile_steps(&obj, ctx)).await,
        None => Box::pin(reconcile_fresh(ns, name, ctx)).await,
    };
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.category(),
    };
    ctx.metrics.reconciles.get_or_create(&crate::metrics::ReconcileLabels { result: label }).inc();
    match &result {
        Ok(_) => debug!(name, namespace = ns, "reconciled"),
        Err(e) => debug!(name, namespace = ns, error = %e, "reconcile failed"),
    }
    result
}

/// Reads the ApiToken and reconciles it; gone: nothing to do (its Secret is cleanup's).
async fn reconcile_fresh(ns: &str, name: &str, ctx: &Context) -> Result<Option<Duration>, Error> {
    let tokens: Api<ApiToken> = Api::namespaced(ctx.client.clone(), ns);
    match tokens.get_opt(name).await? {
        Some(obj) => Box::pin(reconcile_steps(&obj, ctx)).await,
        None => Ok(None),
    }
}

async fn reconcile_steps(obj: &ApiToken, ctx: &Context) -> Result<Option<Duration>, Error> {
    let mut obj = obj.clone();
    let mut known = None;
    for _ in 0..MAX_STEPS {
        // The version this step acts on: a watch event for it later would be no news.
        ctx.seen_tokens.record_object(&obj);
        match Box::pin(step(&obj, known.take(), ctx)).await? {
            Step::Continue(updated, secret) => (obj, known) = (*updated, secret),
            Step::Done(wake) => {
                // Sleep until `wake`, or until something changes.
                if let Some(at) = wake {
                    ctx.wakeups.set((obj.namespace().unwrap_or_default(), obj.name_any()), at);
                }
                return Ok(None);
            }
        }
    }
    Ok(Some(Duration::from_millis(200)))
}

enum Step {
    /// Another step on the object as written, with the Secret as this step left it (when known:
    /// written or read and left alone), so the next step need not read it again.
    Continue(Box<ApiToken>, Option<Box<Secret>>),
    Done(Option<Timestamp>),
}

fn spec_input(obj: &ApiToken) -> SpecInput<'_> {
    let s = &obj.spec;
    SpecInput {
        lifetime: s.lifetime.as_deref(),
        renew_before: s.rotation.renew_before.as_deref(),
        grace_period: s.rotation.grace_period.as_deref(),
        rotation_enabled: s.rotation.enabled,
        trigger: s.rotation.trigger.as_deref(),
        rotate_annotation: obj.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        revoked: s.revoked,
        scopes: &s.scopes,
        prefix: s.prefix.as_deref(),
    }
}

async fn step(obj: &ApiToken, known: Option<Box<Secret>>, ctx: &Context) -> Result<Step, Error> {
    let ns = obj.namespace().ok_or(Error::MissingNamespace)?;
    let tokens: Api<ApiToken> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let status = obj.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let current = status::to_current(&status);

    // Validate: the spec's own rules and every ApiTokenPolicy selecting the namespace.
    let creator = obj.annotations().get(CREATED_BY_ANNOTATION).cloned();
    let new_issuance = current.token_hash.is_none()
        || matches!(current.phase, plan::Phase::Revoked | plan::Phase::Denied | plan::Phase::Expired);
    let evaluation = ctx
        .policies
        .for_token(&ns, creator.as_deref(), Some(&obj.name_any()), Some(obj.labels()))
        .map_err(|e| vec![Violation { field: "ApiTokenPolicy", message: e }])
        .and_then(|(policies, counts)| {
            let ask = Ask {
                spec: spec_input(obj),
                permission_sets: &obj.spec.permission_sets,
                audiences: &obj.spec.audiences,
                creator: creator.as_deref(),
                counts_against_quota: new_issuance,
            };
            policy::evaluate(&ask, &policies, &counts)
        });
    let (desired, noncompliance) = match evaluation {
        Ok(d) => (d, None),
        Err(violations) => match validate(&spec_input(obj), &Limits::permissive()) {
            Err(syntax) => {
                let message = format!("the spec cannot be issued: {}", policy::describe(&syntax));
                let mut failed = current.clone();
                failed.phase = plan::Phase::Failed;
                fail(obj, ctx, &tokens, &status, None, &failed, "InvalidSpec", message).await?;
                return Ok(Step::Done(None));
            }
            // An issued token is not silently revoked when a policy tightens; a revoked one has
            // nothing to issue, so it stays Revoked (the violations are still reported).
            Ok(d) if obj.spec.revoked || (!new_issuance && current.phase == plan::Phase::Active) => {
                (d, Some(policy::describe(&violations)))
            }
            Ok(_) => {
                deny(obj, ctx, &tokens, &secrets, &status, &policy::describe(&violations)).await?;
                return Ok(Step::Done(None));
            }
        },
    };

    // Observe the Secret: the one holding the token now, and the one the spec names.
    let wanted_name = secret::desired_name(obj);
    let current_name = status.secret_name.clone().unwrap_or_else(|| wanted_name.clone());
    let (existing, wanted) = observe_secrets(ctx, &secrets, known, &current_name, &wanted_name).await?;
    if let Some(foreign) =
        [existing.as_ref(), wanted.as_ref()].into_iter().flatten().find(|s| !secret::owned_by(s, obj))
    {
        let message = format!(
            "Secret {} exists and is not controlled by this ApiToken; the operator will not overwrite it. \
             Delete it or set spec.secret.name to another name",
            foreign.name_any()
        );
        // The phase says what Ready says; the token already issued (if any) keeps working.
        let failed = plan::Current { phase: plan::Phase::Failed, ..current };
        fail(obj, ctx, &tokens, &status, Some(&desired), &failed, "SecretConflict", message).await?;
        return Ok(Step::Done(None));
    }
    let stored = existing.as_ref().and_then(secret::stored_token);
    let in_sync = current_name == wanted_name
        && status.observed_generation == obj.metadata.generation
        && secret_in_sync(obj, &desired, &current, existing.as_ref(), stored.as_ref(), now);
    let state = secret::state_of(
        stored.as_ref(),
        current.token_hash.as_deref(),
        current.previous_token_hash.as_deref(),
        in_sync,
    );

    // Plan.
    let action = plan::plan(&desired, &current, state, now);
    debug!(?action, ?state, "planned");
    // A leak is acted on whatever held the last Secret write back.
    if writes_secret(&action)
        && action != Action::Rotate(plan::RotateReason::Leaked)
        && let Some(hold) = secret_write_hold(obj, &status, now)
    {
        // The last Secret write was refused: no new token until the ApiToken changes (or, for
        // a refusal that may pass, until the retry time).
        return Ok(Step::Done(match hold {
            Hold::UntilChanged => None,
            Hold::Until(t) => Some(t),
        }));
    }

    let obs = Observed {
        tokens,
        secrets,
        ns,
        status,
        current,
        desired,
        state,
        stored,
        now,
        wanted_name,
        current_name,
        existing,
        noncompliance,
    };
    Box::pin(apply(obj, ctx, obs, action)).await
}

/// The Secrets named `current` and (when it differs) `wanted`. `known` is the Secret as the
/// previous step left it, if it knows.
async fn observe_secrets(
    ctx: &Context,
    secrets: &Api<Secret>,
    known: Option<Box<Secret>>,
    current: &str,
    wanted: &str,
) -> Result<(Option<Secret>, Option<Secret>), Error> {
    let existing = match known.filter(|s| s.metadata.name.as_deref() == Some(current)) {
        Some(s) => Some(*s),
        None => secrets.get_opt(current).await?,
    };
    let other = if wanted == current { None } else { secrets.get_opt(wanted).await? };
    for s in [&existing, &other].into_iter().flatten() {
        ctx.seen_secrets.record_object(s);
    }
    Ok((existing, other))
}

fn writes_secret(action: &Action) -> bool {
    matches!(action, Action::Issue | Action::Rotate(_) | Action::Recover | Action::UpdateMetadata)
}

/// Holding off writing the Secret after the API server refused the last write.
enum Hold {
    /// The refusal was about the ApiToken's content: until it changes.
    UntilChanged,
    /// Until the retry time.
    Until(Timestamp),
}

/// Whether (and how long) to hold off writing the Secret; `None` when nothing holds it back.
fn secret_write_hold(obj: &ApiToken, status: &ApiTokenStatus, now: Timestamp) -> Option<Hold> {
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
    if status.phase != Some(crate::api::Phase::Failed) || ready.observed_generation != obj.metadata.generation
    {
        return None;
    }
    match ready.reason.as_str() {
        status::SECRET_INVALID => Some(Hold::UntilChanged),
        status::SECRET_WRITE_FAILED => {
            let retry = ready.last_transition_time.0.checked_add(SECRET_WRITE_RETRY).ok()?;
            (retry > now).then_some(Hold::Until(retry))
        }
        _ => None,
    }
}

/// Retry interval after a Secret write failed for a reason the ApiToken cannot fix (quota, RBAC,
/// an unavailable API server).
const SECRET_WRITE_RETRY: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

/// Does the existing Secret show what the spec asks for (besides the token)?
fn secret_in_sync(
    obj: &ApiToken,
    desired: &Desired,
    current: &Current,
    existing: Option<&Secret>,
    stored: Option<&Plaintext>,
    now: Timestamp,
) -> bool {
    let (Some(actual), Some(token), Some(id)) = (existing, stored, current.token_id.as_deref()) else {
        return false;
    };
    let (expires_at, _) = plan::timeline(desired, current.issued_at.unwrap_or(now));
    let content = secret::SecretContent { token, token_id: id, expires_at, scopes: &desired.scopes };
    let want = secret::render(obj, &secret::desired_name(obj), &content);
    secret::in_sync(actual, &want)
}

/// What one step observed, handed from `step` to `apply`.
struct Observed {
    tokens: Api<ApiToken>,
    secrets: Api<Secret>,
    ns: String,
    status: ApiTokenStatus,
    current: Current,
    desired: Desired,
    state: plan::SecretState,
    stored: Option<Plaintext>,
    now: Timestamp,
    wanted_name: String,
    current_name: String,
    /// The Secret named `current_name`, as read.
    existing: Option<Secret>,
    /// Policy violations of an issued token (it keeps working until its next rotation).
    noncompliance: Option<String>,
}

/// Carries out `action`: status first, then the Secret, then an Event.
#[allow(clippy::too_many_lines)] // one arm per action reads best side by side
async fn apply(obj: &ApiToken, ctx: &Context, o: Observed, action: Action) -> Result<Step, Error> {
    let Observed {
        tokens,
        secrets,
        ns,
        status,
        current,
        desired,
        state,
        stored,
        now,
        wanted_name,
        current_name,
        existing,
        noncompliance,
    } = o;
    // The status that records `c`, everything else as observed.
    let status_of =
        |c: &Current| build_status(obj, &status, &desired, c, now, &wanted_name, noncompliance.as_deref());
    match action {
        Action::Wait { until } => {
            let new_status = status_of(&current);
            if new_status == status {
                // Nothing to write (e.g. after a restart): the gauges still learn the token.
                let expires = current.expires_at.map(Timestamp::as_second);
                let phase = status::phase_to_api(current.phase).as_str();
                ctx.metrics.observe_token(
                    (ns.clone(), obj.name_any()),
                    phase,
                    expires,
                    obj.spec.rotation.enabled,
                );
            } else {
                write_status(ctx, &tokens, obj, new_status).await?;
            }
            if current.phase == plan::Phase::Active
                && let Some(id) = &current.token_id
            {
                restart::converge(ctx, obj, &ns, id).await;
            }
            Ok(Step::Done(until))
        }
        // A token that no longer complies keeps working until it expires, and is not rotated:
        // a successor would not comply either. At expiry it is denied (below).
        Action::Rotate(reason)
            if noncompliance.is_some()
                && !matches!(reason, plan::RotateReason::Expired | plan::RotateReason::Leaked) =>
        {
            let new_status = status_of(&current);
            if new_status != status {
                write_status(ctx, &tokens, obj, new_status).await?;
            }
            if matches!(reason, plan::RotateReason::Trigger | plan::RotateReason::Annotation) {
                let message = format!(
                    "rotation ({}) refused: the ApiToken does not comply with policy: {}; the current token stays valid until it expires",
                    reason.as_str(),
                    noncompliance.as_deref().unwrap_or_default()
                );
                publish(ctx, obj, EventType::Warning, "RotationRefused", message).await;
            }
            Ok(Step::Done(current.expires_at))
        }
        Action::Issue | Action::Rotate(_) | Action::Recover if noncompliance.is_some() => {
            let message = noncompliance.as_deref().unwrap_or_default();
            deny(obj, ctx, &tokens, &secrets, &status, message).await?;
            Ok(Step::Done(None))
        }
        Action::Issue | Action::Rotate(_) | Action::Recover => {
            let mut rng = rand::rngs::OsRng.unwrap_err();
            let minted = token::generate(&desired.prefix, &mut rng);
            let m =
                Minted { hash: minted.hash.clone(), id: minted.id.clone(), display: minted.display.clone() };
            let next = plan::next_state(&action, &desired, &current, state, now, Some(m));
            // Status first: every verifier accepts the new hash before anyone can read the token.
            let new_status = status_of(&next);
            let updated = write_status(ctx, &tokens, obj, new_status).await?;
            let written = match write_secret(
                &secrets,
                &ctx.seen_secrets,
                &updated,
                &wanted_name,
                &minted.plaintext,
                &next,
                &desired,
            )
            .await
            {
                Ok(written) => written,
                Err(e) => {
                    // Nobody holds the new token: back to what was there (consumers keep theirs).
                    let revert = Revert { status: &status, current: &current };
                    return secret_write_failed(&updated, ctx, &tokens, &desired, Some(revert), e).await;
                }
            };
            remove_old_secret(&secrets, &current_name, &wanted_name).await?;
            let (type_, reason, note) = match action {
                Action::Issue => (
                    EventType::Normal,
                    "Issued",
                    format!("issued {} into Secret {wanted_name}", minted.display),
                ),
                // Nobody asked for this one: a Warning, saying where the old token was found.
                Action::Rotate(plan::RotateReason::Leaked) => (
                    EventType::Warning,
                    status::COMPROMISED,
                    format!(
                        "{} was reported leaked{}; rotated to {} at once, the leaked token is rejected (no grace period)",
                        current.display.as_deref().unwrap_or("the token"),
                        leak_origin(&status, current.token_hash.as_deref()),
                        minted.display
                    ),
                ),
                Action::Rotate(r) => (
                    EventType::Normal,
                    "Rotated",
                    format!(
                        "rotated to {} ({}); the previous token stays valid until {}",
                        minted.display,
                        r.as_str(),
                        next.previous_valid_until.map_or_else(|| "now".into(), |t| t.to_string())
                    ),
                ),
                _ => (
                    EventType::Normal,
                    "Recovered",
                    format!("the Secret did not hold the current token; issued {}", minted.display),
                ),
            };
            info!(reason, token = %minted.display, "token written");
            publish(ctx, obj, type_, reason, note).await;
            Ok(Step::Continue(Box::new(updated), Some(Box::new(written))))
        }
        Action::UpdateMetadata => {
            let next = plan::next_state(&action, &desired, &current, state, now, None);
            let new_status = status_of(&next);
            let updated = if new_status == status {
                obj.clone()
            } else {
                write_status(ctx, &tokens, obj, new_status).await?
            };
            let mut written = None;
            if let Some(token) = &stored {
                match write_secret(
                    &secrets,
                    &ctx.seen_secrets,
                    &updated,
                    &wanted_name,
                    token,
                    &next,
                    &desired,
                )
                .await
                {
                    Ok(w) => written = Some(Box::new(w)),
                    Err(e) => return secret_write_failed(&updated, ctx, &tokens, &desired, None, e).await,
                }
                remove_old_secret(&secrets, &current_name, &wanted_name).await?;
            }
            if current.phase == plan::Phase::Active {
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Updated",
                    "updated expiry, scopes or Secret metadata; the token value is unchanged".into(),
                )
                .await;
            }
            Ok(Step::Continue(Box::new(updated), written))
        }
        Action::RetirePrevious => {
            let next = plan::next_state(&action, &desired, &current, state, now, None);
            let updated = write_status(ctx, &tokens, obj, status_of(&next)).await?;
            if current.previous_leaked() {
                let note = format!(
                    "the previous token was reported leaked{}; it is rejected at once (its grace period is cut short); the current token {} is not affected",
                    leak_origin(&status, current.previous_token_hash.as_deref()),
                    current.display.as_deref().unwrap_or_default()
                );
                publish(ctx, obj, EventType::Warning, status::COMPROMISED, note).await;
            } else {
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "PreviousRetired",
                    "the previous token's grace period ended; it is no longer valid".into(),
                )
                .await;
            }
            // The Secret is as read: retiring the previous token does not touch it.
            Ok(Step::Continue(Box::new(updated), existing.map(Box::new)))
        }
        Action::Withdraw => {
            let next = plan::next_state(&action, &desired, &current, state, now, None);
            let updated = write_status(ctx, &tokens, obj, status_of(&next)).await?;
            for n in [&current_name, &wanted_name] {
                delete_secret(&secrets, n).await?;
            }
            let note = format!(
                "{} was reported leaked{}; it is rejected and its Secret removed. Rotation is disabled, so no new token was issued: change rotation.trigger or set the apitoken.dev/rotate annotation",
                current.display.as_deref().unwrap_or("the token"),
                leak_origin(&status, current.token_hash.as_deref())
            );
            publish(ctx, obj, EventType::Warning, status::COMPROMISED, note).await;
            Ok(Step::Continue(Box::new(updated), None))
        }
        Action::Expire | Action::Revoke => {
            let next = plan::next_state(&action, &desired, &current, state, now, None);
            let updated = write_status(ctx, &tokens, obj, status_of(&next)).await?;
            for n in [&current_name, &wanted_name] {
                delete_secret(&secrets, n).await?;
            }
            // Expiry is something nobody asked for; a revocation is the user's own act.
            let (type_, reason, note) = if action == Action::Expire {
                (
                    EventType::Warning,
                    "Expired",
                    format!(
                        "{} expired; its Secret was removed",
                        current.display.as_deref().unwrap_or("the token")
                    ),
                )
            } else {
                (
                    EventType::Normal,
                    "Revoked",
                    "spec.revoked is true: the token is rejected and its Secret removed".to_string(),
                )
            };
            publish(ctx, obj, type_, reason, note).await;
            Ok(Step::Continue(Box::new(updated), None))
        }
    }
}

/// The full status for state `next`: lifecycle fields, conditions, bookkeeping.
fn build_status(
    obj: &ApiToken,
    old: &ApiTokenStatus,
    d: &Desired,
    next: &Current,
    now: Timestamp,
    secret_name: &str,
    noncompliance: Option<&str>,
) -> ApiTokenStatus {
    let mut s = status::from_current(old, next);
    let mut want = status::conditions(Some(d), next, now, None, noncompliance);
    want.extend(status::compromised(&old.leaks));
    s.created_by = obj.annotations().get(CREATED_BY_ANNOTATION).cloned();
    s.conditions = status::merge_conditions(&old.conditions, want, obj.metadata.generation, now);
    s.observed_generation = obj.metadata.generation;
    s.secret_name = Some(secret_name.to_string());
    s
}

/// Records a failure (Ready=False with `reason`) without touching the token or its Secret.
#[allow(clippy::too_many_arguments)]
async fn fail(
    obj: &ApiToken,
    ctx: &Context,
    tokens: &Api<ApiToken>,
    old: &ApiTokenStatus,
    d: Option<&Desired>,
    state: &Current,
    reason: &'static str,
    message: String,
) -> Result<(), Error> {
    let now = Timestamp::now();
    let mut s = status::from_current(old, state);
    let mut want = status::conditions(d, state, now, Some((reason, message.clone())), None);
    want.extend(status::compromised(&old.leaks));
    s.created_by = obj.annotations().get(CREATED_BY_ANNOTATION).cloned();
    s.conditions = status::merge_conditions(&old.conditions, want, obj.metadata.generation, now);
    s.observed_generation = obj.metadata.generation;
    if s != *old {
        write_status(ctx, tokens, obj, s).await?;
        warn!(reason, message, "cannot issue");
        publish(ctx, obj, EventType::Warning, reason, message).await;
    }
    Ok(())
}

/// The status before a token was minted, to go back to when its Secret cannot be written.
struct Revert<'a> {
    status: &'a ApiTokenStatus,
    current: &'a Current,
}

/// The API server refused the Secret: record it (phase Failed, Ready=False with its message, a
/// Warning Event) instead of minting again on every retry. With `revert`, the minted token is
/// dropped from the status again: it never reached anyone.
async fn secret_write_failed(
    updated: &ApiToken,
    ctx: &Context,
    tokens: &Api<ApiToken>,
    d: &Desired,
    revert: Option<Revert<'_>>,
    e: Error,
) -> Result<Step, Error> {
    let written = updated.status.clone().unwrap_or_default();
    let (mut state, secret_name) = match &revert {
        Some(r) => (r.current.clone(), r.status.secret_name.clone()),
        None => (status::to_current(&written), written.secret_name.clone()),
    };
    state.phase = plan::Phase::Failed;
    let (reason, retry) = if e.is_invalid_secret() {
        (status::SECRET_INVALID, None)
    } else {
        (status::SECRET_WRITE_FAILED, Timestamp::now().checked_add(SECRET_WRITE_RETRY).ok())
    };
    let fix = if retry.is_some() { "retrying in 30s" } else { "fix the ApiToken's spec.secret" };
    let message = format!("the API server refused the token Secret ({e}); {fix}");
    let mut base = written.clone();
    base.secret_name = secret_name;
    fail(updated, ctx, tokens, &base, Some(d), &state, reason, message).await?;
    Ok(Step::Done(retry))
}

/// Refuses the token: phase Denied, no token, its Secret removed, the violations in the
/// conditions and an Event.
async fn deny(
    obj: &ApiToken,
    ctx: &Context,
    tokens: &Api<ApiToken>,
    secrets: &Api<Secret>,
    old: &ApiTokenStatus,
    violations: &str,
) -> Result<(), Error> {
    let denied =
        Current { phase: plan::Phase::Denied, rotation_count: old.rotation_count, ..Current::default() };
    let message = format!("refused by policy: {violations}");
    fail(obj, ctx, tokens, old, None, &denied, "PolicyViolation", message).await?;
    for name in [old.secret_name.clone(), Some(secret::desired_name(obj))].into_iter().flatten() {
        if let Some(s) = secrets.get_opt(&name).await?
            && secret::owned_by(&s, obj)
        {
            delete_secret(secrets, &name).await?;
        }
    }
    Ok(())
}

/// " by REPORTER (found at URL)" for the leak record of `hash`.
fn leak_origin(status: &ApiTokenStatus, hash: Option<&str>) -> String {
    let Some(leak) = status.leaks.iter().rev().find(|l| Some(l.token_hash.as_str()) == hash) else {
        return String::new();
    };
    let found = leak.url.as_deref().map(|u| format!(" (found at {u})")).unwrap_or_default();
    format!(" by {}{found}", leak.reporter)
}

/// Replaces the status, on the condition that nobody changed the object since we read it.
async fn write_status(
    ctx: &Context,
    tokens: &Api<ApiToken>,
    obj: &ApiToken,
    status: ApiTokenStatus,
) -> Result<ApiToken, Error> {
    let key = (obj.namespace().unwrap_or_default(), obj.name_any());
    let (phase, expires) =
        (status.phase.unwrap_or_default().as_str(), status.expires_at.as_ref().map(|t| t.0.as_second()));
    let mut o = obj.clone();
    o.status = Some(status);
    o.metadata.managed_fields = None;
    let pp = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    match tokens.replace_status(&obj.name_any(), &pp, &o).await {
        Ok(updated) => {
            ctx.metrics.observe_token(key, phase, expires, obj.spec.rotation.enabled);
            // This reconcile carries on from (or ends with) what it wrote: the echo is no news.
            ctx.seen_tokens.record_object(&updated);
            Ok(updated)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict),
        Err(e) => Err(e.into()),
    }
}

async fn write_secret(
    secrets: &Api<Secret>,
    seen: &seen::Versions,
    owner: &ApiToken,
    name: &str,
    token: &Plaintext,
    next: &Current,
    d: &Desired,
) -> Result<Secret, Error> {
    let id = next.token_id.as_deref().unwrap_or_default();
    let rendered = secret::render(
        owner,
        name,
        &secret::SecretContent { token, token_id: id, expires_at: next.expires_at, scopes: &d.scopes },
    );
    let mut body = serde_json::to_value(&rendered)?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    let result = secrets.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await;
    // Error text from a write carrying the token keeps none of the values it carried.
    let values: Vec<&[u8]> = rendered.data.iter().flat_map(|d| d.values().map(|v| v.0.as_slice())).collect();
    let written = result.map_err(|e| Error::secret_write(&e, &values))?;
    // The next step reads it back; its watch event is no news.
    seen.record_object(&written);
    Ok(written)
}

async fn delete_secret(secrets: &Api<Secret>, name: &str) -> Result<(), Error> {
    match secrets.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn remove_old_secret(secrets: &Api<Secret>, old: &str, new: &str) -> Result<(), Error> {
    if old == new { Ok(()) } else { delete_secret(secrets, old).await }
}

async fn publish(ctx: &Context, obj: &ApiToken, type_: EventType, reason: &str, note: String) {
    let event =
        Event { type_, reason: reason.into(), note: Some(note), action: reason.into(), secondary: None };
    if let Err(e) = ctx.events.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "publishing an event failed");
    }
}
