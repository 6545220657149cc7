//! The deterministic simulation: a raftgen cluster on turmoil's simulated
//! network and clock, one exactly-replayable run per seed.
//!
//! What runs is the real thing where it decides: openraft (on a runtime whose
//! random numbers come from the seed, see `runtime`), the real
//! `JobStateMachine::apply` and `schedule::plan`, behind in-memory storage that
//! loses unflushed writes on a crash (`store`), a network of simulated TCP
//! connections (`network`), and each node's scheduler, executor host and
//! write path as production runs them (`node`). Simulated clients submit,
//! poll and cancel jobs (`workload`) while a nemesis, drawn from the seed,
//! partitions (both ways and one way), crashes and restarts nodes, drops
//! messages and makes executors fail. Then everything is healed, the cluster
//! is left to settle, every replica's final state is read, and the same
//! checker as the process runner's judges the history.
//!
//! Why: a real cluster under faults finds bugs at the rate faults happen to
//! line up; a simulation tries hundreds of fault schedules a minute, and a
//! failing seed replays exactly ([`replay_command`]) until the bug is found.
//!
//! Determinism rests on: one thread (turmoil runs every host on the caller's
//! thread), one seeded random stream for everything the nodes draw, turmoil's
//! own seeded stream for message latency and loss, the nemesis's and clients'
//! own seeded streams, simulated time only (never `std::time`), ordered maps
//! wherever order matters, and `biased` selects in our code. Three things in
//! tokio are not seeded by any of that, and are kept out of the way:
//!
//! - a runtime files its tasks in shards by a process-wide task id and drops
//!   them shard by shard when a crash drops the runtime, so every task runs on
//!   the host's `LocalSet` instead (see `runtime::SimRuntime`);
//! - a `watch` channel registers each waiter in one of eight lists picked at
//!   random and wakes the lists in order, so nothing here waits on one (see
//!   `store::Applied`; openraft's metrics are polled);
//! - an unbiased `select!` starts from a random branch. openraft has two
//!   (replication backoff and `Raft::wait`), seeded only under
//!   `--cfg tokio_unstable`; no divergence traced to them has been seen, and
//!   the replay test would show one.

mod network;
mod node;
mod runtime;
pub mod scale;
mod store;
mod workload;
mod world;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Once;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::checker::{self, Report};
use crate::history::{FinalJob, FinalNode, Record};
use network::host_name;
pub use world::SimStats;
use world::{Params, Shared};

/// One simulation run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimOptions {
    /// Everything random in the run derives from it: the same seed (with the
    /// same other options) replays the same run.
    pub seed: u64,
    /// Raft voters (1 to [`MAX_NODES`]; 3 and 5 are the interesting ones).
    pub nodes: usize,
    /// Nodes beyond the voters, added as learners once a leader is elected
    /// (0 to [`MAX_LEARNERS`]).
    pub learners: usize,
    /// Jobs submitted in total, split across the clients.
    pub jobs: usize,
    /// Concurrent simulated clients (1 to [`MAX_CLIENTS`]).
    pub clients: usize,
    /// Whether the nemesis injects faults; without, the run checks the
    /// fault-free path (and the checker still judges it).
    pub faults: bool,
    /// The planted bug "report a result before its copies are durable", for
    /// the test that shows the checker catches it.
    pub unsafe_complete_before_durable: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 0,
            nodes: 3,
            learners: 0,
            jobs: 60,
            clients: 3,
            faults: true,
            unsafe_complete_before_durable: false,
        }
    }
}

/// Most voters, learners and clients one run accepts.
pub const MAX_NODES: usize = 7;
pub const MAX_LEARNERS: usize = 63;
pub const MAX_CLIENTS: usize = 16;
/// Most jobs one run accepts (the run's length grows with them).
pub const MAX_JOBS: usize = 10_000;

/// What a run produced, and its verdict.
#[derive(Debug)]
pub struct SimResult {
    pub history: Vec<Record>,
    pub finals: Vec<FinalNode>,
    /// The checker's report on `history` and `finals`.
    pub report: Report,
    /// What the simulation itself found wrong, besides the checker: a broken
    /// state-machine invariant on a replica, a panic in a simulated task, a
    /// Raft node that stopped, a cluster that did not settle after healing,
    /// a log that snapshots did not keep bounded.
    pub sim_failures: Vec<String>,
    /// The faults injected, by kind, in order.
    pub faults: Vec<String>,
    /// Simulated time the run took, in milliseconds.
    pub sim_ms: u64,
    /// What happened in storage: snapshots, truncations, writes lost to crashes.
    pub stats: SimStats,
    /// What the run cost, for the scale run (see [`scale`]).
    pub costs: scale::Costs,
}

impl SimResult {
    /// Every failure: the checker's violations, then the simulation's own.
    pub fn failures(&self) -> Vec<String> {
        let mut out = self.report.violations();
        out.extend(self.sim_failures.iter().cloned());
        out
    }

    pub fn passed(&self) -> bool {
        self.report.is_ok() && self.sim_failures.is_empty()
    }

    /// A readable account of the run: the checker's summary, the faults, what
    /// happened in storage, and the simulation's own failures.
    pub fn summary(&self) -> String {
        let mut s = format!("simulated {} ms; faults: {}\n", self.sim_ms, self.faults.join(", "));
        s += &format!(
            "storage: {} snapshots built, {} installed, {} log truncations, {} unflushed writes lost to crashes, {} result copies made by repair\n",
            self.stats.snapshots_built,
            self.stats.snapshots_installed,
            self.stats.truncations,
            self.stats.writes_lost,
            self.stats.repair_copies
        );
        s += &self.report.summary();
        for f in &self.sim_failures {
            s += &format!("  simulation: {f}\n");
        }
        s
    }
}

/// The command that replays this run: `--seed`, `--nodes` and `--jobs`
/// always, `--clients` and `--no-faults` only where they differ from
/// [`SimOptions::default`].
pub fn replay_command(opts: &SimOptions) -> String {
    let mut cmd =
        format!("cargo run -p chaos --release -- sim --seed {} --nodes {} --jobs {}", opts.seed, opts.nodes, opts.jobs);
    let defaults = SimOptions::default();
    if opts.learners != defaults.learners {
        cmd += &format!(" --learners {}", opts.learners);
    }
    if opts.clients != defaults.clients {
        cmd += &format!(" --clients {}", opts.clients);
    }
    if opts.faults != defaults.faults {
        cmd += " --no-faults";
    }
    if opts.unsafe_complete_before_durable {
        cmd += " --unsafe-complete-before-durable";
    }
    cmd
}

/// Simulated time per step (turmoil's tick), in milliseconds.
const TICK_MS: u64 = 1;
/// Simulated one-way message latency bounds, in milliseconds.
const MIN_LATENCY_MS: u64 = 1;
const MAX_LATENCY_MS: u64 = 10;
/// turmoil's chance that a link randomly broken by message loss is repaired
/// at each later message on it.
const LOSS_REPAIR_RATE: f64 = 0.5;
/// The nemesis starts once the cluster has had this long to elect and register.
const FAULTS_FROM_MS: u64 = 1_000;
/// A fault lasts between these, in milliseconds; so does the quiet between two.
const FAULT_MIN_MS: u64 = 300;
const FAULT_MAX_MS: u64 = 2_500;
const QUIET_MIN_MS: u64 = 200;
const QUIET_MAX_MS: u64 = 1_200;
/// No new fault starts after this much simulated time (the clients may still
/// be retrying; everything is healed once they are done or at this point).
const MAX_FAULT_PHASE_MS: u64 = 60_000;
/// After healing and the clients' end, the cluster must settle within this.
const CONVERGE_TIMEOUT_MS: u64 = 30_000;
/// How often the driver checks whether the cluster has settled.
const CONVERGE_CHECK_MS: u64 = 50;
/// Hard bound on one run's simulated time.
const MAX_SIM_MS: u64 = 300_000;
/// A node's durable log may hold at most this many entries at the end
/// (snapshots purge it; this is several snapshot intervals of slack).
fn max_log_entries(p: &Params) -> usize {
    (4 * (p.snapshot_logs + p.snapshot_keep_logs) + 64) as usize
}

/// Runs one seed to the end and judges it. An `Err` means the simulation
/// itself could not run (bad options, a host's software returned an error);
/// a run that found a bug is an `Ok` whose [`SimResult::passed`] is false.
pub fn run_seed(opts: &SimOptions) -> anyhow::Result<SimResult> {
    let params = Params { unsafe_complete_before_durable: opts.unsafe_complete_before_durable, ..Params::default() };
    run_with(opts, params)
}

/// [`run_seed`] with other settings (the scale run's).
fn run_with(opts: &SimOptions, params: Params) -> anyhow::Result<SimResult> {
    if !(1..=MAX_NODES).contains(&opts.nodes) {
        bail!("--nodes must be 1 to {MAX_NODES}");
    }
    if opts.learners > MAX_LEARNERS {
        bail!("--learners must be at most {MAX_LEARNERS}");
    }
    if !(1..=MAX_CLIENTS).contains(&opts.clients) {
        bail!("--clients must be 1 to {MAX_CLIENTS}");
    }
    if opts.jobs > MAX_JOBS {
        bail!("--jobs must be at most {MAX_JOBS}");
    }
    install_panic_counter();
    let panics_before = PANICS.with(Cell::get);
    runtime::reseed(opts.seed);

    let members: Vec<u64> = (1..=(opts.nodes + opts.learners) as u64).collect();
    let shared = Shared::new(opts.seed, members.clone(), opts.nodes, params);
    let mut sim = turmoil::Builder::new()
        .rng_seed(opts.seed)
        .epoch(UNIX_EPOCH)
        .tick_duration(Duration::from_millis(TICK_MS))
        .simulation_duration(Duration::from_millis(MAX_SIM_MS + 1_000))
        .min_message_latency(Duration::from_millis(MIN_LATENCY_MS))
        .max_message_latency(Duration::from_millis(MAX_LATENCY_MS))
        .repair_rate(LOSS_REPAIR_RATE)
        .build();
    for &id in &members {
        let shared = shared.clone();
        sim.host(host_name(id), move || node::run(shared.clone(), id));
    }
    for c in 0..opts.clients {
        // Split the jobs as evenly as possible.
        let jobs = opts.jobs / opts.clients + usize::from(c < opts.jobs % opts.clients);
        sim.client(format!("client{c}"), workload::client(shared.clone(), c as u32, jobs));
    }

    let mut nemesis = Nemesis::new(opts.seed, &members);
    let mut leadership: BTreeMap<u64, (u64, Option<u64>)> = BTreeMap::new();
    let mut healed_at: Option<u64> = None;
    let mut sim_failures = Vec::new();
    loop {
        let clients_done = sim.step().map_err(|e| anyhow::anyhow!("{e}")).context("simulation step")?;
        let now = sim.elapsed().as_millis() as u64;
        sample_leadership(&shared, &mut leadership, now);
        match healed_at {
            None => {
                if opts.faults && !clients_done && now < MAX_FAULT_PHASE_MS {
                    nemesis.step(&mut sim, &shared, &mut leadership, now);
                } else {
                    nemesis.heal_all(&mut sim, &shared, now);
                    healed_at = Some(now);
                }
            }
            Some(at) => {
                if clients_done && now.is_multiple_of(CONVERGE_CHECK_MS) && settled(&shared).is_ok() {
                    break;
                }
                if now >= at + CONVERGE_TIMEOUT_MS || now >= MAX_SIM_MS {
                    let why = if clients_done { settled(&shared).err() } else { None };
                    sim_failures.push(format!(
                        "not settled {CONVERGE_TIMEOUT_MS} ms after healing: {}",
                        why.unwrap_or_else(|| "clients still running".into())
                    ));
                    break;
                }
            }
        }
    }
    let costs = scale::Costs::measure(&shared, &shared.running());
    // Every kept image must be readable, byte-identical, through every live node.
    if let Err(e) = read_all_images(&mut sim, &shared) {
        sim_failures.push(format!("reading the images: {e:#}"));
    }
    // The nodes kept working meanwhile (janitors, marks): let them agree again.
    let until = sim.elapsed() + Duration::from_millis(CONVERGE_TIMEOUT_MS);
    while sim_failures.is_empty() && settled(&shared).is_err() {
        sim.step().map_err(|e| anyhow::anyhow!("{e}")).context("simulation step")?;
        if sim.elapsed() >= until {
            let why = settled(&shared).err().unwrap_or_default();
            sim_failures.push(format!("not settled again after the image reads: {why}"));
        }
    }
    let sim_ms = sim.elapsed().as_millis() as u64;

    let running = shared.running();
    let mut finals = Vec::new();
    for (id, handle) in &running {
        let metrics = handle.raft.metrics().borrow().clone();
        if let Err(e) = &metrics.running_state {
            sim_failures.push(format!("node {id}: raft stopped: {e}"));
        }
        let sm = handle.store.read();
        if let Err(e) = sm.jobs.check_invariants() {
            sim_failures.push(format!("node {id}: state machine invariant broken: {e}"));
        }
        finals.push(final_node(*id, &sm, &shared.image_reads.lock().expect("reads lock")));
    }
    for id in &members {
        let log_len = shared.disk(*id).lock().expect("disk lock").log_len();
        if log_len > max_log_entries(&shared.params) {
            sim_failures.push(format!("node {id}: {log_len} log entries on disk; snapshots did not bound the log"));
        }
    }
    let panics = PANICS.with(Cell::get) - panics_before;
    if panics > 0 {
        sim_failures.push(format!("{panics} simulated task(s) panicked (see stderr)"));
    }
    // Drop the simulation (and every node in it) before reading the history,
    // so nothing writes to it any more.
    drop(running);
    drop(sim);
    let history = shared.take_history();
    let report = checker::check(&history, &finals);
    let stats = shared.counters.read();
    Ok(SimResult { history, finals, report, sim_failures, faults: nemesis.kinds, sim_ms, stats, costs })
}

/// Records each running node's own view of leadership whenever it changes.
fn sample_leadership(shared: &Shared, last: &mut BTreeMap<u64, (u64, Option<u64>)>, now: u64) {
    for (id, handle) in shared.running() {
        let seen = {
            let m = handle.raft.metrics();
            let m = m.borrow();
            (m.current_term, m.current_leader)
        };
        if last.get(&id) != Some(&seen) {
            last.insert(id, seen);
            shared.record(Record::Leadership { at_ms: now, node: id, term: seen.0, leader: seen.1 });
        }
    }
}

/// Whether the healed cluster has settled: every node up, one leader known to
/// all, the same entries applied everywhere, and no job queued or running.
fn settled(shared: &Shared) -> Result<(), String> {
    let running = shared.running();
    let down: Vec<u64> = shared.members.iter().filter(|id| !running.contains_key(id)).copied().collect();
    if !down.is_empty() {
        return Err(format!("nodes {down:?} are not running"));
    }
    let mut leaders = BTreeSet::new();
    let mut applied = BTreeMap::new();
    for (id, handle) in &running {
        leaders.insert(handle.raft.metrics().borrow().current_leader);
        let sm = handle.store.read();
        applied.insert(*id, sm.last_applied.map_or(0, |l| l.index));
        let busy =
            sm.jobs.queue_depth() + sm.jobs.nodes_with_active_jobs().map(|n| sm.jobs.active_count(n)).sum::<usize>();
        if busy > 0 {
            return Err(format!("node {id} still has {busy} job(s) queued or running"));
        }
    }
    if leaders.len() != 1 || leaders.contains(&None) {
        return Err(format!("nodes know leaders {leaders:?}"));
    }
    if applied.values().collect::<BTreeSet<_>>().len() != 1 {
        return Err(format!("applied indexes differ: {applied:?}"));
    }
    Ok(())
}

/// Longest the final image reads may take, in simulated milliseconds.
const MAX_READ_PHASE_MS: u64 = 300_000;
/// One final read's deadline.
const READ_TIMEOUT_MS: u64 = 5_000;

/// Reads, through each running node, the image of every result that node
/// keeps (a simulated client calling the node's read path), recording the
/// sha256 of what it served in `shared.image_reads`.
fn read_all_images(sim: &mut turmoil::Sim<'_>, shared: &std::sync::Arc<Shared>) -> anyhow::Result<()> {
    let mut reads = Vec::new();
    for (id, handle) in shared.running() {
        let sm = handle.store.read();
        for job in sm.jobs.recent_jobs(None, usize::MAX) {
            if sm.jobs.image(&job.id).is_some() {
                reads.push((id, job.id));
            }
        }
    }
    let recorder = shared.clone();
    sim.client("image-reader", async move {
        for (node, job) in reads {
            let op = network::ClientOp::ReadImage { job };
            let call = network::Call::Client(op);
            let timeout = Duration::from_millis(READ_TIMEOUT_MS);
            let got = match network::call::<network::ClientReply>(&network::node_addr(node), &call, timeout).await {
                Ok(network::ClientReply::Image(Ok(sha))) => sha,
                Ok(network::ClientReply::Image(Err(e))) => format!("error: {e}"),
                Ok(other) => format!("error: unexpected reply {other:?}"),
                Err(e) => format!("error: {e}"),
            };
            recorder.image_reads.lock().expect("reads lock").insert((node, job.to_string()), got);
        }
        Ok(())
    });
    let until = sim.elapsed() + Duration::from_millis(MAX_READ_PHASE_MS);
    loop {
        if sim.step().map_err(|e| anyhow::anyhow!("{e}"))? {
            return Ok(());
        }
        if sim.elapsed() >= until {
            anyhow::bail!("not done within {MAX_READ_PHASE_MS} simulated ms");
        }
    }
}

fn final_node(id: u64, sm: &store::SmData, reads: &BTreeMap<(u64, String), String>) -> FinalNode {
    let mut jobs: Vec<FinalJob> = sm
        .jobs
        .recent_jobs(None, usize::MAX)
        .into_iter()
        .map(|j| FinalJob {
            id: j.id.to_string(),
            idempotency_key: j.idempotency_key.clone(),
            state: j.state.as_str().to_string(),
            attempt: j.attempt,
            node: j.node,
            events: j.history.iter().map(|e| e.kind.name().to_string()).collect(),
            image_sha256: sm.jobs.image(&j.id).map(|(sha, _)| sha.to_string()),
            image_read: sm
                .jobs
                .image(&j.id)
                .map(|_| reads.get(&(id, j.id.to_string())).cloned().unwrap_or_else(|| "error: not read".into())),
        })
        .collect();
    jobs.reverse(); // oldest first
    FinalNode { node: id, last_applied: sm.last_applied.map_or(0, |l| l.index), jobs, images_read: true }
}

// ---- The nemesis ----

/// What a fault undoes when it ends.
enum Undo {
    /// Repair these links (both directions).
    Links(Vec<(u64, u64)>),
    /// Restart these crashed nodes.
    Restart(Vec<u64>),
    /// Stop dropping messages.
    Loss,
    /// Executors stop failing on purpose.
    ExecutorFailures,
}

struct ActiveFault {
    id: u32,
    until_ms: u64,
    undo: Undo,
}

/// Failure rate of executor runs while the `executor-failures` fault lasts.
const EXECUTOR_FAILURE_PER_MILLE: u32 = 500;
/// turmoil's per-message chance of breaking a link while `message-loss` lasts.
const MESSAGE_LOSS_RATE: f64 = 0.05;

/// One fault at a time, kinds and timings drawn from its own seeded stream.
///
/// Kinds (as recorded in `FaultStart::fault`):
/// - `partition-leader`: the leader cut off from every other node;
/// - `partition-split`: a random minority cut off from the majority;
/// - `partition-oneway-out` / `partition-oneway-in`: one node's messages to
///   the others dropped, or theirs to it (turmoil's `partition_oneway`);
/// - `crash` / `crash-leader`: a node's process killed (unflushed writes
///   lost), restarted from its disk when the fault ends;
/// - `crash-majority`: a majority killed at once (no quorum until restart);
/// - `message-loss`: every link randomly drops messages;
/// - `executor-failures`: executor runs fail half of the time.
struct Nemesis {
    rng: StdRng,
    members: Vec<u64>,
    next_id: u32,
    active: Option<ActiveFault>,
    next_at_ms: u64,
    kinds: Vec<String>,
}

impl Nemesis {
    fn new(seed: u64, members: &[u64]) -> Nemesis {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
        let next_at_ms = FAULTS_FROM_MS + rng.gen_range(0..QUIET_MAX_MS);
        Nemesis { rng, members: members.to_vec(), next_id: 0, active: None, next_at_ms, kinds: Vec::new() }
    }

    fn step(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Shared,
        leadership: &mut BTreeMap<u64, (u64, Option<u64>)>,
        now: u64,
    ) {
        if let Some(active) = &self.active {
            if now >= active.until_ms {
                self.end_active(sim, shared, now);
                self.next_at_ms = now + self.rng.gen_range(QUIET_MIN_MS..=QUIET_MAX_MS);
            }
            return;
        }
        if now >= self.next_at_ms {
            self.start(sim, shared, leadership, now);
        }
    }

    /// The node most nodes believe leads (the highest term's claim).
    fn leader(&self, shared: &Shared) -> Option<u64> {
        shared
            .running()
            .values()
            .filter_map(|h| {
                let m = h.raft.metrics();
                let m = m.borrow();
                m.current_leader.map(|l| (m.current_term, l))
            })
            .max()
            .map(|(_, l)| l)
    }

    fn start(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Shared,
        leadership: &mut BTreeMap<u64, (u64, Option<u64>)>,
        now: u64,
    ) {
        let n = self.members.len();
        let mut kinds = vec!["crash", "crash-leader", "message-loss", "executor-failures"];
        if n > 1 {
            kinds.extend(["partition-leader", "partition-split", "partition-oneway-out", "partition-oneway-in"]);
        }
        if n > 2 {
            kinds.push("crash-majority");
        }
        let kind = *kinds.choose(&mut self.rng).expect("kinds is never empty");
        let random_node = |rng: &mut StdRng| self.members[rng.gen_range(0..n)];
        let leader = self.leader(shared).unwrap_or_else(|| random_node(&mut self.rng));
        let (nodes, undo) = match kind {
            "partition-leader" => {
                let links: Vec<(u64, u64)> =
                    self.members.iter().filter(|m| **m != leader).map(|m| (leader, *m)).collect();
                for (a, b) in &links {
                    sim.partition(host_name(*a), host_name(*b));
                }
                (vec![leader], Undo::Links(links))
            }
            "partition-split" => {
                let mut shuffled = self.members.clone();
                shuffled.shuffle(&mut self.rng);
                let minority = self.rng.gen_range(1..=(n - 1) / 2 + usize::from(n == 2));
                let (small, large) = shuffled.split_at(minority.min(n - 1));
                let mut links = Vec::new();
                for a in small {
                    for b in large {
                        sim.partition(host_name(*a), host_name(*b));
                        links.push((*a, *b));
                    }
                }
                let mut small = small.to_vec();
                small.sort_unstable();
                (small, Undo::Links(links))
            }
            "partition-oneway-out" | "partition-oneway-in" => {
                let x = random_node(&mut self.rng);
                let mut links = Vec::new();
                for other in self.members.iter().filter(|m| **m != x) {
                    if kind == "partition-oneway-out" {
                        sim.partition_oneway(host_name(x), host_name(*other));
                    } else {
                        sim.partition_oneway(host_name(*other), host_name(x));
                    }
                    links.push((x, *other));
                }
                (vec![x], Undo::Links(links))
            }
            "crash" | "crash-leader" | "crash-majority" => {
                let victims = match kind {
                    "crash" => vec![random_node(&mut self.rng)],
                    "crash-leader" => vec![leader],
                    _ => {
                        let mut shuffled = self.members.clone();
                        shuffled.shuffle(&mut self.rng);
                        let mut v = shuffled[..n / 2 + 1].to_vec();
                        v.sort_unstable();
                        v
                    }
                };
                for v in &victims {
                    sim.crash(host_name(*v));
                    shared.set_stopped(*v);
                    leadership.remove(v);
                }
                (victims.clone(), Undo::Restart(victims))
            }
            "message-loss" => {
                sim.set_fail_rate(MESSAGE_LOSS_RATE);
                (self.members.clone(), Undo::Loss)
            }
            _ => {
                shared.set_exec_fail_per_mille(EXECUTOR_FAILURE_PER_MILLE);
                (self.members.clone(), Undo::ExecutorFailures)
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.kinds.push(kind.to_string());
        shared.record(Record::FaultStart { at_ms: now, id, fault: kind.to_string(), nodes });
        let until_ms = now + self.rng.gen_range(FAULT_MIN_MS..=FAULT_MAX_MS);
        self.active = Some(ActiveFault { id, until_ms, undo });
    }

    fn end_active(&mut self, sim: &mut turmoil::Sim<'_>, shared: &Shared, now: u64) {
        let Some(active) = self.active.take() else { return };
        match active.undo {
            Undo::Links(links) => {
                for (a, b) in links {
                    sim.repair(host_name(a), host_name(b));
                }
            }
            Undo::Restart(nodes) => {
                for id in nodes {
                    sim.bounce(host_name(id));
                }
            }
            Undo::Loss => {
                sim.set_fail_rate(0.0);
                // Links the loss left broken come back too.
                self.repair_all(sim);
            }
            Undo::ExecutorFailures => shared.set_exec_fail_per_mille(0),
        }
        shared.record(Record::FaultEnd { at_ms: now, id: active.id });
    }

    fn repair_all(&self, sim: &mut turmoil::Sim<'_>) {
        for (i, a) in self.members.iter().enumerate() {
            for b in &self.members[i + 1..] {
                sim.repair(host_name(*a), host_name(*b));
            }
        }
    }

    /// Ends the active fault, if any, and makes sure every link is whole.
    fn heal_all(&mut self, sim: &mut turmoil::Sim<'_>, shared: &Shared, now: u64) {
        self.end_active(sim, shared, now);
        sim.set_fail_rate(0.0);
        self.repair_all(sim);
        shared.set_exec_fail_per_mille(0);
    }
}

// ---- Panics in simulated tasks ----

thread_local! {
    /// Panics on this thread since it started (the simulation's thread).
    static PANICS: Cell<u64> = const { Cell::new(0) };
}

static PANIC_HOOK: Once = Once::new();

/// tokio catches a panic in a spawned task and only that task ends, so a
/// panicking simulated task would otherwise go unnoticed. This hook counts
/// panics per thread, then defers to the hook that was installed before.
fn install_panic_counter() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}
