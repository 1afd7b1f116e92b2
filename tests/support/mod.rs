//! Test harness for end-to-end tests against a real local control plane (hack/local-cluster).
//!
//! - `APITOKEN_TEST_CLUSTER=<name>` reuses a running cluster of that name (what `make test` does);
//!   otherwise the first test of a binary starts a cluster of its own, tied to this process with
//!   `--owner-pid`, so it is torn down when the binary exits, even after a panic or SIGKILL.
//! - every test gets its own namespace (`TestNamespace`).
//! - `client_as` authenticates as any user and groups with a client certificate from the
//!   cluster's CA, so RBAC is exercised exactly as for a real person.
#![allow(dead_code)]

pub mod operator;
pub mod own_cluster;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub struct Cluster {
    pub name: String,
    pub kubeconfig: PathBuf,
    pub bin_dir: PathBuf,
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn hack(script: &str) -> Command {
    Command::new(repo_root().join("hack").join(script))
}

fn output_of(mut cmd: Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?} failed: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The cluster this test binary talks to, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let name = match std::env::var("APITOKEN_TEST_CLUSTER") {
            Ok(name) if !name.is_empty() => name,
            _ => {
                let name = format!("test-{}", std::process::id());
                let mut up = hack("local-cluster");
                up.args(["up", &name, "--owner-pid", &std::process::id().to_string()]);
                output_of(up);
                name
            }
        };
        let mut env = hack("local-cluster");
        env.args(["env", &name]);
        let env = output_of(env);
        let kubeconfig = env
            .lines()
            .find_map(|l| l.strip_prefix("export KUBECONFIG="))
            .expect("hack/local-cluster env prints KUBECONFIG")
            .into();
        let mut print = hack("build-control-plane");
        print.arg("--print");
        let bin_dir = output_of(print).trim().into();
        Cluster { name, kubeconfig, bin_dir }
    })
}

pub async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("readable kubeconfig");
    let config =
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("valid kubeconfig");
    Client::try_from(config).expect("client")
}

/// A cluster-admin client.
pub async fn admin_client() -> Client {
    client_from(&cluster().kubeconfig).await
}

/// A client authenticated as `user` in `groups` (client certificate signed by the cluster CA).
pub async fn client_as(user: &str, groups: &[&str]) -> Client {
    client_from(&kubeconfig_as(user, groups)).await
}

/// A kubeconfig file that authenticates as `user` in `groups`.
pub fn kubeconfig_as(user: &str, groups: &[&str]) -> PathBuf {
    let mut cmd = hack("local-cluster");
    cmd.args(["user", &cluster().name, user]).args(groups);
    output_of(cmd).trim().into()
}

/// `kubectl` built with the control plane, pointed at the test cluster as admin.
pub fn kubectl() -> Command {
    let c = cluster();
    let mut cmd = Command::new(c.bin_dir.join("kubectl"));
    cmd.env("KUBECONFIG", &c.kubeconfig);
    cmd
}

/// What a command a person would type printed, and whether it succeeded.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (kubectl, helm, curl, the plugin) with `stdin` fed to it (none: /dev/null).
pub fn run(mut cmd: Command, stdin: Option<&str>) -> Out {
    use std::io::Write;
    use std::process::Stdio;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The output of a command that must succeed (`what` names it in the failure).
pub fn ok(out: Out, what: &str) -> String {
    assert!(out.ok, "{what} failed:\n{}\n{}", out.stdout, out.stderr);
    out.stdout
}

/// A namespace of one test's own, deleted by `cleanup` (left behind for inspection on failure).
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        let client = admin_client().await;
        let name = format!("{prefix}-{:08x}", rand_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "apitoken.dev/test": "true" } }
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        Self { name, client }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub async fn cleanup(self) {
        let _ =
            Api::<Namespace>::all(self.client.clone()).delete(&self.name, &DeleteParams::background()).await;
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    // Distinct per call and per process; namespaces only need to be unique.
    #[allow(clippy::cast_possible_truncation)]
    let v = RandomState::new().hash_one(std::time::SystemTime::now()) as u32;
    v
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The token in an ApiToken's Secret once it hashes to `status.tokenHash` (issued, or rotated and
/// written); with `not`, a token other than that one.
pub async fn issued_token(
    tokens: &Api<apitoken_operator::api::ApiToken>,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    name: &str,
    not: Option<&str>,
) -> String {
    wait_for(&format!("{name} issued"), Duration::from_secs(30), || async {
        let s = tokens.get(name).await.ok()?.status?;
        let t = secrets.get_opt(s.secret_name.as_deref()?).await.ok()??.data?.get("token")?.0.clone();
        let t = String::from_utf8(t).ok()?;
        let hash = apitoken_operator::core::token::hash(&t);
        (Some(hash.as_str()) == s.token_hash.as_deref() && Some(t.as_str()) != not).then_some(t)
    })
    .await
}

/// Cases per property-based fuzz target: `default` in `make test`; `APITOKEN_FUZZ_CASES` for a
/// longer session.
pub fn fuzz_cases(default: u32) -> u32 {
    std::env::var("APITOKEN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What curl got back.
pub struct Reply {
    pub code: u16,
    /// Response headers, lower-cased.
    pub headers: String,
    /// The body as JSON (a JSON string of it when it is not JSON).
    pub body: serde_json::Value,
    /// The body as it came.
    pub raw: String,
}

/// One request with `curl -s <args>` (5 s at most).
pub fn curl(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-D", "/dev/stderr", "-w", "\n%{http_code}", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl is installed");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    Reply {
        code: code.trim().parse().unwrap_or(0),
        headers: String::from_utf8_lossy(&out.stderr).to_lowercase(),
        body: serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_string())),
        raw: body.to_string(),
    }
}
