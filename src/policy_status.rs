//! The status of every ApiTokenPolicy (Ready, what it selects), written by the elected operator
//! only, and only when it changes: a policy that cannot be applied says so where people look
//! (`kubectl get apitokenpolicies`) instead of silently refusing tokens.

use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{debug, warn};

use crate::api::{ApiTokenPolicy, ApiTokenPolicyStatus};
use crate::policy_view::{PolicyReport, PolicyView};

/// A burst of changes (a re-list, many tokens applied at once) is written once.
const SETTLE: Duration = Duration::from_millis(300);
/// Also re-checked this often, to repair a status someone else overwrote.
const RECHECK: Duration = Duration::from_secs(60);

/// The status `r` calls for; the Ready condition keeps its transition time while it holds.
pub fn desired_status(r: &PolicyReport, now: Timestamp) -> ApiTokenPolicyStatus {
    let (status, reason, message) = match &r.problems {
        None => (
            "True",
            "Valid",
            format!(
                "in force in {} namespace{} with {} ApiToken{}",
                r.namespaces,
                if r.namespaces == 1 { "" } else { "s" },
                r.tokens,
                if r.tokens == 1 { "" } else { "s" }
            ),
        ),
        Some(p) => (
            "False",
            "InvalidPolicy",
            format!(
                "{p}; until this is fixed, new ApiTokens in the namespaces it selects (every namespace when its namespaceSelector is at fault) are refused"
            ),
        ),
    };
    let previous = r.current.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")).cloned();
    let since = match previous {
        Some(c) if c.status == status => c.last_transition_time,
        _ => Time(now),
    };
    ApiTokenPolicyStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: r.generation,
        }],
        selected_namespaces: r.namespaces,
        selected_tokens: r.tokens,
        observed_generation: r.generation,
    }
}

/// Writes the statuses that differ, then waits for the next change; until `shutdown`.
pub async fn run(client: Client, view: PolicyView, shutdown: impl Future<Output = ()> + Send) {
    let api: Api<ApiTokenPolicy> = Api::all(client);
    let mut touched = view.touched();
    let mut shutdown = std::pin::pin!(shutdown);
    view.ready().await;
    loop {
        touched.borrow_and_update();
        for r in view.report() {
            let status = desired_status(&r, Timestamp::now());
            if r.current.as_ref() == Some(&status) {
                continue;
            }
            let patch = Patch::Merge(json!({"status": status}));
            match api.patch_status(&r.name, &PatchParams::default(), &patch).await {
                Ok(_) => debug!(policy = r.name, "policy status written"),
                // Deleted meanwhile: nothing to write.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(policy = r.name, error = %e, "writing the ApiTokenPolicy status failed; retrying on the next change");
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            _ = touched.changed() => {},
            () = tokio::time::sleep(RECHECK) => {},
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(SETTLE) => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(problems: Option<&str>, current: Option<ApiTokenPolicyStatus>) -> PolicyReport {
        PolicyReport {
            name: "org".into(),
            generation: Some(3),
            problems: problems.map(Into::into),
            namespaces: 2,
            tokens: 1,
            current,
        }
    }

    #[test]
    fn ready_says_what_the_policy_selects_or_why_it_cannot_apply() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let s = desired_status(&report(None, None), t0);
        let c = &s.conditions[0];
        assert_eq!((c.type_.as_str(), c.status.as_str(), c.reason.as_str()), ("Ready", "True", "Valid"));
        assert_eq!(c.message, "in force in 2 namespaces with 1 ApiToken");
        assert_eq!((s.selected_namespaces, s.selected_tokens, s.observed_generation), (2, 1, Some(3)));
        // Unchanged: identical, so nothing is written; the transition time is kept.
        let later: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        assert_eq!(desired_status(&report(None, Some(s.clone())), later), s);
        let bad =
            desired_status(&report(Some("lifetime.max: '0d' must be longer than zero"), Some(s)), later);
        let c = &bad.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "InvalidPolicy"));
        assert!(
            c.message.starts_with("lifetime.max: '0d'")
                && c.message.contains("new ApiTokens in the namespaces it selects")
        );
        assert_eq!(c.last_transition_time, Time(later));
    }
}
