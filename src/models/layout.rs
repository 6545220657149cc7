//! What a model folder may look like, in one place: which files hold each
//! component's weights and which naming variants each family accepts.
//!
//! The weight-file rules are diffusers' and transformers' own (their
//! `_add_variant` names and their loaders' choices), so a folder loads here
//! exactly as `from_pretrained` loads it:
//! - a component's weights are `diffusion_pytorch_model.safetensors`
//!   (diffusers models) or `model.safetensors` (transformers models), or a
//!   sharded set under an index (`…safetensors.index.json`); PyTorch pickles
//!   (`diffusion_pytorch_model.bin`, `pytorch_model.bin`, sharded likewise)
//!   only when no safetensors exist;
//! - variants insert their name before the extension
//!   (`diffusion_pytorch_model.fp16.safetensors`,
//!   `model.safetensors.index.fp16.json`, shards `…fp16-00001-of-00002…`);
//! - the plain weights win when present; else the variant asked for (the
//!   node's `--variant`, or `"variant"` in the folder's `model_index.json`);
//!   else the one variant there is, `non_ema` (training weights) excepted: it
//!   is used only when asked for. Never two variants at once.
//!
//! [`select`] decides from file names alone: pure, and tested on every case
//! below. Stray files (ONNX, OpenVINO, Flax, other pipelines' weights) are
//! ignored because only these exact names are weights.

use std::collections::BTreeSet;

/// How a component's weights are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// diffusers models (UNet, VAE, transformer): `diffusion_pytorch_model`.
    Diffusers,
    /// transformers models (text encoders): `model` / `pytorch_model`.
    Transformers,
}

impl Library {
    fn base(self, format: WeightFormat) -> &'static str {
        match (self, format) {
            (Library::Diffusers, _) => "diffusion_pytorch_model",
            (Library::Transformers, WeightFormat::Safetensors) => "model",
            (Library::Transformers, WeightFormat::Pickle) => "pytorch_model",
        }
    }
}

/// The file format of a component's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// PyTorch's zip pickle (`torch.save`), read by candle without Python.
    Pickle,
}

impl WeightFormat {
    fn ext(self) -> &'static str {
        match self {
            WeightFormat::Safetensors => "safetensors",
            WeightFormat::Pickle => "bin",
        }
    }
}

/// The weights chosen for one component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub format: WeightFormat,
    /// `None`: the plain weights.
    pub variant: Option<String>,
    /// One file, or a shard index whose `weight_map` names the files.
    pub file: ChoiceFile,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChoiceFile {
    Single(String),
    Index(String),
}

/// What a file name is, for one base name and extension.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Single(Option<String>),
    Index(Option<String>),
}

/// Parses `name` as `{base}[.{variant}].{ext}` or
/// `{base}.{ext}.index[.{variant}].json`; shards and anything else: `None`.
fn parse(name: &str, base: &str, ext: &str) -> Option<Kind> {
    let variant_ok = |v: &str| !v.is_empty() && !v.contains('.') && !v.contains('-');
    let rest = name.strip_prefix(base)?;
    if let Some(index) = rest.strip_prefix(&format!(".{ext}.index")) {
        let v = index.strip_suffix(".json")?;
        return match v {
            "" => Some(Kind::Index(None)),
            v => v.strip_prefix('.').filter(|v| variant_ok(v)).map(|v| Kind::Index(Some(v.to_string()))),
        };
    }
    let middle = rest.strip_suffix(&format!(".{ext}"))?;
    match middle {
        "" => Some(Kind::Single(None)),
        m => m.strip_prefix('.').filter(|v| variant_ok(v)).map(|v| Kind::Single(Some(v.to_string()))),
    }
}

/// Chooses a component's weights from the names of the files in its folder.
/// `asked` is the variant the node or folder asks for. The error is a
/// sentence for a person (it names the folder's files and the fix).
pub fn select(component: &str, library: Library, names: &[String], asked: Option<&str>) -> Result<Choice, String> {
    for format in [WeightFormat::Safetensors, WeightFormat::Pickle] {
        let (base, ext) = (library.base(format), format.ext());
        let kinds: Vec<(&String, Kind)> = names.iter().filter_map(|n| parse(n, base, ext).map(|k| (n, k))).collect();
        if kinds.is_empty() {
            continue;
        }
        let variants: BTreeSet<Option<&str>> = kinds
            .iter()
            .map(|(_, k)| match k {
                Kind::Single(v) | Kind::Index(v) => v.as_deref(),
            })
            .collect();
        let variant: Option<&str> = if variants.contains(&None) {
            None
        } else if let Some(a) = asked.filter(|a| variants.contains(&Some(*a))) {
            Some(a)
        } else {
            let usable: Vec<&str> = variants.iter().flatten().copied().filter(|v| *v != "non_ema").collect();
            match usable.as_slice() {
                [one] => Some(*one),
                [] => {
                    return Err(format!(
                        "{component}/ holds only non_ema (training) weights and no plain ones; serve them on \
                         purpose with --variant non_ema"
                    ))
                }
                many => {
                    return Err(format!(
                        "{component}/ has no plain weights but several variants ({}); choose one with --variant \
                         (or \"variant\" in model_index.json)",
                        many.join(", ")
                    ))
                }
            }
        };
        let pick = |want_index: bool| {
            kinds.iter().find_map(|(n, k)| match k {
                Kind::Single(v) if !want_index && v.as_deref() == variant => Some(ChoiceFile::Single((*n).clone())),
                Kind::Index(v) if want_index && v.as_deref() == variant => Some(ChoiceFile::Index((*n).clone())),
                _ => None,
            })
        };
        let file = pick(false).or_else(|| pick(true)).expect("the chosen variant has a file");
        return Ok(Choice { format, variant: variant.map(str::to_string), file });
    }
    let st = library.base(WeightFormat::Safetensors);
    let pk = library.base(WeightFormat::Pickle);
    Err(format!(
        "{component}/ has no weights: expected {st}.safetensors (or a variant such as {st}.fp16.safetensors, or \
         a sharded set under {st}.safetensors.index.json), or PyTorch's {pk}.bin"
    ))
}

/// The pipeline classes (`model_index.json`'s `_class_name`) raftgen runs.
pub const PIPELINES: &[(&str, super::Family)] = &[
    ("StableDiffusionPipeline", super::Family::StableDiffusion),
    ("StableDiffusionXLPipeline", super::Family::StableDiffusion),
    ("ZImagePipeline", super::Family::ZImage),
];

/// The component folders of each family and how they are named.
pub struct Component {
    pub dir: &'static str,
    pub library: Library,
    pub required: bool,
}

/// Stable Diffusion 1.x / 2.x / XL: one or two CLIP text encoders.
pub const SD_COMPONENTS: &[Component] = &[
    Component { dir: "text_encoder", library: Library::Transformers, required: false },
    Component { dir: "text_encoder_2", library: Library::Transformers, required: false },
    Component { dir: "unet", library: Library::Diffusers, required: true },
    Component { dir: "vae", library: Library::Diffusers, required: true },
];

/// Z-Image: a Qwen3 text encoder, the DiT, the FLUX autoencoder.
pub const Z_IMAGE_COMPONENTS: &[Component] = &[
    Component { dir: "text_encoder", library: Library::Transformers, required: true },
    Component { dir: "transformer", library: Library::Diffusers, required: true },
    Component { dir: "vae", library: Library::Diffusers, required: true },
];

/// Tensor-name prefixes a component may be saved with, tried in order: the
/// Qwen3 text encoder is saved as `Qwen3ForCausalLM` (keys under `model.`,
/// as Z-Image's release) or as `Qwen3Model` (no prefix, as diffusers'
/// `save_pretrained` writes it back); the loader asks for `model.*`.
pub const QWEN3_PREFIXES: &[&str] = &["model.", ""];

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn single(format: WeightFormat, variant: Option<&str>, f: &str) -> Choice {
        Choice { format, variant: variant.map(str::to_string), file: ChoiceFile::Single(f.into()) }
    }

    const ST: WeightFormat = WeightFormat::Safetensors;

    #[test]
    fn plain_weights_win_over_variants() {
        let n = names(&[
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.non_ema.safetensors",
            "diffusion_pytorch_model.bin",
        ]);
        for asked in [None, Some("fp16"), Some("non_ema")] {
            let c = select("unet", Library::Diffusers, &n, asked).unwrap();
            assert_eq!(c, single(ST, None, "diffusion_pytorch_model.safetensors"), "asked {asked:?}");
        }
    }

    #[test]
    fn fp16_and_non_ema_only_takes_fp16_and_never_both() {
        // The folder: diffusers loads the fp16 file.
        let n = names(&["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.non_ema.safetensors"]);
        let c = select("unet", Library::Diffusers, &n, None).unwrap();
        assert_eq!(c, single(ST, Some("fp16"), "diffusion_pytorch_model.fp16.safetensors"));
        let c = select("unet", Library::Diffusers, &n, Some("non_ema")).unwrap();
        assert_eq!(c, single(ST, Some("non_ema"), "diffusion_pytorch_model.non_ema.safetensors"));
        // Asking for a variant that is not there falls back to the one that is.
        let c = select("unet", Library::Diffusers, &n, Some("bf16")).unwrap();
        assert_eq!(c.variant.as_deref(), Some("fp16"));
    }

    #[test]
    fn ambiguous_or_training_only_folders_are_refused_with_the_fix() {
        let n = names(&["model.fp16.safetensors", "model.bf16.safetensors"]);
        let e = select("text_encoder", Library::Transformers, &n, None).unwrap_err();
        assert!(e.contains("several variants (bf16, fp16)") && e.contains("--variant"), "{e}");
        let c = select("text_encoder", Library::Transformers, &n, Some("bf16")).unwrap();
        assert_eq!(c, single(ST, Some("bf16"), "model.bf16.safetensors"));
        let n = names(&["diffusion_pytorch_model.non_ema.safetensors"]);
        let e = select("unet", Library::Diffusers, &n, None).unwrap_err();
        assert!(e.contains("non_ema") && e.contains("--variant non_ema"), "{e}");
    }

    #[test]
    fn shards_come_through_their_index() {
        let n = names(&[
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]);
        let c = select("text_encoder", Library::Transformers, &n, None).unwrap();
        assert_eq!(c.file, ChoiceFile::Index("model.safetensors.index.json".into()));
        let n = names(&[
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ]);
        let c = select("transformer", Library::Diffusers, &n, None).unwrap();
        assert_eq!(c.variant.as_deref(), Some("fp16"));
        assert_eq!(c.file, ChoiceFile::Index("diffusion_pytorch_model.safetensors.index.fp16.json".into()));
        // Shards without their index are not a usable set.
        let n = names(&["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        assert!(select("text_encoder", Library::Transformers, &n, None).is_err());
    }

    #[test]
    fn pickles_only_when_no_safetensors_exist() {
        let n = names(&["pytorch_model.bin", "config.json"]);
        let c = select("text_encoder", Library::Transformers, &n, None).unwrap();
        assert_eq!(c, single(WeightFormat::Pickle, None, "pytorch_model.bin"));
        let n = names(&["diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"]);
        let c = select("vae", Library::Diffusers, &n, None).unwrap();
        assert_eq!(c.format, ST, "any safetensors beat a pickle");
        let n = names(&["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]);
        let c = select("text_encoder", Library::Transformers, &n, None).unwrap();
        assert_eq!(c.file, ChoiceFile::Index("pytorch_model.bin.index.json".into()));
    }

    #[test]
    fn stray_files_are_not_weights() {
        let n = names(&[
            "model.onnx",
            "openvino_model.bin",
            "openvino_model.xml",
            "flax_model.msgpack",
            "diffusion_pytorch_model.safetensors.bak",
            "model.fp16.onnx",
            "diffusion_pytorch_model..safetensors",
        ]);
        let e = select("unet", Library::Diffusers, &n, None).unwrap_err();
        assert!(e.contains("no weights") && e.contains("diffusion_pytorch_model.safetensors"), "{e}");
        assert!(select("text_encoder", Library::Transformers, &n, None).is_err());
    }

    #[test]
    fn names_parse_exactly() {
        let p = |n| parse(n, "model", "safetensors");
        assert_eq!(p("model.safetensors"), Some(Kind::Single(None)));
        assert_eq!(p("model.fp16.safetensors"), Some(Kind::Single(Some("fp16".into()))));
        assert_eq!(p("model.safetensors.index.json"), Some(Kind::Index(None)));
        assert_eq!(p("model.safetensors.index.fp16.json"), Some(Kind::Index(Some("fp16".into()))));
        for bad in [
            "model.a.b.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.a.b.json",
            "models.safetensors",
            "model.",
            ".safetensors",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }
}
