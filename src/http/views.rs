//! JSON shapes of the public API (the replicated types stay wire-agnostic).

use raftgen_raft::job::{Event, EventKind, Job};
use serde_json::{json, Value};

pub fn job_json(job: &Job) -> Value {
    let r = &job.request;
    json!({
        "id": job.id.to_string(),
        "state": job.state.as_str(),
        "request": {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "seed": r.seed,
            "model": r.model,
            "priority": r.priority,
            "sampler": r.sampler,
            "cache": r.cache,
        },
        "seed": job.seed,
        "idempotency_key": job.idempotency_key,
        "node": job.node,
        "attempt": job.attempt,
        "progress": { "step": job.progress.step, "steps": job.progress.steps },
        "error": job.error,
        "model_hash": job.model_hash,
        "notes": job.notes,
        "submitted_at_ms": job.submitted_at_ms,
        "assigned_at_ms": job.assigned_at_ms,
        "started_at_ms": job.started_at_ms,
        "finished_at_ms": job.finished_at_ms,
        "result": job.result_bytes.map(|bytes| json!({
            "bytes": bytes,
            "evicted": job.result_evicted,
            "url": format!("/v1/jobs/{}/image", job.id),
        })),
        "history": job.history.iter().map(event_json).collect::<Vec<_>>(),
        "webhook": webhook_json(job),
    })
}

/// The webhook's URL and delivery record (`null` for a job without one).
fn webhook_json(job: &Job) -> Value {
    let (Some(url), Some(w)) = (&job.request.webhook, &job.webhook) else { return Value::Null };
    json!({
        "url": url,
        "delivered": w.delivered,
        "gave_up": w.gave_up,
        "deliveries": w.deliveries.iter().map(|d| json!({
            "attempt": d.attempt,
            "at_ms": d.at_ms,
            "node": d.node,
            "status": d.status,
            "error": d.error,
            "took_ms": d.took_ms,
        })).collect::<Vec<_>>(),
    })
}

fn event_json(e: &Event) -> Value {
    let mut v = match &e.kind {
        EventKind::Submitted | EventKind::Cancelled | EventKind::ResultEvicted => json!({}),
        EventKind::Assigned { node, attempt }
        | EventKind::Started { node, attempt }
        | EventKind::Succeeded { node, attempt } => json!({ "node": node, "attempt": attempt }),
        EventKind::Requeued { node, attempt, reason } | EventKind::CompletionRejected { node, attempt, reason } => {
            json!({ "node": node, "attempt": attempt, "reason": reason })
        }
        EventKind::Failed { node, attempt, error } => json!({ "node": node, "attempt": attempt, "error": error }),
        EventKind::AttemptFailed { node, attempt, error } => {
            json!({ "node": node, "attempt": attempt, "error": error })
        }
        EventKind::CacheHit { source } => json!({ "source": source.to_string() }),
    };
    v["event"] = json!(e.kind.name());
    v["at_ms"] = json!(e.at_ms);
    v
}
