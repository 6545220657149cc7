//! `GET /metrics`: this node's metrics in Prometheus text format (see
//! [`crate::metrics`]).
//!
//! Deliberately outside every authentication check, present and future (the
//! cluster secret, API keys): Prometheus scrapes each node directly, and
//! nothing in the exposition is secret.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::metrics::{exposition::CONTENT_TYPE, render};
use crate::node::app::App;

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    // Rendering reads sled's file sizes: keep that off the async threads.
    match tokio::task::spawn_blocking(move || render(&app)).await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("rendering metrics: {e}")).into_response(),
    }
}
