//! Follower-side batching of forwarded writes.
//!
//! Every client request a follower receives becomes a command for the leader.
//! Sending each in its own HTTP request would cost the leader one request per
//! command; instead the forwarder groups the commands waiting at the same time
//! into one `POST /raft/write` (a list of commands in, a list of answers out),
//! with a few batches in flight per leader. Commands are idempotent under
//! retry, so a batch that fails as a whole is simply retried by each caller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftgen_raft::command::MAX_BATCH_COMMANDS;
use raftgen_raft::network::{Scheme, SECRET_HEADER};
use raftgen_raft::{codec, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::node::app::{Committed, ForwardReject, PATH_FORWARD};

/// Batches in flight, at most, from this node.
const MAX_IN_FLIGHT: usize = 8;
/// A batch stops growing past this many bytes (the leader proposes each
/// command on its own, in entries of `proposer::MAX_BATCH_BYTES`).
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// Longest one forwarded batch may take; callers have their own deadlines.
const FORWARD_TIMEOUT_MS: u64 = 10_000;
/// Commands waiting for a batch, at most; callers wait for room beyond it.
const MAX_QUEUED_COMMANDS: usize = 65_536;

/// The leader's answer to one forwarded command, or why there is none.
pub type Forwarded = Result<Result<Committed, ForwardReject>, String>;
type Reply = oneshot::Sender<Forwarded>;

#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<(String, Command, Reply)>,
}

impl Forwarder {
    /// `scheme` says how `client` reaches the leader's port; the bytes of
    /// every forwarded batch are counted into `sent_bytes`.
    pub fn start(client: reqwest::Client, scheme: Scheme, secret: Arc<str>, sent_bytes: Arc<AtomicU64>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_QUEUED_COMMANDS);
        tokio::spawn(run(client, scheme, secret, sent_bytes, rx));
        Forwarder { tx }
    }

    /// Sends `cmd` to the leader at `addr` and waits for its answer.
    pub async fn forward(&self, addr: &str, cmd: Command) -> Forwarded {
        let (reply, rx) = oneshot::channel();
        self.tx.send((addr.to_string(), cmd, reply)).await.map_err(|_| "forwarder stopped".to_string())?;
        rx.await.map_err(|_| "forwarder stopped".to_string())?
    }
}

async fn run(
    client: reqwest::Client,
    scheme: Scheme,
    secret: Arc<str>,
    sent_bytes: Arc<AtomicU64>,
    mut rx: mpsc::Receiver<(String, Command, Reply)>,
) {
    let limits = crate::node::batch::Limits {
        max_in_flight: MAX_IN_FLIGHT,
        max_count: MAX_BATCH_COMMANDS,
        max_bytes: MAX_BATCH_BYTES,
    };
    let mut in_flight = JoinSet::new();
    while let Some(batch) =
        crate::node::batch::next(&mut rx, &mut in_flight, &limits, |(_, c, _)| c.approx_bytes()).await
    {
        let mut by_leader: HashMap<String, Vec<(Command, Reply)>> = HashMap::new();
        for (addr, cmd, reply) in batch {
            by_leader.entry(addr).or_default().push((cmd, reply));
        }
        for (addr, batch) in by_leader {
            let url = scheme.url(&addr, PATH_FORWARD);
            in_flight.spawn(send(client.clone(), url, secret.clone(), sent_bytes.clone(), batch));
        }
    }
}

async fn send(
    client: reqwest::Client,
    url: String,
    secret: Arc<str>,
    sent_bytes: Arc<AtomicU64>,
    batch: Vec<(Command, Reply)>,
) {
    let (cmds, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
    let answers = post(&client, &url, &secret, &sent_bytes, &cmds).await;
    match answers {
        Ok(answers) if answers.len() == replies.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(answers) => {
            let e = format!("leader answered {} of {} commands", answers.len(), replies.len());
            replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
        }
        Err(e) => replies.into_iter().for_each(|r| drop(r.send(Err(e.clone())))),
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    sent_bytes: &AtomicU64,
    cmds: &[Command],
) -> Result<Vec<Result<Committed, ForwardReject>>, String> {
    let body = codec::encode(cmds).map_err(|e| e.to_string())?;
    sent_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    let resp = client
        .post(url)
        .header(SECRET_HEADER, secret)
        .timeout(Duration::from_millis(FORWARD_TIMEOUT_MS))
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    codec::decode(&bytes).map_err(|e| e.to_string())
}
