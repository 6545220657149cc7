//! Flow-matching Euler (Esser et al. 2024 / diffusers'
//! `FlowMatchEulerDiscreteScheduler`): Z-Image's sampler.
//!
//! The latent moves along a straight path from noise (sigma = 1) to data
//! (sigma = 0); the model predicts the velocity, and each step is one Euler
//! step `x += (sigma_next - sigma) * v` over the shifted sigmas.

use candle_core::{Result, Tensor};

use super::{linspace, LinearStep, NoiseFn, Scheduler, SchedulerConfig};

pub struct FlowMatchEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl FlowMatchEuler {
    /// Sigmas from 1 down to `sigma_min` = 0, as Z-Image's pipeline sets them
    /// (it zeroes the scheduler's `sigma_min` before `set_timesteps`), then
    /// shifted by `shift`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        if config.use_dynamic_shifting {
            anyhow::bail!("use_dynamic_shifting is not supported");
        }
        let t = config.num_train_timesteps as f64;
        let shift = config.shift;
        let mut sigmas: Vec<f64> = linspace(t, 0.0, steps)
            .into_iter()
            .map(|ts| ts / t)
            .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect();
        let timesteps = sigmas.iter().map(|s| s * t).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEuler { timesteps, sigmas })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for FlowMatchEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseFn) -> Result<Tensor> {
        sample + (model_output * (self.sigmas[i + 1] - self.sigmas[i]))?
    }

    fn linear_step(&self, i: usize) -> Option<LinearStep> {
        Some(LinearStep { sample: 1.0, model_output: self.sigmas[i + 1] - self.sigmas[i], noise: 0.0 })
    }
}
