//! The UNet's spatial transformer (diffusers' `Transformer2DModel`):
//! GroupNorm, a projection into tokens, `depth` transformer blocks
//! (self-attention, cross-attention over the text, GEGLU feed-forward, each
//! pre-LayerNorm and residual), the projection back, residual.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::attention::CrossAttention;
use super::conv::Conv2d;
use super::norm::GroupNorm;
use super::Kernels;
use crate::kernels::Gelu;

/// `net.0.proj` (to twice the inner width), GEGLU, `net.2` (back).
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    kernels: Kernels,
}

impl FeedForward {
    fn new(dim: usize, mult: usize, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let inner = dim * mult;
        let vb = vb.pp("net");
        Ok(FeedForward {
            proj_in: candle_nn::linear(dim, inner * 2, vb.pp("0").pp("proj"))?,
            proj_out: candle_nn::linear(inner, dim, vb.pp("2"))?,
            kernels,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let p = self.proj_in.forward(xs)?;
        // candle's `gelu` (tanh approximation), as candle-transformers' GeGlu.
        let h = match self.kernels {
            Kernels::Fused => crate::kernels::geglu(&p, Gelu::Tanh)?,
            Kernels::Candle => {
                let parts = p.chunk(2, candle_core::D::Minus1)?;
                (&parts[0] * parts[1].gelu()?)?
            }
        };
        self.proj_out.forward(&h)
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    attn1: CrossAttention,
    attn2: CrossAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
}

impl BasicTransformerBlock {
    fn new(dim: usize, heads: usize, head_dim: usize, context_dim: usize, vb: VarBuilder, k: Kernels) -> Result<Self> {
        Ok(BasicTransformerBlock {
            attn1: CrossAttention::new(dim, None, heads, head_dim, vb.pp("attn1"), k)?,
            attn2: CrossAttention::new(dim, Some(context_dim), heads, head_dim, vb.pp("attn2"), k)?,
            ff: FeedForward::new(dim, 4, vb.pp("ff"), k)?,
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, Some(context))? + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// The sizes of a [`SpatialTransformer`].
#[derive(Clone, Copy, Debug)]
pub struct SpatialTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub groups: usize,
    pub context_dim: usize,
    /// `proj_in`/`proj_out` as linear layers (SD 2.x, SDXL) rather than 1x1
    /// convolutions (SD 1.x).
    pub use_linear_projection: bool,
}

#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    pub fn new(c: SpatialTransformerConfig, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let ch = c.channels;
        let proj = |name: &str| -> Result<Proj> {
            Ok(if c.use_linear_projection {
                Proj::Linear(candle_nn::linear(ch, ch, vb.pp(name))?)
            } else {
                Proj::Conv(Conv2d::new(ch, ch, 1, 1, 0, vb.pp(name), kernels)?)
            })
        };
        let blocks = (0..c.depth)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i.to_string());
                BasicTransformerBlock::new(ch, c.heads, ch / c.heads, c.context_dim, vb, kernels)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: GroupNorm::new(c.groups, ch, 1e-6, vb.pp("norm"), kernels)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let x = self.norm.forward(xs)?;
        // [B, C, H, W] -> tokens [B, H*W, C], projected before (conv) or after (linear).
        let tokens = |t: &Tensor| t.transpose(1, 2)?.transpose(2, 3)?.reshape((b, h * w, c));
        let mut x = match &self.proj_in {
            Proj::Conv(p) => tokens(&p.forward(&x)?)?,
            Proj::Linear(p) => p.forward(&tokens(&x)?)?,
        };
        for block in &self.blocks {
            x = block.forward(&x, context)?;
        }
        let image = |t: &Tensor| t.reshape((b, h, w, c))?.transpose(2, 3)?.transpose(1, 2);
        let x = match &self.proj_out {
            Proj::Conv(p) => p.forward(&image(&x)?)?,
            Proj::Linear(p) => image(&p.forward(&x)?)?,
        };
        x + xs
    }
}
