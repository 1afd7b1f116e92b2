//! The controller's one error type. `category` is a fixed label for metrics and logs.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The object changed since it was read; the reconcile is retried on the new version.
    #[error("the ApiToken changed while it was being reconciled; retrying")]
    Conflict,
    /// Writing the token Secret failed. The request carried the token: `message` is the API
    /// server's text with every value the Secret carried cut out (see [`scrub`]).
    #[error("writing the token Secret failed: HTTP {code} {reason}: {message}")]
    SecretWrite { code: u16, reason: String, message: String },
    #[error("encoding a request failed: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the ApiToken has no namespace")]
    MissingNamespace,
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Conflict => "conflict",
            Error::SecretWrite { .. } => "secret_write",
            Error::Encode(_) => "encode",
            Error::MissingNamespace => "missing_namespace",
        }
    }

    /// `e` from a Secret write whose values were `secrets` (each also checked in base64, as
    /// they travelled).
    pub(super) fn secret_write(e: &kube::Error, secrets: &[&[u8]]) -> Self {
        match e {
            kube::Error::Api(s) => Error::SecretWrite {
                code: s.code,
                reason: s.reason.clone(),
                message: scrub(&s.message, secrets),
            },
            _ => Error::SecretWrite {
                code: 0,
                reason: "transport error".into(),
                message: "the API server could not be reached".into(),
            },
        }
    }

    /// A refusal that only a change of the ApiToken can fix (invalid labels, annotations, keys).
    pub fn is_invalid_secret(&self) -> bool {
        matches!(self, Error::SecretWrite { code: 400 | 422, .. })
    }
}

/// Longest API-server message kept in a status or Event.
const MAX_MESSAGE: usize = 1024;

/// `message` with every occurrence of each value in `secrets` (raw and base64) replaced, cut to
/// [`MAX_MESSAGE`] characters. Values shorter than 8 bytes (empty keys, `token-id`s of public
/// ids) are not secrets and are left alone so the message stays readable.
pub fn scrub(message: &str, secrets: &[&[u8]]) -> String {
    let mut out = message.to_string();
    for value in secrets.iter().filter(|v| v.len() >= 8) {
        let b64 = serde_json::to_string(&k8s_openapi::ByteString(value.to_vec())).unwrap_or_default();
        for needle in [String::from_utf8_lossy(value).into_owned(), b64.trim_matches('"').to_string()] {
            if !needle.is_empty() {
                out = out.replace(&needle, "[redacted]");
            }
        }
    }
    out.chars().take(MAX_MESSAGE).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_cuts_every_secret_value_raw_and_in_base64() {
        let token = b"apitok_AAAAAAAABBBBBBBBBBCCCCCCCCCCDDDDDDDDDDEEEEEEEEEE123456";
        let bearer = [b"Bearer ".as_slice(), token].concat();
        let b64 = serde_json::to_string(&k8s_openapi::ByteString(bearer.clone())).unwrap();
        let message = format!(
            "Secret \"ci\" is invalid: metadata.labels: Invalid value: \"bad value!\"; data: {} {}",
            String::from_utf8_lossy(token),
            b64.trim_matches('"')
        );
        let clean = scrub(&message, &[token, &bearer, b"abc"]);
        assert!(!clean.contains("apitok_"), "{clean}");
        assert!(!clean.contains(b64.trim_matches('"')), "{clean}");
        assert!(clean.contains("metadata.labels: Invalid value: \"bad value!\""), "{clean}");
        assert_eq!(scrub(&"x".repeat(5000), &[]).len(), MAX_MESSAGE);
    }
}
