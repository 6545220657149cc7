//! The nemesis: the faults a process run injects, each selectable and
//! combinable, and how each is made and healed. A fault is recorded in the
//! history when it begins (`FaultStart`) and when it is healed (`FaultEnd`),
//! so the checker can measure the unavailability it caused.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::cluster::Cluster;
use super::netns::Network;
use super::workload::Recorder;
use crate::history::Record;

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL the leader, restart it from its data directory after a while.
    KillLeader,
    /// SIGKILL a random node, restart it after a while.
    KillRandom,
    /// SIGSTOP the leader for longer than an election timeout, then SIGCONT.
    PauseLeader,
    /// Cut the leader off from every other node, both ways.
    PartitionLeader,
    /// Split the nodes into a random majority and minority.
    PartitionHalf,
    /// Cut the leader's outgoing traffic only: it still hears the others.
    PartitionOneway,
    /// Drop a share of every node-to-node packet.
    PacketLoss,
    /// Start a new node, let it join and take jobs, then remove it.
    JoinLeave,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::KillLeader,
        FaultKind::KillRandom,
        FaultKind::PauseLeader,
        FaultKind::PartitionLeader,
        FaultKind::PartitionHalf,
        FaultKind::PartitionOneway,
        FaultKind::PacketLoss,
        FaultKind::JoinLeave,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillRandom => "kill-random",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::PartitionHalf => "partition-half",
            FaultKind::PartitionOneway => "partition-oneway",
            FaultKind::PacketLoss => "packet-loss",
            FaultKind::JoinLeave => "join-leave",
        }
    }

    /// Whether the fault needs the namespaced network.
    pub fn needs_network(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionLeader | FaultKind::PartitionHalf | FaultKind::PartitionOneway | FaultKind::PacketLoss
        )
    }
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown fault '{s}'; one of {}", names.join(", "))
        })
    }
}

/// Parses `kill-leader=100,partition-half=10,pause-leader` (a kind without a
/// count happens once) into the list of faults to inject, in order.
pub fn parse_schedule(spec: &str) -> Result<Vec<FaultKind>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = match part.split_once('=') {
            Some((n, c)) => (n, c.parse::<usize>().map_err(|_| format!("'{part}': the count must be a number"))?),
            None => (part, 1),
        };
        out.extend(std::iter::repeat_n(name.parse::<FaultKind>()?, count));
    }
    Ok(out)
}

/// How long each fault lasts.
#[derive(Clone, Debug)]
pub struct Durations {
    /// A killed node stays down this long before it is restarted.
    pub down_ms: u64,
    /// A paused node stays frozen this long.
    pub pause_ms: u64,
    /// Partitions and packet loss last this long.
    pub partition_ms: u64,
    /// Share of packets dropped by `packet-loss`.
    pub loss_percent: u8,
}

/// What the nemesis needs to act: the cluster, the network (if any), the
/// history, the clients' node list, and the spare ids for `join-leave`.
pub struct Nemesis<'a> {
    pub cluster: &'a mut Cluster,
    pub net: Option<&'a mut Network>,
    pub rec: Recorder,
    pub client_nodes: std::sync::Arc<std::sync::Mutex<Vec<(u64, String)>>>,
    pub spares: Vec<u64>,
    pub durations: Durations,
    pub rng: StdRng,
    pub http: reqwest::Client,
    pub secret: String,
}

impl Nemesis<'_> {
    fn net(&self) -> Option<&Network> {
        self.net.as_deref()
    }

    async fn leader(&self) -> anyhow::Result<u64> {
        for _ in 0..50 {
            if let Some(l) = self.cluster.leader(self.net()).await {
                return Ok(l);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no leader to aim at")
    }

    fn start(&self, id: u32, fault: FaultKind, nodes: Vec<u64>) {
        self.rec.push(Record::FaultStart { at_ms: self.rec.now_ms(), id, fault: fault.name().into(), nodes });
    }

    fn end(&self, id: u32) {
        self.rec.push(Record::FaultEnd { at_ms: self.rec.now_ms(), id });
    }

    fn restart(&mut self, node: u64) -> anyhow::Result<()> {
        let net = self.net.as_deref();
        self.cluster.start(node, false, None, net)?;
        self.rec.push(Record::NodeStart { at_ms: self.rec.now_ms(), node });
        Ok(())
    }

    /// Injects fault number `id` of kind `kind`, holds it, and heals it.
    pub async fn inject(&mut self, id: u32, kind: FaultKind) -> anyhow::Result<()> {
        let d = self.durations.clone();
        match kind {
            FaultKind::KillLeader | FaultKind::KillRandom => {
                let victim = if kind == FaultKind::KillLeader {
                    self.leader().await?
                } else {
                    let alive = self.cluster.alive();
                    *alive.choose(&mut self.rng).context("no node to kill")?
                };
                self.start(id, kind, vec![victim]);
                self.cluster.kill(victim)?;
                tokio::time::sleep(Duration::from_millis(d.down_ms)).await;
                self.restart(victim)?;
                self.end(id);
            }
            FaultKind::PauseLeader => {
                let victim = self.leader().await?;
                self.start(id, kind, vec![victim]);
                self.cluster.pause(victim)?;
                tokio::time::sleep(Duration::from_millis(d.pause_ms)).await;
                self.cluster.resume(victim)?;
                self.end(id);
            }
            FaultKind::PartitionLeader | FaultKind::PartitionOneway => {
                let leader = self.leader().await?;
                let others: Vec<u64> = self.cluster.members().into_iter().filter(|n| *n != leader).collect();
                self.start(id, kind, vec![leader]);
                let net = self.net.as_deref_mut().context("partitions need the namespaced network")?;
                if kind == FaultKind::PartitionLeader {
                    net.partition(&[leader], &others)?;
                } else {
                    for o in &others {
                        net.cut_oneway(leader, *o)?;
                    }
                }
                tokio::time::sleep(Duration::from_millis(d.partition_ms)).await;
                self.net.as_deref_mut().expect("checked").heal()?;
                self.end(id);
            }
            FaultKind::PartitionHalf => {
                let mut members = self.cluster.members();
                members.shuffle(&mut self.rng);
                let minority: Vec<u64> = members[..members.len() / 2].to_vec();
                let majority: Vec<u64> = members[members.len() / 2..].to_vec();
                self.start(id, kind, minority.clone());
                let net = self.net.as_deref_mut().context("partitions need the namespaced network")?;
                net.partition(&minority, &majority)?;
                tokio::time::sleep(Duration::from_millis(d.partition_ms)).await;
                self.net.as_deref_mut().expect("checked").heal()?;
                self.end(id);
            }
            FaultKind::PacketLoss => {
                self.start(id, kind, self.cluster.members());
                let net = self.net.as_deref_mut().context("packet loss needs the namespaced network")?;
                net.lossy(d.loss_percent)?;
                tokio::time::sleep(Duration::from_millis(d.partition_ms)).await;
                self.net.as_deref_mut().expect("checked").heal()?;
                self.end(id);
            }
            FaultKind::JoinLeave => self.join_leave(id).await?,
        }
        Ok(())
    }

    /// A new node joins through a random member, serves for a while, is
    /// removed through another random member (it drains first), and stops.
    async fn join_leave(&mut self, id: u32) -> anyhow::Result<()> {
        let Some(newcomer) = self.spares.pop() else {
            bail!("no spare node id left for join-leave");
        };
        let via = *self.cluster.alive().choose(&mut self.rng).context("no member to join through")?;
        self.start(id, FaultKind::JoinLeave, vec![newcomer]);
        let net = self.net.as_deref();
        self.cluster.start(newcomer, false, Some(via), net)?;
        self.rec.push(Record::NodeStart { at_ms: self.rec.now_ms(), node: newcomer });
        self.cluster.wait_healthy(self.net(), Duration::from_secs(30)).await.context("joining")?;
        let url = self.cluster.url(newcomer, self.net());
        self.client_nodes.lock().expect("nodes lock").push((newcomer, url));
        tokio::time::sleep(Duration::from_millis(self.durations.partition_ms)).await;

        self.client_nodes.lock().expect("nodes lock").retain(|(n, _)| *n != newcomer);
        let others: Vec<u64> = self.cluster.alive().into_iter().filter(|n| *n != newcomer).collect();
        let mut left = false;
        for _ in 0..20 {
            let through = *others.choose(&mut self.rng).context("no member to leave through")?;
            let url = format!("{}/v1/cluster/nodes/{newcomer}", self.cluster.url(through, self.net()));
            let resp = self
                .http
                .delete(url)
                .header(raftgen_raft::network::SECRET_HEADER, &self.secret)
                .timeout(Duration::from_secs(60))
                .send()
                .await;
            if matches!(&resp, Ok(r) if r.status().is_success()) {
                left = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !left {
            bail!("node {newcomer} could not be removed");
        }
        self.cluster.mark_removed(newcomer);
        self.cluster.stop(newcomer)?;
        self.end(id);
        Ok(())
    }

    /// A random pause between faults, so they do not line up with timers.
    pub fn jitter_ms(&mut self, max_ms: u64) -> u64 {
        self.rng.gen_range(0..=max_ms)
    }
}
