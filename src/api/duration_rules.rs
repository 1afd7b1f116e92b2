//! Schema-side checks for durations written as `90d`, `12h30m`, `1w` or `never`.
//!
//! The API server's CEL `duration()` only knows Go units (no days or weeks), so the rules below
//! sum the parts of our own restricted grammar. The same grammar is parsed in Rust by
//! [`crate::core::lifetime`]; a unit test there keeps the two in agreement.

/// The duration grammar accepted by the schema: one or more `<digits><unit>` parts, unit one of
/// `s m h d w` (lower case, so `m` is always minutes).
pub const DURATION_PATTERN: &str = "^([0-9]{1,6}[smhdw]){1,5}$";
/// [`DURATION_PATTERN`] or the word `never`.
pub const LIFETIME_PATTERN: &str = "^(never|([0-9]{1,6}[smhdw]){1,5})$";
/// Longest duration string the schema accepts (it bounds the CEL cost estimate).
pub const DURATION_MAX_LEN: u32 = 40;

/// A CEL expression giving the number of seconds in the duration string at `path`.
pub fn cel_seconds(path: &str) -> String {
    format!(
        "{path}.findAll('[0-9]+[smhdw]').map(p, int(p.substring(0, p.size() - 1)) * \
         (p.endsWith('w') ? 604800 : p.endsWith('d') ? 86400 : p.endsWith('h') ? 3600 : \
         p.endsWith('m') ? 60 : 1)).sum()"
    )
}
