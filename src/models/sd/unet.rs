//! The SD-family denoiser: a UNet with cross-attention (Rombach et al. 2022),
//! sized by `unet/config.json`.
//!
//! The blocks are ours (`models::blocks`, so that they can run the fused
//! kernels), with diffusers' parameter names; the top level is ours too
//! because SDXL conditions the time embedding on the pooled text embedding
//! and the size/crop ids (`addition_embed_type: "text_time"`), which candle's
//! UNet omits.

use anyhow::{bail, Context};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use crate::models::blocks::conv::Conv2d;
use crate::models::blocks::norm::GroupNorm;
use crate::models::blocks::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::models::blocks::transformer::{SpatialTransformer, SpatialTransformerConfig};
use crate::models::blocks::Kernels;
use serde::Deserialize;

/// A diffusers config value that is either one number or one per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize, field: &str) -> anyhow::Result<usize> {
        match self {
            PerBlock::One(v) => Ok(*v),
            PerBlock::Each(v) => v.get(i).copied().with_context(|| format!("unet config: {field} has no entry {i}")),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "layers_default")]
    pub layers_per_block: PerBlock,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "groups_default")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_default")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "one_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "heads_default")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
}

fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn layers_default() -> PerBlock {
    PerBlock::One(2)
}
fn groups_default() -> usize {
    32
}
fn eps_default() -> f64 {
    1e-5
}
fn one_block() -> PerBlock {
    PerBlock::One(1)
}
fn heads_default() -> PerBlock {
    PerBlock::One(8)
}

/// A down level: ResNet blocks, each followed by a spatial transformer on
/// cross-attention levels, then (except on the last level) a downsampler.
/// Every block's output is kept for the up path's skip connections.
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// An up level: each ResNet block takes the previous output concatenated
/// with a skip connection (the latest first), then the transformer on
/// cross-attention levels; then (except on the last level) an upsampler.
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else { candle_core::bail!("unet: a skip connection is missing") };
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// The bottleneck: ResNet, then (transformer, ResNet) pairs.
struct MidBlock {
    resnet: ResnetBlock2D,
    attn_resnets: Vec<(SpatialTransformer, ResnetBlock2D)>,
}

impl MidBlock {
    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet.forward(xs, Some(temb))?;
        for (attn, resnet) in &self.attn_resnets {
            xs = resnet.forward(&attn.forward(&xs, context)?, Some(temb))?;
        }
        Ok(xs)
    }
}

struct AddEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

pub struct UNet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add: Option<AddEmbedding>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet {
    /// The UNet of `cfg` with the weights in `vb`, running `kernels`.
    pub fn new(cfg: &UNetConfig, vb: VarBuilder, kernels: Kernels) -> anyhow::Result<Self> {
        let n = cfg.block_out_channels.len();
        if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            bail!("unet config: block_out_channels, down_block_types and up_block_types must have the same length");
        }
        if cfg.class_embed_type.is_some() || cfg.time_cond_proj_dim.is_some() {
            bail!("unet config: class embeddings and time-conditioning projections are not supported");
        }
        if cfg.resnet_time_scale_shift.as_deref().is_some_and(|s| s != "default") {
            bail!("unet config: resnet_time_scale_shift must be \"default\"");
        }
        if matches!(cfg.only_cross_attention, Some(serde_json::Value::Bool(true)) | Some(serde_json::Value::Array(_)))
            && cfg.only_cross_attention != Some(serde_json::Value::Array(vec![serde_json::Value::Bool(false); n]))
        {
            bail!("unet config: only_cross_attention is not supported");
        }
        if let Some(mid) = &cfg.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                bail!("unet config: mid_block_type '{mid}' is not supported");
            }
        }
        let cross_dim = match &cfg.cross_attention_dim {
            PerBlock::One(d) => *d,
            PerBlock::Each(v) if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() => v[0],
            _ => bail!("unet config: per-block cross_attention_dim is not supported"),
        };
        let layers = cfg.layers_per_block.get(0, "layers_per_block")?;
        for i in 0..n {
            if cfg.layers_per_block.get(i, "layers_per_block")? != layers {
                bail!("unet config: per-block layers_per_block is not supported");
            }
        }
        let heads = |i: usize| -> anyhow::Result<usize> {
            match &cfg.num_attention_heads {
                Some(h) => h.get(i, "num_attention_heads"),
                // diffusers' legacy naming: attention_head_dim holds the head count.
                None => cfg.attention_head_dim.get(i, "attention_head_dim"),
            }
        };
        let cross = |ty: &str| ty.starts_with("CrossAttn");
        for i in 0..n {
            let down = &cfg.down_block_types[i];
            let up = &cfg.up_block_types[n - 1 - i];
            let known =
                |t: &str| matches!(t, "DownBlock2D" | "CrossAttnDownBlock2D" | "UpBlock2D" | "CrossAttnUpBlock2D");
            if !known(down) || !known(up) {
                bail!("unet config: block types {down}/{up} are not supported");
            }
            if cross(down) != cross(up) {
                bail!("unet config: down block {i} and its mirrored up block disagree on cross-attention");
            }
        }
        let ch0 = cfg.block_out_channels[0];
        let time_dim = ch0 * 4;
        let conv_in = Conv2d::new(cfg.in_channels, ch0, 3, 1, 1, vb.pp("conv_in"), kernels)?;
        let time_proj = Timesteps::new(ch0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch0, time_dim)?;
        let add = match cfg.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let dim = cfg.addition_time_embed_dim.context("unet config: addition_time_embed_dim missing")?;
                let input = cfg
                    .projection_class_embeddings_input_dim
                    .context("unet config: projection_class_embeddings_input_dim missing")?;
                Some(AddEmbedding {
                    time_proj: Timesteps::new(dim, cfg.flip_sin_to_cos, cfg.freq_shift),
                    embedding: TimestepEmbedding::new(vb.pp("add_embedding"), input, time_dim)?,
                })
            }
            Some(other) => bail!("unet config: addition_embed_type '{other}' is not supported"),
        };
        let tlayers = |i: usize| cfg.transformer_layers_per_block.get(i, "transformer_layers_per_block");
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let resnet = |in_channels: usize, out_channels: usize, scale: f64, vb: VarBuilder| {
            let c = ResnetConfig {
                in_channels,
                out_channels,
                temb_channels: Some(time_dim),
                groups,
                eps,
                output_scale_factor: scale,
            };
            ResnetBlock2D::new(c, vb, kernels)
        };
        let transformer = |channels: usize, level: usize, vb: VarBuilder| -> anyhow::Result<SpatialTransformer> {
            let c = SpatialTransformerConfig {
                channels,
                heads: heads(level)?,
                depth: tlayers(level)?,
                groups,
                context_dim: cross_dim,
                use_linear_projection: cfg.use_linear_projection,
            };
            Ok(SpatialTransformer::new(c, vb, kernels)?)
        };
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let in_ch = if i == 0 { ch0 } else { cfg.block_out_channels[i - 1] };
            let out_ch = cfg.block_out_channels[i];
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let mut block = DownBlock { resnets: Vec::new(), attentions: Vec::new(), downsampler: None };
            for j in 0..layers {
                let vbr = vbi.pp("resnets").pp(j.to_string());
                block.resnets.push(resnet(if j == 0 { in_ch } else { out_ch }, out_ch, 1.0, vbr)?);
                if cross(&cfg.down_block_types[i]) {
                    block.attentions.push(transformer(out_ch, i, vbi.pp("attentions").pp(j.to_string()))?);
                }
            }
            if i + 1 < n {
                block.downsampler =
                    Some(Downsample2D::new(out_ch, cfg.downsample_padding, vbi.pp("downsamplers").pp("0"), kernels)?);
            }
            down.push(block);
        }
        let last = cfg.block_out_channels[n - 1];
        let vbm = vb.pp("mid_block");
        let scale = cfg.mid_block_scale_factor;
        let mid = MidBlock {
            resnet: resnet(last, last, scale, vbm.pp("resnets").pp("0"))?,
            attn_resnets: vec![(
                transformer(last, n - 1, vbm.pp("attentions").pp("0"))?,
                resnet(last, last, scale, vbm.pp("resnets").pp("1"))?,
            )],
        };
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let r = n - 1 - i; // the mirrored down block
            let out_ch = cfg.block_out_channels[r];
            let prev_out = if i == 0 { last } else { cfg.block_out_channels[r + 1] };
            let skip_in = cfg.block_out_channels[r.saturating_sub(1)];
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let mut block = UpBlock { resnets: Vec::new(), attentions: Vec::new(), upsampler: None };
            for j in 0..layers + 1 {
                // The last ResNet of a level takes the skip from before the level.
                let skip = if j == layers { skip_in } else { out_ch };
                let from = if j == 0 { prev_out } else { out_ch };
                block.resnets.push(resnet(from + skip, out_ch, 1.0, vbi.pp("resnets").pp(j.to_string()))?);
                if cross(&cfg.up_block_types[i]) {
                    block.attentions.push(transformer(out_ch, r, vbi.pp("attentions").pp(j.to_string()))?);
                }
            }
            if i + 1 < n {
                block.upsampler = Some(Upsample2D::new(out_ch, vbi.pp("upsamplers").pp("0"), kernels)?);
            }
            up.push(block);
        }
        let norm_out = GroupNorm::new(groups, ch0, eps, vb.pp("conv_norm_out"), kernels)?;
        let conv_out = Conv2d::new(ch0, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"), kernels)?;
        Ok(UNet { conv_in, time_proj, time_embedding, add, down, mid, up, norm_out, conv_out, config: cfg.clone() })
    }

    /// Whether the model wants SDXL's pooled text embedding and time ids.
    pub fn wants_text_time(&self) -> bool {
        self.add.is_some()
    }

    /// Predicts the noise (or velocity) for `xs` [B, C, H, W] at `timestep`.
    /// `text_time` is SDXL's (pooled text embeds [B, P], time ids [B, 6]).
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let device = xs.device();
        let n = self.down.len();
        let factor = 1usize << (n - 1);
        let odd_size = h % factor != 0 || w % factor != 0;
        let xs = if self.config.center_input_sample { ((xs * 2.0)? - 1.0)? } else { xs.clone() };
        let t = (Tensor::ones(b, xs.dtype(), device)? * timestep)?;
        let mut emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        if let Some(add) = &self.add {
            let Some((pooled, time_ids)) = text_time else {
                candle_core::bail!("this UNet needs pooled text embeddings and time ids");
            };
            let time = add.time_proj.forward(&time_ids.flatten_all()?)?.reshape((b, ()))?;
            let add_in = Tensor::cat(&[pooled, &time.to_dtype(pooled.dtype())?], 1)?;
            emb = (emb + add.embedding.forward(&add_in)?)?;
        }
        // Every ResNet block projects silu(emb): computed once per step.
        let temb = candle_nn::ops::silu(&emb)?;
        let xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down {
            xs = block.forward(&xs, &temb, context, &mut skips)?;
        }
        let mut xs = self.mid.forward(&xs, &temb, context)?;
        for (i, block) in self.up.iter().enumerate() {
            // The skip this level's upsampler must match, when a side was odd:
            // the one left after this level takes its own.
            let size = if i + 1 < n && odd_size {
                let left = skips.len().checked_sub(block.resnets.len() + 1);
                let Some(skip) = left.and_then(|k| skips.get(k)) else {
                    candle_core::bail!("unet: a skip connection is missing")
                };
                let (_, _, h, w) = skip.dims4()?;
                Some((h, w))
            } else {
                None
            };
            xs = block.forward(&xs, &mut skips, &temb, context, size)?;
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}
