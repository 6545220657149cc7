//! Samplers, written from the diffusers definitions so that a model folder's
//! `scheduler/scheduler_config.json` means the same thing here as there.
//!
//! A scheduler turns "n steps" into the list of timesteps the denoiser sees,
//! and moves the latents from one step to the next. Everything here is plain
//! arithmetic on the config; the only randomness (Euler ancestral) comes from
//! the caller's per-job noise streams.

mod ddim;
mod euler;
mod flow_match;

pub use ddim::Ddim;
pub use euler::Euler;
pub use flow_match::FlowMatchEuler;

use anyhow::bail;
use candle_core::{Result, Tensor};
use serde::Deserialize;

/// The samplers a job may ask for, by the names the API takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerAncestral,
    FlowMatchEuler,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 4] =
        [SamplerKind::Ddim, SamplerKind::Euler, SamplerKind::EulerAncestral, SamplerKind::FlowMatchEuler];

    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::FlowMatchEuler => "flow_match_euler",
        }
    }

    /// The name AUTOMATIC1111 shows, used in the PNG `parameters` chunk.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::FlowMatchEuler => "Euler (flow match)",
        }
    }

    pub fn parse(s: &str) -> Option<SamplerKind> {
        let s = s.trim().to_ascii_lowercase();
        SamplerKind::ALL.into_iter().find(|k| k.name() == s || k.a1111_name().to_ascii_lowercase() == s)
    }

    /// Whether the sampler draws fresh noise at each step.
    pub fn is_stochastic(self) -> bool {
        matches!(self, SamplerKind::EulerAncestral)
    }
}

/// The fields of a diffusers `scheduler_config.json` that these samplers use.
/// Unknown fields are ignored; missing ones take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    // Flow matching.
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_shift() -> f64 {
    1.0
}

impl SchedulerConfig {
    /// The sampler this config names, if we implement it. Classes we do not
    /// implement (PNDM, LMS, DPM-Solver...) map to `None`; the caller then uses
    /// the family's default with the same noise schedule.
    pub fn kind(&self) -> Option<SamplerKind> {
        match self.class_name.as_str() {
            "DDIMScheduler" => Some(SamplerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SamplerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SamplerKind::EulerAncestral),
            "FlowMatchEulerDiscreteScheduler" => Some(SamplerKind::FlowMatchEuler),
            _ => None,
        }
    }

    pub fn v_prediction(&self) -> anyhow::Result<bool> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(false),
            "v_prediction" => Ok(true),
            other => bail!("unsupported prediction_type '{other}'"),
        }
    }

    /// `alphas_cumprod` of the training noise schedule.
    pub fn alphas_cumprod(&self) -> anyhow::Result<Vec<f64>> {
        let n = self.num_train_timesteps;
        let betas: Vec<f64> = match self.beta_schedule.as_str() {
            "linear" => linspace(self.beta_start, self.beta_end, n),
            "scaled_linear" => {
                linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
            }
            other => bail!("unsupported beta_schedule '{other}'"),
        };
        if self.rescale_betas_zero_snr {
            bail!("rescale_betas_zero_snr is not supported");
        }
        let mut acc = 1.0;
        Ok(betas
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect())
    }

    /// The training timesteps used for `steps` inference steps, highest first,
    /// per `timestep_spacing` (diffusers' three rules).
    pub fn spaced_timesteps(&self, steps: usize) -> anyhow::Result<Vec<f64>> {
        let t = self.num_train_timesteps;
        Ok(match self.timestep_spacing.as_str() {
            "linspace" => linspace(0.0, (t - 1) as f64, steps).into_iter().rev().map(f64::round_ties_even).collect(),
            "leading" => {
                let ratio = t / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as f64).collect()
            }
            "trailing" => {
                let ratio = t as f64 / steps as f64;
                let mut v = Vec::new();
                let mut x = t as f64;
                while x > 0.0 && v.len() < steps {
                    v.push(x.round_ties_even() - 1.0);
                    x -= ratio;
                }
                v
            }
            other => bail!("unsupported timestep_spacing '{other}'"),
        })
    }
}

/// `n` evenly spaced values from `a` to `b` inclusive (numpy's `linspace`).
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![a],
        _ => (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect(),
    }
}

/// Draws a noise tensor shaped like the sample, one job's stream per batch row.
pub type NoiseFn<'a> = dyn FnMut(&[usize]) -> Result<Tensor> + 'a;

/// One step written as `next = sample * sample_coeff + model_output * output_coeff
/// + noise * noise_coeff`, with the noise (where the sampler draws any) shaped
/// like the sample: the form the fused guidance-and-step kernel
/// (`crate::kernels::guided_step`) takes.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct LinearStep {
    pub sample: f64,
    pub model_output: f64,
    pub noise: f64,
}

/// A sampler set up for one run of `n` steps.
pub trait Scheduler: Send {
    /// The timestep value handed to the denoiser at each step.
    fn timesteps(&self) -> &[f64];
    /// Factor applied to the initial noise (1 unless the sampler works in
    /// sigma space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The denoiser's input at step `i` (the sample itself unless the sampler
    /// rescales it).
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Moves `sample` from step `i` to step `i + 1` given the model output.
    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseFn) -> Result<Tensor>;
    /// [`Scheduler::step`] `i` as per-step scalars, for samplers whose step
    /// is linear in the sample, the model output and the noise (`None`
    /// otherwise). Noise is drawn only where `noise != 0`.
    fn linear_step(&self, _i: usize) -> Option<LinearStep> {
        None
    }
}

/// Builds the sampler `kind` over the model's noise schedule, for `steps` steps.
pub fn build(kind: SamplerKind, config: &SchedulerConfig, steps: usize) -> anyhow::Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SamplerKind::Ddim => Box::new(Ddim::new(config, steps)?),
        SamplerKind::Euler => Box::new(Euler::new(config, steps, false)?),
        SamplerKind::EulerAncestral => Box::new(Euler::new(config, steps, true)?),
        SamplerKind::FlowMatchEuler => Box::new(FlowMatchEuler::new(config, steps)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> SchedulerConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn spacing_rules_match_diffusers() {
        // Values printed by diffusers for SD-1.5's DDIM config and 4 steps.
        let c = cfg(r#"{"_class_name":"DDIMScheduler","steps_offset":1,"timestep_spacing":"leading"}"#);
        assert_eq!(c.spaced_timesteps(4).unwrap(), vec![751.0, 501.0, 251.0, 1.0]);
        let c = cfg(r#"{"timestep_spacing":"trailing"}"#);
        assert_eq!(c.spaced_timesteps(4).unwrap(), vec![999.0, 749.0, 499.0, 249.0]);
        let c = cfg(r#"{"timestep_spacing":"linspace"}"#);
        assert_eq!(c.spaced_timesteps(3).unwrap(), vec![999.0, 500.0, 0.0]);
        assert_eq!(c.kind(), None);
    }

    #[test]
    fn sampler_names_round_trip() {
        for k in SamplerKind::ALL {
            assert_eq!(SamplerKind::parse(k.name()), Some(k));
            assert_eq!(SamplerKind::parse(k.a1111_name()), Some(k));
        }
        assert_eq!(SamplerKind::parse("plms"), None);
    }
}
