//! kube-apiserver as a TokenReview client: a cluster started with
//! `--authentication-token-webhook-config-file` pointing at our endpoint accepts an ApiToken as a
//! bearer token, and `kubectl auth whoami` names `apitoken:<ns>:<name>`.

mod support;

use std::process::Command;
use std::time::Duration;

use apitoken_operator::api::ApiToken;
use apitoken_operator::core::token;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::operator::{Operator, free_port, install_crds_with};
use support::{client_from, cluster, repo_root, wait_for};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn kube_apiserver_authenticates_an_api_token_through_our_webhook() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("apitoken-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let webhook = dir.join("webhook.kubeconfig");
    std::fs::write(
        &webhook,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: apitoken\n  cluster:\n    server: http://127.0.0.1:{port}/apis/authentication.k8s.io/v1/tokenreviews\nusers:\n- name: kube-apiserver\n  user: {{}}\ncontexts:\n- name: webhook\n  context: {{cluster: apitoken, user: kube-apiserver}}\ncurrent-context: webhook\n"
        ),
    )
    .unwrap();
    let name = format!("webhook-{}", std::process::id());
    let extra = format!(
        "--authentication-token-webhook-config-file={} --authentication-token-webhook-cache-ttl=1s --authentication-token-webhook-version=v1",
        webhook.display()
    );
    let up = Command::new(repo_root().join("hack/local-cluster"))
        .args(["up", &name, "--owner-pid", &std::process::id().to_string()])
        .env("APITOKEN_APISERVER_EXTRA_ARGS", extra)
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let env = String::from_utf8(
        Command::new(repo_root().join("hack/local-cluster")).args(["env", &name]).output().unwrap().stdout,
    )
    .unwrap();
    let admin_kubeconfig: std::path::PathBuf =
        env.lines().find_map(|l| l.strip_prefix("export KUBECONFIG=")).unwrap().into();
    let admin = client_from(&admin_kubeconfig).await;
    install_crds_with(admin.clone()).await;
    let ns_name = "team-a";
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.unwrap();
    let _op = Operator::start_on(ns_name, "controller,verify", &admin_kubeconfig, port);

    let tokens: Api<ApiToken> = Api::namespaced(admin.clone(), ns_name);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns_name);
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "ci-bot"}, "spec": {"scopes": ["metrics:read"]}});
    tokens.patch("ci-bot", &PatchParams::apply("e2e-user"), &Patch::Apply(&body)).await.unwrap();
    let plaintext = wait_for("ci-bot issued", T, || async {
        let s = tokens.get("ci-bot").await.ok()?.status?;
        let t =
            String::from_utf8(secrets.get_opt("ci-bot").await.ok()??.data?.get("token")?.0.clone()).ok()?;
        (Some(token::hash(&t).as_str()) == s.token_hash.as_deref()).then_some(t)
    })
    .await;

    // A kubeconfig with nothing but the server, its CA and the bearer token.
    let ca = admin_kubeconfig.parent().unwrap().join("pki/ca.crt");
    let server = std::fs::read_to_string(&admin_kubeconfig)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: ").map(str::to_string))
        .unwrap();
    let whoami = |t: &str| {
        Command::new(cluster().bin_dir.join("kubectl"))
            .args(["--server", &server, "--certificate-authority", ca.to_str().unwrap(), "--token", t])
            .args(["--kubeconfig", "/dev/null", "auth", "whoami", "-o", "json"])
            .output()
            .unwrap()
    };
    let out = wait_for("kubectl auth whoami with the token", T, || async {
        let out = whoami(&plaintext);
        out.status.success().then_some(out)
    })
    .await;
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("kubectl auth whoami: {}", review["status"]["userInfo"]);
    assert_eq!(review["status"]["userInfo"]["username"], "apitoken:team-a:ci-bot");
    assert!(
        review["status"]["userInfo"]["groups"].as_array().unwrap().contains(&json!("apitoken:authenticated"))
    );
    assert_eq!(review["status"]["userInfo"]["extra"]["apitoken.dev/scopes"], json!(["metrics:read"]));

    // Revoked: the API server refuses it (the webhook cache TTL is 1s).
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "ci-bot"}, "spec": {"scopes": ["metrics:read"], "revoked": true}});
    tokens.patch("ci-bot", &PatchParams::apply("e2e-user"), &Patch::Apply(&body)).await.unwrap();
    wait_for("the API server to refuse the revoked token", T, || async {
        let out = whoami(&plaintext);
        (!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Unauthorized")).then_some(())
    })
    .await;
    let garbage = whoami("apitok_not-a-token");
    assert!(!garbage.status.success());
    let _ = Command::new(repo_root().join("hack/local-cluster")).args(["down", &name]).output();
}
