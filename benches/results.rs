//! Result storage benchmark (issue 14): what each result image costs a
//! cluster, with images in the Raft log ("before") and with the current
//! binary, side by side in one sitting.
//!
//!     tools/bench-results.sh        # builds the "before" binary, then runs this
//!     cargo bench --bench results   # the current binary alone (or with RAFTGEN_BENCH_BEFORE_BIN)
//!
//! Environment: RAFTGEN_BENCH_BEFORE_BIN (a raftgen binary to compare with;
//! unset: only the current one runs), RAFTGEN_BENCH_NODES (cluster sizes,
//! default `3,5,9`; learners past 5), RAFTGEN_BENCH_SIZES_KB (result sizes,
//! default `400,1500`), RAFTGEN_BENCH_IMAGES (results per run of the current
//! binary, default 1000), RAFTGEN_BENCH_BEFORE_IMAGES (of the "before"
//! binary, default 200: with images in the log every node holds and
//! rewrites all of them, which does not fit 9 nodes x 1,000 x 1.5 MB on this
//! machine), RAFTGEN_BENCH_DIR (data directories; default
//! target/bench-results: it must be a real disk, not tmpfs, for the
//! disk-write counts).
//!
//! Each run starts a fresh cluster on loopback: node 1 leads and runs no jobs
//! (`--slots 0`, so every byte it sends is for an image it did not make),
//! the others run the test-pattern TEST DOUBLE in its noise mode
//! (incompressible PNGs of about 3 bytes a pixel; the requested side gives
//! the size) with 2 slots each. The bench submits the images with
//! `"cache": false` from 16 clients spread over the nodes and waits until
//! all have succeeded. Per image it reports the disk bytes written by all
//! node processes together (`write_bytes` of /proc/PID/io: bytes sent to the
//! storage layer) and the bytes they passed to write syscalls (`wchar`,
//! network included), the bytes the leader sent to other nodes
//! (`raftgen_peer_sent_bytes_total`), images per second, and elections (how
//! far the highest term moved). Then it asks every node for a snapshot of
//! its state (`POST /raft/snapshot-now`) and reports the largest, per
//! retained job, and every node's RSS; for the current binary RSS is also
//! taken at a quarter and at half of the images, to show whether it grows
//! with the retained image bytes. Nothing here is asserted: the figures are
//! printed with the targets next to them, and the README records a
//! run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use raftgen::cli::local::LocalCluster;
use serde_json::{json, Value};

mod common;

use common::env_u64;

const EXE: &str = env!("CARGO_BIN_EXE_raftgen");
/// Concurrent submitting clients.
const CLIENTS: usize = 16;
/// Longest one run may take before it is reported unfinished.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Clone)]
struct Variant {
    name: &'static str,
    exe: PathBuf,
    images: usize,
}

#[derive(Clone, Copy, Default)]
struct ProcCounters {
    write_bytes: u64,
    wchar: u64,
}

fn proc_io(pid: u32) -> ProcCounters {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0);
    ProcCounters { write_bytes: field("write_bytes:"), wchar: field("wchar:") }
}

fn rss_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Sum of a metric family's samples in a Prometheus text page.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(http: &reqwest::Client, url: &str) -> String {
    match http.get(format!("{url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

struct Run {
    variant: &'static str,
    nodes: usize,
    image_bytes: u64,
    images: usize,
    secs: f64,
    disk_per_image: f64,
    wchar_per_image: f64,
    leader_sent_per_image: f64,
    elections: u64,
    snapshot_max_bytes: u64,
    retained_jobs: u64,
    /// (results so far, largest RSS of a node, mean RSS)
    rss: Vec<(usize, u64, u64)>,
    leader_changed: bool,
}

/// The side (a multiple of 8) whose noise PNG is about `bytes`.
fn side_for(bytes: u64) -> u32 {
    let side = ((bytes as f64 / 3.0).sqrt() / 8.0).round() as u32 * 8;
    side.clamp(8, 2048)
}

fn node_flags(slots: u32) -> Vec<String> {
    ["--executor", "test-pattern", "--test-pattern-noise", "--test-pattern-delay-ms", "20", "--slots"]
        .iter()
        .map(|s| s.to_string())
        .chain([slots.to_string()])
        .collect()
}

async fn run_once(v: &Variant, nodes: usize, size_kb: u64, dir: &Path) -> anyhow::Result<Run> {
    let image_bytes = size_kb * 1000;
    let side = side_for(image_bytes);
    let _ = std::fs::remove_dir_all(dir);
    let leader_flags = node_flags(0);
    let leader_args: Vec<&str> = leader_flags.iter().map(String::as_str).collect();
    let mut cluster = LocalCluster::start(&v.exe, dir, 1, &[], &leader_args)?;
    cluster.wait_ready(1, 1, 0, Duration::from_secs(60)).await?;
    let worker_flags = node_flags(2);
    let worker_args: Vec<&str> = worker_flags.iter().map(String::as_str).collect();
    for id in 2..=nodes as u64 {
        cluster.add_node(id, 1, &worker_args)?;
        // One at a time: a join is a membership change.
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster.wait_ready(1, id as usize, 0, Duration::from_millis(500)).await.is_err() {
            if Instant::now() > deadline {
                bail!("node {id} did not join; logs in {}", dir.display());
            }
        }
    }
    let ids: Vec<u64> = (1..=nodes as u64).collect();
    let urls: Vec<String> = ids.iter().map(|id| cluster.url(*id)).collect();
    let pids: Vec<u32> = ids.iter().map(|id| cluster.pid(*id).expect("running")).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let leader_url = urls[0].clone();
    let start_term = metric(&metrics(&http, &leader_url).await, "raftgen_raft_term") as u64;
    let io_before: Vec<ProcCounters> = pids.iter().map(|p| proc_io(*p)).collect();
    let sent_before = metric(&metrics(&http, &leader_url).await, "raftgen_peer_sent_bytes_total");
    let started = Instant::now();

    // Submit every image from CLIENTS clients, spread over the nodes.
    let next = Arc::new(AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for c in 0..CLIENTS {
        let (http, next, url) = (http.clone(), next.clone(), urls[c % urls.len()].clone());
        let total = v.images;
        submitters.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                let body = json!({"prompt": format!("bench image {i}"), "width": side, "height": side,
                                  "steps": 1, "cache": false, "model": "test-pattern"});
                let mut tries = 0;
                loop {
                    let r = http
                        .post(format!("{url}/v1/jobs"))
                        .header("idempotency-key", format!("bench-{i}"))
                        .json(&body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().as_u16() == 202 => break,
                        Ok(r) if tries < 20 => {
                            tracing_note(&format!("submit {i}: {}", r.status()));
                        }
                        Err(e) if tries < 20 => tracing_note(&format!("submit {i}: {e}")),
                        other => bail!("submit {i}: {other:?}"),
                    }
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }
    // Wait, sampling RSS at a quarter, a half and the end.
    let checkpoints = [v.images / 4, v.images / 2];
    let mut rss = Vec::new();
    let mut next_checkpoint = 0;
    let done_at = loop {
        let page = metrics(&http, &leader_url).await;
        let succeeded = metric(&page, "raftgen_jobs_succeeded_total") as usize;
        let failed = metric(&page, "raftgen_jobs_failed_total") as usize;
        if failed > 0 {
            bail!("{failed} job(s) failed; logs in {}", dir.display());
        }
        while next_checkpoint < checkpoints.len() && succeeded >= checkpoints[next_checkpoint] {
            let r: Vec<u64> = pids.iter().map(|p| rss_bytes(*p)).collect();
            rss.push((succeeded, *r.iter().max().unwrap_or(&0), r.iter().sum::<u64>() / r.len() as u64));
            next_checkpoint += 1;
        }
        if succeeded >= v.images {
            break started.elapsed();
        }
        if started.elapsed() > RUN_TIMEOUT {
            bail!("{succeeded} of {} images after {} s; logs in {}", v.images, RUN_TIMEOUT.as_secs(), dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for s in submitters {
        s.await??;
    }
    let io_after: Vec<ProcCounters> = pids.iter().map(|p| proc_io(*p)).collect();
    let page = metrics(&http, &leader_url).await;
    let sent_after = metric(&page, "raftgen_peer_sent_bytes_total");
    let leader_now = metric(&page, "raftgen_raft_is_leader") as u64 == 1;
    let mut end_term = 0;
    for url in &urls {
        end_term = end_term.max(metric(&metrics(&http, url).await, "raftgen_raft_term") as u64);
    }
    let r: Vec<u64> = pids.iter().map(|p| rss_bytes(*p)).collect();
    rss.push((v.images, *r.iter().max().unwrap_or(&0), r.iter().sum::<u64>() / r.len() as u64));

    // Snapshot sizes, once the figures above are taken (building one costs).
    let mut snapshot_max_bytes = 0;
    for url in &urls {
        let resp = http
            .post(format!("{url}/raft/snapshot-now"))
            .header(raftgen_raft::network::SECRET_HEADER, &cluster.secret)
            .timeout(Duration::from_secs(180))
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await?;
                snapshot_max_bytes = snapshot_max_bytes.max(v["bytes"].as_u64().unwrap_or(0));
            }
            Ok(r) => eprintln!("  snapshot on {url}: {}", r.status()),
            Err(e) => eprintln!("  snapshot on {url}: {e}"),
        }
    }
    // Every job is kept (--max-finished-jobs is far above the run's count).
    let retained_jobs = metric(&page, "raftgen_jobs_submitted_total") as u64;
    let images = v.images as f64;
    let sum = |f: &dyn Fn(&ProcCounters) -> u64| -> f64 {
        io_after.iter().zip(&io_before).map(|(a, b)| f(a).saturating_sub(f(b))).sum::<u64>() as f64
    };
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
    Ok(Run {
        variant: v.name,
        nodes,
        image_bytes: 3 * (side as u64) * (side as u64),
        images: v.images,
        secs: done_at.as_secs_f64(),
        disk_per_image: sum(&|c| c.write_bytes) / images,
        wchar_per_image: sum(&|c| c.wchar) / images,
        leader_sent_per_image: (sent_after - sent_before) / images,
        elections: end_term.saturating_sub(start_term),
        snapshot_max_bytes,
        retained_jobs,
        rss,
        leader_changed: !leader_now,
    })
}

fn tracing_note(msg: &str) {
    if std::env::var_os("RAFTGEN_BENCH_VERBOSE").is_some() {
        eprintln!("  {msg}");
    }
}

fn mb(b: f64) -> String {
    format!("{:.2} MB", b / 1e6)
}

fn print_run(r: &Run) {
    let img = r.image_bytes as f64;
    println!(
        "{:6} {} nodes, {} images of {:.0} KB: {:.1} images/s; per image: disk {} ({:.1}x), write syscalls {} ({:.1}x), \
         leader sent {} ({:.2}x); elections {}{}; snapshot {} ({:.0} B per retained job); RSS {}",
        r.variant,
        r.nodes,
        r.images,
        img / 1e3,
        r.images as f64 / r.secs,
        mb(r.disk_per_image),
        r.disk_per_image / img,
        mb(r.wchar_per_image),
        r.wchar_per_image / img,
        mb(r.leader_sent_per_image),
        r.leader_sent_per_image / img,
        r.elections,
        if r.leader_changed { " (leader changed)" } else { "" },
        mb(r.snapshot_max_bytes as f64),
        r.snapshot_max_bytes as f64 / r.retained_jobs.max(1) as f64,
        r.rss
            .iter()
            .map(|(n, max, mean)| format!("after {n}: max {} mean {}", mb(*max as f64), mb(*mean as f64)))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

fn list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` lists benchmarks; this one has no unit tests.
    }
    let nodes = list("RAFTGEN_BENCH_NODES", "3,5,9");
    let sizes = list("RAFTGEN_BENCH_SIZES_KB", "400,1500");
    let dir = std::env::var("RAFTGEN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-results"));
    let mut variants = Vec::new();
    if let Ok(before) = std::env::var("RAFTGEN_BENCH_BEFORE_BIN") {
        let images = env_u64("RAFTGEN_BENCH_BEFORE_IMAGES", 200) as usize;
        variants.push(Variant { name: "before", exe: PathBuf::from(before), images });
    } else {
        println!("RAFTGEN_BENCH_BEFORE_BIN is not set: the current binary alone (tools/bench-results.sh sets it)");
    }
    variants.push(Variant {
        name: "after",
        exe: PathBuf::from(EXE),
        images: env_u64("RAFTGEN_BENCH_IMAGES", 1000) as usize,
    });
    for v in &variants {
        if !v.exe.exists() {
            bail!("no binary at {}", v.exe.display());
        }
    }
    let mut runs: BTreeMap<(u64, usize, &'static str), Run> = BTreeMap::new();
    for &size in &sizes {
        for &n in &nodes {
            // Both variants of one configuration back to back, so they share
            // the machine's load; the order alternates between configurations.
            let order: Vec<&Variant> = if (runs.len() / variants.len()).is_multiple_of(2) {
                variants.iter().collect()
            } else {
                variants.iter().rev().collect()
            };
            for v in order {
                match run_once(v, n as usize, size, &dir.join(format!("{}-{n}-{size}", v.name))).await {
                    Ok(r) => {
                        print_run(&r);
                        runs.insert((size, n as usize, v.name), r);
                    }
                    Err(e) => println!("{:6} {n} nodes, {size} KB: FAILED: {e:#}", v.name),
                }
            }
        }
    }
    println!("\nratios (after / before, same configuration) and the issue's targets:");
    for &size in &sizes {
        for &n in &nodes {
            let (Some(a), b) = (runs.get(&(size, n as usize, "after")), runs.get(&(size, n as usize, "before"))) else {
                continue;
            };
            let img = a.image_bytes as f64;
            let mut line = format!(
                "{size} KB, {n} nodes: after leader sent {:.3}x the image (target <= 0.1)",
                a.leader_sent_per_image / img
            );
            if let Some(b) = b {
                line += &format!(
                    "; disk per image {:.2}x of before, leader bytes {:.3}x of before, images/s {:.2}x of before",
                    a.disk_per_image / b.disk_per_image,
                    a.leader_sent_per_image / b.leader_sent_per_image,
                    (a.images as f64 / a.secs) / (b.images as f64 / b.secs)
                );
            }
            println!("{line}");
        }
        if let (Some(small), Some(big)) = (
            nodes.first().and_then(|n| runs.get(&(size, *n as usize, "after"))),
            nodes.last().and_then(|n| runs.get(&(size, *n as usize, "after"))),
        ) {
            println!(
                "{size} KB: disk per image at {} nodes / at {} nodes: {:.2} (target <= 1.2)",
                big.nodes,
                small.nodes,
                big.disk_per_image / small.disk_per_image
            );
        }
    }
    Ok(())
}
