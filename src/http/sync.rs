//! Synchronous image requests, shared by the OpenAI Images API
//! ([`super::openai`]) and the AUTOMATIC1111 API ([`super::a1111`]).
//!
//! Both are thin layers over the job queue: a request becomes ordinary jobs,
//! submitted through [`App::write`] like `POST /v1/jobs` (so a leader failure
//! while the request waits loses nothing: the jobs are in the Raft log), and
//! the node holding the request then watches its own applied state until
//! every job has ended. The wait is bounded by `--sync-timeout-ms`; past it
//! the client gets the job ids (in its API's error shape, status 408 with
//! `x-should-retry: false`, so the OpenAI client does not submit the work a
//! second time) and can fetch the results later from `/v1/jobs/{id}`.
//!
//! A client retry is a new request unless it carries an `Idempotency-Key`
//! header: job `i` of the request is then submitted under `KEY#i`, so a
//! retried request (after a timeout or a dropped connection, through any
//! node) joins the jobs of the first one instead of queueing them again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use raftgen_raft::command::ModelInfo;
use raftgen_raft::job::{FieldError, JobId, JobRequest, JobState, MAX_IDEMPOTENCY_KEY_BYTES};
use raftgen_raft::result::{Location, ResultInfo};
use raftgen_raft::{Command, Response as SmResponse};
use tokio::task::JoinSet;

use super::api::rejection_error;
use super::ApiError;
use crate::node::app::App;

/// Most jobs one synchronous request may make (OpenAI's `n` stops at 10,
/// A1111's `batch_size * n_iter` at this).
pub const MAX_JOBS_PER_REQUEST: usize = 16;
/// Room kept in an idempotency key for the `#i` job suffix.
const KEY_SUFFIX_BYTES: usize = 3;

/// One job of a finished synchronous request.
pub struct Finished {
    pub id: JobId,
    /// The seed the job ran with (the request's, or one the leader chose).
    pub seed: u64,
    pub state: JobState,
    /// The result image's metadata and where it is, when the job succeeded
    /// and its result is still kept (read it with [`images`]).
    pub result: Option<(ResultInfo, Location)>,
    pub error: Option<String>,
}

/// The images of `jobs` (in order; `None` for a job without one), read
/// through this node's result store; the first that no node can serve now
/// fails the whole answer as 503 with `Retry-After`.
pub async fn images(app: &App, jobs: &[Finished]) -> Result<Vec<Option<Bytes>>, ApiError> {
    let reads = jobs.iter().map(|j| async move {
        match &j.result {
            Some((info, location)) => super::api::read_result(app, info, location).await.map(Some),
            None => Ok(None),
        }
    });
    futures_util::future::join_all(reads).await.into_iter().collect()
}

/// Why a synchronous request has no images to show.
pub enum SyncError {
    /// The cluster refused a job (queue full, invalid request); the request's
    /// other jobs were cancelled.
    Rejected(ApiError),
    /// The jobs did not all end in time; they go on. With `confirmed` false
    /// the submission itself could not be confirmed (no leader answered), so
    /// some ids may name no job.
    TimedOut { jobs: Vec<JobId>, waited_ms: u64, confirmed: bool, shutting_down: bool },
}

impl SyncError {
    /// The message a client sees, with what to do next.
    pub fn timeout_message(jobs: &[JobId], waited_ms: u64, confirmed: bool, shutting_down: bool) -> String {
        let ids = jobs.iter().map(JobId::to_string).collect::<Vec<_>>().join(", ");
        let why = match (shutting_down, confirmed) {
            (true, _) => "this node is shutting down".to_string(),
            (false, true) => format!("the jobs did not finish within {waited_ms} ms"),
            (false, false) => format!("no leader confirmed the submission within {waited_ms} ms"),
        };
        format!("{why}; they go on in the queue: fetch GET /v1/jobs/{{id}} and /v1/jobs/{{id}}/image for jobs [{ids}]")
    }
}

/// Fresh job ids for a request of `n` jobs (chosen before submitting, so a
/// caller can register them, e.g. for A1111's `/interrupt`).
pub fn new_ids(n: usize) -> Vec<JobId> {
    (0..n).map(|_| JobId(rand::random())).collect()
}

/// The request's `Idempotency-Key` header, checked; `field` errors name it.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, FieldError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let max = MAX_IDEMPOTENCY_KEY_BYTES - KEY_SUFFIX_BYTES;
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= max => Ok(Some(k.to_string())),
        _ => Err(FieldError::new("Idempotency-Key", format!("must be 1 to {max} bytes of visible ASCII"))),
    }
}

/// The checks `POST /v1/jobs` makes beyond [`JobRequest::validate`] that
/// depend on the model: its pixel multiple.
pub fn validate(request: &JobRequest, model: &ModelInfo) -> Result<(), FieldError> {
    request.validate()?;
    let m = model.pixel_multiple.max(1);
    for (field, side) in [("width", request.width), ("height", request.height)] {
        if side % m != 0 {
            return Err(FieldError::new(
                field,
                format!("must be a multiple of {m} for model '{}', got {side}", model.name),
            ));
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Submits `requests` as jobs `ids` and waits until every one has ended, at
/// most `--sync-timeout-ms` in all. The returned jobs are in request order.
pub async fn run(
    app: &Arc<App>,
    ids: &[JobId],
    requests: Vec<JobRequest>,
    key: Option<&str>,
) -> Result<Vec<Finished>, SyncError> {
    let started = Instant::now();
    let deadline = started + app.settings.sync_timeout();
    let jobs = submit(app, ids, requests, key, deadline).await?;
    wait(app, &jobs, started, deadline).await
}

async fn submit(
    app: &Arc<App>,
    ids: &[JobId],
    requests: Vec<JobRequest>,
    key: Option<&str>,
    deadline: Instant,
) -> Result<Vec<JobId>, SyncError> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, (id, request)) in ids.iter().copied().zip(requests).enumerate() {
        let app = app.clone();
        let idempotency_key = key.map(|k| format!("{k}#{i}"));
        let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        set.spawn(async move {
            let cmd = Command::Submit { id, request, seed: None, idempotency_key };
            (i, app.write(cmd, timeout).await)
        });
    }
    // With an idempotency key, a replayed job keeps the id of its first submission.
    let mut jobs = ids.to_vec();
    let mut rejected = None;
    let mut unconfirmed = false;
    while let Some(joined) = set.join_next().await {
        let Ok((i, result)) = joined else {
            unconfirmed = true;
            continue;
        };
        match result {
            Ok(SmResponse::Submitted { job, .. }) => jobs[i] = job.id,
            Ok(SmResponse::Rejected(r)) => rejected = rejected.or(Some((i, rejection_error(r)))),
            Ok(other) => {
                tracing::warn!("unexpected answer to a submission: {other:?}");
                unconfirmed = true;
            }
            Err(e) => {
                tracing::debug!("synchronous submission: {e}");
                unconfirmed = true;
            }
        }
    }
    if let Some((failed, err)) = rejected {
        // All or nothing: withdraw the request's other jobs (best effort;
        // they are ordinary jobs, cancellable by id, if this fails).
        for (_, id) in jobs.iter().enumerate().filter(|(i, _)| *i != failed) {
            let cancel = Command::Cancel { job: *id };
            if let Err(e) = app.write(cancel, app.settings.submit_timeout()).await {
                tracing::debug!("withdrawing job {id} of a rejected request: {e}");
            }
        }
        return Err(SyncError::Rejected(err));
    }
    if unconfirmed {
        let waited_ms = started.elapsed().as_millis() as u64;
        let shutting_down = *app.shutdown.borrow();
        return Err(SyncError::TimedOut { jobs, waited_ms, confirmed: false, shutting_down });
    }
    Ok(jobs)
}

/// Watches this node's applied state until every job is terminal.
async fn wait(app: &App, jobs: &[JobId], started: Instant, deadline: Instant) -> Result<Vec<Finished>, SyncError> {
    let mut applied = app.view.subscribe();
    let mut shutdown = app.shutdown.clone();
    loop {
        if let Some(done) = collect(app, jobs) {
            return Ok(done);
        }
        let timed_out = |shutting_down| SyncError::TimedOut {
            jobs: jobs.to_vec(),
            waited_ms: started.elapsed().as_millis() as u64,
            confirmed: true,
            shutting_down,
        };
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return Err(timed_out(true)) },
            _ = shutdown.wait_for(|s| *s) => return Err(timed_out(true)),
            _ = tokio::time::sleep_until(deadline.into()) => return Err(timed_out(false)),
        }
    }
}

/// The jobs' outcomes once all are terminal (a job not applied here yet, or
/// still running, means not yet).
fn collect(app: &App, jobs: &[JobId]) -> Option<Vec<Finished>> {
    let data = app.view.read();
    let mut out = Vec::with_capacity(jobs.len());
    for id in jobs {
        let job = data.jobs.job(id)?;
        if !job.state.is_terminal() {
            return None;
        }
        let result = data.jobs.image(id).zip(job.result).map(|((_, location), info)| (info, location.clone()));
        let error = match (job.state, &result) {
            (JobState::Succeeded, None) => Some("the result was dropped by the retention limit".to_string()),
            _ => job.error.clone(),
        };
        out.push(Finished { id: job.id, seed: job.seed, state: job.state, result, error });
    }
    Some(out)
}

/// The status a timeout answers with: 408, never 5xx (the work is queued,
/// nothing failed), and clients are told not to retry it.
pub const TIMEOUT_STATUS: StatusCode = StatusCode::REQUEST_TIMEOUT;

/// Standard base64 with padding (what both APIs put images in).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }
}
