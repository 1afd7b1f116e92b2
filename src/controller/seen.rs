//! The object versions the controller has already acted on.
//!
//! The watch brings back every write the controller makes (the echo of its own status and Secret
//! writes) and, after a re-list, every object once more. A reconcile for a version it has already
//! handled would only read the Secret again and decide nothing new: at 100,000 tokens a re-list
//! started 100,000 Secret reads that held up the verification index's own list. So the
//! controller records each version it reads or writes, and the watch streams drop those.
//!
//! Kept as 64-bit hashes of (namespace, name) and resourceVersion: 16 bytes an object, not its
//! names. A wrong skip would need both hashes to collide.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::watcher;

#[derive(Default)]
pub struct Versions {
    hasher: RandomState,
    seen: Mutex<HashMap<u64, u64>>,
}

impl Versions {
    /// `version` of `namespace/name` has been acted on (`None`: nothing known, forget it).
    #[cfg(test)]
    pub fn record(&self, namespace: &str, name: &str, version: Option<&str>) {
        self.set(self.hasher.hash_one((namespace, name)), version);
    }

    /// Records the version `obj` carries.
    pub fn record_object<K: Resource>(&self, obj: &K) {
        self.set(self.key_of(obj), obj.meta().resource_version.as_deref());
    }

    /// Has this version of `obj` been acted on already?
    pub fn has_seen<K: Resource>(&self, obj: &K) -> bool {
        let Some(version) = obj.meta().resource_version.as_deref() else {
            return false;
        };
        self.seen.lock().expect("seen lock").get(&self.key_of(obj)) == Some(&self.hasher.hash_one(version))
    }

    pub fn forget<K: Resource>(&self, obj: &K) {
        self.set(self.key_of(obj), None);
    }

    fn key_of<K: Resource>(&self, obj: &K) -> u64 {
        let meta = obj.meta();
        self.hasher.hash_one((
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        ))
    }

    fn set(&self, key: u64, version: Option<&str>) {
        let mut seen = self.seen.lock().expect("seen lock");
        match version {
            Some(v) => seen.insert(key, self.hasher.hash_one(v)),
            None => seen.remove(&key),
        };
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.seen.lock().expect("seen lock").len()
    }
}

/// `events` without the versions `seen` has recorded; a deletion is passed on and forgotten.
pub fn unseen<K, S>(events: S, seen: std::sync::Arc<Versions>) -> impl Stream<Item = S::Item> + Send
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    events.filter(move |event| {
        let keep = match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => !seen.has_seen(obj),
            Ok(watcher::Event::Delete(obj)) => {
                seen.forget(obj);
                true
            }
            _ => true,
        };
        std::future::ready(keep)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use kube::ResourceExt;
    use kube::api::ObjectMeta;
    use std::sync::Arc;

    fn secret(ns: &str, name: &str, rv: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                resource_version: rv.map(Into::into),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    #[test]
    fn only_the_recorded_version_of_that_object_counts_as_seen() {
        let v = Versions::default();
        v.record_object(&secret("a", "x", Some("7")));
        assert!(v.has_seen(&secret("a", "x", Some("7"))));
        assert!(!v.has_seen(&secret("a", "x", Some("8"))), "a newer version");
        assert!(!v.has_seen(&secret("b", "x", Some("7"))), "same name, other namespace");
        assert!(!v.has_seen(&secret("a", "y", Some("7"))), "other name");
        assert!(!v.has_seen(&secret("a", "x", None)), "no version is never seen");
        v.record_object(&secret("a", "x", Some("8")));
        assert!(!v.has_seen(&secret("a", "x", Some("7"))), "replaced by the newer one");
        v.record("a", "x", None);
        assert!(!v.has_seen(&secret("a", "x", Some("8"))));
        assert_eq!(v.len(), 0);
    }

    #[tokio::test]
    async fn the_stream_drops_seen_versions_and_forgets_deleted_objects() {
        let v = Arc::new(Versions::default());
        v.record_object(&secret("a", "x", Some("7")));
        v.record_object(&secret("a", "y", Some("3")));
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(secret("a", "x", Some("7")))),
            Ok(watcher::Event::InitApply(secret("a", "y", Some("4")))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(secret("a", "x", Some("7")))),
            Ok(watcher::Event::Delete(secret("a", "x", Some("9")))),
            Ok(watcher::Event::Apply(secret("a", "x", Some("7")))),
        ]);
        let passed: Vec<String> = unseen(events, v.clone())
            .map(|e| match e.unwrap() {
                watcher::Event::Init => "init".into(),
                watcher::Event::InitDone => "done".into(),
                watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                    format!("{}@{}", s.name_any(), s.resource_version().unwrap())
                }
                watcher::Event::Delete(s) => format!("delete {}", s.name_any()),
            })
            .collect()
            .await;
        assert_eq!(passed, ["init", "y@4", "done", "delete x", "x@7"]);
        assert_eq!(v.len(), 1, "x forgotten with its deletion");
    }
}
