//! The controller's cache names every ApiToken (name and namespace) and holds a whole object only
//! from its watch event until a reconcile takes it.
//!
//! Whole cached objects, status and conditions included, were the largest part of the operator's
//! memory (about 2.7 KB a token, heaptrack at 10,000 tokens) and a reconcile reads them once. A
//! reconcile with nothing waiting here (a timed wake-up, a policy change, a Secret event, or an
//! event beyond [`MAX_WAITING`]) reads the object from the API server instead.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use kube::api::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::seen::Versions;
use crate::api::ApiToken;

type Key = (String, String);

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
    /// The object a watch event brought for `namespace/name`, if no reconcile has taken it yet
    /// and it was kept.
    pub fn take(&self, namespace: &str, name: &str) -> Option<ApiToken> {
        let key = (namespace.to_string(), name.to_string());
        let mut w = self.waiting.lock().expect("arrivals lock");
        w.names.remove(&key);
        w.objects.remove(&key)
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

    fn forget(&self, obj: &impl Resource) {
        let key = key_of(obj);
        let mut w = self.waiting.lock().expect("arrivals lock");
        w.names.remove(&key);
        w.objects.remove(&key);
    }

    fn is_waiting(&self, obj: &impl Resource) -> bool {
        let key = key_of(obj);
        let w = self.waiting.lock().expect("arrivals lock");
        w.objects.contains_key(&key) || w.names.contains(&key)
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let w = self.waiting.lock().expect("arrivals lock");
        (w.objects.len(), w.names.len())
    }
}

/// What the cache keeps of an ApiToken.
fn name_of(obj: &ApiToken) -> PartialObjectMeta<ApiToken> {
    let m = obj.meta();
    let metadata =
        ObjectMeta { name: m.name.clone(), namespace: m.namespace.clone(), ..ObjectMeta::default() };
    PartialObjectMeta { types: None, metadata, _phantom: PhantomData }
}

/// An ApiToken watch event as names for the cache; an object a reconcile will want (a version
/// `seen` has not recorded) waits in `arrivals`, a deleted one's is dropped.
pub fn name_event(
    event: &watcher::Event<ApiToken>,
    arrivals: &Arrivals,
    seen: &Versions,
) -> watcher::Event<PartialObjectMeta<ApiToken>> {
    match event {
        watcher::Event::Apply(obj) => watcher::Event::Apply(keep(obj, arrivals, seen)),
        watcher::Event::InitApply(obj) => watcher::Event::InitApply(keep(obj, arrivals, seen)),
        watcher::Event::Delete(obj) => {
            arrivals.forget(obj);
            watcher::Event::Delete(name_of(obj))
        }
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The events that start a reconcile: an object waiting in `arrivals` (unless a reconcile running
/// already took it), a deletion.
pub fn waiting_only<S>(events: S, arrivals: std::sync::Arc<Arrivals>) -> impl Stream<Item = S::Item> + Send
where
    S: Stream<Item = Result<watcher::Event<PartialObjectMeta<ApiToken>>, watcher::Error>> + Send,
{
    events.filter(move |event| {
        let keep = match event {
            Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) => arrivals.is_waiting(m),
            _ => true,
        };
        std::future::ready(keep)
    })
}

/// kubectl's client-side-apply copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn keep(obj: &ApiToken, arrivals: &Arrivals, seen: &Versions) -> PartialObjectMeta<ApiToken> {
    if !seen.has_seen(obj) {
        arrivals.put(obj);
    }
    name_of(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiTokenSpec;
    use std::sync::Arc;

    fn token(name: &str, rv: &str, trigger: &str) -> ApiToken {
        let mut t = ApiToken::new(name, ApiTokenSpec::default());
        t.metadata.namespace = Some("team".into());
        t.metadata.resource_version = Some(rv.into());
        t.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        t.spec.rotation.trigger = Some(trigger.into());
        t
    }

    #[tokio::test]
    async fn the_cache_gets_names_and_the_reconcile_the_newest_unseen_object() {
        let (arrivals, seen) = (Arc::new(Arrivals::default()), Arc::new(Versions::default()));
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
        let out: Vec<_> = events.iter().map(|e| name_event(e, &arrivals, &seen)).collect();
        let again = futures::stream::iter(out.clone().into_iter().map(Ok));
        let triggers: Vec<_> = waiting_only(again, arrivals.clone()).map(Result::unwrap).collect().await;
        let triggered = |e: &watcher::Event<PartialObjectMeta<ApiToken>>| match e {
            watcher::Event::Apply(m) | watcher::Event::InitApply(m) => Some(m.name_any()),
            _ => None,
        };
        // "b" twice: both of its events find its (newest) object waiting; "c" is gone by then.
        assert_eq!(triggers.iter().filter_map(triggered).collect::<Vec<_>>(), ["b", "b"]);
        let names: Vec<String> = out
            .into_iter()
            .filter_map(|e| match e {
                watcher::Event::InitApply(m) | watcher::Event::Apply(m) | watcher::Event::Delete(m) => {
                    assert!(m.metadata.labels.is_none(), "names only");
                    Some(m.name_any())
                }
                _ => None,
            })
            .collect();
        assert_eq!(names, ["a", "b", "b", "c", "c"], "the cache hears of every object");
        assert!(arrivals.take("team", "a").is_none(), "a seen version is not kept for a reconcile");
        let b = arrivals.take("team", "b").expect("b waits for its reconcile");
        assert_eq!(b.spec.rotation.trigger.as_deref(), Some("two"), "the newest");
        assert!(arrivals.take("team", "b").is_none(), "taken once");
        assert_eq!(arrivals.len(), (0, 0), "a deleted object's arrival is dropped");
    }

    #[tokio::test]
    async fn past_the_limit_a_new_version_is_named_without_its_object() {
        let (arrivals, seen) = (Arc::new(Arrivals::default()), Arc::new(Versions::default()));
        let n = MAX_WAITING + 2;
        let names: Vec<_> = (0..n)
            .map(|i| {
                Ok(name_event(&watcher::Event::Apply(token(&format!("t{i}"), "1", "one")), &arrivals, &seen))
            })
            .collect();
        let triggers = waiting_only(futures::stream::iter(names), arrivals.clone()).count().await;
        assert_eq!(triggers, n, "every new version still starts a reconcile");
        assert_eq!(arrivals.len(), (MAX_WAITING, 2));
        assert!(arrivals.take("team", "t0").is_some(), "kept whole");
        assert!(arrivals.take("team", &format!("t{}", n - 1)).is_none(), "named only: read by its reconcile");
        assert!(!arrivals.is_waiting(&token(&format!("t{}", n - 1), "1", "one")), "taken");
    }
}
