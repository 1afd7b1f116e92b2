//! The verification answers, pinned byte for byte (issue 12: making the service faster must not
//! change what it says). For a table of cases on `/v1/verify`, `/v1/auth` and TokenReview, the
//! router is served in process on loopback by the product's own `verify::serve` (plain HTTP), a
//! raw request is written and the raw answer read back: status line, every header (its value
//! too, except `Date`, whose presence alone is pinned) and the body, compared with
//! `tests/snapshots/verify-responses.txt`. Headers are compared sorted by name: HTTP gives no
//! meaning to the order of different header names, so a faster way of building the same headers
//! may write them in another order.
//!
//! Deterministic without a clock: every token string is fixed (built from constant ids and
//! secrets, signed with the product's checksum), and the index entries carry fixed timestamps
//! far from now (valid ones expire in 2099, the expired one in 2001).
//!
//! When an answer changes on purpose, re-record and review the diff before committing:
//! `APITOKEN_RECORD_SNAPSHOTS=1 cargo test --locked --test unit_verify_responses`.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use apitoken_operator::api::ApiToken;
use apitoken_operator::core::token;
use apitoken_operator::metrics::Metrics;
use apitoken_operator::verify::http::{AppState, router};
use apitoken_operator::verify::index::Index;
use apitoken_operator::verify::last_used::LastUsed;
use apitoken_operator::verify::limiter::FailureLimiter;
use serde_json::json;

const SNAPSHOT: &str = "tests/snapshots/verify-responses.txt";
const RECORD: &str = "APITOKEN_RECORD_SNAPSHOTS";

/// A well-formed token with a fixed id: 8 id characters, a 40-character secret, the checksum.
fn tok(id: &str) -> String {
    assert_eq!(id.len(), token::ID_LEN);
    token::sign(format!("apitok_{id}{id}{}", "S".repeat(token::SECRET_LEN - token::ID_LEN)))
}

/// The index: a token with a current and a previous hash, one bound to audiences, one that never
/// expires, one past its expiry (the reconciler has not marked it yet) and one revoked.
fn index() -> Index {
    let index = Index::default();
    let objects = [
        json!({
            "metadata": {"name": "reader", "namespace": "team-a"},
            "spec": {"scopes": ["metrics:read", "pipeline/prod:write"]},
            "status": {
                "phase": "Active", "tokenHash": token::hash(&tok("Current1")),
                "expiresAt": "2099-06-01T00:00:00Z",
                "previousTokenHash": token::hash(&tok("Previou1")),
                "previousValidUntil": "2099-01-01T00:10:00Z",
                "effectiveScopes": ["metrics:read", "pipeline/prod:write"],
            },
        }),
        json!({
            "metadata": {"name": "bound", "namespace": "team-b"},
            "spec": {"scopes": ["metrics:read"], "audiences": ["tenant-a", "tenant-b"]},
            "status": {
                "phase": "Active", "tokenHash": token::hash(&tok("Bound001")),
                "expiresAt": "2099-06-01T00:00:00Z", "effectiveScopes": ["metrics:read"],
            },
        }),
        json!({
            "metadata": {"name": "forever", "namespace": "team-a"},
            "spec": {"scopes": ["metrics:*"]},
            "status": {"phase": "Active", "tokenHash": token::hash(&tok("Forever1")), "effectiveScopes": ["metrics:*"]},
        }),
        json!({
            "metadata": {"name": "old", "namespace": "team-a"},
            "spec": {"scopes": ["metrics:read"]},
            "status": {
                "phase": "Active", "tokenHash": token::hash(&tok("Expired1")),
                "expiresAt": "2001-01-01T00:00:00Z", "effectiveScopes": ["metrics:read"],
            },
        }),
        json!({
            "metadata": {"name": "gone", "namespace": "team-a"},
            "spec": {"scopes": ["metrics:read"], "revoked": true},
            "status": {
                "phase": "Revoked", "tokenHash": token::hash(&tok("Revoked1")),
                "expiresAt": "2099-06-01T00:00:00Z", "effectiveScopes": ["metrics:read"],
            },
        }),
    ];
    for mut o in objects {
        o["apiVersion"] = json!("apitoken.dev/v1alpha1");
        o["kind"] = json!("ApiToken");
        let at: ApiToken = serde_json::from_value(o).unwrap();
        index.upsert(&at);
    }
    index
}

/// Serves the verification router with a failure limit of `burst` at once (1/s after that) on a
/// loopback port of `rt`, through the product's own `serve`.
fn serve(rt: &tokio::runtime::Runtime, burst: u32) -> SocketAddr {
    let app = router(AppState {
        index: index(),
        metrics: Arc::new(Metrics::default()),
        limiter: Arc::new(FailureLimiter::new(1, burst)),
        last_used: LastUsed::disabled(),
    });
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(apitoken_operator::verify::serve(listener, app, None, Arc::default(), std::future::pending()));
    addr
}

/// One raw HTTP/1.1 request.
struct Req {
    method: &'static str,
    target: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
}

impl Req {
    fn new(method: &'static str, target: impl Into<String>) -> Self {
        Self { method, target: target.into(), headers: Vec::new(), body: Vec::new() }
    }

    fn header(mut self, name: &'static str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name, value.as_ref().to_vec()));
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    fn json(mut self, body: &serde_json::Value) -> Self {
        self.body = body.to_string().into_bytes();
        self.header("content-type", "application/json")
    }

    fn raw_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out =
            format!("{} {} HTTP/1.1\r\nhost: verify.test\r\n", self.method, self.target).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if self.method == "POST" {
            out.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// A response as it came off the wire.
struct Resp {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn status(&self) -> u16 {
        self.status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// The pinned form: status line, headers sorted by name (Date's value left out), body.
    fn render(&self) -> String {
        let mut headers = self.headers.clone();
        headers.sort_by_key(|(n, _)| n.to_ascii_lowercase());
        let mut out = format!("{}\n", self.status_line);
        for (name, value) in headers {
            let value = if name.eq_ignore_ascii_case("date") { "<not pinned>" } else { &value };
            let _ = writeln!(out, "{name}: {value}");
        }
        out.push('\n');
        out.push_str(
            &String::from_utf8(self.body.clone()).unwrap_or_else(|_| format!("(bytes) {:?}", self.body)),
        );
        out.push('\n');
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `req` on a new connection and reads exactly one response (keep-alive, as a proxy's
/// connection pool would: the answer must not depend on the connection being closed).
fn send(addr: SocketAddr, req: &Req) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&req.bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let read_more = |s: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]| {
        let n = s.read(chunk).unwrap_or_else(|e| panic!("reading the response to {}: {e}", req.target));
        assert!(n > 0, "the server closed the connection before answering {} {}", req.method, req.target);
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        read_more(&mut s, &mut buf, &mut chunk);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("response head is not UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_string();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?}"));
            (n.to_string(), v.trim().to_string())
        })
        .collect();
    let mut resp = Resp { status_line, headers, body: Vec::new() };
    let mut tail = buf[head_end + 4..].to_vec();
    if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().unwrap();
        while tail.len() < len {
            read_more(&mut s, &mut tail, &mut chunk);
        }
        resp.body = tail[..len].to_vec();
    } else if resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        // Decoded so that a change of framing shows in the headers, not as a hang.
        loop {
            let Some(eol) = find(&tail, b"\r\n") else {
                read_more(&mut s, &mut tail, &mut chunk);
                continue;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&tail[..eol]).unwrap().trim(), 16).unwrap();
            while tail.len() < eol + 2 + size + 2 {
                read_more(&mut s, &mut tail, &mut chunk);
            }
            resp.body.extend_from_slice(&tail[eol + 2..eol + 2 + size]);
            tail.drain(..eol + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        panic!("{} {}: the response has neither content-length nor chunked framing", req.method, req.target);
    }
    resp
}

/// Repeats `req` (a failure) until the client is refused as rate limited; that answer.
fn first_limited(addr: SocketAddr, req: &Req) -> Resp {
    (0..20)
        .map(|_| send(addr, req))
        .find(|r| r.status() == 429 || r.header("retry-after").is_some())
        .unwrap_or_else(|| panic!("{} {}: not rate limited after 20 failures", req.method, req.target))
}

const REVIEW: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

fn review(token: Option<&str>, audiences: Option<&[&str]>) -> Req {
    let mut spec = json!({});
    if let Some(t) = token {
        spec["token"] = json!(t);
    }
    if let Some(a) = audiences {
        spec["audiences"] = json!(a);
    }
    Req::new("POST", REVIEW)
        .json(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}))
}

fn verify(body: &serde_json::Value) -> Req {
    Req::new("POST", "/v1/verify").json(body)
}

/// Every case, in order: its title and the response, rendered.
#[allow(clippy::too_many_lines)] // one table of cases
fn run_all() -> String {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let app = serve(&rt, 1_000_000);
    let current = tok("Current1");
    let previous = tok("Previou1");
    let bound = tok("Bound001");
    let forever = tok("Forever1");
    let expired = tok("Expired1");
    let revoked = tok("Revoked1");
    let unknown = tok("Unknown1");
    let typo = {
        // One secret character changed: the checksum no longer matches.
        let mut b = current.clone().into_bytes();
        b[20] = if b[20] == b'S' { b'T' } else { b'S' };
        String::from_utf8(b).unwrap()
    };
    let malformed = "apitok_short";
    let oversized = vec![b'x'; apitoken_operator::verify::http::MAX_BODY + 1];

    let cases: Vec<(&str, Req)> = vec![
        // POST /v1/verify
        ("verify: valid, current token", verify(&json!({"token": current, "scopes": ["metrics:read"]}))),
        ("verify: valid, previous token in its grace period", verify(&json!({"token": previous}))),
        ("verify: valid, never expires", verify(&json!({"token": forever, "scopes": ["metrics:read"]}))),
        (
            "verify: valid, bound token with one of its audiences",
            verify(&json!({"token": bound, "audience": "tenant-b"})),
        ),
        ("verify: unknown token", verify(&json!({"token": unknown}))),
        ("verify: malformed token", verify(&json!({"token": malformed}))),
        ("verify: checksum mismatch", verify(&json!({"token": typo}))),
        ("verify: expired", verify(&json!({"token": expired}))),
        ("verify: revoked", verify(&json!({"token": revoked}))),
        (
            "verify: missing scopes",
            verify(&json!({"token": current, "scopes": ["metrics:read", "metrics:write", "admin:delete"]})),
        ),
        ("verify: audience mismatch", verify(&json!({"token": bound, "audience": "tenant-c"}))),
        ("verify: bound token, no audience named", verify(&json!({"token": bound}))),
        (
            "verify: scope that is not resource:verb",
            verify(&json!({"token": current, "scopes": ["Bad Scope"]})),
        ),
        (
            "verify: bad JSON",
            Req::new("POST", "/v1/verify")
                .header("content-type", "application/json")
                .raw_body(r#"{"token": "#),
        ),
        ("verify: JSON of the wrong shape", verify(&json!({"token": 5}))),
        ("verify: empty body", Req::new("POST", "/v1/verify")),
        (
            "verify: oversized body",
            Req::new("POST", "/v1/verify")
                .header("content-type", "application/json")
                .raw_body(oversized.clone()),
        ),
        ("verify: GET is not allowed", Req::new("GET", "/v1/verify")),
        // /v1/auth
        ("auth: valid, current token", Req::new("GET", "/v1/auth?scope=metrics:read").bearer(&current)),
        ("auth: valid, previous token", Req::new("GET", "/v1/auth").bearer(&previous)),
        ("auth: valid, never expires", Req::new("GET", "/v1/auth?scope=metrics:write").bearer(&forever)),
        (
            "auth: valid, audience in the query",
            Req::new("GET", "/v1/auth?scope=metrics:read&audience=tenant-a").bearer(&bound),
        ),
        (
            "auth: valid, audience in X-Token-Audience",
            Req::new("GET", "/v1/auth").bearer(&bound).header("x-token-audience", "tenant-b"),
        ),
        (
            "auth: valid, scopes in X-Required-Scopes",
            Req::new("GET", "/v1/auth")
                .bearer(&current)
                .header("x-required-scopes", "metrics:read pipeline/prod:write"),
        ),
        ("auth: valid, any method", Req::new("POST", "/v1/auth?scope=metrics:read").bearer(&current)),
        ("auth: unknown token", Req::new("GET", "/v1/auth").bearer(&unknown)),
        ("auth: malformed token", Req::new("GET", "/v1/auth").bearer(malformed)),
        ("auth: checksum mismatch", Req::new("GET", "/v1/auth").bearer(&typo)),
        ("auth: expired", Req::new("GET", "/v1/auth").bearer(&expired)),
        ("auth: revoked", Req::new("GET", "/v1/auth").bearer(&revoked)),
        (
            "auth: missing scope (query)",
            Req::new("GET", "/v1/auth?scope=metrics:write&scope=admin:delete").bearer(&current),
        ),
        (
            "auth: missing scope (X-Required-Scopes, two headers)",
            Req::new("GET", "/v1/auth")
                .bearer(&current)
                .header("x-required-scopes", "metrics:read")
                .header("x-required-scopes", "metrics:write"),
        ),
        ("auth: audience mismatch", Req::new("GET", "/v1/auth?audience=tenant-c").bearer(&bound)),
        ("auth: bound token, no audience named", Req::new("GET", "/v1/auth").bearer(&bound)),
        ("auth: no Authorization header", Req::new("GET", "/v1/auth")),
        ("auth: empty Authorization header", Req::new("GET", "/v1/auth").header("authorization", "")),
        ("auth: other scheme", Req::new("GET", "/v1/auth").header("authorization", "Basic dXNlcjpwYXNz")),
        ("auth: Bearer without a token", Req::new("GET", "/v1/auth").header("authorization", "Bearer")),
        ("auth: Bearer and spaces only", Req::new("GET", "/v1/auth").header("authorization", "Bearer    ")),
        (
            "auth: Bearer with bytes outside ASCII",
            Req::new("GET", "/v1/auth").header("authorization", b"Bearer \xff\xfe"),
        ),
        ("auth: two Authorization headers", Req::new("GET", "/v1/auth").bearer(&current).bearer(&current)),
        ("auth: bad scope in the query", Req::new("GET", "/v1/auth?scope=Bad%20Scope").bearer(&current)),
        ("auth: query that is not URL encoding", Req::new("GET", "/v1/auth?scope=%FF").bearer(&current)),
        (
            "auth: X-Required-Scopes outside ASCII",
            Req::new("GET", "/v1/auth").bearer(&current).header("x-required-scopes", b"metrics:read \xff"),
        ),
        (
            "auth: X-Token-Audience outside ASCII",
            Req::new("GET", "/v1/auth").bearer(&bound).header("x-token-audience", b"t\xe9nant"),
        ),
        // TokenReview
        ("tokenreview: valid, current token", review(Some(&current), None)),
        ("tokenreview: valid, previous token", review(Some(&previous), None)),
        ("tokenreview: valid, never expires", review(Some(&forever), None)),
        (
            "tokenreview: valid, unbound token asked for audiences",
            review(Some(&current), Some(&["https://kubernetes.default.svc"])),
        ),
        (
            "tokenreview: valid, bound token and one of its audiences",
            review(Some(&bound), Some(&["tenant-x", "tenant-a"])),
        ),
        ("tokenreview: audience mismatch", review(Some(&bound), Some(&["tenant-c"]))),
        ("tokenreview: unknown token", review(Some(&unknown), None)),
        ("tokenreview: malformed token", review(Some(malformed), None)),
        ("tokenreview: checksum mismatch", review(Some(&typo), None)),
        ("tokenreview: expired", review(Some(&expired), None)),
        ("tokenreview: revoked", review(Some(&revoked), None)),
        ("tokenreview: no token", review(None, None)),
        (
            "tokenreview: bad JSON",
            Req::new("POST", REVIEW).header("content-type", "application/json").raw_body("{"),
        ),
        (
            "tokenreview: oversized body",
            Req::new("POST", REVIEW).header("content-type", "application/json").raw_body(oversized),
        ),
        // Elsewhere
        ("unknown path", Req::new("GET", "/v1/nothing")),
    ];
    let mut out = String::new();
    for (title, req) in &cases {
        let resp = send(app, req);
        let _ = write!(out, "=== {title}\n{} {}\n{}\n", req.method, req.target, resp.render());
    }
    // Rate limited: a limiter of its own per endpoint (burst 1, then 1/s), failures until refused.
    let limited: Vec<(&str, Req)> = vec![
        ("verify: rate limited", verify(&json!({"token": unknown}))),
        ("auth: rate limited", Req::new("GET", "/v1/auth").bearer(&unknown)),
        ("tokenreview: rate limited", review(Some(&unknown), None)),
    ];
    for (title, req) in &limited {
        let resp = first_limited(serve(&rt, 1), req);
        let _ = write!(out, "=== {title}\n{} {}\n{}\n", req.method, req.target, resp.render());
    }
    out
}

/// The cases of `text` by title, for a readable failure.
fn split_cases(text: &str) -> Vec<(&str, &str)> {
    text.split("=== ").filter(|c| !c.is_empty()).map(|c| c.split_once('\n').unwrap_or((c, ""))).collect()
}

#[test]
fn verification_answers_are_unchanged() {
    let actual = run_all();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SNAPSHOT);
    if std::env::var_os(RECORD).is_some() {
        std::fs::write(&path, &actual).unwrap();
        eprintln!("recorded {}: review the diff before committing", path.display());
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; record it with {RECORD}=1 cargo test --locked --test unit_verify_responses",
            path.display()
        )
    });
    if actual == expected {
        return;
    }
    let (want, got) = (split_cases(&expected), split_cases(&actual));
    let mut report = String::new();
    for (title, body) in &got {
        match want.iter().find(|(t, _)| t == title) {
            Some((_, w)) if w == body => {}
            Some((_, w)) => {
                let _ = writeln!(report, "--- {title}\nexpected:\n{w}\nactual:\n{body}");
            }
            None => {
                let _ = writeln!(report, "--- {title}: a case the snapshot does not have");
            }
        }
    }
    for (title, _) in &want {
        if !got.iter().any(|(t, _)| t == title) {
            let _ = writeln!(report, "--- {title}: in the snapshot, no longer run");
        }
    }
    panic!(
        "verification answers differ from {SNAPSHOT}:\n{report}\nIf the change is intended, re-record with \
         {RECORD}=1 cargo test --locked --test unit_verify_responses and review the diff"
    );
}
