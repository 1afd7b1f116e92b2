//! The operator as a real process against the test cluster, watching one namespace, with its
//! log kept in a file for inspection (and for the "no plaintext in logs" check).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, CustomResourceExt};
use tokio::sync::OnceCell;

use super::{admin_client, cluster, wait_for};

/// Installs the CRDs from `crds/` (once per test binary) and waits until they are Established.
pub async fn install_crds() {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async {
        let crds: Api<CustomResourceDefinition> = Api::all(admin_client().await);
        for crd in [apitoken_operator::api::ApiToken::crd()] {
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(&name, &PatchParams::apply("apitoken-e2e").force(), &Patch::Apply(&crd))
                .await
                .unwrap();
            wait_for("CRD Established", std::time::Duration::from_secs(30), || async {
                let c = crds.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            })
            .await;
        }
    })
    .await;
}

pub struct Operator {
    child: Option<Child>,
    pub log: PathBuf,
    namespace: String,
}

impl Operator {
    /// Starts `apitoken-operator run` watching `namespace`, logging at debug level.
    pub fn start(namespace: &str) -> Self {
        let dir = std::env::temp_dir().join("apitoken-e2e-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{namespace}.log"));
        let mut op = Self { child: None, log, namespace: namespace.to_string() };
        op.restart();
        op
    }

    /// Starts the process again (after `kill`), appending to the same log.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_apitoken-operator"))
            .args(["run", "--namespace", &self.namespace, "--no-leader-election", "--plain-http"])
            .args([
                "--components",
                "controller",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .env("KUBECONFIG", &cluster().kubeconfig)
            .env("RUST_LOG", "debug,hyper=info,tower=info,rustls=info,h2=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start apitoken-operator");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Is the process started and not exited?
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}
