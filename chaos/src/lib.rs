//! raftgen's chaos drills, in two forms that share one checker:
//!
//! - [`process`]: a real cluster of `raftgen` node processes, a client
//!   workload over HTTP, and a nemesis that kills, pauses, partitions and
//!   restarts nodes (wall clock; partitions need root for network namespaces);
//! - [`sim`]: the same state machine, scheduler decisions and openraft running
//!   on turmoil's simulated network and clock, one exactly-replayable run per
//!   seed.
//!
//! Both write a [`history`] that [`checker`] judges in Jepsen's queue terms.

pub mod checker;
pub mod history;
pub mod process;
pub mod sim;
