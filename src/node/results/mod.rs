//! The data plane of results: where result images live, how they get there
//! before a job is reported done, and how any node reads them.
//!
//! The Raft log carries what names and locates an image
//! ([`raftgen_raft::result::ResultMeta`]); the bytes live here:
//!
//! - **embedded** (the default): each node's content-addressed store
//!   ([`store`]). The node that ran the job stores the PNG, pushes it to
//!   `result_copies - 1` other nodes chosen by rendezvous hashing
//!   ([`raftgen_raft::repair::push_targets`]), each of which verifies the
//!   sha256 and syncs the file before answering, and only then reports the
//!   job (`Complete`), once. An acknowledged result survives the loss of any
//!   `result_copies - 1` of its holders.
//! - **object store** (`--result-store s3://…`, [`object`]): the node uploads
//!   the PNG before reporting it, and readers fetch it from the store.
//!
//! Reads ([`Results::read`]) serve the local copy, else a copy fetched earlier
//! ([`cache`]), else fetch one from a holder or the store (checked against
//! its hash, one fetch per image however many readers wait for it), else
//! answer "unavailable" (the API's 503 with Retry-After), never hang.
//! Deleting what retention evicted, sweeping orphans and reporting lost
//! copies is the [`janitor`]'s; copying under-replicated results is the
//! leader's [`repair`] loop.

pub mod cache;
pub mod janitor;
pub mod object;
pub mod repair;
pub mod store;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use raftgen_raft::job::{JobId, NodeId, MAX_IMAGE_BYTES};
use raftgen_raft::network::SECRET_HEADER;
use raftgen_raft::result::{Location, ResultHash, ResultInfo, ResultMeta};
use tokio::sync::{OnceCell, Semaphore};

use crate::node::app::App;

/// Where results are read from and written to on this node: the
/// node-to-node paths, relative to a node's port.
pub fn peer_path(sha: &ResultHash) -> String {
    format!("/raft/results/{sha}")
}

/// Result storage settings of one node (flags of `raftgen node`).
#[derive(Clone, Debug)]
pub struct ResultSettings {
    /// `--result-store`: an object store URL; `None`: the embedded store.
    pub store_url: Option<String>,
    /// `--result-cache-mb`, in bytes: images fetched from elsewhere kept here.
    pub cache_bytes: u64,
    /// `--repair-max-mbps`, in bytes per second: the leader's repair copies
    /// start no faster than this, cluster-wide.
    pub repair_max_bytes_per_s: u64,
    /// `--result-push-timeout-ms`: how long the node that made a result keeps
    /// trying to make its copies durable before it fails the attempt
    /// (retryably).
    pub push_timeout_ms: u64,
    /// Longest one push or fetch of an image between nodes may take.
    pub transfer_timeout_ms: u64,
    /// `--result-orphan-grace-ms`: a stored image that no retained job
    /// names is deleted once it is this old (a copy that was pushed but whose
    /// job was not reported yet is younger).
    pub orphan_grace_ms: u64,
    /// `--presign-ttl-s`: OpenAI `url` responses point at the object store
    /// for this long (0: at this node).
    pub presign_ttl_s: u64,
    /// How often the leader sweeps the object store for orphans.
    pub sweep_interval_ms: u64,
    /// TEST HOOK (a planted bug for the chaos checkers, never for use):
    /// report a result before its copies are durable.
    pub unsafe_complete_before_durable: bool,
}

impl Default for ResultSettings {
    fn default() -> Self {
        ResultSettings {
            store_url: None,
            cache_bytes: 256 << 20,
            repair_max_bytes_per_s: 100 * 125_000,
            push_timeout_ms: 60_000,
            transfer_timeout_ms: 30_000,
            orphan_grace_ms: 15 * 60_000,
            presign_ttl_s: 0,
            sweep_interval_ms: 3_600_000,
            unsafe_complete_before_durable: false,
        }
    }
}

/// Peer requests served at once, per kind (beyond: 503, and the asker tries
/// another node or later).
const MAX_CONCURRENT_RECEIVES: usize = 16;
const MAX_CONCURRENT_SERVES: usize = 32;
/// Fetches from other nodes or the store in flight at once for readers.
const MAX_CONCURRENT_FETCHES: usize = 32;
/// Longest a reader waits for a free fetch slot before answering 503.
const FETCH_QUEUE_MS: u64 = 2_000;
/// First and largest pause between two rounds of pushes.
const PUSH_RETRY_MIN_MS: u64 = 100;
const PUSH_RETRY_MAX_MS: u64 = 2_000;
/// How long the planted bug waits before it really stores the copies.
const UNSAFE_DELAY_MS: u64 = 2_000;

/// Why a read found no bytes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// No holder (or the store) answered with the image now; it may later.
    #[error("{0}")]
    Unavailable(String),
}

/// Byte counts of the data plane, for `/metrics`.
#[derive(Default)]
pub struct Traffic {
    /// Image bytes this node pushed to others (its own results).
    pub pushed: AtomicU64,
    /// Image bytes it served to other nodes (reads, repair copies).
    pub served: AtomicU64,
    /// Image bytes it fetched from other nodes or the store.
    pub fetched: AtomicU64,
    /// Image bytes it received as pushes.
    pub received: AtomicU64,
    /// Reads answered from the local store, the cache, a fetch; and failed.
    pub reads_local: AtomicU64,
    pub reads_cached: AtomicU64,
    pub reads_fetched: AtomicU64,
    pub reads_unavailable: AtomicU64,
}

type Fetch = Arc<OnceCell<Result<Bytes, ReadError>>>;

pub struct Results {
    pub settings: ResultSettings,
    pub local: Arc<store::LocalStore>,
    pub object: Option<Arc<object::ObjectResults>>,
    pub cache: cache::ResultCache,
    pub traffic: Traffic,
    /// One fetch per image, shared by every reader waiting for it.
    fetching: Mutex<HashMap<ResultHash, Fetch>>,
    fetch_permits: Semaphore,
    pub(crate) receive_permits: Semaphore,
    pub(crate) serve_permits: Semaphore,
}

impl Results {
    /// Opens the embedded store under `data` (always: it also receives the
    /// copies of nodes that use it) and the object store, if one is set.
    pub fn open(data: &std::path::Path, settings: ResultSettings) -> anyhow::Result<Results> {
        let local = Arc::new(store::LocalStore::open(data)?);
        let object = match &settings.store_url {
            Some(url) => Some(Arc::new(object::ObjectResults::open(url)?)),
            None => None,
        };
        if settings.presign_ttl_s > 0 && !object.as_ref().is_some_and(|o| o.can_presign()) {
            anyhow::bail!("--presign-ttl-s needs an s3://, gs:// or az:// --result-store");
        }
        Ok(Results {
            cache: cache::ResultCache::new(settings.cache_bytes),
            settings,
            local,
            object,
            traffic: Traffic::default(),
            fetching: Mutex::new(HashMap::new()),
            fetch_permits: Semaphore::new(MAX_CONCURRENT_FETCHES),
            receive_permits: Semaphore::new(MAX_CONCURRENT_RECEIVES),
            serve_permits: Semaphore::new(MAX_CONCURRENT_SERVES),
        })
    }

    fn transfer_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.transfer_timeout_ms)
    }

    // ---- Writing: before a job is reported ----

    /// Makes the PNG of `job`'s `attempt` durable where the cluster keeps
    /// results, and says where: the metadata its `Complete` carries. Fails
    /// (the attempt is then reported as a retryable failure) when the copies
    /// cannot be made durable within `--result-push-timeout-ms`.
    pub async fn commit(&self, app: &App, job: JobId, attempt: u32, png: Vec<u8>) -> Result<ResultMeta, String> {
        if png.len() > MAX_IMAGE_BYTES {
            return Err(format!("result image of {} bytes exceeds {MAX_IMAGE_BYTES} bytes", png.len()));
        }
        let (width, height) = png_size(&png).ok_or("the executor's output is not a PNG")?;
        let sha = ResultHash::of(&png);
        let png = Bytes::from(png);
        let bytes = png.len() as u64;
        let meta = |location| ResultMeta { sha256: sha, bytes, width, height, location };
        if let Some(object) = &self.object {
            let key = object.key(&sha, job, attempt);
            let deadline = Instant::now() + Duration::from_millis(self.settings.push_timeout_ms);
            let mut pause = Duration::from_millis(PUSH_RETRY_MIN_MS);
            loop {
                match tokio::time::timeout(self.transfer_timeout(), object.put(&key, png.clone())).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) if Instant::now() + pause >= deadline => {
                        return Err(format!("uploading the result to {}: {e:#}", object.url))
                    }
                    Err(_) if Instant::now() + pause >= deadline => {
                        return Err(format!("uploading the result to {}: timed out", object.url))
                    }
                    _ => {}
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(PUSH_RETRY_MAX_MS));
            }
            self.traffic.pushed.fetch_add(png.len() as u64, Ordering::Relaxed);
            return Ok(meta(Location::Object(key)));
        }
        if self.settings.unsafe_complete_before_durable {
            return Ok(meta(Location::Nodes(self.unsafe_commit(app, sha, png))));
        }
        let local = self.local.clone();
        let bytes = png.clone();
        tokio::task::spawn_blocking(move || local.put(&sha, &bytes))
            .await
            .map_err(|e| format!("storing the result: {e}"))?
            .map_err(|e| format!("storing the result: {e}"))?;
        let holders = self.push_copies(app, &sha, &png).await?;
        Ok(meta(Location::Nodes(holders)))
    }

    /// Pushes `png` to other nodes until, with this node's copy, enough are
    /// durable (see [`raftgen_raft::repair::push_targets`]); returns the
    /// holders (this node first among them).
    async fn push_copies(&self, app: &App, sha: &ResultHash, png: &Bytes) -> Result<BTreeSet<NodeId>, String> {
        let deadline = Instant::now() + Duration::from_millis(self.settings.push_timeout_ms);
        let mut holders = BTreeSet::from([app.id]);
        let mut pause = Duration::from_millis(PUSH_RETRY_MIN_MS);
        loop {
            let members = app.members();
            let (candidates, required) = {
                let data = app.view.read();
                raftgen_raft::repair::push_targets(&data.jobs, &members.keys().copied().collect(), app.id, sha)
            };
            // One pass over the candidates, best first, a round of the
            // missing number at a time.
            let mut untried = candidates.into_iter().filter(|c| !holders.contains(c)).collect::<Vec<_>>().into_iter();
            let mut last_error = String::new();
            while holders.len() < required {
                let round: Vec<NodeId> = untried.by_ref().take(required - holders.len()).collect();
                if round.is_empty() {
                    break;
                }
                let pushes = round.iter().map(|node| {
                    let addr = members.get(node).cloned().unwrap_or_default();
                    async move { (*node, self.push_one(app, &addr, sha, png).await) }
                });
                for (node, result) in futures_util::future::join_all(pushes).await {
                    match result {
                        Ok(()) => {
                            holders.insert(node);
                        }
                        Err(e) => last_error = format!("node {node}: {e}"),
                    }
                }
            }
            if holders.len() >= required {
                return Ok(holders);
            }
            if Instant::now() + pause >= deadline || *app.shutdown.borrow() {
                return Err(format!(
                    "only {} of {required} copies of the result are durable after {} ms (last error: {last_error})",
                    holders.len(),
                    self.settings.push_timeout_ms
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(PUSH_RETRY_MAX_MS));
        }
    }

    async fn push_one(&self, app: &App, addr: &str, sha: &ResultHash, png: &Bytes) -> Result<(), String> {
        if addr.is_empty() {
            return Err("not a member".into());
        }
        let resp = app
            .client
            .put(app.scheme.url(addr, &peer_path(sha)))
            .header(SECRET_HEADER, &*app.secret)
            .timeout(self.transfer_timeout())
            .body(png.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        app.metrics.peer_sent_bytes.fetch_add(png.len() as u64, Ordering::Relaxed);
        self.traffic.pushed.fetch_add(png.len() as u64, Ordering::Relaxed);
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => Err(format!("HTTP {s}: {}", resp.text().await.unwrap_or_default())),
        }
    }

    /// The planted bug (`unsafe_complete_before_durable`): names the holders
    /// at once and stores the copies only later, in the background.
    fn unsafe_commit(&self, app: &App, sha: ResultHash, png: Bytes) -> BTreeSet<NodeId> {
        let members = app.members();
        let (candidates, required) = {
            let data = app.view.read();
            raftgen_raft::repair::push_targets(&data.jobs, &members.keys().copied().collect(), app.id, &sha)
        };
        let targets: Vec<NodeId> = candidates.into_iter().take(required.saturating_sub(1)).collect();
        let holders: BTreeSet<NodeId> = std::iter::once(app.id).chain(targets.iter().copied()).collect();
        let (local, client, scheme, secret) = (self.local.clone(), app.client.clone(), app.scheme, app.secret.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(UNSAFE_DELAY_MS)).await;
            let bytes = png.clone();
            let _ = tokio::task::spawn_blocking(move || local.put(&sha, &bytes)).await;
            for node in targets {
                if let Some(addr) = members.get(&node) {
                    let _ = client
                        .put(scheme.url(addr, &peer_path(&sha)))
                        .header(SECRET_HEADER, &*secret)
                        .body(png.clone())
                        .send()
                        .await;
                }
            }
        });
        holders
    }

    /// A copy pushed to this node: checked against `sha`, made durable.
    pub async fn receive(&self, sha: ResultHash, bytes: Bytes) -> Result<(), ReceiveError> {
        let _permit = self.receive_permits.try_acquire().map_err(|_| ReceiveError::Busy)?;
        if ResultHash::of(&bytes) != sha {
            return Err(ReceiveError::Mismatch);
        }
        self.traffic.received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || local.put(&sha, &bytes))
            .await
            .map_err(|e| ReceiveError::Io(e.to_string()))?
            .map_err(|e| ReceiveError::Io(e.to_string()))
    }

    /// Fetches `sha` from `from` and stores it here durably (a repair copy
    /// the leader asked for).
    pub async fn copy_from(&self, app: &App, sha: ResultHash, from: NodeId) -> Result<(), String> {
        if self.local.contains(&sha) {
            // Held already (refresh its time, as a push would).
            let local = self.local.clone();
            return match tokio::task::spawn_blocking(move || local.get(&sha)).await {
                Ok(Ok(Some(bytes))) => self.receive(sha, Bytes::from(bytes)).await.map_err(|e| e.to_string()),
                _ => Err("the local copy is unreadable".into()),
            };
        }
        let addr = app.members().get(&from).cloned().ok_or_else(|| format!("node {from} is not a member"))?;
        let bytes = self.fetch_from_node(app, &addr, &sha).await?;
        self.receive(sha, bytes).await.map_err(|e| e.to_string())
    }

    // ---- Reading ----

    /// The image `info` names, held at `location`: see the module docs.
    pub async fn read(&self, app: &App, info: &ResultInfo, location: &Location) -> Result<Bytes, ReadError> {
        let sha = info.sha256;
        if self.local.contains(&sha) {
            let local = self.local.clone();
            match tokio::task::spawn_blocking(move || local.get(&sha)).await {
                Ok(Ok(Some(bytes))) => {
                    self.traffic.reads_local.fetch_add(1, Ordering::Relaxed);
                    return Ok(Bytes::from(bytes));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!("reading result {sha}: {e}"),
                Err(e) => tracing::warn!("reading result {sha}: {e}"),
            }
        }
        if let Some(bytes) = self.cache.get(&sha) {
            self.traffic.reads_cached.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        }
        let cell: Fetch = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            fetching.entry(sha).or_default().clone()
        };
        let result = cell.get_or_init(|| self.fetch(app, sha, location)).await.clone();
        match &result {
            Ok(bytes) => {
                self.traffic.reads_fetched.fetch_add(1, Ordering::Relaxed);
                self.cache.insert(sha, bytes.clone());
            }
            Err(_) => {
                self.traffic.reads_unavailable.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Cached first, then forgotten here: a reader arriving in between
        // finds one or the other.
        self.fetching.lock().unwrap_or_else(|e| e.into_inner()).remove(&sha);
        result
    }

    /// One fetch of `sha` from its holders (best first) or the store.
    async fn fetch(&self, app: &App, sha: ResultHash, location: &Location) -> Result<Bytes, ReadError> {
        let wait = Duration::from_millis(FETCH_QUEUE_MS);
        let _permit = tokio::time::timeout(wait, self.fetch_permits.acquire())
            .await
            .map_err(|_| ReadError::Unavailable("too many result fetches in progress here".into()))?
            .map_err(|_| ReadError::Unavailable("shutting down".into()))?;
        match location {
            Location::Object(key) => {
                let object = self.object.as_ref().ok_or_else(|| {
                    ReadError::Unavailable(
                        "the result is in an object store and this node has no --result-store".into(),
                    )
                })?;
                let bytes = tokio::time::timeout(self.transfer_timeout(), object.get(key))
                    .await
                    .map_err(|_| ReadError::Unavailable(format!("{}: timed out", object.url)))?
                    .map_err(|e| ReadError::Unavailable(format!("{}: {e:#}", object.url)))?;
                if ResultHash::of(&bytes) != sha {
                    return Err(ReadError::Unavailable(format!("{}: {key} does not match its hash", object.url)));
                }
                self.traffic.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(bytes)
            }
            Location::Nodes(holders) => {
                let members = app.members();
                let order = raftgen_raft::placement::rank(
                    &sha,
                    holders.iter().copied().filter(|n| *n != app.id && members.contains_key(n)),
                );
                let mut errors = Vec::new();
                for node in order {
                    match self.fetch_from_node(app, &members[&node], &sha).await {
                        Ok(bytes) => return Ok(bytes),
                        Err(e) => errors.push(format!("node {node}: {e}")),
                    }
                }
                if errors.is_empty() {
                    errors.push(format!("no member holds it (holders {holders:?})"));
                }
                Err(ReadError::Unavailable(format!("no holder of the result answered: {}", errors.join("; "))))
            }
        }
    }

    async fn fetch_from_node(&self, app: &App, addr: &str, sha: &ResultHash) -> Result<Bytes, String> {
        let resp = app
            .client
            .get(app.scheme.url(addr, &peer_path(sha)))
            .header(SECRET_HEADER, &*app.secret)
            .timeout(self.transfer_timeout())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > MAX_IMAGE_BYTES as u64) {
            return Err("larger than any result".into());
        }
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        if ResultHash::of(&bytes) != *sha {
            return Err("its copy does not match the hash".into());
        }
        self.traffic.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// The local copy of `sha`, for another node (a read or a repair copy).
    pub async fn serve(&self, sha: ResultHash) -> Result<Option<Bytes>, ReceiveError> {
        let _permit = self.serve_permits.try_acquire().map_err(|_| ReceiveError::Busy)?;
        let local = self.local.clone();
        let got =
            tokio::task::spawn_blocking(move || local.get(&sha)).await.map_err(|e| ReceiveError::Io(e.to_string()))?;
        match got {
            Ok(Some(b)) => {
                self.traffic.served.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(Bytes::from(b)))
            }
            Ok(None) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(None),
            Err(e) => Err(ReceiveError::Io(e.to_string())),
        }
    }

    /// A URL for `location` that clients may fetch directly, when the store
    /// can presign and `--presign-ttl-s` is set.
    pub async fn presigned_url(&self, location: &Location) -> Option<String> {
        let (Some(object), Location::Object(key)) = (&self.object, location) else { return None };
        if self.settings.presign_ttl_s == 0 {
            return None;
        }
        match object.presign(key, Duration::from_secs(self.settings.presign_ttl_s)).await {
            Ok(url) => Some(url),
            Err(e) => {
                tracing::warn!("presigning {key}: {e:#}");
                None
            }
        }
    }
}

/// Why a peer's push or fetch was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("busy: too many transfers in progress")]
    Busy,
    #[error("the bytes do not hash to the name")]
    Mismatch,
    #[error("storing: {0}")]
    Io(String),
}

/// Width and height from a PNG's IHDR chunk (the first chunk, at a fixed place).
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}
