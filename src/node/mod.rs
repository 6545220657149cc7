//! The node's runtime, and starting and stopping one node: storage, Raft, the
//! HTTP port, and the background tasks (scheduler, executor host,
//! registration, join, snapshots, job timing metrics).
//!
//! The runtime's pieces: [`app`] (the shared context and the one write
//! path), [`proposer`] and [`forwarder`] (group commit on the leader,
//! batching of forwarded writes, both over [`batch`]), [`scheduler`] (the
//! leader's loop), [`host`] (the executor host), [`membership`] (join and
//! leave), [`drain`] (SIGTERM), [`snapshot_guard`], [`webhook`] (deliveries),
//! [`raft_runtime`] (the Raft core's own threads), [`results`] (where result images live: the embedded store, pushes and
//! reads between nodes, an object store, the janitor and the leader's
//! repair), [`config`] (settings).
//! Shutdown is handled here and only here: SIGINT/SIGTERM start the drain
//! (`drain`: no new jobs, finish or hand back the running ones), then the HTTP
//! server stops, the shared shutdown flag flips and Raft shuts down.

pub mod app;
pub mod batch;
pub mod config;
pub mod drain;
pub mod forwarder;
pub mod host;
pub mod membership;
pub mod proposer;
pub mod raft_runtime;
pub mod results;
pub mod scheduler;
pub mod snapshot_guard;
pub mod webhook;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use openraft::BasicNode;
use raftgen_raft::network::{NetworkFactory, PeerHealth, Scheme, SECRET_HEADER};
use raftgen_raft::{NodeId, Raft};
use tokio::sync::watch;

use crate::executor::Executor;
use crate::node::app::App;
use crate::node::config::NodeSettings;

pub struct NodeOptions {
    pub id: NodeId,
    pub listen: SocketAddr,
    /// Address others reach us at (defaults to `listen`).
    pub advertise: Option<String>,
    pub data: PathBuf,
    pub init: bool,
    pub join: Option<String>,
    pub secret: String,
    /// `--api-keys`, read at start-up; `None`: the public API is open.
    pub api_keys: Option<Arc<crate::http::auth::ApiKeys>>,
    pub settings: NodeSettings,
    pub executor: Arc<dyn Executor>,
    /// `--tls-cert`/`--tls-key`(/`--tls-ca`), loaded at start-up: serve TLS
    /// and reach the other nodes over `https`.
    pub tls: Option<crate::tls::NodeTls>,
}

/// Refuses to open another node's data directory under a different id.
fn check_node_id(opts: &NodeOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.data).with_context(|| format!("creating {}", opts.data.display()))?;
    let path = opts.data.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim() == opts.id.to_string() => Ok(()),
        Ok(s) => bail!("{} belongs to node {}, not node {}", opts.data.display(), s.trim(), opts.id),
        Err(_) => write_durably(&path, format!("{}\n", opts.id).as_bytes())
            .with_context(|| format!("writing {}", path.display())),
    }
}

/// Writes a small file so that a power loss leaves it whole or absent: a
/// temporary file, synced, renamed into place, and the directory synced.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The file in a data directory that says its node left the cluster
/// (`raftgen leave`): written when the leader tells it, read at start.
pub const LEFT_FILE: &str = "left";

/// A node that left: its Raft state belongs to a membership it is no longer
/// part of (it would campaign forever). With `--join` it starts over as a new
/// member (its Raft state discarded; its results were handed over before it
/// left); without, it says how to come back.
fn start_over_if_left(opts: &NodeOptions) -> anyhow::Result<()> {
    let marker = opts.data.join(LEFT_FILE);
    if !marker.exists() {
        return Ok(());
    }
    let Some(join) = &opts.join else {
        bail!(
            "node {} left the cluster (raftgen leave); to join again, start it with --join URL (its old Raft state \
             in {} is then discarded)",
            opts.id,
            opts.data.display()
        );
    };
    tracing::info!(
        "node {} left the cluster earlier: discarding its old Raft state, joining again through {join}",
        opts.id
    );
    let sled = opts.data.join("sled");
    if sled.exists() {
        std::fs::remove_dir_all(&sled).with_context(|| format!("removing {}", sled.display()))?;
    }
    std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    std::fs::File::open(&opts.data)?.sync_all()?;
    Ok(())
}

/// Records that this node left the cluster and stops it (as SIGTERM would:
/// one shutdown path). Called when the leader says so, after the removal.
pub fn mark_left(app: &App) -> std::io::Result<()> {
    write_durably(&app.data_dir.join(LEFT_FILE), b"removed from the cluster by raftgen leave\n")?;
    tracing::info!("this node left the cluster: stopping");
    tokio::spawn(async {
        // Let the answer go out first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SAFETY: kill(2) on this process, with a signal it handles.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    Ok(())
}

/// How long a node waits for another process to let go of its data dir (the
/// same node still draining after SIGTERM, when systemd restarts it).
const DATA_DIR_LOCK_WAIT_MS: u64 = 15_000;

/// Opens the Raft storage, waiting (bounded) while another process holds it.
async fn open_storage(
    opts: &NodeOptions,
) -> anyhow::Result<(raftgen_storage::LogStore, raftgen_storage::StateMachineStore)> {
    let deadline = std::time::Instant::now() + Duration::from_millis(DATA_DIR_LOCK_WAIT_MS);
    let mut told = false;
    loop {
        match raftgen_storage::open_with(&opts.data, opts.settings.durability) {
            Ok(stores) => return Ok(stores),
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    bail!(
                        "{} is in use by another process (a raftgen node still running or stopping?); stop it first",
                        opts.data.display()
                    );
                }
                if !told {
                    tracing::info!(
                        "{} is held by another process (stopping?): waiting up to {DATA_DIR_LOCK_WAIT_MS} ms",
                        opts.data.display()
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("opening {}", opts.data.display()))),
        }
    }
}

pub async fn run(opts: NodeOptions) -> anyhow::Result<()> {
    if opts.id == 0 {
        bail!("--id must be at least 1");
    }
    // Created by this start: removed again if the port turns out to be taken.
    let fresh = !opts.data.exists();
    check_node_id(&opts)?;
    start_over_if_left(&opts)?;
    crate::logging::set_node_id(opts.id);
    let addr = opts.advertise.clone().unwrap_or_else(|| opts.listen.to_string());
    let (log, sm) = open_storage(&opts).await?;
    if opts.settings.durability == raftgen_storage::Durability::UnsafeFlushOnly {
        tracing::warn!("--unsafe-no-fsync: writes are acknowledged before they are synced; a power loss can lose them");
    }
    let results = results::Results::open(&opts.data, opts.settings.results.clone())
        .with_context(|| format!("opening the result store in {}", opts.data.display()))?;
    if let Some(object) = &results.object {
        tracing::info!("result images go to {}", object.url);
    }
    if opts.settings.results.unsafe_complete_before_durable {
        tracing::warn!(
            "TEST HOOK --unsafe-complete-before-durable: results are reported before their copies are durable"
        );
    }
    let view = sm.view();
    let health = PeerHealth::default();
    let (scheme, with_tls) = match &opts.tls {
        Some(tls) => (Scheme::Https, Some(tls)),
        None => (Scheme::Http, None),
    };
    let tls_client = |b: reqwest::ClientBuilder| match with_tls {
        Some(tls) => tls.client(b),
        None => b,
    };
    let raft_client = tls_client(raftgen_raft::network::client_builder()).build().context("raft http client")?;
    let metrics = crate::metrics::NodeMetrics::default();
    let network = NetworkFactory::new(opts.id, &opts.secret, health.clone(), raft_client, scheme)
        .count_sent_bytes(metrics.peer_sent_bytes.clone());
    let config = Arc::new(opts.settings.raft_config().validate().context("raft settings")?);
    // The core, its replication and its state machine on their own threads
    // (see `raft_runtime`); kept until this function returns.
    let raft_runtime = raft_runtime::RaftRuntime::start()?;
    let id = opts.id;
    let raft = raft_runtime
        .run(async move { Raft::new(id, config, network, log, sm).await })
        .await?
        .context("starting raft")?;
    // Bound after the data dir is opened, so that a restart while the old
    // process still drains waits for the dir (see `open_storage`) instead of
    // failing on the port the old process still holds.
    let listener = match tokio::net::TcpListener::bind(opts.listen).await {
        Ok(l) => l,
        Err(e) => {
            raft.shutdown().await.ok();
            drop(raft);
            if fresh {
                // A port already taken leaves no new data dir behind.
                let _ = std::fs::remove_dir_all(&opts.data);
            }
            return Err(anyhow::Error::new(e).context(format!("binding {}", opts.listen)));
        }
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let client = tls_client(reqwest::Client::builder().connect_timeout(Duration::from_millis(500)).tcp_nodelay(true))
        .build()
        .context("http client")?;
    let app = Arc::new(App {
        id: opts.id,
        data_dir: opts.data.clone(),
        addr: addr.clone(),
        raft: raft.clone(),
        view,
        settings: opts.settings.clone(),
        health,
        executor: opts.executor.clone(),
        client: client.clone(),
        scheme,
        secret: opts.secret.clone().into(),
        api_keys: opts.api_keys.clone(),
        proposer: crate::node::proposer::Proposer::start(raft.clone()),
        forwarder: crate::node::forwarder::Forwarder::start(
            client.clone(),
            scheme,
            opts.secret.clone().into(),
            metrics.peer_sent_bytes.clone(),
        ),
        snapshot_guard: crate::node::snapshot_guard::SnapshotGuard::new(
            raft.clone(),
            Duration::from_millis(2 * opts.settings.election_timeout_max_ms),
        ),
        shutdown: shutdown_rx,
        metrics,
        event_streams: crate::http::events::Streams::new(opts.settings.max_event_streams),
        results,
    });

    let initialized = raft.is_initialized().await?;
    if opts.init && !initialized {
        let members = BTreeMap::from([(opts.id, BasicNode { addr: addr.clone() })]);
        raft.initialize(members).await.context("initializing the cluster")?;
        tracing::info!("initialized a new cluster with node {} at {addr}", opts.id);
    } else if initialized {
        tracing::info!("resuming node {} from {}", opts.id, opts.data.display());
    } else if opts.join.is_none() {
        anyhow::bail!(
            "{} holds no cluster state: start with --init (a new cluster) or --join URL (an existing one)",
            opts.data.display()
        );
    }
    // A refusal that retrying cannot change (a wrong secret, an id in use at
    // another address) stops the node with the reason, exit status non-zero.
    let fatal: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(url) = opts.join.clone() {
        let (app, fatal) = (app.clone(), fatal.clone());
        tokio::spawn(async move {
            if let Err(e) = join_loop(app, url).await {
                *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                let _ = fatal_tx.send(());
            }
        });
    }
    tokio::spawn(crate::node::scheduler::run(app.clone()));
    tokio::spawn(crate::node::webhook::run(app.clone()));
    tokio::spawn(crate::node::host::run(app.clone()));
    tokio::spawn(crate::node::host::register(app.clone()));
    tokio::spawn(crate::node::host::rescan_on_sighup(app.clone()));
    tokio::spawn(snapshot_by_size(app.clone()));
    tokio::spawn(crate::metrics::observer::run(app.clone()));
    tokio::spawn(results::janitor::run(app.clone()));
    tokio::spawn(results::repair::run(app.clone()));

    tracing::info!(
        "node {} listening on {} (executor: {} on {}, dtype {}, slots: {})",
        opts.id,
        opts.listen,
        app.executor.name(),
        app.executor.device(),
        app.executor.dtype(),
        app.settings.slots
    );
    let stop = {
        let app = app.clone();
        async move {
            tokio::select! {
                _ = crate::node::drain::on_signal(app.clone()) => {}
                Ok(()) = fatal_rx => {}
            }
            // Open event streams never end by themselves: end them, or the
            // server would wait for them.
            app.event_streams.close();
        }
    };
    serve(listener, crate::http::router(app.clone()), opts.tls.as_ref(), stop).await?;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    raft.shutdown().await.ok();
    drop(raft_runtime);
    let fatal = fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
    match fatal {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

/// Serves the port (TLS when configured) until `shutdown`, then lets open
/// connections finish their requests.
async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<&crate::tls::NodeTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    match tls {
        None => axum::serve(listener, router).with_graceful_shutdown(shutdown).await.context("http server"),
        Some(tls) => crate::tls::serve(listener, router, tls, shutdown).await.context("https server"),
    }
}

/// Asks the cluster at `url` (any node) to add us, until we are a member.
/// A node restarted with its original `--join` finds itself a member already
/// (membership is in its own log) and does nothing, even if `url` is down.
/// Unreachable nodes, 5xx, 408 and 429 are retried; any other refusal is
/// permanent and returned (one line, for the operator).
async fn join_loop(app: Arc<App>, url: String) -> Result<(), String> {
    let url = format!("{}/v1/cluster/nodes", url.trim_end_matches('/'));
    let mut delay = Duration::from_millis(200);
    let mut shutdown = app.shutdown.clone();
    // Give the restored membership a moment to show in the metrics.
    tokio::time::sleep(Duration::from_millis(100)).await;
    loop {
        if app.is_member() {
            return Ok(());
        }
        let body = serde_json::json!({ "id": app.id, "addr": app.addr });
        let resp = app
            .client
            .post(&url)
            .header(SECRET_HEADER, &*app.secret)
            .timeout(Duration::from_millis(crate::node::config::MEMBERSHIP_TIMEOUT_MS))
            .json(&body)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                tracing::info!("joined the cluster through {url}");
                return Ok(());
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                let reason = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| text.chars().take(300).collect());
                let permanent = status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
                if permanent {
                    let hint = match status.as_u16() {
                        401 | 403 => " (is RAFTGEN_CLUSTER_SECRET the cluster's?)",
                        _ => "",
                    };
                    return Err(format!("join through {url} refused: {status}: {reason}{hint}"));
                }
                tracing::warn!("join through {url} refused: {status} {reason}; retrying");
            }
            Err(e) => tracing::warn!("join through {url}: {:#}", anyhow::Error::from(e)),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Snapshot by applied bytes as well as by entry count, so the log (and the
/// disk) stays bounded however large the commands (long prompts) are.
async fn snapshot_by_size(app: Arc<App>) {
    let mut shutdown = app.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        if app.view.bytes_since_snapshot() > app.settings.snapshot_max_bytes {
            if let Err(e) = app.raft.trigger().snapshot().await {
                tracing::warn!("snapshot: {e}");
            }
        }
    }
}
