//! JSON shapes of the public API (the replicated types stay wire-agnostic).
//!
//! Each shape is a type that is both serialised into the response and
//! described in the OpenAPI document (`GET /openapi.json`, see
//! [`super::openapi`]), so the document cannot say one thing while the
//! server sends another.

use raftgen_raft::job::{Event, EventKind, Job};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// A job: its request, where it stands, and what happened to it.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    /// 32 lowercase hex digits.
    #[schema(example = "8b81e6a569198761725c3b58db27dbfe")]
    pub id: String,
    /// `queued`, `assigned`, `running`, `succeeded`, `failed` or `cancelled`.
    #[schema(example = "running")]
    pub state: &'static str,
    pub request: RequestView,
    /// The seed actually used: the request's, or one the leader chose.
    pub seed: u64,
    pub idempotency_key: Option<String>,
    /// The node of the current (or, once ended, the last) attempt.
    pub node: Option<u64>,
    /// How many times the job has been assigned.
    pub attempt: u32,
    pub progress: ProgressView,
    /// Why the job failed.
    pub error: Option<String>,
    /// Content hash of the model that made the result.
    pub model_hash: Option<String>,
    /// What the executor said about the run (e.g. a truncated prompt).
    pub notes: Vec<String>,
    pub submitted_at_ms: u64,
    pub assigned_at_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// The result image, once the job succeeded.
    pub result: Option<ResultView>,
    /// Every transition, oldest first (bounded per job).
    pub history: Vec<EventView>,
    /// The webhook and its deliveries, for a job that names one.
    pub webhook: Option<WebhookView>,
}

/// The generation parameters of a job, defaults filled in.
#[derive(Serialize, ToSchema)]
pub struct RequestView {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// The seed asked for (`null`: the leader chose one, see the job's `seed`).
    pub seed: Option<u64>,
    pub model: String,
    pub priority: i32,
    pub sampler: Option<String>,
    /// Whether the result cache may answer this job.
    pub cache: bool,
}

/// Denoising progress of the current attempt.
#[derive(Serialize, ToSchema)]
pub struct ProgressView {
    pub step: u32,
    pub steps: u32,
}

#[derive(Serialize, ToSchema)]
pub struct ResultView {
    /// Size of the PNG.
    pub bytes: u64,
    /// sha256 of the PNG, hex (also its `ETag`).
    #[schema(example = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")]
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    /// The image was dropped by the retention limit (the job stays).
    pub evicted: bool,
    /// Where the PNG is, on any node.
    #[schema(example = "/v1/jobs/8b81e6a569198761725c3b58db27dbfe/image")]
    pub url: String,
}

/// One transition of a job.
#[derive(Serialize, ToSchema)]
pub struct EventView {
    /// `submitted`, `assigned`, `started`, `succeeded`, `failed`,
    /// `attempt_failed`, `requeued`, `completion_rejected`, `cancelled`,
    /// `result_evicted` or `cache_hit`.
    pub event: &'static str,
    /// The leader's clock when it happened.
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `cache_hit`: the job whose result was reused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A job's webhook and its delivery record.
#[derive(Serialize, ToSchema)]
pub struct WebhookView {
    pub url: String,
    pub delivered: bool,
    /// The tries ran out without a 2xx answer.
    pub gave_up: bool,
    pub deliveries: Vec<DeliveryView>,
}

/// One try to deliver a webhook.
#[derive(Serialize, ToSchema)]
pub struct DeliveryView {
    pub attempt: u32,
    pub at_ms: u64,
    pub node: u64,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why the try failed without a status.
    pub error: Option<String>,
    pub took_ms: u64,
}

impl JobView {
    pub fn new(job: &Job) -> Self {
        let r = &job.request;
        JobView {
            id: job.id.to_string(),
            state: job.state.as_str(),
            request: RequestView {
                prompt: r.prompt.clone(),
                negative_prompt: r.negative_prompt.clone(),
                width: r.width,
                height: r.height,
                steps: r.steps,
                guidance: r.guidance,
                seed: r.seed,
                model: r.model.clone(),
                priority: r.priority,
                sampler: r.sampler.clone(),
                cache: r.cache,
            },
            seed: job.seed,
            idempotency_key: job.idempotency_key.clone(),
            node: job.node,
            attempt: job.attempt,
            progress: ProgressView { step: job.progress.step, steps: job.progress.steps },
            error: job.error.clone(),
            model_hash: job.model_hash.clone(),
            notes: job.notes.clone(),
            submitted_at_ms: job.submitted_at_ms,
            assigned_at_ms: job.assigned_at_ms,
            started_at_ms: job.started_at_ms,
            finished_at_ms: job.finished_at_ms,
            result: job.result.map(|r| ResultView {
                bytes: r.bytes,
                sha256: r.sha256.to_string(),
                width: r.width,
                height: r.height,
                evicted: job.result_evicted,
                url: format!("/v1/jobs/{}/image", job.id),
            }),
            history: job.history.iter().map(EventView::new).collect(),
            webhook: webhook_view(job),
        }
    }
}

/// The webhook's URL and delivery record (`None` for a job without one).
fn webhook_view(job: &Job) -> Option<WebhookView> {
    let (Some(url), Some(w)) = (&job.request.webhook, &job.webhook) else { return None };
    Some(WebhookView {
        url: url.clone(),
        delivered: w.delivered,
        gave_up: w.gave_up,
        deliveries: w
            .deliveries
            .iter()
            .map(|d| DeliveryView {
                attempt: d.attempt,
                at_ms: d.at_ms,
                node: d.node,
                status: d.status,
                error: d.error.clone(),
                took_ms: d.took_ms,
            })
            .collect(),
    })
}

impl EventView {
    fn new(e: &Event) -> Self {
        let mut v = EventView {
            event: e.kind.name(),
            at_ms: e.at_ms,
            node: None,
            attempt: None,
            reason: None,
            error: None,
            source: None,
        };
        match &e.kind {
            EventKind::Submitted | EventKind::Cancelled | EventKind::ResultEvicted => {}
            EventKind::Assigned { node, attempt }
            | EventKind::Started { node, attempt }
            | EventKind::Succeeded { node, attempt } => (v.node, v.attempt) = (Some(*node), Some(*attempt)),
            EventKind::Requeued { node, attempt, reason } | EventKind::CompletionRejected { node, attempt, reason } => {
                (v.node, v.attempt, v.reason) = (Some(*node), Some(*attempt), Some(reason.clone()))
            }
            EventKind::Failed { node, attempt, error } => {
                (v.node, v.attempt, v.error) = (*node, Some(*attempt), Some(error.clone()))
            }
            EventKind::AttemptFailed { node, attempt, error } => {
                (v.node, v.attempt, v.error) = (Some(*node), Some(*attempt), Some(error.clone()))
            }
            EventKind::CacheHit { source } => v.source = Some(source.to_string()),
        }
        v
    }
}

/// The job as JSON (what `GET /v1/jobs/{id}` answers).
pub fn job_json(job: &Job) -> Value {
    serde_json::to_value(JobView::new(job)).unwrap_or(Value::Null)
}
