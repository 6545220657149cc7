//! Node-to-node routes: Raft RPCs and forwarded writes, bincode in and out,
//! each refused with 401 unless it carries the cluster secret.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use raftgen_raft::command::MAX_BATCH_COMMANDS;
use raftgen_raft::network::{PATH_APPEND, PATH_SNAPSHOT, PATH_VOTE};
use raftgen_raft::{codec, Command};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{secret_ok, ApiError};
use crate::app::{App, PATH_FORWARD};

/// Largest node-to-node body: a batch of entries that carry result images.
const MAX_RAFT_BODY_BYTES: usize = 1 << 30;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(PATH_APPEND, post(append))
        .route(PATH_VOTE, post(vote))
        .route(PATH_SNAPSHOT, post(snapshot))
        .route(PATH_FORWARD, post(forward))
        .layer(DefaultBodyLimit::max(MAX_RAFT_BODY_BYTES))
}

fn decode_req<T: DeserializeOwned>(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    if !secret_ok(app, headers) {
        return Err(ApiError::unauthorized());
    }
    codec::decode(body).map_err(|e| ApiError::field("body", e.to_string()))
}

fn encoded<T: Serialize>(value: &T) -> Response {
    match codec::encode(value) {
        Ok(bytes) => (StatusCode::OK, bytes).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "codec", e.to_string()).into_response(),
    }
}

async fn append(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let req = decode_req(&app, &headers, &body)?;
    Ok(encoded(&app.raft.append_entries(req).await))
}

async fn vote(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let req = decode_req(&app, &headers, &body)?;
    Ok(encoded(&app.raft.vote(req).await))
}

async fn snapshot(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    // Before decoding: a multi-MB chunk takes a while, and a leader is alive.
    let _no_elections = app.snapshot_guard.enter();
    let req = decode_req(&app, &headers, &body)?;
    Ok(encoded(&app.raft.install_snapshot(req).await))
}

/// A follower forwards commands; we propose them if we lead, or say who does.
async fn forward(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let cmds: Vec<Command> = decode_req(&app, &headers, &body)?;
    if cmds.len() > MAX_BATCH_COMMANDS {
        return Err(ApiError::field("body", format!("more than {MAX_BATCH_COMMANDS} commands")));
    }
    let answers = futures_util::future::join_all(cmds.into_iter().map(|cmd| app.propose_local(cmd))).await;
    Ok(encoded(&answers))
}
