//! The engine's request and response types: prompts (text, chat messages with media
//! parts, prepared ids), generation settings, streamed tokens, usage and timings.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::sampling::SamplingParams;

/// One part of a chat message.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentPart {
    Text(String),
    /// Encoded image bytes (PNG/JPEG).
    Image(Vec<u8>),
    /// Encoded audio bytes (WAV) or raw PCM.
    Audio(Vec<u8>),
}

/// A chat message; `role` is `system`, `user`, `assistant` or `model`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn text(role: &str, text: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: vec![ContentPart::Text(text.to_string())],
        }
    }
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized with the tokenizer's special tokens (a leading `<bos>`).
    Text(String),
    /// A conversation rendered with the chat template, ending in a generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids as given.
    Ids(Vec<u32>),
    /// Ids a [`super::Prompter`] already rendered and checked.
    Prepared(super::PreparedPrompt),
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Generation ends when the output contains one of these; it is not emitted.
    pub stop: Vec<String>,
    /// Keep going past EOS ids (benchmarks, parity checks).
    pub ignore_eos: bool,
    /// Set from another thread to stop at the next step.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The MatFormer slice to run it on; `None` (or `auto`): the engine's active one.
    pub slice: Option<String>,
    /// The uid the request came from: kept K/V states are reused only by requests of the
    /// same user (or shared by an administrator). `None`: an in-process caller.
    pub user: Option<u32>,
    /// Start from a kept state sharing a prefix of the prompt, and keep this one for
    /// later requests (default). Off: prefill from zero and keep nothing.
    pub cache_prompt: bool,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            cancel: None,
            slice: None,
            user: None,
            cache_prompt: true,
        }
    }
}

/// One streamed token: its id and the text it completes (may be empty while a multi-byte
/// character or a possible stop string is still pending).
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    pub id: u32,
    pub text: &'a str,
    /// True only for the last event of a generation that releases text held back for a
    /// possible stop string; `id` then repeats the last token and is not a new one.
    pub flush: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was sampled.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    ContextFull,
    /// The caller cancelled.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens resumed from the prompt cache instead of prefilled (OpenAI's
    /// `cached_tokens`).
    pub cached_tokens: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prefill: Duration,
    /// From the call to the first token's callback.
    pub time_to_first_token: Duration,
    pub decode: Duration,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Re-prefills after forced slice switches, and the time they took.
    pub reprefills: u32,
    pub reprefill: Duration,
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// The MatFormer slice that produced the output (the last one, after a forced
    /// switch).
    pub slice: String,
}
