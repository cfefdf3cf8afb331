//! ChatML tokenization with answer-only loss, and the burn batcher.
//!
//! An example becomes `ChatML(prompt) ++ answer ++ <|im_end|>` (the model's end-of-turn token,
//! or its EOS when it has no ChatML tokens); only the answer and the end token are targets.
//! Batches are right-padded. No attention mask is needed: attention is causal, so a real token
//! never attends to a padding token after it, and padding positions are out of the loss.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::{DataError, QaExample};
use crate::model::CausalLmBatch;
use crate::tokenizer::TextTokenizer;

/// Batches are padded to a multiple of this many positions (fewer distinct shapes on GPUs).
pub const PAD_TO: usize = 8;

/// An example as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    /// The example's id.
    pub id: String,
    /// Prompt, answer and end token.
    pub ids: Vec<u32>,
    /// Tokens of the prompt (the first answer token is `ids[prompt_len]`).
    pub prompt_len: usize,
}

/// The end-of-answer token: `<|im_end|>` if the vocabulary has it, else EOS.
pub fn end_token(tok: &TextTokenizer) -> Option<u32> {
    tok.inner().token_to_id("<|im_end|>").or(tok.eos_id)
}

/// The prompt's ids: the ChatML user turn, ending where the assistant's answer begins.
pub fn prompt_ids(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>, String> {
    tok.encode(&tok.chatml_prompt(prompt))
        .map_err(|e| e.to_string())
}

/// Tokenizes examples with their first answer as the target. Errors name the example: one
/// longer than `max_len` tokens, or an answer that tokenizes to nothing.
pub fn tokenize(
    examples: &[QaExample],
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<Vec<TokenizedExample>, DataError> {
    let end = end_token(tok);
    examples
        .iter()
        .map(|e| {
            let err = |message: String| DataError::Tokenize {
                id: e.id.clone(),
                message,
            };
            let mut ids = prompt_ids(tok, &e.prompt).map_err(err)?;
            let prompt_len = ids.len();
            let answer = tok
                .inner()
                .encode(e.answers[0].as_str(), false)
                .map_err(|x| err(x.to_string()))?;
            if answer.is_empty() {
                return Err(err("the answer tokenizes to nothing".into()));
            }
            ids.extend_from_slice(answer.get_ids());
            ids.extend(end);
            if ids.len() > max_len {
                return Err(DataError::TooLong {
                    id: e.id.clone(),
                    tokens: ids.len(),
                    max: max_len,
                });
            }
            Ok(TokenizedExample {
                id: e.id.clone(),
                ids,
                prompt_len,
            })
        })
        .collect()
}

/// A causal-LM batch plus its token counts.
#[derive(Debug, Clone)]
pub struct QaBatch<B: Backend> {
    /// Inputs, next-token targets and the answer-only target mask.
    pub lm: CausalLmBatch<B>,
    /// Flat `batch · seq` indices of the in-loss targets' positions.
    pub positions: Tensor<B, 1, Int>,
    /// The targets at those positions.
    pub answer_targets: Tensor<B, 1, Int>,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
    /// Targets in the loss (answer tokens).
    pub targets: usize,
    /// The same ids on the host (empty where the batch was made on the device).
    pub host: Arc<HostIds>,
}

/// A batch's ids on the host, for choices made there before the forward (LeMo's
/// `pattern = "difficulty"`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostIds {
    /// Inputs `[batch, seq]`, row-major.
    pub inputs: Vec<i64>,
    /// Next-token targets `[batch, seq]`, row-major.
    pub targets: Vec<i64>,
    /// Whether each position's target is in the loss, `[batch, seq]`.
    pub in_loss: Vec<bool>,
}

/// Right-pads tokenized examples into [`QaBatch`]es.
#[derive(Debug, Clone, Copy)]
pub struct QaBatcher {
    /// Id used for padding (never a target).
    pub pad_id: u32,
}

impl<B: Backend> Batcher<B, TokenizedExample, QaBatch<B>> for QaBatcher {
    fn batch(&self, items: Vec<TokenizedExample>, device: &B::Device) -> QaBatch<B> {
        let b = items.len();
        let longest = items
            .iter()
            .map(|e| e.ids.len() - 1)
            .max()
            .unwrap_or(1)
            .max(1);
        let t = longest.div_ceil(PAD_TO) * PAD_TO;
        let mut inputs = vec![self.pad_id as i64; b * t];
        let mut targets = vec![self.pad_id as i64; b * t];
        let mut mask = vec![0f32; b * t];
        let (mut tokens, mut counted) = (0, 0);
        let (mut positions, mut answer) = (Vec::new(), Vec::new());
        for (i, e) in items.iter().enumerate() {
            let n = e.ids.len() - 1;
            tokens += n;
            for p in 0..n {
                inputs[i * t + p] = e.ids[p] as i64;
                targets[i * t + p] = e.ids[p + 1] as i64;
                if p + 1 >= e.prompt_len {
                    mask[i * t + p] = 1.0;
                    counted += 1;
                    positions.push((i * t + p) as i64);
                    answer.push(e.ids[p + 1] as i64);
                }
            }
        }
        let host = Arc::new(HostIds {
            inputs: inputs.clone(),
            targets: targets.clone(),
            in_loss: mask.iter().map(|&m| m > 0.0).collect(),
        });
        let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, t]), device);
        let flat = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        QaBatch {
            positions: flat(positions),
            answer_targets: flat(answer),
            lm: CausalLmBatch {
                inputs: int(inputs),
                targets: int(targets),
                target_mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
            },
            tokens,
            targets: counted,
            host,
        }
    }
}
