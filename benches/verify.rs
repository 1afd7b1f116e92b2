//! `make bench`: the verification endpoints against a bare hyper server, measured in one run.
//!
//! 100,000 tokens in the index; the same load generator (keep-alive HTTP/1.1 connections on
//! loopback, each sending requests back to back) drives (a) `/v1/auth`, (b) `/v1/verify` and
//! (c) a hyper server answering 200 with no work, for the same duration and connection count.
//! Prints requests/s, p50, p99, the ratios (a)/(c) and (b)/(c), and the index's memory per token.
//! Knobs: BENCH_TOKENS (100000), BENCH_SECONDS (5), BENCH_CONNECTIONS (16).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apitoken_operator::api::{ApiToken, ApiTokenSpec, ApiTokenStatus, Phase};
use apitoken_operator::core::token;
use apitoken_operator::metrics::Metrics;
use apitoken_operator::verify::http::{AppState, router};
use apitoken_operator::verify::index::Index;
use apitoken_operator::verify::last_used::LastUsed;
use apitoken_operator::verify::limiter::FailureLimiter;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use tokio::net::{TcpListener, TcpStream};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Fills the index with `n` tokens the way the watch would; returns some plaintexts to present.
fn fill(index: &Index, n: usize) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut keep = Vec::new();
    for i in 0..n {
        let t = token::generate("apitok", &mut rng);
        let mut at = ApiToken::new(&format!("token-{i}"), ApiTokenSpec::default());
        at.metadata.namespace = Some(format!("team-{}", i % 100));
        at.spec.audiences = vec!["tenant-a".into()];
        at.status = Some(ApiTokenStatus {
            phase: Some(Phase::Active),
            token_hash: Some(t.hash.clone()),
            effective_scopes: vec!["metrics:read".into(), "pipeline/prod:write".into()],
            ..ApiTokenStatus::default()
        });
        index.upsert(&at);
        if keep.len() < 1000 {
            keep.push(t.plaintext.expose().to_string());
        }
    }
    keep
}

async fn serve_ours(index: Index) -> SocketAddr {
    let state = AppState {
        index,
        metrics: Arc::new(Metrics::default()),
        limiter: Arc::new(FailureLimiter::new(1_000_000, 1_000_000)),
        last_used: LastUsed::disabled(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(apitoken_operator::verify::serve(listener, router(state), None, std::future::pending()));
    addr
}

async fn serve_bare() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy)]
enum Kind {
    Auth,
    Verify,
    Bare,
}

struct Outcome {
    requests: usize,
    errors: usize,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

async fn drive(
    addr: SocketAddr,
    kind: Kind,
    tokens: Arc<Vec<String>>,
    connections: usize,
    seconds: u64,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..connections {
        let tokens = tokens.clone();
        handles.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(conn);
            let (mut lat, mut errors, mut i) = (Vec::with_capacity(100_000), 0usize, c);
            while Instant::now() < deadline {
                let t = &tokens[i % tokens.len()];
                i += 1;
                let req = match kind {
                    Kind::Auth => Request::get("/v1/auth?scope=metrics:read&audience=tenant-a")
                        .header("host", "bench")
                        .header("authorization", format!("Bearer {t}"))
                        .body(Full::new(Bytes::new())),
                    Kind::Verify => Request::post("/v1/verify")
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(format!(
                            r#"{{"token":"{t}","scopes":["metrics:read"],"audience":"tenant-a"}}"#
                        )))),
                    Kind::Bare => Request::get("/").header("host", "bench").body(Full::new(Bytes::new())),
                }
                .unwrap();
                let sent = Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                let ok = resp.status() == 200;
                let _ = resp.into_body().collect().await;
                lat.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                errors += usize::from(!ok);
            }
            (lat, errors)
        }));
    }
    let mut out = Outcome { requests: 0, errors: 0, latencies_us: Vec::new(), elapsed: Duration::ZERO };
    for h in handles {
        let (lat, errors) = h.await.unwrap();
        out.requests += lat.len();
        out.errors += errors;
        out.latencies_us.extend(lat);
    }
    out.elapsed = start.elapsed();
    out.latencies_us.sort_unstable();
    out
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[allow(clippy::cast_precision_loss)]
fn main() {
    let n = env("BENCH_TOKENS", 100_000);
    let seconds = env("BENCH_SECONDS", 5) as u64;
    let connections = env("BENCH_CONNECTIONS", 16);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let index = Index::default();
        let before = rss_bytes();
        let start = Instant::now();
        let tokens = Arc::new(fill(&index, n));
        let built = start.elapsed();
        let after = rss_bytes();
        println!("index: {n} tokens built in {built:.2?}; RSS +{:.1} MiB = {:.0} bytes/token (includes the generated ApiToken objects' churn)",
            (after.saturating_sub(before)) as f64 / 1_048_576.0,
            (after.saturating_sub(before)) as f64 / n as f64);
        let ours = serve_ours(index).await;
        let bare = serve_bare().await;
        println!("load: {connections} keep-alive HTTP/1.1 connections, {seconds}s per scenario, loopback, same process");
        let mut results = Vec::new();
        for (name, kind, addr) in
            [("(c) bare hyper 200", Kind::Bare, bare), ("(a) GET /v1/auth", Kind::Auth, ours), ("(b) POST /v1/verify", Kind::Verify, ours)]
        {
            // A short warm-up, then the measured run.
            let _ = drive(addr, kind, tokens.clone(), connections, 1).await;
            let o = drive(addr, kind, tokens.clone(), connections, seconds).await;
            let rps = o.requests as f64 / o.elapsed.as_secs_f64();
            println!(
                "{name:<22} {rps:>10.0} req/s   p50 {:>6} µs   p99 {:>6} µs   non-200: {}",
                pct(&o.latencies_us, 0.50),
                pct(&o.latencies_us, 0.99),
                o.errors
            );
            assert_eq!(o.errors, 0, "{name}: every request must succeed");
            results.push(rps);
        }
        println!("ratio (a)/(c) = {:.2}", results[1] / results[0]);
        println!("ratio (b)/(c) = {:.2}", results[2] / results[0]);
    });
}
