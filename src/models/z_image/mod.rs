//! Z-Image (Alibaba's flow-matching DiT; the Turbo variant samples in 8 steps).
//! Not implemented yet: loading a Z-Image folder fails with a clear error.

use candle_core::{DType, Device};

use super::files::ModelFiles;
use super::{GenOutput, GenRequest, ModelMeta, Progress};

pub fn meta(_files: &ModelFiles) -> anyhow::Result<ModelMeta> {
    anyhow::bail!("Z-Image models are not supported yet")
}

pub struct ZImagePipeline;

impl ZImagePipeline {
    pub fn load(_files: &ModelFiles, _device: &Device, _dtype: DType) -> anyhow::Result<Self> {
        anyhow::bail!("Z-Image models are not supported yet")
    }

    pub fn generate(&self, _reqs: &[GenRequest], _progress: &mut Progress<'_>) -> anyhow::Result<Vec<GenOutput>> {
        anyhow::bail!("Z-Image models are not supported yet")
    }
}
