//! The `ApiTokenPolicy` custom resource (design §6): cluster-scoped limits for the ApiTokens in
//! the namespaces it selects. A token must satisfy every policy that selects its namespace.

// printcolumn(...) repeats `type_ =` by design; the lint mistakes the macro input for attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::KubeSchema;
use kube::core::{Message, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration_rules::{DURATION_MAX_LEN, DURATION_PATTERN, cel_seconds};
use super::{PREFIX_PATTERN, SCOPE_PATTERN};

/// Grammar of an allowed-scope pattern: a scope where `*` matches any run of characters.
pub const SCOPE_GLOB_PATTERN: &str = r"^[a-z0-9*][a-zA-Z0-9*._/-]*:[a-z0-9*-]+$|^\*$";
/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
pub const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value (may be empty).
pub const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
/// The operators of a label selector requirement.
pub const SELECTOR_OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Limits for the ApiTokens in the namespaces this policy selects.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apitoken.dev",
    version = "v1alpha1",
    kind = "ApiTokenPolicy",
    status = "ApiTokenPolicyStatus",
    shortname = "apitokpol",
    category = "apitoken-operator",
    doc = "Limits (scopes, lifetimes, quotas, prefix, audiences) for ApiTokens in the namespaces it selects.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the policy is valid and in force"
    ),
    printcolumn(
        name = "Namespaces",
        type_ = "integer",
        json_path = ".status.selectedNamespaces",
        description = "Namespaces the policy selects"
    ),
    printcolumn(
        name = "Tokens",
        type_ = "integer",
        json_path = ".status.selectedTokens",
        description = "ApiTokens in the namespaces the policy selects"
    ),
    printcolumn(name = "Max Lifetime", type_ = "string", json_path = ".spec.lifetime.max"),
    printcolumn(name = "Per Creator", type_ = "integer", json_path = ".spec.maxActiveTokens.perCreator"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenPolicySpec {
    /// Namespaces this policy applies to. Absent or empty selects every namespace. Operators:
    /// In and NotIn (with values), Exists and DoesNotExist (without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "namespace_selector_schema")]
    pub namespace_selector: Option<LabelSelector>,

    /// Scopes a token may carry, as patterns where `*` matches anything (`metrics:*`,
    /// `pipeline/*:read`, `*`). Absent allows every scope; the creator's RBAC still applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = SCOPE_GLOB_PATTERN)))]
    pub allowed_scopes: Option<Vec<String>>,

    /// Named bundles of scopes tokens can ask for in `spec.permissionSets`, e.g.
    /// `read-only: [metrics:read, logs:read]`. Names are lower-case DNS names; each scope is
    /// `resource[/name]:verb`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "additionalProperties" = {"type": "array", "maxItems": 64, "items": {"type": "string", "pattern": SCOPE_PATTERN}},
        "maxProperties" = 64
    ))]
    pub permission_sets: BTreeMap<String, Vec<String>>,

    /// Lifetime limits.
    #[serde(default)]
    pub lifetime: LifetimePolicy,

    /// Quotas on tokens that are not revoked, expired or denied (a Failed token counts while it
    /// still holds an issued token).
    #[serde(default)]
    pub max_active_tokens: MaxActiveTokens,

    /// Rotation limits.
    #[serde(default)]
    pub rotation: RotationPolicy,

    /// Token prefix for the namespaces this policy selects (`[a-z][a-z0-9_]{1,15}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PREFIX_PATTERN))]
    pub prefix: Option<String>,

    /// Every token must name at least one audience.
    #[serde(default)]
    pub require_audiences: bool,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = positive_rule("default", "lifetime.default"))]
#[x_kube(validation = positive_rule("max", "lifetime.max"))]
#[x_kube(validation = default_within_max_rule())]
#[serde(rename_all = "camelCase")]
pub struct LifetimePolicy {
    /// Lifetime of tokens that do not set one (default 90d). At most `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LEN))]
    pub default: Option<String>,
    /// Longest lifetime a token may ask for (default 365d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LEN))]
    pub max: Option<String>,
    /// Whether `lifetime: never` is allowed (default false).
    #[serde(default)]
    pub allow_never: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MaxActiveTokens {
    /// Active tokens allowed in one namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub per_namespace: Option<u32>,
    /// Active tokens one creator may hold across the namespaces this policy selects. The
    /// creator is who created the ApiToken: for tokens applied by Argo CD or Flux that is their
    /// ServiceAccount, so use `perLabel` or `perNamespace` there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub per_creator: Option<u32>,
    /// Active tokens carrying the same value of a label on the ApiToken, across the namespaces
    /// this policy selects (e.g. one count per `team`). Tokens without the label are not
    /// counted by this quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_label: Option<LabelQuota>,
}

/// A quota counted per value of one label.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelQuota {
    /// The label key on the ApiToken, e.g. `team` or `example.com/owner`.
    #[schemars(regex(pattern = LABEL_KEY_PATTERN), length(max = 317))]
    pub label: String,
    /// Active tokens allowed per value of the label.
    #[schemars(range(min = 0))]
    pub max: u32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = positive_rule("maxGracePeriod", "rotation.maxGracePeriod"))]
#[serde(rename_all = "camelCase")]
pub struct RotationPolicy {
    /// Longest `rotation.gracePeriod` a token may ask for (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LEN))]
    pub max_grace_period: Option<String>,
}

/// What the operator observed about a policy. Written by the elected operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenPolicyStatus {
    /// Ready: True when the policy is valid and in force; False with the reason it cannot be
    /// applied (it then refuses new tokens in the namespaces it selects, in every namespace when
    /// its namespaceSelector is at fault, until it is fixed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Namespaces the policy selects.
    #[serde(default)]
    pub selected_namespaces: u32,
    /// ApiTokens (in any phase) in the namespaces the policy selects.
    #[serde(default)]
    pub selected_tokens: u32,
    /// The `metadata.generation` this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// `self.<field>`, when set, is longer than zero.
fn positive_rule(field: &str, shown: &str) -> Rule {
    let secs = cel_seconds(&format!("self.{field}"));
    Rule::new(format!("!has(self.{field}) || {secs} > 0"))
        .message(Message::Message(format!("{shown} must be longer than zero (e.g. 30d)")))
        .field_path(format!(".{field}"))
}

fn default_within_max_rule() -> Rule {
    let (default, max) = (cel_seconds("self.default"), cel_seconds("self.max"));
    Rule::new(format!("!has(self.default) || !has(self.max) || {default} <= {max}"))
        .message(Message::Message("lifetime.default must not be longer than lifetime.max".into()))
        .field_path(".default")
}

/// A label selector with bounded sizes (they bound the CEL cost) and its operators spelt out,
/// so the API server refuses a selector that could never be evaluated.
fn namespace_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "properties": {
            "matchLabels": {
                "type": "object",
                "maxProperties": 64,
                "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
                "description": "Labels the namespace must have, all of them."
            },
            "matchExpressions": {
                "type": "array",
                "maxItems": 32,
                "description": "Requirements on the namespace's labels, all of them.",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"type": "string", "maxLength": 317, "pattern": LABEL_KEY_PATTERN, "description": "The label key."},
                        "operator": {"type": "string", "enum": SELECTOR_OPERATORS, "description": "In, NotIn, Exists or DoesNotExist."},
                        "values": {
                            "type": "array",
                            "maxItems": 256,
                            "items": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
                            "description": "Label values: required (non-empty) for In and NotIn, empty for Exists and DoesNotExist."
                        }
                    },
                    "x-kubernetes-validations": [{
                        "rule": "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
                        "message": "namespaceSelector.matchExpressions: In and NotIn need at least one value; Exists and DoesNotExist take none"
                    }]
                }
            }
        }
    })
}
