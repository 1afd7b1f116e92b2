//! `kubectl apitoken` against the real API server with the operator running.

mod support;

use std::process::Command;

use support::operator::{Operator, install_crds};
use support::{TestNamespace, cluster};

fn plugin(ns: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-apitoken"))
        .args(["-n", ns])
        .args(args)
        .env("KUBECONFIG", &cluster().kubeconfig)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn create_list_rotate_reveal_revoke() {
    install_crds().await;
    let ns = TestNamespace::new("plugin").await;
    let _op = Operator::start(&ns.name);
    let n = ns.name.as_str();

    let (ok, token, err) = plugin(
        n,
        &["create", "ci", "--scope", "metrics:read", "--lifetime", "30d", "--audience", "tenant-a"],
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(apitoken_operator::core::token::parse(&token).is_ok(), "prints the token once");
    assert!(err.contains("Active") && !err.contains(&token), "{err}");

    let (ok, revealed, _) = plugin(n, &["reveal", "ci"]);
    assert!(ok);
    assert_eq!(revealed.trim(), token);

    let (ok, table, _) = plugin(n, &["list"]);
    assert!(ok);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TOKEN", "SCOPES", "PHASE", "EXPIRES", "LAST", "USED"]);
    assert!(
        table.contains("metrics:read") && table.contains("Active") && table.contains(&token[..15]),
        "{table}"
    );
    assert!(!table.contains(&token), "the list never shows a token");
    let (ok, json, _) = plugin(n, &["list", "-o", "json", "--phase", "active"]);
    assert!(ok);
    let items: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(items.as_array().unwrap().len(), 1);

    let (ok, out, err) = plugin(n, &["rotate", "ci"]);
    assert!(ok, "{err}");
    assert!(out.contains("rotated") && out.contains("previous token stays valid"), "{out}");
    let (_, after, _) = plugin(n, &["reveal", "ci"]);
    assert_ne!(after.trim(), token, "a new token after rotation");

    let (ok, out, _) = plugin(n, &["revoke", "ci"]);
    assert!(ok && out.contains("revoked"), "{out}");
    let (ok, _, err) = plugin(n, &["reveal", "missing"]);
    assert!(!ok && err.contains("ApiToken missing not found"), "{err}");
    let (ok, _, err) = plugin(n, &["create", "bad", "--scope", "Not A Scope"]);
    assert!(!ok && err.contains("spec.scopes"), "a clear refusal: {err}");
    ns.cleanup().await;
}
