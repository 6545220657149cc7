//! Helpers shared by the cluster test files: scratch directories, starting a
//! local cluster of real node processes, and waiting for a condition.

#![allow(dead_code)]

pub mod pyenv;

use std::path::Path;
use std::time::{Duration, Instant};

use raftgen::cli::local::LocalCluster;

pub const EXE: &str = env!("CARGO_BIN_EXE_raftgen");

/// A scratch directory for a test's nodes; kept (and printed) when
/// RAFTGEN_KEEP_TEST_DATA is set, for post-mortems of the node logs.
pub struct Scratch {
    _guard: Option<tempfile::TempDir>,
    pub path: std::path::PathBuf,
}

pub fn scratch() -> Scratch {
    let dir = tempfile::Builder::new().prefix("raftgen-test-").tempdir().unwrap();
    if std::env::var_os("RAFTGEN_KEEP_TEST_DATA").is_some() {
        let path = dir.keep();
        eprintln!("test data kept in {}", path.display());
        return Scratch { _guard: None, path };
    }
    Scratch { path: dir.path().to_path_buf(), _guard: Some(dir) }
}

pub fn start(dir: &Path, n: u64, extra: &[&str]) -> LocalCluster {
    LocalCluster::start(Path::new(EXE), dir, n, &[], extra).expect("starting the cluster")
}

/// As [`start`], for nodes serving TLS (their TLS flags in `extra`): the
/// cluster's URLs are `https://` and its clients use `tls`.
pub fn start_tls(dir: &Path, n: u64, extra: &[&str], tls: raftgen::tls::ClientTls) -> LocalCluster {
    LocalCluster::start_tls(Path::new(EXE), dir, n, &[], extra, Some(tls)).expect("starting the cluster")
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
