//! Scopes: `resource[/name]:verb` (design §3), `*` allowed as verb.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub resource: String,
    pub name: Option<String>,
    pub verb: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a scope: expected resource[/name]:verb, e.g. metrics:read or pipeline/prod:write")]
pub struct ScopeError(pub String);

fn is_resource(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=253).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn is_verb(s: &str) -> bool {
    let b = s.as_bytes();
    s == "*"
        || ((1..=32).contains(&b.len())
            && b[0].is_ascii_lowercase()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-'))
}

impl std::str::FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let r = ScopeRef::parse(s)?;
        Ok(Scope { resource: r.resource.into(), name: r.name.map(Into::into), verb: r.verb.into() })
    }
}

/// A scope borrowed from its text: what verification matches with, allocating nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeRef<'a> {
    pub resource: &'a str,
    pub name: Option<&'a str>,
    pub verb: &'a str,
}

impl<'a> ScopeRef<'a> {
    /// Parses and checks `resource[/name]:verb`.
    pub fn parse(s: &'a str) -> Result<Self, ScopeError> {
        Self::split(s)
            .filter(|r| is_resource(r.resource) && r.name.is_none_or(is_name) && is_verb(r.verb))
            .ok_or_else(|| ScopeError(s.to_string()))
    }

    /// The parts of `resource[/name]:verb`, unchecked: for text that was checked when it was
    /// stored (the verification index's).
    pub fn split(s: &'a str) -> Option<Self> {
        // Byte searches: scopes are short, and this runs for every scope of every verification.
        let colon = s.bytes().rposition(|b| b == b':')?;
        let (target, verb) = (s.get(..colon)?, s.get(colon + 1..)?);
        let (resource, name) = match target.bytes().position(|b| b == b'/') {
            Some(slash) => (target.get(..slash)?, Some(target.get(slash + 1..)?)),
            None => (target, None),
        };
        Some(Self { resource, name, verb })
    }

    /// Does holding `self` satisfy a request for `wanted`? A scope without a name covers every
    /// name of its resource; verb `*` covers every verb.
    pub fn covers(&self, wanted: &ScopeRef<'_>) -> bool {
        self.resource == wanted.resource
            && (self.name.is_none() || self.name == wanted.name)
            && (self.verb == "*" || self.verb == wanted.verb)
    }
}

impl fmt::Display for ScopeRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(n) => write!(f, "{}/{}:{}", self.resource, n, self.verb),
            None => write!(f, "{}:{}", self.resource, self.verb),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.borrowed().fmt(f)
    }
}

impl Scope {
    pub fn borrowed(&self) -> ScopeRef<'_> {
        ScopeRef { resource: &self.resource, name: self.name.as_deref(), verb: &self.verb }
    }

    /// Does holding `self` satisfy a request for `wanted`? See [`ScopeRef::covers`].
    pub fn covers(&self, wanted: &Scope) -> bool {
        self.borrowed().covers(&wanted.borrowed())
    }
}

/// Parses, de-duplicates and sorts a list of scopes; every bad entry is reported.
pub fn parse_all(scopes: &[String]) -> Result<Vec<Scope>, Vec<ScopeError>> {
    let mut ok = Vec::with_capacity(scopes.len());
    let mut errors = Vec::new();
    for s in scopes {
        match s.parse() {
            Ok(scope) => ok.push(scope),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    ok.sort();
    ok.dedup();
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(x: &str) -> Scope {
        x.parse().unwrap()
    }

    #[test]
    fn grammar() {
        assert_eq!(s("metrics:read"), Scope { resource: "metrics".into(), name: None, verb: "read".into() });
        assert_eq!(s("pipeline/prod-east:write").name.as_deref(), Some("prod-east"));
        assert_eq!(s("pipeline:*").verb, "*");
        for bad in
            ["", "metrics", ":read", "metrics:", "Metrics:read", "a/b/c:read", "m:READ", "m/:read", "m:r w"]
        {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_verbs_and_resource_wide_scopes_cover() {
        assert!(s("pipeline:*").covers(&s("pipeline/prod:write")));
        assert!(s("pipeline:read").covers(&s("pipeline/prod:read")));
        assert!(!s("pipeline:read").covers(&s("pipeline/prod:write")));
        assert!(!s("pipeline/dev:*").covers(&s("pipeline/prod:read")));
        assert!(!s("metrics:read").covers(&s("pipeline:read")));
        assert!(!s("pipeline/prod:read").covers(&s("pipeline:read")), "a named scope is narrower");
    }

    #[test]
    fn parse_all_reports_every_bad_entry() {
        let errs = parse_all(&["metrics:read".into(), "bad".into(), "Also:bad".into()]).unwrap_err();
        assert_eq!(errs.len(), 2);
        let ok = parse_all(&["b:read".into(), "a:read".into(), "b:read".into()]).unwrap();
        assert_eq!(ok.iter().map(ToString::to_string).collect::<Vec<_>>(), ["a:read", "b:read"]);
    }

    proptest! {
        #[test]
        fn schema_pattern_and_parser_agree(x in "[a-zA-Z0-9/:*._ -]{0,20}") {
            let re = regex::Regex::new(crate::api::SCOPE_PATTERN).unwrap();
            prop_assert_eq!(re.is_match(&x), x.parse::<Scope>().is_ok(), "{}", x);
        }

        #[test]
        fn display_round_trips(x in "[a-z][a-z0-9-]{0,10}(/[A-Za-z0-9][A-Za-z0-9._-]{0,10})?:([a-z][a-z0-9-]{0,8}|[*])") {
            prop_assert_eq!(s(&x).to_string(), x);
        }
    }
}
