//! openraft's async runtime for the simulation: tokio for everything (so
//! turmoil's paused, simulated clock drives every timer), except the random
//! numbers.
//!
//! Why a runtime of our own: openraft draws its election timeouts from
//! `AsyncRuntime::thread_rng()`, which for `TokioRuntime` is `rand::thread_rng()`
//! (seeded from the OS). Here it is a handle to one thread-local `StdRng` that
//! [`reseed`] sets from the simulation seed at the start of every run. turmoil
//! runs every simulated host on the calling thread, so one thread-local stream
//! is drawn from in one deterministic order. The simulated nodes use the same
//! stream for their own random choices (job ids, seeds, executor outcomes).
//! Tasks are spawned on the host's `LocalSet` (see [`SimRuntime::spawn`]).

use std::cell::RefCell;
use std::future::Future;
use std::io::Cursor;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use raftgen_raft::{Request, Response};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

thread_local! {
    static SIM_RNG: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
}

/// Restarts this thread's simulation random stream from `seed`.
pub fn reseed(seed: u64) {
    SIM_RNG.with(|r| *r.borrow_mut() = StdRng::seed_from_u64(seed));
}

/// A handle on this thread's simulation random stream (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct SimRng;

impl RngCore for SimRng {
    fn next_u32(&mut self) -> u32 {
        SIM_RNG.with(|r| r.borrow_mut().next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        SIM_RNG.with(|r| r.borrow_mut().next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        SIM_RNG.with(|r| r.borrow_mut().fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        SIM_RNG.with(|r| r.borrow_mut().try_fill_bytes(dest))
    }
}

/// A number in `range` from the simulation stream.
pub fn gen_range(range: std::ops::Range<u64>) -> u64 {
    SimRng.gen_range(range)
}

/// `true` with probability `per_mille / 1000`, from the simulation stream.
pub fn chance_per_mille(per_mille: u32) -> bool {
    per_mille > 0 && SimRng.gen_range(0..1000) < per_mille
}

/// [`openraft::TokioRuntime`] with [`SimRng`] as its random source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SimRuntime;

impl AsyncRuntime for SimRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = SimRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    /// On the host's `LocalSet`, not on the runtime: tokio files a runtime's
    /// tasks in shards by a process-wide task id and drops them shard by shard
    /// when the runtime is dropped (a simulated crash), so the order in which
    /// a crashed node's connections close, and with it the network's random
    /// draws, would depend on how many tasks the process spawned before. A
    /// `LocalSet` drops its tasks in spawn order.
    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn_local(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        SimRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

openraft::declare_raft_types!(
    /// raftgen's Raft types (same requests, responses, ids, nodes and snapshot
    /// data as `raftgen_raft::TypeConfig`) on the simulation runtime.
    pub SimTypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<SimTypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = SimRuntime,
);

pub type SimRaft = openraft::Raft<SimTypeConfig>;
pub type Entry = openraft::Entry<SimTypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
