//! The `ApiTokenPolicy` custom resource (design §6): cluster-scoped limits for the ApiTokens in
//! the namespaces it selects. A token must satisfy every policy that selects its namespace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration_rules::{DURATION_MAX_LEN, DURATION_PATTERN};
use super::{DNS_SUBDOMAIN_PATTERN, PREFIX_PATTERN};

/// Grammar of an allowed-scope pattern: a scope where `*` matches any run of characters.
pub const SCOPE_GLOB_PATTERN: &str = r"^[a-z0-9*][a-zA-Z0-9*._/-]*:[a-z0-9*-]+$|^\*$";

/// Limits for the ApiTokens in the namespaces this policy selects.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apitoken.dev",
    version = "v1alpha1",
    kind = "ApiTokenPolicy",
    shortname = "apitokpol",
    category = "apitoken",
    doc = "Limits (scopes, lifetimes, quotas, prefix, audiences) for ApiTokens in the namespaces it selects.",
    printcolumn(name = "Max Lifetime", type_ = "string", json_path = ".spec.lifetime.max"),
    printcolumn(name = "Per Creator", type_ = "integer", json_path = ".spec.maxActiveTokens.perCreator"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokenPolicySpec {
    /// Namespaces this policy applies to. Absent or empty selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Scopes a token may carry, as patterns where `*` matches anything (`metrics:*`,
    /// `pipeline/*:read`, `*`). Absent allows every scope; the creator's RBAC still applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = SCOPE_GLOB_PATTERN)))]
    pub allowed_scopes: Option<Vec<String>>,

    /// Named bundles of scopes tokens can ask for in `spec.permissionSets`, e.g.
    /// `read-only: [metrics:read, logs:read]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = {"pattern": DNS_SUBDOMAIN_PATTERN}))]
    pub permission_sets: BTreeMap<String, Vec<String>>,

    /// Lifetime limits.
    #[serde(default)]
    pub lifetime: LifetimePolicy,

    /// Quotas on tokens that are not revoked, expired or denied.
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

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LifetimePolicy {
    /// Lifetime of tokens that do not set one (default 90d).
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
    /// Active tokens one creator may hold across the namespaces this policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub per_creator: Option<u32>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationPolicy {
    /// Longest `rotation.gracePeriod` a token may ask for (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LEN))]
    pub max_grace_period: Option<String>,
}
