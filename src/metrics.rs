//! Prometheus metrics (design §8). Labels are fixed strings: never a token, never a name a
//! client chose.

use prometheus_client::encoding::EncodeLabelSet;
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

pub struct Metrics {
    pub registry: Registry,
    pub verifications: Family<VerifyLabels, Counter>,
    pub verify_latency: Family<EndpointLabels, Histogram>,
    pub index_hashes: Gauge,
    pub rate_limited: Counter,
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
        Self { registry, verifications, verify_latency, index_hashes, rate_limited }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
