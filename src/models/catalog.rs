//! The models a node serves: every diffusers folder under `--models-dir`,
//! plus the built-in model, each with its content hash.
//!
//! The hash is sha256 over the model's weight files (path, length, bytes, in
//! path order). Hashing a real model reads gigabytes, so results are cached
//! in the node's data dir keyed by (path, size, mtime).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use candle_core::{DType, Device};

use super::errors::one_line;
use super::files::ModelFiles;
use super::{Family, Kernels, ModelMeta, Pipeline};

/// Name of the model compiled into the binary: `models/shapes-sd`, a small
/// SD-1.x-shaped model trained by `tools/train_shapes_model.py` to draw flat
/// shapes (see [`BUILTIN_VOCABULARY`]).
pub const BUILTIN_MODEL: &str = "shapes-sd";

/// What the built-in model can draw, for prompts, help texts and the demo:
/// one to three shapes, each with a colour, a position and a size, on a plain
/// background colour (at 64x64, its native size).
pub const BUILTIN_VOCABULARY: &str = "one to three circles, squares or triangles; colours red, green, blue, yellow, \
orange, purple, white, black; positions left, right, top, bottom, center; sizes small, medium, large; \
a plain background colour";

/// One servable model.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub name: String,
    pub family: Family,
    pub files: ModelFiles,
    /// sha256 of the weights, hex.
    pub hash: String,
    /// Parameters in the weight files (memory = params × dtype size).
    pub params: u64,
    pub meta: ModelMeta,
}

impl ModelEntry {
    pub fn open(name: &str, files: ModelFiles, cache: Option<&mut HashCache>) -> anyhow::Result<ModelEntry> {
        let family = Family::detect(&files)?;
        let meta = family.meta(&files)?;
        let weight_files = family.weight_files(&files)?;
        let hash = match cache {
            Some(c) => c.hash(&files, &weight_files)?,
            None => content_hash(&files, &weight_files)?,
        };
        let mut params = 0;
        for c in family.components(&files) {
            let weights = files.weights(c.dir, c.library)?;
            params +=
                files.tensor_infos(&weights)?.values().map(|t| t.shape.iter().product::<usize>() as u64).sum::<u64>();
        }
        Ok(ModelEntry { name: name.to_string(), family, files, hash, params, meta })
    }

    /// Checks that the folder can be served, without reading its weights:
    /// the pipeline is built from the configs, its tokenizers are built, and
    /// every tensor it needs is looked up in the weight files' headers with
    /// the shape the configs give ([`ModelFiles::checking`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        let files = self.files.clone().checking();
        Pipeline::load_with(self.family, &files, &Device::Cpu, DType::F32, Kernels::Candle).map(drop)
    }

    /// The short hash AUTOMATIC1111 shows (first 10 hex digits).
    pub fn short_hash(&self) -> &str {
        &self.hash[..10]
    }
}

/// sha256 over `weight_files` (path, length, bytes, in path order): exactly
/// the files the model loads.
pub fn content_hash(files: &ModelFiles, weight_files: &[String]) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    for f in weight_files {
        match files.root() {
            Some(root) => {
                let path = root.join(f);
                let len = std::fs::metadata(&path)?.len();
                h.update(f.as_bytes());
                h.update([0]);
                h.update(len.to_le_bytes());
                let mut file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                std::io::copy(&mut file, &mut h)?;
            }
            None => {
                let bytes = files.read(f)?;
                h.update(f.as_bytes());
                h.update([0]);
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
struct Stamp {
    files: Vec<(String, u64, u128)>,
    hash: String,
}

/// Content hashes computed before, keyed by model folder.
pub struct HashCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Stamp>,
}

impl HashCache {
    /// A cache kept in `path` (created when first written); `None`: memory only.
    pub fn open(path: Option<PathBuf>) -> HashCache {
        let entries = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        HashCache { path, entries }
    }

    fn hash(&mut self, files: &ModelFiles, weight_files: &[String]) -> anyhow::Result<String> {
        let Some(root) = files.root() else { return content_hash(files, weight_files) };
        let root = root.to_path_buf();
        let mut stamp_files = Vec::new();
        for f in weight_files.iter().cloned() {
            let md = std::fs::metadata(root.join(&f))?;
            let mtime = md.modified()?.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            stamp_files.push((f, md.len(), mtime));
        }
        let key = root.canonicalize().unwrap_or_else(|_| root.clone()).display().to_string();
        if let Some(s) = self.entries.get(&key) {
            if s.files == stamp_files {
                return Ok(s.hash.clone());
            }
        }
        let hash = content_hash(files, weight_files)?;
        self.entries.insert(key, Stamp { files: stamp_files, hash: hash.clone() });
        if let Some(p) = &self.path {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&self.entries)?)?;
            std::fs::rename(&tmp, p)?;
        }
        Ok(hash)
    }
}

/// A model folder that is not served, and why (one line, for people).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub name: String,
    pub reason: String,
}

/// What a scan of `--models-dir` found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Folders that opened and passed [`ModelEntry::validate`].
    pub served: Vec<ModelEntry>,
    /// The others, with the reason (also logged as a warning).
    pub refused: Vec<Refused>,
}

/// Every model folder directly under `dir` (a folder with `model_index.json`),
/// opened with weight variant `variant` (`--variant`) and validated before it
/// is advertised. A folder that cannot be served is refused with its reason.
pub fn scan(dir: &Path, variant: Option<&str>, cache: &mut HashCache) -> anyhow::Result<Scan> {
    let mut out = Scan::default();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--models-dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model_index.json").is_file())
        .collect();
    dirs.sort();
    for path in dirs {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let files = ModelFiles::dir(path.clone()).with_variant(variant.map(str::to_string));
        match ModelEntry::open(&name, files, Some(cache)).and_then(|e| e.validate().map(|()| e)) {
            Ok(e) => out.served.push(e),
            Err(e) => {
                let reason = one_line(&e);
                tracing::warn!("not serving model folder {}: {reason}", path.display());
                out.refused.push(Refused { name, reason });
            }
        }
    }
    Ok(out)
}

/// Where a node's models come from: the built-in model (unless
/// `--no-builtin-model`) and the folders under `--models-dir`. Read at start
/// and again on a rescan (`SIGHUP`, `POST /v1/models/rescan`).
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub builtin: bool,
    pub dir: Option<PathBuf>,
    /// `--variant`.
    pub variant: Option<String>,
    /// Where content hashes are cached (the node's data dir).
    pub hash_cache: Option<PathBuf>,
}

impl Catalog {
    /// The models to serve and the folders refused. A folder named like the
    /// built-in model is refused (it would be ambiguous which one a job means).
    pub fn load(&self) -> anyhow::Result<Scan> {
        let mut out = Scan::default();
        if self.builtin {
            out.served.push(builtin()?);
        }
        if let Some(dir) = &self.dir {
            let mut cache = HashCache::open(self.hash_cache.clone());
            let scan = scan(dir, self.variant.as_deref(), &mut cache)?;
            for m in scan.served {
                if out.served.iter().any(|e| e.name == m.name) {
                    let reason = format!("a folder named '{}' clashes with the built-in model", m.name);
                    tracing::warn!("not serving model folder {}: {reason}", dir.join(&m.name).display());
                    out.refused.push(Refused { name: m.name, reason });
                } else {
                    out.served.push(m);
                }
            }
            out.refused.extend(scan.refused);
        }
        Ok(out)
    }
}

/// The model compiled into the binary ([`BUILTIN_MODEL`]), so that a fresh
/// checkout draws real (if simple) pictures without downloading anything.
pub fn builtin() -> anyhow::Result<ModelEntry> {
    ModelEntry::open(BUILTIN_MODEL, ModelFiles::embedded(BUILTIN_FILES), None)
}

macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-sd/", $path)))),*]
    };
}

static BUILTIN_FILES: &[(&str, &[u8])] = embed!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);
