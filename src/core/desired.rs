//! From the user's spec (strings) and the platform's limits to a validated [`Desired`], or every
//! problem at once, each naming the field and the limit.

use jiff::SignedDuration;

use super::lifetime::{Lifetime, format_duration, parse_duration, parse_lifetime};
use super::plan::Desired;
use super::scope;
use super::token::{DEFAULT_PREFIX, valid_prefix};

/// Limits that apply to a token (from policy; [`Limits::default`] without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub default_lifetime: SignedDuration,
    pub max_lifetime: SignedDuration,
    pub allow_never: bool,
    pub max_grace_period: SignedDuration,
    pub prefix: Option<String>,
    /// Who set these limits, for messages: "the defaults" or "ApiTokenPolicy a, b".
    pub origin: String,
}

impl Limits {
    /// Only the spec's own rules: for telling a policy violation from a malformed spec.
    pub fn permissive() -> Self {
        Self {
            max_lifetime: SignedDuration::MAX,
            allow_never: true,
            origin: "no limits".into(),
            ..Self::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_lifetime: SignedDuration::from_hours(90 * 24),
            max_lifetime: SignedDuration::from_hours(365 * 24),
            allow_never: false,
            max_grace_period: SignedDuration::from_hours(24),
            prefix: None,
            origin: "the defaults".into(),
        }
    }
}

/// The parts of an ApiToken spec the lifecycle depends on, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecInput<'a> {
    pub lifetime: Option<&'a str>,
    pub renew_before: Option<&'a str>,
    pub grace_period: Option<&'a str>,
    pub rotation_enabled: bool,
    pub trigger: Option<&'a str>,
    pub rotate_annotation: Option<&'a str>,
    pub revoked: bool,
    pub scopes: &'a [String],
    pub prefix: Option<&'a str>,
}

/// One reason a spec cannot be issued, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

pub const DEFAULT_GRACE_PERIOD: SignedDuration = SignedDuration::from_mins(10);
/// The longest a kubelet may take to put a rotated Secret into a pod's volume: its sync period
/// (1 min by default) plus its Secret cache's propagation (measured 8-11 s on the local node with a
/// 10 s sync period). A shorter grace period can cut off consumers that mount the Secret, so it
/// is reported (condition `SafeGracePeriod`); the default is five times this.
pub const SECRET_PROJECTION_BOUND: SignedDuration = SignedDuration::from_mins(2);

pub fn validate(spec: &SpecInput<'_>, limits: &Limits) -> Result<Desired, Vec<Violation>> {
    let mut v = Vec::new();
    let mut bad = |field, message: String| v.push(Violation { field, message });

    let lifetime = match spec.lifetime.map(parse_lifetime) {
        None => Lifetime::Finite(limits.default_lifetime),
        Some(Ok(Lifetime::Never)) if !limits.allow_never => {
            bad(
                "spec.lifetime",
                format!("'never' is not allowed by {}: it needs lifetime.allowNever: true", limits.origin),
            );
            Lifetime::Finite(limits.default_lifetime)
        }
        Some(Ok(Lifetime::Finite(d))) if d > limits.max_lifetime => {
            bad(
                "spec.lifetime",
                format!(
                    "{} exceeds the maximum lifetime {} set by {}",
                    format_duration(d),
                    format_duration(limits.max_lifetime),
                    limits.origin
                ),
            );
            Lifetime::Finite(limits.max_lifetime)
        }
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            bad("spec.lifetime", e.to_string());
            Lifetime::Finite(limits.default_lifetime)
        }
    };
    let renew_before = match spec.renew_before.map(parse_duration) {
        None => None,
        Some(Ok(d)) => {
            if let Lifetime::Finite(life) = lifetime
                && d >= life
            {
                bad(
                    "spec.rotation.renewBefore",
                    format!(
                        "{} must be shorter than the lifetime {}",
                        format_duration(d),
                        format_duration(life)
                    ),
                );
            }
            Some(d)
        }
        Some(Err(e)) => {
            bad("spec.rotation.renewBefore", e.to_string());
            None
        }
    };
    let grace_period = match spec.grace_period.map(parse_duration) {
        None => DEFAULT_GRACE_PERIOD.min(limits.max_grace_period),
        Some(Ok(d)) if d > limits.max_grace_period => {
            bad(
                "spec.rotation.gracePeriod",
                format!(
                    "{} exceeds the maximum grace period {} set by {}",
                    format_duration(d),
                    format_duration(limits.max_grace_period),
                    limits.origin
                ),
            );
            limits.max_grace_period
        }
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            bad("spec.rotation.gracePeriod", e.to_string());
            DEFAULT_GRACE_PERIOD
        }
    };
    let scopes = match scope::parse_all(spec.scopes) {
        Ok(s) => s.iter().map(ToString::to_string).collect(),
        Err(errors) => {
            for e in errors {
                bad("spec.scopes", e.to_string());
            }
            Vec::new()
        }
    };
    let prefix = spec.prefix.or(limits.prefix.as_deref()).unwrap_or(DEFAULT_PREFIX).to_string();
    if !valid_prefix(&prefix) {
        bad("spec.prefix", format!("'{prefix}' must match [a-z][a-z0-9_]{{1,15}}"));
    }
    if !v.is_empty() {
        return Err(v);
    }
    Ok(Desired {
        lifetime,
        renew_before,
        grace_period,
        rotation_enabled: spec.rotation_enabled,
        trigger: spec.trigger.map(Into::into),
        rotate_annotation: spec.rotate_annotation.map(Into::into),
        revoked: spec.revoked,
        scopes,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scopes: &[String]) -> SpecInput<'_> {
        SpecInput { rotation_enabled: true, scopes, ..SpecInput::default() }
    }

    #[test]
    fn defaults() {
        let d = validate(&spec(&[]), &Limits::default()).unwrap();
        assert_eq!(d.lifetime, Lifetime::Finite(SignedDuration::from_hours(2160)));
        assert_eq!(d.grace_period, SignedDuration::from_mins(10));
        assert_eq!(d.prefix, "apitok");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let scopes = vec!["bad".to_string(), "metrics:read".to_string()];
        let s = SpecInput {
            lifetime: Some("400d"),
            renew_before: Some("500d"),
            grace_period: Some("2d"),
            ..spec(&scopes)
        };
        let v = validate(&s, &Limits::default()).unwrap_err();
        let fields: Vec<_> = v.iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            ["spec.lifetime", "spec.rotation.renewBefore", "spec.rotation.gracePeriod", "spec.scopes"]
        );
        assert!(v[0].message.contains("365d"), "{}", v[0]);
    }

    #[test]
    fn never_needs_a_policy() {
        let s = SpecInput { lifetime: Some("never"), ..spec(&[]) };
        let v = validate(&s, &Limits::default()).unwrap_err();
        assert!(v[0].message.contains("allowNever"));
        let d = validate(&s, &Limits { allow_never: true, ..Limits::default() }).unwrap();
        assert_eq!(d.lifetime, Lifetime::Never);
    }
}
