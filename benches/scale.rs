//! `make bench-scale` (not part of `make test`): issuing N tokens through the operator against a
//! baseline measured in the same run on the same local cluster — the same client writing the
//! same number of ApiTokens, Secrets and status patches directly. The two sides take turns in
//! rounds (O B B O …, each a share of the N tokens), so a slower spell of the machine falls on
//! both. Prints both times and their ratio (with each round's), p99 time-to-Active, the operator's RSS (2 s and 30 s after the last token), its API
//! writes per token, and the time until its verification index holds every token; then the API
//! server is restarted to force every watch to list again, and the operator's peak RSS during
//! that re-list is compared with its steady RSS; the time until its index is whole again is
//! compared with a bare client's paginated list of the same ApiTokens after the same restart
//! (the operator stopped).
//! Knobs: BENCH_SCALE_N (default "1000,10000"), BENCH_SCALE_CONCURRENCY (32), BENCH_SCALE_ROUNDS
//! (4; 1 is the older order: the whole baseline, then the whole operator run), BENCH_SCALE_KEEP_LOG
//! (keep the operator's log in the temp directory), BENCH_SCALE_MEMORY_N (then one more size,
//! e.g. 100000, through the operator only: RSS, re-list and its bare baseline; no issuing baseline).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;

use apitoken_operator::api::{ApiToken, Phase};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(repo().join(cmd)).args(args).output().expect("run");
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn ns(client: &Client, name: &str) {
    let n: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &n).await.unwrap();
}

/// Seconds after the last token became Active at which the steady RSS is read.
const SETTLED_AFTER: u64 = 30;

fn token_body(name: &str) -> serde_json::Value {
    json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": {"scopes": ["metrics:read"]}})
}

/// The baseline: the writes the operator makes for one token, made directly by this client, for
/// the tokens numbered `which`.
async fn baseline(client: &Client, namespace: &str, which: Range<usize>, concurrency: usize) -> Duration {
    let tokens: Api<ApiToken> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let start = Instant::now();
    futures::stream::iter(which)
        .for_each_concurrent(concurrency, |i| {
            let (tokens, secrets) = (tokens.clone(), secrets.clone());
            async move {
                let name = format!("b{i}");
                tokens.patch(&name, &PatchParams::apply("bench"), &Patch::Apply(&token_body(&name))).await.unwrap();
                let status = json!({"status": {"phase": "Active", "tokenHash": format!("sha256:{:064x}", i)}});
                tokens.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
                let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"token": "x"}});
                secrets.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&secret)).await.unwrap();
                tokens.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": {"observedGeneration": 1}}))).await.unwrap();
            }
        })
        .await;
    start.elapsed()
}

struct Operator {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_operator(kubeconfig: &Path, namespace: &str) -> Operator {
    let log = std::env::temp_dir().join(format!("apitoken-bench-scale-{namespace}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let metrics = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_apitoken-operator"))
        .args([
            "run",
            "--namespace",
            namespace,
            "--no-leader-election",
            "--plain-http",
            "--components",
            "controller,verify",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ])
        .env("KUBECONFIG", kubeconfig)
        // Production's level, plus kube's per-request line (counted below as API writes): a
        // whole debug log (6 KB per token) slowed the operator it was measuring.
        .env("RUST_LOG", "info,kube_client::client::builder=debug")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    Operator { child, log, metrics: format!("http://127.0.0.1:{metrics}/metrics") }
}

/// Lists every ApiToken of `tokens` in pages of 500, starting over after an error (a restarted API
/// server refuses or fails requests for a while); returns how many it got.
async fn list_all(tokens: &Api<ApiToken>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(600);
    'list: loop {
        assert!(Instant::now() < deadline, "no complete list within 10 minutes");
        let (mut params, mut count) = (kube::api::ListParams::default().limit(500), 0);
        loop {
            let Ok(page) = tokens.list(&params).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'list;
            };
            count += page.items.len();
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => return count,
            }
        }
    }
}

fn index_hashes(url: &str) -> u64 {
    let out = Command::new("curl").args(["-s", url]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("apitoken_index_hashes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// How many rounds the issuing is split into (BENCH_SCALE_ROUNDS, default 4). Within a round
/// the baseline and the operator each issue a share of the tokens, taking turns in the order
/// O B B O O B B O (the operator's share last), so that a slower spell of this shared machine
/// (its speed drifts by 25% within minutes) falls on both sides rather than on one.
fn rounds() -> usize {
    std::env::var("BENCH_SCALE_ROUNDS").ok().and_then(|s| s.parse().ok()).filter(|&r| r > 0).unwrap_or(4)
}

/// Times-to-Active are measured from this client's apply to its watch seeing Active.
#[derive(Clone, Default)]
struct Progress {
    created: Arc<Mutex<HashMap<String, Instant>>>,
    active: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Applies the ApiTokens numbered `which` and waits until all of them are Active; returns the
/// time that took, and the time until the verification index held them all besides.
async fn issue(
    tokens: &Api<ApiToken>,
    which: Range<usize>,
    concurrency: usize,
    progress: &Progress,
    op: &Operator,
    peak_rss: &mut u64,
) -> (Duration, Duration) {
    let start = Instant::now();
    futures::stream::iter(which.clone())
        .for_each_concurrent(concurrency, |i| {
            let (tokens, created) = (tokens.clone(), progress.created.clone());
            async move {
                let name = format!("t{i}");
                created.lock().unwrap().insert(name.clone(), Instant::now());
                tokens
                    .patch(&name, &PatchParams::apply("bench"), &Patch::Apply(&token_body(&name)))
                    .await
                    .unwrap();
            }
        })
        .await;
    // Shares are issued one after another, so every earlier token is Active already.
    loop {
        *peak_rss = (*peak_rss).max(rss_kib(op.child.id()));
        if progress.active.lock().unwrap().len() >= which.end {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(1800), "not all Active within 30 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    let index_wait = Instant::now();
    while index_hashes(&op.metrics) < which.end as u64 {
        assert!(index_wait.elapsed() < Duration::from_secs(120), "index incomplete");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (took, index_wait.elapsed())
}

#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
async fn run_one(
    client: &Client,
    cluster: &str,
    kubeconfig: &Path,
    n: usize,
    concurrency: usize,
    with_baseline: bool,
) {
    let (base_ns, op_ns) = (format!("base-{n}"), format!("op-{n}"));
    ns(client, &op_ns).await;
    if with_baseline {
        ns(client, &base_ns).await;
    }

    // The operator starts first and is timed only once it has synced (its start-up is not
    // issuing).
    let op = start_operator(kubeconfig, &op_ns);
    let ready = Instant::now();
    while !std::fs::read_to_string(&op.log).unwrap_or_default().contains("verification index synced") {
        assert!(ready.elapsed() < Duration::from_secs(60), "the operator did not sync within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tokens: Api<ApiToken> = Api::namespaced(client.clone(), &op_ns);
    let progress = Progress::default();
    let (active, api) = (progress.active.clone(), tokens.clone());
    let watch = tokio::spawn(async move {
        let mut s = watcher(api, watcher::Config::default()).boxed();
        while let Ok(Some(e)) = s.try_next().await {
            if let watcher::Event::Apply(at) | watcher::Event::InitApply(at) = e
                && at.status.as_ref().and_then(|s| s.phase) == Some(Phase::Active)
            {
                let name = at.metadata.name.clone().unwrap_or_default();
                active.lock().unwrap().entry(name).or_insert_with(Instant::now);
            }
        }
    });
    let rounds = rounds().min(n);
    let share = n.div_ceil(rounds);
    let (mut with_operator, mut base, mut index_lag, mut peak_rss) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let which = (r * share).min(n)..((r + 1) * share).min(n);
        // O B, B O, O B, … counted back from the last round, which ends with the operator.
        let operator_first = (rounds - 1 - r) % 2 == 1;
        let (mut b, mut o) = (Duration::ZERO, Duration::ZERO);
        for operator_turn in [operator_first, !operator_first] {
            if operator_turn {
                let (took, lag) =
                    issue(&tokens, which.clone(), concurrency, &progress, &op, &mut peak_rss).await;
                (o, index_lag) = (took, index_lag.max(lag));
            } else if with_baseline {
                b = baseline(client, &base_ns, which.clone(), concurrency).await;
            }
        }
        (with_operator, base) = (with_operator + o, base + b);
        per_round.push(o.as_secs_f64() / b.as_secs_f64());
    }
    let base = with_baseline.then_some(base);
    watch.abort();
    let mut ttas: Vec<Duration> = {
        let c = progress.created.lock().unwrap();
        let a = progress.active.lock().unwrap();
        a.iter().filter_map(|(k, t)| c.get(k).map(|s| t.saturating_duration_since(*s))).collect()
    };
    ttas.sort();
    let p99 = ttas[(ttas.len() * 99 / 100).min(ttas.len() - 1)];
    tokio::time::sleep(Duration::from_secs(2)).await; // let the operator settle before a steady reading
    let soon = rss_kib(op.child.id());
    // What a replica holds for real once the burst is over (nothing happens meanwhile).
    tokio::time::sleep(Duration::from_secs(SETTLED_AFTER - 2)).await;
    let steady = rss_kib(op.child.id());
    let log = std::fs::read_to_string(&op.log).unwrap_or_default();
    let writes = log
        .lines()
        .filter(|l| {
            l.contains("requesting")
                && ["http.method=PUT", "http.method=PATCH", "http.method=POST", "http.method=DELETE"]
                    .iter()
                    .any(|m| l.contains(m))
        })
        .filter(|l| !l.contains("/events"))
        .count();
    // Forced re-list: the API server restarts, every watch of the operator starts over with a
    // full list. Peak RSS from then until the index has synced again and holds every token.
    let offset = std::fs::metadata(&op.log).map_or(0, |m| m.len());
    let synced_again = |log: &Path| {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(log).unwrap();
        f.seek(std::io::SeekFrom::Start(offset)).unwrap();
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        text.contains("verification index synced")
    };
    sh("hack/local-cluster", &["stop-apiserver", cluster]);
    // Both re-lists are timed from the restart: the operator's watches reconnect while
    // start-apiserver still waits for /readyz.
    let relist = Instant::now();
    sh("hack/local-cluster", &["start-apiserver", cluster]);
    let mut relist_peak = 0;
    while !synced_again(&op.log) || index_hashes(&op.metrics) < n as u64 {
        relist_peak = relist_peak.max(rss_kib(op.child.id()));
        assert!(relist.elapsed() < Duration::from_secs(300), "no re-list within 5 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relist_took = relist.elapsed();
    for _ in 0..50 {
        relist_peak = relist_peak.max(rss_kib(op.child.id()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("N = {n} (concurrency {concurrency}; {rounds} rounds of {share}, the two sides taking turns)");
    println!("  through the operator (apply ApiTokens, wait until all Active):     {with_operator:.2?}");
    if let Some(base) = base {
        println!("  baseline (same client: ApiToken + Secret + 2 status patches each): {base:.2?}");
        let rounds: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "  ratio operator/baseline = {:.2} (rounds: {})",
            with_operator.as_secs_f64() / base.as_secs_f64(),
            rounds.join(" ")
        );
    }
    println!("  p99 time-to-Active = {p99:.2?}");
    println!(
        "  operator RSS steady {:.1} MiB ({SETTLED_AFTER} s after the last token; {:.1} MiB after 2 s), peak during issuance {:.1} MiB",
        steady as f64 / 1024.0,
        soon as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "  forced re-list (API server restart): index whole again in {relist_took:.2?}; peak RSS {:.1} MiB = {:.2} x steady",
        relist_peak as f64 / 1024.0,
        relist_peak as f64 / steady as f64
    );
    println!("  API writes per token (operator, excluding Events) = {:.2}", writes as f64 / n as f64);
    println!("  verification index complete {index_lag:.2?} after the last token became Active");
    // The re-list's baseline: the operator stopped, the same restart, and this client listing the
    // same ApiTokens (pages of 500, as the operator lists) until it has them all.
    let op_log = op.log.clone();
    drop(op);
    sh("hack/local-cluster", &["stop-apiserver", cluster]);
    let listing = Instant::now();
    // The client tries from the restart on, as the operator's watches do.
    let listing_task = tokio::spawn(async move { list_all(&tokens).await });
    sh("hack/local-cluster", &["start-apiserver", cluster]);
    let listed = listing_task.await.unwrap();
    let bare_list = listing.elapsed();
    assert_eq!(listed, n, "the bare list has every token");
    println!(
        "  baseline: a bare client lists the {n} ApiTokens after the same restart in {bare_list:.2?}; re-list ratio operator/bare = {:.2}",
        relist_took.as_secs_f64() / bare_list.as_secs_f64()
    );
    // The log (one line per API request) was only needed for the counts above.
    if std::env::var_os("BENCH_SCALE_KEEP_LOG").is_none() {
        let _ = std::fs::remove_file(&op_log);
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SCALE_N")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let concurrency =
        std::env::var("BENCH_SCALE_CONCURRENCY").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let name = format!("scale-{}", std::process::id());
    sh("hack/local-cluster", &["up", &name, "--owner-pid", &std::process::id().to_string()]);
    let env = sh("hack/local-cluster", &["env", &name]);
    let kubeconfig: PathBuf = env.lines().find_map(|l| l.strip_prefix("export KUBECONFIG=")).unwrap().into();
    let kubectl = PathBuf::from(sh("hack/build-control-plane", &["--print"]).trim()).join("kubectl");
    let ok = Command::new(&kubectl)
        .env("KUBECONFIG", &kubeconfig)
        .args(["apply", "--server-side", "-f", "crds/"])
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(ok.success());
    let ok = Command::new(&kubectl)
        .env("KUBECONFIG", &kubeconfig)
        .args([
            "wait",
            "--for=condition=established",
            "crd/apitokens.apitoken.dev",
            "crd/apitokenpolicies.apitoken.dev",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
        config.read_timeout = Some(Duration::from_secs(60));
        let client = Client::try_from(config).unwrap();
        for n in sizes {
            run_one(&client, &name, &kubeconfig, n, concurrency, true).await;
        }
        // Memory at a size where the baseline would only add minutes.
        if let Some(n) = std::env::var("BENCH_SCALE_MEMORY_N").ok().and_then(|s| s.parse().ok()) {
            run_one(&client, &name, &kubeconfig, n, concurrency, false).await;
        }
    });
    sh("hack/local-cluster", &["down", &name]);
}
