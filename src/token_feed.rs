//! One ApiToken watch per replica, shared by everything that follows ApiTokens: the verification
//! index, the quota census, the controller and the cleanup of deleted tokens' Secrets.
//!
//! Four watches of their own made the API server list every ApiToken four times at start-up and
//! after every restart of it (at 100,000 tokens most of two minutes, while the index waited its
//! turn), and made this process decode every event four times.
//!
//! Listeners are called in the feed's task, one after the other, with every event from the start
//! of a list on. One that joins later (the controller, when this replica becomes leader) waits for
//! the list in progress to end; then the watch lists again, so that it too sees every object.
//!
//! A watch that ends (the server's timeout, a server dropping a slow reader, a cut connection)
//! goes on from where it was, as kube's watcher does, and so does one that cannot be opened
//! while the server is down or not ready (no connection, 429, 503); one that fails otherwise
//! (410 Gone after a restart of the API server or a compaction, a refusal such as 403) starts
//! over with a fresh list.
//! Listeners keep what they had meanwhile; the list's end tells them what disappeared.

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::Event;
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::api::ApiToken;
use crate::backoff::Bounded;

/// Called with every event; returns false once it wants no more (its receiver is gone).
type Listener = Box<dyn FnMut(&Event<ApiToken>) -> bool + Send>;

/// Where listeners join the feed. Cheap to clone.
#[derive(Clone)]
pub struct TokenFeed {
    joins: mpsc::UnboundedSender<Listener>,
}

impl TokenFeed {
    /// The feed of the ApiTokens in `namespace` (all namespaces with `None`), and the future that
    /// drives it (it lists only once somebody listens, and runs until every handle is dropped
    /// and nobody listens). The feed answers 429s and 503s itself: give it a client built with
    /// `default_retry: false`, or kube's retries wait out the server's Retry-After first.
    pub fn start(
        client: Client,
        namespace: Option<&str>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        Self::start_with_pages_of(PAGE, client, namespace)
    }

    /// As [`Self::start`], listing `page` ApiTokens a request (tests list a few in several pages).
    pub fn start_with_pages_of(
        page: u32,
        client: Client,
        namespace: Option<&str>,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let api: Api<ApiToken> = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        let (joins, joined) = mpsc::unbounded_channel();
        (Self { joins }, drive(api, page, joined))
    }

    /// Calls `listener` in the feed's task with every event from the next list's start on,
    /// until it returns false. It must not block: the index, the census and the controller wait
    /// for it.
    pub fn listen(&self, listener: impl FnMut(&Event<ApiToken>) -> bool + Send + 'static) {
        // Fails only when the feed's task is gone, i.e. at shutdown.
        let _ = self.joins.send(Box::new(listener));
    }

    /// The events as a stream, for consumers that await (the controller, the cleanup): `pick`
    /// keeps what each needs of an event (`None`: nothing). Unbounded, so that a consumer never
    /// holds up the index; both consumers take events as they come and keep no object.
    pub fn subscribe<T: Send + 'static>(
        &self,
        mut pick: impl FnMut(&Event<ApiToken>) -> Option<T> + Send + 'static,
    ) -> impl Stream<Item = T> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        self.listen(move |event| match pick(event) {
            Some(item) => tx.send(item).is_ok(),
            None => !tx.is_closed(),
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
    }
}

/// Reconnects fast (200 ms doubling to at most 1 s): after an API server outage, revocations must
/// reach the verifier within a second of the server's return, not after a long backoff.
fn reconnects() -> Bounded {
    Bounded::new(Duration::from_millis(200), Duration::from_secs(1))
}

/// A refusal that says "ask again" (429 Too Many Requests, 503 Service Unavailable), not "list
/// again" (410 Gone).
fn not_ready(status: &kube::core::Status) -> bool {
    matches!(status.code, 429 | 503)
}

/// A watch that could not be opened for a reason that says nothing about its resourceVersion:
/// the server down (no connection) or not ready yet. Asking again is right; a list now would
/// be read from etcd while a restarted server fills its ApiToken cache (KEP 4568), decoding
/// every ApiToken twice, and the watch is answered (or gets 410 and lists from the cache) as
/// soon as that cache is whole.
fn ask_again(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(s) => not_ready(s),
        kube::Error::Service(_) | kube::Error::HyperError(_) => true,
        _ => false,
    }
}

/// How often a list page refused with 429 or 503 asks again. The server's Retry-After grows
/// with its downtime (14 s after 45 s down), and waiting it out kept the index stale that much
/// longer after the cache was whole; a refused request costs the server next to nothing.
const CACHE_FILLING_POLL: Duration = Duration::from_secs(1);

/// ApiTokens per page of a list.
const PAGE: u32 = 500;
/// The server ends a watch after this long; the feed then watches on from where it was.
const WATCH_SECONDS: u32 = 290;
/// A watch silent for longer than its own timeout is a dead connection (kube's watcher's margin).
const SILENT_FOR: Duration = Duration::from_secs(WATCH_SECONDS as u64 + 5);

/// The listeners, and those that joined too late for the list in progress.
#[derive(Default)]
struct Listeners {
    listening: Vec<Listener>,
    waiting: Vec<Listener>,
}

impl Listeners {
    fn send(&mut self, event: &Event<ApiToken>) {
        self.listening.retain_mut(|l| l(event));
    }

    fn start_list(&mut self) {
        self.listening.append(&mut self.waiting);
        self.send(&Event::Init);
    }

    /// Joins the list that has just started (nothing of it went out yet).
    fn join_now(&mut self, mut listener: Listener) {
        if listener(&Event::Init) {
            self.listening.push(listener);
        }
    }

    fn is_empty(&self) -> bool {
        self.listening.is_empty() && self.waiting.is_empty()
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// Somebody joined: list again for them.
    Joined,
    Failed(kube::Error),
    /// Nobody listens, and nobody can join any more.
    Over,
}

async fn drive(api: Api<ApiToken>, page_size: u32, mut joined: mpsc::UnboundedReceiver<Listener>) {
    let mut listeners = Listeners::default();
    let mut open = true;
    let mut backoff = reconnects();
    loop {
        if listeners.is_empty() {
            match joined.recv().await {
                Some(l) => listeners.waiting.push(l),
                None => return,
            }
        }
        while let Ok(l) = joined.try_recv() {
            listeners.waiting.push(l);
        }
        let version = match list(&api, page_size, &mut listeners, &mut joined).await {
            Ok(version) => version,
            Err(e) => {
                warn!(error = %e, "listing ApiTokens failed; trying again (the index keeps answering)");
                tokio::time::sleep(backoff.next().unwrap_or_default()).await;
                continue;
            }
        };
        backoff.reset();
        match watch(&api, version, &mut listeners, &mut joined, &mut open).await {
            WatchEnd::Joined => {}
            WatchEnd::Failed(e) => {
                warn!(error = %e, "ApiToken watch failed; listing again (the index keeps answering)");
                tokio::time::sleep(backoff.next().unwrap_or_default()).await;
            }
            WatchEnd::Over => return,
        }
    }
}

/// Lists every ApiToken to the listeners (page by page: a page at a time in memory, and the next
/// one on its way meanwhile); returns the list's resourceVersion, where the watch starts.
async fn list(
    api: &Api<ApiToken>,
    page_size: u32,
    listeners: &mut Listeners,
    joined: &mut mpsc::UnboundedReceiver<Listener>,
) -> Result<String, kube::Error> {
    listeners.start_list();
    let pages = Pages {
        client: api.clone().into_client(),
        request: kube::core::Request::new(api.resource_url()),
        size: page_size,
    };
    let mut text = pages.get(None).await?;
    // Joined while the first page was on its way: nothing went out yet, this list serves.
    while let Ok(l) = joined.try_recv() {
        listeners.join_now(l);
    }
    loop {
        // The server encodes the next page while this one is decoded (both take about as
        // long; at 100,000 ApiTokens one after the other took 12.7 s, the server alone 9.3 s).
        let early = continue_token(&text).map(str::to_owned);
        let ahead = early.clone().map(|token| {
            let pages = pages.clone();
            tokio::spawn(async move { pages.get(Some(&token)).await })
        });
        let list: kube::core::ObjectList<ApiToken> =
            serde_json::from_str(&text).map_err(kube::Error::SerdeError)?;
        let (version, next) = (list.metadata.resource_version, list.metadata.continue_);
        for at in list.items {
            listeners.send(&Event::InitApply(at));
        }
        let next = next.filter(|c| !c.is_empty());
        text = match (ahead, next) {
            (Some(ahead), Some(next)) if early.as_deref() == Some(next.as_str()) => {
                ahead.await.map_err(|e| kube::Error::Service(e.into()))??
            }
            (ahead, Some(next)) => {
                // Not the token read early (never seen): fetch the right page.
                ahead.inspect(tokio::task::JoinHandle::abort);
                pages.get(Some(&next)).await?
            }
            (ahead, None) => {
                ahead.inspect(tokio::task::JoinHandle::abort);
                listeners.send(&Event::InitDone);
                return Ok(version.unwrap_or_default());
            }
        };
    }
}

/// Where the pages of a list come from.
#[derive(Clone)]
struct Pages {
    client: Client,
    request: kube::core::Request,
    size: u32,
}

impl Pages {
    /// One page, as text; asks again for the same page when the server says so.
    async fn get(&self, token: Option<&str>) -> Result<String, kube::Error> {
        let mut params = ListParams::default().limit(self.size);
        if let Some(token) = token {
            params = params.continue_token(token);
        }
        loop {
            let mut request = self.request.list(&params).map_err(kube::Error::BuildRequest)?;
            request.extensions_mut().insert("list");
            match self.client.request_text(request).await {
                // Throttled, or a server starting: the same page again shortly, keeping the
                // pages already sent.
                Err(kube::Error::Api(s)) if not_ready(&s) => tokio::time::sleep(CACHE_FILLING_POLL).await,
                done => return done,
            }
        }
    }
}

/// The continue token of a list page, read from its end without decoding it: the list's
/// `metadata` follows its `items` (the API server writes keys in order). `None` when it is not
/// there; the decoded page has the last word either way.
fn continue_token(page: &str) -> Option<&str> {
    let after_items = &page[page.rfind(']')?..];
    let rest = &after_items[after_items.find("\"continue\":\"")? + "\"continue\":\"".len()..];
    Some(&rest[..rest.find('"')?]).filter(|t| !t.is_empty())
}

/// The next listener to join; never resolves once nobody can join any more (`open` turns false).
async fn next_joiner(joined: &mut mpsc::UnboundedReceiver<Listener>, open: &mut bool) -> Listener {
    if *open {
        if let Some(l) = joined.recv().await {
            return l;
        }
        *open = false;
    }
    std::future::pending().await
}

/// Watches from `version` on (again whenever the server ends the watch) until somebody joins or
/// the watch fails.
async fn watch(
    api: &Api<ApiToken>,
    mut version: String,
    listeners: &mut Listeners,
    joined: &mut mpsc::UnboundedReceiver<Listener>,
    open: &mut bool,
) -> WatchEnd {
    let params = WatchParams::default().timeout(WATCH_SECONDS);
    // Asking again after a refusal: fast, at most once a second (the reconnects' bounds).
    let mut again = reconnects();
    loop {
        let started = Instant::now();
        // The API server may send nothing, headers included, until the first event.
        let opened = tokio::select! {
            biased;
            l = next_joiner(joined, open) => {
                listeners.waiting.push(l);
                return WatchEnd::Joined;
            }
            opened = api.watch(&params, &version) => opened,
        };
        let mut events = match opened {
            Ok(events) => {
                again.reset();
                events.boxed()
            }
            Err(e) if ask_again(&e) => {
                tokio::select! {
                    biased;
                    l = next_joiner(joined, open) => {
                        listeners.waiting.push(l);
                        return WatchEnd::Joined;
                    }
                    () = tokio::time::sleep(again.next().unwrap_or_default()) => continue,
                }
            }
            Err(e) => return WatchEnd::Failed(e),
        };
        loop {
            let next = tokio::select! {
                biased;
                l = next_joiner(joined, open) => {
                    listeners.waiting.push(l);
                    return WatchEnd::Joined;
                }
                next = tokio::time::timeout(SILENT_FOR, events.next()) => next,
            };
            let event = match next {
                // Ended, or silent past its timeout (a dead connection): resume (not in a tight
                // loop when a server going down ends every watch at once).
                Err(_) | Ok(None) => {
                    if started.elapsed() < Duration::from_secs(1) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    break;
                }
                Ok(Some(Err(e))) => return WatchEnd::Failed(e),
                Ok(Some(Ok(event))) => event,
            };
            match event {
                WatchEvent::Added(at) | WatchEvent::Modified(at) => {
                    version = at.resource_version().unwrap_or(version);
                    listeners.send(&Event::Apply(at));
                }
                WatchEvent::Deleted(at) => {
                    version = at.resource_version().unwrap_or(version);
                    listeners.send(&Event::Delete(at));
                }
                WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
                WatchEvent::Error(status) => return WatchEnd::Failed(kube::Error::Api(status)),
            }
            if listeners.is_empty() && !*open {
                return WatchEnd::Over;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::continue_token;

    #[test]
    fn the_continue_token_is_read_from_the_lists_metadata_only() {
        let page = r#"{"apiVersion":"apitoken.dev/v1alpha1","items":[{"metadata":{"labels":{"continue":"no"}}}],"kind":"ApiTokenList","metadata":{"continue":"eyJ2IjoxfQ","remainingItemCount":7,"resourceVersion":"42"}}"#;
        assert_eq!(continue_token(page), Some("eyJ2IjoxfQ"));
        let last = r#"{"apiVersion":"apitoken.dev/v1alpha1","items":[],"kind":"ApiTokenList","metadata":{"resourceVersion":"42"}}"#;
        assert_eq!(continue_token(last), None);
        let empty = r#"{"items":[],"metadata":{"continue":"","resourceVersion":"42"}}"#;
        assert_eq!(continue_token(empty), None);
        // Whatever the server sent, nothing panics.
        for bad in ["", "]", r#"]"continue":""#, r#"]"continue":"abc"#, "{\"items\":[{\"continue\":\"x\"}"] {
            let _ = continue_token(bad);
        }
        assert_eq!(continue_token(r#"{"items":[{"a":{"continue":"x"}}"#), None);
    }
}
