//! The embedded result store: content-addressed PNG files in the node's data
//! directory, the default home of result images (one binary stays enough).
//!
//! Layout: `DATA/results/ab/abcdef…(64 hex).png`, named by the image's
//! sha256 and fanned out over 256 directories by its first byte, so no
//! directory grows past a few thousand entries. A write goes to
//! `DATA/results/tmp/`, is synced (`fsync`), renamed into place, and the
//! directory is synced: a file at its final name is complete and durable,
//! and a crash leaves at most a temporary file, which the next start deletes.
//! Only then does the store answer that it holds the image: the node that
//! made a result, and every node it pushes a copy to, make it durable before
//! the result is reported (see `commit`).
//!
//! The name is the content: a write of an image already held only refreshes
//! the file's time (the janitor keeps recently written files, see
//! `janitor`), and every read checks the bytes against the name, so a file
//! damaged on disk is never served: it is deleted and reported.
//!
//! Every method blocks on the disk: call them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use raftgen_raft::result::ResultHash;

/// What the store knows about one file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub bytes: u64,
    /// When the file was last written (or rewritten with the same image).
    pub touched: SystemTime,
}

pub struct LocalStore {
    root: PathBuf,
    tmp: PathBuf,
    /// Every complete file, by hash (kept in step with the disk).
    index: Mutex<BTreeMap<ResultHash, Held>>,
}

/// A read that found a file whose bytes do not match its name.
#[derive(Debug, thiserror::Error)]
#[error("stored result {0} is damaged (its bytes do not hash to its name); deleted")]
pub struct Damaged(pub ResultHash);

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl LocalStore {
    /// Opens (or creates) the store under `data`: deletes leftover temporary
    /// files and indexes the complete ones.
    pub fn open(data: &Path) -> io::Result<LocalStore> {
        let root = data.join("results");
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp)?;
        for entry in fs::read_dir(&tmp)? {
            let _ = fs::remove_file(entry?.path());
        }
        let mut index = BTreeMap::new();
        for dir in fs::read_dir(&root)? {
            let dir = dir?;
            if dir.file_name() == "tmp" || !dir.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(dir.path())? {
                let file = file?;
                let name = file.file_name();
                let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".png")).and_then(|h| h.parse().ok()) else {
                    continue;
                };
                let meta = file.metadata()?;
                index.insert(hash, Held { bytes: meta.len(), touched: meta.modified()? });
            }
        }
        sync_dir(&root)?;
        Ok(LocalStore { root, tmp, index: Mutex::new(index) })
    }

    fn path(&self, sha: &ResultHash) -> PathBuf {
        let hex = sha.hex();
        self.root.join(&hex[..2]).join(format!("{hex}.png"))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<ResultHash, Held>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `bytes` durable under `sha`, which the caller has checked is
    /// their hash. Already held: refreshes the file's time and returns.
    pub fn put(&self, sha: &ResultHash, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(sha);
        if self.index().contains_key(sha) {
            match File::options().write(true).open(&path) {
                Ok(f) => {
                    let now = SystemTime::now();
                    f.set_modified(now)?;
                    self.index().insert(*sha, Held { bytes: bytes.len() as u64, touched: now });
                    return Ok(());
                }
                // Deleted under us (the janitor): write it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let dir = path.parent().expect("a fan-out directory");
        let new_dir = !dir.exists();
        fs::create_dir_all(dir)?;
        let tmp = self.tmp.join(format!("{}.{:016x}.part", sha.hex(), rand::random::<u64>()));
        let written = (|| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(dir)?;
            if new_dir {
                sync_dir(&self.root)?;
            }
            Ok(())
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        self.index().insert(*sha, Held { bytes: bytes.len() as u64, touched: SystemTime::now() });
        Ok(())
    }

    /// The image, checked against its name; `None` when not held. A damaged
    /// file is deleted and reported as [`Damaged`] (inside the `io::Error`).
    pub fn get(&self, sha: &ResultHash) -> io::Result<Option<Vec<u8>>> {
        let path = self.path(sha);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index().remove(sha);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if ResultHash::of(&bytes) != *sha {
            self.remove(sha)?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, Damaged(*sha)));
        }
        Ok(Some(bytes))
    }

    /// Whether the store holds `sha` (by its index, without reading).
    pub fn contains(&self, sha: &ResultHash) -> bool {
        self.index().contains_key(sha)
    }

    /// Deletes `sha` (not held: nothing to do).
    pub fn remove(&self, sha: &ResultHash) -> io::Result<()> {
        self.index().remove(sha);
        match fs::remove_file(self.path(sha)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every held image with its size and time, in hash order.
    pub fn list(&self) -> Vec<(ResultHash, Held)> {
        self.index().iter().map(|(h, held)| (*h, *held)).collect()
    }

    /// Images held and their bytes.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.index();
        (index.len(), index.values().map(|h| h.bytes).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let (a, b) = (b"first image".to_vec(), b"second image".to_vec());
        let (ha, hb) = (ResultHash::of(&a), ResultHash::of(&b));
        store.put(&ha, &a).unwrap();
        store.put(&hb, &b).unwrap();
        store.put(&ha, &a).unwrap(); // again: a refresh
        assert_eq!(store.get(&ha).unwrap(), Some(a.clone()));
        assert_eq!(store.usage(), (2, (a.len() + b.len()) as u64));
        store.remove(&hb).unwrap();
        assert_eq!(store.get(&hb).unwrap(), None);
        // A leftover temporary file (a crash mid-write) is deleted on open.
        std::fs::write(dir.path().join("results/tmp/x.part"), b"half").unwrap();
        let reopened = LocalStore::open(dir.path()).unwrap();
        assert_eq!(reopened.list().iter().map(|(h, _)| *h).collect::<Vec<_>>(), vec![ha]);
        assert_eq!(std::fs::read_dir(dir.path().join("results/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_damaged_file_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let img = b"an image".to_vec();
        let h = ResultHash::of(&img);
        store.put(&h, &img).unwrap();
        let hex = h.hex();
        std::fs::write(dir.path().join("results").join(&hex[..2]).join(format!("{hex}.png")), b"bit rot").unwrap();
        let err = store.get(&h).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(!store.contains(&h), "deleted");
        assert_eq!(store.get(&h).unwrap(), None);
    }
}
