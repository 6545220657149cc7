//! TEST DOUBLE: the deterministic test-pattern executor.
//!
//! It draws a synthetic image computed only from the job (prompt, negative
//! prompt, seed, size, steps), taking a configurable time per job. It exists for
//! cluster tests, chaos runs and scheduler benchmarks, where what matters is
//! that the same job always yields the same bytes and that execution takes a
//! controllable time. It is not a model and never the default: a node runs it
//! only with `--executor test-pattern`. It can also inject faults ([`Faults`]:
//! runs that hang or break), for the tests of the execution timeout and of
//! retries.
//!
//! Noise mode (`--test-pattern-noise`): every pixel comes from a ChaCha
//! stream keyed by the job's fingerprint, stored without compression, so the
//! PNG is incompressible and its size is what the request's width and height
//! make it (3 bytes a pixel plus about 0.1%). Realistic results are
//! incompressible too (a 512x512 photo-like PNG is most of its raw size);
//! striped test images compress 100-fold and would hide what moving result
//! bytes costs the cluster. For the result-storage benchmark and tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use raftgen_raft::command::ModelInfo;

use super::{ExecError, Executor, JobOutput, JobSpec, RunControl};

/// The one model name the test-pattern executor serves.
pub const MODEL: &str = "test-pattern";

pub struct TestPatternExecutor {
    /// Simulated run time of one job, spread evenly over its steps.
    delay_ms: u64,
    /// Incompressible noise instead of stripes (see the module docs).
    noise: bool,
    faults: Faults,
    /// Jobs this executor began so far (what [`Faults`] counts).
    runs: AtomicU64,
}

/// Faults injected into the first jobs a test-pattern node runs (counted per
/// process, in the order the jobs begin).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// The first this many jobs hang: no progress until they are cancelled
    /// (an executor stuck mid-run, for the execution timeout).
    pub stall_first: u32,
    /// The next this many jobs fail with a retryable error (an executor that
    /// broke, for retries).
    pub fail_first: u32,
}

/// How often a stalled run looks at its cancel flag.
const STALL_CHECK: Duration = Duration::from_millis(10);

impl TestPatternExecutor {
    pub fn new(delay_ms: u64, faults: Faults) -> Self {
        TestPatternExecutor { delay_ms, noise: false, faults, runs: AtomicU64::new(0) }
    }

    /// Draws incompressible noise instead of stripes (see the module docs).
    pub fn with_noise(mut self, noise: bool) -> Self {
        self.noise = noise;
        self
    }
}

impl Executor for TestPatternExecutor {
    fn name(&self) -> &str {
        "test-pattern"
    }

    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            name: MODEL.to_string(),
            hash: HASH.to_string(),
            family: "test-pattern".into(),
            pixel_multiple: 8,
            max_prompt_tokens: u32::MAX,
            default_side_px: 512,
            default_steps: 20,
            default_guidance_centi: 750,
            default_sampler: "none".into(),
            samplers: vec!["none".into()],
        }]
    }

    fn loaded_models(&self) -> Vec<String> {
        vec![MODEL.to_string()]
    }

    fn generate_batch(&self, jobs: &[(JobSpec, RunControl)]) -> Vec<Result<JobOutput, ExecError>> {
        jobs.iter()
            .map(|(job, ctl)| {
                let png = self.generate(job, ctl)?;
                Ok(JobOutput { png, model_hash: HASH.to_string(), notes: Vec::new() })
            })
            .collect()
    }
}

/// The test double's stand-in for a content hash (it has no weights).
const HASH: &str = "test-pattern-v1";

impl TestPatternExecutor {
    fn generate(&self, job: &JobSpec, ctl: &RunControl) -> Result<Vec<u8>, ExecError> {
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let (stall, fail) = (u64::from(self.faults.stall_first), u64::from(self.faults.fail_first));
        if run < stall {
            while !ctl.is_cancelled() {
                std::thread::sleep(STALL_CHECK);
            }
            return Err(ExecError::Cancelled);
        }
        if run - stall < fail {
            return Err(ExecError::Failed(format!("test pattern: injected failure of run {}", run + 1)));
        }
        let steps = job.request.steps.max(1);
        let per_step = Duration::from_micros(self.delay_ms * 1000 / steps as u64);
        for step in 1..=steps {
            if ctl.is_cancelled() {
                return Err(ExecError::Cancelled);
            }
            if !per_step.is_zero() {
                std::thread::sleep(per_step);
            }
            ctl.progress(step, steps);
        }
        let png = if self.noise { render_noise(job) } else { render(job) };
        png.map_err(|e| ExecError::Failed(format!("png encoding: {e}")))
    }
}

/// FNV-1a over the fields that define the image.
fn fingerprint(job: &JobSpec) -> u64 {
    let r = &job.request;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(r.prompt.as_bytes());
    eat(&[0]);
    eat(r.negative_prompt.as_bytes());
    eat(&job.seed.to_le_bytes());
    eat(&r.steps.to_le_bytes());
    eat(r.model.as_bytes());
    h
}

/// Pixels from a ChaCha stream keyed by the fingerprint and the size,
/// stored uncompressed (incompressible data gains nothing from deflate, and
/// the fast path keeps a 1.5 MB image at a few milliseconds).
fn render_noise(job: &JobSpec) -> Result<Vec<u8>, png::EncodingError> {
    use rand::{RngCore, SeedableRng};
    let (w, h) = (job.request.width, job.request.height);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(fingerprint(job) ^ ((w as u64) << 32 | h as u64));
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    rng.fill_bytes(&mut pixels);
    let mut out = Vec::with_capacity(pixels.len() + pixels.len() / 256 + 1024);
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.set_filter(png::FilterType::NoFilter);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}

/// Diagonal bands whose colours, angle and frequency come from the fingerprint.
fn render(job: &JobSpec) -> Result<Vec<u8>, png::EncodingError> {
    let (w, h) = (job.request.width, job.request.height);
    let f = fingerprint(job);
    let base = [(f & 0xff) as u8, ((f >> 8) & 0xff) as u8, ((f >> 16) & 0xff) as u8];
    let accent = [((f >> 24) & 0xff) as u8, ((f >> 32) & 0xff) as u8, ((f >> 40) & 0xff) as u8];
    let period = 8 + ((f >> 48) % 56) as u32;
    let slope = 1 + ((f >> 56) % 3) as u32;
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let band = ((x + slope * y) / period).is_multiple_of(2);
            pixels.extend_from_slice(if band { &base } else { &accent });
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftgen_raft::job::JobRequest;

    fn spec(seed: u64, width: u32, height: u32) -> JobSpec {
        let request = JobRequest {
            prompt: "noise".into(),
            negative_prompt: String::new(),
            width,
            height,
            steps: 1,
            guidance: 0.0,
            seed: Some(seed),
            model: MODEL.into(),
            priority: 0,
            sampler: None,
            cache: true,
            webhook: None,
        };
        JobSpec { id: raftgen_raft::job::JobId(seed as u128), attempt: 1, request, seed }
    }

    #[test]
    fn noise_is_deterministic_incompressible_and_sized_by_the_request() {
        let a = render_noise(&spec(1, 368, 368)).unwrap();
        assert_eq!(a, render_noise(&spec(1, 368, 368)).unwrap(), "same job, same bytes");
        assert_ne!(a, render_noise(&spec(2, 368, 368)).unwrap(), "another seed, other bytes");
        let raw = 368 * 368 * 3;
        assert!(a.len() >= raw && a.len() < raw + raw / 100, "{} bytes for {raw} raw", a.len());
        // A real PNG of that size.
        let decoder = png::Decoder::new(std::io::Cursor::new(&a));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (368, 368));
        // Stripes of the same size compress to a fraction of it.
        let stripes = render(&spec(1, 368, 368)).unwrap().len();
        assert!(stripes < raw / 4, "stripes: {stripes} bytes");
    }
}
