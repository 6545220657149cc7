//! Node-to-node routes: Raft RPCs and forwarded writes, bincode in and out;
//! result images between nodes (a pushed copy in, a copy out for a reader
//! or for repair, a repair copy fetched on the leader's word); the replica
//! dump that the chaos checker compares between nodes. Each is refused with
//! 401 unless it carries the cluster secret.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use raftgen_raft::command::MAX_BATCH_COMMANDS;
use raftgen_raft::job::{NodeId, MAX_IMAGE_BYTES};
use raftgen_raft::network::{PATH_APPEND, PATH_SNAPSHOT, PATH_VOTE};
use raftgen_raft::result::ResultHash;
use raftgen_raft::{codec, Command};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::{secret_ok, ApiError};
use crate::node::app::{App, PATH_FORWARD};

/// This replica's jobs as it holds them now (see [`dump`]).
pub const PATH_DUMP: &str = "/raft/dump";
/// Builds a snapshot now and answers its size (see [`snapshot_now`]).
pub const PATH_SNAPSHOT_NOW: &str = "/raft/snapshot-now";
/// The leader telling a node it was removed (see [`left`]).
pub const PATH_LEFT: &str = "/raft/left";
/// Longest [`snapshot_now`] waits for the snapshot it asked for.
const SNAPSHOT_NOW_MAX_MS: u64 = 120_000;

/// Largest node-to-node body: an AppendEntries or a forwarded batch is at
/// most a few MiB, a snapshot chunk 3 MiB (no entry carries an image).
const MAX_RAFT_BODY_BYTES: usize = 64 << 20;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(PATH_APPEND, post(append))
        .route(PATH_VOTE, post(vote))
        .route(PATH_SNAPSHOT, post(snapshot))
        .route(PATH_FORWARD, post(forward))
        .route(PATH_DUMP, get(dump))
        .route(PATH_SNAPSHOT_NOW, post(snapshot_now))
        .route(PATH_LEFT, post(left))
        .layer(DefaultBodyLimit::max(MAX_RAFT_BODY_BYTES))
        .route(
            "/raft/results/{sha}",
            put(receive_result).get(serve_result).layer(DefaultBodyLimit::max(MAX_IMAGE_BYTES)),
        )
        .route("/raft/results/{sha}/copy", post(copy_result))
}

fn parse_sha(sha: &str) -> Result<ResultHash, ApiError> {
    sha.parse().map_err(|e: String| ApiError::field("sha", e))
}

fn transfer_error(e: crate::node::results::ReceiveError) -> ApiError {
    use crate::node::results::ReceiveError;
    match e {
        ReceiveError::Busy => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string()).retry_after(1),
        ReceiveError::Mismatch => ApiError::field("body", e.to_string()),
        ReceiveError::Io(_) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "storage", e.to_string()),
    }
}

/// A copy of a result pushed by the node that made it: answered (204) only
/// once it is checked against its name and durable here.
async fn receive_result(
    State(app): State<Arc<App>>,
    Path(sha): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    let sha = parse_sha(&sha)?;
    app.results.receive(sha, body).await.map_err(transfer_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// This node's copy of a result, for a reader on another node or a repair.
async fn serve_result(
    State(app): State<Arc<App>>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    let sha = parse_sha(&sha)?;
    match app.results.serve(sha).await.map_err(transfer_error)? {
        Some(bytes) => {
            app.metrics.peer_sent_bytes.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "image/png")], bytes).into_response())
        }
        None => Err(ApiError::not_found("result")),
    }
}

#[derive(serde::Deserialize)]
struct CopyFrom {
    from: NodeId,
}

/// The leader's repair: fetch a result from node `from`, check it, store it
/// durably here; 204 once done.
async fn copy_result(
    State(app): State<Arc<App>>,
    Path(sha): Path<String>,
    Query(q): Query<CopyFrom>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    let sha = parse_sha(&sha)?;
    app.results
        .copy_from(&app, sha, q.from)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "copy", e).retry_after(1))?;
    Ok(StatusCode::NO_CONTENT)
}

fn decode_req<T: DeserializeOwned>(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    if !secret_ok(app, headers) {
        return Err(ApiError::unauthorized());
    }
    codec::decode(body).map_err(|e| ApiError::field("body", e.to_string()))
}

fn encoded<T: Serialize>(app: &App, value: &T) -> Response {
    match codec::encode(value) {
        Ok(bytes) => {
            app.metrics.peer_sent_bytes.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            (StatusCode::OK, bytes).into_response()
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "codec", e.to_string()).into_response(),
    }
}

async fn append(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let req = decode_req(&app, &headers, &body)?;
    Ok(encoded(&app, &app.raft.append_entries(req).await))
}

async fn vote(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let req = decode_req(&app, &headers, &body)?;
    Ok(encoded(&app, &app.raft.vote(req).await))
}

async fn snapshot(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    // Before decoding: a multi-MB chunk takes a while, and a leader is alive.
    let _no_elections = app.snapshot_guard.enter();
    let req = decode_req(&app, &headers, &body)?;
    Ok(encoded(&app, &app.raft.install_snapshot(req).await))
}

/// A follower forwards commands; we propose them if we lead, or say who does.
async fn forward(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let cmds: Vec<Command> = decode_req(&app, &headers, &body)?;
    if cmds.len() > MAX_BATCH_COMMANDS {
        return Err(ApiError::field("body", format!("more than {MAX_BATCH_COMMANDS} commands")));
    }
    let answers = futures_util::future::join_all(cmds.into_iter().map(|cmd| app.propose_local(cmd))).await;
    Ok(encoded(&app, &answers))
}

/// Builds a snapshot of this node's applied state now, waits until it is
/// stored, and answers `{"index", "bytes"}`: for operators (a snapshot before
/// a backup) and benchmarks (the snapshot size at a known point).
async fn snapshot_now(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<axum::Json<Value>, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    let applied = app.view.applied_index();
    let unavailable = |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "snapshot", e).retry_after(1);
    app.raft.trigger().snapshot().await.map_err(|e| unavailable(e.to_string()))?;
    let wait = std::time::Duration::from_millis(SNAPSHOT_NOW_MAX_MS);
    app.raft
        .wait(Some(wait))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot built")
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let index = app.raft.metrics().borrow().snapshot.map_or(0, |s| s.index);
    Ok(axum::Json(json!({ "index": index, "bytes": app.view.snapshot_bytes() })))
}

/// The leader removed this node (`raftgen leave`): it records that and stops.
async fn left(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::field("body", format!("invalid JSON: {e}")))?;
    if value["id"].as_u64() != Some(app.id) {
        return Err(ApiError::field("id", format!("this is node {}", app.id)));
    }
    crate::node::mark_left(&app)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "left", e.to_string()).retry_after(1))?;
    Ok(axum::Json(json!({ "stopping": true })))
}

/// Every job this replica holds, without request bodies, with the sha256 of
/// its retained result image (from its metadata): what the chaos checker
/// compares between replicas once a cluster has healed. Local state, not a
/// linearizable read; it needs the cluster secret because it lists every
/// job's idempotency key.
async fn dump(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<axum::Json<Value>, ApiError> {
    if !secret_ok(&app, &headers) {
        return Err(ApiError::unauthorized());
    }
    let data = app.view.read();
    let last_applied = data.last_applied.map_or(0, |l| l.index);
    let jobs: Vec<Value> = data
        .jobs
        .recent_jobs(None, usize::MAX)
        .into_iter()
        .map(|job| {
            json!({
                "id": job.id.to_string(),
                "idempotency_key": job.idempotency_key,
                "state": job.state.as_str(),
                "attempt": job.attempt,
                "node": job.node,
                "events": job.history.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
                "image_sha256": data.jobs.image(&job.id).map(|(sha, _)| sha.to_string()),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "node": app.id, "last_applied": last_applied, "jobs": jobs })))
}
