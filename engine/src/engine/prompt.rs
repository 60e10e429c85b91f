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
    /// Where a conversation's system prompt ends (tokens every conversation starting
    /// with it shares): the prompt cache snapshots there so that other conversations
    /// resume it.
    system_end: Option<usize>,
}

impl PreparedPrompt {
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn system_end(&self) -> Option<usize> {
        self.system_end
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

    /// [`Prompter::tokenize`] for text that must come to at most `max_tokens` tokens
    /// to be of use: a longer text is refused having cost no more than tokenizing about
    /// twice `max_tokens` tokens (see [`Prompter::clearly_over`]).
    pub fn tokenize_within(
        &self,
        text: &str,
        add_special: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>> {
        let too_long = |read: usize, tokens: usize| {
            EngineError::InvalidRequest(format!(
                "the text is too long: its first {read} of {} bytes are already about \
                 {tokens} tokens, and at most {max_tokens} are allowed",
                text.len()
            ))
        };
        if let Some((read, tokens)) = self.clearly_over(text, max_tokens)? {
            return Err(too_long(read, tokens));
        }
        let ids = self.tokenize(text, add_special)?;
        if ids.len() > max_tokens {
            return Err(too_long(text.len(), ids.len()));
        }
        Ok(ids)
    }

    /// Whether `text` is clearly more than `max_tokens` tokens: `Some((bytes read,
    /// tokens counted))` as soon as that is certain. The tokenizer holds ~200 bytes per
    /// token while it works, so a megabyte of one-byte tokens costs ~200 MB, only for
    /// the prompt to be refused as too long. Text over [`COUNT_CHUNK`] bytes is
    /// therefore counted a piece at a time, stopping once the count is clearly over;
    /// pieces tokenized apart can differ from the whole by a token or so at each cut,
    /// so "clearly" is twice `max_tokens`. Shorter text is not counted (`None`).
    fn clearly_over(&self, text: &str, max_tokens: usize) -> Result<Option<(usize, usize)>> {
        if text.len() <= COUNT_CHUNK {
            return Ok(None);
        }
        let tok = self.tokenizer()?;
        let limit = max_tokens.saturating_mul(2).saturating_add(64);
        let (mut read, mut tokens) = (0, 0);
        for piece in pieces(text, COUNT_CHUNK) {
            tokens += tok.encode(piece, false)?.len();
            read += piece.len();
            if tokens > limit {
                return Ok(Some((read, tokens)));
            }
        }
        Ok(None)
    }

    /// Ids of a prompt text, or ContextFull as soon as it is clearly too long.
    fn tokenize_room(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let max = self.max_context();
        if let Some((_, tokens)) = self.clearly_over(text, max)? {
            return Err(EngineError::ContextFull {
                needed: tokens + 1,
                max,
            });
        }
        self.tokenize(text, add_special)
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

    /// The ids every conversation that starts with `messages` shares, for the prompt
    /// cache to keep warm: the conversation rendered without a generation prompt. When it
    /// ends with a system message, the template may put that text inside the next turn
    /// (Gemma's starts the first user turn with it), so the rendering of `messages` plus
    /// a placeholder user turn is cut where the placeholder begins.
    pub fn prefix_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        const MARK: &str = "\u{F8FF}gemmad-prefix\u{F8FF}";
        let Some(last) = messages.last() else {
            return Err(EngineError::InvalidRequest(
                "the prompt to cache has no messages".into(),
            ));
        };
        let text = if last.role == "system" {
            let mut with = messages.to_vec();
            with.push(ChatMessage::text("user", MARK));
            let full = self.render_chat(&with, false)?;
            let mut found = full.match_indices(MARK);
            match (found.next(), found.next()) {
                (Some((i, _)), None) => full[..i].to_string(),
                _ => {
                    return Err(EngineError::InvalidRequest(
                        "the chat template does not render a system message as a prefix of \
                         the conversation; cache the first turn with it instead"
                            .into(),
                    ))
                }
            }
        } else {
            self.render_chat(messages, false)?
        };
        // The template already emits <bos>.
        let ids = self.tokenize_room(&text, false)?;
        if ids.len() < 2 {
            return Err(EngineError::InvalidRequest(
                "the prompt to cache renders to fewer than 2 tokens".into(),
            ));
        }
        self.check_vocab(&ids)?;
        Ok(ids)
    }

    /// The ids `prompt` runs as, checked: not empty, inside the vocabulary, and leaving
    /// room in the context for at least one generated token.
    pub fn prepare(&self, prompt: &Prompt) -> Result<PreparedPrompt> {
        let mut system_end = None;
        let ids = match prompt {
            Prompt::Prepared(p) => {
                system_end = p.system_end;
                p.ids.clone()
            }
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => self.tokenize_room(t, true)?,
            Prompt::Chat(msgs) => {
                let text = self.render_chat(msgs, true)?;
                // The template already emits <bos>.
                let ids = self.tokenize_room(&text, false)?;
                if msgs.len() > 1 && msgs[0].role == "system" {
                    // Where the system prompt's tokens end in this very tokenization
                    // (the boundary may merge differently than the prefix alone).
                    system_end = self
                        .prefix_ids(&msgs[..1])
                        .ok()
                        .map(|p| crate::prompt_cache::common_prefix(&p, &ids))
                        .filter(|&n| n > 1 && n < ids.len());
                }
                ids
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
        Ok(PreparedPrompt { ids, system_end })
    }
}

/// Bytes of text counted at a time by [`Prompter::tokenize_within`].
const COUNT_CHUNK: usize = 64 << 10;

/// `text` in pieces of about `size` bytes, cut after a newline or a space near the end
/// of each piece where there is one (cuts inside words change the count most), else at
/// a character boundary.
fn pieces(text: &str, size: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = size.min(rest.len());
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end < rest.len() {
            let window = &rest.as_bytes()[end.saturating_sub(1024)..end];
            if let Some(i) = window.iter().rposition(|&b| b == b'\n' || b == b' ') {
                end = end - window.len() + i + 1;
            }
        }
        if end == 0 {
            // Only when size is smaller than one character: take the character.
            end = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

fn no_encoder(m: Modality) -> EngineError {
    EngineError::ModalityUnavailable(format!(
        "{m} input is not available: this gemmad has no {m} encoder yet (the {m} tower's \
         weights can be loaded, but not run); send text parts only"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text_and_cut_after_spaces() {
        let text = "ab cd\nééé fgh ".repeat(50);
        for size in [1, 2, 7, 64, 1000, 10_000] {
            let p: Vec<&str> = pieces(&text, size).collect();
            assert_eq!(p.concat(), text, "size {size}");
            assert!(p.iter().all(|s| !s.is_empty() && s.len() <= size.max(2)));
            if size >= 64 {
                // All but the last end after a separator.
                assert!(p[..p.len() - 1].iter().all(|s| s.ends_with([' ', '\n'])));
            }
        }
        assert_eq!(pieces("", 8).count(), 0);
    }
}
