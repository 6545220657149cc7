//! A cluster of real `raftgen node` processes on 127.0.0.1, for the demo, the
//! cluster tests, the benchmark and the chaos runner: start, SIGKILL, SIGSTOP,
//! SIGCONT and restart nodes with their exact original command lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::Client;
use crate::tls::ClientTls;

pub struct NodeProc {
    pub id: u64,
    pub port: u16,
    pub args: Vec<String>,
    pub child: Option<Child>,
}

pub struct LocalCluster {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub secret: String,
    pub nodes: Vec<NodeProc>,
    /// When the nodes serve TLS: what this side trusts and presents (URLs are
    /// then `https://`). The nodes' own TLS flags go in their `extra` args.
    pub tls: Option<ClientTls>,
    /// Environment variables every node gets (an object store's
    /// credentials, for instance).
    pub env: Vec<(String, String)>,
}

/// A port that is free right now, chosen below Linux's ephemeral range
/// (32768 and up), so an outgoing connection cannot take it as its source port
/// between this check and the node binding it.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..1_000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found in 20000-31999")
}

fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions; pid is our own child.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl LocalCluster {
    /// Starts `n` nodes: node 1 with `--init`, the others `--join` node 1.
    /// `extra` is added to every node's command line. Ports are given by
    /// `ports` (or chosen free ones when empty).
    pub fn start(exe: &Path, dir: &Path, n: u64, ports: &[u16], extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_tls(exe, dir, n, ports, extra, None)
    }

    /// As [`LocalCluster::start`], every node with the environment `env`.
    pub fn start_env(exe: &Path, dir: &Path, n: u64, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::start_inner(exe, dir, n, &[], extra, None, env)
    }

    /// As [`LocalCluster::start`], for nodes serving TLS (given their TLS
    /// flags in `extra`) when `tls` is set.
    pub fn start_tls(
        exe: &Path,
        dir: &Path,
        n: u64,
        ports: &[u16],
        extra: &[&str],
        tls: Option<ClientTls>,
    ) -> anyhow::Result<Self> {
        Self::start_inner(exe, dir, n, ports, extra, tls, Vec::new())
    }

    fn start_inner(
        exe: &Path,
        dir: &Path,
        n: u64,
        ports: &[u16],
        extra: &[&str],
        tls: Option<ClientTls>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut cluster = LocalCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            secret: "raftgen-local-cluster".into(),
            nodes: Vec::new(),
            tls,
            env,
        };
        let ports: Vec<u16> = match ports {
            [] => (0..n).map(|_| free_port()).collect::<Result<_, _>>()?,
            p => p.to_vec(),
        };
        let first = format!("{}://127.0.0.1:{}", cluster.scheme(), ports[0]);
        for (i, port) in (1..=n).zip(ports) {
            let join = (i != 1).then_some(first.as_str());
            cluster.push_node(i, port, join, extra)?;
        }
        Ok(cluster)
    }

    /// Adds node `id` to the running cluster: started on a free port with
    /// `--join` node `join_via` (and `extra` on its command line).
    pub fn add_node(&mut self, id: u64, join_via: u64, extra: &[&str]) -> anyhow::Result<()> {
        if self.nodes.iter().any(|n| n.id == id) {
            bail!("node {id} already exists");
        }
        if !self.nodes.iter().any(|n| n.id == join_via) {
            bail!("no node {join_via} to join through");
        }
        let join = self.url(join_via);
        self.push_node(id, free_port()?, Some(&join), extra)
    }

    /// Records node `id` with its command line (`--init` without `join`) and starts it.
    fn push_node(&mut self, id: u64, port: u16, join: Option<&str>, extra: &[&str]) -> anyhow::Result<()> {
        let mut args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data".into(),
            self.dir.join(format!("n{id}")).display().to_string(),
        ];
        match join {
            None => args.push("--init".into()),
            Some(url) => args.extend(["--join".into(), url.to_string()]),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.nodes.push(NodeProc { id, port, args, child: None });
        self.spawn(id)
    }

    fn node(&mut self, id: u64) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.id == id).expect("known node id")
    }

    /// Starts (or restarts) node `id` with its original command line.
    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let (exe, secret, env) = (self.exe.clone(), self.secret.clone(), self.env.clone());
        let log_path = self.dir.join(format!("n{id}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let node = self.node(id);
        let child = Command::new(exe)
            .args(&node.args)
            .env("RAFTGEN_CLUSTER_SECRET", secret)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning a node")?;
        node.child = Some(child);
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn url(&self, id: u64) -> String {
        let node = self.nodes.iter().find(|n| n.id == id).expect("known node id");
        format!("{}://127.0.0.1:{}", self.scheme(), node.port)
    }

    pub fn client(&self, id: u64) -> Client {
        let client = Client::new(&self.url(id));
        match &self.tls {
            Some(tls) => client.with_tls(tls).expect("the cluster client's TLS files"),
            None => client,
        }
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.iter().find(|n| n.id == id)?.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown, no flush beyond what was acknowledged.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut child) = self.node(id).child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        signal(self.pid(id).context("node not running")?, libc::SIGSTOP)
    }

    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        signal(self.pid(id).context("node not running")?, libc::SIGCONT)
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut child) = self.node(id).child.take() {
            let _ = signal(child.id(), libc::SIGCONT);
            if signal(child.id(), libc::SIGTERM).is_err() {
                child.kill()?;
            }
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM without waiting: the node drains, then exits (see `drain`).
    pub fn terminate(&self, id: u64) -> anyhow::Result<()> {
        signal(self.pid(id).context("node not running")?, libc::SIGTERM)
    }

    /// Waits for node `id` to exit by itself (after [`Self::terminate`]),
    /// polling for at most `timeout`; returns its exit status.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let node = self.node(id);
        let child = node.child.as_mut().context("node not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                node.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node {id} still running after {} ms", timeout.as_millis());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    /// Waits until `via` reports `expect` members, a leader, and every member
    /// registered with at least `min_slots` slots.
    pub async fn wait_ready(&self, via: u64, expect: usize, min_slots: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(c) = self.client(via).get("/v1/cluster").await {
                let members = c["members"].as_array().cloned().unwrap_or_default();
                let registered =
                    members.iter().all(|m| !m["executor"].is_null() && m["slots"].as_u64().unwrap_or(0) >= min_slots);
                if let (Some(leader), true, true) = (c["leader_id"].as_u64(), members.len() == expect, registered) {
                    return Ok(leader);
                }
            }
            if Instant::now() > deadline {
                bail!("cluster not ready after {} ms; logs in {}", timeout.as_millis(), self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader as seen by node `via`.
    pub async fn leader(&self, via: u64) -> anyhow::Result<u64> {
        let c = self.client(via).get("/v1/cluster?local=1").await?;
        c["leader_id"].as_u64().context("no leader")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
