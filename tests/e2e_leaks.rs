//! Leak reports end to end (issue 13): GitHub's secret scanning partner alert, signed here with a
//! P-256 key made by openssl, posted with curl to the running operator against the real API
//! server; the outcome read with curl, kubectl and the Secret.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apitoken_operator::api::ApiToken;
use apitoken_operator::core::token;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::operator::{Operator, install_crds};
use support::{Reply, TestNamespace, curl, issued_token, kubectl, ok, run, wait_for};

const T: Duration = Duration::from_secs(30);
const KEY_ID: &str = "4a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A P-256 key pair made by openssl: (private key file, public key PEM).
fn p256_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.pem"));
    openssl(&["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key.to_str().unwrap()], None);
    let public = openssl(&["ec", "-in", key.to_str().unwrap(), "-pubout"], None);
    (key, String::from_utf8(public).unwrap())
}

/// base64 of openssl's DER ECDSA signature of `body` with SHA-256: what GitHub sends.
fn sign(key: &Path, body: &str) -> String {
    let der = openssl(&["dgst", "-sha256", "-sign", key.to_str().unwrap()], Some(body.as_bytes()));
    let b64 = openssl(&["base64", "-A"], Some(&der));
    String::from_utf8(b64).unwrap().trim().to_string()
}

/// POSTs `body` to the GitHub leak endpoint with `key_id` and `signature`.
fn report(base: &str, key_id: &str, signature: &str, body: &str) -> Reply {
    curl(&[
        "-X",
        "POST",
        &format!("{base}/v1/leaks/github"),
        "-H",
        "content-type: application/json",
        "-H",
        &format!("GITHUB-PUBLIC-KEY-IDENTIFIER: {key_id}"),
        "-H",
        &format!("GITHUB-PUBLIC-KEY-SIGNATURE: {signature}"),
        "--data-binary",
        body,
    ])
}

fn report_body(token: &str, url: &str) -> String {
    json!([{"token": token, "type": "apitoken_operator_token", "url": url, "source": "content"}]).to_string()
}

fn auth(base: &str, token: &str) -> u16 {
    curl(&[&format!("{base}/v1/auth"), "-H", &format!("Authorization: Bearer {token}")]).code
}

fn verify_valid(base: &str, token: &str) -> Value {
    let body = json!({"token": token}).to_string();
    curl(&["-X", "POST", &format!("{base}/v1/verify"), "-H", "content-type: application/json", "-d", &body])
        .body["valid"]
        .clone()
}

fn review_authenticated(base: &str, token: &str) -> Value {
    let body =
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}});
    curl(&[
        "-X",
        "POST",
        &format!("{base}/apis/authentication.k8s.io/v1/tokenreviews"),
        "-d",
        &body.to_string(),
    ])
    .body["status"]["authenticated"]
        .clone()
}

/// Every verifier's answer for `token`: (/v1/auth code, /v1/verify valid, TokenReview authenticated).
fn answers(base: &str, token: &str) -> (u16, Value, Value) {
    (auth(base, token), verify_valid(base, token), review_authenticated(base, token))
}

const ACCEPTED: (u16, Value, Value) = (200, Value::Bool(true), Value::Bool(true));
const REJECTED: (u16, Value, Value) = (401, Value::Bool(false), Value::Bool(false));

async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap();
}

fn kubectl_get(ns: &str, args: &[&str]) -> String {
    let mut cmd = kubectl();
    cmd.args(["-n", ns]).args(args);
    ok(run(cmd, None), "kubectl")
}

/// "TYPE MESSAGE" of the `Compromised` Event about ApiToken `name`, once a Warning is there.
async fn compromised_event(ns: &str, name: &str) -> String {
    let selector = format!("involvedObject.name={name},reason=Compromised");
    wait_for("a Warning Compromised Event", T, || async {
        let args = [
            "get",
            "events",
            "--field-selector",
            &selector,
            "-o",
            "jsonpath={.items[*].type} {.items[*].message}",
        ];
        let e = kubectl_get(ns, &args);
        e.starts_with("Warning").then_some(e)
    })
    .await
}

fn hex_hash(t: &str) -> String {
    token::hash(t).trim_start_matches("sha256:").to_string()
}

struct Setup {
    ns: TestNamespace,
    op: Operator,
    base: String,
    tokens: Api<ApiToken>,
    secrets: Api<Secret>,
    key: PathBuf,
    dir: PathBuf,
}

async fn setup(prefix: &str) -> Setup {
    install_crds().await;
    let ns = TestNamespace::new(prefix).await;
    let dir = std::env::temp_dir().join(format!("apitoken-e2e-leaks-{}-{}", ns.name, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = p256_key(&dir, "github");
    // GitHub's public-keys document, as a platform team would save it into a ConfigMap.
    let keys = json!({"public_keys": [{"key_identifier": KEY_ID, "key": public, "is_current": true}]});
    let keys_file = dir.join("public-keys.json");
    std::fs::write(&keys_file, keys.to_string()).unwrap();
    let mut op = Operator::start_verifying(&ns.name);
    op.kill();
    op.args.extend(["--leak-keys-file".into(), keys_file.to_str().unwrap().into()]);
    op.restart();
    let base = op.verify_url.clone().unwrap();
    let ready = format!("{}/readyz", op.metrics_url);
    wait_for("the verifier to be ready", T, || async { (curl(&[&ready]).code == 200).then_some(()) }).await;
    let (tokens, secrets) = (ns.api(), ns.api());
    Setup { ns, op, base, tokens, secrets, key, dir }
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one scenario: a leak, its consequences, and what changes nothing
async fn a_signed_github_report_kills_the_token_at_once_and_a_new_one_takes_its_place() {
    let Setup { ns, op, base, tokens, secrets, key, dir } = setup("leaks").await;
    let deploys: Api<Deployment> = ns.api();
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "collector"},
        "spec": {"selector": {"matchLabels": {"app": "c"}}, "template": {"metadata": {"labels": {"app": "c"}},
            "spec": {"containers": [{"name": "c", "image": "example.invalid/collector:1"}]}}}
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &deploy).await.unwrap();
    apply(
        &tokens,
        "ci",
        json!({"scopes": ["metrics:read"], "restartTargets": [{"kind": "Deployment", "name": "collector"}]}),
    )
    .await;
    let leaked = issued_token(&tokens, &secrets, "ci", None).await;
    assert_eq!(answers(&base, &leaked), ACCEPTED);
    let before = tokens.get("ci").await.unwrap().status.unwrap();

    // A report with the right token but a wrong signature, an unknown key id, or a body altered
    // after signing: 401 and nothing changes.
    let url = "https://github.com/acme/app/blob/0123abc/.env";
    let body = report_body(&leaked, url);
    let signature = sign(&key, &body);
    let (other_key, _) = p256_key(&dir, "other");
    let altered = body.replace("0123abc", "0123abd");
    for (what, key_id, sig, b) in [
        ("signed by another key", KEY_ID, sign(&other_key, &body), body.as_str()),
        ("an unknown key id", "ffff", signature.clone(), body.as_str()),
        ("a body altered after signing", KEY_ID, signature.clone(), altered.as_str()),
        ("no signature", KEY_ID, String::new(), body.as_str()),
    ] {
        let r = report(&base, key_id, &sig, b);
        assert_eq!(r.code, 401, "{what}: {}", r.raw);
        assert_eq!(r.body["error"], "invalid_signature", "{what}");
        assert!(!r.raw.contains(&leaked), "{what}: no echo");
        assert_eq!(answers(&base, &leaked), ACCEPTED, "{what}: the token still verifies");
    }
    // A signed body that is not a report: 400, saying why without quoting it.
    let bad = format!("{{\"token\": \"{leaked}\"}}");
    let r = report(&base, KEY_ID, &sign(&key, &bad), &bad);
    assert_eq!((r.code, r.body["error"].as_str()), (400, Some("invalid_request")), "{}", r.raw);
    assert!(!r.raw.contains(&leaked));
    assert_eq!(tokens.get("ci").await.unwrap().status.unwrap(), before, "nothing changed");

    // The real report.
    let r = report(&base, KEY_ID, &signature, &body);
    let answered = Instant::now();
    // Each verifier, asked once right after the answer (no retries): rejected already.
    let after = answers(&base, &leaked);
    let took = answered.elapsed();
    assert_eq!(r.code, 200, "{}", r.raw);
    assert_eq!(
        r.body,
        json!([{"token_hash": hex_hash(&leaked), "token_type": "apitoken_operator_token", "label": "true_positive"}])
    );
    assert!(!r.raw.contains(&leaked), "the answer never echoes the token");
    assert_eq!(after, REJECTED, "rejected by /v1/auth, /v1/verify and TokenReview at once");
    println!("leaked token rejected by all three verifiers {took:?} after the answer");

    // A new token in the Secret, verified; the restart target rolled onto it.
    let fresh = issued_token(&tokens, &secrets, "ci", Some(&leaked)).await;
    assert_eq!(answers(&base, &fresh), ACCEPTED);
    let status = tokens.get("ci").await.unwrap().status.unwrap();
    assert_eq!(status.previous_token_hash, None, "a leaked token gets no grace period");
    assert_eq!(status.leaks.len(), 1);
    assert_eq!(
        (status.leaks[0].token_hash.as_str(), status.leaks[0].url.as_deref()),
        (token::hash(&leaked).as_str(), Some(url))
    );
    let id = status.token_id.clone().unwrap();
    wait_for("the restart target rolled onto the new token", T, || async {
        let d = deploys.get("collector").await.ok()?;
        (d.spec?.template.metadata?.annotations?.get("apitoken.dev/token-id")? == &id).then_some(())
    })
    .await;

    // What a person sees: the condition and a Warning Event, naming where it was found.
    let condition = kubectl_get(
        &ns.name,
        &[
            "get",
            "apitoken",
            "ci",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Compromised\")].status} {.status.conditions[?(@.type==\"Compromised\")].message}",
        ],
    );
    assert!(condition.starts_with("True ") && condition.contains(url), "{condition}");
    let events = compromised_event(&ns.name, "ci").await;
    assert!(events.contains(url) && events.contains("no grace period"), "{events}");
    println!("kubectl: {condition}\nevent: {events}");

    // The same report again: false_positive, nothing changes.
    let settled = tokens.get("ci").await.unwrap().status.unwrap();
    let r = report(&base, KEY_ID, &signature, &body);
    assert_eq!((r.code, r.body[0]["label"].as_str()), (200, Some("false_positive")), "{}", r.raw);
    assert_eq!(answers(&base, &fresh), ACCEPTED);
    assert_eq!(answers(&base, &leaked), REJECTED);
    let again = tokens.get("ci").await.unwrap().status.unwrap();
    assert_eq!(
        (again.token_hash, again.rotation_count, again.leaks.len()),
        (settled.token_hash, settled.rotation_count, 1)
    );

    // The metric (this process's counts).
    let metrics = curl(&[&format!("{}/metrics", op.metrics_url)]).raw;
    assert!(
        metrics.contains("apitoken_leak_reports_total{reporter=\"github\",result=\"true_positive\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apitoken_leak_reports_total{reporter=\"github\",result=\"unauthorized\"} 4"),
        "{metrics}"
    );
    // The record survives a restart of the operator (it is in the status, not in memory).
    let mut op = op;
    op.kill();
    op.restart();
    let ready = format!("{}/readyz", op.metrics_url);
    wait_for("the restarted verifier to be ready", T, || async {
        (curl(&[&ready]).code == 200).then_some(())
    })
    .await;
    assert_eq!(answers(&base, &leaked), REJECTED, "after a restart");
    assert_eq!(answers(&base, &fresh), ACCEPTED, "after a restart");

    // A revoke and an un-revoke issue a new token; the leaked one never comes back.
    apply(&tokens, "ci", json!({"scopes": ["metrics:read"], "revoked": true})).await;
    wait_for("revoked", T, || async {
        (tokens.get("ci").await.ok()?.status?.phase? == apitoken_operator::api::Phase::Revoked).then_some(())
    })
    .await;
    apply(&tokens, "ci", json!({"scopes": ["metrics:read"]})).await;
    let third = issued_token(&tokens, &secrets, "ci", Some(&fresh)).await;
    assert_eq!(answers(&base, &third), ACCEPTED);
    assert_eq!(answers(&base, &leaked), REJECTED);

    // No plaintext anywhere it must not be.
    let everything = format!(
        "{}{}{}",
        op.log_text(),
        kubectl_get(&ns.name, &["get", "apitoken", "ci", "-o", "yaml"]),
        kubectl_get(&ns.name, &["get", "events", "-o", "yaml"])
    );
    for t in [&leaked, &fresh, &third] {
        assert!(!everything.contains(t.as_str()), "a token in the log, status or events");
    }
    let _ = std::fs::remove_dir_all(&dir);
    ns.cleanup().await;
}

#[tokio::test]
async fn leaking_the_previous_token_in_its_grace_period_kills_it_and_keeps_the_current_one() {
    let Setup { ns, op: _op, base, tokens, secrets, key, dir } = setup("leaks-grace").await;
    apply(&tokens, "g", json!({"rotation": {"trigger": "1", "gracePeriod": "10m"}})).await;
    let previous = issued_token(&tokens, &secrets, "g", None).await;
    apply(&tokens, "g", json!({"rotation": {"trigger": "2", "gracePeriod": "10m"}})).await;
    let current = issued_token(&tokens, &secrets, "g", Some(&previous)).await;
    assert_eq!(answers(&base, &previous), ACCEPTED, "the previous token is in its grace period");
    let before = tokens.get("g").await.unwrap().status.unwrap();

    let body = report_body(&previous, "https://gist.github.com/someone/abc");
    let r = report(&base, KEY_ID, &sign(&key, &body), &body);
    assert_eq!((r.code, r.body[0]["label"].as_str()), (200, Some("true_positive")), "{}", r.raw);
    assert_eq!(answers(&base, &previous), REJECTED, "killed at once, grace period or not");
    assert_eq!(answers(&base, &current), ACCEPTED, "the current token is untouched");
    let after = wait_for("the previous token retired in the status", T, || async {
        let s = tokens.get("g").await.ok()?.status?;
        s.previous_token_hash.is_none().then_some(s)
    })
    .await;
    assert_eq!((after.token_hash, after.rotation_count), (before.token_hash, before.rotation_count));
    let events = compromised_event(&ns.name, "g").await;
    assert!(events.contains("previous token"), "{events}");
    assert_eq!(
        issued_token(&tokens, &secrets, "g", None).await,
        current,
        "the Secret still holds the current token"
    );
    let _ = std::fs::remove_dir_all(&dir);
    ns.cleanup().await;
}

#[tokio::test]
async fn with_rotation_off_a_leaked_token_is_withdrawn_until_someone_asks_for_a_new_one() {
    let Setup { ns, op: _op, base, tokens, secrets, key, dir } = setup("leaks-off").await;
    apply(&tokens, "fixed", json!({"rotation": {"enabled": false}})).await;
    let leaked = issued_token(&tokens, &secrets, "fixed", None).await;
    let body = report_body(&leaked, "https://github.com/acme/app/pull/7");
    let r = report(&base, KEY_ID, &sign(&key, &body), &body);
    assert_eq!((r.code, r.body[0]["label"].as_str()), (200, Some("true_positive")), "{}", r.raw);
    assert_eq!(answers(&base, &leaked), REJECTED);
    // No new token: the Secret goes, Ready says why and what to do; the hash stays rejected.
    let ready = wait_for("Ready=False Compromised and the Secret removed", T, || async {
        let s = tokens.get("fixed").await.ok()?.status?;
        let gone = secrets.get_opt(s.secret_name.as_deref()?).await.ok()?.is_none();
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
        (gone && ready.reason == "Compromised").then_some(ready)
    })
    .await;
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains("apitoken.dev/rotate"), "{}", ready.message);
    let phase = kubectl_get(&ns.name, &["get", "apitoken", "fixed", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Failed");
    assert_eq!(answers(&base, &leaked), REJECTED, "the status still names it: the index does not take it");
    // Asking for a new token issues one.
    let mut cmd = kubectl();
    cmd.args(["-n", &ns.name, "annotate", "apitoken", "fixed", "apitoken.dev/rotate=after-leak"]);
    ok(run(cmd, None), "kubectl annotate");
    let fresh = issued_token(&tokens, &secrets, "fixed", Some(&leaked)).await;
    assert_eq!(answers(&base, &fresh), ACCEPTED);
    assert_eq!(answers(&base, &leaked), REJECTED);
    let _ = std::fs::remove_dir_all(&dir);
    ns.cleanup().await;
}

/// `kubectl apitoken -n NS ARGS` as kubectl finds the plugin on PATH, with `stdin`.
fn kubectl_apitoken(ns: &str, args: &[&str], stdin: &str) -> support::Out {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-apitoken")).parent().unwrap();
    let mut cmd = kubectl();
    cmd.env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()));
    cmd.args(["apitoken", "-n", ns]).args(args);
    run(cmd, Some(stdin))
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one scenario: who may report, through curl and the plugin
async fn in_cluster_reporters_need_rbac_on_leaks_and_the_plugin_reads_tokens_from_stdin() {
    let Setup { ns, op: _op, base, tokens, secrets, key: _, dir } = setup("leaks-k8s").await;
    // A scanner allowed to report, and a ServiceAccount that is not.
    let apply_yaml = |yaml: String| {
        let mut cmd = kubectl();
        cmd.args(["apply", "-f", "-"]);
        ok(run(cmd, Some(&yaml)), "kubectl apply");
    };
    apply_yaml(format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: scanner, namespace: {n}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: nobody, namespace: {n}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {n}-leak-reporter}}\n\
         rules: [{{apiGroups: [apitoken.dev], resources: [leaks], verbs: [create]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {n}-scanner}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {n}-leak-reporter}}\n\
         subjects: [{{kind: ServiceAccount, name: scanner, namespace: {n}}}]\n",
        n = ns.name
    ));
    let sa_token = |name: &str| {
        let mut cmd = kubectl();
        cmd.args(["-n", &ns.name, "create", "token", name, "--duration", "10m"]);
        ok(run(cmd, None), "kubectl create token").trim().to_string()
    };
    apply(&tokens, "victim", json!({"scopes": ["metrics:read"]})).await;
    let victim = issued_token(&tokens, &secrets, "victim", None).await;
    let body = report_body(&victim, "ci job 42");
    let post = |bearer: Option<String>| {
        let mut args = vec![
            "-X".to_string(),
            "POST".into(),
            format!("{base}/v1/leaks"),
            "--data-binary".into(),
            body.clone(),
        ];
        if let Some(b) = bearer {
            args.extend(["-H".into(), format!("Authorization: Bearer {b}")]);
        }
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Not authenticated, not authorized: nothing changes.
    let r = post(None);
    assert_eq!((r.code, r.body["error"].as_str()), (401, Some("unauthenticated")), "{}", r.raw);
    let r = post(Some("not-a-kubernetes-token".into()));
    assert_eq!(r.code, 401, "{}", r.raw);
    let r = post(Some(sa_token("nobody")));
    assert_eq!((r.code, r.body["error"].as_str()), (403, Some("forbidden")), "{}", r.raw);
    assert!(r.raw.contains("leaks.apitoken.dev"), "{}", r.raw);
    let out = kubectl_apitoken(
        &ns.name,
        &["report-leak", "--server", &base, "--as-service-account", &format!("{}/nobody", ns.name)],
        &format!("{victim}\n"),
    );
    assert!(!out.ok && out.stderr.contains("leaks.apitoken.dev"), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(answers(&base, &victim), ACCEPTED, "refused reports change nothing");

    // The plugin, as the scanner: tokens from stdin (one real, one typo), never in argv.
    let mut typo = victim.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let out = kubectl_apitoken(
        &ns.name,
        &[
            "report-leak",
            "--server",
            &base,
            "--as-service-account",
            &format!("{}/scanner", ns.name),
            "--url",
            "ci job 42",
        ],
        &format!("{victim}\n\n{typo}\n"),
    );
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(lines[0].starts_with("true_positive\tapitok_") && lines[0].contains('…'), "{}", out.stdout);
    assert!(lines[1].starts_with("false_positive\t"), "{}", out.stdout);
    assert!(!out.stdout.contains(&victim) && !out.stderr.contains(&victim), "no token printed");
    assert_eq!(answers(&base, &victim), REJECTED);
    let fresh = issued_token(&tokens, &secrets, "victim", Some(&victim)).await;
    assert_eq!(answers(&base, &fresh), ACCEPTED);
    let status = tokens.get("victim").await.unwrap().status.unwrap();
    assert_eq!(status.leaks[0].reporter, format!("system:serviceaccount:{}:scanner", ns.name));
    assert_eq!(status.leaks[0].url.as_deref(), Some("ci job 42"));

    // The same with curl and the scanner's own token: already dead, false_positive.
    let r = post(Some(sa_token("scanner")));
    assert_eq!((r.code, r.body[0]["label"].as_str()), (200, Some("false_positive")), "{}", r.raw);
    let mut cmd = kubectl();
    cmd.args(["delete", "clusterrole", &format!("{}-leak-reporter", ns.name)]);
    cmd.args(["--ignore-not-found"]);
    let _ = run(cmd, None);
    let mut cmd = kubectl();
    cmd.args(["delete", "clusterrolebinding", &format!("{}-scanner", ns.name), "--ignore-not-found"]);
    let _ = run(cmd, None);
    let _ = std::fs::remove_dir_all(&dir);
    ns.cleanup().await;
}
