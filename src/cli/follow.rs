//! `raftgen submit --wait`: follows one job to its end and shows how it goes.
//!
//! It reads the job's event stream (`GET /v1/jobs/{id}/events`, Server-Sent
//! Events; see `crate::http::events`) and, when the server does not stream
//! (an older node, a proxy that refuses it) or the stream ends without the
//! job's end (its lifetime bound, the node stopping), polls the job instead.
//! What it sees goes to a [`Display`]: a progress bar when stderr is a
//! terminal, plain lines when it is not (logs and captured stderr get no
//! control characters), nothing with `--output json`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::cli::Client;

/// Largest event accepted from a stream (a `done` carries the job's view).
const MAX_EVENT_BYTES: usize = 4 << 20;
/// A stream silent for this long (no event, no keep-alive comment) is broken.
const STREAM_SILENCE_MS: u64 = 45_000;

/// How a followed job is shown on stderr.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// A progress bar when stderr is a terminal, else a line per change.
    Human,
    /// Nothing (`--output json`: only the final JSON, on stdout).
    Quiet,
}

/// What is known of the job, and the bar or lines that show it.
pub struct Display {
    bar: Option<ProgressBar>,
    lines: bool,
    state: String,
    node: Value,
    attempt: Value,
    step: u64,
    steps: u64,
    /// What was last shown, to show each change once.
    shown: Option<(String, Value, Value, u64, u64)>,
    /// Whether the bar shows an ETA (from the first step on: before, the
    /// rate is unknown).
    with_eta: bool,
}

impl Display {
    pub fn new(show: Show) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (show == Show::Human && tty).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Display {
            bar,
            lines: show == Show::Human && !tty,
            state: "submitted".into(),
            node: Value::Null,
            attempt: Value::Null,
            step: 0,
            steps: 0,
            shown: None,
            with_eta: false,
        }
    }

    /// Takes in a job view (`GET /v1/jobs/{id}`, or a stream's first event).
    pub fn job(&mut self, job: &Value) {
        self.status(job);
        self.progress(&job["progress"]);
    }

    /// Takes in `{"state", "node", "attempt"}`.
    fn status(&mut self, v: &Value) {
        if let Some(s) = v["state"].as_str() {
            self.state = s.to_string();
        }
        self.node = v["node"].clone();
        self.attempt = v["attempt"].clone();
        self.draw();
    }

    /// Takes in `{"step", "steps"}`.
    fn progress(&mut self, v: &Value) {
        if let (Some(step), Some(steps)) = (v["step"].as_u64(), v["steps"].as_u64()) {
            (self.step, self.steps) = (step, steps);
        }
        self.draw();
    }

    fn draw(&mut self) {
        let now = (self.state.clone(), self.node.clone(), self.attempt.clone(), self.step, self.steps);
        if self.shown.as_ref() == Some(&now) {
            return;
        }
        let state_changed = self.shown.as_ref().is_none_or(|s| (&s.0, &s.1, &s.2) != (&now.0, &now.1, &now.2));
        self.shown = Some(now);
        let on_node = match (&self.node, self.attempt.as_u64()) {
            (Value::Number(n), Some(a)) if a > 1 => format!(" on node {n}, attempt {a}"),
            (Value::Number(n), _) => format!(" on node {n}"),
            _ => String::new(),
        };
        if self.lines {
            eprintln!("  {}{on_node} (step {}/{})", self.state, self.step, self.steps);
        }
        let Some(bar) = &self.bar else { return };
        let with_eta = self.state == "running" && self.step > 0;
        if state_changed || with_eta != self.with_eta {
            self.with_eta = with_eta;
            let template = match (self.state == "running", with_eta) {
                (true, true) => "{spinner} {msg} [{bar:30}] step {pos}/{len}, ETA {eta}",
                (true, false) => "{spinner} {msg} [{bar:30}] step {pos}/{len}",
                _ => "{spinner} {msg}",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            if self.state != "running" {
                // A new attempt starts its estimate afresh.
                bar.reset();
            }
            bar.set_message(format!("{}{on_node}", self.state));
        }
        bar.set_length(self.steps.max(1));
        bar.set_position(self.step);
    }

    /// Removes the bar (the caller prints the outcome).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Follows job `id` until it is terminal (or `timeout` passes) and returns
/// its final view.
pub async fn follow(client: &Client, id: &str, timeout: Duration, display: &mut Display) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    match stream(client, id, deadline, display).await {
        Ok(Some(job)) => return Ok(job),
        Ok(None) => tracing::debug!("the event stream of job {id} ended early; polling"),
        Err(e) => tracing::debug!("no event stream for job {id} ({e:#}); polling"),
    }
    let left = deadline.saturating_duration_since(Instant::now());
    client.wait_job(id, left, |job| display.job(job)).await
}

/// Reads the job's event stream: `Ok(Some(job))` at its `done` event,
/// `Ok(None)` if it ended before, an error if there is none.
async fn stream(client: &Client, id: &str, deadline: Instant, display: &mut Display) -> anyhow::Result<Option<Value>> {
    let left = deadline.saturating_duration_since(Instant::now());
    let resp = client
        .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .timeout(left.max(Duration::from_millis(1)))
        .send()
        .await
        .with_context(|| format!("cannot reach {}", client.server))?;
    let streaming = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !resp.status().is_success() || !streaming {
        bail!("the server answered {} without an event stream", resp.status());
    }
    let mut events = EventReader::new(resp);
    while let Some((event, data)) = events.next().await? {
        let value: Value = serde_json::from_str(&data).with_context(|| format!("a bad '{event}' event"))?;
        match event.as_str() {
            "state" if value["job"].is_object() => display.job(&value["job"]),
            "state" => display.status(&value),
            "progress" => display.progress(&value),
            "done" => return Ok(Some(value["job"].clone())),
            "error" => bail!("job {id}: {}", value["error"]["message"].as_str().unwrap_or("the stream failed")),
            _ => {}
        }
    }
    Ok(None)
}

/// A Server-Sent Events parser over a response body: `(event, data)` pairs.
struct EventReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl EventReader {
    fn new(resp: reqwest::Response) -> Self {
        EventReader { resp, buf: Vec::new() }
    }

    /// The next complete event, or `None` at the end of the stream.
    async fn next(&mut self) -> anyhow::Result<Option<(String, String)>> {
        let (mut event, mut data) = (String::new(), None::<String>);
        loop {
            while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if let Some(data) = data.take() {
                        let name = if event.is_empty() { "message".to_string() } else { std::mem::take(&mut event) };
                        return Ok(Some((name, data)));
                    }
                    event.clear();
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = value.to_string(),
                    "data" => match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(value);
                        }
                        None => data = Some(value.to_string()),
                    },
                    _ => {}
                }
            }
            let silence = Duration::from_millis(STREAM_SILENCE_MS);
            let chunk = tokio::time::timeout(silence, self.resp.chunk())
                .await
                .map_err(|_| anyhow::anyhow!("the event stream was silent for {} ms", silence.as_millis()))??;
            let Some(chunk) = chunk else { return Ok(None) };
            self.buf.extend_from_slice(&chunk);
            if self.buf.len() + data.as_ref().map_or(0, String::len) > MAX_EVENT_BYTES {
                bail!("an event larger than {MAX_EVENT_BYTES} bytes");
            }
        }
    }
}
