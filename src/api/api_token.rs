//! The `ApiToken` custom resource (design §3 spec, §4 status).
//!
//! Doc comments on fields become the schema descriptions `kubectl explain` shows: write them for
//! the person reading the manifest.

// printcolumn(...) repeats `type_ =` by design; the lint mistakes the macro input for attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::KubeSchema;
use kube::core::Message;
use kube::core::Rule;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration_rules::{DURATION_MAX_LEN, DURATION_PATTERN, LIFETIME_PATTERN, cel_seconds};

/// Annotation whose every new value rotates the token now (`kubectl annotate`, the plugin).
pub const ROTATE_ANNOTATION: &str = "apitoken.dev/rotate";
/// Secret keys the operator owns; `secret.extraKeys` may not use them.
pub const RESERVED_SECRET_KEYS: [&str; 4] = ["token", "token-id", "expires-at", "scopes"];

/// Grammar of one scope: `resource[/name]:verb`, verb may be `*`.
pub const SCOPE_PATTERN: &str =
    r"^[a-z][a-z0-9-]{0,62}(/[A-Za-z0-9][A-Za-z0-9._-]{0,252})?:(\*|[a-z][a-z0-9-]{0,31})$";
/// Grammar of one audience (tenant, organisation, service name or URL-like identifier).
pub const AUDIENCE_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}$";
/// Grammar of a token prefix (design §2).
pub const PREFIX_PATTERN: &str = r"^[a-z][a-z0-9_]{1,15}$";
/// A Kubernetes object name (DNS subdomain).
pub const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// An API token the operator issues into a Secret, rotates before expiry and verifies.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apitoken.dev",
    version = "v1alpha1",
    kind = "ApiToken",
    namespaced,
    status = "ApiTokenStatus",
    shortname = "apitok",
    // Not `apitoken`: a category named like the singular makes kubectl expand `kubectl get
    // apitoken NAME` to every kind in the category ("you must specify only one resource").
    category = "apitoken-operator",
    doc = "An API token issued into a Secret, rotated before expiry, and verified by the apitoken-operator.",
    validation = name_length_rule(),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether a valid token is in the Secret"
    ),
    printcolumn(
        name = "Token",
        type_ = "string",
        json_path = ".status.display",
        description = "Display form of the current token"
    ),
    printcolumn(
        name = "Scopes",
        type_ = "string",
        json_path = ".status.scopeSummary",
        description = "Effective scopes (the first few)"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(name = "Last Used", type_ = "date", json_path = ".status.lastUsedAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Secret",
        type_ = "string",
        json_path = ".status.secretName",
        description = "The Secret holding the token",
        priority = "1"
    ),
    printcolumn(
        name = "Rotations",
        type_ = "integer",
        json_path = ".status.rotationCount",
        description = "Rotations since creation",
        priority = "1"
    ),
    printcolumn(
        name = "Creator",
        type_ = "string",
        json_path = ".status.createdBy",
        description = "Who created the ApiToken",
        priority = "1"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        description = "The Ready condition's message",
        priority = "1"
    )
)]
#[x_kube(validation = renew_before_rule())]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenSpec {
    /// Human-readable name shown in token lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,

    /// What the token is for and who uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,

    /// Scopes granted to the token, each `resource[/name]:verb`, e.g. `metrics:read` or
    /// `pipeline/prod-east:write`; the verb may be `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = SCOPE_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub scopes: Vec<String>,

    /// Named bundles of scopes defined by an ApiTokenPolicy (e.g. `read-only`, `data-access`,
    /// `full`), expanded into `status.effectiveScopes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub permission_sets: Vec<String>,

    /// Who the token is bound to (tenant, organisation, service). When set, a verification must
    /// name one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = AUDIENCE_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub audiences: Vec<String>,

    /// How long each issued token is valid: a duration such as `7d`, `30d`, `90d`, `12h`, `1w2d`
    /// (units s, m, h, d, w), or `never` where a policy allows it. Defaults to the policy's
    /// default, else 90d. Changing it keeps the token value and moves its expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = LIFETIME_PATTERN), length(max = DURATION_MAX_LEN))]
    #[x_kube(validation = positive_rule("self == 'never' || ", "lifetime"))]
    pub lifetime: Option<String>,

    /// Automatic and on-demand rotation.
    #[serde(default)]
    pub rotation: RotationSpec,

    /// `true` makes the token inactive at once and removes its Secret; setting it back to
    /// `false` issues a new token with the same configuration.
    #[serde(default)]
    pub revoked: bool,

    /// The Secret the token is written to.
    #[serde(default)]
    pub secret: SecretSpec,

    /// Deployments, StatefulSets and DaemonSets in this namespace to roll after each rotation
    /// (their pod template gets the annotation `apitoken.dev/token-id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub restart_targets: Vec<RestartTarget>,

    /// Token prefix (`[a-z][a-z0-9_]{1,15}`), shown to people and secret scanners. Defaults to
    /// the policy's prefix, else `apitok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PREFIX_PATTERN))]
    pub prefix: Option<String>,
}

/// When and how the token is rotated.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = grace_period_rule())]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Rotate automatically before expiry. When `false` the token expires and its Secret is
    /// removed.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Rotate when this close to expiry (a duration such as `30d`). Defaults to a third of the
    /// lifetime. Must be shorter than `lifetime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LEN))]
    #[x_kube(validation = positive_rule("", "rotation.renewBefore"))]
    pub renew_before: Option<String>,

    /// How long the previous token stays valid after a rotation, at most 24h. Defaults to 10m.
    /// Consumers that mount the Secret see the new token only after the kubelet's next sync (up to
    /// about 2m): a shorter grace period can cut them off and is reported (SafeGracePeriod=False).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LEN))]
    #[x_kube(validation = positive_rule("", "rotation.gracePeriod"))]
    pub grace_period: Option<String>,

    /// Any string; every change rotates the token now (GitOps: bump it in Git).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub trigger: Option<String>,
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self { enabled: true, renew_before: None, grace_period: None, trigger: None }
    }
}

fn default_true() -> bool {
    true
}

/// The Secret the token is written to (type `apitoken.dev/token`, same namespace).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpec {
    /// Name of the Secret. Defaults to the ApiToken's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_SUBDOMAIN_PATTERN), length(max = 253))]
    pub name: Option<String>,

    /// Labels copied onto the Secret (e.g. for Reloader or replication tools). Keys and values
    /// follow Kubernetes' label syntax (values at most 63 characters).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = keys_rule("secret.labels"))]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}
    ))]
    pub labels: BTreeMap<String, String>,

    /// Annotations copied onto the Secret. Keys follow Kubernetes' annotation key syntax.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = keys_rule("secret.annotations"))]
    #[schemars(extend("maxProperties" = 32))]
    pub annotations: BTreeMap<String, String>,

    /// Extra keys rendered from the token, e.g. `authorization: "Bearer {{token}}"`. `{{token}}`
    /// and `{{tokenId}}` are replaced. The keys `token`, `token-id`, `expires-at` and `scopes`
    /// are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = extra_keys_rule())]
    #[schemars(extend("maxProperties" = 16))]
    pub extra_keys: BTreeMap<String, String>,
}

/// A workload rolled after each rotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RestartTarget {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: RestartKind,
    /// Name of the workload in the ApiToken's namespace.
    #[schemars(regex(pattern = DNS_SUBDOMAIN_PATTERN), length(max = 253))]
    pub name: String,
}

/// Workload kinds that can be rolled.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// Lifecycle phase of an ApiToken.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not issued yet.
    #[default]
    Pending,
    /// A valid token is in the Secret.
    Active,
    /// Past its expiry with rotation off; the Secret is removed.
    Expired,
    /// `spec.revoked` is true; the Secret is removed.
    Revoked,
    /// Refused by policy; nothing is issued.
    Denied,
    /// The spec cannot be issued (see the Ready condition).
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Active => "Active",
            Phase::Expired => "Expired",
            Phase::Revoked => "Revoked",
            Phase::Denied => "Denied",
            Phase::Failed => "Failed",
        }
    }
}

/// Observed state of an ApiToken. Holds hashes and display forms only, never a token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenStatus {
    /// Pending, Active, Expired, Revoked, Denied or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, Issued, PolicyCompliant and Expiring, with reasons.
    // Atomic: only the operator writes them, always all at once. As a map keyed by type, the
    // operator's managedFields entry named every field of every condition (740 of a stored
    // ApiToken's 3,200 bytes), decoded again when a restarted API server fills its cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    pub conditions: Vec<Condition>,
    /// Public id of the current token (never enough to authenticate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// Display form of the current token: `<prefix>_<id>…<last 4>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// `sha256:<hex>` of the current token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    /// `sha256:<hex>` of the token before the last rotation, valid until `previousValidUntil`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_hash: Option<String>,
    /// End of the previous token's grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<Time>,
    /// When the current token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When the current token expires (absent for `never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the current token will be rotated (absent when rotation is off or it never expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<Time>,
    /// Last successful verification (written at most once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,
    /// Number of rotations since creation.
    #[serde(default)]
    pub rotation_count: i64,
    /// The `metadata.generation` this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `rotation.trigger` value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_trigger: Option<String>,
    /// The `apitoken.dev/rotate` annotation value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_rotate_annotation: Option<String>,
    /// Name of the Secret holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Scopes in force after expanding permission sets and applying policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective_scopes: Vec<String>,
    /// `effectiveScopes` for people: the first few, comma separated (the SCOPES column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_summary: Option<String>,
    /// Who created the ApiToken (from the admission request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Tokens of this ApiToken reported leaked, oldest first (the last 16): each is rejected by
    /// every verifier for good, whatever else the status says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub leaks: Vec<LeakRecord>,
}

/// The most leak records a status keeps: older ones name tokens long replaced.
pub const MAX_LEAK_RECORDS: usize = 16;

/// A token reported leaked: its hash and where it was found, never the token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeakRecord {
    /// `sha256:<hex>` of the leaked token.
    pub token_hash: String,
    /// Display form of the leaked token, `<prefix>_<id>…<last 4>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// When the report was accepted.
    pub reported_at: Time,
    /// Who reported it: `github` (secret scanning) or the Kubernetes user who did.
    pub reporter: String,
    /// Where it was found (the report's `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

fn renew_before_rule() -> Rule {
    let renew = cel_seconds("self.rotation.renewBefore");
    let life = cel_seconds("self.lifetime");
    let default_life = DEFAULT_LIFETIME_SECONDS;
    Rule::new(format!(
        "!has(self.rotation) || !has(self.rotation.renewBefore) || \
         (has(self.lifetime) ? (self.lifetime == 'never' || {renew} < {life}) : {renew} < {default_life})"
    ))
    .message(Message::Message(
        "rotation.renewBefore must be shorter than lifetime (90d when lifetime is not set; a policy's \
         default may be shorter: set lifetime explicitly)"
            .into(),
    ))
    .field_path(".rotation.renewBefore")
}

/// The lifetime of a token whose spec and policies set none (design §3).
const DEFAULT_LIFETIME_SECONDS: i64 = 90 * 86_400;

/// `field` must be longer than zero (`0d` and `0s` follow the grammar but mean nothing).
fn positive_rule(unless: &str, field: &str) -> Rule {
    Rule::new(format!("{unless}{} > 0", cel_seconds("self")))
        .message(Message::Message(format!("{field} must be longer than zero")))
}

/// The name goes into the Secret's `apitoken.dev/name` label, and label values are at most
/// 63 characters: refuse a longer name up front rather than fail at the Secret write.
fn name_length_rule() -> Rule {
    Rule::new("size(self.metadata.name) <= 63").message(Message::Message(
        "metadata.name must be at most 63 characters (it is written into the Secret's apitoken.dev/name label)"
            .into(),
    ))
}

/// A label value: empty, or at most 63 characters of the label alphabet, starting and ending
/// alphanumeric (plain OpenAPI: CEL over map values costs more than the schema's budget).
const LABEL_VALUE: &str = "^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";

/// Keys of `field`: Kubernetes qualified names, `[prefix/]name`. CEL's cost budget allows only a
/// short expression over map keys; the API server checks the finer points (lengths) at the
/// Secret write, which the status then reports.
fn keys_rule(field: &str) -> Rule {
    Rule::new("self.all(k, k.matches('^([-.a-z0-9]+/)?[A-Za-z0-9]([-._A-Za-z0-9]*[A-Za-z0-9])?$'))").message(
        Message::Message(format!(
            "{field}: keys must be qualified names, [prefix/]name, e.g. example.com/team: letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )),
    )
}
fn grace_period_rule() -> Rule {
    let grace = cel_seconds("self.gracePeriod");
    Rule::new(format!("!has(self.gracePeriod) || {grace} <= 86400"))
        .message(Message::Message("rotation.gracePeriod must be at most 24h".into()))
        .field_path(".gracePeriod")
}

fn extra_keys_rule() -> Rule {
    let reserved = RESERVED_SECRET_KEYS.map(|k| format!("'{k}'")).join(", ");
    Rule::new(format!("self.all(k, !(k in [{reserved}]) && k.matches('^[-._a-zA-Z0-9]{{1,253}}$'))")).message(
        Message::Message(format!(
            "secret.extraKeys: keys must be valid Secret keys and not one of {reserved}"
        )),
    )
}
