//! The Stable Diffusion family (SD 1.x, 2.x, SDXL, SDXL-Turbo): latent
//! diffusion with a CLIP text encoder (two for SDXL), a cross-attention UNet
//! and a KL autoencoder (Rombach et al. 2022; Podell et al. 2023).
//!
//! The pipeline reads like diffusers' `StableDiffusion(XL)Pipeline`:
//! encode the prompt and the negative prompt, draw the initial latents from
//! the job's seed, run the sampler with classifier-free guidance, decode.

pub mod clip;
pub mod unet;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;

use self::clip::{ClipConfig, ClipTextModel};
use self::unet::{UNet, UNetConfig};
use super::blocks::Kernels;
use super::files::ModelFiles;
use super::layout::Library;
use super::noise::{batch_noise, NoiseStream};
use super::scheduler::{self, SamplerKind, SchedulerConfig};
use super::tokenizer::ClipTokenizer;
use super::vae::{Decoder, DecoderConfig};
use super::{Cancelled, GenOutput, GenRequest, ModelMeta, Progress};
use crate::kernels::{guided_step, Guidance};

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn groups() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn scale() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Pixels per latent cell.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// The config and the decoder (text-to-image never encodes).
    pub fn load(files: &ModelFiles, vb: candle_nn::VarBuilder, kernels: Kernels) -> anyhow::Result<(Self, Decoder)> {
        let cfg: VaeConfig = files.json("vae/config.json")?;
        if !cfg.mid_block_add_attention {
            bail!("vae config: mid_block_add_attention false is not supported");
        }
        let dc = DecoderConfig {
            latent_channels: cfg.latent_channels,
            out_channels: cfg.out_channels,
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            norm_num_groups: cfg.norm_num_groups,
            use_post_quant_conv: cfg.use_post_quant_conv,
        };
        Ok((cfg, Decoder::new(&dc, vb, kernels)?))
    }

    /// Latents as the sampler leaves them → the decoder's input.
    pub fn unscale(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let x = (latents / self.scaling_factor)?;
        match self.shift_factor {
            Some(s) => x + s,
            None => Ok(x),
        }
    }
}

/// What the API needs to know about an SD-family folder, from its configs
/// alone (no weights are read).
pub fn meta(files: &ModelFiles) -> anyhow::Result<ModelMeta> {
    let unet: UNetConfig = files.json("unet/config.json")?;
    let vae: VaeConfig = files.json("vae/config.json")?;
    let text: ClipConfig = files.json("text_encoder/config.json")?;
    let sched: SchedulerConfig = files.json("scheduler/scheduler_config.json")?;
    let f = vae.downscale();
    let xl = unet.addition_embed_type.is_some();
    let default_sampler = match sched.kind() {
        Some(SamplerKind::FlowMatchEuler) | None => SamplerKind::Ddim,
        Some(k) => k,
    };
    Ok(ModelMeta {
        family: if xl { "sdxl" } else { "sd" },
        pixel_multiple: f as u32,
        max_prompt_tokens: text.max_position_embeddings as u32 - 2,
        default_side_px: (unet.sample_size.unwrap_or(64) * f) as u32,
        default_sampler,
        samplers: vec![SamplerKind::Ddim, SamplerKind::Euler, SamplerKind::EulerAncestral],
    })
}

#[derive(Deserialize, Default)]
struct ModelIndex {
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

struct TextEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

/// Text conditioning for a batch: rows `[uncond..., cond...]` when guided.
pub struct Conditioning {
    pub context: Tensor,
    /// SDXL: pooled text embeddings and time ids, rows as `context`.
    pub text_time: Option<(Tensor, Tensor)>,
    pub guided: bool,
    pub dropped_tokens: Vec<usize>,
}

pub struct SdPipeline {
    encoders: Vec<TextEncoder>,
    unet: UNet,
    vae: Decoder,
    vae_config: VaeConfig,
    kernels: Kernels,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    device: Device,
    dtype: DType,
}

impl SdPipeline {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType, kernels: Kernels) -> anyhow::Result<Self> {
        let index: ModelIndex = files.json("model_index.json").unwrap_or_default();
        let mut encoders = Vec::new();
        for (enc_dir, tok_dir) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")] {
            if !files.exists(&format!("{enc_dir}/config.json")) {
                continue;
            }
            let cfg: ClipConfig = files.json(&format!("{enc_dir}/config.json"))?;
            let with_projection = cfg.architectures.iter().any(|a| a == "CLIPTextModelWithProjection");
            let vb = files.component(enc_dir, Library::Transformers, dtype, device)?;
            let model = ClipTextModel::new(&cfg, with_projection, vb).with_context(|| format!("loading {enc_dir}"))?;
            let tokenizer = ClipTokenizer::load(files, tok_dir, cfg.max_position_embeddings)?;
            encoders.push(TextEncoder { tokenizer, model });
        }
        if encoders.is_empty() {
            bail!("{}: no text_encoder/config.json", files.describe());
        }
        let unet_cfg: UNetConfig = files.json("unet/config.json")?;
        let unet = UNet::new(&unet_cfg, files.component("unet", Library::Diffusers, dtype, device)?, kernels)
            .context("loading unet")?;
        if unet.wants_text_time() && encoders.len() != 2 {
            bail!("an SDXL UNet needs two text encoders");
        }
        let (vae_config, vae) =
            VaeConfig::load(files, files.component("vae", Library::Diffusers, dtype, device)?, kernels)
                .context("loading vae")?;
        let scheduler: SchedulerConfig = files.json("scheduler/scheduler_config.json")?;
        let xl = unet.wants_text_time();
        Ok(SdPipeline {
            encoders,
            unet,
            vae,
            vae_config,
            kernels,
            scheduler,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(xl),
            device: device.clone(),
            dtype,
        })
    }

    /// Latent channels (4).
    pub fn latent_channels(&self) -> usize {
        self.unet.config.in_channels
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Token ids per text encoder, for one prompt.
    pub fn tokenize(&self, text: &str) -> anyhow::Result<Vec<super::tokenizer::Encoded>> {
        self.encoders.iter().map(|e| e.tokenizer.encode(text)).collect()
    }

    /// Encodes a batch of prompts: context [B, 77, D] and, for SDXL, the
    /// pooled embedding [B, P]. `zero`: rows to replace by zeros (SDXL's
    /// empty negative prompt).
    fn encode(&self, texts: &[&str]) -> anyhow::Result<(Tensor, Option<Tensor>, Vec<usize>)> {
        let xl = self.unet.wants_text_time();
        let mut contexts = Vec::new();
        let mut pooled = None;
        let mut dropped = vec![0; texts.len()];
        for enc in &self.encoders {
            let mut rows = Vec::new();
            for (i, t) in texts.iter().enumerate() {
                let e = enc.tokenizer.encode(t)?;
                dropped[i] = dropped[i].max(e.dropped_tokens);
                rows.push(Tensor::new(e.ids.as_slice(), &self.device)?);
            }
            let ids = Tensor::stack(&rows, 0)?;
            let out = enc.model.forward(&ids)?;
            contexts.push(if xl { out.penultimate } else { out.last });
            if out.pooled_projected.is_some() {
                pooled = out.pooled_projected;
            }
        }
        let context = Tensor::cat(&contexts, 2)?;
        if xl && pooled.is_none() {
            bail!("SDXL needs a text encoder with a projection (text_encoder_2)");
        }
        Ok((context, pooled, dropped))
    }

    /// The text conditioning for a batch, guided when `guidance > 1` as in
    /// diffusers.
    pub fn condition(
        &self,
        prompts: &[&str],
        negatives: &[&str],
        guidance: f64,
        width: usize,
        height: usize,
    ) -> anyhow::Result<Conditioning> {
        let guided = guidance > 1.0;
        let (cond, pooled, dropped_tokens) = self.encode(prompts)?;
        let (context, pooled) = if guided {
            let (mut unc, mut unc_pooled, _) = self.encode(negatives)?;
            if self.force_zeros_for_empty_prompt && negatives.iter().all(|n| n.is_empty()) {
                unc = unc.zeros_like()?;
                unc_pooled = unc_pooled.map(|p| p.zeros_like()).transpose()?;
            }
            let pooled = match (unc_pooled, pooled) {
                (Some(u), Some(c)) => Some(Tensor::cat(&[u, c], 0)?),
                _ => None,
            };
            (Tensor::cat(&[unc, cond], 0)?, pooled)
        } else {
            (cond, pooled)
        };
        let text_time = match pooled {
            Some(p) if self.unet.wants_text_time() => {
                let rows = p.dim(0)?;
                let (h, w) = (height as f32, width as f32);
                let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                Some((p, Tensor::from_vec(ids, (rows, 6), &self.device)?.to_dtype(self.dtype)?))
            }
            _ => None,
        };
        Ok(Conditioning { context, text_time, guided, dropped_tokens })
    }

    /// The raw denoiser output for model input `x` (rows as the conditioning).
    pub fn denoise(&self, x: &Tensor, timestep: f64, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let tt = cond.text_time.as_ref().map(|(p, t)| (p, t));
        self.unet.forward(x, timestep, &cond.context, tt)
    }

    /// Runs the sampler from `init_noise` (standard normal, [B, C, h, w]).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        init_noise: &Tensor,
        cond: &Conditioning,
        sampler: SamplerKind,
        steps: usize,
        guidance: f64,
        streams: &mut [NoiseStream],
        progress: &mut Progress<'_>,
    ) -> anyhow::Result<Tensor> {
        let sched = scheduler::build(sampler, &self.scheduler, steps)?;
        let mut latents = (init_noise * sched.init_noise_sigma())?;
        let latent_shape: Vec<usize> = latents.dims()[1..].to_vec();
        for (i, &t) in sched.timesteps().to_vec().iter().enumerate() {
            let x = if cond.guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let x = sched.scale_model_input(&x, i)?;
            let out = self.denoise(&x, t, cond)?;
            // Fused: the guidance combine and the sampler's update in one kernel.
            if let (Kernels::Fused, Some(step)) = (self.kernels, sched.linear_step(i)) {
                let g = if cond.guided { Guidance::UncondFirst(guidance) } else { Guidance::None };
                let noise = if sampler == SamplerKind::EulerAncestral {
                    Some(batch_noise(streams, &latent_shape, &self.device)?.to_dtype(self.dtype)?)
                } else {
                    None
                };
                latents = guided_step(&out, &latents, noise.as_ref(), g, step)?;
                if !progress(i + 1, steps) {
                    return Err(Cancelled.into());
                }
                continue;
            }
            let out = if cond.guided {
                let b = latents.dim(0)?;
                let (unc, txt) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&unc + ((txt - &unc)? * guidance)?)?
            } else {
                out
            };
            let mut noise = |_: &[usize]| batch_noise(streams, &latent_shape, &self.device)?.to_dtype(self.dtype);
            latents = sched.step(&out, i, &latents, &mut noise)?;
            if !progress(i + 1, steps) {
                return Err(Cancelled.into());
            }
        }
        Ok(latents)
    }

    /// Decodes latents to images in [-1, 1], [B, 3, H, W].
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        self.vae.forward(&self.vae_config.unscale(latents)?)
    }

    /// [`SdPipeline::decode`] handing every decoder stage to `seen`
    /// (device comparisons, stage by stage).
    pub fn decode_traced(&self, latents: &Tensor, seen: &mut dyn FnMut(&str, &Tensor)) -> candle_core::Result<Tensor> {
        self.vae.forward_traced(&self.vae_config.unscale(latents)?, seen)
    }

    /// Runs a batch of requests that share size, steps, sampler and guidance.
    pub fn generate(&self, reqs: &[GenRequest], progress: &mut Progress<'_>) -> anyhow::Result<Vec<GenOutput>> {
        let first = reqs.first().context("empty batch")?;
        let f = self.vae_config.downscale();
        let (h, w) = (first.height as usize / f, first.width as usize / f);
        let shape = [self.unet.config.in_channels, h, w];
        let mut streams: Vec<NoiseStream> = reqs.iter().map(|r| NoiseStream::new(r.seed)).collect();
        let init = batch_noise(&mut streams, &shape, &self.device)?.to_dtype(self.dtype)?;
        let prompts: Vec<&str> = reqs.iter().map(|r| r.prompt.as_str()).collect();
        let negatives: Vec<&str> = reqs.iter().map(|r| r.negative_prompt.as_str()).collect();
        let cond = self.condition(&prompts, &negatives, first.guidance, first.width as usize, first.height as usize)?;
        let latents = self.sample(&init, &cond, first.sampler, first.steps, first.guidance, &mut streams, progress)?;
        let images = self.decode(&latents)?;
        super::to_outputs(&images, &cond.dropped_tokens)
    }
}
