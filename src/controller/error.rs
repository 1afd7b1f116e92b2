//! The controller's one error type. `category` is a fixed label for metrics and logs.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The object changed since it was read; the reconcile is retried on the new version.
    #[error("the ApiToken changed while it was being reconciled; retrying")]
    Conflict,
    /// Writing the token Secret failed. Only the code and reason are kept: the request carried
    /// the token, and error text must never risk echoing it.
    #[error("writing the token Secret failed: HTTP {code} {reason}")]
    SecretWrite { code: u16, reason: String },
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

    pub(super) fn secret_write(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => Error::SecretWrite { code: s.code, reason: s.reason.clone() },
            _ => Error::SecretWrite { code: 0, reason: "transport error".into() },
        }
    }
}
