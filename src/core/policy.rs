//! Policy evaluation (design §6), pure: the policies selecting a token's namespace combine as
//! "all must allow". Gives the validated [`Desired`] (effective scopes, limits applied) or every
//! violation at once, each naming the field and the limit.

use std::collections::{BTreeMap, BTreeSet};

use jiff::SignedDuration;

use super::desired::{Limits, SpecInput, Violation, validate};
use super::lifetime::{format_duration, parse_duration};
use super::plan::Desired;
use super::scope::Scope;

/// One ApiTokenPolicy, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub allowed_scopes: Option<Vec<String>>,
    pub permission_sets: BTreeMap<String, Vec<String>>,
    pub default_lifetime: Option<SignedDuration>,
    pub max_lifetime: Option<SignedDuration>,
    pub allow_never: bool,
    pub per_namespace: Option<u32>,
    pub per_creator: Option<u32>,
    pub per_label: Option<LabelQuota>,
    pub max_grace_period: Option<SignedDuration>,
    pub prefix: Option<String>,
    pub require_audiences: bool,
}

/// At most `max` active tokens per value of the label `label` on the ApiToken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelQuota {
    pub label: String,
    pub max: u32,
}

/// Raw policy fields as written (strings), for [`Policy::parse`].
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    pub name: &'a str,
    pub allowed_scopes: Option<&'a [String]>,
    pub permission_sets: &'a BTreeMap<String, Vec<String>>,
    pub default_lifetime: Option<&'a str>,
    pub max_lifetime: Option<&'a str>,
    pub allow_never: bool,
    pub per_namespace: Option<u32>,
    pub per_creator: Option<u32>,
    /// `(label key, max)` of `maxActiveTokens.perLabel`.
    pub per_label: Option<(&'a str, u32)>,
    pub max_grace_period: Option<&'a str>,
    pub prefix: Option<&'a str>,
    pub require_audiences: bool,
}

impl Policy {
    /// Parses a policy; every problem is reported (in one message naming the policy and each
    /// field), never ignored: a policy nobody can read refuses the tokens it selects.
    pub fn parse(p: &PolicyInput<'_>) -> Result<Self, String> {
        let problems = check(p);
        if !problems.is_empty() {
            return Err(format!("ApiTokenPolicy {}: {}", p.name, problems.join("; ")));
        }
        let dur = |v: Option<&str>| v.and_then(|v| parse_duration(v).ok());
        Ok(Self {
            name: p.name.to_string(),
            allowed_scopes: p.allowed_scopes.map(<[String]>::to_vec),
            permission_sets: p.permission_sets.clone(),
            default_lifetime: dur(p.default_lifetime),
            max_lifetime: dur(p.max_lifetime),
            allow_never: p.allow_never,
            per_namespace: p.per_namespace,
            per_creator: p.per_creator,
            per_label: p.per_label.map(|(label, max)| LabelQuota { label: label.into(), max }),
            max_grace_period: dur(p.max_grace_period),
            prefix: p.prefix.map(Into::into),
            require_audiences: p.require_audiences,
        })
    }
}

/// Every problem of a policy as written, each `field: what is wrong`, in field order. The
/// schema refuses most of these already; this also covers policies stored before it did.
pub fn check(p: &PolicyInput<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let mut dur = |field: &str, v: Option<&str>| match v.map(parse_duration) {
        Some(Err(e)) => {
            out.push(format!("{field}: {e}"));
            None
        }
        d => d.and_then(Result::ok),
    };
    let default = dur("lifetime.default", p.default_lifetime);
    let max = dur("lifetime.max", p.max_lifetime);
    dur("rotation.maxGracePeriod", p.max_grace_period);
    if let (Some(d), Some(m)) = (default, max)
        && d > m
    {
        out.push(format!(
            "lifetime.default: {} is longer than lifetime.max {}",
            format_duration(d),
            format_duration(m)
        ));
    }
    for (set, scopes) in p.permission_sets {
        if !is_dns_subdomain(set) {
            out.push(format!(
                "permissionSets: '{set}' is not a valid name (lower-case letters, digits, '-' and '.', as tokens name it in spec.permissionSets)"
            ));
        }
        for s in scopes {
            if let Err(e) = s.parse::<Scope>() {
                out.push(format!("permissionSets.{set}: {e}"));
            }
        }
    }
    if let Some((label, _)) = p.per_label
        && !is_label_key(label)
    {
        out.push(format!(
            "maxActiveTokens.perLabel.label: '{label}' is not a label key (e.g. team or example.com/team)"
        ));
    }
    out
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A Kubernetes object name (what `spec.permissionSets` of a token accepts).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label name, or label value when `allow_empty` (at most 63 characters of `[A-Za-z0-9-_.]`,
/// alphanumeric at both ends).
pub fn is_label_name(s: &str, allow_empty: bool) -> bool {
    let b = s.as_bytes();
    if b.is_empty() {
        return allow_empty;
    }
    b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name, false),
        None => is_label_name(s, false),
    }
}

/// Active tokens already counted against a policy's quotas (excluding the one evaluated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub in_namespace: u32,
    pub by_creator: u32,
    /// For `perLabel`: the token's value of the label and the active tokens sharing it; `None`
    /// when the policy has no such quota or the token does not carry the label.
    pub by_label: Option<(String, u32)>,
}

/// What the token asks for besides the lifecycle fields in [`SpecInput`].
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    pub spec: SpecInput<'a>,
    pub permission_sets: &'a [String],
    pub audiences: &'a [String],
    pub creator: Option<&'a str>,
    /// Quotas apply (a new token, or one becoming active again); not for edits of an active one.
    pub counts_against_quota: bool,
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

fn names(policies: &[Policy]) -> String {
    let n: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    format!("ApiTokenPolicy {}", n.join(", "))
}

/// The tightest limits of all `policies` (the defaults when there are none).
pub fn combine(policies: &[Policy]) -> Result<Limits, Vec<Violation>> {
    let mut l = Limits::default();
    if policies.is_empty() {
        return Ok(l);
    }
    l.origin = names(policies);
    l.allow_never = policies.iter().all(|p| p.allow_never);
    if let Some(max) = policies.iter().filter_map(|p| p.max_lifetime).min() {
        l.max_lifetime = max;
    }
    if let Some(d) = policies.iter().filter_map(|p| p.default_lifetime).min() {
        l.default_lifetime = d;
    }
    l.default_lifetime = l.default_lifetime.min(l.max_lifetime);
    if let Some(g) = policies.iter().filter_map(|p| p.max_grace_period).min() {
        l.max_grace_period = g;
    }
    let prefixes: BTreeSet<&str> = policies.iter().filter_map(|p| p.prefix.as_deref()).collect();
    if prefixes.len() > 1 {
        return Err(vec![Violation {
            field: "spec.prefix",
            message: format!(
                "{} require different prefixes ({}); fix the policies",
                names(policies),
                prefixes.into_iter().collect::<Vec<_>>().join(", ")
            ),
        }]);
    }
    l.prefix = prefixes.into_iter().next().map(Into::into);
    Ok(l)
}

/// Evaluates a token against every policy selecting its namespace (`counts[i]` belongs to
/// `policies[i]`). On success the [`Desired`] carries the effective scopes.
pub fn evaluate(ask: &Ask<'_>, policies: &[Policy], counts: &[Counts]) -> Result<Desired, Vec<Violation>> {
    let mut v = Vec::new();
    let limits = match combine(policies) {
        Ok(l) => l,
        Err(mut e) => {
            v.append(&mut e);
            Limits::default()
        }
    };
    // Permission sets expand into scopes; each must be defined by some selecting policy.
    for set in ask.permission_sets {
        if !policies.iter().any(|p| p.permission_sets.contains_key(set)) {
            v.push(Violation {
                field: "spec.permissionSets",
                message: format!("'{set}' is not defined by any ApiTokenPolicy for this namespace"),
            });
        }
    }
    let scopes = effective_scopes(ask.spec.scopes, ask.permission_sets, policies);
    if let Some(p) = policies.iter().find(|p| p.prefix.is_some())
        && let (Some(asked), Some(required)) = (ask.spec.prefix, p.prefix.as_deref())
        && asked != required
    {
        v.push(Violation {
            field: "spec.prefix",
            message: format!("must be '{required}' (ApiTokenPolicy {})", p.name),
        });
    }
    let spec = SpecInput { scopes: &scopes, ..ask.spec.clone() };
    let desired = validate(&spec, &limits);
    let desired = match desired {
        Ok(d) => Some(d),
        Err(mut e) => {
            v.append(&mut e);
            None
        }
    };
    // Scopes outside allowedScopes, per policy (checked even when other fields are wrong, so
    // that one message lists everything).
    let mut asked: Vec<&str> = scopes.iter().map(String::as_str).collect();
    asked.sort_unstable();
    asked.dedup();
    for p in policies {
        let Some(allowed) = &p.allowed_scopes else { continue };
        let outside: Vec<&str> =
            asked.iter().copied().filter(|s| !allowed.iter().any(|g| glob(g, s))).collect();
        if !outside.is_empty() {
            v.push(Violation {
                field: "spec.scopes",
                message: format!(
                    "{} outside allowedScopes [{}] of ApiTokenPolicy {}",
                    outside.join(", "),
                    allowed.join(", "),
                    p.name
                ),
            });
        }
    }
    for p in policies.iter().filter(|p| p.require_audiences) {
        if ask.audiences.is_empty() {
            v.push(Violation {
                field: "spec.audiences",
                message: format!("at least one audience is required by ApiTokenPolicy {}", p.name),
            });
        }
    }
    if ask.counts_against_quota {
        for (p, c) in policies.iter().zip(counts) {
            if let Some(max) = p.per_namespace
                && c.in_namespace >= max
            {
                v.push(Violation {
                    field: "maxActiveTokens.perNamespace",
                    message: format!("this namespace already has {} active tokens, the limit of ApiTokenPolicy {} is {max}; revoke or delete one first", c.in_namespace, p.name),
                });
            }
            if let Some(max) = p.per_creator
                && c.by_creator >= max
            {
                v.push(Violation {
                    field: "maxActiveTokens.perCreator",
                    message: format!("{} already holds {} active tokens, the limit of ApiTokenPolicy {} is {max}; revoke or delete one first", ask.creator.unwrap_or("the creator"), c.by_creator, p.name),
                });
            }
            if let (Some(q), Some((value, n))) = (&p.per_label, &c.by_label)
                && *n >= q.max
            {
                v.push(Violation {
                    field: "maxActiveTokens.perLabel",
                    message: format!("{n} active tokens already carry the label {}={value}, the limit of ApiTokenPolicy {} is {}; revoke or delete one first", q.label, p.name, q.max),
                });
            }
        }
    }
    match desired {
        Some(d) if v.is_empty() => Ok(d),
        _ => Err(v),
    }
}

/// The token's scopes plus those of its permission sets (as the selecting policies define them),
/// sorted, without duplicates.
pub fn effective_scopes(scopes: &[String], sets: &[String], policies: &[Policy]) -> Vec<String> {
    let mut out: Vec<String> = scopes.to_vec();
    for set in sets {
        for p in policies {
            if let Some(s) = p.permission_sets.get(set) {
                out.extend(s.iter().cloned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// One sentence listing every violation (what `kubectl apply` prints and the condition says).
pub fn describe(violations: &[Violation]) -> String {
    violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// A short form of a duration for messages.
pub fn show(d: SignedDuration) -> String {
    format_duration(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lifetime::Lifetime;
    use proptest::prelude::*;

    fn policy(name: &str) -> Policy {
        Policy { name: name.into(), ..Policy::default() }
    }

    fn ask<'a>(scopes: &'a [String], lifetime: Option<&'a str>) -> Ask<'a> {
        Ask {
            spec: SpecInput { rotation_enabled: true, scopes, lifetime, ..SpecInput::default() },
            counts_against_quota: true,
            ..Ask::default()
        }
    }

    #[test]
    fn glob_matching() {
        assert!(glob("metrics:*", "metrics:read"));
        assert!(glob("pipeline/*:read", "pipeline/prod:read"));
        assert!(!glob("pipeline/*:read", "pipeline:read"));
        assert!(glob("*", "anything:at-all"));
        assert!(!glob("metrics:read", "metrics:*"), "a wildcard scope is not inside a narrower pattern");
        assert!(glob("metrics:*", "metrics:*"));
    }

    #[test]
    fn no_policy_means_the_defaults() {
        let s = vec!["metrics:read".to_string()];
        let d = evaluate(&ask(&s, None), &[], &[]).unwrap();
        assert_eq!(d.lifetime, Lifetime::Finite(SignedDuration::from_hours(90 * 24)));
    }

    #[test]
    fn violations_name_field_and_limit_and_two_policies_combine() {
        let mut a = policy("org");
        a.max_lifetime = Some(SignedDuration::from_hours(30 * 24));
        a.allowed_scopes = Some(vec!["metrics:*".into(), "logs:read".into()]);
        let mut b = policy("team");
        b.max_lifetime = Some(SignedDuration::from_hours(60 * 24));
        b.require_audiences = true;
        b.per_creator = Some(5);
        let s = vec!["metrics:read".to_string(), "pipeline:write".to_string()];
        let counts = [Counts::default(), Counts { in_namespace: 9, by_creator: 5, ..Counts::default() }];
        let v = evaluate(&ask(&s, Some("45d")), &[a.clone(), b.clone()], &counts).unwrap_err();
        let text = describe(&v);
        assert!(
            text.contains(
                "spec.lifetime: 45d exceeds the maximum lifetime 30d set by ApiTokenPolicy org, team"
            ),
            "{text}"
        );
        assert!(text.contains("spec.scopes: pipeline:write outside allowedScopes [metrics:*, logs:read] of ApiTokenPolicy org"), "{text}");
        assert!(
            text.contains("spec.audiences: at least one audience is required by ApiTokenPolicy team"),
            "{text}"
        );
        assert!(text.contains("maxActiveTokens.perCreator"), "{text}");
        // Without quota counting (an edit of an active token) the quota is not re-checked.
        let mut edit = ask(&s, Some("45d"));
        edit.counts_against_quota = false;
        assert!(!describe(&evaluate(&edit, &[a, b], &counts).unwrap_err()).contains("perCreator"));
    }

    #[test]
    fn permission_sets_expand_and_must_exist() {
        let mut p = policy("sets");
        p.permission_sets.insert("read-only".into(), vec!["metrics:read".into(), "logs:read".into()]);
        let sets = vec!["read-only".to_string()];
        let mut a = ask(&[], None);
        a.permission_sets = &sets;
        let d = evaluate(&a, std::slice::from_ref(&p), &[Counts::default()]).unwrap();
        assert_eq!(d.scopes, ["logs:read", "metrics:read"]);
        let unknown = vec!["full".to_string()];
        a.permission_sets = &unknown;
        assert!(
            describe(&evaluate(&a, &[p], &[Counts::default()]).unwrap_err())
                .contains("'full' is not defined")
        );
    }

    #[test]
    fn never_needs_every_policy_to_allow_it() {
        let mut a = policy("a");
        a.allow_never = true;
        let b = policy("b");
        let v = evaluate(&ask(&[], Some("never")), &[a.clone(), b], &[Counts::default(), Counts::default()])
            .unwrap_err();
        assert!(describe(&v).contains("lifetime.allowNever"));
        assert!(evaluate(&ask(&[], Some("never")), &[a], &[Counts::default()]).is_ok());
    }

    fn input<'a>(name: &'a str, sets: &'a BTreeMap<String, Vec<String>>) -> PolicyInput<'a> {
        PolicyInput {
            name,
            allowed_scopes: None,
            permission_sets: sets,
            default_lifetime: None,
            max_lifetime: None,
            allow_never: false,
            per_namespace: None,
            per_creator: None,
            per_label: None,
            max_grace_period: None,
            prefix: None,
            require_audiences: false,
        }
    }

    #[test]
    fn a_policy_that_cannot_work_is_refused_with_every_reason() {
        let mut sets = BTreeMap::new();
        sets.insert("Read Only".to_string(), vec!["metrics:read".to_string(), "metrics".to_string()]);
        let mut p = input("org", &sets);
        p.max_lifetime = Some("0d");
        p.default_lifetime = Some("30d");
        p.max_grace_period = Some("1y");
        p.per_label = Some(("-team", 3));
        let err = Policy::parse(&p).unwrap_err();
        for part in [
            "ApiTokenPolicy org: ",
            "lifetime.max: '0d' must be longer than zero",
            "rotation.maxGracePeriod: '1y' is not a duration",
            "permissionSets: 'Read Only' is not a valid name",
            "permissionSets.Read Only: 'metrics' is not a scope",
            "maxActiveTokens.perLabel.label: '-team' is not a label key",
        ] {
            assert!(err.contains(part), "{part} in {err}");
        }
        let sets = BTreeMap::new();
        let mut p = input("org", &sets);
        p.default_lifetime = Some("90d");
        p.max_lifetime = Some("30d");
        assert_eq!(
            Policy::parse(&p).unwrap_err(),
            "ApiTokenPolicy org: lifetime.default: 90d is longer than lifetime.max 30d"
        );
        p.default_lifetime = Some("30d");
        p.per_label = Some(("example.com/team", 3));
        let ok = Policy::parse(&p).unwrap();
        assert_eq!(ok.max_lifetime, Some(SignedDuration::from_hours(30 * 24)));
        assert_eq!(ok.per_label, Some(LabelQuota { label: "example.com/team".into(), max: 3 }));
    }

    #[test]
    fn label_key_and_name_grammar() {
        for good in ["team", "app.kubernetes.io/instance", "a", "A_b.c-9"] {
            assert!(is_label_key(good), "{good}");
        }
        for bad in ["", "-a", "a-", "Example.com/x", "a/b/c", "x/", "/x", &"a".repeat(64)] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_name("", true) && !is_label_name("", false));
        assert!(is_dns_subdomain("read-only") && !is_dns_subdomain("Read-only"));
    }

    #[test]
    fn the_per_label_quota_counts_per_value_and_ignores_unlabelled_tokens() {
        let mut p = policy("gitops");
        p.per_label = Some(LabelQuota { label: "team".into(), max: 2 });
        let s = vec!["metrics:read".to_string()];
        let full = Counts { by_label: Some(("payments".into(), 2)), ..Counts::default() };
        let text = describe(
            &evaluate(&ask(&s, None), std::slice::from_ref(&p), std::slice::from_ref(&full)).unwrap_err(),
        );
        assert_eq!(
            text,
            "maxActiveTokens.perLabel: 2 active tokens already carry the label team=payments, the limit of ApiTokenPolicy gitops is 2; revoke or delete one first"
        );
        let room = Counts { by_label: Some(("search".into(), 1)), ..Counts::default() };
        assert!(evaluate(&ask(&s, None), std::slice::from_ref(&p), &[room]).is_ok());
        // Not labelled: this quota does not count it.
        assert!(evaluate(&ask(&s, None), std::slice::from_ref(&p), &[Counts::default()]).is_ok());
        // An edit of an active token is not re-counted.
        let mut edit = ask(&s, None);
        edit.counts_against_quota = false;
        assert!(evaluate(&edit, &[p], &[full]).is_ok());
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            proptest::option::of(proptest::sample::subsequence(
                vec!["metrics:*", "logs:read", "pipeline/*:write", "*"],
                0..4,
            )),
            proptest::option::of(1i64..400),
            any::<bool>(),
        )
            .prop_map(|(allowed, max_days, never)| Policy {
                name: "p".into(),
                allowed_scopes: allowed.map(|a| a.into_iter().map(Into::into).collect()),
                max_lifetime: max_days.map(|d| SignedDuration::from_hours(d * 24)),
                allow_never: never,
                ..Policy::default()
            })
    }

    proptest! {
        #[test]
        fn allowed_results_respect_every_policy(
            policies in proptest::collection::vec(arb_policy(), 0..4),
            scopes in proptest::sample::subsequence(vec!["metrics:read", "logs:read", "pipeline/prod:write", "pipeline:write", "admin:*"], 0..5),
            days in proptest::option::of(1i64..500),
        ) {
            let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
            let lifetime = days.map(|d| format!("{d}d"));
            let counts = vec![Counts::default(); policies.len()];
            if let Ok(d) = evaluate(&ask(&scopes, lifetime.as_deref()), &policies, &counts) {
                for p in &policies {
                    if let Some(allowed) = &p.allowed_scopes {
                        prop_assert!(d.scopes.iter().all(|s| allowed.iter().any(|g| glob(g, s))));
                    }
                    if let (Some(max), Lifetime::Finite(l)) = (p.max_lifetime, d.lifetime) {
                        prop_assert!(l <= max);
                    }
                    if d.lifetime == Lifetime::Never {
                        prop_assert!(p.allow_never);
                    }
                }
            }
        }
    }
}
