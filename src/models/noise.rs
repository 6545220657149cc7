//! Seeded Gaussian noise, the only randomness in a pipeline.
//!
//! Each job's noise comes from its own ChaCha stream keyed by its seed, drawn
//! on the CPU and copied to the device, so an image depends on (model,
//! parameters, seed) alone: not on the backend's RNG, not on which other jobs
//! share its batch.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A job's noise source. The initial latents are drawn first; stochastic
/// samplers then draw one tensor per step from the same stream.
pub struct NoiseStream {
    rng: ChaCha8Rng,
}

impl NoiseStream {
    pub fn new(seed: u64) -> Self {
        NoiseStream { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// `n` standard normal samples.
    pub fn draw(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect()
    }

    /// A tensor of standard normal samples of the given shape.
    pub fn tensor(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.draw(n), shape, device)
    }
}

/// One noise tensor per job, stacked along the batch dimension.
pub fn batch_noise(streams: &mut [NoiseStream], shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let parts = streams.iter_mut().map(|s| s.tensor(shape, device)).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_different_seed_different_noise() {
        let a = NoiseStream::new(7).draw(64);
        let b = NoiseStream::new(7).draw(64);
        let c = NoiseStream::new(8).draw(64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / 64.0;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }
}
