//! The OpenAI Images API on every node: `POST /v1/images/generations`, for the
//! official `openai` client (`OpenAI(base_url="http://NODE/v1")`) and tools
//! built on it. A request becomes `n` jobs and waits for them (see
//! [`super::sync`]); errors come in OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Mapping (see docs/clients.md): `model` is a served model's name; OpenAI's
//! own names (`dall-e-*`, `gpt-image-*`) mean the cluster's default model, so
//! tools that hard-code them work; other names are a 400 on `model`. `size`
//! is `WIDTHxHEIGHT` (any size the model takes) or `auto` (the model's
//! default). Each of the `n` jobs gets its own seed, chosen by the leader.
//! `response_format` defaults to `url` for `dall-e-*` names, as OpenAI's does,
//! and to `b64_json` otherwise; a `url` points at `/v1/jobs/{id}/image` on this
//! node. OpenAI's style options (`quality`, `style`, `background`, ...) are
//! accepted and ignored; `stream` and non-PNG `output_format` are refused.
//! Extensions (through the client's `extra_body`): `negative_prompt`,
//! `steps`, `guidance`, `seed` (job `i` gets `seed + i`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use raftgen_raft::job::{FieldError, JobRequest, JobState};
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::{no_model_yet, read_body, served_models};
use super::sync::{self, SyncError};
use super::ApiError;
use crate::node::app::App;

/// Most images one request may ask for (OpenAI's own bound).
pub const MAX_N: u64 = 10;

pub fn routes() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::new().routes(routes!(generate)).split_for_parts()
}

/// `client.images.generate(...)`'s body. Unknown fields are refused, as
/// OpenAI does.
// The parser takes its field list from this type.
#[derive(ToSchema)]
#[allow(dead_code)] // read through its schema: see `FIELDS`
struct ImageRequest {
    /// What to draw.
    prompt: String,
    /// A served model's name; `dall-e-*` and `gpt-image-*` mean the default model.
    model: Option<String>,
    /// Images to make, 1 to 10.
    n: Option<u32>,
    /// `WIDTHxHEIGHT` or `auto`.
    #[schema(example = "512x512")]
    size: Option<String>,
    /// `b64_json` or `url`.
    response_format: Option<String>,
    /// Accepted, not used.
    user: Option<String>,
    /// Accepted, ignored.
    quality: Option<String>,
    /// Accepted, ignored.
    style: Option<String>,
    /// Accepted, ignored.
    background: Option<String>,
    /// Accepted, ignored.
    moderation: Option<String>,
    /// Only `png`.
    output_format: Option<String>,
    /// Accepted, ignored.
    output_compression: Option<u32>,
    /// Accepted, ignored.
    partial_images: Option<u32>,
    /// Only `false`: streaming is not supported.
    stream: Option<bool>,
    /// Extension: what to steer away from.
    negative_prompt: Option<String>,
    /// Extension: denoising steps.
    steps: Option<u32>,
    /// Extension: classifier-free guidance scale.
    guidance: Option<f32>,
    /// Extension: image `i` gets `seed + i`.
    seed: Option<u64>,
}

/// The fields a request may have: those of [`ImageRequest`].
static FIELDS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(super::openapi::property_names::<ImageRequest>);

/// The images, in the order of their jobs.
#[derive(Serialize, ToSchema)]
struct ImagesResponse {
    /// Unix seconds.
    created: u64,
    data: Vec<ImageData>,
    output_format: &'static str,
    size: String,
}

/// One image: inline (`b64_json`) or as a URL on this node.
#[derive(Serialize, ToSchema)]
struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    /// The raftgen job that made it.
    job_id: String,
    seed: u64,
}

/// OpenAI's error shape.
#[derive(Serialize, ToSchema)]
struct OpenAiError {
    error: OpenAiErrorDetail,
}

#[derive(Serialize, ToSchema)]
struct OpenAiErrorDetail {
    message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `timeout_error` or `server_error`.
    r#type: String,
    /// The request parameter at fault.
    param: Option<String>,
    code: Option<String>,
    /// Jobs the request created, when it gave up waiting or a job failed.
    job_ids: Option<Vec<String>>,
}

#[derive(Copy, Clone, PartialEq)]
enum Format {
    Url,
    B64Json,
}

struct Parsed {
    request: JobRequest,
    n: usize,
    format: Format,
}

/// Renders an error in OpenAI's shape. Timeouts and failed jobs carry
/// `x-should-retry: false`: the client would otherwise retry them and queue
/// the same work again.
fn error_response(e: ApiError) -> Response {
    let kind = match e.status.as_u16() {
        401 | 403 => "authentication_error",
        408 => "timeout_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    let mut err = json!({ "message": e.message, "type": kind, "param": e.field, "code": e.code });
    if let Some(Value::Object(extra)) = e.extra {
        for (k, v) in extra {
            err[k] = v;
        }
    }
    let mut resp = (e.status, Json(json!({ "error": err }))).into_response();
    if let Some(s) = e.retry_after_s {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if e.status == sync::TIMEOUT_STATUS || e.status.is_server_error() {
        resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    resp
}

fn param(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::field(field, message)
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(param(field, format!("Invalid type for '{field}': expected a string"))),
    }
}

fn uint(obj: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(param(field, format!("Invalid value for '{field}': expected an integer from 0 to {max}"))),
        },
    }
}

/// A validation error of the job request, named by the OpenAI parameter
/// that set the field (`width`/`height` come from `size`).
fn field_error(e: FieldError) -> ApiError {
    let field = match e.field.as_str() {
        "width" | "height" => "size",
        f => f,
    };
    param(field, format!("Invalid value for '{field}': {} {}", e.field, e.message))
}

fn parse(bytes: &[u8], app: &App) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| param("body", format!("We could not parse the JSON body of your request: {e}")))?;
    let Value::Object(obj) = value else { return Err(param("body", "The request body must be a JSON object")) };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(k)) {
        return Err(param(unknown, format!("Unrecognized request argument supplied: {unknown}")));
    }
    let prompt = string(&obj, "prompt")?.ok_or_else(|| param("prompt", "Missing required parameter: 'prompt'"))?;
    let served = served_models(app);
    if served.is_empty() {
        return Err(no_model_yet());
    }
    let asked = string(&obj, "model")?;
    let openai_name = asked.as_deref().is_some_and(|m| m.starts_with("dall-e") || m.starts_with("gpt-image"));
    let model = match asked.as_deref() {
        Some(m) if !openai_name => served.iter().find(|i| i.name == m).ok_or_else(|| {
            let names = served.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ");
            let mut e = param("model", format!("The model '{m}' does not exist; served: [{names}]"));
            e.code = "model_not_found";
            e
        })?,
        _ => served.first().ok_or_else(|| param("model", "No node in the cluster serves any model"))?,
    };
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_N).contains(n))
            .ok_or_else(|| param("n", format!("Invalid value for 'n': expected an integer from 1 to {MAX_N}")))?,
    } as usize;
    let side = model.default_side_px;
    let (width, height) = match string(&obj, "size")?.as_deref() {
        None | Some("auto") => (side, side),
        Some(s) => s
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)))
            .ok_or_else(|| param("size", format!("Invalid value for 'size': '{s}'; expected WIDTHxHEIGHT or auto")))?,
    };
    let format = match string(&obj, "response_format")?.as_deref() {
        None if asked.as_deref().is_some_and(|m| m.starts_with("dall-e")) => Format::Url,
        None | Some("b64_json") => Format::B64Json,
        Some("url") => Format::Url,
        Some(other) => {
            return Err(param(
                "response_format",
                format!("Invalid value for 'response_format': '{other}'; expected 'url' or 'b64_json'"),
            ))
        }
    };
    if obj.get("stream").is_some_and(|v| v != &Value::Bool(false) && !v.is_null()) {
        return Err(param("stream", "Streaming is not supported by this server; leave 'stream' unset"));
    }
    if let Some(f) = string(&obj, "output_format")? {
        if f != "png" {
            return Err(param("output_format", format!("Invalid value for 'output_format': '{f}'; only 'png'")));
        }
    }
    string(&obj, "user")?;
    let guidance = match obj.get("guidance") {
        None | Some(Value::Null) => model.default_guidance_centi as f32 / 100.0,
        Some(v) => {
            v.as_f64().ok_or_else(|| param("guidance", "Invalid type for 'guidance': expected a number"))? as f32
        }
    };
    let request = JobRequest {
        prompt,
        negative_prompt: string(&obj, "negative_prompt")?.unwrap_or_default(),
        width,
        height,
        steps: uint(&obj, "steps", u32::MAX as u64)?.map_or(model.default_steps, |s| s as u32),
        guidance,
        seed: uint(&obj, "seed", u64::MAX - MAX_N)?,
        model: model.name.clone(),
        priority: 0,
        sampler: None,
        cache: true,
        webhook: None,
    };
    sync::validate(&request, model).map_err(field_error)?;
    Ok(Parsed { request, n, format })
}

/// Where clients reach this node: the request's `Host` when it is a plain
/// `host[:port]`, else the node's own address.
fn base_host<'a>(headers: &'a HeaderMap, app: &'a App) -> &'a str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
        })
        .unwrap_or(&app.addr)
}

/// Makes `n` images and answers when they are done (or after the node's
/// `--sync-timeout-ms`, with the job ids). Works with the `openai` package's
/// `client.images.generate(...)`.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai",
    request_body = ImageRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key gets the same jobs")),
    responses(
        (status = 200, body = ImagesResponse),
        (status = 400, description = "A parameter breaks a rule (`error.param`; an unknown model has `code` `model_not_found`)", body = OpenAiError),
        (status = 408, description = "Not done within the node's sync timeout (`error.job_ids`)", body = OpenAiError),
        (status = 409, description = "A job was cancelled", body = OpenAiError),
        (status = 413, description = "Body too large", body = OpenAiError),
        (status = 429, description = "The queue is full", body = OpenAiError),
        (status = 500, description = "A job failed (`error.job_ids`)", body = OpenAiError),
        (status = 503, description = "An image is on no node that answers now (`Retry-After`)", body = OpenAiError),
    ))]
async fn generate(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    match generate_inner(&app, &headers, body).await {
        Ok(resp) => resp,
        Err(e) => error_response(e),
    }
}

async fn generate_inner(app: &Arc<App>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, headers, app.settings.max_body_bytes).await?;
    let Parsed { request, n, format } = parse(&bytes, app)?;
    let key = sync::idempotency_key(headers).map_err(|e| param(&e.field, e.message))?;
    let requests: Vec<JobRequest> =
        (0..n as u64).map(|i| JobRequest { seed: request.seed.map(|s| s + i), ..request.clone() }).collect();
    let ids = sync::new_ids(n);
    let jobs = match sync::run(app, &ids, requests, key.as_deref()).await {
        Ok(jobs) => jobs,
        Err(SyncError::Rejected(e)) => return Err(e),
        Err(SyncError::TimedOut { jobs, waited_ms, confirmed, shutting_down }) => {
            let message = SyncError::timeout_message(&jobs, waited_ms, confirmed, shutting_down);
            let ids: Vec<String> = jobs.iter().map(ToString::to_string).collect();
            return Err(
                ApiError::new(sync::TIMEOUT_STATUS, "sync_timeout", message).with_extra(json!({ "job_ids": ids }))
            );
        }
    };
    if let Some(bad) = jobs.iter().find(|j| j.state != JobState::Succeeded || j.result.is_none()) {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
        let detail = bad.error.clone().unwrap_or_default();
        let (status, code, what) = match bad.state {
            JobState::Cancelled => (StatusCode::CONFLICT, "job_cancelled", "was cancelled"),
            JobState::Succeeded => (StatusCode::GONE, "result_evicted", "lost its result to the retention limit"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "job_failed", "failed"),
        };
        let message = format!("job {} {what}: {detail}", bad.id);
        return Err(ApiError::new(status, code, message).with_extra(json!({ "job_ids": ids })));
    }
    let host = base_host(headers, app);
    let pngs = match format {
        Format::B64Json => sync::images(app, &jobs).await?,
        Format::Url => vec![None; jobs.len()],
    };
    let mut data = Vec::with_capacity(jobs.len());
    for (j, png) in jobs.iter().zip(pngs) {
        let (url, b64) = match format {
            Format::Url => {
                // The object store's presigned URL when it can give one.
                let presigned = match &j.result {
                    Some((_, location)) => app.results.presigned_url(location).await,
                    None => None,
                };
                (Some(presigned.unwrap_or_else(|| app.scheme.url(host, &format!("/v1/jobs/{}/image", j.id)))), None)
            }
            Format::B64Json => (None, Some(sync::base64(png.as_deref().unwrap_or_default()))),
        };
        data.push(ImageData { b64_json: b64, url, job_id: j.id.to_string(), seed: j.seed });
    }
    let size = format!("{}x{}", request.width, request.height);
    Ok(Json(ImagesResponse { created: sync::unix_s(), data, output_format: "png", size }).into_response())
}
