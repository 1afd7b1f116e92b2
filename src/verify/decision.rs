//! The verification decision: a pure function of the request, the index entry and `now`.

use jiff::Timestamp;
use sha2::{Digest as _, Sha256};
use smallvec::SmallVec;

use super::index::{Digest, Entry};
use crate::core::scope::ScopeRef;
use crate::core::token::{self, ParseError};

/// Why a token is refused. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Malformed(ParseError),
    Unknown,
    Expired,
    Revoked,
    MissingScope(Vec<String>),
    AudienceMismatch,
}

impl Denial {
    /// Stable reason for bodies, headers and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Malformed(e) => e.reason(),
            Denial::Unknown => "unknown",
            Denial::Expired => "expired",
            Denial::Revoked => "revoked",
            Denial::MissingScope(_) => "missing_scope",
            Denial::AudienceMismatch => "audience_mismatch",
        }
    }

    /// 401 for an unusable token, 403 for a good token that lacks a permission.
    pub fn status(&self) -> u16 {
        match self {
            Denial::MissingScope(_) | Denial::AudienceMismatch => 403,
            _ => 401,
        }
    }

    /// A sentence for a person; safe to show (no token material).
    pub fn message(&self) -> String {
        match self {
            Denial::Malformed(e) => e.to_string(),
            Denial::Unknown => "token is not known (never issued, or rotated away)".into(),
            Denial::Expired => "token has expired".into(),
            Denial::Revoked => "token has been revoked".into(),
            Denial::MissingScope(s) => format!("token lacks scope(s): {}", s.join(" ")),
            Denial::AudienceMismatch => "token is not valid for the requested audience".into(),
        }
    }
}

/// What a verification asks.
pub struct Request<'a> {
    pub token: &'a str,
    pub scopes: &'a [ScopeRef<'a>],
    /// The audiences the caller speaks for (any one of them must be bound to the token, when the
    /// token is bound at all).
    pub audiences: &'a [&'a str],
}

/// A token accepted for a request: borrowed from the index entry and the request, so a
/// verification copies nothing (the caller holds the index's read lock meanwhile).
#[derive(Debug, Clone)]
pub struct Granted<'a> {
    pub entry: &'a Entry,
    /// The token's public id (from the token itself, so the previous token reports its own).
    pub token_id: &'a str,
    /// The requested audiences the token is bound to (empty for an unbound token).
    pub audiences: SmallVec<[&'a str; 2]>,
}

/// Checks the token offline (checksum) before any lookup, then against the index entry.
pub fn decide<'a>(
    req: &Request<'a>,
    lookup: impl FnOnce(&Digest) -> Option<&'a Entry>,
    now: Timestamp,
) -> Result<Granted<'a>, Denial> {
    let parsed = token::parse(req.token).map_err(Denial::Malformed)?;
    let digest: Digest = Sha256::digest(req.token.as_bytes()).into();
    let entry = lookup(&digest).ok_or(Denial::Unknown)?;
    if entry.meta.revoked {
        return Err(Denial::Revoked);
    }
    if entry.valid_until.is_some_and(|until| now >= until) {
        // A previous token past its grace period is as good as unknown to the caller, but
        // "expired" tells the operator of the client what happened.
        return Err(Denial::Expired);
    }
    let missing: Vec<String> = req
        .scopes
        .iter()
        .filter(|w| !entry.meta.scopes().any(|h| h.covers(w)))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(Denial::MissingScope(missing));
    }
    let audiences: SmallVec<_> =
        req.audiences.iter().copied().filter(|a| entry.meta.audiences().any(|x| x == *a)).collect();
    if entry.meta.audiences().len() > 0 && audiences.is_empty() {
        return Err(Denial::AudienceMismatch);
    }
    Ok(Granted { token_id: parsed.id, entry, audiences })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::index::TokenMeta;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::sync::Arc;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn entry(scopes: &[&str], audiences: &[&str], until: Option<i64>, revoked: bool) -> Entry {
        let scopes: Vec<crate::core::scope::Scope> = scopes.iter().map(|s| s.parse().unwrap()).collect();
        Entry {
            meta: Arc::new(TokenMeta::new(
                "ns",
                "n",
                &scopes,
                &audiences.iter().map(ToString::to_string).collect::<Vec<_>>(),
                revoked,
            )),
            valid_until: until.map(t),
            previous: false,
        }
    }

    fn tok(seed: u64) -> String {
        token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(seed)).plaintext.expose().to_string()
    }

    fn scopes<'a>(s: &[&'a str]) -> Vec<ScopeRef<'a>> {
        s.iter().map(|x| ScopeRef::parse(x).unwrap()).collect()
    }

    fn run(
        token: &str,
        want: &[&str],
        aud: Option<&str>,
        e: Option<&Entry>,
        now: i64,
    ) -> Result<String, Denial> {
        let want = scopes(want);
        let auds: Vec<&str> = aud.into_iter().collect();
        let req = Request { token, scopes: &want, audiences: &auds };
        let expected: Digest = Sha256::digest(token.as_bytes()).into();
        decide(&req, |d| e.filter(|_| *d == expected), t(now)).map(|g| g.token_id.to_string())
    }

    #[test]
    fn every_branch() {
        let k = tok(1);
        let good = entry(&["metrics:read", "pipeline:*"], &[], Some(100), false);
        let ok = run(&k, &["metrics:read", "pipeline/prod:write"], None, Some(&good), 0).unwrap();
        assert_eq!(ok, &k[7..15]);
        assert!(matches!(run("apitok_short", &[], None, Some(&good), 0), Err(Denial::Malformed(_))));
        let mut typo = k.clone().into_bytes();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(
            run(&typo, &[], None, Some(&good), 0).unwrap_err(),
            Denial::Malformed(ParseError::ChecksumMismatch)
        );
        assert_eq!(run(&k, &[], None, None, 0).unwrap_err(), Denial::Unknown);
        assert_eq!(run(&k, &[], None, Some(&good), 100).unwrap_err(), Denial::Expired, "at the second");
        assert!(run(&k, &[], None, Some(&good), 99).is_ok(), "one second before");
        assert_eq!(run(&k, &[], None, Some(&entry(&[], &[], None, true)), 0).unwrap_err(), Denial::Revoked);
        assert_eq!(
            run(&k, &["metrics:write", "metrics:read"], None, Some(&good), 0).unwrap_err(),
            Denial::MissingScope(vec!["metrics:write".into()])
        );
        let bound = entry(&[], &["tenant-a", "tenant-b"], None, false);
        assert!(run(&k, &[], Some("tenant-b"), Some(&bound), 0).is_ok());
        assert_eq!(run(&k, &[], Some("tenant-c"), Some(&bound), 0).unwrap_err(), Denial::AudienceMismatch);
        assert_eq!(run(&k, &[], None, Some(&bound), 0).unwrap_err(), Denial::AudienceMismatch);
        assert!(
            run(&k, &[], Some("anyone"), Some(&good), 0).is_ok(),
            "an unbound token accepts any audience"
        );
    }

    /// Verification time must not tell a guesser how much of a token is right. By construction
    /// it cannot: the index is keyed by SHA-256 of the whole token, so a guess that shares all
    /// but one character with a real token hashes to an unrelated digest, and no secret is
    /// compared character by character. This measures it: guesses one character off real
    /// tokens vs guesses sharing nothing, both with valid checksums (an attacker can compute
    /// those), interleaved in batches; the medians of the batch times must agree within 25%.
    /// Both classes do identical work, so the expected difference is zero; the tolerance only
    /// absorbs noise, and any shortcut for near misses (e.g. a prefix index) would exceed it.
    #[test]
    fn time_does_not_depend_on_how_much_of_a_guess_is_right() {
        use std::collections::HashMap;
        use std::time::Instant;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let real: Vec<String> =
            (0..2_000).map(|_| token::generate("apitok", &mut rng).plaintext.expose().to_string()).collect();
        let index: HashMap<Digest, Entry> = real
            .iter()
            .map(|t| (Sha256::digest(t.as_bytes()).into(), entry(&["a:read"], &[], None, false)))
            .collect();
        let near: Vec<String> = real
            .iter()
            .map(|t| {
                let unsigned = &t[..t.len() - token::CHECKSUM_LEN];
                let (head, last) = unsigned.split_at(unsigned.len() - 1);
                token::sign(format!("{head}{}", if last == "x" { "y" } else { "x" }))
            })
            .collect();
        let far: Vec<String> =
            (0..2_000).map(|_| token::generate("apitok", &mut rng).plaintext.expose().to_string()).collect();
        let batch = |guesses: &[String]| {
            let start = Instant::now();
            for g in guesses {
                let req = Request { token: g, scopes: &[], audiences: &[] };
                let r = decide(&req, |d| index.get(d), t(0));
                assert!(matches!(r, Err(Denial::Unknown)));
            }
            start.elapsed().as_secs_f64() * 1e9
        };
        let (mut near_ns, mut far_ns) = (Vec::new(), Vec::new());
        for round in 0..60 {
            for chunk in 0..4 {
                let r = chunk * 500..(chunk + 1) * 500;
                if round % 2 == 0 {
                    near_ns.push(batch(&near[r.clone()]));
                    far_ns.push(batch(&far[r]));
                } else {
                    far_ns.push(batch(&far[r.clone()]));
                    near_ns.push(batch(&near[r]));
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_unstable_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (n, f) = (median(&mut near_ns), median(&mut far_ns));
        let ratio = n / f;
        println!(
            "median per 500 guesses: one character off {n:.0} ns, nothing right {f:.0} ns, ratio {ratio:.3}"
        );
        assert!((0.75..=1.0 / 0.75).contains(&ratio), "timing depends on the guess: ratio {ratio:.3}");
    }

    #[test]
    fn codes_and_reasons() {
        assert_eq!((Denial::Unknown.status(), Denial::Unknown.reason()), (401, "unknown"));
        assert_eq!(Denial::MissingScope(vec![]).status(), 403);
        assert_eq!(Denial::AudienceMismatch.status(), 403);
        assert_eq!(Denial::Malformed(ParseError::ChecksumMismatch).reason(), "checksum_mismatch");
    }

    proptest! {
        #[test]
        fn never_accepts_past_valid_until_or_revoked(seed: u64, until in -50i64..50, now in -100i64..100, revoked: bool) {
            let k = tok(seed);
            let r = run(&k, &[], None, Some(&entry(&[], &[], Some(until), revoked)), now);
            prop_assert_eq!(r.is_ok(), !revoked && now < until);
        }

        #[test]
        fn granted_scopes_are_covered(want in proptest::sample::subsequence(vec!["a:read", "a:write", "b/x:read", "b/y:write", "c:del"], 0..5)) {
            let k = tok(9);
            let held = entry(&["a:*", "b/x:read"], &[], None, false);
            let r = run(&k, &want, None, Some(&held), 0);
            let all_covered = want.iter().all(|w| ["a:read", "a:write", "b/x:read"].contains(w));
            prop_assert_eq!(r.is_ok(), all_covered);
        }

        #[test]
        fn arbitrary_input_never_panics(s in ".{0,100}") {
            let _ = run(&s, &[], None, None, 0);
        }
    }
}
