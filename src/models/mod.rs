//! Text-to-image pipelines on candle, one folder per model family.
//!
//! A model is a folder in the diffusers layout; [`catalog`] finds them and
//! tells the families apart, each family module loads its folder into a
//! pipeline that turns a batch of [`GenRequest`]s into images. The device and
//! dtype are parameters everywhere, so a GPU backend only adds a `Device`.

pub mod blocks;
pub mod catalog;
pub mod errors;
pub mod files;
pub mod layout;
pub mod noise;
pub mod scheduler;
pub mod sd;
pub mod tokenizer;
pub mod vae;
pub mod z_image;

use candle_core::{DType, Device, Tensor};

pub use self::blocks::Kernels;
use self::files::ModelFiles;
pub use self::scheduler::SamplerKind;

/// One image to make. Requests batched together share size, steps, sampler
/// and guidance; prompts and seeds differ.
#[derive(Clone, Debug, PartialEq)]
pub struct GenRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub sampler: SamplerKind,
}

/// One image made: RGB bytes, row-major.
#[derive(Clone, Debug)]
pub struct GenOutput {
    pub rgb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Prompt tokens beyond the text encoder's context, dropped.
    pub dropped_tokens: usize,
}

/// Reports step `k` of `n`; returns false to stop the run.
pub type Progress<'a> = dyn FnMut(usize, usize) -> bool + 'a;

/// The run was stopped through [`Progress`].
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// What the API and the scheduler need to know about a model, read from its
/// configs without loading weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMeta {
    pub family: &'static str,
    /// Width and height must be multiples of this (VAE stride × patch size).
    pub pixel_multiple: u32,
    /// Prompt tokens the text encoder takes; longer prompts are truncated.
    pub max_prompt_tokens: u32,
    pub default_side_px: u32,
    pub default_sampler: SamplerKind,
    pub samplers: Vec<SamplerKind>,
}

/// The model families we run, told apart by `model_index.json`'s class.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Family {
    StableDiffusion,
    ZImage,
}

impl Family {
    pub fn detect(files: &ModelFiles) -> anyhow::Result<Family> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(rename = "_class_name")]
            class: String,
        }
        let index: Index = files.json("model_index.json")?;
        match layout::PIPELINES.iter().find(|(class, _)| *class == index.class) {
            Some((_, family)) => Ok(*family),
            None => {
                let class = index.class.as_str();
                let kind = if ["Img2Img", "Inpaint", "Upscale", "Depth2Img", "InstructPix2Pix"]
                    .iter()
                    .any(|k| class.contains(k))
                {
                    " is an image-to-image pipeline (an SDXL refiner, inpainting or upscaling model)"
                } else {
                    " is not a pipeline raftgen runs"
                };
                let served: Vec<&str> = layout::PIPELINES.iter().map(|(c, _)| *c).collect();
                anyhow::bail!(
                    "model_index.json: {class}{kind}; raftgen serves text-to-image pipelines: {}",
                    served.join(", ")
                )
            }
        }
    }

    /// The components of this family present in `files` (those with a
    /// `config.json`), from the table in `models::layout`.
    pub fn components(self, files: &ModelFiles) -> Vec<&'static layout::Component> {
        let all = match self {
            Family::StableDiffusion => layout::SD_COMPONENTS,
            Family::ZImage => layout::Z_IMAGE_COMPONENTS,
        };
        all.iter().filter(|c| files.exists(&format!("{}/config.json", c.dir))).collect()
    }

    /// Every weight file the model loads, sorted: what its content hash covers.
    pub fn weight_files(self, files: &ModelFiles) -> anyhow::Result<Vec<String>> {
        let mut v = Vec::new();
        for c in self.components(files) {
            v.extend(files.weights(c.dir, c.library)?.files);
        }
        v.sort();
        Ok(v)
    }

    pub fn meta(self, files: &ModelFiles) -> anyhow::Result<ModelMeta> {
        match self {
            Family::StableDiffusion => sd::meta(files),
            Family::ZImage => z_image::meta(files),
        }
    }
}

/// A loaded model of any family.
pub enum Pipeline {
    Sd(Box<sd::SdPipeline>),
    ZImage(Box<z_image::ZImagePipeline>),
}

impl Pipeline {
    /// Loads a model with the kernels that suit `device` ([`Kernels::for_device`]).
    pub fn load(family: Family, files: &ModelFiles, device: &Device, dtype: DType) -> anyhow::Result<Pipeline> {
        Pipeline::load_with(family, files, device, dtype, Kernels::for_device(device))
    }

    /// Loads a model running `kernels` (tests and benchmarks compare both).
    pub fn load_with(
        family: Family,
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        kernels: Kernels,
    ) -> anyhow::Result<Pipeline> {
        Ok(match family {
            Family::StableDiffusion => Pipeline::Sd(Box::new(sd::SdPipeline::load(files, device, dtype, kernels)?)),
            Family::ZImage => Pipeline::ZImage(Box::new(z_image::ZImagePipeline::load(files, device, dtype, kernels)?)),
        })
    }

    pub fn generate(&self, reqs: &[GenRequest], progress: &mut Progress<'_>) -> anyhow::Result<Vec<GenOutput>> {
        match self {
            Pipeline::Sd(p) => p.generate(reqs, progress),
            Pipeline::ZImage(p) => p.generate(reqs, progress),
        }
    }
}

/// Decoded images in [-1, 1] ([B, 3, H, W]) → RGB bytes, as diffusers'
/// `numpy_to_pil` rounds them.
pub fn to_outputs(images: &Tensor, dropped: &[usize]) -> anyhow::Result<Vec<GenOutput>> {
    let (b, c, h, w) = images.dims4()?;
    anyhow::ensure!(c == 3, "the decoder made {c} channels, not 3");
    let images = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let images = (images * 255.0)?.round()?.permute((0, 2, 3, 1))?.to_dtype(DType::U8)?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let rgb = images.get(i)?.flatten_all()?.to_vec1::<u8>()?;
        out.push(GenOutput {
            rgb,
            width: w as u32,
            height: h as u32,
            dropped_tokens: dropped.get(i).copied().unwrap_or(0),
        });
    }
    Ok(out)
}
