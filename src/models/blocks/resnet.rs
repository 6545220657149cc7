//! The ResNet block of the UNet and the autoencoder (He et al. 2015, as
//! diffusers' `ResnetBlock2D` with the "default" time-embedding mode), and
//! the resampling layers between levels.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::conv::Conv2d;
use super::norm::GroupNorm;
use super::Kernels;

/// `x + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))`,
/// divided by `output_scale_factor`; a 1x1 `conv_shortcut` on the skip path
/// when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The sizes of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// The time embedding's width; `None` in the autoencoder.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(c: ResnetConfig, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let (i, o) = (c.in_channels, c.out_channels);
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(c.groups, i, c.eps, vb.pp("norm1"), kernels)?,
            conv1: Conv2d::new(i, o, 3, 1, 1, vb.pp("conv1"), kernels)?,
            norm2: GroupNorm::new(c.groups, o, c.eps, vb.pp("norm2"), kernels)?,
            conv2: Conv2d::new(o, o, 3, 1, 1, vb.pp("conv2"), kernels)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(candle_nn::linear(t, o, vb.pp("time_emb_proj"))?),
                None => None,
            },
            conv_shortcut: if i != o {
                Some(Conv2d::new(i, o, 1, 1, 0, vb.pp("conv_shortcut"), kernels)?)
            } else {
                None
            },
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `temb` is the time embedding already passed through SiLU (the same
    /// for every block of a UNet step, so the caller computes it once).
    pub fn forward(&self, xs: &Tensor, silu_temb: Option<&Tensor>) -> Result<Tensor> {
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = match (silu_temb, &self.time_emb_proj) {
            (Some(t), Some(proj)) => proj.forward(t)?.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?.broadcast_add(&h)?,
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// A stride-2 3x3 convolution halving the resolution (`downsamplers.0.conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        Ok(Downsample2D { conv: Conv2d::new(channels, channels, 3, 2, padding, vb.pp("conv"), kernels)?, padding })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            // diffusers pads right and bottom by one, then convolves unpadded.
            let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling (x2, or to the skip connection's size when
/// the input side was odd), then a 3x3 convolution (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::new(channels, channels, 3, 1, 1, vb.pp("conv"), kernels)? })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (h, w) = match size {
            Some(s) => s,
            None => {
                let (_, _, h, w) = xs.dims4()?;
                (2 * h, 2 * w)
            }
        };
        self.conv.forward(&xs.upsample_nearest2d(h, w)?)
    }
}
