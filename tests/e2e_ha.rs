//! High availability: leader election on a Lease. Only the holder reconciles; a SIGKILLed leader
//! is replaced within the lease duration; a clean shutdown hands over at once.

mod support;

use std::time::{Duration, Instant};

use apitoken_operator::api::{ApiToken, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::operator::{Operator, install_crds, lease_holder};
use support::{TestNamespace, wait_for};

const T: Duration = Duration::from_secs(30);

async fn issued(tokens: &Api<ApiToken>, name: &str) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": {}});
    tokens.patch(name, &PatchParams::apply("e2e-user"), &Patch::Apply(&body)).await.unwrap();
    wait_for(&format!("{name} Active"), T, || async {
        (tokens.get(name).await.ok()?.status?.phase == Some(Phase::Active)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn one_leader_reconciles_and_another_takes_over() {
    install_crds().await;
    let ns = TestNamespace::new("ha").await;
    let tokens: Api<ApiToken> = ns.api();
    let leases: Api<Lease> = ns.api();
    let mut a = Operator::start_elected(&ns.name);
    let first = wait_for("a leader", T, || lease_holder(&leases)).await;
    let mut b = Operator::start_elected(&ns.name);
    issued(&tokens, "one").await;
    assert!(a.log_text().contains("became leader"));
    assert!(!b.log_text().contains("became leader"), "the second replica waits");
    assert_eq!(lease_holder(&leases).await.as_deref(), Some(first.as_str()));

    // SIGKILL the leader: the other takes over within the lease duration (15s) plus a retry.
    a.kill();
    let killed = Instant::now();
    let second = wait_for("a new leader", Duration::from_secs(25), || async {
        lease_holder(&leases).await.filter(|h| *h != first)
    })
    .await;
    println!("takeover after SIGKILL: {:?}", killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(20));
    issued(&tokens, "two").await;
    assert!(b.log_text().contains("became leader"));

    // A clean shutdown releases the lease at once; a new replica takes over within a retry.
    b.terminate();
    let stopped = Instant::now();
    wait_for("the lease to be released", Duration::from_secs(5), || async {
        lease_holder(&leases).await.is_none().then_some(())
    })
    .await;
    println!("lease released {:?} after SIGTERM", stopped.elapsed());
    let mut c = Operator::start_elected(&ns.name);
    let third =
        wait_for("the third replica to lead", Duration::from_secs(10), || lease_holder(&leases)).await;
    assert_ne!(third, second);
    issued(&tokens, "three").await;
    c.kill();
    ns.cleanup().await;
}
