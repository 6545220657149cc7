//! The scale run: what one result costs a large cluster, in the simulation.
//!
//! `chaos scale` runs one fault-free seed with many nodes (by default 5
//! voters and 45 learners, every one an executor) and results of a chosen
//! size (1.5 MB by default, an SDXL-sized PNG), then reports per result
//! image: the bytes the leader sent to other nodes, the bytes each node wrote
//! to its disk, the time from submission to assignment (p50, p99, on the
//! leader's clock), the largest snapshot and the number of terms (elections).
//!
//! Why in the simulation: fifty node processes do not fit on a 2-core
//! machine, and the simulation runs the real openraft, state machine and
//! scheduler with byte-exact accounting of what crosses the simulated network
//! and what each node flushes. What it does not model: sled's own write
//! amplification and the cost of CPU time (simulated time does not pass while
//! a node encodes a 1.5 MB entry).

use std::collections::BTreeMap;

use super::world::{NodeHandle, Params, Shared};
use super::{run_with, SimOptions};

/// One scale run.
#[derive(Clone, Debug)]
pub struct ScaleOptions {
    pub seed: u64,
    pub voters: usize,
    pub learners: usize,
    pub jobs: usize,
    pub clients: usize,
    /// Bytes of each result image.
    pub image_bytes: usize,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        ScaleOptions { seed: 1, voters: 5, learners: 45, jobs: 30, clients: 3, image_bytes: 1_500_000 }
    }
}

/// What a run cost, measured at its end (see [`Costs::measure`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Costs {
    /// The leader at the end, and its term.
    pub leader: Option<u64>,
    pub term: u64,
    /// Succeeded jobs (each made one image).
    pub images: u64,
    /// Bytes each node sent to other nodes.
    pub sent_bytes: BTreeMap<u64, u64>,
    /// Bytes each node flushed to its disk.
    pub written_bytes: BTreeMap<u64, u64>,
    /// Bytes of each node's stored snapshot.
    pub snapshot_bytes: BTreeMap<u64, u64>,
    /// Bytes of the leader's state encoded as a snapshot holds it, at the end.
    pub state_bytes: u64,
    /// Per job: milliseconds from its submission to its first assignment.
    pub assign_latency_ms: Vec<u64>,
}

impl Costs {
    /// Reads the costs from the running nodes and their disks.
    pub(super) fn measure(shared: &Shared, running: &BTreeMap<u64, NodeHandle>) -> Costs {
        let mut c = Costs::default();
        let leader = running
            .values()
            .filter_map(|h| {
                let m = h.raft.metrics();
                let m = m.borrow();
                m.current_leader.map(|l| (m.current_term, l))
            })
            .max();
        c.term = leader.map_or(0, |(t, _)| t);
        c.leader = leader.map(|(_, l)| l);
        c.sent_bytes = shared.counters.sent_bytes.lock().expect("counter lock").clone();
        for id in &shared.members {
            let disk = shared.disk(*id);
            let disk = disk.lock().expect("disk lock");
            c.written_bytes.insert(*id, disk.bytes_written());
            c.snapshot_bytes.insert(*id, disk.snapshot_bytes());
        }
        if let Some(handle) = c.leader.and_then(|l| running.get(&l)) {
            let sm = handle.store.read();
            c.state_bytes = raftgen_raft::codec::encode(&*sm).map_or(0, |b| b.len() as u64);
            c.images = sm.jobs.counts().values().map(|n| n.succeeded).sum();
            for job in sm.jobs.recent_jobs(None, usize::MAX) {
                let assigned = job.history.iter().find(|e| e.kind.name() == "assigned");
                if let Some(a) = assigned {
                    c.assign_latency_ms.push(a.at_ms.saturating_sub(job.submitted_at_ms));
                }
            }
            c.assign_latency_ms.sort_unstable();
        }
        c
    }
}

/// The figures `chaos scale` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScaleReport {
    pub nodes: usize,
    pub voters: usize,
    pub image_bytes: usize,
    pub images: u64,
    /// Bytes the leader sent per image, and that as a multiple of the image.
    pub leader_sent_per_image: f64,
    /// Mean and largest bytes one node wrote per image (over all nodes).
    pub written_per_node_per_image: f64,
    pub written_max_node_per_image: f64,
    pub assign_p50_ms: u64,
    pub assign_p99_ms: u64,
    pub snapshot_max_bytes: u64,
    /// What a snapshot of the leader's state at the end would hold.
    pub state_bytes: u64,
    pub terms: u64,
    pub sim_ms: u64,
    /// The checker's and the simulation's findings (must be empty).
    pub failures: Vec<String>,
}

impl ScaleReport {
    pub fn summary(&self) -> String {
        let img = self.image_bytes.max(1) as f64;
        let mut s = format!(
            "{} nodes ({} voters), {} images of {} bytes, {} simulated ms\n",
            self.nodes, self.voters, self.images, self.image_bytes, self.sim_ms
        );
        s += &format!(
            "leader sent per image: {:.0} bytes ({:.2}x the image)\n",
            self.leader_sent_per_image,
            self.leader_sent_per_image / img
        );
        s += &format!(
            "written per node per image: mean {:.0} bytes ({:.2}x), largest {:.0} bytes ({:.2}x)\n",
            self.written_per_node_per_image,
            self.written_per_node_per_image / img,
            self.written_max_node_per_image,
            self.written_max_node_per_image / img
        );
        s += &format!("assignment latency: p50 {} ms, p99 {} ms\n", self.assign_p50_ms, self.assign_p99_ms);
        s += &format!(
            "largest snapshot stored: {} bytes; the leader's state at the end: {} bytes; terms: {}\n",
            self.snapshot_max_bytes, self.state_bytes, self.terms
        );
        for f in &self.failures {
            s += &format!("  FAILURE: {f}\n");
        }
        s
    }
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs one fault-free scale seed and reports its costs.
pub fn run(opts: &ScaleOptions) -> anyhow::Result<ScaleReport> {
    let sim = SimOptions {
        seed: opts.seed,
        nodes: opts.voters,
        learners: opts.learners,
        jobs: opts.jobs,
        clients: opts.clients,
        faults: false,
        unsafe_complete_before_durable: false,
    };
    let result = run_with(&sim, Params::scale(opts.image_bytes))?;
    let c = &result.costs;
    let images = c.images.max(1) as f64;
    let nodes = (opts.voters + opts.learners).max(1);
    let leader_sent = c.leader.and_then(|l| c.sent_bytes.get(&l)).copied().unwrap_or(0);
    let written: Vec<u64> = c.written_bytes.values().copied().collect();
    Ok(ScaleReport {
        nodes,
        voters: opts.voters,
        image_bytes: opts.image_bytes,
        images: c.images,
        leader_sent_per_image: leader_sent as f64 / images,
        written_per_node_per_image: written.iter().sum::<u64>() as f64 / nodes as f64 / images,
        written_max_node_per_image: written.iter().copied().max().unwrap_or(0) as f64 / images,
        assign_p50_ms: quantile(&c.assign_latency_ms, 0.5),
        assign_p99_ms: quantile(&c.assign_latency_ms, 0.99),
        snapshot_max_bytes: c.snapshot_bytes.values().copied().max().unwrap_or(0),
        state_bytes: c.state_bytes,
        terms: c.term,
        sim_ms: result.sim_ms,
        failures: result.failures(),
    })
}
