//! The one place where bytes are made: bincode 2 (serde mode) for the Raft log,
//! snapshots and node-to-node RPCs.
//!
//! Why one module: the wire and disk format is a decision, not a detail. Every
//! encode/decode goes through here, with one configuration and one size limit,
//! so changing the format (or bumping its version) touches a single file.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Hard upper bound on one decoded value (a log entry, an RPC, a snapshot).
/// Larger inputs are rejected instead of allocating without bound.
pub const MAX_DECODE_BYTES: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(String);

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError(format!("{} trailing bytes after value", bytes.len() - used)));
    }
    Ok(value)
}
