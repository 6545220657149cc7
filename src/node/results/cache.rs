//! A bounded cache of result images this node fetched from others (a holder
//! or the object store), already checked against their hash, so a popular
//! image is fetched once, not once per request. Least recently used first
//! out, bounded by `--result-cache-mb`; 0 turns it off. Images are
//! immutable (named by their hash), so an entry is never stale.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::body::Bytes;
use raftgen_raft::result::ResultHash;

pub struct ResultCache {
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<ResultHash, (Bytes, u64)>,
    /// Use order: tick to hash; the smallest tick is the least recently used.
    order: BTreeMap<u64, ResultHash>,
    tick: u64,
    bytes: u64,
}

impl ResultCache {
    pub fn new(max_bytes: u64) -> Self {
        ResultCache { max_bytes, inner: Mutex::new(Inner::default()) }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, sha: &ResultHash) -> Option<Bytes> {
        let mut inner = self.inner();
        let inner = &mut *inner;
        let (bytes, tick) = inner.entries.get_mut(sha)?;
        inner.order.remove(tick);
        inner.tick += 1;
        *tick = inner.tick;
        inner.order.insert(inner.tick, *sha);
        Some(bytes.clone())
    }

    /// Keeps `bytes` (already verified), evicting the least recently used
    /// beyond the bound. An image larger than the whole cache is not kept.
    pub fn insert(&self, sha: ResultHash, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.max_bytes {
            return;
        }
        let mut inner = self.inner();
        let inner = &mut *inner;
        if inner.entries.contains_key(&sha) {
            return;
        }
        while inner.bytes + len > self.max_bytes {
            let Some((_, old)) = inner.order.pop_first() else { break };
            if let Some((b, _)) = inner.entries.remove(&old) {
                inner.bytes -= b.len() as u64;
            }
        }
        inner.tick += 1;
        inner.order.insert(inner.tick, sha);
        inner.entries.insert(sha, (bytes, inner.tick));
        inner.bytes += len;
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (usize, u64) {
        let inner = self.inner();
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> ResultHash {
        ResultHash([i; 32])
    }

    #[test]
    fn keeps_the_most_recently_used_within_its_bound() {
        let cache = ResultCache::new(30);
        cache.insert(h(1), Bytes::from(vec![1; 10]));
        cache.insert(h(2), Bytes::from(vec![2; 10]));
        cache.insert(h(3), Bytes::from(vec![3; 10]));
        assert!(cache.get(&h(1)).is_some()); // 1 is now the most recent
        cache.insert(h(4), Bytes::from(vec![4; 10])); // evicts 2
        assert!(cache.get(&h(2)).is_none());
        assert!(cache.get(&h(1)).is_some() && cache.get(&h(3)).is_some() && cache.get(&h(4)).is_some());
        assert_eq!(cache.usage(), (3, 30));
        cache.insert(h(5), Bytes::from(vec![5; 31])); // larger than the cache: not kept
        assert_eq!(cache.usage(), (3, 30));
        let off = ResultCache::new(0);
        off.insert(h(1), Bytes::from(vec![1; 1]));
        assert_eq!(off.usage(), (0, 0));
    }
}
