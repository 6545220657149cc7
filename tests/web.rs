//! The web page in a real browser: headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs) loads `/` from a follower of a 3-node cluster,
//! checks the cluster view and that the size fields start at the model's
//! native size, submits the prompt form (first with a bad width,
//! whose error must appear next to the field), waits until the result's image
//! has loaded in the gallery (the page having said how long the job had
//! left while it ran), and saves screenshots (their paths are printed).
//!
//! Chromium is driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: NUL-terminated JSON messages, commands on the
//! browser's fd 3, answers and events on its fd 4), so no websocket client or
//! CDP crate is needed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{scratch, start};

/// Longest wait for anything the page should show.
const WAIT: Duration = Duration::from_secs(60);
/// Longest wait for one DevTools answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const WIDE_PX: u32 = 1280;
const NARROW_PX: u32 = 390;

/// The browser: `RAFTGEN_CHROMIUM`, else `chromium` or `chromium-browser` on PATH.
fn find_chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("RAFTGEN_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "tests/web.rs needs Chromium: neither `chromium` nor `chromium-browser` is on PATH. \
         Run .ci/run (it installs Debian's chromium package as root), or `apt-get install chromium`, \
         or set RAFTGEN_CHROMIUM to the browser's path"
    );
}

/// A headless Chromium and one page of it, driven over the DevTools pipe.
/// Dropping it closes the browser and kills its process group.
struct Browser {
    child: Child,
    commands: std::io::PipeWriter,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(dir: &Path) -> Browser {
        let exe = find_chromium();
        let profile = tempfile::Builder::new().prefix("raftgen-chromium-").tempdir().unwrap();
        let log = dir.join("chromium.log");
        let (child_reads, commands) = std::io::pipe().unwrap();
        let (messages_in, child_writes) = std::io::pipe().unwrap();
        let (r, w) = (child_reads.as_raw_fd(), child_writes.as_raw_fd());
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--mute-audio",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            &format!("--window-size={WIDE_PX},1400"),
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(File::create(&log).unwrap())
        .stderr(File::create(&log).unwrap())
        .process_group(0);
        // SAFETY: between fork and exec only fcntl and dup2 run (async-signal-safe).
        // The pipe ends are first copied above fd 10, so moving them onto 3
        // and 4 cannot overwrite one with the other.
        unsafe {
            cmd.pre_exec(move || {
                let r2 = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        drop((child_reads, child_writes));
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(messages_in);
            loop {
                let mut buf = Vec::new();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop_if(|b| *b == 0);
                        let Ok(v) = serde_json::from_slice::<Value>(&buf) else { continue };
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut browser = Browser { child, commands, messages, next_id: 0, session: None, log, _profile: profile };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().expect("a target id").to_string();
        let attached = browser.call("Target.attachToTarget", json!({ "targetId": target, "flatten": true }));
        browser.session = Some(attached["sessionId"].as_str().expect("a session id").to_string());
        browser
    }

    /// Sends one DevTools command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// As [`Browser::call`], with the protocol's error as `Err` (the browser
    /// being gone still fails the test).
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("{method}: the browser is gone ({e}); {}", self.log_tail()));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .messages
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{method}: no answer from the browser ({e}); {}", self.log_tail()));
            if m["id"] == id {
                return match m.get("error") {
                    Some(err) => Err(err.to_string()),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr).unwrap_or_else(|e| panic!("evaluating {expr:?}: {e}"))
    }

    /// As [`Browser::eval`], with an exception (or a page between two
    /// documents) as `Err`.
    fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let params = json!({ "expression": expr, "returnByValue": true, "awaitPromise": true });
        let r = self.try_call("Runtime.evaluate", params)?;
        match r.get("exceptionDetails") {
            Some(e) => Err(format!("threw {e}")),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Waits until `expr` is true in the page; on time-out, fails showing the page's text.
    fn wait_for(&mut self, what: &str, expr: &str) {
        let deadline = Instant::now() + WAIT;
        let mut last = Ok(Value::Null);
        while last != Ok(json!(true)) {
            if Instant::now() > deadline {
                let text = self.try_eval("location.href + '\\n' + (document.body ? document.body.innerText : '')");
                let text = text.unwrap_or_else(Value::String);
                panic!(
                    "timed out waiting for {what} ({expr}), last {last:?}; the page shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            last = self.try_eval(expr);
        }
    }

    /// Loads `url` in the page and waits until its document is complete.
    fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url }));
        assert!(r.get("errorText").is_none(), "loading {url}: {r}");
        let url = serde_json::to_string(url).unwrap();
        self.wait_for("the page to load", &format!("location.href === {url} && document.readyState === 'complete'"));
    }

    fn viewport(&mut self, width_px: u32, height_px: u32, mobile: bool) {
        let params = json!({ "width": width_px, "height": height_px, "deviceScaleFactor": 1, "mobile": mobile });
        self.call("Emulation.setDeviceMetricsOverride", params);
    }

    /// A PNG of the viewport, written to `path`.
    fn screenshot(&mut self, path: &Path) -> Vec<u8> {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        // Straight to the process's stderr, not through `eprintln!`, which
        // the test harness captures: the path shows in the log of a passing run.
        let line = format!("screenshot: {}\n", path.display());
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        png
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: VecDeque<&str> = text.lines().rev().take(20).collect();
        format!("last lines of {}:\n{}", self.log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helpers (zygote, renderers) share its process group.
        let pgid = self.child.id() as libc::pid_t;
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot's encoding).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|c| *c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | (*d as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// PNG width and height, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().expect("a PNG");
    (reader.info().width, reader.info().height)
}

/// Script that fills the prompt form (64 px high, 10 steps, seed 42) and clicks Generate.
fn fill(prompt: &str, width: u32) -> String {
    let prompt = serde_json::to_string(prompt).unwrap();
    format!(
        "(() => {{ const f = document.querySelector('#submit-form');
           f.elements.prompt.value = {prompt};
           f.elements.negative_prompt.value = 'fog';
           f.elements.width.value = '{width}'; f.elements.height.value = '64';
           f.elements.steps.value = '10'; f.elements.seed.value = '42';
           document.querySelector('#submit-button').click(); return true; }})()"
    )
}

#[test]
fn base64_decodes_known_vectors() {
    for (text, bytes) in [("", ""), ("Zg==", "f"), ("Zm8=", "fo"), ("Zm9v", "foo"), ("Zm9vYmFy", "foobar")] {
        assert_eq!(base64_decode(text), bytes.as_bytes(), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_in_the_browser_and_see_the_image() {
    let dir = scratch();
    // Long enough (3 s) for a progress report (one a second) while it runs.
    let flags =
        ["--executor", "test-pattern", "--test-pattern-delay-ms", "3000", "--slots", "1", "--node-timeout-ms", "2000"];
    let cluster = start(&dir.path, 3, &flags);
    let leader = cluster.wait_ready(1, 3, 1, WAIT).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let base = cluster.url(follower);

    // The page and its assets: embedded, typed, under a same-origin CSP.
    let http = reqwest::Client::new();
    for (path, ctype) in [("/", "text/html"), ("/assets/app.js", "text/javascript"), ("/assets/style.css", "text/css")]
    {
        let resp = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(ctype), "{path}: {:?}", h["content-type"]);
        assert_eq!(h["content-security-policy"], raftgen::http::web::CONTENT_SECURITY_POLICY, "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let etag = h["etag"].clone();
        let again = http.get(format!("{base}{path}")).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{path} revalidated");
    }
    let missing = http.get(format!("{base}/assets/nope.js")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let mut browser = Browser::launch(&dir.path);
    browser.viewport(WIDE_PX, 1400, false);
    browser.navigate(&format!("{base}/"));

    // The cluster view: 3 nodes, the leader marked.
    browser.wait_for(
        "the cluster view with 3 nodes and the leader",
        &format!(
            "document.querySelectorAll('#cluster tbody tr').length === 3 \
             && document.querySelector('#cluster tr.leader')?.dataset.nodeId === '{leader}' \
             && document.querySelector('#cluster-summary').textContent.includes('leader node {leader}') \
             && document.querySelector('#summary').textContent.startsWith('This page is from node {follower};')"
        ),
    );
    browser.wait_for("the model list", "document.querySelector('#f-model').value === 'test-pattern'");
    // The size fields start at the model's native size, and the hint says it.
    let models: Value = http.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    let side = models["data"][0]["default_side_px"].as_u64().unwrap();
    browser.wait_for(
        "the model's native size in the size fields",
        &format!(
            "document.querySelector('#f-width').value === '{side}' && document.querySelector('#f-height').value === '{side}' \
             && document.querySelector('#size-hint').textContent.includes('draws {side}×{side} px natively')"
        ),
    );

    // A width the model refuses: the API's message appears next to the field.
    browser.eval(&fill("a lighthouse at dusk", 100));
    browser.wait_for(
        "the width error",
        "document.querySelector('#e-width').textContent.includes('multiple of 8') \
         && document.querySelector('#f-width').getAttribute('aria-invalid') === 'true'",
    );
    assert_eq!(browser.eval("document.querySelectorAll('#jobs li').length"), json!(0), "a refused job was listed");

    // A good one: listed with its progress, then in the gallery with its image.
    browser.eval(&fill("a lighthouse at dusk", 96));
    browser.wait_for("the job in the list", "document.querySelectorAll('#jobs li').length === 1");
    assert_eq!(browser.eval("document.querySelector('#e-width').textContent"), json!(""), "the old error stayed");
    let id = browser.eval("document.querySelector('#jobs li').dataset.jobId");
    let id = id.as_str().expect("the job's id").to_string();
    assert_eq!(browser.eval("JSON.parse(localStorage.getItem('raftgen.jobs'))[0]"), json!(id));
    let img = format!("document.querySelector('#gallery figure[data-job-id=\"{id}\"] img')");
    browser.wait_for("the image in the gallery", &format!("{img}?.complete === true && {img}.naturalWidth > 0"));
    assert_eq!(browser.eval(&format!("[{img}.naturalWidth, {img}.naturalHeight]")), json!([96, 64]));

    // What the page says matches the API.
    let job = cluster.client(leader).get(&format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["request"]["prompt"], "a lighthouse at dusk");
    assert_eq!(job["seed"], 42);
    let item = browser.eval(&format!(
        "(() => {{ const li = document.querySelector('#jobs li[data-job-id=\"{id}\"]');
           return [li.dataset.state, li.querySelector('.step').textContent, li.querySelector('progress').value]; }})()"
    ));
    assert_eq!(item, json!(["succeeded", "step 10/10", 10]));
    // While it ran, the page said how long it had left.
    let eta = format!("document.querySelector('#jobs li[data-job-id=\"{id}\"]').dataset.etaShown");
    assert_eq!(browser.eval(&eta), json!("1"), "no time left was shown while the job ran");
    let card = browser.eval(&format!(
        "(() => {{ const f = document.querySelector('#gallery figure[data-job-id=\"{id}\"]');
           const params = Object.fromEntries([...f.querySelectorAll('dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent]));
           return {{ prompt: f.querySelector('.prompt').textContent, params }}; }})()"
    ));
    assert!(card["prompt"].as_str().unwrap().ends_with("a lighthouse at dusk"), "{card}");
    let node = job["node"].as_u64().unwrap().to_string();
    for (k, v) in [("model", "test-pattern"), ("negative", "fog"), ("size", "96×64"), ("steps", "10"), ("seed", "42")]
    {
        assert_eq!(card["params"][k], v, "{card}");
    }
    assert_eq!(card["params"]["node"], node, "{card}");

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-test");
    let png = browser.screenshot(&shots.join("screenshot.png"));
    assert_eq!(png_size(&png), (WIDE_PX, 1400));

    // A narrow screen: one column, nothing wider than the screen.
    browser.viewport(NARROW_PX, 844, true);
    browser.wait_for(
        "the narrow layout",
        &format!(
            "document.documentElement.scrollWidth <= {NARROW_PX} && {img}.getBoundingClientRect().width <= {NARROW_PX}"
        ),
    );
    let png = browser.screenshot(&shots.join("screenshot-narrow.png"));
    assert_eq!(png_size(&png), (NARROW_PX, 844));
}

/// With `--api-keys`: the page loads without a key, asks for one, and then
/// works with it (jobs polled, images fetched with the header as `blob:`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_keys_asks_for_one() {
    const KEY: &str = "web-5e0f1a2b3c4d5e6f708192a3b4c5d6e7";
    let dir = scratch();
    std::fs::create_dir_all(&dir.path).unwrap();
    let keys = dir.path.join("api-keys");
    std::fs::write(&keys, format!("web {KEY}\n")).unwrap();
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let keys = keys.display().to_string();
    let flags = ["--executor", "test-pattern", "--test-pattern-delay-ms", "300", "--api-keys", &keys];
    let cluster = start(&dir.path, 1, &flags);
    let base = cluster.url(1);
    let http = reqwest::Client::new();
    common::wait_until("the node to be ready", WAIT, || async {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(http.get(format!("{base}/")).send().await.unwrap().status(), 200, "the page needs no key");
    assert_eq!(http.get(format!("{base}/assets/app.js")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/v1/cluster")).send().await.unwrap().status(), 401, "the API does");

    let mut browser = Browser::launch(&dir.path);
    browser.viewport(WIDE_PX, 1400, false);
    browser.navigate(&format!("{base}/"));
    browser.wait_for("the key panel", "document.querySelector('#key-panel').hidden === false");
    browser.eval(&format!(
        "document.querySelector('#api-key').value = '{KEY}'; document.querySelector('#key-form').requestSubmit(); true"
    ));
    browser.wait_for(
        "the cluster view with the key",
        "document.querySelector('#key-panel').hidden === true \
         && document.querySelectorAll('#cluster tbody tr').length === 1 \
         && document.querySelector('#f-model').value === 'test-pattern'",
    );
    browser.eval(&fill("a key-holder's lighthouse", 96));
    browser.wait_for("the job in the list", "document.querySelectorAll('#jobs li').length === 1");
    let id = browser.eval("document.querySelector('#jobs li').dataset.jobId");
    let img = format!("document.querySelector('#gallery figure[data-job-id={id}] img')");
    browser.wait_for("the image in the gallery", &format!("{img}?.complete === true && {img}.naturalWidth > 0"));
    assert_eq!(browser.eval(&format!("{img}.src.startsWith('blob:')")), json!(true), "an image fetched with the key");
    assert_eq!(browser.eval(&format!("[{img}.naturalWidth, {img}.naturalHeight]")), json!([96, 64]));
    assert_eq!(browser.eval("document.querySelector('#jobs li').dataset.state"), json!("succeeded"));

    // Forgetting the key asks for one again.
    browser.eval("document.querySelector('#key-forget').click(); true");
    browser.wait_for(
        "the key panel again",
        "localStorage.getItem('raftgen.apiKey') === null && document.querySelector('#key-panel').hidden === false",
    );
}
