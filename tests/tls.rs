//! TLS on the node port (docs/tls.md): a mutual-TLS cluster forms, serves and
//! fails over over https; plain HTTP, clients trusting another CA, clients
//! without a certificate and a node with a certificate from another CA get
//! nothing; bad TLS files stop a node with one line naming the file.
//! Certificates are made in each test by `raftgen certs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use openraft::raft::VoteRequest;
use openraft::Vote;
use raftgen::tls::ClientTls;
use raftgen_raft::codec;
use raftgen_raft::network::{PATH_VOTE, SECRET_HEADER};
use serde_json::{json, Value};

mod common;

use common::{scratch, start_tls, wait_until, EXE};

const EXECUTOR: [&str; 6] =
    ["--executor", "test-pattern", "--test-pattern-delay-ms", "50", "--node-timeout-ms", "2000"];

/// `raftgen certs --out DIR --nodes N` for 127.0.0.1 and localhost.
fn certs(dir: &Path, nodes: u32) -> PathBuf {
    let out = Command::new(EXE)
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--hosts", "127.0.0.1,localhost", "--nodes", &nodes.to_string()])
        .output()
        .expect("running raftgen certs");
    assert!(out.status.success(), "raftgen certs: {}", String::from_utf8_lossy(&out.stderr));
    dir.to_path_buf()
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

/// A node's TLS flags: its certificate from `pki`, trusting `ca_dir`'s CA
/// (requiring client certificates) when given.
fn node_tls(pki: &Path, k: u64, ca_dir: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "--tls-cert".into(),
        path(pki, &format!("node-{k}.pem")),
        "--tls-key".into(),
        path(pki, &format!("node-{k}-key.pem")),
    ];
    if let Some(ca) = ca_dir {
        args.extend(["--tls-ca".into(), path(ca, "ca.pem")]);
    }
    args
}

fn with(base: &[&str], more: &[String]) -> Vec<String> {
    base.iter().map(|s| s.to_string()).chain(more.iter().cloned()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Client TLS trusting `ca_dir`'s CA and presenting `identity` (`client` or `node-K` from its folder).
fn client_tls(ca_dir: &Path, identity: Option<(&Path, &str)>) -> ClientTls {
    ClientTls {
        tls_ca: Some(ca_dir.join("ca.pem")),
        tls_cert: identity.map(|(d, name)| d.join(format!("{name}.pem"))),
        tls_key: identity.map(|(d, name)| d.join(format!("{name}-key.pem"))),
    }
}

fn http_client(tls: &ClientTls, url: &str) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
    tls.apply(builder, url).expect("client TLS files").build().unwrap()
}

async fn members(cluster: &raftgen::cli::local::LocalCluster, via: u64) -> Vec<Value> {
    let c = cluster.client(via).get("/v1/cluster").await.expect("reading the membership");
    c["members"].as_array().cloned().unwrap_or_default()
}

/// Submits through `via` over https and waits for the job to succeed.
async fn submit_and_finish(cluster: &raftgen::cli::local::LocalCluster, via: u64, prompt: &str) -> String {
    let client = cluster.client(via);
    let job = client.submit(&json!({ "prompt": prompt, "width": 64, "height": 64, "steps": 2 }), None).await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let done = client.wait_job(&id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_cluster_forms_serves_refuses_strangers_and_fails_over() {
    let dir = scratch();
    let pki = certs(&dir.path.join("pki"), 3);
    let other = certs(&dir.path.join("other-pki"), 1);
    let tls = client_tls(&pki, Some((&pki, "client")));

    // Node 1 starts the cluster; nodes 2 and 3 join it over https, each with its own certificate.
    let mut cluster = start_tls(&dir.path, 1, &strs(&with(&EXECUTOR, &node_tls(&pki, 1, Some(&pki)))), tls.clone());
    for k in 2..=3 {
        cluster.add_node(k, 1, &strs(&with(&EXECUTOR, &node_tls(&pki, k, Some(&pki))))).unwrap();
    }
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    for m in members(&cluster, 1).await {
        assert!(m["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "membership stores host:port: {m}");
    }

    // A submission through a follower is forwarded to the leader, run, and its image read from a third node.
    let follower = (1..=3).find(|k| *k != leader).unwrap();
    let id = submit_and_finish(&cluster, follower, "over tls").await;
    let reader = (1..=3).find(|k| *k != follower).unwrap();
    let png = cluster.client(reader).get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG: {} bytes", png.len());

    // Clients without a certificate, or trusting another CA, get nothing.
    let url = cluster.url(follower);
    let no_cert = raftgen::cli::Client::new(&url).with_tls(&client_tls(&pki, None)).unwrap();
    assert!(no_cert.get("/v1/cluster").await.is_err(), "a client without a certificate was served");
    let wrong_ca = raftgen::cli::Client::new(&url).with_tls(&client_tls(&other, Some((&pki, "client")))).unwrap();
    assert!(wrong_ca.get("/v1/cluster").await.is_err(), "a client trusting another CA connected");

    // A Raft RPC with the right secret but a certificate from another CA is
    // refused at the handshake; the same request with a trusted certificate
    // reaches the handler (which rejects its empty body).
    let vote = codec::encode(&VoteRequest::new(Vote::new(1_000, 99u64), None)).unwrap();
    let rogue = http_client(&client_tls(&pki, Some((&other, "node-1"))), &url);
    let sent = rogue.post(format!("{url}{PATH_VOTE}")).header(SECRET_HEADER, &cluster.secret).body(vote).send().await;
    assert!(sent.is_err(), "a vote with an untrusted client certificate got an answer: {:?}", sent.map(|r| r.status()));
    let trusted = http_client(&tls, &url);
    let resp = trusted.post(format!("{url}{PATH_VOTE}")).header(SECRET_HEADER, &cluster.secret).send().await.unwrap();
    assert_eq!(resp.status(), 400, "a trusted peer reaches the vote handler");

    // A node whose certificate another CA signed (trusting ours, with the
    // right secret) never joins: every attempt is refused at the handshake.
    cluster.add_node(4, follower, &strs(&with(&EXECUTOR, &node_tls(&other, 1, Some(&pki))))).unwrap();
    let rogue_log = dir.path.join("n4.log");
    wait_until("three refused join attempts by node 4", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(&rogue_log).unwrap_or_default();
        async move { log.matches("join through").count() >= 3 }
    })
    .await;
    let log = std::fs::read_to_string(&rogue_log).unwrap();
    assert!(!log.contains("joined the cluster"), "node 4 joined: {log}");
    let mut ids: Vec<u64> = members(&cluster, leader).await.iter().map(|m| m["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3], "the membership changed");
    cluster.kill(4).unwrap();

    // Leader failover over TLS: kill the leader process, submit through a survivor.
    cluster.kill(leader).unwrap();
    let survivor = (1..=3).find(|k| *k != leader).unwrap();
    wait_until("a new leader", Duration::from_secs(30), || {
        let c = cluster.client(survivor);
        async move {
            matches!(c.get("/v1/cluster?local=1").await, Ok(v) if v["leader_id"].as_u64().is_some_and(|l| l != leader))
        }
    })
    .await;
    submit_and_finish(&cluster, survivor, "after the failover").await;
}

/// Sends a plain HTTP request to `port` and returns whatever comes back.
fn plain_http(port: u16) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /v1/cluster HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_port_serves_https_only_to_clients_trusting_its_ca() {
    let dir = scratch();
    let pki = certs(&dir.path.join("pki"), 1);
    let other = certs(&dir.path.join("other-pki"), 1);
    let trusting = client_tls(&pki, None);
    // Server authentication only (no --tls-ca): clients need no certificate.
    let flags =
        with(&EXECUTOR, &[node_tls(&pki, 1, None), vec!["--tls-handshake-timeout-ms".into(), "500".into()]].concat());
    let cluster = start_tls(&dir.path, 1, &strs(&flags), trusting.clone());
    cluster.wait_ready(1, 1, 1, Duration::from_secs(60)).await.unwrap();
    let port = cluster.nodes[0].port;

    // A connection that never starts its handshake holds up no one (it is
    // dropped after --tls-handshake-timeout-ms; everything below runs meanwhile).
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();

    // Plain HTTP to the TLS port is never served.
    let answer = String::from_utf8_lossy(&plain_http(port)).into_owned();
    assert!(!answer.starts_with("HTTP/1.1 2") && !answer.contains("leader_id"), "plain HTTP was served: {answer}");
    match reqwest::get(format!("http://127.0.0.1:{port}/v1/cluster")).await {
        Err(_) => {}
        Ok(r) => assert_eq!(r.status(), 400, "plain HTTP was served"),
    }

    // The CLI trusting the CA reads the cluster; trusting another CA, it fails with one line.
    let url = cluster.url(1);
    let status = |ca: &Path| {
        Command::new(EXE).args(["status", "--server", &url, "--tls-ca", &path(ca, "ca.pem")]).output().unwrap()
    };
    let ok = status(&pki);
    assert!(ok.status.success(), "status over https: {}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("leader: 1"));
    let refused = status(&other);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.trim_end().lines().count() == 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("cannot reach"), "{stderr}");

    // The library client: the same over https, with a job run to the end.
    let wrong_ca = raftgen::cli::Client::new(&url).with_tls(&client_tls(&other, None)).unwrap();
    assert!(wrong_ca.get("/v1/cluster").await.is_err(), "a client trusting another CA connected");
    submit_and_finish(&cluster, 1, "server-authenticated").await;

    // The idle connection was closed by the server (the read timeout is only a backstop).
    idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(idle.read(&mut [0u8; 64]).expect("the server closes the idle connection"), 0);
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(EXE).args(args).env("RAFTGEN_CLUSTER_SECRET", "tls-test").output().expect("running raftgen");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_tls_files_and_flags_stop_a_node_with_one_line_naming_them() {
    let dir = scratch();
    let pki = certs(&dir.path.join("pki"), 2);
    let data = path(&dir.path, "data");
    let port = raftgen::cli::local::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let node = ["node", "--id", "1", "--listen", &listen, "--data", &data, "--executor", "none"];
    let (cert1, key1, key2) = (path(&pki, "node-1.pem"), path(&pki, "node-1-key.pem"), path(&pki, "node-2-key.pem"));
    let missing = path(&dir.path, "missing.pem");
    let garbage = path(&dir.path, "garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let join_http = format!("http://127.0.0.1:{port}");
    let cases: [(Vec<&str>, i32, &[&str]); 6] = [
        (vec!["--tls-cert", &cert1], 2, &["--tls-key"]),
        (vec!["--tls-cert", &cert1, "--tls-key", &key2], 1, &["--tls-key", &key2, "does not belong"]),
        (vec!["--tls-cert", &missing, "--tls-key", &key1], 1, &["--tls-cert", &missing]),
        (vec!["--tls-cert", &garbage, "--tls-key", &key1], 1, &["--tls-cert", &garbage]),
        (vec!["--tls-cert", &cert1, "--tls-key", &key1, "--tls-ca", &garbage], 1, &["--tls-ca", &garbage]),
        (vec!["--tls-cert", &cert1, "--tls-key", &key1, "--join", &join_http], 1, &["--join", "https://"]),
    ];
    for (flags, code, needles) in cases {
        let args: Vec<&str> = node.iter().copied().chain(flags.iter().copied()).collect();
        let (got, stderr) = run(&args);
        assert_eq!(got, code, "{flags:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{flags:?}: {stderr}");
        for needle in needles {
            assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{flags:?}: no {needle} in {stderr}");
        }
    }

    // `raftgen certs` never replaces a file, and checks its host names.
    let (code, stderr) = run(&["certs", "--out", &path(&pki, "")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("exists"), "{stderr}");
    let (code, stderr) = run(&["certs", "--out", &path(&dir.path, "bad"), "--hosts", "no spaces"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no spaces"), "{stderr}");
}
