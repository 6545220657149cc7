//! Text tokenizers, built from the files in a model's `tokenizer*/` folders.
//!
//! CLIP folders in the diffusers layout carry `vocab.json` + `merges.txt`
//! (the slow tokenizer's files); we assemble the same tokenizer as OpenAI's
//! reference from them with the `tokenizers` crate: lower-cased, whitespace
//! collapsed, CLIP's word regex, byte-level alphabet, BPE with `</w>` word
//! ends. A folder with a `tokenizer.json` is loaded as is (Qwen for Z-Image).

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
    let merges_text = files.read(&format!("{dir}/merges.txt"))?;
    let merges_text = std::str::from_utf8(&merges_text).context("merges.txt is not UTF-8")?;
    let mut merges = Vec::new();
    for (n, line) in merges_text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => bail!("{dir}/merges.txt line {}: expected two symbols", n + 1),
        }
    }
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
    pub fn load(files: &ModelFiles, dir: &str) -> anyhow::Result<Self> {
        let bytes = files.read(&format!("{dir}/tokenizer.json"))?;
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{dir}/tokenizer.json: {e}"))?;
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
