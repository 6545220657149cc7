//! A process-level chaos run: start a real cluster of `raftgen node`
//! processes (test-pattern executor), drive the client workload, inject the
//! scheduled faults, heal, let every job finish, read every replica, and judge
//! the history with the [`checker`](crate::checker).
//!
//! Faults come one at a time, `gap_ms` apart: each is held, healed, and the
//! cluster must be healthy again before the next one. The clients are paced
//! so that the workload spans the faults (see [`Options::rate_for`]), so every
//! fault happens under traffic and its unavailability can be measured.

pub mod cluster;
pub mod nemesis;
pub mod netns;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::checker::{self, Report};
use crate::history::{write_jsonl, FinalNode, Record};
use cluster::{Cluster, NodeSpec};
use nemesis::{Durations, FaultKind, Nemesis};
use netns::Network;
use workload::{Recorder, Workload};

/// Longest wait for the cluster to be healthy again after a fault.
pub const RECOVER_TIMEOUT_MS: u64 = 30_000;
/// Longest wait, after the workload, for every job to finish and every
/// replica to apply the same log.
pub const SETTLE_TIMEOUT_MS: u64 = 120_000;

#[derive(Clone, Debug)]
pub struct Options {
    pub binary: PathBuf,
    pub out_dir: PathBuf,
    /// Voting nodes (3 or 5).
    pub nodes: u64,
    pub jobs: usize,
    pub clients: u32,
    pub rate_per_s: f64,
    pub cancel_fraction: f64,
    /// The faults, in the order they are injected.
    pub faults: Vec<FaultKind>,
    pub durations: Durations,
    /// Quiet time before each fault (and after the last).
    pub gap_ms: u64,
    /// Run time of one job on the test-pattern executor.
    pub job_ms: u64,
    pub node_timeout_ms: u64,
    pub seed: u64,
    /// Use network namespaces even when no fault needs them (partition
    /// faults always do).
    pub netns: bool,
    /// Runs the nodes with the planted bug "report a result before its
    /// copies are durable" (`--unsafe-complete-before-durable`, a test hook):
    /// the checker must then find unreadable images.
    pub unsafe_complete_before_durable: bool,
}

impl Options {
    /// How long a run of these faults should take: each fault's hold time, a
    /// second to recover, and the gaps.
    pub fn expected_ms(faults: &[FaultKind], d: &Durations, gap_ms: u64) -> u64 {
        let hold = |f: &FaultKind| match f {
            FaultKind::KillLeader | FaultKind::KillRandom => d.down_ms,
            FaultKind::PauseLeader => d.pause_ms,
            FaultKind::JoinLeave => d.partition_ms + 3_000,
            _ => d.partition_ms,
        };
        faults.iter().map(|f| hold(f) + 1_000).sum::<u64>() + gap_ms * (faults.len() as u64 + 1)
    }

    /// Submissions per second that spread `jobs` over the faults' expected time.
    pub fn rate_for(jobs: usize, faults: &[FaultKind], d: &Durations, gap_ms: u64) -> f64 {
        jobs as f64 * 1000.0 / Options::expected_ms(faults, d, gap_ms).max(1) as f64
    }
}

/// Everything a run reports: the checker's verdict plus how the run went.
#[derive(Serialize)]
pub struct RunReport {
    pub nodes: u64,
    pub jobs: usize,
    pub clients: u32,
    pub seed: u64,
    pub netns: bool,
    /// Faults that were asked for but not injected, and why.
    pub skipped_faults: Vec<String>,
    pub duration_ms: u64,
    /// Problems of the run itself: a node that exited on its own, a cluster
    /// that did not recover, jobs still unfinished at the deadline.
    pub run_errors: Vec<String>,
    pub check: Report,
}

impl RunReport {
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.check.violations();
        v.extend(self.run_errors.iter().cloned());
        v
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "raftgen chaos run: {} nodes, {} jobs, {} clients, seed {}, {} ms, network namespaces: {}\n",
            self.nodes, self.jobs, self.clients, self.seed, self.duration_ms, self.netns
        );
        for skipped in &self.skipped_faults {
            s += &format!("skipped: {skipped}\n");
        }
        for e in &self.run_errors {
            s += &format!("run error: {e}\n");
        }
        s += &self.check.summary();
        s
    }
}

/// Runs one drill and writes `history.jsonl`, `finals.json`, `report.json`
/// and `summary.txt` under `out_dir`.
pub async fn run(opts: Options) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    if !opts.binary.exists() {
        bail!("no raftgen binary at {} (build it with `cargo build --release`)", opts.binary.display());
    }
    let mut skipped = Vec::new();
    let mut faults = opts.faults.clone();
    let wants_net = opts.netns || faults.iter().any(|f| f.needs_network());
    let spares: Vec<u64> =
        (0..faults.iter().filter(|f| **f == FaultKind::JoinLeave).count() as u64).map(|i| opts.nodes + 1 + i).collect();
    let all_ids: Vec<u64> = (1..=opts.nodes).chain(spares.iter().copied()).collect();
    let mut net = None;
    if wants_net {
        match Network::create(&all_ids, 90 + (std::process::id() % 100) as u8) {
            Ok(n) => net = Some(n),
            Err(e) => {
                let n = faults.iter().filter(|f| f.needs_network()).count();
                faults.retain(|f| !f.needs_network());
                let msg = format!("{n} partition/packet-loss fault(s): {e}");
                eprintln!("chaos: skipping {msg}");
                skipped.push(msg);
            }
        }
    }

    let work = opts.out_dir.join("cluster");
    let _ = std::fs::remove_dir_all(&work);
    let secret = format!("chaos-secret-{}", opts.seed);
    let spec = NodeSpec {
        binary: opts.binary.clone(),
        work_dir: work,
        secret: secret.clone(),
        job_ms: opts.job_ms,
        slots: 2,
        node_timeout_ms: opts.node_timeout_ms,
        unsafe_complete_before_durable: opts.unsafe_complete_before_durable,
    };
    let mut cluster = Cluster::new(spec, &all_ids, net.as_ref())?;
    let rec = Recorder::new();
    for id in 1..=opts.nodes {
        cluster.start(id, id == 1, (id > 1).then_some(1), net.as_ref())?;
        rec.push(Record::NodeStart { at_ms: rec.now_ms(), node: id });
        if id == 1 {
            cluster.wait_healthy(net.as_ref(), Duration::from_secs(30)).await.context("starting node 1")?;
        }
    }
    cluster.wait_healthy(net.as_ref(), Duration::from_secs(60)).await.context("forming the cluster")?;
    wait_registered(&cluster, net.as_ref(), opts.nodes as usize).await?;

    let client_nodes: Arc<Mutex<Vec<(u64, String)>>> =
        Arc::new(Mutex::new((1..=opts.nodes).map(|id| (id, cluster.url(id, net.as_ref()))).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let observer = tokio::spawn(workload::observe_leadership(client_nodes.clone(), rec.clone(), stop.clone()));
    // The jobs come in one tranche before the first fault and one as each
    // fault begins.
    let tranche = opts.jobs / (faults.len() + 1);
    let released = Arc::new(AtomicUsize::new(tranche.max(1)));
    let workload = Workload {
        released: released.clone(),
        nodes: client_nodes.clone(),
        jobs: opts.jobs,
        rate_per_s: opts.rate_per_s,
        cancel_fraction: opts.cancel_fraction,
        seed: opts.seed,
    };
    let clients = tokio::spawn(workload::run_clients(workload, opts.clients, rec.clone()));

    // Faults, one at a time, under traffic.
    let mut run_errors = Vec::new();
    {
        let mut nemesis = Nemesis {
            cluster: &mut cluster,
            net: net.as_mut(),
            rec: rec.clone(),
            client_nodes: client_nodes.clone(),
            spares,
            durations: opts.durations.clone(),
            rng: StdRng::seed_from_u64(opts.seed),
            http: reqwest::Client::new(),
            secret: secret.clone(),
        };
        for (i, kind) in faults.iter().enumerate() {
            let gap = opts.gap_ms / 2 + nemesis.jitter_ms(opts.gap_ms);
            tokio::time::sleep(Duration::from_millis(gap)).await;
            released.fetch_add(tranche, Ordering::SeqCst);
            if let Err(e) = nemesis.inject(i as u32 + 1, *kind).await {
                run_errors.push(format!("fault {} ({}): {e:#}", i + 1, kind.name()));
            }
            let healthy =
                nemesis.cluster.wait_healthy(nemesis.net.as_deref(), Duration::from_millis(RECOVER_TIMEOUT_MS)).await;
            if let Err(e) = healthy {
                run_errors.push(format!("after fault {} ({}): {e:#}", i + 1, kind.name()));
                break;
            }
            for (node, status) in nemesis.cluster.crashed() {
                run_errors.push(format!("node {node} exited on its own ({status}); see its log"));
            }
        }
    }
    released.store(usize::MAX, Ordering::SeqCst);
    clients.await.context("client tasks")?;

    // Heal, settle, read every replica.
    if let Some(n) = net.as_mut() {
        n.heal()?;
    }
    if let Err(e) = settle(&cluster, net.as_ref()).await {
        run_errors.push(format!("settling: {e:#}"));
    }
    let mut finals: Vec<FinalNode> = Vec::new();
    for id in cluster.members() {
        match cluster.dump(id, net.as_ref()).await {
            Ok(f) => finals.push(f),
            Err(e) => run_errors.push(format!("{e:#}")),
        }
    }
    // Then every kept image through every node (after all the dumps: the
    // nodes may write meanwhile, a janitor reporting a lost copy).
    for f in &mut finals {
        cluster.read_images(f, net.as_ref()).await;
    }
    stop.store(true, Ordering::SeqCst);
    let _ = observer.await;
    for (node, status) in cluster.crashed() {
        run_errors.push(format!("node {node} exited on its own ({status}); see its log"));
    }
    drop(cluster);
    drop(net);

    let history = rec.take();
    let check = checker::check(&history, &finals);
    let report = RunReport {
        nodes: opts.nodes,
        jobs: opts.jobs,
        clients: opts.clients,
        seed: opts.seed,
        netns: wants_net && skipped.is_empty(),
        skipped_faults: skipped,
        duration_ms: started.elapsed().as_millis() as u64,
        run_errors,
        check,
    };
    write_jsonl(&opts.out_dir.join("history.jsonl"), &history)?;
    std::fs::write(opts.out_dir.join("finals.json"), serde_json::to_vec(&finals)?)?;
    std::fs::write(opts.out_dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(opts.out_dir.join("summary.txt"), report.summary())?;
    Ok(report)
}

/// Waits until every node has registered its executor (so submissions name a
/// served model).
async fn wait_registered(cluster: &Cluster, net: Option<&Network>, want: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/cluster", cluster.url(1, net));
    for _ in 0..300 {
        if let Ok(r) = http.get(&url).timeout(Duration::from_secs(1)).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                let registered =
                    v["members"].as_array().map_or(0, |m| m.iter().filter(|n| !n["executor"].is_null()).count());
                if registered >= want {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the nodes did not register their executors")
}

/// After the faults: waits until no job is queued or running, then until
/// every replica has applied the same log index.
async fn settle(cluster: &Cluster, net: Option<&Network>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(SETTLE_TIMEOUT_MS);
    cluster.wait_healthy(net, Duration::from_millis(RECOVER_TIMEOUT_MS)).await?;
    loop {
        let leader = cluster.leader(net).await;
        let idle = match leader {
            Some(l) => cluster.status(l, net).await.is_some_and(|s| s.queue_depth == 0 && s.running == 0),
            None => false,
        };
        if idle {
            break;
        }
        if Instant::now() > deadline {
            bail!("jobs still queued or running after {SETTLE_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let mut applied = Vec::new();
        for id in cluster.members() {
            applied.push(cluster.status(id, net).await.map(|s| s.applied));
        }
        applied.dedup();
        if applied.len() == 1 && applied[0].is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("replicas did not converge on one applied index: {applied:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
