//! The controller holds a whole ApiToken only from its watch event until a reconcile takes it.
//!
//! Whole cached objects, status and conditions included, were the largest part of the operator's
//! memory (about 2.7 KB a token, heaptrack at 10,000 tokens) and a reconcile reads them once. A
//! reconcile with nothing waiting here (a timed wake-up, a policy change, a Secret event, or an
//! event beyond [`MAX_WAITING`]) reads the object from the API server instead.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::seen::Versions;
use crate::api::ApiToken;
use crate::metrics::TokenKey as Key;

/// Whole objects held at most: what a start-up list or a burst of thousands of new tokens
/// brings at once is not held whole (about 1 KB each); past this many, a reconcile reads its own.
const MAX_WAITING: usize = 4096;

fn key_of(obj: &impl Resource) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

#[derive(Default)]
pub struct Arrivals {
    waiting: Mutex<Waiting>,
}

/// Tokens whose new version no reconcile has taken yet: with the object, or (past
/// [`MAX_WAITING`]) without.
#[derive(Default)]
struct Waiting {
    objects: HashMap<Key, ApiToken>,
    names: HashSet<Key>,
}

impl Arrivals {
    /// The object a watch event brought for `key`, if no reconcile has taken it yet and it was
    /// kept.
    pub fn take(&self, key: &Key) -> Option<ApiToken> {
        let mut w = self.waiting.lock().expect("arrivals lock");
        w.names.remove(key);
        w.objects.remove(key)
    }

    /// Keeps the object whole while there is room, else its name; copies only what it keeps.
    fn put(&self, obj: &ApiToken) {
        let key = key_of(obj);
        let mut w = self.waiting.lock().expect("arrivals lock");
        if w.objects.len() < MAX_WAITING || w.objects.contains_key(&key) {
            let mut obj = obj.clone();
            // Most of an object's size, and nothing in a reconcile reads them.
            obj.metadata.managed_fields = None;
            obj.annotations_mut().remove(LAST_APPLIED);
            w.objects.insert(key, obj);
        } else {
            w.names.insert(key);
        }
    }

    fn forget(&self, key: &Key) {
        let mut w = self.waiting.lock().expect("arrivals lock");
        w.names.remove(key);
        w.objects.remove(key);
    }

    /// Does a new version of `key` wait for a reconcile (none has taken it yet)?
    pub fn is_waiting(&self, key: &Key) -> bool {
        let w = self.waiting.lock().expect("arrivals lock");
        w.objects.contains_key(key) || w.names.contains(key)
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let w = self.waiting.lock().expect("arrivals lock");
        (w.objects.len(), w.names.len())
    }
}

/// What the controller takes from an ApiToken watch event.
#[derive(Debug, PartialEq, Eq)]
pub enum News {
    /// A version no reconcile has seen (its object waits in `arrivals`).
    Unseen(Key),
    /// A list is complete: every token is known.
    Listed,
}

/// An ApiToken watch event as news for the controller: an object a reconcile will want (a version
/// `seen` has not recorded) waits in `arrivals`; a deleted one's is dropped (its Secret is
/// cleanup's).
pub fn news(event: &watcher::Event<ApiToken>, arrivals: &Arrivals, seen: &Versions) -> Option<News> {
    match event {
        watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) if !seen.has_seen(obj) => {
            arrivals.put(obj);
            Some(News::Unseen(key_of(obj)))
        }
        watcher::Event::Delete(obj) => {
            arrivals.forget(&key_of(obj));
            None
        }
        watcher::Event::InitDone => Some(News::Listed),
        _ => None,
    }
}

/// kubectl's client-side-apply copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiTokenSpec;

    fn token(name: &str, rv: &str, trigger: &str) -> ApiToken {
        let mut t = ApiToken::new(name, ApiTokenSpec::default());
        t.metadata.namespace = Some("team".into());
        t.metadata.resource_version = Some(rv.into());
        t.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        t.spec.rotation.trigger = Some(trigger.into());
        t
    }

    fn key(name: &str) -> Key {
        ("team".into(), name.into())
    }

    #[test]
    fn unseen_versions_are_news_and_the_reconcile_gets_the_newest_object() {
        let (arrivals, seen) = (Arrivals::default(), Versions::default());
        seen.record_object(&token("a", "1", "one"));
        let events = [
            watcher::Event::Init,
            watcher::Event::InitApply(token("a", "1", "one")),
            watcher::Event::InitApply(token("b", "5", "one")),
            watcher::Event::InitDone,
            watcher::Event::Apply(token("b", "6", "two")),
            watcher::Event::Apply(token("c", "7", "one")),
            watcher::Event::Delete(token("c", "8", "one")),
        ];
        let news: Vec<_> = events.iter().filter_map(|e| news(e, &arrivals, &seen)).collect();
        assert_eq!(
            news,
            [News::Unseen(key("b")), News::Listed, News::Unseen(key("b")), News::Unseen(key("c"))],
            "a seen version is no news; a delete is cleanup's"
        );
        assert!(arrivals.take(&key("a")).is_none(), "a seen version is not kept for a reconcile");
        assert!(arrivals.is_waiting(&key("b")));
        let b = arrivals.take(&key("b")).expect("b waits for its reconcile");
        assert_eq!(b.spec.rotation.trigger.as_deref(), Some("two"), "the newest");
        assert!(b.metadata.labels.is_some(), "whole but for managedFields");
        assert!(arrivals.take(&key("b")).is_none(), "taken once");
        assert!(!arrivals.is_waiting(&key("b")), "taken: its second event starts no reconcile");
        assert!(!arrivals.is_waiting(&key("c")), "a deleted object's arrival is dropped");
        assert_eq!(arrivals.len(), (0, 0));
    }

    #[test]
    fn past_the_limit_a_new_version_is_named_without_its_object() {
        let (arrivals, seen) = (Arrivals::default(), Versions::default());
        let n = MAX_WAITING + 2;
        let unseen = (0..n)
            .filter_map(|i| {
                news(&watcher::Event::Apply(token(&format!("t{i}"), "1", "one")), &arrivals, &seen)
            })
            .filter(|n| matches!(n, News::Unseen(k) if arrivals.is_waiting(k)))
            .count();
        assert_eq!(unseen, n, "every new version still starts a reconcile");
        assert_eq!(arrivals.len(), (MAX_WAITING, 2));
        assert!(arrivals.take(&key("t0")).is_some(), "kept whole");
        let last = format!("t{}", n - 1);
        assert!(arrivals.take(&key(&last)).is_none(), "named only: read by its reconcile");
        assert!(!arrivals.is_waiting(&key(&last)), "taken");
    }
}
