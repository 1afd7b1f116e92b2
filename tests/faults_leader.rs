//! Fault injection: the leader is SIGKILLed in the middle of a storm of rotations. The other
//! replica takes over within the lease duration; every trigger change yields exactly one rotation
//! (none twice, none lost), and every Secret ends up holding the token its status names.
//! Part of the fault suite (`make test-faults`, run three times by `make test`).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use apitoken_operator::api::{ApiToken, Phase};
use futures::future::join_all;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use support::operator::{Operator, install_crds, lease_holder};
use support::{TestNamespace, issued_token, wait_for};

const N: usize = 60;

/// What a token's status said before the storm.
#[derive(Debug)]
struct Before {
    hash: String,
    rotations: i64,
}

/// Sets the GitOps trigger; returns the object as the API server stored it.
async fn set_trigger(tokens: &Api<ApiToken>, name: &str, trigger: &str) -> ApiToken {
    let body = json!({"apiVersion": "apitoken.dev/v1alpha1", "kind": "ApiToken", "metadata": {"name": name},
        "spec": {"rotation": {"trigger": trigger}}});
    tokens.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&body)).await.unwrap()
}

/// Is the token's status caught up with `trigger` and Active again?
fn is_caught_up(t: &ApiToken, trigger: &str) -> bool {
    t.status
        .as_ref()
        .is_some_and(|s| s.observed_trigger.as_deref() == Some(trigger) && s.phase == Some(Phase::Active))
}

/// Tokens whose status has caught up with `trigger`.
async fn caught_up(tokens: &Api<ApiToken>, trigger: &str) -> usize {
    let list = tokens.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.iter().filter(|t| is_caught_up(t, trigger)).count()
}

/// Tokens whose status has caught up with the trigger that spec now asks for (a token that
/// still shows `storm-1` after the second wave asked for `storm-2` is not caught up).
async fn caught_up_with_spec(tokens: &Api<ApiToken>) -> usize {
    let list = tokens.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.iter()
        .filter(|t| t.spec.rotation.trigger.as_deref().is_some_and(|want| is_caught_up(t, want)))
        .count()
}

#[tokio::test]
async fn leader_killed_during_a_rotation_storm_loses_nothing_and_rotates_nothing_twice() {
    install_crds().await;
    let ns = TestNamespace::new("storm").await;
    let tokens: Api<ApiToken> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let leases: Api<Lease> = ns.api();
    let names: Vec<String> = (0..N).map(|i| format!("t{i:03}")).collect();

    let mut a = Operator::start_elected(&ns.name);
    let first = wait_for("a leader", Duration::from_secs(30), || lease_holder(&leases)).await;
    let mut b = Operator::start_elected(&ns.name);
    join_all(names.iter().map(|n| set_trigger(&tokens, n, "calm"))).await;
    for n in &names {
        issued_token(&tokens, &secrets, n, None).await;
    }
    let mut before = BTreeMap::new();
    for n in &names {
        let s = tokens.get(n).await.unwrap().status.unwrap();
        before.insert(n.clone(), Before { hash: s.token_hash.unwrap(), rotations: s.rotation_count });
    }

    // Storm: every token's trigger changes at once; the leader dies as soon as it has started.
    join_all(names.iter().map(|n| set_trigger(&tokens, n, "storm-1"))).await;
    wait_for("the leader to start rotating", Duration::from_secs(30), || async {
        (caught_up(&tokens, "storm-1").await > 0).then_some(())
    })
    .await;
    a.kill();
    let killed = Instant::now();
    let done_at_kill = caught_up(&tokens, "storm-1").await;
    println!("leader SIGKILLed with {done_at_kill}/{N} rotations done");

    // While nobody leads, half of the tokens get a second trigger change: it must not be lost.
    // Where the dead leader had not yet delivered a storm-1 token, the two changes rightly fold
    // into one rotation. The status returned with the patch and the Secret say which case each
    // token is in: a storm-1 rotation recorded in the status whose token never reached the Secret
    // is recovered by the next leader with one new token for both changes (one rotation), unless
    // the dead leader's Secret write was still in flight and lands after we look (two).
    let mut expected: BTreeMap<String, std::ops::RangeInclusive<i64>> =
        names.iter().map(|n| (n.clone(), 1..=1)).collect();
    let second_wave = join_all(names.iter().step_by(2).map(|n| set_trigger(&tokens, n, "storm-2"))).await;
    for at in second_wave {
        let status = at.status.unwrap_or_default();
        let rotated_first = status.observed_trigger.as_deref() == Some("storm-1");
        let delivered = match status.secret_name.as_deref() {
            Some(name) if rotated_first => secrets
                .get_opt(name)
                .await
                .unwrap()
                .and_then(|s| s.data?.get("token").map(|t| t.0.clone()))
                .and_then(|t| String::from_utf8(t).ok())
                .is_some_and(|t| Some(apitoken_operator::core::token::hash(&t)) == status.token_hash),
            _ => false,
        };
        let range = match (rotated_first, delivered) {
            (true, true) => 2..=2,
            (true, false) => 1..=2,
            (false, _) => 1..=1,
        };
        expected.insert(at.metadata.name.unwrap(), range);
    }
    let undelivered = expected.values().filter(|r| **r == (1..=2)).count();
    println!("second wave: {undelivered} tokens had a storm-1 rotation recorded but not yet delivered");

    let second = wait_for("a new leader", Duration::from_secs(25), || async {
        lease_holder(&leases).await.filter(|h| *h != first)
    })
    .await;
    let takeover = killed.elapsed();
    println!("takeover after SIGKILL: {takeover:?} (new leader {second})");
    assert!(takeover < Duration::from_secs(20), "takeover within the 15 s lease plus a retry: {takeover:?}");
    wait_for("every token to catch up with its trigger", Duration::from_secs(60), || async {
        (caught_up_with_spec(&tokens).await == N).then_some(())
    })
    .await;
    println!("storm settled {:?} after the kill", killed.elapsed());

    for n in &names {
        let token = issued_token(&tokens, &secrets, n, None).await;
        let s = tokens.get(n).await.unwrap().status.unwrap();
        let was = &before[n];
        let rotations = s.rotation_count - was.rotations;
        assert!(
            expected[n].contains(&rotations),
            "{n}: one rotation per delivered trigger change: {rotations}, expected {:?}",
            expected[n]
        );
        assert_ne!(s.token_hash.as_ref(), Some(&was.hash), "{n} rotated");
        if expected[n] == (1..=2) {
            println!("{n}: undelivered storm-1 rotation, then {rotations} rotation(s) in all");
        }
        if rotations == 1 {
            // Rotated exactly once: the outgoing token is the one from before the storm.
            assert_eq!(
                s.previous_token_hash.as_ref(),
                Some(&was.hash),
                "{n}: rotated once, from the original"
            );
        }
        assert_eq!(Some(apitoken_operator::core::token::hash(&token)), s.token_hash, "{n}: Secret holds it");
    }
    let managed = secrets.list(&ListParams::default().labels("apitoken.dev/name")).await.unwrap().items;
    assert_eq!(managed.len(), N, "one Secret per token, none orphaned");
    assert!(b.log_text().contains("became leader"));
    b.kill();
    ns.cleanup().await;
}
