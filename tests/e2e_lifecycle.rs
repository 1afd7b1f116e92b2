//! The token lifecycle of design §5 against the real API server, with the operator running as a
//! process: issue, rotate with overlap, trigger and annotation, expire, revoke and regenerate,
//! metadata edits, restart targets, deletion.

mod support;

use std::time::{Duration, Instant};

use apitoken_operator::api::ApiToken;
use apitoken_operator::core::token;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::operator::{Operator, install_crds};
use support::{TestNamespace, wait_for};

const T: Duration = Duration::from_secs(30);

async fn setup(prefix: &str) -> (TestNamespace, Operator, Api<ApiToken>, Api<Secret>) {
    install_crds().await;
    let ns = TestNamespace::new(prefix).await;
    let op = Operator::start(&ns.name);
    let (tokens, secrets) = (ns.api(), ns.api());
    (ns, op, tokens, secrets)
}

/// Applies an ApiToken the way `kubectl apply --server-side` does.
async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) -> ApiToken {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user"), &Patch::Apply(&body)).await.unwrap()
}

async fn secret_token(secrets: &Api<Secret>, name: &str) -> Option<String> {
    let s = secrets.get_opt(name).await.ok()??;
    let bytes = s.data?.get("token")?.0.clone();
    String::from_utf8(bytes).ok()
}

/// Waits until the Secret holds a token whose hash is the status' tokenHash; returns it.
async fn wait_consistent(
    tokens: &Api<ApiToken>,
    secrets: &Api<Secret>,
    name: &str,
    timeout: Duration,
) -> (ApiToken, String) {
    wait_for(&format!("{name}: Secret holds status.tokenHash"), timeout, || async {
        let at = tokens.get(name).await.ok()?;
        let hash = at.status.as_ref()?.token_hash.clone()?;
        let secret_name = at.status.as_ref()?.secret_name.clone()?;
        let t = secret_token(secrets, &secret_name).await?;
        (token::hash(&t) == hash && at.status.as_ref()?.phase == Some(apitoken_operator::api::Phase::Active))
            .then_some((at, t))
    })
    .await
}

#[tokio::test]
async fn a_new_token_is_active_with_its_secret_within_2s() {
    let (ns, _op, tokens, secrets) = setup("issue").await;
    let start = Instant::now();
    apply(&tokens, "ci", json!({"scopes": ["metrics:read", "pipeline/prod:write"], "secret": {"labels": {"team": "a"}, "extraKeys": {"authorization": "Bearer {{token}}"}}})).await;
    let (at, plaintext) = wait_consistent(&tokens, &secrets, "ci", Duration::from_secs(2)).await;
    println!("Active with Secret after {:?}", start.elapsed());
    let status = at.status.clone().unwrap();
    let secret = secrets.get("ci").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("apitoken.dev/token"));
    let data = secret.data.clone().unwrap();
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    assert_eq!(text("token-id"), status.token_id.clone().unwrap());
    assert_eq!(text("scopes"), "metrics:read pipeline/prod:write");
    assert_eq!(text("expires-at"), status.expires_at.clone().unwrap().0.to_string());
    assert_eq!(text("authorization"), format!("Bearer {plaintext}"));
    let labels = secret.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "apitoken-operator");
    assert_eq!(labels["apitoken.dev/name"], "ci");
    assert_eq!(labels["team"], "a");
    let owner = &secret.metadata.owner_references.clone().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("ApiToken", "ci", Some(true)));
    assert_eq!(owner.uid, at.metadata.uid.clone().unwrap());
    assert_eq!(
        status.display.clone().unwrap(),
        format!("{}…{}", &plaintext[..15], &plaintext[plaintext.len() - 4..])
    );
    // 90d default lifetime, renewAt a third before.
    let issued = status.issued_at.clone().unwrap().0;
    assert_eq!(status.expires_at.clone().unwrap().0, issued + jiff::SignedDuration::from_hours(90 * 24));
    assert_eq!(status.renew_at.clone().unwrap().0, issued + jiff::SignedDuration::from_hours(60 * 24));

    // kubectl get shows the §4 columns, and READY.
    let out = support::kubectl().args(["get", "apitok", "-n", &ns.name]).output().unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "TOKEN", "SCOPES", "PHASE", "EXPIRES", "LAST", "USED", "AGE"],
        "{out}"
    );
    assert!(out.contains(&status.display.unwrap()) && out.contains("Active"), "{out}");
    ns.cleanup().await;
}

#[tokio::test]
async fn scheduled_rotation_overlaps_for_the_grace_period() {
    let (ns, _op, tokens, secrets) = setup("rotate").await;
    apply(
        &tokens,
        "short",
        json!({"lifetime": "20s", "rotation": {"renewBefore": "10s", "gracePeriod": "5s"}}),
    )
    .await;
    let (at, first) = wait_consistent(&tokens, &secrets, "short", T).await;
    let s = at.status.unwrap();
    let renew_at = s.renew_at.unwrap().0;
    assert_eq!(renew_at, s.issued_at.unwrap().0 + jiff::SignedDuration::from_secs(10));

    let second = wait_for("the Secret to hold a new token", T, || async {
        secret_token(&secrets, "short").await.filter(|t| *t != first)
    })
    .await;
    let seen_at = jiff::Timestamp::now();
    let skew = seen_at.duration_since(renew_at).as_secs_f64();
    println!("rotated {skew:+.2}s from renewAt");
    assert!(skew.abs() <= 2.0, "rotated {skew}s from renewAt");

    let at = tokens.get("short").await.unwrap();
    let s = at.status.unwrap();
    assert_eq!(s.rotation_count, 1);
    assert_eq!(s.token_hash.as_deref(), Some(token::hash(&second).as_str()));
    assert_eq!(s.previous_token_hash.as_deref(), Some(token::hash(&first).as_str()));
    let until = s.previous_valid_until.unwrap().0;
    assert_eq!(until, s.issued_at.unwrap().0 + jiff::SignedDuration::from_secs(5));

    let dropped = wait_for("previousTokenHash to be dropped", T, || async {
        let s = tokens.get("short").await.ok()?.status?;
        s.previous_token_hash.is_none().then(jiff::Timestamp::now)
    })
    .await;
    let late = dropped.duration_since(until).as_secs_f64();
    println!("previous dropped {late:+.2}s from previousValidUntil");
    assert!((-0.5..=2.0).contains(&late), "dropped {late}s from previousValidUntil");
    ns.cleanup().await;
}

#[tokio::test]
async fn trigger_and_annotation_rotate_exactly_once_and_reapplying_rotates_nothing() {
    let (ns, _op, tokens, secrets) = setup("trigger").await;
    let spec = json!({"scopes": ["metrics:read"], "rotation": {"trigger": "v1"}});
    apply(&tokens, "t", spec.clone()).await;
    let (at, first) = wait_consistent(&tokens, &secrets, "t", T).await;
    assert_eq!(at.status.as_ref().unwrap().rotation_count, 0, "the first trigger value does not rotate");

    apply(&tokens, "t", json!({"scopes": ["metrics:read"], "rotation": {"trigger": "v2"}})).await;
    let (at, second) = wait_for("rotation for trigger v2", T, || async {
        let (at, t) = wait_consistent(&tokens, &secrets, "t", T).await;
        (t != first).then_some((at, t))
    })
    .await;
    let s = at.status.clone().unwrap();
    assert_eq!((s.rotation_count, s.observed_trigger.as_deref()), (1, Some("v2")));

    let patch = json!({"metadata": {"annotations": {"apitoken.dev/rotate": "2026-11-28T10:00:00Z"}}});
    tokens.patch("t", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let (at, third) = wait_for("rotation for the annotation", T, || async {
        let (at, t) = wait_consistent(&tokens, &secrets, "t", T).await;
        (t != second).then_some((at, t))
    })
    .await;
    assert_eq!(at.status.clone().unwrap().rotation_count, 2);

    // Re-applying the same manifest (and re-annotating the same value) changes nothing.
    apply(&tokens, "t", json!({"scopes": ["metrics:read"], "rotation": {"trigger": "v2"}})).await;
    tokens.patch("t", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // A sentinel change the operator must process after the re-apply: once it is reflected,
    // any rotation caused by the re-apply would have happened too.
    apply(&tokens, "t", json!({"scopes": ["metrics:read", "logs:read"], "rotation": {"trigger": "v2"}}))
        .await;
    wait_for("the sentinel scope in status", T, || async {
        let s = tokens.get("t").await.ok()?.status?;
        s.effective_scopes.contains(&"logs:read".to_string()).then_some(())
    })
    .await;
    let at = tokens.get("t").await.unwrap();
    assert_eq!(at.status.unwrap().rotation_count, 2);
    assert_eq!(secret_token(&secrets, "t").await.unwrap(), third);
    ns.cleanup().await;
}

#[tokio::test]
async fn without_rotation_a_token_expires_and_its_secret_goes() {
    let (ns, _op, tokens, secrets) = setup("expire").await;
    apply(&tokens, "brief", json!({"lifetime": "5s", "rotation": {"enabled": false}})).await;
    let (at, _) = wait_consistent(&tokens, &secrets, "brief", T).await;
    let expires = at.status.unwrap().expires_at.unwrap().0;
    let gone = wait_for("Expired and Secret removed", T, || async {
        let s = tokens.get("brief").await.ok()?.status?;
        let missing = matches!(secrets.get_opt("brief").await, Ok(None));
        (s.phase == Some(apitoken_operator::api::Phase::Expired) && missing).then(jiff::Timestamp::now)
    })
    .await;
    let late = gone.duration_since(expires).as_secs_f64();
    println!("Expired {late:+.2}s after expiresAt");
    assert!((0.0..=2.0).contains(&late), "expired {late}s after expiresAt");
    let at = tokens.get("brief").await.unwrap();
    let ready = at.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Expired"));
    ns.cleanup().await;
}

#[tokio::test]
async fn revoking_removes_the_secret_and_unrevoking_issues_a_new_token() {
    let (ns, _op, tokens, secrets) = setup("revoke").await;
    let spec = json!({"scopes": ["metrics:read"], "description": "collector"});
    apply(&tokens, "r", spec).await;
    let (_, first) = wait_consistent(&tokens, &secrets, "r", T).await;

    let start = Instant::now();
    apply(&tokens, "r", json!({"scopes": ["metrics:read"], "description": "collector", "revoked": true}))
        .await;
    wait_for("Revoked and Secret removed", Duration::from_secs(2), || async {
        let s = tokens.get("r").await.ok()?.status?;
        let missing = matches!(secrets.get_opt("r").await, Ok(None));
        (s.phase == Some(apitoken_operator::api::Phase::Revoked) && missing).then_some(())
    })
    .await;
    println!("Revoked after {:?}", start.elapsed());

    apply(&tokens, "r", json!({"scopes": ["metrics:read"], "description": "collector", "revoked": false}))
        .await;
    let (at, second) = wait_consistent(&tokens, &secrets, "r", T).await;
    assert_ne!(first, second, "a new token");
    assert_eq!(at.status.unwrap().effective_scopes, ["metrics:read"]);
    assert_eq!(at.spec.description.as_deref(), Some("collector"));
    ns.cleanup().await;
}

#[tokio::test]
async fn editing_scopes_or_lifetime_keeps_the_token_value() {
    let (ns, _op, tokens, secrets) = setup("edit").await;
    apply(&tokens, "e", json!({"scopes": ["metrics:read"], "lifetime": "30d"})).await;
    let (at, value) = wait_consistent(&tokens, &secrets, "e", T).await;
    let issued = at.status.unwrap().issued_at.unwrap().0;

    apply(
        &tokens,
        "e",
        json!({"scopes": ["metrics:read", "pipeline:write"], "lifetime": "60d", "audiences": ["tenant-a"]}),
    )
    .await;
    let s = wait_for("status to show the new scopes and expiry", T, || async {
        let s = tokens.get("e").await.ok()?.status?;
        (s.effective_scopes.len() == 2 && s.observed_generation == Some(2)).then_some(s)
    })
    .await;
    assert_eq!(s.expires_at.unwrap().0, issued + jiff::SignedDuration::from_hours(60 * 24));
    assert_eq!(s.rotation_count, 0);
    let secret = wait_for("the Secret's scopes key to follow", T, || async {
        let s = secrets.get("e").await.ok()?;
        (s.data.as_ref()?.get("scopes")?.0 == b"metrics:read pipeline:write").then_some(s)
    })
    .await;
    assert_eq!(secret.data.unwrap()["token"].0, value.as_bytes(), "same token value");
    ns.cleanup().await;
}

#[tokio::test]
async fn restart_targets_roll_after_a_rotation() {
    let (ns, _op, tokens, secrets) = setup("restart").await;
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "collector"},
        "spec": {"selector": {"matchLabels": {"app": "c"}}, "template": {"metadata": {"labels": {"app": "c"}},
            "spec": {"containers": [{"name": "c", "image": "example.invalid/collector:1"}]}}}
    }))
    .unwrap();
    let deploys: Api<Deployment> = ns.api();
    deploys.create(&PostParams::default(), &deploy).await.unwrap();
    apply(&tokens, "c", json!({"restartTargets": [{"kind": "Deployment", "name": "collector"}], "rotation": {"trigger": "1"}})).await;
    let (at, _) = wait_consistent(&tokens, &secrets, "c", T).await;
    let annotation =
        |d: Deployment| d.spec?.template.metadata?.annotations?.get("apitoken.dev/token-id").cloned();
    let id1 = at.status.unwrap().token_id.unwrap();
    wait_for("pod template annotation = first token id", T, || async {
        (annotation(deploys.get("collector").await.ok()?)? == id1).then_some(())
    })
    .await;

    apply(&tokens, "c", json!({"restartTargets": [{"kind": "Deployment", "name": "collector"}], "rotation": {"trigger": "2"}})).await;
    let id2 = wait_for("a rotation", T, || async {
        let id = tokens.get("c").await.ok()?.status?.token_id?;
        (id != id1).then_some(id)
    })
    .await;
    wait_for("pod template annotation = new token id", T, || async {
        (annotation(deploys.get("collector").await.ok()?)? == id2).then_some(())
    })
    .await;
    ns.cleanup().await;
}

/// A change to a token's Secret starts a reconcile at once: the token has no wake-up for 60 days.
#[tokio::test]
async fn a_deleted_or_overwritten_secret_gets_a_new_token_at_once() {
    let (ns, _op, tokens, secrets) = setup("recover").await;
    apply(&tokens, "lost", json!({"scopes": ["metrics:read"]})).await;
    let (_, first) = wait_consistent(&tokens, &secrets, "lost", T).await;
    // Active, its Secret holding status.tokenHash, and a token other than `old`.
    let replaced = |old: String| {
        let (tokens, secrets) = (tokens.clone(), secrets.clone());
        async move {
            let at = tokens.get("lost").await.ok()?;
            let s = at.status.clone()?;
            let t = secret_token(&secrets, "lost").await?;
            let active = s.phase == Some(apitoken_operator::api::Phase::Active);
            (active && Some(token::hash(&t)) == s.token_hash && t != old).then_some((at, t))
        }
    };

    let out = support::kubectl().args(["delete", "secret", "lost", "-n", &ns.name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (at, second) =
        wait_for("a new token in a new Secret", Duration::from_secs(10), || replaced(first.clone())).await;
    let s = at.status.unwrap();
    assert_eq!(s.rotation_count, 0, "a recovery is not a rotation");
    assert_eq!(s.previous_token_hash, Some(token::hash(&first)), "the lost token keeps its overlap");

    let patch = json!({"stringData": {"token": "overwritten"}}).to_string();
    let args = ["patch", "secret", "lost", "-n", &ns.name, "--type", "merge", "-p", &patch];
    let out = support::kubectl().args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("a token in the overwritten Secret again", Duration::from_secs(10), || replaced(second.clone()))
        .await;
    ns.cleanup().await;
}

#[tokio::test]
async fn deleting_the_api_token_removes_its_secret() {
    let (ns, _op, tokens, secrets) = setup("delete").await;
    apply(&tokens, "d", json!({})).await;
    wait_consistent(&tokens, &secrets, "d", T).await;
    tokens.delete("d", &DeleteParams::background()).await.unwrap();
    wait_for("the Secret to be removed", T, || async {
        matches!(secrets.get_opt("d").await, Ok(None)).then_some(())
    })
    .await;
    ns.cleanup().await;
}

#[tokio::test]
async fn a_foreign_secret_is_never_overwritten() {
    let (ns, _op, tokens, secrets) = setup("foreign").await;
    let mine: Secret =
        serde_json::from_value(json!({"metadata": {"name": "taken"}, "stringData": {"token": "precious"}}))
            .unwrap();
    secrets.create(&PostParams::default(), &mine).await.unwrap();
    apply(&tokens, "x", json!({"secret": {"name": "taken"}})).await;
    let reason = wait_for("Ready=False SecretConflict", T, || async {
        let s = tokens.get("x").await.ok()?.status?;
        let ready = s.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.reason == "SecretConflict").then_some(ready.message)
    })
    .await;
    assert!(reason.contains("taken"), "{reason}");
    assert_eq!(secret_token(&secrets, "taken").await.as_deref(), Some("precious"));
    assert!(tokens.get("x").await.unwrap().status.unwrap().token_hash.is_none(), "nothing issued");
    ns.cleanup().await;
}
