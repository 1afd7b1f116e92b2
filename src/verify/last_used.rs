//! `status.lastUsedAt`, written back at most once a minute per token by this process.
//! Requests only `try_send` into a bounded channel: a busy API server never slows verification,
//! and under overload an update is dropped rather than queued without bound. A request sends
//! the shared token metadata (a reference count, no copy); the writer makes the key.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::debug;

use super::index::TokenMeta;
use crate::api::ApiToken;

pub const DEBOUNCE: Duration = Duration::from_secs(60);
#[allow(clippy::cast_possible_wrap)]
const DEBOUNCE_SECS: i64 = DEBOUNCE.as_secs() as i64;

#[derive(Clone)]
pub struct LastUsed {
    tx: Option<mpsc::Sender<Arc<TokenMeta>>>,
}

impl LastUsed {
    /// A recorder that writes nothing (verification-only tests, benchmarks).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// A use of the token at `now`. The writer writes at most one use per token a minute, so
    /// only a use it would write is handed over: most requests touch one atomic and wake nobody.
    pub fn record(&self, meta: &Arc<TokenMeta>, now: Timestamp) {
        let Some(tx) = &self.tx else { return };
        let now = now.as_second();
        let sent = meta.last_use_sent.load(Ordering::Relaxed);
        if sent != 0 && now.saturating_sub(sent) < DEBOUNCE_SECS {
            return;
        }
        // One of several concurrent requests hands the use over.
        if meta.last_use_sent.compare_exchange(sent, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let _ = tx.try_send(meta.clone());
        }
    }
}

/// Decides which uses to write: the first use of a token, then at most one per `DEBOUNCE`.
#[derive(Default)]
pub struct Debouncer {
    last: HashMap<(String, String), Instant>,
}

impl Debouncer {
    pub fn due(&mut self, key: &(String, String), now: Instant) -> bool {
        match self.last.get(key) {
            Some(t) if now.duration_since(*t) < DEBOUNCE => false,
            _ => {
                self.last.insert(key.clone(), now);
                true
            }
        }
    }

    pub fn forget_older_than(&mut self, now: Instant) {
        self.last.retain(|_, t| now.duration_since(*t) < DEBOUNCE);
    }
}

/// Starts the writer; returns the handle requests use.
pub fn start(client: Client) -> LastUsed {
    let (tx, mut rx) = mpsc::channel::<Arc<TokenMeta>>(4096);
    tokio::spawn(async move {
        let mut debouncer = Debouncer::default();
        let mut sweeps = 0u32;
        while let Some(meta) = rx.recv().await {
            let key = (meta.namespace().to_string(), meta.name().to_string());
            let now = Instant::now();
            if !debouncer.due(&key, now) {
                continue;
            }
            let api: Api<ApiToken> = Api::namespaced(client.clone(), &key.0);
            let stamp = Timestamp::from_second(Timestamp::now().as_second()).expect("in range");
            let patch = json!({"status": {"lastUsedAt": stamp.to_string()}});
            let pp = PatchParams {
                field_manager: Some("apitoken-operator-verify".into()),
                ..PatchParams::default()
            };
            if let Err(e) = api.patch_status(&key.1, &pp, &Patch::Merge(&patch)).await {
                debug!(namespace = key.0, name = key.1, error = %e, "writing lastUsedAt failed");
            }
            sweeps += 1;
            if sweeps.is_multiple_of(1024) {
                debouncer.forget_older_than(now);
            }
        }
    });
    LastUsed { tx: Some(tx) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_write_per_minute_per_token() {
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        let a = ("ns".to_string(), "a".to_string());
        let b = ("ns".to_string(), "b".to_string());
        assert!(d.due(&a, t0));
        assert!(!d.due(&a, t0 + Duration::from_secs(59)));
        assert!(d.due(&b, t0 + Duration::from_secs(1)));
        assert!(d.due(&a, t0 + Duration::from_secs(60)));
        d.forget_older_than(t0 + Duration::from_secs(200));
        assert!(d.last.is_empty());
    }
}
