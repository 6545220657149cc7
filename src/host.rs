//! The executor host: runs the jobs the leader assigned to this node.
//!
//! It watches the applied state for attempts assigned to this node, starts each
//! one (a `Start` command), runs the executor on a blocking thread, and reports
//! the outcome (a `Complete` command carrying the PNG and the attempt number).
//! If the attempt stops being current (cancelled, or re-queued because the
//! leader lost contact), the run is told to stop and its late report, if any,
//! is rejected by the state machine's fencing. After a restart, attempts still
//! assigned to this node are simply run again under the same attempt number.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftgen_raft::command::{NodeRegistration, Outcome};
use raftgen_raft::job::JobId;
use raftgen_raft::{Command, Response};

use crate::app::App;
use crate::executor::{ExecError, JobSpec, RunControl};

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
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(JobId, u32)>();
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
        for (id, attempt) in mine {
            if running.contains_key(&id)
                || finished.contains(&(id, attempt))
                || running.len() >= app.settings.slots as usize
            {
                continue;
            }
            let spec = {
                let data = app.view.read();
                let Some(j) = data.jobs.job(&id) else { continue };
                JobSpec { id, attempt, request: j.request.clone(), seed: j.seed }
            };
            let cancel = Arc::new(AtomicBool::new(false));
            running.insert(spec.id, Running { attempt: spec.attempt, cancel: cancel.clone() });
            let (app, done) = (app.clone(), done_tx.clone());
            tokio::spawn(async move {
                let (id, attempt) = (spec.id, spec.attempt);
                execute(&app, spec, cancel).await;
                let _ = done.send((id, attempt));
            });
        }
        tokio::select! {
            _ = applied.changed() => {}
            Some((id, attempt)) = done_rx.recv() => {
                if running.get(&id).is_some_and(|r| r.attempt == attempt) {
                    running.remove(&id);
                }
                finished.insert((id, attempt));
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

async fn execute(app: &Arc<App>, spec: JobSpec, cancel: Arc<AtomicBool>) {
    let (id, attempt, node) = (spec.id, spec.attempt, app.id);
    let timeout = app.settings.report_timeout();
    match app.write(Command::Start { job: id, node, attempt }, timeout).await {
        Ok(Response::Ok) => {}
        Ok(other) => {
            tracing::info!("job {id} attempt {attempt} not started: {other:?}");
            return;
        }
        Err(e) => {
            tracing::warn!("job {id} attempt {attempt}: could not record the start: {e}");
            return;
        }
    }
    // Progress flows from the blocking run to a task that reports at most once a second.
    let step = Arc::new(AtomicU32::new(0));
    let reporter = {
        let (app, step, cancel) = (app.clone(), step.clone(), cancel.clone());
        let steps = spec.request.steps;
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(PROGRESS_INTERVAL_MS)).await;
                let now = step.load(Ordering::Relaxed);
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                if now != last && now < steps {
                    last = now;
                    let cmd = Command::Progress { job: id, node, attempt, step: now, steps };
                    let _ = app.write(cmd, Duration::from_millis(PROGRESS_INTERVAL_MS)).await;
                }
            }
        })
    };
    let executor = app.executor.clone();
    let started = Instant::now();
    let ctl_cancel = cancel.clone();
    let result = tokio::task::spawn_blocking(move || {
        let ctl = RunControl::new(ctl_cancel, Box::new(move |s, _| step.store(s, Ordering::Relaxed)));
        executor.generate(&spec, &ctl)
    })
    .await;
    reporter.abort();
    let outcome = match result {
        Ok(Ok(png)) => Outcome::Succeeded { png },
        Ok(Err(ExecError::Cancelled)) => {
            tracing::info!("job {id} attempt {attempt} stopped: no longer current");
            return;
        }
        Ok(Err(ExecError::Failed(error))) => Outcome::Failed { error },
        Err(join) => Outcome::Failed { error: format!("executor crashed: {join}") },
    };
    let ok = matches!(outcome, Outcome::Succeeded { .. });
    match app.write(Command::Complete { job: id, node, attempt, outcome }, timeout).await {
        Ok(Response::Ok) => tracing::info!(
            "job {id} attempt {attempt} {} in {} ms",
            if ok { "succeeded" } else { "failed" },
            started.elapsed().as_millis()
        ),
        Ok(other) => tracing::info!("job {id} attempt {attempt}: completion not accepted: {other:?}"),
        Err(e) => tracing::warn!("job {id} attempt {attempt}: could not report completion: {e}"),
    }
}

/// Keeps this node's registration (slots, models) in the replicated state.
pub async fn register(app: Arc<App>) {
    let mut shutdown = app.shutdown.clone();
    loop {
        let info = NodeRegistration {
            slots: app.settings.slots,
            models: app.executor.models(),
            loaded_models: app.executor.loaded_models(),
            executor: app.executor.name().to_string(),
        };
        let member = app.is_member();
        let current = app.view.read().jobs.nodes().get(&app.id).map(|n| n.registration.clone());
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
