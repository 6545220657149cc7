//! Multi-head attention as the UNet's transformer blocks use it
//! (`attn1`/`attn2`: `to_q`, `to_k`, `to_v`, `to_out.0`) and the
//! autoencoder's single-head mid-block attention.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::norm::GroupNorm;
use super::Kernels;

/// The largest head dimension our CUDA attention kernels take; larger heads
/// (the autoencoder's one 512-wide head) run candle's ops on CUDA.
const MAX_FUSED_HEAD_DIM_CUDA: usize = 256;

/// [`super::attention`] with the fused kernel where it applies.
fn attend(kernels: Kernels, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let d = q.dim(candle_core::D::Minus1)?;
    let kernels = if q.device().is_cuda() && d > MAX_FUSED_HEAD_DIM_CUDA { Kernels::Candle } else { kernels };
    super::attention(kernels, q, k, v, scale)
}

/// Attention of `xs` [B, L, C] over `context` [B, Lc, Cc] (itself when
/// `None`), `heads` heads of `C / heads`.
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    kernels: Kernels,
}

impl CrossAttention {
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        vb: VarBuilder,
        kernels: Kernels,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(CrossAttention {
            to_q: candle_nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            kernels,
        })
    }

    /// [B, L, H * D] -> [B, H, L, D].
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, l, c) = xs.dims3()?;
        xs.reshape((b, l, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous()
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        if self.kernels == Kernels::Fused {
            // The tokens-major layout the projections produce, read as is.
            let (b, l, _) = xs.dims3()?;
            let lc = context.dim(1)?;
            let q = self.to_q.forward(xs)?;
            let c = q.dim(2)?;
            let d = c / self.heads;
            let q = q.reshape((b, l, self.heads, d))?;
            let k = self.to_k.forward(context)?.reshape((b, lc, self.heads, d))?;
            let v = self.to_v.forward(context)?.reshape((b, lc, self.heads, d))?;
            let out = crate::kernels::attention_bshd(&q, &k, &v, self.scale)?;
            return self.to_out.forward(&out.reshape((b, l, c))?);
        }
        let q = self.split_heads(&self.to_q.forward(xs)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = attend(self.kernels, &q, &k, &v, self.scale)?;
        let (b, h, l, d) = out.dims4()?;
        self.to_out.forward(&out.transpose(1, 2)?.reshape((b, l, h * d))?)
    }
}

/// The autoencoder's mid-block attention: GroupNorm, then single- (or
/// multi-) head self-attention over the pixels, residual. Weights named
/// `to_q`.. (diffusers >= 0.14) or `query`/`key`/`value`/`proj_attn`, as
/// [C, C] or [C, C, 1, 1].
#[derive(Debug)]
pub struct AttentionBlock {
    group_norm: GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    proj_attn: Linear,
    heads: usize,
    rescale_output_factor: f64,
    kernels: Kernels,
}

fn square_linear(channels: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

impl AttentionBlock {
    pub fn new(
        channels: usize,
        head_channels: Option<usize>,
        groups: usize,
        eps: f64,
        rescale_output_factor: f64,
        vb: VarBuilder,
        kernels: Kernels,
    ) -> Result<Self> {
        let (q, k, v, o) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(AttentionBlock {
            group_norm: GroupNorm::new(groups, channels, eps, vb.pp("group_norm"), kernels)?,
            query: square_linear(channels, vb.pp(q))?,
            key: square_linear(channels, vb.pp(k))?,
            value: square_linear(channels, vb.pp(v))?,
            proj_attn: square_linear(channels, vb.pp(o))?,
            heads: channels / head_channels.unwrap_or(channels),
            rescale_output_factor,
            kernels,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        // Tokens made contiguous before the projections: on CUDA the SD
        // autoencoder's attention was seen to differ from the CPU (3.5e-2, f32,
        // tests/fused_pipelines.rs) with both kernel sets when the projections
        // read this transposed view (cause not yet confirmed on a GPU).
        let x = self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, h * w, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.query.forward(&x)?)?;
        let k = split(self.key.forward(&x)?)?;
        let v = split(self.value.forward(&x)?)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let out = attend(self.kernels, &q, &k, &v, scale)?;
        let out = out.transpose(1, 2)?.reshape((b, h * w, c))?;
        let out = self.proj_attn.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        let out = (out + xs)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}
