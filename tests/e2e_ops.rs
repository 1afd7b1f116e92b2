//! Operations, with the operator as a real process against the real API server: TLS files
//! re-read when cert-manager renews them; verify-only replicas serve a certificate from the shared
//! CA for the Service names and publish the CA (with RBAC limited to that Secret and ConfigMap);
//! one Lease per release; a SIGTERM drains instead of dropping requests; `--namespace` runs with a
//! namespaced Role and a minimal ClusterRole.

mod support;

use std::io::Write as _;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apitoken_operator::api::{ApiToken, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::operator::{Operator, free_port, install_crds, lease_holder};
use support::{TestNamespace, cluster, issued_token, kubeconfig_as, kubectl, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const T: Duration = Duration::from_secs(30);
const BAD: &str = "apitok_0000000000000000000000000000000000000000000000000000AAAAAA";

/// `kubectl apply -f -` of `yaml`.
fn apply_yaml(yaml: &str) {
    let mut child = kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
}

/// A TLS client that trusts `ca_pem` only.
fn trusting(ca_pem: &str) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection checks the certificate: a resumed session would skip that.
    config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Status(u16),
    /// Nothing listens on the port.
    Refused,
    Failed(String),
}

/// A TLS connection to 127.0.0.1:`port` that checks the certificate for `name`.
async fn connect(
    tls: &TlsConnector,
    port: u16,
    name: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Outcome> {
    let tcp = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(Outcome::Refused),
        Err(e) => return Err(Outcome::Failed(format!("connect: {e}"))),
    };
    let name = ServerName::try_from(name.to_string()).unwrap();
    tls.connect(name, tcp).await.map_err(|e| Outcome::Failed(format!("TLS: {e}")))
}

/// The status of an HTTP/1.1 response read to its end.
async fn read_status(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Outcome {
    let mut buf = Vec::new();
    if let Err(e) = tokio::time::timeout(T, stream.read_to_end(&mut buf))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no answer within 30s")))
    {
        // rustls reports a peer that closes without close_notify; the answer may still be whole.
        if buf.is_empty() {
            return Outcome::Failed(format!("read: {e}"));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    match text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok()) {
        Some(code) if text.contains("\r\n\r\n") => Outcome::Status(code),
        _ => Outcome::Failed(format!("not an HTTP answer: {text:?}")),
    }
}

fn verify_request(token: &str) -> (String, String) {
    let (head, body) = keep_alive_request(token);
    (head.replace("\r\n\r\n", "\r\nconnection: close\r\n\r\n"), body)
}

/// `POST /v1/verify` that leaves the connection open for the next request, as a client's pool does.
fn keep_alive_request(token: &str) -> (String, String) {
    let body = json!({"token": token}).to_string();
    let head = format!(
        "POST /v1/verify HTTP/1.1\r\nhost: verify\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    (head, body)
}

/// One HTTP/1.1 answer (with a content-length) read off a connection that stays open: its head.
async fn read_one_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no content-length in {head:?}"));
            if body.len() >= len {
                return head.to_ascii_lowercase();
            }
        }
        let n = tokio::time::timeout(T, stream.read(&mut chunk))
            .await
            .expect("an answer within 30s")
            .expect("reading the answer");
        assert!(n > 0, "the connection closed before a whole answer: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `POST /v1/verify` over a new TLS connection to `name` at 127.0.0.1:`port`.
async fn verify_tls(tls: &TlsConnector, port: u16, name: &str, token: &str) -> Outcome {
    let mut s = match connect(tls, port, name).await {
        Ok(s) => s,
        Err(o) => return o,
    };
    let (head, body) = verify_request(token);
    if let Err(e) = s.write_all(format!("{head}{body}").as_bytes()).await {
        return Outcome::Failed(format!("write: {e}"));
    }
    read_status(&mut s).await
}

/// Status of a plain `GET` on the metrics listener, if it answers.
async fn get_status(base: &str, path: &str) -> Option<u16> {
    let addr = base.strip_prefix("http://")?;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    match read_status(&mut s).await {
        Outcome::Status(c) => Some(c),
        _ => None,
    }
}

/// A CA and a serving certificate for `names` signed by it: (ca, cert, key) in PEM.
fn ca_and_leaf(cn: &str, names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let params = || {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let ca = params().self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params(), &ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// Replaces `path` at once (as the kubelet updates a mounted Secret).
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// The TLS operator of these tests: `components` on `port`, its namespace the test namespace,
/// Service `svc`, with `kubeconfig` and `extra` flags.
fn tls_operator(
    ns: &str,
    components: &str,
    kubeconfig: &std::path::Path,
    port: u16,
    extra: &[&str],
) -> Operator {
    let mut op = Operator::start_on(ns, components, kubeconfig, port);
    op.kill();
    op.args.retain(|a| a != "--plain-http");
    op.args.extend(
        ["--operator-namespace", ns, "--service-name", "svc", "--webhook-secret", "svc-tls"]
            .iter()
            .chain(extra)
            .map(ToString::to_string),
    );
    op.restart();
    op
}

/// The CA published in the ConfigMap `svc-ca`, once it is there (and differs from `not`).
async fn published_ca(ns: &TestNamespace, not: Option<&str>) -> String {
    let cms: Api<ConfigMap> = ns.api();
    wait_for("the CA ConfigMap", T, || async {
        let ca = cms.get_opt("svc-ca").await.ok()??.data?.get("ca.crt")?.clone();
        (Some(ca.as_str()) != not).then_some(ca)
    })
    .await
}

#[tokio::test]
async fn renewed_tls_files_are_served_without_a_restart() {
    install_crds().await;
    let ns = TestNamespace::new("reload").await;
    let dir = std::env::temp_dir().join(format!("apitoken-reload-{}-{}", std::process::id(), ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    let (ca_a, cert_a, key_a) = ca_and_leaf("first CA", &["svc.reload.svc"]);
    for (path, text) in [(&cert, &cert_a), (&key, &key_a), (&ca, &ca_a)] {
        std::fs::write(path, text).unwrap();
    }
    let port = free_port();
    let files = [cert.to_str().unwrap(), key.to_str().unwrap(), ca.to_str().unwrap()];
    let mut op = tls_operator(
        &ns.name,
        "verify",
        &cluster().kubeconfig,
        port,
        &["--tls-cert", files[0], "--tls-key", files[1], "--tls-ca", files[2], "--tls-reload-interval", "1s"],
    );
    let (old, name) = (trusting(&ca_a), "svc.reload.svc");
    wait_for("the first certificate", T, || async {
        (verify_tls(&old, port, name, BAD).await == Outcome::Status(401)).then_some(())
    })
    .await;
    assert_eq!(published_ca(&ns, None).await, ca_a, "--tls-ca is published");

    // cert-manager renews with a new CA: the files change under the running process.
    let (ca_b, cert_b, key_b) = ca_and_leaf("second CA", &["svc.reload.svc"]);
    replace_file(&ca, &ca_b);
    replace_file(&key, &key_b);
    replace_file(&cert, &cert_b);
    let new = trusting(&ca_b);
    wait_for("the renewed certificate to be served", T, || async {
        (verify_tls(&new, port, name, BAD).await == Outcome::Status(401)).then_some(())
    })
    .await;
    assert!(op.running(), "no restart");
    let stale = verify_tls(&old, port, name, BAD).await;
    assert!(
        matches!(&stale, Outcome::Failed(e) if e.starts_with("TLS")),
        "the old certificate is no longer served: {stale:?}"
    );
    assert_eq!(published_ca(&ns, Some(&ca_a)).await, ca_b);
    assert!(op.log_text().contains("the TLS files changed"));
    op.kill();
    let _ = std::fs::remove_dir_all(dir);
    ns.cleanup().await;
}

#[tokio::test]
async fn verify_only_replicas_serve_the_shared_ca_for_the_service_names_and_publish_it() {
    install_crds().await;
    let ns = TestNamespace::new("shared-ca").await;
    let n = &ns.name;
    // RBAC of a verify-only replica: tokens in its namespace, its own Secret and ConfigMap.
    // Nothing cluster-wide: no webhook configurations.
    let user = format!("verify-{n}");
    apply_yaml(&format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: verify-only, namespace: {n}}}
rules:
  - {{apiGroups: [apitoken.dev], resources: [apitokens], verbs: [get, list, watch]}}
  - {{apiGroups: [apitoken.dev], resources: [apitokens/status], verbs: [patch]}}
  - {{apiGroups: [""], resources: [secrets, configmaps], verbs: [create]}}
  - {{apiGroups: [""], resources: [secrets], resourceNames: [svc-tls], verbs: [get, update]}}
  - {{apiGroups: [""], resources: [configmaps], resourceNames: [svc-ca], verbs: [get, update]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: verify-only, namespace: {n}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: verify-only}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]
"#
    ));
    let kubeconfig = kubeconfig_as(&user, &[]);
    let (p1, p2) = (free_port(), free_port());
    let mut first = tls_operator(n, "verify", &kubeconfig, p1, &[]);
    let ca = published_ca(&ns, None).await;
    let cm = serde_json::to_string(&ns.api::<ConfigMap>().get("svc-ca").await.unwrap()).unwrap();
    assert!(!cm.contains("PRIVATE KEY"), "only the certificate is published");
    let mut second = tls_operator(n, "verify", &kubeconfig, p2, &[]);
    let tls = trusting(&ca);
    for port in [p1, p2] {
        for name in
            ["svc", &format!("svc.{n}"), &format!("svc.{n}.svc"), &format!("svc.{n}.svc.cluster.local")]
        {
            let got = wait_for("the verifier over TLS", T, || async {
                match verify_tls(&tls, port, name, BAD).await {
                    Outcome::Refused => None,
                    other => Some(other),
                }
            })
            .await;
            assert_eq!(got, Outcome::Status(401), "{name} on {port}");
        }
        let other = verify_tls(&tls, port, &format!("other.{n}.svc"), BAD).await;
        assert!(matches!(&other, Outcome::Failed(e) if e.starts_with("TLS")), "another name: {other:?}");
    }
    let secret: Secret = ns.api().get("svc-tls").await.unwrap();
    assert_eq!(secret.data.unwrap()["ca.crt"].0, ca.as_bytes(), "the CA of the shared Secret");
    for op in [&first, &second] {
        let log = op.log_text();
        assert!(!log.contains("caBundle") && !log.contains("forbidden"), "{log}");
    }
    first.kill();
    second.kill();
    ns.cleanup().await;
}

#[tokio::test]
async fn two_releases_in_one_namespace_each_lead_on_their_own_lease() {
    install_crds().await;
    let ns = TestNamespace::new("leases").await;
    let leases: Api<Lease> = ns.api();
    let elected = |lease: &str| {
        let mut op = Operator::start_with(&ns.name, "controller", &cluster().kubeconfig);
        op.kill();
        op.args.retain(|a| a != "--no-leader-election");
        op.args.extend(["--operator-namespace".into(), ns.name.clone(), "--lease-name".into(), lease.into()]);
        op.restart();
        op
    };
    let mut a = elected("release-a");
    let mut b = elected("release-b");
    for lease in ["release-a", "release-b"] {
        wait_for(&format!("a holder of {lease}"), T, || async {
            leases.get_opt(lease).await.ok()??.spec?.holder_identity.filter(|h| !h.is_empty())
        })
        .await;
    }
    wait_for("both to lead", T, || async {
        (a.log_text().contains("became leader") && b.log_text().contains("became leader")).then_some(())
    })
    .await;
    assert!(leases.get_opt("apitoken-operator").await.unwrap().is_none(), "the default Lease is unused");
    a.kill();
    b.kill();
    ns.cleanup().await;
}

#[tokio::test]
async fn sigterm_drains_without_failing_a_request() {
    install_crds().await;
    let ns = TestNamespace::new("drain").await;
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (ns.api(), ns.api());
    let leases: Api<Lease> = ns.api();
    let port = free_port();
    let mut op =
        tls_operator(&ns.name, "controller,verify", &cluster().kubeconfig, port, &["--shutdown-delay", "2s"]);
    op.kill();
    op.args.retain(|a| a != "--no-leader-election");
    op.restart();
    let ca = published_ca(&ns, None).await;
    wait_for("a leader", T, || lease_holder(&leases)).await;
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "t"}, "spec": {}});
    tokens.patch("t", &PatchParams::apply("e2e"), &Patch::Apply(&body)).await.unwrap();
    let token = issued_token(&tokens, &secrets, "t", None).await;
    let (tls, name) = (trusting(&ca), format!("svc.{}.svc", ns.name));
    wait_for("the token to verify", T, || async {
        (verify_tls(&tls, port, &name, &token).await == Outcome::Status(200)).then_some(())
    })
    .await;

    // A client hammering with new connections, until the first request that is not a 200.
    let unready = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (tls, name, token, unready) = (tls.clone(), name.clone(), token.clone(), unready.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let after_unready = unready.load(Ordering::SeqCst);
                let o = verify_tls(&tls, port, &name, &token).await;
                let done = o != Outcome::Status(200);
                seen.push((o, after_unready));
                if done {
                    return seen;
                }
            }
        })
    };
    // A request in flight when the listener closes: headers and half the body sent.
    let mut in_flight = connect(&tls, port, &name).await.unwrap();
    let (head, body) = verify_request(&token);
    let (first_half, rest) = body.split_at(body.len() / 2);
    in_flight.write_all(format!("{head}{first_half}").as_bytes()).await.unwrap();
    in_flight.flush().await.unwrap();

    // A pooled keep-alive connection: kept open before the drain.
    let mut pooled = connect(&tls, port, &name).await.unwrap();
    let (head, body) = keep_alive_request(&token);
    pooled.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let answer = read_one_head(&mut pooled).await;
    assert!(answer.starts_with("http/1.1 200") && !answer.contains("connection: close"), "{answer}");

    let metrics = op.metrics_url.clone();
    assert_eq!(get_status(&metrics, "/readyz").await, Some(200));
    let terminated = tokio::task::spawn_blocking(move || {
        op.terminate();
        op
    });
    wait_for("/readyz to answer 503", T, || async {
        (get_status(&metrics, "/readyz").await == Some(503)).then_some(())
    })
    .await;
    unready.store(true, Ordering::SeqCst);
    // Draining: the pooled connection's next answer tells the client to close it, and the server
    // closes it after that answer, so the client never sends on a connection being shut.
    pooled.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let answer = read_one_head(&mut pooled).await;
    assert!(answer.starts_with("http/1.1 200") && answer.contains("connection: close"), "{answer}");
    let mut rest_of_it = Vec::new();
    let _ = tokio::time::timeout(T, pooled.read_to_end(&mut rest_of_it)).await.expect("closed by the server");
    assert!(rest_of_it.is_empty(), "nothing after the last answer: {rest_of_it:?}");
    let seen = tokio::time::timeout(T, hammer).await.expect("the listener closes").unwrap();
    let (last, _) = seen.last().unwrap();
    let served_unready = seen.iter().filter(|(o, after)| *after && *o == Outcome::Status(200)).count();
    println!("{} requests; {served_unready} answered after /readyz turned 503; then {last:?}", seen.len());
    assert!(seen[..seen.len() - 1].iter().all(|(o, _)| *o == Outcome::Status(200)));
    assert!(served_unready > 0, "requests are still served while endpoints are being updated");
    // The first failure is the closed listener (refused, or reset while still in the kernel's
    // accept queue), never a request that was accepted and then dropped.
    assert!(
        matches!(last, Outcome::Refused)
            || matches!(last, Outcome::Failed(e) if e.starts_with("TLS") || e.starts_with("connect")),
        "a request was dropped: {last:?}"
    );
    assert_eq!(
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused),
        "the first failure ({last:?}) came before the listener closed"
    );
    // The request in flight is answered after the listener closed.
    in_flight.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(read_status(&mut in_flight).await, Outcome::Status(200));
    let op = terminated.await.unwrap();
    wait_for("the Lease to be released", T, || async { lease_holder(&leases).await.is_none().then_some(()) })
        .await;
    assert!(op.log_text().contains("finishing requests in flight"));
    ns.cleanup().await;
}

#[tokio::test]
async fn a_namespaced_operator_needs_only_a_role_and_a_minimal_cluster_role() {
    install_crds().await;
    let ns = TestNamespace::new("scoped").await;
    let n = &ns.name;
    let user = format!("scoped-{n}");
    apply_yaml(&format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: operator, namespace: {n}}}
rules:
  - {{apiGroups: [apitoken.dev], resources: [apitokens], verbs: [get, list, watch]}}
  - {{apiGroups: [apitoken.dev], resources: [apitokens/status], verbs: [update, patch]}}
  - {{apiGroups: [""], resources: [secrets], verbs: [get, list, watch, create, patch, delete]}}
  - {{apiGroups: ["", events.k8s.io], resources: [events], verbs: [create, patch]}}
  - {{apiGroups: [apps], resources: [deployments, statefulsets, daemonsets], verbs: [get, patch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: operator, namespace: {n}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: operator}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {user}}}
rules:
  - {{apiGroups: [apitoken.dev], resources: [apitokenpolicies], verbs: [get, list, watch]}}
  - {{apiGroups: [apitoken.dev], resources: [apitokenpolicies/status], verbs: [patch]}}
  - {{apiGroups: [""], resources: [namespaces], verbs: [list, watch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {user}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {user}}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]
---
apiVersion: apitoken.dev/v1alpha1
kind: ApiTokenPolicy
metadata: {{name: {n}}}
spec:
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {n}}}}}
  maxActiveTokens: {{perNamespace: 1}}
"#
    ));
    let mut op = Operator::start_verifying_on(n, &kubeconfig_as(&user, &[]));
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (ns.api(), ns.api());
    let apply = |name: &'static str| {
        let tokens = tokens.clone();
        async move {
            let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": {}});
            tokens.patch(name, &PatchParams::apply("e2e"), &Patch::Apply(&body)).await.unwrap();
        }
    };
    apply("one").await;
    let token = issued_token(&tokens, &secrets, "one", None).await;
    // The quota counts the namespace's tokens: the census watch works with the Role.
    apply("two").await;
    let status = wait_for("the second token to be refused", T, || async {
        let s = tokens.get("two").await.ok()?.status?;
        (s.phase == Some(Phase::Denied)).then_some(s)
    })
    .await;
    assert!(format!("{:?}", status.conditions).contains("perNamespace"), "{status:?}");
    let verify = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d"])
        .arg(json!({"token": token}).to_string())
        .arg(format!("{}/v1/verify", op.verify_url.as_deref().unwrap()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&verify.stdout), "200");
    let log = op.log_text();
    assert!(!log.contains("forbidden"), "every watch fits the namespaced RBAC:\n{log}");
    op.kill();
    let _ = kubectl()
        .args(["delete", &format!("apitokenpolicy/{n}"), &format!("clusterrole/{user}")])
        .arg(format!("clusterrolebinding/{user}"))
        .status();
    ns.cleanup().await;
}
