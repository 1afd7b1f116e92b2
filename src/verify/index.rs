//! The in-memory index every verifier answers from: token hash → what verification needs.
//!
//! Fed by the replica's ApiToken watch (see [`follow`]); never touched by a request except to read.
//! Keeps only the facts verification uses, not whole objects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use arrayvec::ArrayString;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::watcher;
use smallvec::SmallVec;
use tracing::info;

use crate::api::{ApiToken, Phase};
use crate::core::scope::{Scope, ScopeRef};
use crate::token_feed::TokenFeed;

/// Raw SHA-256 of a token.
pub type Digest = [u8; 32];

/// Facts shared by a token's current and previous hash. Every string a verification reads is in
/// one string (scopes joined by spaces, name, namespace, audiences), kept in the record itself
/// when short, with the offsets that cut it: answering reads one allocation, and a token costs
/// little memory.
#[derive(Debug)]
pub struct TokenMeta {
    text: Text,
    /// Where the name, the namespace and the audiences start in `text` (the scopes come first).
    name_at: u32,
    namespace_at: u32,
    audiences_at: u32,
    /// How many scopes there are.
    scope_count: u32,
    /// Where each scope ends, then where each audience ends: a verification reads them by
    /// offset instead of searching `text` for separators.
    ends: SmallVec<[u32; 4]>,
    pub revoked: bool,
    /// When a use was last handed to the `lastUsedAt` writer (Unix seconds, 0: never).
    pub last_use_sent: AtomicI64,
}

/// Strings up to this long live in the record itself (with the `Arc`'s counts the record stays
/// within 160 bytes, what the record and its two separate allocations took before).
const INLINE_TEXT: usize = 72;

/// A token's strings: in the record when short (the usual case), so that a verification reads
/// one allocation; in the server every other allocation meant another cache and TLB miss.
#[derive(Debug, PartialEq, Eq)]
enum Text {
    Inline(ArrayString<INLINE_TEXT>),
    Heap(Box<str>),
}

impl Text {
    fn new(s: &str) -> Self {
        ArrayString::from(s).map_or_else(|_| Text::Heap(s.into()), Text::Inline)
    }

    fn as_str(&self) -> &str {
        match self {
            Text::Inline(s) => s,
            Text::Heap(s) => s,
        }
    }
}

fn offset(text: &str) -> u32 {
    offset_count(text.len())
}

fn offset_count(n: usize) -> u32 {
    // Kubernetes names, scopes and audiences: far below 4 GiB.
    u32::try_from(n).expect("token metadata under 4 GiB")
}

impl TokenMeta {
    pub fn new(namespace: &str, name: &str, scopes: &[Scope], audiences: &[String], revoked: bool) -> Self {
        use std::fmt::Write as _;
        let mut text = String::new();
        let mut ends = SmallVec::with_capacity(scopes.len() + audiences.len());
        for (i, scope) in scopes.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let _ = write!(text, "{sep}{scope}");
            ends.push(offset(&text));
        }
        let name_at = offset(&text);
        text.push_str(name);
        let namespace_at = offset(&text);
        text.push_str(namespace);
        let audiences_at = offset(&text);
        for a in audiences {
            text.push_str(a);
            ends.push(offset(&text));
        }
        Self {
            text: Text::new(&text),
            name_at,
            namespace_at,
            audiences_at,
            scope_count: offset_count(scopes.len()),
            ends,
            revoked,
            last_use_sent: AtomicI64::new(0),
        }
    }

    fn at(&self, from: u32, to: u32) -> &str {
        self.text.as_str().get(from as usize..to as usize).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.at(self.name_at, self.namespace_at)
    }

    pub fn namespace(&self) -> &str {
        self.at(self.namespace_at, self.audiences_at)
    }

    /// The scopes the token holds, joined by spaces (as forward-auth's `X-Token-Scopes`).
    pub fn scopes_joined(&self) -> &str {
        self.at(0, self.name_at)
    }

    /// Each scope's text.
    pub fn scope_texts(&self) -> impl ExactSizeIterator<Item = &str> {
        let (scope_ends, _) = self.ends.split_at_checked(self.scope_count as usize).unwrap_or_default();
        // Scopes are joined by one space.
        (0..scope_ends.len()).map(|i| {
            let from = if i == 0 { 0 } else { scope_ends[i - 1] + 1 };
            self.at(from, scope_ends[i])
        })
    }

    pub fn scopes(&self) -> impl Iterator<Item = ScopeRef<'_>> {
        self.scope_texts().filter_map(ScopeRef::split)
    }

    /// The audiences the token is bound to (none: valid for any audience).
    pub fn audiences(&self) -> impl ExactSizeIterator<Item = &str> {
        let (_, audience_ends) = self.ends.split_at_checked(self.scope_count as usize).unwrap_or_default();
        (0..audience_ends.len()).map(|i| {
            let from = if i == 0 { self.audiences_at } else { audience_ends[i - 1] };
            self.at(from, audience_ends[i])
        })
    }
}

impl PartialEq for TokenMeta {
    /// The token's facts; the `lastUsedAt` bookkeeping does not count.
    fn eq(&self, other: &Self) -> bool {
        (
            &self.text,
            self.name_at,
            self.namespace_at,
            self.audiences_at,
            self.scope_count,
            &self.ends,
            self.revoked,
        ) == (
            &other.text,
            other.name_at,
            other.namespace_at,
            other.audiences_at,
            other.scope_count,
            &other.ends,
            other.revoked,
        )
    }
}

impl Eq for TokenMeta {}

/// One valid (or recently valid) hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub meta: Arc<TokenMeta>,
    /// The hash is accepted strictly before this instant (`None`: never expires).
    pub valid_until: Option<Timestamp>,
    /// This is the previous token, inside its grace period.
    pub previous: bool,
}

/// Entries for one ApiToken, as derived from the object.
pub fn entries_of(at: &ApiToken) -> Vec<(Digest, Entry)> {
    let Some(status) = &at.status else { return Vec::new() };
    // Deleted (a finalizer of someone else's may keep the object a while): rejected at once.
    if at.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    if matches!(status.phase, Some(Phase::Denied)) {
        return Vec::new();
    }
    let scopes: Vec<Scope> = status.effective_scopes.iter().filter_map(|s| s.parse().ok()).collect();
    let meta = Arc::new(TokenMeta::new(
        at.metadata.namespace.as_deref().unwrap_or_default(),
        at.metadata.name.as_deref().unwrap_or_default(),
        &scopes,
        &at.spec.audiences,
        at.spec.revoked || status.phase == Some(Phase::Revoked),
    ));
    // Hashes reported leaked (`status.leaks`) are kept out by `Index::upsert`.
    let mut out = Vec::with_capacity(2);
    if let Some(d) = status.token_hash.as_deref().and_then(parse_digest) {
        let valid_until = status.expires_at.as_ref().map(|t| t.0);
        out.push((d, Entry { meta: meta.clone(), valid_until, previous: false }));
    }
    if let (Some(d), Some(until)) =
        (status.previous_token_hash.as_deref().and_then(parse_digest), status.previous_valid_until.as_ref())
    {
        out.push((d, Entry { meta, valid_until: Some(until.0), previous: true }));
    }
    out
}

/// `sha256:<64 hex>` → raw digest.
pub fn parse_digest(s: &str) -> Option<Digest> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Default)]
struct Inner {
    /// foldhash rather than SipHash: keys are SHA-256 digests of tokens we issued, so nobody can
    /// choose colliding keys, and every verification hashes one.
    by_hash: HashMap<Digest, Entry, foldhash::fast::RandomState>,
    /// namespace/name → its hashes and the list generation that last saw it.
    by_object: HashMap<(String, String), (Vec<Digest>, u64)>,
    generation: u64,
    /// Hashes this process saw reported leaked: kept out even if an older version of the
    /// object (one from before the leak was recorded) arrives from the watch afterwards. Grows
    /// only with real leaks (32 bytes each), so it is never pruned.
    leaked: std::collections::HashSet<Digest>,
}

/// The shared index. Cheap to clone.
#[derive(Clone, Default)]
pub struct Index {
    inner: Arc<RwLock<Inner>>,
    ready: Arc<AtomicBool>,
}

/// The index, read-locked: verifications look up and answer under it without copying an entry.
pub struct Reader<'a>(RwLockReadGuard<'a, Inner>);

impl Reader<'_> {
    pub fn get(&self, digest: &Digest) -> Option<&Entry> {
        self.0.by_hash.get(digest)
    }
}

impl Index {
    /// Hold it only to decide and write one answer: updates wait meanwhile.
    pub fn read(&self) -> Reader<'_> {
        Reader(self.inner.read().expect("index lock"))
    }

    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.read().get(digest).cloned()
    }

    /// Number of hashes held.
    pub fn len(&self) -> usize {
        self.inner.read().expect("index lock").by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ready once the first full list has been applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Inserts or replaces everything known about `at`.
    pub fn upsert(&self, at: &ApiToken) {
        let key = (at.namespace().unwrap_or_default(), at.name_any());
        let entries = entries_of(at);
        let mut inner = self.inner.write().expect("index lock");
        let generation = inner.generation;
        if let Some((old, _)) = inner.by_object.remove(&key) {
            for d in old {
                inner.by_hash.remove(&d);
            }
        }
        // Every replica remembers what any status ever recorded as leaked: a version of the
        // object from before the record, arriving late, cannot bring the hash back.
        if let Some(status) = &at.status {
            inner.leaked.extend(status.leaks.iter().filter_map(|l| parse_digest(&l.token_hash)));
        }
        let entries: Vec<_> = entries.into_iter().filter(|(d, _)| !inner.leaked.contains(d)).collect();
        let digests = entries.iter().map(|(d, _)| *d).collect();
        inner.by_hash.extend(entries);
        inner.by_object.insert(key, (digests, generation));
    }

    /// Rejects `digest` from now on (a leak report was recorded for it).
    pub fn reject_leaked(&self, digest: Digest) {
        let mut inner = self.inner.write().expect("index lock");
        inner.leaked.insert(digest);
        inner.by_hash.remove(&digest);
    }

    pub fn remove(&self, at: &ApiToken) {
        let key = (at.namespace().unwrap_or_default(), at.name_any());
        let mut inner = self.inner.write().expect("index lock");
        if let Some((old, _)) = inner.by_object.remove(&key) {
            for d in old {
                inner.by_hash.remove(&d);
            }
        }
    }

    /// Takes `tokens` as a complete list (what a watch's list gives): the index holds exactly
    /// them and is ready.
    pub fn apply_list<'a>(&self, tokens: impl IntoIterator<Item = &'a ApiToken>) {
        self.start_list();
        for at in tokens {
            self.upsert(at);
        }
        self.finish_list();
    }

    /// A (re-)list starts: objects not seen again before [`Index::finish_list`] are dropped.
    fn start_list(&self) {
        self.inner.write().expect("index lock").generation += 1;
    }

    fn finish_list(&self) {
        let mut inner = self.inner.write().expect("index lock");
        let current = inner.generation;
        let stale: Vec<_> =
            inner.by_object.iter().filter(|(_, (_, g))| *g != current).map(|(k, _)| k.clone()).collect();
        for key in stale {
            if let Some((digests, _)) = inner.by_object.remove(&key) {
                for d in digests {
                    inner.by_hash.remove(&d);
                }
            }
        }
        inner.by_hash.shrink_to_fit();
        drop(inner);
        self.ready.store(true, Ordering::Release);
    }
}

/// Keeps `index` in step with the ApiTokens of `feed`. The index keeps answering from what it has
/// while a list is in progress; the list's end sweeps out whatever disappeared.
pub fn follow(feed: &TokenFeed, index: Index) {
    feed.listen(move |event| {
        match event {
            watcher::Event::Init => index.start_list(),
            watcher::Event::InitApply(at) | watcher::Event::Apply(at) => index.upsert(at),
            watcher::Event::InitDone => {
                index.finish_list();
                info!(hashes = index.len(), "verification index synced");
            }
            watcher::Event::Delete(at) => index.remove(at),
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiTokenSpec, ApiTokenStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn token(name: &str, hash: &str, previous: Option<&str>) -> ApiToken {
        let mut at = ApiToken::new(name, ApiTokenSpec::default());
        at.metadata.namespace = Some("ns".into());
        at.status = Some(ApiTokenStatus {
            phase: Some(Phase::Active),
            token_hash: Some(hash.into()),
            previous_token_hash: previous.map(Into::into),
            previous_valid_until: previous.map(|_| Time(Timestamp::from_second(100).unwrap())),
            effective_scopes: vec!["metrics:read".into()],
            ..ApiTokenStatus::default()
        });
        at
    }

    fn h(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn a_record_with_its_arc_counts_stays_within_160_bytes() {
        assert!(std::mem::size_of::<TokenMeta>() + 16 <= 160, "{}", std::mem::size_of::<TokenMeta>());
    }

    #[test]
    fn short_and_long_strings_read_back_the_same() {
        let scopes: Vec<Scope> =
            vec!["metrics:read".parse().unwrap(), "pipeline/prod:write".parse().unwrap()];
        for name in ["n", &"x".repeat(200)] {
            let m = TokenMeta::new("team-a", name, &scopes, &["tenant-a".into(), "tenant-b".into()], false);
            assert_eq!(matches!(m.text, Text::Inline(_)), name.len() < 20, "where the strings live");
            assert_eq!((m.name(), m.namespace()), (name, "team-a"));
            assert_eq!(m.scopes_joined(), "metrics:read pipeline/prod:write");
            assert_eq!(m.scope_texts().collect::<Vec<_>>(), ["metrics:read", "pipeline/prod:write"]);
            assert_eq!(m.audiences().collect::<Vec<_>>(), ["tenant-a", "tenant-b"]);
        }
    }

    #[test]
    fn upsert_replaces_and_relist_drops_what_is_gone() {
        let index = Index::default();
        index.upsert(&token("a", &h(1), None));
        index.upsert(&token("b", &h(2), None));
        assert_eq!(index.len(), 2);
        // Rotation: the new status replaces the old hashes.
        index.upsert(&token("a", &h(3), Some(&h(1))));
        assert!(index.get(&parse_digest(&h(3)).unwrap()).is_some());
        assert!(index.get(&parse_digest(&h(1)).unwrap()).unwrap().previous);
        assert_eq!(index.len(), 3);
        // A re-list that no longer contains b.
        index.start_list();
        index.upsert(&token("a", &h(3), None));
        index.finish_list();
        assert_eq!(index.len(), 1);
        assert!(index.is_ready());
    }

    #[test]
    fn a_leaked_hash_is_never_served_again() {
        let index = Index::default();
        let mut at = token("a", &h(2), Some(&h(1)));
        index.upsert(&at);
        assert_eq!(index.len(), 2);
        // Recorded in the status: the previous (in its grace period) is out, the current stays.
        let leak = |hash: String| crate::api::LeakRecord {
            token_hash: hash,
            display: None,
            reported_at: Time(Timestamp::from_second(10).unwrap()),
            reporter: "github".into(),
            url: None,
        };
        at.status.as_mut().unwrap().leaks.push(leak(h(1)));
        index.upsert(&at);
        assert!(index.get(&parse_digest(&h(1)).unwrap()).is_none());
        assert!(index.get(&parse_digest(&h(2)).unwrap()).is_some());
        // An older version of the object (from before the record) arriving late: still out.
        index.upsert(&token("a", &h(2), Some(&h(1))));
        assert!(index.get(&parse_digest(&h(1)).unwrap()).is_none());
        // Rejected locally at once: an older version of the object from the watch (from before
        // the record) does not bring it back, nor does a re-list.
        index.reject_leaked(parse_digest(&h(2)).unwrap());
        assert!(index.is_empty());
        index.upsert(&token("a", &h(2), Some(&h(1))));
        assert!(index.get(&parse_digest(&h(2)).unwrap()).is_none());
        index.start_list();
        index.upsert(&token("a", &h(2), None));
        index.finish_list();
        assert!(index.is_empty());
    }

    #[test]
    fn a_token_being_deleted_is_not_served() {
        let index = Index::default();
        let mut at = token("a", &h(1), Some(&h(2)));
        index.upsert(&at);
        assert_eq!(index.len(), 2);
        at.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(50).unwrap()));
        index.upsert(&at);
        assert!(index.is_empty());
    }

    #[test]
    fn token_meta_keeps_every_string_apart() {
        let scopes: Vec<Scope> = vec!["metrics:read".parse().unwrap(), "pipeline/prod:*".parse().unwrap()];
        let auds = vec!["tenant-a".to_string(), "b".to_string()];
        let m = TokenMeta::new("team-a", "reader", &scopes, &auds, false);
        assert_eq!((m.namespace(), m.name()), ("team-a", "reader"));
        assert_eq!(m.scopes_joined(), "metrics:read pipeline/prod:*");
        assert_eq!(
            m.scopes().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["metrics:read", "pipeline/prod:*"]
        );
        assert_eq!(m.audiences().collect::<Vec<_>>(), ["tenant-a", "b"]);
        let bare = TokenMeta::new("ns", "n", &[], &[], true);
        assert_eq!((bare.scopes().count(), bare.audiences().len(), bare.name()), (0, 0, "n"));
    }

    #[test]
    fn digests_parse_strictly() {
        assert_eq!(parse_digest(&h(171)), Some([171u8; 32]));
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &h(1)[..70],
            "sha256:zz00000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(parse_digest(bad), None, "{bad}");
        }
    }
}
