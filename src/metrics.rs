//! Prometheus metrics (design §8). Labels are fixed strings, plus an ApiToken's namespace and
//! name on its expiry gauge (as cert-manager does for certificates); never a token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    pub endpoint: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub result: &'static str,
}

/// A leak report's outcome, per reported token (`true_positive`, `false_positive`) or per refused
/// request (`unauthorized`, `invalid`, `rate_limited`, `unavailable`), and who reported it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeakLabels {
    pub reporter: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// namespace/name of an ApiToken.
pub type TokenKey = (String, String);

/// What the per-token gauges need of one token, as the controller last saw it.
#[derive(Clone, Copy, Debug)]
struct TokenRecord {
    phase: &'static str,
    expires: Option<i64>,
    rotation: bool,
}

/// The expiry gauge of every token, written at scrape time from one record per token (a gauge
/// family kept a second copy of each token's labels and a gauge, forever).
#[derive(Debug, Default)]
struct Tokens(Mutex<HashMap<TokenKey, TokenRecord>>);

impl Collector for Tokens {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tokens = self.0.lock().expect("metrics lock");
        let mut family = encoder.encode_descriptor(
            "expiration_timestamp_seconds",
            "When each ApiToken's current token expires (Unix seconds)",
            None,
            MetricType::Gauge,
        )?;
        for ((namespace, name), record) in tokens.iter() {
            let Some(expires) = record.expires else { continue };
            // `rotation` is `enabled` or `disabled`: alerts care about tokens that will not rotate.
            let rotation = if record.rotation { "enabled" } else { "disabled" };
            let labels = [("namespace", namespace.as_str()), ("name", name.as_str()), ("rotation", rotation)];
            family.encode_family(&labels)?.encode_gauge(&expires)?;
        }
        Ok(())
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub verifications: Family<VerifyLabels, Counter>,
    pub verify_latency: Family<EndpointLabels, Histogram>,
    pub index_hashes: Gauge,
    pub rate_limited: Counter,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub tokens_by_phase: Family<PhaseLabels, Gauge>,
    pub leak_reports: Family<LeakLabels, Counter>,
    /// Each token's last phase (to move `tokens_by_phase`) and expiry.
    tokens: Arc<Tokens>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("apitoken");
        let verifications = Family::<VerifyLabels, Counter>::default();
        registry.register("verifications", "Verifications by endpoint and result", verifications.clone());
        let verify_latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            // 10 µs … ~40 ms: the decision itself is microseconds.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 2.0, 13))
        });
        registry.register(
            "verification_duration_seconds",
            "Time to decide a verification",
            verify_latency.clone(),
        );
        let index_hashes = Gauge::default();
        registry.register(
            "index_hashes",
            "Token hashes held by the verification index",
            index_hashes.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 after repeated failures",
            rate_limited.clone(),
        );
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by result (ok or an error category)", reconciles.clone());
        let reconcile_duration =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_duration.clone(),
        );
        let tokens_by_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "tokens",
            "ApiTokens by phase, as this controller last saw them",
            tokens_by_phase.clone(),
        );
        let leak_reports = Family::<LeakLabels, Counter>::default();
        registry.register(
            "leak_reports",
            "Leaked-token reports: each reported token (true_positive kills a token) and each refused request",
            leak_reports.clone(),
        );
        let tokens = Arc::new(Tokens::default());
        registry.register_collector(Box::new(tokens.clone()));
        Self {
            registry,
            verifications,
            verify_latency,
            index_hashes,
            rate_limited,
            reconciles,
            reconcile_duration,
            tokens_by_phase,
            leak_reports,
            tokens,
        }
    }
}

impl Metrics {
    /// Records a token's phase and expiry after a reconcile.
    pub fn observe_token(
        &self,
        key: (String, String),
        phase: &'static str,
        expires: Option<i64>,
        rotation: bool,
    ) {
        let mut tokens = self.tokens.0.lock().expect("metrics lock");
        let record = TokenRecord { phase, expires, rotation };
        match tokens.get_mut(&key) {
            Some(old) => {
                self.tokens_by_phase.get_or_create(&PhaseLabels { phase: old.phase }).dec();
                *old = record;
            }
            None => {
                tokens.insert(key, record);
            }
        }
        self.tokens_by_phase.get_or_create(&PhaseLabels { phase }).inc();
    }

    /// Forgets a deleted token.
    pub fn forget_token(&self, key: &(String, String)) {
        if let Some(old) = self.tokens.0.lock().expect("metrics lock").remove(key) {
            self.tokens_by_phase.get_or_create(&PhaseLabels { phase: old.phase }).dec();
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_gauges_move_with_the_phase_and_forget_deleted_tokens() {
        let m = Metrics::default();
        let key = ("ns".to_string(), "a".to_string());
        m.observe_token(key.clone(), "Active", Some(100), false);
        m.observe_token(key.clone(), "Active", Some(200), false);
        let text = m.encode();
        assert!(text.contains("apitoken_tokens{phase=\"Active\"} 1"), "{text}");
        assert!(
            text.contains(
                "apitoken_expiration_timestamp_seconds{namespace=\"ns\",name=\"a\",rotation=\"disabled\"} 200"
            ),
            "{text}"
        );
        m.observe_token(key.clone(), "Expired", None, false);
        m.forget_token(&key);
        let text = m.encode();
        assert!(
            text.contains("apitoken_tokens{phase=\"Active\"} 0")
                && text.contains("apitoken_tokens{phase=\"Expired\"} 0"),
            "{text}"
        );
        assert!(!text.contains("name=\"a\""), "{text}");
    }
}
