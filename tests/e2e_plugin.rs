//! `kubectl apitoken` against the real API server with the operator running: what people type,
//! the way they type it, with the exit codes scripts rely on (docs/kubectl-plugin.md).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use apitoken_operator::api::{ApiToken, ApiTokenPolicy};
use apitoken_operator::core::token;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use support::operator::{Operator, chart_fullname, free_port, install_crds};
use support::own_cluster::verify_status;
use support::{TestNamespace, admin_client, cluster, kubeconfig_as, wait_for};

const T: Duration = Duration::from_secs(30);

// The exit codes the plugin documents.
const USAGE: i32 = 2;
const REFUSED: i32 = 3;
const TIMED_OUT: i32 = 4;
const NOT_FOUND: i32 = 5;
const EXISTS: i32 = 6;

/// One run of the plugin.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == 0
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.out, self.err)
    }
}

fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubectl-apitoken"))
}

fn finish(output: std::process::Output) -> Run {
    let std::process::Output { status, stdout, stderr } = output;
    Run {
        // A signal (no code) is reported as -1: never one of the documented codes.
        code: status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&stdout).into_owned(),
        err: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// `kubectl apitoken -n <ns> <args>` with the admin kubeconfig in $KUBECONFIG.
fn plugin(ns: &str, args: &[&str]) -> Run {
    finish(command().args(["-n", ns]).args(args).env("KUBECONFIG", &cluster().kubeconfig).output().unwrap())
}

/// Asserts that no token in `tokens` appears in `text` (stderr, a list, a describe page).
fn no_plaintext(tokens: &[&str], text: &str) {
    for t in tokens {
        assert!(!text.contains(t), "a token's plaintext was printed:\n{text}");
    }
}

/// The token `create` printed: one line on stdout, a valid token.
fn created(run: &Run) -> String {
    assert!(run.ok(), "{run}");
    let t = run.out.trim().to_string();
    assert_eq!(run.out.lines().count(), 1, "stdout holds the token and nothing else: {run}");
    assert!(token::parse(&t).is_ok(), "prints a valid token: {run}");
    no_plaintext(&[&t], &run.err);
    t
}

/// Polls `describe` until its page contains every one of `needles` (Events arrive a moment
/// after the state they report).
async fn describe_until(ns: &str, name: &str, needles: &[&str]) -> String {
    wait_for(&format!("describe {name} showing {needles:?}"), T, || async {
        let run = plugin(ns, &["describe", name]);
        assert!(run.ok(), "{run}");
        needles.iter().all(|n| run.out.contains(n)).then_some(run.out)
    })
    .await
}

/// A cluster-wide ApiTokenPolicy selecting only `ns`, deleted by `delete`.
async fn policy_for(ns: &str, spec: Value) -> String {
    let mut spec = spec;
    spec["namespaceSelector"] = json!({"matchLabels": {"kubernetes.io/metadata.name": ns}});
    let p: ApiTokenPolicy = serde_json::from_value(json!({"metadata": {"name": ns}, "spec": spec})).unwrap();
    Api::<ApiTokenPolicy>::all(admin_client().await).create(&PostParams::default(), &p).await.unwrap();
    ns.to_string()
}

async fn delete_policy(name: &str) {
    let _ = Api::<ApiTokenPolicy>::all(admin_client().await).delete(name, &DeleteParams::default()).await;
}

#[test]
fn help_documents_the_exit_codes() {
    let run = finish(command().arg("--help").output().unwrap());
    assert!(run.ok(), "{run}");
    for line in ["3  refused", "4  timed out", "5  not found", "6  already exists"] {
        assert!(run.out.contains(line), "--help lists `{line}`: {run}");
    }
    for cmd in ["create", "list", "describe", "rotate", "revoke", "regenerate", "reveal", "delete"] {
        assert!(run.out.contains(cmd), "--help lists {cmd}: {run}");
    }
    let run = finish(command().args(["list", "--phase", "bogus"]).output().unwrap());
    assert_eq!(run.code, USAGE, "{run}");
    assert!(
        run.err.contains("bogus")
            && ["Pending", "Active", "Expired", "Revoked", "Denied", "Failed"]
                .iter()
                .all(|p| run.err.contains(p)),
        "names the six phases: {run}"
    );
    let run = finish(command().args(["create", "x"]).output().unwrap());
    assert_eq!(run.code, USAGE, "create needs a scope or a permission set: {run}");
}

/// The table, `-o json` and `-o yaml` (each a `List`), and `--phase`, with one Active token `ci`.
fn check_list(n: &str, token: &str) {
    let run = plugin(n, &["list"]);
    assert!(run.ok(), "{run}");
    let header: Vec<&str> = run.out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TOKEN", "SCOPES", "PHASE", "EXPIRES", "LAST", "USED"]);
    assert!(
        run.out.contains("metrics:read") && run.out.contains("Active") && run.out.contains(&token[..15]),
        "{run}"
    );
    no_plaintext(&[token], &run.out);

    // -o json is a List, as `kubectl get -o json` prints; --phase is case-insensitive.
    for phase in ["active", "ACTIVE", "Active"] {
        let run = plugin(n, &["list", "-o", "json", "--phase", phase]);
        assert!(run.ok(), "{run}");
        no_plaintext(&[token], &run.out);
        let list: Value = serde_json::from_str(&run.out).unwrap();
        assert_eq!(
            (list["apiVersion"].as_str(), list["kind"].as_str()),
            (Some("v1"), Some("List")),
            "{list}"
        );
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{list}");
        assert_eq!(items[0]["kind"], "ApiToken");
        assert_eq!(items[0]["apiVersion"], "apitoken.dev/v1alpha1");
        assert_eq!(items[0]["metadata"]["name"], "ci");
        assert!(items[0]["metadata"].get("managedFields").is_none(), "{list}");
    }
    let run = plugin(n, &["list", "-o", "json", "--phase", "revoked"]);
    let list: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(list["items"], json!([]), "an empty List when nothing matches: {run}");
    let run = plugin(n, &["list", "-o", "yaml"]);
    assert!(run.ok(), "{run}");
    let list: Value = serde_yaml::from_str(&run.out).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["metadata"]["name"], "ci");
    let run = plugin(n, &["list", "--phase", "bogus"]);
    assert_eq!(run.code, USAGE, "{run}");
    assert!(run.err.contains("possible values"), "{run}");
}

#[tokio::test]
async fn create_list_describe_rotate_reveal_revoke() {
    install_crds().await;
    let ns = TestNamespace::new("plugin").await;
    let _op = Operator::start(&ns.name);
    let n = ns.name.as_str();

    let run = plugin(
        n,
        &[
            "create",
            "ci",
            "--scope",
            "metrics:read",
            "--lifetime",
            "30d",
            "--audience",
            "tenant-a",
            "--description",
            "the CI pipeline's metrics reader",
        ],
    );
    let token = created(&run);
    assert!(run.err.contains("Active"), "{run}");

    let run = plugin(n, &["reveal", "ci"]);
    assert!(run.ok(), "{run}");
    assert_eq!(run.out.trim(), token);

    check_list(n, &token);

    // describe: spec, status, conditions with reasons, the Secret, the Events.
    let page = describe_until(n, "ci", &["Issued"]).await;
    for needle in [
        "Phase:",
        "Active",
        "Secret:",
        "metrics:read",
        "tenant-a",
        "the CI pipeline's metrics reader",
        &token[..15],
        "Conditions:",
        "TokenActive",
        "PolicyCompliant",
        "Events:",
    ] {
        assert!(page.contains(needle), "describe shows {needle}:\n{page}");
    }
    no_plaintext(&[&token], &page);

    let run = plugin(n, &["rotate", "ci"]);
    assert!(run.ok(), "{run}");
    assert!(run.out.contains("rotated") && run.out.contains("previous token stays valid"), "{run}");
    no_plaintext(&[&token], &format!("{}{}", run.out, run.err));
    let after = plugin(n, &["reveal", "ci"]).out.trim().to_string();
    assert_ne!(after, token, "a new token after rotation");
    let page = describe_until(n, "ci", &["Rotated"]).await;
    no_plaintext(&[&token, &after], &page);

    let run = plugin(n, &["revoke", "ci"]);
    assert!(run.ok() && run.out.contains("revoked"), "{run}");
    let run = plugin(n, &["reveal", "ci"]);
    assert_eq!(run.code, REFUSED, "nothing to reveal once revoked: {run}");
    assert!(run.err.contains("regenerate"), "{run}");
    let run = plugin(n, &["rotate", "ci"]);
    assert_eq!(run.code, REFUSED, "a revoked token is not rotated: {run}");
    assert!(run.err.contains("Revoked") && run.err.contains("regenerate ci"), "{run}");

    for cmd in ["reveal", "describe", "rotate", "revoke", "regenerate", "delete"] {
        let run = plugin(n, &[cmd, "missing"]);
        assert_eq!(run.code, NOT_FOUND, "{cmd} of a missing name: {run}");
        assert!(run.err.contains(&format!("ApiToken {n}/missing not found")), "{run}");
    }
    let run = plugin(n, &["create", "bad", "--scope", "Not A Scope"]);
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.err.contains("spec.scopes"), "the API server's message: {run}");
    ns.cleanup().await;
}

#[tokio::test]
async fn create_refuses_an_existing_name() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-exists").await;
    let _op = Operator::start(&ns.name);
    let n = ns.name.as_str();
    let token = created(&plugin(n, &["create", "ci", "--scope", "metrics:read"]));
    let before = ns.api::<ApiToken>().get("ci").await.unwrap();

    let run = plugin(n, &["create", "ci", "--scope", "pipeline:write", "--lifetime", "7d"]);
    assert_eq!(run.code, EXISTS, "{run}");
    assert!(run.out.is_empty(), "no token printed: {run}");
    assert!(
        run.err.contains(&format!("ApiToken {n}/ci already exists"))
            && run.err.contains("kubectl apitoken rotate ci")
            && run.err.contains("reveal"),
        "{run}"
    );
    // Nothing changed: not the spec, not the token.
    let after = ns.api::<ApiToken>().get("ci").await.unwrap();
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(after.status.unwrap().token_hash, before.status.unwrap().token_hash);
    let run = plugin(n, &["reveal", "ci"]);
    assert_eq!(run.out.trim(), token, "{run}");
    ns.cleanup().await;
}

#[tokio::test]
async fn waits_stop_at_a_secret_conflict() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-conflict").await;
    let _op = Operator::start(&ns.name);
    let n = ns.name.as_str();
    // A Secret of the token's name that is not the operator's.
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": {"name": "taken"}, "stringData": {"password": "someone else's"}
    }))
    .unwrap();
    let foreign = ns.api::<Secret>().create(&PostParams::default(), &foreign).await.unwrap();

    // A long timeout: the wait ends on the operator's refusal, not on the clock (4 would mean
    // it timed out).
    let run = plugin(n, &["create", "taken", "--scope", "metrics:read", "--timeout", "120s"]);
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.out.is_empty(), "{run}");
    assert!(
        run.err.contains("SecretConflict")
            && run.err.contains("not controlled by this ApiToken")
            && run.err.contains("kubectl apitoken delete taken"),
        "{run}"
    );
    let now = ns.api::<Secret>().get("taken").await.unwrap();
    assert_eq!(now.metadata.resource_version, foreign.metadata.resource_version, "left alone");

    // The contract: phase Failed, Ready=False SecretConflict, and the Warning Event.
    let page = describe_until(n, "taken", &["SecretConflict", "Warning"]).await;
    assert!(page.lines().any(|l| l.starts_with("Phase:") && l.contains("Failed")), "{page}");
    assert!(page.contains("Ready") && page.contains("not controlled by this ApiToken"), "{page}");
    let run = plugin(n, &["rotate", "taken", "--timeout", "120s"]);
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.err.contains("SecretConflict"), "{run}");
    ns.cleanup().await;
}

#[tokio::test]
async fn revoke_then_regenerate_issues_a_new_valid_token() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-regen").await;
    let op = Operator::start_verifying(&ns.name);
    let url = op.verify_url.clone().unwrap();
    let n = ns.name.as_str();
    let first = created(&plugin(n, &["create", "ci", "--scope", "metrics:read"]));
    wait_for("the first token verifies", T, || async { (verify_status(&url, &first) == 200).then_some(()) })
        .await;

    let run = plugin(n, &["regenerate", "ci"]);
    assert_eq!(run.code, REFUSED, "an active token is rotated, not regenerated: {run}");
    assert!(run.err.contains("not revoked") && run.err.contains("kubectl apitoken rotate ci"), "{run}");

    let run = plugin(n, &["revoke", "ci"]);
    assert!(run.ok() && run.out.contains("revoked"), "{run}");
    wait_for("the revoked token is rejected", T, || async {
        (verify_status(&url, &first) == 401).then_some(())
    })
    .await;

    let run = plugin(n, &["regenerate", "ci"]);
    let second = created(&run);
    no_plaintext(&[&first], &run.out);
    assert_ne!(second, first);
    assert!(run.err.contains("Active again"), "{run}");
    wait_for("the regenerated token verifies", T, || async {
        (verify_status(&url, &second) == 200).then_some(())
    })
    .await;
    assert_eq!(verify_status(&url, &first), 401, "the revoked token stays rejected");
    assert_eq!(plugin(n, &["reveal", "ci"]).out.trim(), second);
    let status = ns.api::<ApiToken>().get("ci").await.unwrap().status.unwrap();
    assert_eq!(status.token_hash.as_deref(), Some(token::hash(&second).as_str()));

    // The alias reads as people say it.
    plugin(n, &["revoke", "ci"]);
    let third = created(&plugin(n, &["unrevoke", "ci"]));
    assert!(third != second && third != first);
    ns.cleanup().await;
}

#[tokio::test]
async fn delete_removes_the_token_and_its_secret() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-delete").await;
    let _op = Operator::start(&ns.name);
    let n = ns.name.as_str();
    created(&plugin(n, &["create", "ci", "--scope", "metrics:read"]));
    assert!(ns.api::<Secret>().get_opt("ci").await.unwrap().is_some());

    let run = plugin(n, &["delete", "ci"]);
    assert!(run.ok(), "{run}");
    assert!(run.out.contains(&format!("deleted ApiToken {n}/ci")) && run.out.contains("Secret ci"), "{run}");
    assert!(ns.api::<ApiToken>().get_opt("ci").await.unwrap().is_none(), "gone when delete returns");
    let secrets = ns.api::<Secret>();
    wait_for("the Secret is removed with its ApiToken", T, || async {
        secrets.get_opt("ci").await.unwrap().is_none().then_some(())
    })
    .await;
    let run = plugin(n, &["delete", "ci"]);
    assert_eq!(run.code, NOT_FOUND, "{run}");
    ns.cleanup().await;
}

#[tokio::test]
async fn permission_sets_and_policy_refusals() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-policy").await;
    let mut op = Operator::start(&ns.name);
    let n = ns.name.as_str();
    let policy = policy_for(
        n,
        json!({"allowedScopes": ["metrics:*", "logs:*"], "permissionSets": {"readers": ["metrics:read", "logs:read"]}}),
    )
    .await;

    // Created from a permission set; the Secret and the page show its scopes.
    let token = created(&plugin(
        n,
        &["create", "ci", "--permission-set", "readers", "--display-name", "CI", "--description", "reads"],
    ));
    let page = describe_until(n, "ci", &["Issued"]).await;
    assert!(
        page.contains("readers") && page.contains("logs:read") && page.contains("metrics:read"),
        "{page}"
    );
    no_plaintext(&[&token], &page);

    // Refused by the operator (no webhook here): Denied, at once, with its reason.
    let run = plugin(n, &["create", "nope", "--permission-set", "writers", "--timeout", "120s"]);
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.err.contains("PolicyViolation") && run.err.contains("writers"), "{run}");

    // The policy tightens while the operator is down; a rotation asked for then is refused when
    // it comes back: the token keeps working, and the plugin says so instead of timing out.
    op.kill();
    Api::<ApiTokenPolicy>::all(admin_client().await)
        .patch(
            &policy,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"allowedScopes": ["metrics:*"]}})),
        )
        .await
        .unwrap();
    let rotate = command()
        .args(["-n", n, "rotate", "ci", "--timeout", "120s"])
        .env("KUBECONFIG", &cluster().kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tokens = ns.api::<ApiToken>();
    wait_for("the rotation is requested", T, || async {
        tokens.get("ci").await.unwrap().annotations().contains_key("apitoken.dev/rotate").then_some(())
    })
    .await;
    op.restart();
    let run = finish(rotate.wait_with_output().unwrap());
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.err.contains("logs:read"), "names the violation: {run}");
    let at = tokens.get("ci").await.unwrap();
    assert_eq!(at.status.as_ref().unwrap().phase, Some(apitoken_operator::api::Phase::Active), "still works");
    assert_eq!(plugin(n, &["reveal", "ci"]).out.trim(), token, "the same token");

    // Asked again, the plugin refuses without asking the operator.
    let run = plugin(n, &["rotate", "ci"]);
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.err.contains("no longer complies"), "{run}");
    delete_policy(&policy).await;
    ns.cleanup().await;
}

/// Writes a kubeconfig whose current context points at nothing listening and whose context
/// `local` is the test cluster.
fn two_context_kubeconfig(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&cluster().kubeconfig).unwrap();
    let mut kc: Value = serde_yaml::from_str(&text).unwrap();
    let mut dead = kc["clusters"][0].clone();
    dead["name"] = json!("dead");
    dead["cluster"]["server"] = json!("https://127.0.0.1:1");
    kc["clusters"].as_array_mut().unwrap().push(dead);
    let mut broken = kc["contexts"][0].clone();
    broken["name"] = json!("broken");
    broken["context"]["cluster"] = json!("dead");
    kc["contexts"].as_array_mut().unwrap().push(broken);
    kc["current-context"] = json!("broken");
    let path = dir.join(format!("plugin-two-contexts-{}.kubeconfig", std::process::id()));
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn kubeconfig_and_context_flags() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-flags").await;
    let _op = Operator::start(&ns.name);
    let n = ns.name.as_str();
    created(&plugin(n, &["create", "ci", "--scope", "metrics:read"]));
    let path = two_context_kubeconfig(cluster().kubeconfig.parent().unwrap());
    let path = path.to_str().unwrap();
    // $KUBECONFIG points nowhere: only the flags can find the cluster.
    let with = |args: &[&str]| {
        finish(command().args(args).env("KUBECONFIG", "/nonexistent/kubeconfig").output().unwrap())
    };

    let run = with(&["--kubeconfig", path, "--context", "local", "-n", n, "list"]);
    assert!(run.ok() && run.out.contains("ci"), "{run}");
    // Flags after the subcommand too, as kubectl allows.
    let run = with(&["list", "-n", n, "--context=local", "--kubeconfig", path]);
    assert!(run.ok() && run.out.contains("ci"), "{run}");
    // Without --context the file's current context is used: the dead server.
    let run = with(&["--kubeconfig", path, "-n", n, "list"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.err.contains("talking to the Kubernetes API at https://127.0.0.1:1/ failed"), "{run}");
    let run = with(&["--kubeconfig", path, "--context", "nope", "-n", n, "list"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.err.contains("nope"), "names the missing context: {run}");
    let run = with(&["--kubeconfig", "/nonexistent/other", "list"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.err.contains("/nonexistent/other"), "{run}");
    // As people type it: kubectl finds the plugin on PATH and hands it every argument.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-apitoken")).parent().unwrap();
    let path_var = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let run = finish(
        support::kubectl()
            .args(["apitoken", "--kubeconfig", path, "--context", "local", "-n", n, "list", "-o", "json"])
            .env("PATH", path_var)
            .output()
            .unwrap(),
    );
    assert!(run.ok(), "{run}");
    assert_eq!(serde_json::from_str::<Value>(&run.out).unwrap()["items"][0]["metadata"]["name"], "ci");
    let _ = std::fs::remove_file(path);
    ns.cleanup().await;
}

#[tokio::test]
async fn waits_time_out_without_an_operator() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-timeout").await;
    let n = ns.name.as_str();
    // Nobody reconciles here: the waits end on their timeout, with their own exit code.
    let run = plugin(n, &["create", "ci", "--scope", "metrics:read", "--timeout", "1s"]);
    assert_eq!(run.code, TIMED_OUT, "{run}");
    assert!(run.out.is_empty(), "{run}");
    assert!(run.err.contains("no status yet") && run.err.contains("is the operator running"), "{run}");
    let run = plugin(n, &["rotate", "ci", "--timeout", "1s"]);
    assert_eq!(run.code, TIMED_OUT, "{run}");
    let run = plugin(n, &["revoke", "ci", "--timeout", "1s"]);
    assert_eq!(run.code, TIMED_OUT, "{run}");
    let run = plugin(n, &["reveal", "ci"]);
    assert_eq!(run.code, 1, "not issued yet: {run}");
    assert!(run.err.contains("has no token yet"), "{run}");
    let run = plugin(n, &["delete", "ci"]);
    assert!(run.ok(), "delete needs no operator: {run}");
    ns.cleanup().await;
}

#[tokio::test]
async fn a_refused_secret_write_stops_the_wait() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-write").await;
    let n = ns.name.as_str();
    // No Secret may be written here: the API server refuses the operator's write (403).
    let admin = admin_client().await;
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": n},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["secrets"]}]},
            "validations": [{"expression": "false", "message": "no Secrets in this namespace", "reason": "Forbidden"}]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": n},
        "spec": {
            "policyName": n, "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": n}}}
        }
    }))
    .unwrap();
    let policies = Api::<ValidatingAdmissionPolicy>::all(admin.clone());
    let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(admin.clone());
    policies.create(&PostParams::default(), &policy).await.unwrap();
    bindings.create(&PostParams::default(), &binding).await.unwrap();
    let secrets = ns.api::<Secret>();
    wait_for("Secrets refused in the namespace", T, || async {
        let probe: Secret = serde_json::from_value(json!({"metadata": {"name": "probe"}})).unwrap();
        match secrets.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(s)) if s.code == 403 => Some(()),
            _ => {
                let _ = secrets.delete("probe", &DeleteParams::default()).await;
                None
            }
        }
    })
    .await;
    let _op = Operator::start(n);
    let run = plugin(n, &["create", "ci", "--scope", "metrics:read", "--timeout", "120s"]);
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.out.is_empty(), "{run}");
    assert!(run.err.contains("SecretWriteFailed") && run.err.contains("phase Failed"), "{run}");
    let page = describe_until(n, "ci", &["SecretWriteFailed", "Warning"]).await;
    assert!(page.lines().any(|l| l.starts_with("Phase:") && l.contains("Failed")), "{page}");
    let _ = bindings.delete(n, &DeleteParams::default()).await;
    let _ = policies.delete(n, &DeleteParams::default()).await;
    ns.cleanup().await;
}

/// The operator's validating webhook in front of `ns` only (self-managed TLS; the operator
/// injects its CA), named as the chart names it.
async fn admission_operator(ns: &str) -> Operator {
    let admin = admin_client().await;
    let port = free_port();
    let name = chart_fullname(ns);
    // As the chart registers them: mutate records the creator, validate checks the ceiling.
    let webhook = |path: &str| {
        json!([{
            "name": format!("{path}.apitoken.dev"),
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/admission/{path}")},
            "rules": [{"apiGroups": ["apitoken.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"], "resources": ["apitokens"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 10
        }])
    };
    let validating: ValidatingWebhookConfiguration =
        serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": webhook("validate")})).unwrap();
    let mutating: MutatingWebhookConfiguration =
        serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": webhook("mutate")})).unwrap();
    let configs = Api::<ValidatingWebhookConfiguration>::all(admin.clone());
    configs.create(&PostParams::default(), &validating).await.unwrap();
    let mutating_configs = Api::<MutatingWebhookConfiguration>::all(admin);
    mutating_configs.create(&PostParams::default(), &mutating).await.unwrap();
    let mut op = Operator::start_as_chart(ns, "controller,admission", port);
    op.kill();
    op.args.retain(|a| a != "--plain-http");
    op.restart();
    let has = |b: Option<&k8s_openapi::ByteString>| b.is_some_and(|b| !b.0.is_empty());
    wait_for("caBundle injected", T, || async {
        let v = configs.get(&name).await.ok()?;
        let m = mutating_configs.get(&name).await.ok()?;
        (has(v.webhooks?[0].client_config.ca_bundle.as_ref())
            && has(m.webhooks?[0].client_config.ca_bundle.as_ref()))
        .then_some(())
    })
    .await;
    op
}

#[tokio::test]
async fn admission_refusals_print_the_api_servers_message() {
    install_crds().await;
    let ns = TestNamespace::new("plugin-admission").await;
    let n = ns.name.as_str();
    let _op = admission_operator(n).await;
    // alice may manage ApiTokens here but holds no scope: the ceiling refuses her any.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "apitokens"},
        "rules": [{"apiGroups": ["apitoken.dev"], "resources": ["apitokens"], "verbs": ["create", "get", "list", "patch", "delete"]}]
    }))
    .unwrap();
    ns.api::<Role>().create(&PostParams::default(), &role).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "alice"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "apitokens"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]
    }))
    .unwrap();
    ns.api::<RoleBinding>().create(&PostParams::default(), &binding).await.unwrap();
    let alice = kubeconfig_as("alice", &[]);
    let alice = alice.to_str().unwrap();

    // Until the webhook serves, the API server answers "failed calling webhook": retry that.
    let run = wait_for("the webhook answers", T, || async {
        let run = finish(
            command()
                .args(["--kubeconfig", alice, "-n", n, "create", "ci", "--scope", "metrics:read"])
                .env("KUBECONFIG", "/nonexistent/kubeconfig")
                .output()
                .unwrap(),
        );
        (!run.err.contains("failed calling webhook")).then_some(run)
    })
    .await;
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.out.is_empty(), "{run}");
    assert!(
        run.err.contains("denied the request")
            && run.err.contains("alice may not grant")
            && run.err.contains("metrics:read"),
        "the API server's message: {run}"
    );
    assert!(ns.api::<ApiToken>().get_opt("ci").await.unwrap().is_none(), "nothing was created");
    // RBAC's own refusal: alice may read the ApiToken an admin created, not its Secret.
    let token = created(&plugin(n, &["create", "shared", "--scope", "metrics:read"]));
    let run = finish(
        command()
            .args(["--kubeconfig", alice, "-n", n, "reveal", "shared"])
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, REFUSED, "{run}");
    assert!(run.err.contains("not allowed") && run.err.contains("secrets"), "{run}");
    no_plaintext(&[&token], &format!("{}{}", run.out, run.err));
    let admin = admin_client().await;
    let dp = DeleteParams::default();
    let _ = Api::<ValidatingWebhookConfiguration>::all(admin.clone()).delete(&chart_fullname(n), &dp).await;
    let _ = Api::<MutatingWebhookConfiguration>::all(admin).delete(&chart_fullname(n), &dp).await;
    ns.cleanup().await;
}
