//! Webhook delivery: when a job that names a `webhook` URL ends, the leader
//! POSTs the job to it, signed, and records every try in the replicated state.
//!
//! Why the leader, and why the record is replicated: every node holds every
//! result, so any node could deliver, but only one should. The leader is the
//! one node that exists (at most one at a time per term) and already runs the
//! cluster's loops. Each try's outcome is committed as a
//! [`Command::WebhookDelivery`], so whether a job still owes its receiver a
//! POST is part of the state every replica holds: a new leader finds the job
//! in [`JobStateMachine::webhooks_pending`](raftgen_raft::state::JobStateMachine::webhooks_pending)
//! and delivers again. Delivery is therefore **at least once**: a leader that
//! POSTed and died before its record committed, or a receiver that took the
//! POST but answered too late, gets the same job again (with the same delivery
//! id when it is the same try). Receivers dedup by job id and event.
//!
//! A new leader first waits until it has applied everything committed before
//! its term (`ensure_linearizable`), so it does not redeliver a job whose
//! delivered record it simply has not applied yet.
//!
//! Tries: the first as soon as the job ends; after a failed one (a non-2xx
//! status, redirects included, or no answer within `--webhook-timeout-ms`)
//! the next waits 1 s, 2 s, 4 s, ... at most 60 s, counted by the leader's
//! clock from when the last try ended (its recorded `at_ms`). After
//! `--webhook-max-attempts` failed tries the job gives up. The decision is
//! made in `apply` from the numbers in the command, so every replica agrees.
//! At most `--webhook-max-concurrent` tries are in flight; a job has at most
//! one. The answer's body is ignored (at most [`MAX_RESPONSE_BYTES`] are read).
//!
//! Signature: `X-Raftgen-Signature: sha256=<hex>` is HMAC-SHA256 keyed with
//! `--webhook-secret` over `"{timestamp}.{body}"`, where the timestamp is the
//! `X-Raftgen-Timestamp` header (unix seconds), so a receiver can refuse old
//! replays. The key defaults to the cluster secret: HMAC does not reveal its
//! key, but a receiver that verifies signatures must know the key, so
//! operators should give receivers a separate `--webhook-secret`. The secret is
//! never logged. See docs/webhooks.md for the payload and a verification snippet.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use raftgen_raft::job::{Delivery, Job, JobId, JobState, MAX_DELIVERY_ERROR_CHARS, MAX_WEBHOOK_ATTEMPTS};
use raftgen_raft::{Command, Response};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::node::app::{now_ms, App};
use crate::node::config::WebhookSettings;

pub const EVENT_HEADER: &str = "x-raftgen-event";
pub const DELIVERY_HEADER: &str = "x-raftgen-delivery";
pub const TIMESTAMP_HEADER: &str = "x-raftgen-timestamp";
pub const SIGNATURE_HEADER: &str = "x-raftgen-signature";

/// How often the leader looks for due deliveries.
const TICK_MS: u64 = 200;
/// Wait after the first failed try; doubled after each further one.
pub const FIRST_BACKOFF_MS: u64 = 1_000;
/// Longest wait between two tries.
pub const MAX_BACKOFF_MS: u64 = 60_000;
/// Most bytes of a receiver's answer read (and thrown away).
pub const MAX_RESPONSE_BYTES: usize = 4 << 10;
/// Longest a new leader waits to catch up with the log before delivering.
const CATCH_UP_TIMEOUT_MS: u64 = 5_000;

/// The node flags of webhook delivery (flattened into `raftgen node`).
#[derive(clap::Args, Clone, Debug)]
pub struct WebhookArgs {
    /// Key of the webhook signature (HMAC-SHA256). Default: the cluster
    /// secret; set a separate one, since every receiver has to know it.
    #[arg(long, env = "RAFTGEN_WEBHOOK_SECRET", hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub webhook_secret: Option<String>,
    /// Longest one delivery try may take.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=300_000))]
    pub webhook_timeout_ms: u64,
    /// Tries per job before it gives up.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=MAX_WEBHOOK_ATTEMPTS as i64))]
    pub webhook_max_attempts: u32,
    /// Deliveries in flight at once (on the leader).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub webhook_max_concurrent: u32,
}

impl WebhookArgs {
    pub fn settings(&self) -> WebhookSettings {
        WebhookSettings {
            secret: self.webhook_secret.as_deref().map(Arc::from),
            timeout_ms: self.webhook_timeout_ms,
            max_attempts: self.webhook_max_attempts,
            max_concurrent: self.webhook_max_concurrent as usize,
        }
    }
}

/// Parses a webhook URL as the HTTP client will (the state machine's own
/// check, in `JobRequest::validate`, has no URL library): `http` or `https`,
/// a host, no credentials.
pub fn parse_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("must be an absolute http:// or https:// URL".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not contain credentials (user:password@)".into());
    }
    Ok(parsed)
}

/// `sha256=<hex>`: HMAC-SHA256 keyed with `secret` over `"{timestamp}.{body}"`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Checks a signature header in constant time (what a receiver does; the
/// comparison must not stop at the first differing byte, or response timing
/// would reveal how much of a forged signature is right).
pub fn verify(secret: &[u8], timestamp: u64, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else { return false };
    let Some(given) = decode_hex(hex) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// The delivery id of a job's `attempt`-th try (`X-Raftgen-Delivery`).
pub fn delivery_id(job: JobId, attempt: u32) -> String {
    format!("{job}-{attempt}")
}

/// `job.succeeded`, `job.failed` or `job.cancelled`.
pub fn event_name(state: JobState) -> &'static str {
    match state {
        JobState::Succeeded => "job.succeeded",
        JobState::Failed => "job.failed",
        _ => "job.cancelled",
    }
}

/// How long after the last try ended the next one may start, when `tries`
/// were made (0: at once).
pub fn backoff_ms(tries: usize) -> u64 {
    match tries {
        0 => 0,
        n => FIRST_BACKOFF_MS.saturating_mul(1u64 << (n - 1).min(32)).min(MAX_BACKOFF_MS),
    }
}

/// When the job's next try is due, by the leader's clock.
fn due_at_ms(job: &Job) -> u64 {
    let deliveries = job.webhook.as_ref().map_or(&[][..], |w| &w.deliveries);
    match deliveries.last() {
        Some(last) => last.at_ms.saturating_add(backoff_ms(deliveries.len())),
        None => job.finished_at_ms.unwrap_or(0),
    }
}

/// The absolute URL of a job's image on this node (scheme as this node serves).
fn image_url(app: &App, job: JobId) -> String {
    app.scheme.url(&app.addr, &format!("/v1/jobs/{job}/image"))
}

/// The JSON body POSTed for a finished job.
pub fn payload(job: &Job, image_url: Option<String>) -> Value {
    let since = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
    json!({
        "id": job.id.to_string(),
        "event": event_name(job.state),
        "state": job.state.as_str(),
        "error": job.error,
        "image_url": image_url.filter(|_| job.state == JobState::Succeeded),
        "model": job.request.model,
        "seed": job.seed,
        "attempts": job.attempt,
        "submitted_at_ms": job.submitted_at_ms,
        "started_at_ms": job.started_at_ms,
        "finished_at_ms": job.finished_at_ms,
        "queue_wait_ms": since(Some(job.submitted_at_ms), job.assigned_at_ms),
        "run_ms": since(job.started_at_ms, job.finished_at_ms),
    })
}

/// The client for receivers: no redirects (a 3xx is a failed try), trusting
/// the system's root certificates for https receivers.
fn client(settings: &WebhookSettings) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_millis(settings.timeout_ms.min(5_000)))
        .user_agent(concat!("raftgen-webhook/", env!("CARGO_PKG_VERSION")));
    for cert in rustls_native_certs::load_native_certs().certs {
        if let Ok(cert) = reqwest::Certificate::from_der(cert.as_ref()) {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build()
}

/// The delivery loop; runs on every node and delivers only while it leads.
pub async fn run(app: Arc<App>) {
    let settings = app.settings.webhook.clone();
    let client = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("webhook client: {e}; this node will deliver no webhooks");
            return;
        }
    };
    let secret: Arc<str> = settings.secret.clone().unwrap_or_else(|| app.secret.clone());
    let slots = Arc::new(Semaphore::new(settings.max_concurrent));
    let in_flight: Arc<Mutex<HashSet<JobId>>> = Arc::default();
    let mut shutdown = app.shutdown.clone();
    let mut caught_up_term: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(TICK_MS)) => {}
            _ = shutdown.changed() => return,
        }
        let term = app.raft.metrics().borrow().current_term;
        if !app.is_leader() {
            caught_up_term = None;
            continue;
        }
        if caught_up_term != Some(term) {
            let caught_up =
                tokio::time::timeout(Duration::from_millis(CATCH_UP_TIMEOUT_MS), app.raft.ensure_linearizable()).await;
            match caught_up {
                Ok(Ok(_)) => caught_up_term = Some(term),
                other => {
                    tracing::debug!("webhooks: leader not caught up yet: {other:?}");
                    continue;
                }
            }
        }
        let now = now_ms();
        let due: Vec<Job> = {
            let data = app.view.read();
            let flying = in_flight.lock().expect("in-flight lock");
            data.jobs
                .webhooks_pending()
                .filter(|j| !flying.contains(&j.id) && due_at_ms(j) <= now)
                .take(slots.available_permits())
                .cloned()
                .collect()
        };
        for job in due {
            let Ok(permit) = slots.clone().try_acquire_owned() else { break };
            in_flight.lock().expect("in-flight lock").insert(job.id);
            let (app, client, secret, in_flight) = (app.clone(), client.clone(), secret.clone(), in_flight.clone());
            tokio::spawn(async move {
                let id = job.id;
                deliver(&app, &client, &secret, job).await;
                in_flight.lock().expect("in-flight lock").remove(&id);
                drop(permit);
            });
        }
    }
}

/// One try: POST, then commit its outcome.
async fn deliver(app: &App, client: &reqwest::Client, secret: &str, job: Job) {
    let (Some(url), Some(webhook)) = (&job.request.webhook, &job.webhook) else { return };
    let attempt = webhook.deliveries.len() as u32 + 1;
    if !app.is_leader() {
        return;
    }
    let settings = &app.settings.webhook;
    let body = serde_json::to_vec(&payload(&job, Some(image_url(app, job.id)))).expect("JSON of a job");
    let timestamp = now_ms() / 1_000;
    let started = Instant::now();
    let sent = client
        .post(url.as_str())
        .timeout(Duration::from_millis(settings.timeout_ms))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, event_name(job.state))
        .header(DELIVERY_HEADER, delivery_id(job.id, attempt))
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, sign(secret.as_bytes(), timestamp, &body))
        .body(body)
        .send()
        .await;
    let (status, error) = match sent {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let mut read = 0;
            while read < MAX_RESPONSE_BYTES {
                match resp.chunk().await {
                    Ok(Some(chunk)) => read += chunk.len(),
                    _ => break,
                }
            }
            (Some(status), None)
        }
        Err(e) => (None, Some(describe(e))),
    };
    let delivery = Delivery {
        attempt,
        at_ms: now_ms(),
        node: app.id,
        status,
        error,
        took_ms: started.elapsed().as_millis() as u64,
    };
    if delivery.succeeded() {
        tracing::info!(job_id = %job.id, "webhook delivered (try {attempt}, status {})", status.unwrap_or(0));
    } else {
        let why = delivery.error.clone().unwrap_or_else(|| format!("status {}", status.unwrap_or(0)));
        tracing::warn!(job_id = %job.id, "webhook try {attempt} failed: {why}");
    }
    let cmd = Command::WebhookDelivery { job: job.id, delivery, max_attempts: settings.max_attempts };
    match app.write(cmd, app.settings.submit_timeout()).await {
        Ok(Response::Ok) => {}
        Ok(other) => tracing::debug!(job_id = %job.id, "webhook record: {other:?}"),
        Err(e) => tracing::warn!(job_id = %job.id, "webhook try {attempt} not recorded: {e}"),
    }
}

/// A failed try's reason without the URL (shown in the job anyway), bounded.
fn describe(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut msg = what.to_string();
    let e = e.without_url();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg.chars().take(MAX_DELIVERY_ERROR_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let sig = sign(b"key", 1_700_000_000, b"{\"id\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
        assert!(verify(b"key", 1_700_000_000, b"{\"id\":1}", &sig));
        assert!(!verify(b"other", 1_700_000_000, b"{\"id\":1}", &sig));
        assert!(!verify(b"key", 1_700_000_001, b"{\"id\":1}", &sig));
        assert!(!verify(b"key", 1_700_000_000, b"{\"id\":2}", &sig));
        assert!(!verify(b"key", 1_700_000_000, b"{\"id\":1}", &sig[7..]));
        assert!(!verify(b"key", 1_700_000_000, b"{\"id\":1}", "sha256=zz"));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2 pins the HMAC itself; the signature is that HMAC
        // over "{timestamp}.{body}".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let raw: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(raw, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"12.what do ya want for nothing?");
        let expect: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sign(b"Jefe", 12, b"what do ya want for nothing?"), format!("sha256={expect}"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let waits: Vec<u64> = (0..10).map(backoff_ms).collect();
        assert_eq!(waits, [0, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]);
        assert_eq!(backoff_ms(usize::MAX), MAX_BACKOFF_MS);
    }

    #[test]
    fn urls_are_checked_like_the_client_parses_them() {
        assert!(parse_url("http://127.0.0.1:9000/hook?x=1").is_ok());
        assert!(parse_url("https://example.com/").is_ok());
        for bad in ["ftp://example.com/", "http://user:pw@example.com/", "not a url", "http://[::1/", "mailto:a@b"] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }
}
