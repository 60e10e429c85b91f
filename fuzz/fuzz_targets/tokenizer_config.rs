//! `tokenizer_config.json` (special-token strings and the chat template it may carry)
//! with the fixture's `tokenizer.json`; a template that builds renders a conversation.
#![no_main]

use std::sync::OnceLock;

use gemmad_engine::internals::parse;
use gemmad_engine::{ChatMessage, ContentPart, Prompt};
use libfuzzer_sys::fuzz_target;

static TOKENIZER_JSON: &[u8] = include_bytes!("../../engine/tests/fixtures/text/tokenizer.json");

fn tokenizer() -> tokenizers::Tokenizer {
    static TOK: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON).expect("fixture tokenizer.json")
    })
    .clone()
}

fuzz_target!(|config: &[u8]| {
    let Ok(tok) = parse::tokenizer(tokenizer(), Some(config), None) else {
        return;
    };
    if !tok.has_chat_template() {
        return;
    }
    let vocab = tok.vocab_size();
    let prompter = parse::prompter(tok, vocab, 4096);
    let msg = |role: &str, text: &str| ChatMessage {
        role: role.into(),
        content: vec![ContentPart::Text(text.into())],
    };
    let chat = vec![
        msg("system", "Be brief."),
        msg("user", "Hello"),
        msg("assistant", "Hi."),
        msg("user", "How are you?"),
    ];
    let _ = prompter.prepare(&Prompt::Chat(chat));
});
