//! Z-Image's single-stream DiT ("S3-DiT"): image patches and caption tokens
//! go through the same transformer blocks as one sequence, with 3-axis RoPE
//! positions telling them apart.
//!
//! The blocks come from candle-transformers 0.11.1 (attention with QK-norm
//! and RoPE on interleaved pairs, SwiGLU feed-forward, adaLN modulation with
//! tanh gates, the timestep embedder, the final layer, patchify/unpatchify);
//! they compute what diffusers' `ZImageTransformer2DModel` blocks compute.
//! The way candle's top-level `ZImageTransformer2DModel::forward` assembles
//! the sequence does not, so that part is written here, after diffusers:
//!
//! * **Caption padding.** The caption is padded to a multiple of 32 tokens;
//!   after the caption embedder the padded rows are the learned
//!   `cap_pad_token`, and they take part in attention like real tokens.
//!   candle pads with zeros, masks the padding out of attention and never
//!   uses `cap_pad_token`.
//! * **Image padding.** Image tokens are padded to a multiple of 32 with the
//!   learned `x_pad_token` at RoPE position (0, 0, 0), also unmasked. candle
//!   does not pad image tokens (it matters for sizes whose token count
//!   (H/16)·(W/16) is not a multiple of 32, e.g. 1280×720: 3600 tokens).
//! * **RoPE tables.** Inverse frequencies and angles are computed in f64 and
//!   rounded to f32, as diffusers does; candle uses f32 throughout (errors of
//!   a few 1e-5 rad at positions near 500).
//!
//! On the tiny test model, candle's top-level forward is off by 16% (max
//! relative error) for a 25-token caption and by 67% with padded image
//! tokens; it agrees (2e-6) only when neither sequence needs padding.
//!
//! Positions: caption token `i` (padding included) sits at (1 + i, 0, 0);
//! image token (f, h, w) at (L_pad + 1 + f, h, w) where L_pad is the padded
//! caption length. Because that offset depends on the caption, rows of a
//! batch whose padded caption lengths differ are run as separate groups;
//! diffusers pads such a batch and masks the batch padding, which gives each
//! row the same result as running it alone.

use std::collections::BTreeMap;

use anyhow::{bail, ensure};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::with_tracing::RmsNorm;
use candle_transformers::models::z_image::transformer::{
    patchify, unpatchify, Config, FinalLayer, TimestepEmbedder, ADALN_EMBED_DIM, SEQ_MULTI_OF,
};

use super::block::ZImageBlock;
use crate::models::blocks::Kernels;

/// The patch sizes diffusers' `ZImagePipeline` calls the transformer with
/// (its `forward` defaults): 2×2 spatial, 1 frame.
pub const PATCH_SIZE: usize = 2;
pub const F_PATCH_SIZE: usize = 1;

/// `n` rounded up to the sequence granularity (32).
pub fn padded_len(n: usize) -> usize {
    n.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF
}

pub struct ZImageTransformer {
    cfg: Config,
    t_embedder: TimestepEmbedder,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_embedder: Linear,
    final_layer: FinalLayer,
    /// [1, dim] each.
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    noise_refiner: Vec<ZImageBlock>,
    context_refiner: Vec<ZImageBlock>,
    layers: Vec<ZImageBlock>,
    /// Per RoPE axis, `1 / theta^(2j / d)` for `j < d / 2`.
    inv_freqs: Vec<Vec<f64>>,
    dtype: DType,
}

impl ZImageTransformer {
    /// Checks that the config is one the candle blocks compute the way
    /// diffusers does, and loads the weights.
    pub fn new(cfg: &Config, vb: VarBuilder, kernels: Kernels) -> anyhow::Result<Self> {
        let mut cfg = cfg.clone();
        let key = format!("{PATCH_SIZE}-{F_PATCH_SIZE}");
        ensure!(
            cfg.all_patch_size.iter().zip(&cfg.all_f_patch_size).any(|(&p, &f)| p == PATCH_SIZE && f == F_PATCH_SIZE),
            "transformer config: the pipeline uses patch size {key}, which all_patch_size/all_f_patch_size lack"
        );
        ensure!(
            cfg.n_heads > 0 && cfg.dim.is_multiple_of(cfg.n_heads),
            "transformer config: dim must be a multiple of n_heads"
        );
        let head_dim = cfg.dim / cfg.n_heads;
        ensure!(
            cfg.axes_dims.len() == 3 && cfg.axes_dims.iter().sum::<usize>() == head_dim,
            "transformer config: axes_dims must be 3 axes summing to the head dim {head_dim}"
        );
        ensure!(cfg.axes_dims.iter().all(|d| d % 2 == 0), "transformer config: axes_dims must be even");
        // diffusers sizes the feed-forward as int(dim / 3 * 8); candle's blocks as dim / 3 * 8 in integers.
        let hidden = (cfg.dim as f64 / 3.0 * 8.0) as usize;
        if hidden != cfg.hidden_dim() {
            bail!("transformer config: dim {} (not a multiple of 3) is not supported", cfg.dim);
        }
        // diffusers' attention ignores n_kv_heads (k and v have n_heads heads).
        cfg.n_kv_heads = cfg.n_heads;

        let adaln_dim = cfg.dim.min(ADALN_EMBED_DIM);
        let t_embedder = TimestepEmbedder::new(adaln_dim, 1024, vb.pp("t_embedder"))?;
        let cap_norm = RmsNorm::new(cfg.cap_feat_dim, cfg.norm_eps, vb.pp("cap_embedder").pp("0"))?;
        let cap_linear = candle_nn::linear(cfg.cap_feat_dim, cfg.dim, vb.pp("cap_embedder").pp("1"))?;
        let patch_dim = F_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE * cfg.in_channels;
        let x_embedder = candle_nn::linear(patch_dim, cfg.dim, vb.pp("all_x_embedder").pp(&key))?;
        let final_layer = FinalLayer::new(cfg.dim, patch_dim, vb.pp("all_final_layer").pp(&key))?;
        let x_pad_token = vb.get((1, cfg.dim), "x_pad_token")?;
        let cap_pad_token = vb.get((1, cfg.dim), "cap_pad_token")?;
        let blocks = |name: &str, n: usize, modulation: bool| -> candle_core::Result<Vec<ZImageBlock>> {
            (0..n).map(|i| ZImageBlock::new(&cfg, modulation, vb.pp(name).pp(i), kernels)).collect()
        };
        let noise_refiner = blocks("noise_refiner", cfg.n_refiner_layers, true)?;
        let context_refiner = blocks("context_refiner", cfg.n_refiner_layers, false)?;
        let layers = blocks("layers", cfg.n_layers, true)?;
        let inv_freqs = cfg
            .axes_dims
            .iter()
            .map(|&d| (0..d / 2).map(|j| 1.0 / cfg.rope_theta.powf((2 * j) as f64 / d as f64)).collect())
            .collect();
        Ok(ZImageTransformer {
            t_embedder,
            cap_norm,
            cap_linear,
            x_embedder,
            final_layer,
            x_pad_token,
            cap_pad_token,
            noise_refiner,
            context_refiner,
            layers,
            inv_freqs,
            dtype: vb.dtype(),
            cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The adaLN conditioning for model time `t` ([B], in [0, 1], 0 = pure
    /// noise): the sinusoidal embedding of `t * t_scale` through the MLP.
    pub fn time_embedding(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = (t.to_dtype(DType::F32)? * self.cfg.t_scale)?;
        self.t_embedder.forward(&t)?.to_dtype(self.dtype)
    }

    /// The transformer's prediction for latents `x` ([B, C, F, H, W]) at
    /// model time `t` ([B]) given one caption-feature tensor
    /// ([L_i, cap_feat_dim]) per row: [B, C, F, H, W].
    pub fn forward(&self, x: &Tensor, t: &Tensor, captions: &[Tensor]) -> anyhow::Result<Tensor> {
        let b = x.dim(0)?;
        ensure!(
            captions.len() == b && t.dim(0)? == b,
            "transformer: {b} latents, {} captions, {} timesteps",
            captions.len(),
            t.dim(0)?
        );
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, c) in captions.iter().enumerate() {
            let len = c.dim(0)?;
            ensure!(len > 0, "transformer: empty caption");
            groups.entry(padded_len(len)).or_default().push(i);
        }
        if groups.len() == 1 {
            let (&cap_len, _) = groups.iter().next().expect("one group");
            return self.forward_group(x, t, captions, cap_len);
        }
        let mut outs: Vec<Option<Tensor>> = vec![None; b];
        for (cap_len, rows) in groups {
            let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), x.device())?;
            let caps: Vec<Tensor> = rows.iter().map(|&r| captions[r].clone()).collect();
            let out = self.forward_group(&x.index_select(&idx, 0)?, &t.index_select(&idx, 0)?, &caps, cap_len)?;
            for (k, &r) in rows.iter().enumerate() {
                outs[r] = Some(out.get(k)?);
            }
        }
        let outs: Vec<Tensor> = outs.into_iter().map(|o| o.expect("every row is in a group")).collect();
        Ok(Tensor::stack(&outs, 0)?)
    }

    /// Rows whose captions all pad to `cap_len` tokens.
    fn forward_group(&self, x: &Tensor, t: &Tensor, captions: &[Tensor], cap_len: usize) -> anyhow::Result<Tensor> {
        let (g, _c, f, h, w) = x.dims5()?;
        let dev = x.device();
        let dim = self.cfg.dim;
        let x = x.to_dtype(self.dtype)?;
        let adaln = self.time_embedding(t)?;

        // Image tokens, padded with x_pad_token at position (0, 0, 0).
        let (patches, size) = patchify(&x, PATCH_SIZE, F_PATCH_SIZE)?;
        let n = patches.dim(1)?;
        let n_pad = padded_len(n);
        let mut img = patches.apply(&self.x_embedder)?;
        if n_pad > n {
            let pad = self.x_pad_token.unsqueeze(0)?.broadcast_as((g, n_pad - n, dim))?.contiguous()?;
            img = Tensor::cat(&[&img, &pad], 1)?;
        }
        let (ft, ht, wt) = (f / F_PATCH_SIZE, h / PATCH_SIZE, w / PATCH_SIZE);
        let mut img_pos = Vec::with_capacity(n_pad);
        for fi in 0..ft {
            for hi in 0..ht {
                for wi in 0..wt {
                    img_pos.push([cap_len + 1 + fi, hi, wi]);
                }
            }
        }
        img_pos.resize(n_pad, [0, 0, 0]);
        let (img_cos, img_sin) = self.rope(&img_pos, dev)?;

        // Caption tokens, padded to cap_len with cap_pad_token.
        let mut rows = Vec::with_capacity(g);
        let mut valid = Vec::with_capacity(g * cap_len);
        for c in captions {
            let len = c.dim(0)?;
            let c = c.to_dtype(self.dtype)?;
            rows.push(if len < cap_len {
                // diffusers repeats the last row; those rows are replaced below anyway.
                let last = c.narrow(0, len - 1, 1)?.broadcast_as((cap_len - len, c.dim(1)?))?.contiguous()?;
                Tensor::cat(&[&c, &last], 0)?
            } else {
                c
            });
            valid.extend((0..cap_len).map(|i| u8::from(i < len)));
        }
        let cap = Tensor::stack(&rows, 0)?;
        let cap = self.cap_linear.forward(&self.cap_norm.forward(&cap)?)?;
        let valid = Tensor::from_vec(valid, (g, cap_len, 1), dev)?.broadcast_as((g, cap_len, dim))?;
        let pad = self.cap_pad_token.unsqueeze(0)?.broadcast_as((g, cap_len, dim))?;
        let mut cap = valid.where_cond(&cap, &pad)?;
        let cap_pos: Vec<[usize; 3]> = (0..cap_len).map(|i| [1 + i, 0, 0]).collect();
        let (cap_cos, cap_sin) = self.rope(&cap_pos, dev)?;

        for block in &self.noise_refiner {
            img = block.forward(&img, &img_cos, &img_sin, Some(&adaln))?;
        }
        for block in &self.context_refiner {
            cap = block.forward(&cap, &cap_cos, &cap_sin, None)?;
        }
        let mut seq = Tensor::cat(&[&img, &cap], 1)?;
        let cos = Tensor::cat(&[&img_cos, &cap_cos], 0)?;
        let sin = Tensor::cat(&[&img_sin, &cap_sin], 0)?;
        for block in &self.layers {
            seq = block.forward(&seq, &cos, &sin, Some(&adaln))?;
        }
        // The final layer acts per token: only the real image tokens are needed.
        let out = self.final_layer.forward(&seq.narrow(1, 0, n)?, &adaln)?;
        Ok(unpatchify(&out, size, PATCH_SIZE, F_PATCH_SIZE, self.cfg.in_channels)?)
    }

    /// RoPE cos/sin for 3-axis positions: [len, head_dim / 2], the axes side
    /// by side along the pair index.
    fn rope(&self, positions: &[[usize; 3]], dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half: usize = self.inv_freqs.iter().map(Vec::len).sum();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (axis, inv) in self.inv_freqs.iter().enumerate() {
                for &freq in inv {
                    let angle = (p[axis] as f64 * freq) as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, dev)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, shape, dev)?.to_dtype(self.dtype)?,
        ))
    }
}
