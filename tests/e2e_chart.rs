//! The Helm chart: `helm lint`, `helm template` with the defaults and each documented option,
//! a server-side dry-run apply of what it renders against the local API server, a snapshot of
//! the default rendering, and its CRDs identical to `crds/`.
//! Regenerate the snapshot after an intended change with `make chart-snapshot`.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::{TestNamespace, cluster, repo_root};

const CHART: &str = "charts/apitoken-operator";

fn helm(args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(cluster().bin_dir.join("helm")).args(args).current_dir(repo_root()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template` as the snapshot and the docs use it.
pub fn render(namespace: &str, sets: &[&str]) -> String {
    let mut args = vec![
        "template",
        "apitoken-operator",
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
    assert!(ok, "helm template {sets:?} failed: {err}");
    out
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
}

#[test]
fn every_documented_option_renders_and_passes_a_server_side_dry_run() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ns = rt.block_on(TestNamespace::new("chart"));
    install_foreign_crds();
    let options: [&[&str]; 8] = [
        &[],
        &["certManager.enabled=true"],
        &["networkPolicy.enabled=true"],
        &["serviceMonitor.enabled=true", "prometheusRule.enabled=true"],
        &["watchNamespace=team-a", "leaderElection=false", "replicaCount=1"],
        &["webhook.enabled=false", "components={controller,verify}"],
        &["podDisruptionBudget.enabled=false", "serviceAccount.create=false", "serviceAccount.name=existing"],
        &["logFormat=text", "webhook.certValidity=90d", "image.tag=v9"],
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
