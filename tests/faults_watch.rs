//! Fault injection on a cluster of its own: a replica is partitioned from the API server (its
//! connections freeze) while tokens are deleted, revoked and rotated; etcd restarts and is
//! compacted past everything the replica saw. When the partition heals, the replica's watches
//! get 410 Gone and it lists again — and from then on it serves no deleted, revoked or
//! rotated-away token, and issues nothing twice.
//! Part of the fault suite (`make test-faults`, run three times by `make test`).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use apitoken_operator::api::{ApiToken, Phase};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::operator::Operator;
use support::own_cluster::{OwnCluster, verify_status as verify};
use support::proxy::Proxy;
use support::{issued_token, wait_for};

const T: Duration = Duration::from_secs(30);

async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap();
}

/// POSTs `body` to etcd's JSON gateway.
fn etcd(port: &str, path: &str, body: &Value) -> Value {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", "-X", "POST", &format!("http://127.0.0.1:{port}{path}")])
        .args(["-d", &body.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "etcd {path}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Compacts etcd at its current revision: no watch can resume from before now.
fn compact_etcd(cluster: &OwnCluster) -> i64 {
    let port = std::fs::read_to_string(cluster.dir().join("etcd-port")).unwrap();
    let port = port.trim();
    let range = etcd(port, "/v3/kv/range", &json!({"key": "AA==", "limit": 1}));
    let rev: i64 = range["header"]["revision"].as_str().unwrap().parse().unwrap();
    etcd(port, "/v3/kv/compaction", &json!({"revision": rev.to_string(), "physical": true}));
    rev
}

#[tokio::test]
async fn a_partitioned_replica_relists_after_etcd_restart_and_serves_nothing_stale() {
    // Without the watch cache, a watch resumed from a compacted revision gets 410 from etcd
    // itself, deterministically.
    let cluster = OwnCluster::up("faultsw", "--watch-cache=false", "faults").await;
    let proxy = Proxy::start(cluster.apiserver()).await;
    let op = Operator::start_verifying_on("faults", &cluster.kubeconfig_via(proxy.port));
    let base = op.verify_url.clone().unwrap();
    let tokens: Api<ApiToken> = Api::namespaced(cluster.admin.clone(), "faults");
    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), "faults");
    // Never verified (so no lastUsedAt write changes it) and never touched after it is issued,
    // first of all (its issuance has long settled when the partition starts).
    apply(&tokens, "idle", json!({})).await;
    issued_token(&tokens, &secrets, "idle", None).await;
    for name in ["stay", "gone", "revoked"] {
        apply(&tokens, name, json!({})).await;
    }
    apply(&tokens, "turned", json!({"rotation": {"gracePeriod": "1s"}})).await;
    let mut issued = Vec::new();
    for name in ["stay", "gone", "revoked", "turned"] {
        issued.push(issued_token(&tokens, &secrets, name, None).await);
    }
    let [stay, gone, revoked, turned] = <[String; 4]>::try_from(issued).unwrap();
    let all = [&stay, &gone, &revoked, &turned];
    wait_for("the replica to accept all four", T, || async {
        all.iter().all(|t| verify(&base, t) == 200).then_some(())
    })
    .await;
    let stay_before = tokens.get("stay").await.unwrap().status.unwrap();
    let turned_before = tokens.get("turned").await.unwrap().status.unwrap();
    let gone_secret = tokens.get("gone").await.unwrap().status.unwrap().secret_name.unwrap();

    // Partition the replica, then change things it cannot see.
    proxy.freeze();
    tokens.delete("gone", &DeleteParams::default()).await.unwrap();
    apply(&tokens, "revoked", json!({"revoked": true})).await;
    apply(&tokens, "turned", json!({"rotation": {"gracePeriod": "1s", "trigger": "after-partition"}})).await;
    for t in all {
        assert_eq!(verify(&base, t), 200, "the partitioned replica answers from what it last saw");
    }
    cluster.run("restart-etcd");
    wait_for("the API server to accept writes after the etcd restart", T, || async {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}});
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(cluster.admin.clone(), "faults");
        cms.patch("probe", &PatchParams::apply("e2e"), &Patch::Apply(&body)).await.ok()
    })
    .await;
    let rev = compact_etcd(&cluster);
    println!("etcd restarted and compacted at revision {rev}");

    // The partition heals: old connections are gone, new ones work.
    let lines_at_heal = op.log_text().lines().count();
    proxy.cut_and_thaw();
    let healed = Instant::now();
    let rotated = issued_token(&tokens, &secrets, "turned", Some(&turned)).await;
    wait_for("the replica to converge", T, || async {
        (verify(&base, &gone) == 401
            && verify(&base, &revoked) == 401
            && verify(&base, &turned) == 401
            && verify(&base, &rotated) == 200
            && verify(&base, &stay) == 200)
            .then_some(())
    })
    .await;
    println!("converged {:?} after the partition healed", healed.elapsed());
    let log = op.log_text();
    let gone_410 = log.lines().find(|l| l.contains("code: 410"));
    println!("410 seen: {gone_410:?}");
    assert!(gone_410.is_some(), "a watch resumed from before the compaction got 410 Gone");

    // The re-list brings every object back; only what changed is reconciled. "idle" did not
    // change: reconciling it again would only read its Secret (at 100,000 tokens, 100,000 reads
    // that held up the index's own list).
    let reconciled = |name: &str| {
        let line = format!("reconciled name=\"{name}\"");
        op.log_text().lines().skip(lines_at_heal).filter(|l| l.contains(&line)).count()
    };
    // The rotation's reconcile logs "reconciled" when its last step is done, which may be just
    // after the Secret showed the new token.
    wait_for("the changed token's reconcile to finish", T, || async {
        (reconciled("turned") > 0).then_some(())
    })
    .await;
    println!("reconciles after the re-list: idle {}, turned {}", reconciled("idle"), reconciled("turned"));
    assert!(reconciled("turned") > 0, "the changed token is reconciled (the log shows reconciles)");
    assert_eq!(reconciled("idle"), 0, "the unchanged token is not reconciled again after the re-list");

    // Nothing issued twice, nothing stale.
    let stay_after = tokens.get("stay").await.unwrap().status.unwrap();
    assert_eq!(stay_after.token_hash, stay_before.token_hash);
    assert_eq!(stay_after.rotation_count, stay_before.rotation_count);
    let turned_after = tokens.get("turned").await.unwrap().status.unwrap();
    assert_eq!(turned_after.rotation_count, turned_before.rotation_count + 1, "one rotation for one trigger");
    let revoked_status = tokens.get("revoked").await.unwrap().status.unwrap();
    assert_eq!(revoked_status.phase, Some(Phase::Revoked));
    wait_for("the revoked and deleted tokens' Secrets to go", T, || async {
        let gone_secret = secrets.get_opt(&gone_secret).await.ok()?;
        let revoked_secret = secrets.get_opt(revoked_status.secret_name.as_deref()?).await.ok()?;
        (gone_secret.is_none() && revoked_secret.is_none()).then_some(())
    })
    .await;
    for t in [&gone, &revoked, &turned] {
        assert_eq!(verify(&base, t), 401, "still refused");
    }
    drop(op);
}
