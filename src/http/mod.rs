//! The node's one HTTP port: the public JSON API (behind the API keys when
//! `--api-keys` is given, see [`auth`]), `/metrics` (open to any scraper), the
//! web page at `/` and `/assets/*` (static, open: it holds no data, see [`web`])
//! and, under `/raft/`, the node-to-node RPCs (refused without the cluster secret).

mod a1111;
mod api;
pub mod auth;
mod error;
pub mod events;
mod internal;
mod metrics;
mod openai;
mod sync;
pub mod views;
pub mod web;

use std::sync::Arc;

use axum::Router;

pub use error::ApiError;

use crate::app::App;

pub fn router(app: Arc<App>) -> Router {
    let api = api::routes()
        .merge(events::routes())
        .merge(openai::routes())
        .merge(a1111::routes())
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth::layer));
    api.merge(internal::routes()).merge(metrics::routes()).merge(web::routes()).with_state(app)
}

/// Constant-time comparison of a presented secret with ours.
pub fn secret_ok(app: &App, headers: &axum::http::HeaderMap) -> bool {
    let Some(given) = headers.get(raftgen_raft::network::SECRET_HEADER) else { return false };
    let (a, b) = (given.as_bytes(), app.secret.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
