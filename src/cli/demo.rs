//! `raftgen demo`: three node processes on loopback, a few prompts submitted
//! through a follower, the PNGs fetched from another node and written to disk.
//!
//! The nodes run the real executor with the built-in model (`shapes-sd`: flat
//! shapes on a plain background, at 64x64; the prompts below are in its
//! vocabulary), or every model under `--models-dir` when given.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;

use crate::cli::local::LocalCluster;

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
    /// Node i listens on base-port + i.
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
    /// Leave the cluster running (until Ctrl-C) after the prompts are done.
    #[arg(long)]
    pub keep_running: bool,
    /// Serve the diffusers model folders under DIR too (passed to every node).
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// The model to use (default: the built-in shapes model).
    #[arg(long, default_value = crate::models::catalog::BUILTIN_MODEL)]
    pub model: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
}

/// In the built-in model's vocabulary ([`crate::models::catalog::BUILTIN_VOCABULARY`]).
const PROMPTS: [&str; 4] = [
    "a red circle on the left on a blue background",
    "a large yellow triangle in the middle on a black background",
    "there is a small white square at the top; the background is green",
    "a purple circle on the right and an orange square on the left, on a white background",
];

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&a.nodes) {
        bail!("--nodes must be between 1 and 9");
    }
    let exe = std::env::current_exe().context("finding the raftgen binary")?;
    let ports: Vec<u16> = (1..=a.nodes).map(|i| a.base_port + i as u16).collect();
    // A port already taken would only show as a cluster that never gets
    // ready: say which, at once.
    for port in &ports {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", *port)) {
            bail!(
                "port {port} on 127.0.0.1 is not free ({e}): another demo still running? Choose others with --base-port"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.out)?;
    let mut extra: Vec<String> = Vec::new();
    if let Some(dir) = &a.models_dir {
        let dir = dir.canonicalize().with_context(|| format!("--models-dir {}", dir.display()))?;
        extra.extend(["--models-dir".to_string(), dir.display().to_string()]);
    }
    println!("starting {} nodes (executor: diffusion, model '{}')", a.nodes, a.model);
    if a.model == crate::models::catalog::BUILTIN_MODEL {
        println!("  the built-in model draws {}", crate::models::catalog::BUILTIN_VOCABULARY);
        println!(
            "  (point --models-dir at a folder holding a diffusers model, e.g. stable-diffusion-v1-5, for others)"
        );
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let cluster = LocalCluster::start(&exe, &a.dir, a.nodes, &ports, &extra)?;
    for i in 1..=a.nodes {
        println!("  node {i}: {}  (log: {})", cluster.url(i), a.dir.join(format!("n{i}.log")).display());
    }
    let leader = cluster.wait_ready(1, a.nodes as usize, 1, Duration::from_secs(60)).await?;
    let follower = (1..=a.nodes).find(|i| *i != leader).unwrap_or(leader);
    let reader = (1..=a.nodes).rev().find(|i| *i != follower).unwrap_or(follower);
    println!("leader: node {leader}; submitting through node {follower}, fetching images from node {reader}");

    let submit_to = cluster.client(follower);
    let mut ids = Vec::new();
    for (n, prompt) in PROMPTS.iter().enumerate() {
        let body = json!({
            "prompt": prompt,
            "model": a.model,
            "width": a.size,
            "height": a.size,
            "steps": a.steps,
            "seed": n,
        });
        let job = submit_to.submit(&body, Some(&format!("demo-{n}"))).await?;
        ids.push((job["id"].as_str().unwrap_or_default().to_string(), *prompt));
    }
    let read_from = cluster.client(reader);
    for (n, (id, prompt)) in ids.iter().enumerate() {
        let job = read_from.wait_job(id, Duration::from_secs(1800), |_| {}).await?;
        if job["state"] != "succeeded" {
            bail!("job {id} ended {}: {}", job["state"], job["error"]);
        }
        let png = read_from.get_bytes(&format!("/v1/jobs/{id}/image")).await?;
        let path = a.out.join(format!("{n}.png"));
        std::fs::write(&path, &png)?;
        println!("  {}  node {}  {:>6} bytes  \"{prompt}\"", path.display(), job["node"], png.len());
    }
    let out = a.out.canonicalize().unwrap_or(a.out.clone());
    println!("done: {} images in {}", ids.len(), out.display());
    if a.keep_running {
        println!("cluster still running (Ctrl-C to stop); next:");
        println!("  open {}/ in a browser (the web page), or", cluster.url(1));
        println!(
            "  raftgen submit --server {} \"a green triangle at the bottom\" --wait --out tri.png",
            cluster.url(follower)
        );
        println!("  raftgen status --server {}", cluster.url(1));
        tokio::signal::ctrl_c().await?;
    } else {
        println!(
            "next: `raftgen demo --keep-running` leaves the cluster up for the web page and the CLI \
             (`--base-port` moves its ports); README: Running a cluster by hand"
        );
    }
    Ok(())
}
