//! `kubectl apitoken`: the token page in the terminal.
//!
//!   kubectl apitoken create NAME --scope metrics:read [--lifetime 30d] [--audience a]
//!   kubectl apitoken list [-A] [--phase Active] [-o json|yaml]
//!   kubectl apitoken rotate NAME
//!   kubectl apitoken revoke NAME
//!   kubectl apitoken reveal NAME

use std::process::ExitCode;
use std::time::Duration;

use apitoken_operator::api::{ApiToken, ApiTokenStatus, Phase, ROTATE_ANNOTATION};
use apitoken_operator::core::token;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

#[derive(Parser)]
#[command(name = "kubectl-apitoken", version, about = "Create, list, rotate, revoke and reveal ApiTokens")]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a token, wait until it is issued, and print it once.
    Create {
        name: String,
        /// A scope, `resource[/name]:verb`; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime such as 30d (default: the policy's, else 90d).
        #[arg(long)]
        lifetime: Option<String>,
        /// An audience the token is bound to; repeat for several.
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// How long to wait for the token.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// List tokens: display form, scopes, phase, expiry, last use.
    List {
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Only tokens in this phase.
        #[arg(long)]
        phase: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Rotate now; the previous token stays valid for the grace period.
    Rotate {
        name: String,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Revoke: rejected at once, Secret removed.
    Revoke { name: String },
    /// Print the current token from its Secret.
    Reveal { name: String },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn explain(e: kube::Error, what: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 404 => format!("{what} not found"),
        kube::Error::Api(s) if s.code == 403 => format!("not allowed: {}", s.message),
        kube::Error::Api(s) => s.message,
        other => format!("talking to the Kubernetes API failed: {other}"),
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = Client::try_default().await.map_err(|e| format!("no usable kubeconfig: {e}"))?;
    let ns = cli.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    let tokens: Api<ApiToken> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    match cli.command {
        Cmd::Create { name, scopes, lifetime, audiences, timeout } => {
            let mut spec = json!({"scopes": scopes});
            if let Some(l) = lifetime {
                spec["lifetime"] = json!(l);
            }
            if !audiences.is_empty() {
                spec["audiences"] = json!(audiences);
            }
            let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
            tokens
                .patch(&name, &PatchParams::apply("kubectl-apitoken"), &Patch::Apply(&body))
                .await
                .map_err(|e| explain(e, &format!("ApiToken {name}")))?;
            let t = wait_issued(&tokens, &secrets, &name, None, timeout).await?;
            eprintln!(
                "ApiToken {ns}/{name} is Active. The token is shown once here; later: kubectl apitoken reveal {name}"
            );
            println!("{t}");
        }
        Cmd::List { all_namespaces, phase, output } => {
            let api: Api<ApiToken> = if all_namespaces { Api::all(client.clone()) } else { tokens };
            let mut items =
                api.list(&ListParams::default()).await.map_err(|e| explain(e, "ApiTokens"))?.items;
            if let Some(p) = &phase {
                items.retain(|t| {
                    t.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(|x| x.as_str().eq_ignore_ascii_case(p))
                });
            }
            print_list(&items, all_namespaces, output)?;
        }
        Cmd::Rotate { name, timeout } => {
            let before = tokens.get(&name).await.map_err(|e| explain(e, &format!("ApiToken {name}")))?;
            let count = before.status.as_ref().map_or(0, |s| s.rotation_count);
            let stamp = jiff::Timestamp::now().to_string();
            let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: stamp}}});
            tokens
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| explain(e, &format!("ApiToken {name}")))?;
            let old = before.status.as_ref().and_then(|s| s.token_hash.clone());
            wait_issued(&tokens, &secrets, &name, old.as_deref(), timeout).await?;
            let after = tokens.get(&name).await.map_err(|e| explain(e, &format!("ApiToken {name}")))?;
            let s = after.status.unwrap_or_default();
            println!(
                "rotated {ns}/{name}: now {} (rotation {}); the previous token stays valid until {}",
                s.display.unwrap_or_default(),
                s.rotation_count.max(count + 1),
                s.previous_valid_until.map_or_else(|| "now".into(), |t| t.0.to_string())
            );
        }
        Cmd::Revoke { name } => {
            let patch = json!({"spec": {"revoked": true}});
            tokens
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| explain(e, &format!("ApiToken {name}")))?;
            println!(
                "revoked {ns}/{name}: verification rejects it now; set spec.revoked: false to issue a new token"
            );
        }
        Cmd::Reveal { name } => {
            let at = tokens.get(&name).await.map_err(|e| explain(e, &format!("ApiToken {name}")))?;
            let secret_name = at.status.and_then(|s| s.secret_name).unwrap_or_else(|| name.clone());
            let s =
                secrets.get(&secret_name).await.map_err(|e| explain(e, &format!("Secret {secret_name}")))?;
            let t = s
                .data
                .and_then(|d| d.get("token").cloned())
                .ok_or_else(|| format!("Secret {secret_name} holds no token"))?;
            println!("{}", String::from_utf8_lossy(&t.0));
        }
    }
    Ok(())
}

/// Waits until the Secret holds the token the status names (and, for a rotation, a new one).
async fn wait_issued(
    tokens: &Api<ApiToken>,
    secrets: &Api<Secret>,
    name: &str,
    not_hash: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let at = tokens.get(name).await.map_err(|e| explain(e, &format!("ApiToken {name}")))?;
        let status = at.status.clone().unwrap_or_default();
        if matches!(status.phase, Some(Phase::Denied | Phase::Failed)) {
            let why = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            return Err(format!("ApiToken {name} is {}: {why}", status.phase.map_or("", Phase::as_str)));
        }
        if let (Some(hash), Some(secret)) = (status.token_hash.as_deref(), status.secret_name.as_deref())
            && Some(hash) != not_hash
            && let Ok(Some(s)) = secrets.get_opt(secret).await
            && let Some(t) = s.data.and_then(|d| d.get("token").cloned())
        {
            let t = String::from_utf8_lossy(&t.0).into_owned();
            if token::hash(&t) == hash {
                return Ok(t);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "ApiToken {name} was not issued within {}; is the operator running? (kubectl describe apitoken {name})",
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_list(items: &[ApiToken], with_ns: bool, output: Output) -> Result<(), String> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(items).map_err(|e| e.to_string())?),
        Output::Yaml => print!("{}", serde_yaml::to_string(items).map_err(|e| e.to_string())?),
        Output::Table => {
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
            let widths: Vec<usize> = (0..header.len())
                .map(|i| {
                    rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0)
                })
                .collect();
            for r in std::iter::once(&header).chain(rows.iter()) {
                let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                println!("{}", line.join("   ").trim_end());
            }
        }
    }
    Ok(())
}
