//! The operator as a real process against the test cluster, watching one namespace, with its
//! log kept in a file for inspection (and for the "no plaintext in logs" check).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, CustomResourceExt};
use tokio::sync::OnceCell;

use super::{admin_client, cluster, wait_for};

/// Installs the CRDs (once per test binary) and waits until they are Established.
pub async fn install_crds() {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async { install_crds_with(admin_client().await).await }).await;
}

/// Installs the CRDs through `client` and waits until they are Established.
pub async fn install_crds_with(client: kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for crd in [apitoken_operator::api::ApiToken::crd(), apitoken_operator::api::ApiTokenPolicy::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &PatchParams::apply("apitoken-e2e").force(), &Patch::Apply(&crd)).await.unwrap();
        wait_for("CRD Established", std::time::Duration::from_secs(30), || async {
            let c = crds.get(&name).await.ok()?;
            c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        })
        .await;
    }
}

/// The chart's full name for the release the tests install in `namespace`.
pub fn chart_fullname(namespace: &str) -> String {
    format!("r-{namespace}-apitoken-operator")
}

/// Installs exactly the Helm chart's ServiceAccount and RBAC, released into `namespace`, and
/// returns a kubeconfig that acts as that ServiceAccount (admin credentials impersonating it).
/// Every operator the tests start runs with it, so the suite proves the chart's role suffices.
pub fn chart_service_account_kubeconfig(namespace: &str) -> PathBuf {
    let c = cluster();
    let release = format!("r-{namespace}");
    let rendered = Command::new(c.bin_dir.join("helm"))
        .args([
            "template",
            &release,
            "charts/apitoken-operator",
            "--namespace",
            namespace,
            "--kube-version",
            "1.35.4",
        ])
        .args(["--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccount.yaml"])
        .current_dir(super::repo_root())
        .output()
        .expect("helm");
    assert!(rendered.status.success(), "helm template: {}", String::from_utf8_lossy(&rendered.stderr));
    let mut apply = super::kubectl()
        .args(["apply", "--server-side", "--field-manager=e2e-chart-rbac", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut apply.stdin.take().unwrap(), &rendered.stdout).unwrap();
    let out = apply.wait_with_output().unwrap();
    assert!(out.status.success(), "applying the chart RBAC: {}", String::from_utf8_lossy(&out.stderr));
    let admin = std::fs::read_to_string(&c.kubeconfig).unwrap();
    let sa = format!("system:serviceaccount:{namespace}:{}", chart_fullname(namespace));
    let impersonating = admin.replace(
        "  user:\n    client-certificate:",
        &format!("  user:\n    as: {sa}\n    client-certificate:"),
    );
    assert_ne!(impersonating, admin, "the admin kubeconfig has the expected shape");
    let path = c.kubeconfig.with_file_name(format!("chart-sa-{namespace}.kubeconfig"));
    std::fs::write(&path, impersonating).unwrap();
    path
}

/// Distinguishes the logs of several operators in one namespace.
static LOG_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub struct Operator {
    child: Option<Child>,
    pub log: PathBuf,
    pub args: Vec<String>,
    kubeconfig: PathBuf,
    /// `http://127.0.0.1:<port>` of the verification service, when it runs.
    pub verify_url: Option<String>,
    pub metrics_url: String,
}

/// A loopback port that was free a moment ago, and that this process has not handed out before
/// (the kernel may offer a port again until the first taker binds it: an operator once got the
/// same port for --listen and --metrics-listen and stopped).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

impl Operator {
    /// Starts `apitoken-operator run` (controller only) watching `namespace`, at debug level.
    pub fn start(namespace: &str) -> Self {
        Self::start_as_chart(namespace, "controller", free_port())
    }

    /// Starts the controller and the verification service (plain HTTP on a free loopback port).
    pub fn start_verifying(namespace: &str) -> Self {
        let mut op = Self::start_as_chart(namespace, "controller,verify", free_port());
        op.without_failure_limits();
        op
    }

    /// Controller and verification with `kubeconfig`, without failure limits.
    pub fn start_verifying_on(namespace: &str, kubeconfig: &std::path::Path) -> Self {
        let mut op = Self::start_on(namespace, "controller,verify", kubeconfig, free_port());
        op.without_failure_limits();
        op
    }

    /// Restarts with failure limits out of the way: tests poll with failing tokens from one
    /// address (the limiter has a test of its own).
    fn without_failure_limits(&mut self) {
        self.kill();
        self.args.extend([
            "--failures-per-second".into(),
            "100000".into(),
            "--failures-burst".into(),
            "100000".into(),
        ]);
        self.restart();
    }

    /// Verification with the default failure limits.
    pub fn start_verifying_with_default_limits(namespace: &str) -> Self {
        Self::start_as_chart(namespace, "controller,verify", free_port())
    }

    pub fn start_with(namespace: &str, components: &str, kubeconfig: &std::path::Path) -> Self {
        Self::start_on(namespace, components, kubeconfig, free_port())
    }

    /// As the chart's ServiceAccount (see [`chart_service_account_kubeconfig`]), released into
    /// `namespace`, with the names the chart gives the operator.
    pub fn start_as_chart(namespace: &str, components: &str, listen: u16) -> Self {
        let kubeconfig = chart_service_account_kubeconfig(namespace);
        let mut op = Self::start_on(namespace, components, &kubeconfig, listen);
        op.kill();
        let name = chart_fullname(namespace);
        op.args.extend([
            "--operator-namespace".into(),
            namespace.into(),
            "--webhook-config-name".into(),
            name.clone(),
            "--webhook-secret".into(),
            format!("{name}-webhook-tls"),
            "--service-name".into(),
            name.clone(),
            // The chart's Role grants the Lease by this name only.
            "--lease-name".into(),
            name,
        ]);
        op.restart();
        op
    }

    /// As `start_with`, with the verification service on `listen`.
    pub fn start_on(namespace: &str, components: &str, kubeconfig: &std::path::Path, listen: u16) -> Self {
        let dir = std::env::temp_dir().join("apitoken-e2e-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let n = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.join(format!("{namespace}-{}-{n}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let metrics = free_port();
        let args = vec![
            "run".into(),
            "--namespace".into(),
            namespace.into(),
            "--no-leader-election".into(),
            "--plain-http".into(),
            "--components".into(),
            components.into(),
            "--listen".into(),
            format!("127.0.0.1:{listen}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ];
        let mut op = Self {
            child: None,
            log,
            args,
            kubeconfig: kubeconfig.to_path_buf(),
            verify_url: components.contains("verify").then(|| format!("http://127.0.0.1:{listen}")),
            metrics_url: format!("http://127.0.0.1:{metrics}"),
        };
        op.restart();
        op
    }

    /// A controller replica as the chart runs it, with leader election on (the Lease named
    /// `apitoken-operator` in `namespace`).
    pub fn start_elected(namespace: &str) -> Self {
        let mut op = Self::start_as_chart(namespace, "controller", free_port());
        op.kill();
        op.args.retain(|a| a != "--no-leader-election");
        op.restart();
        op
    }

    /// Starts the process again (after `kill`), appending to the same log.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_apitoken-operator"))
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
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

    /// SIGTERM: a clean shutdown.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
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

/// The identity holding the operator's Lease in `leases`' namespace, if any: the Lease named
/// after the chart's release (`--lease-name`), or the default `apitoken-operator`.
pub async fn lease_holder(leases: &Api<k8s_openapi::api::coordination::v1::Lease>) -> Option<String> {
    let list = leases.list(&kube::api::ListParams::default()).await.ok()?;
    let lease = list.items.into_iter().find(|l| {
        l.metadata
            .name
            .as_deref()
            .is_some_and(|n| n == "apitoken-operator" || n.ends_with("-apitoken-operator"))
    })?;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}
