//! `apitoken-operator run`: wires the components together. Each component lives in its own
//! module; this one only starts them and waits for a shutdown signal.

use std::process::ExitCode;

use tracing::{error, info, warn};

use crate::admission::certs::{self, CertSettings};
use crate::admission::{self, AdmissionState};
use crate::cli::{Component, LogFormat, RunArgs};
use crate::controller;
use crate::leader;
use crate::metrics::Metrics;
use crate::policy_status;
use crate::policy_view::PolicyView;
use crate::token_feed::TokenFeed;
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
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[allow(clippy::too_many_lines)] // the wiring of every component, in start-up order
async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API failed (is KUBECONFIG set?): {e}"))?;
    let client = kube::Client::try_from(config.clone())?;
    // The ApiToken feed answers a restarted API server's 429s and 503s itself (token_feed).
    let mut config = config;
    config.default_retry = false;
    let feed_client = kube::Client::try_from(config)?;
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
    let (controller, verify_on, admission_on) =
        (args.runs(Component::Controller), args.runs(Component::Verify), args.runs(Component::Admission));

    // One ApiToken watch for the index, the census, the controller and its cleanup.
    let (feed, feed_drive) = TokenFeed::start(feed_client, args.namespace.as_deref());
    // Policies, namespaces and the token census: shared by the controller and admission.
    let policies = if controller || admission_on {
        let (view, drive) = PolicyView::start_in(&client, &feed);
        background.spawn(drive);
        view.ready().await;
        Some(view)
    } else {
        None
    };

    let mut app = verify::http::App::from(axum::Router::new());
    let index = verify_on.then(Index::default);
    if let Some(index) = &index {
        verify::index::follow(&feed, index.clone());
        let limiter = Arc::new(
            FailureLimiter::new(args.failures_per_second, args.failures_burst)
                .with_trusted_proxies(args.trusted_proxies.clone()),
        );
        if !args.trusted_proxies.is_empty() {
            info!(proxies = ?args.trusted_proxies, "X-Forwarded-For is believed from these proxies only");
        }
        let sweeper = limiter.clone();
        background.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                sweeper.sweep();
            }
        });
        let github_keys = match &args.leak_keys_file {
            Some(path) => {
                let keys = Arc::new(verify::leak_report::KeysFile::load(path)?);
                background.spawn(keys.clone().keep_current(Duration::from_secs(10)));
                Some(keys)
            }
            None => None,
        };
        app = app.merge(verify::leaks::router(verify::leaks::LeakState::new(
            index.clone(),
            client.clone(),
            github_keys,
            limiter.clone(),
            metrics.clone(),
        )));
        app = app.merge(verify::http::router(AppState {
            index: index.clone(),
            metrics: metrics.clone(),
            limiter,
            last_used: verify::last_used::start(client.clone()),
        }));
    }
    if admission_on && let Some(view) = &policies {
        let operator_user = match &args.operator_username {
            Some(u) => Some(u.clone()),
            None => own_username(&client).await,
        };
        info!(operator_user = ?operator_user, "admission webhooks enabled");
        app = app.merge(admission::router(AdmissionState {
            client: client.clone(),
            policies: view.clone(),
            operator_user,
        }));
    }
    // Started once the index and the census listen: their first list is the same.
    background.spawn(feed_drive);
    // Set on SIGTERM: /readyz answers 503 and HTTP/1.1 clients are told to reconnect while the
    // listeners still serve.
    let draining: verify::Draining = Arc::default();
    if verify_on || admission_on {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding --listen {}", args.listen))?;
        let tls = serving_tls(&args, &client, admission_on, &mut background).await?;
        info!(addr = %listener.local_addr()?, tls = tls.is_some(), "verification and admission listening");
        let stop = stopped();
        let draining = draining.clone();
        graceful.spawn(async move {
            if let Err(e) = verify::serve(listener, app, tls, draining, stop).await {
                error!(error = %e, "verification server failed");
            }
        });
    }

    let ops = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    info!(addr = %ops.local_addr()?, "metrics and health listening");
    let ops_app = verify::http::operations_router(index.clone(), metrics.clone(), draining.clone());
    let stop = stopped();
    let ops_draining = draining.clone();
    graceful.spawn(async move {
        if let Err(e) = verify::serve(ops, ops_app, None, ops_draining, stop).await {
            error!(error = %e, "metrics server failed");
        }
    });

    if controller && let Some(view) = policies {
        let namespace = args.namespace.clone();
        if args.leader_election() {
            let settings = leader::Settings::new(&args.operator_namespace, &args.lease_name, identity());
            info!(
                identity = settings.identity,
                lease = format!("{}/{}", settings.namespace, settings.name),
                "leader election on"
            );
            let stop = stop_tx.subscribe();
            let for_work = client.clone();
            let metrics = metrics.clone();
            // The policy status writer runs beside the controller, on the leader only.
            graceful.spawn(leader::run(client, settings, stop, move |until| {
                let until = futures::FutureExt::shared(until);
                let statuses = policy_status::run(for_work.clone(), view.clone(), until.clone());
                let tokens = controller::run(
                    for_work.clone(),
                    namespace.clone(),
                    feed.clone(),
                    view.clone(),
                    metrics.clone(),
                    until,
                );
                async move {
                    tokio::join!(tokens, statuses);
                }
            }));
        } else {
            graceful.spawn(policy_status::run(client.clone(), view.clone(), stopped()));
            graceful.spawn(controller::run(client, namespace, feed, view, metrics.clone(), stopped()));
        }
    }
    shutdown_signal().await;
    // Drain: endpoints controllers and load balancers act on /readyz (every few seconds), so
    // the listeners keep serving for --shutdown-delay after readiness is withdrawn.
    draining.store(true, std::sync::atomic::Ordering::Relaxed);
    // Only a listener that Services route to needs the delay; the controller alone hands over its
    // Lease at once.
    let delay = if verify_on || admission_on { args.shutdown_delay.unsigned_abs() } else { Duration::ZERO };
    info!(delay = ?delay, "shutting down: /readyz now answers 503; still serving during the delay");
    tokio::select! {
        () = tokio::time::sleep(delay) => {},
        () = shutdown_signal() => info!("second signal: not waiting for the rest of the delay"),
    }
    info!("shutting down: refusing new connections, finishing requests in flight, releasing the Lease");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(10), async { while graceful.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!("some connections or the controller did not finish within 10s; stopping anyway");
    }
    background.abort_all();
    Ok(())
}

/// TLS for `--listen`: none with `--plain-http`; else the files `--tls-cert`/`--tls-key`
/// (re-read when they change), else the self-managed certificate from the shared CA Secret with
/// the Service's DNS names, in every mode (so every replica, verify-only ones included, serves a
/// certificate clients can verify). The CA is published in `--ca-configmap`; webhook
/// configurations are touched only when admission runs here.
async fn serving_tls(
    args: &RunArgs,
    client: &kube::Client,
    admission_on: bool,
    background: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<Option<Arc<tokio_rustls::rustls::ServerConfig>>> {
    if args.plain_http {
        warn!("--plain-http: --listen is served without TLS; use only on loopback or in tests");
        return Ok(None);
    }
    let ns = &args.operator_namespace;
    let (ca_tx, ca_rx) = tokio::sync::watch::channel(None::<String>);
    let serving = if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let files = verify::tls::CertFiles { cert: cert.clone(), key: key.clone(), ca: args.tls_ca.clone() };
        let (serving, ca) = files.load()?;
        ca_tx.send_replace(ca);
        let every = args.tls_reload_interval.unsigned_abs();
        info!(cert = %cert.display(), every = ?every, "serving --tls-cert; re-read when it changes");
        background.spawn(files.keep_current(every, serving.clone(), ca_tx));
        serving
    } else {
        let svc = &args.service_name;
        let settings = CertSettings {
            namespace: ns.clone(),
            secret_name: args.webhook_secret.clone(),
            dns_names: vec![
                svc.clone(),
                format!("{svc}.{ns}"),
                format!("{svc}.{ns}.svc"),
                format!("{svc}.{ns}.svc.cluster.local"),
                "localhost".into(),
            ],
            validity: args.webhook_cert_validity,
            webhook_config: admission_on.then(|| args.webhook_config_name.clone()),
        };
        let material = certs::ensure(client, &settings, jiff::Timestamp::now()).await.with_context(|| {
            format!(
                "setting up the serving certificate from the shared CA in Secret {ns}/{} (the operator needs get, create and update on it), or pass --tls-cert/--tls-key",
                settings.secret_name
            )
        })?;
        if let Err(e) = certs::inject_ca_bundle(client, &settings, &material.ca_crt).await {
            warn!(error = %e, "injecting the webhook caBundle failed; retrying in the background");
        }
        let serving = certs::SwappableCert::new(certs::certified_key(&material)?);
        ca_tx.send_replace(Some(material.ca_crt.clone()));
        background.spawn(certs::keep_current(client.clone(), settings, serving.clone(), material, ca_tx));
        serving
    };
    if let Some(name) = args.ca_configmap() {
        background.spawn(certs::publish_ca(client.clone(), ns.clone(), name, ca_rx));
    }
    Ok(Some(verify::tls::server_config_with_resolver(serving)?))
}

/// This replica's name in the Lease: the pod name, else host name, plus a random suffix so two
/// processes on one host never share an identity.
fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "apitoken-operator".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// Who the API server says we are.
async fn own_username(client: &kube::Client) -> Option<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: kube::Api<SelfSubjectReview> = kube::Api::all(client.clone());
    match api.create(&kube::api::PostParams::default(), &SelfSubjectReview::default()).await {
        Ok(r) => r.status.and_then(|s| s.user_info).and_then(|u| u.username),
        Err(e) => {
            warn!(error = %e, "cannot ask the API server who the operator is; nobody may change apitoken.dev/created-by");
            None
        }
    }
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
