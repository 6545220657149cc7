//! Leader-side group commit: concurrent commands share log entries.
//!
//! openraft 0.9 appends one entry per `client_write` and waits for that
//! append's flush before taking the next, so a leader proposing commands one by
//! one commits at most one command per disk flush. The proposer collects the
//! commands that arrive while earlier entries are in flight and proposes them
//! as one [`Command::Batch`], keeping at most [`MAX_IN_FLIGHT`] entries in
//! flight. Each caller still gets its own response, only after the entry is
//! committed by a quorum and applied.

use openraft::error::{ClientWriteError, RaftError};
use raftgen_raft::command::MAX_BATCH_COMMANDS;
use raftgen_raft::{Command, Raft, Request, Response};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::node::app::{now_ms, Committed, ForwardReject};

/// Log entries proposed but not yet committed, at most.
const MAX_IN_FLIGHT: usize = 4;
/// A batch (one log entry) stops growing past this many bytes, so an
/// AppendEntries of `max_payload_entries` (16) entries stays under 1 MiB and
/// inside openraft's deadline of one heartbeat interval (see `config`).
pub const MAX_BATCH_BYTES: u64 = 64 << 10;
/// Commands waiting for a batch, at most; callers wait for room beyond it.
const MAX_QUEUED_COMMANDS: usize = 65_536;

type Reply = oneshot::Sender<Result<Committed, ForwardReject>>;

#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<(Command, Reply)>,
}

impl Proposer {
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(MAX_QUEUED_COMMANDS);
        tokio::spawn(run(raft, rx));
        Proposer { tx }
    }

    /// Proposes `cmd` (already stamped) and waits for its own response.
    pub async fn propose(&self, cmd: Command) -> Result<Committed, ForwardReject> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((cmd, reply)).await.map_err(|_| ForwardReject::Fatal("proposer stopped".into()))?;
        rx.await.map_err(|_| ForwardReject::Fatal("proposer stopped".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(Command, Reply)>) {
    let limits = crate::node::batch::Limits {
        max_in_flight: MAX_IN_FLIGHT,
        max_count: MAX_BATCH_COMMANDS,
        max_bytes: MAX_BATCH_BYTES,
    };
    let mut in_flight = JoinSet::new();
    while let Some(batch) = crate::node::batch::next(&mut rx, &mut in_flight, &limits, |(c, _)| c.approx_bytes()).await
    {
        in_flight.spawn(commit(raft.clone(), batch));
    }
}

async fn commit(raft: Raft, batch: Vec<(Command, Reply)>) {
    let (mut cmds, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
    let single = cmds.len() == 1;
    let cmd = if single { cmds.pop().expect("one command") } else { Command::Batch(cmds) };
    let result = raft.client_write(Request { at_ms: now_ms(), cmd }).await;
    let answers: Vec<Result<Committed, ForwardReject>> = match result {
        Ok(r) => match r.data {
            Response::Batch(responses) if !single && responses.len() == replies.len() => {
                responses.into_iter().map(|response| Ok(Committed { response, index: r.log_id.index })).collect()
            }
            response if single => vec![Ok(Committed { response, index: r.log_id.index })],
            other => {
                let msg = format!("batch answered with {other:?}");
                replies.iter().map(|_| Err(ForwardReject::Fatal(msg.clone()))).collect()
            }
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            replies.iter().map(|_| Err(ForwardReject::NotLeader { leader: f.leader_id })).collect()
        }
        Err(e) => replies.iter().map(|_| Err(ForwardReject::Fatal(e.to_string()))).collect(),
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}
