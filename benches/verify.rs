//! `make bench`: the verification endpoints against a bare hyper server, measured in one run.
//!
//! 100,000 tokens in the index. Rows (each product vs its own baseline):
//!   - `GET /v1/auth` and `POST /v1/verify` over plain HTTP;
//!   - `GET /v1/auth` over TLS (rustls on both sides; the baseline over the same TLS setup);
//!   - `GET /v1/auth` with `lastUsedAt` recording on, as in production (its writer's patches go to
//!     an in-process stand-in that answers at once: this measures the verifier's side of it).
//!
//! Fair by construction:
//!   - The product is served by its own `verify::serve`. The baseline is served with the same
//!     hyper connection builder and settings as the product on that transport (plain HTTP:
//!     `axum::serve`'s; TLS: `verify::serve`'s), so keep `serve_baseline` in step with them.
//!   - Both get the very same request bytes (prebuilt per token), and the baseline answers with
//!     the product's own answer to that request, captured at start: same status, same headers
//!     (count, names, values) and same body. Its only work is reading the request (the body too)
//!     and cloning that answer. The sizes are printed and checked.
//!   - Server and load generator run on separate runtimes (thread names `bench-server`,
//!     `bench-load`), so the server's CPU per request is measured from its threads alone
//!     (/proc/self/task/*/schedstat).
//!   - Stable: every scenario runs `BENCH_ROUNDS` times for `BENCH_SECONDS` per side; each round
//!     rotates the order of the rows, and within a row the product and its baseline take turns in
//!     slices of `BENCH_SLICE_MS` (A B B A …), so a burst of other load falls on both. The ratio
//!     is taken per round and reported as the median with its min–max spread.
//!
//! The load generator is a raw HTTP/1.1 client (keep-alive, one request at a time per connection,
//! loopback only): much cheaper per request than the servers, so the server is the bottleneck.
//! It stops at the deadline or after `BENCH_MAX_REQUESTS` requests per slice, whichever is first.
//!
//! Knobs: BENCH_TOKENS (100000), BENCH_ROUNDS (5), BENCH_SECONDS (2), BENCH_WARMUP_MS (500),
//! BENCH_CONNECTIONS (16), BENCH_SERVER_THREADS (1), BENCH_LOAD_THREADS (1),
//! BENCH_SLICE_MS (250), BENCH_MAX_REQUESTS (5000000), BENCH_HANDLER_PASSES (7),
//! BENCH_ONLY (rows: auth,verify,tls,lastused),
//! BENCH_SIDE (both | product | baseline; one side, e.g. to profile it, prints no ratios).
//! docs/performance.md explains the output and how to profile.

// The allocator the operator binary ships with (src/main.rs), for the product and the baseline.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apitoken_operator::api::{ApiToken, ApiTokenSpec, ApiTokenStatus, Phase};
use apitoken_operator::core::token;
use apitoken_operator::metrics::Metrics;
use apitoken_operator::verify::http::{App, AppState, router};
use apitoken_operator::verify::index::Index;
use apitoken_operator::verify::last_used::{self, LastUsed};
use apitoken_operator::verify::limiter::FailureLimiter;
use apitoken_operator::verify::tls;
use futures::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVER_THREAD: &str = "bench-server";
const LOAD_THREAD: &str = "bench-load";
const TLS_NAME: &str = "verify.bench.local";
const AUTH_URI: &str = "/v1/auth?scope=metrics:read&audience=tenant-a";

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

/// CPU time (ns) used so far by this process's threads whose name starts with `prefix`.
fn threads_cpu_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let mut total = 0;
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        // schedstat: nanoseconds on CPU; else stat's utime + stime in clock ticks (100 Hz).
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .or_else(|| stat_ticks(&dir).map(|(user, system)| (user + system) * 10_000_000))
            .unwrap_or(0);
        total += ns;
    }
    total
}

/// A thread's (user, system) CPU time in clock ticks (100 Hz), from its `stat`.
fn stat_ticks(task: &std::path::Path) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// (user, system) clock ticks used so far by this process's threads whose name starts with
/// `prefix`: where their CPU time went.
fn threads_ticks(prefix: &str) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return (0, 0) };
    let mut total = (0, 0);
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some((user, system)) = comm.trim_end().starts_with(prefix).then(|| stat_ticks(&dir)).flatten()
        {
            total = (total.0 + user, total.1 + system);
        }
    }
    total
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

/// The product's own work per `GET /v1/auth` without HTTP or sockets: `App::call` on prebuilt
/// requests (the load generator's, one token after another), each answer dropped as hyper drops
/// it once written. Nanoseconds per call: the median of `passes` passes of 100,000 calls.
fn handler_ns(app: &App, tokens: &[String], passes: usize) -> f64 {
    // Built a batch at a time, so a request is in the cache when answered, as in the server.
    const BATCH: usize = 500;
    const BATCHES: usize = 200;
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut per_call = Vec::new();
    for _ in 0..passes {
        let mut spent = Duration::ZERO;
        for b in 0..BATCHES {
            let reqs: Vec<Request<Full<Bytes>>> = (0..BATCH)
                .map(|i| {
                    Request::builder()
                        .uri(AUTH_URI)
                        .header("host", "bench")
                        .header("authorization", format!("Bearer {}", tokens[(b * BATCH + i) % tokens.len()]))
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                })
                .collect();
            let start = Instant::now();
            let mut ok = 0;
            for req in reqs {
                let answer = app.call(req, peer).now_or_never().expect("forward-auth answers at once");
                ok += usize::from(answer.status() == StatusCode::OK);
            }
            spent += start.elapsed();
            assert_eq!(ok, BATCH, "every call must be answered 200");
        }
        per_call.push(spent.as_secs_f64() * 1e9 / f64::from(u32::try_from(BATCH * BATCHES).unwrap()));
    }
    median(&per_call)
}

/// The request bytes of each kind, one per token: the same bytes go to the product and the baseline.
fn requests(tokens: &[String], kind: Kind) -> Arc<Vec<Bytes>> {
    let reqs = tokens
        .iter()
        .map(|t| {
            Bytes::from(match kind {
                Kind::Auth => {
                    format!("GET {AUTH_URI} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {t}\r\n\r\n")
                }
                Kind::Verify => {
                    let body =
                        format!(r#"{{"token":"{t}","scopes":["metrics:read"],"audience":"tenant-a"}}"#);
                    format!(
                        "POST /v1/verify HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                }
            })
        })
        .collect();
    Arc::new(reqs)
}

// ---------------------------------------------------------------------------------------------
// Servers

fn app(index: &Index, last_used: LastUsed) -> App {
    router(AppState {
        index: index.clone(),
        metrics: Arc::new(Metrics::default()),
        // The production defaults (--failures-per-second 5, --failures-burst 20).
        limiter: Arc::new(FailureLimiter::new(5, 20)),
        last_used,
    })
}

/// The product, served by its own `serve` (plain HTTP or TLS).
async fn serve_product(app: App, tls: Option<Arc<ServerConfig>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(apitoken_operator::verify::serve(
        listener,
        app,
        tls,
        Arc::default(),
        std::future::pending(),
    ));
    addr
}

/// What the baseline answers: the product's answer to the same request, captured at start
/// (hyper adds `date` and `content-length` itself, on both sides).
#[derive(Clone)]
struct Canned {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// By path: `/v1/auth` and `/v1/verify`.
#[derive(Clone)]
struct CannedSet {
    auth: Canned,
    verify: Canned,
}

impl CannedSet {
    async fn answer(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let canned = if req.uri().path() == "/v1/verify" { &self.verify } else { &self.auth };
        // Read the request to its end, as the product must.
        let _ = req.into_body().collect().await;
        let mut resp = Response::new(Full::new(canned.body.clone()));
        *resp.status_mut() = canned.status;
        *resp.headers_mut() = canned.headers.clone();
        Ok(resp)
    }
}

/// The baseline, with the builder and settings the product uses on the same transport.
async fn serve_baseline(canned: CannedSet, tls: Option<Arc<ServerConfig>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let canned = canned.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let canned = canned.clone();
                    async move { canned.answer(req).await }
                });
                // The product's own connection settings, on either transport.
                let builder = apitoken_operator::verify::connection_builder();
                let _ = tcp.set_nodelay(true);
                if let Some(tls) = tls {
                    // The same handshake as verify::serve.
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(10), TlsAcceptor::from(tls).accept(tcp))
                            .await
                    else {
                        return;
                    };
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                } else {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
            });
        }
    });
    addr
}

/// `lastUsedAt` recording as in production, its patches answered by an in-process stand-in for
/// the API server (no network, no cluster).
fn last_used_on() -> LastUsed {
    let stand_in = tower::service_fn(|_req: Request<kube::client::Body>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
    });
    last_used::start(kube::Client::new(stand_in, "default"))
}

/// A self-signed serving certificate: the server configuration (the product's own) and a client
/// configuration that trusts it.
fn tls_pair() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let g = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_string()]).unwrap();
    let key = tls::certified_key(g.cert.pem().as_bytes(), g.signing_key.serialize_pem().as_bytes()).unwrap();
    let server = tls::server_config_with_resolver(tls::SwappableCert::new(key)).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(g.cert.der().to_vec())).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (server, Arc::new(client))
}

// ---------------------------------------------------------------------------------------------
// Load generator

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Auth,
    Verify,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response into `buf`; returns its status and length on the wire. Needs
/// `content-length` (both servers send it for these fixed-size answers).
async fn read_response<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<(u16, usize)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut filled = 0;
    let mut want = None;
    loop {
        if let Some(total) = want
            && filled >= total
        {
            let status =
                std::str::from_utf8(buf.get(9..12).unwrap_or_default()).ok().and_then(|s| s.parse().ok());
            return Ok((status.ok_or_else(|| bad("no status"))?, total));
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(bad("connection closed mid-response"));
        }
        filled += n;
        if want.is_none()
            && let Some(head_end) = find(&buf[..filled], b"\r\n\r\n")
        {
            let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("head not UTF-8"))?;
            let len = head
                .split("\r\n")
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| bad("no content-length"))?;
            want = Some(head_end + 4 + len);
        }
    }
}

/// One connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect(addr: SocketAddr, tls: Option<&Arc<ClientConfig>>) -> Conn {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match tls {
        None => Conn::Plain(tcp),
        Some(config) => {
            let name = ServerName::try_from(TLS_NAME).unwrap();
            Conn::Tls(Box::new(TlsConnector::from(config.clone()).connect(name, tcp).await.unwrap()))
        }
    }
}

struct ConnResult {
    latencies_us: Vec<u32>,
    non_200: usize,
    error: Option<std::io::Error>,
}

/// Requests back to back on one connection until `deadline` or `max` requests.
async fn drive_conn<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    reqs: &[Bytes],
    first: usize,
    deadline: Instant,
    max: usize,
) -> ConnResult {
    let mut out = ConnResult { latencies_us: Vec::with_capacity(max.min(1 << 20)), non_200: 0, error: None };
    let mut buf = vec![0u8; 4096];
    let mut i = first;
    while out.latencies_us.len() < max && Instant::now() < deadline {
        let req = &reqs[i % reqs.len()];
        i += 1;
        let sent = Instant::now();
        let result = async {
            s.write_all(req).await?;
            s.flush().await?;
            read_response(s, &mut buf).await
        }
        .await;
        match result {
            Ok((status, _)) => {
                out.latencies_us.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                out.non_200 += usize::from(status != 200);
            }
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out
}

/// One request; the raw answer (for the captured answers and the size check).
async fn one(addr: SocketAddr, req: &Bytes) -> Vec<u8> {
    let Conn::Plain(mut s) = connect(addr, None).await else { unreachable!() };
    s.write_all(req).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (status, len) = read_response(&mut s, &mut buf).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&buf[..len]));
    buf.truncate(len);
    buf
}

/// A raw response as the baseline's canned answer (without `date` and `content-length`).
fn canned_from(raw: &[u8]) -> Canned {
    let head_end = find(raw, b"\r\n\r\n").unwrap();
    let head = std::str::from_utf8(&raw[..head_end]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (n, v) = line.split_once(':').unwrap();
        if n.eq_ignore_ascii_case("date") || n.eq_ignore_ascii_case("content-length") {
            continue;
        }
        headers
            .append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v.trim()).unwrap());
    }
    Canned {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body: Bytes::copy_from_slice(&raw[head_end + 4..]),
    }
}

fn header_count(raw: &[u8]) -> usize {
    let head_end = find(raw, b"\r\n\r\n").unwrap();
    raw[..head_end].split(|b| *b == b'\n').count() - 1
}

/// What one side did over one run or several (summed): raw counts, so that slices of a round
/// add up exactly.
#[derive(Default)]
struct Tally {
    elapsed_s: f64,
    server_ns: u64,
    load_ns: u64,
    /// The server threads' (user, system) clock ticks.
    ticks: (u64, u64),
    non_200: usize,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.elapsed_s += other.elapsed_s;
        self.server_ns += other.server_ns;
        self.load_ns += other.load_ns;
        self.ticks = (self.ticks.0 + other.ticks.0, self.ticks.1 + other.ticks.1);
        self.non_200 += other.non_200;
        self.latencies_us.extend(other.latencies_us);
    }

    #[allow(clippy::cast_precision_loss)]
    fn run(mut self) -> Run {
        assert_eq!(self.non_200, 0, "every request must be answered 200");
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len().max(1) as f64;
        let (user, system) = self.ticks;
        Run {
            rps: self.latencies_us.len() as f64 / self.elapsed_s,
            p50_us: pct(&self.latencies_us, 0.50),
            p99_us: pct(&self.latencies_us, 0.99),
            server_us_per_req: self.server_ns as f64 / 1000.0 / n,
            server_busy: self.server_ns as f64 / 1e9 / self.elapsed_s,
            load_busy: self.load_ns as f64 / 1e9 / self.elapsed_s,
            server_kernel: system as f64 / (user + system).max(1) as f64,
        }
    }
}

struct Run {
    rps: f64,
    p50_us: u32,
    p99_us: u32,
    server_us_per_req: f64,
    /// Server threads' CPU over the run, as a share of one core.
    server_busy: f64,
    load_busy: f64,
    /// The server threads' kernel share of their CPU time.
    server_kernel: f64,
}

async fn run(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    reqs: &Arc<Vec<Bytes>>,
    connections: usize,
    duration: Duration,
    max_requests: usize,
) -> Tally {
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(connect(addr, tls).await);
    }
    let per_conn = (max_requests / connections).max(1);
    let (server_before, load_before) = (threads_cpu_ns(SERVER_THREAD), threads_cpu_ns(LOAD_THREAD));
    let ticks_before = threads_ticks(SERVER_THREAD);
    let start = Instant::now();
    let deadline = start + duration;
    let mut handles = Vec::with_capacity(connections);
    for (c, mut conn) in conns.into_iter().enumerate() {
        let reqs = reqs.clone();
        let first = c * reqs.len() / connections;
        handles.push(tokio::spawn(async move {
            match &mut conn {
                Conn::Plain(s) => drive_conn(s, &reqs, first, deadline, per_conn).await,
                Conn::Tls(s) => drive_conn(s.as_mut(), &reqs, first, deadline, per_conn).await,
            }
        }));
    }
    let mut tally = Tally::default();
    for h in handles {
        let r = h.await.unwrap();
        if let Some(e) = r.error {
            panic!("load generator: {e}");
        }
        tally.non_200 += r.non_200;
        tally.latencies_us.extend(r.latencies_us);
    }
    tally.elapsed_s = start.elapsed().as_secs_f64();
    tally.server_ns = threads_cpu_ns(SERVER_THREAD) - server_before;
    tally.load_ns = threads_cpu_ns(LOAD_THREAD) - load_before;
    let ticks = threads_ticks(SERVER_THREAD);
    tally.ticks = (ticks.0 - ticks_before.0, ticks.1 - ticks_before.1);
    tally
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { f64::midpoint(v[m - 1], v[m]) }
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

// ---------------------------------------------------------------------------------------------

/// One row of the table: a product endpoint and its baseline, with the same requests.
struct Row {
    key: &'static str,
    name: &'static str,
    product: SocketAddr,
    baseline: SocketAddr,
    tls: bool,
    reqs: Arc<Vec<Bytes>>,
    /// Per round: (baseline, product).
    runs: Vec<(Option<Run>, Option<Run>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Baseline,
    Product,
}

#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
fn main() {
    let n = env("BENCH_TOKENS", 100_000);
    let rounds = env("BENCH_ROUNDS", 5).max(1);
    let seconds = Duration::from_secs_f64(env("BENCH_SECONDS", 2).max(1) as f64);
    let warmup = Duration::from_millis(env("BENCH_WARMUP_MS", 500) as u64);
    // Each side's time in a round, cut into this many slices taken in turns.
    let slices = u32::try_from(seconds.as_millis() / env("BENCH_SLICE_MS", 250).max(1) as u128)
        .unwrap_or(u32::MAX)
        .clamp(1, 1000);
    let slice = seconds / slices;
    let connections = env("BENCH_CONNECTIONS", 16).max(1);
    let max_requests = env("BENCH_MAX_REQUESTS", 5_000_000).max(1);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let sides: &[Side] = match std::env::var("BENCH_SIDE").as_deref() {
        Ok("product") => &[Side::Product],
        Ok("baseline") => &[Side::Baseline],
        _ => &[Side::Baseline, Side::Product],
    };
    let server_threads = env("BENCH_SERVER_THREADS", 1).max(1);
    let load_threads = env("BENCH_LOAD_THREADS", 1).max(1);

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(load_threads)
        .thread_name(LOAD_THREAD)
        .enable_all()
        .build()
        .unwrap();

    let index = Index::default();
    let before = rss_bytes();
    let start = Instant::now();
    let tokens = fill(&index, n);
    let built = start.elapsed();
    let after = rss_bytes();
    println!(
        "index: {n} tokens built in {built:.2?}; RSS +{:.1} MiB = {:.0} bytes/token (includes the generated ApiToken objects' churn)",
        (after.saturating_sub(before)) as f64 / 1_048_576.0,
        (after.saturating_sub(before)) as f64 / n as f64
    );

    let (server_tls, client_tls) = tls_pair();
    let auth_reqs = requests(&tokens, Kind::Auth);
    let verify_reqs = requests(&tokens, Kind::Verify);
    let (plain, with_last_used, over_tls) = server_rt.block_on(async {
        (
            serve_product(app(&index, LastUsed::disabled()), None).await,
            serve_product(app(&index, last_used_on()), None).await,
            serve_product(app(&index, LastUsed::disabled()), Some(server_tls.clone())).await,
        )
    });
    // The baseline's answers: the product's own to the first request of each kind.
    let (canned, answers) = load_rt.block_on(async {
        let auth = one(plain, &auth_reqs[0]).await;
        let verify = one(plain, &verify_reqs[0]).await;
        (CannedSet { auth: canned_from(&auth), verify: canned_from(&verify) }, [auth, verify])
    });
    let (base_plain, base_tls) = server_rt.block_on(async {
        (serve_baseline(canned.clone(), None).await, serve_baseline(canned, Some(server_tls)).await)
    });
    load_rt.block_on(async {
        for ((what, reqs), product) in
            [("GET /v1/auth", &auth_reqs), ("POST /v1/verify", &verify_reqs)].iter().zip(&answers)
        {
            let base = one(base_plain, &reqs[0]).await;
            // `date` has a fixed width, so equal sizes mean equal answers but for its value.
            println!(
                "{what}: answer {} bytes, {} headers (product) vs {} bytes, {} headers (baseline)",
                product.len(),
                header_count(product),
                base.len(),
                header_count(&base)
            );
            assert_eq!((product.len(), header_count(product)), (base.len(), header_count(&base)), "{what}");
        }
    });

    let mut rows: Vec<Row> = [
        ("auth", "GET /v1/auth", plain, base_plain, false, &auth_reqs),
        ("verify", "POST /v1/verify", plain, base_plain, false, &verify_reqs),
        ("tls", "GET /v1/auth, TLS", over_tls, base_tls, true, &auth_reqs),
        ("lastused", "GET /v1/auth, lastUsedAt on", with_last_used, base_plain, false, &auth_reqs),
    ]
    .into_iter()
    .filter(|(key, ..)| only.is_empty() || only.split(',').any(|o| o.trim() == *key))
    .map(|(key, name, product, baseline, tls, reqs)| Row {
        key,
        name,
        product,
        baseline,
        tls,
        reqs: reqs.clone(),
        runs: Vec::new(),
    })
    .collect();
    assert!(!rows.is_empty(), "BENCH_ONLY={only} selects no row (auth, verify, tls, lastused)");

    println!(
        "GET /v1/auth, the product's hot path alone (App::call, no HTTP, no sockets): {:.0} ns per request",
        handler_ns(&app(&index, LastUsed::disabled()), &tokens, env("BENCH_HANDLER_PASSES", 7).max(1))
    );
    println!(
        "load: {connections} keep-alive HTTP/1.1 connections on loopback, same process; server runtime \
         {server_threads} thread(s) `{SERVER_THREAD}`, load generator {load_threads} thread(s) `{LOAD_THREAD}`, \
         {} cores; {rounds} rounds × {seconds:?} per scenario and side, in {slices} slices of {slice:?} taken in turns; order rotated each round",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let go = |row: &Row, side: Side, d: Duration| {
        let addr = if side == Side::Product { row.product } else { row.baseline };
        let tls = row.tls.then_some(&client_tls);
        load_rt.block_on(run(addr, tls, &row.reqs, connections, d, max_requests))
    };
    for row in &rows {
        for side in sides {
            go(row, *side, warmup);
        }
    }
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        let count = rows.len();
        for k in 0..count {
            let row = &mut rows[(k + round) % count];
            // The two sides take turns in slices (A B B A A B …), so a burst of other work on the
            // machine falls on both alike; each side's slices add up to `seconds`.
            let (mut baseline, mut product) = (Tally::default(), Tally::default());
            for s in 0..slices as usize {
                let order: Vec<Side> = if (round + k + s).is_multiple_of(2) {
                    sides.to_vec()
                } else {
                    sides.iter().rev().copied().collect()
                };
                for side in order {
                    let t = go(row, side, slice);
                    match side {
                        Side::Baseline => baseline.add(t),
                        Side::Product => product.add(t),
                    }
                }
            }
            let pair = (
                sides.contains(&Side::Baseline).then(|| baseline.run()),
                sides.contains(&Side::Product).then(|| product.run()),
            );
            if let (Some(b), Some(p)) = &pair {
                let _ = write!(line, "  {} {:.2}", row.key, p.rps / b.rps);
            }
            row.runs.push(pair);
        }
        if sides.len() == 2 {
            println!("{line}");
        }
    }

    println!();
    println!(
        "{:<30} {:<9} {:>9} {:>7} {:>7} {:>13} {:>7} {:>7} {:>9} {:>9}",
        "scenario (median of rounds)",
        "side",
        "req/s",
        "p50 µs",
        "p99 µs",
        "server µs/req",
        "user",
        "kernel",
        "server",
        "load gen"
    );
    for row in &rows {
        for side in sides {
            let runs: Vec<&Run> = row
                .runs
                .iter()
                .filter_map(|(b, p)| if *side == Side::Product { p.as_ref() } else { b.as_ref() })
                .collect();
            let m = |f: fn(&Run) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
            println!(
                "{:<30} {:<9} {:>9.0} {:>7.0} {:>7.0} {:>13.2} {:>7.2} {:>7.2} {:>8.0}% {:>8.0}%",
                row.name,
                if *side == Side::Product { "product" } else { "baseline" },
                m(|r| r.rps),
                m(|r| f64::from(r.p50_us)),
                m(|r| f64::from(r.p99_us)),
                m(|r| r.server_us_per_req),
                m(|r| r.server_us_per_req * (1.0 - r.server_kernel)),
                m(|r| r.server_us_per_req * r.server_kernel),
                m(|r| r.server_busy) * 100.0,
                m(|r| r.load_busy) * 100.0,
            );
        }
    }
    if sides.len() < 2 {
        return;
    }
    println!();
    println!("ratios per round, product/baseline: median [min–max] over {rounds} rounds");
    println!("{:<30} {:>22} {:>34}", "", "throughput (req/s)", "server CPU (baseline/product µs)");
    for row in &rows {
        let pairs: Vec<(&Run, &Run)> =
            row.runs.iter().filter_map(|(b, p)| Some((b.as_ref()?, p.as_ref()?))).collect();
        let rps: Vec<f64> = pairs.iter().map(|(b, p)| p.rps / b.rps).collect();
        let cpu: Vec<f64> = pairs.iter().map(|(b, p)| b.server_us_per_req / p.server_us_per_req).collect();
        let ((rlo, rhi), (clo, chi)) = (spread(&rps), spread(&cpu));
        println!(
            "{:<30} {:>8.2} [{rlo:.2}–{rhi:.2}] {:>20.2} [{clo:.2}–{chi:.2}]",
            row.name,
            median(&rps),
            median(&cpu)
        );
    }
}
