//! The decoder half of diffusers' `AutoencoderKL` (Rombach et al. 2022),
//! shared by the SD family (4 latent channels) and Z-Image (the FLUX
//! autoencoder, 16): latents in, pixels in [-1, 1] out. Text-to-image never
//! encodes, so the encoder's weights are not read.
//!
//! Built from `models::blocks`, so its ResNet blocks (most of a decode's
//! time) run the fused GroupNorm+SiLU with [`Kernels::Fused`].

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::attention::AttentionBlock;
use super::blocks::conv::Conv2d;
use super::blocks::norm::GroupNorm;
use super::blocks::resnet::{ResnetBlock2D, ResnetConfig, Upsample2D};
use super::blocks::Kernels;

/// The sizes of a decoder, from `vae/config.json`.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// A 1x1 `post_quant_conv` before the decoder (SD; not FLUX/Z-Image).
    pub use_post_quant_conv: bool,
}

/// diffusers' autoencoders use this epsilon in every decoder norm.
const EPS: f64 = 1e-6;

pub struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (ResnetBlock2D, AttentionBlock, ResnetBlock2D),
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// `vb` is the autoencoder's root (`post_quant_conv.*`, `decoder.*`).
    pub fn new(c: &DecoderConfig, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let Some(&top) = c.block_out_channels.last() else {
            candle_core::bail!("vae config: block_out_channels is empty");
        };
        let groups = c.norm_num_groups;
        let resnet = |i: usize, o: usize, vb: VarBuilder| {
            let rc = ResnetConfig {
                in_channels: i,
                out_channels: o,
                temb_channels: None,
                groups,
                eps: EPS,
                output_scale_factor: 1.0,
            };
            ResnetBlock2D::new(rc, vb, kernels)
        };
        let post_quant_conv = if c.use_post_quant_conv {
            let n = c.latent_channels;
            Some(Conv2d::new(n, n, 1, 1, 0, vb.pp("post_quant_conv"), kernels)?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let vm = vb.pp("mid_block");
        let mid = (
            resnet(top, top, vm.pp("resnets").pp("0"))?,
            AttentionBlock::new(top, None, groups, EPS, 1.0, vm.pp("attentions").pp("0"), kernels)?,
            resnet(top, top, vm.pp("resnets").pp("1"))?,
        );
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (i, &out) in reversed.iter().enumerate() {
            let vbi = vb.pp("up_blocks").pp(i.to_string());
            let mut resnets = Vec::with_capacity(c.layers_per_block + 1);
            for j in 0..=c.layers_per_block {
                let from = match (i, j) {
                    (0, 0) => top,
                    (_, 0) => reversed[i - 1],
                    _ => out,
                };
                resnets.push(resnet(from, out, vbi.pp("resnets").pp(j.to_string()))?);
            }
            let upsampler = if i + 1 < reversed.len() {
                Some(Upsample2D::new(out, vbi.pp("upsamplers").pp("0"), kernels)?)
            } else {
                None
            };
            up_blocks.push((resnets, upsampler));
        }
        let bottom = reversed[reversed.len() - 1];
        Ok(Decoder {
            post_quant_conv,
            conv_in: Conv2d::new(c.latent_channels, top, 3, 1, 1, vb.pp("conv_in"), kernels)?,
            mid,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, bottom, EPS, vb.pp("conv_norm_out"), kernels)?,
            conv_out: Conv2d::new(bottom, c.out_channels, 3, 1, 1, vb.pp("conv_out"), kernels)?,
        })
    }
}

impl Decoder {
    /// [`Module::forward`] that also hands every intermediate result to
    /// `seen` with its name (`conv_in`, `mid.resnet0`, `up.1.resnet2`, ...):
    /// for comparing devices stage by stage.
    pub fn forward_traced(&self, xs: &Tensor, seen: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        seen("post_quant_conv", &xs);
        let (r0, attn, r1) = &self.mid;
        xs = self.conv_in.forward(&xs)?;
        seen("conv_in", &xs);
        xs = r0.forward(&xs, None)?;
        seen("mid.resnet0", &xs);
        xs = attn.forward(&xs)?;
        seen("mid.attention", &xs);
        xs = r1.forward(&xs, None)?;
        seen("mid.resnet1", &xs);
        for (i, (resnets, upsampler)) in self.up_blocks.iter().enumerate() {
            for (j, r) in resnets.iter().enumerate() {
                xs = r.forward(&xs, None)?;
                seen(&format!("up.{i}.resnet{j}"), &xs);
            }
            if let Some(up) = upsampler {
                xs = up.forward(&xs, None)?;
                seen(&format!("up.{i}.upsample"), &xs);
            }
        }
        xs = self.conv_norm_out.forward_silu(&xs)?;
        seen("norm_out", &xs);
        let out = self.conv_out.forward(&xs)?;
        seen("conv_out", &out);
        Ok(out)
    }
}

impl Module for Decoder {
    /// Latents already unscaled (`latents / scaling_factor + shift_factor`).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_traced(xs, &mut |_, _| {})
    }
}
