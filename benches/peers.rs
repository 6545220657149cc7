//! raftgen against the systems it replaces or is compared with, in one
//! sitting, with the same load generator and the same durability promise:
//! every write counted was synced to stable storage before its answer.
//!
//!     cargo bench --bench peers
//!
//! - raftgen: 3 nodes on loopback (test-pattern executor with `--slots 0`:
//!   jobs queue and never run, so this is the submit path), `POST /v1/jobs`
//!   to the leader; a 202 means committed by a quorum, each of them synced
//!   (`syncfs`).
//! - etcd (`etcd` on the PATH, or RAFTGEN_BENCH_ETCD): 3 members on loopback
//!   with their defaults, `POST /v3/kv/put` through the JSON gateway to the
//!   leader; it fdatasyncs its WAL before answering.
//! - Redis (`redis-server`, or RAFTGEN_BENCH_REDIS): one server,
//!   `appendonly yes`, `appendfsync always`, `RPUSH` onto one list (a queue,
//!   like raftgen's); not replicated.
//!
//! Each write carries 200 bytes (the prompt, the value, the element). The
//! systems take turns, phase by phase, in an order that rotates each round,
//! so they share the machine's noise; medians over the rounds are printed
//! with ratios. A system whose binary is missing is skipped with a message.
//!
//! Environment: RAFTGEN_BENCH_SECS (per phase, default 10),
//! RAFTGEN_BENCH_ROUNDS (default 3), RAFTGEN_BENCH_NODE_ARGS (more raftgen
//! node flags, e.g. `--unsafe-no-fsync`), RAFTGEN_BENCH_OTHER_BIN (another
//! raftgen binary, run as a fourth system `raftgen-b` with the same flags:
//! an A/B of two builds in one sitting).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftgen::cli::local::{free_port, LocalCluster};
use serde_json::Value;

mod common;

use common::load::{self, Phase, Proto, PAYLOAD_BYTES};
use common::{env_u64, median, ms, percentile};

const EXE: &str = env!("CARGO_BIN_EXE_raftgen");
const CLIENTS: [usize; 2] = [1, 64];

/// Child processes killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn binary(var: &str, default: &str) -> Option<PathBuf> {
    let name = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    (found.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

async fn post_json(url: &str, body: &str) -> Option<Value> {
    let resp = reqwest::Client::new().post(url).body(body.to_string()).send().await.ok()?;
    resp.json().await.ok()
}

/// Starts 3 etcd members; returns the processes and the leader's client address.
async fn start_etcd(bin: &Path, dir: &Path) -> anyhow::Result<(Procs, String)> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let cluster: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, p))| format!("m{}=http://127.0.0.1:{p}", i + 1)).collect();
    let mut procs = Procs(Vec::new());
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("etcd{}.log", i + 1)))?;
        procs.0.push(
            Command::new(bin)
                .args(["--name", &format!("m{}", i + 1)])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd{}", i + 1)))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "raftgen-bench"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (client, _) in &ports {
            let url = format!("http://127.0.0.1:{client}/v3/maintenance/status");
            if let Some(s) = post_json(&url, "{}").await {
                if s["leader"].is_string() && s["leader"] == s["header"]["member_id"] {
                    return Ok((procs, format!("127.0.0.1:{client}")));
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "etcd elected no leader in 30 s; logs in {}", dir.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_redis(bin: &Path, dir: &Path) -> anyhow::Result<(Procs, String)> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("redis.log"))?;
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir)
        .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()?;
    let procs = Procs(vec![child]);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").await.is_ok() && s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n" {
                return Ok((procs, addr));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "redis did not answer in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct System {
    name: &'static str,
    proto: Proto,
    addr: String,
    /// Per client count: the phases of every round.
    phases: Vec<Vec<Phase>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; this one has no unit tests.
    }
    let secs = env_u64("RAFTGEN_BENCH_SECS", 10);
    let rounds = env_u64("RAFTGEN_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let more = std::env::var("RAFTGEN_BENCH_NODE_ARGS").unwrap_or_default();
    let mut extra = vec!["--executor", "test-pattern", "--slots", "0", "--max-queue-depth", "100000000"];
    extra.extend(more.split_whitespace());
    let cluster = LocalCluster::start(Path::new(EXE), &dir.path().join("raftgen"), 3, &[], &extra).unwrap();
    let leader = cluster.wait_ready(1, 3, 0, Duration::from_secs(60)).await.unwrap();
    let mut systems = vec![System {
        name: "raftgen",
        proto: Proto::Raftgen,
        addr: cluster.url(leader).trim_start_matches("http://").to_string(),
        phases: Vec::new(),
    }];
    let mut keep = Vec::new();
    let mut other_cluster = None;
    if let Ok(other) = std::env::var("RAFTGEN_BENCH_OTHER_BIN") {
        let b = LocalCluster::start(Path::new(&other), &dir.path().join("raftgen-b"), 3, &[], &extra).unwrap();
        let leader = b.wait_ready(1, 3, 0, Duration::from_secs(60)).await.unwrap();
        println!("raftgen-b: {other}");
        systems.push(System {
            name: "raftgen-b",
            proto: Proto::Raftgen,
            addr: b.url(leader).trim_start_matches("http://").to_string(),
            phases: Vec::new(),
        });
        other_cluster = Some(b);
    }
    match binary("RAFTGEN_BENCH_ETCD", "etcd") {
        Some(bin) => {
            let d = dir.path().join("etcd");
            std::fs::create_dir_all(&d).unwrap();
            let (procs, addr) = start_etcd(&bin, &d).await.unwrap();
            let version = Command::new(&bin).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
            println!("etcd: {}", String::from_utf8_lossy(&version).lines().next().unwrap_or("?"));
            keep.push(procs);
            systems.push(System { name: "etcd", proto: Proto::Etcd, addr, phases: Vec::new() });
        }
        None => println!("etcd: not found (set RAFTGEN_BENCH_ETCD); skipped"),
    }
    match binary("RAFTGEN_BENCH_REDIS", "redis-server") {
        Some(bin) => {
            let d = dir.path().join("redis");
            std::fs::create_dir_all(&d).unwrap();
            let (procs, addr) = start_redis(&bin, &d).await.unwrap();
            let version = Command::new(&bin).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
            println!("redis: {}", String::from_utf8_lossy(&version).trim());
            keep.push(procs);
            systems.push(System { name: "redis", proto: Proto::Redis, addr, phases: Vec::new() });
        }
        None => println!("redis: not found (set RAFTGEN_BENCH_REDIS); skipped"),
    }
    println!(
        "{rounds} rounds of {secs} s per phase, {PAYLOAD_BYTES} B per write, clients {CLIENTS:?}, systems in turn; raftgen node args {more:?}"
    );
    for s in &mut systems {
        s.phases = CLIENTS.iter().map(|_| Vec::new()).collect();
    }
    for round in 0..rounds as usize {
        for (ci, &clients) in CLIENTS.iter().enumerate() {
            let n = systems.len();
            for k in 0..n {
                let s = &mut systems[(k + round) % n];
                let name = format!("round {} {} x{clients}", round + 1, s.name);
                let p = load::run(s.proto, std::slice::from_ref(&s.addr), clients, secs as f64, name).await;
                println!(
                    "{:<24} {:>9.0} writes/s  p50 {:>6.2} ms  p99 {:>7.2} ms  errors {}",
                    p.name,
                    p.per_sec(),
                    ms(percentile(&p.latencies, 0.5)),
                    ms(percentile(&p.latencies, 0.99)),
                    p.errors
                );
                s.phases[ci].push(p);
            }
        }
    }

    println!("\nmedians over {rounds} rounds");
    println!(
        "{:<10} {:>8} {:>12} {:>9} {:>9} {:>12} {:>12}",
        "system", "clients", "writes/s", "p50 ms", "p99 ms", "vs etcd", "vs redis"
    );
    let med = |s: &System, ci: usize| -> (f64, f64, f64) {
        let rate: Vec<f64> = s.phases[ci].iter().map(Phase::per_sec).collect();
        let p50: Vec<f64> = s.phases[ci].iter().map(|p| ms(percentile(&p.latencies, 0.5))).collect();
        let p99: Vec<f64> = s.phases[ci].iter().map(|p| ms(percentile(&p.latencies, 0.99))).collect();
        (median(&rate), median(&p50), median(&p99))
    };
    for (ci, clients) in CLIENTS.iter().enumerate() {
        for s in &systems {
            let (rate, p50, p99) = med(s, ci);
            let ratio = |other: &str| {
                systems.iter().find(|o| o.name == other).filter(|_| s.name.starts_with("raftgen")).map_or(
                    String::new(),
                    |o| {
                        let (mine, (r, p, _)) = (med(s, ci), med(o, ci));
                        format!("{:.2}x, p50 {:.2}x", mine.0 / r, mine.1 / p)
                    },
                )
            };
            println!(
                "{:<10} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>12} {:>12}",
                s.name,
                clients,
                rate,
                p50,
                p99,
                ratio("etcd"),
                ratio("redis")
            );
        }
    }
    println!("(ratios: raftgen's writes/s over theirs, and raftgen's p50 over theirs: below 1 is faster)");
    drop(keep);
    drop(other_cluster);
    drop(cluster);
}
