//! `apitoken-operator run`: wires the components together. Each component lives in its own
//! module; this one only starts them and waits for a shutdown signal.

use std::process::ExitCode;

use tracing::{error, info, warn};

use crate::cli::{Component, LogFormat, RunArgs};
use crate::controller;
use crate::metrics::Metrics;
use crate::verify::{self, http::AppState, index::Index, limiter::FailureLimiter};
use anyhow::Context as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

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
    if args.runs(Component::Admission) {
        warn!("the admission component is not available in this version yet; not started");
    }
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API failed (is KUBECONFIG set?): {e}"))?;
    let version = client.apiserver_version().await?;
    info!(server = %version.git_version, namespace = ?args.namespace, "connected to the Kubernetes API");

    // One shutdown signal fanned out to every component.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // `graceful` tasks finish on the stop signal; `background` ones are aborted when run returns.
    let mut graceful = tokio::task::JoinSet::new();
    let mut background = tokio::task::JoinSet::new();
    let metrics = Arc::new(Metrics::default());

    let index = args.runs(Component::Verify).then(Index::default);
    if let Some(index) = &index {
        background.spawn(verify::index::run_watch(client.clone(), args.namespace.clone(), index.clone()));
        let limiter = Arc::new(FailureLimiter::new(args.failures_per_second, args.failures_burst));
        let sweeper = limiter.clone();
        background.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                sweeper.sweep();
            }
        });
        let state = AppState {
            index: index.clone(),
            metrics: metrics.clone(),
            limiter,
            last_used: verify::last_used::start(client.clone()),
        };
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding --listen {}", args.listen))?;
        let tls = if args.plain_http {
            warn!("--plain-http: verification is served without TLS; use only on loopback or in tests");
            None
        } else {
            let files = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
            Some(verify::tls::server_config(files)?)
        };
        info!(addr = %listener.local_addr()?, "verification listening");
        let app = verify::http::router(state);
        let stop = stopped();
        graceful.spawn(async move {
            if let Err(e) = verify::serve(listener, app, tls, stop).await {
                error!(error = %e, "verification server failed");
            }
        });
    }

    let ops = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    info!(addr = %ops.local_addr()?, "metrics and health listening");
    let ops_app = verify::http::operations_router(index.clone(), metrics.clone());
    let stop = stopped();
    graceful.spawn(async move {
        if let Err(e) = verify::serve(ops, ops_app, None, stop).await {
            error!(error = %e, "metrics server failed");
        }
    });

    if args.runs(Component::Controller) {
        graceful.spawn(controller::run(client, args.namespace.clone(), stopped()));
    }
    shutdown_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while graceful.join_next().await.is_some() {}
    })
    .await;
    background.abort_all();
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
