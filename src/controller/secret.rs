//! The token Secret: rendering it (pure) and reading what an existing one holds.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::api::ObjectMeta;

use crate::api::ApiToken;
use crate::core::plan::SecretState;
use crate::core::token::{self, Plaintext};

pub const SECRET_TYPE: &str = "apitoken.dev/token";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "apitoken-operator";
pub const NAME_LABEL: &str = "apitoken.dev/name";

/// Everything the Secret shows besides the token itself.
pub struct SecretContent<'a> {
    pub token: &'a Plaintext,
    pub token_id: &'a str,
    pub expires_at: Option<Timestamp>,
    pub scopes: &'a [String],
}

/// The Secret name an ApiToken wants.
pub fn desired_name(at: &ApiToken) -> String {
    at.spec.secret.name.clone().unwrap_or_else(|| at.metadata.name.clone().unwrap_or_default())
}

/// Renders the Secret for `at` (design §3): type, keys, extra keys, labels, controller owner.
pub fn render(at: &ApiToken, name: &str, content: &SecretContent<'_>) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put("token", content.token.expose());
    put("token-id", content.token_id);
    put("expires-at", &content.expires_at.map(|t| t.to_string()).unwrap_or_default());
    put("scopes", &content.scopes.join(" "));
    for (key, template) in &at.spec.secret.extra_keys {
        let rendered = zeroize::Zeroizing::new(
            template.replace("{{token}}", content.token.expose()).replace("{{tokenId}}", content.token_id),
        );
        put(key, &rendered);
    }
    let mut labels = at.spec.secret.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(NAME_LABEL.into(), at.metadata.name.clone().unwrap_or_default());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: at.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: (!at.spec.secret.annotations.is_empty()).then(|| at.spec.secret.annotations.clone()),
            owner_references: at.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Is `secret` controlled by `at` (so the operator may change or delete it)?
pub fn owned_by(secret: &Secret, at: &ApiToken) -> bool {
    let uid = at.metadata.uid.as_deref();
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// The token an existing Secret holds, if any.
pub fn stored_token(secret: &Secret) -> Option<Plaintext> {
    let bytes = secret.data.as_ref()?.get("token")?;
    std::str::from_utf8(&bytes.0).ok().map(token::plaintext_from_stored)
}

/// Does `actual` carry everything `wanted` renders (keys, type, labels, annotations, owner)?
pub fn in_sync(actual: &Secret, wanted: &Secret) -> bool {
    fn subset<V: PartialEq>(want: Option<&BTreeMap<String, V>>, have: Option<&BTreeMap<String, V>>) -> bool {
        want.iter().flat_map(|m| m.iter()).all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
    }
    actual.type_ == wanted.type_
        && subset(wanted.data.as_ref(), actual.data.as_ref())
        && subset(wanted.metadata.labels.as_ref(), actual.metadata.labels.as_ref())
        && subset(wanted.metadata.annotations.as_ref(), actual.metadata.annotations.as_ref())
        && actual.metadata.name == wanted.metadata.name
}

/// Compares the stored token with the hashes in the status.
pub fn state_of(
    stored: Option<&Plaintext>,
    token_hash: Option<&str>,
    previous_hash: Option<&str>,
    in_sync: bool,
) -> SecretState {
    let Some(stored) = stored else {
        return SecretState::Missing;
    };
    let h = token::hash(stored.expose());
    if Some(h.as_str()) == token_hash {
        SecretState::Current { in_sync }
    } else if Some(h.as_str()) == previous_hash {
        SecretState::Previous
    } else {
        SecretState::Foreign
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiTokenSpec;
    use rand::SeedableRng;

    fn api_token() -> ApiToken {
        let mut at = ApiToken::new("ci", ApiTokenSpec::default());
        at.metadata.namespace = Some("team".into());
        at.metadata.uid = Some("uid-1".into());
        at.spec.secret.extra_keys.insert("authorization".into(), "Bearer {{token}}".into());
        at.spec.secret.labels.insert("reloader".into(), "on".into());
        at
    }

    #[test]
    fn renders_the_design_shape_and_detects_drift() {
        let at = api_token();
        let t = token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(1));
        let scopes = vec!["a:read".to_string(), "b:write".to_string()];
        let content =
            SecretContent { token: &t.plaintext, token_id: &t.id, expires_at: None, scopes: &scopes };
        let s = render(&at, "ci", &content);
        assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
        let data = s.data.as_ref().unwrap();
        assert_eq!(data["token"].0, t.plaintext.expose().as_bytes());
        assert_eq!(data["scopes"].0, b"a:read b:write");
        assert_eq!(data["expires-at"].0, b"");
        assert_eq!(data["authorization"].0, format!("Bearer {}", t.plaintext.expose()).as_bytes());
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels[NAME_LABEL], "ci");
        assert!(owned_by(&s, &at));
        assert!(in_sync(&s, &s));

        let mut drifted = s.clone();
        drifted.data.as_mut().unwrap().insert("scopes".into(), ByteString(b"a:read".to_vec()));
        assert!(!in_sync(&drifted, &s));

        let stored = stored_token(&s).unwrap();
        assert_eq!(
            state_of(Some(&stored), Some(&t.hash), None, true),
            SecretState::Current { in_sync: true }
        );
        assert_eq!(state_of(Some(&stored), Some("sha256:x"), Some(&t.hash), true), SecretState::Previous);
        assert_eq!(state_of(Some(&stored), Some("sha256:x"), None, true), SecretState::Foreign);
        assert_eq!(state_of(None, Some("sha256:x"), None, true), SecretState::Missing);
    }
}
