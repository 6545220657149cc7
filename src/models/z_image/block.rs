//! One Z-Image transformer block (diffusers' `ZImageTransformerBlock`), owned
//! so that its attention runs our fused kernel: RMS-normed, adaLN-scaled
//! input; self-attention with QK-RMSNorm and 3-axis RoPE; a SwiGLU
//! feed-forward; each output RMS-normed and added through a tanh gate (the
//! refiner of the caption tokens has no modulation: scale 1, gate 1).
//!
//! The arithmetic is candle-transformers' block's (which computes what
//! diffusers computes, `transformer.rs` says where it does not); only the
//! attention differs, by [`Kernels`].

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::with_tracing::RmsNorm;
use candle_transformers::models::z_image::transformer::{apply_rotary_emb, Config, ADALN_EMBED_DIM};

use crate::kernels::{attention_bshd, rms_norm_rope};
use crate::models::blocks::Kernels;

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// The norms' weights, for the fused QK-norm + RoPE.
    norm_q_weight: Tensor,
    norm_k_weight: Tensor,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (dim, heads) = (cfg.dim, cfg.n_heads);
        let head_dim = dim / heads;
        let lin = |i: usize, o: usize, name: &str| candle_nn::linear_no_bias(i, o, vb.pp(name));
        Ok(Attention {
            to_q: lin(dim, dim, "to_q")?,
            to_k: lin(dim, dim, "to_k")?,
            to_v: lin(dim, dim, "to_v")?,
            to_out: lin(dim, dim, "to_out.0")?,
            norm_q: RmsNorm::new(head_dim, 1e-5, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(head_dim, 1e-5, vb.pp("norm_k"))?,
            norm_q_weight: vb.pp("norm_q").get(head_dim, "weight")?,
            norm_k_weight: vb.pp("norm_k").get(head_dim, "weight")?,
            heads,
            head_dim,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let shape = (b, l, self.heads, self.head_dim);
        if kernels == Kernels::Fused {
            // QK-norm + RoPE in one pass each, attention in the tokens-major
            // layout the projections produce: no transposes.
            let q = rms_norm_rope(&self.to_q.forward(x)?.reshape(shape)?, &self.norm_q_weight, cos, sin, 1e-5)?;
            let k = rms_norm_rope(&self.to_k.forward(x)?.reshape(shape)?, &self.norm_k_weight, cos, sin, 1e-5)?;
            let v = self.to_v.forward(x)?.reshape(shape)?;
            let out = attention_bshd(&q, &k, &v, 1.0 / (self.head_dim as f64).sqrt())?;
            return self.to_out.forward(&out.reshape((b, l, ()))?);
        }
        let q = self.norm_q.forward(&self.to_q.forward(x)?.reshape(shape)?)?;
        let k = self.norm_k.forward(&self.to_k.forward(x)?.reshape(shape)?)?;
        let v = self.to_v.forward(x)?.reshape(shape)?;
        let q = apply_rotary_emb(&q, cos, sin)?.transpose(1, 2)?.contiguous()?;
        let k = apply_rotary_emb(&k, cos, sin)?.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = match kernels {
            Kernels::Fused => crate::kernels::attention(&q, &k, &v, scale)?,
            // candle-transformers' `attention_basic`: in the model's dtype.
            Kernels::Candle => {
                let scores = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?
            }
        };
        self.to_out.forward(&out.transpose(1, 2)?.reshape((b, l, ()))?)
    }
}

/// `w2(silu(w1 x) * w3 x)`.
struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.w2.forward(&(self.w1.forward(x)?.silu()? * self.w3.forward(x)?)?)
    }
}

pub struct ZImageBlock {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    adaln_modulation: Option<Linear>,
    kernels: Kernels,
}

impl ZImageBlock {
    pub fn new(cfg: &Config, modulation: bool, vb: VarBuilder, kernels: Kernels) -> Result<Self> {
        let (dim, hidden) = (cfg.dim, cfg.hidden_dim());
        let ff = vb.pp("feed_forward");
        let norm = |name: &str| RmsNorm::new(dim, cfg.norm_eps, vb.pp(name));
        Ok(ZImageBlock {
            attention: Attention::new(cfg, vb.pp("attention"))?,
            feed_forward: FeedForward {
                w1: candle_nn::linear_no_bias(dim, hidden, ff.pp("w1"))?,
                w2: candle_nn::linear_no_bias(hidden, dim, ff.pp("w2"))?,
                w3: candle_nn::linear_no_bias(dim, hidden, ff.pp("w3"))?,
            },
            attention_norm1: norm("attention_norm1")?,
            attention_norm2: norm("attention_norm2")?,
            ffn_norm1: norm("ffn_norm1")?,
            ffn_norm2: norm("ffn_norm2")?,
            adaln_modulation: if modulation {
                let adaln = dim.min(ADALN_EMBED_DIM);
                Some(candle_nn::linear(adaln, 4 * dim, vb.pp("adaLN_modulation").pp("0"))?)
            } else {
                None
            },
            kernels,
        })
    }

    /// `x` [B, L, dim]; `cos`/`sin` [L, head_dim / 2]; `adaln` [B, 256] when
    /// the block is modulated.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, adaln: Option<&Tensor>) -> Result<Tensor> {
        let attn = |h: &Tensor| self.attention.forward(h, cos, sin, self.kernels);
        match (&self.adaln_modulation, adaln) {
            (Some(m), Some(a)) => {
                let chunks = m.forward(a)?.unsqueeze(1)?.chunk(4, D::Minus1)?;
                let (scale_msa, gate_msa) = ((&chunks[0] + 1.0)?, chunks[1].tanh()?);
                let (scale_mlp, gate_mlp) = ((&chunks[2] + 1.0)?, chunks[3].tanh()?);
                let h = attn(&self.attention_norm1.forward(x)?.broadcast_mul(&scale_msa)?)?;
                let x = (x + gate_msa.broadcast_mul(&self.attention_norm2.forward(&h)?)?)?;
                let h = self.feed_forward.forward(&self.ffn_norm1.forward(&x)?.broadcast_mul(&scale_mlp)?)?;
                &x + gate_mlp.broadcast_mul(&self.ffn_norm2.forward(&h)?)?
            }
            (None, _) => {
                let x = (x + self.attention_norm2.forward(&attn(&self.attention_norm1.forward(x)?)?)?)?;
                let h = self.feed_forward.forward(&self.ffn_norm1.forward(&x)?)?;
                &x + self.ffn_norm2.forward(&h)?
            }
            (Some(_), None) => candle_core::bail!("a modulated Z-Image block needs the adaLN input"),
        }
    }
}
