//! The deterministic simulation as tests: a few hundred seeds that must all
//! pass the checker and the simulation's own checks, and replays that must
//! reproduce their history exactly.
//!
//! Longer runs (same checks, more seeds, bigger clusters):
//!
//! ```text
//! SIM_SEEDS=5000 cargo test -p chaos --release --test sim -- --nocapture
//! SIM_SEEDS=1000 SIM_SEED_START=100000 cargo test -p chaos --release --test sim
//! ```
//!
//! `SIM_SEEDS` is the number of seeds per cluster size (3 and 5 nodes),
//! beside a fixed set of seeds that once failed. The first seed comes from
//! the date (a new window of seeds each day, so CI keeps
//! exploring instead of re-checking the same 450) unless `SIM_SEED_START` pins
//! it; the range is printed, and a failing seed prints the command that
//! replays it alone.

use std::collections::BTreeSet;
use std::time::Instant;

use chaos::sim::{replay_command, run_seed, SimOptions, SimResult};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs the seeds and fails with every failing seed's replay command.
fn run_seeds(seeds: std::ops::Range<u64>, nodes: usize, jobs: usize, faults: bool) -> Vec<SimResult> {
    let started = Instant::now();
    let count = seeds.end - seeds.start;
    let mut failed = Vec::new();
    let mut results = Vec::new();
    for seed in seeds {
        let opts = SimOptions { seed, nodes, jobs, faults, ..Default::default() };
        match run_seed(&opts) {
            Ok(r) if r.passed() => results.push(r),
            Ok(r) => failed.push(format!("seed {seed}: {:#?}\n  replay: {}", r.failures(), replay_command(&opts))),
            Err(e) => failed.push(format!("seed {seed}: {e:#}\n  replay: {}", replay_command(&opts))),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{count} seeds, {nodes} nodes, {jobs} jobs: {secs:.1} s ({:.1} seeds/s)", count as f64 / secs);
    let failures = failed.len();
    if failed.iter().any(|f| f.contains("double leaders")) {
        failed.push(DOUBLE_LEADER_NOTE.to_string());
    }
    assert!(failures == 0, "{failures} of {count} seeds failed:\n{}", failed.join("\n"));
    results
}

/// openraft 0.9 (without its `single-term-leader` feature) identifies a
/// leader by (term, node id) and lets a candidate with a higher node id win
/// the same term; the checker's one-leader-per-term rule counts that as a
/// violation. Printed with such failures so they are read for what they are.
const DOUBLE_LEADER_NOTE: &str = "note: two leaders in one term with different node ids is allowed by openraft 0.9's \
default leader ids (term, node id); see the checker's double-leader rule";

/// The runs must do real work, meet every fault and take the paths that
/// faults open (re-queues, retried attempts, fenced completions, snapshots
/// sent to followers, truncated logs, writes lost to crashes), or passing
/// means little.
fn assert_exercised(results: &[SimResult], expect_faults: &[&str]) {
    let sum = |f: &dyn Fn(&SimResult) -> u64| results.iter().map(f).sum::<u64>();
    assert!(sum(&|r| r.report.acknowledged as u64) > 0, "nothing was acknowledged");
    assert!(sum(&|r| r.report.succeeded as u64) > 0, "no job succeeded");
    assert!(sum(&|r| r.report.job_failed as u64) > 0, "no job failed");
    assert!(sum(&|r| r.report.cancelled as u64) > 0, "no job was cancelled");
    assert!(sum(&|r| r.stats.snapshots_installed) > 0, "no follower installed a snapshot");
    assert!(sum(&|r| r.stats.truncations) > 0, "no log was truncated");
    assert!(sum(&|r| r.stats.writes_lost) > 0, "no crash lost an unflushed write");
    let events: BTreeSet<&str> = results
        .iter()
        .flat_map(|r| r.finals.iter().flat_map(|n| n.jobs.iter().flat_map(|j| j.events.iter().map(String::as_str))))
        .collect();
    for event in ["requeued", "attempt_failed", "completion_rejected", "result_evicted"] {
        assert!(events.contains(event), "no job was {event}");
    }
    let seen: BTreeSet<&str> = results.iter().flat_map(|r| r.faults.iter().map(String::as_str)).collect();
    for kind in expect_faults {
        assert!(seen.contains(kind), "no seed injected {kind}; seen {seen:?}");
    }
}

/// Jobs per seed: about nine simulated seconds and four faults per seed.
const JOBS: usize = 60;

const ALL_FAULTS: &[&str] = &[
    "partition-leader",
    "partition-split",
    "partition-oneway-out",
    "partition-oneway-in",
    "crash",
    "crash-leader",
    "crash-majority",
    "message-loss",
    "executor-failures",
];

/// The first seed: `SIM_SEED_START`, else one window of `n` seeds per day.
fn first_seed(n: u64) -> u64 {
    let day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
    let start = env_u64("SIM_SEED_START", (day % 1_000) * n);
    eprintln!("seeds from {start} (SIM_SEED_START={start} replays this window)");
    start
}

#[test]
fn three_node_seeds() {
    let n = env_u64("SIM_SEEDS", 300);
    let start = first_seed(n);
    let results = run_seeds(start..start + n, 3, JOBS, true);
    assert_exercised(&results, ALL_FAULTS);
}

#[test]
fn five_node_seeds() {
    let n = env_u64("SIM_SEEDS", 150);
    let start = first_seed(n) + 1_000_000;
    let results = run_seeds(start..start + n, 5, JOBS, true);
    assert_exercised(&results, ALL_FAULTS);
    // With 5 nodes and 3 copies, a node declared lost for long enough has
    // its results copied elsewhere: repair must have run.
    assert!(results.iter().map(|r| r.stats.repair_copies).sum::<u64>() > 0, "repair never copied a result");
}

/// The fixed set beside the moving window: seeds that once failed (issue 15:
/// a job read as queued after running, with the same attempt, because its
/// attempt had failed retryably; the checker was wrong) keep passing.
#[test]
fn seeds_that_once_failed() {
    for seed in [910_353, 910_554, 910_835, 910_995] {
        run_seeds(seed..seed + 1, 3, JOBS, true);
    }
}

#[test]
fn fault_free_seeds_finish_every_job() {
    let results = run_seeds(0..10, 3, JOBS, false);
    for r in &results {
        assert!(r.faults.is_empty());
        assert_eq!(r.report.acknowledged, r.report.submitted, "a submission failed without faults");
        assert_eq!(r.report.unfinished, 0);
    }
}

#[test]
fn a_seed_replays_exactly() {
    for (seed, nodes) in [(7, 3), (8, 3), (1_000_007, 5)] {
        let opts = SimOptions { seed, nodes, jobs: JOBS, ..Default::default() };
        let a = run_seed(&opts).expect("first run");
        let b = run_seed(&opts).expect("second run");
        let json = |r: &SimResult| {
            (serde_json::to_string(&r.history).expect("history"), serde_json::to_string(&r.finals).expect("finals"))
        };
        assert!(!a.history.is_empty());
        assert_eq!(a.faults, b.faults, "seed {seed}: faults differ");
        assert_eq!(json(&a), json(&b), "seed {seed}: the replay differs ({})", replay_command(&opts));
    }
}

/// The planted bug "report a result before its copies are durable" (the node
/// names its holders at once, writes its own copy without syncing it and
/// pushes the others later): crashes then lose acknowledged images, and the
/// checker must say so. Without this, a passing image check could mean the
/// check sees nothing.
#[test]
fn a_result_reported_before_its_copies_are_durable_is_caught() {
    let mut caught = Vec::new();
    for seed in 0..40 {
        let opts = SimOptions { seed, jobs: JOBS, unsafe_complete_before_durable: true, ..Default::default() };
        let r = run_seed(&opts).expect("the run");
        if r.report.image_unreadable.count > 0 {
            caught.push(seed);
        }
    }
    assert!(caught.len() >= 3, "the planted bug was caught in seeds {caught:?} only");
}
