//! The product as a person drives it: only `kubectl`, `curl` and manifests — no kube-rs on the
//! user's side. Checks what a person reads: columns, conditions, Events, error text.
//! (The README's first command once failed for every newcomer while every kube-rs test passed:
//! `kubectl get apitoken NAME` was ambiguous.)

mod support;

use std::process::Command;
use std::time::Duration;

use support::operator::Operator;
use support::{Out, TestNamespace, ok, run, wait_for};

const T: Duration = Duration::from_secs(30);

/// `kubectl -n NS ARGS...` as the cluster admin.
fn kubectl(ns: &str, args: &[&str]) -> Out {
    let mut cmd = support::kubectl();
    cmd.args(["-n", ns]).args(args);
    run(cmd, None)
}

/// `kubectl -n NS ARGS... -f -` with `manifest` on stdin.
fn kubectl_apply(ns: &str, args: &[&str], manifest: &str) -> Out {
    let mut cmd = support::kubectl();
    cmd.args(["-n", ns]).args(args).args(["-f", "-"]);
    run(cmd, Some(manifest))
}

/// The repo's CRDs, installed the way the README says (`kubectl apply --server-side -f crds/`).
fn install_crds_with_kubectl() {
    let crds = support::repo_root().join("crds");
    let mut cmd = support::kubectl();
    cmd.args(["apply", "--server-side", "--force-conflicts", "--field-manager=e2e-journey", "-f"]).arg(crds);
    ok(run(cmd, None), "kubectl apply -f crds/");
    let mut wait = support::kubectl();
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/apitokens.apitoken.dev",
        "crd/apitokenpolicies.apitoken.dev",
    ]);
    ok(run(wait, None), "kubectl wait crds");
}

/// Answer of `POST /v1/verify` for `token` (and `audience`), with curl (the token goes on stdin,
/// not argv).
fn curl_verify_for(url: &str, token: &str, audience: &str) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json"]).args([
        "--data-binary",
        "@-",
        &format!("{url}/v1/verify"),
    ]);
    let body = if audience.is_empty() {
        format!("{{\"token\":\"{token}\"}}")
    } else {
        format!("{{\"token\":\"{token}\",\"audience\":\"{audience}\"}}")
    };
    let out = run(cmd, Some(&body));
    out.stdout.trim().parse().unwrap_or_else(|_| panic!("curl: {} {}", out.stdout, out.stderr))
}

fn curl_verify(url: &str, token: &str) -> u16 {
    curl_verify_for(url, token, "")
}

/// The token in `secret`, read the way a person would (jsonpath + base64 -d).
fn token_in(ns: &str, secret: &str) -> String {
    let b64 = ok(kubectl(ns, &["get", "secret", secret, "-o", "jsonpath={.data.token}"]), "get secret");
    let mut cmd = Command::new("base64");
    cmd.arg("-d");
    ok(run(cmd, Some(&b64)), "base64 -d").trim().to_string()
}

fn jsonpath(ns: &str, name: &str, path: &str) -> String {
    kubectl(ns, &["get", "apitoken", name, "-o", &format!("jsonpath={path}")]).stdout
}

/// The columns of a `kubectl get` table: header names, and the row starting with `name`.
fn table_row(table: &str, name: &str) -> (Vec<String>, Vec<String>) {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    // Column starts from the header (cells may contain single spaces, e.g. "LAST USED").
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|(i, c)| *c != ' ' && (*i == 0 || header[..*i].ends_with("  ")))
        .map(|(i, _)| i)
        .collect();
    let cut = |line: &str| -> Vec<String> {
        starts
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let end = starts.get(k + 1).copied().unwrap_or(line.len()).min(line.len());
                line.get(s.min(line.len())..end).unwrap_or("").trim().to_string()
            })
            .collect()
    };
    let row = lines.find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no row {name} in\n{table}"));
    (cut(header), cut(row))
}

fn column<'a>(cols: &'a (Vec<String>, Vec<String>), name: &str) -> &'a str {
    let i = cols.0.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name}: {:?}", cols.0));
    &cols.1[i]
}

fn quickstart(ns: &str) -> String {
    let text = std::fs::read_to_string(support::repo_root().join("examples/quickstart.yaml")).unwrap();
    text.replace("namespace: default", &format!("namespace: {ns}"))
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one person's session, step by step, reads best in one place
async fn kubectl_by_every_name_columns_describe_rotate_revoke() {
    install_crds_with_kubectl();
    let ns = TestNamespace::new("journey").await;
    let n = ns.name.as_str();
    let op = Operator::start_verifying(n);
    let url = op.verify_url.clone().unwrap();

    ok(kubectl_apply(n, &["apply"], &quickstart(n)), "kubectl apply -f examples/quickstart.yaml");
    ok(
        kubectl(n, &["wait", "--for=condition=Ready", "--timeout=30s", "apitoken/metrics-collector"]),
        "kubectl wait --for=condition=Ready",
    );

    // Every name a person may type.
    for kind in ["apitoken", "apitokens", "apitok", "apitoken.apitoken.dev", "apitoken-operator"] {
        let out = ok(kubectl(n, &["get", kind]), &format!("kubectl get {kind}"));
        assert!(out.contains("metrics-collector"), "kubectl get {kind}:\n{out}");
    }
    ok(kubectl(n, &["get", "apitoken", "metrics-collector"]), "kubectl get apitoken NAME");
    ok(kubectl(n, &["get", "apitokenpolicy"]), "kubectl get apitokenpolicy");
    ok(kubectl(n, &["get", "apitokenpolicies"]), "kubectl get apitokenpolicies");

    // The columns: READY, a readable SCOPES, PHASE agreeing with READY; more with -o wide.
    let table = ok(kubectl(n, &["get", "apitoken", "metrics-collector"]), "get");
    let cols = table_row(&table, "metrics-collector");
    assert_eq!(
        cols.0,
        ["NAME", "READY", "TOKEN", "SCOPES", "PHASE", "EXPIRES", "LAST USED", "AGE"],
        "{table}"
    );
    assert_eq!(column(&cols, "READY"), "True", "{table}");
    assert_eq!(column(&cols, "SCOPES"), "metrics:read", "a readable scope list, not JSON:\n{table}");
    assert_eq!(column(&cols, "PHASE"), "Active", "{table}");
    assert!(column(&cols, "TOKEN").starts_with("apitok_") && column(&cols, "TOKEN").contains('…'));
    let wide = ok(kubectl(n, &["get", "apitoken", "metrics-collector", "-o", "wide"]), "get -o wide");
    let cols = table_row(&wide, "metrics-collector");
    assert_eq!(column(&cols, "SECRET"), "metrics-collector-token", "{wide}");
    assert_eq!(column(&cols, "ROTATIONS"), "0", "{wide}");
    assert!(column(&cols, "STATUS").contains("is in Secret and valid"), "{wide}");
    assert!(cols.0.contains(&"CREATOR".to_string()), "{wide}");

    // describe and explain.
    let described = ok(kubectl(n, &["describe", "apitoken", "metrics-collector"]), "describe");
    let by_short = ok(kubectl(n, &["describe", "apitok/metrics-collector"]), "describe apitok/NAME");
    assert!(by_short.contains("TokenActive"), "{by_short}");
    for needle in ["TokenActive", "PolicyCompliant", "ExpiryHandled", "Issued", "metrics-collector-token"] {
        assert!(described.contains(needle), "describe lacks {needle}:\n{described}");
    }
    let explained = ok(kubectl(n, &["explain", "apitoken.spec.rotation"]), "explain");
    assert!(explained.contains("renewBefore") && explained.contains("gracePeriod"), "{explained}");

    // The token works, as curl sees it.
    let token = token_in(n, "metrics-collector-token");
    assert_eq!(curl_verify_for(&url, &token, "data-plane"), 200);
    assert_eq!(curl_verify(&url, &token), 403, "the quickstart token is bound to an audience");

    // Rotate with kubectl annotate, wait with kubectl wait.
    ok(kubectl(n, &["annotate", "apitoken", "metrics-collector", "apitoken.dev/rotate=1"]), "annotate");
    ok(
        kubectl(
            n,
            &[
                "wait",
                "--for=jsonpath={.status.rotationCount}=1",
                "--timeout=30s",
                "apitoken/metrics-collector",
            ],
        ),
        "wait for the rotation",
    );
    let rotated = wait_for("the rotated token in the Secret", T, || async {
        let t = token_in(n, "metrics-collector-token");
        (t != token).then_some(t)
    })
    .await;
    assert_eq!(curl_verify_for(&url, &rotated, "data-plane"), 200);
    assert_eq!(curl_verify_for(&url, &token, "data-plane"), 200, "the previous token is in its grace period");

    // Revoke with kubectl patch: READY and PHASE agree, a Normal Event (the user's own act).
    ok(
        kubectl(
            n,
            &[
                "patch",
                "apitokens",
                "metrics-collector",
                "--type=merge",
                "-p",
                r#"{"spec":{"revoked":true}}"#,
            ],
        ),
        "kubectl patch revoked",
    );
    ok(
        kubectl(
            n,
            &[
                "wait",
                "--for=jsonpath={.status.phase}=Revoked",
                "--timeout=30s",
                "apitoken/metrics-collector",
            ],
        ),
        "wait for Revoked",
    );
    let cols =
        table_row(&ok(kubectl(n, &["get", "apitoken", "metrics-collector"]), "get"), "metrics-collector");
    assert_eq!((column(&cols, "READY"), column(&cols, "PHASE")), ("False", "Revoked"));
    assert_eq!(curl_verify_for(&url, &rotated, "data-plane"), 401);
    let events = ok(
        kubectl(
            n,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=metrics-collector",
                "-o",
                "custom-columns=TYPE:.type,REASON:.reason",
            ],
        ),
        "get events",
    );
    assert!(events.lines().any(|l| l.split_whitespace().eq(["Normal", "Revoked"])), "{events}");
    assert!(events.lines().any(|l| l.split_whitespace().eq(["Normal", "Rotated"])), "{events}");

    // The plugin, found by kubectl on PATH as people install it.
    let plugin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-apitoken")).parent().unwrap();
    let path = format!("{}:{}", plugin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let plugin = |args: &[&str]| {
        let mut cmd = support::kubectl();
        cmd.env("PATH", &path).args(["apitoken", "-n", n]).args(args);
        run(cmd, None)
    };
    let list = ok(plugin(&["list"]), "kubectl apitoken list");
    assert!(list.contains("metrics-collector") && list.contains("Revoked"), "{list}");
    let created = plugin(&["create", "ci", "--scope", "metrics:read", "--lifetime", "1h"]);
    assert!(created.ok, "kubectl apitoken create: {}", created.stderr);
    let printed = created.stdout.trim().to_string();
    assert_eq!(printed, token_in(n, "ci"), "printed once, and it is the one in the Secret");
    assert!(!created.stderr.contains(&printed), "the token is printed on stdout only");
    assert_eq!(curl_verify(&url, &printed), 200);
    let again = plugin(&["create", "ci", "--scope", "metrics:read"]);
    assert!(!again.ok && again.stderr.contains("already exists"), "{}", again.stderr);
    assert_eq!(token_in(n, "ci"), printed, "a refused create changes nothing");

    // Delete by short name and by plural. (Not `delete apitoken-operator --all`: the category
    // holds the cluster-scoped ApiTokenPolicies too, and that would delete every one of them.)
    ok(kubectl(n, &["delete", "apitok", "metrics-collector", "--wait=true"]), "kubectl delete apitok NAME");
    ok(kubectl(n, &["delete", "apitokens", "--all", "--wait=true"]), "kubectl delete apitokens --all");
    let left = kubectl(n, &["get", "apitokens", "-o", "name"]);
    assert!(left.ok && left.stdout.trim().is_empty(), "{}", left.stdout);
    ns.cleanup().await;
}

#[tokio::test]
async fn the_schema_refuses_what_the_secret_could_not_carry() {
    install_crds_with_kubectl();
    let ns = TestNamespace::new("journey-schema").await;
    let n = ns.name.as_str();
    let long_name = "a".repeat(64);
    let cases = [
        ("bad", r#"{"secret": {"labels": {"team": "not a label value!"}}}"#, "secret.labels"),
        ("bad", r#"{"secret": {"labels": {"bad key!": "x"}}}"#, "secret.labels"),
        ("bad", r#"{"secret": {"annotations": {"-bad/": "x"}}}"#, "secret.annotations"),
        ("bad", r#"{"lifetime": "0d"}"#, "lifetime must be longer than zero"),
        (
            "bad",
            r#"{"lifetime": "30d", "rotation": {"gracePeriod": "0s"}}"#,
            "gracePeriod must be longer than zero",
        ),
        (
            "bad",
            r#"{"rotation": {"renewBefore": "100d"}}"#,
            "rotation.renewBefore must be shorter than lifetime",
        ),
        (long_name.as_str(), "{}", "at most 63 characters"),
    ];
    for (name, spec, message) in cases {
        let manifest = format!(
            r#"{{"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {{"name": "{name}"}}, "spec": {spec}}}"#
        );
        let out = kubectl_apply(n, &["apply"], &manifest);
        assert!(!out.ok, "{spec} was accepted");
        assert!(out.stderr.contains(message), "{spec}: the refusal should say {message:?}:\n{}", out.stderr);
    }
    ns.cleanup().await;
}

#[tokio::test]
async fn a_secret_that_cannot_be_written_is_reported_and_not_churned() {
    install_crds_with_kubectl();
    let ns = TestNamespace::new("journey-secret").await;
    let n = ns.name.as_str();
    let _op = Operator::start(n);

    // The API server refuses Secrets with over 256 KiB of annotations: nothing in the ApiToken's
    // own schema can know the total, so the refusal comes at the Secret write.
    let big = "x".repeat(300 * 1024);
    let manifest = format!(
        r#"{{"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {{"name": "big"}},
            "spec": {{"scopes": ["metrics:read"], "secret": {{"annotations": {{"note": "{big}"}}}}}}}}"#
    );
    ok(kubectl_apply(n, &["apply", "--server-side"], &manifest), "apply big");
    ok(
        kubectl(n, &["wait", "--for=jsonpath={.status.phase}=Failed", "--timeout=30s", "apitoken/big"]),
        "wait for Failed",
    );
    let reason = jsonpath(n, "big", r#"{.status.conditions[?(@.type=="Ready")].reason}"#);
    let message = jsonpath(n, "big", r#"{.status.conditions[?(@.type=="Ready")].message}"#);
    assert_eq!(reason, "SecretInvalid");
    assert!(message.contains("Too long") && message.contains("fix the ApiToken"), "{message}");
    let cols = table_row(&ok(kubectl(n, &["get", "apitoken", "big"]), "get"), "big");
    assert_eq!((column(&cols, "READY"), column(&cols, "PHASE")), ("False", "Failed"));
    let events = ok(
        kubectl(
            n,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=big",
                "-o",
                "custom-columns=T:.type,R:.reason",
            ],
        ),
        "events",
    );
    assert!(events.lines().any(|l| l.split_whitespace().eq(["Warning", "SecretInvalid"])), "{events}");

    // No churn: the operator retried every 5 s before. Watch for three times that long that the
    // object is not written again (a negative can only be observed over a window).
    let before = jsonpath(n, "big", "{.metadata.resourceVersion}");
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < until {
        assert_eq!(jsonpath(n, "big", "{.metadata.resourceVersion}"), before, "the ApiToken was rewritten");
        assert!(jsonpath(n, "big", "{.status.tokenHash}").is_empty(), "a token was minted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!kubectl(n, &["get", "secret", "big"]).ok, "no Secret was written");

    // Fixing the spec issues the token.
    ok(
        kubectl_apply(
            n,
            &["apply", "--server-side"],
            r#"{"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "big"},
                "spec": {"scopes": ["metrics:read"], "secret": {"annotations": {"note": "small"}}}}"#,
        ),
        "apply fixed",
    );
    ok(kubectl(n, &["wait", "--for=condition=Ready", "--timeout=30s", "apitoken/big"]), "wait Ready");
    assert!(token_in(n, "big").starts_with("apitok_"));

    // A Secret of someone else's: Failed and READY False, never Active with READY False.
    ok(kubectl(n, &["create", "secret", "generic", "taken", "--from-literal=k=v"]), "create secret");
    ok(
        kubectl_apply(
            n,
            &["apply"],
            r#"{"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "conflict"},
                "spec": {"secret": {"name": "taken"}}}"#,
        ),
        "apply conflict",
    );
    ok(
        kubectl(n, &["wait", "--for=jsonpath={.status.phase}=Failed", "--timeout=30s", "apitoken/conflict"]),
        "wait for Failed",
    );
    let cols = table_row(&ok(kubectl(n, &["get", "apitoken", "conflict", "-o", "wide"]), "get"), "conflict");
    assert_eq!(column(&cols, "READY"), "False");
    assert!(column(&cols, "STATUS").contains("Secret taken exists and is not controlled"), "{cols:?}");
    ns.cleanup().await;
}

#[tokio::test]
async fn a_token_that_stops_complying_keeps_working_until_it_expires() {
    install_crds_with_kubectl();
    let ns = TestNamespace::new("journey-policy").await;
    let n = ns.name.as_str();
    let op = Operator::start_verifying(n);
    let url = op.verify_url.clone().unwrap();
    ok(
        kubectl_apply(
            n,
            &["apply"],
            r#"{"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "old"},
                "spec": {"scopes": ["metrics:read"], "lifetime": "24s",
                         "rotation": {"renewBefore": "12s", "gracePeriod": "5s"}}}"#,
        ),
        "apply",
    );
    ok(kubectl(n, &["wait", "--for=condition=Ready", "--timeout=30s", "apitoken/old"]), "Ready");
    let token = token_in(n, "old");
    let expires: jiff::Timestamp = jsonpath(n, "old", "{.status.expiresAt}").parse().unwrap();
    let renew: jiff::Timestamp = jsonpath(n, "old", "{.status.renewAt}").parse().unwrap();

    // The policy tightens: metrics:* is no longer allowed in this namespace.
    let policy = format!("journey-{n}");
    let manifest = format!(
        r#"{{"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiTokenPolicy", "metadata": {{"name": "{policy}"}},
            "spec": {{"namespaceSelector": {{"matchLabels": {{"kubernetes.io/metadata.name": "{n}"}}}},
                      "allowedScopes": ["logs:*"]}}}}"#
    );
    ok(kubectl_apply(n, &["apply"], &manifest), "apply policy");
    ok(
        kubectl(n, &["wait", "--for=condition=PolicyCompliant=False", "--timeout=30s", "apitoken/old"]),
        "PolicyCompliant=False",
    );
    let message = jsonpath(n, "old", r#"{.status.conditions[?(@.type=="PolicyCompliant")].message}"#);
    assert!(
        message.contains("stays valid until it expires") && message.contains("metrics:read"),
        "{message}"
    );

    // A rotation asked for is refused, visibly; the token keeps working.
    ok(kubectl(n, &["annotate", "apitoken", "old", "apitoken.dev/rotate=now"]), "annotate");
    wait_for("a RotationRefused Event", T, || async {
        let events = kubectl(
            n,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=old",
                "-o",
                "custom-columns=T:.type,R:.reason",
            ],
        )
        .stdout;
        events.lines().any(|l| l.split_whitespace().eq(["Warning", "RotationRefused"])).then_some(())
    })
    .await;
    assert_eq!(jsonpath(n, "old", "{.status.rotationCount}"), "0");

    // Past its scheduled rotation it still works (not rotated, not cut off) ...
    while jiff::Timestamp::now() < renew + jiff::SignedDuration::from_secs(2) {
        assert_eq!(curl_verify(&url, &token), 200, "cut off before its expiry");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(curl_verify(&url, &token), 200);
    assert_eq!(jsonpath(n, "old", "{.status.rotationCount}"), "0", "a non-compliant token is not rotated");
    assert!(jiff::Timestamp::now() < expires);
    // ... and at its expiry it is refused, and the ApiToken is Denied.
    ok(
        kubectl(n, &["wait", "--for=jsonpath={.status.phase}=Denied", "--timeout=30s", "apitoken/old"]),
        "Denied after expiry",
    );
    assert!(jiff::Timestamp::now() >= expires);
    assert_eq!(curl_verify(&url, &token), 401);

    let mut del = support::kubectl();
    del.args(["delete", "apitokenpolicy", &policy]);
    ok(run(del, None), "delete policy");
    ns.cleanup().await;
}
