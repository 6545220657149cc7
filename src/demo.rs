//! `raftgen demo`: three node processes on loopback, a few prompts submitted
//! through a follower, the PNGs fetched from another node and written to disk.
//!
//! Until the candle executor lands, the demo nodes run the test-pattern
//! executor (a test double: synthetic images), and say so.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::cli::Client;

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Data directories and node logs (wiped at start).
    #[arg(long, default_value = "demo-data")]
    pub dir: PathBuf,
    /// Where the PNGs go.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Leave the cluster running (until Ctrl-C) after the prompts are done.
    #[arg(long)]
    pub keep_running: bool,
}

const PROMPTS: [&str; 4] = [
    "a red fox in snow",
    "a lighthouse at dusk, oil painting",
    "a bowl of ramen, studio photo",
    "a robot reading a book in a library",
];

/// Child processes, killed when dropped (also on error paths).
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            unsafe_free_term(c);
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// SIGTERM through the `kill` command (no unsafe code, no extra crate).
fn unsafe_free_term(c: &mut Child) {
    let ok = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status().is_ok_and(|s| s.success());
    if !ok {
        let _ = c.kill();
    }
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&a.nodes) {
        bail!("--nodes must be between 1 and 9");
    }
    let exe = std::env::current_exe().context("finding the raftgen binary")?;
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    std::fs::create_dir_all(&a.out)?;
    let url = |i: u64| format!("http://127.0.0.1:{}", a.base_port + i as u16);
    let mut nodes = Nodes(Vec::new());
    println!("starting {} nodes (executor: test-pattern, a test double that draws synthetic images)", a.nodes);
    for i in 1..=a.nodes {
        let log = std::fs::File::create(a.dir.join(format!("n{i}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "--id", &i.to_string(), "--listen", &format!("127.0.0.1:{}", a.base_port + i as u16)])
            .arg("--data")
            .arg(a.dir.join(format!("n{i}")))
            .args(["--executor", "test-pattern", "--test-pattern-delay-ms", "400"])
            .env("RAFTGEN_CLUSTER_SECRET", "raftgen-demo")
            .stdout(Stdio::null())
            .stderr(log);
        if i == 1 {
            cmd.arg("--init");
        } else {
            cmd.args(["--join", &url(1)]);
        }
        nodes.0.push(cmd.spawn().context("starting a node")?);
        println!("  node {i}: {}  (log: {})", url(i), a.dir.join(format!("n{i}.log")).display());
    }

    // Wait until every node is a member and has registered its executor.
    let deadline = Instant::now() + Duration::from_secs(60);
    let cluster = loop {
        if let Ok(c) = Client::new(&url(1)).get("/v1/cluster").await {
            let members = c["members"].as_array().cloned().unwrap_or_default();
            if members.len() as u64 == a.nodes && members.iter().all(|m| m["slots"].as_u64() > Some(0)) {
                break c;
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not form within 60 s; see the logs in {}", a.dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let leader = cluster["leader_id"].as_u64().unwrap_or(1);
    let follower = (1..=a.nodes).find(|i| *i != leader).unwrap_or(leader);
    let reader = (1..=a.nodes).rev().find(|i| *i != follower).unwrap_or(follower);
    println!("leader: node {leader}; submitting through node {follower}, fetching images from node {reader}");

    let submit_to = Client::new(&url(follower));
    let mut ids = Vec::new();
    for (n, prompt) in PROMPTS.iter().enumerate() {
        let body = json!({ "prompt": prompt, "width": 256, "height": 256, "steps": 8, "seed": n });
        let job = submit_to.submit(&body, Some(&format!("demo-{n}"))).await?;
        ids.push((job["id"].as_str().unwrap_or_default().to_string(), *prompt));
    }
    let read_from = Client::new(&url(reader));
    for (n, (id, prompt)) in ids.iter().enumerate() {
        let job = read_from.wait_job(id, Duration::from_secs(120), |_| {}).await?;
        if job["state"] != "succeeded" {
            bail!("job {id} ended {}: {}", job["state"], job["error"]);
        }
        let png = read_from.get_bytes(&format!("/v1/jobs/{id}/image")).await?;
        let path = a.out.join(format!("{n}.png"));
        std::fs::write(&path, &png)?;
        println!("  {}  node {}  {:>6} bytes  \"{prompt}\"", path.display(), job["node"], png.len());
    }
    println!("done: {} images in {}", ids.len(), a.out.display());
    if a.keep_running {
        println!("cluster still running; try: raftgen status --server {}   (Ctrl-C to stop)", url(1));
        tokio::signal::ctrl_c().await?;
    }
    drop(nodes);
    Ok(())
}
