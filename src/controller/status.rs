//! Status: between the CRD's status and the core's [`Current`], and the conditions a person
//! reads. Pure.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ApiTokenStatus, LeakRecord, Phase as ApiPhase};
use crate::core::lifetime::{Lifetime, format_duration};
use crate::core::plan::{self, Current, Desired, Phase};

pub fn phase_to_core(p: Option<ApiPhase>) -> Phase {
    match p.unwrap_or_default() {
        ApiPhase::Pending => Phase::Pending,
        ApiPhase::Active => Phase::Active,
        ApiPhase::Expired => Phase::Expired,
        ApiPhase::Revoked => Phase::Revoked,
        ApiPhase::Denied => Phase::Denied,
        ApiPhase::Failed => Phase::Failed,
    }
}

pub fn phase_to_api(p: Phase) -> ApiPhase {
    match p {
        Phase::Pending => ApiPhase::Pending,
        Phase::Active => ApiPhase::Active,
        Phase::Expired => ApiPhase::Expired,
        Phase::Revoked => ApiPhase::Revoked,
        Phase::Denied => ApiPhase::Denied,
        Phase::Failed => ApiPhase::Failed,
    }
}

fn ts(t: Option<&Time>) -> Option<Timestamp> {
    t.map(|t| t.0)
}

pub fn to_current(s: &ApiTokenStatus) -> Current {
    Current {
        phase: phase_to_core(s.phase),
        token_hash: s.token_hash.clone(),
        token_id: s.token_id.clone(),
        display: s.display.clone(),
        previous_token_hash: s.previous_token_hash.clone(),
        previous_valid_until: ts(s.previous_valid_until.as_ref()),
        issued_at: ts(s.issued_at.as_ref()),
        expires_at: ts(s.expires_at.as_ref()),
        renew_at: ts(s.renew_at.as_ref()),
        rotation_count: s.rotation_count,
        observed_trigger: s.observed_trigger.clone(),
        observed_rotate_annotation: s.observed_rotate_annotation.clone(),
        effective_scopes: s.effective_scopes.clone(),
        leaked: s.leaks.iter().map(|l| l.token_hash.clone()).collect(),
    }
}

/// Writes `c` into a copy of `old`, keeping the fields the lifecycle does not own.
pub fn from_current(old: &ApiTokenStatus, c: &Current) -> ApiTokenStatus {
    ApiTokenStatus {
        phase: Some(phase_to_api(c.phase)),
        token_id: c.token_id.clone(),
        display: c.display.clone(),
        token_hash: c.token_hash.clone(),
        previous_token_hash: c.previous_token_hash.clone(),
        previous_valid_until: c.previous_valid_until.map(Time),
        issued_at: c.issued_at.map(Time),
        expires_at: c.expires_at.map(Time),
        renew_at: c.renew_at.map(Time),
        rotation_count: c.rotation_count,
        observed_trigger: c.observed_trigger.clone(),
        observed_rotate_annotation: c.observed_rotate_annotation.clone(),
        effective_scopes: c.effective_scopes.clone(),
        scope_summary: scope_summary(&c.effective_scopes),
        ..old.clone()
    }
}

/// How many scopes the SCOPES column names before "+N more".
const SUMMARY_SCOPES: usize = 3;

/// `effectiveScopes` for the SCOPES column: `a:read, b:write +2 more`.
pub fn scope_summary(scopes: &[String]) -> Option<String> {
    if scopes.is_empty() {
        return None;
    }
    let shown = scopes.iter().take(SUMMARY_SCOPES).map(String::as_str).collect::<Vec<_>>().join(", ");
    let rest = scopes.len().saturating_sub(SUMMARY_SCOPES);
    Some(if rest == 0 { shown } else { format!("{shown} +{rest} more") })
}

/// Ready reason: the API server refused the Secret's content (labels, annotations, keys); nothing
/// is retried until the ApiToken changes.
pub const SECRET_INVALID: &str = "SecretInvalid";
/// Ready reason: writing the Secret failed for another reason (quota, RBAC, API server); retried.
pub const SECRET_WRITE_FAILED: &str = "SecretWriteFailed";

/// One condition as the operator wants it now.
pub struct Want {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The Ready, Issued, PolicyCompliant, ExpiryHandled and SafeGracePeriod conditions for state `c`
/// at `now`.
/// Every condition is True when all is well, so "any condition False" means "look at it".
pub fn conditions(
    d: Option<&Desired>,
    c: &Current,
    now: Timestamp,
    failure: Option<(&'static str, String)>,
    noncompliance: Option<&str>,
) -> Vec<Want> {
    let denied = failure.as_ref().filter(|(reason, _)| *reason == "PolicyViolation").map(|(_, m)| m.clone());
    let display = c.display.as_deref().unwrap_or("the token");
    let expires = c.expires_at.map_or_else(|| "never expires".to_string(), |e| format!("expires at {e}"));
    let ready = match (failure, c.phase) {
        (Some((reason, message)), _) => Want { type_: "Ready", ok: false, reason, message },
        (None, Phase::Failed) if c.current_leaked() => Want {
            type_: "Ready",
            ok: false,
            reason: COMPROMISED,
            message: format!("{display} was reported leaked and is rejected; rotation is disabled, so no new token was issued: change rotation.trigger or set the apitoken.dev/rotate annotation to issue one"),
        },
        (None, Phase::Active) => Want {
            type_: "Ready",
            ok: true,
            reason: "TokenActive",
            message: format!("{display} is in Secret and valid; it {expires}"),
        },
        (None, Phase::Expired) => Want {
            type_: "Ready",
            ok: false,
            reason: "Expired",
            message: format!("{display} expired and rotation is disabled; set rotation.enabled: true or change rotation.trigger to issue a new token"),
        },
        (None, Phase::Revoked) => Want {
            type_: "Ready",
            ok: false,
            reason: "Revoked",
            message: "spec.revoked is true: the token is rejected and its Secret removed; set it to false to issue a new token".into(),
        },
        (None, _) => Want { type_: "Ready", ok: false, reason: "Pending", message: "waiting for the token to be issued".into() },
    };
    // A failure after issuance (Secret conflict or write refused) leaves the issued token valid.
    let issued = if c.token_hash.is_some() && matches!(c.phase, Phase::Active | Phase::Failed) {
        let how = if c.rotation_count > 0 {
            format!("rotated {} time(s)", c.rotation_count)
        } else {
            "issued".into()
        };
        Want {
            type_: "Issued",
            ok: true,
            reason: if c.rotation_count > 0 { "Rotated" } else { "Issued" },
            message: format!(
                "{display} {how}, current one at {}",
                c.issued_at.map(|t| t.to_string()).unwrap_or_default()
            ),
        }
    } else {
        Want { type_: "Issued", ok: false, reason: "NotIssued", message: "no valid token is issued".into() }
    };
    let compliant = match (denied, noncompliance) {
        (Some(m), _) => Want { type_: "PolicyCompliant", ok: false, reason: "PolicyViolation", message: m },
        (None, Some(m)) => Want {
            type_: "PolicyCompliant",
            ok: false,
            reason: "PolicyViolation",
            message: format!(
                "{m}. The current token stays valid until it {expires}; it is not rotated (a rotation you ask for is refused) until the ApiToken complies"
            ),
        },
        (None, None) => Want {
            type_: "PolicyCompliant",
            ok: true,
            reason: "Compliant",
            message: "satisfies every ApiTokenPolicy selecting this namespace (or the defaults)".into(),
        },
    };
    let expiring_at = d.zip(c.expires_at).and_then(|(d, e)| plan::expiring_from(d, e));
    let rotation_off = d.is_some_and(|d| !d.rotation_enabled && d.lifetime != Lifetime::Never);
    let expiry = match expiring_at {
        Some(from) if c.phase == Phase::Active && rotation_off && now >= from => Want {
            type_: "ExpiryHandled",
            ok: false,
            reason: "RotationDisabled",
            message: format!(
                "{display} {expires} and rotation is disabled; enable rotation or change rotation.trigger"
            ),
        },
        _ if rotation_off => Want {
            type_: "ExpiryHandled",
            ok: true,
            reason: "NotDue",
            message: "rotation is disabled; the token is not yet within renewBefore of its expiry".into(),
        },
        _ => Want {
            type_: "ExpiryHandled",
            ok: true,
            reason: "RotatedBeforeExpiry",
            message: "rotated automatically before it expires, or it never expires".into(),
        },
    };
    vec![ready, issued, compliant, expiry, safe_grace_period(d)]
}

/// Reason and condition type for a leaked token.
pub const COMPROMISED: &str = "Compromised";

/// `Compromised=True` once a token of this ApiToken was reported leaked (absent before): the
/// one condition whose True means "look at it". Says which token, where it was found and by
/// whom; never the token.
pub fn compromised(leaks: &[LeakRecord]) -> Option<Want> {
    let last = leaks.last()?;
    let display = last.display.as_deref().unwrap_or("a token");
    let found = last.url.as_deref().map(|u| format!(" (found at {u})")).unwrap_or_default();
    let earlier = match leaks.len() - 1 {
        0 => String::new(),
        n => format!("; {n} earlier leak(s) recorded in status.leaks"),
    };
    Some(Want {
        type_: COMPROMISED,
        ok: true,
        reason: "LeakReported",
        message: format!(
            "{display} was reported leaked by {} at {}{found}; every verifier rejects it for good{earlier}",
            last.reporter, last.reported_at.0
        ),
    })
}

/// SafeGracePeriod: does the overlap outlast a kubelet's refresh of a mounted Secret?
fn safe_grace_period(d: Option<&Desired>) -> Want {
    let grace = d.map(|d| d.grace_period);
    let bound = crate::core::desired::SECRET_PROJECTION_BOUND;
    match grace {
        Some(g) if g < bound => Want {
            type_: "SafeGracePeriod",
            ok: false,
            reason: "ShorterThanSecretProjection",
            message: format!(
                "rotation.gracePeriod {} is shorter than the {} a kubelet may take to update a mounted Secret: consumers that mount it can be cut off at a rotation; use at least {} unless every consumer re-reads the token another way",
                format_duration(g),
                format_duration(bound),
                format_duration(bound)
            ),
        },
        _ => Want {
            type_: "SafeGracePeriod",
            ok: true,
            reason: "CoversSecretProjection",
            message: format!(
                "the previous token stays valid longer than the {} a kubelet may take to update a mounted Secret",
                format_duration(bound)
            ),
        },
    }
}

/// Merges wanted conditions into existing ones, keeping `lastTransitionTime` when the status
/// did not change.
pub fn merge_conditions(
    old: &[Condition],
    want: Vec<Want>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    want.into_iter()
        .map(|w| {
            let status = if w.ok { "True" } else { "False" };
            let since = old.iter().find(|c| c.type_ == w.type_ && c.status == status).map_or_else(
                || Time(Timestamp::from_second(now.as_second()).expect("in range")),
                |c| c.last_transition_time.clone(),
            );
            Condition {
                type_: w.type_.into(),
                status: status.into(),
                reason: w.reason.into(),
                message: w.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::desired::{Limits, SpecInput, validate};

    fn grace_condition(grace: &str) -> Want {
        let spec = SpecInput { grace_period: Some(grace), ..SpecInput::default() };
        let d = validate(&spec, &Limits::default()).unwrap();
        let c = Current { phase: Phase::Active, ..Current::default() };
        conditions(Some(&d), &c, Timestamp::UNIX_EPOCH, None, None)
            .into_iter()
            .find(|w| w.type_ == "SafeGracePeriod")
            .unwrap()
    }

    #[test]
    fn a_grace_period_shorter_than_a_kubelet_sync_is_reported() {
        let short = grace_condition("30s");
        assert!(!short.ok && short.reason == "ShorterThanSecretProjection", "{}", short.message);
        assert!(short.message.contains("30s") && short.message.contains("2m"), "{}", short.message);
        assert!(grace_condition("2m").ok);
        assert!(grace_condition("10m").ok);
    }

    #[test]
    fn scope_summary_names_the_first_three() {
        let scopes: Vec<String> = ["a:read", "b:read", "c:read", "d:read"].map(String::from).to_vec();
        assert_eq!(scope_summary(&scopes).unwrap(), "a:read, b:read, c:read +1 more");
        assert_eq!(scope_summary(&scopes[..1]).unwrap(), "a:read");
        assert_eq!(scope_summary(&[]), None);
    }
}
