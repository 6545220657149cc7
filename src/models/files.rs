//! Where a model's files come from: a diffusers folder on disk, or the
//! built-in model compiled into the binary.
//!
//! Pipelines read configs and weights only through [`ModelFiles`], so the
//! built-in model and a user's folder take exactly the same code path. Which
//! files hold a component's weights is decided by `models::layout` (the
//! diffusers rules), from the file names alone.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use super::layout::{self, ChoiceFile, Library, WeightFormat};

#[derive(Clone, Debug)]
enum Source {
    /// A folder in the diffusers layout.
    Dir(PathBuf),
    /// Files compiled into the binary: (relative path, bytes).
    Embedded(&'static [(&'static str, &'static [u8])]),
}

/// A model's files, and the weight variant asked for.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    source: Source,
    /// The node's `--variant`; the folder's own `"variant"` (in
    /// `model_index.json`) takes precedence.
    variant: Option<String>,
    /// Validation only: weights come from the files' headers as zero-sized
    /// stand-ins (see [`ModelFiles::checking`]).
    check_only: bool,
}

/// One component's chosen weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weights {
    pub format: WeightFormat,
    pub variant: Option<String>,
    /// Paths relative to the model root, sorted.
    pub files: Vec<String>,
}

/// A tensor as a weight file's header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: String,
}

impl ModelFiles {
    /// A diffusers folder.
    pub fn dir(path: impl Into<PathBuf>) -> ModelFiles {
        ModelFiles { source: Source::Dir(path.into()), variant: None, check_only: false }
    }

    /// Files compiled into the binary.
    pub fn embedded(files: &'static [(&'static str, &'static [u8])]) -> ModelFiles {
        ModelFiles { source: Source::Embedded(files), variant: None, check_only: false }
    }

    /// The same files with `variant` asked for (`--variant`).
    pub fn with_variant(mut self, variant: Option<String>) -> ModelFiles {
        self.variant = variant;
        self
    }

    /// The same files for validation: a pipeline loaded from them reads every
    /// config and builds its tokenizers as usual, but each weight it asks for
    /// is looked up in the weight files' headers (present, with the shape the
    /// architecture needs) and answered with a broadcast zero that takes no
    /// memory. So a folder is checked without reading its gigabytes.
    pub fn checking(mut self) -> ModelFiles {
        self.check_only = true;
        self
    }

    /// The folder, for files on disk.
    pub fn root(&self) -> Option<&Path> {
        match &self.source {
            Source::Dir(p) => Some(p),
            Source::Embedded(_) => None,
        }
    }

    pub fn describe(&self) -> String {
        match &self.source {
            Source::Dir(p) => p.display().to_string(),
            Source::Embedded(_) => "(built in)".to_string(),
        }
    }

    pub fn exists(&self, rel: &str) -> bool {
        match &self.source {
            Source::Dir(root) => root.join(rel).is_file(),
            Source::Embedded(files) => files.iter().any(|(p, _)| *p == rel),
        }
    }

    pub fn read(&self, rel: &str) -> anyhow::Result<Cow<'static, [u8]>> {
        match &self.source {
            Source::Dir(root) => {
                let path = root.join(rel);
                Ok(Cow::Owned(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?))
            }
            Source::Embedded(files) => files
                .iter()
                .find(|(p, _)| *p == rel)
                .map(|(_, b)| Cow::Borrowed(*b))
                .with_context(|| format!("the built-in model has no file {rel}")),
        }
    }

    /// Reads and parses a JSON file (a `config.json`, `model_index.json`...).
    pub fn json<T: DeserializeOwned>(&self, rel: &str) -> anyhow::Result<T> {
        let bytes = self.read(rel)?;
        serde_json::from_slice(&bytes).with_context(|| format!("{rel}: not the JSON expected"))
    }

    /// The names of the files directly in one component folder, sorted.
    fn list(&self, component: &str) -> anyhow::Result<Vec<String>> {
        let mut names = match &self.source {
            Source::Dir(root) => {
                let dir = root.join(component);
                let mut v = Vec::new();
                for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        v.push(entry.file_name().to_string_lossy().to_string());
                    }
                }
                v
            }
            Source::Embedded(files) => {
                let prefix = format!("{component}/");
                files.iter().filter_map(|(p, _)| p.strip_prefix(&prefix)).map(str::to_string).collect()
            }
        };
        names.sort();
        Ok(names)
    }

    /// The variant asked for: the folder's own `"variant"`, else the node's.
    fn asked_variant(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            variant: Option<String>,
        }
        let own = self.json::<Index>("model_index.json").ok().and_then(|i| i.variant);
        own.or_else(|| self.variant.clone())
    }

    /// The files holding one component's weights, chosen as diffusers
    /// chooses them (`models::layout`).
    pub fn weights(&self, component: &str, library: Library) -> anyhow::Result<Weights> {
        let names = self.list(component)?;
        let asked = self.asked_variant();
        let choice = layout::select(component, library, &names, asked.as_deref()).map_err(anyhow::Error::msg)?;
        let files = match &choice.file {
            ChoiceFile::Single(f) => vec![format!("{component}/{f}")],
            ChoiceFile::Index(index) => {
                #[derive(serde::Deserialize)]
                struct Index {
                    weight_map: BTreeMap<String, String>,
                }
                let index_path = format!("{component}/{index}");
                let parsed: Index = self.json(&index_path)?;
                let mut files: Vec<String> =
                    parsed.weight_map.into_values().map(|f| format!("{component}/{f}")).collect();
                files.sort();
                files.dedup();
                if let Some(missing) = files.iter().find(|f| !self.exists(f)) {
                    bail!("{index_path} names {missing}, which is not in the folder");
                }
                files
            }
        };
        Ok(Weights { format: choice.format, variant: choice.variant, files })
    }

    /// A `VarBuilder` over one component, its weights chosen by the layout
    /// rules.
    pub fn component(
        &self,
        component: &str,
        library: Library,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<VarBuilder<'static>> {
        let weights = self.weights(component, library)?;
        self.var_builder(&weights, dtype, device, None)
    }

    /// The tensors of one component, from the weight files' headers (no
    /// tensor data is read).
    pub fn tensor_infos(&self, weights: &Weights) -> anyhow::Result<BTreeMap<String, TensorInfo>> {
        let mut out = BTreeMap::new();
        for f in &weights.files {
            match weights.format {
                WeightFormat::Safetensors => {
                    let header = self.safetensors_header(f)?;
                    for (name, v) in header {
                        if name == "__metadata__" {
                            continue;
                        }
                        let shape = v["shape"]
                            .as_array()
                            .with_context(|| format!("{f}: tensor {name} has no shape"))?
                            .iter()
                            .map(|d| d.as_u64().map(|d| d as usize).context("bad dimension"))
                            .collect::<anyhow::Result<Vec<usize>>>()?;
                        let dtype = v["dtype"].as_str().unwrap_or("?").to_string();
                        out.insert(name, TensorInfo { shape, dtype });
                    }
                }
                WeightFormat::Pickle => {
                    let path = self.local_path(f)?;
                    let pth = candle_core::pickle::PthTensors::new(&path, None)
                        .with_context(|| format!("{f}: not a PyTorch checkpoint candle can read"))?;
                    for (name, info) in pth.tensor_infos() {
                        let info =
                            TensorInfo { shape: info.layout.dims().to_vec(), dtype: format!("{:?}", info.dtype) };
                        out.insert(name.clone(), info);
                    }
                }
            }
        }
        Ok(out)
    }

    /// A file on disk (pickles are read by path; the built-in model has none).
    fn local_path(&self, rel: &str) -> anyhow::Result<PathBuf> {
        match &self.source {
            Source::Dir(root) => Ok(root.join(rel)),
            Source::Embedded(_) => bail!("the built-in model has no PyTorch pickles"),
        }
    }

    /// The JSON header of a safetensors file.
    fn safetensors_header(&self, rel: &str) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
        let header: Vec<u8> = match &self.source {
            Source::Dir(root) => {
                use std::io::Read;
                let mut f = std::fs::File::open(root.join(rel)).with_context(|| format!("opening {rel}"))?;
                let mut len = [0u8; 8];
                f.read_exact(&mut len).with_context(|| format!("{rel}: not a safetensors file"))?;
                let n = u64::from_le_bytes(len);
                anyhow::ensure!(n < 100 << 20, "{rel}: safetensors header of {n} bytes");
                let mut h = vec![0; n as usize];
                f.read_exact(&mut h).with_context(|| format!("{rel}: truncated safetensors header"))?;
                h
            }
            Source::Embedded(_) => {
                let bytes = self.read(rel)?;
                anyhow::ensure!(bytes.len() >= 8, "{rel}: not a safetensors file");
                let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
                anyhow::ensure!(bytes.len() >= 8 + n, "{rel}: truncated safetensors header");
                bytes[8..8 + n].to_vec()
            }
        };
        serde_json::from_slice(&header).with_context(|| format!("{rel}: bad safetensors header"))
    }

    /// A `VarBuilder` over one component's weights. Safetensors on disk are
    /// memory-mapped; built-in ones are read from the binary; PyTorch
    /// pickles are read whole. `prefix_from` and `prefix_to` rename tensors
    /// the loader asks for (`model.x` looked up as `x`), for text encoders
    /// saved without the prefix the loader uses.
    pub fn var_builder(
        &self,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        rename: Option<(&'static str, &'static str)>,
    ) -> anyhow::Result<VarBuilder<'static>> {
        let vb = match (&self.source, weights.format) {
            _ if self.check_only => {
                let tensors = self.tensor_infos(weights)?;
                let files = weights.files.join(", ");
                VarBuilder::from_backend(Box::new(HeaderCheck { tensors, files }), dtype, device.clone())
            }
            (Source::Dir(root), WeightFormat::Safetensors) => {
                let paths: Vec<PathBuf> = weights.files.iter().map(|f| root.join(f)).collect();
                // SAFETY: the files are opened read-only; a model folder must not be
                // rewritten while a node serves it (documented in the README).
                unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device)? }
            }
            (Source::Dir(root), WeightFormat::Pickle) => {
                let mut tensors: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
                for f in &weights.files {
                    let path = root.join(f);
                    for (name, t) in candle_core::pickle::read_all(&path)
                        .with_context(|| format!("{f}: not a PyTorch checkpoint candle can read"))?
                    {
                        tensors.insert(name, t);
                    }
                }
                VarBuilder::from_tensors(tensors, dtype, device)
            }
            (Source::Embedded(_), WeightFormat::Safetensors) => {
                if weights.files.len() != 1 {
                    bail!("the built-in model must have one weight file per component");
                }
                let bytes = self.read(&weights.files[0])?.into_owned();
                VarBuilder::from_buffered_safetensors(bytes, dtype, device)?
            }
            (Source::Embedded(_), WeightFormat::Pickle) => bail!("the built-in model has no PyTorch pickles"),
        };
        Ok(match rename {
            Some((from, to)) => vb.rename_f(move |name: &str| match name.strip_prefix(from) {
                Some(rest) => format!("{to}{rest}"),
                None => name.to_string(),
            }),
            None => vb,
        })
    }
}

/// The validation backend of [`ModelFiles::checking`]: every tensor asked for
/// must be in the headers with the asked shape; the answer is a zero of that
/// shape broadcast from one element.
struct HeaderCheck {
    tensors: BTreeMap<String, TensorInfo>,
    /// The weight files, for messages.
    files: String,
}

impl candle_nn::var_builder::SimpleBackend for HeaderCheck {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor {name}, which the architecture needs", self.files))
        })?;
        if info.shape != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor {name} has shape {:?}, the configs say {:?}",
                self.files,
                info.shape,
                s.dims()
            )));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor {name}, which the architecture needs", self.files))
        })?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(info.shape.as_slice())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
