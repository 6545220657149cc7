//! Live progress over Server-Sent Events (`GET /v1/jobs/{id}/events`) and
//! the CLI that follows it (`raftgen submit --wait`, `raftgen job`), against
//! real 3-node clusters. The stream is parsed here by hand (`event:`/`data:`
//! lines), independently of the CLI's parser.

use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{scratch, start};

/// Longest any single read may stall before the test fails instead of hanging.
const READ_GUARD: Duration = Duration::from_secs(60);

/// Node flags: jobs take 3 s (10 steps), so the executing node replicates
/// a few progress reports while a stream watches.
const FLAGS: &[&str] = &[
    "--executor",
    "test-pattern",
    "--test-pattern-delay-ms",
    "3000",
    "--slots",
    "1",
    "--node-timeout-ms",
    "2000",
    "--shutdown-timeout-ms",
    "5000",
];

#[derive(Debug)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A hand-rolled reader of one event stream.
struct Stream {
    resp: reqwest::Response,
    buf: String,
}

impl Stream {
    async fn open(base: &str, id: &str, last_event_id: Option<&str>) -> Stream {
        let mut req = reqwest::Client::new().get(format!("{base}/v1/jobs/{id}/events"));
        if let Some(last) = last_event_id {
            req = req.header("last-event-id", last);
        }
        let resp = req.send().await.expect("opening the event stream");
        assert_eq!(resp.status(), 200, "events of {id}");
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ctype.starts_with("text/event-stream"), "content type {ctype}");
        Stream { resp, buf: String::new() }
    }

    /// The next event; `None` once the server closed the stream.
    async fn next(&mut self) -> Option<Sse> {
        let (mut event, mut id, mut data) = (String::new(), None, Vec::new());
        loop {
            while let Some(end) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=end).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if data.is_empty() {
                        continue;
                    }
                    let text = data.join("\n");
                    let data = serde_json::from_str(&text).unwrap_or_else(|e| panic!("event data {text:?}: {e}"));
                    return Some(Sse { event, id, data });
                }
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim_start().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim_start().to_string());
                }
            }
            let chunk = tokio::time::timeout(READ_GUARD, self.resp.chunk())
                .await
                .expect("the stream stalled")
                .expect("reading the stream");
            match chunk {
                Some(bytes) => self.buf.push_str(std::str::from_utf8(&bytes).expect("UTF-8 stream")),
                None => return None,
            }
        }
    }

    /// Every event until the server closes the stream.
    async fn rest(&mut self) -> Vec<Sse> {
        let mut all = Vec::new();
        while let Some(e) = self.next().await {
            all.push(e);
        }
        all
    }
}

async fn submit(client: &raftgen::cli::Client, prompt: &str, seed: u64) -> String {
    let body = json!({ "prompt": prompt, "width": 64, "height": 64, "steps": 10, "seed": seed });
    client.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string()
}

/// `(history length, step)` of an event id: ordered like the job's versions.
fn mark(id: &str) -> (u64, u64) {
    let (h, s) = id.split_once('.').unwrap_or_else(|| panic!("event id {id:?}"));
    (h.parse().unwrap(), s.parse().unwrap())
}

/// A `done` event's image URL serves the job's PNG.
async fn check_image(done: &Sse, job_id: &str) {
    let url = done.data["image_url"].as_str().unwrap_or_else(|| panic!("no image URL in {:?}", done.data));
    assert!(url.starts_with("http://") && url.ends_with(&format!("/v1/jobs/{job_id}/image")), "{url}");
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let png = resp.bytes().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert_eq!(done.data["job"]["result"]["bytes"], png.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_streams_state_progress_and_done_across_a_leader_kill() {
    let dir = scratch();
    let mut cluster = start(&dir.path, 3, FLAGS);
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let base = cluster.url(follower);
    let client = cluster.client(follower);

    // Bad ids: 400 naming `id`; an unknown job: 404, both as JSON errors.
    let resp = reqwest::get(format!("{base}/v1/jobs/not-an-id/events")).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["field"], "id", "{body}");
    let resp = reqwest::get(format!("{base}/v1/jobs/{:032x}/events", 7)).await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    // A job followed from submission to its end through a follower.
    let id = submit(&client, "streamed", 1).await;
    let mut stream = Stream::open(&base, &id, None).await;
    let events = stream.rest().await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"state"), "{names:?}");
    assert_eq!(events[0].data["job"]["id"], id.as_str(), "the first event carries the job's view");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert_eq!(names.iter().filter(|n| **n == "done").count(), 1);
    let steps: Vec<u64> =
        events.iter().filter(|e| e.event == "progress").map(|e| e.data["step"].as_u64().unwrap()).collect();
    assert!(!steps.is_empty(), "no progress event: {names:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps not increasing: {steps:?}");
    assert!(events.iter().filter(|e| e.event == "progress").all(|e| e.data["steps"] == 10));
    assert!(
        events.iter().any(|e| e.event == "state" && e.data["state"] == "running" && e.data["node"].is_u64()),
        "no running state: {:?}",
        events.iter().map(|e| &e.data).collect::<Vec<_>>()
    );
    let marks: Vec<(u64, u64)> = events.iter().filter_map(|e| e.id.as_deref()).map(mark).collect();
    assert!(marks.windows(2).all(|w| w[0] < w[1]), "event ids not increasing: {marks:?}");
    let done = events.last().unwrap();
    assert_eq!(done.data["state"], "succeeded");
    assert_eq!(done.data["job"]["state"], "succeeded");
    check_image(done, &id).await;

    // A finished job: `done` at once, then the stream closes; whatever the
    // client saw before (Last-Event-ID), the end is always told.
    let last_id = done.id.clone().expect("done has an id");
    for last in [None, Some(last_id.as_str())] {
        let mut again = Stream::open(&base, &id, last).await;
        let events = again.rest().await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].event, "done");
        assert_eq!(events[0].data["state"], "succeeded");
    }

    // The leader dies mid-job: the follower keeps streaming to the end.
    let id = submit(&client, "outlives the leader", 2).await;
    let mut stream = Stream::open(&base, &id, None).await;
    let mut seen = Vec::new();
    while let Some(e) = stream.next().await {
        let running = e.event == "progress" || e.data["state"] == "running";
        seen.push(e);
        if running {
            break;
        }
    }
    cluster.kill(leader).unwrap();
    seen.extend(stream.rest().await);
    let done = seen.last().expect("events");
    assert_eq!(done.event, "done", "{seen:?}");
    assert_eq!(done.data["state"], "succeeded", "{:?}", done.data);
    check_image(done, &id).await;

    // A stopping node ends its open streams (or it would wait for them).
    let survivor = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let id = submit(&cluster.client(survivor), "open while the node stops", 3).await;
    let mut stream = Stream::open(&base, &id, None).await;
    assert!(stream.next().await.is_some());
    cluster.terminate(follower).unwrap();
    let _rest = stream.rest().await;
    let status = cluster.wait_exit(follower, Duration::from_secs(60)).unwrap();
    assert!(status.success(), "the node exited with {status}");
}

/// `raftgen ...` with captured output: (exit code, stdout, stderr).
async fn raftgen(args: &[&str], cwd: &std::path::Path) -> (i32, String, String) {
    let out = tokio::process::Command::new(common::EXE).args(args).current_dir(cwd).output().await.unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_follows_a_job_and_shows_it() {
    let dir = scratch();
    let cluster = start(&dir.path, 3, FLAGS);
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let server = cluster.url(follower);
    let common = ["--server", server.as_str(), "--width", "64", "--height", "64", "--steps", "10"];

    // JSON: only the final JSON on stdout, nothing on stderr, the PNG written.
    let out = dir.path.join("json.png");
    let args =
        [&["submit", "a json cat", "--wait", "--output", "json", "--out", out.to_str().unwrap()][..], &common].concat();
    let (code, stdout, stderr) = raftgen(&args, &dir.path).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stderr, "");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout {stdout:?}: {e}"));
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert_eq!(v["job"]["progress"]["step"], 10);
    assert_eq!(v["file"], out.to_str().unwrap());
    let png = std::fs::read(&out).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(v["job"]["result"]["bytes"], png.len() as u64);
    let id = v["job"]["id"].as_str().unwrap().to_string();

    // Text, stderr not a terminal: readable lines, no bar, no control characters.
    let args = [&["submit", "a text cat", "--wait"][..], &common].concat();
    let (code, stdout, stderr) = raftgen(&args, &dir.path).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.starts_with("submitted "), "{stderr}");
    assert!(stderr.contains("running on node"), "{stderr}");
    assert!(!stderr.chars().any(|c| c.is_control() && c != '\n'), "control characters in {stderr:?}");
    let text_id = stdout.split_whitespace().next().unwrap();
    assert!(stdout.contains("succeeded"), "{stdout}");
    let png = std::fs::read(dir.path.join(format!("{text_id}.png"))).unwrap();
    assert!(png.starts_with(b"\x89PNG"));

    // One job, as JSON and as text.
    let (code, stdout, stderr) = raftgen(&["job", &id, "--server", &server, "--output", "json"], &dir.path).await;
    assert_eq!(code, 0, "{stderr}");
    let job: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["request"]["prompt"], "a json cat");
    let (code, stdout, _) = raftgen(&["job", &id, "--server", &server], &dir.path).await;
    assert_eq!(code, 0);
    assert!(stdout.lines().any(|l| l.starts_with("state") && l.contains("succeeded")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("prompt") && l.ends_with("a json cat")), "{stdout}");

    // The jobs table: one row per job, columns aligned under the header.
    let (code, stdout, _) = raftgen(&["jobs", "--server", &server], &dir.path).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    let prompt_col = lines[0].find("prompt").unwrap();
    let rows: Vec<&&str> = lines.iter().filter(|l| l.contains("a json cat") || l.contains("a text cat")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        let at = row.find("a json cat").or_else(|| row.find("a text cat"));
        assert_eq!(at, Some(prompt_col), "misaligned row in\n{stdout}");
        assert!(row.contains("10/10"), "{row}");
    }
    let (code, stdout, _) = raftgen(&["jobs", "--server", &server, "--output", "json"], &dir.path).await;
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<Value>(&stdout).unwrap()["jobs"].as_array().unwrap().len() >= 2);

    // Errors: one line, a non-zero exit.
    for (args, needle) in [
        (vec!["job", "../cluster", "--server", &server], "id"),
        (vec!["job", &format!("{:032x}", 7), "--server", &server], "404"),
    ] {
        let (code, _, stderr) = raftgen(&args, &dir.path).await;
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// The stream sits behind the API keys, and a node serves at most
/// `--max-event-streams` at once (503 with Retry-After beyond, a slot again
/// once a client leaves).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_need_a_key_and_are_bounded_per_node() {
    let dir = scratch();
    let keys = dir.path.join("keys");
    std::fs::write(&keys, "ci 0123456789abcdef0123456789abcdef\n").unwrap();
    // The job outlasts the test: the stream stays open until dropped.
    let flags = ["--executor", "test-pattern", "--test-pattern-delay-ms", "600000", "--slots", "1"];
    let flags = [&flags[..], &["--api-keys", keys.to_str().unwrap(), "--max-event-streams", "1"]].concat();
    let cluster = start(&dir.path, 1, &flags);
    let key = "0123456789abcdef0123456789abcdef";
    let client = cluster.client(1).with_api_key(Some(key.into()));
    let base = cluster.url(1);
    // Any ready check through the key: the node lists itself with its slots.
    common::wait_until("the node registered", Duration::from_secs(60), || async {
        client.get("/v1/cluster").await.is_ok_and(|c| c["members"][0]["slots"] == 1)
    })
    .await;
    let id = submit(&client, "a long one", 1).await;
    let url = format!("{base}/v1/jobs/{id}/events");
    let http = reqwest::Client::new();

    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401, "no key");
    let first = http.get(&url).bearer_auth(key).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let busy = http.get(&url).bearer_auth(key).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert!(busy.headers().contains_key("retry-after"));
    let body: Value = busy.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    // The first client leaves: its slot frees once the node notices.
    drop(first);
    common::wait_until("a free stream slot", Duration::from_secs(60), || async {
        http.get(&url).bearer_auth(key).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
}
