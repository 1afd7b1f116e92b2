//! What policy evaluation needs from the cluster, kept current by watches: the ApiTokenPolicies,
//! namespace labels, and a census of active tokens per namespace and creator (for quotas).
//! Shared by the reconciler and the admission webhook; requests read it, never the API.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::warn;

use crate::api::{ApiToken, ApiTokenPolicy, ApiTokenPolicyStatus, Phase, SELECTOR_OPERATORS};
use crate::core::policy::{self, Counts, Policy, PolicyInput, is_label_key, is_label_name};
use crate::token_feed::TokenFeed;

/// Annotation the mutating webhook sets to the requesting user on create.
pub const CREATED_BY_ANNOTATION: &str = "apitoken.dev/created-by";

#[derive(Debug, Clone, PartialEq, Eq)]
struct CensusEntry {
    creator: Option<String>,
    active: bool,
    /// The ApiToken's labels, for `maxActiveTokens.perLabel` (usually none or a few).
    labels: BTreeMap<String, String>,
}

/// Does this token count against quotas? Everything not revoked, expired or refused.
/// A Failed token still counts while it holds an issued token (a Secret conflict or a refused
/// Secret write after issuance leaves that token valid).
pub fn is_active(at: &ApiToken) -> bool {
    let status = at.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    let holds_token = status.is_some_and(|s| s.token_hash.is_some());
    !at.spec.revoked
        && match phase {
            Some(Phase::Expired | Phase::Revoked | Phase::Denied) => false,
            Some(Phase::Failed) => holds_token,
            _ => true,
        }
}

#[derive(Clone)]
pub struct PolicyView {
    policies: Store<ApiTokenPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    census: Arc<RwLock<HashMap<(String, String), CensusEntry>>>,
    changed: tokio::sync::broadcast::Sender<()>,
    /// Bumped on every event of any watch (policy status included): for the status writer.
    touched: tokio::sync::watch::Sender<u64>,
}

impl PolicyView {
    /// Starts the watches (driven by the returned future, which runs forever), counting the
    /// ApiTokens of every namespace.
    pub fn start(client: &Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (feed, tokens) = TokenFeed::start(client.clone(), None);
        let (view, drive) = Self::start_in(client, &feed);
        (view, async move {
            tokio::join!(tokens, drive);
        })
    }

    /// As [`Self::start`], counting the ApiTokens of `feed` (the replica's one ApiToken watch, of
    /// `--namespace` when it is set). Policies and namespace labels stay cluster-wide reads (both
    /// are cluster-scoped).
    pub fn start_in(
        client: &Client,
        feed: &TokenFeed,
    ) -> (Self, impl Future<Output = ()> + Send + 'static + use<>) {
        let (policies, pw) = reflector::store();
        let (namespaces, nw) = reflector::store();
        let census = Arc::new(RwLock::new(HashMap::new()));
        let (tx, _) = tokio::sync::broadcast::channel::<()>(16);
        let (touched, _) = tokio::sync::watch::channel(0u64);
        let changed = tx.clone();
        let policy_events = reflector::reflector(
            pw,
            watcher(Api::<ApiTokenPolicy>::all(client.clone()), watcher::Config::default()),
        )
        .backoff(crate::backoff::Bounded::watches());
        let ns_events = reflector::reflector(
            nw,
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default()),
        )
        .backoff(crate::backoff::Bounded::watches());
        let (sink, mut building) = (census.clone(), CensusSink::default());
        let tx2 = tx.clone();
        let (touch1, touch2, touch3) = (touched.clone(), touched.clone(), touched.clone());
        let bump = |t: &tokio::sync::watch::Sender<u64>| t.send_modify(|n| *n = n.wrapping_add(1));
        // What evaluation reads: a policy's generation (its status, which we write, is not part of
        // it) and a namespace's labels. A watch listing everything again after a restart changes
        // nothing by itself; only a difference re-evaluates every token.
        let mut generations = Fingerprints::default();
        let mut labels = Fingerprints::default();
        feed.listen(move |e| {
            building.apply(&sink, e);
            bump(&touch3);
            true
        });
        let drive = async move {
            let policies = policy_events.for_each(move |e| {
                if let Err(e) = &e {
                    warn!(error = %e, "ApiTokenPolicy watch failed; retrying");
                }
                if generations.apply(e.as_ref().ok(), |p: &ApiTokenPolicy| p.metadata.generation) {
                    let _ = tx.send(());
                }
                bump(&touch1);
                async {}
            });
            let namespaces = ns_events.for_each(move |e| {
                if labels.apply(e.as_ref().ok(), |n: &PartialObjectMeta<Namespace>| n.labels().clone()) {
                    let _ = tx2.send(());
                }
                if e.is_ok() {
                    bump(&touch2);
                }
                async {}
            });
            tokio::join!(policies, namespaces);
        };
        (Self { policies, namespaces, census, changed, touched }, drive)
    }

    /// Changes whenever anything watched changes (policies and their status, namespaces,
    /// tokens): for the policy status writer.
    pub fn touched(&self) -> tokio::sync::watch::Receiver<u64> {
        self.touched.subscribe()
    }

    /// Yields whenever a policy's spec or a namespace's labels change (for re-evaluating tokens).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        futures::stream::unfold(self.changed.subscribe(), |mut rx| async move {
            match rx.recv().await {
                Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
            }
        })
    }

    /// Every known ApiToken, as (namespace, name): for re-evaluating them all.
    pub fn token_keys(&self) -> Vec<(String, String)> {
        self.census.read().expect("census lock").keys().cloned().collect()
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

    /// Every namespace's labels, by name.
    fn all_ns_labels(&self) -> HashMap<String, BTreeMap<String, String>> {
        self.namespaces.state().iter().map(|n| (n.name_any(), n.labels().clone())).collect()
    }

    /// The parsed policies selecting `namespace`, in name order, and the quota counts for each
    /// (excluding the token `exclude`, whose labels are taken from the census). A policy that
    /// cannot be parsed is an error for every token it selects: nothing is issued against a
    /// policy nobody can read.
    pub fn for_namespace(
        &self,
        namespace: &str,
        creator: Option<&str>,
        exclude: Option<&str>,
    ) -> Result<(Vec<Policy>, Vec<Counts>), String> {
        let labels = exclude.and_then(|name| {
            let census = self.census.read().expect("census lock");
            census.get(&(namespace.to_string(), name.to_string())).map(|e| e.labels.clone())
        });
        self.for_token(namespace, creator, exclude, labels.as_ref())
    }

    /// As [`Self::for_namespace`], for the token `name` with the labels `labels` (what it is
    /// about to have: admission passes the object under review).
    pub fn for_token(
        &self,
        namespace: &str,
        creator: Option<&str>,
        name: Option<&str>,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<(Vec<Policy>, Vec<Counts>), String> {
        let ns_labels = self.all_ns_labels();
        let empty = BTreeMap::new();
        let labels_of = |ns: &str| ns_labels.get(ns).unwrap_or(&empty);
        let mut candidates: Vec<Arc<ApiTokenPolicy>> = self.policies.state();
        candidates.sort_by_key(|p| p.name_any());
        let mut selecting = Vec::new();
        for p in candidates {
            // Fail closed: a selector that cannot be evaluated selects every namespace.
            let selector = selector_of(&p).ok();
            if selector.as_ref().is_none_or(|s| s.as_ref().is_none_or(|s| s.matches(labels_of(namespace)))) {
                selecting.push((p, selector.flatten()));
            }
        }
        let census = self.census.read().expect("census lock");
        let mut policies = Vec::with_capacity(selecting.len());
        let mut counts = Vec::with_capacity(selecting.len());
        for (p, selector) in &selecting {
            let parsed = parse(p).map_err(|problems| {
                format!(
                    "ApiTokenPolicy {} cannot be applied, so it refuses every token it may select until it is fixed: {problems}",
                    p.name_any()
                )
            })?;
            let selects = |ns: &str| selector.as_ref().is_none_or(|s| s.matches(labels_of(ns)));
            let label =
                parsed.per_label.as_ref().and_then(|q| Some((q.label.as_str(), labels?.get(&q.label)?)));
            let mut c = Counts::default();
            let mut by_label = 0;
            for ((ns, token), e) in census.iter() {
                if !e.active || (ns == namespace && Some(token.as_str()) == name) {
                    continue;
                }
                if ns == namespace {
                    c.in_namespace += 1;
                }
                let same_creator = creator.is_some() && e.creator.as_deref() == creator;
                let same_label = label.is_some_and(|(k, v)| e.labels.get(k) == Some(v));
                if (same_creator || same_label) && selects(ns) {
                    c.by_creator += u32::from(same_creator);
                    by_label += u32::from(same_label);
                }
            }
            c.by_label = label.map(|(_, v)| (v.clone(), by_label));
            counts.push(c);
            policies.push(parsed);
        }
        Ok((policies, counts))
    }

    /// What each policy selects now and whether it can be applied, with its current status.
    pub fn report(&self) -> Vec<PolicyReport> {
        let namespaces = self.namespaces.state();
        let mut tokens_in: HashMap<&str, u32> = HashMap::new();
        let census = self.census.read().expect("census lock");
        for (ns, _) in census.keys() {
            *tokens_in.entry(ns.as_str()).or_default() += 1;
        }
        let mut out: Vec<PolicyReport> = self
            .policies
            .state()
            .iter()
            .map(|p| {
                let problems = parse(p).err();
                let selector = selector_of(p).ok().flatten();
                let (mut ns_count, mut tokens) = (0, 0);
                for n in &namespaces {
                    if selector.as_ref().is_none_or(|s| s.matches(n.labels())) {
                        ns_count += 1;
                        tokens += tokens_in.get(n.name_any().as_str()).copied().unwrap_or(0);
                    }
                }
                PolicyReport {
                    name: p.name_any(),
                    generation: p.metadata.generation,
                    problems,
                    namespaces: ns_count,
                    tokens,
                    current: p.status.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// One policy as the status writer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    pub name: String,
    pub generation: Option<i64>,
    /// Why the policy cannot be applied, if it cannot.
    pub problems: Option<String>,
    pub namespaces: u32,
    pub tokens: u32,
    pub current: Option<ApiTokenPolicyStatus>,
}

/// The raw fields of a policy, for [`Policy::parse`] and [`policy::check`].
fn input(p: &ApiTokenPolicy) -> PolicyInput<'_> {
    let s = &p.spec;
    PolicyInput {
        name: p.metadata.name.as_deref().unwrap_or_default(),
        allowed_scopes: s.allowed_scopes.as_deref(),
        permission_sets: &s.permission_sets,
        default_lifetime: s.lifetime.default.as_deref(),
        max_lifetime: s.lifetime.max.as_deref(),
        allow_never: s.lifetime.allow_never,
        per_namespace: s.max_active_tokens.per_namespace,
        per_creator: s.max_active_tokens.per_creator,
        per_label: s.max_active_tokens.per_label.as_ref().map(|q| (q.label.as_str(), q.max)),
        max_grace_period: s.rotation.max_grace_period.as_deref(),
        prefix: s.prefix.as_deref(),
        require_audiences: s.require_audiences,
    }
}

/// Every problem of a policy (selector and fields), each `field: what is wrong`.
pub fn problems(p: &ApiTokenPolicy) -> Vec<String> {
    let mut out = selector_of(p).err().unwrap_or_default();
    out.extend(policy::check(&input(p)));
    out
}

/// The policy parsed, or every problem in one sentence.
fn parse(p: &ApiTokenPolicy) -> Result<Policy, String> {
    let problems = problems(p);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Policy::parse(&input(p))
}

/// The policy's namespace selector (`None`: every namespace), or why it cannot be evaluated.
fn selector_of(p: &ApiTokenPolicy) -> Result<Option<Selector>, Vec<String>> {
    match &p.spec.namespace_selector {
        None => Ok(None),
        Some(sel) => parse_selector(sel).map(Some),
    }
}

/// A label selector checked the way the API server checks one (keys, values, operators and
/// their values), then converted; every problem is reported.
pub fn parse_selector(sel: &LabelSelector) -> Result<Selector, Vec<String>> {
    let mut out = Vec::new();
    for (k, v) in sel.match_labels.iter().flatten() {
        if !is_label_key(k) {
            out.push(format!("namespaceSelector.matchLabels: '{k}' is not a label key"));
        }
        if !is_label_name(v, true) {
            out.push(format!("namespaceSelector.matchLabels.{k}: '{v}' is not a label value"));
        }
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("namespaceSelector.matchExpressions[{i}]");
        if !is_label_key(&e.key) {
            out.push(format!("{at}.key: '{}' is not a label key", e.key));
        }
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                out.push(format!("{at}.values: operator {} needs at least one value", e.operator));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                out.push(format!("{at}.values: operator {} takes no values", e.operator));
            }
            op if !SELECTOR_OPERATORS.contains(&op) => out.push(format!(
                "{at}.operator: '{op}' is not an operator; use {}",
                SELECTOR_OPERATORS.join(", ")
            )),
            _ => {}
        }
        for v in values.iter().filter(|v| !is_label_name(v, true)) {
            out.push(format!("{at}.values: '{v}' is not a label value"));
        }
    }
    if !out.is_empty() {
        return Err(out);
    }
    Selector::try_from(sel.clone()).map_err(|e| vec![format!("namespaceSelector: {e}")])
}

/// What policy evaluation read of each object of one watch (keyed by name), to tell a real
/// change from the same objects listed again after a watch restarts.
struct Fingerprints<V> {
    seen: HashMap<String, V>,
    /// The (re-)list in progress: compared with `seen` once complete.
    listing: Option<HashMap<String, V>>,
}

impl<V> Default for Fingerprints<V> {
    fn default() -> Self {
        Self { seen: HashMap::new(), listing: None }
    }
}

impl<V: PartialEq> Fingerprints<V> {
    /// Takes in one watch event (`None` for a failed watch: nothing changed yet); true when
    /// what `read` sees differs from before: an object added, changed or removed.
    fn apply<K: ResourceExt>(&mut self, event: Option<&watcher::Event<K>>, read: impl Fn(&K) -> V) -> bool {
        match event {
            None => false,
            Some(watcher::Event::Init) => {
                self.listing = Some(HashMap::new());
                false
            }
            Some(watcher::Event::InitApply(o)) => {
                self.listing.get_or_insert_default().insert(o.name_any(), read(o));
                false
            }
            Some(watcher::Event::InitDone) => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = listed != self.seen;
                self.seen = listed;
                changed
            }
            Some(watcher::Event::Apply(o)) => {
                let (name, now) = (o.name_any(), read(o));
                let changed = self.seen.get(&name) != Some(&now);
                self.seen.insert(name, now);
                changed
            }
            Some(watcher::Event::Delete(o)) => self.seen.remove(&o.name_any()).is_some(),
        }
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
        event: &watcher::Event<ApiToken>,
    ) {
        let entry = |at: &ApiToken| CensusEntry {
            creator: at.annotations().get(CREATED_BY_ANNOTATION).cloned(),
            active: is_active(at),
            labels: at.labels().clone(),
        };
        let key = |at: &ApiToken| (at.namespace().unwrap_or_default(), at.name_any());
        match event {
            watcher::Event::Init => self.building = Some(HashMap::new()),
            watcher::Event::InitApply(at) => {
                self.building.get_or_insert_default().insert(key(at), entry(at));
            }
            watcher::Event::InitDone => {
                *census.write().expect("census lock") = self.building.take().unwrap_or_default();
            }
            watcher::Event::Apply(at) => {
                census.write().expect("census lock").insert(key(at), entry(at));
            }
            watcher::Event::Delete(at) => {
                census.write().expect("census lock").remove(&key(at));
            }
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

    fn selector(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_a_real_change_re_evaluates_tokens() {
        let ns = |name: &str, team: &str| {
            let mut n = PartialObjectMeta::<Namespace>::default();
            n.metadata.name = Some(name.into());
            n.metadata.labels = Some([("team".to_string(), team.to_string())].into());
            n
        };
        let labels = |n: &PartialObjectMeta<Namespace>| n.labels().clone();
        let mut f = Fingerprints::default();
        let list = |f: &mut Fingerprints<_>, items: &[PartialObjectMeta<Namespace>]| {
            let mut fired = f.apply(Some(&watcher::Event::Init), labels);
            for n in items {
                fired |= f.apply(Some(&watcher::Event::InitApply(n.clone())), labels);
            }
            (fired, f.apply(Some(&watcher::Event::InitDone), labels))
        };
        // The first list: something is known now.
        assert_eq!(list(&mut f, &[ns("a", "x"), ns("b", "y")]), (false, true));
        // The same objects listed again after a restart: nothing to re-evaluate.
        assert_eq!(list(&mut f, &[ns("b", "y"), ns("a", "x")]), (false, false));
        // Listed again with a label changed, or one gone, while the watch was down.
        assert_eq!(list(&mut f, &[ns("a", "x"), ns("b", "z")]), (false, true));
        assert_eq!(list(&mut f, &[ns("a", "x")]), (false, true));
        // Events: the same labels again (e.g. an annotation changed) fire nothing.
        assert!(!f.apply(Some(&watcher::Event::Apply(ns("a", "x"))), labels));
        assert!(f.apply(Some(&watcher::Event::Apply(ns("a", "w"))), labels));
        assert!(f.apply(Some(&watcher::Event::Apply(ns("c", "w"))), labels));
        assert!(f.apply(Some(&watcher::Event::Delete(ns("c", "w"))), labels));
        assert!(!f.apply(Some(&watcher::Event::Delete(ns("c", "w"))), labels));
        // A failed watch changes nothing until it has listed again.
        assert!(!f.apply(None, labels));
        // An empty first list when nothing exists: nothing changed.
        let mut empty = Fingerprints::default();
        assert_eq!(list(&mut empty, &[]), (false, false));
    }

    #[test]
    fn a_selector_that_cannot_be_evaluated_says_why() {
        let bad = selector(serde_json::json!({
            "matchLabels": {"tier": "prod!"},
            "matchExpressions": [
                {"key": "team", "operator": "Equals", "values": ["a"]},
                {"key": "env", "operator": "In"},
                {"key": "-x", "operator": "Exists", "values": ["y"]},
            ]
        }));
        let problems = parse_selector(&bad).unwrap_err();
        assert_eq!(
            problems,
            [
                "namespaceSelector.matchLabels.tier: 'prod!' is not a label value",
                "namespaceSelector.matchExpressions[0].operator: 'Equals' is not an operator; use In, NotIn, Exists, DoesNotExist",
                "namespaceSelector.matchExpressions[1].values: operator In needs at least one value",
                "namespaceSelector.matchExpressions[2].key: '-x' is not a label key",
                "namespaceSelector.matchExpressions[2].values: operator Exists takes no values",
            ]
        );
        let good = selector(serde_json::json!({
            "matchLabels": {"tier": "prod"},
            "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}, {"key": "x", "operator": "Exists"}]
        }));
        let s = parse_selector(&good).unwrap();
        let labels = |v: &[(&str, &str)]| v.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        assert!(s.matches(&labels(&[("tier", "prod"), ("team", "b"), ("x", "")])));
        assert!(!s.matches(&labels(&[("tier", "prod"), ("team", "a"), ("x", "")])));
    }

    #[test]
    fn a_policy_problem_names_selector_and_fields() {
        let mut p = ApiTokenPolicy::new("org", crate::api::ApiTokenPolicySpec::default());
        assert!(problems(&p).is_empty());
        p.spec.lifetime.max = Some("0d".into());
        p.spec.namespace_selector = Some(selector(
            serde_json::json!({"matchExpressions": [{"key": "t", "operator": "in", "values": ["a"]}]}),
        ));
        let text = problems(&p).join("; ");
        assert!(
            text.contains("matchExpressions[0].operator: 'in'") && text.contains("lifetime.max: '0d'"),
            "{text}"
        );
    }

    #[test]
    fn quotas_count_what_can_still_be_used() {
        use crate::api::ApiTokenStatus;
        let with = |phase, hash: Option<&str>, revoked| {
            let mut at = token("t");
            at.spec.revoked = revoked;
            at.status =
                Some(ApiTokenStatus { phase, token_hash: hash.map(Into::into), ..ApiTokenStatus::default() });
            is_active(&at)
        };
        assert!(with(None, None, false), "pending counts: it is about to be issued");
        assert!(with(Some(Phase::Active), Some("sha256:x"), false));
        assert!(with(Some(Phase::Failed), Some("sha256:x"), false), "Failed with a valid token counts");
        assert!(!with(Some(Phase::Failed), None, false), "Failed before issuance does not");
        for phase in [Phase::Expired, Phase::Revoked, Phase::Denied] {
            assert!(!with(Some(phase), Some("sha256:x"), false), "{phase:?}");
        }
        assert!(!with(Some(Phase::Active), Some("sha256:x"), true), "revoked in spec");
    }

    #[test]
    fn a_relist_keeps_the_old_census_until_it_is_complete() {
        let census = RwLock::new(HashMap::new());
        let mut sink = CensusSink::default();
        for e in [watcher::Event::Init, watcher::Event::InitApply(token("a")), watcher::Event::InitDone] {
            sink.apply(&census, &e);
        }
        sink.apply(&census, &watcher::Event::Apply(token("b")));
        assert_eq!(census.read().unwrap().len(), 2);
        // Re-list: until InitDone the quota still counts both.
        sink.apply(&census, &watcher::Event::Init);
        sink.apply(&census, &watcher::Event::InitApply(token("b")));
        assert_eq!(census.read().unwrap().len(), 2);
        sink.apply(&census, &watcher::Event::InitDone);
        let now: Vec<_> = census.read().unwrap().keys().map(|(_, n)| n.clone()).collect();
        assert_eq!(now, vec!["b".to_string()], "a is gone after the list");
        sink.apply(&census, &watcher::Event::Delete(token("b")));
        assert!(census.read().unwrap().is_empty());
    }
}
