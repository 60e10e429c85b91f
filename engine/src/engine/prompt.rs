//! The one prompt pipeline: chat template, tokenizer, and the checks a prompt must pass
//! before it may run. A [`Prompter`] is cheap to clone and usable from any thread, so a
//! front end can refuse a bad prompt before queuing it, and the engine thread runs the
//! very ids the front end checked (a [`Prompt::Prepared`]) instead of preparing twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use super::request::{ChatMessage, ContentPart, Prompt};
use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;
use crate::towers::Modality;

/// A prompt that passed [`Prompter::prepare`]: token ids inside the vocabulary, shorter
/// than the context. Only the prompter makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedPrompt {
    ids: Vec<u32>,
}

impl PreparedPrompt {
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn into_ids(self) -> Vec<u32> {
        self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Renders, tokenizes and checks prompts for one loaded model.
#[derive(Clone, Debug)]
pub struct Prompter {
    tokenizer: Option<Arc<TextTokenizer>>,
    vocab_size: usize,
    /// Shared with the engine: a context limit set while serving applies here at once.
    max_context: Arc<AtomicUsize>,
}

impl Prompter {
    pub(crate) fn new(
        tokenizer: Option<Arc<TextTokenizer>>,
        vocab_size: usize,
        max_context: Arc<AtomicUsize>,
    ) -> Self {
        Prompter {
            tokenizer,
            vocab_size,
            max_context,
        }
    }

    /// Context length in tokens (prompt plus generated).
    pub fn max_context(&self) -> usize {
        self.max_context.load(Ordering::Relaxed)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_deref()
            .ok_or(EngineError::Unavailable("the tokenizer (tokenizer.json)"))
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tokenizer()?.encode(text, add_special)
    }

    /// Text of `ids`; with `skip_special`, special tokens are left out.
    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_vocab(ids)?;
        self.tokenizer()?.decode(ids, skip_special)
    }

    fn check_vocab(&self, ids: &[u32]) -> Result<()> {
        let v = self.vocab_size;
        match ids.iter().find(|&&i| i as usize >= v) {
            Some(bad) => Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {v})"
            ))),
            None => Ok(()),
        }
    }

    /// The chat template's rendering of `messages`. Media parts are refused before any
    /// tower is touched: no encoder runs in this build.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let mut parts = Vec::new();
            for p in &m.content {
                match p {
                    ContentPart::Text(t) => parts.push(json!({"type": "text", "text": t})),
                    ContentPart::Image(_) => return Err(no_encoder(Modality::Vision)),
                    ContentPart::Audio(_) => return Err(no_encoder(Modality::Audio)),
                }
            }
            // A single text part renders as plain string content, as apps send it.
            let content = match parts.as_slice() {
                [p] => p["text"].clone(),
                _ => Value::Array(parts),
            };
            out.push(json!({"role": m.role, "content": content}));
        }
        self.tokenizer()?
            .render_chat(&Value::Array(out), add_generation_prompt)
    }

    /// The ids `prompt` runs as, checked: not empty, inside the vocabulary, and leaving
    /// room in the context for at least one generated token.
    pub fn prepare(&self, prompt: &Prompt) -> Result<PreparedPrompt> {
        let ids = match prompt {
            Prompt::Prepared(p) => p.ids.clone(),
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => self.tokenize(t, true)?,
            Prompt::Chat(msgs) => {
                let text = self.render_chat(msgs, true)?;
                // The template already emits <bos>.
                self.tokenize(&text, false)?
            }
        };
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        self.check_vocab(&ids)?;
        let max = self.max_context();
        if ids.len() >= max {
            return Err(EngineError::ContextFull {
                needed: ids.len() + 1,
                max,
            });
        }
        Ok(PreparedPrompt { ids })
    }
}

fn no_encoder(m: Modality) -> EngineError {
    EngineError::ModalityUnavailable(format!(
        "{m} input is not available: this gemmad has no {m} encoder yet (the {m} tower's \
         weights can be loaded, but not run); send text parts only"
    ))
}
