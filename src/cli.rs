//! Command line (design §8). Every flag can also be set through an `APITOKEN_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "apitoken-operator",
    version,
    about = "Issues, rotates, enforces and verifies API tokens declared as Kubernetes resources"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller, the verification service and the admission webhooks.
    Run(Box<RunArgs>),
    /// Print every CustomResourceDefinition as YAML (what `crds/` holds).
    Crd {
        /// Print the Markdown field reference instead (what `docs/crd-reference.md` holds).
        #[arg(long)]
        reference: bool,
    },
    /// Print the version.
    Version,
}

/// Parts of the operator one process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Component {
    Controller,
    Verify,
    Admission,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address for verification and admission (TLS unless --plain-http).
    #[arg(long, env = "APITOKEN_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Address for /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, env = "APITOKEN_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Serving certificate (PEM). Without it the operator manages its own.
    #[arg(long, env = "APITOKEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Serving key (PEM), with --tls-cert.
    #[arg(long, env = "APITOKEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate (PEM) that issued --tls-cert (cert-manager's `ca.crt`), published in
    /// --ca-configmap for clients. Re-read with the certificate files.
    #[arg(long, env = "APITOKEN_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// How often --tls-cert, --tls-key and --tls-ca are checked for changes (cert-manager renews
    /// them in place).
    #[arg(long, env = "APITOKEN_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub tls_reload_interval: jiff::SignedDuration,

    /// ConfigMap in --operator-namespace where the operator publishes the CA certificate clients
    /// must trust (key `ca.crt`; never the key). Default `<service-name>-ca`; "" publishes nothing.
    #[arg(long, env = "APITOKEN_CA_CONFIGMAP")]
    pub ca_configmap: Option<String>,

    /// Serve --listen without TLS (local development and tests only).
    #[arg(long, env = "APITOKEN_PLAIN_HTTP")]
    pub plain_http: bool,

    /// Which parts this process runs.
    #[arg(
        long,
        env = "APITOKEN_COMPONENTS",
        value_delimiter = ',',
        default_value = "controller,verify,admission"
    )]
    pub components: Vec<Component>,

    /// Watch one namespace only (default: all).
    #[arg(long, env = "APITOKEN_NAMESPACE")]
    pub namespace: Option<String>,

    /// Elect a leader with a Lease so several replicas are safe.
    #[arg(
        long,
        env = "APITOKEN_LEADER_ELECTION",
        default_value_t = true,
        overrides_with = "no_leader_election"
    )]
    pub leader_election: bool,

    /// Run the controller without leader election.
    #[arg(long = "no-leader-election", overrides_with = "leader_election")]
    pub no_leader_election: bool,

    /// Lease the controller replicas elect their leader on, in --operator-namespace (one per
    /// release: two releases sharing a Lease would share one leader).
    #[arg(long, env = "APITOKEN_LEASE_NAME", default_value = "apitoken-operator")]
    pub lease_name: String,

    /// After SIGTERM: /readyz answers 503 at once while --listen keeps serving for this long (so
    /// endpoint controllers and load balancers stop sending traffic; HTTP/1.1 answers meanwhile
    /// say `Connection: close`, so pooled clients reconnect elsewhere), then new connections are
    /// refused, requests in flight finish and the Lease is released.
    #[arg(long, env = "APITOKEN_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_delay)]
    pub shutdown_delay: jiff::SignedDuration,

    /// Proxies (CIDRs or addresses, comma-separated) whose X-Forwarded-For / X-Real-IP are
    /// believed: a request from one of them is counted against the right-most address of
    /// X-Forwarded-For that is not itself a trusted proxy. From anyone else these headers are ignored.
    #[arg(long, env = "APITOKEN_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<crate::verify::limiter::Cidr>,

    /// GitHub's secret scanning public keys (the JSON document GitHub publishes, e.g. a mounted
    /// ConfigMap): with it, /v1/leaks/github takes GitHub's leaked-token alerts. Re-read when it
    /// changes. See docs/leak-reports.md.
    #[arg(long, env = "APITOKEN_LEAK_KEYS_FILE")]
    pub leak_keys_file: Option<PathBuf>,

    /// Failed verifications a client may make per second, sustained, before it is refused with `Retry-After` (429; 401 on /v1/auth).
    #[arg(long, env = "APITOKEN_FAILURES_PER_SECOND", default_value_t = 5)]
    pub failures_per_second: u32,

    /// Failed verifications a client may make in a burst before it is refused with `Retry-After` (429; 401 on /v1/auth).
    #[arg(long, env = "APITOKEN_FAILURES_BURST", default_value_t = 20)]
    pub failures_burst: u32,

    /// Namespace the operator runs in (its webhook certificate Secret and Lease live there).
    #[arg(long, env = "APITOKEN_OPERATOR_NAMESPACE", default_value = "apitoken-system")]
    pub operator_namespace: String,

    /// Name of the Validating/MutatingWebhookConfigurations whose caBundle the operator manages.
    #[arg(long, env = "APITOKEN_WEBHOOK_CONFIG_NAME", default_value = "apitoken-operator")]
    pub webhook_config_name: String,

    /// Secret holding the self-managed webhook CA and serving certificate.
    #[arg(long, env = "APITOKEN_WEBHOOK_SECRET", default_value = "apitoken-operator-webhook-tls")]
    pub webhook_secret: String,

    /// Service name the API server reaches the webhook through (for the certificate's names).
    #[arg(long, env = "APITOKEN_SERVICE_NAME", default_value = "apitoken-operator")]
    pub service_name: String,

    /// Validity of the self-managed serving certificate; it is renewed with a third left.
    #[arg(long, env = "APITOKEN_WEBHOOK_CERT_VALIDITY", default_value = "365d", value_parser = parse_validity)]
    pub webhook_cert_validity: jiff::SignedDuration,

    /// The operator's own username (default: asked from the API server). Only it may change
    /// the `apitoken.dev/created-by` annotation.
    #[arg(long, env = "APITOKEN_OPERATOR_USERNAME")]
    pub operator_username: Option<String>,

    /// Log format.
    #[arg(long, env = "APITOKEN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn parse_validity(s: &str) -> Result<jiff::SignedDuration, String> {
    let d = crate::core::lifetime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < jiff::SignedDuration::from_secs(30) {
        return Err("must be at least 30s".into());
    }
    Ok(d)
}

fn parse_interval(s: &str) -> Result<jiff::SignedDuration, String> {
    let d = crate::core::lifetime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < jiff::SignedDuration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn parse_delay(s: &str) -> Result<jiff::SignedDuration, String> {
    use crate::core::lifetime::DurationError;
    match crate::core::lifetime::parse_duration(s) {
        Ok(d) => Ok(d),
        Err(DurationError::Zero(_)) => Ok(jiff::SignedDuration::ZERO),
        Err(_) if s == "0" => Ok(jiff::SignedDuration::ZERO),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_cidr(s: &str) -> Result<crate::verify::limiter::Cidr, String> {
    s.trim().parse()
}

impl RunArgs {
    /// The ConfigMap the CA is published in, if any.
    pub fn ca_configmap(&self) -> Option<String> {
        match &self.ca_configmap {
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name.clone()),
            None => Some(format!("{}-ca", self.service_name)),
        }
    }

    pub fn leader_election(&self) -> bool {
        self.leader_election && !self.no_leader_election
    }

    pub fn runs(&self, component: Component) -> bool {
        self.components.contains(&component)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("apitoken-operator").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_follow_the_design() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else { panic!("not run") };
        assert_eq!(run.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(run.metrics_listen, "0.0.0.0:8080".parse().unwrap());
        assert!(run.leader_election());
        assert!(
            run.runs(Component::Controller) && run.runs(Component::Verify) && run.runs(Component::Admission)
        );
        assert_eq!(run.log_format, LogFormat::Text);
    }

    #[test]
    fn components_and_leader_election_can_be_narrowed() {
        let Command::Run(run) =
            parse(&["run", "--components", "verify", "--no-leader-election"]).unwrap().command
        else {
            panic!("not run")
        };
        assert!(!run.leader_election());
        assert!(run.runs(Component::Verify) && !run.runs(Component::Controller));
    }

    #[test]
    fn operations_flags_have_defaults_and_parse() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else { panic!("not run") };
        assert_eq!(run.lease_name, "apitoken-operator");
        assert_eq!(run.shutdown_delay, jiff::SignedDuration::from_secs(5));
        assert_eq!(run.ca_configmap().as_deref(), Some("apitoken-operator-ca"));
        assert!(run.trusted_proxies.is_empty());
        let Command::Run(run) = parse(&[
            "run",
            "--service-name",
            "r1-apitoken",
            "--lease-name",
            "r1",
            "--shutdown-delay",
            "0s",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.1.7",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        assert_eq!(run.ca_configmap().as_deref(), Some("r1-apitoken-ca"));
        assert_eq!((run.lease_name.as_str(), run.shutdown_delay), ("r1", jiff::SignedDuration::ZERO));
        assert_eq!(run.trusted_proxies.len(), 2);
        let Command::Run(run) = parse(&["run", "--ca-configmap", ""]).unwrap().command else { panic!() };
        assert_eq!(run.ca_configmap(), None, "empty: nothing published");
        let err = parse(&["run", "--trusted-proxies", "10.0.0.0/40"]).unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/40") && err.contains("CIDR"), "{err}");
        let err = parse(&["run", "--tls-ca", "/ca.crt"]).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let err = parse(&["run", "--components", "everything"]).unwrap_err().to_string();
        assert!(err.contains("everything"), "{err}");
        let err = parse(&["run", "--tls-cert", "/x"]).unwrap_err().to_string();
        assert!(err.contains("--tls-key"), "{err}");
    }
}
