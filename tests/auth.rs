//! API keys (`--api-keys`) on a real 3-node cluster: who gets in, who may
//! change the membership, the per-key rate limit, what stays open, and that no
//! key or secret reaches `/metrics` or the node logs. Also the strict parsing
//! of the keys file at start-up, through the binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use raftgen::cli::local::LocalCluster;
use raftgen::cli::Client;
use raftgen_raft::network::SECRET_HEADER;
use serde_json::{json, Value};

mod common;

use common::{scratch, start};

const ADMIN_KEY: &str = "adm-6f1c2e0b9d8a7f6e5d4c3b2a19081726";
/// No rate: used for the functional checks.
const USER_KEY: &str = "usr-0a1b2c3d4e5f60718293a4b5c6d7e8f9";
/// One request per 100 s: the second request on a node is refused.
const SLOW_KEY: &str = "slw-99887766554433221100ffeeddccbbaa";
const WRONG_KEY: &str = "usr-0a1b2c3d4e5f60718293a4b5c6d7e8f8";

fn keys_file(dir: &Path) -> String {
    let path = dir.join("api-keys");
    let text = format!(
        "# raftgen API keys: NAME KEY [rate=REQUESTS_PER_SECOND] [admin]\n\n\
         ops   {ADMIN_KEY} admin   # the operators\n\
         web   {USER_KEY}\n\
         slow  {SLOW_KEY} rate=0.01\n"
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path.display().to_string()
}

/// One request: status, the `Retry-After` and `WWW-Authenticate` headers, and the body as JSON (or text).
struct Answer {
    status: u16,
    retry_after: Option<String>,
    www_authenticate: Option<String>,
    body: Value,
}

async fn call(method: reqwest::Method, url: &str, key: Option<&str>, body: Option<Value>) -> Answer {
    let mut req = reqwest::Client::new().request(method, url).timeout(Duration::from_secs(120));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let header = |h: reqwest::header::HeaderName| resp.headers().get(h).map(|v| v.to_str().unwrap().to_string());
    let (retry_after, www_authenticate) =
        (header(reqwest::header::RETRY_AFTER), header(reqwest::header::WWW_AUTHENTICATE));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, retry_after, www_authenticate, body }
}

fn job_body(n: u64) -> Value {
    json!({ "prompt": format!("auth job {n}"), "width": 64, "height": 64, "steps": 5, "seed": n })
}

/// Waits (with the admin key) for 3 registered members and a leader.
async fn wait_ready(cluster: &LocalCluster) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = cluster.client(1).with_api_key(Some(ADMIN_KEY.into()));
        if let Ok(v) = c.get("/v1/cluster").await {
            let members = v["members"].as_array().cloned().unwrap_or_default();
            let registered = members.iter().all(|m| m["slots"].as_u64().unwrap_or(0) >= 1);
            if let (Some(leader), 3, true) = (v["leader_id"].as_u64(), members.len(), registered) {
                return leader;
            }
        }
        assert!(Instant::now() < deadline, "cluster not ready; logs in {}", cluster.dir.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_error(a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    assert_eq!(a.body["error"]["code"], code, "{what}: {}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_guard_the_public_api_and_stay_out_of_logs_and_metrics() {
    use reqwest::Method;
    let dir = scratch();
    let keys = keys_file(&dir.path);
    let args = ["--executor", "test-pattern", "--test-pattern-delay-ms", "50", "--api-keys", &keys];
    let mut cluster = start(&dir.path, 3, &args);
    // Nodes 2 and 3 joined node 1 with the cluster secret, keys or not.
    let leader = wait_ready(&cluster).await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (f1, f2) = (cluster.url(followers[0]), cluster.url(followers[1]));

    // No key, a wrong key, another scheme: 401 with a JSON body, on reads and writes.
    for (key, what) in [(None, "no key"), (Some(WRONG_KEY), "a wrong key"), (Some(&USER_KEY[1..]), "a prefix")] {
        for (method, path) in [(Method::POST, "/v1/jobs"), (Method::GET, "/v1/jobs"), (Method::GET, "/v1/cluster")] {
            let a = call(method.clone(), &format!("{f1}{path}"), key, Some(job_body(0))).await;
            assert_error(&a, 401, "unauthorized", &format!("{method} {path} with {what}"));
            assert!(a.www_authenticate.as_deref().is_some_and(|v| v.starts_with("Bearer")), "{what}");
        }
    }
    let basic = reqwest::Client::new()
        .get(format!("{f1}/v1/jobs"))
        .header("authorization", format!("Basic {USER_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 401, "a key under another scheme");

    // Health probes and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let a = call(Method::GET, &format!("{f1}{path}"), None, None).await;
        assert_eq!(a.status, 200, "{path} without a key: {}", a.body);
    }

    // A valid key: a submission through a follower (forwarded to the leader) is
    // accepted, and the job runs; reads through the other follower.
    let a = call(Method::POST, &format!("{f1}/v1/jobs"), Some(USER_KEY), Some(job_body(1))).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_string();
    let reader = Client::new(&f2).with_api_key(Some(USER_KEY.into()));
    let job = reader.wait_job(&id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(reader.get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap().starts_with(b"\x89PNG"));
    // A follower asks the leader for the cluster view (with its own secret; it
    // would fall back to its own view if the leader refused it). Compared with
    // the leader the answer names, in case leadership moved meanwhile.
    let view = reader.get("/v1/cluster").await.unwrap();
    assert_eq!(view["answered_by"], view["leader_id"], "the follower fell back to its own view: {view}");
    // The cluster secret passes as a node would send it.
    let by_secret = reqwest::Client::new()
        .get(format!("{f1}/v1/jobs"))
        .header(SECRET_HEADER, &cluster.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(by_secret.status().as_u16(), 200);

    // Membership changes: a user key is forbidden, an admin key gets through
    // the auth check (to the validation and to the leader).
    let a = call(Method::POST, &format!("{f1}/v1/cluster/nodes"), Some(USER_KEY), Some(json!({}))).await;
    assert_error(&a, 403, "forbidden", "a join with a user key");
    let a = call(Method::DELETE, &format!("{f1}/v1/cluster/nodes/99"), Some(USER_KEY), None).await;
    assert_error(&a, 403, "forbidden", "a leave with a user key");
    let a = call(Method::POST, &format!("{f1}/v1/cluster/nodes"), Some(ADMIN_KEY), Some(json!({}))).await;
    assert_error(&a, 400, "invalid_request", "a join with an admin key and no id");
    assert_eq!(a.body["error"]["field"], "id", "{}", a.body);
    let a = call(Method::DELETE, &format!("{f1}/v1/cluster/nodes/99"), Some(ADMIN_KEY), None).await;
    assert_error(&a, 404, "not_found", "a leave of an unknown node with an admin key");

    // Rate limit: the slow key's burst is one request per node, then 429.
    let a = call(Method::GET, &format!("{f1}/v1/jobs"), Some(SLOW_KEY), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = call(Method::GET, &format!("{f1}/v1/jobs"), Some(SLOW_KEY), None).await;
    assert_error(&a, 429, "rate_limited", "the slow key's second request");
    let wait_s: u64 = a.retry_after.as_deref().and_then(|s| s.parse().ok()).expect("a Retry-After in seconds");
    assert!((1..=100).contains(&wait_s), "Retry-After {wait_s}");
    // Other keys are not held back by it.
    let a = call(Method::GET, &format!("{f1}/v1/jobs"), Some(USER_KEY), None).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // The CLI sends --api-key (or RAFTGEN_API_KEY).
    let cli = |args: &[&str], env_key: Option<&str>| {
        let mut cmd = Command::new(common::EXE);
        cmd.args(args).env_remove("RAFTGEN_API_KEY");
        if let Some(k) = env_key {
            cmd.env("RAFTGEN_API_KEY", k);
        }
        let out = cmd.output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = cli(&["status", "--server", &f2, "--api-key", USER_KEY], None);
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = cli(&["jobs", "--server", &f2], Some(USER_KEY));
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = cli(&["jobs", "--server", &f2], None);
    assert_ne!(code, 0);
    assert!(stderr.trim_end().lines().count() == 1 && stderr.contains("401"), "{stderr}");

    // An admin key removes a real node (not the leader), through the other follower.
    let leader = wait_ready(&cluster).await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (via, leaving) = (cluster.url(followers[0]), followers[1]);
    let a = call(Method::DELETE, &format!("{via}/v1/cluster/nodes/{leaving}"), Some(ADMIN_KEY), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["removed"], true, "{}", a.body);

    // No key and no secret anywhere in /metrics or the node logs.
    let metrics = call(Method::GET, &format!("{f1}/metrics"), None, None).await;
    let metrics = metrics.body.as_str().expect("metrics are text").to_string();
    for id in 1..=3 {
        cluster.kill(id).unwrap();
    }
    let mut texts = vec![("/metrics".to_string(), metrics)];
    for id in 1..=3 {
        let path = dir.path.join(format!("n{id}.log"));
        texts.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
    }
    for (what, text) in &texts {
        for secret in [ADMIN_KEY, USER_KEY, SLOW_KEY, WRONG_KEY, &cluster.secret] {
            assert!(!text.contains(secret), "{what} contains a secret");
        }
    }
    // The logs were written (so the check above looked at something).
    for (what, text) in &texts[1..] {
        assert!(text.contains("listening on"), "{what}: {text}");
    }
}

/// A bad keys file stops the node at start-up: one line naming the file and
/// the line, never the key, and a non-zero exit.
#[test]
fn a_bad_keys_file_stops_the_node_with_one_line_naming_the_line() {
    let dir = scratch();
    let port = raftgen::cli::local::free_port().unwrap().to_string();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path.join("data").display().to_string();
    let cases: [(&str, String, &str); 4] = [
        ("bad-rate", format!("# keys\n\nops {ADMIN_KEY} admin\nweb {USER_KEY} rate=fast\n"), ":4: rate must be"),
        ("duplicate", format!("ops {ADMIN_KEY}\nweb {ADMIN_KEY}\n"), ":2: the same key as line 1"),
        ("no-key", "ops\n".into(), ":1: missing the key"),
        ("empty", "# nothing\n".into(), ":1: the file holds no key"),
    ];
    for (name, text, needle) in cases {
        let path = dir.path.join(name);
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        let out = Command::new(common::EXE)
            .args(["node", "--id", "1", "--listen", &listen, "--data", &data, "--init", "--api-keys", &path])
            .args(["--executor", "none"])
            .env("RAFTGEN_CLUSTER_SECRET", "auth-test-secret")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(&format!("{path}{needle}")), "{name}: {stderr}");
        assert!(!stderr.contains(ADMIN_KEY) && !stderr.contains(USER_KEY), "{name}: the error shows a key");
    }
    let missing = dir.path.join("missing").display().to_string();
    let out = Command::new(common::EXE)
        .args(["node", "--id", "1", "--listen", &listen, "--data", &data, "--api-keys", &missing])
        .env("RAFTGEN_CLUSTER_SECRET", "auth-test-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.trim_end().lines().count() == 1 && stderr.contains(&missing), "{stderr}");
}
