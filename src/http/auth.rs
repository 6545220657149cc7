//! API keys (`--api-keys FILE`): who may call the public API, how often, and
//! who may change the membership. See docs/api-keys.md.
//!
//! The file holds one key per line, `NAME KEY [rate=REQUESTS_PER_SECOND] [admin]`;
//! a word starting with `#` starts a comment. It is read once, at start-up, and
//! strictly: a bad line stops the node with `FILE:LINE: what is wrong`, and no
//! message ever repeats a key.
//!
//! Only the SHA-256 digests of the keys are kept. A presented key is hashed,
//! looked up by the first 8 bytes of its digest and confirmed by a
//! constant-time comparison of the whole digest, so how long a check takes
//! says nothing about a stored key.
//!
//! With keys configured, every public endpoint needs `Authorization: Bearer KEY`
//! except `/healthz` and `/readyz` (probes; skipped here) and `/metrics`
//! (scrapers; routed outside this layer, like `/raft/*`, which requires the
//! cluster secret) and the web page `/` with its `/assets/*` (static files
//! with no data, also routed outside: the page asks for a key and sends it).
//! A request carrying the cluster secret (a node proxying to the leader, a
//! node joining) passes as admin, without a rate limit. A key
//! with a rate has a token bucket on each node (burst `max(1, rate)`); an
//! empty bucket answers 429 with `Retry-After`. Key names, never keys, may
//! appear in logs: requests run in a span with the field `api_key=NAME`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::{secret_ok, ApiError};
use crate::node::app::App;

/// Largest keys file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most keys in one file (each has its own rate bucket on every node).
pub const MAX_KEYS: usize = 10_000;
/// Shortest key accepted: guessing must be hopeless (`openssl rand -hex 32`).
pub const MIN_KEY_BYTES: usize = 16;
pub const MAX_KEY_BYTES: usize = 256;
/// Names appear in logs: short, and only `[A-Za-z0-9_.-]`.
pub const MAX_NAME_BYTES: usize = 64;
pub const MIN_RATE_PER_S: f64 = 0.001;
pub const MAX_RATE_PER_S: f64 = 1_000_000.0;

/// Public endpoints that never need a key (health probes).
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

const FORMAT: &str = "expected NAME KEY [rate=REQUESTS_PER_SECOND] [admin]";

/// Who made a request, as the auth layer found it (a request extension).
#[derive(Clone, Debug)]
pub enum Caller {
    /// Another node (or an operator) presenting the cluster secret: admin.
    Node,
    Key {
        name: Arc<str>,
        admin: bool,
    },
}

struct Key {
    name: Arc<str>,
    digest: [u8; 32],
    rate_per_s: Option<f64>,
    admin: bool,
    bucket: Mutex<Bucket>,
}

/// A token bucket: `tokens` as of `at`, refilled at the key's rate up to its burst.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The keys of one `--api-keys` file.
pub struct ApiKeys {
    keys: Vec<Key>,
    /// First 8 bytes of a digest -> indexes into `keys`.
    index: HashMap<u64, Vec<usize>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| &*k.name).collect();
        f.debug_struct("ApiKeys").field("names", &names).finish()
    }
}

/// A bad line of a keys file: its 1-based number and what is wrong (never the key).
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn prefix(d: &[u8; 32]) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn burst(rate_per_s: f64) -> f64 {
    rate_per_s.max(1.0)
}

/// One parsed line of a keys file.
struct Line<'a> {
    name: &'a str,
    key: &'a str,
    rate_per_s: Option<f64>,
    admin: bool,
}

/// One line, without comments: `None` for a blank or comment-only line.
fn parse_line(line: &str) -> Result<Option<Line<'_>>, String> {
    let words: Vec<&str> = line.split_whitespace().take_while(|w| !w.starts_with('#')).collect();
    let (name, key, options) = match words.as_slice() {
        [] => return Ok(None),
        [_] => return Err(format!("missing the key; {FORMAT}")),
        [name, key, options @ ..] => (*name, *key, options),
    };
    if name.len() > MAX_NAME_BYTES
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(format!("the name must be 1 to {MAX_NAME_BYTES} characters from A-Z a-z 0-9 _ . -"));
    }
    if key == "admin" || key.starts_with("rate=") {
        return Err(format!("missing the key; {FORMAT}"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the key must be printable ASCII without spaces".into());
    }
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
        return Err(format!("the key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} characters, got {}", key.len()));
    }
    let (mut rate, mut admin) = (None, false);
    for (i, word) in options.iter().enumerate() {
        if *word == "admin" {
            if admin {
                return Err("'admin' given twice".into());
            }
            admin = true;
        } else if let Some(value) = word.strip_prefix("rate=") {
            if rate.is_some() {
                return Err("'rate=' given twice".into());
            }
            let r = value.parse::<f64>().ok().filter(|r| (MIN_RATE_PER_S..=MAX_RATE_PER_S).contains(r));
            let Some(r) = r else {
                return Err(format!(
                    "rate must be a number of requests per second from {MIN_RATE_PER_S} to {MAX_RATE_PER_S}, got '{value}'"
                ));
            };
            rate = Some(r);
        } else {
            // Not echoed: it may be a key pasted in the wrong place.
            return Err(format!("word {} is neither rate=REQUESTS_PER_SECOND nor admin; {FORMAT}", i + 3));
        }
    }
    Ok(Some(Line { name, key, rate_per_s: rate, admin }))
}

impl ApiKeys {
    /// Parses a keys file's text; an empty set of keys is an error (it would
    /// lock every client out).
    pub fn parse(text: &str) -> Result<ApiKeys, ParseError> {
        let now = Instant::now();
        let mut keys = ApiKeys { keys: Vec::new(), index: HashMap::new() };
        let mut lines_of: HashMap<Arc<str>, usize> = HashMap::new();
        let mut key_lines: Vec<usize> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| ParseError { line: i + 1, message };
            let Some(Line { name, key, rate_per_s, admin }) = parse_line(line).map_err(err)? else { continue };
            if let Some(first) = lines_of.get(name) {
                return Err(err(format!("the name '{name}' is already used on line {first}")));
            }
            let d = digest(key.as_bytes());
            if let Some(other) = keys.lookup(&d) {
                let (line, name) = (key_lines[other], &keys.keys[other].name);
                return Err(err(format!("the same key as line {line} ('{name}')")));
            }
            if keys.keys.len() == MAX_KEYS {
                return Err(err(format!("more than {MAX_KEYS} keys")));
            }
            let name: Arc<str> = name.into();
            lines_of.insert(name.clone(), i + 1);
            key_lines.push(i + 1);
            keys.index.entry(prefix(&d)).or_default().push(keys.keys.len());
            let tokens = rate_per_s.map_or(0.0, burst);
            keys.keys.push(Key { name, digest: d, rate_per_s, admin, bucket: Mutex::new(Bucket { tokens, at: now }) });
        }
        if keys.keys.is_empty() {
            return Err(ParseError { line: text.lines().count().max(1), message: "the file holds no key".into() });
        }
        Ok(keys)
    }

    /// Reads and parses `path`; errors are one line naming the file and line.
    pub fn load(path: &Path) -> anyhow::Result<ApiKeys> {
        use std::io::Read;
        let shown = path.display();
        let file = std::fs::File::open(path).with_context(|| format!("--api-keys {shown}"))?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("--api-keys {shown}"))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            bail!("--api-keys {shown}: larger than {MAX_FILE_BYTES} bytes");
        }
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count();
                bail!("--api-keys {shown}:{line}: not UTF-8 text");
            }
        };
        let keys =
            ApiKeys::parse(&text).map_err(|e| anyhow::anyhow!("--api-keys {shown}:{}: {}", e.line, e.message))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0) {
                tracing::warn!("--api-keys {shown} is readable by every user of this machine (chmod 600 it)");
            }
        }
        tracing::info!("{} API keys from {shown} ({} admin)", keys.len(), keys.keys.iter().filter(|k| k.admin).count());
        Ok(keys)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn lookup(&self, d: &[u8; 32]) -> Option<usize> {
        let candidates = self.index.get(&prefix(d))?;
        // Every candidate is compared in full, in constant time.
        candidates.iter().copied().fold(None, |found, i| if ct_eq(&self.keys[i].digest, d) { Some(i) } else { found })
    }

    /// The key presented as `key`, if it is one of ours.
    fn find(&self, key: &[u8]) -> Option<&Key> {
        self.lookup(&digest(key)).map(|i| &self.keys[i])
    }

    /// Takes one request from the bucket of `key` at `now`; when it is empty,
    /// the whole seconds until it holds one again.
    fn take(key: &Key, now: Instant) -> Result<(), u64> {
        let Some(rate) = key.rate_per_s else { return Ok(()) };
        let mut b = key.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed_s = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed_s * rate).min(burst(rate));
        b.at = b.at.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err((((1.0 - b.tokens) / rate).ceil() as u64).max(1))
    }

    /// Who presents `key` at `now`: `Ok(None)` for no such key, `Err(seconds)`
    /// when its rate is used up.
    pub fn check(&self, key: &[u8], now: Instant) -> Result<Option<Caller>, u64> {
        let Some(k) = self.find(key) else { return Ok(None) };
        ApiKeys::take(k, now)?;
        Ok(Some(Caller::Key { name: k.name.clone(), admin: k.admin }))
    }
}

/// The token of `Authorization: Bearer TOKEN` (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let split = value.iter().position(|b| *b == b' ')?;
    let (scheme, token) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn unauthorized() -> Response {
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or unknown API key: send Authorization: Bearer KEY",
    )
    .into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"raftgen\""));
    resp
}

/// The middleware in front of the public API (see the module docs).
pub async fn layer(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let Some(keys) = app.api_keys.as_deref() else { return next.run(req).await };
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    if secret_ok(&app, req.headers()) {
        req.extensions_mut().insert(Caller::Node);
        return next.run(req).await;
    }
    let Some(token) = bearer(req.headers()) else { return unauthorized() };
    match keys.check(token, Instant::now()) {
        Ok(None) => unauthorized(),
        Ok(Some(caller)) => {
            let span = match &caller {
                Caller::Key { name, .. } => tracing::info_span!("api", api_key = %name),
                Caller::Node => tracing::Span::none(),
            };
            req.extensions_mut().insert(caller);
            next.run(req).instrument(span).await
        }
        Err(retry_after_s) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "this API key is over its request rate")
                .retry_after(retry_after_s)
                .into_response()
        }
    }
}

/// Membership changes need the cluster secret or, when keys are configured,
/// an admin key (the layer has already refused requests without a valid key).
pub fn require_admin(app: &App, headers: &HeaderMap, caller: Option<&Caller>) -> Result<(), ApiError> {
    match caller {
        _ if secret_ok(app, headers) => Ok(()),
        Some(Caller::Node | Caller::Key { admin: true, .. }) => Ok(()),
        Some(Caller::Key { .. }) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "membership changes need an admin API key or the cluster secret",
        )),
        None => Err(ApiError::unauthorized()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccc";

    fn err(text: &str) -> ParseError {
        ApiKeys::parse(text).expect_err("a parse error")
    }

    fn caller(keys: &ApiKeys, key: &str, now: Instant) -> Result<Option<(String, bool)>, u64> {
        keys.check(key.as_bytes(), now).map(|c| {
            c.map(|c| match c {
                Caller::Key { name, admin } => (name.to_string(), admin),
                Caller::Node => panic!("a key is never a node"),
            })
        })
    }

    #[test]
    fn comments_blank_lines_and_options_parse() {
        let text = format!(
            "# the keys of the staging cluster\n\n   \nops {A} admin   # on-call\n\tweb {B} rate=2.5\nbatch {C} admin rate=10 #x\n"
        );
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(keys.len(), 3);
        let now = Instant::now();
        assert_eq!(caller(&keys, A, now), Ok(Some(("ops".into(), true))));
        assert_eq!(caller(&keys, B, now), Ok(Some(("web".into(), false))));
        assert_eq!(caller(&keys, C, now), Ok(Some(("batch".into(), true))));
        assert_eq!(caller(&keys, "dddddddddddddddddddddddddddddddd", now), Ok(None));
        assert_eq!(caller(&keys, &A[1..], now), Ok(None));
        // A '#' inside a key is part of it; only a word starting with '#' comments.
        let keys = ApiKeys::parse("k abc#defghijklmnopq").unwrap();
        assert!(caller(&keys, "abc#defghijklmnopq", now).unwrap().is_some());
    }

    #[test]
    fn bad_lines_are_named_by_number_without_the_key() {
        let cases: Vec<(String, usize, &str)> = vec![
            (format!("# c\nalice {A} rate=abc\n"), 2, "rate must be"),
            (format!("alice {A} rate=0\n"), 1, "rate must be"),
            (format!("alice {A} rate=-1\n"), 1, "rate must be"),
            (format!("alice {A} rate=inf\n"), 1, "rate must be"),
            (format!("alice {A} rate=NaN\n"), 1, "rate must be"),
            (format!("alice {A} rate=1 rate=2\n"), 1, "twice"),
            (format!("alice {A} admin admin\n"), 1, "twice"),
            ("\n\nalice\n".into(), 3, "missing the key"),
            ("alice rate=5\n".into(), 1, "missing the key"),
            ("alice admin\n".into(), 1, "missing the key"),
            ("alice short\n".into(), 1, "16 to 256 characters"),
            (format!("alice {}\n", "k".repeat(MAX_KEY_BYTES + 1)), 1, "16 to 256 characters"),
            (format!("alice {A}é\n"), 1, "printable ASCII"),
            (format!("al:ice {A}\n"), 1, "the name must be"),
            (format!("{} {A}\n", "n".repeat(MAX_NAME_BYTES + 1)), 1, "the name must be"),
            (format!("alice {A}\nbob {B}\nalice {C}\n"), 3, "'alice' is already used on line 1"),
            (format!("alice {A}\nbob {B}\ncarol {A}\n"), 3, "the same key as line 1 ('alice')"),
            (format!("alice {A} {B}\n"), 1, "word 3 is neither"),
            (format!("alice {A} admin rate=1 extra\n"), 1, "word 5 is neither"),
            ("# only comments\n\n".into(), 2, "no key"),
            (String::new(), 1, "no key"),
        ];
        for (text, line, needle) in cases {
            let e = err(&text);
            assert_eq!(e.line, line, "{text:?}: {e:?}");
            assert!(e.message.contains(needle), "{text:?}: {e:?}");
            for key in [A, B, C] {
                assert!(!e.message.contains(key), "{text:?}: the message repeats a key: {e:?}");
            }
        }
    }

    #[test]
    fn too_many_keys_are_refused() {
        let text: String = (0..=MAX_KEYS).map(|i| format!("k{i} key-number-{i:0>16}\n")).collect::<Vec<_>>().concat();
        let e = err(&text);
        assert_eq!(e.line, MAX_KEYS + 1);
        assert!(e.message.contains("more than"), "{e:?}");
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let keys = ApiKeys::parse(&format!("slow {A} rate=0.5\nfast {B} rate=3\nfree {C}\n")).unwrap();
        let t0 = Instant::now();
        // rate 0.5: burst 1, then one request every 2 s.
        assert!(caller(&keys, A, t0).is_ok());
        assert_eq!(caller(&keys, A, t0), Err(2));
        assert_eq!(caller(&keys, A, t0 + Duration::from_millis(1_500)), Err(1));
        assert!(caller(&keys, A, t0 + Duration::from_millis(2_000)).is_ok());
        // A refused request takes nothing.
        assert_eq!(caller(&keys, A, t0 + Duration::from_millis(2_000)), Err(2));
        // rate 3: a burst of 3, refilled at 3 a second, never above the burst.
        for _ in 0..3 {
            assert!(caller(&keys, B, t0).is_ok());
        }
        assert_eq!(caller(&keys, B, t0), Err(1));
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(caller(&keys, B, later).is_ok());
        }
        assert!(caller(&keys, B, later).is_err());
        // No rate: no limit.
        for _ in 0..1_000 {
            assert!(caller(&keys, C, t0).is_ok());
        }
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for (value, token) in
            [("Bearer abc", Some("abc")), ("bearer  abc ", Some("abc")), ("Basic abc", None), ("Bearer ", None)]
        {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(bearer(&h), token.map(str::as_bytes), "{value:?}");
        }
    }

    #[test]
    fn debug_output_names_keys_but_shows_no_key() {
        let keys = ApiKeys::parse(&format!("alice {A}\n")).unwrap();
        let shown = format!("{keys:?}");
        assert!(shown.contains("alice") && !shown.contains(A), "{shown}");
    }
}
