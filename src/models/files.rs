//! Where a model's files come from: a diffusers folder on disk, or the
//! built-in tiny model compiled into the binary.
//!
//! Pipelines read configs and weights only through [`ModelFiles`], so the
//! built-in model and a user's folder take exactly the same code path.

use std::borrow::Cow;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

#[derive(Clone, Debug)]
pub enum ModelFiles {
    /// A folder in the diffusers layout.
    Dir(PathBuf),
    /// Files compiled into the binary: (relative path, bytes).
    Embedded(&'static [(&'static str, &'static [u8])]),
}

impl ModelFiles {
    pub fn describe(&self) -> String {
        match self {
            ModelFiles::Dir(p) => p.display().to_string(),
            ModelFiles::Embedded(_) => "(built in)".to_string(),
        }
    }

    pub fn exists(&self, rel: &str) -> bool {
        match self {
            ModelFiles::Dir(root) => root.join(rel).is_file(),
            ModelFiles::Embedded(files) => files.iter().any(|(p, _)| *p == rel),
        }
    }

    pub fn read(&self, rel: &str) -> anyhow::Result<Cow<'static, [u8]>> {
        match self {
            ModelFiles::Dir(root) => {
                let path = root.join(rel);
                Ok(Cow::Owned(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?))
            }
            ModelFiles::Embedded(files) => files
                .iter()
                .find(|(p, _)| *p == rel)
                .map(|(_, b)| Cow::Borrowed(*b))
                .with_context(|| format!("the built-in model has no file {rel}")),
        }
    }

    /// Reads and parses a JSON file (a `config.json`, `model_index.json`...).
    pub fn json<T: DeserializeOwned>(&self, rel: &str) -> anyhow::Result<T> {
        let bytes = self.read(rel)?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {rel} of {}", self.describe()))
    }

    /// The files of one component (`unet`, `vae`...), sorted.
    fn list(&self, component: &str) -> anyhow::Result<Vec<String>> {
        let mut names = match self {
            ModelFiles::Dir(root) => {
                let dir = root.join(component);
                let mut v = Vec::new();
                for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        v.push(format!("{component}/{}", entry.file_name().to_string_lossy()));
                    }
                }
                v
            }
            ModelFiles::Embedded(files) => {
                let prefix = format!("{component}/");
                files.iter().filter(|(p, _)| p.starts_with(&prefix)).map(|(p, _)| p.to_string()).collect()
            }
        };
        names.sort();
        Ok(names)
    }

    /// The safetensors files holding one component's weights. A shard index
    /// (`*.safetensors.index.json`) is followed when present; otherwise plain
    /// files (`model.safetensors`) are preferred over variants such as
    /// `model.fp16.safetensors`, which are used only when nothing else is there.
    pub fn weight_files(&self, component: &str) -> anyhow::Result<Vec<String>> {
        let all = self.list(component)?;
        if let Some(index) = all.iter().find(|n| n.ends_with(".safetensors.index.json")) {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let index: Index = self.json(index)?;
            let mut files: Vec<String> = index.weight_map.into_values().map(|f| format!("{component}/{f}")).collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
        let tensors: Vec<&String> = all.iter().filter(|n| n.ends_with(".safetensors")).collect();
        let plain: Vec<String> = tensors
            .iter()
            .filter(|n| {
                let file = n.rsplit('/').next().unwrap_or(n);
                file.trim_end_matches(".safetensors").split('.').count() == 1
            })
            .map(|s| s.to_string())
            .collect();
        let chosen = if plain.is_empty() { tensors.into_iter().cloned().collect() } else { plain };
        if chosen.is_empty() {
            bail!("{} has no safetensors weights under {component}/", self.describe());
        }
        Ok(chosen)
    }

    /// Every weight file of the model, for its content hash.
    pub fn all_weight_files(&self, components: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut v = Vec::new();
        for c in components {
            v.extend(self.weight_files(c)?);
        }
        v.sort();
        Ok(v)
    }

    /// A `VarBuilder` over one component's weights. Files on disk are
    /// memory-mapped; built-in ones are read from the binary.
    pub fn var_builder(&self, component: &str, dtype: DType, device: &Device) -> anyhow::Result<VarBuilder<'static>> {
        let files = self.weight_files(component)?;
        match self {
            ModelFiles::Dir(root) => {
                let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
                // SAFETY: the files are opened read-only; a model folder must not be
                // rewritten while a node serves it (documented in the README).
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device)? };
                Ok(vb)
            }
            ModelFiles::Embedded(_) => {
                if files.len() != 1 {
                    bail!("the built-in model must have one weight file per component");
                }
                let bytes = self.read(&files[0])?.into_owned();
                Ok(VarBuilder::from_buffered_safetensors(bytes, dtype, device)?)
            }
        }
    }
}
