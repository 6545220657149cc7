//! The result cache: which succeeded job holds the image a request would make.
//!
//! A model run with a fixed seed is a pure function of its weights and the
//! generation parameters, so a job identical to one that succeeded (same
//! model bytes, every parameter, the same seed) can be answered with the
//! stored image instead of running again. The key is a digest of exactly those
//! inputs; the cache maps it to the job whose image answers it.
//!
//! The cache is part of the replicated state (the state machine owns it and
//! keeps it consistent with retention: an entry goes when its job's image is
//! evicted or the job is forgotten), so every replica serves the same hits and
//! snapshots carry it. Jobs without a fixed seed are never keyed: their seed
//! was drawn by the leader, and a client asking again expects a new image.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::{Job, JobId, JobRequest};

/// sha256 over the model hash and every generation parameter (see [`key`]).
pub type CacheKey = [u8; 32];

/// The key of `request` run with `seed` by the model whose content hash is
/// `model_hash`, or `None` when the request has no fixed seed. Priority, the
/// `cache` flag and the webhook are not generation parameters and are left out.
/// Fields are length-prefixed, so no two requests share an encoding.
pub fn key(request: &JobRequest, seed: u64, model_hash: &str) -> Option<CacheKey> {
    request.seed?;
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"raftgen-result-cache-v1");
    field(request.model.as_bytes());
    field(model_hash.as_bytes());
    field(request.prompt.as_bytes());
    field(request.negative_prompt.as_bytes());
    field(&request.width.to_le_bytes());
    field(&request.height.to_le_bytes());
    field(&request.steps.to_le_bytes());
    field(&request.guidance.to_bits().to_le_bytes());
    field(&seed.to_le_bytes());
    // `None` (the model's default sampler) is keyed apart from any name.
    match &request.sampler {
        None => field(&[0]),
        Some(s) => field(&[&[1], s.as_bytes()].concat()),
    }
    Some(h.finalize().into())
}

/// The key a finished job's result answers: its request, the seed it ran
/// with and the hash of the model that made it.
pub fn job_key(job: &Job) -> Option<CacheKey> {
    key(&job.request, job.seed, job.model_hash.as_deref()?)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultCache {
    entries: BTreeMap<CacheKey, JobId>,
}

impl ResultCache {
    /// The job whose image answers `key`, if any.
    pub fn get(&self, key: &CacheKey) -> Option<JobId> {
        self.entries.get(key).copied()
    }

    /// Remembers a succeeded job's result (the newest result of a key wins:
    /// it is the last to be evicted).
    pub fn remember(&mut self, job: &Job) {
        if let Some(key) = job_key(job) {
            self.entries.insert(key, job.id);
        }
    }

    /// Forgets `job`'s result (its image is gone), unless its key already
    /// points at a newer job.
    pub fn forget(&mut self, job: &Job) {
        if let Some(key) = job_key(job) {
            if self.entries.get(&key) == Some(&job.id) {
                self.entries.remove(&key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&CacheKey, &JobId)> {
        self.entries.iter()
    }
}
