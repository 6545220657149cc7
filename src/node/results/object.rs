//! Result images in an object store, for clusters that have one:
//! `--result-store s3://bucket/prefix` (also `gs://`, `az://`, and
//! `file:///mnt/shared` for a shared file system), through the
//! `object_store` crate, with credentials from the standard environment
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as each provider's own tools read them).
//!
//! The node that made a result uploads it before reporting it; readers fetch
//! it from the store (and check its hash). Keys are
//! `PREFIX/<sha256>.<job>-<attempt>.png`: unique per attempt, so a key that
//! the state has let go of (its job evicted, or a second upload of the same
//! image) is never written again, and deleting it can never remove an
//! upload that a later report is about to name. The leader deletes the keys
//! the state queues (see `janitor`), and sweeps the prefix for uploads that
//! no report named (an executor that died between upload and report).
//!
//! `s3://`, `gs://` and `az://` stores can presign a GET for a limited time
//! (`--presign-ttl-s`): OpenAI's `response_format: "url"` then hands out the
//! store's URL instead of the node's.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use raftgen_raft::job::JobId;
use raftgen_raft::result::ResultHash;

pub struct ObjectResults {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
    /// The URL as given, for messages.
    pub url: String,
}

/// One object under the prefix, as a listing shows it.
pub struct Listed {
    pub key: String,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: u64,
}

impl ObjectResults {
    /// Opens the store named by `url` (`s3://bucket[/prefix]`, `gs://…`,
    /// `az://container[/prefix]`, `file:///dir`). Nothing is contacted yet.
    pub fn open(url: &str) -> anyhow::Result<ObjectResults> {
        let (scheme, rest) =
            url.split_once("://").context("--result-store must be a URL such as s3://bucket/prefix")?;
        let (store, signer, prefix): (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>, &str) = match scheme {
            "s3" | "gs" | "az" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    bail!("--result-store {url}: no bucket");
                }
                let base = format!("{scheme}://{bucket}");
                match scheme {
                    "s3" => {
                        let s = Arc::new(
                            object_store::aws::AmazonS3Builder::from_env()
                                .with_url(base)
                                .build()
                                .with_context(|| format!("--result-store {url}"))?,
                        );
                        (s.clone(), Some(s), prefix)
                    }
                    "gs" => {
                        let s = Arc::new(
                            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                                .with_url(base)
                                .build()
                                .with_context(|| format!("--result-store {url}"))?,
                        );
                        (s.clone(), Some(s), prefix)
                    }
                    _ => {
                        let s = Arc::new(
                            object_store::azure::MicrosoftAzureBuilder::from_env()
                                .with_url(base)
                                .build()
                                .with_context(|| format!("--result-store {url}"))?,
                        );
                        (s.clone(), Some(s), prefix)
                    }
                }
            }
            "file" => {
                if !rest.starts_with('/') {
                    bail!("--result-store {url}: a file:// URL needs an absolute path (file:///mnt/shared)");
                }
                std::fs::create_dir_all(rest).with_context(|| format!("--result-store {url}: creating {rest}"))?;
                let s = object_store::local::LocalFileSystem::new_with_prefix(rest)
                    .with_context(|| format!("--result-store {url}"))?;
                (Arc::new(s), None, "")
            }
            other => bail!("--result-store {url}: unknown scheme {other}:// (s3, gs, az or file)"),
        };
        Ok(ObjectResults { store, signer, prefix: prefix.trim_matches('/').to_string(), url: url.to_string() })
    }

    /// Whether the store can presign URLs (not `file://`).
    pub fn can_presign(&self) -> bool {
        self.signer.is_some()
    }

    /// The key of one attempt's upload.
    pub fn key(&self, sha: &ResultHash, job: JobId, attempt: u32) -> String {
        let name = format!("{sha}.{job}-{attempt}.png");
        if self.prefix.is_empty() {
            name
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// Whether `key` is one of ours (under the prefix, named like [`Self::key`]).
    fn ours(&self, key: &str) -> bool {
        let name = match self.prefix.as_str() {
            "" => key,
            p => match key.strip_prefix(p).and_then(|k| k.strip_prefix('/')) {
                Some(n) => n,
                None => return false,
            },
        };
        name.len() > 65 && name.ends_with(".png") && name[..64].parse::<ResultHash>().is_ok()
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> anyhow::Result<()> {
        self.store.put(&ObjectPath::from(key), PutPayload::from_bytes(bytes)).await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> anyhow::Result<Bytes> {
        Ok(self.store.get(&ObjectPath::from(key)).await?.bytes().await?)
    }

    /// Deletes `key`; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every result upload under the prefix (at most `max`).
    pub async fn list(&self, max: usize) -> anyhow::Result<Vec<Listed>> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let mut stream = self.store.list(prefix.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            if self.ours(&key) {
                out.push(Listed { key, modified_ms: meta.last_modified.timestamp_millis().max(0) as u64 });
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// A URL that lets anyone GET `key` for `ttl`.
    pub async fn presign(&self, key: &str, ttl: Duration) -> anyhow::Result<String> {
        let signer = self.signer.as_ref().context("this result store cannot presign URLs")?;
        let url = signer.signed_url(axum::http::Method::GET, &ObjectPath::from(key), ttl).await?;
        Ok(url.to_string())
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_per_attempt_and_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectResults::open(&format!("file://{}", dir.path().display())).unwrap();
        let sha = ResultHash::of(b"png");
        let (a, b) = (store.key(&sha, JobId(1), 1), store.key(&sha, JobId(1), 2));
        assert_ne!(a, b);
        assert!(store.ours(&a) && store.ours(&b));
        assert!(!store.ours("something-else.png"));
        assert!(!store.can_presign());
        assert!(ObjectResults::open("ftp://x").is_err());
        assert!(ObjectResults::open("s3://").is_err());
        assert!(ObjectResults::open("file://relative/dir").is_err());
    }

    #[tokio::test]
    async fn a_shared_directory_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectResults::open(&format!("file://{}", dir.path().display())).unwrap();
        let png = Bytes::from_static(b"\x89PNG not really");
        let key = store.key(&ResultHash::of(&png), JobId(7), 1);
        store.put(&key, png.clone()).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), png);
        let listed = store.list(10).await.unwrap();
        assert_eq!(listed.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(), vec![key.as_str()]);
        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert!(store.get(&key).await.is_err());
        assert!(store.list(10).await.unwrap().is_empty());
    }
}
