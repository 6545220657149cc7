//! Euler and Euler ancestral (Karras et al. 2022, k-diffusion's samplers as
//! diffusers writes them): SDXL's and SDXL-Turbo's samplers.
//!
//! Both walk the sigmas `sqrt((1 - ᾱ) / ᾱ)` taken at the spaced timesteps.
//! The ancestral variant steps down to `sigma_down` and adds fresh noise of
//! scale `sigma_up`, drawn from each job's own stream.

use candle_core::{Result, Tensor};

use super::{LinearStep, NoiseFn, Scheduler, SchedulerConfig};

pub struct Euler {
    timesteps: Vec<f64>,
    /// One per timestep, plus a final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    ancestral: bool,
    v_prediction: bool,
}

impl Euler {
    pub fn new(config: &SchedulerConfig, steps: usize, ancestral: bool) -> anyhow::Result<Self> {
        if config.use_karras_sigmas == Some(true) {
            anyhow::bail!("use_karras_sigmas is not supported");
        }
        let train_sigmas: Vec<f64> = config.alphas_cumprod()?.into_iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        // Euler keeps "linspace" timesteps fractional; DDIM rounds them.
        let timesteps = if config.timestep_spacing == "linspace" {
            super::linspace(0.0, (config.num_train_timesteps - 1) as f64, steps).into_iter().rev().collect()
        } else {
            config.spaced_timesteps(steps)?
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match config.timestep_spacing.as_str() {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        };
        Ok(Euler { timesteps, sigmas, init_noise_sigma, ancestral, v_prediction: config.v_prediction()? })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// Linear interpolation of `table` (indexed 0..len) at `x` (numpy's `interp`).
fn interp(x: f64, table: &[f64]) -> f64 {
    if x <= 0.0 {
        return table[0];
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last];
    }
    let lo = x.floor() as usize;
    let frac = x - lo as f64;
    table[lo] + (table[lo + 1] - table[lo]) * frac
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        sample / (sigma * sigma + 1.0).sqrt()
    }

    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseFn) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let pred_x0 = if self.v_prediction {
            ((model_output * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (sample / (sigma * sigma + 1.0))?)?
        } else {
            (sample - (model_output * sigma)?)?
        };
        let derivative = ((sample - pred_x0)? / sigma)?;
        if !self.ancestral {
            return sample + (derivative * (next - sigma))?;
        }
        let sigma_up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let sigma_down = (next * next - sigma_up * sigma_up).sqrt();
        let prev = (sample + (derivative * (sigma_down - sigma))?)?;
        let z = noise(sample.dims())?;
        prev + (z * sigma_up)?
    }

    /// `step` expanded: the derivative is the output itself (epsilon) or
    /// `sample * σ / (σ² + 1) + output / √(σ² + 1)` (v), and the sample moves
    /// by `derivative * (target - σ)` (+ `sigma_up` noise when ancestral).
    fn linear_step(&self, i: usize) -> Option<LinearStep> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (target, noise) = if self.ancestral {
            let sigma_up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            ((next * next - sigma_up * sigma_up).sqrt(), sigma_up)
        } else {
            (next, 0.0)
        };
        let dt = target - sigma;
        let (d_sample, d_output) = if self.v_prediction {
            (sigma / (sigma * sigma + 1.0), 1.0 / (sigma * sigma + 1.0).sqrt())
        } else {
            (0.0, 1.0)
        };
        Some(LinearStep { sample: 1.0 + d_sample * dt, model_output: d_output * dt, noise })
    }
}
