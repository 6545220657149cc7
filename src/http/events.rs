//! Live progress of one job as Server-Sent Events: `GET /v1/jobs/{id}/events`,
//! served by any node from its own applied state (no hop to the leader, so a
//! stream outlives a leader change).
//!
//! The stream opens with a `state` event carrying the job's view, then sends,
//! on every change of the job in this node's applied state:
//! - `state`: `{"state", "node", "attempt"}` when one of them changed;
//! - `progress`: `{"step", "steps"}` when the replicated step count moved (the
//!   executing node replicates it at most once a second, see `crate::node::host`);
//! - `done`: `{"state", "job", "image_url", "error"}` once the job is
//!   terminal; then the stream ends. A stream opened on a finished job gets
//!   `done` at once.
//!
//! Every event carries an `id:` of the job version it shows,
//! `HISTORY_LEN.STEP`: both only grow over a job's life (a re-queue resets the
//! step but adds a history event), so the ids are ordered. A client that
//! reconnects with `Last-Event-ID` gets no `state`/`progress` event for a
//! version it already saw, even from a node that lags behind the one it left;
//! `done` is always sent, since it ends the stream.
//!
//! Bounds: at most `max_event_streams` streams per node (beyond: 503 with
//! `Retry-After`), each for at most `event_stream_max_ms` (then it ends; an
//! SSE client reconnects with its `Last-Event-ID`), a keep-alive comment every
//! 15 s, a small send buffer (a reader that stops reading stalls only its own
//! stream), and every stream ends when the node starts to stop (graceful
//! shutdown waits for open responses).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Router;
use raftgen_raft::job::{Job, JobId, JobState};
use raftgen_raft::NodeId;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::api::{parse_id, with_job};
use super::views::job_json;
use super::ApiError;
use crate::node::app::App;

/// Interval of the keep-alive comments (proxies close idle connections).
const KEEP_ALIVE_MS: u64 = 15_000;
/// Events buffered per stream ahead of a slow reader.
const SEND_BUFFER_EVENTS: usize = 8;
/// How long an `EventSource` waits before reconnecting (the `retry:` field).
const CLIENT_RETRY_MS: u64 = 1_000;
/// `Retry-After` of the answer beyond `max_event_streams`.
const BUSY_RETRY_AFTER_S: u64 = 5;

pub fn routes() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    let other_method = || async {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
    };
    let (router, doc) =
        utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(events)).split_for_parts();
    (router.method_not_allowed_fallback(other_method), doc)
}

/// One Server-Sent Event of the stream, as the OpenAPI document describes it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only describes the stream
struct SseEvent {
    /// `state`, `progress`, `done` or `error`.
    event: Option<String>,
    /// The event's JSON.
    data: Option<String>,
    /// `HISTORY_LEN.STEP`: the job version it shows.
    id: Option<String>,
    /// Milliseconds an `EventSource` waits before reconnecting.
    retry: Option<u64>,
}

/// This node's open streams: their bound, and the signal that ends them all.
pub struct Streams {
    permits: Arc<Semaphore>,
    closing: watch::Sender<bool>,
}

impl Streams {
    pub fn new(max_streams: usize) -> Self {
        Streams { permits: Arc::new(Semaphore::new(max_streams)), closing: watch::Sender::new(false) }
    }

    /// Ends every open stream and refuses new ones: the node is stopping, and
    /// its HTTP server waits for open responses to end.
    pub fn close(&self) {
        self.permits.close();
        self.closing.send_replace(true);
    }
}

/// What a stream compares between two looks at the job.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    state: JobState,
    node: Option<NodeId>,
    attempt: u32,
    step: u32,
    steps: u32,
    history: usize,
}

impl Seen {
    fn of(job: &Job) -> Self {
        Seen {
            state: job.state,
            node: job.node,
            attempt: job.attempt,
            step: job.progress.step,
            steps: job.progress.steps,
            history: job.history.len(),
        }
    }

    /// The version's event id (see the module docs): ordered like the versions.
    fn mark(&self) -> (usize, u32) {
        (self.history, self.step)
    }
}

fn event_id(mark: (usize, u32)) -> String {
    format!("{}.{}", mark.0, mark.1)
}

/// A `Last-Event-ID` this endpoint gave out; anything else counts as none.
fn parse_event_id(headers: &HeaderMap) -> Option<(usize, u32)> {
    let v = headers.get("last-event-id")?.to_str().ok()?;
    let (h, s) = v.split_once('.')?;
    Some((h.parse().ok()?, s.parse().ok()?))
}

/// The host the client reached us by (its `Host` header, when it is a plain
/// `host[:port]`), else the address this node advertises.
fn public_host(app: &App, headers: &HeaderMap) -> String {
    let given = headers.get(header::HOST).and_then(|v| v.to_str().ok()).filter(|h| {
        !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
    });
    given.map_or_else(|| app.addr.clone(), str::to_string)
}

/// The job's live progress as Server-Sent Events: `state`, `progress`, then
/// `done` (with the job and its image URL), from any node.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, description = "32 hex digits"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SseEvent),
        (status = 400, description = "Not a job id", body = super::openapi::ErrorBody),
        (status = 404, description = "No such job", body = super::openapi::ErrorBody),
        (status = 503, description = "This node serves its maximum of streams (`Retry-After`)", body = super::openapi::ErrorBody),
    ))]
async fn events(State(app): State<Arc<App>>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    with_job(&app, id, |_, _| ()).await.ok_or_else(|| ApiError::not_found("job"))?;
    let permit = app.event_streams.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("this node serves at most {} event streams at once", app.settings.max_event_streams),
        )
        .retry_after(BUSY_RETRY_AFTER_S)
    })?;
    let image_base = app.scheme.url(&public_host(&app, &headers), "");
    let resume = parse_event_id(&headers);
    let (tx, mut rx) = mpsc::channel::<Result<Event, Infallible>>(SEND_BUFFER_EVENTS);
    tokio::spawn(stream_job(app.clone(), id, resume, image_base, tx, permit));
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let keep_alive = KeepAlive::new().interval(Duration::from_millis(KEEP_ALIVE_MS)).text("keep-alive");
    let mut resp = Sse::new(stream).keep_alive(keep_alive).into_response();
    // Reverse proxies (nginx) would otherwise buffer the stream.
    resp.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// What one look at the applied state found.
enum Look {
    Gone,
    Active(Seen, Option<Value>),
    Done(Seen, Value),
}

/// Feeds one stream until the job ends, the client leaves, the lifetime bound
/// passes or the node stops. Holds the stream's permit.
async fn stream_job(
    app: Arc<App>,
    id: JobId,
    resume: Option<(usize, u32)>,
    image_base: String,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    _permit: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + Duration::from_millis(app.settings.event_stream_max_ms);
    let mut applied = app.view.subscribe();
    let mut closing = app.event_streams.closing.subscribe();
    let mut shutdown = app.shutdown.clone();
    let send = |event: Event| {
        let tx = tx.clone();
        async move { matches!(tokio::time::timeout_at(deadline, tx.send(Ok(event))).await, Ok(Ok(()))) }
    };
    let mut last: Option<Seen> = None;
    loop {
        let look = {
            let data = app.view.read();
            match data.jobs.job(&id) {
                None => Look::Gone,
                Some(job) if job.state.is_terminal() => Look::Done(Seen::of(job), job_json(job)),
                // The view is built only for the opening event.
                Some(job) => Look::Active(Seen::of(job), last.is_none().then(|| job_json(job))),
            }
        };
        let ending = !matches!(look, Look::Active(..));
        let mut out = Vec::new();
        match look {
            Look::Gone => {
                let error = json!({ "error": { "code": "not_found", "message": "the job was dropped by the retention limit" } });
                out.push(Event::default().event("error").data(error.to_string()));
            }
            Look::Done(seen, view) => {
                let image_url = match (&view["result"]["url"], &view["result"]["evicted"]) {
                    (Value::String(path), Value::Bool(false)) => json!(format!("{image_base}{path}")),
                    _ => Value::Null,
                };
                let data =
                    json!({ "state": view["state"], "image_url": image_url, "error": view["error"], "job": view });
                out.push(Event::default().event("done").id(event_id(seen.mark())).data(data.to_string()));
            }
            Look::Active(seen, view) => {
                let fresh = resume.is_none_or(|r| seen.mark() > r);
                let state_changed =
                    last.is_none_or(|l| (l.state, l.node, l.attempt) != (seen.state, seen.node, seen.attempt));
                let progressed = match last {
                    None => seen.state == JobState::Running && seen.step > 0,
                    Some(l) => (l.step, l.steps) != (seen.step, seen.steps),
                };
                if fresh && state_changed {
                    let mut data = json!({ "state": seen.state.as_str(), "node": seen.node, "attempt": seen.attempt });
                    if let Some(view) = view {
                        data["job"] = view;
                    }
                    let mut event = Event::default().event("state").data(data.to_string());
                    if last.is_none() {
                        event = event.retry(Duration::from_millis(CLIENT_RETRY_MS));
                    }
                    out.push(event);
                }
                if fresh && progressed {
                    let data = json!({ "step": seen.step, "steps": seen.steps });
                    out.push(Event::default().event("progress").data(data.to_string()));
                }
                // The id goes on the last event of a version, so a client that
                // got it got the whole version.
                if let Some(event) = out.pop() {
                    out.push(event.id(event_id(seen.mark())));
                }
                last = Some(seen);
            }
        }
        for event in out {
            if !send(event).await {
                return;
            }
        }
        if ending {
            return;
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            _ = closing.wait_for(|c| *c) => return,
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}
