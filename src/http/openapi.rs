//! `GET /openapi.json`: the OpenAPI 3.1 document of the public API.
//!
//! It is generated, not written: each API module registers its handlers
//! through utoipa-axum's `OpenApiRouter`, so a route is served and documented
//! by the same line, and the bodies it names are the types the handlers
//! serialise (see [`super::views`]) or whose field lists the parsers accept.
//! The node-to-node RPCs under `/raft/`, `/metrics`, the web page and this
//! document itself are left out: they are not an API for clients. Like
//! `/healthz`, the document is served without an API key: it holds no data.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use raftgen_raft::job::{
    MAX_GUIDANCE, MAX_IMAGE_SIDE_PX, MAX_PRIORITY, MAX_PROMPT_CHARS, MAX_STEPS, MIN_IMAGE_SIDE_PX, MIN_PRIORITY,
};
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::{Modify, ToSchema};

use super::sync::MAX_JOBS_PER_REQUEST;
use crate::node::app::App;
use crate::node::config::MAX_LIST_LIMIT;

/// The error body of the native API (`/v1/jobs`, `/v1/cluster`, ...).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable `code`, a message and, for bad input, the field.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    #[schema(example = "invalid_request")]
    pub code: String,
    pub message: String,
    /// The request field (or header) at fault.
    pub field: Option<String>,
    /// A write that could not be confirmed in time: the job it would create.
    pub job_id: Option<String>,
    /// Jobs a synchronous request created before it gave up waiting.
    pub job_ids: Option<Vec<String>>,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "raftgen",
        description = "A Raft-replicated text-to-image job cluster. Every node serves this API; writes reach \
                       the leader through the node that received them. With `--api-keys`, every operation but \
                       `/healthz` and `/readyz` needs `Authorization: Bearer KEY`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    tags(
        (name = "jobs", description = "The native job API: submit, follow, fetch, cancel."),
        (name = "cluster", description = "Membership and health."),
        (name = "openai", description = "OpenAI Images API (`client.images.generate`)."),
        (name = "a1111", description = "AUTOMATIC1111 web UI API (`/sdapi/v1/*`)."),
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerKeys),
    security(("api_key" = [])),
)]
struct Base;

/// Declares the API-key scheme the whole document refers to.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, doc: &mut OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("A key from the node's `--api-keys` file (only when it has one)."))
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

/// The document: the base above with every module's operations merged in,
/// then what the derive macros cannot say (see [`finish`]). `keys_required`:
/// the node was started with `--api-keys`, so every operation but the
/// health checks needs a key; without it a key is optional.
pub fn document(parts: impl IntoIterator<Item = OpenApi>, keys_required: bool) -> Value {
    let mut doc = <Base as utoipa::OpenApi>::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    for part in parts {
        doc.merge(part);
    }
    let mut doc = serde_json::to_value(doc).unwrap_or(Value::Null);
    finish(&mut doc, keys_required);
    doc
}

/// Bounds of request fields, from the constants the validators use:
/// (schema, property, minimum, maximum).
fn bounds() -> Vec<(&'static str, &'static str, f64, f64)> {
    let side = (MIN_IMAGE_SIDE_PX as f64, MAX_IMAGE_SIDE_PX as f64);
    let steps = (1.0, MAX_STEPS as f64);
    let guidance = (0.0, MAX_GUIDANCE as f64);
    let jobs = (1.0, MAX_JOBS_PER_REQUEST as f64);
    vec![
        ("SubmitBody", "width", side.0, side.1),
        ("SubmitBody", "height", side.0, side.1),
        ("SubmitBody", "steps", steps.0, steps.1),
        ("SubmitBody", "guidance", guidance.0, guidance.1),
        ("SubmitBody", "priority", MIN_PRIORITY as f64, MAX_PRIORITY as f64),
        ("ImageRequest", "n", 1.0, super::openai::MAX_N as f64),
        ("ImageRequest", "steps", steps.0, steps.1),
        ("ImageRequest", "guidance", guidance.0, guidance.1),
        ("Txt2ImgRequest", "width", side.0, side.1),
        ("Txt2ImgRequest", "height", side.0, side.1),
        ("Txt2ImgRequest", "steps", steps.0, steps.1),
        ("Txt2ImgRequest", "cfg_scale", guidance.0, guidance.1),
        ("Txt2ImgRequest", "batch_size", jobs.0, jobs.1),
        ("Txt2ImgRequest", "n_iter", jobs.0, jobs.1),
    ]
}

/// Completes the generated document: field bounds and the job id pattern
/// from the validators' constants, a description on every response (OpenAPI
/// requires one; utoipa leaves it out when the handler gives none), and the
/// security requirement this node applies.
fn finish(doc: &mut Value, keys_required: bool) {
    for (schema, field, min, max) in bounds() {
        if let Some(p) = doc.pointer_mut(&format!("/components/schemas/{schema}/properties/{field}")) {
            p["minimum"] = number(min);
            p["maximum"] = number(max);
        }
    }
    for schema in ["SubmitBody", "ImageRequest", "Txt2ImgRequest"] {
        if let Some(p) = doc.pointer_mut(&format!("/components/schemas/{schema}/properties/prompt")) {
            p["maxLength"] = MAX_PROMPT_CHARS.into();
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, item) in paths.iter_mut() {
        let Some(ops) = item.as_object_mut() else { continue };
        for op in ops.values_mut() {
            for param in op.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten() {
                match (param["name"].as_str(), param["in"].as_str()) {
                    (Some("id"), Some("path")) if path.starts_with("/v1/jobs/") => {
                        param["schema"]["pattern"] = "^[0-9a-f]{32}$".into();
                    }
                    (Some("limit"), Some("query")) => {
                        param["schema"]["minimum"] = 1.into();
                        param["schema"]["maximum"] = MAX_LIST_LIMIT.into();
                    }
                    _ => {}
                }
            }
            for (status, resp) in op.get_mut("responses").and_then(Value::as_object_mut).into_iter().flatten() {
                if resp.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                    let reason = status.parse::<u16>().ok().and_then(|s| StatusCode::from_u16(s).ok());
                    resp["description"] = reason.and_then(|s| s.canonical_reason()).unwrap_or("Response").into();
                }
            }
        }
    }
    if !keys_required {
        // A node without `--api-keys` takes requests with or without a key.
        doc["security"] = serde_json::json!([{ "api_key": [] }, {}]);
    }
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 {
        (x as i64).into()
    } else {
        x.into()
    }
}

/// Serves `doc`, rendered once.
pub fn routes(doc: &Value) -> Router<Arc<App>> {
    let json = axum::body::Bytes::from(doc.to_string());
    Router::new().route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], json).into_response() }
        }),
    )
}

/// The property names of `T`'s schema: the fields a parser accepts, taken
/// from the same type the document describes the request body with.
pub fn property_names<T: utoipa::PartialSchema>() -> Vec<String> {
    use utoipa::openapi::{RefOr, Schema};
    match T::schema() {
        RefOr::T(Schema::Object(o)) => o.properties.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        let parts = [
            super::super::api::routes().1,
            super::super::events::routes().1,
            super::super::openai::routes().1,
            super::super::a1111::routes().1,
        ];
        document(parts, false)
    }

    #[test]
    fn every_public_operation_is_documented() {
        let doc = doc();
        let ops: Vec<String> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                let methods: Vec<String> = item.as_object().unwrap().keys().cloned().collect();
                methods.into_iter().filter(|m| m != "parameters").map(move |m| format!("{} {path}", m.to_uppercase()))
            })
            .collect();
        for want in [
            "GET /v1/jobs",
            "POST /v1/jobs",
            "GET /v1/jobs/{id}",
            "DELETE /v1/jobs/{id}",
            "GET /v1/jobs/{id}/image",
            "GET /v1/jobs/{id}/events",
            "GET /v1/cluster",
            "GET /v1/models",
            "POST /v1/models/rescan",
            "POST /v1/cluster/nodes",
            "DELETE /v1/cluster/nodes/{id}",
            "GET /healthz",
            "GET /readyz",
            "POST /v1/images/generations",
            "POST /sdapi/v1/txt2img",
            "GET /sdapi/v1/progress",
            "POST /sdapi/v1/interrupt",
            "GET /sdapi/v1/sd-models",
            "GET /sdapi/v1/samplers",
        ] {
            assert!(ops.iter().any(|o| o == want), "{want} missing from {ops:?}");
        }
        // Not an API for clients: the node-to-node RPCs stay out.
        assert!(!ops.iter().any(|o| o.contains("/raft/")), "{ops:?}");
    }

    #[test]
    fn operations_that_take_a_body_document_their_errors_and_refs_resolve() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let codes: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
                assert!(codes.iter().any(|c| c.starts_with('2')), "{method} {path}: no success response");
                for (code, resp) in op["responses"].as_object().unwrap() {
                    let described = resp["description"].as_str().is_some_and(|d| !d.is_empty());
                    assert!(described, "{method} {path} {code}: OpenAPI requires a description");
                }
                if op.get("requestBody").is_some() {
                    assert!(
                        codes.iter().any(|c| c.starts_with('4')),
                        "{method} {path}: takes a body, no 4xx documented"
                    );
                }
            }
        }
        // Every `$ref` names a schema the document defines.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref to {name}");
        }
    }

    #[test]
    fn request_field_lists_come_from_the_documented_types() {
        #[derive(ToSchema)]
        #[allow(dead_code)]
        struct Two {
            a: String,
            b: Option<u32>,
        }
        assert_eq!(property_names::<Two>(), ["a", "b"]);
    }
}
