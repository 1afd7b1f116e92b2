//! Fault injection on a cluster of its own: the API server goes away for 30 s while traffic
//! flows. Verification keeps answering from its index (expiry still enforced locally); when the
//! server returns the index lists again and a revocation written then applies within seconds.
//! Part of the fault suite (`make test-faults`, run three times by `make test`).

mod support;

use std::time::{Duration, Instant};

use apitoken_operator::api::ApiToken;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use support::operator::Operator;
use support::own_cluster::{OwnCluster, verify_status as verify};
use support::{issued_token, wait_for};

const T: Duration = Duration::from_secs(30);

async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap();
}

#[tokio::test]
async fn verification_survives_an_api_server_outage_and_catches_up() {
    let cluster = OwnCluster::up("faults", "", "faults").await;
    let op = Operator::start_verifying_on("faults", &cluster.kubeconfig);
    let base = op.verify_url.clone().unwrap();
    let tokens: Api<ApiToken> = Api::namespaced(cluster.admin.clone(), "faults");
    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), "faults");
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

    cluster.run("stop-apiserver");
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

    cluster.run("start-apiserver");
    // The watch resumes: a revocation written now reaches the verifier within seconds.
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
}
