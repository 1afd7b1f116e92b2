//! Reconciles a token asks for at a time (its renewal, expiry, the end of a grace period): one
//! key and one time per token.
//!
//! kube's scheduler would keep each as a whole request twice (its queue and its map, about
//! 600 B per token) and every Active token waits there for its renewal: 6.5 MB at 10,000 tokens
//! (heaptrack). As with kube's scheduler, a token has at most one pending wake-up and a
//! reconcile consumes it (whatever started the reconcile).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use jiff::Timestamp;

use crate::metrics::TokenKey;

/// The longest single sleep: a wake-up months ahead is reached in steps (tokio's timer has a
/// horizon, and the wall clock may be set meanwhile).
const MAX_SLEEP: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct Wakeups {
    inner: Mutex<Inner>,
    /// Told when the earliest wake-up may have moved.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    by_time: BTreeSet<(Timestamp, Arc<TokenKey>)>,
    by_token: HashMap<Arc<TokenKey>, Timestamp>,
}

impl Inner {
    fn remove(&mut self, key: &TokenKey) -> Option<Arc<TokenKey>> {
        let (key, at) = self.by_token.remove_entry(key)?;
        self.by_time.remove(&(at, key.clone()));
        Some(key)
    }
}

impl Wakeups {
    /// Wake `key` at `at` (replacing its pending wake-up).
    pub fn set(&self, key: TokenKey, at: Timestamp) {
        let mut inner = self.inner.lock().expect("wakeups lock");
        let key = inner.remove(&key).unwrap_or_else(|| Arc::new(key));
        let earliest = inner.by_time.first().is_none_or(|(first, _)| at < *first);
        inner.by_time.insert((at, key.clone()));
        inner.by_token.insert(key, at);
        drop(inner);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Drops `key`'s pending wake-up (it is being reconciled, or it is gone).
    pub fn cancel(&self, key: &TokenKey) {
        self.inner.lock().expect("wakeups lock").remove(key);
    }

    /// How many wake-ups are pending.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("wakeups lock").by_token.len()
    }

    /// The earliest wake-up that is due now, removed; else how long until the earliest.
    fn pop_due(&self, now: Timestamp) -> Result<TokenKey, Option<Duration>> {
        let mut inner = self.inner.lock().expect("wakeups lock");
        let Some((at, _)) = inner.by_time.first() else { return Err(None) };
        if *at > now {
            // Rounded up to the millisecond, never early.
            let ms = u64::try_from(now.duration_until(*at).as_millis()).unwrap_or(0) + 1;
            return Err(Some(Duration::from_millis(ms)));
        }
        let (_, key) = inner.by_time.pop_first().expect("checked above");
        inner.by_token.remove(&key);
        Ok(Arc::unwrap_or_clone(key))
    }

    /// Yields each token when its wake-up time comes.
    pub fn due(self: Arc<Self>) -> impl Stream<Item = TokenKey> + Send + 'static {
        futures::stream::unfold(self, |w| async move {
            loop {
                let wait = match w.pop_due(Timestamp::now()) {
                    Ok(key) => return Some((key, w)),
                    Err(wait) => wait.map_or(MAX_SLEEP, |d| d.min(MAX_SLEEP)),
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = w.changed.notified() => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn key(name: &str) -> TokenKey {
        ("ns".into(), name.into())
    }

    #[tokio::test]
    async fn wakes_in_time_order_once_and_not_after_a_cancel() {
        let w = Arc::new(Wakeups::default());
        let now = Timestamp::now();
        w.set(key("late"), now + jiff::SignedDuration::from_millis(60));
        w.set(key("early"), now + jiff::SignedDuration::from_millis(20));
        w.set(key("gone"), now + jiff::SignedDuration::from_millis(10));
        w.cancel(&key("gone"));
        // Replacing a wake-up keeps one per token.
        w.set(key("late"), now + jiff::SignedDuration::from_millis(40));
        assert_eq!(w.len(), 2);
        let mut due = Box::pin(w.clone().due());
        assert_eq!(due.next().await, Some(key("early")));
        assert!(Timestamp::now() >= now + jiff::SignedDuration::from_millis(20));
        assert_eq!(due.next().await, Some(key("late")));
        assert!(Timestamp::now() >= now + jiff::SignedDuration::from_millis(40));
        assert_eq!(w.len(), 0);
    }

    #[tokio::test]
    async fn an_earlier_wakeup_set_while_waiting_is_not_missed() {
        let w = Arc::new(Wakeups::default());
        let now = Timestamp::now();
        w.set(key("far"), now + jiff::SignedDuration::from_hours(24));
        let mut due = Box::pin(w.clone().due());
        let next = tokio::spawn(async move { due.next().await });
        tokio::task::yield_now().await;
        w.set(key("soon"), now + jiff::SignedDuration::from_millis(10));
        let got = tokio::time::timeout(Duration::from_secs(10), next).await.expect("woken").unwrap();
        assert_eq!(got, Some(key("soon")));
    }
}
