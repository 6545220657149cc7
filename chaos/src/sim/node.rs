//! One simulated raftgen node: real openraft and the real state machine on the
//! simulated storage and network, with the node's duties as production runs
//! them (`src/node/mod.rs`, `src/node/app.rs`, `src/node/scheduler.rs`, `src/node/host.rs`):
//!
//! - the write path: propose on the leader (stamping the leader's clock and a
//!   seed), or forward to the leader, retrying across leader changes until a
//!   deadline;
//! - the scheduler loop: on the leader, the real `schedule::plan` on the
//!   applied state and the health clock (last answer to a Raft call within
//!   `node_timeout_ms`; a new leader resets every clock), proposing `Requeue`
//!   and `Assign`, and `Configure` on new leadership;
//! - the executor host: runs the attempts assigned to this node (`Start`, a
//!   simulated run, `Complete`), failing some on purpose; a result is synced
//!   on this node and pushed to `result_copies - 1` others (each syncs it
//!   before answering) before `Complete` is proposed, as in
//!   `src/node/results/`;
//! - result reads (local copy, else a holder, checked against the hash),
//!   the janitor (deletes what no retained result keeps here, reports lost
//!   copies), and on the leader the lost-node marks and the repair plan
//!   (`raftgen_raft::repair`, the real pure functions);
//! - registration of the node's executor, and the server for Raft calls,
//!   forwarded writes and client operations.
//!
//! What is simplified: one command per proposal and per forward (production
//! batches them), no membership changes (the members are fixed), and no
//! election guard while a snapshot is received (snapshots here are one small
//! chunk). Every loop waits on simulated time or an event: a loop that spun
//! would stop the simulated clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use std::cell::RefCell;
use std::rc::Rc;

use raftgen_raft::command::{ModelInfo, NodeRegistration, Outcome};
use raftgen_raft::job::JobId;
use raftgen_raft::placement::rank;
use raftgen_raft::repair::{self, Repair};
use raftgen_raft::result::{Location, ResultHash, ResultMeta};
use raftgen_raft::schedule::plan;
use raftgen_raft::{codec, Command, Request, Response};
use rand::Rng;
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use turmoil::net::{TcpListener, TcpStream};

use super::network::{
    self, encode_reply, node_addr, read_frame, write_frame, Call, ClientOp, ClientReply, ForwardReject, Forwarded,
    Network, PeerHealth, PORT,
};
use super::runtime::{self, SimRaft, SimRng};
use super::store::Store;
use super::world::{now_ms, NodeHandle, Shared};
use crate::history::Record;

/// The one model every simulated executor serves.
pub const MODEL: &str = "sim-model";
/// Most assignments proposed in one entry (production's `MAX_ASSIGN_PER_ENTRY`).
const MAX_ASSIGN_PER_ENTRY: usize = 256;
/// Longest a server waits for a call's bytes on an accepted connection.
const SERVE_READ_TIMEOUT_MS: u64 = 2_000;
/// How often a running job checks that its attempt is still current.
const RUN_CHECK_MS: u64 = 20;
/// First and largest pause between two tries of a write.
const WRITE_RETRY_MIN_MS: u64 = 5;
const WRITE_RETRY_MAX_MS: u64 = 100;
/// How often a waiting write checks whether the leader changed.
const LEADER_POLL_MS: u64 = 5;
/// How long a registration write is retried.
const REGISTER_TIMEOUT_MS: u64 = 5_000;

pub struct Node {
    pub id: u64,
    raft: SimRaft,
    store: Store,
    health: PeerHealth,
    shared: Arc<Shared>,
}

/// The host software of node `id`: what a node process does from start to
/// crash. Runs until the simulation crashes it.
pub async fn run(shared: Arc<Shared>, id: u64) -> turmoil::Result {
    shared.record(Record::NodeStart { at_ms: now_ms(), node: id });
    let store = Store::open(shared.disk(id), shared.counters.clone())
        .map_err(|e| format!("node {id}: opening storage: {e}"))?;
    let health = PeerHealth::default();
    let network = Network { id, health: health.clone(), counters: shared.counters.clone() };
    let config = Arc::new(shared.params.raft_config().validate()?);
    let raft = SimRaft::new(id, config, network, store.clone(), store.clone()).await?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).await?;
    shared.set_running(id, NodeHandle { raft: raft.clone(), store: store.clone() });
    let node = Arc::new(Node { id, raft, store, health, shared: shared.clone() });

    if id == shared.members[0] && !node.raft.is_initialized().await? {
        let members: BTreeMap<u64, BasicNode> =
            shared.voters.iter().map(|m| (*m, BasicNode { addr: node_addr(*m) })).collect();
        if let Err(e) = node.raft.initialize(members).await {
            tracing::debug!("node {id}: initialize: {e}");
        }
    }
    tokio::task::spawn_local(scheduler(node.clone()));
    tokio::task::spawn_local(executor(node.clone()));
    tokio::task::spawn_local(register(node.clone()));
    tokio::task::spawn_local(janitor(node.clone()));
    if shared.voters.len() < shared.members.len() && shared.voters.contains(&id) {
        tokio::task::spawn_local(add_learners(node.clone()));
    }
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::task::spawn_local(serve(node.clone(), stream));
    }
}

/// Answers one call on an accepted connection.
async fn serve(node: Arc<Node>, mut stream: TcpStream) {
    let read = tokio::time::timeout(Duration::from_millis(SERVE_READ_TIMEOUT_MS), read_frame(&mut stream)).await;
    let Ok(Ok(bytes)) = read else { return };
    let Ok(call) = codec::decode::<Call>(&bytes) else { return };
    let to_node = !matches!(call, Call::Client(_));
    let reply = match call {
        Call::Append(rpc) => encode_reply(&node.raft.append_entries(rpc).await),
        Call::Vote(rpc) => encode_reply(&node.raft.vote(rpc).await),
        Call::Snapshot(rpc) => encode_reply(&node.raft.install_snapshot(rpc).await),
        Call::Forward(cmd) => encode_reply(&node.propose_local(cmd).await),
        Call::Client(op) => encode_reply(&node.client(op).await),
        Call::PushResult { sha, bytes } => encode_reply(&node.receive(sha, bytes).await),
        Call::FetchResult { sha } => encode_reply(&node.store.get_blob(&sha).map(ByteBuf::from)),
        Call::CopyFrom { sha, from } => encode_reply(&node.copy_from(sha, from).await),
    };
    if to_node {
        node.shared.counters.sent(node.id, reply.len() as u64 + 4);
    }
    let _ = write_frame(&mut stream, &reply).await;
}

impl Node {
    fn params(&self) -> &super::world::Params {
        &self.shared.params
    }

    /// Proposes on this node, which must lead. The leader's clock and random
    /// choices enter the log here, never inside `apply` (as in production).
    async fn propose_local(&self, mut cmd: Command) -> Forwarded {
        let leader = self.leader();
        if leader != Some(self.id) {
            return Err(ForwardReject::NotLeader { leader });
        }
        if let Command::Submit { seed, request, .. } = &mut cmd {
            if seed.is_none() {
                *seed = Some(request.seed.unwrap_or_else(|| SimRng.gen()));
            }
        }
        let request = Request { at_ms: now_ms(), cmd };
        let timeout = Duration::from_millis(self.params().propose_timeout_ms);
        match tokio::time::timeout(timeout, self.raft.client_write(request)).await {
            Err(_) => Err(ForwardReject::Fatal(format!("not committed within {} ms", timeout.as_millis()))),
            Ok(Ok(written)) => Ok(written.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ForwardReject::NotLeader { leader: f.leader_id })
            }
            Ok(Err(e)) => Err(ForwardReject::Fatal(e.to_string())),
        }
    }

    /// Commits `cmd` through whichever node leads, retrying across leader
    /// changes until `timeout_ms` has passed (production's `App::write`).
    async fn write(&self, cmd: Command, timeout_ms: u64) -> Result<Response, String> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut delay = Duration::from_millis(WRITE_RETRY_MIN_MS);
        loop {
            let leader = self.leader();
            let answer = tokio::select! {
                biased;
                a = self.try_once(leader, &cmd, deadline) => a,
                _ = self.leader_changed(leader) => None,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            if let Some(response) = answer {
                return Ok(response);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no leader committed the write within {timeout_ms} ms"));
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(WRITE_RETRY_MAX_MS));
        }
    }

    async fn try_once(&self, leader: Option<u64>, cmd: &Command, deadline: Instant) -> Option<Response> {
        match leader {
            None => None,
            Some(id) if id == self.id => self.propose_local(cmd.clone()).await.ok(),
            Some(id) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = left.min(Duration::from_millis(self.params().forward_timeout_ms));
                let sent = |n| self.shared.counters.sent(self.id, n);
                let call = Call::Forward(cmd.clone());
                match network::call_counted::<Forwarded>(&node_addr(id), &call, timeout, sent).await {
                    Ok(Ok(response)) => Some(response),
                    Ok(Err(reject)) => {
                        tracing::debug!("node {}: leader {id} did not take the write: {reject:?}", self.id);
                        None
                    }
                    Err(e) => {
                        tracing::debug!("node {}: forwarding to leader {id}: {e}", self.id);
                        None
                    }
                }
            }
        }
    }

    /// A client's operation, as production's HTTP API answers it.
    async fn client(&self, op: ClientOp) -> ClientReply {
        let timeout_ms = self.params().submit_timeout_ms;
        match op {
            ClientOp::Submit { key, request } => {
                // 128 random bits chosen by the receiving node, as in production.
                let id = JobId(SimRng.gen());
                let cmd = Command::Submit { id, request, seed: None, idempotency_key: Some(key) };
                match self.write(cmd, timeout_ms).await {
                    Ok(Response::Submitted { job, created }) => ClientReply::Submitted { job: job.id, created },
                    Ok(Response::Rejected(r)) => ClientReply::Rejected(r.to_string()),
                    Ok(other) => ClientReply::Unavailable(format!("unexpected answer {other:?}")),
                    Err(e) => ClientReply::Unavailable(e),
                }
            }
            ClientOp::Poll { job } => {
                let sm = self.store.read();
                ClientReply::Job { state: sm.jobs.job(&job).map(|j| (j.state.as_str().to_string(), j.attempt)) }
            }
            ClientOp::ReadImage { job } => ClientReply::Image(self.read_image(job).await),
            ClientOp::Cancel { job } => match self.write(Command::Cancel { job }, timeout_ms).await {
                Ok(Response::Ok) => ClientReply::Cancelled,
                Ok(Response::Rejected(r)) => ClientReply::Rejected(r.to_string()),
                Ok(other) => ClientReply::Unavailable(format!("unexpected answer {other:?}")),
                Err(e) => ClientReply::Unavailable(e),
            },
        }
    }

    fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Every member, voters and learners.
    fn members(&self) -> BTreeSet<u64> {
        self.raft.metrics().borrow().membership_config.membership().nodes().map(|(id, _)| *id).collect()
    }

    /// A copy pushed to this node: checked, then synced before the answer.
    async fn receive(&self, sha: ResultHash, bytes: Vec<u8>) -> Result<(), String> {
        if ResultHash::of(&bytes) != sha {
            return Err("the bytes do not hash to the name".into());
        }
        self.store.put_blob(sha, bytes, now_ms(), true).await;
        Ok(())
    }

    /// One holder's copy of `sha`, checked against it.
    async fn fetch(&self, from: u64, sha: ResultHash) -> Result<Vec<u8>, String> {
        let timeout = Duration::from_millis(self.params().forward_timeout_ms);
        let sent = |n| self.shared.counters.sent(self.id, n);
        match network::call_counted::<Option<ByteBuf>>(&node_addr(from), &Call::FetchResult { sha }, timeout, sent)
            .await
        {
            Ok(Some(b)) if ResultHash::of(&b) == sha => Ok(b.into_vec()),
            Ok(Some(_)) => Err(format!("node {from}: its copy does not match the hash")),
            Ok(None) => Err(format!("node {from} has no copy")),
            Err(e) => Err(format!("node {from}: {e}")),
        }
    }

    /// The leader's repair: fetch `sha` from `from`, sync it here.
    async fn copy_from(&self, sha: ResultHash, from: u64) -> Result<(), String> {
        let bytes = match self.store.get_blob(&sha) {
            Some(b) if ResultHash::of(&b) == sha => b,
            _ => self.fetch(from, sha).await?,
        };
        self.store.put_blob(sha, bytes, now_ms(), true).await;
        Ok(())
    }

    /// Reads a job's kept image through this node, as `GET
    /// /v1/jobs/{id}/image` does: the local copy, else a holder (best first),
    /// checked against the hash. Answers the sha256 (hex) of the bytes.
    async fn read_image(&self, job: JobId) -> Result<String, String> {
        let (sha, holders) = {
            let sm = self.store.read();
            let (sha, location) = sm.jobs.image(&job).ok_or("the job keeps no image")?;
            (sha, location.nodes().cloned().unwrap_or_default())
        };
        if let Some(b) = self.store.get_blob(&sha) {
            if ResultHash::of(&b) == sha {
                return Ok(sha.to_string());
            }
        }
        let members = self.members();
        let mut errors = Vec::new();
        for from in rank(&sha, holders.into_iter().filter(|n| *n != self.id && members.contains(n))) {
            match self.fetch(from, sha).await {
                Ok(_) => return Ok(sha.to_string()),
                Err(e) => errors.push(e),
            }
        }
        Err(format!("unavailable: no holder answered ({})", errors.join("; ")))
    }

    /// Makes the image durable here and on enough other nodes (production's
    /// `Results::commit`), while the attempt stays current; the holders.
    async fn commit(&self, job: JobId, attempt: u32, sha: ResultHash, png: Vec<u8>) -> Option<BTreeSet<u64>> {
        self.store.put_blob(sha, png.clone(), now_ms(), true).await;
        let deadline = Instant::now() + Duration::from_millis(self.params().report_timeout_ms);
        let mut holders = BTreeSet::from([self.id]);
        loop {
            let members = self.members();
            let (targets, required) = repair::push_targets(&self.store.read().jobs, &members, self.id, &sha);
            for to in targets {
                if holders.len() >= required {
                    break;
                }
                if holders.contains(&to) {
                    continue;
                }
                let timeout = Duration::from_millis(self.params().forward_timeout_ms);
                let sent = |n| self.shared.counters.sent(self.id, n);
                let call = Call::PushResult { sha, bytes: png.clone() };
                if let Ok(Ok(())) =
                    network::call_counted::<Result<(), String>>(&node_addr(to), &call, timeout, sent).await
                {
                    holders.insert(to);
                }
            }
            if holders.len() >= required {
                return Some(holders);
            }
            if Instant::now() >= deadline || !self.is_current(&job, attempt) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(WRITE_RETRY_MAX_MS)).await;
        }
    }

    /// The planted bug: names the holders at once, writes the local copy
    /// without syncing it and pushes the copies only `unsafe_delay_ms` later.
    fn unsafe_commit(node: &Arc<Node>, sha: ResultHash, png: Vec<u8>) -> BTreeSet<u64> {
        let (targets, required) = repair::push_targets(&node.store.read().jobs, &node.members(), node.id, &sha);
        let targets: Vec<u64> = targets.into_iter().take(required.saturating_sub(1)).collect();
        let holders = std::iter::once(node.id).chain(targets.iter().copied()).collect();
        let n = node.clone();
        tokio::task::spawn_local(async move {
            n.store.put_blob(sha, png.clone(), now_ms(), false).await;
            tokio::time::sleep(Duration::from_millis(n.params().unsafe_delay_ms)).await;
            for to in targets {
                let call = Call::PushResult { sha, bytes: png.clone() };
                let timeout = Duration::from_millis(n.params().forward_timeout_ms);
                let _ = network::call::<Result<(), String>>(&node_addr(to), &call, timeout).await;
            }
        });
        holders
    }

    /// Resolves when the known leader is no longer `leader`. It polls the
    /// metrics on the simulated clock instead of waiting on openraft's watch
    /// channel, whose waiters tokio wakes in a random order (see
    /// `store::Applied`).
    async fn leader_changed(&self, leader: Option<u64>) {
        loop {
            tokio::time::sleep(Duration::from_millis(LEADER_POLL_MS)).await;
            if self.leader() != leader {
                return;
            }
        }
    }

    /// Whether `attempt` of `job` is still this node's current attempt.
    fn is_current(&self, job: &JobId, attempt: u32) -> bool {
        let sm = self.store.read();
        sm.jobs.job(job).is_some_and(|j| j.state.is_active() && j.node == Some(self.id) && j.attempt == attempt)
    }
}

/// The leader's scheduler (production's `scheduler::run`).
async fn scheduler(node: Arc<Node>) {
    let params = node.params().clone();
    let tick = Duration::from_millis(params.scheduler_tick_ms);
    let node_timeout = Duration::from_millis(params.node_timeout_ms);
    let applied = node.store.subscribe();
    let mut led_term: Option<u64> = None;
    let mut last_repair = Instant::now();
    let copying: Rc<RefCell<BTreeSet<ResultHash>>> = Rc::default();
    loop {
        tokio::select! {
            biased;
            _ = applied.changed() => {}
            _ = tokio::time::sleep(tick) => {}
        }
        let (leader, term, members) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            let members: BTreeSet<u64> = m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
            (m.current_leader, m.current_term, members)
        };
        if leader != Some(node.id) {
            led_term = None;
            continue;
        }
        if led_term != Some(term) {
            // New leadership: every node gets a full timeout from now.
            node.health.reset_all(members.iter().copied());
            led_term = Some(term);
            if node.store.read().jobs.config() != &params.cluster {
                if let Err(e) = node.propose_local(Command::Configure(params.cluster)).await {
                    tracing::debug!("node {}: configure: {e:?}", node.id);
                }
            }
        }
        let healthy = |n: u64| {
            n == node.id
                || (members.contains(&n) && node.health.last_ack(n).is_some_and(|t| t.elapsed() < node_timeout))
        };
        // Production's rule: a member never heard from yet is not judged.
        let marks = repair::liveness(
            &node.store.read().jobs,
            &members,
            node.id,
            |n| node.health.last_ack(n).is_some_and(|t| t.elapsed() >= node_timeout),
            |n| node.health.last_answer(n).is_some_and(|t| t.elapsed() < node_timeout),
        );
        for (n, lost) in marks {
            if let Err(e) = node.propose_local(Command::SetLost { node: n, lost }).await {
                tracing::debug!("node {}: marking {n}: {e:?}", node.id);
            }
        }
        if last_repair.elapsed() >= Duration::from_millis(params.repair_tick_ms) {
            last_repair = Instant::now();
            repair_step(&node, &members, &healthy, &copying).await;
        }
        let decision = plan(&node.store.read().jobs, healthy, MAX_ASSIGN_PER_ENTRY);
        if !decision.requeue.is_empty() {
            let cmd = Command::Requeue { jobs: decision.requeue, reason: "node stopped answering".into() };
            if let Err(e) = node.propose_local(cmd).await {
                tracing::debug!("node {}: requeue: {e:?}", node.id);
            }
        }
        if !decision.assign.is_empty() {
            if let Err(e) = node.propose_local(Command::Assign { assignments: decision.assign }).await {
                tracing::debug!("node {}: assign: {e:?}", node.id);
            }
        }
    }
}

/// The leader's repair (production's `results::repair`): runs the real plan
/// and has each chosen node fetch a missing copy from a live holder, then
/// records it; trims copies too many.
async fn repair_step(
    node: &Arc<Node>,
    members: &BTreeSet<u64>,
    healthy: &dyn Fn(u64) -> bool,
    copying: &Rc<RefCell<BTreeSet<ResultHash>>>,
) {
    let busy = copying.borrow().clone();
    let decisions = repair::plan(&node.store.read().jobs, members, healthy, now_ms(), &busy, 64);
    for d in decisions {
        match d {
            Repair::Copy { sha256, from, to, .. } => {
                if copying.borrow().len() >= node.params().max_concurrent_copies || copying.borrow().contains(&sha256) {
                    continue;
                }
                copying.borrow_mut().insert(sha256);
                let (n, copying) = (node.clone(), copying.clone());
                tokio::task::spawn_local(async move {
                    let timeout = Duration::from_millis(2 * n.params().forward_timeout_ms);
                    let sent = |b| n.shared.counters.sent(n.id, b);
                    let call = Call::CopyFrom { sha: sha256, from };
                    let copied =
                        network::call_counted::<Result<(), String>>(&node_addr(to), &call, timeout, sent).await;
                    if let Ok(Ok(())) = copied {
                        match n.propose_local(Command::ResultCopied { sha256, node: to }).await {
                            Ok(_) => super::world::Counters::add(&n.shared.counters.repair_copies, 1),
                            Err(e) => tracing::debug!("node {}: recording a copy: {e:?}", n.id),
                        }
                    }
                    copying.borrow_mut().remove(&sha256);
                });
            }
            Repair::Trim { sha256, node: holder } => {
                if let Err(e) = node.propose_local(Command::ResultDropped { sha256, node: holder, lost: false }).await {
                    tracing::debug!("node {}: trimming: {e:?}", node.id);
                }
            }
        }
    }
}

/// Each node's janitor (production's `results::janitor`): once it has
/// applied what it knows to be committed and knows a leader, deletes the
/// images no retained result keeps here (older than the grace) and reports
/// the ones it is listed for but does not hold.
async fn janitor(node: Arc<Node>) {
    let params = node.params().clone();
    loop {
        tokio::time::sleep(Duration::from_millis(params.janitor_interval_ms)).await;
        let (leader, member) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.membership_config.membership().get_node(&node.id).is_some())
        };
        let applied = node.store.read().last_applied.map_or(0, |l| l.index);
        if leader.is_none() || !member || applied < node.store.committed_index() {
            continue;
        }
        let mine: BTreeSet<ResultHash> = node
            .store
            .read()
            .jobs
            .blobs()
            .filter(|(_, b)| b.location.nodes().is_some_and(|h| h.contains(&node.id)))
            .map(|(s, _)| *s)
            .collect();
        let held = node.store.blobs();
        let now = now_ms();
        for (sha, touched) in &held {
            if !mine.contains(sha) && now.saturating_sub(*touched) >= params.orphan_grace_ms {
                node.store.delete_blob(sha);
            }
        }
        for sha in mine.iter().filter(|s| !held.contains_key(s)) {
            let cmd = Command::ResultDropped { sha256: *sha, node: node.id, lost: true };
            if let Err(e) = node.write(cmd, params.janitor_interval_ms).await {
                tracing::debug!("node {}: reporting {sha:?} lost: {e}", node.id);
            }
        }
    }
}

/// The executor host (production's `host::run`): runs the attempts assigned
/// to this node, at most `slots` at once, never one attempt twice per
/// incarnation. A restarted node runs its still-assigned attempts again.
async fn executor(node: Arc<Node>) {
    let slots = node.params().slots as usize;
    let applied = node.store.subscribe();
    let mut running: BTreeMap<JobId, u32> = BTreeMap::new();
    let mut finished: BTreeSet<(JobId, u32)> = BTreeSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(JobId, u32)>();
    loop {
        let mine: Vec<(JobId, u32, u64)> =
            node.store.read().jobs.active_on(node.id).map(|j| (j.id, j.attempt, j.seed)).collect();
        finished.retain(|(id, attempt)| mine.iter().any(|(i, a, _)| i == id && a == attempt));
        for (id, attempt, seed) in &mine {
            if running.len() >= slots {
                break;
            }
            if running.contains_key(id) || finished.contains(&(*id, *attempt)) {
                continue;
            }
            running.insert(*id, *attempt);
            tokio::task::spawn_local(run_attempt(node.clone(), *id, *attempt, *seed, done_tx.clone()));
        }
        tokio::select! {
            biased;
            Some((id, attempt)) = done_rx.recv() => {
                if running.get(&id) == Some(&attempt) {
                    running.remove(&id);
                }
                finished.insert((id, attempt));
            }
            _ = applied.changed() => {}
        }
    }
}

/// The result image of a job: deterministic in the simulation seed and the
/// job (every attempt of a job makes the same bytes, as a seeded model would).
/// `len` 0 makes a 72-byte stand-in; otherwise `len` incompressible bytes.
pub fn image_bytes(sim_seed: u64, job: JobId, job_seed: u64, len: usize) -> Vec<u8> {
    let digest = Sha256::digest(format!("raftgen-sim:{sim_seed}:{job}:{job_seed}").as_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&digest);
    png.extend_from_slice(&digest);
    if len > png.len() {
        use rand::{RngCore, SeedableRng};
        let mut rest = vec![0u8; len - png.len()];
        rand::rngs::StdRng::from_seed(digest.into()).fill_bytes(&mut rest);
        png.extend_from_slice(&rest);
    }
    png
}

async fn run_attempt(
    node: Arc<Node>,
    job: JobId,
    attempt: u32,
    seed: u64,
    done: tokio::sync::mpsc::UnboundedSender<(JobId, u32)>,
) {
    let report_timeout_ms = node.params().report_timeout_ms;
    let started = node.write(Command::Start { job, node: node.id, attempt }, report_timeout_ms).await;
    if matches!(started, Ok(Response::Ok)) {
        let run_ms = runtime::gen_range(node.params().run_min_ms..node.params().run_max_ms + 1);
        let fails = runtime::chance_per_mille(node.shared.exec_fail_per_mille());
        let end = Instant::now() + Duration::from_millis(run_ms);
        // A run stops, unreported, once its attempt is no longer current
        // (cancelled, or re-queued while the leader could not hear us).
        let mut current = true;
        while Instant::now() < end {
            if !node.is_current(&job, attempt) {
                current = false;
                break;
            }
            let left = end.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(RUN_CHECK_MS))).await;
        }
        if current {
            let outcome = if fails {
                // A broken run, not bad input: the job is queued again while
                // it has attempts left.
                Some(Outcome::Failed { error: "simulated executor failure".into(), retryable: true })
            } else {
                let png = image_bytes(node.shared.seed, job, seed, node.params().image_bytes);
                let sha = ResultHash::of(&png);
                let bytes = png.len() as u64;
                let holders = if node.params().unsafe_complete_before_durable {
                    Some(Node::unsafe_commit(&node, sha, png))
                } else {
                    node.commit(job, attempt, sha, png).await
                };
                match holders {
                    Some(h) => {
                        let result =
                            ResultMeta { sha256: sha, bytes, width: 64, height: 64, location: Location::Nodes(h) };
                        Some(Outcome::Succeeded { result, model_hash: "sim".into(), notes: Vec::new() })
                    }
                    // No longer current (its report would be refused), or
                    // the copies could not be made durable: retry elsewhere.
                    None if node.is_current(&job, attempt) => {
                        Some(Outcome::Failed { error: "the result could not be stored".into(), retryable: true })
                    }
                    None => None,
                }
            };
            if let Some(outcome) = outcome {
                let cmd = Command::Complete { job, node: node.id, attempt, outcome };
                if let Err(e) = node.write(cmd, report_timeout_ms).await {
                    tracing::debug!("node {}: job {job} attempt {attempt}: could not report: {e}", node.id);
                }
            }
        }
    }
    let _ = done.send((job, attempt));
}

/// On a voter that leads: adds every node that is not a member yet as a
/// learner (production's join, without the voter promotion: the scale run
/// keeps a fixed set of voters).
async fn add_learners(node: Arc<Node>) {
    loop {
        tokio::time::sleep(Duration::from_millis(node.params().register_interval_ms)).await;
        let missing: Vec<u64> = {
            let m = node.raft.metrics();
            let m = m.borrow();
            if m.current_leader != Some(node.id) {
                continue;
            }
            let membership = m.membership_config.membership();
            node.shared.members.iter().filter(|id| membership.get_node(id).is_none()).copied().collect()
        };
        for id in missing {
            if let Err(e) = node.raft.add_learner(id, BasicNode { addr: node_addr(id) }, false).await {
                tracing::debug!("node {}: adding learner {id}: {e}", node.id);
            }
        }
    }
}

/// What every simulated executor announces.
pub fn registration(slots: u32) -> NodeRegistration {
    NodeRegistration {
        slots,
        models: vec![ModelInfo {
            name: MODEL.into(),
            hash: "sim".into(),
            family: "sim".into(),
            pixel_multiple: 8,
            max_prompt_tokens: 77,
            default_side_px: 64,
            default_steps: 4,
            default_guidance_centi: 750,
            default_sampler: "euler".into(),
            samplers: vec!["euler".into()],
        }],
        loaded_models: vec![MODEL.into()],
        executor: "sim".into(),
        refused_models: Vec::new(),
    }
}

/// Keeps this node's registration in the replicated state (production's
/// `host::register`).
async fn register(node: Arc<Node>) {
    let info = registration(node.params().slots);
    let interval = Duration::from_millis(node.params().register_interval_ms);
    loop {
        let (member, leader) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.membership_config.membership().get_node(&node.id).is_some(), m.current_leader)
        };
        let current = node.store.read().jobs.nodes().get(&node.id).map(|n| n.registration.clone());
        if member && leader.is_some() && current.as_ref() != Some(&info) {
            let cmd = Command::RegisterNode { node: node.id, info: info.clone() };
            if let Err(e) = node.write(cmd, REGISTER_TIMEOUT_MS).await {
                tracing::debug!("node {}: registration: {e}", node.id);
            }
        }
        tokio::time::sleep(interval).await;
    }
}
