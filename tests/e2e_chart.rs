//! The Helm chart: `helm lint`, `helm template` with the defaults and each documented option,
//! a server-side dry-run apply of what it renders against the local API server, a snapshot of
//! the default rendering, and its CRDs identical to `crds/`.
//! Regenerate the snapshot after an intended change with `make chart-snapshot`.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{TestNamespace, cluster, repo_root};

const CHART: &str = "charts/apitoken-operator";

fn helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cluster().bin_dir.join("helm"))
        .args(args)
        .env("KUBECONFIG", &cluster().kubeconfig)
        .current_dir(repo_root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template` as the snapshot and the docs use it.
pub fn render(namespace: &str, sets: &[&str]) -> String {
    try_render("apitoken-operator", namespace, sets)
        .unwrap_or_else(|err| panic!("helm template {sets:?} failed: {err}"))
}

/// `helm template` of release `release`; the error is helm's message.
fn try_render(release: &str, namespace: &str, sets: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "--kube-version",
        "1.35.4",
        "--include-crds",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = helm(&args);
    if ok { Ok(out) } else { Err(err) }
}

/// Every object of a rendering, as JSON.
fn objects(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(|v| v.get("kind").is_some())
        .collect()
}

/// The objects of `kind`.
fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

/// The one object of `kind` named `name`.
fn object<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

/// The operator container's arguments.
fn args(objs: &[Value]) -> Vec<String> {
    let deployment = of_kind(objs, "Deployment");
    assert_eq!(deployment.len(), 1, "one Deployment");
    strings(&deployment[0]["spec"]["template"]["spec"]["containers"][0]["args"])
}

/// RBAC rules that grant `resource` (in any API group).
fn rules_for<'a>(role: &'a Value, resource: &str) -> Vec<&'a Value> {
    role["rules"]
        .as_array()
        .map(|rules| {
            rules.iter().filter(|r| strings(&r["resources"]).iter().any(|x| x == resource)).collect()
        })
        .unwrap_or_default()
}

/// Stand-ins for the CRDs of cert-manager and the Prometheus operator (kinds the chart renders
/// optionally), so those objects are dry-run too: group, version, kind and scope are checked,
/// their fields are not (the stand-ins keep unknown fields).
fn install_foreign_crds() {
    let crd = |group: &str, kind: &str, plural: &str| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: {plural}.{group}}}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{kind: {kind}, plural: {plural}, singular: {singular}}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n",
            singular = kind.to_lowercase()
        )
    };
    let all = [
        crd("cert-manager.io", "Certificate", "certificates"),
        crd("cert-manager.io", "Issuer", "issuers"),
        crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
        crd("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
    ]
    .join("---\n");
    let mut child = support::kubectl()
        .args(["apply", "--server-side", "--field-manager=helm-test", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(all.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in [
        "certificates.cert-manager.io",
        "issuers.cert-manager.io",
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        let crd = format!("crd/{name}");
        let ok = support::kubectl()
            .args(["wait", "--for=condition=established", "--timeout=30s", &crd])
            .status()
            .unwrap();
        assert!(ok.success(), "{name} established");
    }
}

#[test]
fn helm_lint_is_clean_and_bad_values_are_refused() {
    let (ok, out, err) = helm(&["lint", CHART, "--strict", "--kube-version", "1.35.4"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = helm(&["lint", CHART, "--set", "logFormat=xml"]);
    assert!(!ok, "values.schema.json refuses logFormat=xml: {out}{err}");
    // Values the schema refuses, each naming the value.
    for (set, named) in [
        ("shutdownDelay=5m", "shutdownDelay"),
        ("networkPolicy.apiServerCIDRs={10.0.0.1}", "apiServerCIDRs"),
        ("rateLimit.trustedProxies={proxy.example}", "trustedProxies"),
        ("podAntiAffinity=sometimes", "podAntiAffinity"),
        ("networkPolicy.ingressFrom[0].podSelector.matchLabels.a=b", "ingressFrom"),
    ] {
        let err = try_render("apitoken-operator", "ns", &[set]).expect_err(set);
        assert!(err.contains(named), "{set}: {err}");
    }
    // Combinations that cannot work, each refused with what to do.
    for (sets, says) in [
        (
            &["certManager.enabled=true", "webhook.enabled=false"][..],
            "certManager.enabled=true needs webhook.enabled=true",
        ),
        (&["components={controller,verify}"][..], "webhook.enabled=true needs \"admission\" in components"),
        (&["leaderElection=false"][..], "leaderElection=false with replicaCount=2"),
        (&["terminationGracePeriodSeconds=5"][..], "must exceed shutdownDelay"),
        (
            &["networkPolicy.enabled=true", "networkPolicy.verifyFrom[0].podSelector.matchLabels.a=b"][..],
            "set networkPolicy.apiServerCIDRs",
        ),
    ] {
        let err = try_render("apitoken-operator", "ns", sets).expect_err(&format!("{sets:?} refused"));
        assert!(err.contains(says), "{sets:?}: {err}");
    }
}

#[test]
fn every_documented_option_renders_and_passes_a_server_side_dry_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ns = rt.block_on(TestNamespace::new("chart"));
    install_foreign_crds();
    // The namespace watchNamespace names (its Role and RoleBinding are dry-run there).
    let _ = support::kubectl().args(["create", "namespace", "team-a"]).output();
    let options: &[&[&str]] = &[
        &[],
        &["certManager.enabled=true"],
        &[
            "certManager.enabled=true",
            "certManager.issuerRef.name=corp-ca",
            "certManager.issuerRef.kind=ClusterIssuer",
        ],
        &["networkPolicy.enabled=true"],
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.verifyFrom[0].podSelector.matchLabels.role=client",
            "networkPolicy.apiServerCIDRs={10.0.0.0/24,fd00::/64}",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
        ],
        &["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "service.type=LoadBalancer"],
        &["watchNamespace=team-a", "leaderElection=false", "replicaCount=1"],
        &["webhook.enabled=false"],
        &["webhook.enabled=false", "components={controller,verify}"],
        &["webhook.enabled=false", "components={verify}", "replicaCount=3"],
        &["podDisruptionBudget.enabled=false", "serviceAccount.create=false", "serviceAccount.name=existing"],
        &["replicaCount=3", "podDisruptionBudget.minAvailable=2", "podAntiAffinity=hard"],
        &["logFormat=text", "webhook.certValidity=90d", "image.tag=v9"],
        &[
            "rateLimit.trustedProxies={10.1.0.0/16,192.168.1.7}",
            "shutdownDelay=20s",
            "terminationGracePeriodSeconds=60",
        ],
        &["priorityClassName=system-cluster-critical", "podAntiAffinity=none"],
        &["leakReports.githubKeysConfigMap=github-secret-scanning-keys"],
        &["leakReports.githubKeysConfigMap=gh-keys", "certManager.enabled=true"],
    ];
    for sets in options {
        let rendered = render(&ns.name, sets);
        let docs: Vec<&str> = rendered.split("\n---").filter(|d| d.contains("kind:")).collect();
        let mut child = support::kubectl()
            .args(["apply", "--server-side", "--dry-run=server", "--field-manager=helm-test", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(docs.join("\n---\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "dry-run with {sets:?}: {}", String::from_utf8_lossy(&out.stderr));
        let applied = String::from_utf8_lossy(&out.stdout);
        assert!(applied.contains("(server dry run)"), "{applied}");
    }
    rt.block_on(ns.cleanup());
}

#[test]
fn the_default_rendering_matches_the_snapshot() {
    let rendered = render("apitoken-system", &[]);
    let path = repo_root().join("tests/snapshots/chart-default.yaml");
    let snapshot = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        snapshot == rendered,
        "the chart renders differently from tests/snapshots/chart-default.yaml; if intended, run `make chart-snapshot`"
    );
}

#[test]
fn the_chart_ships_the_crds_of_crds_dir() {
    let ours = std::fs::read_to_string(repo_root().join("crds/apitoken.dev.yaml")).unwrap();
    let chart = std::fs::read_to_string(repo_root().join(CHART).join("crds/apitoken.dev.yaml")).unwrap();
    assert!(ours == chart, "charts/apitoken-operator/crds is stale: run `make crds`");
}

#[test]
fn the_examples_pass_a_server_side_dry_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(support::operator::install_crds());
    let ns = rt.block_on(TestNamespace::new("examples"));
    // Namespaces the examples name.
    let _ = support::kubectl().args(["create", "namespace", "monitoring"]).output();
    for (file, namespace) in [
        ("examples/quickstart.yaml", "default"),
        ("examples/collector/deployment.yaml", "monitoring"),
        ("examples/policies/policies.yaml", "default"),
        ("examples/gitops/token.yaml", ns.name.as_str()),
        ("examples/gitops/policy.yaml", "default"),
        ("examples/gitops/rbac.yaml", "default"),
    ] {
        let out = support::kubectl()
            .args(["apply", "--dry-run=server", "-n", namespace, "-f"])
            .arg(repo_root().join(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
    rt.block_on(ns.cleanup());
}

#[test]
fn without_webhooks_admission_is_off_and_nothing_is_mounted() {
    let objs = objects(&render("ops", &["webhook.enabled=false"]));
    let a = args(&objs);
    assert!(a.contains(&"--components=controller,verify".to_string()), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("--tls-")), "no certificate files: {a:?}");
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    assert!(pod["volumes"].is_null() && pod["containers"][0]["volumeMounts"].is_null(), "{pod}");
    for kind in ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "Certificate", "Issuer"] {
        assert!(of_kind(&objs, kind).is_empty(), "no {kind}");
    }
    let cluster_role = object(&objs, "ClusterRole", "apitoken-operator");
    assert!(rules_for(cluster_role, "validatingwebhookconfigurations").is_empty());
    // Verification still serves with the self-managed CA: its Secret stays writable.
    let role = object(&objs, "Role", "apitoken-operator");
    assert!(
        rules_for(role, "secrets")
            .iter()
            .any(|r| strings(&r["resourceNames"]) == ["apitoken-operator-webhook-tls"]),
        "{role}"
    );

    // With cert-manager the Certificate's Secret is exactly what is mounted, CA included.
    let objs = objects(&render("ops", &["certManager.enabled=true"]));
    let cert = object(&objs, "Certificate", "apitoken-operator-webhook");
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], cert["spec"]["secretName"]);
    let a = args(&objs);
    for flag in ["--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key", "--tls-ca=/tls/ca.crt"] {
        assert!(a.contains(&flag.to_string()), "{flag}: {a:?}");
    }
    assert!(a.contains(&"--components=controller,verify,admission".to_string()), "{a:?}");
    let a = args(&objects(&render("ops", &["certManager.enabled=true", "certManager.publishCA=false"])));
    assert!(
        a.contains(&"--tls-cert=/tls/tls.crt".to_string()) && !a.iter().any(|x| x.starts_with("--tls-ca"))
    );
    // cert-manager owns the CA bundle and the Secret: the operator gets neither.
    let cluster_role = object(&objs, "ClusterRole", "apitoken-operator");
    assert!(rules_for(cluster_role, "validatingwebhookconfigurations").is_empty());
    assert!(rules_for(object(&objs, "Role", "apitoken-operator"), "secrets").is_empty());
}

#[test]
fn watch_namespace_narrows_rbac_and_the_token_webhooks() {
    // Default: cluster-wide, as documented.
    let objs = objects(&render("ops", &[]));
    let cluster_role = object(&objs, "ClusterRole", "apitoken-operator");
    assert!(!rules_for(cluster_role, "secrets").is_empty(), "all namespaces: Secrets cluster-wide");

    let objs = objects(&render("ops", &["watchNamespace=team-a"]));
    let a = args(&objs);
    assert!(a.contains(&"--namespace=team-a".to_string()), "{a:?}");
    let cluster_role = object(&objs, "ClusterRole", "apitoken-operator");
    for namespaced in
        ["secrets", "apitokens", "apitokens/status", "events", "deployments", "statefulsets", "daemonsets"]
    {
        assert!(
            rules_for(cluster_role, namespaced).is_empty(),
            "no cluster-wide {namespaced}: {cluster_role}"
        );
    }
    for cluster_wide in ["namespaces", "apitokenpolicies", "apitokenpolicies/status", "subjectaccessreviews"]
    {
        assert!(!rules_for(cluster_role, cluster_wide).is_empty(), "{cluster_wide} stays cluster-wide");
    }
    let watched = object(&objs, "Role", "apitoken-operator-watch");
    assert_eq!(watched["metadata"]["namespace"], "team-a");
    for namespaced in ["secrets", "apitokens", "apitokens/status", "events", "deployments"] {
        assert!(!rules_for(watched, namespaced).is_empty(), "{namespaced} in team-a: {watched}");
    }
    let binding = object(&objs, "RoleBinding", "apitoken-operator-watch");
    assert_eq!(binding["metadata"]["namespace"], "team-a");
    assert_eq!(binding["subjects"][0]["namespace"], "ops");
    // The ApiToken webhooks see team-a only; the policy webhook (cluster-scoped kind) everything.
    for kind in ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"] {
        for hook in of_kind(&objs, kind)[0]["webhooks"].as_array().unwrap() {
            let selector = &hook["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"];
            if hook["name"] == "validate-policy.apitoken.dev" {
                assert!(selector.is_null(), "{hook}");
            } else {
                assert_eq!(selector, "team-a", "{hook}");
            }
        }
    }
}

#[test]
fn each_release_has_its_own_lease_and_ca_configmap() {
    for (release, fullname) in
        [("apitoken-operator", "apitoken-operator"), ("blue", "blue-apitoken-operator")]
    {
        let objs = objects(&try_render(release, "ops", &[]).unwrap());
        let a = args(&objs);
        assert!(a.contains(&format!("--lease-name={fullname}")), "{a:?}");
        assert!(a.contains(&format!("--ca-configmap={fullname}-ca")), "{a:?}");
        let role = object(&objs, "Role", fullname);
        assert!(
            rules_for(role, "leases")
                .iter()
                .any(|r| strings(&r["resourceNames"]) == [fullname]
                    && strings(&r["verbs"]) == ["get", "update"]),
            "{role}"
        );
        let cm_rules = rules_for(role, "configmaps");
        assert!(
            cm_rules.iter().any(|r| strings(&r["resourceNames"]) == [format!("{fullname}-ca")]),
            "{role}"
        );
        // Nothing else of the namespace is readable through these rules.
        assert!(cm_rules.iter().all(|r| !r["resourceNames"].is_null() || strings(&r["verbs"]) == ["create"]));
    }
}

#[test]
fn disruptions_probes_spreading_and_shutdown_are_sized() {
    let objs = objects(&render("ops", &[]));
    let pdb = object(&objs, "PodDisruptionBudget", "apitoken-operator");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1, "drains always proceed: {pdb}");
    assert!(pdb["spec"]["minAvailable"].is_null());
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let startup = &container["startupProbe"];
    let allowed = startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(allowed >= 60, "start-up may wait 30 s+ on lists: {startup}");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > 5, "grace {grace} s above the 5 s shutdown delay");
    assert!(args(&objs).contains(&"--shutdown-delay=5s".to_string()));
    assert!(container["lifecycle"].is_null(), "no preStop: the image has no shell");
    let spread = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(spread["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname", "{pod}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);

    let objs = objects(&render("ops", &["shutdownDelay=30s"]));
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30, "{pod}");

    // One replica: no budget at all (minAvailable 1 would hang every drain).
    let objs = objects(&render("ops", &["replicaCount=1", "podDisruptionBudget.minAvailable=1"]));
    assert!(of_kind(&objs, "PodDisruptionBudget").is_empty());
    let objs = objects(&render("ops", &["replicaCount=3", "podDisruptionBudget.minAvailable=2"]));
    let pdb = object(&objs, "PodDisruptionBudget", "apitoken-operator");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert!(pdb["spec"]["maxUnavailable"].is_null(), "{pdb}");

    // A user's affinity replaces the default one; securityContext values are passed through.
    let objs = objects(&render(
        "ops",
        &[
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool,affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
            "podSecurityContext.fsGroup=65532",
        ],
    ));
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    assert!(
        pod["affinity"]["podAntiAffinity"].is_null() && !pod["affinity"]["nodeAffinity"].is_null(),
        "{pod}"
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
}

#[test]
fn metrics_are_never_on_the_verification_service() {
    let objs = objects(&render("ops", &["service.type=LoadBalancer", "serviceMonitor.enabled=true"]));
    let verify = object(&objs, "Service", "apitoken-operator");
    assert_eq!(verify["spec"]["type"], "LoadBalancer");
    let ports: Vec<_> =
        verify["spec"]["ports"].as_array().unwrap().iter().map(|p| &p["targetPort"]).collect();
    assert_eq!(ports, ["https"], "{verify}");
    let metrics = object(&objs, "Service", "apitoken-operator-metrics");
    assert_eq!(metrics["spec"]["type"], "ClusterIP");
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "metrics");
    // The ServiceMonitor selects the metrics Service and not the verification one.
    let selector =
        of_kind(&objs, "ServiceMonitor")[0]["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selects = |svc: &Value| selector.iter().all(|(k, v)| &svc["metadata"]["labels"][k] == v);
    assert!(selects(metrics) && !selects(verify), "{selector:?}");
    // Without a ServiceMonitor there is no metrics Service at all.
    let objs = objects(&render("ops", &[]));
    assert_eq!(of_kind(&objs, "Service").len(), 1);
}

#[test]
fn network_policy_keeps_verification_webhooks_and_metrics_apart() {
    let ingress = |sets: &[&str]| -> Vec<Value> {
        let objs = objects(&render("ops", sets));
        of_kind(&objs, "NetworkPolicy")[0]["spec"]["ingress"].as_array().unwrap().clone()
    };
    let port = |rule: &Value| rule["ports"][0]["port"].as_u64().unwrap();

    // Enabled alone: verification and webhooks open, metrics closed to every pod.
    let rules = ingress(&["networkPolicy.enabled=true"]);
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(port(&rules[0]), 8443);
    assert!(rules[0]["from"].is_null());

    let rules = ingress(&[
        "networkPolicy.enabled=true",
        "networkPolicy.verifyFrom[0].podSelector.matchLabels.role=client",
        "networkPolicy.apiServerCIDRs={10.0.0.0/24}",
        "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prometheus",
    ]);
    assert_eq!(rules.len(), 3, "{rules:?}");
    assert_eq!(
        (port(&rules[0]), &rules[0]["from"][0]["podSelector"]["matchLabels"]["role"]),
        (8443, &"client".into())
    );
    assert_eq!((port(&rules[1]), &rules[1]["from"][0]["ipBlock"]["cidr"]), (8443, &"10.0.0.0/24".into()));
    assert_eq!(
        (port(&rules[2]), &rules[2]["from"][0]["podSelector"]["matchLabels"]["app"]),
        (8080, &"prometheus".into())
    );
    assert!(rules.iter().all(|r| !r["from"].is_null()), "every port restricted: {rules:?}");

    // An API server that reaches pods through konnectivity: its agent pods instead of addresses.
    let rules = ingress(&[
        "networkPolicy.enabled=true",
        "networkPolicy.verifyFrom[0].podSelector.matchLabels.role=client",
        "networkPolicy.apiServerFrom[0].podSelector.matchLabels.k8s-app=konnectivity-agent",
    ]);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(rules[1]["from"][0]["podSelector"]["matchLabels"]["k8s-app"], "konnectivity-agent");

    // No webhooks: nothing to let the API server in for.
    let rules = ingress(&[
        "networkPolicy.enabled=true",
        "webhook.enabled=false",
        "networkPolicy.verifyFrom[0].podSelector.matchLabels.role=client",
    ]);
    assert_eq!(rules.len(), 1, "{rules:?}");
}

#[test]
fn trusted_proxies_reach_the_operator() {
    let a = args(&objects(&render("ops", &["rateLimit.trustedProxies={10.1.0.0/16,192.168.1.7}"])));
    assert!(a.contains(&"--trusted-proxies=10.1.0.0/16,192.168.1.7".to_string()), "{a:?}");
    let a = args(&objects(&render("ops", &[])));
    assert!(!a.iter().any(|x| x.starts_with("--trusted-proxies")), "none by default: {a:?}");
}

#[test]
fn github_leak_keys_are_mounted_from_their_configmap_and_named_to_the_operator() {
    let objs =
        objects(&render("ops", &["leakReports.githubKeysConfigMap=gh-keys", "certManager.enabled=true"]));
    let a = args(&objs);
    assert!(a.contains(&"--leak-keys-file=/etc/apitoken/github-keys/keys.json".to_string()), "{a:?}");
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    let volumes = pod["volumes"].to_string();
    assert!(volumes.contains("\"gh-keys\"") && volumes.contains("\"tls\""), "{volumes}");
    let mounts = pod["containers"][0]["volumeMounts"].to_string();
    assert!(mounts.contains("/etc/apitoken/github-keys") && !mounts.contains("subPath"), "{mounts}");
    let a = args(&objects(&render("ops", &[])));
    assert!(!a.iter().any(|x| x.starts_with("--leak-keys-file")), "off by default: {a:?}");
    let (ok, _, err) = helm(&["template", "r", CHART, "--set", "leakReports.githubKeysConfigMap=Not_A_Name"]);
    assert!(!ok && err.contains("githubKeysConfigMap"), "{err}");
}

/// What docs/helm.md tells people to run: install, the CRD upgrade path, upgrade, uninstall,
/// against the local API server (there is no kubelet, so no pod runs: the objects and RBAC are
/// what is checked, with `kubectl auth can-i` as the operator's ServiceAccount).
#[test]
fn install_upgrade_and_uninstall_as_documented() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(support::operator::install_crds());
    let ns = rt.block_on(TestNamespace::new("helm"));
    let watched = rt.block_on(TestNamespace::new("helm-watched"));
    let release = format!("r{}", &ns.name[ns.name.len() - 8..]);
    let fullname = format!("{release}-apitoken-operator");
    // No webhooks: with no pod behind them they would refuse every ApiToken in this cluster.
    let watch = format!("watchNamespace={}", watched.name);
    let (ok, out, err) = helm(&[
        "install",
        &release,
        CHART,
        "-n",
        &ns.name,
        "--set",
        "webhook.enabled=false",
        "--set",
        &watch,
    ]);
    assert!(ok, "helm install: {out}{err}");
    assert!(
        out.contains(&format!("ConfigMap {fullname}-ca (key ca.crt)")),
        "NOTES name the CA ConfigMap: {out}"
    );
    assert!(out.contains("no image is published"), "NOTES warn about the placeholder image: {out}");

    let sa = format!("system:serviceaccount:{}:{fullname}", ns.name);
    let can = |args: &[&str]| -> bool {
        let out = support::kubectl().args(["auth", "can-i", "--as", &sa]).args(args).output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            answer == "yes" || answer == "no",
            "can-i {args:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer == "yes"
    };
    assert!(can(&["list", "secrets", "-n", &watched.name]));
    assert!(can(&["delete", "secrets", "-n", &watched.name]));
    assert!(can(&["watch", "apitokens.apitoken.dev", "-n", &watched.name]));
    assert!(can(&["patch", "deployments.apps", "-n", &watched.name]));
    assert!(!can(&["list", "secrets", "--all-namespaces"]), "no cluster-wide Secrets with watchNamespace");
    assert!(!can(&["get", "secrets", "-n", "default"]));
    assert!(!can(&["list", "apitokens.apitoken.dev", "--all-namespaces"]));
    assert!(can(&["list", "apitokenpolicies.apitoken.dev"]));
    assert!(can(&["watch", "namespaces"]));
    assert!(can(&["update", &format!("leases.coordination.k8s.io/{fullname}"), "-n", &ns.name]));
    assert!(
        !can(&["update", "leases.coordination.k8s.io/apitoken-operator", "-n", &ns.name]),
        "only its own Lease"
    );
    assert!(can(&["update", &format!("configmaps/{fullname}-ca"), "-n", &ns.name]));
    assert!(!can(&["get", "configmaps/other", "-n", &ns.name]));
    assert!(can(&["get", &format!("secrets/{fullname}-webhook-tls"), "-n", &ns.name]));
    assert!(!can(&["get", "secrets/other", "-n", &ns.name]));

    // The documented CRD upgrade: the chart's CRDs are crds/, applied server-side over what exists.
    let (ok, crds, err) = helm(&["show", "crds", CHART]);
    assert!(ok, "{err}");
    let ours = std::fs::read_to_string(repo_root().join("crds/apitoken.dev.yaml")).unwrap();
    assert_eq!(crds.trim(), ours.trim(), "helm show crds prints crds/");
    let mut child = support::kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(crds.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "CRD upgrade: {}", String::from_utf8_lossy(&out.stderr));

    let (ok, out, err) =
        helm(&["upgrade", &release, CHART, "-n", &ns.name, "--reuse-values", "--set", "replicaCount=3"]);
    assert!(ok, "helm upgrade: {out}{err}");
    let out = support::kubectl()
        .args(["get", "pdb", &fullname, "-n", &ns.name, "-o", "jsonpath={.spec.maxUnavailable}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1");

    let (ok, out, err) = helm(&["uninstall", &release, "-n", &ns.name]);
    assert!(ok, "helm uninstall: {out}{err}");
    // What uninstall leaves, as documented: the CRDs (and so every ApiToken).
    let out = support::kubectl().args(["get", "crd", "apitokens.apitoken.dev"]).output().unwrap();
    assert!(out.status.success(), "CRDs stay after uninstall");
    let out = support::kubectl().args(["get", "clusterrole", &fullname]).output().unwrap();
    assert!(!out.status.success(), "the release's own objects are gone");
    rt.block_on(watched.cleanup());
    rt.block_on(ns.cleanup());
}
