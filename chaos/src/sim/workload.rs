//! The simulated clients: each submits its share of the jobs to random nodes
//! (with an idempotency key, retrying a submission whose outcome is unknown
//! under the same key, a bounded number of times), polls jobs on random nodes
//! and cancels some, recording every operation with its invocation and
//! completion time, as the process runner's clients do over HTTP.

use std::sync::Arc;
use std::time::Duration;

use raftgen_raft::job::{JobId, JobRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::network::{self, node_addr, Call, CallError, ClientOp, ClientReply};
use super::node::MODEL;
use super::world::{now_ms, Shared};
use crate::history::{Outcome, Record};

/// Tries of one submission (the first and the retries), at most.
pub const MAX_SUBMIT_TRIES: usize = 3;
/// A client's deadline for one call. Shorter than a node's own submit
/// timeout on purpose: a client that gives up retries elsewhere while the
/// first node may still commit its try, which is what idempotency keys are
/// for (and some submissions end with an unknown outcome).
pub const CLIENT_TIMEOUT_MS: u64 = 1_500;
/// Pause between a client's operations, uniform in this range.
const THINK_MIN_MS: u64 = 20;
const THINK_MAX_MS: u64 = 300;
/// Pause before retrying a submission, uniform in this range.
const RETRY_MIN_MS: u64 = 50;
const RETRY_MAX_MS: u64 = 400;
/// Chances, per thousand, that a client polls or cancels between submissions.
const POLL_PER_MILLE: u32 = 500;
const CANCEL_PER_MILLE: u32 = 80;
/// Polls of known jobs each client makes once its submissions are done.
const FINAL_POLLS: usize = 5;

/// One client: `jobs` submissions, with polls and cancels in between.
pub async fn client(shared: Arc<Shared>, client: u32, jobs: usize) -> turmoil::Result {
    // Each client has its own stream, so the workload does not depend on how
    // the nodes' draws interleave with it.
    let mut rng = StdRng::seed_from_u64(shared.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(client as u64 + 1)));
    let mut known: Vec<JobId> = Vec::new();
    for k in 0..jobs {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(THINK_MIN_MS..=THINK_MAX_MS))).await;
        if let Some(job) = submit(&shared, &mut rng, client, k).await {
            known.push(job);
        }
        if !known.is_empty() && rng.gen_range(0..1000) < POLL_PER_MILLE {
            let job = known[rng.gen_range(0..known.len())];
            poll(&shared, &mut rng, client, job).await;
        }
        if !known.is_empty() && rng.gen_range(0..1000) < CANCEL_PER_MILLE {
            let job = known[rng.gen_range(0..known.len())];
            cancel(&shared, &mut rng, client, job).await;
        }
    }
    for _ in 0..FINAL_POLLS.min(known.len()) {
        let job = known[rng.gen_range(0..known.len())];
        poll(&shared, &mut rng, client, job).await;
    }
    Ok(())
}

fn random_node(shared: &Shared, rng: &mut StdRng) -> u64 {
    shared.members[rng.gen_range(0..shared.members.len())]
}

async fn call(node: u64, op: ClientOp) -> Result<ClientReply, CallError> {
    network::call(&node_addr(node), &Call::Client(op), Duration::from_millis(CLIENT_TIMEOUT_MS)).await
}

async fn submit(shared: &Shared, rng: &mut StdRng, client: u32, k: usize) -> Option<JobId> {
    let key = format!("c{client}-j{k}");
    let request = JobRequest {
        prompt: format!("simulated job {key}"),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 4,
        guidance: 7.5,
        seed: None,
        model: MODEL.into(),
        priority: rng.gen_range(-1..=1),
        sampler: None,
        cache: true,
        webhook: None,
    };
    let invoke_ms = now_ms();
    let mut nodes = Vec::new();
    let mut outcome = Outcome::Info { error: "never sent".into() };
    let mut job = None;
    for try_no in 0..MAX_SUBMIT_TRIES {
        if try_no > 0 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(RETRY_MIN_MS..=RETRY_MAX_MS))).await;
        }
        let node = random_node(shared, rng);
        nodes.push(node);
        match call(node, ClientOp::Submit { key: key.clone(), request: request.clone() }).await {
            Ok(ClientReply::Submitted { job: id, .. }) => {
                outcome = Outcome::Ok;
                job = Some(id);
                break;
            }
            Ok(ClientReply::Rejected(error)) => {
                outcome = Outcome::Fail { error };
                break;
            }
            Ok(ClientReply::Unavailable(error)) => outcome = Outcome::Info { error },
            Ok(other) => outcome = Outcome::Info { error: format!("unexpected reply {other:?}") },
            Err(e) => outcome = Outcome::Info { error: e.to_string() },
        }
    }
    shared.record(Record::Submit {
        client,
        key,
        nodes,
        invoke_ms,
        complete_ms: now_ms(),
        outcome,
        job: job.map(|j| j.to_string()),
    });
    job
}

async fn poll(shared: &Shared, rng: &mut StdRng, client: u32, job: JobId) {
    let node = random_node(shared, rng);
    let invoke_ms = now_ms();
    let (state, attempt) = match call(node, ClientOp::Poll { job }).await {
        Ok(ClientReply::Job { state: Some((state, attempt)) }) => (Some(state), Some(attempt)),
        _ => (None, None),
    };
    shared.record(Record::Poll {
        client,
        job: job.to_string(),
        node,
        invoke_ms,
        complete_ms: now_ms(),
        state,
        attempt,
    });
}

async fn cancel(shared: &Shared, rng: &mut StdRng, client: u32, job: JobId) {
    let node = random_node(shared, rng);
    let invoke_ms = now_ms();
    let outcome = match call(node, ClientOp::Cancel { job }).await {
        Ok(ClientReply::Cancelled) => Outcome::Ok,
        Ok(ClientReply::Rejected(error)) => Outcome::Fail { error },
        Ok(ClientReply::Unavailable(error)) => Outcome::Info { error },
        Ok(other) => Outcome::Info { error: format!("unexpected reply {other:?}") },
        Err(e) => Outcome::Info { error: e.to_string() },
    };
    shared.record(Record::Cancel { client, job: job.to_string(), node, invoke_ms, complete_ms: now_ms(), outcome });
}
