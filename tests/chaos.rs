//! The CI-sized chaos drill: a real 3-node cluster of `raftgen` processes
//! (test-pattern executor, a TEST DOUBLE for the diffusion executor), 300
//! jobs from 16 retrying clients, three leader kills, a leader pause, a
//! random kill and (where network namespaces can be made: root, iproute2,
//! nftables) a leader partition; then the checker must find no lost,
//! duplicated or unexpected job, no double leader, no diverged replica.
//!
//! Longer drills are `cargo run -p chaos --release -- run ...` (README).

use std::path::PathBuf;

use chaos::process::nemesis::{parse_schedule, Durations, FaultKind};
use chaos::process::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_leader_kills_a_pause_and_a_partition_lose_and_duplicate_nothing() {
    let faults =
        parse_schedule("kill-leader,pause-leader,kill-leader,partition-leader,kill-random,kill-leader").unwrap();
    let durations = Durations { down_ms: 1_000, pause_ms: 2_000, partition_ms: 3_000, loss_percent: 20 };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-ci");
    eprintln!("chaos history, report and node logs: {}", out.display());
    let opts = Options {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_raftgen")),
        out_dir: out.clone(),
        nodes: 3,
        jobs: 300,
        clients: 16,
        rate_per_s: Options::rate_for(300, &faults, &durations, 1_000),
        cancel_fraction: 0.05,
        faults: faults.clone(),
        durations,
        gap_ms: 1_000,
        job_ms: 50,
        node_timeout_ms: 2_000,
        seed: 7,
        netns: false,
        unsafe_complete_before_durable: false,
    };
    let report = run(opts).await.expect("the chaos run");
    eprintln!("{}", report.summary());
    assert!(report.violations().is_empty(), "violations: {:#?}", report.violations());

    // The drill really happened: every fault that could be made was injected
    // under traffic, and the clients' jobs were acknowledged and ran.
    let injected = faults.iter().filter(|f| report.netns || !f.needs_network()).count();
    assert_eq!(report.check.faults.len(), injected, "{:#?}", report.check.faults);
    assert!(report.check.faults.iter().filter(|f| f.fault == FaultKind::KillLeader.name()).count() >= 3);
    for f in &report.check.faults {
        assert!(f.rto_ms.is_some(), "no submission was acknowledged after fault {} ({})", f.id, f.fault);
        assert_eq!(f.rpo_jobs, 0);
    }
    assert_eq!(report.check.submitted, 300);
    assert!(report.check.acknowledged >= 290, "{}", report.summary());
    assert_eq!(report.check.final_jobs, report.check.acknowledged + report.check.recovered.count);
    assert!(report.check.succeeded >= 250, "{}", report.summary());
    assert!(out.join("history.jsonl").exists() && out.join("report.json").exists());
}

/// The planted bug "report a result before its copies are durable"
/// (`--unsafe-complete-before-durable`: a node names its holders at once and
/// stores the copies two seconds later): killing nodes loses acknowledged
/// images, and the checker, reading every kept image through every node,
/// must say so. Without this, a passing image check could mean it sees
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_reported_before_its_copies_are_durable_is_caught() {
    let faults = parse_schedule("kill-random,kill-random,kill-random,kill-leader").unwrap();
    let durations = Durations { down_ms: 1_000, pause_ms: 2_000, partition_ms: 3_000, loss_percent: 20 };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-planted");
    let opts = Options {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_raftgen")),
        out_dir: out,
        nodes: 3,
        jobs: 200,
        clients: 8,
        rate_per_s: Options::rate_for(200, &faults, &durations, 1_000),
        cancel_fraction: 0.0,
        faults,
        durations,
        gap_ms: 1_000,
        job_ms: 50,
        node_timeout_ms: 2_000,
        seed: 11,
        netns: false,
        unsafe_complete_before_durable: true,
    };
    let report = run(opts).await.expect("the chaos run");
    eprintln!("{}", report.summary());
    assert!(report.check.image_unreadable.count > 0, "the planted bug went unnoticed: {}", report.summary());
}
