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

/// The replica's one ApiToken watch (`token_feed`): a listener that joins after the list has
/// delivered objects gets a list of its own with every object, the listeners already there see
/// that list too, and a listener that wants no more is called no more.
#[tokio::test]
async fn one_token_watch_gives_a_late_listener_every_object() {
    use apitoken_operator::api::{ApiToken, ApiTokenSpec};
    use apitoken_operator::token_feed::TokenFeed;
    use std::sync::{Arc, Mutex};

    support::operator::install_crds().await;
    let ns = TestNamespace::new("feed").await;
    let tokens: Api<ApiToken> = ns.api();
    let create = |name: &str| {
        let (tokens, at) = (tokens.clone(), ApiToken::new(name, ApiTokenSpec::default()));
        async move { tokens.create(&PostParams::default(), &at).await.unwrap() }
    };
    for name in ["a", "b", "c"] {
        create(name).await;
    }
    // Pages of 2: the lists below take two requests, the second asked for while the first is read.
    let (feed, drive) = TokenFeed::start_with_pages_of(2, ns.client.clone(), Some(&ns.name));
    let describe = |e: &watcher::Event<ApiToken>| match e {
        watcher::Event::Init => "init".to_string(),
        watcher::Event::InitApply(t) => format!("list {}", t.metadata.name.clone().unwrap_or_default()),
        watcher::Event::InitDone => "done".to_string(),
        watcher::Event::Apply(t) => format!("apply {}", t.metadata.name.clone().unwrap_or_default()),
        watcher::Event::Delete(t) => format!("delete {}", t.metadata.name.clone().unwrap_or_default()),
    };
    let first = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = first.clone();
    feed.listen(move |e| {
        log.lock().unwrap().push(describe(e));
        true
    });
    let calls = Arc::new(Mutex::new(0));
    let counted = calls.clone();
    feed.listen(move |_| {
        *counted.lock().unwrap() += 1;
        false
    });
    // Both listen before the watch starts: both get its first list.
    let driven = tokio::spawn(drive);
    let lines = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().clone();
    let count = |v: &[String], what: &str| v.iter().filter(|l| *l == what).count();
    wait_for("the first list", T, || async { (count(&lines(&first), "done") == 1).then_some(()) }).await;
    let mut listed: Vec<_> = lines(&first).into_iter().filter(|l| l.starts_with("list ")).collect();
    listed.sort();
    assert_eq!(listed, ["list a", "list b", "list c"]);
    create("d").await;
    wait_for("d's event", T, || async { lines(&first).contains(&"apply d".to_string()).then_some(()) }).await;

    // Joins late: it gets every object in a list of its own, which the first listener sees too.
    let late = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = late.clone();
    let mut stream = Box::pin(feed.subscribe(move |e| Some(describe(e))));
    let collect = tokio::spawn(async move {
        while let Some(line) = stream.next().await {
            log.lock().unwrap().push(line);
        }
    });
    wait_for("the late listener's list", T, || async {
        lines(&late).contains(&"done".to_string()).then_some(())
    })
    .await;
    let mut listed: Vec<_> = lines(&late).into_iter().filter(|l| l.starts_with("list ")).collect();
    listed.sort();
    assert_eq!(listed, ["list a", "list b", "list c", "list d"]);
    assert_eq!(lines(&late)[0], "init", "a list starts with init: {:?}", lines(&late));
    assert_eq!(
        count(&lines(&first), "done"),
        2,
        "the first listener saw the second list: {:?}",
        lines(&first)
    );
    tokens.delete("a", &DeleteParams::default()).await.unwrap();
    wait_for("the delete, to both", T, || async {
        let both =
            lines(&first).contains(&"delete a".to_string()) && lines(&late).contains(&"delete a".to_string());
        both.then_some(())
    })
    .await;
    assert_eq!(*calls.lock().unwrap(), 1, "a listener that returned false is not called again");
    collect.abort();
    driven.abort();
    ns.cleanup().await;
}
