//! The AUTOMATIC1111 web UI API (`/sdapi/v1/*`) on every node, for
//! `webuiapi` and the many tools written against A1111.
//!
//! `POST /sdapi/v1/txt2img` turns `batch_size * n_iter` images into as many
//! jobs and waits for them (see [`super::sync`]). As in A1111 every field is
//! optional and unknown fields are ignored (clients send about 45, most of
//! them for features we do not have); fields we cannot honour and that would
//! change the result (`enable_hr: true`) are refused. Mapping (see
//! docs/clients.md): `cfg_scale` is the guidance; `seed` -1 (any negative)
//! lets the leader choose each job's seed, a fixed seed gives job `i` the
//! seed `seed + i` as in A1111; `sampler_name` (or `sampler_index`) is an
//! A1111 sampler name: one the model runs is used, another A1111 name falls
//! back to the model's default sampler (the `info` says which ran), an
//! unknown name is a 422; `override_settings.sd_model_checkpoint` picks the
//! model by title or name (default: the cluster's default model).
//!
//! Errors come in A1111's (FastAPI's) shapes: validation errors are 422
//! `{"detail": [{"loc": ["body", FIELD], "msg", "type"}]}`, others
//! `{"error", "detail", "body", "errors"}`.
//!
//! `GET /sdapi/v1/progress` is global like A1111's: the step progress of the
//! cluster's running jobs and the count of running and queued ones.
//! `POST /sdapi/v1/interrupt` cancels the jobs of the txt2img requests this
//! node is holding (A1111 has one process; a cluster has one per node).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use raftgen_raft::command::ModelInfo;
use raftgen_raft::job::{FieldError, JobId, JobRequest, JobState};
use raftgen_raft::Command;
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{no_model_yet, read_body, served_models};
use super::sync::{self, SyncError, MAX_JOBS_PER_REQUEST};
use super::ApiError;
use crate::models::SamplerKind;
use crate::node::app::{now_ms, App};

/// Sampler names A1111 offers (with and without the scheduler suffixes of
/// older versions). A request naming one of them is valid here; one we do
/// not run falls back to the model's default sampler.
const A1111_SAMPLERS: &[&str] = &[
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2S a",
    "DPM++ 3M SDE",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM",
    "DDIM CFG++",
    "PLMS",
    "UniPC",
    "LCM",
];
const SCHEDULER_SUFFIXES: &[&str] = &["", " Karras", " Exponential", " SGM Uniform"];

/// The txt2img requests this node holds, by request, for `/interrupt`.
#[derive(Default)]
struct InFlight {
    next: Mutex<(u64, HashMap<u64, Vec<JobId>>)>,
}

/// Removes a request from [`InFlight`] when its handler ends (or is dropped,
/// when the client goes away; its jobs go on).
struct Registered<'a> {
    inflight: &'a InFlight,
    token: u64,
}

impl InFlight {
    fn register(&self, jobs: &[JobId]) -> Registered<'_> {
        let mut g = self.next.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let token = g.0;
        g.1.insert(token, jobs.to_vec());
        Registered { inflight: self, token }
    }

    fn all(&self) -> Vec<JobId> {
        let g = self.next.lock().unwrap_or_else(|e| e.into_inner());
        g.1.values().flatten().copied().collect()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.inflight.next.lock().unwrap_or_else(|e| e.into_inner()).1.remove(&self.token);
    }
}

pub fn routes() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::new()
        .routes(routes!(txt2img))
        .routes(routes!(progress))
        .routes(routes!(interrupt))
        .routes(routes!(sd_models))
        .routes(routes!(samplers))
        .routes(routes!(scripts))
        .routes(routes!(options))
        .split_for_parts();
    (router.layer(Extension(Arc::new(InFlight::default()))), doc)
}

/// The txt2img fields this server reads. As in A1111 every field is
/// optional and other fields are accepted and ignored.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the body `parse` reads
struct Txt2ImgRequest {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    /// Default 50.
    steps: Option<i64>,
    /// The guidance scale (default 7).
    cfg_scale: Option<f64>,
    /// Pixels (default 512).
    width: Option<i64>,
    /// Pixels (default 512).
    height: Option<i64>,
    /// -1 (any negative): the leader picks each image's seed.
    seed: Option<i64>,
    /// An A1111 sampler name (`GET /sdapi/v1/samplers`).
    sampler_name: Option<String>,
    /// The older name of `sampler_name`.
    sampler_index: Option<String>,
    /// Images per batch; `batch_size * n_iter` is at most 16.
    batch_size: Option<i64>,
    /// Batches.
    n_iter: Option<i64>,
    /// `false`: answer without the images.
    send_images: Option<bool>,
    /// Only `false`: hires fix is not supported.
    enable_hr: Option<bool>,
    /// `sd_model_checkpoint` picks the model by title or name.
    #[schema(value_type = Option<Object>)]
    override_settings: Option<Value>,
}

/// txt2img's answer.
#[derive(Serialize, ToSchema)]
struct Txt2ImgResponse {
    /// Base64 PNGs.
    images: Vec<String>,
    /// The request as sent.
    #[schema(value_type = Object)]
    parameters: Value,
    /// A JSON string: prompts, seeds, sampler, model and raftgen's job ids.
    info: String,
}

/// FastAPI's validation error (422).
#[derive(Serialize, ToSchema)]
struct ValidationErrorBody {
    detail: Vec<ValidationItem>,
}

#[derive(Serialize, ToSchema)]
struct ValidationItem {
    /// `["body", FIELD, ...]` (a position in the body for a JSON syntax error).
    #[schema(value_type = Vec<LocPart>)]
    loc: Vec<Value>,
    msg: String,
    r#type: String,
}

/// A part of a validation error's location: a name or a position.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only describes `ValidationItem::loc`
enum LocPart {
    Name(String),
    Position(u64),
}

/// A1111's other errors.
#[derive(Serialize, ToSchema)]
struct OtherErrorBody {
    error: String,
    detail: String,
    body: String,
    errors: String,
    /// Jobs the request created (on a timeout or a failed job).
    job_ids: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
struct ProgressResponse {
    /// 0 to 1 over the cluster's running jobs.
    progress: f64,
    /// Seconds left (estimate).
    eta_relative: f64,
    state: ProgressState,
    #[schema(value_type = Option<String>)]
    current_image: Option<String>,
    #[schema(value_type = Option<String>)]
    textinfo: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ProgressState {
    skipped: bool,
    interrupted: bool,
    stopping_generation: bool,
    job: &'static str,
    /// Running and queued jobs.
    job_count: u64,
    job_timestamp: &'static str,
    job_no: u64,
    sampling_step: u64,
    sampling_steps: u64,
}

#[derive(Serialize, ToSchema)]
struct SdModel {
    /// `name [short hash]`.
    title: String,
    model_name: String,
    hash: String,
    sha256: String,
    filename: String,
    #[schema(value_type = Option<String>)]
    config: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Sampler {
    name: &'static str,
    aliases: Vec<&'static str>,
    #[schema(value_type = Object)]
    options: Value,
}

// ---- Errors ----

/// An A1111 error: a list of validation errors (422), or another error.
enum Error {
    Invalid(Vec<Value>),
    Other { status: StatusCode, error: &'static str, detail: String, extra: Value },
}

impl Error {
    fn field(field: &str, msg: impl Into<String>, kind: &str) -> Self {
        let loc: Vec<&str> = std::iter::once("body").chain(field.split('.').filter(|f| !f.is_empty())).collect();
        Error::Invalid(vec![json!({ "loc": loc, "msg": msg.into(), "type": kind })])
    }

    fn value(field: &str, msg: impl Into<String>) -> Self {
        Error::field(field, msg, "value_error")
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        match (e.status, e.field) {
            (StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY, Some(field)) => {
                Error::value(&field, e.message)
            }
            (status, field) => Error::Other {
                status,
                error: match status.as_u16() {
                    413 => "PayloadTooLarge",
                    429 => "QueueFull",
                    503 => "ServiceUnavailable",
                    _ => "HTTPException",
                },
                detail: e.message,
                extra: json!({ "field": field, "code": e.code }),
            },
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Error::Invalid(detail) => {
                (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "detail": detail }))).into_response()
            }
            Error::Other { status, error, detail, extra } => {
                let mut body = json!({ "error": error, "detail": detail, "body": "", "errors": detail });
                if let Value::Object(extra) = extra {
                    for (k, v) in extra {
                        body[k] = v;
                    }
                }
                let mut resp = (status, Json(body)).into_response();
                if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
                    resp.headers_mut().insert(axum::http::header::RETRY_AFTER, 1.into());
                }
                resp
            }
        }
    }
}

// ---- txt2img ----

fn int(obj: &Map<String, Value>, field: &str, default: i64) -> Result<i64, Error> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
            .ok_or_else(|| Error::field(field, "value is not a valid integer", "type_error.integer")),
    }
}

/// An integer field bounded to `lo..=hi`.
fn bounded(obj: &Map<String, Value>, field: &str, default: i64, lo: i64, hi: i64) -> Result<i64, Error> {
    let v = int(obj, field, default)?;
    if !(lo..=hi).contains(&v) {
        return Err(Error::value(field, format!("must be between {lo} and {hi}, got {v}")));
    }
    Ok(v)
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, Error> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::field(field, "str type expected", "type_error.str")),
    }
}

/// `sd-models`' title of a model: `name [short hash]`, as A1111 shows it.
fn title(m: &ModelInfo) -> String {
    format!("{} [{}]", m.name, short_hash(m))
}

fn short_hash(m: &ModelInfo) -> &str {
    &m.hash[..m.hash.len().min(10)]
}

fn find_model<'a>(served: &'a [ModelInfo], asked: &str) -> Option<&'a ModelInfo> {
    let bare = asked.split(" [").next().unwrap_or(asked).trim();
    let stem = [".safetensors", ".ckpt"].iter().find_map(|x| bare.strip_suffix(x)).unwrap_or(bare);
    served.iter().find(|m| title(m) == asked || m.name == bare || m.name == stem)
}

struct Parsed {
    request: JobRequest,
    count: usize,
    batch_size: i64,
    n_iter: i64,
    sampler_used: String,
    model: ModelInfo,
}

fn parse(bytes: &[u8], served: &[ModelInfo]) -> Result<(Parsed, Map<String, Value>), Error> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Error::Invalid(vec![json!({
            "loc": ["body", e.column()],
            "msg": format!("JSON decode error: {e}"),
            "type": "value_error.jsondecode",
        })])
    })?;
    let Value::Object(obj) = value else {
        return Err(Error::field("", "value is not a valid dict", "type_error.dict"));
    };
    let overrides = match obj.get("override_settings") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(Error::field("override_settings", "value is not a valid dict", "type_error.dict")),
    };
    let model = match string(&overrides, "sd_model_checkpoint")
        .map_err(|_| Error::field("override_settings.sd_model_checkpoint", "str type expected", "type_error.str"))?
    {
        Some(asked) => find_model(served, &asked).ok_or_else(|| {
            let titles = served.iter().map(title).collect::<Vec<_>>().join(", ");
            Error::value(
                "override_settings.sd_model_checkpoint",
                format!("model '{asked}' not found; served: [{titles}]"),
            )
        })?,
        None => served.first().ok_or_else(|| {
            Error::value("override_settings.sd_model_checkpoint", "no node in the cluster serves any model")
        })?,
    };
    if obj.get("enable_hr").is_some_and(|v| v.as_bool() == Some(true)) {
        return Err(Error::value("enable_hr", "hires fix is not supported by this server"));
    }
    let batch_size = bounded(&obj, "batch_size", 1, 1, MAX_JOBS_PER_REQUEST as i64)?;
    let n_iter = bounded(&obj, "n_iter", 1, 1, MAX_JOBS_PER_REQUEST as i64)?;
    let count = (batch_size * n_iter) as usize;
    if count > MAX_JOBS_PER_REQUEST {
        return Err(Error::value(
            "batch_size",
            format!("batch_size * n_iter must be at most {MAX_JOBS_PER_REQUEST}, got {count}"),
        ));
    }
    let seed = int(&obj, "seed", -1)?;
    let seed = u64::try_from(seed).ok();
    if seed.is_some_and(|s| s > u64::MAX - MAX_JOBS_PER_REQUEST as u64) {
        return Err(Error::value("seed", "too large"));
    }
    let cfg_scale = match obj.get("cfg_scale") {
        None | Some(Value::Null) => 7.0,
        Some(v) => {
            v.as_f64().ok_or_else(|| Error::field("cfg_scale", "value is not a valid float", "type_error.float"))?
        }
    };
    // A1111 takes `sampler_name`, or the older `sampler_index` (a name too).
    let asked_sampler = match string(&obj, "sampler_name")? {
        Some(s) => Some(("sampler_name", s)),
        None => string(&obj, "sampler_index")?.map(|s| ("sampler_index", s)),
    };
    let sampler = match &asked_sampler {
        None => None,
        Some((field, name)) => {
            let ours = SamplerKind::parse(name).filter(|k| model.samplers.iter().any(|s| s == k.name()));
            let known = A1111_SAMPLERS
                .iter()
                .any(|base| SCHEDULER_SUFFIXES.iter().any(|x| format!("{base}{x}").eq_ignore_ascii_case(name.trim())));
            match ours {
                Some(k) => Some(k.name().to_string()),
                None if known || SamplerKind::parse(name).is_some() => None,
                None => {
                    return Err(Error::value(field, format!("sampler '{name}' not found; see GET /sdapi/v1/samplers")))
                }
            }
        }
    };
    let sampler_used = match &sampler {
        Some(s) => SamplerKind::parse(s).map_or(s.clone(), |k| k.a1111_name().to_string()),
        None => SamplerKind::parse(&model.default_sampler)
            .map_or(model.default_sampler.clone(), |k| k.a1111_name().to_string()),
    };
    let side = |field| -> Result<u32, Error> { Ok(bounded(&obj, field, 512, 0, u32::MAX as i64)? as u32) };
    let request = JobRequest {
        prompt: string(&obj, "prompt")?.unwrap_or_default(),
        negative_prompt: string(&obj, "negative_prompt")?.unwrap_or_default(),
        width: side("width")?,
        height: side("height")?,
        steps: bounded(&obj, "steps", 50, 0, u32::MAX as i64)? as u32,
        guidance: cfg_scale as f32,
        seed,
        model: model.name.clone(),
        priority: 0,
        sampler,
        cache: true,
        webhook: None,
    };
    sync::validate(&request, model).map_err(|e: FieldError| {
        let field = if e.field == "guidance" { "cfg_scale".to_string() } else { e.field };
        Error::value(&field, e.message)
    })?;
    Ok((Parsed { request, count, batch_size, n_iter, sampler_used, model: model.clone() }, obj))
}

/// Makes `batch_size * n_iter` images and answers when they are done (or
/// after the node's `--sync-timeout-ms`, with the job ids).
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111",
    request_body = Txt2ImgRequest,
    responses(
        (status = 200, body = Txt2ImgResponse),
        (status = 408, description = "Not done within the sync timeout (`job_ids`)", body = OtherErrorBody),
        (status = 413, description = "Body too large", body = OtherErrorBody),
        (status = 422, description = "A field breaks a rule", body = ValidationErrorBody),
        (status = 429, description = "The queue is full", body = OtherErrorBody),
        (status = 500, description = "A job failed (`job_ids`)", body = OtherErrorBody),
        (status = 503, description = "An image is on no node that answers now (`Retry-After`)", body = OtherErrorBody),
    ))]
async fn txt2img(
    State(app): State<Arc<App>>,
    Extension(inflight): Extension<Arc<InFlight>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Txt2ImgResponse>, Error> {
    let bytes = read_body(body, &headers, app.settings.max_body_bytes).await?;
    let served = served_models(&app);
    if served.is_empty() {
        return Err(no_model_yet().into());
    }
    let (p, echo) = parse(&bytes, &served)?;
    let key = sync::idempotency_key(&headers).map_err(|e| Error::field(&e.field, e.message, "value_error"))?;
    let requests: Vec<JobRequest> =
        (0..p.count as u64).map(|i| JobRequest { seed: p.request.seed.map(|s| s + i), ..p.request.clone() }).collect();
    let ids = sync::new_ids(p.count);
    let _registered = inflight.register(&ids);
    let jobs = match sync::run(&app, &ids, requests, key.as_deref()).await {
        Ok(jobs) => jobs,
        Err(SyncError::Rejected(e)) => return Err(e.into()),
        Err(SyncError::TimedOut { jobs, waited_ms, confirmed, shutting_down }) => {
            let ids: Vec<String> = jobs.iter().map(ToString::to_string).collect();
            return Err(Error::Other {
                status: sync::TIMEOUT_STATUS,
                error: "TimeoutError",
                detail: SyncError::timeout_message(&jobs, waited_ms, confirmed, shutting_down),
                extra: json!({ "job_ids": ids }),
            });
        }
    };
    let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
    if let Some(bad) = jobs.iter().find(|j| j.state == JobState::Failed) {
        return Err(Error::Other {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "JobFailed",
            detail: format!("job {} failed: {}", bad.id, bad.error.clone().unwrap_or_default()),
            extra: json!({ "job_ids": ids }),
        });
    }
    // Interrupted (cancelled) jobs have no image; A1111 too returns what it made.
    let send_images = echo.get("send_images").and_then(Value::as_bool).unwrap_or(true);
    let images: Vec<String> = if send_images {
        sync::images(&app, &jobs).await?.iter().flatten().map(|png| sync::base64(png)).collect()
    } else {
        Vec::new()
    };
    let r = &p.request;
    let made: Vec<_> = jobs.iter().filter(|j| j.result.is_some()).collect();
    let seeds: Vec<u64> = made.iter().map(|j| j.seed).collect();
    let info = json!({
        "prompt": r.prompt,
        "all_prompts": vec![&r.prompt; made.len()],
        "negative_prompt": r.negative_prompt,
        "all_negative_prompts": vec![&r.negative_prompt; made.len()],
        "seed": seeds.first().copied().unwrap_or(0),
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; made.len()],
        "subseed_strength": 0,
        "width": r.width,
        "height": r.height,
        "sampler_name": p.sampler_used,
        "cfg_scale": r.guidance,
        "steps": r.steps,
        "batch_size": p.batch_size,
        "n_iter": p.n_iter,
        "sd_model_name": p.model.name,
        "sd_model_hash": short_hash(&p.model),
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "job_timestamp": "",
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": concat!("raftgen ", env!("CARGO_PKG_VERSION")),
        "job_ids": ids,
        "job_states": jobs.iter().map(|j| j.state.as_str()).collect::<Vec<_>>(),
        "interrupted": jobs.iter().any(|j| j.state == JobState::Cancelled),
    });
    Ok(Json(Txt2ImgResponse { images, parameters: Value::Object(echo), info: info.to_string() }))
}

// ---- The rest ----

/// Progress of the cluster's running jobs.
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111", responses((status = 200, body = ProgressResponse)))]
async fn progress(State(app): State<Arc<App>>) -> Json<ProgressResponse> {
    let data = app.view.read();
    let now = now_ms();
    let (mut step, mut steps, mut running, mut eta_s) = (0u64, 0u64, 0u64, 0f64);
    for id in data.jobs.nodes_with_active_jobs().collect::<Vec<_>>() {
        for job in data.jobs.active_on(id) {
            running += 1;
            step += job.progress.step as u64;
            steps += job.progress.steps.max(1) as u64;
            // A1111's estimate: elapsed / progress - elapsed, per running job.
            if let (Some(at), true) = (job.started_at_ms, job.progress.step > 0) {
                let elapsed = now.saturating_sub(at) as f64 / 1000.0;
                let p = job.progress.step as f64 / job.progress.steps.max(1) as f64;
                eta_s = eta_s.max(elapsed / p - elapsed);
            }
        }
    }
    let queued = data.jobs.queue_depth() as u64;
    let progress = if steps == 0 { 0.0 } else { step as f64 / steps as f64 };
    Json(ProgressResponse {
        progress,
        eta_relative: eta_s,
        state: ProgressState {
            skipped: false,
            interrupted: false,
            stopping_generation: false,
            job: "",
            job_count: running + queued,
            job_timestamp: "0",
            job_no: 0,
            sampling_step: step,
            sampling_steps: steps,
        },
        current_image: None,
        textinfo: None,
    })
}

/// Cancels the jobs of the txt2img requests this node holds.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111", responses((status = 200, body = Object)))]
async fn interrupt(State(app): State<Arc<App>>, Extension(inflight): Extension<Arc<InFlight>>) -> Json<Value> {
    let open: Vec<JobId> = {
        let data = app.view.read();
        inflight.all().into_iter().filter(|id| data.jobs.job(id).is_none_or(|j| !j.state.is_terminal())).collect()
    };
    for id in open {
        if let Err(e) = app.write(Command::Cancel { job: id }, app.settings.submit_timeout()).await {
            tracing::debug!("interrupt: cancelling job {id}: {e}");
        }
    }
    Json(json!({}))
}

/// The models some node serves.
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111", responses((status = 200, body = Vec<SdModel>)))]
async fn sd_models(State(app): State<Arc<App>>) -> Json<Vec<SdModel>> {
    let models = served_models(&app)
        .iter()
        .map(|m| SdModel {
            title: title(m),
            model_name: m.name.clone(),
            hash: short_hash(m).to_string(),
            sha256: m.hash.clone(),
            filename: m.name.clone(),
            config: None,
        })
        .collect();
    Json(models)
}

/// The samplers some served model runs.
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111", responses((status = 200, body = Vec<Sampler>)))]
async fn samplers(State(app): State<Arc<App>>) -> Json<Vec<Sampler>> {
    let served = served_models(&app);
    let list = SamplerKind::ALL
        .into_iter()
        .filter(|k| served.iter().any(|m| m.samplers.iter().any(|s| s == k.name())))
        .map(|k| Sampler { name: k.a1111_name(), aliases: vec![k.name()], options: json!({}) })
        .collect();
    Json(list)
}

/// No scripts (webuiapi's constructor asks, to detect extensions).
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111",
    responses((status = 200, body = Object, example = json!({"txt2img": [], "img2img": []}))))]
async fn scripts() -> Json<Value> {
    Json(json!({ "txt2img": [], "img2img": [] }))
}

/// The settings clients read: the default model (the one a txt2img request
/// without `override_settings` gets). Settings cannot be changed here.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111",
    responses((status = 200, body = Object, example = json!({"sd_model_checkpoint": "tiny-sd [0123456789]", "sd_checkpoint_hash": "0123..."}))))]
async fn options(State(app): State<Arc<App>>) -> Json<Value> {
    let served = served_models(&app);
    let first = served.first();
    Json(json!({
        "sd_model_checkpoint": first.map(title),
        "sd_checkpoint_hash": first.map(|m| m.hash.clone()),
    }))
}
