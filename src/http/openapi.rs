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

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::{Modify, ToSchema};

use crate::app::App;

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

/// The document: the base above with every module's operations merged in.
pub fn document(parts: impl IntoIterator<Item = OpenApi>) -> OpenApi {
    let mut doc = <Base as utoipa::OpenApi>::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    for part in parts {
        doc.merge(part);
    }
    doc
}

/// Serves `doc`, rendered once.
pub fn routes(doc: &OpenApi) -> Router<Arc<App>> {
    let json: Arc<str> = doc.to_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")).into();
    Router::new().route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], json.to_string()).into_response() }
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

    fn doc() -> OpenApi {
        document([
            super::super::api::routes().1,
            super::super::events::routes().1,
            super::super::openai::routes().1,
            super::super::a1111::routes().1,
        ])
    }

    #[test]
    fn every_public_operation_is_documented() {
        let doc = doc();
        let ops: Vec<String> = doc
            .paths
            .paths
            .iter()
            .flat_map(|(path, item)| {
                let item = serde_json::to_value(item).unwrap();
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
        let doc = serde_json::to_value(doc()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let codes: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
                assert!(codes.iter().any(|c| c.starts_with('2')), "{method} {path}: no success response");
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
