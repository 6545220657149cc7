//! `--result-store s3://…` against a real S3-compatible server started here:
//! s3s-fs 0.14.1 (crates.io; `cargo install s3s-fs --version 0.14.1
//! --features binary --locked`, which `.ci/run` does). Why s3s-fs: it is
//! installed from the registries this project uses, runs as one process on
//! a directory, and checks AWS Signature V4 on every request, presigned
//! URLs included, so the test proves the nodes' credentials and the URLs
//! handed to clients are really accepted (a mock that accepts anything would
//! not).
//!
//! Three nodes upload each result before reporting it, serve it from any
//! node (byte-identical, nothing in their own stores), hand out presigned
//! URLs for OpenAI's `response_format: "url"` that work without credentials,
//! and the leader deletes what retention evicted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{scratch, wait_until, EXE};
use raftgen::cli::local::{free_port, LocalCluster};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ACCESS_KEY: &str = "raftgen-test-access";
const SECRET_KEY: &str = "raftgen-test-secret-key";
const BUCKET: &str = "results-bucket";

fn s3s_fs() -> PathBuf {
    if let Some(p) = std::env::var_os("RAFTGEN_S3S_FS") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home.map(|h| h.join("bin").join("s3s-fs")));
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "this test needs s3s-fs, an S3-compatible server: `cargo install s3s-fs --version 0.14.1 --features binary \
         --locked` (bash .ci/run installs it), or RAFTGEN_S3S_FS=/path/to/s3s-fs"
    );
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_server(root: &Path) -> Server {
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let port = free_port().unwrap();
    let log = std::fs::File::create(root.with_extension("log")).unwrap();
    let child = Command::new(s3s_fs())
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
        .args(["--secret-key", SECRET_KEY])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting s3s-fs");
    let server = Server { child, port };
    wait_until("s3s-fs to listen", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    server
}

fn objects(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(objects(&p));
            } else if p.extension().is_some_and(|x| x == "png") {
                out.push(p);
            }
        }
    }
    out
}

async fn metric(cluster: &LocalCluster, node: u64, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", cluster.url(node))).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_in_an_s3_compatible_store() {
    let dir = scratch();
    let server = start_server(&dir.path.join("s3")).await;
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let env = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let store = format!("s3://{BUCKET}/run1");
    let extra = [
        "--executor",
        "test-pattern",
        "--test-pattern-noise",
        "--test-pattern-delay-ms",
        "20",
        "--slots",
        "2",
        "--result-store",
        store.as_str(),
        "--presign-ttl-s",
        "600",
        "--max-results",
        "4",
    ];
    let cluster = LocalCluster::start_env(Path::new(EXE), &dir.path.join("nodes"), 3, &extra, &env).unwrap();
    cluster.wait_ready(1, 3, 2, Duration::from_secs(60)).await.unwrap();

    let mut ids = Vec::new();
    for i in 0..6 {
        let body = json!({"prompt": format!("stored {i}"), "width": 96, "height": 96, "steps": 1, "cache": false});
        let job = cluster.client(1 + i % 3).submit(&body, None).await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let job = cluster.client(1).wait_job(id, Duration::from_secs(120), |_| {}).await.unwrap();
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    // The last four are kept; every node serves them from the store.
    for id in &ids[2..] {
        let job = cluster.client(1).get(&format!("/v1/jobs/{id}")).await.unwrap();
        let sha = job["result"]["sha256"].as_str().unwrap().to_string();
        for node in 1..=3 {
            let png = cluster.client(node).get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap();
            assert_eq!(hex(&png), sha, "job {id} on node {node}");
        }
    }
    for node in 1..=3 {
        assert_eq!(metric(&cluster, node, "raftgen_result_store_images").await, 0.0, "node {node} stored images");
    }

    // OpenAI's url format: a URL the store presigned, good without credentials.
    let resp: Value = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", cluster.url(2)))
        .json(&json!({"prompt": "presigned", "size": "64x64", "response_format": "url", "model": "test-pattern"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = resp["data"][0]["url"].as_str().unwrap_or_else(|| panic!("{resp}")).to_string();
    assert!(url.starts_with(&format!("{endpoint}/{BUCKET}/run1/")), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let direct = reqwest::get(&url).await.unwrap();
    assert_eq!(direct.status(), 200, "{url}");
    let png = direct.bytes().await.unwrap();
    let id = resp["data"][0]["job_id"].as_str().unwrap();
    let job = cluster.client(1).get(&format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(hex(&png), job["result"]["sha256"].as_str().unwrap());
    // A tampered URL is refused by the store.
    let at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let flipped = if &url[at..at + 1] == "0" { "1" } else { "0" };
    let forged = format!("{}{flipped}{}", &url[..at], &url[at + 1..]);
    assert_eq!(reqwest::get(&forged).await.unwrap().status(), 403);

    // Seven results, four kept: the leader deletes the three evicted uploads.
    let prefix = dir.path.join("s3").join(BUCKET).join("run1");
    wait_until("the evicted uploads to be deleted", Duration::from_secs(30), || async { objects(&prefix).len() == 4 })
        .await;
    drop(cluster);
    drop(server);
}
