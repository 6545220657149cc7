//! DDIM (Song et al. 2020) with eta = 0: deterministic, the sampler of
//! SD 2.1's folders and our default for the SD family.

use candle_core::{Result, Tensor};

use super::{LinearStep, NoiseFn, Scheduler, SchedulerConfig};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    v_prediction: bool,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Ddim {
            timesteps: config.spaced_timesteps(steps)?,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: config.num_train_timesteps / steps,
            v_prediction: config.v_prediction()?,
        })
    }

    /// `ᾱ` at step `i`'s timestep and at the one it steps to.
    fn alphas(&self, i: usize) -> (f64, f64) {
        let t = self.timesteps[i] as usize;
        let alpha_t = self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)];
        let alpha_prev = t.checked_sub(self.step_ratio).map_or(self.final_alpha_cumprod, |p| self.alphas_cumprod[p]);
        (alpha_t, alpha_prev)
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseFn) -> Result<Tensor> {
        let (alpha_t, alpha_prev) = self.alphas(i);
        let beta_t = 1.0 - alpha_t;
        let (pred_x0, pred_eps) = if self.v_prediction {
            (
                ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?,
                ((model_output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?,
            )
        } else {
            (((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?, model_output.clone())
        };
        (pred_x0 * alpha_prev.sqrt())? + (pred_eps * (1.0 - alpha_prev).sqrt())?
    }

    /// `step` expanded: `pred_x0 * √ᾱ_prev + pred_eps * √(1 - ᾱ_prev)` with
    /// `pred_x0` and `pred_eps` both linear in the sample and the output.
    fn linear_step(&self, i: usize) -> Option<LinearStep> {
        let (alpha_t, alpha_prev) = self.alphas(i);
        let (sa, sb) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
        let (pa, pb) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
        let (sample, model_output) =
            if self.v_prediction { (pa * sa + pb * sb, pb * sa - pa * sb) } else { (pa / sa, pb - pa * sb / sa) };
        Some(LinearStep { sample, model_output, noise: 0.0 })
    }
}
