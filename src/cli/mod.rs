//! The `raftgen` command line: `node` runs a node; `submit`, `status`, `job`,
//! `jobs` and `leave` talk to any node's HTTP API (every read command has
//! `--output json` for scripts; `submit --wait` shows a progress bar, see
//! [`follow`]); `demo` starts a local cluster ([`demo`], over [`local`], the
//! local-cluster harness the tests and benchmarks use too); `certs` makes a
//! test CA ([`certs`]). Errors are one line on stderr and a non-zero exit.

pub mod certs;
pub mod demo;
pub mod follow;
pub mod local;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use raftgen_raft::command::ClusterConfig;
use raftgen_raft::network::SECRET_HEADER;
use serde_json::{json, Value};

use crate::executor::diffusion::DiffusionExecutor;
use crate::executor::test_pattern::{Faults, TestPatternExecutor};
use crate::executor::{Executor, NoExecutor};
use crate::models::catalog::{Catalog, Scan};
use crate::node::config::NodeSettings;

/// The secret used when none is given: fine on one machine, never across a network.
pub const DEV_SECRET: &str = "raftgen-insecure-dev-secret";

#[derive(Parser)]
#[command(name = "raftgen", version, about = "A Raft-replicated text-to-image job cluster: one binary per GPU machine")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
    /// Log lines as text, or one JSON object per line (with `node_id`, and
    /// `job_id` on job-related lines).
    #[arg(long, global = true, value_enum, env = "RAFTGEN_LOG_FORMAT", default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExecutorKind {
    /// The real one: Stable Diffusion / Z-Image pipelines on candle.
    Diffusion,
    /// No executor: the node votes and serves the API but runs no job.
    None,
    /// TEST DOUBLE: synthetic deterministic images, for tests and benchmarks.
    TestPattern,
}

/// Largest `--max-batch`.
const MAX_BATCH: usize = 64;

/// The diffusion executor over the built-in model and `--models-dir`, on the
/// device and in the precision of `--device` and `--dtype`.
fn diffusion_executor(a: &NodeArgs) -> anyhow::Result<DiffusionExecutor> {
    let place = crate::executor::device::choose(a.device, a.dtype)?;
    let budget_mb = a
        .model_memory_mb
        .unwrap_or_else(|| crate::executor::device::default_model_memory_mb(place.gpu.as_ref().map(|g| g.1)));
    let gpu = place.gpu.as_ref().map_or(String::new(), |(name, bytes)| format!(" ({name}, {} MiB)", bytes >> 20));
    tracing::info!(
        "diffusion executor on {}{gpu}, dtype {}, model memory budget {budget_mb} MiB",
        place.label,
        place.precision
    );
    if a.models_dir.is_some() {
        std::fs::create_dir_all(&a.data).with_context(|| format!("creating {}", a.data.display()))?;
    }
    let catalog = Catalog {
        builtin: !a.no_builtin_model,
        dir: a.models_dir.clone(),
        variant: a.variant.clone(),
        hash_cache: Some(a.data.join("model-hashes.json")),
    };
    let Scan { served: models, refused } = catalog.load()?;
    if models.is_empty() {
        let why: Vec<String> = refused.iter().map(|r| format!("{}: {}", r.name, r.reason)).collect();
        let why = if why.is_empty() { String::new() } else { format!(" (refused: {})", why.join("; ")) };
        bail!("no model to serve: --no-builtin-model and no servable model folder under --models-dir{why}");
    }
    for m in &models {
        tracing::info!(
            "model '{}' ({}, {:.2} M parameters, sha256 {}) from {}",
            m.name,
            m.meta.family,
            m.params as f64 / 1e6,
            m.short_hash(),
            m.files.describe()
        );
    }
    Ok(DiffusionExecutor::new(models, place.device, place.precision, budget_mb << 20, a.max_batch)
        .with_catalog(catalog, refused))
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a node.
    Node(Box<NodeArgs>),
    /// Submit a job (through any node) and optionally wait for its image.
    Submit(Box<SubmitArgs>),
    /// Show the leader, term, members and queue depth.
    Status {
        #[command(flatten)]
        to: ServerArgs,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
    /// Show one job: its request, state, progress, result and history.
    Job {
        /// The job id (32 hexadecimal characters).
        id: String,
        #[command(flatten)]
        to: ServerArgs,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
    /// Save a finished job's image (a PNG, from any node) to a file.
    Image {
        /// The job id (32 hexadecimal characters).
        id: String,
        #[command(flatten)]
        to: ServerArgs,
        /// Where to write the PNG (default: <job id>.png; `-` for standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List recent jobs.
    Jobs {
        #[command(flatten)]
        to: ServerArgs,
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
    /// Drain a node (it finishes its jobs, takes no new ones), then remove it.
    Leave {
        #[command(flatten)]
        to: ServerArgs,
        #[arg(long)]
        id: u64,
        /// (An admin `--api-key` does instead of the cluster secret.)
        #[arg(long, env = "RAFTGEN_CLUSTER_SECRET", default_value = DEV_SECRET, hide_env_values = true)]
        cluster_secret: String,
    },
    /// Start a local 3-node cluster, generate a few images through a follower, stop it.
    Demo(crate::cli::demo::DemoArgs),
    /// Write a test CA and node certificates for trying TLS (see docs/tls.md).
    Certs(crate::cli::certs::CertsArgs),
}

/// How a client command reaches the cluster: the node, the API key (the
/// client side of `raftgen node --api-keys`) and TLS trust.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// Any node of the cluster (`host:port` means `http://host:port`).
    #[arg(long, env = "RAFTGEN_SERVER", default_value = "http://127.0.0.1:7001")]
    pub server: String,
    /// API key, sent as `Authorization: Bearer KEY` (needed when the nodes run
    /// with --api-keys).
    #[arg(long, env = "RAFTGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: crate::tls::ClientTls,
}

impl ServerArgs {
    /// A client for `--server`, with the key and TLS settings given.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server).with_api_key(self.api_key.clone()).with_tls(&self.tls)
    }
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// This node's id in the cluster (1 or more, unique, fixed for its data dir).
    #[arg(long)]
    pub id: u64,
    /// Address and port to serve the API and the node-to-node RPCs on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this node (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Data directory: the Raft log and state (sled), the result store.
    #[arg(long)]
    pub data: PathBuf,
    /// Start a new cluster with this node as its only member (ignored once initialized).
    #[arg(long, conflicts_with = "join")]
    pub init: bool,
    /// Join the cluster through any of its nodes, `host:port` or a URL
    /// (ignored once a member).
    #[arg(long)]
    pub join: Option<String>,
    /// Shared by every node and admin client; nodes refuse RPCs without it.
    #[arg(long, env = "RAFTGEN_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Serve TLS on --listen with this certificate chain (PEM, leaf first) and
    /// reach the other nodes over https (see docs/tls.md).
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require every connection (nodes and clients) to present a certificate
    /// signed by this CA (PEM), and trust only it for connections to other nodes.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Longest a TLS handshake on this node's port may take.
    #[arg(long, default_value_t = 5_000)]
    pub tls_handshake_timeout_ms: u64,
    /// Require an API key on the public API: one `NAME KEY [rate=N] [admin]`
    /// a line (see docs/api-keys.md). `/healthz`, `/readyz` and `/metrics`
    /// stay open.
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ExecutorKind::Diffusion)]
    pub executor: ExecutorKind,
    /// Serve every diffusers model folder under DIR (besides the built-in
    /// model, shapes-sd). Folders are read, never downloaded or written.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Do not serve the built-in model (shapes-sd: flat shapes at 64x64).
    #[arg(long)]
    pub no_builtin_model: bool,
    /// Weight variant to load from model folders that have no plain weights
    /// (e.g. `fp16` for `*.fp16.safetensors`), as diffusers' `variant=`; a
    /// folder's own `"variant"` in model_index.json wins. Plain weights are
    /// always preferred; `non_ema` is loaded only when asked for here.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// Where the diffusion executor runs the models: `auto` (CUDA device 0
    /// when this binary has the `cuda` feature and a GPU answers, else the
    /// CPU, saying why), `cpu`, `cuda` or `cuda:N` (refuses to start without
    /// that GPU). See docs/gpu.md.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda|cuda:N")]
    pub device: crate::executor::device::DeviceArg,
    /// Precision of the models: `auto` is f32 on the CPU and, on CUDA, f16
    /// for SD 1/2 and bf16 for SDXL and Z-Image. On the CPU f16 works but is
    /// slow, and bf16 is refused (candle's CPU matmul has none).
    #[arg(long, value_enum, default_value_t = crate::executor::device::DtypeArg::Auto)]
    pub dtype: crate::executor::device::DtypeArg,
    /// Memory for loaded models (default: 3/4 of the GPU's memory on CUDA,
    /// 16384 on the CPU); the least recently used ones are unloaded beyond
    /// it, and a model larger than it fails its jobs.
    #[arg(long)]
    pub model_memory_mb: Option<u64>,
    /// Most jobs run together as one batch (same model, size, steps, sampler
    /// and guidance). 1 keeps every image bit-for-bit reproducible from its
    /// recipe alone; above 1, an image can differ slightly with the jobs it
    /// was batched with (float summation order).
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// CPU priority of the threads that run the model, as a nice value (0-19;
    /// 0 leaves them as the node's other threads). Higher yields the cores to
    /// the node's Raft heartbeats and HTTP API while a job runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub executor_nice: i32,
    /// Simulated run time per job of the test-pattern executor.
    #[arg(long, default_value_t = 500)]
    pub test_pattern_delay_ms: u64,
    /// TEST DOUBLE (only with --executor test-pattern): draw incompressible
    /// noise (a PNG of about 3 bytes a pixel) instead of stripes, for
    /// measuring what result bytes cost the cluster.
    #[arg(long)]
    pub test_pattern_noise: bool,
    /// TEST DOUBLE fault (only with --executor test-pattern): the first N
    /// jobs this node runs hang until cancelled (exercises --job-timeout-ms).
    #[arg(long, default_value_t = 0)]
    pub test_pattern_stall_first: u32,
    /// TEST DOUBLE fault (only with --executor test-pattern): the next N jobs
    /// fail with a retryable error (exercises retries, --max-attempts).
    #[arg(long, default_value_t = 0)]
    pub test_pattern_fail_first: u32,
    /// Jobs assigned to this node at once (default: --max-batch for the
    /// diffusion executor, at least 2 so the next job is ready; 1 for the
    /// test pattern).
    #[arg(long)]
    pub slots: Option<u32>,
    /// A node silent this long is declared lost: its running jobs are queued again.
    #[arg(long, default_value_t = 5_000)]
    pub node_timeout_ms: u64,
    /// Longest a submission waits for its commit before a 503.
    #[arg(long, default_value_t = 30_000)]
    pub submit_timeout_ms: u64,
    /// How long a synchronous image request (OpenAI or AUTOMATIC1111 API)
    /// waits for its jobs before answering 408 with the job ids; the jobs go
    /// on. 100 ms to 1 day.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub sync_timeout_ms: u64,
    /// Longest a node keeps retrying to report a finished attempt.
    #[arg(long, default_value_t = 600_000)]
    pub report_timeout_ms: u64,
    /// Longest `raftgen leave` waits for the node's running jobs and result copies.
    #[arg(long, default_value_t = 600_000)]
    pub drain_timeout_ms: u64,
    /// Longest one job may run on this node: beyond it the run is stopped
    /// and the job fails ("execution timed out"). 100 ms to 7 days.
    #[arg(long, default_value_t = 1_800_000, value_parser = clap::value_parser!(u64).range(100..=604_800_000))]
    pub job_timeout_ms: u64,
    /// On SIGTERM: how long to let running jobs finish before handing them
    /// back to the queue (keep it under the supervisor's stop timeout).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub shutdown_timeout_ms: u64,
    /// Largest request body the API accepts (413 beyond).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Most live progress streams (`GET /v1/jobs/{id}/events`) this node
    /// serves at once; beyond it they get 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_event_streams: u64,
    /// Longest one progress stream stays open; the client then reconnects
    /// (with Last-Event-ID). 1 s to 1 day.
    #[arg(long, default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub event_stream_max_ms: u64,
    /// Queued jobs beyond which submissions get 429 with Retry-After.
    #[arg(long, default_value_t = ClusterConfig::default().max_queue_depth)]
    pub max_queue_depth: u64,
    /// Result images kept; the oldest are evicted beyond it.
    #[arg(long, default_value_t = ClusterConfig::default().max_results)]
    pub max_results: u64,
    /// Bytes of result images kept; the oldest are evicted beyond it.
    #[arg(long, default_value_t = ClusterConfig::default().max_result_bytes)]
    pub max_result_bytes: u64,
    /// Finished job records kept (with their idempotency keys).
    #[arg(long, default_value_t = ClusterConfig::default().max_finished_jobs)]
    pub max_finished_jobs: u64,
    /// Attempts per job before a retryable failure or a lost node fails it.
    #[arg(long, default_value_t = ClusterConfig::default().max_attempts)]
    pub max_attempts: u32,
    /// Where result images live: unset, each node's embedded store (in
    /// --data; `--result-copies` nodes hold each image); or an object store,
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
    /// or `file:///mnt/shared` (credentials from the standard environment:
    /// AWS_*, GOOGLE_*, AZURE_*). Every node needs the same one.
    #[arg(long, value_name = "URL")]
    pub result_store: Option<String>,
    /// Durable copies of each result on the embedded stores (capped at the
    /// nodes that can hold one): a result survives the loss of any
    /// copies - 1 of its holders. Cluster-wide (the leader's setting).
    #[arg(long, default_value_t = ClusterConfig::default().result_copies,
          value_parser = clap::value_parser!(u32).range(1..=raftgen_raft::result::MAX_RESULT_HOLDERS as i64))]
    pub result_copies: u32,
    /// Images fetched from other nodes (or the object store) kept here for
    /// the next reader, in MiB; 0: none.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub result_cache_mb: u64,
    /// Repair copies (results re-replicated after a node left, retired or was
    /// lost) start no faster than this, cluster-wide, in megabits per second.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub repair_max_mbps: u64,
    /// How long a node declared lost still counts as holding its copies
    /// before repair copies them elsewhere (a restart or a short outage
    /// moves nothing). Cluster-wide (the leader's setting).
    #[arg(long, default_value_t = ClusterConfig::default().repair_delay_ms,
          value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub repair_delay_ms: u64,
    /// How long the node that made a result keeps trying to make its copies
    /// durable before the attempt fails (retryably).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub result_push_timeout_ms: u64,
    /// Longest one transfer of an image between nodes (or with the object
    /// store) may take.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub result_transfer_timeout_ms: u64,
    /// A stored image that no retained result names (evicted, or an orphan
    /// whose job was never reported) is deleted once this old. At least
    /// --result-push-timeout-ms + --report-timeout-ms: a copy pushed for a
    /// job not reported yet must not go.
    #[arg(long, default_value_t = 900_000)]
    pub result_orphan_grace_ms: u64,
    /// How often the leader lists the object store for orphaned uploads.
    #[arg(long, default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(1_000..=604_800_000))]
    pub result_sweep_interval_ms: u64,
    /// OpenAI `response_format: "url"` answers with a URL presigned by the
    /// object store, valid this long (needs an s3://, gs:// or az://
    /// --result-store); 0: a URL on this node.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub presign_ttl_s: u64,
    /// TEST HOOK, never for use: report results before their copies are
    /// durable (the bug the chaos checkers must catch).
    #[arg(long, hide = true)]
    pub unsafe_complete_before_durable: bool,
    /// Acknowledge writes after sled's flush without syncing the filesystem
    /// (about the speed of a write to the page cache). RISK: a power loss or
    /// kernel crash on a majority of nodes can lose acknowledged jobs (sled
    /// syncs every 500 ms); a process crash loses nothing. Default: synced.
    #[arg(long)]
    pub unsafe_no_fsync: bool,
    /// A snapshot is built after this many bytes of commands (as well as by entry count).
    #[arg(long, default_value_t = 64 << 20)]
    pub snapshot_max_bytes: u64,
    /// Snapshot once this many log entries were applied since the last one.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot (for followers that lag a little).
    #[arg(long, default_value_t = 1_000)]
    pub snapshot_keep_logs: u64,
    /// Leader heartbeat period.
    #[arg(long, default_value_t = 25)]
    pub heartbeat_interval_ms: u64,
    /// A follower without heartbeats campaigns after a random time between min and max.
    #[arg(long, default_value_t = 50)]
    pub election_timeout_min_ms: u64,
    /// See --election-timeout-min-ms.
    #[arg(long, default_value_t = 100)]
    pub election_timeout_max_ms: u64,
    #[command(flatten)]
    pub webhook: crate::node::webhook::WebhookArgs,
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub to: ServerArgs,
    pub prompt: String,
    /// What the image should not show (models that use guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<u32>,
    /// Denoising steps (default: the model's).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (default: the model's).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Seed, for a reproducible image (default: a random one).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model name (default: the cluster's first; GET /v1/models lists them).
    #[arg(long)]
    pub model: Option<String>,
    /// Higher runs first (default 0).
    #[arg(long)]
    pub priority: Option<i32>,
    /// `ddim`, `euler`, `euler_a` (SD family) or `flow_match_euler` (Z-Image).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Run the job even if an identical one (same fixed seed) already succeeded.
    #[arg(long)]
    pub no_cache: bool,
    /// URL the cluster POSTs the finished job to (signed; see docs/webhooks.md).
    #[arg(long)]
    pub webhook: Option<String>,
    /// Same key, same request: the same job, however often it is sent (retries).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait until the job finishes.
    #[arg(long)]
    pub wait: bool,
    /// Where to write the PNG (with --wait; default: <job id>.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Longest --wait waits for the job to end.
    #[arg(long, default_value_t = 600_000)]
    pub timeout_ms: u64,
    /// text (for people) or json (the job as the API returns it).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

impl NodeArgs {
    pub fn into_options(self) -> anyhow::Result<crate::node::NodeOptions> {
        if self.election_timeout_min_ms <= self.heartbeat_interval_ms
            || self.election_timeout_max_ms <= self.election_timeout_min_ms
        {
            bail!("need --heartbeat-interval-ms < --election-timeout-min-ms < --election-timeout-max-ms");
        }
        let secret = self.cluster_secret.clone().unwrap_or_else(|| {
            tracing::warn!("no --cluster-secret or RAFTGEN_CLUSTER_SECRET: using the insecure development secret");
            DEV_SECRET.to_string()
        });
        let api_keys = match &self.api_keys {
            Some(path) => Some(Arc::new(crate::http::auth::ApiKeys::load(path)?)),
            None => None,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                if self.tls_handshake_timeout_ms == 0 {
                    bail!("--tls-handshake-timeout-ms must be at least 1");
                }
                Some(crate::tls::NodeTls::load(cert, key, self.tls_ca.as_deref(), self.tls_handshake_timeout_ms)?)
            }
            _ => None,
        };
        let join = self.join.as_deref().map(|j| join_url(j, tls.is_some())).transpose()?;
        if let Some(join) = &join {
            match (tls.is_some(), join.starts_with("https://")) {
                (true, false) => bail!("--join {join}: a node with --tls-cert joins through an https:// URL"),
                (false, true) => bail!("--join {join}: an https:// URL needs --tls-cert and --tls-key on this node"),
                _ => {}
            }
        }
        if self.result_orphan_grace_ms < self.result_push_timeout_ms + self.report_timeout_ms {
            bail!(
                "--result-orphan-grace-ms ({}) must be at least --result-push-timeout-ms + --report-timeout-ms ({})",
                self.result_orphan_grace_ms,
                self.result_push_timeout_ms + self.report_timeout_ms
            );
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH {
            bail!("--max-batch must be between 1 and {MAX_BATCH}");
        }
        let faults = Faults { stall_first: self.test_pattern_stall_first, fail_first: self.test_pattern_fail_first };
        if self.executor != ExecutorKind::TestPattern
            && (faults.stall_first > 0 || faults.fail_first > 0 || self.test_pattern_noise)
        {
            bail!(
                "--test-pattern-stall-first, --test-pattern-fail-first and --test-pattern-noise need --executor test-pattern"
            );
        }
        // Before any model code runs: its threads take the lower priority.
        crate::executor::priority::configure(self.executor_nice);
        let executor: Arc<dyn Executor> = match self.executor {
            ExecutorKind::Diffusion => Arc::new(diffusion_executor(&self)?),
            ExecutorKind::None => {
                tracing::warn!("--executor none: this node runs no jobs");
                Arc::new(NoExecutor)
            }
            ExecutorKind::TestPattern => {
                tracing::warn!("--executor test-pattern: a TEST DOUBLE drawing synthetic images, not a model");
                if faults.stall_first > 0 || faults.fail_first > 0 {
                    tracing::warn!("test pattern: injecting faults into the first jobs: {faults:?}");
                }
                Arc::new(
                    TestPatternExecutor::new(self.test_pattern_delay_ms, faults).with_noise(self.test_pattern_noise),
                )
            }
        };
        let slots = match self.executor {
            ExecutorKind::None => 0,
            ExecutorKind::Diffusion => self.slots.unwrap_or((self.max_batch as u32).max(2)),
            ExecutorKind::TestPattern => self.slots.unwrap_or(1),
        };
        Ok(crate::node::NodeOptions {
            id: self.id,
            listen: self.listen,
            advertise: self.advertise,
            data: self.data,
            init: self.init,
            join,
            secret,
            api_keys,
            tls,
            executor,
            settings: NodeSettings {
                slots,
                node_timeout_ms: self.node_timeout_ms,
                submit_timeout_ms: self.submit_timeout_ms,
                sync_timeout_ms: self.sync_timeout_ms,
                report_timeout_ms: self.report_timeout_ms,
                drain_timeout_ms: self.drain_timeout_ms,
                job_timeout_ms: self.job_timeout_ms,
                shutdown_timeout_ms: self.shutdown_timeout_ms,
                max_body_bytes: self.max_body_bytes,
                max_event_streams: self.max_event_streams as usize,
                event_stream_max_ms: self.event_stream_max_ms,
                snapshot_max_bytes: self.snapshot_max_bytes,
                snapshot_logs: self.snapshot_logs,
                snapshot_keep_logs: self.snapshot_keep_logs,
                durability: if self.unsafe_no_fsync {
                    raftgen_storage::Durability::UnsafeFlushOnly
                } else {
                    raftgen_storage::Durability::Sync
                },
                cluster: ClusterConfig {
                    max_queue_depth: self.max_queue_depth,
                    max_results: self.max_results,
                    max_result_bytes: self.max_result_bytes,
                    max_finished_jobs: self.max_finished_jobs,
                    max_attempts: self.max_attempts,
                    result_copies: self.result_copies,
                    repair_delay_ms: self.repair_delay_ms,
                },
                results: crate::node::results::ResultSettings {
                    store_url: self.result_store.clone(),
                    cache_bytes: self.result_cache_mb << 20,
                    repair_max_bytes_per_s: self.repair_max_mbps * 125_000,
                    push_timeout_ms: self.result_push_timeout_ms,
                    transfer_timeout_ms: self.result_transfer_timeout_ms,
                    orphan_grace_ms: self.result_orphan_grace_ms,
                    presign_ttl_s: self.presign_ttl_s,
                    sweep_interval_ms: self.result_sweep_interval_ms,
                    unsafe_complete_before_durable: self.unsafe_complete_before_durable,
                },
                heartbeat_interval_ms: self.heartbeat_interval_ms,
                election_timeout_min_ms: self.election_timeout_min_ms,
                election_timeout_max_ms: self.election_timeout_max_ms,
                webhook: self.webhook.settings(),
            },
        })
    }
}

/// `--join` as a base URL. `host:port` (how `--advertise` and `/v1/cluster`
/// write addresses) means the scheme this node speaks: https with
/// `--tls-cert`, else http. Anything that is not a node's address stops the
/// node at once, rather than being retried without end.
fn join_url(join: &str, tls: bool) -> anyhow::Result<String> {
    let url = base_url(join.trim(), if tls { "https" } else { "http" });
    match reqwest::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()) => Ok(url),
        _ => bail!("--join {join:?}: not the address of a node (host:port, or http:// or https:// and host:port)"),
    }
}

/// A node's base URL as people type it: `host:port` means `scheme://host:port`;
/// a trailing `/` is dropped.
fn base_url(addr: &str, scheme: &str) -> String {
    // The scheme is looked for before the `/` is dropped: `http://` alone is
    // a URL without a host, not the host `http`.
    let has_scheme = addr.contains("://");
    let addr = addr.trim_end_matches('/');
    if has_scheme {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    }
}

/// A small client of the public API for the CLI commands and the demo.
pub struct Client {
    http: reqwest::Client,
    pub server: String,
    api_key: Option<String>,
}

impl Client {
    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().timeout(Duration::from_secs(60))
    }

    pub fn new(server: &str) -> Self {
        let http = Self::builder().build().expect("http client");
        // `127.0.0.1:7001` is what people type: it means plain http.
        let server = base_url(server, "http");
        Client { http, server, api_key: None }
    }

    /// Trusts `tls.tls_ca` (or the system's roots) for an `https` server and
    /// presents `tls.tls_cert` when the server asks for a client certificate.
    pub fn with_tls(mut self, tls: &crate::tls::ClientTls) -> anyhow::Result<Self> {
        self.http = tls.apply(Self::builder(), &self.server)?.build().context("http client")?;
        Ok(self)
    }

    /// Sends `key` as `Authorization: Bearer` on every request.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = body["error"]["message"].as_str().unwrap_or("no details");
        match body["error"]["field"].as_str() {
            Some(field) => bail!("{status}: {field}: {msg}"),
            None => bail!("{status}: {msg}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.server))?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.server))?;
        Ok(Self::check(resp).await?.bytes().await?.to_vec())
    }

    pub async fn submit(&self, body: &Value, key: Option<&str>) -> anyhow::Result<Value> {
        let mut req = self.request(reqwest::Method::POST, "/v1/jobs").json(body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {}", self.server))?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn delete(&self, path: &str, secret: Option<&str>) -> anyhow::Result<Value> {
        let mut req = self.request(reqwest::Method::DELETE, path).timeout(Duration::from_secs(3600));
        if let Some(s) = secret {
            req = req.header(SECRET_HEADER, s);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {}", self.server))?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// Polls a job until it is terminal, calling `on_update` on each change.
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
        mut on_update: impl FnMut(&Value),
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            let job = self.get(&format!("/v1/jobs/{id}")).await?;
            if job["state"] != last["state"] || job["progress"] != last["progress"] {
                on_update(&job);
            }
            if matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("job {id} still {} after {} ms", job["state"], timeout.as_millis());
            }
            last = job;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Node(args) => {
            crate::logging::set_node_id(args.id);
            crate::node::run(args.into_options()?).await
        }
        Cmd::Submit(args) => submit(*args).await,
        Cmd::Status { to, output } => status(&to.client()?, output).await,
        Cmd::Job { id, to, output } => job(&to.client()?, &id, output).await,
        Cmd::Image { id, to, out } => image(&to.client()?, &id, out).await,
        Cmd::Jobs { to, state, limit, output } => jobs(&to.client()?, state, limit, output).await,
        Cmd::Leave { to, id, cluster_secret } => {
            let client = to.client()?;
            let v = client.delete(&format!("/v1/cluster/nodes/{id}"), Some(&cluster_secret)).await?;
            println!("node {id} left the cluster (drained: {})", v["drained"]);
            Ok(())
        }
        Cmd::Demo(args) => crate::cli::demo::run(args).await,
        Cmd::Certs(args) => crate::cli::certs::run(args),
    }
}

async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let client = a.to.client()?;
    let mut body = json!({ "prompt": a.prompt });
    let fields: [(&str, Option<Value>); 11] = [
        ("negative_prompt", a.negative_prompt.map(Value::from)),
        ("width", a.width.map(Value::from)),
        ("height", a.height.map(Value::from)),
        ("steps", a.steps.map(Value::from)),
        ("guidance", a.guidance.map(Value::from)),
        ("seed", a.seed.map(Value::from)),
        ("model", a.model.map(Value::from)),
        ("priority", a.priority.map(Value::from)),
        ("sampler", a.sampler.map(Value::from)),
        ("cache", a.no_cache.then_some(Value::Bool(false))),
        ("webhook", a.webhook.map(Value::from)),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            body[k] = v;
        }
    }
    let job = client.submit(&body, a.idempotency_key.as_deref()).await?;
    let id = job["id"].as_str().ok_or_else(|| anyhow!("the server answered without a job id"))?.to_string();
    if !a.wait {
        match a.output {
            OutputFormat::Json => println!("{job}"),
            OutputFormat::Text => println!("{id} {}", job["state"].as_str().unwrap_or("?")),
        }
        return Ok(());
    }
    let show = match a.output {
        OutputFormat::Text => {
            eprintln!("submitted {id}");
            crate::cli::follow::Show::Human
        }
        OutputFormat::Json => crate::cli::follow::Show::Quiet,
    };
    let mut display = crate::cli::follow::Display::new(show);
    display.job(&job);
    let followed = crate::cli::follow::follow(&client, &id, Duration::from_millis(a.timeout_ms), &mut display).await;
    display.finish();
    let job = followed?;
    if job["state"] != "succeeded" {
        bail!("job {id} {}: {}", job["state"].as_str().unwrap_or("?"), job["error"].as_str().unwrap_or(""));
    }
    let (out, png) = save_image(&client, &id, a.out).await?;
    match a.output {
        OutputFormat::Json => println!("{}", json!({ "job": job, "file": out.display().to_string() })),
        OutputFormat::Text => println!("{id} succeeded: {} ({} bytes)", out.display(), png.len()),
    }
    Ok(())
}

/// Fetches job `id`'s image and writes it to `out` (default `<id>.png`).
async fn save_image(client: &Client, id: &str, out: Option<PathBuf>) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let png = client.get_bytes(&format!("/v1/jobs/{id}/image")).await.with_context(|| format!("job {id}'s image"))?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{id}.png")));
    if out.as_os_str() == "-" {
        use std::io::Write;
        std::io::stdout().lock().write_all(&png).context("writing the image to standard output")?;
    } else {
        std::fs::write(&out, &png).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok((out, png))
}

async fn image(client: &Client, id: &str, out: Option<PathBuf>) -> anyhow::Result<()> {
    let (out, png) = save_image(client, id, out).await?;
    if out.as_os_str() != "-" {
        println!("{}: {} bytes", out.display(), png.len());
    }
    Ok(())
}

/// A JSON value as table text: strings unquoted, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn status(client: &Client, output: OutputFormat) -> anyhow::Result<()> {
    let c = client.get("/v1/cluster").await?;
    if output == OutputFormat::Json {
        println!("{c}");
        return Ok(());
    }
    println!("leader: {}  term: {}  queue depth: {}", cell(&c["leader_id"]), cell(&c["term"]), cell(&c["queue_depth"]));
    println!("{:>4}  {:<22} {:<8} {:<8} {:>5} {:>7}  executor", "id", "addr", "role", "healthy", "slots", "running");
    for m in c["members"].as_array().into_iter().flatten() {
        let healthy = match m["healthy"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "?",
        };
        println!(
            "{:>4}  {:<22} {:<8} {:<8} {:>5} {:>7}  {}{}",
            cell(&m["id"]),
            cell(&m["addr"]),
            cell(&m["role"]),
            healthy,
            cell(&m["slots"]),
            cell(&m["running"]),
            cell(&m["executor"]),
            if m["draining"] == true { " (draining)" } else { "" }
        );
    }
    // The models the cluster serves, and any folder a node refused.
    let models = client.get("/v1/models").await?;
    let served: Vec<String> = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!("{} ({} px, {} steps)", cell(&m["id"]), cell(&m["default_side_px"]), cell(&m["default_steps"]))
        })
        .collect();
    println!("models: {}", if served.is_empty() { "none yet".to_string() } else { served.join(", ") });
    for r in models["refused"].as_array().into_iter().flatten() {
        println!("  refused on node {}: {}: {}", cell(&r["node"]), cell(&r["name"]), cell(&r["reason"]));
    }
    Ok(())
}

async fn jobs(client: &Client, state: Option<String>, limit: usize, output: OutputFormat) -> anyhow::Result<()> {
    let mut path = format!("/v1/jobs?limit={limit}");
    if let Some(s) = state {
        path.push_str(&format!("&state={s}"));
    }
    let v = client.get(&path).await?;
    if output == OutputFormat::Json {
        println!("{v}");
        return Ok(());
    }
    println!("{:<32}  {:<9} {:>4} {:>7} {:>7}  prompt", "id", "state", "node", "attempt", "step");
    for j in v["jobs"].as_array().into_iter().flatten() {
        println!(
            "{:<32}  {:<9} {:>4} {:>7} {:>7}  {}",
            cell(&j["id"]),
            cell(&j["state"]),
            cell(&j["node"]),
            cell(&j["attempt"]),
            format!("{}/{}", cell(&j["progress"]["step"]), cell(&j["progress"]["steps"])),
            one_line(j["request"]["prompt"].as_str().unwrap_or(""), 40)
        );
    }
    println!("({} jobs in the cluster, {} queued)", cell(&v["total"]), cell(&v["queue_depth"]));
    Ok(())
}

/// Text for one table cell: control characters (a newline in a prompt) shown
/// escaped, at most `max` characters (`...` when cut).
fn one_line(s: &str, max: usize) -> String {
    let escaped: String =
        s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect();
    match escaped.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &escaped[..cut]),
        None => escaped,
    }
}

async fn job(client: &Client, id: &str, output: OutputFormat) -> anyhow::Result<()> {
    // Checked here: a path like `../cluster` would reach another endpoint.
    let id: raftgen_raft::job::JobId = id.parse().map_err(|e: String| anyhow!("id: {e}"))?;
    let j = client.get(&format!("/v1/jobs/{id}")).await?;
    if output == OutputFormat::Json {
        println!("{j}");
        return Ok(());
    }
    let r = &j["request"];
    let mut state = cell(&j["state"]);
    if j["node"].is_number() {
        state.push_str(&format!(" on node {} (attempt {})", j["node"], cell(&j["attempt"])));
    }
    state.push_str(&format!(", step {}/{}", cell(&j["progress"]["step"]), cell(&j["progress"]["steps"])));
    let since = |at: &Value| match (at.as_u64(), j["submitted_at_ms"].as_u64()) {
        (Some(at), Some(t0)) => format!("+{} ms", at.saturating_sub(t0)),
        _ => "-".into(),
    };
    let result = match &j["result"] {
        Value::Null => "-".to_string(),
        r if r["evicted"] == true => format!("{} bytes, evicted", cell(&r["bytes"])),
        r => format!("{} ({} bytes)", cell(&r["url"]), cell(&r["bytes"])),
    };
    let rows = [
        ("id", cell(&j["id"])),
        ("state", state),
        ("model", cell(&r["model"])),
        ("prompt", one_line(r["prompt"].as_str().unwrap_or(""), 200)),
        ("negative", cell(&r["negative_prompt"].as_str().filter(|s| !s.is_empty()).map(|s| one_line(s, 200)).into())),
        ("size", format!("{}x{}", cell(&r["width"]), cell(&r["height"]))),
        ("steps", cell(&r["steps"])),
        ("guidance", cell(&r["guidance"])),
        ("seed", cell(&j["seed"])),
        ("sampler", cell(&r["sampler"])),
        ("priority", cell(&r["priority"])),
        ("started", since(&j["started_at_ms"])),
        ("finished", since(&j["finished_at_ms"])),
        ("result", result),
        ("error", cell(&j["error"])),
    ];
    for (name, value) in rows {
        println!("{name:<9} {value}");
    }
    println!("history (since submission):");
    for e in j["history"].as_array().into_iter().flatten() {
        let detail: Vec<String> = ["node", "attempt", "source", "reason", "error"]
            .iter()
            .filter(|k| !e[**k].is_null())
            .map(|k| format!("{k} {}", one_line(&cell(&e[*k]), 80)))
            .collect();
        let line = format!("  {:>10}  {:<20} {}", since(&e["at_ms"]), cell(&e["event"]), detail.join(", "));
        println!("{}", line.trim_end());
    }
    Ok(())
}
