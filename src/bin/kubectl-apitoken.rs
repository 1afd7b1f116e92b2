//! `kubectl apitoken`: the token page in the terminal. User guide: docs/kubectl-plugin.md.
//!
//!   kubectl apitoken create NAME --scope metrics:read [--permission-set read-only] [--lifetime 30d]
//!   kubectl apitoken list [-A] [--phase Active] [-o json|yaml]
//!   kubectl apitoken describe NAME
//!   kubectl apitoken rotate NAME
//!   kubectl apitoken revoke NAME
//!   kubectl apitoken regenerate NAME
//!   kubectl apitoken reveal NAME
//!   kubectl apitoken delete NAME
//!   ... | kubectl apitoken report-leak --server URL [--url WHERE] [--as-service-account NS/NAME]
//!
//! A token's plaintext goes to stdout only, and only from `create`, `regenerate` and `reveal`;
//! everything else a person reads goes to stderr.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use apitoken_operator::api::{ApiToken, ApiTokenSpec, ApiTokenStatus, Phase, ROTATE_ANNOTATION};
use apitoken_operator::core::token::{self, Plaintext};
use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;

/// Field manager of the plugin's writes.
const MANAGER: &str = "kubectl-apitoken";
/// How often a wait looks at the ApiToken again.
const POLL: Duration = Duration::from_millis(200);
/// Ready=False reasons with which the operator says it will not issue the current spec.
const FAILURE_REASONS: [&str; 5] =
    ["SecretConflict", "SecretWriteFailed", "SecretInvalid", "InvalidSpec", "PolicyViolation"];
/// The Event the operator records when it refuses a requested rotation.
const ROTATION_REFUSED: &str = "RotationRefused";

const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  any other error: kubeconfig, connection, an unexpected answer from the API server
  2  usage: an unknown command or flag, or an invalid value (e.g. --phase)
  3  refused: by the API server (RBAC, validation, an admission webhook), by policy, or by the
     operator (SecretConflict, SecretWriteFailed, SecretInvalid, InvalidSpec, a rotation of a
     token that no longer complies); or the token is Revoked, Expired, Denied or Failed
  4  timed out waiting for the operator (is it running and watching the namespace?)
  5  not found: the ApiToken (or its Secret, or the namespace) does not exist
  6  already exists: `create` of a name that is taken

Flags go after `apitoken`: kubectl apitoken --context prod -n team-a list";

/// The API server's address, for messages about not reaching it.
static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// What went wrong, and the exit code that tells scripts which kind it was.
#[derive(Debug)]
enum Failure {
    Other(String),
    Refused(String),
    TimedOut(String),
    NotFound(String),
    Exists(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::Refused(_) => 3,
            Failure::TimedOut(_) => 4,
            Failure::NotFound(_) => 5,
            Failure::Exists(_) => 6,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Other(m)
            | Failure::Refused(m)
            | Failure::TimedOut(m)
            | Failure::NotFound(m)
            | Failure::Exists(m) => m,
        }
    }
}

type Res<T> = Result<T, Failure>;

#[derive(Parser)]
#[command(
    name = "kubectl-apitoken",
    bin_name = "kubectl apitoken",
    version,
    about = "Create, list, describe, rotate, revoke, regenerate, reveal and delete ApiTokens, and report leaked ones",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// The kubeconfig cluster to use (default: the context's).
    #[arg(long, global = true, value_name = "NAME")]
    cluster: Option<String>,
    /// The kubeconfig user to use (default: the context's).
    #[arg(long, global = true, value_name = "NAME")]
    user: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a token, wait until it is issued, and print it once (on stdout). Refuses a name
    /// that exists.
    #[command(group(ArgGroup::new("grants").required(true).multiple(true).args(["scopes", "permission_sets"])))]
    Create {
        name: String,
        /// A scope, `resource[/name]:verb`; repeat for several.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// A permission set an ApiTokenPolicy defines (e.g. read-only); repeat for several.
        #[arg(long = "permission-set", value_name = "NAME")]
        permission_sets: Vec<String>,
        /// Lifetime such as 30d, or `never` where a policy allows it (default: the policy's,
        /// else 90d).
        #[arg(long)]
        lifetime: Option<String>,
        /// An audience the token is bound to; repeat for several.
        #[arg(long = "audience", value_name = "AUDIENCE")]
        audiences: Vec<String>,
        /// What the token is for and who uses it.
        #[arg(long)]
        description: Option<String>,
        /// Human-readable name shown in token lists.
        #[arg(long)]
        display_name: Option<String>,
        /// How long to wait for the token.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// List tokens: display form, scopes, phase, expiry, last use. Never shows a token.
    List {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Only tokens in this phase (case-insensitive).
        #[arg(long, value_enum, ignore_case = true)]
        phase: Option<PhaseArg>,
        /// `json` and `yaml` print a `List` as `kubectl get -o json` does.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show a token's spec, status, conditions and recent Events. Never shows the token.
    Describe { name: String },
    /// Rotate now and wait for the new token; the previous one stays valid for the grace period.
    Rotate {
        name: String,
        /// How long to wait for the new token.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Revoke: rejected at once, Secret removed. `regenerate` issues a new token later.
    Revoke {
        name: String,
        /// How long to wait for the operator to record the revocation.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Un-revoke a revoked token: a new token, same configuration, printed once (on stdout).
    #[command(visible_alias = "unrevoke")]
    Regenerate {
        name: String,
        /// How long to wait for the new token.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the current token from its Secret (on stdout).
    Reveal { name: String },
    /// Delete the ApiToken; its Secret is removed with it.
    Delete {
        name: String,
        /// How long to wait until it is gone.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Report leaked tokens, read from stdin one per line (never from the command line): each
    /// one the operator issued and that still works is rejected at once and replaced. Prints
    /// true_positive or false_positive per token (its display form, never the token).
    /// Needs RBAC `create` on `leaks.apitoken.dev`.
    ReportLeak {
        /// The verification service: its Service URL in the cluster, an Ingress, or a
        /// port-forward (https://localhost:8443).
        #[arg(long, env = "APITOKEN_SERVER", value_name = "URL")]
        server: String,
        /// The CA that signed the service's certificate (ca.crt of the `<release>-ca` ConfigMap).
        #[arg(long, value_name = "PATH")]
        certificate_authority: Option<PathBuf>,
        /// The name the service's certificate is checked against (through a port-forward: the
        /// Service's DNS name, e.g. apitoken-operator.apitoken-system.svc).
        #[arg(long, value_name = "NAME")]
        tls_server_name: Option<String>,
        /// Where the tokens were found (recorded with the leak). Never put a token in it.
        #[arg(long, value_name = "WHERE")]
        url: Option<String>,
        /// Report as this ServiceAccount (NAMESPACE/NAME): a 10-minute token is requested for it
        /// with your credentials, as `kubectl create token` does. Default: your kubeconfig
        /// user's bearer token (a token, token file or exec plugin such as OIDC).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        as_service_account: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// The six phases, as `--phase` accepts them.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PhaseArg {
    #[value(name = "Pending")]
    Pending,
    #[value(name = "Active")]
    Active,
    #[value(name = "Expired")]
    Expired,
    #[value(name = "Revoked")]
    Revoked,
    #[value(name = "Denied")]
    Denied,
    #[value(name = "Failed")]
    Failed,
}

impl PhaseArg {
    fn phase(self) -> Phase {
        match self {
            PhaseArg::Pending => Phase::Pending,
            PhaseArg::Active => Phase::Active,
            PhaseArg::Expired => Phase::Expired,
            PhaseArg::Revoked => Phase::Revoked,
            PhaseArg::Denied => Phase::Denied,
            PhaseArg::Failed => Phase::Failed,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("starting the async runtime failed: {e}")))
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            note(&format!("error: {}", f.message()));
            ExitCode::from(f.code())
        }
    }
}

/// A line for the person (stderr). A closed stderr is no reason to fail.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Output for programs and pipes (stdout). A reader that went away (`| head`) is not an error.
fn out(text: &str) -> Res<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::Other(format!("writing to stdout failed: {e}")))
        }
        _ => Ok(()),
    }
}

/// Turns an API error about `what` ("ApiToken ns/name") into a message a person can act on.
fn api_error(e: kube::Error, what: &str) -> Failure {
    let s = match e {
        kube::Error::Api(s) => s,
        other => {
            // kube's own text stops at "client error (Connect)": the innermost cause says why.
            let mut cause: &dyn std::error::Error = &other;
            while let Some(next) = cause.source() {
                cause = next;
            }
            let server = SERVER.get().map_or_else(String::new, |s| format!(" at {s}"));
            return Failure::Other(format!(
                "talking to the Kubernetes API{server} failed: {other} ({cause}); is the cluster reachable with this kubeconfig and context?"
            ));
        }
    };
    match s.code {
        404 if s.message.contains("could not find the requested resource") => Failure::NotFound(format!(
            "the ApiToken API is not served by this cluster ({}); install the apitoken-operator CRDs",
            s.message
        )),
        404 if s.message.starts_with("namespaces ") => Failure::NotFound(s.message.clone()),
        404 => Failure::NotFound(format!("{what} not found")),
        409 if s.reason == "AlreadyExists" => Failure::Exists(format!("{what} already exists")),
        401 => Failure::Other(format!(
            "the API server did not accept the credentials ({}); check the kubeconfig's user",
            s.message
        )),
        // An admission webhook's refusal says why itself; RBAC's says only "forbidden".
        403 if s.message.contains("admission webhook") => Failure::Refused(s.message.clone()),
        403 => Failure::Refused(format!("not allowed: {}", s.message)),
        400 | 422 => Failure::Refused(s.message.clone()),
        _ => Failure::Other(format!("{what}: {} (HTTP {})", s.message, s.code)),
    }
}

/// The clients of one invocation, in one namespace.
struct Ctx {
    ns: String,
    client: Client,
    /// The kubeconfig's user, for `report-leak`'s bearer token.
    auth_info: kube::config::AuthInfo,
    tokens: Api<ApiToken>,
    secrets: Api<Secret>,
    events: Api<Event>,
}

impl Ctx {
    /// `namespace/name`, as messages name an ApiToken.
    fn id(&self, name: &str) -> String {
        format!("{}/{name}", self.ns)
    }

    async fn get(&self, name: &str) -> Res<ApiToken> {
        self.tokens.get(name).await.map_err(|e| api_error(e, &format!("ApiToken {}", self.id(name))))
    }

    async fn patch(&self, name: &str, patch: &serde_json::Value) -> Res<ApiToken> {
        let pp = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        self.tokens
            .patch(name, &pp, &Patch::Merge(patch))
            .await
            .map_err(|e| api_error(e, &format!("ApiToken {}", self.id(name))))
    }
}

/// A client as kubectl would build one from the same flags.
async fn connect(cli: &Cli) -> Res<Ctx> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        cluster: cli.cluster.clone(),
        user: cli.user.clone(),
    };
    let config = if let Some(path) = &cli.kubeconfig {
        let kc = Kubeconfig::read_from(path)
            .map_err(|e| Failure::Other(format!("cannot read the kubeconfig: {e}")))?;
        Config::from_custom_kubeconfig(kc, &options)
            .await
            .map_err(|e| Failure::Other(format!("kubeconfig {}: {e}", path.display())))?
    } else if cli.context.is_some() || cli.cluster.is_some() || cli.user.is_some() {
        Config::from_kubeconfig(&options).await.map_err(|e| Failure::Other(format!("kubeconfig: {e}")))?
    } else {
        Config::infer().await.map_err(|e| Failure::Other(format!("no usable kubeconfig: {e}")))?
    };
    let ns = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let _ = SERVER.set(config.cluster_url.to_string());
    let auth_info = config.auth_info.clone();
    let client = Client::try_from(config)
        .map_err(|e| Failure::Other(format!("cannot build a Kubernetes client: {e}")))?;
    Ok(Ctx {
        tokens: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        events: Api::namespaced(client.clone(), &ns),
        client,
        auth_info,
        ns,
    })
}

async fn run(cli: Cli) -> Res<()> {
    let ctx = connect(&cli).await?;
    match cli.command {
        Cmd::Create {
            name,
            scopes,
            permission_sets,
            lifetime,
            audiences,
            description,
            display_name,
            timeout,
        } => {
            let spec = ApiTokenSpec {
                scopes,
                permission_sets,
                lifetime,
                audiences,
                description,
                display_name,
                ..ApiTokenSpec::default()
            };
            create(&ctx, &name, spec, timeout).await
        }
        Cmd::List { all_namespaces, phase, output } => list(&ctx, all_namespaces, phase, output).await,
        Cmd::Describe { name } => describe(&ctx, &name).await,
        Cmd::Rotate { name, timeout } => rotate(&ctx, &name, timeout).await,
        Cmd::Revoke { name, timeout } => revoke(&ctx, &name, timeout).await,
        Cmd::Regenerate { name, timeout } => regenerate(&ctx, &name, timeout).await,
        Cmd::Reveal { name } => reveal(&ctx, &name).await,
        Cmd::Delete { name, timeout } => delete(&ctx, &name, timeout).await,
        Cmd::ReportLeak { server, certificate_authority, tls_server_name, url, as_service_account } => {
            let to = Reporter { server, certificate_authority, tls_server_name, as_service_account };
            report_leak(&ctx, &to, url.as_deref()).await
        }
    }
}

/// Where and as whom `report-leak` reports.
struct Reporter {
    server: String,
    certificate_authority: Option<PathBuf>,
    tls_server_name: Option<String>,
    as_service_account: Option<String>,
}

/// Tokens per request (the endpoint takes at most 100 entries).
const REPORT_BATCH: usize = 100;

async fn report_leak(ctx: &Ctx, to: &Reporter, url: Option<&str>) -> Res<()> {
    use std::io::{IsTerminal as _, Read as _};
    if std::io::stdin().is_terminal() {
        note("reading tokens from stdin, one per line; end with Ctrl-D");
    }
    let mut input = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| Failure::Other(format!("reading tokens from stdin failed: {e}")))?;
    let tokens: Vec<&str> = input.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if tokens.is_empty() {
        return Err(Failure::Other(
            "no tokens on stdin: pipe them in, one per line (e.g. from a secret scanner's report)".into(),
        ));
    }
    let client = reporter_client(ctx, to).await?;
    let (mut killed, mut other) = (0, 0);
    // Each entry carries the location: keep a request well under the endpoint's 64 KiB.
    let per_request = (48 * 1024 / (url.map_or(0, str::len) + 160)).clamp(1, REPORT_BATCH);
    for batch in tokens.chunks(per_request) {
        let body: Vec<serde_json::Value> = batch
            .iter()
            .map(|t| json!({"token": t, "type": "apitoken_operator_token", "url": url, "source": "kubectl-apitoken"}))
            .collect();
        let feedback =
            post_report(&client, &to.server, serde_json::to_vec(&body).unwrap_or_default()).await?;
        if feedback.len() != batch.len() {
            return Err(Failure::Other(format!(
                "the verification service answered {} entries for {} tokens; is --server the apitoken-operator?",
                feedback.len(),
                batch.len()
            )));
        }
        for (t, entry) in batch.iter().zip(&feedback) {
            let label = entry["label"].as_str().unwrap_or("unknown");
            let shown = if token::parse(t).is_ok() {
                token::display(&token::plaintext_from_stored(t))
            } else {
                "(not a well-formed token)".into()
            };
            if label == "true_positive" {
                killed += 1;
            } else {
                other += 1;
            }
            out(&format!("{label}\t{shown}\n"))?;
        }
    }
    note(&format!(
        "{killed} token(s) rejected from now on and replaced; {other} not a live token of this operator (already dead, unknown, or malformed)"
    ));
    Ok(())
}

/// A client for the verification service with the reporter's bearer token.
async fn reporter_client(ctx: &Ctx, to: &Reporter) -> Res<Client> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let uri: axum::http::Uri =
        to.server.parse().map_err(|e| Failure::Other(format!("--server {}: not a URL: {e}", to.server)))?;
    // Credentials go over TLS, except to this machine (a port-forward or a local test).
    let loopback = matches!(uri.host(), Some("localhost" | "127.0.0.1" | "[::1]" | "::1"));
    if uri.scheme_str() != Some("https") && !loopback {
        return Err(Failure::Other(format!(
            "--server {}: use https:// (your credentials are sent to it); plain http only to localhost",
            to.server
        )));
    }
    let mut config = Config::new(uri);
    config.auth_info = match &to.as_service_account {
        Some(sa) => {
            let token = service_account_token(ctx, sa).await?;
            serde_json::from_value(json!({"token": token}))
                .map_err(|e| Failure::Other(format!("building credentials failed: {e}")))?
        }
        None => ctx.auth_info.clone(),
    };
    if let Some(path) = &to.certificate_authority {
        let pem = std::fs::read(path)
            .map_err(|e| Failure::Other(format!("--certificate-authority {}: {e}", path.display())))?;
        let certs: Vec<Vec<u8>> = tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .filter_map(Result::ok)
            .map(|c| c.to_vec())
            .collect();
        if certs.is_empty() {
            return Err(Failure::Other(format!(
                "--certificate-authority {}: no PEM certificate in it",
                path.display()
            )));
        }
        config.root_cert = Some(certs);
    }
    config.tls_server_name.clone_from(&to.tls_server_name);
    config.default_retry = false;
    Client::try_from(config)
        .map_err(|e| Failure::Other(format!("cannot build a client for {}: {e}", to.server)))
}

/// A 10-minute token for ServiceAccount `NAMESPACE/NAME` (TokenRequest, as `kubectl create token`).
async fn service_account_token(ctx: &Ctx, sa: &str) -> Res<String> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let Some((ns, name)) = sa.split_once('/') else {
        return Err(Failure::Other(format!("--as-service-account {sa}: write it as NAMESPACE/NAME")));
    };
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(600), ..TokenRequestSpec::default() },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let issued: TokenRequest = api
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .map_err(|e| api_error(e, &format!("ServiceAccount {sa}")))?;
    issued
        .status
        .map(|s| s.token)
        .ok_or_else(|| Failure::Other(format!("no token issued for ServiceAccount {sa}")))
}

/// POSTs one report to `/v1/leaks`; the feedback array, or why it was refused.
async fn post_report(client: &Client, server: &str, body: Vec<u8>) -> Res<Vec<serde_json::Value>> {
    use http_body_util::BodyExt as _;
    let req = axum::http::Request::post("/v1/leaks")
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(kube::client::Body::from(body))
        .map_err(|e| Failure::Other(format!("building the request failed: {e}")))?;
    let resp = client.send(req).await.map_err(|e| {
        Failure::Other(format!(
            "reaching the verification service at {server} failed: {e}; is --server right?"
        ))
    })?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Other(format!("reading the answer from {server} failed: {e}")))?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let why = answer["message"].as_str().unwrap_or("no reason given").to_string();
    match status.as_u16() {
        200 => Ok(answer.as_array().cloned().unwrap_or_default()),
        401 => Err(Failure::Refused(format!(
            "the verification service did not accept the credentials: {why}. Use a kubeconfig user with a bearer token, or --as-service-account NAMESPACE/NAME"
        ))),
        403 | 400 | 413 | 429 => {
            Err(Failure::Refused(format!("the verification service refused the report: {why}")))
        }
        503 => Err(Failure::Other(format!(
            "the report could not be recorded in full ({why}); run the same command again"
        ))),
        code => Err(Failure::Other(format!("the verification service answered HTTP {code}: {why}"))),
    }
}

async fn create(ctx: &Ctx, name: &str, spec: ApiTokenSpec, timeout: Duration) -> Res<()> {
    let id = ctx.id(name);
    // A create (POST), never an apply: an existing token is not ours to change.
    let pp = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    ctx.tokens.create(&pp, &ApiToken::new(name, spec)).await.map_err(|e| match api_error(e, &format!("ApiToken {id}")) {
        Failure::Exists(_) => Failure::Exists(format!(
            "ApiToken {id} already exists; use `kubectl apitoken rotate {name}` for a new token or `kubectl apitoken reveal {name}` to print the current one"
        )),
        other => other,
    })?;
    let wait = Wait { name, not_hash: None, refusals: None, timeout };
    let t = wait_token(ctx, &wait).await.map_err(|f| match f {
        Failure::Refused(m) => Failure::Refused(format!(
            "{m}\nThe ApiToken was created: fix the cause and it is issued, or `kubectl apitoken delete {name}`"
        )),
        other => other,
    })?;
    note(&format!(
        "ApiToken {id} is Active. The token is shown once here; later: kubectl apitoken reveal {name}"
    ));
    out(&format!("{}\n", t.expose()))
}

async fn list(ctx: &Ctx, all: bool, phase: Option<PhaseArg>, output: Output) -> Res<()> {
    let api: Api<ApiToken> = if all { Api::all(ctx.client.clone()) } else { ctx.tokens.clone() };
    let what = if all { "ApiTokens".to_string() } else { format!("ApiTokens in namespace {}", ctx.ns) };
    let mut items = api.list(&ListParams::default()).await.map_err(|e| api_error(e, &what))?.items;
    if let Some(p) = phase {
        let p = p.phase();
        items.retain(|t| t.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == p);
    }
    for t in &mut items {
        // kubectl hides these too; they are bookkeeping nobody reads in a list.
        t.metadata.managed_fields = None;
    }
    // The shape `kubectl get -o json` prints, so the same tools read both.
    let list =
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items});
    match output {
        Output::Json => {
            let text = serde_json::to_string_pretty(&list).map_err(|e| Failure::Other(e.to_string()))?;
            out(&format!("{text}\n"))
        }
        Output::Yaml => out(&serde_yaml::to_string(&list).map_err(|e| Failure::Other(e.to_string()))?),
        Output::Table => {
            if items.is_empty() {
                note(&format!(
                    "No ApiTokens found{}.",
                    if all { String::new() } else { format!(" in namespace {}", ctx.ns) }
                ));
                return Ok(());
            }
            out(&table(&items, all))
        }
    }
}

fn table(items: &[ApiToken], with_ns: bool) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            let s = t.status.clone().unwrap_or_else(ApiTokenStatus::default);
            let mut row = Vec::new();
            if with_ns {
                row.push(t.namespace().unwrap_or_default());
            }
            row.extend([
                t.name_any(),
                s.display.unwrap_or_else(|| "-".into()),
                if s.effective_scopes.is_empty() { "-".into() } else { s.effective_scopes.join(",") },
                s.phase.map_or("Pending", Phase::as_str).to_string(),
                s.expires_at.map_or_else(|| "never".into(), |t| t.0.to_string()),
                s.last_used_at.map_or_else(|| "-".into(), |t| t.0.to_string()),
            ]);
            row
        })
        .collect();
    let mut header: Vec<String> = Vec::new();
    if with_ns {
        header.push("NAMESPACE".into());
    }
    header.extend(["NAME", "TOKEN", "SCOPES", "PHASE", "EXPIRES", "LAST USED"].map(String::from));
    columns(&header, &rows, "   ")
}

/// Left-aligned columns, `gap` between them.
fn columns(header: &[String], rows: &[Vec<String>], gap: &str) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count()]).max().unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for r in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(text, "{}", cells.join(gap).trim_end());
    }
    text
}

fn condition<'a>(s: &'a ApiTokenStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// "phase Failed; Ready=False SecretConflict: <message>".
fn summary(s: &ApiTokenStatus) -> String {
    let phase = s.phase.map_or("Pending", Phase::as_str);
    match condition(s, "Ready") {
        Some(c) => format!("phase {phase}; Ready={} {}: {}", c.status, c.reason, c.message),
        None => format!("phase {phase}"),
    }
}

/// Is the status about the spec as it is now (not an older generation)?
fn current(at: &ApiToken) -> Option<&ApiTokenStatus> {
    at.status
        .as_ref()
        .filter(|s| s.observed_generation.is_some() && s.observed_generation == at.metadata.generation)
}

/// Why no token will be issued for the current spec, when the operator says so: a failed,
/// denied, revoked or expired token, or Ready=False with a failure reason.
fn blocked(at: &ApiToken) -> Option<String> {
    let s = current(at)?;
    let final_phase =
        matches!(s.phase, Some(Phase::Denied | Phase::Failed | Phase::Revoked | Phase::Expired));
    let failed = condition(s, "Ready")
        .is_some_and(|c| c.status == "False" && FAILURE_REASONS.contains(&c.reason.as_str()));
    (final_phase || failed).then(|| summary(s))
}

/// The operator's word that the token no longer complies with policy (so a rotation is refused).
fn noncompliant(at: &ApiToken) -> Option<String> {
    let s = current(at)?;
    condition(s, "PolicyCompliant").filter(|c| c.status == "False").map(|c| c.message.clone())
}

/// What a wait for a token looks for.
struct Wait<'a> {
    name: &'a str,
    /// A token other than this one (the one before a rotation or revocation).
    not_hash: Option<String>,
    /// For a rotation: the RotationRefused Events that existed before it was requested.
    refusals: Option<HashSet<(String, String)>>,
    timeout: Duration,
}

/// Waits until the Secret holds the token the status names (other than `not_hash`), and
/// stops early, with `Refused`, when the operator says it will not issue one.
async fn wait_token(ctx: &Ctx, w: &Wait<'_>) -> Res<Plaintext> {
    let mut last: Option<ApiToken> = None;
    let result = tokio::time::timeout(w.timeout, poll_token(ctx, w, &mut last)).await;
    result.unwrap_or_else(|_| {
        let state = last.as_ref().and_then(|a| a.status.as_ref()).map_or_else(|| "no status yet".into(), summary);
        Err(Failure::TimedOut(format!(
            "ApiToken {} has no new token after {} ({state}); is the operator running and watching namespace {}? \
             See `kubectl apitoken describe {}`",
            ctx.id(w.name),
            humantime::format_duration(w.timeout),
            ctx.ns,
            w.name
        )))
    })
}

async fn poll_token(ctx: &Ctx, w: &Wait<'_>, last: &mut Option<ApiToken>) -> Res<Plaintext> {
    let id = ctx.id(w.name);
    loop {
        let at = ctx.get(w.name).await?;
        if let Some(why) = blocked(&at) {
            return Err(Failure::Refused(format!("ApiToken {id} will not be issued a token: {why}")));
        }
        if let Some(seen) = &w.refusals
            && let Some(why) = rotation_refused(ctx, &at, seen).await
        {
            return Err(Failure::Refused(format!("the operator refused to rotate ApiToken {id}: {why}")));
        }
        if let Some(t) = issued(ctx, &at, w.not_hash.as_deref()).await? {
            return Ok(t);
        }
        *last = Some(at);
        tokio::time::sleep(POLL).await;
    }
}

/// The token in the Secret once the status of the current spec names it as Active.
async fn issued(ctx: &Ctx, at: &ApiToken, not_hash: Option<&str>) -> Res<Option<Plaintext>> {
    let Some(s) = current(at) else { return Ok(None) };
    let (Some(hash), Some(secret)) = (s.token_hash.as_deref(), s.secret_name.as_deref()) else {
        return Ok(None);
    };
    if s.phase != Some(Phase::Active) || Some(hash) == not_hash {
        return Ok(None);
    }
    let found = ctx.secrets.get_opt(secret).await.map_err(|e| {
        match api_error(e, &format!("Secret {}/{secret}", ctx.ns)) {
            Failure::Refused(m) => {
                Failure::Refused(format!("the token is in Secret {secret}, which you cannot read: {m}"))
            }
            other => other,
        }
    })?;
    let t = found.and_then(|sec| stored_token(&sec));
    Ok(t.filter(|t| token::hash(t.expose()) == hash))
}

fn stored_token(s: &Secret) -> Option<Plaintext> {
    let raw = s.data.as_ref()?.get("token")?;
    Some(token::plaintext_from_stored(std::str::from_utf8(&raw.0).ok()?))
}

/// The operator's refusal of a rotation requested after the `seen` Events: PolicyCompliant
/// False, or a new (or repeated) RotationRefused Event.
async fn rotation_refused(ctx: &Ctx, at: &ApiToken, seen: &HashSet<(String, String)>) -> Option<String> {
    if let Some(m) = noncompliant(at) {
        return Some(m);
    }
    refusal_events(ctx, at)
        .await
        .into_iter()
        .find(|e| !seen.contains(&event_key(e)))
        .map(|e| e.message.unwrap_or_else(|| "the token no longer complies with policy".into()))
}

/// RotationRefused Events of `at` (none when Events cannot be read: the condition still counts).
async fn refusal_events(ctx: &Ctx, at: &ApiToken) -> Vec<Event> {
    let fields = format!("{},reason={ROTATION_REFUSED}", involved(at));
    ctx.events.list(&ListParams::default().fields(&fields)).await.map(|l| l.items).unwrap_or_default()
}

/// An Event changes its resourceVersion when the operator records it again.
fn event_key(e: &Event) -> (String, String) {
    (e.metadata.name.clone().unwrap_or_default(), e.metadata.resource_version.clone().unwrap_or_default())
}

/// The field selector of `at`'s Events (core/v1 `involvedObject`, the uid so that an earlier
/// object of the same name does not count).
fn involved(at: &ApiToken) -> String {
    let mut f = format!("involvedObject.kind=ApiToken,involvedObject.name={}", at.name_any());
    if let Some(uid) = &at.metadata.uid {
        let _ = write!(f, ",involvedObject.uid={uid}");
    }
    f
}

async fn rotate(ctx: &Ctx, name: &str, timeout: Duration) -> Res<()> {
    let id = ctx.id(name);
    let before = ctx.get(name).await?;
    if let Some(why) = blocked(&before) {
        let hint = if before.spec.revoked {
            format!("; `kubectl apitoken regenerate {name}` issues a new token")
        } else {
            String::new()
        };
        return Err(Failure::Refused(format!("ApiToken {id} cannot be rotated: {why}{hint}")));
    }
    // The operator refuses to rotate a token that no longer complies: say so without asking.
    if let Some(why) = noncompliant(&before) {
        return Err(Failure::Refused(format!(
            "ApiToken {id} no longer complies with policy, so the operator refuses to rotate it: {why}"
        )));
    }
    let seen: HashSet<_> = refusal_events(ctx, &before).await.iter().map(event_key).collect();
    let stamp = Timestamp::now().to_string();
    ctx.patch(name, &json!({"metadata": {"annotations": {ROTATE_ANNOTATION: stamp}}})).await?;
    let old = before.status.as_ref().and_then(|s| s.token_hash.clone());
    let wait = Wait { name, not_hash: old, refusals: Some(seen), timeout };
    // The new token is in the Secret (`reveal` prints it); rotate itself never prints it.
    drop(wait_token(ctx, &wait).await?);
    let s = ctx.get(name).await?.status.unwrap_or_default();
    out(&format!(
        "rotated {id}: now {} (rotation {}); the previous token stays valid until {}\n",
        s.display.unwrap_or_default(),
        s.rotation_count,
        s.previous_valid_until.map_or_else(|| "now".into(), |t| t.0.to_string())
    ))
}

/// Waits until the operator has acted on generation `generation` (or a later one).
async fn wait_observed(ctx: &Ctx, name: &str, generation: Option<i64>, timeout: Duration) -> Res<ApiToken> {
    let mut last: Option<ApiToken> = None;
    let poll = async {
        loop {
            let at = ctx.get(name).await?;
            if at.status.as_ref().and_then(|s| s.observed_generation) >= generation {
                return Ok(at);
            }
            last = Some(at);
            tokio::time::sleep(POLL).await;
        }
    };
    let result = tokio::time::timeout(timeout, poll).await;
    result.unwrap_or_else(|_| {
        let state = last.as_ref().and_then(|a| a.status.as_ref()).map_or_else(|| "no status yet".into(), summary);
        Err(Failure::TimedOut(format!(
            "the operator did not act on ApiToken {} within {} ({state}); is it running and watching namespace {}?",
            ctx.id(name),
            humantime::format_duration(timeout),
            ctx.ns
        )))
    })
}

async fn revoke(ctx: &Ctx, name: &str, timeout: Duration) -> Res<()> {
    let id = ctx.id(name);
    let patched = ctx.patch(name, &json!({"spec": {"revoked": true}})).await?;
    let at = wait_observed(ctx, name, patched.metadata.generation, timeout).await?;
    let phase = at.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    let tail = if phase == Phase::Revoked { String::new() } else { format!(" (phase {})", phase.as_str()) };
    out(&format!(
        "revoked {id}{tail}: verification rejects it and its Secret is removed; `kubectl apitoken regenerate {name}` issues a new token\n"
    ))
}

async fn regenerate(ctx: &Ctx, name: &str, timeout: Duration) -> Res<()> {
    let id = ctx.id(name);
    let deadline = tokio::time::Instant::now() + timeout;
    let at = ctx.get(name).await?;
    if !at.spec.revoked {
        let phase = at.status.as_ref().and_then(|s| s.phase).unwrap_or_default().as_str();
        return Err(Failure::Refused(format!(
            "ApiToken {id} is not revoked (phase {phase}); `kubectl apitoken rotate {name}` issues a new token and keeps the current one valid for the grace period"
        )));
    }
    // The revocation must have taken effect first: flipped back before the operator saw it, the
    // old token would simply stay.
    let at = wait_observed(ctx, name, at.metadata.generation, timeout).await?;
    let old = at.status.as_ref().and_then(|s| s.token_hash.clone());
    ctx.patch(name, &json!({"spec": {"revoked": false}})).await?;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let t = wait_token(ctx, &Wait { name, not_hash: old, refusals: None, timeout: left.max(POLL) }).await?;
    note(&format!(
        "ApiToken {id} is Active again with a new token. It is shown once here; later: kubectl apitoken reveal {name}"
    ));
    out(&format!("{}\n", t.expose()))
}

async fn reveal(ctx: &Ctx, name: &str) -> Res<()> {
    let id = ctx.id(name);
    let at = ctx.get(name).await?;
    let s = at.status.clone().unwrap_or_default();
    match s.phase.unwrap_or_default() {
        Phase::Active => {}
        Phase::Pending => {
            return Err(Failure::Other(format!(
                "ApiToken {id} has no token yet ({}); see `kubectl apitoken describe {name}`",
                summary(&s)
            )));
        }
        Phase::Revoked => {
            return Err(Failure::Refused(format!(
                "ApiToken {id} is revoked: there is no token to reveal; `kubectl apitoken regenerate {name}` issues a new one"
            )));
        }
        _ => {
            return Err(Failure::Refused(format!(
                "ApiToken {id} has no valid token to reveal: {}",
                summary(&s)
            )));
        }
    }
    let secret_name = s.secret_name.unwrap_or_else(|| name.to_string());
    let what = format!("Secret {}/{secret_name} of ApiToken {name}", ctx.ns);
    let secret = ctx.secrets.get(&secret_name).await.map_err(|e| api_error(e, &what))?;
    let t = stored_token(&secret).ok_or_else(|| Failure::Other(format!("{what} holds no token")))?;
    out(&format!("{}\n", t.expose()))
}

async fn delete(ctx: &Ctx, name: &str, timeout: Duration) -> Res<()> {
    let id = ctx.id(name);
    let at = ctx.get(name).await?;
    let secret = at.status.as_ref().and_then(|s| s.secret_name.clone());
    ctx.tokens
        .delete(name, &DeleteParams::background())
        .await
        .map_err(|e| api_error(e, &format!("ApiToken {id}")))?;
    let gone = async {
        loop {
            match ctx.tokens.get_opt(name).await {
                Ok(Some(now)) if now.uid() == at.uid() => tokio::time::sleep(POLL).await,
                Ok(_) => return Ok(()),
                Err(e) => return Err(api_error(e, &format!("ApiToken {id}"))),
            }
        }
    };
    tokio::time::timeout(timeout, gone).await.unwrap_or_else(|_| {
        Err(Failure::TimedOut(format!(
            "ApiToken {id} is still there after {} (finalizers: {:?})",
            humantime::format_duration(timeout),
            at.finalizers()
        )))
    })?;
    let tail = secret.map_or_else(String::new, |s| format!("; its Secret {s} is removed with it"));
    out(&format!("deleted ApiToken {id}{tail}\n"))
}

async fn describe(ctx: &Ctx, name: &str) -> Res<()> {
    let at = ctx.get(name).await?;
    // Events are a help, not a requirement: a person who may not list them still gets the rest.
    let events = ctx.events.list(&ListParams::default().fields(&involved(&at))).await.map(|l| l.items);
    out(&page(&at, events, Timestamp::now()))
}

fn time(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map_or_else(|| "-".into(), |t| t.0.to_string())
}

fn or_dash(v: &[String]) -> String {
    if v.is_empty() { "-".into() } else { v.join(", ") }
}

/// The describe page's "Key: value" lines.
fn page_fields(at: &ApiToken) -> Vec<(&'static str, String)> {
    let spec = &at.spec;
    let s = at.status.clone().unwrap_or_default();
    let rotation = &spec.rotation;
    let mut fields: Vec<(&str, String)> = vec![
        ("Name", at.name_any()),
        ("Namespace", at.namespace().unwrap_or_default()),
        ("Display name", spec.display_name.clone().unwrap_or_else(|| "-".into())),
        ("Description", spec.description.clone().unwrap_or_else(|| "-".into())),
        ("Created", time(at.metadata.creation_timestamp.as_ref())),
        ("Created by", s.created_by.clone().unwrap_or_else(|| "-".into())),
        ("Phase", s.phase.map_or("Pending", Phase::as_str).into()),
        ("Token", s.display.clone().unwrap_or_else(|| "-".into())),
        ("Token id", s.token_id.clone().unwrap_or_else(|| "-".into())),
        ("Token hash", s.token_hash.clone().unwrap_or_else(|| "-".into())),
        (
            "Secret",
            s.secret_name
                .clone()
                .unwrap_or_else(|| spec.secret.name.clone().unwrap_or_else(|| at.name_any())),
        ),
        ("Scopes", or_dash(&spec.scopes)),
        ("Permission sets", or_dash(&spec.permission_sets)),
        ("Effective scopes", or_dash(&s.effective_scopes)),
        ("Audiences", or_dash(&spec.audiences)),
        ("Lifetime", spec.lifetime.clone().unwrap_or_else(|| "policy default".into())),
        ("Issued", time(s.issued_at.as_ref())),
        ("Expires", s.expires_at.as_ref().map_or_else(|| "never".into(), |t| t.0.to_string())),
        ("Renews at", time(s.renew_at.as_ref())),
        ("Last used", time(s.last_used_at.as_ref())),
        ("Rotations", s.rotation_count.to_string()),
        (
            "Rotation",
            format!(
                "{}, renewBefore {}, gracePeriod {}, trigger {}",
                if rotation.enabled { "enabled" } else { "disabled" },
                rotation.renew_before.as_deref().unwrap_or("default"),
                rotation.grace_period.as_deref().unwrap_or("default"),
                rotation.trigger.as_deref().unwrap_or("-")
            ),
        ),
        ("Revoked", spec.revoked.to_string()),
    ];
    if let Some(until) = &s.previous_valid_until {
        fields.push(("Previous valid until", until.0.to_string()));
    }
    let behind = s.observed_generation != at.metadata.generation;
    if behind {
        fields.push((
            "Observed generation",
            format!(
                "{} of {} (the operator has not acted on the latest change yet)",
                s.observed_generation.map_or_else(|| "none".into(), |g| g.to_string()),
                at.metadata.generation.unwrap_or_default()
            ),
        ));
    }
    fields
}

/// The describe page: spec, status, conditions, Events. Holds hashes and display forms only.
fn page(at: &ApiToken, events: Result<Vec<Event>, kube::Error>, now: Timestamp) -> String {
    let s = at.status.clone().unwrap_or_default();
    let fields = page_fields(at);
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    let mut text = String::new();
    for (k, v) in &fields {
        let _ = writeln!(text, "{:<width$}{v}", format!("{k}:"));
    }
    text.push_str("Conditions:\n");
    if s.conditions.is_empty() {
        text.push_str("  <none>\n");
    } else {
        let header = ["TYPE", "STATUS", "REASON", "MESSAGE"].map(String::from);
        let rows: Vec<Vec<String>> = s
            .conditions
            .iter()
            .map(|c| vec![c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone()])
            .collect();
        for line in columns(&header, &rows, "  ").lines() {
            let _ = writeln!(text, "  {line}");
        }
    }
    text.push_str("Events:\n");
    match events {
        Err(e) => {
            let _ = writeln!(text, "  <cannot list Events: {}>", api_error(e, "Events").message());
        }
        Ok(list) if list.is_empty() => text.push_str("  <none>\n"),
        Ok(mut list) => {
            list.sort_by_key(last_seen);
            let header = ["LAST SEEN", "TYPE", "REASON", "COUNT", "MESSAGE"].map(String::from);
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|e| {
                    vec![
                        last_seen(e).map_or_else(|| "-".into(), |t| age(t, now)),
                        e.type_.clone().unwrap_or_default(),
                        e.reason.clone().unwrap_or_default(),
                        e.series.as_ref().and_then(|s| s.count).or(e.count).unwrap_or(1).to_string(),
                        e.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            for line in columns(&header, &rows, "  ").lines() {
                let _ = writeln!(text, "  {line}");
            }
        }
    }
    text
}

/// When an Event (core/v1 or events.k8s.io written) was last seen.
fn last_seen(e: &Event) -> Option<Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// `12s`, `5m`, `3h`, `2d` ago, as kubectl shows ages.
fn age(t: Timestamp, now: Timestamp) -> String {
    let secs = now.as_second().saturating_sub(t.as_second()).max(0);
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}
