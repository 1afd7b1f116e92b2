//! `apitoken-operator run`: wires the components together. Each component lives in its own
//! module; this one only starts them and waits for a shutdown signal.

use std::process::ExitCode;

use tracing::{error, info, warn};

use crate::cli::{Component, LogFormat, RunArgs};
use crate::controller;

pub fn main(args: RunArgs) -> ExitCode {
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "apitoken-operator stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.runs(Component::Controller) && args.leader_election() {
        anyhow::bail!(
            "leader election is not available in this version yet: run a single controller replica \
             with --no-leader-election (or APITOKEN_LEADER_ELECTION=false)"
        );
    }
    for missing in [Component::Verify, Component::Admission] {
        if args.runs(missing) {
            warn!(component = ?missing, "component not available in this version yet; not started");
        }
    }
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API failed (is KUBECONFIG set?): {e}"))?;
    let version = client.apiserver_version().await?;
    info!(server = %version.git_version, namespace = ?args.namespace, "connected to the Kubernetes API");
    if args.runs(Component::Controller) {
        controller::run(client, args.namespace.clone(), shutdown_signal()).await;
    } else {
        shutdown_signal().await;
    }
    info!("shutting down");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
