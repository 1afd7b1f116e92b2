//! The controller's work queue: tokens to reconcile, by key, each reconciled by one worker at a
//! time and queued at most once.
//!
//! kube's `Controller` looks every request up in a reflector store holding every ApiToken's
//! metadata (its fixed-size `ObjectMeta` and lookup key: about 600 B per token, the largest part
//! of the operator's memory at 10,000 tokens) and drops a request whose object is not there. A
//! reconcile here needs only the key: it takes the watched object from `arrivals` or reads it.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;

use crate::metrics::TokenKey;

#[derive(Default)]
pub struct Queue {
    state: Mutex<State>,
    /// Told when a key becomes ready to run.
    ready: Notify,
}

#[derive(Default)]
struct State {
    /// Keys to reconcile, in the order they were asked for; each once.
    pending: VecDeque<TokenKey>,
    queued: HashSet<TokenKey>,
    running: HashSet<TokenKey>,
    /// Asked for while running: queued again when that reconcile ends (the change that asked
    /// may have come after the reconcile read the object).
    again: HashSet<TokenKey>,
}

impl Queue {
    /// Asks for a reconcile of `key` (once, however often it is asked before it starts).
    pub fn push(&self, key: TokenKey) {
        let mut s = self.state.lock().expect("queue lock");
        if s.running.contains(&key) {
            s.again.insert(key);
        } else if s.queued.insert(key.clone()) {
            s.pending.push_back(key);
            drop(s);
            self.ready.notify_one();
        }
    }

    /// The next key to reconcile, now marked running.
    fn start_next(&self) -> Option<TokenKey> {
        let mut s = self.state.lock().expect("queue lock");
        let key = s.pending.pop_front()?;
        s.queued.remove(&key);
        s.running.insert(key.clone());
        Some(key)
    }

    /// `key`'s reconcile has ended; it runs again if it was asked for meanwhile.
    fn finish(&self, key: TokenKey) {
        let mut s = self.state.lock().expect("queue lock");
        s.running.remove(&key);
        if s.again.remove(&key) {
            s.queued.insert(key.clone());
            s.pending.push_back(key);
            drop(s);
            self.ready.notify_one();
        }
    }

    /// Runs `reconcile` on queued keys, at most `concurrency` at once and never two for one key,
    /// until `shutdown` resolves; then lets the running ones finish.
    pub async fn work<F, Fut>(&self, concurrency: usize, shutdown: impl Future<Output = ()>, reconcile: F)
    where
        F: Fn(TokenKey) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut running = FuturesUnordered::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            while running.len() < concurrency {
                let Some(key) = self.start_next() else { break };
                let done = reconcile(key.clone());
                running.push(async move {
                    done.await;
                    key
                });
            }
            tokio::select! {
                () = &mut shutdown => break,
                Some(key) = running.next() => self.finish(key),
                () = self.ready.notified() => {}
            }
        }
        while let Some(key) = running.next().await {
            self.finish(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn key(name: &str) -> TokenKey {
        ("ns".into(), name.into())
    }

    #[tokio::test]
    async fn a_key_runs_once_per_ask_before_it_starts_and_again_if_asked_while_running() {
        let q = Arc::new(Queue::default());
        q.push(key("a"));
        q.push(key("b"));
        q.push(key("a"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let worker = {
            let (q, log) = (q.clone(), log.clone());
            tokio::spawn(async move {
                q.work(4, async { stop_rx.await.unwrap_or(()) }, |k| {
                    let (log, mut release) = (log.clone(), release_rx.clone());
                    async move {
                        log.lock().unwrap().push(format!("start {}", k.1));
                        // "a" is held until released, so a push meanwhile finds it running.
                        if k.1 == "a" {
                            let _ = release.wait_for(|r| *r).await;
                        }
                        log.lock().unwrap().push(format!("end {}", k.1));
                    }
                })
                .await;
            })
        };
        let wait_for = |want: usize| {
            let log = log.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while log.lock().unwrap().len() < want {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
                .expect("reconciles ran");
            }
        };
        wait_for(3).await; // start a, start b, end b
        q.push(key("a")); // while "a" runs
        q.push(key("a"));
        release_tx.send(true).unwrap();
        wait_for(6).await;
        stop_tx.send(()).unwrap();
        worker.await.unwrap();
        let log = log.lock().unwrap().clone();
        let a: Vec<_> = log.iter().filter(|l| l.ends_with(" a")).cloned().collect();
        assert_eq!(a, ["start a", "end a", "start a", "end a"], "never two at once; once more after");
        assert_eq!(log.iter().filter(|l| *l == "start b").count(), 1);
    }

    #[tokio::test]
    async fn no_more_than_the_concurrency_run_at_once_and_shutdown_lets_them_finish() {
        let q = Arc::new(Queue::default());
        for i in 0..20 {
            q.push(key(&format!("t{i}")));
        }
        let (now, most, ended) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let q2 = q.clone();
        let (n2, m2, e2) = (now.clone(), most.clone(), ended.clone());
        let worker = tokio::spawn(async move {
            q2.work(3, async { stop_rx.await.unwrap_or(()) }, |_| {
                let (now, most, ended) = (n2.clone(), m2.clone(), e2.clone());
                async move {
                    {
                        let mut n = now.lock().unwrap();
                        *n += 1;
                        let mut m = most.lock().unwrap();
                        *m = (*m).max(*n);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *now.lock().unwrap() -= 1;
                    *ended.lock().unwrap() += 1;
                }
            })
            .await;
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while *ended.lock().unwrap() < 5 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("reconciles ran");
        stop_tx.send(()).unwrap();
        worker.await.unwrap();
        assert_eq!(*most.lock().unwrap(), 3);
        assert_eq!(*now.lock().unwrap(), 0, "every started reconcile finished before work returned");
        let ended = *ended.lock().unwrap();
        assert!(ended < 20, "no new reconcile after shutdown ({ended} ran)");
    }
}
