//! The job model: what a client asks for, and what the cluster records about it.
//!
//! These types are replicated in the Raft log and in snapshots, so they are plain
//! data with no behaviour beyond validation. Limits live here, next to the fields
//! they bound, so the HTTP layer and the state machine enforce the same numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::result::ResultInfo;

/// A Raft node id.
pub type NodeId = u64;

/// Longest accepted prompt or negative prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 2_000;
/// Longest accepted model name, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 128;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Image side bounds, in pixels; sides must be multiples of 8 (latent stride).
pub const MIN_IMAGE_SIDE_PX: u32 = 8;
pub const MAX_IMAGE_SIDE_PX: u32 = 2_048;
/// Denoising steps bounds.
pub const MAX_STEPS: u32 = 150;
/// Classifier-free guidance bounds.
pub const MAX_GUIDANCE: f32 = 30.0;
/// Longest accepted sampler name, in bytes.
pub const MAX_SAMPLER_NAME_BYTES: usize = 32;
/// Most notes kept per job, and their length in characters.
pub const MAX_NOTES: usize = 8;
pub const MAX_NOTE_CHARS: usize = 200;
/// Priority bounds; higher runs first.
pub const MIN_PRIORITY: i32 = -100;
pub const MAX_PRIORITY: i32 = 100;
/// Largest result image a job may make (its metadata is what enters the log).
pub const MAX_IMAGE_BYTES: usize = 32 << 20;
/// Longest error message kept for a failed job.
pub const MAX_ERROR_CHARS: usize = 1_000;
/// Most history events kept per job (attempts are bounded, so this only caps
/// repeated stale completions).
pub const MAX_EVENTS_PER_JOB: usize = 64;
/// Longest accepted webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2_048;
/// Most webhook delivery tries recorded per job, whatever a node is configured
/// with (its `--webhook-max-attempts` is clamped to this).
pub const MAX_WEBHOOK_ATTEMPTS: u32 = 32;
/// Longest error kept for one webhook delivery try, in characters.
pub const MAX_DELIVERY_ERROR_CHARS: usize = 200;

/// A job id: 128 random bits chosen by the node that first received the
/// submission. It doubles as the internal idempotency key while the node keeps
/// forwarding the submission across a leader change.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub u128);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err("a job id is 32 hexadecimal characters".into());
        }
        u128::from_str_radix(s, 16).map(JobId).map_err(|_| "a job id is 32 hexadecimal characters".into())
    }
}

/// What the client asked for, exactly as accepted (after defaults were applied).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    /// `None`: the leader chooses one and records it in the log (see [`Job::seed`]).
    pub seed: Option<u64>,
    pub model: String,
    pub priority: i32,
    /// Overrides the model's default sampler (`ddim`, `euler`, `euler_a`,
    /// `flow_match_euler`); checked against the model by the API.
    pub sampler: Option<String>,
    /// May the result of an identical earlier job (same model hash, every
    /// generation parameter, a fixed seed) be returned without running again?
    pub cache: bool,
    /// Where to POST the job when it ends (see the webhook deliverer).
    pub webhook: Option<String>,
}

/// A request field that breaks a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError { field: field.to_string(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl JobRequest {
    /// Checks every bound. The HTTP layer calls it to answer 4xx naming the
    /// field; the state machine calls it again so a bad command can never enter
    /// the replicated state, whoever sent it.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "must not be empty"));
        }
        if self.prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(FieldError::new("prompt", format!("longer than {MAX_PROMPT_CHARS} characters")));
        }
        if self.negative_prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(FieldError::new("negative_prompt", format!("longer than {MAX_PROMPT_CHARS} characters")));
        }
        for (field, side) in [("width", self.width), ("height", self.height)] {
            if !(MIN_IMAGE_SIDE_PX..=MAX_IMAGE_SIDE_PX).contains(&side) || side % 8 != 0 {
                return Err(FieldError::new(
                    field,
                    format!("must be a multiple of 8 between {MIN_IMAGE_SIDE_PX} and {MAX_IMAGE_SIDE_PX}, got {side}"),
                ));
            }
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(FieldError::new("steps", format!("must be between 1 and {MAX_STEPS}, got {}", self.steps)));
        }
        if !self.guidance.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&self.guidance) {
            return Err(FieldError::new("guidance", format!("must be between 0 and {MAX_GUIDANCE}")));
        }
        if self.model.is_empty() || self.model.len() > MAX_MODEL_NAME_BYTES {
            return Err(FieldError::new("model", format!("must be 1 to {MAX_MODEL_NAME_BYTES} bytes")));
        }
        if let Some(s) = &self.sampler {
            if s.is_empty() || s.len() > MAX_SAMPLER_NAME_BYTES {
                return Err(FieldError::new("sampler", format!("must be 1 to {MAX_SAMPLER_NAME_BYTES} bytes")));
            }
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(FieldError::new(
                "priority",
                format!("must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {}", self.priority),
            ));
        }
        if let Some(url) = &self.webhook {
            validate_webhook_url(url).map_err(|m| FieldError::new("webhook", m))?;
        }
        Ok(())
    }
}

/// Checks a webhook URL without a URL library (this crate stays small): an
/// absolute `http://` or `https://` URL of visible ASCII with a host, an
/// optional numeric port, and no credentials (`user:pass@` would be stored in
/// the replicated log and shown in the job view).
fn validate_webhook_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_WEBHOOK_URL_BYTES {
        return Err(format!("longer than {MAX_WEBHOOK_URL_BYTES} bytes"));
    }
    if let Some(c) = url.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("must be visible ASCII without spaces (percent-encode {c:?})"));
    }
    let lower = url.to_ascii_lowercase();
    let rest = ["http://", "https://"]
        .iter()
        .find(|p| lower.starts_with(*p))
        .map(|p| &url[p.len()..])
        .ok_or("must be an absolute http:// or https:// URL")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.contains('@') {
        return Err("must not contain credentials (user:password@)".into());
    }
    let (host, port, host_char): (_, _, fn(char) -> bool) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or("has an unclosed IPv6 address")?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or("has something other than a port after the IPv6 address")?),
            };
            (host, port, |c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port), |c| c.is_ascii_alphanumeric() || "-._~%".contains(c)),
            None => (authority, None, |c| c.is_ascii_alphanumeric() || "-._~%".contains(c)),
        },
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if !host.chars().all(host_char) {
        return Err(format!("has an invalid host '{host}'"));
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("has an invalid port '{port}'"));
        }
    }
    Ok(())
}

/// Where a job is in its life. `Queued → Assigned → Running → terminal`, with
/// `Assigned|Running → Queued` only through a re-queue (node lost, or an
/// attempt failed in a way worth retrying). A job answered from the result
/// cache is created `Succeeded`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Assigned or running: the job holds one executor slot on its node.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Assigned | JobState::Running)
    }

    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| "must be one of queued, assigned, running, succeeded, failed, cancelled".to_string())
    }
}

/// One recorded transition of a job, with the leader's clock at commit time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Submitted,
    Assigned {
        node: NodeId,
        attempt: u32,
    },
    Started {
        node: NodeId,
        attempt: u32,
    },
    Requeued {
        node: NodeId,
        attempt: u32,
        reason: String,
    },
    Succeeded {
        node: NodeId,
        attempt: u32,
    },
    Failed {
        node: Option<NodeId>,
        attempt: u32,
        error: String,
    },
    Cancelled,
    /// A completion arrived for an attempt that is no longer current (fencing).
    CompletionRejected {
        node: NodeId,
        attempt: u32,
        reason: String,
    },
    /// The result image was dropped by the retention limit.
    ResultEvicted,
    /// The attempt failed in a way worth retrying (the executor broke, not
    /// the input); the job went back to the queue.
    AttemptFailed {
        node: NodeId,
        attempt: u32,
        error: String,
    },
    /// The job was answered from the result cache with the image of `source`,
    /// an identical earlier job; it succeeded without running.
    CacheHit {
        source: JobId,
    },
}

impl EventKind {
    /// The event's name in the API and in chaos histories (`submitted`,
    /// `assigned`, ..., `result_evicted`).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Submitted => "submitted",
            EventKind::Assigned { .. } => "assigned",
            EventKind::Started { .. } => "started",
            EventKind::Requeued { .. } => "requeued",
            EventKind::Succeeded { .. } => "succeeded",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::CompletionRejected { .. } => "completion_rejected",
            EventKind::ResultEvicted => "result_evicted",
            EventKind::AttemptFailed { .. } => "attempt_failed",
            EventKind::CacheHit { .. } => "cache_hit",
        }
    }
}

/// Execution progress, as last reported by the executing node.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub step: u32,
    pub steps: u32,
}

/// Everything the cluster knows about one job (the image itself is kept apart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub request: JobRequest,
    /// The seed actually used: the request's, or one the leader chose.
    pub seed: u64,
    pub idempotency_key: Option<String>,
    pub state: JobState,
    /// The node of the current (or, once terminal, the last) attempt.
    pub node: Option<NodeId>,
    /// How many times the job has been assigned; the current attempt's number.
    pub attempt: u32,
    /// Attempts that do not count against `max_attempts`: the node could not
    /// run the model at all ([`crate::command::Outcome::Unavailable`]).
    pub uncounted_attempts: u32,
    pub progress: Progress,
    pub error: Option<String>,
    /// Submission order: log index * MAX_BATCH_COMMANDS + position in its
    /// batch. FIFO order within a priority.
    pub seq: u64,
    pub submitted_at_ms: u64,
    pub assigned_at_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// The result image's hash, size and dimensions, once succeeded (kept
    /// after eviction).
    pub result: Option<ResultInfo>,
    pub result_evicted: bool,
    /// Content hash of the model that made the result.
    pub model_hash: Option<String>,
    /// What the executor said about the run (e.g. a truncated prompt).
    pub notes: Vec<String>,
    pub history: Vec<Event>,
    /// Delivery of the request's webhook: `Some` exactly when the request
    /// names one (from submission on; tries start once the job ends).
    pub webhook: Option<WebhookStatus>,
}

/// Where a job's webhook delivery stands. Replicated, so any leader knows
/// whether the job still owes its receiver a POST (see `src/webhook.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookStatus {
    /// Every recorded try, oldest first, numbered from 1; at most
    /// [`MAX_WEBHOOK_ATTEMPTS`].
    pub deliveries: Vec<Delivery>,
    /// A try was answered with a 2xx status.
    pub delivered: bool,
    /// The tries ran out without a 2xx answer; nobody tries again.
    pub gave_up: bool,
}

impl WebhookStatus {
    /// Neither delivered nor given up: a finished job's webhook is still owed.
    pub fn is_open(&self) -> bool {
        !self.delivered && !self.gave_up
    }
}

/// One webhook delivery try, as the node that made it reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The try's number, from 1; with the job id it names the delivery
    /// (`X-Raftgen-Delivery`) and makes a retried record idempotent.
    pub attempt: u32,
    /// The delivering leader's clock when the try ended; the next try's
    /// backoff counts from it.
    pub at_ms: u64,
    /// The node that made the try (the leader at the time).
    pub node: NodeId,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why the try failed without a status (connection refused, timeout),
    /// at most [`MAX_DELIVERY_ERROR_CHARS`] characters.
    pub error: Option<String>,
    /// How long the try took.
    pub took_ms: u64,
}

impl Delivery {
    /// The receiver took it: a 2xx answer.
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

impl Job {
    /// Attempts spent against `max_attempts`.
    pub fn counted_attempts(&self) -> u32 {
        self.attempt.saturating_sub(self.uncounted_attempts)
    }

    pub(crate) fn push_event(&mut self, at_ms: u64, kind: EventKind) {
        // Transitions are always kept; only repeated rejections can hit the cap.
        let is_rejection = matches!(kind, EventKind::CompletionRejected { .. });
        if !is_rejection || self.history.len() < MAX_EVENTS_PER_JOB {
            self.history.push(Event { at_ms, kind });
        }
    }
}

/// Truncates a message to [`MAX_ERROR_CHARS`] characters.
pub fn bounded_message(msg: &str) -> String {
    msg.chars().take(MAX_ERROR_CHARS).collect()
}
