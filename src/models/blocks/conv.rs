//! 2-D convolution with diffusers' `weight` [O, C, KH, KW] and `bias` [O]:
//! candle's, or on CUDA with [`Kernels::Fused`] ours ([`crate::kernels::conv2d`]:
//! our im2col in NCHW order and one batched matrix product, no transpose
//! back). On the CPU both run candle's.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::Kernels;

#[derive(Clone, Debug)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    kernels: Kernels,
}

impl Conv2d {
    /// A `kernel` x `kernel` convolution with bias (groups 1, dilation 1).
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
        kernels: Kernels,
    ) -> Result<Self> {
        let cfg = Conv2dConfig { stride, padding, ..Default::default() };
        let inner = candle_nn::conv2d(in_ch, out_ch, kernel, cfg, vb)?;
        let (weight, bias) = (inner.weight().clone(), inner.bias().cloned());
        Ok(Conv2d { inner, weight, bias, stride, padding, kernels })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.kernels == Kernels::Fused && xs.device().is_cuda() {
            crate::kernels::conv2d(xs, &self.weight, self.bias.as_ref(), self.stride, self.padding)
        } else {
            self.inner.forward(xs)
        }
    }
}
