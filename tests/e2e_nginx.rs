//! nginx (Debian's package) with `auth_request` in front of a static page, asking our
//! `/v1/auth`: 200 passes, 401 (with WWW-Authenticate) and 403 come back to the client.

mod support;

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

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx_binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" }
}

fn start_nginx(dir: &std::path::Path, port: u16, verify: &str) -> Nginx {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "metrics for token holders\n").unwrap();
    let conf = format!(
        r#"
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    location / {{
      auth_request /_apitoken;
      auth_request_set $token_name $upstream_http_x_token_name;
      add_header X-Token-Name $token_name;
    }}
    location = /_apitoken {{
      internal;
      proxy_pass {verify}/v1/auth?scope=metrics:read;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Authorization $http_authorization;
    }}
  }}
}}
"#,
        d = dir.display()
    );
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
        .expect("nginx is installed (make test installs nginx-light)");
    Nginx(child)
}

fn get(url: &str, token: Option<&str>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-D", "/dev/stderr", "-w", "\n%{http_code}", "--max-time", "5", url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), String::from_utf8_lossy(&out.stderr).to_lowercase(), body.to_string())
}

async fn issue(tokens: &Api<ApiToken>, secrets: &Api<Secret>, name: &str, scopes: &[&str]) -> String {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": {"scopes": scopes}});
    tokens.patch(name, &PatchParams::apply("e2e-user"), &Patch::Apply(&body)).await.unwrap();
    issued_token(tokens, secrets, name, None).await
}

#[tokio::test]
async fn nginx_auth_request_passes_200_401_and_403_through() {
    install_crds().await;
    let ns = TestNamespace::new("nginx").await;
    let op = Operator::start_verifying(&ns.name);
    let verify = op.verify_url.clone().unwrap();
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (ns.api(), ns.api());
    let reader = issue(&tokens, &secrets, "reader", &["metrics:read"]).await;
    let writer = issue(&tokens, &secrets, "writer", &["pipeline:write"]).await;

    let port = free_port();
    let dir = std::env::temp_dir().join(format!("apitoken-nginx-{}", std::process::id()));
    let _nginx = start_nginx(&dir, port, &verify);
    let url = format!("http://127.0.0.1:{port}/index.html");
    let (code, headers, body) = wait_for("nginx to serve the page for a valid token", T, || async {
        let r = get(&url, Some(&reader));
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!(code, 200);
    assert_eq!(body, "metrics for token holders\n");
    assert!(headers.contains("x-token-name: reader"), "{headers}");

    let (code, headers, _) =
        get(&url, Some("apitok_0000000000000000000000000000000000000000000000000000AAAAAA"));
    assert_eq!(code, 401);
    assert!(headers.contains("www-authenticate: bearer") && headers.contains("invalid_token"), "{headers}");
    let (code, headers, _) = get(&url, None);
    assert_eq!(code, 401);
    assert!(headers.contains("www-authenticate: bearer"), "{headers}");
    let (code, _, body) = get(&url, Some(&writer));
    assert_eq!(code, 403, "a valid token without metrics:read");
    assert!(!body.contains("metrics for token holders"));
    ns.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}
