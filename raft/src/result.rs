//! Result metadata: what the replicated state knows about a result image.
//!
//! Why: the Raft log is the control plane. Every entry goes to every node, is
//! written to every node's log and held in every node's memory and snapshot,
//! so an image in an entry costs its size times the node count, again at
//! every snapshot, and makes entries big enough to stall heartbeats. The log
//! therefore carries only what names and locates an image (its sha256, size,
//! dimensions, and the nodes or the object-store key that hold it); the bytes
//! travel on the data plane (`src/node/results/`), between the nodes that
//! store them.
//!
//! Images are content-addressed: the sha256 names the bytes in every store,
//! lets any reader verify what it got, and lets jobs with the same image
//! (result-cache hits, seeded re-runs) share one stored copy ([`Blob::refs`]).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::{NodeId, MAX_IMAGE_BYTES, MAX_IMAGE_SIDE_PX};

/// Most nodes one result's location may list.
pub const MAX_RESULT_HOLDERS: usize = 64;
/// Longest object-store key, in bytes.
pub const MAX_OBJECT_KEY_BYTES: usize = 1_024;

/// The sha256 of a result PNG: its name in every store.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResultHash(pub [u8; 32]);

impl ResultHash {
    pub fn of(bytes: &[u8]) -> Self {
        ResultHash(Sha256::digest(bytes).into())
    }

    /// The hash as 64 lowercase hex digits (file names, URLs, ETags).
    pub fn hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ResultHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ResultHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResultHash({:.12})", self.to_string())
    }
}

impl FromStr for ResultHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || "a result hash is 64 hexadecimal characters".to_string();
        if s.len() != 64 || !s.is_ascii() {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(ResultHash(out))
    }
}

/// Where a result's bytes are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// Durable in these nodes' embedded stores (each verified the sha256 and
    /// synced the file before the result was reported).
    Nodes(BTreeSet<NodeId>),
    /// In the cluster's object store, under this key.
    Object(String),
}

impl Location {
    /// The holders, for a result kept on nodes (none for an object).
    pub fn nodes(&self) -> Option<&BTreeSet<NodeId>> {
        match self {
            Location::Nodes(n) => Some(n),
            Location::Object(_) => None,
        }
    }
}

/// What a `Complete` says about the image it made: no bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub sha256: ResultHash,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    pub location: Location,
}

impl ResultMeta {
    /// Checks the bounds `apply` relies on; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.bytes == 0 {
            return Err("empty result image".into());
        }
        if self.bytes > MAX_IMAGE_BYTES as u64 {
            return Err(format!("result image of {} bytes exceeds {MAX_IMAGE_BYTES} bytes", self.bytes));
        }
        for side in [self.width, self.height] {
            if side == 0 || side > MAX_IMAGE_SIDE_PX {
                return Err(format!("result image side {side} (must be 1 to {MAX_IMAGE_SIDE_PX})"));
            }
        }
        match &self.location {
            Location::Nodes(n) if n.is_empty() || n.len() > MAX_RESULT_HOLDERS => {
                Err(format!("result held by {} nodes (must be 1 to {MAX_RESULT_HOLDERS})", n.len()))
            }
            Location::Object(k) if k.is_empty() || k.len() > MAX_OBJECT_KEY_BYTES => {
                Err(format!("object key of {} bytes (must be 1 to {MAX_OBJECT_KEY_BYTES})", k.len()))
            }
            _ => Ok(()),
        }
    }

    pub fn info(&self) -> ResultInfo {
        ResultInfo { sha256: self.sha256, bytes: self.bytes, width: self.width, height: self.height }
    }
}

/// A job's result as the job records it (kept after the image is evicted).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultInfo {
    pub sha256: ResultHash,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
}

/// One stored image: where it is, and how many retained jobs share it. It
/// leaves the state when the last of them is evicted or forgotten; the
/// holders then delete their copies (see `src/node/results/janitor.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub bytes: u64,
    pub location: Location,
    pub refs: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_print_and_parse_as_hex() {
        let h = ResultHash::of(b"abc");
        let hex = h.to_string();
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hex.parse::<ResultHash>(), Ok(h));
        assert!("ba78".parse::<ResultHash>().is_err());
        assert!(hex.replace('b', "g").parse::<ResultHash>().is_err());
        assert!("é".repeat(32).parse::<ResultHash>().is_err());
    }

    #[test]
    fn metadata_bounds() {
        let ok = ResultMeta {
            sha256: ResultHash::of(b"x"),
            bytes: 10,
            width: 8,
            height: 8,
            location: Location::Nodes(BTreeSet::from([1])),
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            ResultMeta { bytes: 0, ..ok.clone() },
            ResultMeta { bytes: MAX_IMAGE_BYTES as u64 + 1, ..ok.clone() },
            ResultMeta { width: 0, ..ok.clone() },
            ResultMeta { height: MAX_IMAGE_SIDE_PX + 1, ..ok.clone() },
            ResultMeta { location: Location::Nodes(BTreeSet::new()), ..ok.clone() },
            ResultMeta { location: Location::Nodes((0..65).collect()), ..ok.clone() },
            ResultMeta { location: Location::Object(String::new()), ..ok.clone() },
            ResultMeta { location: Location::Object("k".repeat(1025)), ..ok.clone() },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?}");
        }
    }
}
