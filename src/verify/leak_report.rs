//! Leak reports (issue 13) in GitHub's secret scanning partner format: the pieces the HTTP layer
//! puts together, pure except for [`KeysFile`], which reads the public keys from a file.
//!
//! A report is `POST`ed as a JSON array of `{token, type, url, source}` with the headers
//! [`KEY_ID_HEADER`] and [`SIGNATURE_HEADER`]: base64 of a DER ECDSA P-256/SHA-256 signature of
//! the raw body by one of the keys in GitHub's public-keys document. The answer is GitHub's
//! partner feedback array ([`Feedback`]), one entry per reported token, naming each token by its
//! SHA-256 only.
//!
//! The flow the HTTP layer implements:
//! 1. refuse bodies over [`MAX_BODY_BYTES`] (413) before reading them whole;
//! 2. [`verify_signature`] over the raw bytes with [`KeysFile::keys`] — any error is 401 and
//!    nothing changes;
//! 3. [`parse_report`] — an error is 400 with the error's text (it never holds the body);
//! 4. for each [`ReportedToken`]: [`ReportedToken::well_formed`] fails → `false_positive`
//!    without a lookup; otherwise look up [`ReportedToken::hash`] in the index; answer with
//!    [`feedback_body`].
//!
//! Crate choice: `ring` (`ECDSA_P256_SHA256_ASN1`), not `p256`. ring is already compiled into the
//! operator (rustls, kube and rcgen use it), is maintained by the rustls team and verifies P-256
//! with BoringSSL's constant-time code; p256 would add about fifteen RustCrypto crates to build
//! and audit for one verification. What ring does not do we do here, small and tested: take the
//! SEC1 point out of the PEM SubjectPublicKeyInfo (checking that it is an id-ecPublicKey on
//! prime256v1, and naming what it is otherwise), and check the DER shape of a signature so that
//! "not DER" and "wrong signature" are told apart for logs and metrics (ring says only "no").

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use serde::Serialize;
use serde_json::Value;
use tokio_rustls::rustls::pki_types::SubjectPublicKeyInfoDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::core::token::{self, Plaintext};

/// The header naming the key that signed the body (GitHub's spelling; HTTP header names are
/// case-insensitive, this is the lowercase form `http::HeaderName` wants).
pub const KEY_ID_HEADER: &str = "github-public-key-identifier";
/// The header holding base64 of the DER ECDSA P-256/SHA-256 signature of the raw body.
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";
/// The largest body the endpoint reads (413 beyond). A full report of [`MAX_ENTRIES`] with
/// GitHub's usual fields (a blob URL of about 150 bytes) is about 30 KB; the per-field limits
/// below bound each entry, this bounds the whole.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Entries in one report.
pub const MAX_ENTRIES: usize = 100;
/// Bytes of `token`. Our tokens are at most 71 (16-character prefix, `_`, 54).
pub const MAX_TOKEN_LEN: usize = 256;
/// Bytes of `type` and of `source`.
pub const MAX_TYPE_LEN: usize = 128;
/// Bytes of `url`.
pub const MAX_URL_LEN: usize = 2048;
/// Characters of the signature header (a DER P-256 signature is at most 72 bytes: 96 in base64).
pub const MAX_SIGNATURE_B64_LEN: usize = 256;
/// The largest public-keys file read (GitHub's document is about 1 KB per key).
pub const MAX_KEYS_FILE_BYTES: u64 = 1024 * 1024;
/// `token_type` answered for an entry that named no `type` (GitHub always names one: the name
/// the partner registered, which is echoed back).
pub const DEFAULT_TOKEN_TYPE: &str = "apitoken_operator_token";

// ---------------------------------------------------------------------------------------------
// Public keys

/// One P-256 key of GitHub's public-keys document.
#[derive(Clone, PartialEq, Eq)]
struct PublicKey {
    id: String,
    current: bool,
    /// The SEC1 uncompressed point (`04 || X || Y`), what ring verifies with.
    point: Vec<u8>,
}

/// The keys GitHub may sign reports with: every key the document lists, current or not (GitHub
/// signs with any listed key, and a key stays listed for a while after it stops being current).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKeys {
    keys: Vec<PublicKey>,
}

impl fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|k| (k.id.as_str(), k.current))).finish()
    }
}

/// Why a public-keys document cannot be used. Messages name the entry or key identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("the public-keys document is not JSON (syntax error at line {line}, column {column})")]
    NotJson { line: usize, column: usize },
    #[error(
        "the public-keys document has no \"public_keys\" array (expected the document served at \
         https://api.github.com/meta/public_keys/secret_scanning)"
    )]
    NoKeyList,
    #[error("public_keys[{index}]: {problem}")]
    BadEntry { index: usize, problem: &'static str },
    #[error("public key {key_id:?} appears twice in the document")]
    DuplicateId { key_id: String },
    #[error("public key {key_id:?}: \"key\" is not a PEM \"PUBLIC KEY\" block (SubjectPublicKeyInfo)")]
    NotPem { key_id: String },
    #[error(
        "public key {key_id:?} is {found}, not an ECDSA P-256 key: GitHub signs secret scanning \
         reports with ECDSA P-256/SHA-256"
    )]
    NotP256 { key_id: String, found: &'static str },
    #[error("the public-keys document lists no key")]
    NoKeys,
}

impl PublicKeys {
    /// Parses GitHub's public-keys document:
    /// `{"public_keys": [{"key_identifier": "…", "key": "-----BEGIN PUBLIC KEY-----…", "is_current": true}]}`.
    /// Every key must be P-256: a document with one that is not is refused whole (it is not
    /// GitHub's document, or GitHub changed its algorithm and this code must follow).
    pub fn parse(json: &[u8]) -> Result<Self, KeysError> {
        let doc: Value = serde_json::from_slice(json)
            .map_err(|e| KeysError::NotJson { line: e.line(), column: e.column() })?;
        let list = doc.get("public_keys").and_then(Value::as_array).ok_or(KeysError::NoKeyList)?;
        let mut keys: Vec<PublicKey> = Vec::with_capacity(list.len());
        for (index, entry) in list.iter().enumerate() {
            let bad = |problem| KeysError::BadEntry { index, problem };
            let entry = entry.as_object().ok_or(bad("not an object"))?;
            let id = match entry.get("key_identifier") {
                Some(Value::String(id)) if !id.is_empty() && id.len() <= 256 => id.clone(),
                Some(Value::String(_)) => {
                    return Err(bad("\"key_identifier\" is empty or over 256 characters"));
                }
                _ => return Err(bad("\"key_identifier\" is missing or not a string")),
            };
            let pem =
                entry.get("key").and_then(Value::as_str).ok_or(bad("\"key\" is missing or not a string"))?;
            let current = match entry.get("is_current") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("\"is_current\" is not a boolean")),
            };
            let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| KeysError::NotPem { key_id: id.clone() })?;
            let point =
                p256_point(&spki).map_err(|found| KeysError::NotP256 { key_id: id.clone(), found })?;
            if keys.iter().any(|k| k.id == id) {
                return Err(KeysError::DuplicateId { key_id: id });
            }
            keys.push(PublicKey { id, current, point: point.to_vec() });
        }
        if keys.is_empty() {
            return Err(KeysError::NoKeys);
        }
        Ok(Self { keys })
    }

    /// The key identifiers and whether each is current, in document order.
    pub fn ids(&self) -> impl Iterator<Item = (&str, bool)> {
        self.keys.iter().map(|k| (k.id.as_str(), k.current))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn get(&self, key_id: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.id == key_id)
    }
}

/// One DER element: (tag, contents, what follows). Definite lengths up to 65535, minimal only.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if !(1..=2).contains(&n) || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| acc << 8 | usize::from(b));
        // DER: the shortest length form.
        if len < 0x80 || (n == 2 && len < 0x100) {
            return None;
        }
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const TAG_SEQUENCE: u8 = 0x30;
const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]; // 1.2.840.10045.2.1
const OID_PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]; // 1.2.840.10045.3.1.7
const OID_SECP384R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_SECP521R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// The uncompressed P-256 point of a SubjectPublicKeyInfo, or what the key is instead.
fn p256_point(spki: &[u8]) -> Result<&[u8], &'static str> {
    const MALFORMED: &str = "not a well-formed SubjectPublicKeyInfo";
    let (TAG_SEQUENCE, inner, []) = der_element(spki).ok_or(MALFORMED)? else { return Err(MALFORMED) };
    let (TAG_SEQUENCE, algorithm, rest) = der_element(inner).ok_or(MALFORMED)? else { return Err(MALFORMED) };
    let (TAG_BIT_STRING, bits, []) = der_element(rest).ok_or(MALFORMED)? else { return Err(MALFORMED) };
    let (TAG_OID, oid, params) = der_element(algorithm).ok_or(MALFORMED)? else { return Err(MALFORMED) };
    match oid {
        OID_EC_PUBLIC_KEY => {}
        OID_ED25519 => return Err("an Ed25519 key"),
        OID_ED448 => return Err("an Ed448 key"),
        OID_RSA => return Err("an RSA key"),
        _ => return Err("a key of another algorithm"),
    }
    let Some((TAG_OID, curve, [])) = der_element(params) else {
        return Err("an elliptic-curve key without a named curve");
    };
    match curve {
        OID_PRIME256V1 => {}
        OID_SECP384R1 => return Err("an ECDSA P-384 key"),
        OID_SECP521R1 => return Err("an ECDSA P-521 key"),
        _ => return Err("an elliptic-curve key on another curve"),
    }
    match bits {
        [0, point @ ..] if point.len() == 65 && point[0] == 4 => Ok(point),
        [0, point @ ..] if point.len() == 33 && matches!(point[0], 2 | 3) => {
            Err("a P-256 key with a compressed point (export it uncompressed, as GitHub does)")
        }
        _ => Err("a P-256 key whose point is malformed"),
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures

/// Why a report's signature is refused. The HTTP answer is 401 for all of them; the variants are
/// for logs and metrics ([`SignatureError::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The key identifier is not in the configured public-keys file (update it from GitHub's
    /// document). `key_id` is shown only when it looks like one (hex), never arbitrary input.
    #[error("unknown public key identifier {}: not in the configured public-keys file", .key_id.as_deref().unwrap_or("(not shown: not a hex key identifier)"))]
    UnknownKeyId { key_id: Option<String> },
    #[error(
        "the signature header is not standard base64 (or longer than {MAX_SIGNATURE_B64_LEN} characters)"
    )]
    BadBase64,
    #[error("the signature is not a DER ECDSA signature (SEQUENCE of two INTEGERs)")]
    BadDer,
    #[error("the signature does not match the body for that public key")]
    BadSignature,
}

impl SignatureError {
    /// Stable short reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::UnknownKeyId { .. } => "unknown_key",
            SignatureError::BadBase64 => "bad_base64",
            SignatureError::BadDer => "bad_der",
            SignatureError::BadSignature => "bad_signature",
        }
    }
}

/// Checks that `signature_b64` (the [`SIGNATURE_HEADER`]) is the key `key_id`'s ([`KEY_ID_HEADER`])
/// ECDSA P-256/SHA-256 signature of exactly `body`, the raw bytes received.
pub fn verify_signature(
    keys: &PublicKeys,
    key_id: &str,
    signature_b64: &str,
    body: &[u8],
) -> Result<(), SignatureError> {
    let Some(key) = keys.get(key_id) else {
        let shown =
            (!key_id.is_empty() && key_id.len() <= 128 && key_id.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| key_id.to_string());
        return Err(SignatureError::UnknownKeyId { key_id: shown });
    };
    let signature_b64 = signature_b64.trim();
    if signature_b64.len() > MAX_SIGNATURE_B64_LEN {
        return Err(SignatureError::BadBase64);
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64)
        .map_err(|_| SignatureError::BadBase64)?;
    if !is_der_ecdsa_p256_signature(&signature) {
        return Err(SignatureError::BadDer);
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key.point)
        .verify(body, &signature)
        .map_err(|_| SignatureError::BadSignature)
}

/// `SEQUENCE { INTEGER r, INTEGER s }`, each a minimal positive integer of at most 33 bytes.
fn is_der_ecdsa_p256_signature(der: &[u8]) -> bool {
    let positive_integer = |input: &[u8]| -> Option<usize> {
        let (TAG_INTEGER, value, rest) = der_element(input)? else { return None };
        let ok = match value {
            [] => false,
            [first, ..] if first & 0x80 != 0 => false, // negative
            [0, second, ..] if second & 0x80 == 0 => false, // not minimal
            _ => value.len() <= 33,
        };
        ok.then_some(input.len() - rest.len())
    };
    let Some((TAG_SEQUENCE, inner, [])) = der_element(der) else { return false };
    let Some(r) = positive_integer(inner) else { return false };
    positive_integer(&inner[r..]) == Some(inner.len() - r)
}

// ---------------------------------------------------------------------------------------------
// Reports

/// One entry of a report. `Debug` shows the token redacted ([`Plaintext`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedToken {
    pub token: Plaintext,
    /// GitHub's `type`: the token type the partner registered.
    pub token_type: Option<String>,
    /// Where it was found.
    pub url: Option<String>,
    /// `content`, `commit`, `pull_request_title`, `npm`, …
    pub source: Option<String>,
}

impl ReportedToken {
    /// The token's hash in the form the status and the index hold (`sha256:<hex>`).
    pub fn hash(&self) -> String {
        token::hash(self.token.expose())
    }

    /// The offline check (prefix, length, alphabet, checksum). A token that fails it was never
    /// issued by the operator: `false_positive` without a lookup.
    pub fn well_formed(&self) -> Result<token::Parsed<'_>, token::ParseError> {
        token::parse(self.token.expose())
    }

    /// The feedback entry for this token.
    pub fn feedback(&self, label: Label) -> Feedback {
        Feedback {
            token_hash: github_token_hash(&self.hash()).to_string(),
            token_type: self.token_type.clone().unwrap_or_else(|| DEFAULT_TOKEN_TYPE.to_string()),
            label,
        }
    }
}

/// Why a report's body is refused (400). The text says what to fix and never holds any part of
/// the body: serde_json's messages can quote input, so only its line and column are kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the body is {len} bytes; at most {MAX_BODY_BYTES} are accepted")]
    TooLarge { len: usize },
    #[error("the body is not JSON (syntax error at line {line}, column {column})")]
    NotJson { line: usize, column: usize },
    #[error("the body ends before its JSON value does")]
    Truncated,
    #[error("the body must be a JSON array of {{\"token\", \"type\", \"url\", \"source\"}} objects")]
    NotArray,
    #[error("the report has {count} entries; at most {MAX_ENTRIES} are accepted in one request")]
    TooManyEntries { count: usize },
    #[error("report[{index}] is not an object")]
    EntryNotObject { index: usize },
    #[error("report[{index}].token is missing")]
    MissingToken { index: usize },
    #[error("report[{index}].token is empty")]
    EmptyToken { index: usize },
    #[error("report[{index}].{field} must be a string")]
    NotAString { index: usize, field: &'static str },
    #[error("report[{index}].{field} is longer than {max} bytes")]
    TooLong { index: usize, field: &'static str, max: usize },
}

/// Parses a report body: a JSON array of at most [`MAX_ENTRIES`] objects with a string `token`
/// and optional string (or null) `type`, `url` and `source`; other fields are ignored (GitHub may
/// add some).
pub fn parse_report(body: &[u8]) -> Result<Vec<ReportedToken>, ReportError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ReportError::TooLarge { len: body.len() });
    }
    let doc: Value = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => ReportError::Truncated,
        _ => ReportError::NotJson { line: e.line(), column: e.column() },
    })?;
    let Value::Array(entries) = doc else { return Err(ReportError::NotArray) };
    if entries.len() > MAX_ENTRIES {
        return Err(ReportError::TooManyEntries { count: entries.len() });
    }
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let Value::Object(mut entry) = entry else { return Err(ReportError::EntryNotObject { index }) };
        let token = match entry.remove("token") {
            None | Some(Value::Null) => return Err(ReportError::MissingToken { index }),
            // Moved out of the parsed document, not copied; this copy is wiped when dropped (the
            // request bytes and the parsed document are not).
            Some(Value::String(s)) => Zeroizing::new(s),
            Some(_) => return Err(ReportError::NotAString { index, field: "token" }),
        };
        if token.is_empty() {
            return Err(ReportError::EmptyToken { index });
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(ReportError::TooLong { index, field: "token", max: MAX_TOKEN_LEN });
        }
        let mut optional = |field: &'static str, max: usize| match entry.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= max => Ok(Some(s)),
            Some(Value::String(_)) => Err(ReportError::TooLong { index, field, max }),
            Some(_) => Err(ReportError::NotAString { index, field }),
        };
        let token_type = optional("type", MAX_TYPE_LEN)?;
        let url = optional("url", MAX_URL_LEN)?;
        let source = optional("source", MAX_TYPE_LEN)?;
        out.push(ReportedToken { token: token::plaintext_from_stored(&token), token_type, url, source });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Feedback

/// GitHub's partner feedback label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// A token the operator issued that worked until this report (now killed).
    TruePositive,
    /// Anything else: malformed, wrong checksum, unknown, or already dead (expired, revoked,
    /// past its grace period, reported before).
    FalsePositive,
}

/// One entry of GitHub's feedback array:
/// `{"token_hash": "<hex sha256>", "token_type": "…", "label": "true_positive"|"false_positive"}`.
/// GitHub's other form, `token_raw`, is never used: the answer must not echo a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feedback {
    pub token_hash: String,
    pub token_type: String,
    pub label: Label,
}

/// The response body: the feedback entries as one JSON array.
pub fn feedback_body(entries: &[Feedback]) -> Vec<u8> {
    serde_json::to_vec(entries).expect("feedback serializes")
}

/// GitHub's `token_hash` (bare lowercase hex) from our stored form (`sha256:<hex>`, see
/// [`token::hash`]). A string without the prefix is returned as it is.
pub fn github_token_hash(stored: &str) -> &str {
    stored.strip_prefix("sha256:").unwrap_or(stored)
}

// ---------------------------------------------------------------------------------------------
// The keys file

/// What [`KeysFile::reload`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Same bytes as last time.
    Unchanged,
    /// New keys are in use.
    Reloaded,
    /// The file cannot be read or its new content is not usable: the previous keys stay (the
    /// reason, without the file's content).
    KeptPrevious(String),
}

/// The public keys from a file (a mounted Secret or ConfigMap holding GitHub's document), re-read
/// when it changes.
///
/// The kubelet updates such a mount by writing a new directory and swapping the `..data` symlink,
/// so the file's path never sees a write and inotify on it would miss the change. Like the TLS
/// files (`verify::tls`), the file is therefore read through its path (following the symlinks)
/// every so often and its content compared with the last content seen.
pub struct KeysFile {
    path: PathBuf,
    keys: RwLock<Arc<PublicKeys>>,
    /// The last content seen (usable or not) and whether its problem was logged.
    seen: Mutex<Seen>,
}

struct Seen {
    content: Option<Vec<u8>>,
    complained: bool,
}

impl fmt::Debug for KeysFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeysFile")
            .field("path", &self.path)
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}

fn read_keys_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading the public-keys file {}", path.display()))?;
    let mut content = Vec::new();
    file.take(MAX_KEYS_FILE_BYTES + 1)
        .read_to_end(&mut content)
        .with_context(|| format!("reading the public-keys file {}", path.display()))?;
    anyhow::ensure!(
        content.len() as u64 <= MAX_KEYS_FILE_BYTES,
        "the public-keys file {} is over {MAX_KEYS_FILE_BYTES} bytes",
        path.display()
    );
    Ok(content)
}

impl KeysFile {
    /// Loads the file once (start-up: a missing or unusable file is an error naming the path).
    pub fn load(path: impl Into<PathBuf>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = path.into();
        let content = read_keys_file(&path)?;
        let keys = PublicKeys::parse(&content)
            .with_context(|| format!("loading the public-keys file {}", path.display()))?;
        info!(path = %path.display(), keys = ?keys, "loaded the secret scanning public keys");
        Ok(Self {
            path,
            keys: RwLock::new(Arc::new(keys)),
            seen: Mutex::new(Seen { content: Some(content), complained: false }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys in use.
    pub fn keys(&self) -> Arc<PublicKeys> {
        self.keys.read().expect("keys lock").clone()
    }

    /// [`verify_signature`] with the keys in use.
    pub fn verify(&self, key_id: &str, signature_b64: &str, body: &[u8]) -> Result<(), SignatureError> {
        verify_signature(&self.keys(), key_id, signature_b64, body)
    }

    /// Re-reads the file now and uses its keys if it changed and is usable. A problem is logged
    /// once (a warning) until the file changes again; the previous keys stay in use.
    pub fn reload(&self) -> Reload {
        let mut seen = self.seen.lock().expect("keys file state");
        let content = match read_keys_file(&self.path) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("{e:#}");
                if !seen.complained {
                    warn!(error = why, "cannot re-read the public-keys file; keeping the keys in use");
                }
                seen.complained = true;
                // Readable again later with the same content as before: that content was used.
                return Reload::KeptPrevious(why);
            }
        };
        if seen.content.as_deref() == Some(content.as_slice()) {
            // Readable (again), with content already judged: nothing new to say.
            seen.complained = false;
            return Reload::Unchanged;
        }
        seen.content = Some(content);
        let content = seen.content.as_deref().expect("just set");
        match PublicKeys::parse(content) {
            Ok(keys) => {
                info!(path = %self.path.display(), keys = ?keys, "the public-keys file changed: using its keys");
                *self.keys.write().expect("keys lock") = Arc::new(keys);
                seen.complained = false;
                Reload::Reloaded
            }
            Err(e) => {
                let why = format!("the public-keys file {} cannot be used: {e}", self.path.display());
                warn!(error = why, "keeping the keys in use");
                seen.complained = true;
                Reload::KeptPrevious(why)
            }
        }
    }

    /// Calls [`KeysFile::reload`] every `every`, for ever (spawn it).
    pub async fn keep_current(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.reload();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// GitHub's published example (its partner program documentation): a key, and that key's
    /// signature of a body. Checks interoperability with GitHub's own signer.
    const GITHUB_KEY_ID: &str = "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a";
    const GITHUB_KEY_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE9MJJHnMfn2+H4xL4YaPDA4RpJqUq\nkCmRCBnYERxZanmcpzQSXs1X/AljlKkbJ8qpVIW4clayyef9gWhFbNHWAA==\n-----END PUBLIC KEY-----\n";
    const GITHUB_BODY: &str = r#"[{"token":"some_token","type":"some_type","url":"some_url"}]"#;
    const GITHUB_SIGNATURE: &str =
        "MEUCIQDKZokqnCjrRtw0tni+2Ltvl/uiMJ1EGumEsp1BsNr32AIgQY1YXD2nlj+XNfGK4rBfkMJ1JDOQcYXxa2sY8FNkrKc=";

    /// A P-256 key: its public half as PEM (encoded by rcgen, independently of our parser) and a
    /// signer.
    struct Signer {
        pem: String,
        pair: EcdsaKeyPair,
    }

    impl Signer {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                &key.serialize_der(),
                &SystemRandom::new(),
            )
            .unwrap();
            Self { pem: key.public_key_pem(), pair }
        }

        fn sign(&self, body: &[u8]) -> String {
            let sig = self.pair.sign(&SystemRandom::new(), body).unwrap();
            base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
        }
    }

    fn document(keys: &[(&str, &str, bool)]) -> String {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(id, pem, current)| serde_json::json!({"key_identifier": id, "key": pem, "is_current": current}))
            .collect();
        serde_json::json!({ "public_keys": keys }).to_string()
    }

    fn token(seed: u64, prefix: &str) -> String {
        token::generate(prefix, &mut StdRng::seed_from_u64(seed)).plaintext.expose().to_string()
    }

    /// Every token-shaped substring of `text` (any prefix, 54 base62 characters).
    fn token_shaped(text: &str) -> Vec<String> {
        let re = regex::Regex::new(r"[a-z][a-z0-9_]{1,15}_[0-9A-Za-z]{54}").unwrap();
        re.find_iter(text).map(|m| m.as_str().to_string()).collect()
    }

    /// No token, nor its 54-character body, nor its 40-character secret, in `rendered`.
    fn assert_hides(rendered: &str, tokens: &[String]) {
        for t in tokens {
            let body = &t[t.len() - token::BODY_LEN..];
            let secret = &body[token::ID_LEN..token::ID_LEN + token::SECRET_LEN];
            assert!(!rendered.contains(secret), "a token's secret part leaked into {rendered:?}");
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "apitoken-leak-unit-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn leak_githubs_published_signature_verifies() {
        let keys = PublicKeys::parse(document(&[(GITHUB_KEY_ID, GITHUB_KEY_PEM, true)]).as_bytes()).unwrap();
        verify_signature(&keys, GITHUB_KEY_ID, GITHUB_SIGNATURE, GITHUB_BODY.as_bytes()).unwrap();
        let mut altered = GITHUB_BODY.as_bytes().to_vec();
        altered[12] ^= 1;
        assert_eq!(
            verify_signature(&keys, GITHUB_KEY_ID, GITHUB_SIGNATURE, &altered),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn leak_signature_by_each_listed_key_verifies_current_or_not() {
        let (a, b) = (Signer::new(), Signer::new());
        let keys = PublicKeys::parse(document(&[("aa01", &a.pem, true), ("bb02", &b.pem, false)]).as_bytes())
            .unwrap();
        assert_eq!(keys.ids().collect::<Vec<_>>(), [("aa01", true), ("bb02", false)]);
        let body = br#"[{"token":"x","type":"t"}]"#;
        verify_signature(&keys, "aa01", &a.sign(body), body).unwrap();
        verify_signature(&keys, "bb02", &b.sign(body), body).unwrap();
        // The other key's signature under this key's id.
        assert_eq!(verify_signature(&keys, "aa01", &b.sign(body), body), Err(SignatureError::BadSignature));
    }

    #[test]
    fn leak_each_signature_failure_is_its_own_error() {
        let a = Signer::new();
        let keys = PublicKeys::parse(document(&[("aa01", &a.pem, true)]).as_bytes()).unwrap();
        let body = br#"[{"token":"apitok_x"}]"#;
        let good = a.sign(body);
        verify_signature(&keys, "aa01", &good, body).unwrap();

        let e = verify_signature(&keys, "cc03", &good, body).unwrap_err();
        assert_eq!(e, SignatureError::UnknownKeyId { key_id: Some("cc03".into()) });
        assert_eq!(e.reason(), "unknown_key");
        assert!(e.to_string().contains("cc03"), "{e}");
        // A key id that is not hex is not repeated (it could be anything, a token too).
        let t = token(1, "apitok");
        let e = verify_signature(&keys, &t, &good, body).unwrap_err();
        assert_eq!(e, SignatureError::UnknownKeyId { key_id: None });
        assert_hides(&format!("{e} {e:?}"), &[t]);

        for altered_at in [0, body.len() / 2, body.len() - 1] {
            let mut altered = body.to_vec();
            altered[altered_at] ^= 0x20;
            assert_eq!(verify_signature(&keys, "aa01", &good, &altered), Err(SignatureError::BadSignature));
        }
        let mut longer = body.to_vec();
        longer.push(b'\n');
        assert_eq!(verify_signature(&keys, "aa01", &good, &longer), Err(SignatureError::BadSignature));

        for bad_b64 in ["", "!!!!", "MEUCIQ", &good[..good.len() - 3], &format!("{good}A"), &"A".repeat(400)]
        {
            let e = verify_signature(&keys, "aa01", bad_b64, body).unwrap_err();
            assert!(matches!(e, SignatureError::BadBase64 | SignatureError::BadDer), "{bad_b64}: {e:?}");
        }
        assert_eq!(verify_signature(&keys, "aa01", "!!!!", body), Err(SignatureError::BadBase64));
        assert_eq!(verify_signature(&keys, "aa01", &"A".repeat(400), body), Err(SignatureError::BadBase64));

        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let der = base64::engine::general_purpose::STANDARD.decode(&good).unwrap();
        // Valid base64 of things that are not a DER signature.
        for not_der in [
            b"garbage".to_vec(),
            der[..der.len() - 1].to_vec(),                        // truncated
            [der.as_slice(), &[0]].concat(),                      // trailing byte
            vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0xff], // negative s
            vec![0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01], // r not minimal
            vec![0x30, 0x00],
        ] {
            assert_eq!(verify_signature(&keys, "aa01", &b64(&not_der), body), Err(SignatureError::BadDer));
        }
        // Well-formed DER, wrong numbers.
        let zeroed = vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01];
        assert_eq!(verify_signature(&keys, "aa01", &b64(&zeroed), body), Err(SignatureError::BadSignature));
        assert_eq!(SignatureError::BadDer.reason(), "bad_der");
    }

    #[test]
    fn leak_keys_that_are_not_p256_are_refused_naming_the_key() {
        let p256 = Signer::new().pem;
        for (alg, found) in [(&rcgen::PKCS_ED25519, "Ed25519"), (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384")] {
            let other = rcgen::KeyPair::generate_for(alg).unwrap().public_key_pem();
            let doc = document(&[("good1", &p256, true), ("other-key-7", &other, false)]);
            let e = PublicKeys::parse(doc.as_bytes()).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("\"other-key-7\"") && text.contains(found) && text.contains("P-256"),
                "{text}"
            );
        }
        let cases: [(String, &str); 8] = [
            ("nope".into(), "not JSON"),
            ("{}".into(), "no \"public_keys\" array"),
            (r#"{"public_keys": []}"#.into(), "lists no key"),
            (r#"{"public_keys": [1]}"#.into(), "public_keys[0]: not an object"),
            (r#"{"public_keys": [{"key": "x"}]}"#.into(), "key_identifier"),
            (
                document(&[("k9", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", true)]),
                "\"k9\": \"key\" is not a PEM",
            ),
            (document(&[("k9", &p256, true), ("k9", &p256, false)]), "\"k9\" appears twice"),
            (
                r#"{"public_keys": [{"key_identifier": "k", "key": "x", "is_current": "yes"}]}"#.into(),
                "is_current",
            ),
        ];
        for (doc, expected) in cases {
            let e = PublicKeys::parse(doc.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(expected), "{e} (expected {expected})");
        }
    }

    #[test]
    fn leak_githubs_document_shape_parses_with_extra_fields() {
        let a = Signer::new();
        let doc = serde_json::json!({"public_keys": [
            {"key_identifier": "aa01", "key": a.pem, "is_current": true, "added": "2024"},
            {"key_identifier": "aa02", "key": a.pem},
        ], "other": 1});
        let keys = PublicKeys::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(format!("{keys:?}"), r#"[("aa01", true), ("aa02", false)]"#);
    }

    #[test]
    fn leak_report_parses_githubs_fields() {
        let t = token(5, "apitok");
        let body = serde_json::json!([
            {"token": t, "type": "apitoken_operator_token", "url": "https://github.com/o/r/blob/x/f", "source": "content"},
            {"token": "abc", "extra": {"nested": [1, 2]}},
            {"token": t, "type": null},
        ])
        .to_string();
        let report = parse_report(body.as_bytes()).unwrap();
        assert_eq!(report.len(), 3);
        assert_eq!(report[0].token.expose(), t);
        assert_eq!(report[0].token_type.as_deref(), Some("apitoken_operator_token"));
        assert_eq!(report[0].url.as_deref(), Some("https://github.com/o/r/blob/x/f"));
        assert_eq!(report[0].source.as_deref(), Some("content"));
        assert!(report[0].well_formed().is_ok());
        assert_eq!(report[1].well_formed(), Err(token::ParseError::NoSeparator));
        assert_eq!((report[2].token_type.as_ref(), report[2].url.as_ref()), (None, None));
        assert!(parse_report(b"[]").unwrap().is_empty());
        assert!(parse_report(b" [ ] \n").unwrap().is_empty());
        // Debug redacts the token.
        assert_hides(&format!("{report:?}"), &[t]);
    }

    #[test]
    fn leak_report_errors_say_what_to_fix_and_never_quote_the_body() {
        let t = token(6, "apitok");
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        let many = serde_json::to_string(&vec![serde_json::json!({"token": "t"}); MAX_ENTRIES + 1]).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (format!(r#"[{{"token": "{t}""#), "ends before"),
            (format!(r#"[{{"token": "{t}"}}] x"#), "not JSON"),
            (format!(r#"[{{"token": "{t}\u00"}}]"#), "not JSON"),
            (format!(r#"[{{"token": '{t}'}}]"#), "not JSON (syntax error at line 1, column 12)"),
            (format!(r#"{{"token": "{t}"}}"#), "must be a JSON array"),
            (format!(r#""{t}""#), "must be a JSON array"),
            (format!(r#"["{t}"]"#), "report[0] is not an object"),
            (format!(r#"[{{"{t}": "x"}}]"#), "report[0].token is missing"),
            (format!(r#"[{{"token": "x"}}, {{"token": ["{t}"]}}]"#), "report[1].token must be a string"),
            (format!(r#"[{{"token": "x", "type": {{"{t}": 1}}}}]"#), "report[0].type must be a string"),
            (format!(r#"[{{"token": "{t}", "url": 5}}]"#), "report[0].url must be a string"),
            (format!(r#"[{{"token": "{t}", "source": true}}]"#), "report[0].source must be a string"),
            (format!(r#"[{{"token": "{long}{t}"}}]"#), "report[0].token is longer than 256 bytes"),
            (format!(r#"[{{"token": "{t}", "type": "{long}"}}]"#), "report[0].type is longer than 128 bytes"),
            (r#"[{"token": ""}]"#.to_string(), "report[0].token is empty"),
            (many, "101 entries; at most 100"),
            (format!("[{}]", "[".repeat(200)), "not JSON"),
        ];
        for (body, expected) in cases {
            let e = parse_report(body.as_bytes()).unwrap_err();
            let text = format!("{e} | {e:?}");
            assert!(text.contains(expected), "{text} (expected {expected})");
            assert_hides(&text, std::slice::from_ref(&t));
        }
        // Not UTF-8 inside the token's string.
        let mut bytes = format!(r#"[{{"token": "{t}"#).into_bytes();
        bytes.extend_from_slice(b"\xff\"}]");
        let e = parse_report(&bytes).unwrap_err();
        assert!(matches!(e, ReportError::NotJson { .. }), "{e:?}");
        assert_hides(&format!("{e} {e:?}"), std::slice::from_ref(&t));
        // Nothing is logged on the way (the HTTP layer logs the error's text, checked above).
        let body = format!(r#"[{{"token": "{t}", "url": 1}}]"#);
        let (result, logs) = logged(|| parse_report(body.as_bytes()));
        assert!(result.is_err());
        assert_eq!(logs, "");
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(parse_report(&big), Err(ReportError::TooLarge { len: MAX_BODY_BYTES + 1 }));
    }

    #[test]
    fn leak_serde_json_messages_would_have_quoted_the_token() {
        // Why parse_report keeps only line and column: serde_json's own text holds the input.
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Strict {
            token: u32,
        }
        let t = token(7, "apitok");
        let e = serde_json::from_str::<Vec<Strict>>(&format!(r#"[{{"token": "{t}"}}]"#)).unwrap_err();
        assert!(e.to_string().contains(&t), "serde_json changed: {e}");
    }

    #[test]
    fn leak_feedback_is_githubs_shape_with_the_bare_hex_hash() {
        let t = token(8, "apitok");
        let report = parse_report(
            serde_json::json!([{"token": t, "type": "apitoken_operator_token"}, {"token": "nope"}])
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let stored = token::hash(&t);
        assert_eq!(report[0].hash(), stored);
        let hex = github_token_hash(&stored);
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let feedback = [report[0].feedback(Label::TruePositive), report[1].feedback(Label::FalsePositive)];
        let body = String::from_utf8(feedback_body(&feedback)).unwrap();
        let nope_hex = github_token_hash(&token::hash("nope")).to_string();
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            serde_json::json!([
                {"token_hash": hex, "token_type": "apitoken_operator_token", "label": "true_positive"},
                {"token_hash": nope_hex, "token_type": DEFAULT_TOKEN_TYPE, "label": "false_positive"},
            ])
        );
        // The SHA-256 of the token string, as GitHub computes it (`printf some_token | sha256sum`).
        assert_eq!(
            github_token_hash(&token::hash("some_token")),
            "9a45520a1213f15016d2d768b5fb3d904492a44ee274b44d4de8803e00fb536a"
        );
        assert!(!body.contains(&t) && !body.contains("nope\""), "{body}");
        assert_hides(&format!("{feedback:?} {report:?}"), std::slice::from_ref(&t));
        assert_eq!(github_token_hash("abc"), "abc");
    }

    /// The keys file as the kubelet lays out a Secret or ConfigMap volume: `keys.json` ->
    /// `..data/keys.json`, `..data` -> a timestamped directory, swapped with a rename.
    struct Mount {
        dir: PathBuf,
        generation: usize,
    }

    impl Mount {
        fn new(name: &str, content: &str) -> Self {
            let mut m = Self { dir: temp_dir(name), generation: 0 };
            m.update(content);
            std::os::unix::fs::symlink("..data/keys.json", m.path()).unwrap();
            m
        }

        fn path(&self) -> PathBuf {
            self.dir.join("keys.json")
        }

        fn update(&mut self, content: &str) {
            self.generation += 1;
            let version = format!("..2026_01_01_00_00_0{}", self.generation);
            std::fs::create_dir(self.dir.join(&version)).unwrap();
            std::fs::write(self.dir.join(&version).join("keys.json"), content).unwrap();
            let tmp = self.dir.join("..data_tmp");
            std::os::unix::fs::symlink(&version, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Runs `f` with a tracing subscriber that writes into the returned text.
    fn logged<R>(f: impl FnOnce() -> R) -> (R, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let r = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (r, text)
    }

    #[test]
    fn leak_keys_file_follows_a_kubelet_style_swap_and_keeps_good_keys() {
        let (a, b) = (Signer::new(), Signer::new());
        let body = b"[]";
        let mut mount = Mount::new("swap", &document(&[("aa01", &a.pem, true)]));
        let file = KeysFile::load(mount.path()).unwrap();
        file.verify("aa01", &a.sign(body), body).unwrap();
        assert_eq!(file.reload(), Reload::Unchanged);

        // GitHub added a key: both are accepted once the mount changes.
        mount.update(&document(&[("aa01", &a.pem, false), ("bb02", &b.pem, true)]));
        assert_eq!(file.reload(), Reload::Reloaded);
        file.verify("bb02", &b.sign(body), body).unwrap();
        file.verify("aa01", &a.sign(body), body).unwrap();

        // A broken replacement: the keys in use stay, a warning says why, once.
        mount.update(r#"{"public_keys": [{"key_identifier": "cc03", "key": "nope"}]}"#);
        let (outcome, log) = logged(|| file.reload());
        assert!(matches!(&outcome, Reload::KeptPrevious(why) if why.contains("\"cc03\"")), "{outcome:?}");
        assert!(log.contains("WARN") && log.contains("keeping the keys in use"), "{log}");
        let (outcome, log) = logged(|| file.reload());
        assert_eq!((outcome, log), (Reload::Unchanged, String::new()));
        file.verify("bb02", &b.sign(body), body).unwrap();

        // The file disappears: still the keys in use.
        std::fs::remove_file(mount.path()).unwrap();
        let (outcome, log) = logged(|| file.reload());
        assert!(matches!(&outcome, Reload::KeptPrevious(why) if why.contains("keys.json")), "{outcome:?}");
        assert!(log.contains("cannot re-read"), "{log}");
        file.verify("aa01", &a.sign(body), body).unwrap();

        // Fixed: only the new key.
        std::os::unix::fs::symlink("..data/keys.json", mount.path()).unwrap();
        mount.update(&document(&[("bb02", &b.pem, true)]));
        assert_eq!(file.reload(), Reload::Reloaded);
        assert_eq!(
            file.verify("aa01", &a.sign(body), body),
            Err(SignatureError::UnknownKeyId { key_id: Some("aa01".into()) })
        );
        assert!(format!("{file:?}").contains("bb02"));
    }

    #[tokio::test]
    async fn leak_keys_file_keep_current_picks_up_a_change() {
        let (a, b) = (Signer::new(), Signer::new());
        let mut mount = Mount::new("poll", &document(&[("aa01", &a.pem, true)]));
        let file = Arc::new(KeysFile::load(mount.path()).unwrap());
        let task = tokio::spawn(file.clone().keep_current(Duration::from_millis(20)));
        mount.update(&document(&[("bb02", &b.pem, true)]));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while file.verify("bb02", &b.sign(b"x"), b"x").is_err() {
            assert!(tokio::time::Instant::now() < deadline, "the new key was never used");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }

    #[test]
    fn leak_keys_file_missing_or_invalid_at_start_names_the_path() {
        let dir = temp_dir("start");
        let missing = dir.join("nope.json");
        let e = format!("{:#}", KeysFile::load(&missing).unwrap_err());
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"public_keys": []}"#).unwrap();
        let e = format!("{:#}", KeysFile::load(&bad).unwrap_err());
        assert!(e.contains(&bad.display().to_string()) && e.contains("lists no key"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn leak_openssl_signatures_verify() {
        if std::process::Command::new("openssl").arg("version").output().is_err() {
            println!("SKIPPED: openssl is not installed (the interoperability check needs it)");
            return;
        }
        let dir = temp_dir("openssl");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).current_dir(&dir).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", "key.pem"]);
        openssl(&["ec", "-in", "key.pem", "-pubout", "-out", "pub.pem"]);
        let t = token(9, "apitok");
        let body = serde_json::json!([{"token": t, "type": "apitoken_operator_token", "url": "u", "source": "content"}])
            .to_string();
        std::fs::write(dir.join("body.json"), &body).unwrap();
        openssl(&["dgst", "-sha256", "-sign", "key.pem", "-out", "sig.der", "body.json"]);
        let pem = std::fs::read_to_string(dir.join("pub.pem")).unwrap();
        let sig =
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join("sig.der")).unwrap());
        let keys = PublicKeys::parse(document(&[("0123abcd", &pem, true)]).as_bytes()).unwrap();
        verify_signature(&keys, "0123abcd", &sig, body.as_bytes()).unwrap();
        assert_eq!(
            verify_signature(&keys, "0123abcd", &sig, body.replace("content", "commit").as_bytes()),
            Err(SignatureError::BadSignature)
        );
        // And the other way round: openssl accepts a signature made the way the tests sign.
        let ours = Signer::new();
        std::fs::write(dir.join("ours.pem"), &ours.pem).unwrap();
        let sig = base64::engine::general_purpose::STANDARD.decode(ours.sign(body.as_bytes())).unwrap();
        std::fs::write(dir.join("ours.der"), sig).unwrap();
        openssl(&["dgst", "-sha256", "-verify", "ours.pem", "-signature", "ours.der", "body.json"]);
        // An openssl P-384 key is refused by name.
        openssl(&["ecparam", "-genkey", "-name", "secp384r1", "-noout", "-out", "k384.pem"]);
        openssl(&["ec", "-in", "k384.pem", "-pubout", "-out", "p384.pem"]);
        let p384 = std::fs::read_to_string(dir.join("p384.pem")).unwrap();
        let e = PublicKeys::parse(document(&[("k384", &p384, true)]).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("P-384"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn report_with_tokens() -> impl Strategy<Value = (Vec<u8>, Vec<String>)> {
        // JSON-ish bodies that put real tokens where a parser could quote them back: values of
        // the wrong type, keys, unterminated strings, after garbage.
        let piece = prop_oneof![
            Just("[".to_string()),
            Just("]".to_string()),
            Just("{".to_string()),
            Just("}".to_string()),
            Just(",".to_string()),
            Just(":".to_string()),
            Just("\"token\"".to_string()),
            Just("\"type\"".to_string()),
            Just("\"url\"".to_string()),
            Just("null".to_string()),
            Just("1".to_string()),
            Just("\"".to_string()),
            Just("\\u12".to_string()),
            Just("'".to_string()),
            "[ -~]{0,8}",
        ];
        (any::<u64>(), proptest::collection::vec((piece, any::<bool>()), 0..24)).prop_map(|(seed, pieces)| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut tokens = Vec::new();
            let mut body = String::new();
            for (piece, with_token) in pieces {
                body.push_str(&piece);
                if with_token {
                    let t = token::generate("apitok", &mut rng).plaintext.expose().to_string();
                    body.push_str(&t);
                    tokens.push(t);
                }
            }
            (body.into_bytes(), tokens)
        })
    }

    proptest! {
        #[test]
        fn leak_parse_report_never_panics_nor_repeats_tokens(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            (shaped, tokens) in report_with_tokens(),
        ) {
            for input in [bytes, shaped] {
                let mut hidden = tokens.clone();
                hidden.extend(token_shaped(&String::from_utf8_lossy(&input)));
                if let Err(e) = parse_report(&input) {
                    assert_hides(&format!("{e} {e:?}"), &hidden);
                }
            }
        }

        #[test]
        fn leak_verify_signature_never_panics_nor_repeats_tokens(
            key_id in "[ -~]{0,80}",
            signature in "[ -~]{0,120}",
            sig_bytes in proptest::collection::vec(any::<u8>(), 0..90),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            seed: u64,
        ) {
            static KEYS: std::sync::OnceLock<PublicKeys> = std::sync::OnceLock::new();
            let keys = KEYS.get_or_init(|| {
                PublicKeys::parse(document(&[(GITHUB_KEY_ID, GITHUB_KEY_PEM, true)]).as_bytes()).unwrap()
            });
            let t = token(seed, "apitok");
            let sig_b64 = base64::engine::general_purpose::STANDARD.encode(&sig_bytes);
            for (id, sig) in [
                (key_id.as_str(), signature.as_str()),
                (GITHUB_KEY_ID, signature.as_str()),
                (GITHUB_KEY_ID, sig_b64.as_str()),
                (t.as_str(), t.as_str()),
                (GITHUB_KEY_ID, t.as_str()),
            ] {
                if let Err(e) = verify_signature(keys, id, sig, &body) {
                    let mut hidden = token_shaped(id);
                    hidden.push(t.clone());
                    assert_hides(&format!("{e} {e:?}"), &hidden);
                }
            }
        }

        #[test]
        fn leak_public_keys_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = PublicKeys::parse(&bytes);
            let _ = p256_point(&bytes);
            let _ = is_der_ecdsa_p256_signature(&bytes);
        }
    }
}
