//! The node's one HTTP port: the public JSON API (behind the API keys when
//! `--api-keys` is given, see [`auth`]), `/metrics` (open to any scraper), the
//! web page at `/` and `/assets/*` (static, open: it holds no data, see [`web`])
//! and, under `/raft/`, the node-to-node RPCs (refused without the cluster secret).

mod a1111;
mod api;
pub mod auth;
mod error;
pub mod events;
pub mod internal;
mod metrics;
mod openai;
pub mod openapi;
mod sync;
pub mod views;
pub mod web;

use std::sync::Arc;

use axum::Router;

pub use error::ApiError;

use crate::node::app::App;

pub fn router(app: Arc<App>) -> Router {
    let (native, native_doc) = api::routes();
    let (events, events_doc) = events::routes();
    let (openai, openai_doc) = openai::routes();
    let (a1111, a1111_doc) = a1111::routes();
    let doc = openapi::document([native_doc, events_doc, openai_doc, a1111_doc], app.api_keys.is_some());
    let api = native
        .merge(events)
        .merge(openai)
        .merge(a1111)
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth::layer));
    api.merge(internal::routes())
        .merge(metrics::routes())
        .merge(web::routes())
        .merge(openapi::routes(&doc))
        .with_state(app)
}

/// Constant-time comparison of a presented secret with ours.
pub fn secret_ok(app: &App, headers: &axum::http::HeaderMap) -> bool {
    let Some(given) = headers.get(raftgen_raft::network::SECRET_HEADER) else { return false };
    let (a, b) = (given.as_bytes(), app.secret.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
