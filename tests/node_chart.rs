//! The node tier (`make test-node`): the Helm chart installed for real on a cluster with a node
//! (hack/local-node), with the image built here; collectors that mount the token Secret and call
//! the verification Service; restart targets rolled; the leader pod deleted; helm upgrade and
//! uninstall. Driven only with helm, kubectl and curl, as a platform team would.
//!
//! Needs `APITOKEN_TEST_CLUSTER` (a cluster with a node) and the imported images in
//! `APITOKEN_OPERATOR_IMAGE` and `APITOKEN_COLLECTOR_IMAGE`: `hack/test-node` sets all three.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Out, cluster, kubeconfig_as, ok, run, wait_for};

const SYSTEM: &str = "apitoken-system";
const RELEASE: &str = "apitoken-operator";
const TOKENS: &str = "node-tokens";
const T: Duration = Duration::from_secs(60);
/// The kubelet refreshes a mounted Secret within its sync period (10 s here, about a minute by
/// default) plus its cache TTL: generous, and still far inside the default 10 min grace period.
const PROJECTION: Duration = Duration::from_secs(180);

fn kubectl(args: &[&str]) -> Out {
    let mut cmd = support::kubectl();
    cmd.args(args);
    run(cmd, None)
}

fn apply(manifest: &Value) -> String {
    let mut cmd = support::kubectl();
    cmd.args(["apply", "-f", "-"]);
    ok(run(cmd, Some(&manifest.to_string())), "kubectl apply")
}

fn helm(args: &[&str]) -> Out {
    let c = cluster();
    let mut cmd = Command::new(c.bin_dir.join("helm"));
    cmd.env("KUBECONFIG", &c.kubeconfig).current_dir(support::repo_root()).args(args);
    run(cmd, None)
}

fn jsonpath(args: &[&str], path: &str) -> String {
    let mut a = args.to_vec();
    let p = format!("jsonpath={path}");
    a.extend(["-o", &p]);
    kubectl(&a).stdout
}

fn image(var: &str) -> (String, String) {
    let image = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run `make test-node`"));
    let (repo, tag) = image.rsplit_once(':').expect("REPO:TAG");
    (repo.to_string(), tag.to_string())
}

/// Pods of `selector` in `ns` that are Ready, by name.
fn ready_pods(ns: &str, selector: &str) -> Vec<String> {
    let out = kubectl(&["get", "pods", "-n", ns, "-l", selector, "-o", "json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
        .collect()
}

fn pod_ip(ns: &str, pod: &str) -> String {
    jsonpath(&["get", "pod", "-n", ns, pod], "{.status.podIP}")
}

/// A collector's `/counts` (the host reaches pod IPs on the node's bridge).
fn counts(ip: &str) -> Option<Value> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "2", &format!("http://{ip}:8081/counts")]);
    let out = run(cmd, None);
    out.ok.then(|| serde_json::from_str(&out.stdout).ok()).flatten()
}

fn failures(c: &Value) -> i64 {
    let codes: i64 = c["codes"].as_object().map_or(0, |m| m.values().filter_map(Value::as_i64).sum());
    codes + c["errors"].as_i64().unwrap_or(0)
}

fn lease_holder() -> String {
    jsonpath(&["get", "lease", "-n", SYSTEM, RELEASE], "{.spec.holderIdentity}")
}

fn token_status(name: &str, field: &str) -> String {
    jsonpath(&["get", "apitoken", "-n", TOKENS, name], &format!("{{.status.{field}}}"))
}

fn trigger(name: &str, value: &str) {
    let patch = json!({"spec": {"rotation": {"trigger": value}}}).to_string();
    ok(kubectl(&["patch", "apitoken", "-n", TOKENS, name, "--type=merge", "-p", &patch]), "patch trigger");
}

/// A collector Deployment calling the verification Service every 100 ms. The Service name is
/// mapped to its ClusterIP with hostAliases (the local cluster has no DNS server); TLS is checked
/// against that name with the CA the operator publishes, copied into this namespace.
fn collector(name: &str, token_secret: &str, mounted: bool, service_ip: &str, port: &str) -> Value {
    let (repo, tag) = image("APITOKEN_COLLECTOR_IMAGE");
    let host = format!("{RELEASE}.{SYSTEM}.svc");
    let mut args =
        vec!["--url".to_string(), format!("https://{host}:{port}"), "--ca".into(), "/ca/ca.crt".into()];
    let mut container = json!({
        "name": "collector",
        "image": format!("{repo}:{tag}"),
        "imagePullPolicy": "Never",
        "ports": [{"containerPort": 8081}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8081}, "periodSeconds": 1},
        "volumeMounts": [{"name": "ca", "mountPath": "/ca", "readOnly": true}]
    });
    let mut volumes = vec![json!({"name": "ca", "configMap": {"name": "verify-ca"}})];
    if mounted {
        args.extend(["--token-file".into(), "/token/token".into()]);
        container["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "token", "mountPath": "/token", "readOnly": true}));
        volumes.push(json!({"name": "token", "secret": {"secretName": token_secret}}));
    } else {
        args.extend(["--token-env".into(), "TOKEN".into()]);
        container["env"] =
            json!([{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}}}]);
    }
    container["args"] = json!(args);
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": TOKENS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "hostAliases": [{"ip": service_ip, "hostnames": [host]}],
                    "terminationGracePeriodSeconds": 5,
                    "containers": [container],
                    "volumes": volumes
                }
            }
        }
    })
}

fn api_token(name: &str, extra: &Value) -> Value {
    let mut spec = json!({"scopes": ["metrics:read"], "lifetime": "1h"});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken",
           "metadata": {"name": name, "namespace": TOKENS}, "spec": spec})
}

async fn one_ready_pod(app: &str) -> String {
    wait_for(&format!("a Ready {app} pod"), T, || async {
        let pods = ready_pods(TOKENS, &format!("app={app}"));
        (pods.len() == 1).then(|| pods[0].clone())
    })
    .await
}

async fn calls_flowing(ip: &str) -> Value {
    wait_for("the collector's calls", T, || async {
        let c = counts(ip)?;
        (c["ok"].as_i64()? >= 10).then_some(c)
    })
    .await
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one installation's life, in order
async fn the_chart_on_a_real_node() {
    let started = Instant::now();
    let (repo, tag) = image("APITOKEN_OPERATOR_IMAGE");

    // helm install with the chart's defaults (2 replicas), the local image, never pulled.
    let t0 = Instant::now();
    ok(
        helm(&[
            "install",
            RELEASE,
            "charts/apitoken-operator",
            "-n",
            SYSTEM,
            "--create-namespace",
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--wait",
            "--timeout",
            "5m",
        ]),
        "helm install",
    );
    let pods = ready_pods(SYSTEM, "app.kubernetes.io/name=apitoken-operator");
    assert_eq!(pods.len(), 2, "both replicas Ready through their probes: {pods:?}");
    println!("helm install: both replicas Ready in {:.1}s", t0.elapsed().as_secs_f64());
    let holder = wait_for("a Lease holder", T, || async {
        let h = lease_holder();
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert!(pods.iter().any(|p| holder.starts_with(p.as_str())), "{holder} is one of {pods:?}");

    // The API server reaches the webhooks through the chart's Service (no URL registration).
    let services = jsonpath(
        &["get", "validatingwebhookconfiguration", RELEASE],
        "{.webhooks[*].clientConfig.service.name}",
    );
    assert!(services.split_whitespace().all(|s| s == RELEASE) && !services.is_empty(), "{services}");
    assert!(
        jsonpath(&["get", "validatingwebhookconfiguration", RELEASE], "{.webhooks[*].clientConfig.url}")
            .is_empty()
    );

    // A non-admin user: mutated (creator recorded) and validated (scope ceiling) by the webhooks.
    ok(kubectl(&["create", "namespace", TOKENS]), "create namespace");
    for (name, rules) in [
        (
            "token-author",
            json!([{"apiGroups": ["apitoken.dev"], "resources": ["apitokens"], "verbs": ["create", "get", "list", "watch"]}]),
        ),
        (
            "metrics-reader",
            json!([{"apiGroups": ["scopes.apitoken.dev"], "resources": ["metrics"], "verbs": ["read"]}]),
        ),
    ] {
        apply(&json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": {"name": name, "namespace": TOKENS}, "rules": rules}));
        apply(&json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": {"name": name, "namespace": TOKENS},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                      "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]}));
    }
    let alice = kubeconfig_as("alice", &[]);
    let as_alice = |manifest: &Value| {
        let mut cmd = support::kubectl();
        cmd.env("KUBECONFIG", &alice).args(["create", "-f", "-"]);
        run(cmd, Some(&manifest.to_string()))
    };
    ok(as_alice(&api_token("alice-token", &json!({}))), "alice creates a token");
    let refused = as_alice(&api_token("alice-write", &json!({"scopes": ["metrics:write"]})));
    assert!(
        !refused.ok && refused.stderr.contains("alice may not grant metrics:write"),
        "{}",
        refused.stderr
    );
    ok(
        kubectl(&["wait", "-n", TOKENS, "--for=condition=Ready", "--timeout=60s", "apitoken/alice-token"]),
        "alice's token Ready",
    );
    assert_eq!(
        token_status("alice-token", "createdBy"),
        "alice",
        "the mutating webhook recorded the creator"
    );

    // The CA clients trust, copied from the ConfigMap the operator publishes.
    let ca = jsonpath(&["get", "configmap", "-n", SYSTEM, &format!("{RELEASE}-ca")], r"{.data.ca\.crt}");
    assert!(ca.contains("BEGIN CERTIFICATE"), "the operator publishes its CA: {ca}");
    apply(
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "verify-ca", "namespace": TOKENS},
                  "data": {"ca.crt": ca}}),
    );
    let service_ip = jsonpath(&["get", "service", "-n", SYSTEM, RELEASE], "{.spec.clusterIP}");
    let port = jsonpath(&["get", "service", "-n", SYSTEM, RELEASE], "{.spec.ports[0].port}");

    // A collector that mounts its token Secret and re-reads it on change.
    apply(&api_token("collector", &json!({})));
    ok(
        kubectl(&["wait", "-n", TOKENS, "--for=condition=Ready", "--timeout=60s", "apitoken/collector"]),
        "token",
    );
    apply(&collector("mounted", "collector", true, &service_ip, &port));
    let pod = one_ready_pod("mounted").await;
    let ip = pod_ip(TOKENS, &pod);
    calls_flowing(&ip).await;

    // Three rotations in a row: zero non-2xx, and the collector is on the new token before the
    // old one's grace period ends. The kubelet's projection delay is measured each time.
    let mut delays = Vec::new();
    for i in 1..=3 {
        let before = counts(&ip).unwrap();
        let old_id = before["tokenId"].as_str().unwrap_or_default().to_string();
        trigger("collector", &format!("rotation-{i}"));
        wait_for("the rotation", T, || async {
            (token_status("collector", "rotationCount") == i.to_string()).then_some(())
        })
        .await;
        let issued: jiff::Timestamp = token_status("collector", "issuedAt").parse().unwrap();
        let grace_end: jiff::Timestamp = token_status("collector", "previousValidUntil").parse().unwrap();
        let new_id = token_status("collector", "tokenId");
        assert_ne!(new_id, old_id);
        let c = wait_for("the collector on the new token", PROJECTION, || async {
            let c = counts(&ip)?;
            (c["tokenId"].as_str()? == new_id).then_some(c)
        })
        .await;
        let since: jiff::Timestamp = c["tokenSince"].as_str().unwrap().parse().unwrap();
        assert!(
            since < grace_end,
            "on the new token at {since}, after the grace period ended at {grace_end}"
        );
        let delay = since.duration_since(issued);
        delays.push(delay.as_secs_f64());
        println!(
            "rotation {i}: new token seen by the collector {:.1}s after it was issued (grace period ends {}s after issue); {} requests so far, {} non-2xx",
            delay.as_secs_f64(),
            grace_end.duration_since(issued).as_secs(),
            c["requests"],
            failures(&c)
        );
        assert_eq!(failures(&c), 0, "no failed call through rotation {i}: {c}");
        // A second of calls on the new token before the next rotation.
        let ok_then = c["ok"].as_i64().unwrap_or(0);
        wait_for("calls on the new token", T, || async {
            (counts(&ip)?["ok"].as_i64()? >= ok_then + 10).then_some(())
        })
        .await;
    }
    println!("kubelet projection delay (rotation -> new file in the pod): {delays:?} s");

    // restartTargets: a Deployment that reads the token from an env var is rolled.
    apply(&api_token(
        "env-token",
        &json!({"restartTargets": [{"kind": "Deployment", "name": "env-collector"}]}),
    ));
    ok(
        kubectl(&["wait", "-n", TOKENS, "--for=condition=Ready", "--timeout=60s", "apitoken/env-token"]),
        "token",
    );
    apply(&collector("env-collector", "env-token", false, &service_ip, &port));
    let first = one_ready_pod("env-collector").await;
    let first_ip = pod_ip(TOKENS, &first);
    let mut last_first = calls_flowing(&first_ip).await;
    trigger("env-token", "roll-1");
    let new_id = wait_for("the env-token rotation", T, || async {
        (token_status("env-token", "rotationCount") == "1").then(|| token_status("env-token", "tokenId"))
    })
    .await;
    let second = wait_for("the rolled pod on the new token", PROJECTION, || {
        let first = first.clone();
        let first_ip = first_ip.clone();
        let new_id = new_id.clone();
        let last = &mut last_first;
        let seen = counts(&first_ip);
        if let Some(c) = seen {
            *last = c;
        }
        async move {
            let pods = ready_pods(TOKENS, "app=env-collector");
            let pod = pods.into_iter().find(|p| *p != first)?;
            let c = counts(&pod_ip(TOKENS, &pod))?;
            (c["tokenId"].as_str()? == new_id).then_some(pod)
        }
    })
    .await;
    let second_counts = calls_flowing(&pod_ip(TOKENS, &second)).await;
    println!(
        "restartTargets: {first} ({} requests, {} non-2xx on the old token) replaced by {second} on the new one",
        last_first["requests"],
        failures(&last_first)
    );
    assert_eq!(failures(&last_first), 0, "{last_first}");
    assert_eq!(failures(&second_counts), 0, "{second_counts}");

    // The leader pod deleted: the other replica takes over; tokens keep verifying; one trigger
    // change is still exactly one rotation.
    let holder = lease_holder();
    let leader_pod = pods.iter().find(|p| holder.starts_with(p.as_str())).unwrap().clone();
    let before = counts(&ip).unwrap();
    let t0 = Instant::now();
    ok(kubectl(&["delete", "pod", "-n", SYSTEM, &leader_pod, "--wait=false"]), "delete the leader pod");
    let new_holder = wait_for("another leader", Duration::from_secs(90), || async {
        let h = lease_holder();
        (!h.is_empty() && !h.starts_with(leader_pod.as_str())).then_some(h)
    })
    .await;
    println!("leader pod {leader_pod} deleted: {new_holder} leads after {:.1}s", t0.elapsed().as_secs_f64());
    trigger("collector", "after-takeover");
    wait_for("one rotation after the takeover", T, || async {
        (token_status("collector", "rotationCount") == "4").then_some(())
    })
    .await;
    let id = token_status("collector", "tokenId");
    let after = wait_for("the collector on the post-takeover token", PROJECTION, || async {
        let c = counts(&ip)?;
        (c["tokenId"].as_str()? == id).then_some(c)
    })
    .await;
    assert_eq!(token_status("collector", "rotationCount"), "4", "no double rotation");
    assert_eq!(failures(&after), failures(&before), "no failed call across the takeover: {after}");

    // helm upgrade with a changed value: the pods roll, the tokens stay as they are.
    let hash = token_status("collector", "tokenHash");
    ok(
        helm(&[
            "upgrade",
            RELEASE,
            "charts/apitoken-operator",
            "-n",
            SYSTEM,
            "--reuse-values",
            "--set",
            "logFormat=text",
            "--wait",
            "--timeout",
            "5m",
        ]),
        "helm upgrade",
    );
    let args =
        jsonpath(&["get", "deployment", "-n", SYSTEM, RELEASE], "{.spec.template.spec.containers[0].args}");
    assert!(args.contains("text"), "the new value is in the pods' arguments: {args}");
    assert_eq!(token_status("collector", "tokenHash"), hash, "an upgrade does not touch tokens");
    let c = counts(&ip).unwrap();
    println!("after helm upgrade: {} requests, {} non-2xx", c["requests"], failures(&c));
    assert_eq!(failures(&c), 0, "{c}");

    // helm uninstall: what docs/helm.md says stays (CRDs, ApiTokens, their Secrets, the CA Secret,
    // the CA ConfigMap, the Lease) stays; the release's own objects go.
    ok(kubectl(&["delete", "deployment", "-n", TOKENS, "mounted", "env-collector"]), "stop the collectors");
    ok(helm(&["uninstall", RELEASE, "-n", SYSTEM, "--wait"]), "helm uninstall");
    assert!(kubectl(&["get", "crd", "apitokens.apitoken.dev"]).ok, "CRDs stay");
    assert!(kubectl(&["get", "apitoken", "-n", TOKENS, "collector"]).ok, "ApiTokens stay");
    assert!(kubectl(&["get", "secret", "-n", TOKENS, "collector"]).ok, "token Secrets stay");
    assert!(
        kubectl(&["get", "secret", "-n", SYSTEM, &format!("{RELEASE}-webhook-tls")]).ok,
        "the CA Secret stays"
    );
    assert!(
        kubectl(&["get", "configmap", "-n", SYSTEM, &format!("{RELEASE}-ca")]).ok,
        "the CA ConfigMap stays"
    );
    assert!(!kubectl(&["get", "deployment", "-n", SYSTEM, RELEASE]).ok, "the Deployment goes");
    assert!(!kubectl(&["get", "validatingwebhookconfiguration", RELEASE]).ok, "the webhooks go");
    println!("node tier: {:.0}s", started.elapsed().as_secs_f64());
}
