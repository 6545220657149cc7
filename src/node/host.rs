//! The executor host: runs the jobs the leader assigned to this node.
//!
//! It watches the applied state for attempts assigned to this node, starts each
//! one (a `Start` command), runs the executor on a blocking thread, makes the
//! PNG durable where the cluster keeps results (this node's store and
//! `result_copies - 1` others, or the object store: see `results::commit`),
//! and only then reports the outcome, once: a `Complete` command carrying the
//! image's metadata (never its bytes) and the attempt number.
//! If the attempt stops being current (cancelled, or re-queued because the
//! leader lost contact), the run is told to stop and its late report, if any,
//! is rejected by the state machine's fencing. After a restart, attempts still
//! assigned to this node are simply run again under the same attempt number.
//!
//! Failures are reported as the executor classifies them ([`ExecError`]): a
//! job that cannot run as asked fails for good; a broken run (an internal
//! error, out of memory, a panic of the executor thread) is reported
//! retryable, and the state machine queues the job again while it has
//! attempts left (`--max-attempts`).
//!
//! Execution timeout: a run that lasts longer than `--job-timeout-ms` is told
//! to stop (its cancel flag; executors look at it between steps) and its jobs
//! are reported failed at once ("execution timed out after N ms", not
//! retryable: the same job would most likely take as long again), so the
//! state machine frees their slots and the scheduler can plan with them right
//! away. The executor lane, however, stays busy until the blocking run has
//! really returned: starting another run beside one that is still winding
//! down would oversubscribe the CPU/GPU and the memory that a lane stands
//! for. A job assigned to the freed slot meanwhile waits, assigned, for the
//! lane; normally that is at most one step. A run that never returns (stuck
//! outside its step loop) keeps its lane until the node restarts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftgen_raft::command::{NodeRegistration, Outcome};
use raftgen_raft::job::JobId;
use raftgen_raft::{Command, Response};

use crate::executor::{ExecError, JobOutput, JobSpec, RunControl};
use crate::node::app::App;

/// Least time between two progress reports of one job.
const PROGRESS_INTERVAL_MS: u64 = 1_000;

struct Running {
    attempt: u32,
    cancel: Arc<AtomicBool>,
}

pub async fn run(app: Arc<App>) {
    let mut applied = app.view.subscribe();
    let mut shutdown = app.shutdown.clone();
    let mut running: HashMap<JobId, Running> = HashMap::new();
    // Attempts this host already ran to the end, until the applied state (which
    // may lag the leader's) stops listing them: never run an attempt twice.
    let mut finished: HashSet<(JobId, u32)> = HashSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(JobId, u32)>>();
    let lanes = app.executor.lanes().min(app.settings.slots.max(1) as usize);
    let max_batch = app.executor.max_batch().max(1);
    let mut busy_lanes = 0usize;
    loop {
        // Attempts currently assigned to us, from the applied state. This runs
        // on every applied entry, so it copies ids only.
        let mine: Vec<(JobId, u32)> = app.view.read().jobs.active_on(app.id).map(|j| (j.id, j.attempt)).collect();
        for (id, r) in &running {
            if !mine.contains(&(*id, r.attempt)) {
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
        finished.retain(|current| mine.contains(current));
        while busy_lanes < lanes {
            let waiting: Vec<(JobId, u32)> = mine
                .iter()
                .filter(|(id, attempt)| !running.contains_key(id) && !finished.contains(&(*id, *attempt)))
                .copied()
                .collect();
            let specs: Vec<JobSpec> = {
                let data = app.view.read();
                waiting
                    .iter()
                    .filter_map(|(id, attempt)| {
                        let j = data.jobs.job(id)?;
                        Some(JobSpec { id: *id, attempt: *attempt, request: j.request.clone(), seed: j.seed })
                    })
                    .collect()
            };
            let Some(first) = specs.first() else { break };
            // The oldest waiting job, and others that can share its batch.
            let key = app.executor.batch_key(first);
            let batch: Vec<JobSpec> = std::iter::once(first.clone())
                .chain(
                    specs[1..]
                        .iter()
                        .filter(|s| key.is_some() && app.executor.batch_key(s) == key)
                        .take(max_batch - 1)
                        .cloned(),
                )
                .collect();
            let mut cancels = Vec::with_capacity(batch.len());
            for spec in &batch {
                let cancel = Arc::new(AtomicBool::new(false));
                running.insert(spec.id, Running { attempt: spec.attempt, cancel: cancel.clone() });
                cancels.push(cancel);
            }
            busy_lanes += 1;
            let (app, done) = (app.clone(), done_tx.clone());
            tokio::spawn(async move {
                let ids: Vec<(JobId, u32)> = batch.iter().map(|s| (s.id, s.attempt)).collect();
                execute(&app, batch, cancels).await;
                let _ = done.send(ids);
            });
        }
        tokio::select! {
            _ = applied.changed() => {}
            Some(ids) = done_rx.recv() => {
                busy_lanes -= 1;
                for (id, attempt) in ids {
                    if running.get(&id).is_some_and(|r| r.attempt == attempt) {
                        running.remove(&id);
                    }
                    finished.insert((id, attempt));
                }
            }
            _ = shutdown.changed() => {
                for r in running.values() {
                    r.cancel.store(true, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// Runs one batch: records each start, runs the executor once for all the
/// jobs that started, reports each outcome.
async fn execute(app: &Arc<App>, batch: Vec<JobSpec>, cancels: Vec<Arc<AtomicBool>>) {
    let node = app.id;
    let timeout = app.settings.report_timeout();
    let starts = futures_util::future::join_all(batch.iter().map(|spec| {
        let (id, attempt) = (spec.id, spec.attempt);
        async move {
            match app.write(Command::Start { job: id, node, attempt }, timeout).await {
                Ok(Response::Ok) => true,
                Ok(other) => {
                    tracing::info!(job_id = %id, attempt, "not started: {other:?}");
                    false
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, attempt, "could not record the start: {e}");
                    false
                }
            }
        }
    }))
    .await;
    let started: Vec<(JobSpec, Arc<AtomicBool>)> =
        batch.into_iter().zip(cancels).zip(starts).filter(|(_, ok)| *ok).map(|(j, _)| j).collect();
    if started.is_empty() {
        return;
    }
    // Progress flows from the blocking run to a task that reports it to the
    // cluster (a replicated `Progress` command) at most once a second.
    let steps_done: Vec<Arc<AtomicU32>> = started.iter().map(|_| Arc::new(AtomicU32::new(0))).collect();
    let reporter = {
        let app = app.clone();
        // (job, attempt, steps, steps done, cancelled) per job of the batch.
        type Watch = (JobId, u32, u32, Arc<AtomicU32>, Arc<AtomicBool>);
        let jobs: Vec<Watch> = started
            .iter()
            .zip(&steps_done)
            .map(|((s, c), d)| (s.id, s.attempt, s.request.steps, d.clone(), c.clone()))
            .collect();
        tokio::spawn(async move {
            let mut last = vec![0; jobs.len()];
            loop {
                tokio::time::sleep(Duration::from_millis(PROGRESS_INTERVAL_MS)).await;
                for (i, (id, attempt, steps, done, cancel)) in jobs.iter().enumerate() {
                    let now = done.load(Ordering::Relaxed);
                    if cancel.load(Ordering::Relaxed) || now == last[i] || now >= *steps {
                        continue;
                    }
                    last[i] = now;
                    let cmd = Command::Progress { job: *id, node, attempt: *attempt, step: now, steps: *steps };
                    let _ = app.write(cmd, Duration::from_millis(PROGRESS_INTERVAL_MS)).await;
                }
            }
        })
    };
    let executor = app.executor.clone();
    let started_at = Instant::now();
    let work: Vec<(JobSpec, RunControl)> = started
        .iter()
        .zip(&steps_done)
        .map(|((spec, cancel), done)| {
            let done = done.clone();
            let ctl = RunControl::new(cancel.clone(), Box::new(move |s, _| done.store(s, Ordering::Relaxed)));
            (spec.clone(), ctl)
        })
        .collect();
    let n = work.len();
    let mut run = tokio::task::spawn_blocking(move || {
        crate::executor::priority::lower_this_thread();
        executor.generate_batch(&work)
    });
    let result = tokio::select! {
        result = &mut run => Some(result),
        _ = tokio::time::sleep(app.settings.job_timeout()) => None,
    };
    reporter.abort();
    let Some(result) = result else {
        // Attempts already stopped (no longer current) are not reported.
        let current: Vec<&JobSpec> =
            started.iter().filter(|(_, cancel)| !cancel.swap(true, Ordering::Relaxed)).map(|(spec, _)| spec).collect();
        let error = format!("execution timed out after {} ms", app.settings.job_timeout_ms);
        let reports = current.into_iter().map(|spec| {
            let outcome = Outcome::Failed { error: error.clone(), retryable: false };
            complete(app, spec.id, spec.attempt, outcome, format!("failed: {error}"))
        });
        futures_util::future::join_all(reports).await;
        // The slots are free in the cluster's state; this lane is not until
        // the run has returned (see the module docs).
        let _ = run.await;
        tracing::info!("a timed-out run stopped {} ms after it began", started_at.elapsed().as_millis());
        return;
    };
    let outcomes: Vec<Result<JobOutput, ExecError>> = match result {
        Ok(v) if v.len() == n => v,
        Ok(v) => (0..n)
            .map(|_| Err(ExecError::Failed(format!("executor returned {} results for {n} jobs", v.len()))))
            .collect(),
        Err(join) => (0..n).map(|_| Err(ExecError::Failed(format!("executor crashed: {join}")))).collect(),
    };
    app.metrics.images_generated(outcomes.iter().filter(|o| o.is_ok()).count() as u64);
    let elapsed_ms = started_at.elapsed().as_millis();
    let reports = started.iter().zip(outcomes).filter_map(|((spec, cancel), result)| {
        let (id, attempt) = (spec.id, spec.attempt);
        let (outcome, how) = match result {
            Ok(out) => {
                let how = format!("succeeded in {elapsed_ms} ms (batch of {n})");
                return Some(Box::pin(succeed(app, id, attempt, cancel.clone(), out, how))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>);
            }
            Err(ExecError::Cancelled) => {
                tracing::info!(job_id = %id, attempt, "stopped: no longer current");
                return None;
            }
            Err(ExecError::Unavailable(error)) => {
                let how =
                    format!("could not run the model in {elapsed_ms} ms (queued again, attempt not counted): {error}");
                (Outcome::Unavailable { error }, how)
            }
            Err(e) => {
                let retryable = e.is_retryable();
                let how = format!("failed{} in {elapsed_ms} ms: {e}", if retryable { " (retryable)" } else { "" });
                (Outcome::Failed { error: e.to_string(), retryable }, how)
            }
        };
        Some(Box::pin(complete(app, id, attempt, outcome, how)))
    });
    futures_util::future::join_all(reports).await;
}

/// Makes a successful run's PNG durable, then reports it (or reports a
/// retryable failure when its copies could not be made durable). An attempt
/// that stopped being current meanwhile is not reported: its copies are
/// orphans, which the janitor deletes.
async fn succeed(app: &App, id: JobId, attempt: u32, cancel: Arc<AtomicBool>, out: JobOutput, how: String) {
    let committed = app.results.commit(app, id, attempt, out.png).await;
    if cancel.load(Ordering::Relaxed) {
        tracing::info!(job_id = %id, attempt, "stored, but no longer current: not reported");
        return;
    }
    let outcome = match committed {
        Ok(result) => Outcome::Succeeded { result, model_hash: out.model_hash, notes: out.notes },
        Err(e) => {
            let error = format!("the result could not be stored: {e}");
            tracing::warn!(job_id = %id, attempt, "{error}");
            return complete(app, id, attempt, Outcome::Failed { error, retryable: true }, "failed".into()).await;
        }
    };
    complete(app, id, attempt, outcome, how).await
}

/// Reports the outcome of one attempt (`how` says it in the log).
async fn complete(app: &App, id: JobId, attempt: u32, outcome: Outcome, how: String) {
    let cmd = Command::Complete { job: id, node: app.id, attempt, outcome };
    match app.write(cmd, app.settings.report_timeout()).await {
        Ok(Response::Ok) => tracing::info!(job_id = %id, attempt, "{how}"),
        Ok(other) => tracing::info!(job_id = %id, attempt, "completion not accepted: {other:?}"),
        Err(e) => tracing::warn!(job_id = %id, attempt, "could not report completion: {e}"),
    }
}

/// Reads the executor's model folders again (`SIGHUP`, `POST
/// /v1/models/rescan`); the registration loop advertises the result within
/// half a second. One rescan at a time (validation reads every header).
pub async fn rescan_models(app: &Arc<App>) -> anyhow::Result<crate::executor::Rescan> {
    static RUNNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = RUNNING.lock().await;
    let executor = app.executor.clone();
    let r = tokio::task::spawn_blocking(move || executor.rescan()).await??;
    tracing::info!(
        "model rescan: serving {:?}, refused {:?}, added {:?}, removed {:?}",
        r.served,
        r.refused.iter().map(|r| &r.name).collect::<Vec<_>>(),
        r.added,
        r.removed
    );
    Ok(r)
}

/// Rescans the model folders on each `SIGHUP`.
pub async fn rescan_on_sighup(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no SIGHUP handler (model rescans only through the API): {e}");
            return;
        }
    };
    let mut shutdown = app.shutdown.clone();
    loop {
        tokio::select! {
            Some(()) = hup.recv() => {
                if let Err(e) = rescan_models(&app).await {
                    tracing::warn!("model rescan on SIGHUP: {}", crate::models::errors::one_line(&e));
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Keeps this node's registration (slots, models) in the replicated state.
pub async fn register(app: Arc<App>) {
    let mut shutdown = app.shutdown.clone();
    // A node that drained on its last stop (see `drain`) takes jobs again once
    // it is back; checked once, at the first registration seen, so a later
    // `leave` (which drains the node on purpose) is left alone.
    let mut startup_checked = false;
    loop {
        let info = NodeRegistration {
            slots: app.settings.slots,
            models: app.executor.models(),
            loaded_models: app.executor.loaded_models(),
            executor: app.executor.name().to_string(),
            refused_models: app.executor.refused_models(),
        };
        let member = app.is_member();
        let current = app.view.read().jobs.nodes().get(&app.id).map(|n| n.registration.clone());
        let draining = app.view.read().jobs.nodes().get(&app.id).map(|n| n.draining);
        if member && app.leader().is_some() && !startup_checked && !*app.shutdown.borrow() {
            if let Some(draining) = draining {
                startup_checked = true;
                if draining {
                    let cmd = Command::SetDraining { node: app.id, draining: false };
                    match app.write(cmd, Duration::from_secs(5)).await {
                        Ok(_) => tracing::info!("resumed: taking jobs again after the last stop's drain"),
                        Err(e) => {
                            startup_checked = false;
                            tracing::debug!("clearing the drain mark: {e}");
                        }
                    }
                }
            }
        }
        if member && app.leader().is_some() && current.as_ref() != Some(&info) {
            let cmd = Command::RegisterNode { node: app.id, info };
            if let Err(e) = app.write(cmd, Duration::from_secs(5)).await {
                tracing::debug!("registration: {e}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
