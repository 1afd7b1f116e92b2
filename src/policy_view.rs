//! What policy evaluation needs from the cluster, kept current by watches: the ApiTokenPolicies,
//! namespace labels, and a census of active tokens per namespace and creator (for quotas).
//! Shared by the reconciler and the admission webhook; requests read it, never the API.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::warn;

use crate::api::{ApiToken, ApiTokenPolicy, Phase};
use crate::core::policy::{Counts, Policy, PolicyInput};

/// Annotation the mutating webhook sets to the requesting user on create.
pub const CREATED_BY_ANNOTATION: &str = "apitoken.dev/created-by";

#[derive(Debug, Clone, PartialEq, Eq)]
struct CensusEntry {
    creator: Option<String>,
    active: bool,
}

/// Does this token count against quotas? Everything not revoked, expired or refused.
pub fn is_active(at: &ApiToken) -> bool {
    let phase = at.status.as_ref().and_then(|s| s.phase);
    !at.spec.revoked
        && !matches!(phase, Some(Phase::Expired | Phase::Revoked | Phase::Denied | Phase::Failed))
}

#[derive(Clone)]
pub struct PolicyView {
    policies: Store<ApiTokenPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    census: Arc<RwLock<HashMap<(String, String), CensusEntry>>>,
    changed: tokio::sync::broadcast::Sender<()>,
}

impl PolicyView {
    /// Starts the watches (driven by the returned future, which runs forever).
    pub fn start(client: &Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (policies, pw) = reflector::store();
        let (namespaces, nw) = reflector::store();
        let census = Arc::new(RwLock::new(HashMap::new()));
        let (tx, _) = tokio::sync::broadcast::channel::<()>(16);
        let changed = tx.clone();
        let policy_events = reflector::reflector(
            pw,
            watcher(Api::<ApiTokenPolicy>::all(client.clone()), watcher::Config::default()),
        )
        .backoff(crate::backoff::Bounded::watches())
        .touched_objects();
        let ns_events = reflector::reflector(
            nw,
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default()),
        )
        .backoff(crate::backoff::Bounded::watches())
        .touched_objects();
        let tokens = watcher(Api::<ApiToken>::all(client.clone()), watcher::Config::default())
            .backoff(crate::backoff::Bounded::watches());
        let (sink, mut building) = (census.clone(), CensusSink::default());
        let tx2 = tx.clone();
        let drive = async move {
            let policies = policy_events.for_each(|e| {
                if let Err(e) = e {
                    warn!(error = %e, "ApiTokenPolicy watch failed; retrying");
                }
                let _ = tx.send(());
                async {}
            });
            let namespaces = ns_events.for_each(|e| {
                if e.is_ok() {
                    let _ = tx2.send(());
                }
                async {}
            });
            let census_task = tokens.for_each(move |e| {
                building.apply(&sink, e);
                async {}
            });
            tokio::join!(policies, namespaces, census_task);
        };
        (Self { policies, namespaces, census, changed }, drive)
    }

    /// Yields whenever a policy or a namespace's labels change (for re-evaluating tokens).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        futures::stream::unfold(self.changed.subscribe(), |mut rx| async move {
            match rx.recv().await {
                Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
            }
        })
    }

    /// Waits until the first lists are in (or says why not after a while, and keeps going:
    /// the watches keep retrying, e.g. until the ApiTokenPolicy CRD is installed).
    pub async fn ready(&self) {
        let both = async {
            let _ = self.policies.wait_until_ready().await;
            let _ = self.namespaces.wait_until_ready().await;
        };
        if tokio::time::timeout(std::time::Duration::from_secs(30), both).await.is_err() {
            warn!(
                "ApiTokenPolicies or namespaces could not be listed within 30s (is the ApiTokenPolicy CRD installed, may the operator list namespaces?); continuing with what is known"
            );
        }
    }

    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .state()
            .into_iter()
            .find(|n| n.name_any() == ns)
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    fn selects(p: &ApiTokenPolicy, labels: &BTreeMap<String, String>) -> bool {
        match &p.spec.namespace_selector {
            None => true,
            Some(sel) => Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels)),
        }
    }

    /// The parsed policies selecting `namespace`, in name order, and the quota counts for each
    /// (excluding the token `exclude`). A policy that cannot be parsed is an error for every
    /// token it selects: nothing is issued against a policy nobody can read.
    pub fn for_namespace(
        &self,
        namespace: &str,
        creator: Option<&str>,
        exclude: Option<&str>,
    ) -> Result<(Vec<Policy>, Vec<Counts>), String> {
        let labels = self.ns_labels(namespace);
        let mut selecting: Vec<Arc<ApiTokenPolicy>> =
            self.policies.state().into_iter().filter(|p| Self::selects(p, &labels)).collect();
        selecting.sort_by_key(|p| p.name_any());
        let census = self.census.read().expect("census lock");
        let mut policies = Vec::with_capacity(selecting.len());
        let mut counts = Vec::with_capacity(selecting.len());
        for p in &selecting {
            let name = p.name_any();
            let s = &p.spec;
            policies.push(Policy::parse(&PolicyInput {
                name: &name,
                allowed_scopes: s.allowed_scopes.as_deref(),
                permission_sets: &s.permission_sets,
                default_lifetime: s.lifetime.default.as_deref(),
                max_lifetime: s.lifetime.max.as_deref(),
                allow_never: s.lifetime.allow_never,
                per_namespace: s.max_active_tokens.per_namespace,
                per_creator: s.max_active_tokens.per_creator,
                max_grace_period: s.rotation.max_grace_period.as_deref(),
                prefix: s.prefix.as_deref(),
                require_audiences: s.require_audiences,
            })?);
            let mut c = Counts::default();
            for ((ns, name), e) in census.iter() {
                if !e.active || (ns == namespace && Some(name.as_str()) == exclude) {
                    continue;
                }
                if ns == namespace {
                    c.in_namespace += 1;
                }
                if creator.is_some()
                    && e.creator.as_deref() == creator
                    && Self::selects(p, &self.ns_labels(ns))
                {
                    c.by_creator += 1;
                }
            }
            counts.push(c);
        }
        Ok((policies, counts))
    }
}

/// The census as it is, plus the one a (re-)list is building: quotas keep counting from the old
/// one until the list is complete, so a re-list never opens a window with nothing counted.
#[derive(Default)]
struct CensusSink {
    building: Option<HashMap<(String, String), CensusEntry>>,
}

impl CensusSink {
    fn apply(
        &mut self,
        census: &RwLock<HashMap<(String, String), CensusEntry>>,
        event: Result<watcher::Event<ApiToken>, watcher::Error>,
    ) {
        let entry = |at: &ApiToken| CensusEntry {
            creator: at.annotations().get(CREATED_BY_ANNOTATION).cloned(),
            active: is_active(at),
        };
        let key = |at: &ApiToken| (at.namespace().unwrap_or_default(), at.name_any());
        match event {
            Ok(watcher::Event::Init) => self.building = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(at)) => {
                self.building.get_or_insert_default().insert(key(&at), entry(&at));
            }
            Ok(watcher::Event::InitDone) => {
                *census.write().expect("census lock") = self.building.take().unwrap_or_default();
            }
            Ok(watcher::Event::Apply(at)) => {
                census.write().expect("census lock").insert(key(&at), entry(&at));
            }
            Ok(watcher::Event::Delete(at)) => {
                census.write().expect("census lock").remove(&key(&at));
            }
            Err(e) => warn!(error = %e, "ApiToken census watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiTokenSpec;

    fn token(name: &str) -> ApiToken {
        let mut at = ApiToken::new(name, ApiTokenSpec::default());
        at.metadata.namespace = Some("ns".into());
        at
    }

    #[test]
    fn a_relist_keeps_the_old_census_until_it_is_complete() {
        let census = RwLock::new(HashMap::new());
        let mut sink = CensusSink::default();
        for e in [watcher::Event::Init, watcher::Event::InitApply(token("a")), watcher::Event::InitDone] {
            sink.apply(&census, Ok(e));
        }
        sink.apply(&census, Ok(watcher::Event::Apply(token("b"))));
        assert_eq!(census.read().unwrap().len(), 2);
        // Re-list: until InitDone the quota still counts both.
        sink.apply(&census, Ok(watcher::Event::Init));
        sink.apply(&census, Ok(watcher::Event::InitApply(token("b"))));
        assert_eq!(census.read().unwrap().len(), 2);
        sink.apply(&census, Ok(watcher::Event::InitDone));
        let now: Vec<_> = census.read().unwrap().keys().map(|(_, n)| n.clone()).collect();
        assert_eq!(now, vec!["b".to_string()], "a is gone after the list");
        sink.apply(&census, Ok(watcher::Event::Delete(token("b"))));
        assert!(census.read().unwrap().is_empty());
    }
}
