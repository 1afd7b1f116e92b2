//! Fault injection on a cluster of its own: the API server goes away for 30 s while traffic
//! flows. Verification keeps answering from its index (expiry still enforced locally); when the
//! server returns the index lists again and a revocation written then applies within seconds.
//! Run with `make test-faults` (not part of `make test` until the recovery after a restart is
//! understood: once, under CI load, it did not happen within 20 s).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use apitoken_operator::api::ApiToken;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::operator::{Operator, free_port, install_crds_with};
use support::{client_from, issued_token, repo_root, wait_for};

const T: Duration = Duration::from_secs(30);

fn local_cluster(args: &[&str]) -> String {
    let out = Command::new(repo_root().join("hack/local-cluster")).args(args).output().unwrap();
    assert!(out.status.success(), "local-cluster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn verify(base: &str, t: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            "-X",
            "POST",
            &format!("{base}/v1/verify"),
        ])
        .args(["-d", &json!({"token": t}).to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap();
}

#[tokio::test]
async fn verification_survives_an_api_server_outage_and_catches_up() {
    let name = format!("faults-{}", std::process::id());
    local_cluster(&["up", &name, "--owner-pid", &std::process::id().to_string()]);
    let env = local_cluster(&["env", &name]);
    let kubeconfig: std::path::PathBuf =
        env.lines().find_map(|l| l.strip_prefix("export KUBECONFIG=")).unwrap().into();
    let admin = client_from(&kubeconfig).await;
    install_crds_with(admin.clone()).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "faults"}})).unwrap();
    Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.unwrap();
    let mut op = Operator::start_on("faults", "controller,verify", &kubeconfig, free_port());
    // This test polls an expired token from one address: keep the failure limiter out of it.
    op.kill();
    op.args.extend([
        "--failures-per-second".into(),
        "100000".into(),
        "--failures-burst".into(),
        "100000".into(),
    ]);
    op.restart();
    let base = op.verify_url.clone().unwrap();
    let tokens: Api<ApiToken> = Api::namespaced(admin.clone(), "faults");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "faults");
    apply(&tokens, "live", json!({})).await;
    apply(&tokens, "later", json!({})).await;
    apply(&tokens, "brief", json!({"lifetime": "20s", "rotation": {"enabled": false}})).await;
    let (live, later, brief) = (
        issued_token(&tokens, &secrets, "live", None).await,
        issued_token(&tokens, &secrets, "later", None).await,
        issued_token(&tokens, &secrets, "brief", None).await,
    );
    let expires = tokens.get("brief").await.unwrap().status.unwrap().expires_at.unwrap().0;
    wait_for("the verifier to accept all three", T, || async {
        [&live, &later, &brief].iter().all(|t| verify(&base, t) == 200).then_some(())
    })
    .await;

    local_cluster(&["stop-apiserver", &name]);
    let down = Instant::now();
    let (mut answered, mut brief_refused_after_expiry) = (0, false);
    while down.elapsed() < Duration::from_secs(30) {
        assert_eq!(verify(&base, &live), 200, "a valid token keeps working while the API server is down");
        let before = jiff::Timestamp::now();
        let b = verify(&base, &brief);
        let after = jiff::Timestamp::now();
        if before >= expires {
            assert_eq!(b, 401, "expiry is enforced locally, to the second");
            brief_refused_after_expiry = true;
        } else if after < expires {
            assert_eq!(b, 200);
        }
        answered += 2;
    }
    assert!(brief_refused_after_expiry, "the outage covered the expiry");
    println!("{answered} verifications answered during a 30s API server outage");

    local_cluster(&["start-apiserver", &name]);
    // The watch resumes: a revocation written now reaches the verifier within a second.
    let revoked = wait_for("the API server to accept writes", T, || async {
        let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "later"}, "spec": {"revoked": true}});
        tokens.patch("later", &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.ok().map(|_| Instant::now())
    })
    .await;
    wait_for("the revocation to apply after the outage", Duration::from_secs(20), || async {
        (verify(&base, &later) == 401).then_some(())
    })
    .await;
    // Measured: 3-5 s, bounded by the restarted API server, which answers 503 for custom
    // resources for a few seconds after /readyz and holds resumed watches until its watch cache
    // is ready. Design §7's "within 1 s" holds while the API server is up (e2e_verify).
    println!("revocation after the outage applied in {:?}", revoked.elapsed());
    assert!(revoked.elapsed() < Duration::from_secs(10), "after the outage: {:?}", revoked.elapsed());
    // And issuance works again.
    apply(&tokens, "after", json!({})).await;
    let after = issued_token(&tokens, &secrets, "after", None).await;
    wait_for("the new token to verify", T, || async { (verify(&base, &after) == 200).then_some(()) }).await;
    drop(op);
    local_cluster(&["down", &name]);
}
