//! Text tokenizers, built from the files in a model's `tokenizer*/` folders.
//!
//! CLIP folders in the diffusers layout carry `vocab.json` + `merges.txt`
//! (the slow tokenizer's files); we assemble the same tokenizer as OpenAI's
//! reference from them with the `tokenizers` crate: lower-cased, whitespace
//! collapsed, CLIP's word regex, byte-level alphabet, BPE with `</w>` word
//! ends. Z-Image's Qwen tokenizer is loaded from `tokenizer.json` as is, or,
//! in folders diffusers re-saved (which write only the slow files), built
//! from `vocab.json` + `merges.txt` + `tokenizer_config.json` the way
//! transformers converts them.

use anyhow::{bail, Context};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::files::ModelFiles;

/// CLIP's word pattern (from OpenAI's `simple_tokenizer.py`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt turned into the fixed-length ids a CLIP text encoder takes.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Prompt tokens dropped because the encoder's context is full.
    pub dropped_tokens: usize,
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    /// The encoder's context, BOS and EOS included (77 for every SD model).
    max_len: usize,
}

#[derive(serde::Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
}

/// `tokenizer_config.json` writes special tokens either as a string or as an
/// object with a `content` field.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Object { content } => content,
        }
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir` (`tokenizer` or `tokenizer_2`); the
    /// context length is the text encoder's `max_position_embeddings`.
    pub fn load(files: &ModelFiles, dir: &str, context: usize) -> anyhow::Result<Self> {
        // The slow tokenizer's files are what diffusers loads (`CLIPTokenizer`);
        // a folder with only a `tokenizer.json` is loaded from that.
        let inner = if files.exists(&format!("{dir}/vocab.json")) {
            clip_from_vocab_and_merges(files, dir)?
        } else {
            let bytes = files.read(&format!("{dir}/tokenizer.json"))?;
            let mut t = Tokenizer::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{dir}/tokenizer.json: {e}"))?;
            // Special tokens are added below, the same way for both file kinds.
            t.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
            t.with_padding(None);
            t.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
            t
        };
        let config: TokenizerConfig = if files.exists(&format!("{dir}/tokenizer_config.json")) {
            files.json(&format!("{dir}/tokenizer_config.json"))?
        } else {
            TokenizerConfig::default()
        };
        let id = |t: &str| inner.token_to_id(t).with_context(|| format!("{dir}: no token {t:?} in the vocabulary"));
        let bos = id("<|startoftext|>")?;
        let eos = id("<|endoftext|>")?;
        let pad = match &config.pad_token {
            Some(p) => id(p.content())?,
            None => eos,
        };
        let max_len = config.model_max_length.map(|m| m as usize).filter(|&m| m > 2 && m <= context).unwrap_or(context);
        Ok(ClipTokenizer { inner, bos, eos, pad, max_len })
    }

    /// `[BOS] tokens [EOS] [PAD]...`, exactly `max_len` ids; tokens beyond the
    /// context are dropped (and counted, so the job can say so).
    pub fn encode(&self, text: &str) -> anyhow::Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let tokens = enc.get_ids();
        let room = self.max_len - 2;
        let kept = tokens.len().min(room);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&tokens[..kept]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(Encoded { ids, dropped_tokens: tokens.len() - kept })
    }
}

fn clip_from_vocab_and_merges(files: &ModelFiles, dir: &str) -> anyhow::Result<Tokenizer> {
    let vocab: std::collections::HashMap<String, u32> = files.json(&format!("{dir}/vocab.json"))?;
    let merges = read_merges(files, dir)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .end_of_word_suffix("</w>".to_string())
        .unk_token("<|endoftext|>".to_string())
        .build()
        .map_err(|e| anyhow::anyhow!("{dir}: building BPE: {e}"))?;
    let mut t = Tokenizer::new(bpe);
    let replace = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    t.with_normalizer(Some(NormalizerWrapper::Sequence(NormSeq::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(replace),
        NormalizerWrapper::Lowercase(Lowercase),
    ]))));
    let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSeq::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]))));
    Ok(t)
}

/// A tokenizer loaded from `tokenizer.json` (Qwen's, for Z-Image).
pub struct JsonTokenizer {
    inner: Tokenizer,
}

impl JsonTokenizer {
    /// From `tokenizer.json` when the folder has one, else from Qwen2's slow
    /// tokenizer files (`vocab.json`, `merges.txt`, `tokenizer_config.json`),
    /// which is what diffusers' `save_pretrained` writes for Z-Image.
    pub fn load(files: &ModelFiles, dir: &str) -> anyhow::Result<Self> {
        let mut inner = if files.exists(&format!("{dir}/tokenizer.json")) {
            let bytes = files.read(&format!("{dir}/tokenizer.json"))?;
            Tokenizer::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{dir}/tokenizer.json: {e}"))?
        } else if files.exists(&format!("{dir}/vocab.json")) && files.exists(&format!("{dir}/merges.txt")) {
            qwen2_from_vocab_and_merges(files, dir)?
        } else {
            bail!("{dir}/: no tokenizer.json, and no vocab.json + merges.txt to build one from");
        };
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(JsonTokenizer { inner })
    }

    /// Ids of `text`, at most `max_len` of them, and how many were dropped.
    pub fn encode(&self, text: &str, max_len: usize) -> anyhow::Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let ids = enc.get_ids();
        let kept = ids.len().min(max_len);
        Ok(Encoded { ids: ids[..kept].to_vec(), dropped_tokens: ids.len() - kept })
    }
}

/// Qwen2's pre-tokenizer pattern (transformers' `Qwen2Tokenizer`).
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The fast tokenizer transformers builds from Qwen2's slow files
/// (`Qwen2Converter`): NFC, the Qwen2 split, byte-level BPE without unknown
/// token, and the added tokens of `tokenizer_config.json` at their ids.
fn qwen2_from_vocab_and_merges(files: &ModelFiles, dir: &str) -> anyhow::Result<Tokenizer> {
    use tokenizers::{AddedToken, DecoderWrapper};
    let vocab: std::collections::HashMap<String, u32> = files.json(&format!("{dir}/vocab.json"))?;
    let merges = read_merges(files, dir)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{dir}: building BPE: {e}"))?;
    let mut t = Tokenizer::new(bpe);
    t.with_normalizer(Some(NormalizerWrapper::NFC(NFC)));
    let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSeq::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]))));
    t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, false, false))));
    #[derive(serde::Deserialize)]
    struct Added {
        content: String,
        #[serde(default)]
        special: bool,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
        #[serde(default)]
        normalized: bool,
        #[serde(default)]
        single_word: bool,
    }
    #[derive(serde::Deserialize, Default)]
    struct Config {
        #[serde(default)]
        added_tokens_decoder: std::collections::BTreeMap<String, Added>,
    }
    let config: Config = if files.exists(&format!("{dir}/tokenizer_config.json")) {
        files.json(&format!("{dir}/tokenizer_config.json"))?
    } else {
        Config::default()
    };
    let mut added: Vec<(u32, Added)> = Vec::new();
    for (id, a) in config.added_tokens_decoder {
        let id: u32 = id.parse().with_context(|| format!("{dir}/tokenizer_config.json: added token id {id:?}"))?;
        added.push((id, a));
    }
    added.sort_by_key(|(id, _)| *id);
    for (id, a) in added {
        let token = AddedToken::from(a.content.clone(), a.special)
            .lstrip(a.lstrip)
            .rstrip(a.rstrip)
            .normalized(a.normalized)
            .single_word(a.single_word);
        if a.special {
            t.add_special_tokens(&[token]);
        } else {
            t.add_tokens(&[token]);
        }
        // Added tokens get the next free ids: they must land where the
        // config says, or every id after them would be off.
        match t.token_to_id(&a.content) {
            Some(got) if got == id => {}
            got => bail!(
                "{dir}/tokenizer_config.json: added token {:?} is id {id}, the vocabulary gives {got:?}",
                a.content
            ),
        }
    }
    Ok(t)
}

/// `merges.txt` as (left, right) pairs (the `#version` header and blank
/// lines skipped).
fn read_merges(files: &ModelFiles, dir: &str) -> anyhow::Result<Vec<(String, String)>> {
    let text = files.read(&format!("{dir}/merges.txt"))?;
    let text = std::str::from_utf8(&text).with_context(|| format!("{dir}/merges.txt is not UTF-8"))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => bail!("{dir}/merges.txt line {}: expected two symbols", n + 1),
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// tiny-z-image's tokenizer folder has both tokenizer.json and the slow
    /// files: the two must tokenize alike, chat template and all.
    #[test]
    fn qwen2_slow_files_tokenize_like_tokenizer_json() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-z-image");
        let files = ModelFiles::dir(&root);
        let json = JsonTokenizer::load(&files, "tokenizer").unwrap();
        let slow = JsonTokenizer { inner: qwen2_from_vocab_and_merges(&files, "tokenizer").unwrap() };
        let texts = [
            "a red circle on the left",
            "<|im_start|>user\nA lighthouse at dusk, 35mm photo!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            "  Multiple   spaces, 1234 digits, naïve café — ünïcödé\r\n\ttabs",
            "",
        ];
        for text in texts {
            assert_eq!(slow.encode(text, 512).unwrap(), json.encode(text, 512).unwrap(), "{text:?}");
        }
    }
}
