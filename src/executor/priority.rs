//! The executor's threads run at a lower CPU priority than the rest of the
//! node.
//!
//! A diffusion run keeps every core busy for seconds to minutes; the Raft
//! core's heartbeats need a few microseconds of CPU every 25 ms. On a machine
//! with fewer cores than busy threads (this project's 2-core machines; a GPU
//! node feeding its GPU), the scheduler shares the cores evenly unless told
//! otherwise, and a heartbeat late by more than the followers' election
//! timeout deposes a healthy leader. So every thread that runs model code
//! (the blocking thread that calls the executor, and the rayon pool that
//! candle's CPU kernels use) is given a higher nice value
//! (`--executor-nice`, 10 by default): Linux's scheduler then gives the
//! node's other threads about ten times their share and wakes them first.
//!
//! Linux applies `setpriority(PRIO_PROCESS, tid, …)` to one thread, which is
//! what is used here; elsewhere this does nothing. Raising a nice value needs
//! no privilege; lowering it back would, so a thread is never restored (the
//! executor's threads are only ever niced).

use std::sync::atomic::{AtomicI32, Ordering};

/// The nice value applied to executor threads (0: leave them alone).
static NICE: AtomicI32 = AtomicI32::new(0);

/// The highest nice value Linux accepts.
pub const MAX_NICE: i32 = 19;

/// Sets the nice value for executor threads and builds the global rayon pool
/// (candle's CPU kernels) with threads that take it as they start. Call it
/// once, before any model code runs; the pool is built at most once per
/// process (a second call only changes the value for new callers).
pub fn configure(nice: i32) {
    NICE.store(nice.clamp(0, MAX_NICE), Ordering::Relaxed);
    let built = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("raftgen-compute-{i}"))
        .start_handler(|_| lower_this_thread())
        .build_global();
    if built.is_err() {
        tracing::debug!("the global rayon pool already existed: its threads keep their priority");
    }
}

/// Gives the calling thread the executor's nice value (once set, it stays).
pub fn lower_this_thread() {
    let nice = NICE.load(Ordering::Relaxed);
    if nice > 0 {
        set_this_thread(nice);
    }
}

/// This thread's nice value, as the kernel reports it (None where unknown).
pub fn this_thread() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and getpriority take no pointers; errno is reset
        // first because -1 is also a valid priority.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            let p = libc::getpriority(libc::PRIO_PROCESS, tid);
            if p == -1 && *libc::__errno_location() != 0 {
                return None;
            }
            Some(p)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

fn set_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // Only ever raised: lowering needs CAP_SYS_NICE.
        if this_thread().is_some_and(|now| now >= nice) {
            return;
        }
        // SAFETY: no pointers; the tid names the calling thread.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if rc != 0 {
            tracing::debug!("setpriority({nice}) failed: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_thread_is_niced_and_others_are_not() {
        let before = this_thread().unwrap();
        NICE.store(before + 5, Ordering::Relaxed);
        let inside = std::thread::spawn(|| {
            lower_this_thread();
            this_thread().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + 5).min(MAX_NICE));
        assert_eq!(this_thread().unwrap(), before, "only the calling thread changes");
        NICE.store(0, Ordering::Relaxed);
    }
}
