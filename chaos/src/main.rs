//! `chaos`: raftgen's fault-injection drills from the command line.
//!
//! - `chaos run`: a real cluster of node processes, a paced client workload
//!   and scheduled faults; writes the history and a report, exits 1 on any
//!   violation.
//! - `chaos sim`: seeds of the deterministic simulation; a failing seed prints
//!   the command that replays it.
//! - `chaos scale`: what one result costs a large simulated cluster.
//! - `chaos check`: re-judges a saved history and final state.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use chaos::process::nemesis::{parse_schedule, Durations};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chaos", about = "Fault-injection drills for raftgen: kill, pause, partition, and check")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster of raftgen processes, drive jobs, inject faults, check.
    Run(RunArgs),
    /// Run seeds of the deterministic simulation (turmoil).
    Sim(SimArgs),
    /// What one result costs a large simulated cluster (5 voters, 45
    /// learners, 1.5 MB images by default): bytes the leader sends, bytes
    /// each node writes, assignment latency, snapshot size.
    Scale(ScaleArgs),
    /// Check a saved run: DIR holds history.jsonl and finals.json.
    Check { dir: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Voting nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    nodes: u64,
    /// Jobs submitted in all.
    #[arg(long, default_value_t = 300)]
    jobs: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: u32,
    /// Submissions per second over all clients (default: what spreads the
    /// jobs over the time the faults take, so every fault meets traffic).
    #[arg(long)]
    rate: Option<f64>,
    /// Quiet time before each fault.
    #[arg(long, default_value_t = 1_000)]
    gap_ms: u64,
    /// Share of acknowledged jobs a client cancels right away.
    #[arg(long, default_value_t = 0.05)]
    cancel_fraction: f64,
    /// Faults in order, as `kind[=count],...`. Kinds: kill-leader,
    /// kill-random, pause-leader, partition-leader, partition-half,
    /// partition-oneway, packet-loss, join-leave. Partitions and packet loss
    /// need root (network namespaces, nftables) and are skipped, with a
    /// message, where those cannot be made.
    #[arg(long, default_value = "kill-leader=2,pause-leader,kill-random,partition-leader")]
    faults: String,
    /// Shuffle the fault list (with --seed) instead of keeping its order.
    #[arg(long)]
    shuffle: bool,
    #[arg(long, default_value_t = 1_000)]
    down_ms: u64,
    #[arg(long, default_value_t = 2_000)]
    pause_ms: u64,
    #[arg(long, default_value_t = 3_000)]
    partition_ms: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=100))]
    loss_percent: u8,
    /// Run time of one job on the test-pattern executor.
    #[arg(long, default_value_t = 50)]
    job_ms: u64,
    /// The leader re-queues a silent node's jobs after this long.
    #[arg(long, default_value_t = 2_000)]
    node_timeout_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Put nodes in network namespaces even without partition faults.
    #[arg(long)]
    netns: bool,
    /// Where the history, report and node logs go.
    #[arg(long, default_value = "target/chaos/run")]
    out: PathBuf,
    /// The raftgen binary (default: next to this one, built if missing).
    #[arg(long)]
    raftgen: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SimArgs {
    /// One seed to run (and replay).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds, `FROM..TO` (TO excluded).
    #[arg(long, default_value = "0..100")]
    seeds: String,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    nodes: u64,
    /// Nodes beyond the voters, joined as learners.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=63))]
    learners: u64,
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    jobs: u64,
    /// Simulated clients.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    clients: u64,
    /// No nemesis: every job must finish.
    #[arg(long)]
    no_faults: bool,
    /// The planted bug: nodes report results before their copies are durable.
    #[arg(long, hide = true)]
    unsafe_complete_before_durable: bool,
    /// Write the failing seeds' histories here.
    #[arg(long, default_value = "target/chaos/sim")]
    out: PathBuf,
}

/// The raftgen binary next to ours; built with cargo when we run under it.
fn find_raftgen() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let dir = me.parent().context("executable without a directory")?;
    let path = dir.join("raftgen");
    if path.exists() {
        return Ok(path);
    }
    let Ok(cargo) = std::env::var("CARGO") else {
        bail!("no raftgen binary at {}: build it with `cargo build --release` or pass --raftgen", path.display());
    };
    let release = dir.file_name().is_some_and(|n| n == "release");
    eprintln!("chaos: building raftgen ({})", if release { "release" } else { "debug" });
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "raftgen", "--bin", "raftgen"]);
    if release {
        cmd.arg("--release");
    }
    if !cmd.status().context("running cargo build")?.success() {
        bail!("building raftgen failed");
    }
    Ok(path)
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s.split_once("..").context("--seeds takes FROM..TO")?;
    let (a, b) = (a.trim().parse()?, b.trim().parse()?);
    if a >= b {
        bail!("--seeds {s}: empty range");
    }
    Ok(a..b)
}

async fn run(a: RunArgs) -> anyhow::Result<bool> {
    let mut faults = parse_schedule(&a.faults).map_err(anyhow::Error::msg).context("--faults")?;
    if a.shuffle {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        faults.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.seed));
    }
    let durations = Durations {
        down_ms: a.down_ms,
        pause_ms: a.pause_ms,
        partition_ms: a.partition_ms,
        loss_percent: a.loss_percent,
    };
    let rate = a.rate.unwrap_or_else(|| chaos::process::Options::rate_for(a.jobs, &faults, &durations, a.gap_ms));
    if a.jobs == 0 || a.clients == 0 || rate <= 0.0 {
        bail!("--jobs, --clients and --rate must be positive");
    }
    let binary = match a.raftgen {
        Some(p) => p,
        None => find_raftgen()?,
    };
    let opts = chaos::process::Options {
        binary,
        out_dir: a.out.clone(),
        nodes: a.nodes,
        jobs: a.jobs,
        clients: a.clients,
        rate_per_s: rate,
        cancel_fraction: a.cancel_fraction,
        faults,
        durations,
        gap_ms: a.gap_ms,
        job_ms: a.job_ms,
        node_timeout_ms: a.node_timeout_ms,
        seed: a.seed,
        netns: a.netns,
        unsafe_complete_before_durable: false,
    };
    let report = chaos::process::run(opts).await?;
    print!("{}", report.summary());
    println!("history, report and node logs: {}", a.out.display());
    Ok(report.violations().is_empty())
}

fn sim(a: SimArgs) -> anyhow::Result<bool> {
    let seeds = match a.seed {
        Some(s) => s..s + 1,
        None => parse_range(&a.seeds)?,
    };
    let mut failed = 0;
    let started = std::time::Instant::now();
    for seed in seeds.clone() {
        let opts = chaos::sim::SimOptions {
            seed,
            nodes: a.nodes as usize,
            learners: a.learners as usize,
            jobs: a.jobs as usize,
            clients: a.clients as usize,
            faults: !a.no_faults,
            unsafe_complete_before_durable: a.unsafe_complete_before_durable,
        };
        let result = chaos::sim::run_seed(&opts).with_context(|| format!("seed {seed}"))?;
        if !result.passed() || a.seed.is_some() {
            print!("seed {seed}:\n{}", result.summary());
        }
        if !result.passed() {
            failed += 1;
            let dir = a.out.join(format!("seed-{seed}"));
            std::fs::create_dir_all(&dir)?;
            chaos::history::write_jsonl(&dir.join("history.jsonl"), &result.history)?;
            std::fs::write(dir.join("finals.json"), serde_json::to_vec(&result.finals)?)?;
            println!("seed {seed} FAILED; history in {}; replay: {}", dir.display(), chaos::sim::replay_command(&opts));
        }
    }
    let n = seeds.end - seeds.start;
    println!("{n} seed(s), {failed} failed, {:.1} s", started.elapsed().as_secs_f64());
    Ok(failed == 0)
}

#[derive(clap::Args)]
struct ScaleArgs {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=7))]
    voters: u64,
    #[arg(long, default_value_t = 45, value_parser = clap::value_parser!(u64).range(0..=63))]
    learners: u64,
    /// Jobs submitted (each makes one image unless cancelled).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    jobs: u64,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    clients: u64,
    /// Bytes of each result image.
    #[arg(long, default_value_t = 1_500_000, value_parser = clap::value_parser!(u64).range(0..=32 << 20))]
    image_bytes: u64,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

fn scale(a: ScaleArgs) -> anyhow::Result<bool> {
    let opts = chaos::sim::scale::ScaleOptions {
        seed: a.seed,
        voters: a.voters as usize,
        learners: a.learners as usize,
        jobs: a.jobs as usize,
        clients: a.clients as usize,
        image_bytes: a.image_bytes as usize,
    };
    let started = std::time::Instant::now();
    let report = chaos::sim::scale::run(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.summary());
        println!("{:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(report.failures.is_empty())
}

fn check(dir: PathBuf) -> anyhow::Result<bool> {
    let history: Vec<chaos::history::Record> = chaos::history::read_jsonl(&dir.join("history.jsonl"))?;
    let finals: Vec<chaos::history::FinalNode> =
        serde_json::from_slice(&std::fs::read(dir.join("finals.json")).context("reading finals.json")?)?;
    let report = chaos::checker::check(&history, &finals);
    print!("{}", report.summary());
    Ok(report.is_ok())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The simulation drops and delays messages on purpose: openraft's warnings
    // about it (about 90 MB of log in two minutes of `sim`) would bury the
    // report. RUST_LOG still turns them on.
    let default_filter = if matches!(cli.cmd, Cmd::Sim(_)) { "warn,openraft=off" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.cmd {
        Cmd::Run(a) => tokio::runtime::Runtime::new().map_err(Into::into).and_then(|rt| rt.block_on(run(a))),
        Cmd::Sim(a) => sim(a),
        Cmd::Scale(a) => scale(a),
        Cmd::Check { dir } => check(dir),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}
