//! Crash safety, secrecy of the plaintext, and rejection of malformed manifests — against the
//! real API server with the operator as a process.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apitoken_operator::api::{ApiToken, Phase};
use apitoken_operator::core::token;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::operator::{Operator, install_crds};
use support::{TestNamespace, wait_for};

async fn apply(tokens: &Api<ApiToken>, name: &str, spec: Value) {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name}, "spec": spec});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap();
}

/// Records every token value any Secret in the namespace ever held, from a watch that is
/// established before this returns.
async fn collect_plaintexts(
    secrets: Api<Secret>,
) -> (Arc<Mutex<BTreeSet<String>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let sink = seen.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut stream = watcher(secrets, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = stream.next().await {
            let s = match event {
                watcher::Event::InitDone => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => s,
                _ => continue,
            };
            if let Some(t) = s.data.as_ref().and_then(|d| d.get("token")) {
                sink.lock().unwrap().insert(String::from_utf8_lossy(&t.0).into_owned());
            }
        }
    });
    ready_rx.await.expect("the Secret watch starts");
    (seen, task)
}

/// No plaintext (nor its 40-character secret part) in the operator log, Events or status.
async fn assert_no_plaintext(ns: &TestNamespace, log: &str, plaintexts: &BTreeSet<String>) {
    assert!(!plaintexts.is_empty(), "the watch saw tokens");
    let events: Api<Event> = ns.api();
    let events = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
    let tokens: Api<ApiToken> = ns.api();
    let status = serde_json::to_string(&tokens.list(&ListParams::default()).await.unwrap().items).unwrap();
    assert!(log.len() > 1000 && events.contains("Issued") && status.contains("tokenHash"), "inputs are real");
    for p in plaintexts {
        let secret_part = &p[p.len() - 46..p.len() - 6];
        for (what, text) in [("operator log", log), ("events", events.as_str()), ("status", status.as_str())]
        {
            assert!(!text.contains(p.as_str()), "a token plaintext appears in the {what}");
            assert!(!text.contains(secret_part), "a token's secret part appears in the {what}");
        }
    }
    println!("checked {} plaintexts against {} bytes of log, events and status", plaintexts.len(), log.len());
}

#[tokio::test]
async fn no_plaintext_reaches_logs_events_or_status() {
    install_crds().await;
    let ns = TestNamespace::new("secrecy").await;
    let op = Operator::start(&ns.name);
    let tokens: Api<ApiToken> = ns.api();
    let (seen, watch) = collect_plaintexts(ns.api()).await;
    apply(
        &tokens,
        "a",
        json!({"scopes": ["metrics:read"], "secret": {"extraKeys": {"auth": "Bearer {{token}}"}}}),
    )
    .await;
    apply(&tokens, "b", json!({"lifetime": "3s", "rotation": {"enabled": false}})).await;
    // Issued before the first trigger, so that every trigger below is a rotation.
    wait_for("a issued", Duration::from_secs(30), || async {
        tokens.get("a").await.ok()?.status?.token_hash
    })
    .await;
    for trigger in ["1", "2", "3"] {
        apply(&tokens, "a", json!({"scopes": ["metrics:read"], "rotation": {"trigger": trigger}, "secret": {"extraKeys": {"auth": "Bearer {{token}}"}}})).await;
        wait_for("trigger observed", Duration::from_secs(30), || async {
            let s = tokens.get("a").await.ok()?.status?;
            (s.observed_trigger.as_deref() == Some(trigger)).then_some(())
        })
        .await;
    }
    apply(&tokens, "a", json!({"revoked": true})).await;
    wait_for("a Revoked, b Expired", Duration::from_secs(30), || async {
        let a = tokens.get("a").await.ok()?.status?.phase;
        let b = tokens.get("b").await.ok()?.status?.phase;
        (a == Some(Phase::Revoked) && b == Some(Phase::Expired)).then_some(())
    })
    .await;
    watch.abort();
    let plaintexts = seen.lock().unwrap().clone();
    assert!(plaintexts.len() >= 5, "saw {} tokens", plaintexts.len());
    assert_no_plaintext(&ns, &op.log_text(), &plaintexts).await;
    ns.cleanup().await;
}

#[tokio::test]
async fn sigkill_during_50_rotations_loses_nothing_and_never_rotates_twice() {
    install_crds().await;
    let ns = TestNamespace::new("crash").await;
    let mut op = Operator::start(&ns.name);
    let tokens: Api<ApiToken> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let (seen, watch) = collect_plaintexts(ns.api()).await;
    let names = ["c0", "c1", "c2", "c3", "c4"];
    for n in names {
        apply(&tokens, n, json!({"scopes": ["metrics:read"], "rotation": {"trigger": "0"}})).await;
    }
    let crash_seed: u64 =
        std::env::var("APITOKEN_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_128);
    println!("crash schedule seed {crash_seed} (set APITOKEN_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(crash_seed);
    let mut requested: BTreeMap<&str, u32> = BTreeMap::new();
    let mut kills = 0;
    for round in 1..=10u32 {
        for n in names {
            apply(
                &tokens,
                n,
                json!({"scopes": ["metrics:read"], "rotation": {"trigger": round.to_string()}}),
            )
            .await;
            *requested.entry(n).or_default() += 1;
            // Kill points land anywhere in the reconcile: between status and Secret writes too.
            if rng.random_bool(0.2) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
                op.kill();
                kills += 1;
                if rng.random_bool(0.5) {
                    // Triggers written while the operator is down may coalesce into one rotation.
                    continue;
                }
                op.restart();
            }
        }
        if op_is_down(&mut op) {
            op.restart();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
    }
    if op_is_down(&mut op) {
        op.restart();
    }
    println!("killed the operator {kills} times during {} trigger writes", requested.values().sum::<u32>());
    assert!(kills >= 5, "the schedule kills often enough to mean something");

    for n in names {
        let at = wait_for(&format!("{n} settled on trigger 10"), Duration::from_secs(60), || async {
            let at = tokens.get(n).await.ok()?;
            let s = at.status.as_ref()?;
            let t = secrets.get_opt(n).await.ok()??.data?.get("token")?.0.clone();
            let consistent =
                s.token_hash.as_deref() == Some(token::hash(std::str::from_utf8(&t).ok()?).as_str());
            (s.phase == Some(Phase::Active) && s.observed_trigger.as_deref() == Some("10") && consistent)
                .then_some(at)
        })
        .await;
        let count = at.status.unwrap().rotation_count;
        println!("{n}: {count} rotations for {} trigger changes", requested[n]);
        assert!(count >= 1 && count <= i64::from(requested[n]), "{n}: rotationCount {count}");
    }
    let managed = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=apitoken-operator"))
        .await
        .unwrap();
    let mut secret_names: Vec<_> = managed.items.iter().filter_map(|s| s.metadata.name.clone()).collect();
    secret_names.sort();
    assert_eq!(secret_names, names, "exactly one Secret per ApiToken");
    watch.abort();
    let plaintexts = seen.lock().unwrap().clone();
    assert_no_plaintext(&ns, &op.log_text(), &plaintexts).await;
    ns.cleanup().await;
}

fn op_is_down(op: &mut Operator) -> bool {
    !op.running()
}

#[test]
fn malformed_manifests_are_rejected_naming_the_field() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(install_crds());
    let ns = rt.block_on(TestNamespace::new("malformed"));
    let cases = [
        ("bad scope", json!({"scopes": ["Metrics read"]}), "spec.scopes[0]"),
        ("bad lifetime", json!({"lifetime": "90 days"}), "spec.lifetime"),
        (
            "renewBefore >= lifetime",
            json!({"lifetime": "30d", "rotation": {"renewBefore": "30d"}}),
            "spec.rotation.renewBefore",
        ),
        ("grace period over 24h", json!({"rotation": {"gracePeriod": "2d"}}), "spec.rotation.gracePeriod"),
        ("unknown field", json!({"scope": ["metrics:read"]}), "spec.scope"),
        ("reserved extra key", json!({"secret": {"extraKeys": {"token": "x"}}}), "spec.secret.extraKeys"),
        ("bad prefix", json!({"prefix": "Bad-Prefix"}), "spec.prefix"),
    ];
    for (what, spec, field) in cases {
        let manifest = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": "m", "namespace": ns.name}, "spec": spec});
        let mut child = support::kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(manifest.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{what}: {}", stderr.trim());
        assert!(!out.status.success(), "{what}: accepted");
        assert!(stderr.contains(field), "{what}: the error does not name {field}: {stderr}");
    }
    rt.block_on(ns.cleanup());
}
