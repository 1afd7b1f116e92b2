//! nginx (Debian's package) with `auth_request` in front of a backend, asking our `/v1/auth`,
//! configured by examples/nginx/nginx.conf itself (only addresses replaced): 200 passes, 401 and
//! 403 come back to the client with the WWW-Authenticate challenge, and no request a client can
//! make turns into a 500 (nginx makes one of any answer of the auth endpoint but 2xx, 401, 403).

mod support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apitoken_operator::api::ApiToken;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::operator::{Operator, free_port, install_crds};
use support::{TestNamespace, issued_token, wait_for};

const T: Duration = Duration::from_secs(30);

const EXAMPLE: &str = include_str!("../examples/nginx/nginx.conf");
const EXAMPLE_AUTH_URL: &str =
    "https://apitoken-operator.apitoken-system.svc/v1/auth?scope=metrics:read&audience=data-plane";

struct Nginx {
    child: Child,
    /// The example's server.
    port: u16,
    /// The example's server asking /v1/auth for a malformed scope (a configuration mistake).
    bad_scope_port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" }
}

/// `text` with `from` (which must occur exactly once, so the example cannot drift) replaced.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "examples/nginx/nginx.conf has {from:?} once");
    text.replace(from, to)
}

/// The example with a cluster's addresses replaced by local ones: plain HTTP to `verify`
/// asking `query`, the backend on `backend`.
fn example_server(listen: u16, backend: u16, verify: &str, query: &str) -> String {
    let conf = replace_once(EXAMPLE, "listen 8080;", &format!("listen 127.0.0.1:{listen};"));
    let conf = replace_once(
        &conf,
        "proxy_pass http://backend.default.svc:8080;",
        &format!("proxy_pass http://127.0.0.1:{backend};"),
    );
    let conf = replace_once(&conf, EXAMPLE_AUTH_URL, &format!("{verify}/v1/auth?{query}"));
    replace_once(&conf, "proxy_ssl_trusted_certificate /etc/apitoken/ca.crt;", "")
}

fn start_nginx(dir: &Path, verify: &str) -> Nginx {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "metrics for token holders\n").unwrap();
    let (port, bad_scope_port, backend) = (free_port(), free_port(), free_port());
    let example = example_server(port, backend, verify, "scope=metrics:read&audience=data-plane");
    // The same server again (without the http-level map, which is there once already).
    let bad = example_server(bad_scope_port, backend, verify, "scope=metrics&audience=data-plane");
    let bad = &bad[bad.find("\nserver {").expect("the example has a server block")..];
    let conf = format!(
        r"
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;
  include {d}/example.conf;
  include {d}/bad-scope.conf;
  # The backend: shows which token name nginx handed on.
  server {{
    listen 127.0.0.1:{backend};
    root {d}/www;
    add_header X-Backend-Saw-Token-Name $http_x_token_name;
  }}
}}
",
        d = dir.display()
    );
    std::fs::write(dir.join("example.conf"), example).unwrap();
    std::fs::write(dir.join("bad-scope.conf"), bad).unwrap();
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx_binary())
        .args([
            "-p",
            dir.to_str().unwrap(),
            "-c",
            dir.join("nginx.conf").to_str().unwrap(),
            "-g",
            "daemon off; master_process off;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is installed (hack/ensure-deps nginx installs nginx-light)");
    Nginx { child, port, bad_scope_port }
}

struct Reply {
    code: u16,
    /// Response headers, lower-cased.
    headers: String,
    body: String,
}

impl Reply {
    /// Values of header `name` (lower case).
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers.lines().filter_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim).collect()
    }
}

/// GET `url` with `headers` (raw bytes: a client may send anything).
fn get(url: &str, headers: &[&[u8]]) -> Reply {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-D", "/dev/stderr", "-w", "\n%{http_code}", "--max-time", "5", url]);
    for h in headers {
        cmd.arg("-H").arg(OsStr::from_bytes(h));
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    Reply {
        code: code.trim().parse().unwrap_or(0),
        headers: String::from_utf8_lossy(&out.stderr).to_lowercase(),
        body: body.to_string(),
    }
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Authorization: Bearer {token}").into_bytes()
}

async fn issue(tokens: &Api<ApiToken>, secrets: &Api<Secret>, name: &str, scopes: &[&str]) -> String {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": {"scopes": scopes}});
    tokens.patch(name, &PatchParams::apply("e2e-user"), &Patch::Apply(&body)).await.unwrap();
    issued_token(tokens, secrets, name, None).await
}

#[tokio::test]
async fn nginx_auth_request_passes_200_401_and_403_through_never_500() {
    install_crds().await;
    let ns = TestNamespace::new("nginx").await;
    let op = Operator::start_verifying(&ns.name);
    let verify = op.verify_url.clone().unwrap();
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (ns.api(), ns.api());
    let reader = issue(&tokens, &secrets, "reader", &["metrics:read"]).await;
    let writer = issue(&tokens, &secrets, "writer", &["pipeline:write"]).await;

    let dir = std::env::temp_dir().join(format!("apitoken-nginx-{}", std::process::id()));
    let nginx = start_nginx(&dir, &verify);
    let url = format!("http://127.0.0.1:{}/index.html", nginx.port);
    let ok = wait_for("nginx to serve the page for a valid token", T, || async {
        let r = get(&url, &[&bearer(&reader)]);
        (r.code == 200).then_some(r)
    })
    .await;
    assert_eq!(ok.body, "metrics for token holders\n");
    assert_eq!(ok.header("x-backend-saw-token-name"), ["reader"], "{}", ok.headers);
    assert!(ok.header("www-authenticate").is_empty(), "{}", ok.headers);

    // The scheme is case-insensitive (RFC 7235), and 1*SP may follow it.
    for scheme in ["BEARER ", "bearer ", "BeArEr  "] {
        let r = get(&url, &[format!("Authorization: {scheme}{reader}").as_bytes()]);
        assert_eq!(r.code, 200, "{scheme:?}: {}", r.headers);
    }
    // Only Authorization reaches /v1/auth: not the client's own X-Required-Scopes, nor more
    // headers than the verifier's HTTP server takes (100; it would answer 431, a 500 here).
    let r = get(&url, &[&bearer(&reader), b"X-Required-Scopes: Bad Scope"]);
    assert_eq!(r.code, 200, "{}", r.headers);
    let many: Vec<Vec<u8>> = (0..120).map(|i| format!("X-Client-{i}: x").into_bytes()).collect();
    let with_many = |auth: Vec<u8>| {
        let mut h: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        h.push(&auth);
        get(&url, &h).code
    };
    assert_eq!(with_many(bearer(&reader)), 200, "120 client headers");
    assert_eq!(with_many(bearer(&writer)), 403, "120 client headers");

    // Refusals: the status and the one challenge reach the client; never a 500.
    let refused = |r: &Reply, code: u16, challenge: &str, what: &str| {
        assert_eq!(r.code, code, "{what}: {} {}", r.headers, r.body);
        let got = r.header("www-authenticate");
        assert_eq!(got.len(), 1, "{what}: one challenge: {}", r.headers);
        assert!(got[0].starts_with("bearer realm=\"apitoken\""), "{what}: {}", got[0]);
        assert!(got[0].contains(challenge), "{what}: {} lacks {challenge}", got[0]);
        assert!(!r.body.contains("metrics for token holders"), "{what}");
        assert!(!r.headers.contains(&reader.to_lowercase()), "{what}: the token is echoed");
    };
    let unknown = "apitok_0000000000000000000000000000000000000000000000000000AAAAAA";
    refused(&get(&url, &[&bearer(unknown)]), 401, "error=\"invalid_token\"", "an unknown token");
    let none = get(&url, &[]);
    refused(&none, 401, "", "no Authorization");
    assert!(!none.headers.contains("error="), "no error code without credentials: {}", none.headers);
    refused(&get(&url, &[b"Authorization: Bearer"]), 401, "error=\"invalid_request\"", "Bearer alone");
    let basic = get(&url, &[b"Authorization: Basic dXNlcjpwYXNz"]);
    refused(&basic, 401, "", "Basic");
    assert!(
        !basic.headers.contains("error="),
        "a foreign scheme gets the plain challenge: {}",
        basic.headers
    );
    refused(
        &get(&url, &[b"Authorization: Bearer \xff\xfe"]),
        401,
        "error=\"invalid_request\"",
        "bytes outside ASCII",
    );
    refused(
        &get(&url, &[&bearer(&writer)]),
        403,
        "error=\"insufficient_scope\"",
        "a valid token without metrics:read",
    );
    assert!(get(&url, &[&bearer(&writer)]).headers.contains("scope=\"metrics:read\""));
    let bad_scope = format!("http://127.0.0.1:{}/index.html", nginx.bad_scope_port);
    refused(
        &get(&bad_scope, &[&bearer(&reader)]),
        401,
        "error=\"invalid_request\"",
        "a malformed scope in the configuration",
    );
    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    assert!(!log.contains("auth request unexpected status"), "{log}");
    drop(nginx);
    ns.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Behind nginx every end user has nginx's address: a flood of bad tokens blocks the address,
/// and the answer must still be one nginx passes on (401 with Retry-After, not 429 -> 500).
#[tokio::test]
async fn a_rate_limited_client_sees_401_with_retry_after_through_nginx() {
    install_crds().await;
    let ns = TestNamespace::new("nginx-flood").await;
    let op = Operator::start_verifying_with_default_limits(&ns.name);
    let verify = op.verify_url.clone().unwrap();
    let ready = format!("{}/readyz", op.metrics_url);
    wait_for("the verifier to be ready", T, || async { (get(&ready, &[]).code == 200).then_some(()) }).await;
    let dir = std::env::temp_dir().join(format!("apitoken-nginx-flood-{}", std::process::id()));
    let nginx = start_nginx(&dir, &verify);
    let url = format!("http://127.0.0.1:{}/index.html", nginx.port);
    let unknown = bearer("apitok_0000000000000000000000000000000000000000000000000000AAAAAA");
    wait_for("nginx to answer", T, || async { (get(&url, &[&unknown]).code != 0).then_some(()) }).await;
    let mut replies = Vec::new();
    while replies.len() < 200 {
        let r = get(&url, &[&unknown]);
        let limited = !r.header("retry-after").is_empty();
        replies.push(r);
        if limited {
            break;
        }
    }
    let last = replies.last().unwrap();
    assert!(!last.header("retry-after").is_empty(), "limited within 200 failures");
    println!("limited after {} failures", replies.len());
    assert!(
        replies.iter().all(|r| r.code == 401),
        "{:?}",
        replies.iter().map(|r| r.code).collect::<Vec<_>>()
    );
    let challenge = last.header("www-authenticate");
    assert_eq!(challenge.len(), 1, "{}", last.headers);
    assert!(challenge[0].contains("error=\"invalid_token\""), "{}", challenge[0]);
    assert!(last.header("retry-after")[0].parse::<u64>().unwrap() >= 1, "{}", last.headers);
    drop(nginx);
    ns.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}
