//! A cluster of one test's own, for faults that would disturb every other test (stopping the API
//! server, restarting etcd). Torn down on drop, and by its watchdog if the test process dies.

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use super::client_from;
use super::operator::install_crds_with;

pub struct OwnCluster {
    pub name: String,
    pub kubeconfig: PathBuf,
    pub admin: kube::Client,
}

/// Runs `hack/local-cluster` with `args` and `env`; panics with its stderr on failure.
pub fn local_cluster_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(super::repo_root().join("hack/local-cluster"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "local-cluster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl OwnCluster {
    /// Starts `<prefix>-<pid>` (extra kube-apiserver flags in `apiserver_args`), installs the CRDs
    /// and creates `namespace`.
    pub async fn up(prefix: &str, apiserver_args: &str, namespace: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        let pid = std::process::id().to_string();
        local_cluster_env(
            &["up", &name, "--owner-pid", &pid],
            &[("APITOKEN_APISERVER_EXTRA_ARGS", apiserver_args)],
        );
        let env = local_cluster_env(&["env", &name], &[]);
        let kubeconfig: PathBuf =
            env.lines().find_map(|l| l.strip_prefix("export KUBECONFIG=")).expect("KUBECONFIG").into();
        let admin = client_from(&kubeconfig).await;
        install_crds_with(admin.clone()).await;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.unwrap();
        Self { name, kubeconfig, admin }
    }

    /// `hack/local-cluster <command> <this cluster>`.
    pub fn run(&self, command: &str) {
        local_cluster_env(&[command, &self.name], &[]);
    }

    /// The cluster's data directory (certificates, ports, logs).
    pub fn dir(&self) -> PathBuf {
        self.kubeconfig.parent().unwrap().to_path_buf()
    }

    /// The API server's loopback address.
    pub fn apiserver(&self) -> std::net::SocketAddr {
        let text = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let server = text.lines().find_map(|l| l.trim().strip_prefix("server: https://")).expect("server");
        server.parse().expect("host:port")
    }

    /// A copy of the admin kubeconfig that reaches the API server through `port` on loopback.
    pub fn kubeconfig_via(&self, port: u16) -> PathBuf {
        let text = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let server = format!("https://{}", self.apiserver());
        let via = text.replace(&server, &format!("https://127.0.0.1:{port}"));
        assert_ne!(via, text);
        let path = self.dir().join(format!("via-{port}.kubeconfig"));
        std::fs::write(&path, via).unwrap();
        path
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ =
            Command::new(super::repo_root().join("hack/local-cluster")).args(["down", &self.name]).output();
    }
}

/// The HTTP status `POST <base>/v1/verify` answers for `token` (0 when there is no answer in 2 s).
pub fn verify_status(base: &str, token: &str) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", "-X", "POST"])
        .arg(format!("{base}/v1/verify"))
        .args(["-d", &json!({"token": token}).to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}
