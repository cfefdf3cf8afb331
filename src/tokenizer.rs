//! A `tokenizers` tokenizer built from GGUF metadata alone (no hub access).
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE, as SmolLM2 uses), with the
//! pre-tokenizer chosen by `tokenizer.ggml.pre`, and `"llama"` (SentencePiece pieces with
//! scores and byte fallback, as LLaMA-1/2 GGUFs use). Tokens whose `token_type` is 3 (control) or
//! 4 (user-defined) become special tokens, so ChatML markers such as `<|im_start|>` encode to
//! single ids.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{GgufError, GgufFile};

/// Errors while building or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Metadata missing or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tokenizer kind meft does not build.
    #[error("tokenizer model '{0}' is not supported (supported: gpt2 byte-level BPE, llama sentencepiece)")]
    UnsupportedModel(String),
    /// A pre-tokenizer kind meft does not know.
    #[error("pre-tokenizer '{0}' is not supported (supported: smollm, gpt2, default)")]
    UnsupportedPre(String),
    /// A malformed merge rule.
    #[error("merge rule {index} ('{rule}') is not two tokens separated by a space")]
    BadMerge {
        /// Index of the rule.
        index: usize,
        /// The rule text.
        rule: String,
    },
    /// The `tokenizers` crate rejected the input.
    #[error("tokenizer: {0}")]
    Build(String),
}

/// A text tokenizer plus the special ids the model uses.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence id, if the model declares one.
    pub bos_id: Option<u32>,
    /// End-of-sequence id (generation stops here).
    pub eos_id: Option<u32>,
    /// Whether the model expects BOS prepended to every input.
    pub add_bos: bool,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The system message the model's ChatML template inserts when none is given.
    pub default_system: Option<String>,
}

/// GPT-2 style byte-level BPE (SmolLM2): vocabulary + merges, pre-tokenizer per
/// `tokenizer.ggml.pre`.
fn byte_level_bpe(gguf: &GgufFile, tokens: &[&str]) -> Result<Tokenizer, TokenizerError> {
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(index, rule)| match rule.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
            _ => Err(TokenizerError::BadMerge {
                index,
                rule: rule.to_string(),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let pre = gguf
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM's tokenizer.json: split digits individually, then GPT-2 byte-level regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "default" => byte_level.into(),
        other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
    };
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// LLaMA-style SentencePiece (`tokenizer.ggml.model = "llama"`): pieces with scores and byte
/// fallback, spaces as `▁` with one prepended. Built as a unigram model over the pieces'
/// scores, which picks the highest-scoring segmentation (SentencePiece's BPE merges by the
/// same scores; the two agree on common text, and an id sequence always decodes exactly).
fn sentencepiece(
    gguf: &GgufFile,
    tokens: &[&str],
    types: &[u64],
) -> Result<Tokenizer, TokenizerError> {
    let scores: Vec<f64> = gguf
        .metadata
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    if scores.len() != tokens.len() {
        return Err(TokenizerError::Build(format!(
            "sentencepiece: {} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let unk = gguf
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or_else(|| types.iter().position(|&t| t == 2))
        .filter(|&u| u < tokens.len());
    let vocab = tokens.iter().map(|t| t.to_string()).zip(scores).collect();
    let model =
        Unigram::from(vocab, unk, true).map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut inner = Tokenizer::new(model);
    let replace =
        |a: &str, b: &str| Replace::new(a, b).map_err(|e| TokenizerError::Build(e.to_string()));
    inner.with_normalizer(Some(NormalizerSequence::new(vec![
        Prepend::new("▁".into()).into(),
        replace(" ", "▁")?.into(),
    ])));
    inner.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(inner)
}

/// The literal default system message of a ChatML Jinja template, if it writes one.
fn default_system_message(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let len = template[start..].find("<|im_end|>")?;
    let msg = &template[start..start + len];
    (!msg.contains("{{") && !msg.contains('\'')).then(|| msg.to_string())
}

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if !matches!(model, "gpt2" | "llama") {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let token_types: Vec<u64> = match gguf.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let mut inner = match model {
            "gpt2" => byte_level_bpe(gguf, &tokens)?,
            "llama" => sentencepiece(gguf, &tokens, &token_types)?,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);

        let id = |key: &str| {
            gguf.metadata
                .get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        Ok(Self {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            add_bos: gguf
                .metadata
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            vocab_size: tokens.len(),
            default_system: gguf
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .and_then(default_system_message),
        })
    }

    /// Encodes text (special tokens such as `<|im_start|>` are recognised), adding BOS if the
    /// model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, keeping special tokens visible.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Build(e.to_string()))
    }

    /// Formats a single user turn in ChatML (with the template's default system message, if
    /// it has one), ending where the assistant's answer begins.
    pub fn chatml_prompt(&self, user: &str) -> String {
        let system = match &self.default_system {
            Some(sys) => format!("<|im_start|>system\n{sys}<|im_end|>\n"),
            None => String::new(),
        };
        format!("{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
