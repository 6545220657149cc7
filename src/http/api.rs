//! The public JSON API, served by every node. Reads come from this node's
//! applied state; writes go through [`App::write`], which reaches the leader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use raftgen_raft::command::{ModelInfo, RefusedModel, Rejection};
use raftgen_raft::job::{JobId, JobRequest, JobState, MAX_IDEMPOTENCY_KEY_BYTES, MAX_PROMPT_CHARS};
use raftgen_raft::result::{Location, ResultHash, ResultInfo};
use raftgen_raft::{Command, NodeId, Response as SmResponse};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{require_admin, Caller};
use super::openapi::ErrorBody;
use super::views::{job_json, JobView};
use super::ApiError;
use crate::node::app::{App, WriteError};
use crate::node::config::{MAX_LIST_LIMIT, MEMBERSHIP_TIMEOUT_MS};
use crate::node::membership;

/// Header a node sets when it proxies a request to the leader, to stop loops.
const HOPS_HEADER: &str = "x-raftgen-hops";
const MAX_HOPS: u32 = 3;
/// How long a read of an unknown job waits for this node to apply what it has.
const READ_BARRIER_MS: u64 = 1_000;

/// The native API's routes and their part of the OpenAPI document.
pub fn routes() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::new()
        .routes(routes!(list_jobs, submit))
        .routes(routes!(get_job, cancel))
        .routes(routes!(get_image))
        .routes(routes!(cluster))
        .routes(routes!(list_models))
        .routes(routes!(rescan_models))
        .routes(routes!(join))
        .routes(routes!(leave))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .split_for_parts();
    let router = router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
        });
    (router, doc)
}

/// Most bytes of an oversized body read and discarded before answering 413,
/// so the client sees the answer instead of a connection reset mid-upload.
const MAX_DRAIN_BYTES: usize = 64 << 20;

/// Reads a body up to `max` bytes; larger bodies get 413 naming `body`.
pub(super) async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        let mut e = ApiError::field(
            "body",
            format!(
                "larger than {max} bytes (--max-body-bytes); a prompt or negative_prompt holds at most \
                 {MAX_PROMPT_CHARS} characters"
            ),
        );
        e.status = StatusCode::PAYLOAD_TOO_LARGE;
        e.code = "body_too_large";
        e
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut oversized = declared.is_some_and(|n| n > max as u64);
    let mut body = body;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::field("body", format!("unreadable: {e}")))?;
        let Some(data) = frame.data_ref() else { continue };
        seen += data.len();
        if seen > max {
            oversized = true;
        }
        if seen > MAX_DRAIN_BYTES {
            break;
        }
        if !oversized {
            buf.extend_from_slice(data);
        }
    }
    if oversized {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

// ---- Jobs ----

/// A job submission (`POST /v1/jobs`). Unset fields take the model's
/// defaults; unknown fields are refused.
// The parser takes its list of fields from this type, so the document and
// the server agree.
#[derive(ToSchema)]
#[allow(dead_code)] // read through its schema: see `SUBMIT_FIELDS`
struct SubmitBody {
    /// What to draw (at most 2000 characters).
    prompt: String,
    /// What to steer away from.
    negative_prompt: Option<String>,
    /// Pixels, 8 to 2048, a multiple of the model's pixel multiple.
    width: Option<u32>,
    /// Pixels, 8 to 2048, a multiple of the model's pixel multiple.
    height: Option<u32>,
    /// Denoising steps, 1 to 150.
    steps: Option<u32>,
    /// Classifier-free guidance scale, 0 to 30.
    guidance: Option<f32>,
    /// Fixes the image; unset, the leader picks one.
    seed: Option<u64>,
    /// A model some node serves (`GET /sdapi/v1/sd-models` lists them); unset, the first by name.
    model: Option<String>,
    /// -100 to 100; higher runs first, FIFO within a priority.
    priority: Option<i32>,
    /// A sampler the model has (`ddim`, `euler_a`, `flow_euler`, ...).
    sampler: Option<String>,
    /// `http(s)://` URL POSTed the finished job (signed; see docs/webhooks.md).
    webhook: Option<String>,
    /// `false` skips the result cache.
    cache: Option<bool>,
}

/// The fields a submission may have: those of [`SubmitBody`].
static SUBMIT_FIELDS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(super::openapi::property_names::<SubmitBody>);

/// A page of jobs, newest first.
#[derive(serde::Serialize, ToSchema)]
struct JobList {
    jobs: Vec<JobView>,
    /// Jobs the cluster holds.
    total: usize,
    /// Jobs waiting for a slot.
    queue_depth: usize,
}

/// A node to add (`POST /v1/cluster/nodes`).
#[derive(ToSchema)]
#[allow(dead_code)] // documents the body `join` parses
struct JoinBody {
    /// The new node's id (unique in the cluster).
    id: u64,
    /// `host:port` where the others reach it.
    addr: String,
}

fn uint(obj: &Map<String, Value>, field: &str, default: u64, max: u64) -> Result<u64, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(n),
            _ => Err(ApiError::field(field, format!("must be a non-negative integer up to {max}"))),
        },
    }
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::field(field, "must be a string")),
    }
}

/// Parses and validates a submission, naming the first offending field.
/// `refused`: model folders nodes found and do not serve, with the reason, so
/// that a submission naming one is told why.
fn parse_submit(
    bytes: &[u8],
    served_models: &[ModelInfo],
    refused: &[(NodeId, RefusedModel)],
) -> Result<JobRequest, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::field("body", format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else { return Err(ApiError::field("body", "must be a JSON object")) };
    if let Some(unknown) = obj.keys().find(|k| !SUBMIT_FIELDS.contains(k)) {
        return Err(ApiError::field(unknown, format!("unknown field; accepted: {}", SUBMIT_FIELDS.join(", "))));
    }
    let prompt = string(&obj, "prompt")?.ok_or_else(|| ApiError::field("prompt", "is required"))?;
    let names = || served_models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ");
    let model = match string(&obj, "model")? {
        Some(m) => served_models.iter().find(|i| i.name == m).ok_or_else(|| {
            match refused.iter().find(|(_, r)| r.name == m) {
                Some((node, r)) => ApiError::field(
                    "model",
                    format!("model '{m}' is not served: node {node} refused it: {}; served: [{}]", r.reason, names()),
                ),
                None => ApiError::field(
                    "model",
                    format!("no node in the cluster serves model '{m}'; served: [{}]", names()),
                ),
            }
        })?,
        None => served_models.first().ok_or_else(no_model_yet)?,
    };
    let guidance = match obj.get("guidance") {
        None | Some(Value::Null) => model.default_guidance_centi as f32 / 100.0,
        Some(v) => v.as_f64().ok_or_else(|| ApiError::field("guidance", "must be a number"))? as f32,
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| ApiError::field("priority", "must be an integer"))?,
    };
    let sampler = string(&obj, "sampler")?;
    if let Some(name) = &sampler {
        let canonical = crate::models::SamplerKind::parse(name).map(|k| k.name().to_string());
        if !canonical.is_some_and(|c| model.samplers.contains(&c)) {
            return Err(ApiError::field(
                "sampler",
                format!("model '{}' has no sampler '{name}'; it has: [{}]", model.name, model.samplers.join(", ")),
            ));
        }
    }
    let side = model.default_side_px as u64;
    let request = JobRequest {
        prompt,
        negative_prompt: string(&obj, "negative_prompt")?.unwrap_or_default(),
        width: uint(&obj, "width", side, u32::MAX as u64)? as u32,
        height: uint(&obj, "height", side, u32::MAX as u64)? as u32,
        steps: uint(&obj, "steps", model.default_steps as u64, u32::MAX as u64)? as u32,
        guidance,
        seed: match obj.get("seed") {
            None | Some(Value::Null) => None,
            Some(_) => Some(uint(&obj, "seed", 0, u64::MAX)?),
        },
        model: model.name.clone(),
        priority,
        sampler,
        cache: match obj.get("cache") {
            None | Some(Value::Null) => true,
            Some(v) => v.as_bool().ok_or_else(|| ApiError::field("cache", "must be true or false"))?,
        },
        webhook: string(&obj, "webhook")?,
    };
    request.validate().map_err(|e| ApiError::field(&e.field, e.message))?;
    if let Some(url) = &request.webhook {
        crate::node::webhook::parse_url(url).map_err(|m| ApiError::field("webhook", m))?;
    }
    let m = model.pixel_multiple.max(1);
    for (field, side) in [("width", request.width), ("height", request.height)] {
        if side % m != 0 {
            return Err(ApiError::field(
                field,
                format!("must be a multiple of {m} for model '{}', got {side}", model.name),
            ));
        }
    }
    Ok(request)
}

pub(super) fn rejection_error(r: Rejection) -> ApiError {
    match r {
        Rejection::Invalid(e) => ApiError::field(&e.field, e.message),
        Rejection::QueueFull { .. } => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", r.to_string()).retry_after(1)
        }
        Rejection::IdempotencyKeyReused { .. } => {
            let mut e = ApiError::field("Idempotency-Key", r.to_string());
            e.status = StatusCode::UNPROCESSABLE_ENTITY;
            e.code = "idempotency_key_reused";
            e
        }
        Rejection::UnknownJob => ApiError::not_found("job"),
        Rejection::NotCancellable { .. } | Rejection::StaleAttempt { .. } => {
            ApiError::new(StatusCode::CONFLICT, "conflict", r.to_string())
        }
        Rejection::UnknownNode => ApiError::not_found("node"),
    }
}

fn write_error(e: WriteError, job: Option<JobId>) -> ApiError {
    let err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()).retry_after(1);
    match job {
        Some(id) => err.with_extra(json!({ "job_id": id.to_string() })),
        None => err,
    }
}

/// Submits a job. Answered once a quorum has committed it. A retry with the
/// same `Idempotency-Key` returns the same job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body = SubmitBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 256 bytes; a retry with the same key gets the same job")),
    responses(
        (status = 202, description = "Committed; `Location` names the job", body = JobView),
        (status = 400, description = "A field breaks a rule (named in `error.field`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "The Idempotency-Key was used for another request", body = ErrorBody),
        (status = 429, description = "The queue is full (`Retry-After`)", body = ErrorBody),
        (status = 503, description = "No leader committed it in time (`Retry-After`)", body = ErrorBody),
    ))]
async fn submit(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, &headers, app.settings.max_body_bytes).await?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::field("Idempotency-Key", "must be visible ASCII"))?;
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(ApiError::field(
                    "Idempotency-Key",
                    format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
                ));
            }
            Some(k.to_string())
        }
    };
    let served = served_models(&app);
    if served.is_empty() {
        return Err(no_model_yet());
    }
    let request = parse_submit(&bytes, &served, &refused_models(&app))?;
    let id = JobId(rand::random());
    let cmd = Command::Submit { id, request, seed: None, idempotency_key: key };
    match app.write(cmd, app.settings.submit_timeout()).await {
        Ok(SmResponse::Submitted { job, created }) => {
            let mut resp = (StatusCode::ACCEPTED, Json(job_json(&job))).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            if !created {
                resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            Ok(resp)
        }
        Ok(SmResponse::Rejected(r)) => Err(rejection_error(r)),
        Ok(other) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{other:?}"))),
        Err(e) => Err(write_error(e, Some(id))),
    }
}

/// Models served by some registered node with the bytes the cluster knows
/// under their name, sorted by name (the first is the default).
/// A submission while no node has registered a model: a server state (nodes
/// still starting, or every executor refused its models), not a client error.
pub(super) fn no_model_yet() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_model",
        "no node in the cluster serves a model yet (nodes starting, every model folder refused, or every node runs \
         --executor none); see GET /v1/models",
    )
    .retry_after(1)
}

pub(super) fn served_models(app: &App) -> Vec<ModelInfo> {
    let data = app.view.read();
    let mut models: Vec<ModelInfo> = Vec::new();
    for (id, node) in data.jobs.nodes() {
        for info in &node.registration.models {
            if !models.iter().any(|m| m.name == info.name) && data.jobs.serves(*id, &info.name) {
                models.push(info.clone());
            }
        }
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    models
}

/// Model folders the nodes found and do not serve, by node.
pub(super) fn refused_models(app: &App) -> Vec<(NodeId, RefusedModel)> {
    let data = app.view.read();
    let mut out = Vec::new();
    for (id, node) in data.jobs.nodes() {
        out.extend(node.registration.refused_models.iter().map(|r| (*id, r.clone())));
    }
    out
}

pub(super) fn parse_id(id: &str) -> Result<JobId, ApiError> {
    id.parse().map_err(|e: String| ApiError::field("id", e))
}

/// On a miss, gives this node a moment to apply the entries it already holds:
/// a job acknowledged through another node is usually in our log already.
async fn read_barrier(app: &App) {
    let target = app.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let mut applied = app.view.subscribe();
    let _ = tokio::time::timeout(Duration::from_millis(READ_BARRIER_MS), applied.wait_for(|i| *i >= target)).await;
}

pub(super) async fn with_job<T>(
    app: &App,
    id: JobId,
    f: impl Fn(&raftgen_raft::job::Job, Option<(ResultHash, &Location)>) -> T,
) -> Option<T> {
    for round in 0..2 {
        {
            let data = app.view.read();
            if let Some(job) = data.jobs.job(&id) {
                return Some(f(job, data.jobs.image(&id)));
            }
        }
        if round == 0 {
            read_barrier(app).await;
        }
    }
    None
}

/// One job, from this node's applied state.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "32 hex digits")),
    responses(
        (status = 200, body = JobView),
        (status = 400, description = "Not a job id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
async fn get_job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    with_job(&app, id, |job, _| Json(job_json(job))).await.ok_or_else(|| ApiError::not_found("job"))
}

/// `Cache-Control` of a result image: it never changes (it is named by its hash).
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The job's PNG, byte-identical from any node: this node's copy, else one
/// fetched from a node that holds it (or the object store), checked against
/// its sha256. `ETag` is the sha256; a matching `If-None-Match` gets 304.
/// Every node that holds it unreachable: 503 with `Retry-After`.
#[utoipa::path(get, path = "/v1/jobs/{id}/image", tag = "jobs",
    params(
        ("id" = String, Path, description = "32 hex digits"),
        ("If-None-Match" = Option<String>, Header, description = "The image's ETag (its sha256, quoted): 304 if it matches"),
    ),
    responses(
        (status = 200, description = "The image (`ETag`: its sha256; `Cache-Control: immutable`)", content_type = "image/png", body = String),
        (status = 304, description = "Not modified: `If-None-Match` named this image"),
        (status = 400, description = "Not a job id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has no image (yet)", body = ErrorBody),
        (status = 410, description = "Dropped by the retention limit", body = ErrorBody),
        (status = 503, description = "No node that holds the image answers now (`Retry-After`)", body = ErrorBody),
    ))]
async fn get_image(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let found = with_job(&app, id, |job, image| match (image, job.result) {
        (Some((_, location)), Some(info)) => Ok((info, location.clone())),
        _ if job.result_evicted => {
            Err(ApiError::new(StatusCode::GONE, "evicted", "the result was dropped by the retention limit"))
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_result",
            format!("job is {}; it has no image", job.state.as_str()),
        )),
    })
    .await;
    let (info, location) = found.ok_or_else(|| ApiError::not_found("job"))??;
    let etag = format!("\"{}\"", info.sha256);
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*"));
    let tags = [(header::ETAG, etag), (header::CACHE_CONTROL, IMMUTABLE.to_string())];
    if cached {
        return Ok((StatusCode::NOT_MODIFIED, tags).into_response());
    }
    let png = read_result(&app, &info, &location).await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "image/png".to_string())], tags, png).into_response())
}

/// A result's bytes through this node's result store, or 503 with
/// `Retry-After` when no copy can be reached now.
pub(super) async fn read_result(app: &App, info: &ResultInfo, location: &Location) -> Result<Bytes, ApiError> {
    app.results
        .read(app, info, location)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "result_unavailable", e.to_string()).retry_after(1))
}

/// Cancels a job that has not ended.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "32 hex digits")),
    responses(
        (status = 200, description = "Cancelled", body = Object, example = json!({"id": "8b81e6a569198761725c3b58db27dbfe", "state": "cancelled"})),
        (status = 400, description = "Not a job id", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has already ended", body = ErrorBody),
        (status = 503, description = "No leader committed it in time", body = ErrorBody),
    ))]
async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    match app.write(Command::Cancel { job: id }, app.settings.submit_timeout()).await {
        Ok(SmResponse::Ok) => Ok(Json(json!({ "id": id.to_string(), "state": "cancelled" }))),
        Ok(SmResponse::Rejected(r)) => Err(rejection_error(r)),
        Ok(other) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{other:?}"))),
        Err(e) => Err(write_error(e, None)),
    }
}

/// The newest jobs, optionally in one state.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(
        ("state" = Option<String>, Query, description = "queued, assigned, running, succeeded, failed or cancelled"),
        ("limit" = Option<u32>, Query, description = "1 to 1000 (default 50)"),
    ),
    responses(
        (status = 200, body = JobList),
        (status = 400, description = "A bad parameter", body = ErrorBody),
    ))]
async fn list_jobs(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JobList>, ApiError> {
    let state = match q.get("state").filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<JobState>().map_err(|e| ApiError::field("state", e))?),
        None => None,
    };
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| ApiError::field("limit", format!("must be an integer from 1 to {MAX_LIST_LIMIT}")))?,
        None => 50,
    };
    let data = app.view.read();
    let jobs = data.jobs.recent_jobs(state, limit).into_iter().map(JobView::new).collect();
    Ok(Json(JobList { jobs, total: data.jobs.job_count(), queue_depth: data.jobs.queue_depth() }))
}

// ---- Cluster ----

/// The cluster as this node sees it. Health is only known to the leader, so a
/// follower asks the leader first and falls back to its own view.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    params(("local" = Option<String>, Query, description = "Present: this node's own view, without asking the leader")),
    responses((status = 200, body = membership::ClusterView)))]
async fn cluster(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !app.is_leader() && !q.contains_key("local") {
        if let Ok(resp) = proxy_to_leader(&app, Method::GET, "/v1/cluster?local=1", &headers, Bytes::new(), 2_000).await
        {
            if resp.status() == StatusCode::OK {
                return resp;
            }
        }
    }
    Json(membership::cluster_view(&app)).into_response()
}

/// `GET /v1/models`: in OpenAI's list format (so OpenAI clients can list
/// them), with raftgen's fields beside, and the refused folders.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    object: &'static str,
    /// The models some node serves.
    data: Vec<ModelEntryView>,
    /// Model folders nodes found and do not serve, with the reason.
    refused: Vec<RefusedView>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ModelEntryView {
    /// The model's name (its folder's name), as `model` in a submission.
    id: String,
    /// Always `model`.
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    family: String,
    /// sha256 of the weight files the model loads.
    hash: String,
    default_side_px: u32,
    default_steps: u32,
    samplers: Vec<String>,
    /// The nodes that serve it.
    nodes: Vec<u64>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RefusedView {
    node: u64,
    name: String,
    reason: String,
}

/// The models the cluster serves, and the model folders nodes refused, with
/// the reason.
#[utoipa::path(get, path = "/v1/models", tag = "cluster", responses((status = 200, body = ModelList)))]
async fn list_models(State(app): State<Arc<App>>) -> Json<ModelList> {
    let served = served_models(&app);
    let data = {
        let view = app.view.read();
        served
            .into_iter()
            .map(|m| {
                let nodes = view
                    .jobs
                    .nodes()
                    .iter()
                    .filter(|(id, n)| {
                        n.registration.models.iter().any(|x| x.name == m.name) && view.jobs.serves(**id, &m.name)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                ModelEntryView {
                    id: m.name,
                    object: "model",
                    created: 0,
                    owned_by: "raftgen",
                    family: m.family,
                    hash: m.hash,
                    default_side_px: m.default_side_px,
                    default_steps: m.default_steps,
                    samplers: m.samplers,
                    nodes,
                }
            })
            .collect()
    };
    let refused = refused_models(&app)
        .into_iter()
        .map(|(node, r)| RefusedView { node, name: r.name, reason: r.reason })
        .collect();
    Json(ModelList { object: "list", data, refused })
}

/// Reads this node's model folders again (admin key or cluster secret), as
/// `SIGHUP` does: new folders are validated and advertised, removed or
/// changed ones unloaded, refusals replaced by what the scan finds. Answers
/// what this node serves and refuses now (other nodes: ask each).
#[utoipa::path(post, path = "/v1/models/rescan", tag = "cluster",
    responses(
        (status = 200, description = "What this node serves and refuses now", body = Object),
        (status = 401, description = "No valid key or secret", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "This node has no model folders to read (another executor), or they cannot be read", body = ErrorBody),
    ))]
async fn rescan_models(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, caller.as_deref())?;
    match crate::node::host::rescan_models(&app).await {
        Ok(r) => Ok(Json(json!({ "node": app.id, "rescan": r })).into_response()),
        Err(e) => Err(ApiError::new(StatusCode::CONFLICT, "rescan_failed", crate::models::errors::one_line(&e))),
    }
}

/// The process answers (no API key needed).
#[utoipa::path(get, path = "/healthz", tag = "cluster", security(()),
    responses((status = 200, body = Object, example = json!({"status": "ok"}))))]
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when a leader is known and this node is a member of the cluster
/// that is not draining (no API key needed).
#[utoipa::path(get, path = "/readyz", tag = "cluster", security(()),
    responses(
        (status = 200, body = Object, example = json!({"ready": true, "leader_id": 1})),
        (status = 503, description = "Not ready", body = Object, example = json!({"ready": false, "leader_id": null, "member": true, "draining": false})),
    ))]
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let leader = app.raft.server_metrics().borrow().current_leader;
    // A draining node (stopping, or leaving) should get no new clients.
    // Ready means a submission here would be accepted: a leader, this node a
    // member and not draining, its own executor registered, and some node
    // serving a model (else submissions get 503 no_model).
    let (draining, registered, models) = {
        let view = app.view.read();
        let me = view.jobs.nodes().get(&app.id);
        (me.is_some_and(|n| n.draining), me.is_some(), view.jobs.model_hashes().len())
    };
    match (leader, app.is_member(), draining, registered, models) {
        (Some(leader), true, false, true, 1..) => {
            Json(json!({ "ready": true, "leader_id": leader, "models": models })).into_response()
        }
        (leader, member, draining, registered, models) => {
            let body = json!({ "ready": false, "leader_id": leader, "member": member, "draining": draining,
                "registered": registered, "models": models });
            let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            resp
        }
    }
}

/// Adds a node (admin key or cluster secret); it first catches up as a
/// learner, then becomes a voter.
#[utoipa::path(post, path = "/v1/cluster/nodes", tag = "cluster",
    request_body = JoinBody,
    responses(
        (status = 200, description = "The node is a voter", body = Object),
        (status = 400, description = "A bad field", body = ErrorBody),
        (status = 401, description = "No valid key or secret", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 503, description = "No leader in time", body = ErrorBody),
    ))]
async fn join(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, caller.as_deref())?;
    let bytes = read_body(body, &headers, app.settings.max_body_bytes).await?;
    if !app.is_leader() {
        return proxy_to_leader(&app, Method::POST, "/v1/cluster/nodes", &headers, bytes, MEMBERSHIP_TIMEOUT_MS).await;
    }
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::field("body", format!("invalid JSON: {e}")))?;
    let id = value.get("id").and_then(Value::as_u64).ok_or_else(|| ApiError::field("id", "is required (a node id)"))?;
    let addr = value.get("addr").and_then(Value::as_str).ok_or_else(|| ApiError::field("addr", "is required"))?;
    if let Some(unknown) = value.as_object().and_then(|o| o.keys().find(|k| *k != "id" && *k != "addr")) {
        return Err(ApiError::field(unknown, "unknown field; accepted: id, addr"));
    }
    Ok(Json(membership::add_node(&app, id, addr).await?).into_response())
}

/// Drains a node's jobs and removes it (admin key or cluster secret).
#[utoipa::path(delete, path = "/v1/cluster/nodes/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "The node id")),
    responses(
        (status = 200, description = "The node left", body = Object),
        (status = 400, description = "Not a node id", body = ErrorBody),
        (status = 401, description = "No valid key or secret", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 503, description = "No leader in time", body = ErrorBody),
    ))]
async fn leave(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers, caller.as_deref())?;
    let id: NodeId = id.parse().map_err(|_| ApiError::field("id", "must be a node id"))?;
    if !app.is_leader() {
        let path = format!("/v1/cluster/nodes/{id}");
        let timeout = app.settings.drain_timeout_ms + MEMBERSHIP_TIMEOUT_MS;
        return proxy_to_leader(&app, Method::DELETE, &path, &headers, Bytes::new(), timeout).await;
    }
    Ok(Json(membership::remove_node(&app, id).await?).into_response())
}

/// Sends the same request to the leader, retrying across leader changes until
/// `timeout_ms`, and returns its answer as is. This node has already
/// authorised the request (API key, admin check), so it goes with this node's
/// cluster secret, never with the client's credentials.
async fn proxy_to_leader(
    app: &App,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    timeout_ms: u64,
) -> Result<Response, ApiError> {
    let hops: u32 = headers.get(HOPS_HEADER).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    if hops >= MAX_HOPS {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", "leader unknown").retry_after(1));
    }
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some((leader, addr)) = app.leader().filter(|(l, _)| *l != app.id) {
            let mut req = app
                .client
                .request(method.clone(), app.scheme.url(&addr, path))
                .header(HOPS_HEADER, (hops + 1).to_string())
                .timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
                .header(raftgen_raft::network::SECRET_HEADER, &*app.secret)
                .body(body.clone());
            if let Some(v) = headers.get(header::CONTENT_TYPE) {
                req = req.header(header::CONTENT_TYPE, v);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let ctype = resp.headers().get(header::CONTENT_TYPE).cloned();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    let mut out = (status, bytes).into_response();
                    if let Some(c) = ctype {
                        out.headers_mut().insert(header::CONTENT_TYPE, c);
                    }
                    return Ok(out);
                }
                Err(e) => tracing::debug!("proxy {path} to leader {leader}: {e}"),
            }
        } else if app.is_leader() {
            return Err(
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "retry", "leadership moved here; retry").retry_after(1)
            );
        }
        if Instant::now() + delay >= deadline {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", "no leader answered in time")
                .retry_after(1));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}
