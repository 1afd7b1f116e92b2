//! Policy and admission against the real API server, acting as non-admin users: the scope
//! ceiling from RBAC, policy limits and quotas (per creator, namespace and label), the creator
//! record, revocation and rotation never blocked by policy, policies that cannot be applied
//! refused (schema and webhook) and their status, defence in depth without the webhook, and the
//! self-managed webhook certificate across a renewal.

mod support;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use apitoken_operator::api::{ApiToken, ApiTokenPolicy, Phase};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::operator::{Operator, chart_fullname, free_port, install_crds};
use support::{TestNamespace, admin_client, client_as, issued_token, kubectl, wait_for};

const T: Duration = Duration::from_secs(30);

/// A namespace with the operator's admission webhooks (self-managed TLS) in front of it.
struct Setup {
    ns: TestNamespace,
    op: Operator,
    id: String,
    admin: Client,
    /// The operator's TLS port (verification and admission).
    port: u16,
}

async fn setup(prefix: &str, extra_args: &[&str]) -> Setup {
    install_crds().await;
    let admin = admin_client().await;
    let ns = TestNamespace::new(prefix).await;
    let id = ns.name.clone();
    // The namespace is selected by the webhooks and the policies of this test only.
    let label = json!({"metadata": {"labels": {"apitoken.dev/policy-test": id}}});
    Api::<Namespace>::all(admin.clone())
        .patch(&id, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();

    let port = free_port();
    let webhook_name = chart_fullname(&id);
    for (kind, path) in [("Validating", "validate"), ("Mutating", "mutate")] {
        let mut config = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": format!("{kind}WebhookConfiguration"),
            "metadata": {"name": webhook_name},
            "webhooks": [{
                "name": format!("{path}.apitoken.dev"),
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/admission/{path}")},
                "rules": [{"apiGroups": ["apitoken.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["apitokens"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"apitoken.dev/policy-test": id}},
                "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 10
            }]
        });
        if kind == "Validating" {
            // As the chart registers it; only this test's policies (by label) go through it.
            config["webhooks"].as_array_mut().unwrap().push(json!({
                "name": "validate-policy.apitoken.dev",
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/admission/validate-policy")},
                "rules": [{"apiGroups": ["apitoken.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["apitokenpolicies"], "scope": "Cluster"}],
                "objectSelector": {"matchLabels": {"apitoken.dev/policy-test": id}},
                "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 10
            }));
            let c: ValidatingWebhookConfiguration = serde_json::from_value(config).unwrap();
            Api::<ValidatingWebhookConfiguration>::all(admin.clone())
                .create(&PostParams::default(), &c)
                .await
                .unwrap();
        } else {
            let c: MutatingWebhookConfiguration = serde_json::from_value(config).unwrap();
            Api::<MutatingWebhookConfiguration>::all(admin.clone())
                .create(&PostParams::default(), &c)
                .await
                .unwrap();
        }
    }
    // The operator runs as the chart's ServiceAccount, with the names the chart gives it.
    let mut op = Operator::start_as_chart(&id, "controller,verify,admission", port);
    op.kill();
    op.args.retain(|a| a != "--plain-http");
    op.args.extend(extra_args.iter().map(ToString::to_string));
    op.restart();
    // Ready once the operator has injected its CA into both configurations.
    wait_for("caBundle injected", T, || async {
        let v = Api::<ValidatingWebhookConfiguration>::all(admin.clone()).get(&webhook_name).await.ok()?;
        let m = Api::<MutatingWebhookConfiguration>::all(admin.clone()).get(&webhook_name).await.ok()?;
        let has = |b: Option<&k8s_openapi::ByteString>| b.is_some_and(|b| !b.0.is_empty());
        (has(v.webhooks?[0].client_config.ca_bundle.as_ref())
            && has(m.webhooks?[0].client_config.ca_bundle.as_ref()))
        .then_some(())
    })
    .await;
    Setup { ns, op, id, admin, port }
}

impl Setup {
    /// A Role in the namespace for `user`: manage ApiTokens, plus `scope_rules` on scopes.apitoken.dev.
    async fn grant(&self, user: &str, scope_rules: Value) {
        let mut rules = vec![
            json!({"apiGroups": ["apitoken.dev"], "resources": ["apitokens"], "verbs": ["create", "get", "list", "update", "patch", "delete"]}),
        ];
        rules.extend(scope_rules.as_array().unwrap().iter().cloned());
        let name = format!("{}-grants", user.replace(['@', '.'], "-"));
        let role: Role = serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules})).unwrap();
        self.ns.api::<Role>().create(&PostParams::default(), &role).await.unwrap();
        self.bind(user, "Role", &name).await;
    }

    async fn bind(&self, user: &str, kind: &str, role: &str) {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{}-{}", user.replace(['@', '.'], "-"), role)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        }))
        .unwrap();
        self.ns.api::<RoleBinding>().create(&PostParams::default(), &binding).await.unwrap();
    }

    async fn policy(&self, name: &str, spec: Value) {
        let mut spec = spec;
        spec["namespaceSelector"] = json!({"matchLabels": {"apitoken.dev/policy-test": self.id}});
        let p: ApiTokenPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("{}-{name}", self.id), "labels": {"apitoken.dev/policy-test": self.id}},
            "spec": spec
        }))
        .unwrap();
        Api::<ApiTokenPolicy>::all(self.admin.clone()).create(&PostParams::default(), &p).await.unwrap();
    }

    async fn cleanup(self) {
        let _ = Api::<ValidatingWebhookConfiguration>::all(self.admin.clone())
            .delete(&chart_fullname(&self.id), &DeleteParams::default())
            .await;
        let _ = Api::<MutatingWebhookConfiguration>::all(self.admin.clone())
            .delete(&chart_fullname(&self.id), &DeleteParams::default())
            .await;
        let policies: Api<ApiTokenPolicy> = Api::all(self.admin.clone());
        for p in policies.list(&kube::api::ListParams::default()).await.unwrap() {
            if p.metadata.name.as_deref().is_some_and(|n| n.starts_with(&self.id)) {
                let _ = policies.delete(p.metadata.name.as_deref().unwrap(), &DeleteParams::default()).await;
            }
        }
        drop(self.op);
        self.ns.cleanup().await;
    }
}

/// Creates (or updates) an ApiToken as `client`; the error text on refusal.
async fn apply_as(client: &Client, ns: &str, name: &str, spec: Value) -> Result<ApiToken, String> {
    let api: Api<ApiToken> = Api::namespaced(client.clone(), ns);
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    api.patch(name, &PatchParams::apply("kubectl").force(), &Patch::Apply(&body))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_scope_ceiling_follows_rbac_on_create_and_update() {
    let s = setup("ceiling", &[]).await;
    s.grant(
        "alice",
        json!([{"apiGroups": ["scopes.apitoken.dev"], "resources": ["metrics"], "verbs": ["read"]}]),
    )
    .await;
    s.grant("bob", json!([])).await;
    let pipeline_admin: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-pipeline", s.id)},
        "rules": [{"apiGroups": ["scopes.apitoken.dev"], "resources": ["pipeline"], "verbs": ["*"]}]
    }))
    .unwrap();
    Api::<ClusterRole>::all(s.admin.clone()).create(&PostParams::default(), &pipeline_admin).await.unwrap();
    s.bind("bob", "ClusterRole", &format!("{}-pipeline", s.id)).await;
    let alice = client_as("alice", &[]).await;
    let bob = client_as("bob", &[]).await;
    let ns = s.ns.name.clone();

    apply_as(&alice, &ns, "a-read", json!({"scopes": ["metrics:read"]}))
        .await
        .expect("alice may grant metrics:read");
    let err = apply_as(&alice, &ns, "a-write", json!({"scopes": ["metrics:write"]})).await.unwrap_err();
    println!("alice asks for metrics:write: {err}");
    assert!(err.contains("metrics:write") && err.contains("alice may not grant"), "{err}");
    assert!(!err.contains("metrics:read,"), "only the missing scope is named");

    apply_as(&bob, &ns, "b-pipe", json!({"scopes": ["pipeline:read", "pipeline/prod:write"]}))
        .await
        .expect("* verbs on pipeline");

    // Alice updating bob's token to add a scope she lacks is refused, though bob holds it.
    let err = apply_as(
        &alice,
        &ns,
        "b-pipe",
        json!({"scopes": ["pipeline:read", "pipeline/prod:write", "pipeline/dev:read"]}),
    )
    .await
    .unwrap_err();
    assert!(err.contains("pipeline/dev:read"), "{err}");
    // Changing something else (no new scope) is fine for her.
    apply_as(
        &alice,
        &ns,
        "b-pipe",
        json!({"scopes": ["pipeline:read", "pipeline/prod:write"], "description": "ci"}),
    )
    .await
    .expect("no added scope");

    // The creator is recorded from the admission request, not from the client.
    let tokens: Api<ApiToken> = s.ns.api();
    let created =
        wait_for("status.createdBy", T, || async { tokens.get("b-pipe").await.ok()?.status?.created_by })
            .await;
    assert_eq!(created, "bob");
    let forged = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
        "metadata": {"name": "a-forged", "annotations": {"apitoken.dev/created-by": "mallory"}}, "spec": {"scopes": ["metrics:read"]}});
    let at = Api::<ApiToken>::namespaced(alice.clone(), &ns)
        .patch("a-forged", &PatchParams::apply("kubectl"), &Patch::Apply(&forged))
        .await
        .unwrap();
    assert_eq!(at.metadata.annotations.unwrap()["apitoken.dev/created-by"], "alice");
    let change = json!({"metadata": {"annotations": {"apitoken.dev/created-by": "alice"}}});
    let err = Api::<ApiToken>::namespaced(alice.clone(), &ns)
        .patch("b-pipe", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be changed"), "{err}");
    let _ = Api::<ClusterRole>::all(s.admin.clone())
        .delete(&format!("{}-pipeline", s.id), &DeleteParams::default())
        .await;
    s.cleanup().await;
}

#[tokio::test]
async fn policy_limits_and_quotas_are_refused_naming_field_and_limit() {
    let s = setup("limits", &[]).await;
    s.grant("carol", json!([{"apiGroups": ["scopes.apitoken.dev"], "resources": ["*"], "verbs": ["*"]}]))
        .await;
    s.policy("org", json!({"lifetime": {"max": "30d"}, "allowedScopes": ["metrics:*", "logs:read"], "maxActiveTokens": {"perCreator": 5}})).await;
    s.policy(
        "team",
        json!({"lifetime": {"max": "60d"}, "requireAudiences": true, "maxActiveTokens": {"perNamespace": 6}}),
    )
    .await;
    let carol = client_as("carol", &[]).await;
    let ns = s.ns.name.clone();
    // Give the operator's policy watch a moment to see both policies: retry until refused.
    let err = wait_for("both policies in force", T, || async {
        apply_as(
            &carol,
            &ns,
            "too-long",
            json!({"lifetime": "45d", "audiences": ["x"], "scopes": ["metrics:read"]}),
        )
        .await
        .err()
    })
    .await;
    println!("45d: {err}");
    assert!(
        err.contains("spec.lifetime") && err.contains("30d") && err.contains("org"),
        "the stricter max applies: {err}"
    );
    for (spec, field, limit) in [
        (json!({"lifetime": "never", "audiences": ["x"]}), "spec.lifetime", "allowNever"),
        (json!({"scopes": ["pipeline:write"], "audiences": ["x"]}), "spec.scopes", "allowedScopes"),
        (json!({"scopes": ["metrics:read"]}), "spec.audiences", "requireAudiences"),
    ] {
        let err = apply_as(&carol, &ns, "bad", spec).await.unwrap_err();
        println!("{field}: {err}");
        assert!(err.contains(field), "{err}");
        assert!(
            err.contains(limit) || (limit == "requireAudiences" && err.contains("audience is required")),
            "{err}"
        );
    }
    // Five active tokens per creator; the sixth is refused; revoking one frees a slot.
    for i in 0..5 {
        apply_as(&carol, &ns, &format!("q{i}"), json!({"audiences": ["x"], "scopes": ["metrics:read"]}))
            .await
            .expect("within quota");
    }
    let err = wait_for("the sixth to be refused", T, || async {
        match apply_as(&carol, &ns, "q5", json!({"audiences": ["x"], "scopes": ["metrics:read"]})).await {
            Err(e) => Some(e),
            Ok(_) => {
                let _ = Api::<ApiToken>::namespaced(s.admin.clone(), &ns)
                    .delete("q5", &DeleteParams::default())
                    .await;
                None
            }
        }
    })
    .await;
    assert!(
        err.contains("maxActiveTokens.perCreator")
            && err.contains("limit of ApiTokenPolicy")
            && err.contains('5'),
        "{err}"
    );
    apply_as(&carol, &ns, "q0", json!({"audiences": ["x"], "scopes": ["metrics:read"], "revoked": true}))
        .await
        .unwrap();
    wait_for("a freed slot", T, || async {
        apply_as(&carol, &ns, "q5", json!({"audiences": ["x"], "scopes": ["metrics:read"]})).await.ok()
    })
    .await;
    // Per namespace: six allowed; dave (another creator) is refused the seventh active one.
    s.grant("dave", json!([{"apiGroups": ["scopes.apitoken.dev"], "resources": ["*"], "verbs": ["*"]}]))
        .await;
    let dave = client_as("dave", &[]).await;
    apply_as(&dave, &ns, "d0", json!({"audiences": ["x"], "scopes": ["metrics:read"]}))
        .await
        .expect("sixth active in the namespace");
    let err = wait_for("the seventh in the namespace to be refused", T, || async {
        match apply_as(&dave, &ns, "d1", json!({"audiences": ["x"], "scopes": ["metrics:read"]})).await {
            Err(e) => Some(e),
            Ok(_) => {
                let _ = Api::<ApiToken>::namespaced(s.admin.clone(), &ns)
                    .delete("d1", &DeleteParams::default())
                    .await;
                None
            }
        }
    })
    .await;
    assert!(err.contains("maxActiveTokens.perNamespace"), "{err}");
    s.cleanup().await;
}

#[tokio::test]
async fn without_the_webhook_a_violating_token_is_denied_and_gets_no_secret() {
    let s = setup("depth", &[]).await;
    s.policy("strict", json!({"lifetime": {"max": "7d"}})).await;
    // The operator has seen the policy once its webhook refuses a violation.
    wait_for("the policy to be in force", T, || async {
        apply_as(&s.admin, &s.ns.name, "probe", json!({"lifetime": "30d"})).await.err()
    })
    .await;
    // Admission bypassed: the webhook configurations are gone.
    Api::<ValidatingWebhookConfiguration>::all(s.admin.clone())
        .delete(&chart_fullname(&s.id), &DeleteParams::default())
        .await
        .unwrap();
    Api::<MutatingWebhookConfiguration>::all(s.admin.clone())
        .delete(&chart_fullname(&s.id), &DeleteParams::default())
        .await
        .unwrap();
    let tokens: Api<ApiToken> = s.ns.api();
    let secrets: Api<Secret> = s.ns.api();
    wait_for("the bad token to be accepted by the API server", T, || async {
        apply_as(&s.admin, &s.ns.name, "bypass", json!({"lifetime": "30d"})).await.ok()
    })
    .await;
    let status = wait_for("Denied", T, || async {
        let st = tokens.get("bypass").await.ok()?.status?;
        (st.phase == Some(Phase::Denied)).then_some(st)
    })
    .await;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "PolicyViolation");
    assert!(ready.message.contains("spec.lifetime") && ready.message.contains("7d"), "{}", ready.message);
    let compliant = status.conditions.iter().find(|c| c.type_ == "PolicyCompliant").unwrap();
    assert_eq!(compliant.status, "False");
    assert!(status.token_hash.is_none());
    assert!(matches!(secrets.get_opt("bypass").await, Ok(None)), "no Secret");
    // Fixed: issued.
    apply_as(&s.admin, &s.ns.name, "bypass", json!({"lifetime": "7d"})).await.unwrap();
    wait_for("Active after the fix", T, || async {
        let st = tokens.get("bypass").await.ok()?.status?;
        (st.phase == Some(Phase::Active) && secrets.get_opt("bypass").await.ok()?.is_some()).then_some(())
    })
    .await;
    s.cleanup().await;
}

#[tokio::test]
async fn the_self_managed_certificate_works_from_cold_start_and_across_renewal() {
    // 45s validity: renewed with a third (15s) left, i.e. about 30s after the cold start.
    let s = setup("certs", &["--webhook-cert-validity", "45s"]).await;
    s.grant(
        "erin",
        json!([{"apiGroups": ["scopes.apitoken.dev"], "resources": ["metrics"], "verbs": ["read"]}]),
    )
    .await;
    let erin = client_as("erin", &[]).await;
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), &s.id);
    let tls_secret = format!("{}-webhook-tls", chart_fullname(&s.id));
    let not_after = |sec: &Secret| {
        sec.data
            .as_ref()
            .and_then(|d| d.get("tls.not-after"))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let first = not_after(&secrets.get(&tls_secret).await.unwrap()).unwrap();
    let mut i = 0;
    let renewed = wait_for("the serving certificate to be renewed", Duration::from_secs(60), || {
        i += 1;
        let (erin, secrets, ns, first, tls_secret) =
            (erin.clone(), secrets.clone(), s.ns.name.clone(), first.clone(), tls_secret.clone());
        async move {
            // The API server keeps calling the webhook: every create goes through admission.
            apply_as(&erin, &ns, &format!("c{i}"), json!({"scopes": ["metrics:read"]}))
                .await
                .expect("admission keeps working");
            let now = not_after(&secrets.get(&tls_secret).await.ok()?)?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            (now != first).then_some(now)
        }
    })
    .await;
    println!("serving certificate renewed: not-after {first} -> {renewed}; {i} creates through admission");
    // And after the renewal, still.
    for j in 0..5 {
        apply_as(&erin, &s.ns.name, &format!("after{j}"), json!({"scopes": ["metrics:read"]}))
            .await
            .expect("admission after renewal");
    }
    assert!(s.op.log_text().contains("serving the renewed webhook certificate"));
    s.cleanup().await;
}

/// `kubectl <args>` as admin with `stdin`; (success, stdout, stderr).
fn kubectl_with(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// HTTP status of `POST /v1/verify` for `token` (curl; the token goes on stdin, not argv).
fn verify_status(port: u16, token: &str) -> u16 {
    let mut child = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json"])
        .args(["--data-binary", "@-", &format!("https://127.0.0.1:{port}/v1/verify")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(json!({"token": token}).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[tokio::test]
async fn a_token_a_tightened_policy_made_non_compliant_can_still_be_rotated_and_revoked() {
    let s = setup("revoke", &[]).await;
    s.grant(
        "frank",
        json!([{"apiGroups": ["scopes.apitoken.dev"], "resources": ["metrics"], "verbs": ["read"]}]),
    )
    .await;
    let frank = client_as("frank", &[]).await;
    let ns = s.ns.name.clone();
    apply_as(&frank, &ns, "old", json!({"lifetime": "90d", "scopes": ["metrics:read"]})).await.unwrap();
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (s.ns.api(), s.ns.api());
    let token = issued_token(&tokens, &secrets, "old", None).await;
    wait_for("the token to verify", T, || async { (verify_status(s.port, &token) == 200).then_some(()) })
        .await;

    // The platform tightens the policy: a 90d token is no longer allowed.
    s.policy("tight", json!({"lifetime": {"max": "7d"}})).await;
    wait_for("the tightened policy in force", T, || async {
        apply_as(&frank, &ns, "probe", json!({"lifetime": "30d", "scopes": ["metrics:read"]})).await.err()
    })
    .await;
    // Editing it in a way that keeps it non-compliant is still refused.
    let err = apply_as(
        &frank,
        &ns,
        "old",
        json!({"lifetime": "90d", "scopes": ["metrics:read"], "description": "x"}),
    )
    .await
    .unwrap_err();
    assert!(err.contains("spec.lifetime") && err.contains("7d"), "{err}");

    // Metadata only (the rotate annotation, as `kubectl annotate` and the plugin write it).
    let (ok, out, err) = kubectl_with(
        &["annotate", "-n", &ns, "apitoken", "old", "apitoken.dev/rotate=r1", "--overwrite"],
        "",
    );
    assert!(ok, "the rotate annotation is accepted: {out}{err}");
    // Revocation only takes rights away: never refused by policy.
    let (ok, out, err) = kubectl_with(
        &["patch", "-n", &ns, "apitoken", "old", "--type", "merge", "-p", r#"{"spec":{"revoked":true}}"#],
        "",
    );
    assert!(ok, "revoking is accepted: {out}{err}");
    wait_for("the revoked token to be rejected", T, || async {
        (verify_status(s.port, &token) == 401).then_some(())
    })
    .await;
    wait_for("Revoked", T, || async {
        (tokens.get("old").await.ok()?.status?.phase == Some(Phase::Revoked)).then_some(())
    })
    .await;
    // Un-revoking asks for a new token: reviewed against the policy as any grant.
    let (ok, _, err) = kubectl_with(
        &["patch", "-n", &ns, "apitoken", "old", "--type", "merge", "-p", r#"{"spec":{"revoked":false}}"#],
        "",
    );
    assert!(!ok && err.contains("spec.lifetime"), "un-revoking a non-compliant token is refused: {err}");
    s.cleanup().await;
}

#[tokio::test]
async fn a_policy_that_cannot_be_applied_is_refused_and_a_valid_one_reports_what_it_selects() {
    let s = setup("polstatus", &[]).await;
    let policy = |name: &str, spec: &str| {
        format!(
            "apiVersion: apitoken.dev/v1alpha1\nkind: ApiTokenPolicy\nmetadata:\n  name: {}-{name}\n  labels: {{apitoken.dev/policy-test: {}}}\nspec:\n{spec}\n",
            s.id, s.id
        )
    };
    // Refused by the schema (CEL rules, the operator enum) or by the webhook, each naming the field.
    for (name, spec, expected) in [
        ("zero", "  lifetime: {max: 0d}", "lifetime.max must be longer than zero"),
        (
            "order",
            "  lifetime: {default: 90d, max: 30d}",
            "lifetime.default must not be longer than lifetime.max",
        ),
        (
            "operator",
            "  namespaceSelector:\n    matchExpressions: [{key: tier, operator: Equals, values: [prod]}]",
            "Unsupported value: \"Equals\"",
        ),
        (
            "values",
            "  namespaceSelector:\n    matchExpressions: [{key: tier, operator: In}]",
            "In and NotIn need at least one value",
        ),
        ("scope", "  permissionSets: {read-only: [metrics]}", "spec.permissionSets"),
        (
            "setname",
            "  permissionSets: {Read Only: [metrics:read]}",
            "permissionSets: 'Read Only' is not a valid name",
        ),
    ] {
        let (ok, out, err) = kubectl_with(&["apply", "-f", "-"], &policy(name, spec));
        println!("{name}: {err}");
        assert!(!ok, "{name} is refused: {out}");
        assert!(err.contains(expected), "{name}: expected '{expected}' in: {err}");
    }
    // A valid one: Ready, and what it selects, where people look.
    let (ok, out, err) = kubectl_with(
        &["apply", "-f", "-"],
        &policy(
            "ok",
            &format!(
                "  namespaceSelector: {{matchLabels: {{apitoken.dev/policy-test: {}}}}}\n  lifetime: {{max: 30d}}",
                s.id
            ),
        ),
    );
    assert!(ok, "{out}{err}");
    for name in ["one", "two"] {
        apply_as(&s.admin, &s.ns.name, name, json!({"lifetime": "7d"})).await.unwrap();
    }
    let name = format!("{}-ok", s.id);
    let row = wait_for("Ready True, 1 namespace, 2 tokens", T, || async {
        let out = kubectl().args(["get", "apitokenpolicy", &name]).output().ok()?;
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next()?.split_whitespace().collect();
        let row: Vec<&str> = lines.next()?.split_whitespace().collect();
        let col = |h: &str| header.iter().position(|c| *c == h).and_then(|i| row.get(i).copied());
        (col("READY") == Some("True") && col("NAMESPACES") == Some("1") && col("TOKENS") == Some("2"))
            .then_some(table)
    })
    .await;
    println!("{row}");
    let status = Api::<ApiTokenPolicy>::all(s.admin.clone()).get(&name).await.unwrap().status.unwrap();
    let ready = &status.conditions[0];
    assert_eq!((ready.type_.as_str(), ready.reason.as_str()), ("Ready", "Valid"));
    assert_eq!(ready.message, "in force in 1 namespace with 2 ApiTokens");
    assert_eq!(status.observed_generation, Some(1));
    s.cleanup().await;
}

#[tokio::test]
async fn the_per_label_quota_counts_tokens_per_label_value() {
    let s = setup("perlabel", &[]).await;
    // GitOps: every token is applied by the same ServiceAccount; teams are told apart by a label.
    s.policy("teams", json!({"maxActiveTokens": {"perLabel": {"label": "team", "max": 2}}})).await;
    let api: Api<ApiToken> = s.ns.api();
    let apply = |name: &str, team: Option<&str>| {
        let api = api.clone();
        let mut body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
            "metadata": {"name": name}, "spec": {"scopes": ["metrics:read"]}});
        if let Some(t) = team {
            body["metadata"]["labels"] = json!({"team": t});
        }
        let name = name.to_string();
        async move {
            api.patch(&name, &PatchParams::apply("argocd-controller").force(), &Patch::Apply(&body))
                .await
                .map_err(|e| e.to_string())
        }
    };
    for name in ["a1", "a2"] {
        apply(name, Some("payments")).await.expect("within the quota of team=payments");
    }
    // The third of team=payments is refused (once the census has counted the first two).
    let err = wait_for("the third payments token to be refused", T, || async {
        match apply("a3", Some("payments")).await {
            Err(e) => Some(e),
            Ok(_) => {
                let _ = api.delete("a3", &DeleteParams::default()).await;
                None
            }
        }
    })
    .await;
    println!("a3: {err}");
    assert!(
        err.contains("maxActiveTokens.perLabel")
            && err.contains("team=payments")
            && err.contains(&format!("{}-teams", s.id)),
        "{err}"
    );
    // Another value has a count of its own; a token without the label is not counted.
    apply("b1", Some("search")).await.expect("team=search is counted apart");
    apply("u1", None).await.expect("unlabelled tokens are not counted by perLabel");
    // Revoking one frees a slot for its value.
    let (ok, _, err) = kubectl_with(
        &[
            "patch",
            "-n",
            &s.ns.name,
            "apitoken",
            "a1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"revoked":true}}"#,
        ],
        "",
    );
    assert!(ok, "{err}");
    wait_for("a freed payments slot", T, || async { apply("a3", Some("payments")).await.ok() }).await;
    s.cleanup().await;
}
