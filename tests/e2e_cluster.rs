//! The local control plane is a real Kubernetes: CRDs, server-side apply, watches, RBAC and
//! garbage collection behave as in a cluster.

mod support;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, CustomResourceExt};
use serde_json::json;
use support::{TestNamespace, admin_client, client_as, wait_for};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn server_reports_the_pinned_version() {
    let client = admin_client().await;
    let info = client.apiserver_version().await.unwrap();
    let versions = std::fs::read_to_string(support::repo_root().join("hack/versions.sh")).unwrap();
    let pinned = versions.lines().find_map(|l| l.strip_prefix("KUBE_VERSION=")).unwrap();
    assert_eq!(info.git_version, pinned);
}

#[tokio::test]
async fn crd_installs_and_becomes_established() {
    let client = admin_client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let crd = apitoken_operator::api::ApiToken::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(&name, &PatchParams::apply("apitoken-e2e").force(), &Patch::Apply(&crd)).await.unwrap();
    wait_for("CRD Established", T, || async {
        let crd = crds.get(&name).await.ok()?;
        let established =
            crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

#[tokio::test]
async fn server_side_apply_records_the_field_manager_and_detects_conflicts() {
    let ns = TestNamespace::new("ssa").await;
    let cms: Api<ConfigMap> = ns.api();
    let cm =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1"}});
    let applied = cms.patch("cfg", &PatchParams::apply("manager-a"), &Patch::Apply(&cm)).await.unwrap();
    let managers: Vec<_> =
        applied.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.contains(&"manager-a".to_string()), "{managers:?}");

    // A second manager changing the same field without force is a conflict, not a silent win.
    let other =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "2"}});
    let err = cms.patch("cfg", &PatchParams::apply("manager-b"), &Patch::Apply(&other)).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err:?}");
    assert_eq!(cms.get("cfg").await.unwrap().data.unwrap()["a"], "1");
    ns.cleanup().await;
}

#[tokio::test]
async fn a_watch_delivers_events() {
    let ns = TestNamespace::new("watch").await;
    let cms: Api<ConfigMap> = ns.api();
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    // The initial list completes before the object exists, so the Apply below is a live event.
    loop {
        match tokio::time::timeout(T, events.try_next()).await.unwrap().unwrap() {
            Some(watcher::Event::InitDone) => break,
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "seen"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // Other writers share the namespace (the controller-manager publishes kube-root-ca.crt
    // into every new one), so wait for our object among whatever else arrives.
    let seen = tokio::time::timeout(T, async {
        loop {
            match events.try_next().await.unwrap() {
                Some(watcher::Event::Apply(cm)) if cm.metadata.name.as_deref() == Some("seen") => return cm,
                Some(_) => {}
                None => panic!("watch ended"),
            }
        }
    })
    .await
    .expect("an Apply event for the created ConfigMap within the timeout");
    assert_eq!(seen.metadata.namespace.as_deref(), Some(ns.name.as_str()));
    ns.cleanup().await;
}

#[tokio::test]
async fn rbac_denies_a_non_admin_user_until_a_role_allows_it() {
    let ns = TestNamespace::new("rbac").await;
    let alice = client_as("alice@example.com", &["team-a"]).await;
    let as_alice: Api<Secret> = Api::namespaced(alice, &ns.name);
    let err = as_alice.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 403), "{err:?}");
    assert!(err.to_string().contains("alice@example.com"), "{err}");

    // The same user is allowed once a RoleBinding for her group exists: the identity is real.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "secret-reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "secret-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "team-a"}]
    }))
    .unwrap();
    ns.api::<Role>().create(&PostParams::default(), &role).await.unwrap();
    ns.api::<RoleBinding>().create(&PostParams::default(), &binding).await.unwrap();
    wait_for("RBAC to allow alice", T, || async { as_alice.list(&ListParams::default()).await.ok() }).await;
    ns.cleanup().await;
}

/// The controllers run with their own ServiceAccount credentials (as kubeadm runs them): with
/// the controller-manager's own user instead, GC could only delete Secrets ("cannot delete
/// resource configmaps") and `kube-root-ca.crt` was never published.
#[tokio::test]
async fn garbage_collection_of_another_kind_and_the_root_ca_in_every_namespace() {
    let ns = TestNamespace::new("gc-kinds").await;
    let cms: Api<ConfigMap> = ns.api();
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
    let child: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid.unwrap(), "controller": true
        }]},
        "data": {"k": "v"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &child).await.unwrap();
    wait_for("kube-root-ca.crt in the new namespace", Duration::from_secs(60), || async {
        let cm = cms.get_opt("kube-root-ca.crt").await.ok()??;
        cm.data?.get("ca.crt")?.contains("BEGIN CERTIFICATE").then_some(())
    })
    .await;
    cms.delete("owner", &DeleteParams::background()).await.unwrap();
    wait_for("the child ConfigMap to be garbage-collected", Duration::from_secs(60), || async {
        matches!(cms.get_opt("child").await, Ok(None)).then_some(())
    })
    .await;
    ns.cleanup().await;
}

#[tokio::test]
async fn garbage_collection_removes_an_owned_child() {
    let ns = TestNamespace::new("gc").await;
    let cms: Api<ConfigMap> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
    let child: Secret = serde_json::from_value(json!({
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid.unwrap(), "controller": true
        }]},
        "stringData": {"k": "v"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &child).await.unwrap();
    cms.delete("owner", &DeleteParams::background()).await.unwrap();
    wait_for("the child Secret to be garbage-collected", Duration::from_secs(60), || async {
        matches!(secrets.get_opt("child").await, Ok(None)).then_some(())
    })
    .await;
    ns.cleanup().await;
}
