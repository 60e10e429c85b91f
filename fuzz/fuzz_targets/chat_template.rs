//! Hostile message text through the real prompt pipeline: the fixture's chat template
//! (from its `tokenizer_config.json`), the tokenizer and the prompt checks. The input is
//! split into messages at NUL bytes; the first byte picks roles and a system message.
#![no_main]

use std::sync::OnceLock;

use gemmad_engine::internals::parse;
use gemmad_engine::{ChatMessage, ContentPart, Prompt, Prompter};
use libfuzzer_sys::fuzz_target;

static TOKENIZER_JSON: &[u8] = include_bytes!("../../engine/tests/fixtures/text/tokenizer.json");
static TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../engine/tests/fixtures/text/tokenizer_config.json");

fn prompter() -> &'static Prompter {
    static P: OnceLock<Prompter> = OnceLock::new();
    P.get_or_init(|| {
        let tok = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON).expect("fixture tokenizer");
        let tok = parse::tokenizer(tok, Some(TOKENIZER_CONFIG), None).expect("fixture config");
        let vocab = tok.vocab_size();
        parse::prompter(tok, vocab, 32768)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let roles = ["user", "assistant", "model", "system"];
    let mut msgs: Vec<ChatMessage> = text
        .split('\0')
        .enumerate()
        .map(|(i, t)| ChatMessage {
            // Mostly alternating, as the template requires; mode bits break the pattern.
            role: if mode & 1 == 1 {
                roles[(i + (mode as usize >> 1)) % roles.len()]
            } else {
                roles[i % 2]
            }
            .into(),
            content: if mode & 2 == 2 {
                // Several text parts: the list form of content.
                t.split('\u{1}')
                    .map(|p| ContentPart::Text(p.into()))
                    .collect()
            } else {
                vec![ContentPart::Text(t.into())]
            },
        })
        .collect();
    if mode & 4 == 4 {
        msgs.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: vec![ContentPart::Text("You are terse.".into())],
            },
        );
    }
    let p = prompter();
    if let Ok(prepared) = p.prepare(&Prompt::Chat(msgs)) {
        assert!(!prepared.is_empty() && prepared.len() < p.max_context());
        let _ = p.detokenize(prepared.ids(), false);
    }
});
