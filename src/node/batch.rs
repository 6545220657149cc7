//! The batching loop shared by the leader's proposer and the followers'
//! forwarder: wait for a free in-flight slot, take the first waiting item, then
//! every item already waiting, up to a count and a byte budget.

use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub struct Limits {
    pub max_in_flight: usize,
    pub max_count: usize,
    pub max_bytes: u64,
}

/// The next batch, or `None` once every sender is gone.
pub async fn next<T>(
    rx: &mut mpsc::Receiver<T>,
    in_flight: &mut JoinSet<()>,
    limits: &Limits,
    bytes: impl Fn(&T) -> u64,
) -> Option<Vec<T>> {
    loop {
        while in_flight.len() >= limits.max_in_flight {
            in_flight.join_next().await;
        }
        let first = tokio::select! {
            next = rx.recv() => next?,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
        };
        let mut size = bytes(&first);
        let mut batch = vec![first];
        while batch.len() < limits.max_count && size < limits.max_bytes {
            let Ok(item) = rx.try_recv() else { break };
            size += bytes(&item);
            batch.push(item);
        }
        return Some(batch);
    }
}
