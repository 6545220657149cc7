//! The cluster under test: real `raftgen node` processes, each with its own
//! sled data directory and log file, started, killed, paused and restarted by
//! the nemesis. Each node runs in its own network namespace when the run has a
//! [`Network`], or on 127.0.0.1 otherwise.
//!
//! Every process is killed when the [`Cluster`] is dropped, so a runner that
//! fails or panics leaves nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use super::netns::Network;
use crate::history::{FinalJob, FinalNode};

/// Header carrying the cluster secret (as `raftgen_raft::network::SECRET_HEADER`).
const SECRET_HEADER: &str = raftgen_raft::network::SECRET_HEADER;
/// A status request to one node.
const STATUS_TIMEOUT_MS: u64 = 500;
/// The final dump of one replica (every job it holds).
const DUMP_TIMEOUT_MS: u64 = 30_000;
/// Image reads of the final check in flight per node, tries per image (503
/// answers are retried), and the pause between tries.
const IMAGE_READS_IN_FLIGHT: usize = 16;
const IMAGE_READ_TRIES: usize = 5;
const IMAGE_READ_RETRY_MS: u64 = 500;

/// GETs one image: the sha256 (hex) of its bytes, or `error: …`.
async fn read_image(client: &reqwest::Client, url: &str) -> String {
    let mut last = String::new();
    for attempt in 0..IMAGE_READ_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(IMAGE_READ_RETRY_MS)).await;
        }
        match client.get(url).timeout(Duration::from_millis(DUMP_TIMEOUT_MS)).send().await {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => {
                    use sha2::Digest;
                    return sha2::Sha256::digest(&b).iter().map(|x| format!("{x:02x}")).collect();
                }
                Err(e) => last = format!("error: {e}"),
            },
            Ok(r) => last = format!("error: HTTP {}", r.status()),
            Err(e) => last = format!("error: {e}"),
        }
    }
    last
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `raftgen` binary.
    pub binary: PathBuf,
    pub work_dir: PathBuf,
    pub secret: String,
    /// Simulated run time of one job (the test-pattern executor).
    pub job_ms: u64,
    pub slots: u32,
    /// The leader re-queues a node's jobs after this long without an answer.
    pub node_timeout_ms: u64,
    /// The planted bug (`--unsafe-complete-before-durable`), for the test
    /// that shows the checker catches it.
    pub unsafe_complete_before_durable: bool,
}

struct Proc {
    child: Option<Child>,
    paused: bool,
    /// A member of the cluster (started and not removed).
    member: bool,
}

pub struct Cluster {
    spec: NodeSpec,
    procs: BTreeMap<u64, Proc>,
    ports: BTreeMap<u64, u16>,
    client: reqwest::Client,
}

/// One node's view of itself, from `/v1/cluster?local=1`.
#[derive(Clone, Debug)]
pub struct Status {
    pub term: u64,
    pub leader: Option<u64>,
    pub applied: u64,
    pub members: usize,
    pub queue_depth: u64,
    pub running: u64,
}

impl Cluster {
    /// Reserves an address for each of `ids` (the initial members and the
    /// spares that may join later) without starting anything.
    pub fn new(spec: NodeSpec, ids: &[u64], net: Option<&Network>) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&spec.work_dir).with_context(|| format!("creating {}", spec.work_dir.display()))?;
        let mut ports = BTreeMap::new();
        for &id in ids {
            let port = if net.is_some() {
                7000
            } else {
                // Bind then release an ephemeral port: it stays this node's
                // across restarts.
                std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
            };
            ports.insert(id, port);
        }
        let client =
            reqwest::Client::builder().connect_timeout(Duration::from_millis(300)).pool_max_idle_per_host(4).build()?;
        Ok(Cluster { spec, procs: BTreeMap::new(), ports, client })
    }

    pub fn addr(&self, id: u64, net: Option<&Network>) -> String {
        let host = net.map_or("127.0.0.1".to_string(), |n| n.ip(id));
        format!("{host}:{}", self.ports[&id])
    }

    pub fn url(&self, id: u64, net: Option<&Network>) -> String {
        format!("http://{}", self.addr(id, net))
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.spec.work_dir.join(format!("node{id}"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.spec.work_dir.join(format!("node{id}.log"))
    }

    /// Node ids that are members (started and not removed), running or not.
    pub fn members(&self) -> Vec<u64> {
        self.procs.iter().filter(|(_, p)| p.member).map(|(id, _)| *id).collect()
    }

    /// Members whose process runs (not killed; paused ones count).
    pub fn alive(&self) -> Vec<u64> {
        self.procs.iter().filter(|(_, p)| p.member && p.child.is_some()).map(|(id, _)| *id).collect()
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.procs.get(&id).is_some_and(|p| p.paused)
    }

    /// Starts (or restarts, from its data directory) node `id`. The first
    /// node initialises the cluster; the others join through `join_via`.
    pub fn start(&mut self, id: u64, init: bool, join_via: Option<u64>, net: Option<&Network>) -> anyhow::Result<()> {
        if self.procs.get(&id).is_some_and(|p| p.child.is_some()) {
            bail!("node {id} is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .with_context(|| format!("opening {}", self.log_path(id).display()))?;
        let listen = self.addr(id, net);
        let mut args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            listen,
            "--data".into(),
            self.data_dir(id).display().to_string(),
            "--executor".into(),
            "test-pattern".into(),
            "--test-pattern-delay-ms".into(),
            self.spec.job_ms.to_string(),
            "--slots".into(),
            self.spec.slots.to_string(),
            "--node-timeout-ms".into(),
            self.spec.node_timeout_ms.to_string(),
        ];
        if self.spec.unsafe_complete_before_durable {
            args.push("--unsafe-complete-before-durable".into());
        }
        if init {
            args.push("--init".into());
        }
        if let Some(via) = join_via {
            args.push("--join".into());
            args.push(self.url(via, net));
        }
        let mut cmd = match net {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.namespace(id)]).arg(&self.spec.binary);
                c
            }
            None => Command::new(&self.spec.binary),
        };
        cmd.args(&args)
            .env("RAFTGEN_CLUSTER_SECRET", &self.spec.secret)
            .env("RAFTGEN_LOG", std::env::var("RAFTGEN_CHAOS_NODE_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {}", self.spec.binary.display()))?;
        self.procs.insert(id, Proc { child: Some(child), paused: false, member: true });
        Ok(())
    }

    fn pid(&self, id: u64) -> anyhow::Result<i32> {
        match self.procs.get(&id).and_then(|p| p.child.as_ref()) {
            Some(c) => Ok(c.id() as i32),
            None => bail!("node {id} is not running"),
        }
    }

    fn signal(&self, id: u64, sig: i32) -> anyhow::Result<()> {
        let pid = self.pid(id)?;
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!("kill({pid}, {sig}) for node {id}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL: no shutdown, no flush beyond what was already acknowledged.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        if self.is_paused(id) {
            self.resume(id)?;
        }
        self.signal(id, libc::SIGKILL)?;
        let proc = self.procs.get_mut(&id).expect("checked by pid()");
        if let Some(mut child) = proc.child.take() {
            child.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes (a GC stall, a frozen VM).
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGSTOP)?;
        self.procs.get_mut(&id).expect("checked").paused = true;
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGCONT)?;
        self.procs.get_mut(&id).expect("checked").paused = false;
        Ok(())
    }

    /// SIGTERM and wait (bounded), for a node that left the cluster.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGTERM)?;
        let proc = self.procs.get_mut(&id).expect("checked");
        let mut child = proc.child.take().expect("checked");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn mark_removed(&mut self, id: u64) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.member = false;
        }
    }

    /// Whether a node process died on its own (a crash the nemesis did not cause).
    pub fn crashed(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (id, p) in &mut self.procs {
            if let Some(child) = p.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    out.push((*id, status.to_string()));
                    p.child = None;
                }
            }
        }
        out
    }

    /// The node's own view, or `None` when it does not answer in time.
    pub async fn status(&self, id: u64, net: Option<&Network>) -> Option<Status> {
        let url = format!("{}/v1/cluster?local=1", self.url(id, net));
        let resp = self.client.get(url).timeout(Duration::from_millis(STATUS_TIMEOUT_MS)).send().await.ok()?;
        let v: Value = resp.json().await.ok()?;
        let members = v["members"].as_array().map_or(0, Vec::len);
        let running = v["members"].as_array().map_or(0, |m| m.iter().filter_map(|n| n["running"].as_u64()).sum());
        Some(Status {
            term: v["term"].as_u64()?,
            leader: v["leader_id"].as_u64(),
            applied: v["applied_index"].as_u64().unwrap_or(0),
            members,
            queue_depth: v["queue_depth"].as_u64().unwrap_or(0),
            running,
        })
    }

    /// The leader the highest term agrees on, among the nodes that answer.
    pub async fn leader(&self, net: Option<&Network>) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for id in self.alive() {
            if self.is_paused(id) {
                continue;
            }
            if let Some(s) = self.status(id, net).await {
                if let Some(l) = s.leader {
                    if best.is_none_or(|(t, _)| s.term > t) {
                        best = Some((s.term, l));
                    }
                }
            }
        }
        best.map(|(_, l)| l)
    }

    /// Waits until every running member answers, agrees on one leader, and
    /// sees `members` members.
    pub async fn wait_healthy(&self, net: Option<&Network>, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        let want = self.members().len();
        loop {
            let mut leaders = Vec::new();
            let mut ok = true;
            for id in self.alive() {
                match self.status(id, net).await {
                    Some(s) if s.leader.is_some() && s.members == want => leaders.push(s.leader),
                    _ => ok = false,
                }
            }
            leaders.dedup();
            if ok && leaders.len() == 1 {
                return Ok(leaders[0].expect("checked"));
            }
            if Instant::now() > deadline {
                bail!("the cluster did not become healthy within {} ms", timeout.as_millis());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One replica's jobs, from its `/raft/dump`.
    pub async fn dump(&self, id: u64, net: Option<&Network>) -> anyhow::Result<FinalNode> {
        let url = format!("{}/raft/dump", self.url(id, net));
        let resp = self
            .client
            .get(url)
            .header(SECRET_HEADER, &self.spec.secret)
            .timeout(Duration::from_millis(DUMP_TIMEOUT_MS))
            .send()
            .await
            .with_context(|| format!("dumping node {id}"))?;
        if !resp.status().is_success() {
            bail!("dumping node {id}: HTTP {}", resp.status());
        }
        let v: Value = resp.json().await?;
        let jobs: Vec<FinalJob> = serde_json::from_value(v["jobs"].clone()).context("decoding the dump")?;
        Ok(FinalNode { node: id, last_applied: v["last_applied"].as_u64().unwrap_or(0), jobs, images_read: false })
    }

    /// Reads every kept result's image through node `id`'s public API, as a
    /// client would, and records the sha256 of what it answered (or why it
    /// could not): the checker requires every one readable and identical.
    pub async fn read_images(&self, node: &mut FinalNode, net: Option<&Network>) {
        node.images_read = true;
        let (id, jobs) = (node.node, &mut node.jobs);
        let base = self.url(id, net);
        let mut reads = tokio::task::JoinSet::new();
        let wanted: Vec<(usize, String)> =
            jobs.iter().enumerate().filter(|(_, j)| j.image_sha256.is_some()).map(|(i, j)| (i, j.id.clone())).collect();
        let mut next = wanted.into_iter();
        loop {
            while reads.len() < IMAGE_READS_IN_FLIGHT {
                let Some((i, job)) = next.next() else { break };
                let (client, url) = (self.client.clone(), format!("{base}/v1/jobs/{job}/image"));
                reads.spawn(async move { (i, read_image(&client, &url).await) });
            }
            let Some(done) = reads.join_next().await else { break };
            if let Ok((i, got)) = done {
                jobs[i].image_read = Some(got);
            }
        }
    }

    pub fn work_dir(&self) -> &Path {
        &self.spec.work_dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.values_mut() {
            if let Some(mut child) = p.child.take() {
                if p.paused {
                    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
