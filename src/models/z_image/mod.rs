//! Z-Image (Alibaba Tongyi's 6B flow-matching DiT; Z-Image-Turbo samples in
//! 8-9 steps without guidance), on candle-transformers' `z_image` building
//! blocks.
//!
//! The pipeline reads like diffusers' `ZImagePipeline` (0.36), whose numbers
//! the parity test holds us to:
//!
//! 1. The prompt goes through Qwen3's chat template as a single user turn
//!    (`<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`),
//!    is tokenized with the special tokens recognised and cut at 512 tokens.
//! 2. Qwen3 encodes it; the caption features are the output of decoder layer
//!    `n - 2` (`hidden_states[-2]`, no final norm), one row per real token.
//! 3. The latents start as standard normal noise, [16, H/8, W/8], in f32.
//! 4. Flow-matching Euler over shifted sigmas from 1 to 0: the transformer
//!    sees `t = 1 - sigma` (0 = noise) and predicts the direction towards the
//!    data, so the scheduler steps with its negation. With guidance > 1 the
//!    negative prompt runs alongside and `pred = pos + g (pos - neg)`
//!    (Z-Image's form, not `neg + g (pos - neg)`); Turbo runs at 0.
//! 5. The autoencoder (the FLUX VAE) decodes `latents / scaling + shift`.
//!
//! Where candle's top-level transformer differs from diffusers (sequence
//! padding, pad tokens, RoPE precision), [`transformer`] has our version.

pub mod block;
pub mod transformer;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::z_image::{Config, TextEncoderConfig, ZImageTextEncoder};
use serde::Deserialize;

use self::transformer::{ZImageTransformer, PATCH_SIZE};
use super::blocks::Kernels;
use super::files::ModelFiles;
use super::layout::Library;
use super::noise::{batch_noise, NoiseStream};
use super::scheduler::{FlowMatchEuler, SamplerKind, Scheduler, SchedulerConfig};
use super::tokenizer::{Encoded, JsonTokenizer};
use super::vae::{Decoder, DecoderConfig};
use super::{Cancelled, GenOutput, GenRequest, ModelMeta, Progress};
use crate::kernels::{guided_step, Guidance};

/// Tokens the text encoder takes (the pipeline's `max_sequence_length`),
/// chat template included.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Side used when the folder gives no hint: Z-Image's native resolution.
const DEFAULT_SIDE_PX: usize = 1024;

/// The prompt as Qwen3's chat template renders one user message with
/// `add_generation_prompt=True, enable_thinking=True` (no `<think>` block).
pub fn chat_template(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// The fields of `vae/config.json` we use.
#[derive(Clone, Debug, Deserialize)]
struct VaeFile {
    #[serde(default = "three")]
    out_channels: usize,
    #[serde(default = "sixteen")]
    latent_channels: usize,
    block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    layers_per_block: usize,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default)]
    sample_size: Option<usize>,
    #[serde(default)]
    use_post_quant_conv: bool,
    #[serde(default = "yes")]
    mid_block_add_attention: bool,
}

fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn sixteen() -> usize {
    16
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}

impl VaeFile {
    /// Pixels per latent cell.
    fn downscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// What the API needs to know about a Z-Image folder, from its configs alone.
///
/// `default_side_px` is the VAE's `sample_size` (the pixel size the
/// autoencoder is configured for: 1024 for Z-Image's FLUX VAE, 64 for the
/// tiny test model), rounded down to the pixel multiple; 1024 when absent.
pub fn meta(files: &ModelFiles) -> anyhow::Result<ModelMeta> {
    let tcfg: Config = files.json("transformer/config.json")?;
    let vae: VaeFile = files.json("vae/config.json")?;
    ensure!(tcfg.all_patch_size.contains(&PATCH_SIZE), "transformer config: no patch size {PATCH_SIZE}");
    let multiple = vae.downscale() * PATCH_SIZE;
    let side = vae.sample_size.filter(|&s| s >= multiple).unwrap_or(DEFAULT_SIDE_PX);
    Ok(ModelMeta {
        family: "z-image",
        pixel_multiple: multiple as u32,
        max_prompt_tokens: MAX_SEQUENCE_LENGTH as u32,
        default_side_px: (side / multiple * multiple) as u32,
        default_sampler: SamplerKind::FlowMatchEuler,
        samplers: vec![SamplerKind::FlowMatchEuler],
    })
}

/// Text conditioning for a batch of B images: caption features per
/// transformer row, `[prompts..., negative prompts...]` when guided.
pub struct Conditioning {
    pub captions: Vec<Tensor>,
    pub guided: bool,
    /// Per image: templated prompt tokens beyond [`MAX_SEQUENCE_LENGTH`].
    pub dropped_tokens: Vec<usize>,
}

/// The Qwen3 text encoder's weights, saved as `Qwen3ForCausalLM` (tensors
/// under `model.`, which the loader asks for) or as `Qwen3Model` (no prefix,
/// as diffusers' `save_pretrained` writes it back).
fn text_encoder_weights(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<candle_nn::VarBuilder<'static>> {
    let weights = files.weights("text_encoder", Library::Transformers)?;
    let infos = files.tensor_infos(&weights)?;
    let rename = if infos.contains_key("model.embed_tokens.weight") {
        None
    } else if infos.contains_key("embed_tokens.weight") {
        Some(("model.", ""))
    } else {
        bail!("text_encoder/: no embed_tokens.weight (with or without the model. prefix): not a Qwen3 model");
    };
    files.var_builder(&weights, dtype, device, rename)
}

pub struct ZImagePipeline {
    tokenizer: JsonTokenizer,
    text_encoder: ZImageTextEncoder,
    transformer: ZImageTransformer,
    vae: Decoder,
    vae_scaling: f64,
    vae_shift: f64,
    vae_downscale: usize,
    scheduler: SchedulerConfig,
    kernels: Kernels,
    device: Device,
    dtype: DType,
}

impl ZImagePipeline {
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType, kernels: Kernels) -> anyhow::Result<Self> {
        let tokenizer = JsonTokenizer::load(files, "tokenizer")?;
        let te_cfg: TextEncoderConfig = files.json("text_encoder/config.json")?;
        ensure!(te_cfg.num_hidden_layers >= 2, "text encoder: hidden_states[-2] needs at least 2 layers");
        let text_encoder = ZImageTextEncoder::new(&te_cfg, text_encoder_weights(files, dtype, device)?)
            .context("loading text_encoder")?;

        let t_cfg: Config = files.json("transformer/config.json")?;
        ensure!(
            t_cfg.cap_feat_dim == te_cfg.hidden_size,
            "transformer cap_feat_dim {} != text encoder hidden_size {}",
            t_cfg.cap_feat_dim,
            te_cfg.hidden_size
        );
        let transformer =
            ZImageTransformer::new(&t_cfg, files.component("transformer", Library::Diffusers, dtype, device)?, kernels)
                .context("loading transformer")?;

        let vf: VaeFile = files.json("vae/config.json")?;
        if vf.use_post_quant_conv || !vf.mid_block_add_attention {
            bail!("vae config: only the FLUX-style autoencoder (no post-quant conv, mid-block attention) is supported");
        }
        ensure!(
            vf.latent_channels == t_cfg.in_channels,
            "vae latent_channels {} != transformer in_channels {}",
            vf.latent_channels,
            t_cfg.in_channels
        );
        let vae_cfg = DecoderConfig {
            latent_channels: vf.latent_channels,
            out_channels: vf.out_channels,
            block_out_channels: vf.block_out_channels.clone(),
            layers_per_block: vf.layers_per_block,
            norm_num_groups: vf.norm_num_groups,
            use_post_quant_conv: false,
        };
        // Only the decoder: text-to-image never encodes.
        let vae = Decoder::new(&vae_cfg, files.component("vae", Library::Diffusers, dtype, device)?, kernels)
            .context("loading vae")?;

        let scheduler: SchedulerConfig = files.json("scheduler/scheduler_config.json")?;
        if scheduler.kind().is_some_and(|k| k != SamplerKind::FlowMatchEuler) {
            bail!("scheduler '{}' is not a flow-matching scheduler", scheduler.class_name);
        }
        // Fails early on configs the sampler cannot run (dynamic shifting).
        FlowMatchEuler::new(&scheduler, 1)?;
        Ok(ZImagePipeline {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            vae_scaling: vf.scaling_factor,
            vae_shift: vf.shift_factor.unwrap_or(0.0),
            vae_downscale: vf.downscale(),
            scheduler,
            kernels,
            device: device.clone(),
            dtype,
        })
    }

    pub fn transformer(&self) -> &ZImageTransformer {
        &self.transformer
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Latent channels (16).
    pub fn latent_channels(&self) -> usize {
        self.transformer.config().in_channels
    }

    /// Width and height must be multiples of this.
    pub fn pixel_multiple(&self) -> usize {
        self.vae_downscale * PATCH_SIZE
    }

    /// The templated prompt's token ids, cut at [`MAX_SEQUENCE_LENGTH`].
    pub fn tokenize(&self, prompt: &str) -> anyhow::Result<Encoded> {
        self.tokenizer.encode(&chat_template(prompt), MAX_SEQUENCE_LENGTH)
    }

    /// Caption features for token id sequences: [L_i, hidden] each.
    ///
    /// The batch is right-padded to its longest sequence. Qwen3 attends
    /// causally, so the real tokens never see the padding and their rows
    /// equal those of diffusers' run (padded to 512 with an attention mask).
    pub fn encode_ids(&self, ids: &[Vec<u32>]) -> anyhow::Result<Vec<Tensor>> {
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        ensure!(ids.iter().all(|i| !i.is_empty()), "empty token sequence");
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut flat = Vec::with_capacity(ids.len() * longest);
        for seq in ids {
            flat.extend_from_slice(seq);
            flat.resize(flat.len() + longest - seq.len(), 0);
        }
        let input = Tensor::from_vec(flat, (ids.len(), longest), &self.device)?;
        let hidden = self.text_encoder.forward(&input)?;
        ids.iter().enumerate().map(|(i, seq)| Ok(hidden.get(i)?.narrow(0, 0, seq.len())?)).collect()
    }

    /// Caption features and dropped-token counts for prompts.
    pub fn encode_prompts(&self, prompts: &[&str]) -> anyhow::Result<(Vec<Tensor>, Vec<usize>)> {
        let encoded = prompts.iter().map(|p| self.tokenize(p)).collect::<anyhow::Result<Vec<_>>>()?;
        let dropped = encoded.iter().map(|e| e.dropped_tokens).collect();
        let ids: Vec<Vec<u32>> = encoded.into_iter().map(|e| e.ids).collect();
        Ok((self.encode_ids(&ids)?, dropped))
    }

    /// The text conditioning for a batch, guided when `guidance > 1` as in
    /// diffusers (an empty negative prompt is encoded as the empty string).
    pub fn condition(&self, prompts: &[&str], negatives: &[&str], guidance: f64) -> anyhow::Result<Conditioning> {
        let guided = guidance > 1.0;
        let mut texts = prompts.to_vec();
        if guided {
            ensure!(
                negatives.len() == prompts.len(),
                "{} prompts, {} negative prompts",
                prompts.len(),
                negatives.len()
            );
            texts.extend_from_slice(negatives);
        }
        let (captions, mut dropped_tokens) = self.encode_prompts(&texts)?;
        dropped_tokens.truncate(prompts.len());
        Ok(Conditioning { captions, guided, dropped_tokens })
    }

    /// The time the transformer is given for a scheduler sigma, computed in
    /// f32 as diffusers does: `(1000 - sigma * 1000) / 1000`, i.e. `1 - sigma`.
    pub fn model_time(&self, sigma: f64) -> f32 {
        let timestep = sigma as f32 * self.scheduler.num_train_timesteps as f32;
        (1000.0 - timestep) / 1000.0
    }

    /// Raw transformer outputs ([rows, C, 1, h, w]) → what the scheduler
    /// steps with ([B, C, h, w], f32): the guided prediction, negated.
    pub fn model_output(out: &Tensor, guided: bool, guidance: f64) -> candle_core::Result<Tensor> {
        let out = out.to_dtype(DType::F32)?.squeeze(2)?;
        let pred = if guided {
            let b = out.dim(0)? / 2;
            let (pos, neg) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
            (&pos + ((&pos - &neg)? * guidance)?)?
        } else {
            out
        };
        pred.neg()
    }

    /// The scheduler's model output for latents ([B, C, h, w], f32) at `sigma`.
    pub fn velocity(&self, latents: &Tensor, sigma: f64, cond: &Conditioning, guidance: f64) -> anyhow::Result<Tensor> {
        Ok(Self::model_output(&self.transformer_output(latents, sigma, cond)?, cond.guided, guidance)?)
    }

    /// The transformer's raw output ([rows, C, 1, h, w]) for latents at `sigma`.
    fn transformer_output(&self, latents: &Tensor, sigma: f64, cond: &Conditioning) -> anyhow::Result<Tensor> {
        let x = latents.to_dtype(self.dtype)?.unsqueeze(2)?;
        let x = if cond.guided { Tensor::cat(&[&x, &x], 0)? } else { x };
        let rows = x.dim(0)?;
        ensure!(rows == cond.captions.len(), "{rows} transformer rows but {} captions", cond.captions.len());
        let t = Tensor::from_vec(vec![self.model_time(sigma); rows], rows, &self.device)?;
        self.transformer.forward(&x, &t, &cond.captions)
    }

    /// Runs the sampler from `init_noise` (standard normal, [B, C, h, w]);
    /// the latents stay in f32 throughout, as in diffusers.
    pub fn sample(
        &self,
        init_noise: &Tensor,
        cond: &Conditioning,
        steps: usize,
        guidance: f64,
        progress: &mut Progress<'_>,
    ) -> anyhow::Result<Tensor> {
        ensure!(steps > 0, "steps must be at least 1");
        let sched = FlowMatchEuler::new(&self.scheduler, steps)?;
        let mut latents = (init_noise.to_dtype(DType::F32)? * sched.init_noise_sigma())?;
        let mut no_noise =
            |_: &[usize]| -> candle_core::Result<Tensor> { candle_core::bail!("flow-matching Euler draws no noise") };
        for i in 0..steps {
            // Fused: the guidance combine and the Euler update in one kernel,
            // the prediction's negation folded into the step's coefficient.
            if let (Kernels::Fused, Some(mut step)) = (self.kernels, sched.linear_step(i)) {
                let out = self.transformer_output(&latents, sched.sigmas()[i], cond)?;
                let out = out.to_dtype(DType::F32)?.squeeze(2)?;
                step.model_output = -step.model_output;
                let g = if cond.guided { Guidance::CondFirst(guidance) } else { Guidance::None };
                latents = guided_step(&out, &latents, None, g, step)?;
                if !progress(i + 1, steps) {
                    return Err(Cancelled.into());
                }
                continue;
            }
            let v = self.velocity(&latents, sched.sigmas()[i], cond, guidance)?;
            latents = sched.step(&v, i, &latents, &mut no_noise)?;
            if !progress(i + 1, steps) {
                return Err(Cancelled.into());
            }
        }
        Ok(latents)
    }

    /// Decodes latents to images in [-1, 1], [B, 3, H, W] (in the model dtype,
    /// as diffusers casts the latents before decoding).
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let z = ((latents.to_dtype(self.dtype)? / self.vae_scaling)? + self.vae_shift)?;
        self.vae.forward(&z)
    }

    /// Runs a batch from given initial noise ([B, C, h, w]); `generate` draws
    /// it from the jobs' seeds.
    pub fn generate_from_noise(
        &self,
        reqs: &[GenRequest],
        init_noise: &Tensor,
        progress: &mut Progress<'_>,
    ) -> anyhow::Result<Vec<GenOutput>> {
        let first = self.check_batch(reqs)?;
        let prompts: Vec<&str> = reqs.iter().map(|r| r.prompt.as_str()).collect();
        let negatives: Vec<&str> = reqs.iter().map(|r| r.negative_prompt.as_str()).collect();
        let cond = self.condition(&prompts, &negatives, first.guidance)?;
        let latents = self.sample(init_noise, &cond, first.steps, first.guidance, progress)?;
        let images = self.decode(&latents)?;
        super::to_outputs(&images, &cond.dropped_tokens)
    }

    /// Runs a batch of requests that share size, steps and guidance; each
    /// job's noise comes from its own seed, so its image does not depend on
    /// its batch partners.
    pub fn generate(&self, reqs: &[GenRequest], progress: &mut Progress<'_>) -> anyhow::Result<Vec<GenOutput>> {
        let first = self.check_batch(reqs)?;
        let f = self.vae_downscale;
        let shape = [self.latent_channels(), first.height as usize / f, first.width as usize / f];
        let mut streams: Vec<NoiseStream> = reqs.iter().map(|r| NoiseStream::new(r.seed)).collect();
        let init = batch_noise(&mut streams, &shape, &self.device)?;
        self.generate_from_noise(reqs, &init, progress)
    }

    fn check_batch<'a>(&self, reqs: &'a [GenRequest]) -> anyhow::Result<&'a GenRequest> {
        let first = reqs.first().context("empty batch")?;
        let m = self.pixel_multiple() as u32;
        for r in reqs {
            ensure!(
                (r.width, r.height, r.steps) == (first.width, first.height, first.steps)
                    && r.guidance == first.guidance,
                "a batch must share size, steps and guidance"
            );
            ensure!(
                r.sampler == SamplerKind::FlowMatchEuler,
                "Z-Image samples with flow_match_euler, not {}",
                r.sampler.name()
            );
        }
        ensure!(
            first.width > 0 && first.height > 0 && first.width % m == 0 && first.height % m == 0,
            "width and height must be positive multiples of {m} (got {}x{})",
            first.width,
            first.height
        );
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use super::*;

    fn files() -> ModelFiles {
        ModelFiles::dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-z-image"))
    }

    fn pipeline() -> &'static ZImagePipeline {
        static P: OnceLock<ZImagePipeline> = OnceLock::new();
        P.get_or_init(|| {
            ZImagePipeline::load(&files(), &Device::Cpu, DType::F32, Kernels::Candle).expect("loading tiny-z-image")
        })
    }

    fn req(prompt: &str, seed: u64) -> GenRequest {
        GenRequest {
            prompt: prompt.into(),
            negative_prompt: "blurry".into(),
            width: 64,
            height: 32,
            steps: 2,
            guidance: 2.0,
            seed,
            sampler: SamplerKind::FlowMatchEuler,
        }
    }

    fn run(reqs: &[GenRequest]) -> Vec<GenOutput> {
        pipeline().generate(reqs, &mut |_, _| true).unwrap()
    }

    #[test]
    fn meta_reads_the_configs() {
        let m = meta(&files()).unwrap();
        assert_eq!(m.family, "z-image");
        assert_eq!(m.pixel_multiple, 16);
        assert_eq!(m.max_prompt_tokens, 512);
        assert_eq!(m.default_side_px, 64);
        assert_eq!(m.samplers, vec![SamplerKind::FlowMatchEuler]);
    }

    #[test]
    fn same_seed_same_bytes_different_seed_different_bytes() {
        let a = run(&[req("a red cube", 7)]);
        let b = run(&[req("a red cube", 7)]);
        let c = run(&[req("a red cube", 8)]);
        assert_eq!((a[0].width, a[0].height, a[0].rgb.len()), (64, 32, 64 * 32 * 3));
        assert_eq!(a[0].rgb, b[0].rgb, "same seed, different bytes");
        assert_ne!(a[0].rgb, c[0].rgb, "different seeds, same bytes");
    }

    #[test]
    fn an_image_does_not_depend_on_its_batch_partners() {
        // The partner's caption pads to a different length (64 vs 32 tokens),
        // so the batch runs as two groups inside the transformer.
        let long = "a lighthouse on a rocky cliff at dusk, ".repeat(4);
        assert!(pipeline().tokenize(&long).unwrap().ids.len() > 32);
        let alone = run(&[req("a red cube", 7)]);
        let batch = run(&[req(&long, 3), req("a red cube", 7)]);
        let diff = alone[0].rgb.iter().zip(&batch[1].rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(diff <= 1, "batched image differs by {diff}");
    }

    #[test]
    fn cancelling_stops_the_run() {
        let err = pipeline().generate(&[req("a red cube", 1)], &mut |k, _| k < 1).unwrap_err();
        assert!(err.is::<Cancelled>(), "{err:#}");
    }

    #[test]
    fn long_prompts_are_cut_at_512_tokens() {
        let e = pipeline().tokenize(&"cat ".repeat(600)).unwrap();
        assert_eq!(e.ids.len(), 512);
        assert!(e.dropped_tokens > 80, "{}", e.dropped_tokens);
    }
}
