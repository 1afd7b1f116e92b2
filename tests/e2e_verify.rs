//! The verification service against the real API server and the running operator, driven with
//! curl: exact status codes, headers and reasons; the overlap after rotation; revocation latency.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use apitoken_operator::api::ApiToken;
use apitoken_operator::core::token;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use rand::SeedableRng;
use serde_json::{Value, json};
use support::operator::{Operator, install_crds};
use support::{Reply, TestNamespace, curl, issued_token, wait_for};

const T: Duration = Duration::from_secs(30);

fn verify(base: &str, body: &Value) -> Reply {
    curl(&[
        "-X",
        "POST",
        &format!("{base}/v1/verify"),
        "-H",
        "content-type: application/json",
        "-d",
        &body.to_string(),
    ])
}

fn auth(base: &str, token: &str, query: &str) -> Reply {
    curl(&[&format!("{base}/v1/auth{query}"), "-H", &format!("Authorization: Bearer {token}")])
}

fn review(base: &str, token: &str, audiences: &[&str]) -> Reply {
    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": audiences}});
    curl(&[
        "-X",
        "POST",
        &format!("{base}/apis/authentication.k8s.io/v1/tokenreviews"),
        "-d",
        &body.to_string(),
    ])
}

async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap();
}

async fn setup(prefix: &str) -> (TestNamespace, Operator, String, Api<ApiToken>, Api<Secret>) {
    install_crds().await;
    let ns = TestNamespace::new(prefix).await;
    let op = Operator::start_verifying(&ns.name);
    let base = op.verify_url.clone().unwrap();
    let ready = format!("{}/readyz", op.metrics_url);
    wait_for("the verifier to be ready", T, || async { (curl(&[&ready]).code == 200).then_some(()) }).await;
    let (tokens, secrets) = (ns.api(), ns.api());
    (ns, op, base, tokens, secrets)
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one scenario: the endpoint contract, case by case
async fn every_endpoint_answers_with_the_exact_codes_and_reasons() {
    let (ns, op, base, tokens, secrets) = setup("verify").await;
    apply(&tokens, "good", json!({"scopes": ["metrics:read", "pipeline:*"], "audiences": ["tenant-a"]}))
        .await;
    apply(&tokens, "brief", json!({"lifetime": "3s", "rotation": {"enabled": false}})).await;
    apply(&tokens, "gone", json!({"scopes": ["metrics:read"]})).await;
    let good = issued_token(&tokens, &secrets, "good", None).await;
    let brief = issued_token(&tokens, &secrets, "brief", None).await;
    let gone = issued_token(&tokens, &secrets, "gone", None).await;

    // Valid, on each endpoint, with its metadata.
    let r = verify(
        &base,
        &json!({"token": good, "scopes": ["metrics:read", "pipeline/prod:write"], "audience": "tenant-a"}),
    );
    assert_eq!(r.code, 200, "{:?}", r.body);
    assert_eq!(r.body["name"], "good");
    assert_eq!(r.body["namespace"], ns.name.as_str());
    assert_eq!(r.body["tokenId"], &good[7..15]);
    assert_eq!(r.body["scopes"], json!(["metrics:read", "pipeline:*"]));
    let r = auth(&base, &good, "?scope=metrics:read&audience=tenant-a");
    assert_eq!(r.code, 200);
    assert!(
        r.headers.contains("x-token-name: good")
            && r.headers.contains(&format!("x-token-namespace: {}", ns.name))
    );
    assert!(r.headers.contains(&format!("x-token-id: {}", good[7..15].to_lowercase())));
    assert!(r.headers.contains("x-token-scopes: metrics:read pipeline:*"), "{}", r.headers);
    let r = curl(&[
        &format!("{base}/v1/auth"),
        "-H",
        &format!("Authorization: Bearer {good}"),
        "-H",
        "X-Required-Scopes: pipeline/x:read",
        "-H",
        "X-Token-Audience: tenant-a",
    ]);
    assert_eq!(r.code, 200, "headers carry scope and audience too");
    let r = review(&base, &good, &["tenant-a"]);
    assert_eq!(r.code, 200);
    assert_eq!(r.body["status"]["authenticated"], true);
    assert_eq!(r.body["status"]["user"]["username"], format!("apitoken:{}:good", ns.name));
    assert_eq!(r.body["status"]["audiences"], json!(["tenant-a"]));
    assert!(!r.body.to_string().contains(&good), "the review does not echo the token");

    // 401s with their reasons.
    let unknown =
        token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(99)).plaintext.expose().to_string();
    let mut typo = good.clone().into_bytes();
    typo[30] = if typo[30] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    apply(&tokens, "gone", json!({"scopes": ["metrics:read"], "revoked": true})).await;
    wait_for("brief to expire and gone to be revoked", T, || async {
        let e = verify(&base, &json!({"token": brief})).body["reason"] == "expired";
        let r = verify(&base, &json!({"token": gone})).body["reason"] == "revoked";
        (e && r).then_some(())
    })
    .await;
    for (what, t, reason) in [
        ("unknown", unknown.as_str(), "unknown"),
        ("malformed", "not-a-token", "malformed"),
        ("wrong checksum", typo.as_str(), "checksum_mismatch"),
        ("expired", brief.as_str(), "expired"),
        ("revoked", gone.as_str(), "revoked"),
    ] {
        let r = verify(&base, &json!({"token": t, "audience": "tenant-a"}));
        assert_eq!((r.code, r.body["reason"].as_str()), (401, Some(reason)), "{what}: {:?}", r.body);
        assert!(!r.body.to_string().contains(t) || t == "not-a-token", "{what}: the body echoes the token");
        let a = auth(&base, t, "");
        assert_eq!(a.code, 401, "{what} on /v1/auth");
        assert!(
            a.headers.contains("www-authenticate: bearer") && a.headers.contains("error=\"invalid_token\""),
            "{}",
            a.headers
        );
        let tr = review(&base, t, &[]);
        assert_eq!(
            (tr.code, &tr.body["status"]["authenticated"]),
            (200, &json!(false)),
            "{what} on TokenReview"
        );
        assert!(tr.body["status"]["error"].as_str().unwrap().starts_with(reason));
    }

    // 403s: missing scope (named) and audience.
    let r = verify(&base, &json!({"token": good, "scopes": ["metrics:write"], "audience": "tenant-a"}));
    assert_eq!((r.code, r.body["reason"].as_str()), (403, Some("missing_scope")));
    assert_eq!(r.body["missingScopes"], json!(["metrics:write"]));
    let a = auth(&base, &good, "?scope=metrics:write&audience=tenant-a");
    assert_eq!(a.code, 403);
    assert!(
        a.headers.contains("error=\"insufficient_scope\"") && a.headers.contains("scope=\"metrics:write\""),
        "{}",
        a.headers
    );
    let r = verify(&base, &json!({"token": good, "audience": "tenant-b"}));
    assert_eq!((r.code, r.body["reason"].as_str()), (403, Some("audience_mismatch")));
    assert_eq!(review(&base, &good, &["tenant-b"]).body["status"]["authenticated"], false);

    // Bad requests are 4xx, never 500.
    assert_eq!(curl(&[&format!("{base}/v1/auth")]).code, 401, "no Authorization header");
    assert!(curl(&[&format!("{base}/v1/auth")]).headers.contains("www-authenticate: bearer realm"));
    // Forward-auth answers only 200/401/403 (nginx turns anything else into a 500).
    assert_eq!(curl(&[&format!("{base}/v1/auth"), "-H", "Authorization: Basic Zm9vOmJhcg=="]).code, 401);
    assert_eq!(curl(&["-X", "POST", &format!("{base}/v1/verify"), "-d", "{not json"]).code, 400);
    assert_eq!(
        curl(&["-X", "POST", &format!("{base}/v1/verify"), "-d", &json!({"scopes": [good]}).to_string()])
            .code,
        400
    );
    let echoed = curl(&[
        "-X",
        "POST",
        &format!("{base}/v1/verify"),
        "-d",
        &json!({"token": 1, "scopes": good}).to_string(),
    ]);
    assert_eq!(echoed.code, 400);
    assert!(!echoed.body.to_string().contains(&good), "a 400 does not echo input");
    let big = json!({"token": "x".repeat(20_000)}).to_string();
    assert_eq!(curl(&["-X", "POST", &format!("{base}/v1/verify"), "-d", &big]).code, 413);
    assert_eq!(
        curl(&[
            "-X",
            "POST",
            &format!("{base}/v1/verify"),
            "-d",
            &json!({"token": good, "scopes": ["Bad Scope"]}).to_string()
        ])
        .code,
        400
    );

    // lastUsedAt is written back (once; debounced).
    wait_for("lastUsedAt", T, || async { tokens.get("good").await.ok()?.status?.last_used_at }).await;
    // Metrics count by endpoint and result.
    let m = curl(&[&format!("{}/metrics", op.metrics_url)]);
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(text.contains("apitoken_verifications_total{endpoint=\"verify\",result=\"valid\"}"), "{text}");
    assert!(text.contains("result=\"checksum_mismatch\""));
    // Controller metrics: tokens by phase, expiry per token, reconciles.
    assert!(text.contains("apitoken_tokens{phase=\"Active\"}"), "{text}");
    assert!(
        text.contains(&format!(
            "apitoken_expiration_timestamp_seconds{{namespace=\"{}\",name=\"good\",rotation=\"enabled\"}}",
            ns.name
        )),
        "{text}"
    );
    assert!(text.contains("apitoken_reconciles_total{result=\"ok\"}"), "{text}");
    assert!(!text.contains(&good[15..55]));
    ns.cleanup().await;
}

#[tokio::test]
async fn the_previous_token_works_until_previous_valid_until_and_fails_after() {
    let (ns, _op, base, tokens, secrets) = setup("overlap").await;
    apply(&tokens, "o", json!({"rotation": {"gracePeriod": "4s", "trigger": "a"}})).await;
    let old = issued_token(&tokens, &secrets, "o", None).await;
    apply(&tokens, "o", json!({"rotation": {"gracePeriod": "4s", "trigger": "b"}})).await;
    let new = issued_token(&tokens, &secrets, "o", Some(&old)).await;
    let until = tokens.get("o").await.unwrap().status.unwrap().previous_valid_until.unwrap().0;
    let r = verify(&base, &json!({"token": old}));
    assert_eq!((r.code, &r.body["previous"]), (200, &json!(true)), "{:?}", r.body);
    assert_eq!(verify(&base, &json!({"token": new})).code, 200);
    let failed_at = wait_for("the previous token to be refused", T, || async {
        let r = verify(&base, &json!({"token": old}));
        (r.code == 401).then(jiff::Timestamp::now)
    })
    .await;
    let late = failed_at.duration_since(until).as_secs_f64();
    println!("previous token refused {late:+.3}s from previousValidUntil");
    assert!(late >= 0.0, "refused {late}s before previousValidUntil");
    assert!(late < 1.5, "refused {late}s after previousValidUntil");
    assert_eq!(verify(&base, &json!({"token": new})).code, 200);
    ns.cleanup().await;
}

#[tokio::test]
async fn revocation_applies_within_one_second() {
    let (ns, _op, base, tokens, secrets) = setup("revocation").await;
    let mut delays = Vec::new();
    for i in 0..20 {
        let name = format!("r{i}");
        apply(&tokens, &name, json!({"scopes": ["metrics:read"]})).await;
        let t = issued_token(&tokens, &secrets, &name, None).await;
        wait_for("the verifier to accept it", T, || async {
            (verify(&base, &json!({"token": t})).code == 200).then_some(())
        })
        .await;
        apply(&tokens, &name, json!({"scopes": ["metrics:read"], "revoked": true})).await;
        let written = Instant::now();
        wait_for("the revocation to apply", Duration::from_secs(1), || async {
            (verify(&base, &json!({"token": t})).code == 401).then_some(())
        })
        .await;
        delays.push(written.elapsed());
    }
    delays.sort();
    println!(
        "revocation delay over {} trials: min {:?}, median {:?}, max {:?}",
        delays.len(),
        delays[0],
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert!(delays.iter().all(|d| *d < Duration::from_secs(1)));
    ns.cleanup().await;
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_rate_limited_without_slowing_other_clients() {
    install_crds().await;
    let ns = TestNamespace::new("flood").await;
    let op = Operator::start_verifying_with_default_limits(&ns.name);
    let base = op.verify_url.clone().unwrap();
    let ready = format!("{}/readyz", op.metrics_url);
    wait_for("the verifier to be ready", T, || async { (curl(&[&ready]).code == 200).then_some(()) }).await;
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (ns.api(), ns.api());
    apply(&tokens, "ok", json!({})).await;
    let good = issued_token(&tokens, &secrets, "ok", None).await;
    wait_for("the verifier to accept it", T, || async {
        (verify(&base, &json!({"token": good})).code == 200).then_some(())
    })
    .await;

    // The flooder (127.0.0.2) presents bad tokens until refused with 429 + Retry-After.
    let bad = json!({"token": "apitok_0000000000000000000000000000000000000000000000000000AAAAAA"});
    let flood = |n: usize| {
        (0..n)
            .map(|_| {
                curl(&[
                    "--interface",
                    "127.0.0.2",
                    "-X",
                    "POST",
                    &format!("{base}/v1/verify"),
                    "-d",
                    &bad.to_string(),
                ])
            })
            .collect::<Vec<_>>()
    };
    let replies = flood(40);
    let limited = replies.iter().position(|r| r.code == 429).expect("refused with 429 within 40 failures");
    println!("first 429 after {limited} failures");
    assert!(replies[..limited].iter().all(|r| r.code == 401));
    assert!(replies[limited].headers.contains("retry-after: "), "{}", replies[limited].headers);
    // Another client (127.0.0.1) is not limited.
    let r = verify(&base, &json!({"token": good}));
    assert_eq!(r.code, 200);
    let m = curl(&[&format!("{}/metrics", op.metrics_url)]);
    assert!(m.body.as_str().unwrap_or_default().contains("apitoken_rate_limited_total"));
    ns.cleanup().await;
}

#[tokio::test]
async fn tls_serves_http1_and_http2_with_generated_or_given_certificates() {
    install_crds().await;
    let ns = TestNamespace::new("tls").await;
    let (tokens, secrets): (Api<ApiToken>, Api<Secret>) = (ns.api(), ns.api());
    // Given certificate files (as cert-manager would mount them).
    let dir = std::env::temp_dir().join(format!("apitoken-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-keyout", key.to_str().unwrap(), "-out", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(ok.status.success());
    for given in [false, true] {
        let port = support::operator::free_port();
        let mut op = Operator::start_as_chart(&ns.name, "controller,verify", port);
        op.kill();
        op.args.retain(|a| a != "--plain-http");
        if given {
            op.args.extend([
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
        }
        op.restart();
        let base = format!("https://127.0.0.1:{port}");
        apply(&tokens, "t", json!({"scopes": ["metrics:read"]})).await;
        let t = issued_token(&tokens, &secrets, "t", None).await;
        let trust: Vec<String> =
            if given { vec!["--cacert".into(), cert.display().to_string()] } else { vec!["-k".into()] };
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let out = wait_for("the TLS listener", T, || async {
                let out = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", flag])
                    .args(&trust)
                    .args([
                        "-X",
                        "POST",
                        &format!("{base}/v1/verify"),
                        "-d",
                        &json!({"token": t}).to_string(),
                    ])
                    .output()
                    .ok()?;
                let s = String::from_utf8_lossy(&out.stdout).into_owned();
                s.starts_with("200").then_some(s)
            })
            .await;
            assert_eq!(out, format!("200 {version}"), "given certificate: {given}");
        }
        // Plain HTTP to the TLS port is refused, not served.
        let plain = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://127.0.0.1:{port}/v1/auth"),
            ])
            .output()
            .unwrap();
        assert_ne!(String::from_utf8_lossy(&plain.stdout), "401");
    }
    ns.cleanup().await;
}
