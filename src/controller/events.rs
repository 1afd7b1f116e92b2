//! Kubernetes Events (events.k8s.io/v1) for ApiTokens, as kube's `Recorder` publishes them, with
//! a bounded memory of what was published.
//!
//! kube's `Recorder` keeps every Event it published for six minutes, whole, to fold an exact
//! repeat into a series. One `Issued` Event per token made that cache the largest single item of
//! the operator's memory at 10,000 tokens (about 2 KB each, heaptrack). Here only the last
//! [`RECENT`] Events are remembered, and only what folding a repeat needs: a repeat (same type,
//! reason, action, note and object version) within [`TTL`] still becomes a series on the Event
//! already published rather than a new Event.

use std::collections::VecDeque;
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client};

/// Published Events remembered for folding repeats.
const RECENT: usize = 256;
/// How long a repeat is folded into the earlier Event (kube's `Recorder`: six minutes).
const TTL: SignedDuration = SignedDuration::from_mins(6);

/// An Event published recently: enough to recognise a repeat and extend its series.
struct Published {
    key: Key,
    name: String,
    count: i32,
    last: Timestamp,
}

/// What makes two Events the same (kube's `Recorder` compares the same fields; the reporter is
/// this publisher's own).
#[derive(PartialEq)]
struct Key {
    type_: EventType,
    reason: String,
    action: String,
    note: Option<String>,
    regarding: ObjectReference,
}

pub struct Publisher {
    client: Client,
    controller: String,
    instance: Option<String>,
    recent: Mutex<VecDeque<Published>>,
}

impl Publisher {
    pub fn new(client: Client, controller: String, instance: Option<String>) -> Self {
        Self { client, controller, instance, recent: Mutex::new(VecDeque::with_capacity(RECENT)) }
    }

    /// Publishes `ev` about `regarding` (a new Event, or the series of a recent identical one).
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = Key {
            type_: ev.type_,
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
            regarding: regarding.clone(),
        };
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let repeat = {
            let mut recent = self.recent.lock().expect("events lock");
            recent.retain(|p| p.last + TTL > now);
            recent.iter().position(|p| p.key == key).and_then(|i| recent.remove(i))
        };
        let published = match repeat {
            Some(mut p) => {
                p.count += 1;
                p.last = now;
                let series = EventSeries { count: p.count, last_observed_time: MicroTime(now) };
                let patch = serde_json::json!({ "series": series });
                events.patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                p
            }
            None => {
                let event = self.generate(ev, regarding, now);
                let name = event.metadata.name.clone().unwrap_or_default();
                events.create(&PostParams::default(), &event).await?;
                Published { key, name, count: 1, last: now }
            }
        };
        let mut recent = self.recent.lock().expect("events lock");
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(published);
        Ok(())
    }

    /// The Event kube's `Recorder` would create.
    fn generate(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: ev.note.as_deref().map(fit_note),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_ref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone().unwrap_or_else(|| self.controller.clone())),
            type_: Some(match ev.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            related: ev.secondary.clone(),
            ..K8sEvent::default()
        }
    }
}

/// The API server refuses an Event whose note is over 1 KiB: cut longer ones (a leak report's
/// location can be 2 KiB) at a character boundary, marked with an ellipsis.
fn fit_note(note: &str) -> String {
    const MAX: usize = 1024;
    if note.len() <= MAX {
        return note.to_string();
    }
    let mut end = MAX - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::fit_note;

    #[test]
    fn long_notes_are_cut_to_what_the_api_server_takes() {
        assert_eq!(fit_note("short"), "short");
        let long = "é".repeat(700);
        let cut = fit_note(&long);
        assert!(cut.len() <= 1024 && cut.ends_with('…'), "{}", cut.len());
    }
}
