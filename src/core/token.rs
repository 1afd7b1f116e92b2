//! Token anatomy (design §2): `<prefix>_<id><secret><checksum>`, base62 after the underscore.
//!
//! Pure: randomness comes in as an argument. The plaintext lives only in [`Plaintext`], whose
//! `Debug`/`Display` never show it and whose memory is wiped on drop.

use std::fmt;

use rand::{CryptoRng, Rng};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub const DEFAULT_PREFIX: &str = "apitok";
pub const ID_LEN: usize = 8;
pub const SECRET_LEN: usize = 40;
pub const CHECKSUM_LEN: usize = 6;
/// Characters after the underscore.
pub const BODY_LEN: usize = ID_LEN + SECRET_LEN + CHECKSUM_LEN;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Regular expression for secret scanners (gitleaks, GitHub custom patterns) matching tokens
/// with the default prefix. For another prefix use [`scanner_regex`].
pub const SCANNER_REGEX: &str = r"\bapitok_[0-9A-Za-z]{54}\b";

/// The scanner regular expression for tokens with `prefix`.
pub fn scanner_regex(prefix: &str) -> String {
    format!(r"\b{prefix}_[0-9A-Za-z]{{{BODY_LEN}}}\b")
}

/// Why a presented string is not a well-formed token. Never carries the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("token is empty")]
    Empty,
    #[error("token has no '_' separating prefix and body")]
    NoSeparator,
    #[error("token prefix is not [a-z][a-z0-9_]{{1,15}}")]
    BadPrefix,
    #[error("token body must be {BODY_LEN} base62 characters")]
    BadLength,
    #[error("token body has a character outside [0-9A-Za-z]")]
    BadCharacter,
    #[error("token checksum does not match (typo or truncation)")]
    ChecksumMismatch,
}

impl ParseError {
    /// Stable short reason for metrics and response bodies.
    pub fn reason(self) -> &'static str {
        match self {
            ParseError::ChecksumMismatch => "checksum_mismatch",
            _ => "malformed",
        }
    }
}

/// A token's plaintext. `Debug` and `Display` redact it; the buffer is zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Plaintext(Zeroizing<String>);

impl Plaintext {
    /// The plaintext, for writing into the Secret and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext(<redacted>)")
    }
}

impl fmt::Display for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A freshly generated token: the plaintext and the public facts derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub plaintext: Plaintext,
    pub id: String,
    pub display: String,
    pub hash: String,
}

/// The public parts of a well-formed token string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub prefix: &'a str,
    pub id: &'a str,
}

/// Is `prefix` a valid token prefix (`[a-z][a-z0-9_]{1,15}`)?
pub fn valid_prefix(prefix: &str) -> bool {
    let b = prefix.as_bytes();
    (2..=16).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// Generates a token with `prefix` from `rng` (the OS CSPRNG in production).
pub fn generate<R: Rng + CryptoRng + ?Sized>(prefix: &str, rng: &mut R) -> Token {
    debug_assert!(valid_prefix(prefix), "prefix is validated before generation");
    let mut s = String::with_capacity(prefix.len() + 1 + BODY_LEN);
    s.push_str(prefix);
    s.push('_');
    for _ in 0..ID_LEN + SECRET_LEN {
        s.push(char::from(BASE62[rng.random_range(0..BASE62.len())]));
    }
    let plaintext = Plaintext(Zeroizing::new(sign(s)));
    let id = plaintext.expose()[prefix.len() + 1..][..ID_LEN].to_string();
    Token { display: display(&plaintext), hash: hash(plaintext.expose()), id, plaintext }
}

/// `unsigned` (prefix, underscore, id and secret) with its checksum appended.
pub fn sign(mut unsigned: String) -> String {
    let sum = checksum(&unsigned);
    unsigned.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
    unsigned
}

/// CRC32 of `s`, base62, zero-padded to six characters (bytes: no allocation per verification).
fn checksum(s: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(s.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Parses and checks a presented token offline: shape, alphabet, checksum.
pub fn parse(token: &str) -> Result<Parsed<'_>, ParseError> {
    if token.is_empty() {
        return Err(ParseError::Empty);
    }
    // Base62 has no '_', so the last underscore ends the prefix even when the prefix has one.
    let (prefix, body) = token.rsplit_once('_').ok_or(ParseError::NoSeparator)?;
    if !valid_prefix(prefix) {
        return Err(ParseError::BadPrefix);
    }
    if body.len() != BODY_LEN {
        return Err(ParseError::BadLength);
    }
    // Every byte checked, without stopping at the first bad one: a loop the compiler vectorizes
    // (tokens are checked on every verification).
    if !body.bytes().fold(true, |ok, c| ok & c.is_ascii_alphanumeric()) {
        return Err(ParseError::BadCharacter);
    }
    let (signed, sum) = token.split_at(token.len() - CHECKSUM_LEN);
    if checksum(signed) != sum.as_bytes() {
        return Err(ParseError::ChecksumMismatch);
    }
    Ok(Parsed { prefix, id: &body[..ID_LEN] })
}

/// `sha256:<hex>` of the whole token string: the only form stored at rest.
pub fn hash(token: &str) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `<prefix>_<id>…<last 4>`: enough for a person to tell tokens apart, useless to an attacker.
pub fn display(token: &Plaintext) -> String {
    let s = token.expose();
    let (prefix, body) = s.rsplit_once('_').unwrap_or(("", s));
    let id = &body[..ID_LEN.min(body.len())];
    let last4 = &body[body.len().saturating_sub(4)..];
    format!("{prefix}_{id}…{last4}")
}

/// Rebuilds a [`Plaintext`] from a stored string (the Secret's `token` key), without checks.
pub fn plaintext_from_stored(s: &str) -> Plaintext {
    Plaintext(Zeroizing::new(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn gen_with(seed: u64, prefix: &str) -> Token {
        generate(prefix, &mut StdRng::seed_from_u64(seed))
    }

    #[test]
    fn anatomy_matches_the_design() {
        let t = gen_with(1, DEFAULT_PREFIX);
        let s = t.plaintext.expose();
        assert_eq!(s.len(), "apitok_".len() + 54);
        assert!(s.starts_with("apitok_"));
        assert_eq!(t.id, &s[7..15]);
        assert!(t.hash.starts_with("sha256:") && t.hash.len() == 71);
        assert_eq!(t.display, format!("apitok_{}…{}", &s[7..15], &s[s.len() - 4..]));
        assert_eq!(parse(s).unwrap(), Parsed { prefix: "apitok", id: &t.id });
    }

    #[test]
    fn debug_and_display_never_show_the_plaintext() {
        let t = gen_with(2, DEFAULT_PREFIX);
        let secret_part = &t.plaintext.expose()[15..55];
        for rendered in [format!("{t:?}"), format!("{}", t.plaintext), format!("{:?}", t.plaintext)] {
            assert!(!rendered.contains(secret_part), "{rendered}");
        }
    }

    #[test]
    fn checksum_is_zero_padded_base62() {
        assert_eq!(&checksum(""), b"000000"); // crc32("") == 0
        assert_eq!(checksum("a").len(), 6);
    }

    #[test]
    fn a_million_tokens_are_distinct() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::with_capacity(1_000_000);
        for _ in 0..1_000_000 {
            let t = generate(DEFAULT_PREFIX, &mut rng);
            assert!(seen.insert(t.hash), "duplicate token");
        }
    }

    #[test]
    fn scanner_regex_matches_tokens_and_no_other_vendor_shapes() {
        let re = regex::Regex::new(SCANNER_REGEX).unwrap();
        let custom = regex::Regex::new(&scanner_regex("acme_ci")).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..10_000 {
            let t = generate(DEFAULT_PREFIX, &mut rng);
            let line = format!("export API_TOKEN=\"{}\" # rotated", t.plaintext.expose());
            assert_eq!(re.find(&line).unwrap().as_str(), t.plaintext.expose());
            let c = generate("acme_ci", &mut rng);
            assert_eq!(custom.find(c.plaintext.expose()).unwrap().as_str(), c.plaintext.expose());
            assert!(!re.is_match(c.plaintext.expose()));
        }
        let b54 = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v2W3x4Y5z6Ab";
        assert_eq!(b54.len(), 54);
        let others = [
            "ghp_1234567890abcdefghijABCDEFGHIJ123456".to_string(),
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234".into(),
            "glpat-abcdefghij0123456789".into(),
            "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".into(),
            format!("sk_live_{b54}"),
            format!("rk_test_{b54}"),
            "AKIAIOSFODNN7EXAMPLE".into(),
            "npm_abcdefghijklmnopqrstuvwxyz0123456789".into(),
            format!("sk-proj-{b54}"),
            "pypi-AgEIcHlwaS5vcmcCJGFiY2RlZmdoLWlqa2wtbW5vcC1xcnN0LXV2d3h5ejAxMjM0".into(),
            format!("apitok-{b54}"),
            format!("apitok_{}", &b54[..53]),
            format!("apitok_{b54}X"),
            format!("xapitok_{b54}"),
            format!("APITOK_{b54}"),
            "dop_v1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            "hvs.CAESIJ0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJK".into(),
        ];
        for other in &others {
            assert!(!re.is_match(other), "matched {other}");
        }
    }

    proptest! {
        #[test]
        fn parse_round_trips(seed: u64, prefix in "[a-z][a-z0-9_]{1,15}") {
            let t = gen_with(seed, &prefix);
            let p = parse(t.plaintext.expose()).unwrap();
            prop_assert_eq!(p.prefix, prefix.as_str());
            prop_assert_eq!(p.id, t.id.as_str());
        }

        #[test]
        fn every_single_character_change_fails(seed: u64, pos in 0usize..61, c in proptest::char::any()) {
            let t = gen_with(seed, DEFAULT_PREFIX);
            let s = t.plaintext.expose();
            let pos = pos % s.len();
            prop_assume!(!s[pos..].starts_with(c));
            let mut changed: String = s[..pos].to_string();
            changed.push(c);
            changed.push_str(&s[pos + 1..]);
            prop_assert!(parse(&changed).is_err());
        }

        #[test]
        fn every_truncation_fails(seed: u64, keep in 0usize..61) {
            let t = gen_with(seed, DEFAULT_PREFIX);
            let s = t.plaintext.expose();
            prop_assert!(parse(&s[..keep.min(s.len() - 1)]).is_err());
            prop_assert!(parse(&s[s.len() - keep.min(s.len() - 1)..]).is_err());
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = parse(&s);
        }
    }

    #[test]
    fn single_character_changes_exhaustively_for_one_token() {
        let t = gen_with(11, DEFAULT_PREFIX);
        let s = t.plaintext.expose();
        for pos in 0..s.len() {
            for &c in BASE62.iter().chain(b"_-. ") {
                if s.as_bytes()[pos] == c {
                    continue;
                }
                let mut b = s.as_bytes().to_vec();
                b[pos] = c;
                let changed = String::from_utf8(b).unwrap();
                assert!(parse(&changed).is_err(), "accepted a change at {pos}");
            }
        }
    }
}
