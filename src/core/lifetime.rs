//! Durations as users write them (`90d`, `12h30m`, `1w`) and lifetimes (a duration or `never`).
//!
//! The accepted grammar is the schema's ([`crate::api::duration_rules`]); values are computed by
//! humantime. A test checks that the CEL sum in the schema agrees with humantime.

use jiff::SignedDuration;

/// How long a token lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    Finite(SignedDuration),
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("'{0}' is not a duration: use digits followed by s, m, h, d or w, e.g. 90d or 12h30m")]
    Syntax(String),
    #[error("'{0}' must be longer than zero")]
    Zero(String),
}

/// Does `s` follow the schema's grammar: one to five `<1-6 digits><s|m|h|d|w>` parts?
fn follows_grammar(s: &str) -> bool {
    let mut parts = 0;
    let mut digits = 0;
    for c in s.bytes() {
        match c {
            b'0'..=b'9' => digits += 1,
            b's' | b'm' | b'h' | b'd' | b'w' if (1..=6).contains(&digits) => {
                parts += 1;
                digits = 0;
            }
            _ => return false,
        }
    }
    digits == 0 && (1..=5).contains(&parts)
}

/// Parses a positive duration such as `90d`, `12h30m` or `1w`.
pub fn parse_duration(s: &str) -> Result<SignedDuration, DurationError> {
    if !follows_grammar(s) {
        return Err(DurationError::Syntax(s.to_string()));
    }
    let std = humantime::parse_duration(s).map_err(|_| DurationError::Syntax(s.to_string()))?;
    let d = SignedDuration::try_from(std).map_err(|_| DurationError::Syntax(s.to_string()))?;
    if d.is_zero() {
        return Err(DurationError::Zero(s.to_string()));
    }
    Ok(d)
}

/// Parses a lifetime: a duration or `never`.
pub fn parse_lifetime(s: &str) -> Result<Lifetime, DurationError> {
    if s == "never" { Ok(Lifetime::Never) } else { parse_duration(s).map(Lifetime::Finite) }
}

/// Formats a duration the way users write them (`90d`, `1h30m`), for messages.
pub fn format_duration(d: SignedDuration) -> String {
    use std::fmt::Write;
    let mut secs = d.as_secs().max(0);
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= n {
            let _ = write!(out, "{}{unit}", secs / n);
            secs %= n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn common_lifetimes() {
        assert_eq!(parse_lifetime("90d"), Ok(Lifetime::Finite(SignedDuration::from_hours(90 * 24))));
        assert_eq!(parse_lifetime("1w2d"), Ok(Lifetime::Finite(SignedDuration::from_hours(9 * 24))));
        assert_eq!(parse_lifetime("12h30m"), Ok(Lifetime::Finite(SignedDuration::from_mins(750))));
        assert_eq!(parse_lifetime("20s"), Ok(Lifetime::Finite(SignedDuration::from_secs(20))));
        assert_eq!(parse_lifetime("never"), Ok(Lifetime::Never));
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        for bad in ["", "90", "d", "90 days", "1M", "1y", "-5d", "5.5h", "1h 30m", "0s", "NEVER", "1234567d"]
        {
            let err = parse_lifetime(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn formats_back() {
        assert_eq!(format_duration(SignedDuration::from_hours(90 * 24)), "90d");
        assert_eq!(format_duration(SignedDuration::from_secs(3_723)), "1h2m3s");
    }

    /// Mirrors the CEL expression of `api::duration_rules::cel_seconds`.
    fn cel_seconds(s: &str) -> i64 {
        let mut total = 0;
        let mut n = 0i64;
        for c in s.bytes() {
            if c.is_ascii_digit() {
                n = n * 10 + i64::from(c - b'0');
            } else {
                total += n * match c {
                    b'w' => 604_800,
                    b'd' => 86_400,
                    b'h' => 3_600,
                    b'm' => 60,
                    _ => 1,
                };
                n = 0;
            }
        }
        total
    }

    proptest! {
        #[test]
        fn schema_grammar_and_humantime_agree(s in "([0-9]{1,6}[smhdw]){1,5}") {
            let regex = regex::Regex::new(crate::api::duration_rules::DURATION_PATTERN).unwrap();
            prop_assert!(regex.is_match(&s));
            match parse_duration(&s) {
                Ok(d) => prop_assert_eq!(d.as_secs(), cel_seconds(&s)),
                Err(DurationError::Zero(_)) => prop_assert_eq!(cel_seconds(&s), 0),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn outside_the_grammar_is_rejected(s in ".{0,12}") {
            let regex = regex::Regex::new(crate::api::duration_rules::DURATION_PATTERN).unwrap();
            prop_assert_eq!(regex.is_match(&s), follows_grammar(&s));
        }
    }
}
