//! GroupNorm, alone and followed by SiLU: the pair every ResNet block runs
//! twice, and the fused op's main customer.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::Kernels;

/// diffusers' `nn.GroupNorm(groups, channels, eps)`: `weight` and `bias`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    kernels: Kernels,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(GroupNorm { inner, weight, bias, groups, eps, kernels })
    }

    /// `silu(GroupNorm(x))`, in one pass with [`Kernels::Fused`].
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Fused => crate::kernels::group_norm_silu(xs, self.groups, &self.weight, &self.bias, self.eps),
            Kernels::Candle => candle_nn::ops::silu(&self.inner.forward(xs)?),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }
}
